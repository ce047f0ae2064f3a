"""``jvpn`` against the real programs in namespaces (issue 12, acceptance: status of a
client and of a gateway, text and JSON, fields documented).

``jvpn-gateway`` and ``jvpn-tui --headless`` run for real (tests/realnet.py: real TUNs,
veth paths); ``jvpn`` talks to their control sockets from the host (a unix socket is a
file: no namespace needed). Asserted: both statuses name the same session, epoch and
policy; the gateway's row shows the client's path and address on the gateway's veth;
every JSON field is in docs/control.md; ``jvpn switch 2`` moves the session (the
gateway's status shows path 2 active); ``jvpn --gateway watch`` showed the switch; and
``jvpn --gateway terminate`` ends the client with exit 0 (operator_terminated).
Needs root, namespaces and /dev/net/tun; skips otherwise.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from realnet import (
    CLIENT_INNER,
    RealTunnel,
    realnet,  # noqa: F401  (the fixture)
    wait_until,
)

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[1]
DOC = (REPO / "docs" / "control.md").read_text(encoding="utf-8")
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def jvpn(sock: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tunnel.cli", "--socket", str(sock), *args], cwd=REPO,
        capture_output=True, text=True, timeout=30, check=False, env=ENV,
    )  # fmt: skip


def status(sock: Path) -> dict[str, Any]:
    proc = jvpn(sock, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


def keys(value: Any) -> set[str]:
    """Every key of a JSON document, nested."""
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in keys(v)}
    if isinstance(value, list):
        return {k for v in value for k in keys(v)}
    return set()


def test_status_switch_watch_and_terminate_on_the_real_programs(realnet) -> None:  # noqa: F811
    t: RealTunnel = realnet()
    sid = t.events.wait_type("SESSION_CREATED", 10)["session_id"]
    wait_until(
        lambda: all(p["validated"] for p in status(t.client_socket)["status"]["session"]["paths"]),
        20, "both paths validated",
    )  # fmt: skip

    client = status(t.client_socket)
    gateway = status(t.gateway_socket)
    assert (client["role"], gateway["role"]) == ("client", "gateway")
    c, g = client["status"]["session"], gateway["status"]
    (row,) = [s for s in g["sessions"] if s["state"] != "TERMINATED"]
    assert c["session_id"] == row["session_id"] == sid
    assert c["inner_address"] == row["inner_address"] == CLIENT_INNER
    assert c["binding_epoch"] == row["binding_epoch"] and c["key_phase"] == row["key_phase"]
    assert c["policy_version"] == row["policy_version"] == g["policy_version"]
    assert row["owner"] == g["node_id"] == f"gw-{t.tag}"
    assert row["active_path"] == c["active"] == 1
    active = [p for p in row["paths"] if p["active"]]
    assert active[0]["address"].startswith(f"{t.topo.paths[0].client_ip}:")
    assert {p["address"].split(":")[0] for p in row["paths"]} == {
        t.topo.paths[0].client_ip,
        t.topo.paths[1].client_ip,
    }  # fmt: skip  (the standby path is validated at the gateway too)
    undocumented = {k for k in keys(client) | keys(gateway) if f"`{k}`" not in DOC}
    assert not undocumented, f"not in docs/control.md: {sorted(undocumented)}"

    text = jvpn(t.client_socket, "status").stdout
    assert text.startswith(f"client {CLIENT_INNER}\n  session:       {sid}\n"), text
    assert re.search(r"^ +\*1 +A +", text, re.M) and re.search(r"^ +2 +B +", text, re.M), text
    gtext = jvpn(t.gateway_socket, "status").stdout
    assert gtext.startswith(f"gateway gw-{t.tag}\n"), gtext
    assert re.search(
        rf"^  {sid[:8]}  client  {re.escape(CLIENT_INNER)}  ATTACHED v\d+ .* 1 +"
        rf"{re.escape(t.topo.paths[0].client_ip)}:\d+ ", gtext, re.M,
    ), gtext  # fmt: skip

    watch = subprocess.Popen(
        [sys.executable, "-m", "tunnel.cli", "--socket", str(t.gateway_socket), "watch"],
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(watch.stdout or ()), daemon=True)
    reader.start()
    try:
        wait_until(lambda: any("SESSION_CREATED" in x for x in lines), 20, "the watch history")
        since = t.events.mark()
        proc = jvpn(t.client_socket, "switch", "2")
        assert proc.returncode == 0, proc.stderr
        switched = t.events.wait_type("TRANSPORT_SWITCH", 20)
        assert switched["new_transport"] == 2 and switched["reason_code"] == "manual_switch"
        assert t.switches(since)
        wait_until(
            lambda: [s["active_path"] for s in status(t.gateway_socket)["status"]["sessions"]
                     if s["state"] != "TERMINATED"] == [2],
            20, "the gateway's binding on path 2",
        )  # fmt: skip
        wait_until(lambda: any(" TRANSPORT_SWITCH " in x for x in lines), 20, "the line")
        line = next(x for x in lines if " TRANSPORT_SWITCH " in x)
        b = re.escape(t.topo.paths[1].client_ip)
        assert re.search(
            rf"  {sid[:8]}  TRANSPORT_SWITCH +path 1 -> 2 \({b}:\d+\): manual_switch, "
            r"[\d.]+ ms, epoch \d+$", line.rstrip("\n"),
        ), line  # fmt: skip

        done = jvpn(t.gateway_socket, "terminate", sid[:8])
        assert done.returncode == 0, done.stderr
        final = t.final(20)  # the client ends by itself: the gateway told it
        assert final["final_reason"] == "operator_terminated" and final["exit_code"] == 0
        assert t.client is not None and t.client.wait(20) == 0
        assert not t.client_socket.exists()
    finally:
        watch.terminate()
        watch.wait(10)
        reader.join(10)
