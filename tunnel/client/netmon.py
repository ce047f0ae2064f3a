"""The link monitor: the kernel's word on the client's paths (issue 10 item 3).

A path dies by silence (DESIGN D5: nothing authenticated for ``dead_min_ms`` or a few
RTTs), but when its link goes down the kernel knows at once. :class:`NetlinkMonitor`
listens: a netlink socket joined to the link, address and route groups
(``RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_IPV4_ROUTE |
RTMGRP_IPV6_ROUTE``), non-blocking, read by a reader on the engine's own asyncio loop (no
thread, no second loop). After every batch of kernel messages it judges each path again
(:func:`judge`): the path's device (``device``) up and with carrier, its bind address still
on the host, a route from it to the gateway address the path sends to now, over an
interface that is up and has carrier. A path that stops being usable is reported at once
(``on_down(path_id, detail)``: the session's ``path_down``, reason ``link_down``); one that
becomes usable again too (``on_up``: ``path_up``, probed at once). ``detail`` says what
is wrong and quotes the kernel messages of the batch about the path's interfaces and
address, e.g. ``jvc0-1a2b3c: link down (kernel: RTM_NEWLINK jvc0-1a2b3c down, no
carrier)``.

The judgement asks the kernel (RTM_GETLINK, RTM_GETADDR, RTM_GETROUTE: what ``ip route
get <gateway> from <bind> oif <device>`` asks) instead of mirroring its tables, so a lost
message (the socket's buffer overflowed: ENOBUFS) costs nothing: the next batch judges
from the kernel's current state. The requests go through a second, blocking netlink
socket with a short timeout; the kernel answers them at once.

pyroute2 encodes and parses the messages; its own sockets are not used, because its
synchronous API runs an asyncio loop of its own, which cannot run inside the engine's.
Reading the kernel's tables needs no privilege; where netlink cannot be opened the
monitor does not run and says so once (DIAGNOSTIC ``netlink_unavailable``): the paths
then die by silence only. An engine with a memory inner side (tests, trials) has no
monitor (:func:`monitor_for`).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from pyroute2.netlink import NLM_F_DUMP, NLM_F_MULTI, NLM_F_REQUEST, NLMSG_DONE
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import (
    RTM_GETLINK,
    RTM_GETROUTE,
    RTM_VALUES,
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV4_ROUTE,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_IPV6_ROUTE,
    RTMGRP_LINK,
    rtypes,
)
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.marshal import MarshalRtnl
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from tunnel.core.events import Reason

__all__ = ["KernelView", "Link", "NetlinkMonitor", "RtnlSocket", "WatchedPath", "judge"]

GROUPS: Final = (
    RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE
)
"""What the monitor hears: links, addresses and routes, IPv4 and IPv6."""

IFF_UP: Final = 0x1
"""The interface is administratively up (``ip link set ... up``)."""
IFF_LOWER_UP: Final = 0x10000
"""The driver signals carrier (a veth whose peer is down, an unplugged cable: clear)."""

RCVBUF: Final = 1 << 20
"""Receive buffer of the monitor socket: a burst of route changes fits (an overflow only
costs a re-judgement, see the module docstring)."""

RECV_SIZE: Final = 1 << 16
"""One recv: netlink messages come in datagrams of at most a page or so; 64 KiB holds any."""

MAX_READS: Final = 64
"""Datagrams read per wake-up: a route flood cannot starve the engine loop."""

QUERY_TIMEOUT_S: Final = 1.0
"""A request the kernel does not answer within this (it always answers at once) fails."""

MAX_QUOTED: Final = 3
"""Kernel messages quoted in one detail."""

MAX_DETAIL: Final = 240
"""A detail is cut to this many characters."""

WILDCARDS: Final = frozenset({"0.0.0.0", "::"})

RTN_LOCAL: Final = int(rtypes["RTN_LOCAL"])
"""Route type of an address of the host itself (``ip route get`` says ``local``)."""


@dataclass(frozen=True, slots=True)
class Link:
    """An interface as the kernel reports it."""

    index: int
    name: str
    up: bool
    """Administratively up (IFF_UP)."""
    carrier: bool
    """The driver signals carrier (IFF_LOWER_UP)."""

    def trouble(self) -> str | None:
        """What keeps it from carrying anything, or None."""
        if not self.up:
            return f"{self.name}: link down"
        if not self.carrier:
            return f"{self.name}: carrier lost"
        return None


@dataclass(frozen=True, slots=True)
class WatchedPath:
    """One client path as the monitor judges it."""

    path_id: int
    device: str | None
    """The interface the path's socket is pinned to (``device``), if any."""
    bind: str | None
    """The numeric local address the socket is bound to; None for the OS's choice."""
    remote: Callable[[], str]
    """The gateway address the path sends to now (it may change: D7 re-resolution)."""


