"""The observability pipeline and its sinks (DESIGN D16, failure-isolation seed §6).

Observability failure must never block or alter the engine: these tests break sinks in
every way we know (blocking, raising, unreachable SIEM, SIEM that never reads) and check
that emit() stays cheap, loss is bounded and counted, and the health flag and EVENT_LOSS
warnings tell the operator.
"""

from __future__ import annotations

import io
import json
import re
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunnel.observability import (
    EVENT_LOSS,
    CallbackSink,
    EventPipeline,
    JsonlFileSink,
    StdoutSink,
    SyslogSink,
    backoff_delay,
    encode_event,
)
from tunnel.observability import syslog as rfc5424

SESSION_ID = "4f" * 16


@dataclass(frozen=True, slots=True)
class FakeEvent:
    """Stands in for the engine's events: event_type, ts_ms and to_dict()."""

    event_type: str
    ts_ms: int
    seq: int = 0
    session_id: str = SESSION_ID
    reason_code: str | None = None
    state_version: int | None = None
    details: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "event_type": self.event_type,
            "ts_ms": self.ts_ms,
            "seq": self.seq,
            "session_id": self.session_id,
        }
        if self.reason_code is not None:
            out["reason_code"] = self.reason_code
        if self.state_version is not None:
            out["state_version"] = self.state_version
        if self.details:
            out["details"] = self.details
        return out


class FakeClock:
    """A monotonic clock the test steps by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


class BlockingSink:
    """A sink whose write() never returns until the test releases it."""

    def __init__(self, name: str = "blocked") -> None:
        self.name = name
        self.release = threading.Event()
        self.entered = threading.Event()
        self.closed = False
        self.lines: list[str] = []
        """Every line write() was called with, the one it is blocked in last."""

    def write(self, line: str) -> None:
        self.lines.append(line)
        self.entered.set()
        self.release.wait()

    def close(self) -> None:
        self.closed = True


class FlakySink:
    """Raises RuntimeError('boom') while ``failing``; records every attempt and write."""

    def __init__(self, name: str = "flaky") -> None:
        self.name = name
        self.failing = True
        self.attempts: list[str] = []
        self.lines: list[str] = []
        self.lock = threading.Lock()

    def write(self, line: str) -> None:
        with self.lock:
            self.attempts.append(line)
            if self.failing:
                raise RuntimeError("boom")
            self.lines.append(line)

    def close(self) -> None:
        return None


class Collector:
    """A CallbackSink target that keeps the decoded events."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def __call__(self, line: str) -> None:
        decoded = json.loads(line)
        with self.lock:
            self.events.append(decoded)

    def of_type(self, event_type: str) -> list[dict[str, Any]]:
        with self.lock:
            return [e for e in self.events if e["event_type"] == event_type]


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


@pytest.fixture
def pipelines() -> Iterator[list[EventPipeline]]:
    """Pipelines a test created; closed at teardown so no thread outlives the test."""
    created: list[EventPipeline] = []
    yield created
    for pipeline in created:
        pipeline.close(timeout=0.5)


# -- the engine is never blocked -----------------------------------------------------------


