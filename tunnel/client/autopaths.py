"""Paths that follow the machine (issue 10 item 4): ``paths = "auto"`` in client.toml.

A candidate path is one usable local address on one interface, paired with one gateway
endpoint of the same address family. Usable: the interface is up and has carrier, its
name passes ``[auto] include`` and ``exclude`` (fnmatch patterns), it is not the engine's
TUN, and it is not loopback unless an include pattern other than ``*`` names it; the
address is global unicast (not link-local, multicast or unspecified; loopback only as
said) and not tentative or failed (IPv6 duplicate address detection).

At start (before the engine's loop) :func:`start_paths` lists the candidates through
netlink and numbers them 1.. in ``[auto] prefer`` order (interfaces no pattern names come
after, by name). While the session runs, :class:`PathFollower` lists them again after
every batch of kernel messages (the link monitor's, :mod:`tunnel.client.netmon`) and
reconciles: a new candidate gets a socket (bound to its address, pinned to its interface),
joins the runtime, the link monitor and the session (``add_path``: PATH_ADDED, probed at
once, a standby once it answers); one that went away leaves them (``remove_path``: the
active one dies with ``link_down`` and the session recovers elsewhere, then PATH_REMOVED)
and its socket is closed.

Path numbers are the UI's keys 1-9. A candidate keeps its number for the session's life
(interface, address and gateway endpoint name it): when it comes back it gets the same
one, and a number is never given to another candidate. So at most 9 different candidates
can ever be numbered in one session; one more is left out and said so (DIAGNOSTIC, once).
At most the policy's ``max_candidate_count`` are candidates at the same time; the rest
wait (in preference order) until one leaves.
"""

from __future__ import annotations

import asyncio
import fnmatch
import ipaddress
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Final

from pyroute2.netlink.rtnl import RTM_GETADDR, RTM_GETLINK
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from tunnel.client.config import MAX_PATHS, AutoPaths, ClientConfig, PathConfig
from tunnel.client.netmon import (
    IFF_LOWER_UP,
    IFF_UP,
    WILDCARDS,
    NetlinkMonitor,
    RtnlSocket,
    WatchedPath,
)
from tunnel.client.runtime import ClientRuntime, PathTarget
from tunnel.core.client import PathSpec
from tunnel.core.events import Reason
from tunnel.io.inner import KernelTun, TunLike
from tunnel.io.udp import PathError, PathSocket

__all__ = [
    "Candidate", "Endpoint", "EngineWatch", "Interface", "PathFollower", "candidates",
    "start_paths", "tun_names",
]  # fmt: skip

IFF_LOOPBACK: Final = 0x8
IFA_F_DADFAILED: Final = 0x08
IFA_F_TENTATIVE: Final = 0x40
UNUSABLE_ADDRESS_FLAGS: Final = IFA_F_DADFAILED | IFA_F_TENTATIVE
"""An IPv6 address still in (or failed) duplicate address detection cannot be bound."""


