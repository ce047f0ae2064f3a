"""A sink that stops draining is reported down, live (issue 12, item 8 a-b).

docs/events.md SINK_HEALTH and the pipeline's *Draining* rule: a sink is ``ok`` only when
no write failed, no line was lost and no write blocked within the drain window; else it
is ``failing`` or ``lagging``, ``jvpn_event_sink_up`` is 0, and every change of state is
a SINK_HEALTH report (to ``on_report`` and to the other sinks) as it happens.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest

from tunnel.observability import (
    EVENT_LOSS,
    SINK_HEALTH,
    CallbackSink,
    EventPipeline,
    JsonlFileSink,
    SyslogSink,
)
from tunnel.observability.metrics import PrometheusPublisher, observability_families


def wait_until(predicate: Callable[[], object], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


class Reports:
    """Collects what ``on_report`` receives (from the dispatcher thread)."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def __call__(self, event: Mapping[str, object]) -> None:
        with self.lock:
            self.items.append(dict(event))

    def of(self, event_type: str, sink: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [
                e
                for e in self.items
                if e["event_type"] == event_type and (sink is None or e["sink"] == sink)
            ]


class Lines:
    """A CallbackSink target keeping decoded lines."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self.lock:
            self.events.append(json.loads(line))

    def of(self, event_type: str) -> list[dict[str, Any]]:
        with self.lock:
            return [e for e in self.events if e["event_type"] == event_type]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Switchable:
    """Raises while ``failing``."""

    def __init__(self) -> None:
        self.name = "flaky"
        self.failing = True
        self.lines: list[str] = []

    def write(self, line: str) -> None:
        if self.failing:
            raise OSError("no space left")
        self.lines.append(line)

    def close(self) -> None:
        return None


class NeverReadingPeer:
    """A TCP syslog "SIEM" that accepts every connection and never reads a byte."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.settimeout(0.1)
        self.port: int = self.listener.getsockname()[1]
        self.held: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.held.append(conn)  # kept open, never read

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2.0)
        for conn in self.held:
            conn.close()
        self.listener.close()


@pytest.fixture
def peer() -> Iterator[NeverReadingPeer]:
    p = NeverReadingPeer()
    yield p
    p.close()


def sink_up(pipeline: EventPipeline, sink: str) -> str:
    """The ``jvpn_event_sink_up`` sample of ``sink`` as the metrics endpoint renders it."""
    publisher = PrometheusPublisher()
    publisher.publish(observability_families(pipeline.health()))
    text = publisher.exposition().decode()
    for line in text.splitlines():
        if line.startswith(f'jvpn_event_sink_up{{sink="{sink}"}} '):
            return str(int(float(line.rsplit(" ", 1)[1])))
    raise AssertionError(f"no jvpn_event_sink_up for {sink} in:\n{text}")


def test_a_siem_that_accepts_but_never_reads_is_down_the_whole_time_it_loses_events(
    peer: NeverReadingPeer,
) -> None:
    """The issue's case: a TCP peer that never reads. Sends time out, the sink reconnects
    (a fresh connection takes a few writes), the queue overflows. From the first lost line
    on, every sample of its state and of its gauge says down, not only the moments right
    after a failed send (before the fix: up between the failures)."""
    reports = Reports()
    syslog = SyslogSink("127.0.0.1", peer.port, transport="tcp", send_timeout=0.2, name="siem")
    other = Lines()
    pipeline = EventPipeline(
        [syslog, CallbackSink(other, name="file")],
        queue_size=32,
        backoff_initial=0.02,
        backoff_max=0.05,
        on_report=reports,
    )
    stop = threading.Event()

    def produce() -> None:
        seq = 0
        while not stop.is_set():
            pipeline.emit({"event_type": "PATH_HEALTH", "ts_ms": seq, "pad": "x" * 2000})
            seq += 1
            time.sleep(0.002)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    try:
        assert wait_until(lambda: pipeline.health().sinks[0].dropped > 0, timeout=30.0)
        samples = []
        for _ in range(60):  # 3 s of samples while it keeps losing
            health = pipeline.health().sinks[0]
            samples.append((health.state, sink_up(pipeline, "siem")))
            time.sleep(0.05)
        assert pipeline.health().sinks[0].dropped > 0
        assert all(state != "ok" and up == "0" for state, up in samples), samples
        assert not pipeline.health().ok
        # Told live, to the engine's reporter and to the other sink.
        assert wait_until(lambda: reports.of(EVENT_LOSS, "siem"))
        changes = reports.of(SINK_HEALTH, "siem")
        assert changes and changes[0]["previous_state"] == "ok"
        assert changes[0]["state"] in ("failing", "lagging")
        assert wait_until(lambda: any(e["sink"] == "siem" for e in other.of(SINK_HEALTH)))
    finally:
        stop.set()
        producer.join(2.0)
        pipeline.close(timeout=0.5)


