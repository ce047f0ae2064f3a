"""IPv6 inside the tunnel, end to end (issue 12, item 6; acceptance "IPv6 inner TCP both
ways"): jvpn-gateway with an inner IPv6 subnet and ``jvpn-tui --headless`` in two network
namespaces (tests/realnet.py), real TUNs on both sides.

docs/gateway.md and docs/client.md ("IPv6 inside the tunnel") are the spec: the client
gets its inner IPv6 address from the gateway's handshake, IPv6 is on (quietly: only the
inner address) on both TUNs, TCP and ICMPv6 flow both ways, and an inner packet whose
source is not the client's own address is dropped and counted (``inner_source_spoofed``).
Without an inner IPv6 subnet, IPv6 stays off on both TUNs. Needs root; skips otherwise.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from typing import Any

import pytest
from netns import read_line
from realnet import (
    CLIENT_INNER,
    CLIENT_INNER6,
    GATEWAY_INNER,
    GATEWAY_INNER6,
    START_TIMEOUT_S,
    TCP_RECV_CLIENT,
    TCP_SEND_SERVER,
    InnerTransfer,
    RealTunnel,
    drop_counts,
    expected_sha256,
    ns_socket,
    realnet,  # noqa: F401  (the fixture)
    wait_until,
)

pytestmark = pytest.mark.root

MiB = 1 << 20
IFA_F_NODAD = 0x02
SPOOF6 = "fd00:77::99"
"""In the client's inner subnet, but not the address the gateway gave the client."""
SPOOF4 = "10.77.0.99"


def ipv6_addresses(t: RealTunnel, ns: str, ifname: str) -> list[str]:
    ipr = t.topo.ipr(ns)
    index = ipr.link_lookup(ifname=ifname)
    if not index:
        return []
    return sorted(
        a.get_attr("IFA_ADDRESS")
        for a in ipr.get_addr(index=index[0])
        if a["family"] == socket.AF_INET6
    )


def ipv6_tunnel(realnet: Any) -> RealTunnel:  # noqa: F811
    t: RealTunnel = realnet(ipv6=True)
    wait_until(
        lambda: ipv6_addresses(t, t.topo.client_ns, t.client_tun) == [CLIENT_INNER6],
        START_TIMEOUT_S,
        "the client TUN's inner IPv6 address (from the gateway's handshake response)",
    )
    return t


def transfer(t: RealTunnel, server_ns: str, server_ip: str, client_ns: str, size: int) -> Any:
    """``size`` bytes over inner TCP from a server in ``server_ns`` (listening on
    ``server_ip``) to a receiver in ``client_ns`` that connects to it."""
    port = 5006
    server = t.helper(server_ns, TCP_SEND_SERVER, server_ip, str(port), str(size), "0")
    assert json.loads(read_line(server, START_TIMEOUT_S)) == {"ready": True}
    receiver = t.helper(client_ns, TCP_RECV_CLIENT, server_ip, str(port))
    return InnerTransfer(server, receiver).finish(90)


