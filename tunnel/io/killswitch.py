"""Kill switch and full-tunnel endpoint exceptions: routes that outlive the engine.

The TUN and its routes vanish with the engine (and with its process: the kernel deletes a
TUN whose last descriptor closes). Without more, the tunnel's traffic then silently takes
the plain network. This module adds two kinds of routes to the main table, each tagged
with the routing protocol number :data:`RTPROT_JVPN` so they can be found and removed
later, by this process or by another (``jvpn-tui --release-kill-switch``):

* **kill-switch routes**: ``unreachable <route> metric 1000000`` for every tunnel route.
  The TUN's own route for the same prefix has metric 0 and wins while the TUN exists;
  once it is gone (engine ended, process killed) the unreachable route is what is left, so
  the traffic is refused on this host (``No route to host``) instead of leaving by the plain
  network. While the session is VOLATILE or RECOVERING the TUN and its routes stay: the
  traffic enters the tunnel and is held (queued) or dropped there, never sent plain.
* **endpoint exceptions**: ``<endpoint>/32 via <gw> dev <if> metric <path id>`` for every
  path whose gateway endpoint a tunnel route covers (``0.0.0.0/0`` covers them all). The
  next hop is what the kernel answers for that endpoint *before* the TUN routes go in (a
  path pinned to a device asks with that device as output interface, so two paths on two
  uplinks keep one exception each: a device-bound socket skips the other's). A host route
  is more specific than any tunnel route, so the paths' own datagrams keep their uplinks.

``0.0.0.0/0`` (``::/0``) itself is never installed: :func:`tunnel_routes` splits it into two
halves (``0.0.0.0/1`` and ``128.0.0.0/1``, as OpenVPN's ``def1`` does), which beat the
host's default route without replacing it; removing them gives it back untouched.

:class:`RouteGuard` is what the engine uses (install at start, an exception for a gateway
name that re-resolves, :meth:`RouteGuard.finish` at the end). :func:`find_installed` and
:func:`release` are for anyone: they need no configuration, only the network namespace.

Limits: one client with a kill switch per network namespace (release removes every route
tagged :data:`RTPROT_JVPN`); the next hops of the exceptions are taken at start, and a
re-resolved endpoint reuses its path's (an uplink whose router changes while the engine
runs keeps the old next hop until the next start); IPv4 and IPv6 are handled alike, but
only routes of a family the configuration allows ever reach here.

All netlink work runs on a short-lived worker thread (pyroute2's synchronous API cannot run
inside a running asyncio loop), so any thread may call these functions.
"""

from __future__ import annotations

import concurrent.futures
import errno
import ipaddress
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

RTPROT_JVPN: Final = 106
"""Routing protocol number of every route this module adds (``ip route show proto 106``);
106 is assigned to nobody in the kernel's or iproute2's lists."""

KILL_SWITCH_METRIC: Final = 1_000_000
"""Metric of the unreachable routes: worse than the TUN's own routes (metric 0), so they
only act once those are gone."""

MAIN_TABLE: Final = 254
RTN_UNICAST: Final = 1
RTN_UNREACHABLE: Final = 7
RT_SCOPE_UNIVERSE: Final = 0
RT_SCOPE_LINK: Final = 253

RELEASE_HINT: Final = "jvpn-tui --release-kill-switch"
"""The command that releases a kill switch left in place (said in the one-line notice)."""

_NO_ROUTE: Final = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH})
"""``route get`` answers: no route (or an unreachable route: someone else's)."""

_GONE: Final = frozenset({errno.ESRCH, errno.ENOENT, errno.ENODEV})

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class KillSwitchError(Exception):
    """Installing or releasing kill-switch routes failed; the message says which and why."""


