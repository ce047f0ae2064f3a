"""``jvpn-tui --attach``: the UI on a client that already runs (issue 12, item 2).

A real headless client (``python -m jvpn_tui --headless``, a separate process, memory
inner side) reaches a real GatewaySessions over loopback (tests/loopback_gateway.py) and
serves its control socket in the test's directory. The UI (Textual's pilot) attaches to
it through :class:`tunnel.control.remote.RemoteEngine`. What is asserted is what
docs/tui.md and docs/client.md promise: a key in the attached UI moves the client's
session (the client's own status and its own JSON events say so, not the UI); quitting
the UI detaches and leaves the client running and ATTACHED; terminating from the UI ends
the client, and the UI shows its final reason; a client that is killed leaves the UI
saying ``detached: the client at <path> went away``, never a traceback; a socket where
no client answers is one line and exit 3.

The resynchronisation after a loss on the watch connection and a refused command are
driven by a scripted control server (the real server's loss needs a reader slower than a
test can be made to be, deterministically).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from loopback_gateway import LoopbackGateway
from test_tui_layout import screen_text, settle
from test_tui_pilot import RecordingApp, run_async, text_of, wait_for
from textual.pilot import Pilot

from jvpn_tui.__main__ import main
from jvpn_tui.app import JvpnApp
from jvpn_tui.fake_engine import FakeEngine
from jvpn_tui.screens import ConfirmScreen
from jvpn_tui.widgets import EngineBanner, SwitchTimeline
from tunnel.api import NO_SESSION, EngineSnapshot
from tunnel.control import protocol
from tunnel.control.client import ControlConnection
from tunnel.control.protocol import (
    PROTOCOL_VERSION,
    ControlError,
    EventMsg,
    Hello,
    Loss,
    Result,
    SnapshotMsg,
    client_status,
    decode_request,
    encode,
    raw,
)
from tunnel.control.remote import RemoteEngine
from tunnel.core.handshake import generate_keypair

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZE = (160, 48)
START_TIMEOUT_S = 30.0
"""Generous: a loaded 2-core machine starts a Python process slowly."""


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for: {what}")


class HeadlessClient:
    """``jvpn-tui --headless`` with a control socket, its JSON event lines collected."""

    def __init__(self, tmp: Path, gw: LoopbackGateway, private: bytes) -> None:
        self.socket = tmp / "ctl" / "client.sock"
        config = tmp / "client.toml"
        host, port = gw.address
        config.write_text(
            f'private_key = "{base64.b64encode(private).decode()}"\n'
            f'gateway_public_key = "{base64.b64encode(gw.public_key).decode()}"\n'
            "[inner]\n"
            'kind = "memory"\n'
            + "".join(
                f'[[path]]\nname = "lo{i}"\nbind = "127.0.0.1"\ngateway = "{host}:{port}"\n'
                for i in (1, 2)
            )
        )  # fmt: skip
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jvpn_tui", "--headless", "--config", str(config),
             "--control-socket", str(self.socket)],
            cwd=REPO_ROOT, env=child_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.events: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.events.append(json.loads(line))

    def status(self) -> EngineSnapshot:
        """The client's own status, over a connection of the test's own."""
        with ControlConnection(self.socket) as conn:
            return client_status(conn.status().status)

    def ready(self) -> EngineSnapshot:
        """Wait until the client serves its socket, is ATTACHED and both paths validated."""

        def good() -> EngineSnapshot | None:
            assert self.proc.poll() is None, self.stderr()
            try:
                s = self.status()
            except ControlError:
                return None
            validated = len(s.session.paths) == 2 and all(p.validated for p in s.session.paths)
            return s if s.session.state == "ATTACHED" and validated else None

        snapshot: EngineSnapshot = wait_until(good, START_TIMEOUT_S, "client ATTACHED")
        return snapshot

    def stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read()

    def of(self, event_type: str) -> list[dict[str, Any]]:
        return [e for e in list(self.events) if e.get("event_type") == event_type]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def client(tmp_path: Path) -> Iterator[HeadlessClient]:
    private, public = generate_keypair()
    with LoopbackGateway(public) as gw:
        headless = HeadlessClient(tmp_path, gw, private)
        try:
            yield headless
        finally:
            headless.close()


async def attached(pilot: Pilot[Any]) -> None:
    app = pilot.app
    assert isinstance(app, RecordingApp)
    await wait_for(pilot, lambda: app.snapshot is not None, "the client's first snapshot")


async def until(pilot: Pilot[Any], condition: Callable[[], object], what: str) -> None:
    """Like wait_for, for conditions that take the client (another process) a while."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if condition():
            return
        await pilot.pause(0.05)
    raise AssertionError(f"timed out waiting for: {what}")


