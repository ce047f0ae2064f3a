"""What the client and gateway protocol machines share: outputs, drop counters, reporting.

Outputs are pulled (aioquic style): the driver calls ``next_event()`` until None after
every input. The event queue is bounded; if a driver stops pulling, the oldest events are
dropped and counted rather than growing without bound.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from tunnel.core.drops import Drop
from tunnel.core.events import DropSummary, Event, EventBase, Reason, SecurityEvent

EVENT_QUEUE_LIMIT = 8192
"""Events waiting for the driver; far above what one input can produce."""

DROP_SUMMARY_INTERVAL = 1.0
"""Seconds between DROP_SUMMARY events: a flood is reported, never mirrored event by event."""

SECURITY_REPORT_INTERVAL = 1.0
"""Seconds between two SECURITY_EVENTs of one kind; the count carries what was folded in."""


class Reporter:
    """One endpoint's reporting: the bounded event queue, drop counters, rate-limited
    DROP_SUMMARY and SECURITY_EVENT reports. A component of its own: the protocol machine
    and its parts call these methods and never touch the fields."""

    def __init__(self, *, node_id: str, wall_offset: float, now: float) -> None:
        self.node_id = node_id
        self.wall_offset = wall_offset
        self._events: deque[Event] = deque()
        self.events_dropped = 0
        self.drops: dict[str, int] = {}
        self._drops_unreported: dict[str, int] = {}
        self._drops_total = 0
        self._next_drop_summary = now
        self._security_last: dict[str, float] = {}
        self._security_pending: dict[str, int] = {}

    # -- outputs --------------------------------------------------------------------------
    def ts_ms(self, now: float) -> int:
        return int((now + self.wall_offset) * 1000)

    def emit(self, event: Event) -> None:
        if len(self._events) >= EVENT_QUEUE_LIMIT:
            self._events.popleft()
            self.events_dropped += 1
        self._events.append(event)

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    @property
    def queued_events(self) -> int:
        """Events waiting for the driver (at most EVENT_QUEUE_LIMIT)."""
        return len(self._events)

    @property
    def security_kinds(self) -> int:
        """Violation kinds with rate-limit state (bounded by the kinds that exist)."""
        return len(self._security_last)

    # -- counted drops ----------------------------------------------------------------------
    def count_drop(self, reason: Drop) -> None:
        """Count one dropped input; the counters are keyed by the reason's string value."""
        key = reason.value
        self.drops[key] = self.drops.get(key, 0) + 1
        self._drops_unreported[key] = self._drops_unreported.get(key, 0) + 1
        self._drops_total += 1

    def drop_summary_due(self) -> float | None:
        return self._next_drop_summary if self._drops_unreported else None

    def maybe_drop_summary(self, now: float, base: EventBase) -> None:
        if not self._drops_unreported or now < self._next_drop_summary:
            return
        counts = tuple(sorted(self._drops_unreported.items()))
        self._drops_unreported = {}
        self._next_drop_summary = now + DROP_SUMMARY_INTERVAL
        self.emit(DropSummary(**base, counts=counts, total=self._drops_total))

    # -- rate-limited security reporting ---------------------------------------------------
    def security(
        self,
        now: float,
        base: EventBase,
        violation: str,
        reason: Reason,
        **fields: Any,
    ) -> None:
        pending = self._security_pending.get(violation, 0) + 1
        last = self._security_last.get(violation)
        if last is not None and now - last < SECURITY_REPORT_INTERVAL:
            self._security_pending[violation] = pending
            return
        self._security_pending[violation] = 0
        self._security_last[violation] = now
        self.emit(
            SecurityEvent(
                **base, violation_type=violation, reason_code=reason, count=pending, **fields
            )
        )