@dataclass(frozen=True, slots=True)
class KillSwitchRoute:
    """One route of ours, as found in the routing table."""

    dst: str
    """Destination CIDR (``0.0.0.0/1``, ``192.0.2.7/32``)."""
    kind: str
    """``unreachable`` (kill switch) or ``exception`` (an endpoint kept on its uplink)."""
    gateway: str | None
    """Next hop of an exception (None: on-link, or an unreachable route)."""
    device: str | None
    """Output interface of an exception."""
    metric: int

    def __str__(self) -> str:
        via = f" via {self.gateway}" if self.gateway else ""
        dev = f" dev {self.device}" if self.device else ""
        return f"{self.kind} {self.dst}{via}{dev} metric {self.metric}"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A path's gateway endpoint as the engine sends to it."""

    path_id: int
    address: str
    """Numeric address (names are resolved before)."""
    device: str | None = None
    """The device the path's socket is pinned to (SO_BINDTODEVICE), if any."""


@dataclass(frozen=True, slots=True)
class _NextHop:
    gateway: str | None
    oif: int


# -- pure helpers ----------------------------------------------------------------------------


def is_default(cidr: str) -> bool:
    """``0.0.0.0/0`` or ``::/0``."""
    return ipaddress.ip_network(cidr).prefixlen == 0


def tunnel_routes(routes: Sequence[str]) -> tuple[str, ...]:
    """The routes to put on the TUN: a default route becomes its two halves.

    ``0.0.0.0/0`` -> ``0.0.0.0/1``, ``128.0.0.0/1``; ``::/0`` -> ``::/1``, ``8000::/1``.
    The halves are more specific than the host's own default route, which stays as it is.
    """
    out: list[str] = []
    for cidr in routes:
        net = ipaddress.ip_network(cidr)
        if net.prefixlen == 0:
            out.extend(str(half) for half in net.subnets(prefixlen_diff=1))
        else:
            out.append(str(net))
    return tuple(dict.fromkeys(out))


def covering(routes: Sequence[str], address: str) -> list[str]:
    """The routes (as given) that contain ``address``."""
    ip = ipaddress.ip_address(address)
    return [
        r for r in routes if ip.version == (net := ipaddress.ip_network(r)).version and ip in net
    ]


def capture_problem(routes: Sequence[str], address: str, what: str) -> str | None:
    """Why no exception can keep ``address`` out of the tunnel, or None when one can.

    Only a host route for the endpoint itself (``192.0.2.7/32``) leaves no room: an
    exception is a host route, and it cannot be more specific than that.
    """
    ip = ipaddress.ip_address(address)
    for r in covering(routes, address):
        if ipaddress.ip_network(r).prefixlen == ip.max_prefixlen:
            return (
                f"route {r} would send {what} {address} into the tunnel itself, and a host "
                "route leaves no room for the exception that keeps it on its uplink: "
                "remove that route"
            )
    return None


def _family(net: IPNetwork) -> int:
    return socket.AF_INET6 if net.version == 6 else socket.AF_INET


T = TypeVar("T")


def _on_worker(fn: Callable[[], T]) -> T:
    """Run ``fn`` on a fresh thread (never inside the caller's asyncio loop)."""
    with concurrent.futures.ThreadPoolExecutor(1, "jvpn-killswitch") as pool:
        return pool.submit(fn).result()


@contextmanager
def _netlink(netns: str | None) -> Iterator[Any]:
    try:
        ipr = IPRoute(groups=0) if netns is None else IPRoute(netns=netns, flags=0, groups=0)
    except OSError as exc:
        where = f" in network namespace {netns!r}" if netns else ""
        raise KillSwitchError(f"cannot open a netlink socket{where}: {exc}") from exc
    try:
        yield ipr
    finally:
        ipr.close()


def _cause(exc: NetlinkError) -> str:
    text = os.strerror(exc.code).lower() if exc.code > 0 else str(exc)
    if exc.code in (errno.EPERM, errno.EACCES):
        text += " — run as root or grant CAP_NET_ADMIN"
    return text


# -- finding and releasing ------------------------------------------------------------------


def _ours(ipr: Any) -> list[Any]:
    msgs = []
    for family in (socket.AF_INET, socket.AF_INET6):
        for msg in ipr.route("dump", family=family):
            table = msg.get_attr("RTA_TABLE") or msg["table"]
            if msg["proto"] == RTPROT_JVPN and table == MAIN_TABLE:
                msgs.append(msg)
    return msgs


