"""Kill switch and full tunnel, for real (issue 12 items 4 and 5; docs/client.md "Kill switch",
"Full tunnel"): ``jvpn-gateway`` and ``jvpn-tui --headless`` in throwaway namespaces
(tests/realnet.py), with an extra uplink where it matters.

Leak tests: the client namespace gets a dedicated *plain* uplink (``jvp-<tag>``, default
route) to the gateway namespace, where ``203.0.113.7`` lives on ``lo``; the tunnel routes
``203.0.113.0/24``. Without the tunnel a datagram to 203.0.113.7 leaves by the plain
uplink; a packet capture at the uplink's far end counts what left by it. "Nothing leaked"
is never a timeout: after the probes a marker datagram goes out by the same uplink (to the
peer's own address, not a tunnel route) and the capture must see it, so it has seen
everything sent before it. Each
test also shows the same probe DOES leave by that uplink once nothing holds it back, so the
capture cannot pass vacuously.

Full tunnel: the gateway listens on ``198.18.0.1`` (its ``lo``), reached from the client
only through routers: a default route via each path's veth (two uplinks, metrics 100/200).
Path A is bound to an address only (its datagrams follow the routing table: without the
exception ``0.0.0.0/1`` would send them into the TUN), path B to its device (without its own
exception the kill switch's unreachable route would refuse it).

Needs root, namespaces and /dev/net/tun (skips otherwise); everything is removed at the end.
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from exit_codes import EXIT_CODES
from netns import Topology, require_tun
from realnet import (
    CLIENT_INNER,
    GATEWAY_INNER,
    GATEWAY_PORT,
    START_TIMEOUT_S,
    UDP_ECHO_SOURCE,
    Capture,
    RealTunnel,
    ns_socket,
    policy_toml,
    program,
    read_line,
    stop_process,
    wait_until,
)

from tunnel.io.killswitch import (
    RTPROT_JVPN,
    Endpoint,
    KillSwitchError,
    RouteGuard,
    find_installed,
    release,
)

pytestmark = pytest.mark.root

FAR = "203.0.113.7"
"""A destination the tunnel routes (on the gateway namespace's lo)."""
FAR_ROUTE = "203.0.113.0/24"
PLAIN_CLIENT, PLAIN_PEER = "10.201.0.1", "10.201.0.2"
ENDPOINT = "198.18.0.1"
"""The full-tunnel test's gateway endpoint: not on any link of the client."""
PROBE_PORT = 7071
ECHO_PORT = 7070

TTL_POLICY = policy_toml(
    session={"transport_lost_ttl_ms": 3_000},
    switching={"recovery_window_ms": 1_500, "on_recovery_timeout": "degrade"},
)
"""Every path dead ends the session after 3 s (transport_ttl_exceeded): an abnormal end."""


class KillSwitchTunnel(RealTunnel):
    """A RealTunnel whose client config has ``tun_extra`` in [tun], plus a ``layout``:
    ``plain`` (the plain uplink and 203.0.113.7) or ``full`` (endpoint behind routers)."""

    def __init__(self, tmp: Path, *, tun_extra: str, layout: str, **kwargs: Any) -> None:
        super().__init__(tmp, **kwargs)
        self.tun_extra = tun_extra
        self.layout = layout
        self.plain_if = f"jvp-{self.tag}"
        self.plain_peer_if = f"jvq-{self.tag}"
        self.routes_before: set[tuple[Any, ...]] = set()

    def _write_files(self) -> None:
        super()._write_files()
        self._far_address()
        if self.layout == "plain":
            self._plain_uplink()
        else:
            self._routers()
        text = (self.tmp / "client.toml").read_text()
        head, sep, paths = text.partition("[[path]]")
        if self.layout == "full":
            paths = "".join(self._full_path(i) for i in range(self.n_paths))
            sep = ""
        (self.tmp / "client.toml").write_text(
            head.replace("[tun]\n", f"[tun]\n{self.tun_extra}\n") + sep + paths
        )

    def _ip(self, ns: str, *args: str) -> None:
        proc = self.topo.run(ns, ["ip", *args])
        assert proc.returncode == 0, (args, proc.stderr)

    def _far_address(self) -> None:
        self._ip(self.topo.gateway_ns, "addr", "add", f"{FAR}/32", "dev", "lo")

    def _plain_uplink(self) -> None:
        client, gateway = self.topo.ipr(self.topo.client_ns), self.topo.ipr(self.topo.gateway_ns)
        peer = self.plain_peer_if
        client.link(
            "add", ifname=self.plain_if, kind="veth",
            peer={"ifname": peer, "net_ns_fd": self.topo.gateway_ns},
        )  # fmt: skip
        for ipr, ifname, address in (
            (client, self.plain_if, PLAIN_CLIENT),
            (gateway, peer, PLAIN_PEER),
        ):
            index = ipr.link_lookup(ifname=ifname)[0]
            ipr.addr("add", index=index, address=address, prefixlen=24)
            ipr.link("set", index=index, state="up")
        self._ip(self.topo.client_ns, "route", "add", "default", "via", PLAIN_PEER)

    def _routers(self) -> None:
        self._ip(self.topo.gateway_ns, "addr", "add", f"{ENDPOINT}/32", "dev", "lo")
        gw = (self.tmp / "gateway.toml").read_text()
        (self.tmp / "gateway.toml").write_text(
            gw.replace(f'"0.0.0.0:{GATEWAY_PORT}"', f'"{ENDPOINT}:{GATEWAY_PORT}"')
        )
        for i, link in enumerate(self.topo.paths):
            self._ip(
                self.topo.client_ns, "route", "add", "default", "via", link.gateway_ip,
                "metric", str(100 * (i + 1)),
            )  # fmt: skip

    def _full_path(self, i: int) -> str:
        link = self.topo.paths[i]
        device = f'device = "{link.client_ifname}"\n' if i > 0 else ""  # path A: address only
        return (
            f'[[path]]\nname = "{"ABC"[i]}"\nbind = "{link.client_ip}"\n{device}'
            f'gateway = "{ENDPOINT}:{GATEWAY_PORT}"\n'
        )

    def start_client(self, wait_attached: bool = True) -> None:
        self.routes_before = self.routes()  # the namespace before the client touched it
        super().start_client(wait_attached)

    # -- observation ------------------------------------------------------------------------

    def gateway_link(self, i: int, state: str) -> None:
        """Path i's gateway-side veth up or down: every datagram on that path is lost."""
        ipr = self.topo.ipr(self.topo.gateway_ns)
        ipr.link(
            "set", index=ipr.link_lookup(ifname=self.topo.paths[i].gateway_ifname)[0], state=state
        )

    def routes(self) -> set[tuple[Any, ...]]:
        """The client namespace's main-table routes (both families), comparable."""
        ipr = self.topo.ipr(self.topo.client_ns)
        out = set()
        for family in (socket.AF_INET, socket.AF_INET6):
            for r in ipr.route("dump", family=family):
                if (r.get_attr("RTA_TABLE") or r["table"]) != 254:
                    continue
                out.add(
                    (family, r.get_attr("RTA_DST"), r["dst_len"], r["type"], r["proto"],
                     r.get_attr("RTA_GATEWAY"), r.get_attr("RTA_OIF"), r.get_attr("RTA_PRIORITY"))
                )  # fmt: skip
        return out

    def ours(self) -> list[str]:
        """The kill-switch routes and exceptions in the client namespace, as text."""
        return sorted(str(r) for r in find_installed(self.topo.client_ns))

    def echo_via(self, dst: str, count: int = 5) -> set[str]:
        """UDP to ``dst``:ECHO_PORT from the client namespace (no bind: the routing table
        decides); the source addresses the far end saw (the tunnel: the client's inner one)."""
        server = self.helper(self.topo.gateway_ns, UDP_ECHO_SOURCE, dst, str(ECHO_PORT))
        assert read_line(server, START_TIMEOUT_S) == "ready"
        seen: set[str] = set()
        try:
            with ns_socket(self.topo.client_ns) as sock:
                sock.settimeout(0.2)
                deadline = time.monotonic() + 15
                answered = 0
                while answered < count and time.monotonic() < deadline:
                    sock.sendto(b"hello", (dst, ECHO_PORT))
                    with contextlib.suppress(TimeoutError):
                        data, _ = sock.recvfrom(2048)
                        seen.add(data.decode().partition("|")[0])
                        answered += 1
        finally:
            stop_process(server)
        assert answered == count, f"{answered}/{count} echoes from {dst}"
        return seen

    def plain_capture(self) -> Capture:
        """What leaves by the plain uplink, captured where it arrives: the peer end in the
        gateway namespace (a packet socket bound to IPv4 sees a link's incoming packets)."""
        return Capture(self.topo.gateway_ns, self.plain_peer_if)

    def probe(self, capture: Capture, count: int = 20) -> tuple[int, int]:
        """Send ``count`` datagrams to FAR, then a marker by the plain uplink; once the
        capture has the marker: (probes the capture saw, sends the host refused)."""
        refused = 0
        marker = f"marker-{time.monotonic_ns()}".encode()
        with ns_socket(self.topo.client_ns) as sock:
            for n in range(count):
                try:
                    sock.sendto(b"probe %d" % n, (FAR, PROBE_PORT))
                except OSError:
                    refused += 1
            sock.sendto(marker, (PLAIN_PEER, PROBE_PORT))
        wait_until(
            lambda: any(p.payload == marker for p in capture.packets), 10, "the marker captured"
        )
        seen = [p for p in capture.packets if p.dst == (FAR, PROBE_PORT)]
        return len(seen), refused


@pytest.fixture
def tunnels(tmp_path: Path) -> Iterator[Callable[..., KillSwitchTunnel]]:
    require_tun()
    built: list[KillSwitchTunnel] = []

    def make(**kwargs: Any) -> KillSwitchTunnel:
        sub = tmp_path / f"t{len(built)}"
        sub.mkdir()
        tunnel = KillSwitchTunnel(sub, **kwargs)
        built.append(tunnel)
        tunnel.open()
        tunnel.start_client()
        return tunnel

    try:
        yield make
    finally:
        for tunnel in reversed(built):
            tunnel.close()


def _release(t: KillSwitchTunnel) -> str:
    argv = [*program("jvpn-tui", "jvpn_tui"), "--release-kill-switch"]
    proc = t.topo.run(t.topo.client_ns, argv, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# -- the kill switch -------------------------------------------------------------------------


def test_kill_switch_holds_while_paths_are_dead_and_after_the_abnormal_end(tunnels) -> None:
    t: KillSwitchTunnel = tunnels(
        tun_extra=f'routes = ["{FAR_ROUTE}"]\nkill_switch = true', layout="plain",
        policy=TTL_POLICY,
    )  # fmt: skip
    assert t.ours() == [f"unreachable {FAR_ROUTE} metric 1000000"]
    assert t.echo_via(FAR) == {CLIENT_INNER}  # ATTACHED: FAR's traffic takes the tunnel
    with t.plain_capture() as capture:
        mark = t.events.mark()
        for i in range(t.n_paths):
            t.gateway_link(i, "down")
        t.events.wait_type("STATE_CHANGE", 20, since=mark, new_state="RECOVERING")
        assert t.probe(capture)[0] == 0  # RECOVERING: held or dropped inside the tunnel

        code = t.client.wait(30)  # the session ends by itself: every path stayed dead
        assert code == EXIT_CODES["transport_ttl_exceeded"]
        assert not t.client_tun_exists()  # the TUN and its routes are gone ...
        assert t.ours() == [f"unreachable {FAR_ROUTE} metric 1000000"]  # ... this is not
        wait_until(lambda: t.client_stderr.closed, 10, "client stderr closed")
        notice = [line for line in t.client_stderr.lines if "kill switch" in line]
        assert len(notice) == 1 and notice[0].endswith("jvpn-tui --release-kill-switch"), (
            t.client_stderr.lines
        )
        seen, refused = t.probe(capture)
        assert seen == 0 and refused == 20  # the host refuses them: "No route to host"

        out = _release(t)
        assert out.splitlines() == [f"removed unreachable {FAR_ROUTE} metric 1000000"]
        assert t.ours() == []
        assert t.probe(capture) == (20, 0)  # released: the same probe leaves by the uplink
    assert _release(t).strip() == "no kill switch installed"  # idempotent


@pytest.mark.parametrize("kill_switch", [True, False], ids=["kill-switch", "no-kill-switch"])
def test_a_killed_client_leaves_the_kill_switch_and_only_it_stops_the_leak(
    tunnels, kill_switch: bool
) -> None:
    t: KillSwitchTunnel = tunnels(
        tun_extra=f'routes = ["{FAR_ROUTE}"]\nkill_switch = {str(kill_switch).lower()}',
        layout="plain",
    )
    assert t.echo_via(FAR) == {CLIENT_INNER}
    with t.plain_capture() as capture:
        t.client.send_signal(signal.SIGKILL)  # no clean-up at all: the process is gone
        t.client.wait(10)
        wait_until(lambda: not t.client_tun_exists(), 10, "the TUN gone with its process")
        seen, refused = t.probe(capture)
    if kill_switch:
        assert (seen, refused) == (0, 20)
        assert t.ours() == [f"unreachable {FAR_ROUTE} metric 1000000"]
    else:
        assert (seen, refused) == (20, 0)  # the leak the kill switch exists for
        assert t.ours() == []


def test_operator_stop_releases_the_kill_switch(tunnels) -> None:
    t: KillSwitchTunnel = tunnels(
        tun_extra=f'routes = ["{FAR_ROUTE}"]\nkill_switch = true', layout="plain"
    )
    assert t.ours() == [f"unreachable {FAR_ROUTE} metric 1000000"]
    assert t.stop_client(signal.SIGTERM) == EXIT_CODES["operator_terminated"]
    assert t.ours() == []
    assert not [line for line in t.client_stderr.lines if "kill switch" in line]


# -- full tunnel -------------------------------------------------------------------------------


def test_full_tunnel_keeps_every_path_on_its_uplink_and_is_undone_on_exit(tunnels) -> None:
    t: KillSwitchTunnel = tunnels(tun_extra='routes = ["0.0.0.0/0"]', layout="full")
    before = t.routes_before
    # both paths reach the gateway through their uplinks: A (address-bound, no device)
    # and B (device-bound) each answer probes
    for transport in (1, 2):
        t.events.wait_type("PATH_HEALTH", 20, transport_id=transport, alive=True)
    link = t.topo.paths
    assert t.ours() == [
        "exception 198.18.0.1/32 via 10.200.0.2 dev " + f"{link[0].client_ifname} metric 1",
        "exception 198.18.0.1/32 via 10.200.1.2 dev " + f"{link[1].client_ifname} metric 2",
        "unreachable 0.0.0.0/1 metric 1000000",  # the kill switch: on by default here
        "unreachable 128.0.0.0/1 metric 1000000",
    ]
    tun_index = t.topo.ipr(t.topo.client_ns).link_lookup(ifname=t.client_tun)[0]
    halves = {(r[1], r[2]) for r in t.routes() if r[6] == tun_index and r[2] == 1}
    assert halves == {("0.0.0.0", 1), ("128.0.0.0", 1)}
    assert {r for r in before if r[2] == 0} <= t.routes()  # the host's default routes stay

    # every destination, not only the inner subnet, goes through the tunnel
    assert t.echo_via(FAR) == {CLIENT_INNER}
    assert t.echo_via(GATEWAY_INNER) == {CLIENT_INNER}

    # the paths' own traffic still flows: the active path dies, the other takes over; it
    # comes back, the other dies, and the session moves back
    active = t.events.of_type("TRANSPORT_ATTACHED")[0]["transport_id"]
    for dying, taking_over in ((active, 3 - active), (3 - active, active)):
        mark = t.events.mark()
        t.gateway_link(dying - 1, "down")
        switch = t.events.wait_type("TRANSPORT_SWITCH", 20, since=mark, new_transport=taking_over)
        assert switch["previous_transport"] == dying
        wait_until(lambda: t.states(mark)[-1:] == ["ATTACHED"], 20, "ATTACHED again")  # noqa: B023
        assert t.echo_via(FAR) == {CLIENT_INNER}
        mark = t.events.mark()
        t.gateway_link(dying - 1, "up")
        t.events.wait_type("PATH_HEALTH", 20, since=mark, transport_id=dying, alive=True)

    assert t.stop_client(signal.SIGTERM) == EXIT_CODES["operator_terminated"]
    assert t.routes() == before  # everything undone: the table as it was
    assert not [r for r in t.routes() if r[4] == RTPROT_JVPN]


# -- the guard itself: re-resolution, refusal, taking over an old kill switch -------------------


def test_guard_excepts_a_re_resolved_endpoint_refuses_a_capture_and_takes_over() -> None:
    require_tun()
    with Topology(n_paths=2) as topo:
        ns, (a, b) = topo.client_ns, topo.paths
        ipr = topo.ipr(ns)
        for metric, link in ((100, a), (200, b)):  # two uplinks, each with its router
            ipr.route("add", dst="0.0.0.0", dst_len=0, gateway=link.gateway_ip, priority=metric)

        def text() -> list[str]:
            return sorted(str(r) for r in find_installed(ns))

        first = RouteGuard(["0.0.0.0/0"], kill_switch=True, netns=ns)
        first.install([Endpoint(1, ENDPOINT), Endpoint(2, ENDPOINT, b.client_ifname)])
        # a gateway name now resolves elsewhere: the path's next hop carries it too
        added = first.except_endpoint(1, "198.18.0.9")
        assert (
            str(added)
            == f"exception 198.18.0.9/32 via {a.gateway_ip} dev {a.client_ifname} metric 1"
        )
        assert first.except_endpoint(2, "198.18.0.9") is not None
        assert len(text()) == 6
        # a host route for the new address: no exception possible, said, nothing added
        hostile = RouteGuard(["0.0.0.0/0", "198.18.0.5/32"], kill_switch=True, netns=ns)
        with pytest.raises(
            KillSwitchError, match=re.escape("198.18.0.5/32 would send path 1's gateway")
        ):
            hostile.except_endpoint(1, "198.18.0.5")
        with pytest.raises(KillSwitchError, match="no room for the exception"):
            hostile.install([Endpoint(1, "198.18.0.5")])
        assert len(text()) == 6
        assert first.finish(on_purpose=False) is not None  # an abnormal end: it stays
        assert len(text()) == 6

        # the next start (path B's endpoint changed) takes the old kill switch over; B's
        # next hop is its uplink's router, not the "on-link" the old unreachable route
        # would have made of it
        second = RouteGuard(["0.0.0.0/0"], kill_switch=True, netns=ns)
        second.install([Endpoint(1, ENDPOINT), Endpoint(2, "198.18.0.2", b.client_ifname)])
        assert text() == [
            f"exception 198.18.0.1/32 via {a.gateway_ip} dev {a.client_ifname} metric 1",
            f"exception 198.18.0.2/32 via {b.gateway_ip} dev {b.client_ifname} metric 2",
            "unreachable 0.0.0.0/1 metric 1000000",
            "unreachable 128.0.0.0/1 metric 1000000",
        ]
        assert second.finish(on_purpose=True) is None
        assert text() == [] and release(ns) == []
