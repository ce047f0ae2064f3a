"""The client's timed triggers as data: ``CLIENT_ROWS`` and the clocks they read.

``QualityClocks`` owns the client's quality clocks: since when the session is VOLATILE,
DEGRADED, since when the active path is judged stable, and the active path's instability
verdict with the time it was observed. The session calls its methods at the moments they
name (``observe`` once per timer turn, the others on the transitions); the rows read it.

``CLIENT_ROWS`` are ``SESSION_ROWS`` (lifetime, transport-lost TTL, recovery window) plus
the client's own rules. ``ClientSession.handle_timer`` fires the most urgent due row and
``ClientSession.next_deadline`` takes ``earliest`` over the same rows, so a deadline the
timer would not act on cannot be reported (SPEC-DIGEST §2.4 priorities, AT-08).
"""

from __future__ import annotations

from typing import Protocol, cast

from tunnel.core.events import Reason
from tunnel.core.path import PathSet
from tunnel.core.policy import Policy
from tunnel.core.session import State, Trigger
from tunnel.core.timers import SESSION_ROWS, SessionClocks, TimedRow

__all__ = ["CLIENT_ROWS", "ClientClocksView", "QualityClocks"]


class QualityClocks:
    """When the session became VOLATILE / DEGRADED, since when the active path is stable,
    and the active path's instability verdict (None: healthy or not judged)."""

    __slots__ = ("degraded_since", "stable_since", "unstable", "unstable_since", "volatile_since")

    def __init__(self) -> None:
        self.volatile_since: float | None = None
        self.degraded_since: float | None = None
        self.stable_since: float | None = None
        self.unstable: Reason | None = None
        self.unstable_since: float | None = None

    def observe(self, verdict: Reason | None, now: float) -> None:
        """The active path judged at ``now``: healthy (None) or the reason it is not."""
        if verdict is None:
            if self.stable_since is None:
                self.stable_since = now
            self.unstable = self.unstable_since = None
        else:
            self.stable_since = None
            self.unstable, self.unstable_since = verdict, now

    def unjudged(self) -> None:
        """No live active path to judge at this turn: no instability verdict."""
        self.unstable = self.unstable_since = None

    def volatile(self, now: float) -> None:
        self.volatile_since = now
        self.stable_since = None

    def degraded(self, now: float) -> None:
        self.degraded_since = now
        self.volatile_since = None

    def retrying(self) -> None:
        """DEGRADED -> RECOVERING: the degraded timeout no longer runs."""
        self.degraded_since = None

    def stable(self) -> None:
        """STABILITY_RESTORED: back to ATTACHED on the same path."""
        self.volatile_since = self.degraded_since = None

    def reset(self) -> None:
        """A new active path (or none): every quality clock starts afresh."""
        self.volatile_since = self.degraded_since = self.stable_since = None
        self.unstable = self.unstable_since = None


class ClientClocksView(Protocol):
    """What the client rows read."""

    @property
    def clocks(self) -> SessionClocks: ...

    @property
    def policy(self) -> Policy: ...

    @property
    def quality(self) -> QualityClocks: ...

    @property
    def paths(self) -> PathSet: ...


def _degraded_end(ctx: ClientClocksView) -> float | None:
    after = ctx.policy.degraded_terminate_after_ms
    since = ctx.quality.degraded_since
    return None if after is None or since is None else since + after / 1000


def _active_dead(ctx: ClientClocksView) -> float | None:
    return ctx.paths.active_dead_at()


def _unstable_by(reason: Reason) -> TimedRow[ClientClocksView]:
    def deadline(ctx: ClientClocksView) -> float | None:
        q = ctx.quality
        return q.unstable_since if q.unstable is reason else None

    return TimedRow(
        f"instability:{reason}", frozenset({State.ATTACHED}), deadline, Trigger.INSTABILITY, reason
    )


def _stability_end(ctx: ClientClocksView) -> float | None:
    since = ctx.quality.stable_since
    if since is None or ctx.paths.active is None:
        return None
    return since + ctx.policy.stability_window_ms / 1000


def _volatile_end(ctx: ClientClocksView) -> float | None:
    since = ctx.quality.volatile_since
    return None if since is None else since + ctx.policy.volatile_to_degraded_ms / 1000


WITH_ACTIVE: frozenset[State] = frozenset({State.ATTACHED, State.VOLATILE, State.DEGRADED})
"""States in which an active path can exist (RECOVERING has none)."""

INSTABILITY_REASONS: tuple[Reason, ...] = (
    Reason.CONSECUTIVE_DROP_EXCEEDED,
    Reason.LOSS_THRESHOLD_EXCEEDED,
    Reason.LATENCY_THRESHOLD_EXCEEDED,
)
"""What ``PathHealth.classify`` can say about a path that is not healthy."""

_SHARED = cast("tuple[TimedRow[ClientClocksView], ...]", SESSION_ROWS)
"""SESSION_ROWS read only what ``HasClocks`` names, which every ClientClocksView has (TimedRow
is invariant in its context type, so mypy needs telling)."""

CLIENT_ROWS: tuple[TimedRow[ClientClocksView], ...] = (
    *_SHARED,
    TimedRow(
        "degraded_timeout", frozenset({State.DEGRADED}), _degraded_end,
        Trigger.TERMINATE, Reason.DEGRADED_TIMEOUT,
    ),
    TimedRow(
        "active_path_dead", WITH_ACTIVE, _active_dead,
        Trigger.TRANSPORT_DEAD, Reason.TRANSPORT_DEAD,
    ),
    *(_unstable_by(r) for r in INSTABILITY_REASONS),
    TimedRow(
        "stability_restored", frozenset({State.VOLATILE, State.DEGRADED}), _stability_end,
        Trigger.STABILITY_RESTORED, Reason.STABILITY_RESTORED,
    ),
    TimedRow(
        "volatile_persisted", frozenset({State.VOLATILE}), _volatile_end,
        Trigger.DEGRADE, Reason.VOLATILE_PERSISTED,
    ),
)  # fmt: skip
"""Every timed rule of the client, in the order ties are broken within one priority."""