def test_state_changes_are_reported_once_each_in_order_and_the_sink_is_ok_again_after_a_clean_window() -> (  # noqa: E501
    None
):
    clock = FakeClock()
    reports = Reports()
    flaky = Switchable()
    other = Lines()
    pipeline = EventPipeline(
        [flaky, CallbackSink(other, name="file")],
        queue_size=2,
        backoff_initial=0.005,
        backoff_max=0.01,
        max_attempts=10_000,
        drain_window=10.0,
        clock=clock,
        on_report=reports,
    )
    try:
        for seq in range(5):  # 1 in flight, 2 queued: 2 lost (the other sink loses none)
            pipeline.emit({"event_type": "STATE_CHANGE", "ts_ms": seq})
            assert wait_until(lambda n=seq: len(other.of("STATE_CHANGE")) == n + 1)
        assert wait_until(lambda: [e["state"] for e in reports.of(SINK_HEALTH)] == ["failing"])
        assert sink_up(pipeline, "flaky") == "0"

        def lost_reported() -> int:
            clock.now += 0.5  # lets the next rate-limited loss warning out
            return sum(e["dropped"] for e in reports.of(EVENT_LOSS, "flaky"))

        assert wait_until(lambda: lost_reported() == 2)

        flaky.failing = False
        assert wait_until(lambda: len(flaky.lines) >= 3)
        assert wait_until(lambda: [e["state"] for e in reports.of(SINK_HEALTH)][-1] == "lagging")
        assert pipeline.health().sinks[0].state == "lagging"
        assert sink_up(pipeline, "flaky") == "0"  # writing, but it failed moments ago
        clock.now += 9.0
        assert pipeline.health().sinks[0].state == "lagging"  # still inside the window

        clock.now += 1.5  # the clock stood still since the last failure: a clean window
        assert wait_until(lambda: [e["state"] for e in reports.of(SINK_HEALTH)][-1] == "ok")
        assert sink_up(pipeline, "flaky") == "1"
        states = [(e["previous_state"], e["state"]) for e in reports.of(SINK_HEALTH)]
        assert states == [("ok", "failing"), ("failing", "lagging"), ("lagging", "ok")]
        assert reports.of(SINK_HEALTH)[0]["last_error"] == "OSError: no space left"
        # The other sink got them too (the sink itself is not told about itself).
        assert wait_until(lambda: len(other.of(SINK_HEALTH)) == 3)
        assert not [json.loads(x) for x in flaky.lines if SINK_HEALTH in x]
    finally:
        pipeline.close(timeout=0.5)


def test_a_sink_whose_directory_is_missing_is_failing_at_start_before_any_event(
    tmp_path: Any,
) -> None:
    reports = Reports()
    sink = JsonlFileSink(tmp_path / "missing" / "events.jsonl", name="jsonl")
    assert sink.check() == f"directory {tmp_path / 'missing'} does not exist"
    pipeline = EventPipeline([sink], on_report=reports)
    try:
        assert wait_until(lambda: reports.of(SINK_HEALTH, "jsonl"))
        report = reports.of(SINK_HEALTH, "jsonl")[0]
        assert (report["previous_state"], report["state"]) == ("ok", "failing")
        assert report["last_error"] == f"directory {tmp_path / 'missing'} does not exist"
    finally:
        pipeline.close(timeout=0.5)


def test_check_names_an_unresolvable_syslog_host_and_passes_a_good_target(tmp_path: Any) -> None:
    bad = SyslogSink("no-such-host.invalid", 514, transport="udp")
    problem = bad.check()
    assert problem is not None and problem.startswith("cannot resolve syslog host")
    assert "no-such-host.invalid" in problem
    assert SyslogSink("127.0.0.1", 514, transport="tcp").check() is None  # down is fine
    assert JsonlFileSink(tmp_path / "events.jsonl").check() is None
