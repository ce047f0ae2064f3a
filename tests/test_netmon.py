"""The link monitor's judgement and reporting without a kernel (issue 10 item 3).

:func:`tunnel.client.netmon.judge` against a fake :class:`KernelView`; the monitor's
reports (down once, up once, the kernel's messages quoted) with a fake kernel behind it;
its refusal to run without netlink (one DIAGNOSTIC) and with a memory inner side. The real
kernel is in tests/test_netmon_netns.py.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

import tunnel.client.netmon as netmon
from tunnel.client.netmon import Link, NetlinkMonitor, Said, WatchedPath, detail_for, judge
from tunnel.core.events import Reason

GW = "10.200.0.2"


@dataclass
class FakeKernel:
    links: dict[int, Link] = field(default_factory=dict)
    local: set[str] = field(default_factory=set)
    routes: dict[str, int] = field(default_factory=dict)
    """Destination -> the interface the kernel sends it out of (absent: unreachable)."""
    names: dict[int, str] = field(default_factory=dict)
    strict_oif: bool = True
    """False: the lookup treats oif as a preference, as IPv6's does for a global address."""

    def link(self, *, index: int = 0, name: str = "") -> Link | None:
        for link in self.links.values():
            if link.index == index or link.name == name:
                return link
        return None

    def is_local(self, address: str) -> bool:
        return address in self.local

    def route(self, dst: str, src: str | None, oif: int) -> int | str:
        if dst not in self.routes:
            return "Network is unreachable"
        return (oif if self.strict_oif else 0) or self.routes[dst]


def _kernel() -> FakeKernel:
    return FakeKernel(
        links={2: Link(2, "eth0", True, True), 3: Link(3, "wlan0", True, True)},
        local={"10.200.0.1"},
        routes={GW: 2},
        names={2: "eth0", 3: "wlan0"},
    )


def _path(device: str | None = "eth0", bind: str | None = "10.200.0.1") -> WatchedPath:
    return WatchedPath(1, device, bind, lambda: GW)


def test_a_path_whose_device_address_and_route_are_fine_is_usable() -> None:
    assert judge(_kernel(), _path()) == (None, {2})
    assert judge(_kernel(), _path(device=None)) == (None, {2})
    assert judge(_kernel(), _path(device=None, bind=None)) == (None, {2})


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda k: k.links.pop(2), "eth0: interface gone"),
        (lambda k: k.links.__setitem__(2, Link(2, "eth0", False, False)), "eth0: link down"),
        (lambda k: k.links.__setitem__(2, Link(2, "eth0", True, False)), "eth0: carrier lost"),
        (lambda k: k.local.clear(), "address 10.200.0.1 gone"),
    ],
)
def test_a_pinned_path_is_down_when_its_device_or_address_is(change: Any, why: str) -> None:
    kernel = _kernel()
    change(kernel)
    assert judge(kernel, _path())[0] == why


def test_an_unpinned_path_is_down_without_a_route_or_when_its_route_leaves_a_dead_link() -> None:
    kernel = _kernel()
    kernel.routes.clear()
    assert judge(kernel, _path(device=None))[0] == f"no route to {GW}: Network is unreachable"
    kernel = _kernel()
    kernel.links[2] = Link(2, "eth0", True, False)
    assert judge(kernel, _path(device=None, bind=None))[0] == "eth0: carrier lost"
    kernel = _kernel()
    kernel.routes[GW] = 9  # an interface the kernel no longer has
    assert judge(kernel, _path(device=None))[0] == f"no route to {GW}: its interface is gone"


