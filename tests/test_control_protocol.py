"""The control socket's protocol and server over a real unix socket (docs/control.md).

The target here is a small recording stand-in; the engine's and the gateway's adapters
are tested with the real programs in tests/test_control_client.py and
tests/test_control_gateway.py. What is asserted is the documented protocol: hello first,
one reply line per request, a clear error for a bad request on a connection that stays
usable, history then live events for a watcher, a counted loss for a slow one, the socket
file's mode and what happens to stale or foreign files at its path.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import pytest

from tunnel.api import NO_SESSION, EngineSnapshot
from tunnel.control.client import ControlConnection
from tunnel.control.protocol import (
    MAX_LINE,
    PROTOCOL_VERSION,
    Command,
    ControlError,
    EventMsg,
    Loss,
    Result,
    SnapshotMsg,
    Watch,
    client_status,
)  # fmt: skip
from tunnel.control.server import ControlServer

T = TypeVar("T")


class Target:
    role = "client"

    def __init__(self) -> None:
        self.commands: list[Command] = []
        self.seq = 0

    def status(self) -> EngineSnapshot:
        self.seq += 1
        return EngineSnapshot(seq=self.seq, ts_ms=0, session=NO_SESSION)

    def history(self) -> Sequence[Mapping[str, object]]:
        return [{"type": "STATE_CHANGE", "n": 0}, {"type": "TRANSPORT_ATTACHED", "n": 1}]

    def command(self, request: Command) -> Result:
        self.commands.append(request)
        if request.command == "switch" and request.path is None:
            return Result(ok=False, detail="switch needs a path")
        return Result(ok=True, detail=f"{request.command} requested")


class Loop:
    """An asyncio loop in a thread, as the engine has one."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, fn: Callable[[], T]) -> T:
        async def call() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(10)

    def wait(self, coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)  # type: ignore[arg-type]

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def loop() -> Iterator[Loop]:
    lp = Loop()
    yield lp
    lp.stop()


@pytest.fixture
def served(tmp_path: Path, loop: Loop) -> Iterator[tuple[ControlServer, Target, Path]]:
    target = Target()
    path = tmp_path / "run" / "client.sock"
    server = ControlServer(path, target, watch_queue=8, max_clients=3)
    loop.wait(server.start())
    yield server, target, path
    loop.wait(server.close())


def raw_lines(path: Path, *lines: bytes, expect: int) -> list[dict[str, object]]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        for line in lines:
            s.sendall(line)
        buf = b""
        while buf.count(b"\n") < expect:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return [json.loads(x) for x in buf.splitlines()]


def test_hello_then_status(served: tuple[ControlServer, Target, Path]) -> None:
    _, _, path = served
    with ControlConnection(path) as conn:
        assert conn.hello.protocol == PROTOCOL_VERSION
        assert conn.hello.role == "client"
        assert conn.hello.pid == os.getpid()
        reply = conn.status()
        assert reply.role == "client"
        assert client_status(reply.status).session.state == "TERMINATED"


def test_socket_is_owner_only_in_a_private_directory(
    served: tuple[ControlServer, Target, Path],
) -> None:
    _, _, path = served
    assert stat.S_ISSOCK(path.lstat().st_mode)
    assert stat.S_IMODE(path.lstat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.lstat().st_mode) == 0o700


@pytest.mark.parametrize(
    ("line", "says"),
    [
        (b"not json\n", "bad request"),
        (b'{"type":"frobnicate"}\n', "frobnicate"),
        (b'{"type":"command","command":"switch","path":"two"}\n', "$.path"),
        (b'{"type":"status","extra":1}\n', "extra"),
        (b"\n", "type"),
    ],
)
def test_bad_request_gets_one_error_and_the_connection_stays_usable(
    served: tuple[ControlServer, Target, Path], line: bytes, says: str
) -> None:
    _, _, path = served
    replies = raw_lines(path, line, b'{"type":"status"}\n', expect=3)
    assert replies[0]["type"] == "hello"
    assert replies[1]["type"] == "error"
    assert says in str(replies[1]["error"])
    assert replies[2]["type"] == "status_reply"


def test_over_long_line_ends_the_connection_with_an_error(
    served: tuple[ControlServer, Target, Path],
) -> None:
    _, _, path = served
    replies = raw_lines(path, b"x" * (MAX_LINE + 10), expect=3)
    assert [r["type"] for r in replies] == ["hello", "error"]
    assert "longer than" in str(replies[1]["error"])


