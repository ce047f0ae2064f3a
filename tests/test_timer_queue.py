"""Property tests of the gateway's timer structure, ``DeadlineQueue`` (tunnel/core/timers.py).

A brute-force model keeps every item's true deadline in a dict; ``next_deadline`` must be
its minimum and ``due(now)`` exactly the items at or before ``now`` (no deadline lost,
none fired early), whatever order deadlines move in (later, earlier, disarmed, items
removed) and however often. The owner's contract is kept: it touches an item after
changing its deadline, and moves the deadline of every item ``due`` returned (as a session
acts on its timer) before asking again.

The gateway's use of it (touch after every input, act only on due sessions) is checked
end to end by tests/test_gateway_timers.py (handle_timer and next_deadline never disagree)
and tests/test_scale_shutdown.py (many sessions).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tunnel.core.timers import DeadlineQueue

KEYS = st.integers(min_value=0, max_value=40)
OFFSETS = st.one_of(st.none(), st.floats(min_value=0.0, max_value=50.0))


class QueueAgainstScan(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.model: dict[int, float | None] = {}
        self.queue: DeadlineQueue[int] = DeadlineQueue(lambda k: self.model.get(k))

    def _scan_min(self) -> float | None:
        armed = [t for t in self.model.values() if t is not None]
        return min(armed) if armed else None

    @rule(key=KEYS, offset=OFFSETS)
    def set_deadline(self, key: int, offset: float | None) -> None:
        """Any move: later, earlier, disarmed; never in the past (a fresh deadline)."""
        self.model[key] = None if offset is None else self.now + offset
        self.queue.touch(key)

    @rule(key=KEYS)
    def remove(self, key: int) -> None:
        self.model.pop(key, None)
        self.queue.touch(key)

    @rule(step=st.floats(min_value=0.0, max_value=20.0), after=OFFSETS)
    def advance_and_fire(self, step: float, after: float | None) -> None:
        self.now += step
        fired = self.queue.due(self.now)
        expected = {k for k, t in self.model.items() if t is not None and t <= self.now}
        assert len(fired) == len(set(fired)), "an item fired twice"
        assert set(fired) == expected, (
            f"lost: {expected - set(fired)}, early: {set(fired) - expected}"
        )
        deadlines = [self.model[k] for k in fired]
        assert deadlines == sorted(deadlines), "not earliest first"
        for k in fired:  # the session acts: its next deadline is later, or none
            self.model[k] = None if after is None else self.now + after + 0.001

    @rule(keys=st.lists(KEYS, max_size=5))
    def touch_without_change(self, keys: list[int]) -> None:
        """Touching an unchanged item (a packet that moved nothing) changes nothing."""
        self.queue.touch_all(keys)

    @invariant()
    def next_deadline_is_the_minimum(self) -> None:
        assert self.queue.next_deadline() == self._scan_min()

    @invariant()
    def counts_every_armed_item(self) -> None:
        armed = sum(1 for t in self.model.values() if t is not None)
        assert len(self.queue) >= armed  # lower bounds of disarmed items may linger


QueueAgainstScan.TestCase.settings = settings(max_examples=300, stateful_step_count=60)
test_queue_against_scan = QueueAgainstScan.TestCase


@settings(max_examples=200, deadline=None)
@given(
    deadlines=st.lists(st.floats(min_value=0.0, max_value=100.0), min_size=1, max_size=60),
    later=st.lists(st.floats(min_value=0.0, max_value=100.0), max_size=60),
    times=st.lists(st.floats(min_value=0.0, max_value=250.0), min_size=1, max_size=10),
)
def test_moving_deadlines_later_loses_nothing(
    deadlines: list[float], later: list[float], times: list[float]
) -> None:
    """The lazy case the gateway relies on: deadlines only move back (every inbound packet
    pushes a session's silence deadline); the stale lower bounds must neither fire nor hide
    a due item, at any sequence of (sorted) times."""
    model: dict[int, float | None] = dict(enumerate(deadlines))
    q: DeadlineQueue[int] = DeadlineQueue(model.get)
    q.touch_all(model)
    for k, extra in enumerate(later[: len(deadlines)]):
        model[k] = deadlines[k] + extra
        q.touch(k)
    fired: list[int] = []
    for now in sorted(times):
        due = q.due(now)
        assert all(model[k] is not None and model[k] <= now for k in due)  # type: ignore[operator]
        fired += due
        for k in due:
            model[k] = None
    last = max(times)
    assert sorted(fired) == sorted(k for k, t in enumerate(deadlines) if model[k] is None)
    assert all(t is None or t > last for t in model.values()), "a due deadline was lost"


def test_stale_entries_stay_bounded() -> None:
    """Deadlines pushed back a million times do not grow the heap without bound."""
    model = {k: 10.0 + k for k in range(100)}
    q: DeadlineQueue[int] = DeadlineQueue(model.get)
    q.touch_all(model)
    for i in range(2000):
        k = i % 100
        model[k] = 5.0 - i * 0.001  # earlier each time: a push every touch
        q.touch(k)
        q.next_deadline()
    assert len(q._heap) <= 2 * 100 + 64
    assert q.next_deadline() == min(model.values())


def test_due_keeps_earliest_first_past_a_stale_lower_bound() -> None:
    """An item whose deadline moved later without a touch keeps its old entry as a lower
    bound; when both it and another item are due, the other one (earlier) comes first.
    (Found by the stateful test above: [23, 24, 23] instead of [23, 23, 24].)"""
    model: dict[str, float | None] = {"moved": 20.0, "fixed": 23.0}
    q: DeadlineQueue[str] = DeadlineQueue(model.get)
    q.touch_all(model)
    assert q.next_deadline() == 20.0
    model["moved"] = 24.0  # later, untouched: the DATA fast path's case
    assert q.due(30.0) == ["fixed", "moved"]
