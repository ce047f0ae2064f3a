"""The client engine's control socket, on a real engine over loopback (docs/control.md).

A real ClientEngine with two loopback paths reaches a real GatewaySessions
(tests/loopback_gateway.py) and serves its control socket in the test's directory. What
is asserted is what docs/control.md promises: the status is the engine's own snapshot;
a command given over the socket acts on the session like the UI's key (the engine's own
snapshot and events show it); refusals say why; watchers get the history, the live
events and, at the end, the final snapshot; the socket goes away with the engine; an
explicitly configured socket that cannot be served stops the engine before it touches
the host, while a busy default one only costs the socket (with a notice).
"""

from __future__ import annotations

import base64
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from engine_watch import Watcher
from loopback_gateway import LoopbackGateway

from tunnel.client.config import ClientConfig, ConfigError, PathConfig, parse_client_config
from tunnel.client.control import ControlSocket, control_socket_for
from tunnel.client.engine import ClientEngine
from tunnel.control.client import ControlConnection
from tunnel.control.protocol import (
    Command,
    ControlError,
    EventMsg,
    SnapshotMsg,
    Watch,
    client_status,
    default_socket,
)
from tunnel.core.handshake import generate_keypair
from tunnel.io.inner import MemoryInner

Start = Callable[..., tuple[ClientEngine, Watcher]]


class RecordingInner(MemoryInner):
    """The memory inner side, counting its host set-ups."""

    def __init__(self) -> None:
        super().__init__()
        self.setups = 0

    def setup(self) -> None:
        self.setups += 1
        super().setup()


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Start]:
    private, public = generate_keypair()
    engines: list[ClientEngine] = []
    with LoopbackGateway(public) as gw:

        def run(
            control: ControlSocket | None, *, attach: bool = True, inner: MemoryInner | None = None
        ) -> tuple[ClientEngine, Watcher]:
            paths = tuple(
                PathConfig(i, f"lo{i}", ("127.0.0.1", 0), None, gw.address) for i in (1, 2)
            )
            cfg = ClientConfig(private_key=private, gateway_public_key=gw.public_key, paths=paths)
            engine = ClientEngine(cfg, inner=inner or MemoryInner(), control=control)
            engines.append(engine)
            w = Watcher(engine, timeout=20.0)
            engine.start()
            if attach:
                w.wait(lambda: w.snapshot and w.snapshot.session.state == "ATTACHED")
            return engine, w

        try:
            yield run
        finally:
            for engine in engines:
                engine.stop()


def sock(tmp_path: Path) -> ControlSocket:
    return ControlSocket(tmp_path / "ctl" / "client.sock", required=True)


def test_status_is_the_engines_own_snapshot_on_an_owner_only_socket(
    start: Start, tmp_path: Path
) -> None:
    spec = sock(tmp_path)
    engine, w = start(spec)
    assert engine.control_socket == spec.path
    assert stat.S_IMODE(spec.path.lstat().st_mode) == 0o600
    with ControlConnection(spec.path) as conn:
        assert conn.hello.role == "client"
        status = client_status(conn.status().status)
    mine = w.wait(lambda: w.snapshot).session
    assert status.running is True
    assert status.session.session_id == mine.session_id != ""
    assert status.session.state == "ATTACHED"
    assert [p.label.split()[0] for p in status.session.paths] == ["lo1", "lo2"]


def test_switch_over_the_socket_moves_the_session_and_watchers_see_it(
    start: Start, tmp_path: Path
) -> None:
    spec = sock(tmp_path)
    _, w = start(spec)
    # both paths validated: a switch to 2 can be granted
    w.wait(lambda: w.snapshot and all(p.validated for p in w.snapshot.session.paths))
    active = w.snapshot.session.active
    target = 2 if active == 1 else 1
    with ControlConnection(spec.path) as watcher, ControlConnection(spec.path) as conn:
        watcher.send(Watch(history=True))
        history = watcher.read()
        assert isinstance(history, EventMsg)  # the remembered session events come first
        result = conn.command(Command(command="switch", path=target))
        assert result.ok, result.detail
        switched = w.wait(
            lambda: [e for e in w.of("TRANSPORT_SWITCH") if e["new_transport"] == target]
        )
        assert switched[0]["reason_code"] == "manual_switch"
        w.wait(lambda: w.snapshot and w.snapshot.session.active == target)
        seen = []
        for message in watcher.messages():
            if isinstance(message, EventMsg):
                seen.append(message.event)
            if any(
                e["event_type"] == "TRANSPORT_SWITCH" and e["new_transport"] == target for e in seen
            ):
                break


