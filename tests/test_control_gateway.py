"""The gateway's control socket and ``jvpn`` against it (docs/control.md, docs/gateway.md).

Level 3: a real gateway runtime on loopback UDP (its own thread and loop, echo inner side)
with real client engines (memory inner side) as its clients, and the ``jvpn`` command
run as a program or through its ``main``. What is asserted is what the docs promise:
the status names every session with its client, state, epoch, owner and addresses, its
counters add up to the gateway's totals, every JSON field is documented, ``terminate``
ends exactly one session with ``operator_terminated`` (the client sees it), ``reload``
applies or refuses a policy, the client's commands are refused, ``watch`` shows history
then live events, and the start-time and exit behaviour of ``jvpn-gateway`` with a
control socket (mode 0600, removed at exit, a path that cannot be used is exit 5).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from engine_watch import Watcher

from tunnel.api import SwitchTo
from tunnel.client.config import ClientConfig, PathConfig
from tunnel.client.engine import ClientEngine
from tunnel.control.protocol import ControlError
from tunnel.core.events import (
    Reason,
    SessionCreated,
    SessionTerminated,
    TransportAttached,
    TransportSwitch,
)  # fmt: skip
from tunnel.core.gateway_session import ClientEntry
from tunnel.core.handshake import generate_keypair
from tunnel.core.policy import POLICY_DEFAULT, policy_to_toml
from tunnel.gateway.config import ConfigError, load_gateway_config
from tunnel.gateway.console import SessionNotices
from tunnel.gateway.thread import GatewayThread, start_in_thread
from tunnel.io.cpu import cpu_has_aes
from tunnel.io.inner import MemoryInner
from tunnel.keys import write_private_key, write_public_key

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "control.md"
JVPN = [sys.executable, "-m", "tunnel.cli"]

CIPHER = "aes-256-gcm" if cpu_has_aes() else "chacha20-poly1305"
"""docs/client.md: without ``ciphers`` a client prefers AES-256-GCM on a CPU with AES
instructions; the gateway allows both by default (docs/gateway.md)."""


def wait_until(what: Callable[[], Any], timeout: float = 20.0, message: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = what()
        if result:
            return result
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {message or what}")


def jvpn(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*JVPN, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip


def engine_for(gw_address: tuple[str, int], gw_public: bytes, private: bytes) -> ClientEngine:
    paths = tuple(PathConfig(i, f"lo{i}", ("127.0.0.1", 0), None, gw_address) for i in (1, 2))
    cfg = ClientConfig(
        private_key=private, gateway_public_key=gw_public, paths=paths, node_id="client"
    )
    return ClientEngine(cfg, inner=MemoryInner(rate_pps=40))


@dataclass
class Rig:
    gw: GatewayThread
    sock: Path
    engines: dict[str, ClientEngine]
    watchers: dict[str, Watcher]
    policy: Path

    def session_of(self, name: str) -> str:
        w = self.watchers[name]
        w.wait(lambda: w.snapshot is not None and w.snapshot.session.state == "ATTACHED")
        assert w.snapshot is not None
        return w.snapshot.session.session_id


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    gw_private, gw_public = generate_keypair()
    keys = {name: generate_keypair() for name in ("alice", "bob")}
    clients = [
        ClientEntry(name, keys[name][1], f"10.66.0.{i}")
        for i, name in enumerate(("alice", "bob"), start=2)
    ]
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_to_toml(POLICY_DEFAULT))
    sock = tmp_path / "run" / "gateway.sock"
    gw = start_in_thread(
        static_private=gw_private, clients=clients, control=sock, node_id="gw1",
        policy_path=policy, policy_poll_s=None,
    )  # fmt: skip
    engines = {name: engine_for(gw.address, gw_public, keys[name][0]) for name in keys}
    watchers = {name: Watcher(engine, timeout=20) for name, engine in engines.items()}
    for engine in engines.values():
        engine.start()
    rig = Rig(gw, sock, engines, watchers, policy)
    try:
        for name in engines:
            rig.session_of(name)
        yield rig
    finally:
        for engine in engines.values():
            engine.stop()
        gw.stop()


def status_json(sock: Path) -> dict[str, Any]:
    proc = jvpn("--socket", str(sock), "status", "--json")
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


def test_status_text_shows_every_session_with_its_paths_and_counters(rig: Rig) -> None:
    ids = {name: rig.session_of(name) for name in rig.engines}
    proc = jvpn("--socket", str(rig.sock), "status")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "gateway gw1"
    gw_port = rig.gw.address[1]
    assert re.search(rf"^  listening: +127\.0\.0\.1:{gw_port}$", proc.stdout, re.M), proc.stdout
    assert re.search(r"^  sessions: +2 live, 2 created, 0 denied$", proc.stdout, re.M)
    header = next(line for line in lines if line.lstrip().startswith("SESSION"))
    assert header.split() == [
        "SESSION", "CLIENT", "INNER", "STATE", "EPOCH", "KEY", "CIPHER", "OWNER", "PATH",
        "ADDRESS", "RX", "TX", "SEEN", "AGE",
    ]  # fmt: skip
    cipher = CIPHER
    assert re.search(r"^  ciphers: +aes-256-gcm, chacha20-poly1305$", proc.stdout, re.M), (
        proc.stdout
    )
    for name, inner in (("alice", "10.66.0.2"), ("bob", "10.66.0.3")):
        row = next(line for line in lines if line.lstrip().startswith(ids[name][:8]))
        cells = row.split()
        assert cells[1:6] == [name, inner, "ATTACHED", "v1", "1"], row
        assert cells[7] == cipher, row
        assert cells[8] == "gw1", row  # the owner node in the session store
        assert cells[9] == "1", row  # the client's path 1 carries the session
        assert re.fullmatch(r"127\.0\.0\.1:\d+", cells[10]) and cells[10] != f"127.0.0.1:{gw_port}"
    # the columns line up: every row's ADDRESS starts where the header's does
    column = header.index("ADDRESS")
    rows = [line for line in lines if any(line.lstrip().startswith(i[:8]) for i in ids.values())]
    assert all(line[column - 2 : column] == "  " and line[column] != " " for line in rows)


def test_status_json_fields_are_documented_and_counters_add_up(rig: Rig) -> None:
    ids = {name: rig.session_of(name) for name in rig.engines}
    for w in rig.watchers.values():  # some inner traffic both ways for every client
        w.wait(lambda w=w: w.snapshot is not None and w.snapshot.traffic.rx_packets >= 5)
    doc = status_json(rig.sock)
    assert doc["role"] == "gateway"
    status = doc["status"]
    assert status["node_id"] == "gw1"
    assert status["listen"] == [f"127.0.0.1:{rig.gw.address[1]}"]
    assert status["policy_ok"] is True
    sessions = {s["client"]: s for s in status["sessions"]}
    assert {name: s["session_id"] for name, s in sessions.items()} == ids
    for s in sessions.values():
        assert s["state"] == "ATTACHED" and s["owner"] == "gw1" and s["active_path"] == 1
        active = [p for p in s["paths"] if p["active"]]
        assert len(active) == 1 and active[0]["validated"] is True
        assert s["rx_packets"] > 0 and s["tx_packets"] > 0
        assert s["rx_bytes"] >= 20 * s["rx_packets"]  # IPv4 packets: 20-byte headers at least
    # one status is one instant on the gateway loop: the per-client counters add up to the
    # gateway's inner totals (every inner packet here belongs to one of the two clients)
    traffic = status["traffic"]
    assert sum(s["rx_packets"] for s in sessions.values()) == traffic["inner_from_clients"]
    assert sum(s["tx_packets"] for s in sessions.values()) == traffic["inner_to_clients"]
    documented = set(re.findall(r"^\| `([a-z0-9_]+)` \|", DOC.read_text(encoding="utf-8"), re.M))
    fields = set(status) | set(traffic) | {k for s in sessions.values() for k in s}
    fields |= {k for s in sessions.values() for p in s["paths"] for k in p}
    assert fields - documented == set(), "undocumented in docs/control.md"


def test_terminate_from_the_cli_ends_one_session_and_the_client_sees_why(rig: Rig) -> None:
    alice, bob = rig.session_of("alice"), rig.session_of("bob")
    proc = jvpn("--socket", str(rig.sock), "terminate", alice[:6])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"session {alice} terminated (operator_terminated)"
    w = rig.watchers["alice"]
    ended = w.wait(lambda: w.of("SESSION_TERMINATED"))
    assert ended[0]["reason_code"] == "operator_terminated"
    assert ended[0]["initiator"] == "peer"  # the gateway ended it, the client was told
    assert w.wait(lambda: w.snapshot is not None and not w.snapshot.running)
    sessions = {s["session_id"]: s for s in status_json(rig.sock)["status"]["sessions"]}
    assert sessions[bob]["state"] == "ATTACHED"
    assert sessions[alice]["state"] == "TERMINATED"
    assert sessions[alice]["end_reason"] == "operator_terminated"
    assert rig.watchers["bob"].of("SESSION_TERMINATED") == []


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["terminate"], "needs a session id"),
        (["terminate", "ffffffff"], "no live session 'ffffffff'"),
        (["terminate", "ab"], "too short"),
        (["switch", "2"], "switch is a client command"),
        (["auto", "off"], "auto is a client command"),
        (["reattach"], "reattach is a client command"),
    ],
)
def test_refused_commands_exit_1_with_the_reason(rig: Rig, argv: list[str], says: str) -> None:
    proc = jvpn("--socket", str(rig.sock), *argv)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    assert proc.stderr.startswith("jvpn: refused: ") and says in proc.stderr, proc.stderr
    assert len(proc.stderr.splitlines()) == 1
    states = {s["client"]: s["state"] for s in status_json(rig.sock)["status"]["sessions"]}
    assert states == {"alice": "ATTACHED", "bob": "ATTACHED"}


def test_reload_applies_a_valid_policy_and_refuses_an_invalid_one(rig: Rig) -> None:
    before = status_json(rig.sock)["status"]["policy_version"]
    changed = policy_to_toml(POLICY_DEFAULT)
    changed = re.sub(r"(?m)^max_switches_per_min = \d+$", "max_switches_per_min = 6", changed)
    assert changed != policy_to_toml(POLICY_DEFAULT)
    rig.policy.write_text(changed)
    proc = jvpn("--socket", str(rig.sock), "reload")
    assert proc.returncode == 0, proc.stderr
    applied = status_json(rig.sock)["status"]
    assert applied["policy_ok"] is True and applied["policy_version"] != before
    assert proc.stdout.strip() == f"policy {applied['policy_version']} applied"
    assert {s["policy_version"] for s in applied["sessions"]} == {applied["policy_version"]}

    rig.policy.write_text(changed.replace("max_switches_per_min = 6", 'max_switches_per_min = "x"'))
    proc = jvpn("--socket", str(rig.sock), "reload")
    assert proc.returncode == 1
    assert proc.stderr.startswith("jvpn: refused: invalid policy, new sessions are denied")
    assert applied["policy_version"] in proc.stderr  # what running sessions keep
    status = status_json(rig.sock)["status"]
    assert status["policy_ok"] is False and "max_switches_per_min" in status["policy_error"]
    text = jvpn("--socket", str(rig.sock), "status").stdout
    assert re.search(r"^  policy: +INVALID, new sessions are denied", text, re.M), text


def test_watch_shows_history_then_live_events_and_ends_when_the_gateway_stops(rig: Rig) -> None:
    alice = rig.session_of("alice")
    proc = subprocess.Popen(
        [*JVPN, "--socket", str(rig.sock), "watch", "--json"], cwd=REPO, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    lines: list[dict[str, Any]] = []
    reader = threading.Thread(
        target=lambda: lines.extend(json.loads(x) for x in proc.stdout or ()), daemon=True
    )
    reader.start()
    try:
        wait_until(lambda: sum(e.get("event_type") == "SESSION_CREATED" for e in lines) == 2,
                   message="the history (two SESSION_CREATED)")  # fmt: skip
        created = [e for e in lines if e.get("event_type") == "SESSION_CREATED"]
        assert {e["peer"] for e in created} == {"alice", "bob"}
        assert jvpn("--socket", str(rig.sock), "terminate", alice).returncode == 0
        ended = wait_until(
            lambda: [e for e in lines if e.get("event_type") == "SESSION_TERMINATED"],
            message="the live SESSION_TERMINATED",
        )
        assert ended[0]["session_id"] == alice
        assert ended[0]["reason_code"] == "operator_terminated"
        rig.gw.stop()
        assert proc.wait(20) == 0
        assert "closed its control socket" in (proc.stderr.read() if proc.stderr else "")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        reader.join(10)
    assert not rig.sock.exists()  # removed when the gateway stopped


def test_watch_text_renders_a_switch_line(rig: Rig) -> None:
    """The readable form: the operator switches alice to path 2; the gateway's watch
    shows it as one line naming both paths and the reason."""
    alice = rig.session_of("alice")
    # Ctrl-C as in a terminal: SIGINT at its default even when this suite runs in the
    # background of a shell without job control (which ignores it, and Python keeps that)
    proc = subprocess.Popen(
        [*JVPN, "--socket", str(rig.sock), "watch", "--no-history"], cwd=REPO, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True)
    reader.start()
    try:
        wait_until(lambda: rig.gw.call(lambda: rig.gw.runtime.control is not None and
                                       rig.gw.runtime.control.server.watchers == 1),
                   message="the watch to register")  # fmt: skip
        w = rig.watchers["alice"]
        w.wait(lambda: w.snapshot is not None
               and all(p.validated for p in w.snapshot.session.paths))  # fmt: skip
        assert rig.engines["alice"].commands.send(SwitchTo(2))
        line = wait_until(
            lambda: next((x for x in lines if "TRANSPORT_SWITCH " in x), None),
            message="the TRANSPORT_SWITCH line",
        )
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(10)
        reader.join(10)
    assert code == 0  # Ctrl-C ends a watch normally
    assert re.search(
        rf"^\d\d:\d\d:\d\d\.\d{{3}}  {alice[:8]}  TRANSPORT_SWITCH +path 1 -> 2 "
        r"\(127\.0\.0\.1:\d+\): manual_switch, [\d.]+ ms, epoch 2$",
        line.rstrip("\n"),
    ), line


# -- the socket and the program --------------------------------------------------------------


def test_cannot_reach_the_socket_exits_3_in_one_line(tmp_path: Path) -> None:
    missing = jvpn("--socket", str(tmp_path / "none.sock"), "status")
    assert missing.returncode == 3
    assert (
        missing.stderr == f"jvpn: no control socket at {tmp_path / 'none.sock'}: is the "
        "client or gateway running? (--socket names another path)\n"
    )
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()
    proc = jvpn("--socket", str(stale), "watch")
    assert proc.returncode == 3 and "stale socket" in proc.stderr
    regular = tmp_path / "file"
    regular.write_text("x")
    proc = jvpn("--socket", str(regular), "reload")
    assert proc.returncode == 3
    assert proc.stderr == f"jvpn: {regular} is not a socket (--socket names the control socket)\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_another_user_is_refused_by_the_socket_permissions(rig: Rig) -> None:
    """The socket is 0600 in a 0700 directory; even with the directory opened up, another
    user cannot connect (exit 3, one line saying why). The other user is a forked child
    that dropped to ``nobody`` and runs the command's code already loaded."""
    from tunnel.cli import parser
    from tunnel.cli.commands import run

    assert stat.S_IMODE(rig.sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(rig.sock.parent.stat().st_mode) == 0o700
    os.chmod(rig.sock.parent, 0o711)  # let "nobody" reach the socket itself: its own mode
    for up in rig.sock.parents[1:]:
        if up == Path("/tmp"):
            break
        os.chmod(up, os.stat(up).st_mode | 0o011)
    args = parser().parse_args(["--socket", str(rig.sock), "status"])
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest, no threads; report through the pipe, then _exit
        code = 99
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            errors: list[str] = []
            code = run(args, rig.sock, open(os.devnull, "w"), errors.append)
            os.write(write_end, "\n".join(errors).encode())
        finally:
            os._exit(code)
    os.close(write_end)
    _, wait_status = os.waitpid(pid, 0)
    with os.fdopen(read_end) as pipe:
        said = pipe.read()
    assert os.waitstatus_to_exitcode(wait_status) == 3, said
    assert said.startswith(
        f"permission denied on {rig.sock}: the control socket is for its owner only"
    ), said


def write_gateway_files(d: Path, control: str | None) -> Path:
    if not (d / "gateway.key").exists():
        write_private_key(d / "gateway.key", generate_keypair()[0])
        write_public_key(d / "alice.pub", generate_keypair()[1])
    control_table = "" if control is None else f"[control]\nsocket = {json.dumps(control)}\n"
    config = d / "gateway.toml"
    config.write_text(
        'node_id = "gwt"\nlisten = "127.0.0.1:0"\nprivate_key = "gateway.key"\n'
        f'inner_echo = true\nworkers = 1\n{control_table}[state]\nstore = "memory"\n'
        '[[clients]]\nname = "alice"\npublic_key = "alice.pub"\n'
    )
    return config


def test_config_control_socket_default_relative_and_disabled(tmp_path: Path) -> None:
    from tunnel.control.protocol import default_socket

    default = load_gateway_config(write_gateway_files(tmp_path, None))
    assert (default.control_socket, default.control_required) == (
        default_socket("gateway"), False,
    )  # fmt: skip
    for off in ("", "off"):
        assert load_gateway_config(write_gateway_files(tmp_path, off)).control_socket is None
    named = load_gateway_config(write_gateway_files(tmp_path, "run/gw.sock"))
    assert (named.control_socket, named.control_required) == (tmp_path / "run" / "gw.sock", True)
    config = write_gateway_files(tmp_path, None)
    config.write_text(config.read_text() + "[control]\nsocket = 5\n")
    with pytest.raises(ConfigError, match=r"control\.socket = 5: must be a path"):
        load_gateway_config(config)
    config.write_text(config.read_text().replace("socket = 5", 'sockt = "x"'))
    with pytest.raises(ConfigError, match=r"control\.sockt .*unknown key"):
        load_gateway_config(config)


def run_gateway(config: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tunnel.gateway.main", "--config", str(config), *extra],
        cwd=REPO, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip


def test_gateway_program_serves_the_socket_and_removes_it_at_exit(tmp_path: Path) -> None:
    sock = tmp_path / "ctl" / "gw.sock"
    proc = run_gateway(
        write_gateway_files(tmp_path, "elsewhere.sock"), "--control-socket", str(sock)
    )
    try:
        assert proc.stderr is not None
        ready = proc.stderr.readline()
        assert f", control {sock}, key SHA256:" in ready, ready
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        status = status_json(sock)["status"]
        assert status["node_id"] == "gwt" and status["sessions"] == []
        assert not (tmp_path / "elsewhere.sock").exists()  # the option overrides the file
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert not sock.exists()


def test_a_control_socket_that_cannot_be_created_is_exit_5_naming_the_path(
    tmp_path: Path,
) -> None:
    taken = tmp_path / "not-a-socket"
    taken.write_text("keep")
    proc = run_gateway(write_gateway_files(tmp_path, str(taken)))
    assert proc.wait(30) == 5
    err = proc.stderr.read() if proc.stderr else ""
    assert err == (
        f"jvpn-gateway: error: control socket: {taken} exists and is not a socket; remove it "
        "or choose another\n"
    )
    assert taken.read_text() == "keep"
    blocked = tmp_path / "file-as-dir" / "gw.sock"
    (tmp_path / "file-as-dir").write_text("")
    proc = run_gateway(write_gateway_files(tmp_path, str(blocked)))
    assert proc.wait(30) == 5
    err = proc.stderr.read() if proc.stderr else ""
    assert err == (
        f"jvpn-gateway: error: control socket: cannot create the directory {blocked.parent} "
        "for gw.sock: File exists\n"
    )


def test_a_busy_default_socket_costs_only_the_socket(tmp_path: Path) -> None:
    """The default path is best effort (docs/gateway.md): when it cannot be used (another
    gateway holds it), the gateway runs without one and says why; a named one is fatal."""
    from tunnel.gateway.runtime import GatewayRuntime

    taken = tmp_path / "taken"
    taken.write_text("")
    runtime = GatewayRuntime(
        static_private=generate_keypair()[0], clients=[], control=taken, control_required=False
    )
    runtime.open()
    try:
        assert runtime.control is None
        assert (
            runtime.control_warning == f"{taken} exists and is not a socket; remove it or "
            "choose another"
        )
    finally:
        runtime.close()
    required = GatewayRuntime(static_private=generate_keypair()[0], clients=[], control=taken)
    with pytest.raises(ControlError, match="is not a socket"):
        required.open()
    assert taken.read_text() == ""


def test_gateway_without_a_control_socket_starts_and_jvpn_says_nothing_listens(
    tmp_path: Path,
) -> None:
    proc = run_gateway(write_gateway_files(tmp_path, ""))
    try:
        assert proc.stderr is not None
        ready = proc.stderr.readline()
        assert "listening on" in ready and "control" not in ready, ready
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


# -- the console -----------------------------------------------------------------------------


def test_console_lines_for_sessions_that_start_switch_and_end(tmp_path: Path) -> None:
    """The gateway program says when a client connects, switches and leaves."""
    gw_priv, gw_pub = generate_keypair()
    c_priv, c_pub = generate_keypair()
    write_private_key(tmp_path / "gateway.key", gw_priv)
    write_public_key(tmp_path / "alice.pub", c_pub)
    config = tmp_path / "gateway.toml"
    config.write_text(
        'node_id = "gwc"\nlisten = "127.0.0.1:0"\nprivate_key = "gateway.key"\n'
        'inner_echo = true\nworkers = 1\n[control]\nsocket = ""\n[state]\nstore = "memory"\n'
        '[[clients]]\nname = "alice"\npublic_key = "alice.pub"\n'
    )
    proc = run_gateway(config)
    lines: list[str] = []
    assert proc.stderr is not None
    ready = proc.stderr.readline()
    port = int(ready.split("listening on 127.0.0.1:", 1)[1].split(",", 1)[0])
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr or ()), daemon=True)
    reader.start()
    engine = engine_for(("127.0.0.1", port), gw_pub, c_priv)
    w = Watcher(engine, timeout=20)
    engine.start()
    try:
        w.wait(lambda: w.snapshot is not None and w.snapshot.session.state == "ATTACHED"
               and all(p.validated for p in w.snapshot.session.paths))  # fmt: skip
        assert w.snapshot is not None
        sid = w.snapshot.session.session_id
        started = wait_until(lambda: [x for x in lines if " started: " in x], message="start")
        assert re.fullmatch(
            rf"jvpn-gateway: session {sid[:8]} started: alice 10\.66\.0\.2 from "
            rf"127\.0\.0\.1:\d+ \(path 1\), {CIPHER}\n", started[0],
        ), started  # fmt: skip
        assert engine.commands.send(SwitchTo(2))
        switched = wait_until(lambda: [x for x in lines if " switched " in x], message="switch")
        assert re.fullmatch(
            rf"jvpn-gateway: session {sid[:8]} \(alice\) switched (127\.0\.0\.1:\d+) -> "
            r"(127\.0\.0\.1:\d+) \(path 1 -> 2\): manual_switch\n", switched[0],
        ), switched  # fmt: skip
        first = started[0].split(" from ", 1)[1].split(" ", 1)[0]
        assert switched[0].split(" switched ", 1)[1].startswith(f"{first} -> ")
        engine.stop()  # explicit terminate: TERMINATE to the gateway
        ended = wait_until(lambda: [x for x in lines if " ended: " in x], message="end")
        assert re.fullmatch(
            rf"jvpn-gateway: session {sid[:8]} \(alice\) ended: operator_terminated after "
            r"\d+s, 1 switch\n", ended[0],
        ), ended  # fmt: skip
    finally:
        engine.stop()
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        reader.join(10)


