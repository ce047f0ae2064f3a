"""The link monitor on real links (issue 10 item 3): network namespaces, root.

``test_monitor_*`` run :class:`tunnel.client.netmon.NetlinkMonitor` alone inside a client
namespace (a small program prints what it reports) while the test changes links, carrier,
addresses and routes with pyroute2. ``test_link_down_*`` run both programs
(tests/realnet.py) with ``dead_min_ms = 5000``: a path that dies by silence is declared
dead after 5 s at the earliest, so a death with the reason ``link_down`` can only be the
monitor's doing. Nothing here asserts a duration.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from netns import Topology, read_line, require_netns
from realnet import (
    RealTunnel,
    policy_toml,
    realnet,  # noqa: F401  (the fixture)
)

pytestmark = pytest.mark.root

A, B = 1, 2
"""Transport ids of the first two paths."""

SLOW_DEATH = policy_toml(volatility={"loss_volatile_threshold": 0.2, "dead_min_ms": 5_000})
"""Silence must last 5 s before a path is declared dead."""

WAIT_S = 30.0
"""Generous bound for waiting on an event (a loaded machine): not a timing claim."""

MONITOR = r"""
import asyncio, json, sys
from tunnel.client.netmon import NetlinkMonitor, WatchedPath
spec = json.loads(sys.argv[1])
def say(**kw):
    print(json.dumps(kw), flush=True)
paths = [WatchedPath(i + 1, p["device"], p["bind"], (lambda g=p["gateway"]: g))
         for i, p in enumerate(spec)]
monitor = NetlinkMonitor(
    paths,
    on_down=lambda pid, detail: say(kind="down", path=pid, detail=detail),
    on_up=lambda pid, detail: say(kind="up", path=pid, detail=detail),
    report=lambda reason, detail: say(kind="report", reason=str(reason), detail=detail),
)
loop = asyncio.new_event_loop()
monitor.start(loop)
say(kind="ready", running=monitor.running, down=sorted(monitor.down))
loop.run_forever()
"""
"""Run the monitor over the topology's paths; one JSON line per report."""


class Reports:
    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc

    def next(self) -> dict[str, Any]:
        line = json.loads(read_line(self.proc, WAIT_S))
        assert isinstance(line, dict)
        return line


def _start(topo: Topology, pinned: bool = True) -> Reports:
    """The monitor over the topology's paths: each bound to its client address and, when
    ``pinned``, to its client veth (``device``)."""
    spec = [
        {"device": p.client_ifname if pinned else None, "bind": p.client_ip,
         "gateway": p.gateway_ip}
        for p in topo.paths
    ]  # fmt: skip
    return Reports(topo.python(topo.client_ns, MONITOR, json.dumps(spec)))


@pytest.fixture
def watched() -> Iterator[tuple[Topology, Reports]]:
    require_netns()
    with Topology(2) as topo:
        reports = _start(topo)
        ready = reports.next()
        assert ready == {"kind": "ready", "running": True, "down": []}
        yield topo, reports


def _client_index(topo: Topology, i: int) -> int:
    ipr = topo.ipr(topo.client_ns)
    return int(ipr.link_lookup(ifname=topo.paths[i].client_ifname)[0])


def test_monitor_reports_link_down_and_up(watched: tuple[Topology, Reports]) -> None:
    topo, reports = watched
    name = topo.paths[0].client_ifname
    topo.link_down(0)
    down = reports.next()
    assert (down["kind"], down["path"]) == ("down", A)
    assert down["detail"].startswith(f"{name}: link down")
    assert f"RTM_NEWLINK {name} down" in down["detail"]  # the kernel's message, quoted
    topo.link_up(0)
    up = reports.next()
    assert (up["kind"], up["path"]) == ("up", A)
    assert name in up["detail"] and "usable again" in up["detail"]


def test_monitor_reports_carrier_lost_when_the_peer_goes_down(
    watched: tuple[Topology, Reports],
) -> None:
    topo, reports = watched
    gw = topo.ipr(topo.gateway_ns)
    peer = gw.link_lookup(ifname=topo.paths[1].gateway_ifname)[0]
    gw.link("set", index=peer, state="down")
    down = reports.next()
    assert (down["kind"], down["path"]) == ("down", B)
    assert down["detail"].startswith(f"{topo.paths[1].client_ifname}: carrier lost")
    gw.link("set", index=peer, state="up")
    up = reports.next()
    assert (up["kind"], up["path"]) == ("up", B)


def test_monitor_reports_the_address_gone_and_back(watched: tuple[Topology, Reports]) -> None:
    topo, reports = watched
    ipr = topo.ipr(topo.client_ns)
    index = _client_index(topo, 0)
    address = topo.paths[0].client_ip
    ipr.addr("del", index=index, address=address, prefixlen=24)
    down = reports.next()
    assert (down["kind"], down["path"]) == ("down", A)
    assert down["detail"].startswith(f"address {address} gone")
    assert f"RTM_DELADDR {address}/24" in down["detail"]
    ipr.addr("add", index=index, address=address, prefixlen=24)
    up = reports.next()
    assert (up["kind"], up["path"]) == ("up", A)