@pytest.mark.parametrize(
    ("command", "says"),
    [
        (Command(command="switch", path=7), "no path 7 (this client's paths: 1, 2)"),
        (Command(command="switch"), "switch needs 'path'"),
        (Command(command="auto"), "auto needs 'on'"),
        (Command(command="reboot"), "unknown command 'reboot'"),
        (Command(command="terminate", session="ab12"), "a client has one session"),
    ],
)
def test_refused_commands_say_why_and_change_nothing(
    start: Start, tmp_path: Path, command: Command, says: str
) -> None:
    spec = sock(tmp_path)
    _, w = start(spec)
    with ControlConnection(spec.path) as conn:
        result = conn.command(command)
        status = client_status(conn.status().status)
    assert result.ok is False
    assert says in result.detail
    assert status.running and status.session.state == "ATTACHED"
    assert w.of("TRANSPORT_SWITCH_DENIED") == []


def test_terminate_over_the_socket_ends_the_session_and_the_socket(
    start: Start, tmp_path: Path
) -> None:
    spec = sock(tmp_path)
    engine, _ = start(spec)
    with ControlConnection(spec.path, timeout=20.0) as watcher:
        watcher.send(Watch(snapshots=True, history=False))
        with ControlConnection(spec.path) as conn:
            assert conn.command(Command(command="terminate")).ok
        final = None
        try:
            for message in watcher.messages():
                if isinstance(message, SnapshotMsg):
                    snap = client_status(message.status)
                    if not snap.running:
                        final = snap
                        break
        except ControlError:
            pass
    assert engine.join(20.0)
    assert engine.final_reason == "operator_terminated"
    assert final is not None and final.final_reason == "operator_terminated"
    assert not spec.path.exists()


def test_an_explicit_socket_in_use_stops_the_engine_before_it_touches_the_host(
    start: Start, tmp_path: Path
) -> None:
    spec = sock(tmp_path)
    first, _ = start(spec)
    inner = RecordingInner()
    second, _ = start(spec, attach=False, inner=inner)
    assert second.join(20.0)
    assert second.final_reason is not None
    assert "already listens on" in second.final_reason
    assert inner.setups == 0
    assert first.running and spec.path.exists()  # the first one keeps its socket


def test_a_busy_default_socket_costs_only_the_socket(start: Start, tmp_path: Path) -> None:
    path = tmp_path / "ctl" / "client.sock"
    start(ControlSocket(path, required=True))
    engine, _ = start(ControlSocket(path, required=False))
    assert engine.running and engine.control_socket is None
    assert len(engine.notices) == 1
    assert "no control socket" in engine.notices[0] and str(path) in engine.notices[0]


def test_where_the_socket_is(tmp_path: Path) -> None:
    assert control_socket_for(None) == ControlSocket(default_socket("client"), required=False)
    assert control_socket_for("off") is None
    assert control_socket_for(None, "off") is None
    assert control_socket_for("/a.sock", "/b.sock") == ControlSocket(Path("/b.sock"), True)
    assert default_socket("client", {}).name == "client.sock"


def _config(tmp_path: Path, line: str) -> ClientConfig:
    private, public = generate_keypair()
    text = (
        f'private_key = "{base64.b64encode(private).decode()}"\n'
        f'gateway_public_key = "{base64.b64encode(public).decode()}"\n'
        f'{line}\n[[path]]\ngateway = "127.0.0.1:51820"\n'
    )
    return parse_client_config(text, source="client.toml", base=tmp_path)


def test_control_socket_key(tmp_path: Path) -> None:
    assert _config(tmp_path, "").control_socket is None
    assert _config(tmp_path, 'control_socket = "off"').control_socket == "off"
    rel = _config(tmp_path, 'control_socket = "run/c.sock"').control_socket
    assert rel == str(tmp_path / "run" / "c.sock")
    with pytest.raises(ConfigError, match=r"control_socket = .*longer than a unix socket path"):
        _config(tmp_path, f'control_socket = "/{"x" * 120}"')
    with pytest.raises(ConfigError, match="control_socket"):
        _config(tmp_path, "control_socket = 3")