@dataclass(frozen=True, slots=True)
class Interface:
    """One local address on one interface, as the kernel lists them."""

    ifname: str
    address: str
    up: bool
    """Up and with carrier."""
    loopback: bool = False
    flags: int = 0
    """The address's IFA_F_* flags."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A gateway endpoint as configured, and the address it resolved to."""

    host: str
    port: int
    remote: str
    """Numeric address (its family pairs it with local addresses)."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """A candidate path: a local address on an interface, to a gateway endpoint."""

    ifname: str
    address: str
    gateway: tuple[str, int]
    """The endpoint as configured (host, port)."""

    @property
    def label(self) -> str:
        host, port = self.gateway
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return f"{self.ifname} {self.address} ({where})"

    def path(self, path_id: int) -> PathConfig:
        return PathConfig(
            path_id, f"{self.ifname} {self.address}", (self.address, 0), self.ifname, self.gateway
        )


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _usable(i: Interface, auto: AutoPaths, skip: Callable[[str], bool]) -> bool:
    if not i.up or skip(i.ifname) or i.flags & UNUSABLE_ADDRESS_FLAGS:
        return False
    if not _matches(i.ifname, auto.include) or _matches(i.ifname, auto.exclude):
        return False
    addr = ipaddress.ip_address(i.address)
    if addr.is_link_local or addr.is_multicast or addr.is_unspecified:
        return False
    return (not i.loopback and not addr.is_loopback) or auto.includes_loopback()


def _rank(ifname: str, prefer: Sequence[str]) -> int:
    return next((n for n, p in enumerate(prefer) if fnmatch.fnmatchcase(ifname, p)), len(prefer))


def candidates(
    interfaces: Iterable[Interface],
    auto: AutoPaths,
    endpoints: Sequence[Endpoint],
    skip: Callable[[str], bool] = lambda name: False,
) -> list[Candidate]:
    """Every usable address paired with every endpoint of its family, in preference order
    (``prefer``, then interface name, then endpoint order, then address)."""
    out = []
    for i in interfaces:
        if not _usable(i, auto, skip):
            continue
        version = ipaddress.ip_address(i.address).version
        for n, e in enumerate(endpoints):
            if ipaddress.ip_address(e.remote).version == version:
                out.append((_rank(i.ifname, auto.prefer), i.ifname, n, i.address, e))
    out.sort(key=lambda row: row[:4])
    return [Candidate(name, address, (e.host, e.port)) for _, name, _, address, e in out]


# -- asking the kernel ---------------------------------------------------------------------------


def list_interfaces(rtnl: RtnlSocket) -> list[Interface]:
    """Every address of every interface, with the interface's state (two netlink dumps)."""
    links: dict[int, tuple[str, int]] = {}
    for msg in rtnl.request(ifinfmsg(), RTM_GETLINK, dump=True):
        links[int(msg["index"])] = (msg.get_attr("IFLA_IFNAME") or "", int(msg["flags"]))
    query = ifaddrmsg()
    query["family"] = socket.AF_UNSPEC
    out = []
    for msg in rtnl.request(query, RTM_GETADDR, dump=True):
        name, flags = links.get(int(msg["index"]), ("", 0))
        address = msg.get_attr("IFA_ADDRESS")
        if not name or address is None:
            continue
        up = flags & (IFF_UP | IFF_LOWER_UP) == IFF_UP | IFF_LOWER_UP
        addr_flags = int(msg.get_attr("IFA_FLAGS") or msg["flags"])
        loopback = bool(flags & IFF_LOOPBACK)
        out.append(Interface(name, str(ipaddress.ip_address(address)), up, loopback, addr_flags))
    return out


def resolve(auto: AutoPaths) -> list[Endpoint]:
    """The gateway endpoints, numeric: a name gives one endpoint per address family it
    has (the first address of each). Raises OSError when a name does not resolve."""
    out = []
    for host, port in auto.gateways:
        try:
            infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_DGRAM)
        except socket.gaierror as exc:
            raise OSError(f"cannot resolve gateway host {host!r}: {exc.strerror}") from None
        seen: set[int] = set()
        for family, *_, sockaddr in infos:
            if family not in seen:
                seen.add(family)
                out.append(Endpoint(host, port, str(sockaddr[0])))
    return out


def start_paths(config: ClientConfig, skip: Callable[[str], bool]) -> ClientConfig:
    """``config`` with the candidate paths of now (``paths = "auto"``), numbered 1.. in
    preference order; unchanged for ``[[path]]`` tables. Raises OSError when there is
    none (the session needs one path to start on)."""
    auto = config.auto
    if auto is None:
        return config
    rtnl = RtnlSocket()
    try:
        found = candidates(list_interfaces(rtnl), auto, resolve(auto), skip)
    finally:
        rtnl.close()
    limit = min(MAX_PATHS, config.policy.max_candidate_count)
    if not found:
        raise OSError('paths = "auto": no usable interface address for any gateway endpoint')
    return replace(config, paths=tuple(c.path(n) for n, c in enumerate(found[:limit], 1)))


# -- while the session runs ------------------------------------------------------------------------