def _describe(ipr: Any, msg: Any) -> KillSwitchRoute:
    family = msg["family"]
    dst = msg.get_attr("RTA_DST") or ("::" if family == socket.AF_INET6 else "0.0.0.0")
    oif = msg.get_attr("RTA_OIF")
    device = None
    if msg["type"] == RTN_UNICAST and oif is not None:
        links = ipr.link("get", index=oif)
        device = links[0].get_attr("IFLA_IFNAME") if links else None
    return KillSwitchRoute(
        dst=f"{dst}/{msg['dst_len']}",
        kind="unreachable" if msg["type"] == RTN_UNREACHABLE else "exception",
        gateway=msg.get_attr("RTA_GATEWAY"),
        device=device,
        metric=msg.get_attr("RTA_PRIORITY") or 0,
    )


def find_installed(netns: str | None = None) -> list[KillSwitchRoute]:
    """Every kill-switch route and endpoint exception in the main table (any family).

    ``netns``: a network namespace name (as in /run/netns); None: this process's own.
    Raises :class:`KillSwitchError` when the routing table cannot be read.
    """

    def work() -> list[KillSwitchRoute]:
        with _netlink(netns) as ipr:
            return [_describe(ipr, msg) for msg in _ours(ipr)]

    return _on_worker(work)


def _delete(ipr: Any, msg: Any) -> None:
    spec: dict[str, Any] = {
        "family": msg["family"], "dst_len": msg["dst_len"], "table": MAIN_TABLE,
        "proto": RTPROT_JVPN, "type": msg["type"], "scope": msg["scope"],
        "priority": msg.get_attr("RTA_PRIORITY") or 0,
    }  # fmt: skip
    for key, attr in (("dst", "RTA_DST"), ("gateway", "RTA_GATEWAY"), ("oif", "RTA_OIF")):
        value = msg.get_attr(attr)
        if value is not None:
            spec[key] = value
    try:
        ipr.route("del", **spec)
    except NetlinkError as exc:
        if exc.code not in _GONE:
            raise KillSwitchError(f"cannot remove {_describe(ipr, msg)}: {_cause(exc)}") from exc


def release(netns: str | None = None) -> list[KillSwitchRoute]:
    """Remove every kill-switch route and endpoint exception; return what was removed.

    Needs no configuration: the routes are found by their protocol number
    (:data:`RTPROT_JVPN`) in the main table of ``netns`` (None: this process's own
    namespace). Idempotent (nothing installed: returns []). Raises
    :class:`KillSwitchError` when a route cannot be removed (e.g. no CAP_NET_ADMIN).
    """

    def work() -> list[KillSwitchRoute]:
        with _netlink(netns) as ipr:
            removed = []
            for msg in _ours(ipr):
                route = _describe(ipr, msg)
                _delete(ipr, msg)
                removed.append(route)
            return removed

    return _on_worker(work)


# -- the engine's guard ----------------------------------------------------------------------