def test_the_detail_quotes_the_kernel_about_the_paths_interfaces_links_first() -> None:
    said = [
        Said(2, "", "RTM_DELROUTE 10.200.0.0/24 dev eth0", 2),
        Said(3, "", "RTM_NEWLINK wlan0 up", 0),  # another interface: not quoted
        Said(2, "", "RTM_NEWLINK eth0 down", 0),
        Said(5, "10.200.0.1", "RTM_DELADDR 10.200.0.1/24 on eth0", 1),
        Said(2, "", "RTM_NEWLINK eth0 down", 0),  # repeated: quoted once
    ]
    assert detail_for("eth0: link down", said, {2}, "10.200.0.1") == (
        "eth0: link down (kernel: RTM_NEWLINK eth0 down; RTM_DELADDR 10.200.0.1/24 on eth0;"
        " RTM_DELROUTE 10.200.0.0/24 dev eth0)"
    )
    assert detail_for("eth0: link down", [], {2}, None) == "eth0: link down"
    long = [Said(2, "", "x" * 400)]
    assert len(detail_for("why", long, {2}, None)) == netmon.MAX_DETAIL


# -- the monitor ----------------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, str]] = []

    def monitor(self, paths: list[WatchedPath], **kw: Any) -> NetlinkMonitor:
        return NetlinkMonitor(
            paths,
            on_down=lambda pid, d: self.calls.append(("down", pid, d)),
            on_up=lambda pid, d: self.calls.append(("up", pid, d)),
            report=lambda reason, d: self.calls.append(("report", reason, d)),
            **kw,
        )


def test_the_monitor_reports_each_change_once() -> None:
    rec = Recorder()
    kernel = _kernel()
    mon = rec.monitor([_path(), WatchedPath(2, "wlan0", None, lambda: GW)], kernel=kernel)
    mon.judge_all(())
    assert rec.calls == []  # usable at start: nothing to say

    kernel.links[2] = Link(2, "eth0", False, False)
    mon.judge_all([Said(2, "", "RTM_NEWLINK eth0 down")])
    mon.judge_all([Said(2, "", "RTM_NEWLINK eth0 down")])  # still down: said once
    assert rec.calls == [("down", 1, "eth0: link down (kernel: RTM_NEWLINK eth0 down)")]
    assert mon.down == {1: "eth0: link down"}

    kernel.links[2] = Link(2, "eth0", True, True)
    mon.judge_all([Said(2, "", "RTM_NEWLINK eth0 up")])
    assert rec.calls[1:] == [
        ("up", 1, f"eth0: usable again (route to {GW}) (kernel: RTM_NEWLINK eth0 up)")
    ]
    assert mon.down == {}


def test_without_netlink_the_monitor_says_so_once_and_does_not_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(netmon, "RtnlSocket", refuse)
    rec = Recorder()
    mon = rec.monitor([_path()])
    loop = asyncio.new_event_loop()
    try:
        mon.start(loop)
    finally:
        loop.close()
    assert not mon.running
    ((kind, reason, detail),) = rec.calls
    assert (kind, reason) == ("report", Reason.NETLINK_UNAVAILABLE)
    assert "Operation not permitted" in detail and "silence" in detail


def test_a_disabled_monitor_opens_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[object] = []
    monkeypatch.setattr(netmon, "RtnlSocket", lambda *a, **k: opened.append(a))
    rec = Recorder()
    mon = rec.monitor([_path()], enabled=False)
    loop = asyncio.new_event_loop()
    try:
        mon.start(loop)
    finally:
        loop.close()
    assert (opened, rec.calls, mon.running) == ([], [], False)


def test_a_pinned_path_is_judged_by_its_device_not_by_a_lookup_that_names_another() -> None:
    """A socket pinned to wlan0 leaves by wlan0; an IPv6 lookup may still name eth0's route
    to the same gateway (two paths' endpoint routes): eth0 losing carrier is not wlan0's."""
    kernel = _kernel()
    kernel.strict_oif = False
    kernel.links[2] = Link(2, "eth0", True, False)
    assert judge(kernel, _path(device="wlan0")) == (None, {3})
    kernel.links[3] = Link(3, "wlan0", True, False)
    assert judge(kernel, _path(device="wlan0"))[0] == "wlan0: carrier lost"