# -- against a real headless client ---------------------------------------------------------


def test_attached_ui_switches_the_client_and_quitting_detaches_leaving_it_up(
    client: HeadlessClient,
) -> None:
    before = client.ready()
    target = 2 if before.session.active == 1 else 1

    async def scenario() -> None:
        app = RecordingApp(RemoteEngine(client.socket))
        async with app.run_test(size=SIZE) as pilot:
            await attached(pilot)
            assert str(client.socket) in app.title and "attached" in app.title
            assert app.snapshot is not None
            assert app.snapshot.session.session_id == before.session.session_id
            await settle(pilot)
            footer = screen_text(app).splitlines()[-1]
            assert "q Detach" in footer and "Quit" not in footer, footer
            assert not app.check_action("demo", ("kill",))  # not the demo: no demo keys

            await pilot.press(str(target))
            # the client's own events and status say the session moved (not the UI)
            await until(pilot, lambda: [e for e in client.of("TRANSPORT_SWITCH")
                                        if e.get("new_transport") == target],
                        "the client's TRANSPORT_SWITCH")  # fmt: skip
            # The client's status agrees with its own last switch: the target, unless
            # the client has switched again since (its switching rules may move a
            # session on after a manual switch on a loaded machine: one CI run saw the
            # status never show the target).
            def last_switch() -> object:
                switches = client.of("TRANSPORT_SWITCH")
                return switches[-1].get("new_transport") if switches else None

            try:
                await until(pilot, lambda: client.status().session.active == last_switch(),
                            "the client's status to show its last switch")  # fmt: skip
            except AssertionError as exc:
                switches = client.of("TRANSPORT_SWITCH")
                raise AssertionError(f"{exc}; the client's switches: {switches}") from None
            await wait_for(pilot, lambda: app.snapshot is not None
                           and app.snapshot.session.active == client.status().session.active,
                           "the UI follows the client")  # fmt: skip

            await pilot.press("q")  # detach
            await until(pilot, lambda: not app.is_running, "the UI to close")
        assert app.ended is None

    asyncio_run(scenario)
    # the client runs on, ATTACHED on the path the UI chose, the same session
    assert client.proc.poll() is None
    after = client.status()
    assert after.running
    assert (after.session.state, after.session.active) == ("ATTACHED", target)
    assert after.session.session_id == before.session.session_id
    assert client.of("SESSION_TERMINATED") == []
    client.proc.send_signal(signal.SIGTERM)
    assert client.proc.wait(15) == 0  # and it still ends cleanly on its own signal


def test_terminate_from_the_attached_ui_ends_the_client_with_its_final_reason(
    client: HeadlessClient,
) -> None:
    client.ready()

    async def scenario() -> None:
        app = RecordingApp(RemoteEngine(client.socket))
        async with app.run_test(size=SIZE) as pilot:
            await attached(pilot)
            await pilot.press("t")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("y")
            await until(pilot, lambda: app.ended is not None, "the client to end")
            assert app.ended == "operator_terminated"
            banner = app.query_one(EngineBanner)
            assert banner.display
            assert text_of(banner) == "Engine stopped: operator_terminated — session TERMINATED"
            assert "END" in app.query_one(SwitchTimeline).lines[0]
            assert app.check_action("switch", (2,)) is None  # its keys are disabled
            assert app.is_running  # the UI stays to be read

    asyncio_run(scenario)
    assert client.proc.wait(15) == 0
    stopped = wait_until(lambda: client.of("ENGINE_STOPPED"), 5.0, "ENGINE_STOPPED")
    assert stopped[0]["final_reason"] == "operator_terminated"


def test_a_killed_client_leaves_the_ui_saying_it_went_away(client: HeadlessClient) -> None:
    client.ready()

    async def scenario() -> None:
        app = RecordingApp(RemoteEngine(client.socket))
        async with app.run_test(size=SIZE) as pilot:
            await attached(pilot)
            client.proc.kill()
            await until(pilot, lambda: app.ended is not None, "the UI to notice")
            gone = f"the client at {client.socket} went away"
            assert app.ended == f"detached: {gone}"
            banner = text_of(app.query_one(EngineBanner))
            assert app.snapshot is not None  # the last state the UI saw is said with it
            seen = app.snapshot.session.state
            assert banner == f"Detached: {gone} (last seen: session {seen})"
            assert (f"detached: {gone}", "error") in app.notes
            assert "Traceback" not in screen_text(app)
            assert app.is_running and app.return_code is None

    asyncio_run(scenario)