class RouteGuard:
    """The kill switch and endpoint exceptions of one client engine.

    ``routes`` are the configured tunnel routes (``0.0.0.0/0`` allowed); ``kill_switch``
    adds the unreachable routes. Nothing changes in ``__init__``.
    """

    def __init__(
        self, routes: Sequence[str], *, kill_switch: bool, netns: str | None = None
    ) -> None:
        self.routes = tuple(routes)
        self.kill_switch = kill_switch
        self.netns = netns
        self.installed: list[KillSwitchRoute] = []
        """What :meth:`install` (and :meth:`except_endpoint`) added, oldest first."""
        self._hops: dict[int, _NextHop] = {}
        self._attempted = False

    # -- start ---------------------------------------------------------------------------

    def install(self, endpoints: Sequence[Endpoint]) -> None:
        """Before the TUN routes go in: the exceptions, then the unreachable routes.

        A kill switch left by an earlier run is taken over (its routes that this run
        installs again are kept; the others are removed afterwards). Raises
        :class:`KillSwitchError` when an endpoint cannot be excepted (see
        :func:`capture_problem`) or a route cannot be added.
        """
        for ep in endpoints:
            problem = capture_problem(self.routes, ep.address, f"path {ep.path_id}'s gateway")
            if problem:
                raise KillSwitchError(problem)
        self._attempted = True  # from here on, a failure may leave part of it in place
        _on_worker(lambda: self._install(endpoints))

    def _install(self, endpoints: Sequence[Endpoint]) -> None:
        with _netlink(self.netns) as ipr:
            stale = _ours(ipr)
            keep: list[dict[str, Any]] = []
            for ep in endpoints:
                hop = _stale_hop(ipr, stale, ep) or self._lookup(ipr, ep, stale)
                if hop is None:
                    continue
                self._hops[ep.path_id] = hop
                if covering(self.routes, ep.address):
                    keep.append(self._add_exception(ipr, ep.path_id, ep.address, hop))
            if self.kill_switch:
                for cidr in tunnel_routes(self.routes):
                    keep.append(self._add_unreachable(ipr, ipaddress.ip_network(cidr)))
            for msg in stale:  # an earlier run's routes that this one did not install again
                if not any(_same(msg, spec) for spec in keep):
                    _delete(ipr, msg)

    def _lookup(self, ipr: Any, ep: Endpoint, stale: list[Any]) -> _NextHop | None:
        """Where the kernel sends ``ep``'s datagrams now; None: not through a router or
        device that a tunnel route could take over (local, or no route at all).

        An earlier run's unreachable routes would answer instead of the uplink (and a
        query with an output device reads their refusal as "on-link"): they are removed
        first (and out of ``stale``); :meth:`_install` puts this run's in right after.
        """
        for msg in [m for m in stale if m["type"] == RTN_UNREACHABLE]:
            _delete(ipr, msg)
            stale.remove(msg)
        ip = ipaddress.ip_address(ep.address)
        query: dict[str, Any] = {"dst": str(ip), "family": _family(ipaddress.ip_network(ip))}
        if ep.device is not None:
            query["oif"] = _index(ipr, ep)
        try:
            answer = ipr.route("get", **query)[0]
        except NetlinkError as exc:
            if exc.code in _NO_ROUTE:
                return None  # no route: its datagrams cannot leave at all, nor loop
            raise KillSwitchError(f"cannot look up the route to {ip}: {_cause(exc)}") from exc
        if answer["type"] != RTN_UNICAST or answer.get_attr("RTA_OIF") is None:
            return None  # local or broadcast: never routed through the TUN
        return _NextHop(answer.get_attr("RTA_GATEWAY"), answer.get_attr("RTA_OIF"))

    def _add_exception(self, ipr: Any, path_id: int, address: str, hop: _NextHop) -> dict[str, Any]:
        net = ipaddress.ip_network(address)
        spec: dict[str, Any] = {
            "family": _family(net), "dst": str(net.network_address), "dst_len": net.prefixlen,
            "table": MAIN_TABLE, "proto": RTPROT_JVPN, "type": RTN_UNICAST, "priority": path_id,
            "oif": hop.oif,
            "scope": RT_SCOPE_UNIVERSE if hop.gateway else RT_SCOPE_LINK,
        }  # fmt: skip
        if hop.gateway:
            spec["gateway"] = hop.gateway
        return self._add(ipr, spec)

    def _add_unreachable(self, ipr: Any, net: IPNetwork) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "family": _family(net), "dst": str(net.network_address), "dst_len": net.prefixlen,
            "table": MAIN_TABLE, "proto": RTPROT_JVPN, "type": RTN_UNREACHABLE,
            "priority": KILL_SWITCH_METRIC,
        }  # fmt: skip
        return self._add(ipr, spec)

    def _add(self, ipr: Any, spec: dict[str, Any]) -> dict[str, Any]:
        """Add the route; one of ours already there (an earlier run's) is replaced."""
        try:
            try:
                ipr.route("add", **spec)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST or not any(_same(m, spec) for m in _ours(ipr)):
                    raise
                ipr.route("replace", **spec)
            self.installed.append(_describe(ipr, _Spec(spec)))
        except NetlinkError as exc:
            what = "exception" if spec["type"] == RTN_UNICAST else "kill-switch route"
            raise KillSwitchError(
                f"cannot add {what} {spec['dst']}/{spec['dst_len']} metric "
                f"{spec['priority']}: {_cause(exc)}"
            ) from exc
        return spec

    # -- while running ---------------------------------------------------------------------

    def except_endpoint(self, path_id: int, address: str) -> KillSwitchRoute | None:
        """A path's gateway name now resolves to ``address``: keep it out of the tunnel.

        Uses the next hop the path had at start. Returns the exception added (None: no
        tunnel route covers the address, or the path had no next hop to keep). Raises
        :class:`KillSwitchError` when no exception is possible (the caller must then not
        send there).
        """
        if not covering(self.routes, address):
            return None
        problem = capture_problem(self.routes, address, f"path {path_id}'s gateway")
        if problem:
            raise KillSwitchError(problem)
        hop = self._hops.get(path_id)
        if hop is None:
            return None

        def work() -> KillSwitchRoute:
            with _netlink(self.netns) as ipr:
                self._add_exception(ipr, path_id, address, hop)
                return self.installed[-1]

        return _on_worker(work)

    # -- end --------------------------------------------------------------------------------

    def finish(self, *, on_purpose: bool) -> str | None:
        """The engine ended. On purpose (the operator's terminate), or without a kill switch:
        everything is removed. Otherwise the kill switch stays; the return value is then
        the one line that says so and how to release it (None when removed)."""
        if not self._attempted:
            return None
        if on_purpose or not self.kill_switch:
            release(self.netns)
            self.installed.clear()
            return None
        routes = ", ".join(self.routes)
        return (
            f"kill switch left in place: traffic for {routes} is refused on this host until "
            f"you release it with: {RELEASE_HINT}"
        )


