"""Host network configuration through netlink (pyroute2), explicit and reversible.

:class:`HostConfig` is a context manager that makes link, address and route changes and
records each one it actually made; on exit (also when the body raises) or on an explicit
:meth:`HostConfig.undo` it reverts them in reverse order. What already was the case (an
address already present, a link already up, an identical route) is left alone and not
recorded, so undo never removes what it did not create. No shell, no ``ip`` strings
(STYLE: "System changes are explicit and reversible").

``HostConfig(netns="name")`` configures inside that network namespace through a netlink
socket opened there (pyroute2 forks a short-lived helper to open it); the calling
process never changes its own namespace.

Pitfalls:

* pyroute2's synchronous API runs its own asyncio loop: using a HostConfig from a thread
  whose asyncio loop is running raises RuntimeError here (call it before the loop starts,
  or from ``asyncio.to_thread``).
* ``netns=`` forks a helper process; fork in a process that already runs threads is
  best done early (before the UI/engine threads start) or from a simple thread.
* Not thread-safe: one HostConfig per thread.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

IFF_UP: Final = 0x1
MAIN_TABLE: Final = 254
"""The routing table used when none is given (``ip route`` default)."""

_ALREADY_GONE: Final = frozenset({errno.ENODEV, errno.ESRCH, errno.EADDRNOTAVAIL, errno.ENOENT})
"""Errors on undo meaning the thing is already gone (e.g. the TUN closed first): fine."""


class NetConfError(Exception):
    """A host configuration change failed (message names the change and the cause)."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno
        """The OS/netlink error number behind it, when there is one."""


@dataclass(frozen=True, slots=True)
class _Change:
    description: str
    revert: Callable[[], Any]


def _cause(code: int | None, fallback: str = "") -> str:
    if code is None or code <= 0:
        return fallback or "unknown error"
    text = os.strerror(code).lower()
    if code in (errno.EPERM, errno.EACCES):
        text += " — run as root or grant CAP_NET_ADMIN"
    return text


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _route_target(
    dst_cidr: str, ifname: str | None, gateway: str | None
) -> tuple[IPNetwork, IPAddress | None]:
    """The destination and gateway of a route to add, checked (ValueError when invalid)."""
    try:
        net = ipaddress.ip_network(dst_cidr)
    except ValueError as exc:
        raise ValueError(f"invalid route destination {dst_cidr!r}: {exc}") from None
    if ifname is None and gateway is None:
        raise ValueError(f"route {dst_cidr}: give an interface, a gateway or both")
    if gateway is None:
        return net, None
    try:
        gw = ipaddress.ip_address(gateway)
    except ValueError as exc:
        raise ValueError(f"invalid gateway {gateway!r}: {exc}") from None
    if gw.version != net.version:
        raise ValueError(f"gateway {gateway} is not an IPv{net.version} address")
    return net, gw


def _route_spec(
    net: IPNetwork, index: int | None, gw: IPAddress | None, table: int | None
) -> dict[str, Any]:
    """The netlink attributes of a route (for add and for the undo's del)."""
    family = socket.AF_INET6 if net.version == 6 else socket.AF_INET
    spec: dict[str, Any] = {"family": family, "dst_len": net.prefixlen}
    if net.prefixlen:
        spec["dst"] = str(net.network_address)
    if index is not None:
        spec["oif"] = index
    if gw is not None:
        spec["gateway"] = str(gw)
    if table is not None:
        spec["table"] = table
    return spec


