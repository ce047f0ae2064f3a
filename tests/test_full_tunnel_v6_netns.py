"""Full tunnel and kill switch over IPv6 (issue 12 items 4-6 together; docs/client.md
"Kill switch", "Full tunnel", "IPv6 inside the tunnel"): ``jvpn-gateway`` with an inner
IPv6 subnet and ``jvpn-tui --headless`` in throwaway namespaces, on the rig of
tests/test_killswitch_netns.py with IPv6 added to it.

Full tunnel: the gateway listens on ``2001:db8:18::1`` (its ``lo``), reached from the
client only through IPv6 routers (an IPv6 default route via each path's veth, metrics
100/200, path B's router known by its link-local address); both paths' endpoints are IPv6,
path A bound to an address only, path B to its device. ``routes = ["0.0.0.0/0", "::/0"]``:
four halves on the TUN, one IPv6 exception per path, inner IPv6 TCP to ``fd00:203::7`` (on
the gateway's ``lo``, outside the inner subnet, in the other half than the endpoint)
through the tunnel, both routing tables as they were after the exit.

Leak tests: the plain uplink of the IPv4 tests gets IPv6 too (an IPv6 default route to the
gateway namespace, where ``2001:db8:203::7`` lives on ``lo``); an IPv6 packet capture at
its far end counts what left by it, with the same marker rule (an IPv6 marker datagram to
the peer's own address after the probes) and the same proof that the probe does leave once
nothing holds it back.

Needs root, namespaces and /dev/net/tun (skips otherwise); everything is removed at the end.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from exit_codes import EXIT_CODES
from netns import read_line, require_tun
from realnet import (
    CLIENT_INNER,
    CLIENT_INNER6,
    GATEWAY_PORT,
    START_TIMEOUT_S,
    TCP_RECV_CLIENT,
    TCP_SEND_SERVER,
    Capture,
    InnerTransfer,
    ns_socket,
    stop_process,
    wait_until,
)
from test_killswitch_netns import (
    ENDPOINT,
    FAR,
    FAR_ROUTE,
    PROBE_PORT,
    TTL_POLICY,
    KillSwitchTunnel,
    _release,
)

from tunnel.io.killswitch import RTPROT_JVPN

pytestmark = pytest.mark.root

MiB = 1 << 20
IFA_F_NODAD = 0x02
IFA_F_TENTATIVE = 0x40
ENDPOINT6 = "2001:db8:18::1"
"""The full-tunnel gateway endpoint (in ``::/1``): on no link of the client."""
INNER_FAR6 = "fd00:203::7"
"""A full-tunnel destination outside the inner subnet (in ``8000::/1``)."""
FAR6 = "2001:db8:203::7"
FAR6_ROUTE = "2001:db8:203::/48"
"""A destination the leak tests' tunnel routes (on the gateway namespace's lo)."""
PLAIN_CLIENT6, PLAIN_PEER6 = "fd00:201::1", "fd00:201::2"
ECHO_PORT = 7070
HALF = "metric 1000000"

UDP6_ECHO_SOURCE = r"""
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    data, addr = s.recvfrom(65535)
    s.sendto(addr[0].encode() + b"|" + data, addr)
"""
"""IPv6 UDP echo on argv[1]:argv[2] that prefixes each reply with the source it saw."""


def path6(i: int, side: int) -> str:
    """Path i's IPv6 address on the client (side 1) or gateway (side 2) veth."""
    return f"fd00:200:{i}::{side}"


def text6(address: str) -> str:
    """An IPv6 address as the kernel (and a KillSwitchRoute) writes it."""
    return str(ipaddress.IPv6Address(address))