class KernelView(Protocol):
    """The questions :func:`judge` asks the kernel (a fake answers them in tests)."""

    @property
    def names(self) -> dict[int, str]:
        """Interface index -> name, of every interface seen (for the details)."""

    def link(self, *, index: int = 0, name: str = "") -> Link | None: ...

    def is_local(self, address: str) -> bool: ...

    def route(self, dst: str, src: str | None, oif: int) -> int | str: ...


def judge(kernel: KernelView, path: WatchedPath) -> tuple[str | None, set[int]]:
    """(what keeps ``path`` from carrying anything or None, the interface indexes it
    uses). The device must exist, be up and have carrier; the bind address must be on
    the host; the kernel must have a route from it to the gateway, over an interface that
    is up and has carrier."""
    indexes: set[int] = set()
    oif = 0
    if path.device is not None:
        link = kernel.link(name=path.device)
        if link is None:
            return f"{path.device}: interface gone", indexes
        indexes.add(link.index)
        if (why := link.trouble()) is not None:
            return why, indexes
        oif = link.index
    if path.bind is not None and not kernel.is_local(path.bind):
        return f"address {path.bind} gone", indexes
    remote = path.remote()
    route = kernel.route(remote, path.bind, oif)
    if isinstance(route, str):
        return f"no route to {remote}: {route}", indexes
    if oif:
        # A pinned socket leaves by its device whatever the lookup names: an IPv6 lookup
        # treats oif as a preference and may answer with another interface's route to the
        # same destination (two paths' endpoint routes, different metrics).
        return None, indexes
    indexes.add(route)
    if route != oif:
        out = kernel.link(index=route)
        if out is None:
            return f"no route to {remote}: its interface is gone", indexes
        if (why := out.trouble()) is not None:
            return why, indexes
    return None, indexes


# -- the netlink socket ---------------------------------------------------------------------