def test_commands_reach_the_target_and_refusals_say_why(
    served: tuple[ControlServer, Target, Path],
) -> None:
    _, target, path = served
    with ControlConnection(path) as conn:
        ok = conn.command(Command(command="switch", path=2))
        refused = conn.command(Command(command="switch"))
    assert ok == Result(ok=True, detail="switch requested")
    assert refused.ok is False and "path" in refused.detail
    assert [c.path for c in target.commands] == [2, None]


def test_watch_replays_history_then_streams_events_and_snapshots(
    served: tuple[ControlServer, Target, Path], loop: Loop
) -> None:
    server, _, path = served
    with ControlConnection(path) as conn:
        conn.send(Watch(snapshots=True))
        first = [conn.read() for _ in range(3)]
        assert [m.event["type"] for m in first[:2] if isinstance(m, EventMsg)] == [
            "STATE_CHANGE", "TRANSPORT_ATTACHED",
        ]  # fmt: skip
        assert isinstance(first[2], SnapshotMsg)
        loop.run(lambda: server.publish_event({"type": "TRANSPORT_SWITCH", "n": 2}))
        loop.run(lambda: server.publish_status(EngineSnapshot(seq=99, ts_ms=0, session=NO_SESSION)))
        live = [conn.read(), conn.read()]
    assert isinstance(live[0], EventMsg) and live[0].event["n"] == 2
    assert isinstance(live[1], SnapshotMsg) and client_status(live[1].status).seq == 99


def test_slow_watcher_loses_oldest_messages_and_is_told_how_many(
    served: tuple[ControlServer, Target, Path], loop: Loop
) -> None:
    server, _, path = served
    with ControlConnection(path) as conn:
        conn.send(Watch(history=False))
        # wait until the server registered the watcher, then publish 20 events in one
        # loop turn: the writer task cannot run in between, the queue (8) overflows.
        # each call is a round trip through the loop, which reads the request in between
        deadline = time.monotonic() + 30
        while loop.run(lambda: server.watchers) != 1 and time.monotonic() < deadline:
            pass
        assert loop.run(lambda: server.watchers) == 1

        def burst() -> None:
            for n in range(20):
                server.publish_event({"type": "DIAGNOSTIC", "n": n})

        loop.run(burst)
        got = [conn.read() for _ in range(9)]
    assert got[0] == Loss(lost=12)
    assert [m.event["n"] for m in got[1:] if isinstance(m, EventMsg)] == list(range(12, 20))


def test_connections_beyond_the_limit_are_refused_in_one_line(
    served: tuple[ControlServer, Target, Path],
) -> None:
    _, _, path = served
    held = [ControlConnection(path) for _ in range(3)]
    try:
        replies = raw_lines(path, expect=1)
        assert replies[0]["type"] == "error"
        assert "too many" in str(replies[0]["error"])
    finally:
        for conn in held:
            conn.close()


def test_stale_socket_is_replaced_but_a_live_one_or_a_file_is_not(
    tmp_path: Path, loop: Loop
) -> None:
    path = tmp_path / "c.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    first = ControlServer(path, Target())
    loop.wait(first.start())
    try:
        with pytest.raises(ControlError, match="already listens"):
            loop.wait(ControlServer(path, Target()).start())
    finally:
        loop.wait(first.close())
    assert not path.exists()  # removed at close
    regular = tmp_path / "file"
    regular.write_text("keep me")
    with pytest.raises(ControlError, match="not a socket"):
        loop.wait(ControlServer(regular, Target()).start())
    assert regular.read_text() == "keep me"


def test_client_errors_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match=r"no control socket at .*running"):
        ControlConnection(tmp_path / "none.sock")
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()
    with pytest.raises(ControlError, match="stale socket"):
        ControlConnection(stale)


def test_a_server_of_another_protocol_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "old.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        hello = {"type": "hello", "protocol": 99, "role": "client", "version": "9", "pid": 1}
        conn.sendall(json.dumps(hello).encode() + b"\n")
        conn.close()

    t = threading.Thread(target=serve)
    t.start()
    try:
        with pytest.raises(ControlError, match="protocol 99"):
            ControlConnection(path)
    finally:
        t.join(10)
        listener.close()