class V6Tunnel(KillSwitchTunnel):
    """The kill-switch rig with IPv6: the ``plain`` uplink gets an IPv6 default route; the
    ``full`` layout puts the gateway on ENDPOINT6 behind IPv6 routers (path A's by a global
    address, path B's by its link-local one)."""

    def __init__(self, tmp: Path, **kwargs: Any) -> None:
        super().__init__(tmp, **kwargs)
        self.routers6: list[str] = []
        """The IPv6 next hop of each path's default route (``full`` layout)."""

    def _addr6(self, ns: str, ifname: str, address: str, prefixlen: int) -> None:
        ipr = self.topo.ipr(ns)
        index = ipr.link_lookup(ifname=ifname)[0]
        ipr.addr("add", index=index, address=address, prefixlen=prefixlen, flags=IFA_F_NODAD)

    def _far_address(self) -> None:
        super()._far_address()
        for far in (FAR6, INNER_FAR6):
            self._addr6(self.topo.gateway_ns, "lo", far, 128)

    def _plain_uplink(self) -> None:
        super()._plain_uplink()
        self._addr6(self.topo.client_ns, self.plain_if, PLAIN_CLIENT6, 64)
        self._addr6(self.topo.gateway_ns, self.plain_peer_if, PLAIN_PEER6, 64)
        self._ip(self.topo.client_ns, "-6", "route", "add", "default", "via", PLAIN_PEER6)

    def _routers(self) -> None:
        super()._routers()  # the IPv4 routers too: the IPv4 halves go on the TUN as well
        self._addr6(self.topo.gateway_ns, "lo", ENDPOINT6, 128)
        gw = (self.tmp / "gateway.toml").read_text()
        listen = f'"[{ENDPOINT6}]:{GATEWAY_PORT}"'
        v4 = f'"{ENDPOINT}:{GATEWAY_PORT}"'  # where the base layout put it
        (self.tmp / "gateway.toml").write_text(gw.replace(v4, listen))
        for i, link in enumerate(self.topo.paths):
            self._addr6(self.topo.client_ns, link.client_ifname, path6(i, 1), 64)
            self._addr6(self.topo.gateway_ns, link.gateway_ifname, path6(i, 2), 64)
            self.routers6.append(path6(i, 2) if i == 0 else self._link_local(i))
            self._ip(
                self.topo.client_ns, "-6", "route", "add", "default", "via", self.routers6[i],
                "dev", link.client_ifname, "metric", str(100 * (i + 1)),
            )  # fmt: skip

    def _link_local(self, i: int) -> str:
        """The gateway-side veth's link-local address, once usable (DAD done): path B's
        router is known by it, as an IPv6 router usually is (from its advertisements)."""
        ipr = self.topo.ipr(self.topo.gateway_ns)
        index = ipr.link_lookup(ifname=self.topo.paths[i].gateway_ifname)[0]

        def usable() -> list[str]:
            return [
                a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=index, family=socket.AF_INET6)
                if a.get_attr("IFA_ADDRESS").startswith("fe80:")
                and not (a.get_attr("IFA_FLAGS") or a["flags"]) & IFA_F_TENTATIVE
            ]  # fmt: skip

        wait_until(lambda: bool(usable()), 10, "the router's link-local address")
        return usable()[0]

    def _full_path(self, i: int) -> str:
        device = f'device = "{self.topo.paths[i].client_ifname}"\n' if i > 0 else ""
        return (
            f'[[path]]\nname = "{"ABC"[i]}"\nbind = "[{path6(i, 1)}]"\n{device}'
            f'gateway = "[{ENDPOINT6}]:{GATEWAY_PORT}"\n'
        )

    # -- observation ------------------------------------------------------------------------

    def tun_halves(self) -> set[tuple[str, int]]:
        """The /1 routes through the client's TUN, both families."""
        index = self.topo.ipr(self.topo.client_ns).link_lookup(ifname=self.client_tun)
        return {(r[1], r[2]) for r in self.routes() if index and r[6] == index[0] and r[2] == 1}

    def tun_routes_to(self, cidr: str) -> bool:
        net = ipaddress.ip_network(cidr)
        index = self.topo.ipr(self.topo.client_ns).link_lookup(ifname=self.client_tun)
        return any(
            index and r[6] == index[0] and r[2] == net.prefixlen
            and r[1] is not None and ipaddress.ip_address(r[1]) == net.network_address
            for r in self.routes()
        )  # fmt: skip

    def echo6_via(self, dst: str, count: int = 5) -> set[str]:
        """IPv6 UDP to ``dst``:ECHO_PORT from the client namespace (no bind: the routing
        table decides); the sources the far end saw (the tunnel: the client's inner one)."""
        server = self.helper(self.topo.gateway_ns, UDP6_ECHO_SOURCE, dst, str(ECHO_PORT))
        assert read_line(server, START_TIMEOUT_S) == "ready"
        seen: set[str] = set()
        answered = 0
        try:
            with ns_socket(self.topo.client_ns, socket.AF_INET6) as sock:
                sock.settimeout(0.2)
                deadline = time.monotonic() + 15
                while answered < count and time.monotonic() < deadline:
                    sock.sendto(b"hello", (dst, ECHO_PORT))
                    with contextlib.suppress(TimeoutError):
                        data, _ = sock.recvfrom(2048)
                        seen.add(data.decode().partition("|")[0])
                        answered += 1
        finally:
            stop_process(server)
        assert answered == count, f"{answered}/{count} IPv6 echoes from {dst}"
        return seen

    def tcp6_to(self, dst: str, size: int = MiB) -> dict[str, Any]:
        """``size`` bytes of inner TCP from a server on ``dst`` (gateway namespace) to a
        receiver in the client namespace; the server's report (``peer``: who connected)."""
        port = 5007
        server = self.helper(self.topo.gateway_ns, TCP_SEND_SERVER, dst, str(port), str(size), "0")
        assert json.loads(read_line(server, START_TIMEOUT_S)) == {"ready": True}
        receiver = self.helper(self.topo.client_ns, TCP_RECV_CLIENT, dst, str(port))
        result = InnerTransfer(server, receiver).finish(90)
        assert result.sender["error"] is None and result.receiver["error"] is None, result
        assert result.receiver["received"] == size
        assert result.receiver["sha256"] == result.sender["sha256"]
        return result.sender

    def plain_capture6(self) -> Capture:
        """IPv6 leaving by the plain uplink, captured where it arrives (its peer end)."""
        return Capture(self.topo.gateway_ns, self.plain_peer_if, ethertype=Capture.ETH_P_IPV6)

    def probe6(self, capture: Capture, count: int = 20) -> tuple[int, int]:
        """Send ``count`` IPv6 datagrams to FAR6, then an IPv6 marker by the plain uplink;
        once the capture has the marker: (probes it saw, sends the host refused)."""
        refused = 0
        marker = f"marker-{time.monotonic_ns()}".encode()
        with ns_socket(self.topo.client_ns, socket.AF_INET6) as sock:
            for n in range(count):
                try:
                    sock.sendto(b"probe %d" % n, (FAR6, PROBE_PORT))
                except OSError:
                    refused += 1
            sock.sendto(marker, (PLAIN_PEER6, PROBE_PORT))
        wait_until(
            lambda: any(p.payload == marker for p in capture.packets), 10, "the marker captured"
        )
        seen = [p for p in capture.packets if p.dst == (FAR6, PROBE_PORT)]
        return len(seen), refused