class PathFollower:
    """Keeps the session's paths in step with the machine's interfaces (loop thread).

    ``attach(path, remote)`` opens a path's socket (to the numeric gateway address
    ``remote``) and joins it to the runtime, the link monitor and the session (False: it
    could not, try again at the next batch); ``detach(path_id, detail)`` does the reverse.
    ``report(reason, detail)`` says what cannot be done (DIAGNOSTIC).
    """

    def __init__(
        self,
        config: ClientConfig,
        *,
        attach: Callable[[PathConfig, str], bool],
        detach: Callable[[int, str], None],
        report: Callable[[Reason, str], None],
        skip: Callable[[str], bool],
        endpoints: Sequence[Endpoint] = (),
    ) -> None:
        """``endpoints``: the resolved gateway endpoints (:meth:`start` resolves them)."""
        assert config.auto is not None
        self.auto: AutoPaths = config.auto
        self.limit = min(MAX_PATHS, config.policy.max_candidate_count)
        self._attach = attach
        self._detach = detach
        self._report = report
        self._skip = skip
        self.numbers: dict[Candidate, int] = {}
        """Every candidate ever numbered, with its number (never given to another)."""
        self.current: dict[Candidate, int] = {}
        """The candidates that are paths now."""
        self._told: set[Candidate] = set()
        self._endpoints: list[Endpoint] = list(endpoints)
        self._rtnl: RtnlSocket | None = None
        for p in config.paths:
            c = Candidate(p.device or "", p.bind[0] if p.bind else "", p.gateway)
            self.numbers[c] = self.current[c] = p.path_id

    def start(self) -> None:
        """Resolve the endpoints again and open the netlink socket the listings use."""
        self._endpoints = resolve(self.auto)
        self._rtnl = RtnlSocket()

    def close(self) -> None:
        if self._rtnl is not None:
            self._rtnl.close()
            self._rtnl = None

    def follow(self) -> None:
        """List the interfaces now and :meth:`reconcile` (after :meth:`start`)."""
        if self._rtnl is not None:
            self.reconcile(list_interfaces(self._rtnl))

    def reconcile(self, interfaces: Iterable[Interface]) -> None:
        """Add the new candidates among ``interfaces``, remove the ones that went away."""
        found = candidates(interfaces, self.auto, self._endpoints, self._skip)
        wanted = set(found)
        for c, pid in list(self.current.items()):
            if c not in wanted:
                del self.current[c]
                self._detach(pid, f"{c.ifname}: address {c.address} no longer usable")
        for c in found:
            if c not in self.current and len(self.current) < self.limit:
                self._add(c)

    def _add(self, c: Candidate) -> None:
        pid = self.numbers.get(c) or self._free_number()
        if pid is None:
            if c not in self._told:
                self._told.add(c)
                self._report(
                    Reason.NO_CANDIDATE_TRANSPORTS,
                    f"no path number left for {c.label}: 1-{MAX_PATHS} were all given "
                    "to other paths in this session",
                )
            return
        remote = self._remote(c)
        if remote is not None and self._attach(c.path(pid), remote):
            self.numbers[c] = self.current[c] = pid

    def _remote(self, c: Candidate) -> str | None:
        version = ipaddress.ip_address(c.address).version
        for e in self._endpoints:
            if (e.host, e.port) == c.gateway and ipaddress.ip_address(e.remote).version == version:
                return e.remote
        return None

    def _free_number(self) -> int | None:
        used = set(self.numbers.values())
        return next((n for n in range(1, MAX_PATHS + 1) if n not in used), None)


# -- the engine's watch over its paths ------------------------------------------------------------