def test_emit_never_blocks_behind_a_sink_that_blocks_forever(
    pipelines: list[EventPipeline],
) -> None:
    blocked = BlockingSink()
    good = Collector()
    clock = FakeClock()
    pipeline = EventPipeline(
        [blocked, CallbackSink(good, name="good")],
        ring_size=512,
        queue_size=64,
        stall_after=5.0,
        clock=clock,
    )
    pipelines.append(pipeline)
    try:
        start = time.perf_counter()
        for seq in range(100_000):
            pipeline.emit(FakeEvent("TRANSPORT_METRICS", ts_ms=seq, seq=seq))
        elapsed = time.perf_counter() - start
        print(f"100000 emits behind a blocked sink: {elapsed:.3f} s")
        assert elapsed < 10.0  # sanity bound only; emit() must not wait on the sink

        health = pipeline.health()
        assert health.ring_depth <= 512
        assert all(s.queue_depth <= s.queue_size == 64 for s in health.sinks)
        assert not health.ok

        blocked_health = {s.name: s for s in health.sinks}["blocked"]
        assert blocked_health.dropped > 0
        # Not yet stalled by the injected clock, but losing lines: not draining.
        assert blocked_health.state == "lagging"

        # The healthy sink keeps receiving and hears about the blocked sink's loss.
        assert wait_until(lambda: any(e["sink"] == "blocked" for e in good.of_type(EVENT_LOSS)))
        warning = next(e for e in good.of_type(EVENT_LOSS) if e["sink"] == "blocked")
        assert warning["reason"] == "sink_slow"
        assert 0 < warning["dropped"] <= warning["dropped_total"]
        assert len(good.of_type("TRANSPORT_METRICS")) > 0

        # The line the blocked sink is stuck in may be an event or, when the ring overflowed
        # before its first write, an EVENT_LOSS warning (warnings go first); only an event
        # counts towards the emitted total.
        assert blocked.entered.wait(5.0)
        in_write = json.loads(blocked.lines[-1])["event_type"] == "TRANSPORT_METRICS"

        def accounted() -> int:
            """Events in the blocked sink's queue, in its write() or counted as lost."""
            health = pipeline.health()
            sink = {s.name: s for s in health.sinks}["blocked"]
            return health.ring_dropped + sink.dropped + sink.queue_depth + int(in_write)

        assert wait_until(lambda: accounted() == 100_000)

        clock.now += 6.0  # the write has now been blocked longer than stall_after
        blocked_health = {s.name: s for s in pipeline.health().sinks}["blocked"]
        assert blocked_health.state == "failing"
        assert blocked_health.last_error == "write blocked for 6.0 s"
    finally:
        pipeline.close(timeout=0.5)
        blocked.release.set()


def test_close_returns_within_its_timeout_with_a_blocked_sink() -> None:
    blocked = BlockingSink()
    good = Collector()
    pipeline = EventPipeline([blocked, CallbackSink(good, name="good")], queue_size=256)
    try:
        for seq in range(100):
            pipeline.emit(FakeEvent("STATE_CHANGE", ts_ms=seq, seq=seq))
        assert blocked.entered.wait(5.0)
        start = time.monotonic()
        pipeline.close(timeout=0.3)
        elapsed = time.monotonic() - start
        print(f"close(timeout=0.3) with a blocked sink took {elapsed:.3f} s")
        assert elapsed < 2.0
        health = pipeline.health()
        assert health.closed
        # The healthy sink got everything; the blocked sink's queue is counted as lost.
        assert len(good.of_type("STATE_CHANGE")) == 100
        by_name = {s.name: s for s in health.sinks}
        assert (by_name["blocked"].queue_depth, by_name["blocked"].dropped) == (0, 99)
        assert (by_name["good"].written, by_name["good"].dropped) == (100, 0)
        assert not health.ok
    finally:
        blocked.release.set()


def test_emit_after_close_is_dropped_and_counted_not_raised() -> None:
    good = Collector()
    pipeline = EventPipeline([CallbackSink(good)])
    pipeline.emit({"event_type": "SESSION_CREATED", "ts_ms": 1})
    pipeline.close()
    pipeline.emit({"event_type": "SESSION_TERMINATED", "ts_ms": 2})
    pipeline.close()  # idempotent
    assert [e["event_type"] for e in good.events] == ["SESSION_CREATED"]
    assert pipeline.health().ring_dropped == 1


def test_invalid_events_are_counted_and_do_not_stop_delivery(
    pipelines: list[EventPipeline],
) -> None:
    class Broken:
        event_type = "X"
        ts_ms = 0

        def to_dict(self) -> dict[str, object]:
            raise KeyError("engine bug")

    good = Collector()
    pipeline = EventPipeline([CallbackSink(good)])
    pipelines.append(pipeline)
    bad: list[Any] = [Broken(), {"ts_ms": 1}, {"event_type": "NAN", "x": float("nan")}, 42]
    for event in bad:
        pipeline.emit(event)
    pipeline.emit(FakeEvent("SESSION_CREATED", ts_ms=5))
    assert pipeline.drain()
    assert [e["event_type"] for e in good.events] == ["SESSION_CREATED"]
    health = pipeline.health()
    assert health.invalid_events == 4
    assert not health.ok