@pytest.fixture
def tunnels6(tmp_path: Path) -> Iterator[Callable[..., V6Tunnel]]:
    require_tun()
    built: list[V6Tunnel] = []

    def make(**kwargs: Any) -> V6Tunnel:
        sub = tmp_path / f"t{len(built)}"
        sub.mkdir()
        tunnel = V6Tunnel(sub, **kwargs)
        built.append(tunnel)
        tunnel.open()
        tunnel.start_client()
        return tunnel

    try:
        yield make
    finally:
        for tunnel in reversed(built):
            tunnel.close()


# -- full tunnel over IPv6 ---------------------------------------------------------------------


def test_full_tunnel_over_ipv6_endpoints_carries_ipv6_and_is_undone_on_exit(tunnels6) -> None:
    t: V6Tunnel = tunnels6(tun_extra='routes = ["0.0.0.0/0", "::/0"]', layout="full", ipv6=True)
    before = t.routes_before
    for transport in (1, 2):  # each path reaches the gateway by its own IPv6 uplink
        t.events.wait_type("PATH_HEALTH", 20, transport_id=transport, alive=True)
    link = t.topo.paths
    assert t.ours() == sorted([
        f"exception {ENDPOINT6}/128 via {text6(path6(0, 2))} dev {link[0].client_ifname} "
        "metric 1",
        f"exception {ENDPOINT6}/128 via {t.routers6[1]} dev {link[1].client_ifname} metric 2",
        f"unreachable 0.0.0.0/1 {HALF}", f"unreachable 128.0.0.0/1 {HALF}",
        f"unreachable ::/1 {HALF}", f"unreachable 8000::/1 {HALF}",
    ])  # fmt: skip
    wait_until(lambda: ("::", 1) in t.tun_halves(), START_TIMEOUT_S, "the IPv6 halves on the TUN")
    assert t.tun_halves() == {("0.0.0.0", 1), ("128.0.0.0", 1), ("::", 1), ("8000::", 1)}
    assert {r for r in before if r[2] == 0} <= t.routes()  # the host's defaults (both) stay

    # every destination goes through the tunnel, IPv6 as IPv4
    assert t.tcp6_to(INNER_FAR6)["peer"] == CLIENT_INNER6
    assert t.echo6_via(FAR6) == {CLIENT_INNER6}
    assert t.echo_via(FAR) == {CLIENT_INNER}

    # the other path's exception carries the session when the active path dies
    active = t.events.of_type("TRANSPORT_ATTACHED")[0]["transport_id"]
    mark = t.events.mark()
    t.gateway_link(active - 1, "down")
    t.events.wait_type("TRANSPORT_SWITCH", 20, since=mark, new_transport=3 - active)
    wait_until(lambda: t.states(mark)[-1:] == ["ATTACHED"], 20, "ATTACHED again")
    assert t.echo6_via(INNER_FAR6) == {CLIENT_INNER6}

    assert t.stop_client(signal.SIGTERM) == EXIT_CODES["operator_terminated"]
    assert t.routes() == before  # IPv4 and IPv6 tables as they were
    assert not [r for r in t.routes() if r[4] == RTPROT_JVPN]


