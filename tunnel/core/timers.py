"""Timed triggers as data: one table of rows, read both to fire and to schedule.

A row says in which states it is armed, when it is due (a deadline function of the
session), which trigger it fires and with which reason. ``due_rows`` gives the rows due at
``now``; ``earliest`` is the minimum deadline over the same rows, so what ``handle_timer``
acts on and what ``next_deadline`` reports can never disagree (aioquic's
``get_timer``/``handle_timer``; h11's ``_state.py`` keeps its transitions in tables too).

A deadline function returns an absolute time, or None when the row is not armed (its
clock is not running). Rows read state through the owning components' public
attributes; they never write anything.

``SESSION_ROWS`` are the rules the client and the gateway share: the session lifetime,
the transport-lost TTL and the recovery window. Each endpoint appends its own rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from tunnel.core.events import Reason
from tunnel.core.policy import Policy
from tunnel.core.session import PRIORITY, TERMINATION_PRIORITY, State, Trigger

__all__ = [
    "LIVE_STATES",
    "SESSION_ROWS",
    "SessionClocks",
    "TimedChore",
    "TimedRow",
    "chore_deadline",
    "due_rows",
    "earliest",
    "most_urgent_row",
    "run_due_chores",
]

LIVE_STATES: frozenset[State] = frozenset(State) - {State.BIRTH, State.TERMINATED}
"""States in which an established session keeps its clocks."""


class SessionClocks:
    """The start times both endpoints keep for one session. A component of its own: the
    session calls these methods at the moments they name; the rows read the fields."""

    __slots__ = ("born", "recovery_started", "transportless_since")

    def __init__(self, now: float, *, transportless: bool) -> None:
        self.born = now
        self.transportless_since: float | None = now if transportless else None
        self.recovery_started: float | None = None

    def transport_lost(self, now: float) -> None:
        """No active transport from ``now`` (the TTL clock starts unless it runs already)."""
        if self.transportless_since is None:
            self.transportless_since = now

    def transport_regained(self) -> None:
        self.transportless_since = None
        self.recovery_started = None

    def recovery_begun(self, now: float) -> None:
        self.recovery_started = now

    def recovery_ended(self) -> None:
        self.recovery_started = None

    def age_ms(self, now: float) -> float:
        return (now - self.born) * 1000

    def transportless_ms(self, now: float) -> float:
        return 0.0 if self.transportless_since is None else (now - self.transportless_since) * 1000


class HasClocks(Protocol):
    """What the shared rows read: the session's clocks and the policy it runs."""

    @property
    def clocks(self) -> SessionClocks: ...

    @property
    def policy(self) -> Policy: ...


Ctx = TypeVar("Ctx")


@dataclass(frozen=True, slots=True)
class TimedRow(Generic[Ctx]):
    """One timed trigger: armed in ``states``, due at ``deadline(ctx)`` (None: unarmed),
    fires ``trigger`` (or ``trigger_for(ctx)`` when the policy chooses) with ``reason``."""

    name: str
    states: frozenset[State]
    deadline: Callable[[Ctx], float | None]
    trigger: Trigger
    reason: Reason
    trigger_for: Callable[[Ctx], Trigger] | None = None

    def fires(self, ctx: Ctx) -> Trigger:
        return self.trigger if self.trigger_for is None else self.trigger_for(ctx)

    def armed_at(self, ctx: Ctx, state: State) -> float | None:
        return self.deadline(ctx) if state in self.states else None


@dataclass(frozen=True, slots=True)
class TimedChore(Generic[Ctx]):
    """A timed action that is no state-machine trigger (a retransmission, a cleanup): due
    at ``deadline(ctx)`` (None: nothing to do), done by ``run(ctx, now)``. Like a row, one
    definition serves both ``handle_timer`` and ``next_deadline``."""

    name: str
    deadline: Callable[[Ctx], float | None]
    run: Callable[[Ctx, float], None]


def run_due_chores(chores: Iterable[TimedChore[Ctx]], ctx: Ctx, now: float) -> None:
    """Run, in table order, every chore due at ``now``."""
    for chore in chores:
        t = chore.deadline(ctx)
        if t is not None and now >= t:
            chore.run(ctx, now)


def chore_deadline(chores: Iterable[TimedChore[Ctx]], ctx: Ctx) -> float | None:
    """The earliest deadline over ``chores`` (None: nothing to do)."""
    best: float | None = None
    for chore in chores:
        t = chore.deadline(ctx)
        if t is not None and (best is None or t < best):
            best = t
    return best


def due_rows(
    rows: Iterable[TimedRow[Ctx]], ctx: Ctx, state: State, now: float
) -> list[TimedRow[Ctx]]:
    """The rows armed in ``state`` whose deadline is at or before ``now``."""
    out = []
    for row in rows:
        t = row.armed_at(ctx, state)
        if t is not None and now >= t:
            out.append(row)
    return out


def earliest(rows: Iterable[TimedRow[Ctx]], ctx: Ctx, state: State) -> float | None:
    """The minimum deadline over the rows armed in ``state`` (None: nothing armed)."""
    best: float | None = None
    for row in rows:
        t = row.armed_at(ctx, state)
        if t is not None and (best is None or t < best):
            best = t
    return best


def most_urgent_row(rows: list[TimedRow[Ctx]], ctx: Ctx) -> TimedRow[Ctx] | None:
    """Among rows due at the same tick, the one to apply (SPEC-DIGEST §2.4, AT-08):
    termination > transport death > quality > stability; among terminations, the
    session TTL, then ownership, then the transport TTLs."""
    if not rows:
        return None

    def key(row: TimedRow[Ctx]) -> tuple[int, int]:
        sub = (
            TERMINATION_PRIORITY.index(row.reason)
            if row.reason in TERMINATION_PRIORITY
            else len(TERMINATION_PRIORITY)
        )
        return (PRIORITY[row.fires(ctx)], sub)

    return min(rows, key=key)


def _recovery_timeout(ctx: HasClocks) -> Trigger:
    return Trigger.TERMINATE if ctx.policy.on_recovery_timeout == "terminate" else Trigger.DEGRADE


def _lifetime_end(ctx: HasClocks) -> float:
    return ctx.clocks.born + ctx.policy.max_lifetime_ms / 1000


def _transport_ttl_end(ctx: HasClocks) -> float | None:
    since = ctx.clocks.transportless_since
    return None if since is None else since + ctx.policy.transport_lost_ttl_ms / 1000


def _recovery_window_end(ctx: HasClocks) -> float | None:
    started = ctx.clocks.recovery_started
    return None if started is None else started + ctx.policy.recovery_window_ms / 1000


SESSION_ROWS: tuple[TimedRow[HasClocks], ...] = (
    TimedRow(
        "session_lifetime", LIVE_STATES, _lifetime_end,
        Trigger.TERMINATE, Reason.SESSION_LIFETIME_EXCEEDED,
    ),
    TimedRow(
        "transport_lost_ttl", LIVE_STATES, _transport_ttl_end,
        Trigger.TERMINATE, Reason.TRANSPORT_TTL_EXCEEDED,
    ),
    TimedRow(
        "recovery_window", frozenset({State.RECOVERING}), _recovery_window_end,
        Trigger.TERMINATE, Reason.RECOVERY_WINDOW_EXCEEDED, trigger_for=_recovery_timeout,
    ),
)  # fmt: skip
"""The timed rules both endpoints share (SPEC-DIGEST §2.3 TTLs, D2 recovery window)."""