# -- a sink that raises ------------------------------------------------------------------


def test_backoff_doubles_from_initial_to_a_bound() -> None:
    delays = [backoff_delay(n, 0.1, 5.0) for n in range(1, 10)]
    assert delays[:7] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0])
    assert delays[7:] == [5.0, 5.0]
    assert backoff_delay(10_000, 0.1, 5.0) == 5.0


def test_raising_sink_retries_reports_failing_loses_counted_and_recovers(
    pipelines: list[EventPipeline],
) -> None:
    flaky = FlakySink()
    good = Collector()
    clock = FakeClock()
    pipeline = EventPipeline(
        [flaky, CallbackSink(good, name="good")],
        queue_size=4,
        backoff_initial=0.005,
        backoff_max=0.02,
        max_attempts=10_000,
        clock=clock,
        wall_clock=lambda: 1_700_000_000.0,
    )
    pipelines.append(pipeline)

    pipeline.emit(FakeEvent("SESSION_CREATED", ts_ms=0, seq=0))
    assert wait_until(lambda: len(flaky.attempts) >= 3)
    first = encode_event(FakeEvent("SESSION_CREATED", ts_ms=0, seq=0))
    assert set(flaky.attempts) == {first}  # the same line is retried
    sink = {s.name: s for s in pipeline.health().sinks}["flaky"]
    assert sink.state == "failing"
    assert sink.last_error == "RuntimeError: boom"

    for seq in range(1, 11):  # 1 in flight + 4 queued: seq 1..6 are lost
        pipeline.emit(FakeEvent("STATE_CHANGE", ts_ms=seq, seq=seq))
        assert wait_until(lambda n=seq: len(good.of_type("STATE_CHANGE")) == n)  # loses none
    assert wait_until(lambda: {s.name: s for s in pipeline.health().sinks}["flaky"].dropped == 6)
    assert not pipeline.health().ok

    def reported() -> int:
        clock.now += 1.0  # lets the next rate-limited warning out
        return sum(e["dropped"] for e in good.of_type(EVENT_LOSS) if e["sink"] == "flaky")

    assert wait_until(lambda: reported() == 6)
    warnings = [e for e in good.of_type(EVENT_LOSS) if e["sink"] == "flaky"]
    assert all(w["reason"] == "sink_failing" for w in warnings)
    assert warnings[-1]["dropped_total"] == 6
    assert warnings[-1]["ts_ms"] == 1_700_000_000_000

    flaky.failing = False
    assert wait_until(lambda: len(flaky.lines) == 6)
    sink = {s.name: s for s in pipeline.health().sinks}["flaky"]
    assert sink.state == "lagging"  # writing again, but it failed within the drain window
    clock.now += 10.0  # DRAIN_WINDOW_S without a failure or a loss
    sink = {s.name: s for s in pipeline.health().sinks}["flaky"]
    assert sink.state == "ok"
    assert sink.written == 6
    assert sink.last_error == "RuntimeError: boom"  # kept for the operator
    decoded = [json.loads(line) for line in flaky.lines]
    assert decoded[0]["seq"] == 0
    # Once it writes again the sink itself is told what it missed, then gets the rest.
    assert decoded[1] == {
        "event_type": EVENT_LOSS,
        "ts_ms": 1_700_000_000_000,
        "sink": "flaky",
        "dropped": 6,
        "dropped_total": 6,
        "reason": "sink_failing",
    }
    assert [e["seq"] for e in decoded[2:]] == [7, 8, 9, 10]

    assert not pipeline.health().ok  # the flag holds for a while after a loss ...
    clock.now += 61.0
    assert pipeline.health().ok  # ... then clears