def _numeric(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class EngineWatch:
    """The link monitor over an engine's paths and, with ``paths = "auto"``, the follower
    that makes and removes them. The engine calls :meth:`start` on its loop and
    :meth:`stop` when the loop ends; everything else runs on the loop thread.

    The monitor runs only with a kernel TUN (a memory inner side is a test or a trial:
    its paths are not the machine's links). ``remember_name(path_id, host, port, family)``
    tells the engine about an added path whose gateway is a name (D7 re-resolution)."""

    def __init__(
        self,
        config: ClientConfig,
        runtime: ClientRuntime,
        inner: TunLike,
        *,
        report: Callable[[Reason, str], None],
        remember_name: Callable[[int, str, int, int], None],
    ) -> None:
        self.runtime = runtime
        self._report = report
        self._remember_name = remember_name
        enabled = isinstance(inner, KernelTun)
        self.monitor = NetlinkMonitor(
            [self._watched(p) for p in config.paths], on_down=self._down, on_up=self._up,
            report=report, enabled=enabled, on_batch=self._follow,
        )  # fmt: skip
        self.follower: PathFollower | None = None
        if enabled and config.auto is not None:
            self.follower = PathFollower(
                config, attach=self._attach, detach=self._detach, report=report,
                skip=tun_names(config, inner),
            )  # fmt: skip
        self._sockets: list[PathSocket] = []

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        follower = self.follower
        if follower is not None:
            try:
                follower.start()
            except OSError as exc:
                self.follower = None
                self._report(Reason.NETLINK_UNAVAILABLE, f"paths = auto: not following: {exc}")
        self.monitor.start(loop)

    def stop(self) -> None:
        self.monitor.stop()
        if self.follower is not None:
            self.follower.close()
        for sock in self._sockets:
            sock.close()

    def _watched(self, p: PathConfig) -> WatchedPath:
        bind = p.bind[0] if p.bind is not None and p.bind[0] not in WILDCARDS else None
        runtime, pid = self.runtime, p.path_id
        return WatchedPath(pid, p.device, bind, lambda: str(runtime.paths[pid].remote[0]))

    def _down(self, path_id: int, detail: str) -> None:
        session = self.runtime.session
        self.runtime.run_command(lambda now: session.path_down(path_id, detail, now))

    def _up(self, path_id: int, detail: str) -> None:
        session = self.runtime.session
        self.runtime.run_command(lambda now: session.path_up(path_id, detail, now))

    def _follow(self) -> None:
        follower = self.follower
        if follower is None:
            return
        try:
            follower.follow()
        except OSError as exc:
            self.follower = None
            follower.close()
            self._report(Reason.NETLINK_UNAVAILABLE, f"paths = auto: not following: {exc}")

    def _attach(self, p: PathConfig, remote: str) -> bool:
        assert p.bind is not None
        try:
            sock = PathSocket(p.path_id, p.bind, device=p.device)
        except PathError:
            return False  # e.g. the address is not bindable yet: the next batch tries again
        self._sockets.append(sock)
        host, port = p.gateway
        self.runtime.attach_path(PathTarget(p.path_id, sock, (remote, port)))
        self.monitor.watch(self._watched(p))
        if not _numeric(host):
            family = socket.AF_INET6 if ":" in remote else socket.AF_INET
            self._remember_name(p.path_id, host, port, family)
        session = self.runtime.session
        spec = PathSpec(p.path_id, p.label)
        address = p.bind[0]

        def add(now: float) -> None:
            try:
                session.add_path(spec, now, interface=p.device or "", address=address)
            except ValueError as exc:  # the policy's max_candidate_count
                self._report(Reason.NO_CANDIDATE_TRANSPORTS, f"{p.label} not added: {exc}")

        self.runtime.run_command(add)
        return True

    def _detach(self, path_id: int, detail: str) -> None:
        self.monitor.unwatch(path_id)
        session = self.runtime.session
        self.runtime.run_command(lambda now: session.remove_path(path_id, detail, now))
        target = self.runtime.detach_path(path_id)
        if target is not None:
            target.sock.close()


def tun_names(config: ClientConfig, inner: TunLike) -> Callable[[str], bool]:
    """Whether an interface is the engine's TUN (its name, or the configured pattern)."""
    pattern = config.tun_name.replace("%d", "[0-9]*")
    return lambda name: name == inner.name or fnmatch.fnmatchcase(name, pattern)