def test_session_lines_are_rate_limited_per_client_and_count_what_was_not_shown() -> None:
    now = [0.0]
    out: list[str] = []
    notices = SessionNotices(out.append, repeat_s=10.0, clock=lambda: now[0])
    base = {"ts_ms": 0, "node_id": "gw", "policy_version": "1", "state_version": 1}

    def session(sid: str, client: str, t: float) -> None:
        now[0] = t
        notices.on_event(SessionCreated(**base, session_id=sid, peer=client, inner_address="x"))
        notices.on_event(
            TransportAttached(**base, session_id=sid, transport_id=1, path="a:1", binding_epoch=1)
        )
        notices.on_event(
            SessionTerminated(
                **base, session_id=sid, reason_code=Reason.SESSION_REPLACED, session_age_ms=1.0,
                transportless_age_ms=0.0, total_switches=0,
            )
        )  # fmt: skip

    for i in range(5):  # a client reconnecting in a loop: one line of each kind per 10 s
        session(f"{i:032x}", "alice", float(i))
    session("f" * 32, "bob", 4.5)  # another client is not held back by alice
    session("e" * 32, "alice", 11.0)
    starts = [x for x in out if " started: " in x]
    assert [x.split()[2] for x in starts] == ["00000000", "ffffffff", "eeeeeeee"]
    assert starts[-1].endswith("(path 1); 4 more not shown since the previous such line")
    assert "more not shown" not in starts[1]
    ends = [x for x in out if " ended: " in x]
    assert len(ends) == 3 and ends[-1].endswith("; 4 more not shown since the previous such line")
    now[0] = 30.0
    notices.on_event(
        TransportSwitch(
            **base, session_id="e" * 32, previous_transport=1, new_transport=2,
            reason_code=Reason.MANUAL_SWITCH, switch_latency_ms=1.0, binding_epoch=2, path="b:2",
        )
    )  # fmt: skip
    assert out[-1] == (
        "jvpn-gateway: session eeeeeeee (?) switched ? -> b:2 (path 1 -> 2): manual_switch"
    )  # an ended session is forgotten: what is not known any more is '?'