def test_loss_warnings_are_rate_limited_per_sink(pipelines: list[EventPipeline]) -> None:
    flaky = FlakySink()
    good = Collector()
    clock = FakeClock()
    pipeline = EventPipeline(
        [flaky, CallbackSink(good, name="good")],
        queue_size=1,
        backoff_initial=0.005,
        backoff_max=0.01,
        max_attempts=10_000,
        clock=clock,
    )
    pipelines.append(pipeline)

    def about_flaky() -> list[dict[str, Any]]:
        return [e for e in good.of_type(EVENT_LOSS) if e["sink"] == "flaky"]

    pipeline.emit({"event_type": "A", "ts_ms": 0})
    assert wait_until(lambda: len(flaky.attempts) >= 1)
    for burst in range(3):  # the clock does not move: only one warning goes out
        for i in range(5):
            pipeline.emit({"event_type": "B", "ts_ms": burst * 10 + i})
            time.sleep(0.001)
        time.sleep(0.25)  # a few dispatcher ticks
    assert len(about_flaky()) == 1
    total = {s.name: s for s in pipeline.health().sinks}["flaky"].dropped
    assert total == 3 * 5 - 1  # one B waits in the queue behind A, in flight
    clock.now += 1.0
    assert wait_until(lambda: sum(e["dropped"] for e in about_flaky()) == total)
    assert len(about_flaky()) == 2
    assert about_flaky()[-1]["dropped_total"] == total


class GateEvent:
    """An event whose to_dict() holds the dispatcher until released (a slow engine object)."""

    event_type = "GATE"
    ts_ms = 0

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def to_dict(self) -> dict[str, object]:
        self.entered.set()
        self.release.wait(5.0)
        return {"event_type": self.event_type, "ts_ms": self.ts_ms}


def test_ring_overflow_is_counted_and_warned_to_every_sink() -> None:
    first, second = Collector(), Collector()
    pipeline = EventPipeline(
        [CallbackSink(first, name="first"), CallbackSink(second, name="second")], ring_size=8
    )
    gate = GateEvent()
    pipeline.emit(gate)
    assert gate.entered.wait(5.0)  # the dispatcher is busy: the ring fills up
    for i in range(20):
        pipeline.emit({"event_type": "E", "ts_ms": i})
    health = pipeline.health()
    assert (health.ring_depth, health.ring_dropped, health.ok) == (8, 12, False)
    gate.release.set()
    pipeline.close()
    for collected in (first, second):
        assert [e["ts_ms"] for e in collected.of_type("E")] == list(range(12, 20))
        assert collected.of_type(EVENT_LOSS) == [
            {
                "event_type": EVENT_LOSS,
                "ts_ms": collected.of_type(EVENT_LOSS)[0]["ts_ms"],
                "sink": "*",
                "dropped": 12,
                "dropped_total": 12,
                "reason": "ring_overflow",
            }
        ]


# -- syslog --------------------------------------------------------------------------------

SD_ELEMENT = re.compile(r'\[(?P<id>[^\s=\]"]+)(?P<params>(?: [^\s=\]"]+="(?:[^"\\\]]|\\.)*")*)\]')
SD_PARAM = re.compile(r' ([^\s=\]"]+)="((?:[^"\\\]]|\\.)*)"')
RFC5424 = re.compile(
    r"^<(?P<pri>\d{1,3})>(?P<version>1) (?P<ts>\S+) (?P<host>\S+) (?P<app>\S+) "
    r"(?P<procid>\S+) (?P<msgid>\S+) (?P<sd>-|(?:" + SD_ELEMENT.pattern + r")+) (?P<msg>.*)$",
    re.DOTALL,
)


def parse_rfc5424(message: str) -> tuple[dict[str, str], dict[str, str], str]:
    """(header fields, structured-data params unescaped, MSG) of one RFC 5424 message."""
    match = RFC5424.match(message)
    assert match is not None, message
    params: dict[str, str] = {}
    if match["sd"] != "-":
        element = SD_ELEMENT.match(match["sd"])
        assert element is not None
        assert element["id"] == "jvpn@32473"
        for name, value in SD_PARAM.findall(element["params"]):
            params[name] = re.sub(r"\\(.)", r"\1", value)
    header = {k: match[k] for k in ("pri", "version", "ts", "host", "app", "procid", "msgid")}
    return header, params, match["msg"]


TRICKY_SESSION = 'ab"]\\cd'


