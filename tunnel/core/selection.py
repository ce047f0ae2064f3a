"""Candidate selection: best candidate, hysteresis with dwell, switch-rate limit, cooldown.

Sans-I/O and deterministic (DESIGN D9, D12, D13; SPEC 4.6, 8.3): no clock, no
randomness; time comes in as ``now`` (seconds, monotonic). Ties always break on the
lowest path id.

The client protocol machine combines the three pieces::

    target = selector.evaluate(now, active, scores, eligible)     # hysteresis + dwell
    if target is not None:
        reason = limiter.check(now)                              # cap, then cooldown
        if reason is None: switch, then limiter.record(now)
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Collection, Mapping
from typing import Final

from tunnel.core.events import Reason

REASON_RATE_LIMITED: Final = Reason.SWITCH_RATE_LIMITED
"""SwitchLimiter.check(): max_per_min switches already happened in the last 60 s."""
REASON_COOLDOWN: Final = Reason.COOLDOWN_ACTIVE
"""SwitchLimiter.check(): the last switch is younger than cooldown_ms (automatic only)."""
REASON_NO_CANDIDATE: Final = Reason.NO_VALID_CANDIDATE
"""For the caller: best_candidate() found nothing eligible with a positive score."""

SWITCH_WINDOW_S: Final = 60.0
"""The switch cap is per sliding minute (SPEC 4.6)."""

_MS: Final = 1000.0


def best_candidate(
    scores: Mapping[int, float], eligible: Collection[int], exclude: int | None = None
) -> int | None:
    """Highest-scoring eligible path other than ``exclude``; ties -> lowest id.

    Only finite scores > 0 qualify (0.0 means dead). None when nothing qualifies.
    """
    best: int | None = None
    best_score = 0.0
    for path_id in sorted(eligible):
        if path_id == exclude:
            continue
        score = scores.get(path_id)
        if score is None or not math.isfinite(score) or score <= 0.0:
            continue
        if best is None or score > best_score:
            best, best_score = path_id, score
    return best


class SwitchLimiter:
    """Sliding 60 s switch budget plus cooldown (DESIGN D9, D12). Manual switches are exempt
    from the cooldown but are counted and subject to the per-minute cap (the cap is an
    invariant).

    A switch recorded at ``t`` counts against the budget while ``now < t + 60``. The
    cooldown lasts while ``now < last_switch + cooldown_ms / 1000``. History is a deque of
    at most ``max_per_min`` timestamps: more can never matter for the cap.
    """

    def __init__(self, max_per_min: int, cooldown_ms: float) -> None:
        self._max = 0
        self._cooldown_ms = 0.0
        self._times: deque[float] = deque(maxlen=1)
        self._last: float | None = None
        self.reconfigure(max_per_min, cooldown_ms)

    def reconfigure(self, max_per_min: int, cooldown_ms: float) -> None:
        """Apply new policy numbers; the switch history is kept (newest entries)."""
        if max_per_min < 1:
            raise ValueError(f"max_per_min must be >= 1 (the cap is finite), got {max_per_min}")
        if not (math.isfinite(cooldown_ms) and cooldown_ms >= 0):
            raise ValueError(f"cooldown_ms must be finite and >= 0, got {cooldown_ms}")
        self._max = int(max_per_min)
        self._cooldown_ms = float(cooldown_ms)
        self._times = deque(self._times, maxlen=self._max)

    def check(self, now: float, *, manual: bool = False) -> Reason | None:
        """None if a switch is allowed at ``now``, else the :class:`Reason`.

        ``switch_rate_limited`` is checked first (it applies to manual switches too),
        then ``cooldown_active`` (automatic switches only).
        """
        if self._in_window(now) >= self._max:
            return REASON_RATE_LIMITED
        until = self._cooldown_until()
        if not manual and until is not None and now < until:
            return REASON_COOLDOWN
        return None

    def record(self, now: float) -> None:
        """A switch happened at ``now`` (manual or automatic, allowed or forced)."""
        self._times.append(now)
        if self._last is None or now > self._last:
            self._last = now

    def budget_left(self, now: float) -> int:
        """Switches still allowed in the sliding minute ending at ``now``."""
        return max(0, self._max - self._in_window(now))

    def cooldown_remaining_ms(self, now: float) -> float:
        """Milliseconds until an automatic switch is no longer in cooldown (0.0 if none)."""
        until = self._cooldown_until()
        if until is None:
            return 0.0
        return max(0.0, (until - now) * _MS)

    def next_change(self, now: float) -> float | None:
        """The next ``now`` after this one at which the budget or the cooldown changes."""
        changes: list[float] = []
        until = self._cooldown_until()
        if until is not None and until > now:
            changes.append(until)
        ageing = [t + SWITCH_WINDOW_S for t in self._times if now < t + SWITCH_WINDOW_S]
        if ageing:
            changes.append(min(ageing))
        return min(changes) if changes else None

    def _in_window(self, now: float) -> int:
        return sum(1 for t in self._times if now < t + SWITCH_WINDOW_S)

    def _cooldown_until(self) -> float | None:
        if self._last is None:
            return None
        return self._last + self._cooldown_ms / _MS


class Selector:
    """Hysteresis: a candidate must beat the active path's score by `improvement_factor`
    continuously for `dwell_ms` before it is proposed. Ties break on the lowest path id.
    Deterministic: no randomness.

    "Continuously" is sampled: every :meth:`evaluate` call between the first sighting
    and the proposal must see the same candidate beating the active path. Once the dwell
    is complete the candidate keeps being returned for as long as that holds (so a
    proposal denied by the limiter is retried when the limiter allows it).
    """

    def __init__(self, improvement_factor: float = 1.10, dwell_ms: float = 300) -> None:
        self._factor = 1.0
        self._dwell_ms = 0.0
        self._candidate: int | None = None
        self._since = 0.0
        self._proposed = False
        self.reconfigure(improvement_factor, dwell_ms)

    def reconfigure(self, improvement_factor: float, dwell_ms: float) -> None:
        """Apply new policy numbers; an ongoing dwell keeps its start time."""
        if not (math.isfinite(improvement_factor) and improvement_factor >= 1.0):
            raise ValueError(
                f"improvement_factor must be finite and >= 1.0, got {improvement_factor}"
            )
        if not (math.isfinite(dwell_ms) and dwell_ms >= 0):
            raise ValueError(f"dwell_ms must be finite and >= 0, got {dwell_ms}")
        self._factor = float(improvement_factor)
        self._dwell_ms = float(dwell_ms)

    def evaluate(
        self,
        now: float,
        active: int | None,
        scores: Mapping[int, float],
        eligible: Collection[int],
    ) -> int | None:
        """The path to switch to at ``now``, or None.

        ``active`` None (no live active path): the best eligible candidate at once (no
        dwell), or None. Otherwise the best eligible candidate other than ``active``
        must score more than ``scores[active] * improvement_factor`` (an active path
        missing from ``scores`` counts as 0.0) and stay the same candidate doing so for
        ``dwell_ms``; any interruption restarts the dwell.
        """
        if active is None:
            self.reset()
            return best_candidate(scores, eligible)
        best = best_candidate(scores, eligible, exclude=active)
        if best is None or not scores[best] > self._factor * scores.get(active, 0.0):
            self.reset()
            return None
        if best != self._candidate:
            self._candidate = best
            self._since = now
            self._proposed = False
        if now >= self._dwell_end():
            self._proposed = True
            return best
        return None

    def next_deadline(self) -> float | None:
        """When an ongoing dwell would complete; None if there is none (or it completed)."""
        if self._candidate is None or self._proposed:
            return None
        return self._dwell_end()

    def reset(self) -> None:
        """Forget any ongoing dwell (e.g. after a switch or when auto-switch is turned off)."""
        self._candidate = None
        self._since = 0.0
        self._proposed = False

    @property
    def pending(self) -> int | None:
        """The candidate currently dwelling or proposed, if any (for the UI)."""
        return self._candidate

    def _dwell_end(self) -> float:
        return self._since + self._dwell_ms / _MS


HOLDDOWN_MEMORY_S: Final = 60.0
"""Failures of a path remembered for the hold-down backoff (the switch-cap window)."""

HOLDDOWN_MAX_DOUBLINGS: Final = 4
"""Hold-down grows base, 2x, 4x, 8x, at most 16x base for a path that keeps failing."""


class HoldDown:
    """Anti-flap (SPEC 4.6 "minimum stability before re-using a recently failed transport").

    A path that failed (went from live to not live) is no switch target until it has been
    live again, continuously, for the hold-down: ``base_ms`` after one failure in the last
    :data:`HOLDDOWN_MEMORY_S`, doubled for each further one (route-flap damping), at most
    ``2 ** HOLDDOWN_MAX_DOUBLINGS`` x base. Failing again restarts it. A path that never
    failed is never held down. Memory: at most ``HOLDDOWN_MAX_DOUBLINGS + 1`` timestamps.
    """

    def __init__(self, base_ms: float) -> None:
        self._base_ms = 0.0
        self._failures: deque[float] = deque(maxlen=HOLDDOWN_MAX_DOUBLINGS + 1)
        self._down = False
        self._until: float | None = None
        self.reconfigure(base_ms)

    def reconfigure(self, base_ms: float) -> None:
        if not (math.isfinite(base_ms) and base_ms >= 0):
            raise ValueError(f"base_ms must be finite and >= 0, got {base_ms}")
        self._base_ms = float(base_ms)

    def failed(self, now: float) -> None:
        """The path stopped being live at ``now``."""
        self._failures.append(now)
        self._down = True
        self._until = None

    def recovered(self, now: float) -> None:
        """The path is live again at ``now``: the hold-down starts (if it ever failed)."""
        if not self._down:
            return
        self._down = False
        # The failure that ended the last live spell counts even if it is old.
        recent = max(1, sum(1 for t in self._failures if now < t + HOLDDOWN_MEMORY_S))
        factor = 2 ** min(recent - 1, HOLDDOWN_MAX_DOUBLINGS)
        self._until = now + factor * self._base_ms / _MS

    def held(self, now: float) -> bool:
        """True while the path may not be chosen as a switch target."""
        return self._down or (self._until is not None and now < self._until)

    def next_change(self, now: float) -> float | None:
        """When the running hold-down ends, if after ``now``."""
        if self._until is not None and self._until > now:
            return self._until
        return None