def run_attach(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jvpn_tui", *args], cwd=REPO_ROOT, env=child_env(),
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_attaching_where_no_client_answers_is_one_line_and_exit_3(tmp_path: Path) -> None:
    missing = tmp_path / "none.sock"
    proc = run_attach("--attach", str(missing))
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("jvpn-tui: cannot attach: no control socket at ")
    assert str(missing) in lines[0] and "Traceback" not in proc.stderr

    stale = tmp_path / "stale.sock"  # a socket file nobody listens on (a killed client's)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(stale))
    listener.close()
    proc = run_attach("--attach", str(stale))
    assert proc.returncode == 3
    assert proc.stderr.splitlines() == [
        f"jvpn-tui: cannot attach: nobody listens on {stale} (a stale socket: the client ended)"
    ]


def test_attach_without_a_terminal_refuses_in_one_line_exit_2(tmp_path: Path) -> None:
    """A client answers, but there is no terminal to draw on: the usual refusal."""
    server = ScriptedServer(tmp_path / "s.sock", [])
    try:
        proc = run_attach("--attach", str(server.path))
    finally:
        server.close()
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("jvpn-tui: the UI needs a terminal")
    assert "--headless" in lines[0] and "--attach" in lines[0]


def test_attach_without_a_socket_uses_the_clients_default_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    default = tmp_path / "run" / "client.sock"
    asked: list[str] = []

    def default_socket(role: str) -> Path:
        asked.append(role)
        return default

    monkeypatch.setattr(protocol, "default_socket", default_socket)
    assert main(["--attach"]) == 3
    assert asked == ["client"]
    assert f"no control socket at {default}:" in capsys.readouterr().err


def test_attaching_to_a_gateways_socket_is_refused(tmp_path: Path) -> None:
    server = ScriptedServer(tmp_path / "gw.sock", [], role="gateway")
    try:
        with pytest.raises(ControlError, match="is a gateway's control socket; --attach needs a"):
            RemoteEngine(server.path)
    finally:
        server.close()


def test_attach_refuses_the_options_that_start_an_engine(tmp_path: Path) -> None:
    for extra in (["--demo"], ["--headless"], ["--config", "client.toml"]):
        proc = run_attach("--attach", str(tmp_path / "x.sock"), *extra)
        assert proc.returncode == 2, (extra, proc.stderr)
        assert proc.stderr.splitlines() == [
            f"jvpn-tui: --attach shows a client that already runs; it takes no {extra[0]}"
        ]


# -- against a scripted control server ---------------------------------------------------------


def snapshot(seq: int, state: str = "ATTACHED") -> EngineSnapshot:
    session = dataclasses.replace(NO_SESSION, state=state, session_id="ab")
    return EngineSnapshot(seq=seq, ts_ms=1_700_000_000_000 + seq, session=session)


def event(n: int, kind: str = "STATE_CHANGE") -> dict[str, Any]:
    return {"event_type": kind, "ts_ms": 1_700_000_000_000 + n, "session_id": "ab",
            "node_id": "client", "policy_version": "1", "state_version": n,
            "previous_state": "ATTACHED", "new_state": "VOLATILE", "reason_code": "transport_dead",
            "trigger": "t", "edge": f"T{n:02d}"}  # fmt: skip


class ScriptedServer:
    """A control socket that answers as scripted: the n-th watch gets ``watches[n]`` (lines
    after its hello and request), every command gets ``Result(ok=False)``."""

    def __init__(self, path: Path, watches: list[list[bytes]], role: str = "client") -> None:
        self.path = path
        self.role = role
        self.watches = watches
        self.commands: list[dict[str, Any]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(8)
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self._sock.accept()
                self._conns.append(conn)
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        hello = Hello(protocol=PROTOCOL_VERSION, role=self.role, version="t", pid=7)
        conn.sendall(encode(hello))
        with contextlib.suppress(OSError), conn.makefile("rb") as lines:
            for line in lines:
                request = decode_request(line)
                if request.__class__.__name__ == "Watch":
                    for out in self.watches.pop(0):
                        conn.sendall(out)
                else:
                    self.commands.append({"command": getattr(request, "command", None)})
                    conn.sendall(encode(Result(ok=False, detail="not now: scripted refusal")))

    def close(self) -> None:
        self._sock.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()


def test_a_loss_on_the_watch_rebuilds_the_history_from_a_new_watch(tmp_path: Path) -> None:
    first = [encode(EventMsg(event=event(1))), encode(SnapshotMsg(status=raw(snapshot(1)))),
             encode(EventMsg(event=event(2, "DIAGNOSTIC"))), encode(Loss(lost=40))]  # fmt: skip
    second = [encode(EventMsg(event=event(1))), encode(EventMsg(event=event(3))),
              encode(SnapshotMsg(status=raw(snapshot(50))))]  # fmt: skip
    server = ScriptedServer(tmp_path / "s.sock", [first, second])
    remote = RemoteEngine(server.path)
    try:
        remote.start()
        channel = remote.channel
        wait_until(lambda: channel.remote_lost and channel.has_snapshot, 10.0, "the new watch")
        batch = channel.take()
        # the loss is reported once, with the client's history from the new watch
        assert batch.lost == 40
        assert [e["state_version"] for e in batch.history] == [1, 3]
        assert batch.snapshot is not None and batch.snapshot.seq == 50
        assert channel.take().lost == 0
        assert remote.went_away is None
    finally:
        remote.stop()
        server.close()
    assert remote.join(1.0)


def test_a_refused_command_is_notified_and_noted_in_the_timeline(tmp_path: Path) -> None:
    server = ScriptedServer(tmp_path / "s.sock", [[encode(SnapshotMsg(status=raw(snapshot(1))))]])

    async def scenario() -> None:
        app = RecordingApp(RemoteEngine(server.path))
        async with app.run_test(size=SIZE) as pilot:
            await attached(pilot)
            await pilot.press("a")
            await wait_for(pilot, lambda: any("refused" in m for m, _ in app.notes), "a notice")
            assert ("auto: refused by the client: not now: scripted refusal", "warning") in (
                app.notes
            )
            note = app.query_one(SwitchTimeline).lines[0]
            assert "NOTE" in note and "scripted refusal" in note
            await pilot.press("q")

    try:
        asyncio_run(scenario)
    finally:
        server.close()
    assert server.commands == [{"command": "auto"}]  # the key's SetAutoSwitch, as "auto"


def asyncio_run(scenario: Callable[[], Any]) -> None:
    run_async(scenario)()


def policy_event(ts_ms: int, detail: str) -> dict[str, Any]:
    return {"event_type": "POLICY_EVENT", "ts_ms": ts_ms, "session_id": "ab",
            "node_id": "client", "policy_version": "1", "state_version": 1,
            "policy_name": "POLICY_LOADED", "reason_code": "policy_applied",
            "detail": detail}  # fmt: skip


def test_the_clients_history_is_drawn_but_only_news_is_notified(tmp_path: Path) -> None:
    """At attach the timeline shows what the client remembers, without a notification
    per old event (a client that reloaded its policy 20 times would bury the screen);
    what happens after the attach is notified as in the embedded UI."""
    later = int(time.time() * 1000) + 60_000  # after the attach
    lines = [encode(EventMsg(event=policy_event(1_700_000_000_000, "old reload"))),
             encode(SnapshotMsg(status=raw(snapshot(1)))),
             encode(EventMsg(event=policy_event(later, "new reload")))]  # fmt: skip
    server = ScriptedServer(tmp_path / "s.sock", [lines])

    async def scenario() -> None:
        app = RecordingApp(RemoteEngine(server.path))
        async with app.run_test(size=SIZE) as pilot:
            await attached(pilot)
            timeline = app.query_one(SwitchTimeline)
            await wait_for(pilot, lambda: len(timeline.lines) == 2, "both policy lines")
            assert "new reload" in timeline.lines[0] and "old reload" in timeline.lines[1]
            assert [m for m, _ in app.notes if "reload" in m] == ["POLICY_LOADED: new reload"]

    try:
        asyncio_run(scenario)
    finally:
        server.close()


def test_attached_screen_picture(
    snap_compare: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The healthy scenario of the fake engine, served over a control socket: the header
    names the socket and the client's pid, the footer offers Detach (pytest-textual-snapshot;
    a relative socket path keeps the picture the same in every directory)."""
    fake = FakeEngine("healthy")
    fake.start()
    lines = [
        encode(SnapshotMsg(status=raw(item)))
        if isinstance(item, EngineSnapshot)
        else encode(EventMsg(event=dict(item)))
        for item in fake.channel.drain()
    ]
    monkeypatch.chdir(tmp_path)
    server = ScriptedServer(Path("client.sock"), [lines])

    async def first_snapshot(pilot: Pilot[Any]) -> None:
        app = pilot.app
        assert isinstance(app, JvpnApp)
        await wait_for(pilot, lambda: app.snapshot is not None, "the served snapshot")
        await settle(pilot)

    try:
        app = JvpnApp(RemoteEngine(Path("client.sock")))
        assert snap_compare(app, terminal_size=SIZE, run_before=first_snapshot)
    finally:
        server.close()
