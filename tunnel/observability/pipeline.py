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

STALL_AFTER_S: Final = 5.0
"""A write that has not returned after this long makes the sink ``failing``."""

DEGRADED_HOLD_S: Final = 60.0
"""``health().ok`` stays False this long after the last lost event."""

DISPATCH_TICK_S: Final = 0.1
"""The dispatcher also wakes this often to send rate-limited EVENT_LOSS warnings."""

MAX_ERROR_TEXT: Final = 200
"""Error texts in health are cut to this length (they go to the TUI and metrics)."""

EVENT_LOSS: Final = "EVENT_LOSS"
RING_SINK_NAME: Final = "*"
"""The ``sink`` of an EVENT_LOSS about the ring: a ring overflow loses events for all sinks."""

LossReason = Literal["sink_failing", "sink_slow", "ring_overflow"]
SinkState = Literal["ok", "failing"]


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
    """``failing`` after a failed write or while a write is stalled; ``ok`` after a success."""
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
        degraded_hold: float = DEGRADED_HOLD_S,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
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
            if closed:
                return

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
            for worker in self._workers:
                worker.offer_loss(RING_SINK_NAME, ring_dropped, ring_total, "ring_overflow")
        for lossy in self._workers:
            report = lossy.take_report_for_others(now, force=force)
            if report is None:
                continue
            self._note_loss(now)
            for worker in self._workers:
                if worker is not lossy:
                    worker.offer_loss(lossy.name, *report)

    # -- shared helpers ------------------------------------------------------------------

    def loss_line(self, sink: str, dropped: int, dropped_total: int, reason: LossReason) -> str:
        """The JSON line of an EVENT_LOSS warning."""
        warning: dict[str, object] = {
            "event_type": EVENT_LOSS,
            "ts_ms": int(self._wall_clock() * 1000),
            "sink": sink,
            "dropped": dropped,
            "dropped_total": dropped_total,
            "reason": reason,
        }
        return encode_event(warning)

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
        self._last_reason: LossReason = "sink_slow"
        self._last_warning: float | None = None
        self._last_self_warning: float | None = None
        self._failing = False
        self._failures = 0
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

    def snapshot(self, now: float) -> SinkHealth:
        with self._cond:
            state: SinkState = "failing" if self._failing else "ok"
            last_error = self._last_error
            if self._stalled_locked(now):
                state = "failing"
                assert self._write_started is not None
                last_error = f"write blocked for {now - self._write_started:.1f} s"
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
            return bool(self._queue) or bool(self._pending_loss) or self._inflight

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
        return bool(self._queue) or bool(self._pending_loss) or self._draining

    def _take_locked(self, work: _Line) -> bool:
        """The next line: a pending loss warning first, then the oldest queued event."""
        if self._pending_loss:
            about = next(iter(self._pending_loss))
            work.line = self._p.loss_line(about, *self._pending_loss.pop(about))
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
        failing = self._failing or self._stalled_locked(self._p._clock())
        self._dropped += count
        self._unreported_others += count
        self._unreported_self += count
        self._last_reason = "sink_failing" if failing else "sink_slow"
