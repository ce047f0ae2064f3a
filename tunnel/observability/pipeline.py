"""The bounded, non-blocking event pipeline between the engine and its sinks (DESIGN D16).

Event *generation* is mandatory, *delivery* is best effort with counted loss
(SPEC-DIGEST §3.4, failure-isolation seed §6)::

    engine thread --emit()--> ring (deque, drop-oldest) --dispatcher thread--> encode once
        --> per-sink queue (deque, drop-oldest) --sink thread--> sink.write(line), retry/backoff

* ``emit`` takes one short lock, appends to the ring and sets an Event; it never waits on
  a sink, never encodes and never raises (not even after ``close``).
* The dispatcher turns each event into one compact JSON line and offers it to every sink's
  own queue, so a slow or failing sink loses its own oldest lines and never delays another.
* Each sink thread writes, and on failure retries the same line with exponential backoff
  (bounded delay, bounded attempts per line) while its queue keeps filling and dropping.
* Every loss is counted. An ``EVENT_LOSS`` warning about a sink goes to the *other* sinks
  (at most one per sink per second) and, once that sink writes again, to the sink itself.
* ``health()`` is a frozen snapshot; ``ok`` is the health-degradation flag.

**Draining.** A sink is ``ok`` only while it drains: no write has failed, no line was lost
and no write has been blocked for ``stall_after`` within the last ``drain_window`` seconds
(DRAIN_WINDOW_S). Otherwise it is ``failing`` (its last write failed and none succeeded
since, or a write is blocked right now) or ``lagging`` (writes succeed again, but a write
failed or a line was lost less than ``drain_window`` ago: it is not keeping up). A SIEM that
accepts a TCP connection but never reads fails a send every few seconds and reconnects in
between, so it never looks ``ok`` for long: the window covers the gaps between failures.
Lines the kernel accepted on a connection that is then dropped are not counted as lost
(TCP does not acknowledge lines); the failure that dropped it makes the sink down.

**Reports.** ``on_report`` (optional, any callable that never blocks) receives a mapping
for every EVENT_LOSS warning and every SINK_HEALTH change of a sink's state (``sink``,
``state``, ``previous_state``, ``dropped_total``, ``last_error``), on the dispatcher thread;
the engines hand them to the UI channel so a headless client prints them and the TUI
shows them as they happen. SINK_HEALTH also goes to the other sinks (not to the sink
itself). A sink with a ``check()`` method is checked when its thread starts: a problem
(e.g. a missing directory) makes it ``failing`` at once, with the problem as its error.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Literal, Protocol

from tunnel.observability.sinks import Sink

RING_SIZE: Final = 4096
"""Events buffered between the engine and the dispatcher: seconds of a busy gateway."""

SINK_QUEUE_SIZE: Final = 1024
"""Lines buffered per sink while it is slow or failing; older lines are dropped."""

BACKOFF_INITIAL_S: Final = 0.1
BACKOFF_MAX_S: Final = 5.0
"""Retry delay after a failed write: 0.1 s doubling to at most 5 s."""

MAX_ATTEMPTS_PER_LINE: Final = 5
"""A line that failed this often is dropped (counted), so one bad line cannot wedge a sink."""

LOSS_WARNING_INTERVAL_S: Final = 1.0
"""At most one EVENT_LOSS warning per lossy sink (and for the ring) per second."""

STALL_AFTER_S: Final = 2.0
"""A write that has not returned after this long makes the sink ``failing`` (shorter than
the syslog sink's 3 s send timeout, so a peer that stopped reading shows while it blocks)."""

DRAIN_WINDOW_S: Final = 10.0
"""A sink is ``ok`` again only after this long without a failed write or a lost line."""

DEGRADED_HOLD_S: Final = 60.0
"""``health().ok`` stays False this long after the last lost event."""

DISPATCH_TICK_S: Final = 0.1
"""The dispatcher also wakes this often to send rate-limited EVENT_LOSS warnings."""

MAX_ERROR_TEXT: Final = 200
"""Error texts in health are cut to this length (they go to the TUI and metrics)."""

EVENT_LOSS: Final = "EVENT_LOSS"
SINK_HEALTH: Final = "SINK_HEALTH"
RING_SINK_NAME: Final = "*"
"""The ``sink`` of an EVENT_LOSS about the ring: a ring overflow loses events for all sinks."""

PIPELINE_EVENT_FIELDS: Final[Mapping[str, Mapping[str, str]]] = {
    EVENT_LOSS: {
        "ts_ms": "Wall-clock milliseconds of the warning.",
        "sink": "The sink that lost lines (``*``: the ring, before any sink).",
        "dropped": "Lines lost since the last warning about this sink.",
        "dropped_total": "Lines this sink (or the ring) lost since the start.",
        "reason": "``sink_failing`` (writes fail or block), ``sink_slow`` (its queue "
        "overflowed) or ``ring_overflow``.",
    },
    SINK_HEALTH: {
        "ts_ms": "Wall-clock milliseconds of the change.",
        "sink": "The sink whose state changed.",
        "state": "``ok``, ``lagging`` (writing, but it failed or lost a line within the "
        "last 10 s) or ``failing`` (its last write failed, or a write is blocked).",
        "previous_state": "The state before.",
        "dropped_total": "Lines the sink lost since the start.",
        "last_error": "The error that explains the state (kept after recovery), or null.",
    },
}
"""The pipeline's own lines (not session events): field -> meaning (docs/events.md)."""

LossReason = Literal["sink_failing", "sink_slow", "ring_overflow"]
SinkState = Literal["ok", "lagging", "failing"]
Report = Callable[[Mapping[str, object]], object]
"""Receives EVENT_LOSS and SINK_HEALTH mappings (``on_report``); must never block."""


class EventLike(Protocol):
    """What the pipeline needs from an engine event."""

    @property
    def event_type(self) -> str: ...

    @property
    def ts_ms(self) -> int: ...

    def to_dict(self) -> dict[str, object]: ...


@dataclass(frozen=True, slots=True)
class SinkHealth:
    """One sink as seen by ``EventPipeline.health()``."""

    name: str
    """The sink's name, unique in its pipeline."""
    state: SinkState
    """``failing``: the last write failed, or a write is blocked for ``stall_after``;
    ``lagging``: writing again, but a write failed or a line was lost within the drain
    window; ``ok``: drained cleanly for the whole window (module docstring, *Draining*)."""
    queue_depth: int
    """Lines waiting in the sink's queue."""
    queue_size: int
    """Capacity of the sink's queue."""
    dropped: int
    """Lines this sink lost (queue overflow, given-up retries, unflushed at close)."""
    written: int
    """Lines written successfully, EVENT_LOSS warnings included."""
    last_error: str | None
    """Most recent error (type and message, cut short); kept after recovery."""


@dataclass(frozen=True, slots=True)
class ObservabilityHealth:
    """A consistent-enough snapshot of the pipeline, safe to take from any thread."""

    ok: bool
    """Health flag: False while a sink is failing or for DEGRADED_HOLD_S after any loss."""
    ring_depth: int
    """Events waiting in the ring for the dispatcher."""
    ring_size: int
    """Capacity of the ring."""
    ring_dropped: int
    """Events lost before reaching any sink: ring overflow, or emitted after close."""
    invalid_events: int
    """Events that could not be turned into a JSON line (an engine bug), dropped."""
    closed: bool
    """``close()`` has been called; new events are dropped and counted."""
    sinks: tuple[SinkHealth, ...]
    """One entry per sink, in the order given to the pipeline."""

    @property
    def dropped_total(self) -> int:
        """Every loss counted anywhere in the pipeline."""
        return self.ring_dropped + self.invalid_events + sum(s.dropped for s in self.sinks)


def sink_health_text(event: Mapping[str, object]) -> str:
    """One console line for a SINK_HEALTH event (headless client, gateway stderr)."""
    error = event.get("last_error")
    why = f": {error}" if error and event.get("state") != "ok" else ""
    return (
        f"event sink {event.get('sink')} {event.get('state')} "
        f"(was {event.get('previous_state')}, {event.get('dropped_total')} lost){why}"
    )


def backoff_delay(
    failures: int, initial: float = BACKOFF_INITIAL_S, maximum: float = BACKOFF_MAX_S
) -> float:
    """Delay before the next attempt after ``failures`` consecutive failures (>= 1)."""
    if failures < 1:
        return 0.0
    return min(maximum, initial * 2.0 ** min(failures - 1, 62))


def encode_event(event: object) -> str:
    """One compact, key-sorted, ASCII JSON line for an event object or mapping.

    Raises TypeError or ValueError when the event has no string ``event_type`` or is not
    JSON-safe.
    """
    if isinstance(event, Mapping):
        data = dict(event)
    else:
        to_dict = getattr(event, "to_dict", None)
        if to_dict is None:
            raise TypeError(f"not an event: {type(event).__name__}")
        data = to_dict()
        if not isinstance(data, Mapping):
            raise TypeError(f"{type(event).__name__}.to_dict() returned {type(data).__name__}")
    if not isinstance(data.get("event_type"), str):
        raise TypeError("event has no string event_type")
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text[:MAX_ERROR_TEXT]


class EventPipeline:
    """Bounded ring + dispatcher + one thread per sink. Threads start in ``__init__``."""

    def __init__(
        self,
        sinks: Iterable[Sink],
        *,
        ring_size: int = RING_SIZE,
        queue_size: int = SINK_QUEUE_SIZE,
        backoff_initial: float = BACKOFF_INITIAL_S,
        backoff_max: float = BACKOFF_MAX_S,
        max_attempts: int = MAX_ATTEMPTS_PER_LINE,
        stall_after: float = STALL_AFTER_S,
        drain_window: float = DRAIN_WINDOW_S,
        degraded_hold: float = DEGRADED_HOLD_S,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        on_report: Report | None = None,
    ) -> None:
        if ring_size < 1 or queue_size < 1:
            raise ValueError("ring_size and queue_size must be >= 1")
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        sink_list = list(sinks)
        names = [s.name for s in sink_list]
        if len(set(names)) != len(names):
            raise ValueError(f"sink names must be unique: {names}")
        self._ring_size = ring_size
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._max_attempts = max_attempts
        self._stall_after = stall_after
        self._drain_window = drain_window
        self._on_report = on_report
        self._report_errors = 0
        self._degraded_hold = degraded_hold
        self._clock = clock
        self._wall_clock = wall_clock

        self._ring: deque[object] = deque(maxlen=ring_size)
        self._ring_lock = threading.Lock()
        self._ring_dropped = 0
        self._ring_unreported = 0
        self._closed = False
        self._dispatching = False  # a taken batch is not yet in the sink queues
        self._wakeup = threading.Event()
        self._abort = threading.Event()
        self._state_lock = threading.Lock()  # dispatcher-side counters below
        self._invalid_events = 0
        self._ring_last_warning: float | None = None
        self._last_loss: float | None = None

        self._workers = tuple(_SinkWorker(self, s, queue_size) for s in sink_list)
        self._dispatcher = threading.Thread(
            target=self._dispatch, name="jvpn-obs-dispatch", daemon=True
        )
        self._dispatcher.start()
        for worker in self._workers:
            worker.thread.start()

    # -- engine side ---------------------------------------------------------------------

    def emit(self, event: EventLike | Mapping[str, object]) -> None:
        """Queue an event for every sink. Never blocks on a sink, never raises."""
        with self._ring_lock:
            if self._closed:
                self._ring_dropped += 1
                return
            if len(self._ring) >= self._ring_size:
                self._ring_dropped += 1
                self._ring_unreported += 1
            self._ring.append(event)
        if not self._wakeup.is_set():
            self._wakeup.set()

    # -- any thread ----------------------------------------------------------------------

    def health(self) -> ObservabilityHealth:
        """A snapshot of depths, counters and sink states; cheap, thread-safe."""
        now = self._clock()
        with self._ring_lock:
            ring_depth = len(self._ring)
            ring_dropped = self._ring_dropped
            ring_unreported = self._ring_unreported
            closed = self._closed
        with self._state_lock:
            invalid = self._invalid_events
            last_loss = self._last_loss
        sinks = tuple(w.snapshot(now) for w in self._workers)
        recent_loss = (
            ring_unreported > 0
            or (last_loss is not None and now - last_loss < self._degraded_hold)
            or any(w.has_unreported_loss() for w in self._workers)
        )
        ok = not recent_loss and all(s.state == "ok" for s in sinks)
        return ObservabilityHealth(
            ok=ok,
            ring_depth=ring_depth,
            ring_size=self._ring_size,
            ring_dropped=ring_dropped,
            invalid_events=invalid,
            closed=closed,
            sinks=sinks,
        )

    def drain(self, timeout: float = 2.0) -> bool:
        """Wait (polling) until every event emitted so far was written or dropped.

        For tests and orderly shutdown; never call it from the engine thread. Returns
        False if the pipeline was still busy when ``timeout`` ran out.
        """
        deadline = time.monotonic() + timeout
        while True:
            with self._ring_lock:
                ring_busy = bool(self._ring) or self._dispatching or self._wakeup.is_set()
            if not ring_busy and not any(w.busy() for w in self._workers):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)

    def close(self, timeout: float = 2.0) -> None:
        """Stop accepting events, flush what can be flushed within ``timeout``, stop threads.

        Returns within about ``timeout`` seconds even if a sink's write never returns; such
        a sink's daemon thread is abandoned and its queued lines are counted as dropped.
        Calling it again does nothing.
        """
        with self._ring_lock:
            if self._closed:
                return
            self._closed = True
        deadline = time.monotonic() + max(0.0, timeout)
        self._wakeup.set()
        self._dispatcher.join(max(0.0, deadline - time.monotonic()))
        for worker in self._workers:
            worker.start_draining(deadline)
        for worker in self._workers:
            worker.thread.join(max(0.0, deadline - time.monotonic()))
        self._abort.set()
        self._wakeup.set()
        for worker in self._workers:
            worker.abandon()

    def __enter__(self) -> EventPipeline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- dispatcher thread ---------------------------------------------------------------

    def _dispatch(self) -> None:
        while not self._abort.is_set():
            self._wakeup.wait(DISPATCH_TICK_S)
            self._wakeup.clear()
            with self._ring_lock:
                batch = list(self._ring)
                self._ring.clear()
                closed = self._closed
                self._dispatching = bool(batch)
            for event in batch:
                try:
                    line = encode_event(event)
                except Exception:  # to_dict() is engine code: count the bug, keep going
                    with self._state_lock:
                        self._invalid_events += 1
                        self._last_loss = self._clock()
                    continue
                for worker in self._workers:
                    worker.enqueue(line)
            self._dispatching = False
            self._send_loss_warnings(force=closed)
            self._send_state_changes()
            if closed:
                return

    def _report(self, event: Mapping[str, object]) -> None:
        """Hand a warning to ``on_report``; its failure is counted, never raised."""
        if self._on_report is None:
            return
        try:
            self._on_report(event)
        except Exception:  # the receiver is engine/UI code: count, keep dispatching
            with self._state_lock:
                self._report_errors += 1

    def _send_state_changes(self) -> None:
        """SINK_HEALTH for every sink whose state changed since the last tick: to
        ``on_report`` and to the other sinks."""
        now = self._clock()
        for changed in self._workers:
            event = changed.take_state_change(now)
            if event is None:
                continue
            self._report(event)
            for worker in self._workers:
                if worker is not changed:
                    worker.offer_health(event)

    def _send_loss_warnings(self, *, force: bool) -> None:
        now = self._clock()
        with self._ring_lock:
            ring_due = self._ring_unreported > 0 and (
                force
                or self._ring_last_warning is None
                or now - self._ring_last_warning >= LOSS_WARNING_INTERVAL_S
            )
            if ring_due:
                ring_dropped, ring_total = self._ring_unreported, self._ring_dropped
                self._ring_unreported = 0
                self._ring_last_warning = now
        if ring_due:
            self._note_loss(now)
            self._report(self.loss_event(RING_SINK_NAME, ring_dropped, ring_total, "ring_overflow"))
            for worker in self._workers:
                worker.offer_loss(RING_SINK_NAME, ring_dropped, ring_total, "ring_overflow")
        for lossy in self._workers:
            report = lossy.take_report_for_others(now, force=force)
            if report is None:
                continue
            self._note_loss(now)
            self._report(self.loss_event(lossy.name, *report))
            for worker in self._workers:
                if worker is not lossy:
                    worker.offer_loss(lossy.name, *report)

    # -- shared helpers ------------------------------------------------------------------

    def loss_event(
        self, sink: str, dropped: int, dropped_total: int, reason: LossReason
    ) -> dict[str, object]:
        """An EVENT_LOSS warning."""
        return {
            "event_type": EVENT_LOSS,
            "ts_ms": self.wall_ms(),
            "sink": sink,
            "dropped": dropped,
            "dropped_total": dropped_total,
            "reason": reason,
        }

    def loss_line(self, sink: str, dropped: int, dropped_total: int, reason: LossReason) -> str:
        """The JSON line of an EVENT_LOSS warning."""
        return encode_event(self.loss_event(sink, dropped, dropped_total, reason))

    def wall_ms(self) -> int:
        """The wall clock in Unix milliseconds (the ``ts_ms`` of the pipeline's own lines)."""
        return int(self._wall_clock() * 1000)

    def _note_loss(self, now: float) -> None:
        with self._state_lock:
            self._last_loss = now