def sysctl(t: RealTunnel, ns: str, ifname: str, key: str) -> str:
    done = t.topo.run(ns, ["cat", f"/proc/sys/net/ipv6/conf/{ifname}/{key}"])
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_inner_ipv6_tcp_both_ways_and_ping(realnet) -> None:  # noqa: F811
    t = ipv6_tunnel(realnet)
    cns, gns = t.topo.client_ns, t.topo.gateway_ns
    # IPv6 on, quietly: each TUN holds its inner address and nothing else (no link-local)
    assert ipv6_addresses(t, gns, t.gateway_tun) == [GATEWAY_INNER6]
    assert sysctl(t, cns, t.client_tun, "disable_ipv6") == "0"
    assert t.gw_stderr is not None
    ready = [line for line in t.gw_stderr.lines if "listening on" in line]
    assert f"inner {t.gateway_tun} {GATEWAY_INNER}/24 {GATEWAY_INNER6}/64," in ready[0]

    ping = t.topo.run(cns, ["ping", "-6", "-c", "3", "-i", "0.2", "-W", "5", GATEWAY_INNER6], 30)
    assert ping.returncode == 0 and " 0% packet loss" in ping.stdout, ping.stdout + ping.stderr

    size = 4 * MiB
    down = transfer(t, gns, GATEWAY_INNER6, cns, size)  # client connects, gateway sends
    up = transfer(t, cns, CLIENT_INNER6, gns, size)  # gateway connects, client sends
    for result, peer in ((down, CLIENT_INNER6), (up, GATEWAY_INNER6)):
        assert result.sender["error"] is None and result.receiver["error"] is None, result
        assert result.sender["peer"] == peer
        assert result.receiver["received"] == size
        assert result.receiver["sha256"] == result.sender["sha256"] == expected_sha256(size)

    assert t.udp_echo(count=10) == [CLIENT_INNER] * 10  # IPv4 in the same session, as before
    drops = drop_counts(t.metrics())
    assert "inner_source_spoofed" not in drops and "ipv6_not_routed" not in drops, drops

    assert t.stop_client() == 0
    final = t.final()
    assert final["exit_code"] == 0 and final["traffic"]["rx_bytes"] >= size
    assert not t.client_tun_exists()


def test_a_spoofed_inner_source_is_dropped_and_counted(realnet) -> None:  # noqa: F811
    t = ipv6_tunnel(realnet)
    cns, gns = t.topo.client_ns, t.topo.gateway_ns
    ipr = t.topo.ipr(cns)
    index = ipr.link_lookup(ifname=t.client_tun)[0]
    # the client host holds more addresses on the TUN than the gateway gave it
    ipr.addr("add", index=index, address=SPOOF6, prefixlen=128, flags=IFA_F_NODAD)
    ipr.addr("add", index=index, address=SPOOF4, prefixlen=32)
    port, count = 7080, 5
    got: list[tuple[str, bytes]] = []
    with contextlib.ExitStack() as stack:
        receivers = []
        for family, address in ((socket.AF_INET6, GATEWAY_INNER6), (socket.AF_INET, GATEWAY_INNER)):
            rx = stack.enter_context(ns_socket(gns, family))
            rx.bind((address, port))
            rx.settimeout(0.2)
            receivers.append((rx, address))
        for family, src, dst in (
            (socket.AF_INET6, SPOOF6, GATEWAY_INNER6),
            (socket.AF_INET, SPOOF4, GATEWAY_INNER),
            (socket.AF_INET6, CLIENT_INNER6, GATEWAY_INNER6),
            (socket.AF_INET, CLIENT_INNER, GATEWAY_INNER),
        ):
            with ns_socket(cns, family) as tx:
                tx.bind((src, 0))
                for n in range(count):
                    tx.sendto(f"{src} {n}".encode(), (dst, port))
        deadline = time.monotonic() + 15
        while len(got) < 2 * count and time.monotonic() < deadline:
            for rx, _ in receivers:
                with contextlib.suppress(TimeoutError):
                    data, addr = rx.recvfrom(2048)
                    got.append((addr[0], data))
    # the genuine ones arrived (sent after the spoofed ones on the same path), no spoofed one
    assert sorted(src for src, _ in got) == sorted([CLIENT_INNER6] * count + [CLIENT_INNER] * count)
    wait_until(
        lambda: drop_counts(t.metrics()).get("inner_source_spoofed", 0) >= 2 * count,
        10,
        "the gateway's inner_source_spoofed count",
    )
    assert drop_counts(t.metrics())["inner_source_spoofed"] == 2 * count


def test_without_an_inner_ipv6_subnet_ipv6_stays_off_on_both_tuns(realnet) -> None:  # noqa: F811
    t: RealTunnel = realnet()
    assert sysctl(t, t.topo.client_ns, t.client_tun, "disable_ipv6") == "1"
    assert sysctl(t, t.topo.gateway_ns, t.gateway_tun, "disable_ipv6") == "1"
    assert ipv6_addresses(t, t.topo.client_ns, t.client_tun) == []