class _Spec:
    """A route spec (the kwargs of an add) read like a netlink message (for _describe)."""

    _ATTRS: Final = {"RTA_DST": "dst", "RTA_GATEWAY": "gateway", "RTA_OIF": "oif",
                     "RTA_PRIORITY": "priority", "RTA_TABLE": "table"}  # fmt: skip

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec

    def __getitem__(self, key: str) -> Any:
        return self.spec[key]

    def get_attr(self, name: str) -> Any:
        return self.spec.get(self._ATTRS[name])


def _index(ipr: Any, ep: Endpoint) -> int:
    index = ipr.link_lookup(ifname=ep.device)
    if not index:
        raise KillSwitchError(f"path {ep.path_id}: no such device {ep.device!r}")
    return int(index[0])


def _stale_hop(ipr: Any, stale: list[Any], ep: Endpoint) -> _NextHop | None:
    """The next hop of an earlier run's exception for this very path and endpoint (taken
    cleanly then; it lets a restart keep the old kill switch in place meanwhile)."""
    ip = ipaddress.ip_address(ep.address)
    for msg in stale:
        dst = msg.get_attr("RTA_DST")
        if msg["type"] != RTN_UNICAST or msg["dst_len"] != ip.max_prefixlen or dst is None:
            continue
        if ipaddress.ip_address(dst) != ip or msg.get_attr("RTA_PRIORITY") != ep.path_id:
            continue
        if ep.device is not None and msg.get_attr("RTA_OIF") != _index(ipr, ep):
            continue
        return _NextHop(msg.get_attr("RTA_GATEWAY"), msg.get_attr("RTA_OIF"))
    return None


def _same(msg: Any, spec: dict[str, Any]) -> bool:
    """Is the netlink route ``msg`` the route ``spec`` describes?"""
    if msg["family"] != spec["family"] or msg["dst_len"] != spec["dst_len"]:
        return False
    if msg["type"] != spec["type"] or (msg.get_attr("RTA_PRIORITY") or 0) != spec["priority"]:
        return False
    dst = msg.get_attr("RTA_DST")
    if spec["dst_len"] and (
        dst is None or ipaddress.ip_address(dst) != ipaddress.ip_address(spec["dst"])
    ):
        return False
    return True
