"""``jvpn`` against a running client engine (docs/control.md).

Level 3: a real ClientEngine (two loopback paths, memory inner side) with its control
socket in the test's directory, talking to a real GatewaySessions on loopback
(tests/loopback_gateway.py); ``jvpn`` runs as a program. Asserted: the status text shows
the documented lines and the paths table, the JSON is the documented snapshot, ``jvpn
switch 2`` moves the session's traffic to path 2 (the gateway's binding moves, inner
traffic keeps flowing), a running ``jvpn watch`` shows that TRANSPORT_SWITCH, refusals
exit 1 and ``jvpn terminate`` stops the client.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from engine_watch import Watcher
from loopback_gateway import LoopbackGateway

from tunnel.client.config import ClientConfig, PathConfig
from tunnel.client.control import ControlSocket
from tunnel.client.engine import ClientEngine
from tunnel.core.handshake import generate_keypair
from tunnel.io.inner import MemoryInner

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "control.md"
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def jvpn(sock: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tunnel.cli", "--socket", str(sock), *args], cwd=REPO,
        capture_output=True, text=True, timeout=30, check=False, env=ENV,
    )  # fmt: skip


def wait_until(what: Callable[[], Any], timeout: float = 20.0, message: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = what()
        if result:
            return result
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {message or what}")


class Client:
    def __init__(self, gw: LoopbackGateway, engine: ClientEngine, sock: Path) -> None:
        self.gw = gw
        self.engine = engine
        self.sock = sock
        self.w = Watcher(engine, timeout=20.0)

    def ready(self) -> None:
        """ATTACHED on path 1 with both paths validated (a switch to 2 can be granted)."""
        self.w.wait(
            lambda: self.w.snapshot is not None and self.w.snapshot.session.state == "ATTACHED"
            and self.w.snapshot.session.active == 1
            and all(p.validated for p in self.w.snapshot.session.paths)
        )  # fmt: skip

    def gateway_binding_path(self) -> int | None:
        def read(sessions: Any) -> int | None:
            live = [s for s in sessions.sessions.values() if not s.machine.terminated]
            return live[0].binding_path if live else None

        return self.gw.call(read)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[Client]:
    private, public = generate_keypair()
    with LoopbackGateway(public) as gw:
        paths = tuple(PathConfig(i, f"lo{i}", ("127.0.0.1", 0), None, gw.address) for i in (1, 2))
        cfg = ClientConfig(private_key=private, gateway_public_key=gw.public_key, paths=paths)
        sock = tmp_path / "ctl" / "client.sock"
        engine = ClientEngine(
            cfg, inner=MemoryInner(rate_pps=50), control=ControlSocket(sock, required=True)
        )
        c = Client(gw, engine, sock)
        engine.start()
        try:
            c.ready()
            yield c
        finally:
            engine.stop()


def test_status_text_shows_the_session_and_the_paths_table(client: Client) -> None:
    proc = jvpn(client.sock, "status")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    snap = client.w.snapshot
    assert snap is not None
    lines = out.splitlines()
    assert lines[0] == f"client {snap.session.inner_address}"
    keys = [line.split(":", 1)[0].strip() for line in lines[1 : lines.index("")]]
    assert keys == [
        "session", "state", "binding epoch", "key phase", "cipher", "policy", "uptime",
        "switching", "traffic", "queue", "drops", "observability",
    ]  # fmt: skip
    assert re.search(rf"^  cipher: +{snap.session.cipher}$", out, re.M), out
    assert snap.session.cipher in ("aes-256-gcm", "chacha20-poly1305")
    assert re.search(rf"^  session: +{snap.session.session_id}$", out, re.M)
    assert re.search(r"^  state: +ATTACHED v\d+ \(gateway: ATTACHED v\d+\)$", out, re.M), out
    assert re.search(r"^  switching: +auto on, 0 switches, \d+ more allowed now$", out, re.M)
    assert re.search(r"^  traffic: +tx \d+ packets / [\d.]+ (B|KiB), rx \d+ packets", out, re.M)
    table = lines[lines.index("") + 1 :]
    assert table[0].split() == ["PATH", "LABEL", "ROLE", "VALIDATED", "SRTT", "LOSS", "SCORE"]
    rows = [row.split() for row in table[1:]]
    assert [r[0] for r in rows] == ["*1", "2"]  # * marks the active path
    assert [r[1] for r in rows] == ["lo1", "lo2"]
    assert rows[0][3] == "active" and rows[0][4] == "yes" and rows[0][6] == "ms"
    assert "\x1b[" not in out  # not a terminal: no colour


def test_status_json_is_the_documented_snapshot(client: Client) -> None:
    proc = jvpn(client.sock, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["role"] == "client"
    status = doc["status"]
    session = status["session"]
    assert session["state"] == "ATTACHED" and session["active"] == 1
    assert [p["stats"]["path_id"] for p in session["paths"]] == [1, 2]
    assert status["running"] is True and status["traffic"]["tx_packets"] > 0
    text = DOC.read_text(encoding="utf-8")
    names = set(status) | set(session) | set(status["traffic"]) | set(status["observability"])
    names |= {k for p in session["paths"] for k in p} | set(session["paths"][0]["stats"])
    undocumented = {n for n in names if f"`{n}`" not in text}
    assert not undocumented, f"not in docs/control.md: {sorted(undocumented)}"


def test_switch_2_moves_the_traffic_and_watch_shows_the_switch(client: Client) -> None:
    watch = subprocess.Popen(
        [sys.executable, "-m", "tunnel.cli", "--socket", str(client.sock), "watch"],
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(watch.stdout or ()), daemon=True)
    reader.start()
    try:
        # the history comes first: the watch is registered once the attach line is there
        wait_until(lambda: any("TRANSPORT_ATTACHED" in x for x in lines), message="history")
        assert client.gateway_binding_path() == 1
        proc = jvpn(client.sock, "switch", "2")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "switch to path 2 requested (the outcome is an event)\n"
        w = client.w
        w.wait(lambda: w.snapshot is not None and w.snapshot.session.active == 2)
        wait_until(lambda: client.gateway_binding_path() == 2, message="the gateway's binding")
        after = w.snapshot.traffic.rx_packets if w.snapshot else 0
        w.wait(lambda: w.snapshot is not None and w.snapshot.traffic.rx_packets >= after + 10)
        line = wait_until(
            lambda: next((x for x in lines if " TRANSPORT_SWITCH " in x), None), message="line"
        )
    finally:
        watch.terminate()
        watch.wait(10)
        reader.join(10)
    sid = client.w.snapshot.session.session_id if client.w.snapshot else "?"
    assert re.fullmatch(
        rf"\d\d:\d\d:\d\d\.\d{{3}}  {sid[:8]}  TRANSPORT_SWITCH +path 1 -> 2 "
        r"\(lo2 \(127\.0\.0\.1:\d+\)\): "
        r"manual_switch, [\d.]+ ms, epoch 2\n",
        line,
    ), line


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["switch", "7"], "no path 7 (this client's paths: 1, 2)"),
        (["terminate", "3fa2c1d0"], "a client has one session"),
    ],
)
def test_refusals_exit_1_and_change_nothing(client: Client, argv: list[str], says: str) -> None:
    proc = jvpn(client.sock, *argv)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"jvpn: refused: {says}"), proc.stderr
    assert len(proc.stderr.splitlines()) == 1
    assert client.w.snapshot is not None and client.w.snapshot.session.state == "ATTACHED"


def test_terminate_stops_the_client_and_the_socket_goes_away(client: Client) -> None:
    proc = jvpn(client.sock, "terminate")
    assert proc.returncode == 0, proc.stderr
    w = client.w
    w.wait(lambda: w.snapshot is not None and not w.snapshot.running)
    assert w.snapshot is not None and w.snapshot.final_reason == "operator_terminated"
    wait_until(lambda: not client.sock.exists(), message="the socket to go")
    after = jvpn(client.sock, "status")
    assert after.returncode == 3 and "no control socket" in after.stderr