@dataclass(slots=True)
class _Line:
    """The line a sink thread is writing, and how often it tried."""

    line: str | None = None
    is_event: bool = False
    """False for an EVENT_LOSS warning: losing one loses no event."""
    attempts: int = 0


class _SinkWorker:
    """One sink, its bounded queue, its counters and the thread that writes to it."""

    def __init__(self, pipeline: EventPipeline, sink: Sink, queue_size: int) -> None:
        self._p = pipeline
        self.sink = sink
        self.name = sink.name
        self._queue: deque[str] = deque(maxlen=queue_size)
        self._cond = threading.Condition(threading.Lock())
        self._interrupt = threading.Event()  # cuts a backoff wait short (close)
        self._dropped = 0
        self._written = 0
        self._unreported_others = 0
        self._unreported_self = 0
        self._pending_loss: dict[str, tuple[int, int, LossReason]] = {}
        self._pending_health: dict[str, dict[str, object]] = {}
        """SINK_HEALTH about other sinks, one slot per sink (the newest state wins)."""
        self._last_reason: LossReason = "sink_slow"
        self._last_warning: float | None = None
        self._last_self_warning: float | None = None
        self._failing = False
        self._failures = 0
        self._last_trouble: float | None = None
        """When a write last failed or a line was last lost (the drain window)."""
        self._reported_state: SinkState = "ok"
        self._last_error: str | None = None
        self._write_started: float | None = None
        self._inflight = False
        self._draining = False
        self._deadline = math.inf
        self.thread = threading.Thread(target=self._run, name=f"jvpn-obs-{self.name}", daemon=True)

    # -- called by the dispatcher --------------------------------------------------------

    def enqueue(self, line: str) -> None:
        with self._cond:
            if len(self._queue) >= (self._queue.maxlen or 0):
                self._drop_locked(1)
            self._queue.append(line)
            self._cond.notify()

    def offer_loss(self, sink: str, dropped: int, dropped_total: int, reason: LossReason) -> None:
        """Queue an EVENT_LOSS warning about ``sink``, merged with one not yet written.

        Warnings live beside the queue, one slot per lossy sink, so they are never dropped
        and never push an event out; the slot is written before the next queued line.
        """
        with self._cond:
            self._add_pending_locked(sink, dropped, dropped_total, reason)
            self._cond.notify()

    def offer_health(self, event: dict[str, object]) -> None:
        """Queue a SINK_HEALTH event about another sink beside the queue, like a loss
        warning (never dropped, never pushes an event out); a newer one about the same
        sink replaces it, keeping the state it changed from."""
        with self._cond:
            sink = str(event["sink"])
            earlier = self._pending_health.pop(sink, None)
            if earlier is not None:
                event = {**event, "previous_state": earlier["previous_state"]}
            self._pending_health[sink] = event
            self._cond.notify()

    def take_report_for_others(
        self, now: float, *, force: bool
    ) -> tuple[int, int, LossReason] | None:
        with self._cond:
            if self._unreported_others == 0:
                return None
            if not force and self._last_warning is not None:
                if now - self._last_warning < LOSS_WARNING_INTERVAL_S:
                    return None
            report = (self._unreported_others, self._dropped, self._last_reason)
            self._unreported_others = 0
            self._last_warning = now
            return report

    # -- called by any thread ------------------------------------------------------------

    def take_state_change(self, now: float) -> dict[str, object] | None:
        """The SINK_HEALTH event when the state differs from the last one reported."""
        with self._cond:
            state, last_error = self._state_locked(now)
            previous = self._reported_state
            if state == previous:
                return None
            self._reported_state = state
            return {
                "event_type": SINK_HEALTH,
                "ts_ms": self._p.wall_ms(),
                "sink": self.name,
                "state": state,
                "previous_state": previous,
                "dropped_total": self._dropped,
                "last_error": last_error,
            }

    def _state_locked(self, now: float) -> tuple[SinkState, str | None]:
        """The sink's state now and the error that explains it (module docstring)."""
        if self._stalled_locked(now):
            assert self._write_started is not None
            return "failing", f"write blocked for {now - self._write_started:.1f} s"
        if self._failing:
            return "failing", self._last_error
        trouble = self._last_trouble
        if trouble is not None and now - trouble < self._p._drain_window:
            return "lagging", self._last_error
        return "ok", self._last_error

    def snapshot(self, now: float) -> SinkHealth:
        with self._cond:
            state, last_error = self._state_locked(now)
            return SinkHealth(
                name=self.name,
                state=state,
                queue_depth=len(self._queue),
                queue_size=self._queue.maxlen or 0,
                dropped=self._dropped,
                written=self._written,
                last_error=last_error,
            )

    def has_unreported_loss(self) -> bool:
        with self._cond:
            return self._unreported_others > 0

    def busy(self) -> bool:
        with self._cond:
            pending = bool(self._pending_loss) or bool(self._pending_health)
            return bool(self._queue) or pending or self._inflight

    # -- called by close() ---------------------------------------------------------------

    def start_draining(self, deadline: float) -> None:
        with self._cond:
            self._draining = True
            self._deadline = deadline
            self._cond.notify()
        self._interrupt.set()

    def abandon(self) -> None:
        """After the close deadline: whatever is still queued is lost."""
        with self._cond:
            if self._queue:
                self._drop_locked(len(self._queue))
                self._queue.clear()
            self._cond.notify()
        self._interrupt.set()

    # -- the sink thread -----------------------------------------------------------------

    def _run(self) -> None:
        self._check()
        work = _Line()
        while self._next_locked(work):
            assert work.line is not None
            try:
                self.sink.write(work.line)
            except Exception as exc:  # any sink failure is the sink's state, never ours
                if self._interrupt.wait(self._write_failed(work, exc)):
                    self._interrupt.clear()
                continue
            self._write_done(work)
        with self._cond:
            self._inflight = False
        self._close_sink()

    def _next_locked(self, work: _Line) -> bool:
        """Wait for a line to write (kept in ``work``); False when the thread should end:
        aborted, drained, or past the close deadline (what is left is counted lost)."""
        abort = self._p._abort
        with self._cond:
            while work.line is None and not self._has_work_locked() and not abort.is_set():
                self._cond.wait()
            if abort.is_set():
                if work.line is not None and work.is_event:
                    self._drop_locked(1)
                return False
            if work.line is None and not self._take_locked(work):
                return False  # draining and nothing left
            if self._draining and time.monotonic() >= self._deadline:
                self._drop_locked(len(self._queue) + int(work.is_event))
                self._queue.clear()
                return False
            self._inflight = True
            self._write_started = self._p._clock()
            return True

    def _has_work_locked(self) -> bool:
        pending = bool(self._pending_loss) or bool(self._pending_health)
        return bool(self._queue) or pending or self._draining

    def _take_locked(self, work: _Line) -> bool:
        """The next line: a pending loss warning first, then a pending SINK_HEALTH, then
        the oldest queued event."""
        if self._pending_loss:
            about = next(iter(self._pending_loss))
            work.line = self._p.loss_line(about, *self._pending_loss.pop(about))
            work.is_event = False
        elif self._pending_health:
            about = next(iter(self._pending_health))
            work.line = encode_event(self._pending_health.pop(about))
            work.is_event = False
        elif self._queue:
            work.line = self._queue.popleft()
            work.is_event = True
        else:
            return False
        work.attempts = 0
        return True

    def _write_failed(self, work: _Line, exc: Exception) -> float:
        """Record a failed write; gives up the line after the last attempt. Returns how
        long to back off before the next write."""
        with self._cond:
            self._write_started = None
            self._failing = True
            self._last_trouble = self._p._clock()
            self._failures += 1
            self._last_error = _error_text(exc)
            work.attempts += 1
            if work.attempts >= self._p._max_attempts:
                if work.is_event:
                    self._drop_locked(1)
                work.line = None
                self._inflight = False
            delay = backoff_delay(self._failures, self._p._backoff_initial, self._p._backoff_max)
            if self._draining:
                delay = min(delay, max(0.0, self._deadline - time.monotonic()))
            return delay

    def _write_done(self, work: _Line) -> None:
        with self._cond:
            now = self._p._clock()
            if self._stalled_locked(now):  # it returned, but only after blocking that long
                self._last_trouble = now
            self._write_started = None
            self._written += 1
            recovered = self._failing
            self._failing = False
            self._failures = 0
            work.line = None
            self._inflight = False
            self._report_to_self_locked(recovered)

    def _report_to_self_locked(self, recovered: bool) -> None:
        """Tell the sink about its own losses: at once after a recovery, else once a second."""
        if self._unreported_self == 0:
            return
        now = self._p._clock()
        due = (
            recovered
            or self._last_self_warning is None
            or now - self._last_self_warning >= LOSS_WARNING_INTERVAL_S
        )
        if not due:
            return
        self._add_pending_locked(self.name, self._unreported_self, self._dropped, self._last_reason)
        self._unreported_self = 0
        self._last_self_warning = now

    def _check(self) -> None:
        """The sink's own start-up check (``check()``, if it has one): a problem makes it
        ``failing`` before the first write, with the problem as its error."""
        check = getattr(self.sink, "check", None)
        if check is None:
            return
        try:
            problem = check()
        except Exception as exc:  # a check that fails is a problem of the sink
            problem = _error_text(exc)
        if problem:
            with self._cond:
                self._failing = True
                self._last_error = str(problem)[:MAX_ERROR_TEXT]
                self._last_trouble = self._p._clock()

    def _close_sink(self) -> None:
        try:
            self.sink.close()
        except Exception as exc:  # a sink that cannot close is only reported
            with self._cond:
                self._last_error = _error_text(exc)

    # -- helpers (hold self._cond) -------------------------------------------------------

    def _add_pending_locked(
        self, sink: str, dropped: int, dropped_total: int, reason: LossReason
    ) -> None:
        earlier = self._pending_loss.pop(sink, None)
        if earlier is not None:
            dropped += earlier[0]
        self._pending_loss[sink] = (dropped, dropped_total, reason)

    def _stalled_locked(self, now: float) -> bool:
        started = self._write_started
        return started is not None and now - started >= self._p._stall_after

    def _drop_locked(self, count: int) -> None:
        now = self._p._clock()
        failing = self._failing or self._stalled_locked(now)
        self._last_trouble = now
        self._dropped += count
        self._unreported_others += count
        self._unreported_self += count
        self._last_reason = "sink_failing" if failing else "sink_slow"