def test_syslog_over_udp_is_rfc5424_with_escaped_structured_data(
    pipelines: list[EventPipeline],
) -> None:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(5.0)
    try:
        port = receiver.getsockname()[1]
        sink = SyslogSink(
            "127.0.0.1", port, hostname="gw1", procid="42", wall_clock=lambda: 1_700_000_001.5
        )
        pipeline = EventPipeline([sink])
        pipelines.append(pipeline)
        event = FakeEvent(
            "SECURITY_EVENT",
            ts_ms=1_700_000_000_123,
            session_id=TRICKY_SESSION,
            reason_code="NONCE_REPLAY",
            state_version=2,
        )
        pipeline.emit(event)
        pipeline.emit(FakeEvent("TRANSPORT_DEAD", ts_ms=1200, session_id=SESSION_ID))

        header, params, msg = parse_rfc5424(receiver.recv(65535).decode("utf-8"))
        assert header == {
            "pri": str(16 * 8 + 4),  # local0.warning
            "version": "1",
            "ts": "2023-11-14T22:13:20.123Z",
            "host": "gw1",
            "app": "jvpn",
            "procid": "42",
            "msgid": "SECURITY_EVENT",
        }
        assert params == {
            "session_id": TRICKY_SESSION,
            "reason_code": "NONCE_REPLAY",
            "state_version": "2",
        }
        assert json.loads(msg) == event.to_dict()

        header, params, _ = parse_rfc5424(receiver.recv(65535).decode("utf-8"))
        assert header["pri"] == str(16 * 8 + 6)  # info
        assert header["ts"] == "2023-11-14T22:13:21.500Z"  # ts_ms 1200 is no date: wall clock
        assert params == {"session_id": SESSION_ID}
    finally:
        receiver.close()


def test_syslog_severity_follows_event_type() -> None:
    assert rfc5424.severity_for("SECURITY_EVENT") == rfc5424.SEVERITY_WARNING
    assert rfc5424.severity_for("SESSION_TERMINATED") == rfc5424.SEVERITY_NOTICE
    assert rfc5424.severity_for("EVENT_LOSS") == rfc5424.SEVERITY_WARNING
    assert rfc5424.severity_for("DIAGNOSTIC") == rfc5424.SEVERITY_ERROR
    assert rfc5424.severity_for("STATE_CHANGE") == rfc5424.SEVERITY_INFO
    assert rfc5424.escape_param_value('a"b]c\\d') == 'a\\"b\\]c\\\\d'


def test_syslog_udp_truncates_to_its_safe_size() -> None:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(5.0)
    sink = SyslogSink("127.0.0.1", receiver.getsockname()[1], hostname="gw1", udp_max_bytes=300)
    try:
        sink.write(encode_event(FakeEvent("DIAGNOSTIC", ts_ms=0, details={"pad": "é" * 1000})))
        datagram = receiver.recv(65535)
        assert len(datagram) <= 300
        header, params, _ = parse_rfc5424(datagram.decode("utf-8"))  # still valid UTF-8
        assert header["msgid"] == "DIAGNOSTIC"
        assert params == {"session_id": SESSION_ID}
    finally:
        sink.close()
        receiver.close()


class TcpSyslogServer:
    """A loopback RFC 6587 receiver that splits the stream into octet-counted frames."""

    def __init__(self, port: int = 0) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(4)
        self.listener.settimeout(0.1)
        self.port: int = self.listener.getsockname()[1]
        self.frames: list[bytes] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(0.1)
            buffer = b""
            while not self.stop.is_set():
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    break
                buffer += chunk
                while b" " in buffer:
                    length_text, rest = buffer.split(b" ", 1)
                    length = int(length_text)
                    if len(rest) < length:
                        break
                    with self.lock:
                        self.frames.append(rest[:length])
                    buffer = rest[length:]
            conn.close()

    def messages(self) -> list[str]:
        with self.lock:
            return [f.decode("utf-8") for f in self.frames]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2.0)
        self.listener.close()


