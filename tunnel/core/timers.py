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

import heapq
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from tunnel.core.events import Reason
from tunnel.core.policy import Policy
from tunnel.core.session import PRIORITY, TERMINATION_PRIORITY, State, Trigger

__all__ = [
    "LIVE_STATES",
    "SESSION_ROWS",
    "DeadlineQueue",
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

    def resumed(
        self, now: float, now_ms: int, born_ms: int, lost_ms: int | None, recovery_ms: int | None
    ) -> None:
        """Clocks another process kept, in wall-clock ms (``now_ms`` is ``now`` in wall ms):
        a resumed session keeps its age, transport-lost and recovery clocks."""
        self.born = now - (now_ms - born_ms) / 1000
        self.transportless_since = None if lost_ms is None else now - (now_ms - lost_ms) / 1000
        self.recovery_started = None if recovery_ms is None else now - (now_ms - recovery_ms) / 1000

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


K = TypeVar("K", bound=Hashable)


class DeadlineQueue(Generic[K]):
    """The deadlines of many keyed items (a gateway's sessions): a binary heap with lazy
    invalidation, so finding the earliest deadline and the due items costs O(log n)
    amortised instead of a scan of every item.

    The owner reads an item's deadline through ``deadline_of(key)`` (None: nothing armed,
    or no such item) and calls ``touch(key)`` after anything that may have changed it; the
    queue re-reads touched items before it answers. An item whose deadline moved *later*
    keeps its old heap entry as a lower bound (the common case: every inbound packet pushes
    the silence deadline back), which is re-read and re-armed only when it reaches the top;
    an earlier deadline is pushed at once. ``next_deadline()`` is therefore exact, and
    ``due(now)`` returns exactly the items whose deadline is at or before ``now``: none is
    lost, none is early (tests/test_timer_queue.py checks both against a full scan).
    """

    __slots__ = ("_armed", "_deadline_of", "_dirty", "_heap", "_seq")

    def __init__(self, deadline_of: Callable[[K], float | None]) -> None:
        self._deadline_of = deadline_of
        self._heap: list[tuple[float, int, K]] = []
        self._armed: dict[K, float] = {}
        """key -> its entry in the heap: its deadline, or a lower bound of it."""
        self._dirty: set[K] = set()
        self._seq = 0

    def __len__(self) -> int:
        """Armed items (an item whose deadline is a lower bound counts)."""
        self._refresh()
        return len(self._armed)

    def touch(self, key: K) -> None:
        """``key``'s deadline may have changed (read again before the next answer)."""
        self._dirty.add(key)

    def touch_all(self, keys: Iterable[K]) -> None:
        self._dirty.update(keys)

    def next_deadline(self) -> float | None:
        """The earliest deadline of all items (None: none armed)."""
        self._refresh()
        heap, armed = self._heap, self._armed
        while heap:
            t, _, key = heap[0]
            if armed.get(key) != t:
                heapq.heappop(heap)  # superseded by a newer entry, or disarmed
                continue
            real = self._deadline_of(key)
            if real == t:
                return t
            heapq.heappop(heap)  # t was a lower bound: re-arm at the real deadline
            self._arm(key, real)
        return None

    def due(self, now: float) -> list[K]:
        """The items whose deadline is at or before ``now``, earliest first. They leave
        the queue and count as touched: their next deadline is read after the owner has
        acted on them."""
        self._refresh()
        heap, armed = self._heap, self._armed
        out: list[K] = []
        while heap and heap[0][0] <= now:
            t, _, key = heapq.heappop(heap)
            if armed.get(key) != t:
                continue
            del armed[key]
            real = self._deadline_of(key)
            if real is not None and real <= t:
                out.append(key)
            else:
                # t was a lower bound: re-arm at the real deadline; if that is due too it
                # comes off the heap again in its turn (appending it now would put it
                # before due items whose deadlines are earlier)
                self._arm(key, real)
        self._dirty.update(out)
        return out

    def _refresh(self) -> None:
        """Read the touched items: arm an earlier deadline now, keep a lower bound."""
        if not self._dirty:
            return
        armed = self._armed
        for key in self._dirty:
            t = self._deadline_of(key)
            bound = armed.get(key)
            if t is None:
                if bound is not None:
                    del armed[key]  # its heap entry is stale from now on
            elif bound is None or t < bound:
                self._arm(key, t)
        self._dirty.clear()
        if len(self._heap) > 2 * len(armed) + 64:
            self._compact()

    def _arm(self, key: K, t: float | None) -> None:
        if t is None:
            self._armed.pop(key, None)
            return
        self._armed[key] = t
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, key))

    def _compact(self) -> None:
        """Drop the stale entries (bounded memory: at most 2n + 64 entries)."""
        armed = self._armed
        self._heap = [e for e in self._heap if armed.get(e[2]) == e[0]]
        heapq.heapify(self._heap)
