"""Paths that follow the machine (issue 10 item 4) on real links: namespaces, root.

The gateway has one address for every path, 10.201.0.1 (on its loopback), reachable from
the client over each veth (a route per veth, through the veth's gateway-side address).
The client runs ``paths = "auto"`` with that one gateway endpoint and ``include`` naming
this run's veths: it starts with a path per veth; a veth added while the session runs
becomes a validated candidate, and deleting the active one moves the session. Nothing
here asserts a duration.
"""

from __future__ import annotations

from typing import Any

import pytest
from realnet import (
    GATEWAY_PORT,
    RealTunnel,
    policy_toml,
    realnet,  # noqa: F401  (the fixture)
)

pytestmark = pytest.mark.root

GW_ADDRESS = "10.201.0.1"
WAIT_S = 30.0
"""Generous bound for waiting on an event (a loaded machine): not a timing claim."""

SLOW_DEATH = policy_toml(volatility={"loss_volatile_threshold": 0.2, "dead_min_ms": 5_000})
"""Silence must last 5 s before a path is declared dead: a prompt death is the kernel's."""


def _route_to_gateway(t: RealTunnel, ifname: str, via: str, metric: int) -> None:
    ipr = t.topo.ipr(t.topo.client_ns)
    index = ipr.link_lookup(ifname=ifname)[0]
    ipr.route("add", dst=f"{GW_ADDRESS}/32", gateway=via, oif=index, priority=metric)


def _answer_from_gateway_address(t: RealTunnel, ifname: str, net: str) -> None:
    """The gateway answers the client's subnet on ``ifname`` from GW_ADDRESS (the route's
    preferred source): the client takes a path's datagrams from its gateway address only."""
    gw = t.topo.ipr(t.topo.gateway_ns)
    index = gw.link_lookup(ifname=ifname)[0]
    gw.route("replace", dst=f"{net}/24", oif=index, prefsrc=GW_ADDRESS, proto=2, scope=253)


def _auto_client(t: RealTunnel) -> None:
    """One gateway address for every path; the client on ``paths = "auto"``."""
    gw = t.topo.ipr(t.topo.gateway_ns)
    gw.addr("add", index=gw.link_lookup(ifname="lo")[0], address=GW_ADDRESS, prefixlen=32)
    for i, link in enumerate(t.topo.paths):
        _route_to_gateway(t, link.client_ifname, link.gateway_ip, i + 1)
        _answer_from_gateway_address(t, link.gateway_ifname, f"10.200.{i}.0")
    text = (t.tmp / "client.toml").read_text()
    head = text[: text.index("[[path]]")]
    (t.tmp / "client.toml").write_text(
        head.replace("[tun]\n", 'paths = "auto"\n[tun]\n', 1) + "[auto]\n"
        f'gateway = "{GW_ADDRESS}:{GATEWAY_PORT}"\n'
        f'include = ["jvc*-{t.tag}"]\n'
        f'prefer = ["{t.topo.paths[0].client_ifname}"]\n'
    )


def _add_veth(t: RealTunnel, n: int) -> tuple[str, str]:
    """A new veth pair 10.200.<n>.1 <-> 10.200.<n>.2 and its route to the gateway."""
    client = t.topo.ipr(t.topo.client_ns)
    gateway = t.topo.ipr(t.topo.gateway_ns)
    cname, gname = f"jvc{n}-{t.tag}", f"jvg{n}-{t.tag}"
    client.link(
        "add", ifname=cname, kind="veth", peer={"ifname": gname, "net_ns_fd": t.topo.gateway_ns}
    )
    for ipr, name, address in ((gateway, gname, f"10.200.{n}.2"), (client, cname, f"10.200.{n}.1")):
        index = ipr.link_lookup(ifname=name)[0]
        ipr.addr("add", index=index, address=address, prefixlen=24)
        ipr.link("set", index=index, state="up")
    _route_to_gateway(t, cname, f"10.200.{n}.2", 10 + n)
    _answer_from_gateway_address(t, gname, f"10.200.{n}.0")
    return cname, f"10.200.{n}.1"


def _active(t: RealTunnel) -> int:
    moves = t.events.of_type("TRANSPORT_SWITCH")
    if moves:
        return int(moves[-1]["new_transport"])
    return int(t.events.of_type("TRANSPORT_ATTACHED")[-1]["transport_id"])


def test_a_new_interface_becomes_a_candidate_and_removing_the_active_moves_the_session(
    realnet: Any,  # noqa: F811
) -> None:
    t: RealTunnel = realnet(client=False, policy=SLOW_DEATH)
    _auto_client(t)
    t.start_client()
    sid = t.events.wait_type("SESSION_CREATED", 10)["session_id"]
    t.events.wait_type("PATH_HEALTH", WAIT_S, transport_id=2, alive=True)  # both veths: paths

    # a veth added while the session runs: path 3, validated, a standby
    mark = t.events.mark()
    name, address = _add_veth(t, 2)
    added = t.events.wait_type("PATH_ADDED", WAIT_S, since=mark)
    assert (added["transport_id"], added["interface"], added["address"]) == (3, name, address)
    t.events.wait_type("PATH_VALIDATED", WAIT_S, since=mark, transport_id=3)
    t.events.wait_type("PATH_HEALTH", WAIT_S, since=mark, transport_id=3, alive=True)
    assert t.states(mark) == []  # the session did not move for it

    # the active path's interface is deleted: the session moves, the path leaves
    active = _active(t)
    gone = t.topo.paths[active - 1].client_ifname
    mark = t.events.mark()
    client = t.topo.ipr(t.topo.client_ns)
    client.link("del", index=client.link_lookup(ifname=gone)[0])
    switch = t.events.wait_type("TRANSPORT_SWITCH", WAIT_S, since=mark)
    assert switch["previous_transport"] == active and switch["new_transport"] != active
    removed = t.events.wait_type("PATH_REMOVED", WAIT_S, since=mark, transport_id=active)
    assert gone in removed["detail"]
    (dead,) = t.events.of_type("TRANSPORT_DEAD", mark, transport_id=active)
    assert dead["reason_code"] == "link_down" and gone in dead["detail"]
    assert [e["reason_code"] for e in t.events.of_type("STATE_CHANGE", mark)][:1] == ["link_down"]
    assert t.session_ids() == {sid}
    assert t.stop_client() == 0
