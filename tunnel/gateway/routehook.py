"""Inner routing follows the owner: tell the network which node serves a session now.

In a gateway cluster (docs/cluster.md) a client's inner address must reach the node that
owns its session. :class:`RouteHook` is told when this node starts serving a session
(:meth:`RouteHook.acquired`) and when it stops (:meth:`RouteHook.released`), with the
session's inner addresses, and makes the network follow, by one of two mechanisms
(docs/cluster.md, "Inner routing follows the owner"):

- :class:`CommandHook`, an operator's program (``[cluster] route_hook``), run as
  ``cmd acquire|release <session id> <inner address>...`` with a timeout, in the manner
  of keepalived's notify scripts: it can update a router, a BGP speaker, a cloud route
  table;
- :class:`ProxyNeighbour` (``route_mode = "proxy_neighbour"`` on ``route_device``): on a
  segment shared by the nodes, a proxy neighbour entry for each inner address on that
  device (the kernel answers ARP / neighbour solicitations for it with the device's MAC,
  because its route to the address goes into the gateway's TUN) and one gratuitous ARP
  (IPv4) or unsolicited neighbour advertisement (IPv6), so that the hosts and switches of
  the segment learn the new owner at once, as keepalived does for a virtual address.
  Released: the entries are deleted.

The work never runs on the gateway's loop: one bounded queue, one worker thread, in
order (an acquire and a later release of one session are never swapped). A failure (an
exit status, a timeout, a netlink error, a full queue) is counted and handed to
``on_result`` (the runtime turns it into a DIAGNOSTIC ``route_hook_failed`` event); it
never stops the node.
"""

from __future__ import annotations

import errno
import ipaddress
import queue
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from tunnel.core.events import Event, SessionCreated, SessionTerminated
from tunnel.core.gateway_session import ClientEntry
from tunnel.observability.metrics import MetricFamily, labelled

ACQUIRE: Final = "acquire"
RELEASE: Final = "release"

ROUTE_KEYS: Final = frozenset({"route_hook", "route_hook_timeout_s", "route_mode", "route_device"})
"""The keys of ``[cluster]`` this module reads (docs/cluster.md)."""
ROUTE_MODES: Final = ("none", "proxy_neighbour")
DEFAULT_HOOK_TIMEOUT_S: Final = 5.0
"""A notify program that has not finished by then is killed and counted as failed."""
QUEUE_SIZE: Final = 4096
"""Route changes waiting for the worker; beyond this they are counted as failed."""
HOOK_OUTPUT_MAX: Final = 200
"""Characters of a failed program's stderr kept in its result (one line for an event)."""

ETH_P_ARP: Final = 0x0806
ETH_P_IPV6: Final = 0x86DD
ETH_BROADCAST: Final = b"\xff" * 6
ALL_NODES_MAC: Final = bytes.fromhex("333300000001")
ALL_NODES: Final = ipaddress.IPv6Address("ff02::1").packed
ICMPV6_NA: Final = 136
NA_ROUTER_OVERRIDE: Final = 0xA0000000
"""Neighbour advertisement flags R (the node forwards) and O (override the cache)."""


class RouteHookError(Exception):
    """One route change failed (the message says how); reported, never fatal."""


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """``[cluster]`` route keys: an operator hook, the built-in mechanism, or both."""

    hook: Path | None = None
    """``route_hook``: the program run on acquire and release."""
    hook_timeout_s: float = DEFAULT_HOOK_TIMEOUT_S
    mode: str = "none"
    """``route_mode``: ``none`` or ``proxy_neighbour``."""
    device: str = ""
    """``route_device``: the shared segment's interface (proxy_neighbour)."""

    @property
    def enabled(self) -> bool:
        return self.hook is not None or self.mode != "none"


@dataclass(frozen=True, slots=True)
class RouteResult:
    """The outcome of one route change (handed to ``on_result`` on the worker thread)."""

    action: str
    """``acquire`` or ``release``."""
    session_id: str
    inner: tuple[str, ...]
    ok: bool
    detail: str = ""
    """Why it failed (empty when it worked)."""
    elapsed_s: float = 0.0