class RtnlSocket:
    """A raw NETLINK_ROUTE socket: pyroute2's encoder and parser, Python's socket."""

    def __init__(self, groups: int = 0, *, timeout: float | None = QUERY_TIMEOUT_S) -> None:
        self.sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
        )
        try:
            if groups:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            self.sock.bind((0, groups))
            self.sock.settimeout(timeout)
        except OSError:
            self.sock.close()
            raise
        self._marshal = MarshalRtnl()
        self._seq = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def read(self) -> tuple[list[Any], bool]:
        """(messages waiting, whether some were lost): non-blocking, bounded per call."""
        out: list[Any] = []
        lost = False
        for _ in range(MAX_READS):
            try:
                data = self.sock.recv(RECV_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                lost = True  # the kernel dropped messages: judge from its state anyway
                continue
            out.extend(self._marshal.parse(data))
        return out, lost

    def request(self, msg: Any, msg_type: int, *, dump: bool = False) -> list[Any]:
        """Send one request, return the kernel's answer (NetlinkError for its refusal)."""
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        seq = self._seq
        header = msg["header"]
        header["type"] = msg_type
        header["flags"] = NLM_F_REQUEST | (NLM_F_DUMP if dump else 0)
        header["sequence_number"] = seq
        header["pid"] = 0
        msg.encode()
        self.sock.send(msg.data)
        answer: list[Any] = []
        while True:
            for reply in self._marshal.parse(self.sock.recv(RECV_SIZE)):
                if reply["header"]["sequence_number"] != seq:
                    continue
                if reply["header"].get("error") is not None:
                    raise reply["header"]["error"]
                if reply["header"]["type"] == NLMSG_DONE:
                    return answer
                answer.append(reply)
                if not reply["header"]["flags"] & NLM_F_MULTI:
                    return answer


class NetlinkKernel:
    """:class:`KernelView` over an :class:`RtnlSocket` (blocking, with a timeout)."""

    def __init__(self, rtnl: RtnlSocket) -> None:
        self._rtnl = rtnl
        self.names: dict[int, str] = {}
        """Interface index -> name, of every interface seen (for the details)."""

    def link(self, *, index: int = 0, name: str = "") -> Link | None:
        msg = ifinfmsg()
        msg["index"] = index
        if name:
            msg["attrs"] = [("IFLA_IFNAME", name)]
        try:
            (reply,) = self._rtnl.request(msg, RTM_GETLINK)
        except NetlinkError as exc:
            if exc.code in (errno.ENODEV, errno.EINVAL):
                return None
            raise
        link = link_of(reply)
        self.names[link.index] = link.name
        return link

    def is_local(self, address: str) -> bool:
        """The host has ``address`` (the kernel routes it to itself: what a socket may be
        bound to, an assigned address or one of a local route like 127.0.0.0/8)."""
        try:
            (reply,) = self._rtnl.request(_route_query(address, None, 0), RTM_GETROUTE)
        except NetlinkError:
            return False
        return int(reply["type"]) == RTN_LOCAL

    def route(self, dst: str, src: str | None, oif: int) -> int | str:
        try:
            (reply,) = self._rtnl.request(_route_query(dst, src, oif), RTM_GETROUTE)
        except NetlinkError as exc:
            return str(exc.args[1] if len(exc.args) > 1 else exc)
        out = reply.get_attr("RTA_OIF")
        return int(out) if out is not None else "the route names no interface"


def _route_query(dst: str, src: str | None, oif: int) -> Any:
    """RTM_GETROUTE for ``dst`` (from ``src``, out of ``oif``): ``ip route get``."""
    target = ipaddress.ip_address(dst)
    msg = rtmsg()
    msg["family"] = socket.AF_INET6 if target.version == 6 else socket.AF_INET
    msg["dst_len"] = target.max_prefixlen
    attrs: list[tuple[str, Any]] = [("RTA_DST", str(target))]
    if src is not None:
        attrs.append(("RTA_SRC", src))
        msg["src_len"] = target.max_prefixlen
    if oif:
        attrs.append(("RTA_OIF", oif))
    msg["attrs"] = attrs
    return msg


def link_of(msg: Any) -> Link:
    flags = int(msg["flags"])
    name = msg.get_attr("IFLA_IFNAME") or f"if{msg['index']}"
    return Link(int(msg["index"]), name, bool(flags & IFF_UP), bool(flags & IFF_LOWER_UP))


# -- what the kernel said ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Said:
    """One kernel message, summarised for a detail: what it is about and its text."""

    index: int
    """The interface it concerns (0: none)."""
    address: str
    """The address it concerns (address messages), else empty."""
    text: str
    rank: int = 0
    """Which to quote first: links (0), then addresses (1), then routes (2)."""


def summarise(msg: Any, names: dict[int, str]) -> Said | None:
    """A link, address or route message as one line; None for anything else."""
    event = RTM_VALUES.get(msg["header"]["type"], "")
    if isinstance(msg, ifinfmsg):
        link = link_of(msg)
        names[link.index] = link.name
        state = "up" if link.up else "down"
        carrier = "" if link.carrier or not link.up else ", no carrier"
        gone = " (removed)" if event == "RTM_DELLINK" else ""
        return Said(link.index, "", f"{event} {link.name} {state}{carrier}{gone}")
    if isinstance(msg, ifaddrmsg):
        index = int(msg["index"])
        address = str(msg.get_attr("IFA_ADDRESS") or "")
        where = names.get(index, f"if{index}")
        return Said(index, address, f"{event} {address}/{msg['prefixlen']} on {where}", 1)
    if isinstance(msg, rtmsg):
        index = int(msg.get_attr("RTA_OIF") or 0)
        dst = f"{msg.get_attr('RTA_DST') or 'default'}/{msg['dst_len']}"
        return Said(index, "", f"{event} {dst} dev {names.get(index, f'if{index}')}", 2)
    return None


def detail_for(why: str, said: Iterable[Said], indexes: set[int], bind: str | None) -> str:
    """``why`` with the kernel messages about the path's interfaces or address quoted."""
    about = [s for s in said if s.index in indexes or (bind and s.address == bind)]
    quoted = list(dict.fromkeys(s.text for s in sorted(about, key=lambda s: s.rank)))
    text = why if not quoted else f"{why} (kernel: {'; '.join(quoted[:MAX_QUOTED])})"
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 3] + "..."


# -- the monitor -----------------------------------------------------------------------------