class HostConfig:
    """Records and reverts link/address/route changes, in this or another namespace.

    Usage::

        with TunDevice() as tun, HostConfig() as host:
            host.set_mtu(tun.name, 1420)
            host.add_address(tun.name, "10.8.0.2/24")
            host.link_up(tun.name)
            host.add_route("10.8.0.0/16", ifname=tun.name)
            ...  # everything above is undone here, in reverse order

    Nothing changes in ``__init__``; the netlink socket opens on enter (or :meth:`open`).
    """

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        """Network namespace name (as in /run/netns), or None for this process's own."""
        self._ipr: IPRoute | None = None
        self._changes: list[_Change] = []

    # -- lifetime ------------------------------------------------------------------------

    def open(self) -> HostConfig:
        """Open the netlink socket (in :attr:`netns` if given); return self."""
        if self._ipr is not None:
            return self
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError(
                "HostConfig cannot run inside a running asyncio event loop (pyroute2's "
                "synchronous API runs its own): use it before the loop starts or via "
                "asyncio.to_thread"
            )
        try:
            if self.netns is None:
                self._ipr = IPRoute(groups=0)
            else:
                # flags=0: never create the namespace as a side effect of a typo
                self._ipr = IPRoute(netns=self.netns, flags=0, groups=0)
        except FileNotFoundError as exc:
            raise NetConfError(
                f"network namespace {self.netns!r} does not exist", exc.errno
            ) from exc
        except OSError as exc:
            raise NetConfError(
                f"cannot open a netlink socket{self._where()}: {_cause(exc.errno, str(exc))}",
                exc.errno,
            ) from exc
        return self

    def close(self) -> None:
        """Close the netlink socket (does not undo; see :meth:`undo`). Idempotent."""
        ipr, self._ipr = self._ipr, None
        if ipr is not None:
            ipr.close()

    def __enter__(self) -> HostConfig:
        return self.open()

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        try:
            self.undo()
        except NetConfError as undo_exc:
            if exc is None:
                raise
            exc.add_note(f"HostConfig undo also failed: {undo_exc}")
        finally:
            self.close()

    @property
    def changes(self) -> tuple[str, ...]:
        """The recorded changes not yet undone, oldest first."""
        return tuple(c.description for c in self._changes)

    def undo(self) -> None:
        """Revert every recorded change, newest first; idempotent.

        A change whose object is already gone (interface removed, address or route
        already deleted) counts as reverted. Other failures do not stop the rest; they
        are reported together in one NetConfError at the end.
        """
        failures: list[str] = []
        while self._changes:
            change = self._changes.pop()
            try:
                change.revert()
            except NetlinkError as exc:
                if exc.code not in _ALREADY_GONE:
                    failures.append(f"undo {change.description}: {_cause(exc.code, str(exc))}")
            except OSError as exc:
                failures.append(f"undo {change.description}: {_cause(exc.errno, str(exc))}")
        if failures:
            raise NetConfError("; ".join(failures))

    # -- changes -------------------------------------------------------------------------

    def link_up(self, ifname: str) -> bool:
        """Bring ``ifname`` up; True if it was down (and undo will bring it down)."""
        ipr = self._open_ipr()
        index, link = self._link(ifname)
        if link["flags"] & IFF_UP:
            return False
        self._do(f"bring {ifname} up", ipr.link, "set", index=index, state="up")
        self._record(f"link {ifname} up", ipr.link, "set", index=index, state="down")
        return True

    def set_mtu(self, ifname: str, mtu: int) -> bool:
        """Set the MTU of ``ifname``; True if it changed (undo restores the old one)."""
        ipr = self._open_ipr()
        index, link = self._link(ifname)
        old = link.get_attr("IFLA_MTU")
        if old == mtu:
            return False
        self._do(f"set MTU {mtu} on {ifname}", ipr.link, "set", index=index, mtu=mtu)
        self._record(f"mtu {ifname} {old} -> {mtu}", ipr.link, "set", index=index, mtu=old)
        return True

    def add_address(self, ifname: str, cidr: str) -> bool:
        """Add ``cidr`` (``10.8.0.2/24``) to ``ifname``; False if it was already there."""
        try:
            iface = ipaddress.ip_interface(cidr)
        except ValueError as exc:
            raise ValueError(f"invalid interface address {cidr!r}: {exc}") from None
        ipr = self._open_ipr()
        index, _ = self._link(ifname)
        address, prefixlen = str(iface.ip), iface.network.prefixlen
        if self._has_address(index, iface):
            return False
        what = f"add address {cidr} to {ifname}"
        try:
            ipr.addr("add", index=index, address=address, prefixlen=prefixlen)
        except NetlinkError as exc:
            if exc.code == errno.EEXIST:
                return False
            raise self._error(what, exc) from exc
        self._record(
            f"address {cidr} on {ifname}",
            ipr.addr,
            "del",
            index=index,
            address=address,
            prefixlen=prefixlen,
        )
        return True

    def add_route(
        self,
        dst_cidr: str,
        ifname: str | None = None,
        gateway: str | None = None,
        table: int | None = None,
    ) -> bool:
        """Route ``dst_cidr`` through ``ifname`` and/or ``gateway`` (in ``table``).

        False if an identical route already exists (left alone). A different route for
        the same destination is an error: it is not replaced.
        """
        net, gw = _route_target(dst_cidr, ifname, gateway)
        ipr = self._open_ipr()
        index = self._link(ifname)[0] if ifname is not None else None
        spec = _route_spec(net, index, gw, table)
        via = " ".join(
            p for p in (f"dev {ifname}" if ifname else "", f"via {gw}" if gw else "") if p
        )
        in_table = f" table {table}" if table is not None else ""
        what = f"add route {net} {via}{in_table}"
        try:
            ipr.route("add", **spec)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise self._error(what, exc) from exc
            if self._has_route(net, index, gw, table):
                return False
            raise NetConfError(
                f"cannot {what}: a different route for {net} already exists"
                f"{self._where()}; not replacing it",
                exc.code,
            ) from exc
        self._record(f"route {net} {via}{in_table}", ipr.route, "del", **spec)
        return True

    # -- helpers -------------------------------------------------------------------------

    def _open_ipr(self) -> IPRoute:
        if self._ipr is None:
            raise RuntimeError("HostConfig is not open: use it as a context manager")
        return self._ipr

    def _where(self) -> str:
        return f" in network namespace {self.netns!r}" if self.netns else ""

    def _error(self, what: str, exc: NetlinkError) -> NetConfError:
        return NetConfError(f"cannot {what}{self._where()}: {_cause(exc.code, str(exc))}", exc.code)

    def _do(self, what: str, func: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        try:
            func(*args, **kwargs)
        except NetlinkError as exc:
            raise self._error(what, exc) from exc

    def _record(
        self, description: str, func: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> None:
        self._changes.append(_Change(description, lambda: func(*args, **kwargs)))

    def _link(self, ifname: str) -> tuple[int, Any]:
        ipr = self._open_ipr()
        indexes = ipr.link_lookup(ifname=ifname)
        if not indexes:
            raise NetConfError(f"no such interface {ifname!r}{self._where()}", errno.ENODEV)
        index = indexes[0]
        try:
            return index, ipr.link("get", index=index)[0]
        except NetlinkError as exc:
            raise self._error(f"read interface {ifname!r}", exc) from exc

    def _has_address(
        self, index: int, iface: ipaddress.IPv4Interface | ipaddress.IPv6Interface
    ) -> bool:
        for msg in self._open_ipr().addr("dump", index=index):
            address = msg.get_attr("IFA_ADDRESS")
            if (
                address is not None
                and msg["prefixlen"] == iface.network.prefixlen
                and ipaddress.ip_address(address) == iface.ip
            ):
                return True
        return False

    def _has_route(
        self,
        net: ipaddress.IPv4Network | ipaddress.IPv6Network,
        index: int | None,
        gw: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
        table: int | None,
    ) -> bool:
        family = socket.AF_INET6 if net.version == 6 else socket.AF_INET
        wanted_table = MAIN_TABLE if table is None else table
        for msg in self._open_ipr().route("dump", family=family):
            if (msg.get_attr("RTA_TABLE") or msg["table"]) != wanted_table:
                continue
            if msg["dst_len"] != net.prefixlen:
                continue
            dst = msg.get_attr("RTA_DST")
            if net.prefixlen and (dst is None or ipaddress.ip_address(dst) != net.network_address):
                continue
            if index is not None and msg.get_attr("RTA_OIF") != index:
                continue
            msg_gw = msg.get_attr("RTA_GATEWAY")
            if (None if msg_gw is None else ipaddress.ip_address(msg_gw)) != gw:
                continue
            return True
        return False