def parse_route_config(
    file: Path, table: Mapping[str, Any] | None, error: Callable[[str, object, str], Exception]
) -> RouteConfig:
    """The route keys of ``[cluster]`` (other keys are left to their reader). ``error(key,
    value, message)`` builds the configuration error to raise."""
    if not table:
        return RouteConfig()
    hook_raw = table.get("route_hook")
    hook: Path | None = None
    if hook_raw is not None:
        if not isinstance(hook_raw, str) or not hook_raw:
            raise error("route_hook", hook_raw, "must be the path of a program")
        hook = Path(hook_raw) if Path(hook_raw).is_absolute() else file.parent / hook_raw
    timeout = table.get("route_hook_timeout_s", DEFAULT_HOOK_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 60:
        raise error("route_hook_timeout_s", timeout, "must be a number of seconds, 0 < t <= 60")
    mode = table.get("route_mode", "none")
    if mode not in ROUTE_MODES:
        raise error("route_mode", mode, f"must be one of: {', '.join(ROUTE_MODES)}")
    device = table.get("route_device", "")
    if not isinstance(device, str) or (mode == "proxy_neighbour" and not device):
        raise error("route_device", device, "names the shared segment's interface (eth0)")
    return RouteConfig(hook, float(timeout), str(mode), device)


class RouteMechanism(Protocol):
    """One way to make the network follow the owner; raises RouteHookError on failure."""

    def apply(self, action: str, session_id: str, inner: Sequence[str]) -> None: ...

    def clear(self, inner: Sequence[str]) -> None:
        """At start: undo what a killed earlier process may have left for ``inner``."""


class CommandHook:
    """The operator's program: ``cmd acquire|release <session id> <inner address>...``."""

    def __init__(self, command: Path, timeout_s: float = DEFAULT_HOOK_TIMEOUT_S) -> None:
        self.command = command
        self.timeout_s = timeout_s

    def apply(self, action: str, session_id: str, inner: Sequence[str]) -> None:
        argv = [str(self.command), action, session_id, *inner]
        try:
            proc = subprocess.run(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, timeout=self.timeout_s, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise RouteHookError(f"{self.command} timed out after {self.timeout_s:g} s") from None
        except OSError as exc:
            raise RouteHookError(f"{self.command}: {exc.strerror or exc}") from None
        if proc.returncode != 0:
            text = " ".join(proc.stderr.decode("utf-8", "replace").split())[:HOOK_OUTPUT_MAX]
            raise RouteHookError(f"{self.command} exited {proc.returncode}: {text}".rstrip(": "))

    def clear(self, inner: Sequence[str]) -> None:
        return None  # the program keeps its own state


class ProxyNeighbour:
    """Proxy neighbour entries on ``device`` plus a gratuitous ARP / unsolicited NA.

    The kernel answers for a proxied address only where forwarding is on and its route to
    the address leaves by another device (the gateway's TUN); IPv6 also needs
    ``proxy_ndp`` on the device (docs/cluster.md). pyroute2, never ``ip`` strings.
    """

    def __init__(self, device: str, announce: bool = True) -> None:
        self.device = device
        self.announce = announce

    def apply(self, action: str, session_id: str, inner: Sequence[str]) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError
        from pyroute2.netlink.rtnl.ndmsg import NTF_PROXY

        with IPRoute() as ipr:
            index, mac = self._link(ipr)
            for addr in inner:
                family = socket.AF_INET6 if ":" in addr else socket.AF_INET
                try:
                    if action == ACQUIRE:
                        ipr.neigh("replace", dst=addr, ifindex=index, flags=NTF_PROXY,
                                  family=family)  # fmt: skip
                    else:
                        ipr.neigh("del", dst=addr, ifindex=index, flags=NTF_PROXY, family=family)
                except NetlinkError as exc:
                    if not (action == RELEASE and exc.code == errno.ENOENT):
                        raise RouteHookError(f"proxy {addr} on {self.device}: {exc}") from None
            if action == ACQUIRE and self.announce:
                source6 = _link_local(ipr, index)
                for addr in inner:
                    self._announce(addr, mac, source6)

    def clear(self, inner: Sequence[str]) -> None:
        for addr in inner:
            self.apply(RELEASE, "", [addr])

    def _link(self, ipr: Any) -> tuple[int, bytes]:
        found = ipr.link_lookup(ifname=self.device)
        if not found:
            raise RouteHookError(f"no device {self.device}")
        link = ipr.get_links(found[0])[0]
        mac = link.get_attr("IFLA_ADDRESS") or "00:00:00:00:00:00"
        return int(found[0]), bytes.fromhex(mac.replace(":", ""))

    def _announce(self, addr: str, mac: bytes, source6: bytes | None) -> None:
        ip = ipaddress.ip_address(addr)
        if ip.version == 4:
            frame, proto = garp_frame(mac, ip.packed), ETH_P_ARP
        else:
            frame, proto = unsolicited_na_frame(mac, ip.packed, source6 or ip.packed), ETH_P_IPV6
        try:
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(proto)) as sock:
                sock.bind((self.device, proto))
                sock.send(frame)
        except OSError as exc:
            raise RouteHookError(f"announce {addr} on {self.device}: {exc.strerror}") from None


def _link_local(ipr: Any, index: int) -> bytes | None:
    """The device's IPv6 link-local address (the source of an NA), if it has one."""
    for msg in ipr.get_addr(family=socket.AF_INET6, index=index):
        text = msg.get_attr("IFA_ADDRESS")
        if text and ipaddress.IPv6Address(text).is_link_local:
            return ipaddress.IPv6Address(text).packed
    return None


def garp_frame(mac: bytes, ip4: bytes) -> bytes:
    """A gratuitous ARP request (sender = target = ``ip4``), broadcast, as keepalived sends:
    every host holding an entry for ``ip4`` replaces its MAC with ``mac``."""
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, ip4, b"\0" * 6, ip4)
    return ETH_BROADCAST + mac + struct.pack("!H", ETH_P_ARP) + arp