class NetlinkMonitor:
    """Judges every watched path after each batch of kernel messages; reports changes.

    ``on_down(path_id, detail)`` when a usable path stops being usable (also at start),
    ``on_up(path_id, detail)`` when it becomes usable again, ``report(reason, detail)``
    for the monitor's own trouble (DIAGNOSTIC). Runs on the loop given to :meth:`start`.
    """

    def __init__(
        self,
        paths: Sequence[WatchedPath],
        *,
        on_down: Callable[[int, str], None],
        on_up: Callable[[int, str], None],
        report: Callable[[Reason, str], None],
        enabled: bool = True,
        kernel: KernelView | None = None,
        on_batch: Callable[[], None] | None = None,
    ) -> None:
        """``kernel``: judge against this instead of netlink (tests: without sockets, call
        :meth:`judge_all` directly). ``on_batch``: called after every judgement (the
        automatic paths follow the interfaces then)."""
        self._watched: dict[int, WatchedPath] = {p.path_id: p for p in paths}
        self._on_batch = on_batch
        self.enabled = enabled
        """False: :meth:`start` does nothing (an engine without kernel paths to watch)."""
        self._on_down = on_down
        self._on_up = on_up
        self._report = report
        self._events: RtnlSocket | None = None
        self._query: RtnlSocket | None = None
        self._kernel: KernelView | None = kernel
        self._loop: asyncio.AbstractEventLoop | None = None
        self.down: dict[int, str] = {}
        """Path id -> why the kernel says it cannot carry anything (paths judged down)."""
        self.indexes: dict[int, set[int]] = {}
        """Path id -> the interfaces it used at its last judgement."""
        self.batches = 0
        """Batches of kernel messages judged (for tests and diagnostics)."""

    @property
    def running(self) -> bool:
        return self._events is not None

    @property
    def paths(self) -> tuple[WatchedPath, ...]:
        return tuple(self._watched.values())

    def watch(self, path: WatchedPath) -> None:
        """Judge ``path`` too from now on (it is usable now: it was just added)."""
        self._watched[path.path_id] = path
        self.down.pop(path.path_id, None)

    def unwatch(self, path_id: int) -> None:
        """Forget ``path_id`` (it was removed)."""
        self._watched.pop(path_id, None)
        self.down.pop(path_id, None)
        self.indexes.pop(path_id, None)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Open the sockets, listen on ``loop``, judge every path once (loop thread)."""
        if not self.enabled:
            return
        try:
            self._events = RtnlSocket(GROUPS, timeout=0.0)
            self._query = RtnlSocket()
        except OSError as exc:
            self.stop()
            self._report(
                Reason.NETLINK_UNAVAILABLE,
                f"link monitor off: cannot open a netlink socket ({exc.strerror or exc});"
                " paths die by silence only",
            )
            return
        self._kernel = NetlinkKernel(self._query)
        self._loop = loop
        loop.add_reader(self._events.fileno(), self._readable)
        self.judge_all(())

    def stop(self) -> None:
        """Stop listening and close the sockets. Idempotent."""
        events, self._events = self._events, None
        if events is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(events.fileno())
            events.close()
        query, self._query = self._query, None
        if query is not None:
            query.close()
        self._loop = None

    def _readable(self) -> None:
        events, kernel = self._events, self._kernel
        if events is None or kernel is None:
            return
        try:
            messages, _lost = events.read()
        except OSError as exc:
            self._fail(f"reading the kernel's messages failed: {exc.strerror or exc}")
            return
        said = [s for m in messages if (s := summarise(m, kernel.names)) is not None]
        if said or _lost:
            self.judge_all(said)

    def judge_all(self, said: Sequence[Said]) -> None:
        """Judge every path now, against the kernel's current state; report the changes,
        quoting ``said`` (the batch of kernel messages that prompted it)."""
        kernel = self._kernel
        assert kernel is not None
        self.batches += 1
        for path in self.paths:
            try:
                why, indexes = judge(kernel, path)
            except (OSError, NetlinkError, ValueError) as exc:  # ValueError: cannot encode
                self._fail(f"asking the kernel about path {path.path_id} failed: {exc}")
                return
            # quote what the kernel said about the interfaces it used before, too (a route
            # that is gone no longer names its interface)
            before = self.indexes.get(path.path_id, set())
            self.indexes[path.path_id] = indexes
            self._apply(path, why, said, indexes | before)
        if self._on_batch is not None:
            self._on_batch()

    def _apply(
        self, path: WatchedPath, why: str | None, said: Sequence[Said], indexes: set[int]
    ) -> None:
        pid = path.path_id
        if why is not None and pid not in self.down:
            self.down[pid] = why
            self._on_down(pid, detail_for(why, said, indexes, path.bind))
        elif why is None and pid in self.down:
            del self.down[pid]
            assert self._kernel is not None
            names = ", ".join(sorted(self._kernel.names.get(i, f"if{i}") for i in indexes))
            back = f"{names}: usable again (route to {path.remote()})"
            self._on_up(pid, detail_for(back, said, indexes, path.bind))

    def _fail(self, why: str) -> None:
        """The monitor cannot go on: say so once, stop (the paths die by silence only)."""
        self.stop()
        self._report(Reason.NETLINK_UNAVAILABLE, f"link monitor stopped: {why}")