# -- the kill switch for IPv6 ----------------------------------------------------------------


def test_ipv6_kill_switch_holds_while_paths_are_dead_and_after_the_abnormal_end(tunnels6) -> None:
    t: V6Tunnel = tunnels6(
        tun_extra=f'routes = ["{FAR_ROUTE}", "{FAR6_ROUTE}"]\nkill_switch = true',
        layout="plain", policy=TTL_POLICY, ipv6=True,
    )  # fmt: skip
    ks = sorted([f"unreachable {FAR_ROUTE} {HALF}", f"unreachable {FAR6_ROUTE} {HALF}"])
    assert t.ours() == ks
    wait_until(lambda: t.tun_routes_to(FAR6_ROUTE), START_TIMEOUT_S, "the IPv6 route on the TUN")
    assert t.echo6_via(FAR6) == {CLIENT_INNER6}  # ATTACHED: FAR6's traffic takes the tunnel
    with t.plain_capture6() as capture:
        mark = t.events.mark()
        for i in range(t.n_paths):
            t.gateway_link(i, "down")
        t.events.wait_type("STATE_CHANGE", 20, since=mark, new_state="RECOVERING")
        assert t.probe6(capture)[0] == 0  # RECOVERING: held or dropped inside the tunnel

        assert t.client.wait(30) == EXIT_CODES["transport_ttl_exceeded"]  # an abnormal end
        assert not t.client_tun_exists()
        assert t.ours() == ks
        assert t.probe6(capture) == (0, 20)  # refused on this host, none left

        assert len(_release(t).splitlines()) == 2
        assert t.probe6(capture) == (20, 0)  # released: the same probe leaves by the uplink


@pytest.mark.parametrize("kill_switch", [True, False], ids=["kill-switch", "no-kill-switch"])
def test_a_session_without_ipv6_keeps_ipv6_off_the_plain_network_only_with_the_kill_switch(
    tunnels6, kill_switch: bool
) -> None:
    """The gateway has no inner IPv6 subnet: the TUN never gets IPv6 routes, so ``::/0``'s
    traffic has no tunnel to enter. The kill switch's unreachable halves refuse it; without
    a kill switch it takes the plain network (docs/client.md, "Full tunnel")."""
    t: V6Tunnel = tunnels6(
        tun_extra=f'routes = ["0.0.0.0/0", "::/0"]\nkill_switch = {str(kill_switch).lower()}',
        layout="plain", ipv6=False,
    )  # fmt: skip
    assert t.echo_via(FAR) == {CLIENT_INNER}  # IPv4 takes the tunnel
    assert not [h for h in t.tun_halves() if ":" in h[0]]  # no IPv6 route on the TUN
    with t.plain_capture6() as capture:
        seen, refused = t.probe6(capture)
    if kill_switch:
        assert f"unreachable ::/1 {HALF}" in t.ours()
        assert (seen, refused) == (0, 20)
    else:
        assert not [r for r in t.ours() if r.startswith("unreachable")]
        assert (seen, refused) == (20, 0)  # the leak the kill switch exists for