def unsolicited_na_frame(mac: bytes, target: bytes, source: bytes) -> bytes:
    """An unsolicited neighbour advertisement (RFC 4861 §7.2.6) for ``target`` with the
    override flag and ``mac`` as target link-layer address, to all nodes, hop limit 255."""
    body = struct.pack("!BBHI16sBB6s", ICMPV6_NA, 0, 0, NA_ROUTER_OVERRIDE, target, 2, 1, mac)
    pseudo = source + ALL_NODES + struct.pack("!I3xB", len(body), 58)
    checksum = _checksum(pseudo + body)
    body = body[:2] + struct.pack("!H", checksum) + body[4:]
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, len(body), 58, 255, source, ALL_NODES)
    return ALL_NODES_MAC + mac + struct.pack("!H", ETH_P_IPV6) + ip6 + body


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


_STOP: Final = object()


class RouteHook:
    """Runs route changes off the gateway's loop, in order; see the module docstring.

    ``acquired``/``released`` only enqueue (any thread, never block). ``on_result`` runs
    on the worker thread for every change (a runtime forwards failures to its loop).
    """

    def __init__(
        self,
        mechanisms: Sequence[RouteMechanism],
        *,
        on_result: Callable[[RouteResult], None] | None = None,
        queue_size: int = QUEUE_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.mechanisms = tuple(mechanisms)
        self.on_result = on_result
        self._clock = clock
        self._queue: queue.Queue[object] = queue.Queue(queue_size)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.done = 0
        """Route changes that worked."""
        self.failed = 0
        """Route changes that failed (a mechanism raised, or the queue was full)."""

    @classmethod
    def from_config(
        cls, config: RouteConfig, *, on_result: Callable[[RouteResult], None] | None = None
    ) -> RouteHook | None:
        """The hook ``[cluster]`` asks for, or None when it asks for none."""
        mechanisms: list[RouteMechanism] = []
        if config.mode == "proxy_neighbour":
            mechanisms.append(ProxyNeighbour(config.device))
        if config.hook is not None:
            mechanisms.append(CommandHook(config.hook, config.hook_timeout_s))
        return cls(mechanisms, on_result=on_result) if mechanisms else None

    def report_to(self, on_result: Callable[[RouteResult], None]) -> None:
        """Hand every result to ``on_result`` (before :meth:`start`)."""
        self.on_result = on_result

    def start(self, stale: Iterable[str] = ()) -> None:
        """Start the worker; first it clears what a killed process may have left for the
        ``stale`` inner addresses (a node that restarts must not answer for sessions it
        no longer owns)."""
        if self._thread is not None:
            return
        addresses = list(stale)
        if addresses:
            self._queue.put_nowait(("clear", "", tuple(addresses)))
        self._thread = threading.Thread(target=self._run, name="jvpn-route-hook", daemon=True)
        self._thread.start()

    def acquired(self, session_id: str, inner: list[str]) -> None:
        """This node serves ``session_id`` now: make its ``inner`` addresses reach it."""
        self._submit(ACQUIRE, session_id, inner)

    def released(self, session_id: str, inner: list[str]) -> None:
        """This node stopped serving ``session_id``: withdraw what acquire announced."""
        self._submit(RELEASE, session_id, inner)

    def _submit(self, action: str, session_id: str, inner: list[str]) -> None:
        try:
            self._queue.put_nowait((action, session_id, tuple(inner)))
        except queue.Full:
            self._report(RouteResult(action, session_id, tuple(inner), False, "queue full"))

    def close(self, timeout: float = 5.0) -> None:
        """Finish what is queued (bounded by ``timeout``), then stop the worker."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        deadline = self._clock() + timeout
        while True:
            try:
                self._queue.put(_STOP, timeout=0.1)
                break
            except queue.Full:
                if self._clock() >= deadline:
                    break
        thread.join(max(0.0, deadline - self._clock()))

    def metric_families(self) -> list[MetricFamily]:
        """Route changes done and failed, and how many wait (the gateway's /metrics)."""
        with self._lock:
            done, failed = self.done, self.failed
        return [
            labelled("jvpn_route_hook_changes_total", "Route changes (acquire, release) run "
                     "by the route hook, by outcome.", "counter", "outcome",
                     {"ok": done, "failed": failed}),
            labelled("jvpn_route_hook_queued", "Route changes waiting for the worker.",
                     "gauge", "queue", {"pending": self._queue.qsize()}),
        ]  # fmt: skip

    def wait_idle(self, timeout: float) -> bool:
        """True once every queued change has run (tests, shutdown)."""
        deadline = self._clock() + timeout
        while self._queue.unfinished_tasks and self._clock() < deadline:
            time.sleep(0.01)
        return not self._queue.unfinished_tasks

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                assert isinstance(item, tuple)
                self._one(*item)
            finally:
                self._queue.task_done()

    def _one(self, action: str, session_id: str, inner: tuple[str, ...]) -> None:
        started = self._clock()
        for mechanism in self.mechanisms:
            try:
                if action == "clear":
                    mechanism.clear(inner)
                else:
                    mechanism.apply(action, session_id, inner)
            except Exception as exc:  # a failed change is reported; the node goes on
                elapsed = self._clock() - started
                self._report(RouteResult(action, session_id, inner, False, str(exc), elapsed))
                return
        if action != "clear":  # the start's clean-up is no route change of a session
            self._report(RouteResult(action, session_id, inner, True, "", self._clock() - started))

    def _report(self, result: RouteResult) -> None:
        with self._lock:
            if result.ok:
                self.done += 1
            else:
                self.failed += 1
        if self.on_result is not None:
            self.on_result(result)


class SessionRoutes:
    """Which sessions this node announced, kept from the gateway's events: a session
    created (or resumed, or taken over) here is acquired, a session that ended here is
    released. Loop thread only; the hook does the work on its own thread."""

    def __init__(self, hook: RouteHook, clients: Callable[[], Sequence[ClientEntry]]) -> None:
        self.hook = hook
        self._clients = clients
        self._by_name: tuple[Sequence[ClientEntry], dict[str, ClientEntry]] = ((), {})
        """The client list last seen and its index by name (rebuilt when it is replaced)."""
        self._routed: dict[str, list[str]] = {}
        """Session id -> the inner addresses acquired for it (bounded by the sessions)."""

    @property
    def routed(self) -> dict[str, list[str]]:
        return dict(self._routed)

    def on_event(self, event: Event) -> None:
        if isinstance(event, SessionCreated):
            client = self._client(event.peer)
            addresses = [event.inner_address]
            if client is not None and client.inner_address6:
                addresses.append(client.inner_address6)
            self.acquire(event.session_id, addresses)
        elif isinstance(event, SessionTerminated):
            self.release(event.session_id)

    def _client(self, name: str) -> ClientEntry | None:
        clients = self._clients()
        if clients is not self._by_name[0]:  # a reload replaced the list
            self._by_name = (clients, {c.name: c for c in clients})
        return self._by_name[1].get(name)

    def acquire(self, session_id: str, addresses: list[str]) -> None:
        """This node serves ``session_id`` (created, resumed or taken over here)."""
        if self._routed.get(session_id) == addresses:
            return
        self._routed[session_id] = addresses
        self.hook.acquired(session_id, addresses)

    def release(self, session_id: str) -> None:
        """This node stopped serving ``session_id`` (ended, or handed over)."""
        addresses = self._routed.pop(session_id, None)
        if addresses is not None:
            self.hook.released(session_id, addresses)