def test_syslog_over_tcp_uses_octet_counting(pipelines: list[EventPipeline]) -> None:
    server = TcpSyslogServer()
    try:
        sink = SyslogSink("127.0.0.1", server.port, transport="tcp", hostname="gw1")
        pipeline = EventPipeline([sink])
        pipelines.append(pipeline)
        events = [
            FakeEvent("SESSION_CREATED", ts_ms=1_700_000_000_000, state_version=0),
            FakeEvent("STATE_CHANGE", ts_ms=1_700_000_000_500, session_id=TRICKY_SESSION),
            FakeEvent("SESSION_TERMINATED", ts_ms=1_700_000_001_000, reason_code="SESSION_TTL"),
        ]
        for event in events:
            pipeline.emit(event)
        assert wait_until(lambda: len(server.messages()) == 3)
        parsed = [parse_rfc5424(m) for m in server.messages()]
        assert [h["msgid"] for h, _, _ in parsed] == [e.event_type for e in events]
        assert [h["pri"] for h, _, _ in parsed] == ["134", "134", "133"]
        assert parsed[1][1]["session_id"] == TRICKY_SESSION
        assert [json.loads(msg) for _, _, msg in parsed] == [e.to_dict() for e in events]
    finally:
        server.close()


def test_syslog_tcp_peer_that_never_reads_fails_the_sink_after_the_send_timeout(
    pipelines: list[EventPipeline],
) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # the kernel completes the handshake; nobody ever reads
    try:
        sink = SyslogSink("127.0.0.1", listener.getsockname()[1], transport="tcp", send_timeout=0.3)
        pipeline = EventPipeline([sink], queue_size=256, backoff_initial=0.05, backoff_max=0.1)
        pipelines.append(pipeline)
        start = time.monotonic()
        for seq in range(150):  # ~10 MB: far more than the socket buffers hold
            pipeline.emit(FakeEvent("TRANSPORT_METRICS", ts_ms=seq, details={"pad": "x" * 65536}))
        emit_time = time.monotonic() - start
        assert wait_until(lambda: pipeline.health().sinks[0].state == "failing", timeout=10.0)
        print(f"150 emits {emit_time:.3f} s; failing after {time.monotonic() - start:.2f} s")
        last_error = pipeline.health().sinks[0].last_error
        assert last_error is not None and "timed out" in last_error
        assert not pipeline.health().ok
    finally:
        listener.close()


def test_syslog_tcp_server_down_then_up_recovers(pipelines: list[EventPipeline]) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens on this port now
    sink = SyslogSink("127.0.0.1", port, transport="tcp", connect_timeout=0.5, hostname="gw1")
    pipeline = EventPipeline(
        [sink], backoff_initial=0.02, backoff_max=0.05, max_attempts=10_000, drain_window=0.5
    )
    pipelines.append(pipeline)
    pipeline.emit(FakeEvent("SESSION_CREATED", ts_ms=1_700_000_000_000))
    assert wait_until(lambda: pipeline.health().sinks[0].state == "failing")
    assert "ConnectionRefused" in (pipeline.health().sinks[0].last_error or "")

    server = TcpSyslogServer(port)
    try:
        assert wait_until(lambda: pipeline.health().sinks[0].state == "ok")
        assert wait_until(lambda: len(server.messages()) == 1)
        header, _, msg = parse_rfc5424(server.messages()[0])
        assert header["msgid"] == "SESSION_CREATED"
        assert json.loads(msg)["ts_ms"] == 1_700_000_000_000
        assert pipeline.health().sinks[0].written == 1
    finally:
        pipeline.close(timeout=0.5)
        server.close()


# -- JSONL file and stdout -------------------------------------------------------------------