def test_a_watcher_that_asks_for_statuses_gets_the_gateway_status_every_second(
    rig: Rig,
) -> None:
    from tunnel.control.client import ControlConnection
    from tunnel.control.protocol import SnapshotMsg, Watch, gateway_status

    with ControlConnection(rig.sock, timeout=10) as conn:
        assert conn.hello.role == "gateway"
        conn.send(Watch(snapshots=True, history=False))
        statuses = []
        while len(statuses) < 3:  # the first at once, then one per second
            message = conn.read()
            if isinstance(message, SnapshotMsg):
                statuses.append(gateway_status(message.status))
    assert all(s.node_id == "gw1" for s in statuses)
    assert statuses[0].uptime_s < statuses[1].uptime_s < statuses[2].uptime_s
    assert {x.client for x in statuses[-1].sessions} == {"alice", "bob"}


def test_inner_traffic_is_counted_per_client_for_both_address_families() -> None:
    """IPv4 and IPv6 packets of one client add up in its one row; other addresses are not
    counted (the table cannot grow); a new session starts from zero."""
    from tunnel.gateway.control import ClientTraffic

    traffic = ClientTraffic([
        ClientEntry("alice", b"a" * 32, "10.66.0.2", "fd00:66::2"),
        ClientEntry("bob", b"b" * 32, "10.66.0.3"),
    ])  # fmt: skip

    def v4(src: str, dst: str, size: int) -> bytes:
        head = bytes([0x45]) + bytes(11) + socket.inet_aton(src) + socket.inet_aton(dst)
        return head + bytes(size - 20)

    def v6(src: str, dst: str, size: int) -> bytes:
        head = bytes([0x60]) + bytes(7)
        head += socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
        return head + bytes(size - 40)

    traffic.from_clients([v4("10.66.0.2", "10.66.0.1", 100), v6("fd00:66::2", "fd00:66::1", 80)])
    traffic.from_clients([v4("10.66.0.9", "10.66.0.1", 100)])  # nobody's: not counted
    traffic.to_clients([v6("fd00:66::1", "fd00:66::2", 60), v4("10.66.0.1", "10.66.0.3", 50)])
    assert traffic.counts("10.66.0.2") == (2, 180, 1, 60)
    assert traffic.counts("fd00:66::2") == (2, 180, 1, 60)  # the same client
    assert traffic.counts("10.66.0.3") == (0, 0, 1, 50)
    assert traffic.counts("10.66.0.9") == (0, 0, 0, 0)
    traffic.reset("10.66.0.2")
    assert traffic.counts("fd00:66::2") == (0, 0, 0, 0)