def test_monitor_reports_the_route_gone_and_back() -> None:
    """Paths bound to an address only (no ``device``): the route to the gateway is the
    connected /24, and deleting it leaves none. (A path pinned to its device keeps a route
    while the device is up: the kernel then sends on-link.)"""
    require_netns()
    with Topology(2) as topo:
        reports = _start(topo, pinned=False)
        assert reports.next() == {"kind": "ready", "running": True, "down": []}
        _route_gone_and_back(topo, reports)


def _route_gone_and_back(topo: Topology, reports: Reports) -> None:
    ipr = topo.ipr(topo.client_ns)
    index = _client_index(topo, 1)
    link = topo.paths[1]
    net = link.client_ip.rsplit(".", 1)[0] + ".0"
    ipr.route("del", dst=f"{net}/24", oif=index, proto=2, scope=253)  # kernel, link
    down = reports.next()
    assert (down["kind"], down["path"]) == ("down", B)
    assert down["detail"].startswith(f"no route to {link.gateway_ip}")
    assert f"RTM_DELROUTE {net}/24 dev {link.client_ifname}" in down["detail"]
    ipr.route("add", dst=f"{net}/24", oif=index, prefsrc=link.client_ip, proto=2, scope=253)
    up = reports.next()
    assert (up["kind"], up["path"]) == ("up", B)


def test_monitor_reports_a_path_down_at_start() -> None:
    require_netns()
    with Topology(2) as topo:
        topo.link_down(1)
        reports = _start(topo)
        first = reports.next()
        assert (first["kind"], first["path"]) == ("down", B)
        assert first["detail"] == f"{topo.paths[1].client_ifname}: link down"
        assert reports.next() == {"kind": "ready", "running": True, "down": [B]}


# -- both programs ---------------------------------------------------------------------------


def test_link_down_switches_the_session_with_the_link_down_reason(realnet) -> None:  # noqa: F811
    t: RealTunnel = realnet(policy=SLOW_DEATH)
    sid = t.events.wait_type("SESSION_CREATED", 10)["session_id"]
    t.events.wait_type("PATH_HEALTH", WAIT_S, transport_id=B, alive=True)  # B: a standby

    mark = t.events.mark()
    t.topo.link_down(0)
    switch = t.events.wait_type("TRANSPORT_SWITCH", WAIT_S, since=mark)
    assert (switch["previous_transport"], switch["new_transport"]) == (A, B)
    # only the monitor explains the death: silence would take dead_min_ms (5 s) and say
    # transport_dead; the kernel said link_down, naming the interface and what changed
    (dead,) = t.events.of_type("TRANSPORT_DEAD", mark)
    name = t.topo.paths[0].client_ifname
    assert (dead["transport_id"], dead["reason_code"]) == (A, "link_down")
    assert dead["detail"].startswith(f"{name}: link down"), dead
    assert f"RTM_NEWLINK {name} down" in dead["detail"]
    recovering = t.events.of_type("STATE_CHANGE", mark, new_state="RECOVERING")
    assert [r["reason_code"] for r in recovering] == ["link_down"]
    assert recovering[0]["from_transport"] == A
    assert t.states(mark)[:2] == ["RECOVERING", "ATTACHED"]
    assert t.session_ids() == {sid}

    # link up again: the monitor says so, the path is probed and becomes a standby again
    mark = t.events.mark()
    t.topo.link_up(0)
    note = t.events.wait_type("DIAGNOSTIC", WAIT_S, since=mark, reason_code="link_up")
    assert name in note["detail"]
    t.events.wait_type("PATH_HEALTH", WAIT_S, since=mark, transport_id=A, alive=True)
    assert t.states(mark) == []  # the session stays on B, ATTACHED
    assert t.session_ids() == {sid}
    assert t.stop_client() == 0


def test_a_standby_link_down_makes_it_no_candidate(realnet) -> None:  # noqa: F811
    t: RealTunnel = realnet(policy=SLOW_DEATH)
    t.events.wait_type("PATH_HEALTH", WAIT_S, transport_id=B, alive=True)
    mark = t.events.mark()
    t.topo.link_down(1)
    note = t.events.wait_type("DIAGNOSTIC", WAIT_S, since=mark, reason_code="link_down")
    assert note["detail"].startswith(f"path {B}: {t.topo.paths[1].client_ifname}: link down")
    t.events.wait_type("PATH_HEALTH", WAIT_S, since=mark, transport_id=B, alive=False)
    assert t.states(mark) == [] and t.switches(mark) == []  # A carries on
    assert t.events.of_type("TRANSPORT_DEAD", mark) == []