def test_jsonl_rotates_at_max_bytes_and_keeps_backups(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = JsonlFileSink(path, max_bytes=1000, backups=3)
    try:
        for seq in range(200):
            sink.write(encode_event(FakeEvent("STATE_CHANGE", ts_ms=seq, seq=seq)))
    finally:
        sink.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["events.jsonl", "events.jsonl.1", "events.jsonl.2", "events.jsonl.3"]
    seqs: list[int] = []
    for name in ["events.jsonl.3", "events.jsonl.2", "events.jsonl.1", "events.jsonl"]:
        file = tmp_path / name
        assert file.stat().st_size <= 1000
        assert stat.S_IMODE(file.stat().st_mode) == 0o640
        seqs += [json.loads(line)["seq"] for line in file.read_text().splitlines()]
    assert seqs == list(range(seqs[0], 200))  # newest last, contiguous, no partial line


def test_jsonl_sink_recovers_when_its_directory_appears(
    tmp_path: Path, pipelines: list[EventPipeline]
) -> None:
    path = tmp_path / "later" / "events.jsonl"
    pipeline = EventPipeline(
        [JsonlFileSink(path, name="file")], backoff_initial=0.01, backoff_max=0.02,
        drain_window=0.3,
    )  # fmt: skip
    pipelines.append(pipeline)
    pipeline.emit({"event_type": "SESSION_CREATED", "ts_ms": 1})
    assert wait_until(lambda: pipeline.health().sinks[0].state == "failing")
    # the failed write (FileNotFoundError) or the sink's own check, whichever reported
    # last, names why: the directory is missing
    error = pipeline.health().sinks[0].last_error or ""
    assert "FileNotFoundError" in error or f"directory {path.parent} does not exist" in error
    path.parent.mkdir()
    assert wait_until(lambda: pipeline.health().sinks[0].state == "ok")
    pipeline.close()
    assert [json.loads(x) for x in path.read_text().splitlines()] == [
        {"event_type": "SESSION_CREATED", "ts_ms": 1}
    ]


def test_stdout_sink_writes_one_flushed_json_line_per_event() -> None:
    stream = io.StringIO()
    pipeline = EventPipeline([StdoutSink(stream)])
    pipeline.emit(FakeEvent("SESSION_CREATED", ts_ms=7, seq=1))
    pipeline.emit({"ts_ms": 8, "event_type": "STATE_CHANGE", "b": [1, "é"]})
    pipeline.close()
    lines = stream.getvalue().splitlines()
    assert lines[1] == '{"b":[1,"\\u00e9"],"event_type":"STATE_CHANGE","ts_ms":8}'
    assert json.loads(lines[0]) == FakeEvent("SESSION_CREATED", ts_ms=7, seq=1).to_dict()


def test_sink_names_must_be_unique() -> None:
    with pytest.raises(ValueError, match="unique"):
        EventPipeline([CallbackSink(print), CallbackSink(print)])


# -- nothing the caller does makes the pipeline raise ----------------------------------------


class RaisingToDict:
    event_type = "BROKEN"
    ts_ms = 0

    def to_dict(self) -> dict[str, object]:
        raise RuntimeError("no")


events_strategy = st.one_of(
    st.builds(
        FakeEvent,
        event_type=st.text(max_size=40),
        ts_ms=st.integers(min_value=-(2**63), max_value=2**63),
        session_id=st.text(max_size=40),
    ),
    st.dictionaries(
        st.sampled_from(["event_type", "ts_ms", "session_id", "x"]),
        st.one_of(st.none(), st.integers(), st.text(max_size=20), st.floats()),
    ),
    st.just(RaisingToDict()),
    st.integers(),
    st.none(),
)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("emit"), events_strategy),
        st.tuples(st.just("health"), st.none()),
        st.tuples(st.just("close"), st.floats(min_value=0.0, max_value=0.05)),
    ),
    max_size=40,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations)
def test_random_emit_health_close_sequences_never_raise(ops: list[tuple[str, Any]]) -> None:
    flaky = FlakySink()
    flaky.failing = bool(len(ops) % 2)
    collected = Collector()
    syslog_sink = SyslogSink("127.0.0.1", 9, hostname="gw1")  # discard port: may refuse
    pipeline = EventPipeline(
        [flaky, CallbackSink(collected), syslog_sink],
        ring_size=8,
        queue_size=4,
        backoff_initial=0.001,
        backoff_max=0.002,
    )
    try:
        for op, arg in ops:
            if op == "emit":
                pipeline.emit(arg)
            elif op == "health":
                health = pipeline.health()
                assert health.ring_depth <= health.ring_size
                assert all(s.queue_depth <= s.queue_size for s in health.sinks)
            else:
                pipeline.close(timeout=arg)
    finally:
        pipeline.close(timeout=0.2)
    assert pipeline.health().closed
