"""The driver loop both runtimes run: an asyncio loop (uvloop when installed), guarded
callbacks, bounded input drains and exactly one timer armed from the core's deadline.

A sans-I/O core (``ClientSession``, ``GatewaySessions``) is driven the same way on both
sides, and :class:`DriverLoop` is that way, written once:

- every loop callback runs under :meth:`DriverLoop.guard`: an exception is an engine
  failure, recorded in ``crash`` and handed to the runtime's ``on_crash`` (never swallowed,
  never left to asyncio's default handler); after a crash no callback runs again;
- an input (a readable socket or inner side, an operator command) reads the clock once,
  feeds the core, then *pumps*: the runtime's ``flush(now)`` sends what the core produced,
  and unless it says the core is finished, the one timer is re-armed from
  ``core.next_deadline()`` (a deadline within ``TIMER_SLACK_S`` of now fires on the next
  loop turn; an unchanged deadline keeps the armed timer);
- :func:`drain` reads a ready fd in batches of ``BATCH`` until it would block, but at most
  ``DRAIN_LIMIT`` items per wake-up, so one flooded fd cannot starve the timer and the
  other fds.
"""

from __future__ import annotations

import asyncio
import importlib
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol, TypeVar

DRAIN_LIMIT: Final = 1024
"""Datagrams (or inner packets) taken per readiness callback: drains a burst until
EAGAIN, yet one flooded fd cannot starve the timer and the other fds."""

BATCH: Final = 64
"""Packets per recv/read call."""

TIMER_SLACK_S: Final = 0.0005
"""A deadline this close to now is handled now instead of arming a ~0 s timer."""

T = TypeVar("T")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop when uvloop is installed, else the default asyncio loop."""
    try:
        uvloop: Any = importlib.import_module("uvloop")
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def drain(
    read: Callable[[int], Sequence[T]],
    feed: Callable[..., None],
    *args: Any,
    limit: int = DRAIN_LIMIT,
) -> int:
    """Read batches of ``BATCH`` and ``feed(batch, *args)`` each, until a short batch (the
    fd would block) or ``limit`` items were taken; returns how many were taken."""
    taken = 0
    while taken < limit:
        batch = read(BATCH)
        feed(batch, *args)
        taken += len(batch)
        if len(batch) < BATCH:
            break
    return taken


class TimedCore(Protocol):
    """What the driver loop needs of a sans-I/O core: its timer input and its deadline."""

    def handle_timer(self, now: float) -> None: ...

    def next_deadline(self) -> float | None: ...


class DriverLoop:
    """Drives one sans-I/O core on an asyncio loop (see the module docstring).

    ``flush(now)`` sends the core's outputs and returns False once the core is finished
    (no timer is armed then); ``on_crash(exc)`` is called once, on the first exception of
    a guarded callback.
    """

    def __init__(
        self,
        core: TimedCore,
        *,
        flush: Callable[[float], bool],
        on_crash: Callable[[BaseException], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.core = core
        self.clock = clock
        self._flush = flush
        self._on_crash = on_crash
        self.loop: asyncio.AbstractEventLoop | None = None
        """The loop while attached (between :meth:`attach` and :meth:`detach`)."""
        self.crash: BaseException | None = None
        """The exception that stopped the driver (an engine bug), if any."""
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None

    # -- lifetime ------------------------------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run on ``loop`` from now on (the loop thread)."""
        self.loop = loop

    def detach(self) -> asyncio.AbstractEventLoop | None:
        """Cancel the timer and forget the loop; returns it (None if not attached)."""
        loop, self.loop = self.loop, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = None
        return loop

    # -- callbacks -----------------------------------------------------------------------

    def guard(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)``; an exception is an engine failure (module docstring)."""
        if self.crash is not None:
            return
        try:
            fn(*args)
        except Exception as exc:  # the engine boundary: the runtime turns it into a coded end
            self.crash = exc
            self._on_crash(exc)

    def fail(self, exc: BaseException) -> None:
        """Record an engine failure met outside a guarded callback (``on_crash`` is not
        called: the caller is already ending the sessions)."""
        if self.crash is None:
            self.crash = exc

    def add_reader(self, fd: int, fn: Callable[..., None], *args: Any) -> None:
        """Call ``fn(*args)``, guarded, whenever ``fd`` is readable."""
        assert self.loop is not None, "attach() first"
        self.loop.add_reader(fd, self.guard, fn, *args)

    def call_later(self, delay: float, fn: Callable[..., None]) -> asyncio.TimerHandle:
        """Call ``fn()``, guarded, after ``delay`` seconds."""
        assert self.loop is not None, "attach() first"
        return self.loop.call_later(delay, self.guard, fn)

    def input(self, feed: Callable[..., None], *args: Any) -> None:
        """One input: read the clock once, ``feed(now, *args)``, then :meth:`pump`."""
        now = self.clock()
        feed(now, *args)
        self.pump(now)

    # -- outputs and the one timer -------------------------------------------------------

    def pump(self, now: float | None = None) -> None:
        """Flush the core's outputs, then re-arm the one timer unless the core is done."""
        if now is None:
            now = self.clock()
        if self._flush(now):
            self._arm(now)

    def _arm(self, now: float) -> None:
        deadline = self.core.next_deadline()
        if deadline == self._timer_at and self._timer is not None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is None or self.loop is None:
            return
        delay = max(0.0, deadline - now)
        if delay < TIMER_SLACK_S:
            delay = 0.0
        self._timer = self.loop.call_later(delay, self.guard, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.input(self.core.handle_timer)
