"""The client's per-path side: candidate paths, their liveness, scores and probes.

``PathSpec`` names a configured path, ``_Path`` holds its ``PathHealth`` and hold-down,
``PathView`` shows it in a snapshot. ``_PathsMixin`` gives ``ClientSession`` the rules
that judge paths (live, eligible, held down, score, classification), the probe timer
and the PATH_VALIDATED / PATH_HEALTH_CHANGED events.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from tunnel.core.endpoint import EndpointBase
from tunnel.core.events import EventBase, PathHealthChanged, PathValidated
from tunnel.core.health import PathHealth, PathStats, path_score
from tunnel.core.policy import Policy
from tunnel.core.selection import HoldDown
from tunnel.core.wire import Control, Probe

STANDBY_LIVENESS_INTERVALS = 2
"""A standby path stays live while answered within this many standby probe intervals."""

SUSPECT_AFTER = 1.5
"""The active path is suspect once silent for this many probe intervals ..."""

SUSPECT_PROBE_SPEEDUP = 8
"""... and is then probed this many times faster until it answers (robust death: 10 %
loss each way leaves ~3 lost round trips in a row common, ~8 practically never)."""

SUSPECT_PROBE_MIN_S = 0.01
"""Suspicion probing is never faster than this (the policy's probe_interval floor)."""

ONE_WAY_LOSS_MARGIN = 0.05
"""Loss in one direction (PROBE_ACK ``rx_probes``) is judged against the policy threshold
plus this margin: a 3 s window holds ~30 probes, whose estimate of 10 % loss has a standard
error of ~0.055. Measured in the simulator over 30 seeds at the default policy: 30 % loss
one way switches 29/30 within 6 s (17/30 judged by round trips alone), 10 % one way or
each way stays ATTACHED 29/30 (a margin of 0: 26/30 and 19/30)."""


@dataclass(frozen=True, slots=True)
class PathSpec:
    """A candidate transport as the core sees it: an id and a human label."""

    path_id: int
    label: str


class _Path:
    """What the session keeps per candidate path: its health, hold-down and probe clock."""

    __slots__ = ("health", "holddown", "next_probe", "spec", "validated", "was_alive")

    def __init__(self, spec: PathSpec, policy: Policy, now: float) -> None:
        self.spec = spec
        self.health = _health(spec.path_id, policy, now)
        self.holddown = HoldDown(policy.failed_path_holddown_ms)
        self.validated = False
        self.next_probe = now
        self.was_alive = False


def _health(path_id: int, policy: Policy, now: float) -> PathHealth:
    return PathHealth(
        path_id,
        loss_window_ms=policy.loss_window_ms,
        dead_min_ms=policy.dead_min_ms,
        dead_rtt_multiplier=policy.dead_rtt_multiplier,
        min_loss_samples=policy.min_loss_samples,
        now=now,
    )


@dataclass(frozen=True, slots=True)
class PathView:
    """One path in a :class:`ClientSnapshot`: its stats and its role for the session."""

    stats: PathStats
    label: str
    role: str
    validated: bool


class _PathsMixin(EndpointBase):
    """Path judgement and probing for :class:`tunnel.core.client.ClientSession`."""

    policy: Policy
    active: int | None
    _paths: dict[int, _Path]
    _order: list[int]
    _excluded: set[int]
    _previous_dead: int | None
    _probe_seq: int

    if TYPE_CHECKING:  # provided by ClientSession

        def _base(self, now: float) -> EventBase: ...

        def _send_control(self, path_id: int, msg: Control) -> None: ...

    def _live(self, path_id: int, now: float) -> bool:
        """Validated and answering. The active path (and every path while none is active)
        is probed fast and dies by silence (D5); a standby path is probed slowly, so it is
        live while its last probes were answered within a few standby intervals."""
        p = self._paths[path_id]
        if not p.validated:
            return False
        if path_id == self.active or self.active is None:
            return not p.health.is_dead(now)
        last = p.health.last_inbound
        window = STANDBY_LIVENESS_INTERVALS * self.policy.standby_probe_interval_ms / 1000
        return (
            last is not None
            and now - last <= window + p.health.dead_after_ms() / 1000
            and p.health.consecutive_misses < self.policy.max_consecutive_drops
        )

    def _eligible(self, now: float, exclude: int | None = None) -> list[int]:
        return [
            pid
            for pid in self._order
            if pid != exclude and pid not in self._excluded and self._live(pid, now)
        ]

    def _targets(self, now: float, exclude: int | None = None) -> list[int]:
        """Eligible paths that are not held down after a recent failure (anti-flap)."""
        return [
            pid for pid in self._eligible(now, exclude) if not self._paths[pid].holddown.held(now)
        ]

    def _scores(self, now: float) -> dict[int, float]:
        return {pid: self._score(pid, now) for pid in self._paths}

    def _score(self, path_id: int, now: float) -> float:
        """The path's score, 0.0 unless :meth:`_live`. A standby path is judged by the
        standby liveness rule: its fast-probe death timer (``PathHealth.score``) runs out
        between two slow standby probes, which would make every standby score 0.0."""
        h = self._paths[path_id].health
        if not self._live(path_id, now):
            return 0.0
        return path_score(h.loss_ratio(now), h.srtt_ms, h.jitter_ms)

    def _stats(self, path_id: int, now: float) -> PathStats:
        """``PathHealth.stats`` with ``alive`` and ``score`` as the session judges them."""
        stats = self._paths[path_id].health.stats(now)
        return replace(stats, alive=self._live(path_id, now), score=self._score(path_id, now))

    def _classify(self, path_id: int, now: float) -> str | None:
        pol = self.policy
        # Probes measure round trips: loss p each way loses 1 - (1 - p)^2 of them. The
        # policy threshold is per packet (SPEC 8.1), so compare like with like: 10 % each
        # way (19 % of round trips) stays below 0.20 (36 % of round trips). Loss in one
        # direction only is judged on its own, from the gateway's probe counts.
        round_trip_threshold = 1.0 - (1.0 - pol.loss_volatile_threshold) ** 2
        return self._paths[path_id].health.classify(
            now,
            loss_threshold=round_trip_threshold,
            max_consecutive_drops=pol.max_consecutive_drops,
            latency_threshold_ms=pol.latency_volatile_threshold_ms,
            one_way_threshold=pol.loss_volatile_threshold + ONE_WAY_LOSS_MARGIN,
        )

    def _mark_validated(self, path_id: int, now: float) -> None:
        path = self._paths[path_id]
        if not path.validated:
            path.validated = True
            self.emit(PathValidated(**self._base(now), path=path.spec.label, transport_id=path_id))

    def _health_events(self, now: float) -> None:
        for pid in self._order:
            p = self._paths[pid]
            alive = self._live(pid, now)
            if alive != p.was_alive:
                p.was_alive = alive
                if alive:
                    p.holddown.recovered(now)
                elif p.health.consecutive_misses > 0 or pid == self._previous_dead:
                    # A real failure (probes went unanswered, or it died as the active
                    # path), not merely the stricter liveness rule of "no active path".
                    p.holddown.failed(now)
                stats = self._stats(pid, now)
                self.emit(
                    PathHealthChanged(
                        **self._base(now),
                        transport_id=pid,
                        alive=alive,
                        classification=self._classify(pid, now) or "healthy",
                        rtt_ms=stats.srtt_ms,
                        loss_ratio=stats.loss_ratio,
                        loss_up=round(stats.loss_up, 4),
                        loss_down=round(stats.loss_down, 4),
                        score=stats.score,
                    )
                )

    def _probe_timer(self, now: float) -> None:
        pol = self.policy
        fast = pol.probe_interval_ms / 1000
        slow = pol.standby_probe_interval_ms / 1000
        for pid in self._order:
            p = self._paths[pid]
            if now < p.next_probe:
                continue
            self._probe_seq = (self._probe_seq + 1) & 0xFFFFFFFF
            p.health.probe_sent(self._probe_seq, now)
            self._send_control(pid, Probe(self._probe_seq, pid, self.ts_ms(now)))
            # The active path is probed fast (loss and death detection, D5); while no path
            # is active every path is, so a live candidate is found quickly.
            interval = fast if pid == self.active or self.active is None else slow
            last = p.health.last_inbound
            if pid == self.active and last is not None and now - last > SUSPECT_AFTER * fast:
                # Suspicion: the active path missed an answer. Probe faster so that only
                # real silence lasts until the dead timer (a few lost probes do not).
                interval = max(SUSPECT_PROBE_MIN_S, fast / SUSPECT_PROBE_SPEEDUP)
            p.next_probe = now + interval
