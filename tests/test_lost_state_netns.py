"""DESIGN D15c on the real programs (issue 9 item 3): a gateway with the memory store that
is killed (``kill -9``) and started again, or stopped (SIGTERM), and its client
(``jvpn-tui --headless``) in network namespaces (tests/realnet.py).

Asserted against docs/client.md ("When the gateway loses the session"): after a restart
the client gets a new session linked to the old one (SESSION_LINKED, the old one ended
``gateway_lost_state``) with the same inner addresses, and an inner TCP transfer opened
before the kill completes intact (checksummed); ``jvpn status`` names the new session.
SIGTERM tells the client ``gateway_shutdown``: it comes back when the gateway does, and
ends with that reason's exit code when it does not. With ``lost_state = "terminate"`` the
client ends with ``gateway_lost_state`` (its exit code). Needs root, namespaces and
/dev/net/tun; skips otherwise.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from exit_codes import documented_exit_code
from realnet import (
    CLIENT_INNER,
    CLIENT_INNER6,
    GATEWAY_PORT,
    Capture,
    RealTunnel,
    expected_sha256,
    ns_socket,
    policy_toml,
    realnet,  # noqa: F401  (the fixture)
    wait_until,
)

from tunnel.core.constants import MSG_HANDSHAKE_INIT

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def _kill_gateway(t: RealTunnel, sig: int) -> int:
    """Signal the gateway and wait until it is gone with its TUN; its exit status."""
    assert t.gateway is not None
    t.gateway.send_signal(sig)
    code = t.gateway.wait(20)
    ipr = t.topo.ipr(t.topo.gateway_ns)
    wait_until(lambda: not ipr.link_lookup(ifname=t.gateway_tun), 10, "the gateway TUN gone")
    return code


def _client_addresses(t: RealTunnel) -> set[str]:
    ipr = t.topo.ipr(t.topo.client_ns)
    (index,) = ipr.link_lookup(ifname=t.client_tun)
    return {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=index)}


def _status(t: RealTunnel) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "tunnel.cli", "--socket", str(t.client_socket), "status", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=30, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


def test_kill_9_and_restart_gives_a_linked_session_and_the_inner_tcp_survives(
    realnet,  # noqa: F811
) -> None:
    t: RealTunnel = realnet(ipv6=True)
    old = t.events.wait_type("SESSION_CREATED", 10)["session_id"]
    # the inner IPv6 address may be installed a moment after the session is created
    wanted = {CLIENT_INNER, CLIENT_INNER6}
    wait_until(lambda: wanted <= _client_addresses(t), 10, "the client's inner addresses")
    before = _client_addresses(t)
    tun_index = t.topo.ipr(t.topo.client_ns).link_lookup(ifname=t.client_tun)
    size = 6 * MiB
    transfer = t.start_download(size, rate=1.5 * MiB)  # about 4 s: the restart falls inside
    transfer.wait_progress(MiB, 30)
    mark = t.events.mark()
    assert _kill_gateway(t, signal.SIGKILL) == -signal.SIGKILL
    t.events.wait_for(lambda e: e.get("new_state") == "RECOVERING", 15, since=mark)
    t._start_gateway()  # the same configuration: memory store, nothing of the old sessions

    linked = t.events.wait_type("SESSION_LINKED", 30, since=mark)
    ended = t.events.of_type("SESSION_TERMINATED", mark)
    assert [(e["session_id"], e["reason_code"]) for e in ended] == [(old, "gateway_lost_state")]
    new = linked["session_id"]
    assert new != old and linked["previous_session_id"] == old
    assert linked["reason_code"] == "gateway_lost_state"
    assert (linked["inner_address"], linked["inner_address6"]) == (CLIENT_INNER, CLIENT_INNER6)
    assert t.client is not None and t.client.poll() is None  # the client never stopped
    assert t.gw_events is not None
    t.gw_events.wait_type("SESSION_LINKED", 10, previous_session_id=old)
    gw_stderr = t.gw_stderr
    assert gw_stderr is not None  # the console's started line names the old session
    wait_until(
        lambda: any(f"continues {old[:8]}" in line for line in gw_stderr.lines), 10, "console"
    )

    result = transfer.finish(90)
    assert result.sender["error"] is None and result.receiver["error"] is None
    assert result.receiver["received"] == size
    assert result.receiver["sha256"] == result.sender["sha256"] == expected_sha256(size)
    assert _client_addresses(t) == before  # the TUN (the same device) and its addresses stayed
    assert t.topo.ipr(t.topo.client_ns).link_lookup(ifname=t.client_tun) == tun_index
    assert _status(t)["status"]["session"]["session_id"] == new

    assert t.stop_client() == 0
    final = t.final()
    assert final["session_id"] == new and final["final_reason"] == "operator_terminated"


def test_sigterm_says_gateway_shutdown_and_a_restart_gets_the_client_back(
    realnet,  # noqa: F811
) -> None:
    t: RealTunnel = realnet()
    old = t.events.wait_type("SESSION_CREATED", 10)["session_id"]
    mark = t.events.mark()
    assert _kill_gateway(t, signal.SIGTERM) == 0
    assert t.gw_events is not None
    gone = t.gw_events.wait_type("SESSION_TERMINATED", 10)
    assert gone["reason_code"] == "gateway_shutdown"
    dead = t.events.wait_type("TRANSPORT_DEAD", 10, since=mark)
    assert dead["reason_code"] == "gateway_shutdown"
    t._start_gateway()
    linked = t.events.wait_type("SESSION_LINKED", 30, since=mark)
    assert linked["previous_session_id"] == old and linked["reason_code"] == "gateway_shutdown"
    ended = t.events.of_type("SESSION_TERMINATED", mark)
    assert [(e["session_id"], e["reason_code"]) for e in ended] == [(old, "gateway_shutdown")]
    assert t.udp_echo(count=10) == [CLIENT_INNER] * 10  # the new session carries traffic


def test_sigterm_without_restart_ends_the_client_with_gateway_shutdown(
    realnet,  # noqa: F811
) -> None:
    policy = policy_toml(
        session={"transport_lost_ttl_ms": 4_000},
        switching={"recovery_window_ms": 3_000},
    )
    t: RealTunnel = realnet(policy=policy)
    assert _kill_gateway(t, signal.SIGTERM) == 0
    assert t.client is not None
    code = t.client.wait(30)
    final = t.final()
    assert final["final_reason"] == "gateway_shutdown"
    assert code == final["exit_code"] == documented_exit_code("gateway_shutdown") != 0


def test_policy_terminate_ends_with_gateway_lost_state_after_a_restart(
    realnet,  # noqa: F811
) -> None:
    policy = policy_toml(switching={"lost_state": "terminate"})
    t: RealTunnel = realnet(policy=policy)
    mark = t.events.mark()
    assert _kill_gateway(t, signal.SIGKILL) == -signal.SIGKILL
    t.events.wait_for(lambda e: e.get("new_state") == "RECOVERING", 15, since=mark)
    t._start_gateway()
    assert t.client is not None
    code = t.client.wait(30)
    final = t.final()
    assert final["final_reason"] == "gateway_lost_state"
    assert code == final["exit_code"] == documented_exit_code("gateway_lost_state")
    assert not t.events.of_type("SESSION_LINKED")
    # the session the restarted gateway created to answer was ended by the client at once
    assert t.gw_events is not None
    t.gw_events.wait_type("SESSION_TERMINATED", 10, reason_code="gateway_lost_state")


def test_replaying_everything_the_client_sent_changes_nothing_after_the_new_session(
    realnet,  # noqa: F811
) -> None:
    """Every datagram the client sent on path A around a kill -9 and restart (the old
    session's traffic, its reattach requests, the INITs that asked for a new session) is
    sent again to the restarted gateway: the new session stays, on both sides; the
    replayed INITs are refused as fixation attempts (docs/client.md: nothing forged or
    replayed ends, replaces or re-keys a live session)."""
    t: RealTunnel = realnet()
    link = t.topo.paths[0]
    with Capture(t.topo.gateway_ns, link.gateway_ifname, GATEWAY_PORT) as cap:
        mark = t.events.mark()
        assert _kill_gateway(t, signal.SIGKILL) == -signal.SIGKILL
        t.events.wait_for(lambda e: e.get("new_state") == "RECOVERING", 15, since=mark)
        t._start_gateway()
        linked = t.events.wait_type("SESSION_LINKED", 30, since=mark)
        assert t.udp_echo(count=5) == [CLIENT_INNER] * 5
    sent = [p.payload for p in cap.packets if p.src[0] == link.client_ip]
    assert sum(data[0] == MSG_HANDSHAKE_INIT for data in sent) >= 1
    new = linked["session_id"]
    assert t.gw_events is not None
    gw_mark, mark = t.gw_events.mark(), t.events.mark()
    with ns_socket(t.topo.client_ns) as sock:
        sock.bind((t.topo.paths[1].client_ip, 0))
        for data in sent:
            sock.sendto(data, (t.topo.paths[1].gateway_ip, GATEWAY_PORT))
    t.gw_events.wait_type("SECURITY_EVENT", 10, since=gw_mark, violation_type="FIXATION_ATTEMPT")
    assert t.udp_echo(count=5, port=7071) == [CLIENT_INNER] * 5  # still carries traffic
    for kind in ("SESSION_CREATED", "SESSION_TERMINATED", "SESSION_LINKED"):
        assert not t.gw_events.of_type(kind, gw_mark), kind
        assert not t.events.of_type(kind, mark), kind
    assert _status(t)["status"]["session"]["session_id"] == new
