"""The shared driver loop (tunnel/io/loop.py) both runtimes run on (issue 15, DESIGN §2).

What it promises, per its module docstring: a ready fd is read in batches until a short
batch, at most DRAIN_LIMIT items per wake-up; after every input the runtime's outputs are
flushed and exactly one timer is armed, from the core's ``next_deadline()``; the timer
feeds ``handle_timer(now)``; a failing callback is reported once and nothing runs after.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tunnel.io.loop import BATCH, DRAIN_LIMIT, DriverLoop, drain, new_event_loop


class FakeCore:
    """A core whose deadline the test sets; records its timer inputs."""

    def __init__(self) -> None:
        self.deadline: float | None = None
        self.timers: list[float] = []
        self.fail_on_timer = False

    def handle_timer(self, now: float) -> None:
        if self.fail_on_timer:
            raise RuntimeError("core bug")
        self.timers.append(now)
        self.deadline = None

    def next_deadline(self) -> float | None:
        return self.deadline


class Clock:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.loop.time()


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = new_event_loop()
    try:
        yield loop
    finally:
        loop.close()


def test_drain_stops_at_a_short_batch() -> None:
    backlog = list(range(BATCH + 5))
    fed: list[list[int]] = []

    def read(n: int) -> list[int]:
        taken = backlog[:n]
        del backlog[:n]
        return taken

    assert drain(read, lambda batch, tag: fed.append([tag, *batch]), "x") == BATCH + 5
    assert [len(b) - 1 for b in fed] == [BATCH, 5]
    assert all(b[0] == "x" for b in fed)


def test_drain_of_an_endless_source_is_bounded_per_wake_up() -> None:
    reads = 0

    def read(n: int) -> list[bytes]:
        nonlocal reads
        reads += 1
        assert reads <= 10 * DRAIN_LIMIT, "the drain does not stop"
        return [b"x"] * n  # a flood: never a short batch

    taken = drain(read, lambda batch: None)
    assert taken == DRAIN_LIMIT
    assert reads == DRAIN_LIMIT // BATCH


def test_one_timer_armed_from_the_deadline_fires_handle_timer(
    loop: asyncio.AbstractEventLoop,
) -> None:
    core = FakeCore()
    clock = Clock(loop)
    flushes: list[float] = []

    def flush(now: float) -> bool:
        flushes.append(now)
        return True

    driver = DriverLoop(core, flush=flush, on_crash=pytest.fail, clock=clock)
    driver.attach(loop)
    fired = asyncio.Event()

    def feed(now: float, value: float) -> None:
        core.deadline = now + value

    async def scenario() -> None:
        reads = clock.reads
        driver.input(feed, 0.02)
        assert clock.reads == reads + 1  # the clock is read once per input
        assert len(flushes) == 1
        driver.pump()  # the deadline did not change: the armed timer stays the only one
        while not core.timers:
            await asyncio.sleep(0.005)
        fired.set()

    loop.run_until_complete(asyncio.wait_for(scenario(), 5.0))
    assert fired.is_set()
    assert len(core.timers) == 1  # one timer, fired once
    assert core.timers[0] >= flushes[0] + 0.02 - 0.002  # not before its deadline (ms timers)
    assert len(flushes) == 3  # the input, the explicit pump, the timer's input
    driver.detach()


def test_a_finished_core_gets_no_timer(loop: asyncio.AbstractEventLoop) -> None:
    core = FakeCore()
    driver = DriverLoop(core, flush=lambda now: False, on_crash=pytest.fail, clock=loop.time)
    driver.attach(loop)
    core.deadline = loop.time()
    driver.pump()

    async def settle() -> None:
        for _ in range(5):
            await asyncio.sleep(0)

    loop.run_until_complete(settle())
    assert core.timers == []


def test_a_failing_callback_is_reported_once_and_stops_the_driver(
    loop: asyncio.AbstractEventLoop,
) -> None:
    core = FakeCore()
    crashes: list[BaseException] = []
    driver = DriverLoop(core, flush=lambda now: True, on_crash=crashes.append, clock=loop.time)
    driver.attach(loop)
    core.fail_on_timer = True
    core.deadline = loop.time()
    driver.pump()

    async def until_crashed() -> None:
        while not crashes:
            await asyncio.sleep(0.001)

    loop.run_until_complete(asyncio.wait_for(until_crashed(), 5.0))
    ran: list[int] = []
    driver.guard(lambda: ran.append(1))
    assert ran == []  # nothing runs after an engine failure
    assert len(crashes) == 1 and str(crashes[0]) == "core bug"
    assert driver.crash is crashes[0]
    driver.detach()
