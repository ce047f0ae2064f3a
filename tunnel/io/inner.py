"""The inner side of the client: where tunnelled IP packets come from and go to.

:class:`TunLike` is what the client loop needs from it. Two implementations:

* :class:`KernelTun`: a real TUN device (:class:`tunnel.io.tun.TunDevice`) configured
  with :class:`tunnel.io.netconf.HostConfig` (MTU, address, link up, routes). All netlink
  work runs on one private worker thread, never on the asyncio loop (pyroute2's
  synchronous API cannot run inside a running loop): ``setup`` before the loop starts,
  the address assignment from the gateway while it runs, ``teardown`` after it stopped,
  undoing everything in reverse order (also after an engine crash).
* :class:`MemoryInner`: no device at all; a built-in traffic source sends ICMP echo
  requests to the gateway's inner address at a configurable rate and counts the
  replies (the demo and the engine tests use it; no root needed).

The ICMP helpers at the bottom build and answer echo packets (the demo gateway and the
tests use :func:`echo_reply` to play the far end).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import os
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from tunnel.io.netconf import HostConfig
from tunnel.io.tun import IPV6_MIN_MTU, TunDevice, set_ipv6

ICMP_ECHO_REQUEST: Final = 8
ICMP_ECHO_REPLY: Final = 0
IPPROTO_ICMP: Final = 1

MEMORY_BACKLOG: Final = 1024
"""Generated packets waiting for the loop; beyond this the source counts an overflow."""

MEMORY_TICK_S: Final = 0.01
"""Shortest interval of the traffic source's timer (coarser rates tick at 1/rate)."""

MEMORY_RECENT: Final = 256
"""Packets written to the memory inner side that stay inspectable (tests, demo)."""


class TunLike(Protocol):
    """The client loop's view of the inner side (a TUN device or its memory twin)."""

    name: str
    """Interface name (``jvpn0``) or ``memory``."""

    def setup(self) -> None:
        """Make the host changes (create, configure); called before the loop starts."""

    def start(self, loop: asyncio.AbstractEventLoop, readable: Callable[[], None]) -> None:
        """Register with the running loop; call ``readable()`` when packets wait."""

    def read_batch(self, max_n: int) -> list[bytes]:
        """Packets from the host into the tunnel, at most ``max_n``; [] when none wait."""

    def write_batch(self, packets: Sequence[bytes]) -> int:
        """Packets from the tunnel to the host; returns how many were accepted."""

    def set_inner_address(
        self, address: str, prefix: int, gateway: str, mtu: int, *, address6: str = ""
    ) -> concurrent.futures.Future[None] | None:
        """The gateway assigned the inner address (and ``address6``, IPv6 ``address/prefix``,
        when it routes IPv6); a Future when work runs elsewhere."""

    def stop(self) -> None:
        """Unregister from the loop (the loop is still running)."""

    def teardown(self) -> None:
        """Undo every host change, newest first; idempotent, also after a crash."""


# -- the kernel TUN --------------------------------------------------------------------


class KernelTun:
    """A TUN device plus the reversible host configuration around it.

    ``address`` (``10.66.0.2/24``) is configured at setup when given; otherwise the
    gateway's assignment is configured when the session is created. The same holds for
    ``address6`` (``fd00:6a76::2/64``), the inner IPv6 address. IPv6 is switched on,
    quietly (no link-local address, router solicitations or MLD reports: only the inner
    address is used), once the device has an inner IPv6 address, and off until then (and
    for good in a session without one). ``routes`` (CIDRs) go through the device once it
    has an address of their family. The sysctl settings vanish with the device.
    """

    def __init__(
        self,
        name: str = "jvpn%d",
        mtu: int = 1420,
        *,
        address: str | None = None,
        address6: str | None = None,
        routes: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.mtu = mtu
        self.address = address
        self.address6 = address6
        self.routes = tuple(routes)
        self._tun: TunDevice | None = None
        self._host: HostConfig | None = None
        self._worker: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._routed: set[int] = set()
        """IP versions whose routes are in place."""

    # -- host changes, on the worker thread ----------------------------------------------

    def _run(self, fn: Callable[[], None]) -> None:
        if self._worker is None:
            self._worker = concurrent.futures.ThreadPoolExecutor(1, "jvpn-netconf")
        self._worker.submit(fn).result()

    def setup(self) -> None:
        self._run(self._setup)

    def _setup(self) -> None:
        tun = TunDevice(self.name, self.mtu).open()
        self._tun = tun
        self.name = tun.name
        host = HostConfig().open()
        self._host = host
        set_ipv6(tun.name, False)  # on with an inner IPv6 address (_add_address6)
        if self.address is not None:
            host.add_address(tun.name, self.address)
        ipv6 = self.address6 is not None and self._add_address6(self.address6)
        host.link_up(tun.name)
        if self.address is not None:
            self._add_routes(4)
        if ipv6:
            self._add_routes(6)

    def _add_address6(self, cidr: str) -> bool:
        """IPv6 on, then the inner IPv6 address; False (nothing done) where the device
        cannot have IPv6 (MTU below 1280, no IPv6 in the kernel)."""
        assert self._host is not None and self._tun is not None
        if self.mtu < IPV6_MIN_MTU or not set_ipv6(self._tun.name, True):
            return False
        self._host.add_address(self._tun.name, cidr)
        return True

    def _add_routes(self, version: int) -> None:
        assert self._host is not None and self._tun is not None
        if version not in self._routed:
            self._routed.add(version)
            for cidr in self.routes:
                if ipaddress.ip_network(cidr).version == version:
                    self._host.add_route(cidr, ifname=self._tun.name)

    def set_inner_address(
        self, address: str, prefix: int, gateway: str, mtu: int, *, address6: str = ""
    ) -> concurrent.futures.Future[None] | None:
        if self._worker is None:
            return None
        ipv4 = self.address is None
        ipv6 = self.address6 is None and bool(address6)
        if not ipv4 and not ipv6:
            return None
        if ipv4:
            self.address = f"{address}/{prefix}"
        if ipv6:
            self.address6 = address6

        def configure() -> None:
            assert self._host is not None and self._tun is not None
            if ipv4:
                self._host.add_address(self._tun.name, f"{address}/{prefix}")
                self._add_routes(4)
            if ipv6 and self._add_address6(address6):
                self._add_routes(6)

        return self._worker.submit(configure)

    def teardown(self) -> None:
        if self._worker is None:
            return
        try:
            self._run(self._teardown)
        finally:
            self._worker.shutdown(wait=True)
            self._worker = None

    def _teardown(self) -> None:
        host, self._host = self._host, None
        tun, self._tun = self._tun, None
        try:
            if host is not None:
                try:
                    host.undo()  # routes, link state, addresses: newest first
                finally:
                    host.close()
        finally:
            if tun is not None:
                tun.close()  # the device was created first: removed last

    # -- data, on the loop thread -----------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop, readable: Callable[[], None]) -> None:
        assert self._tun is not None, "setup() first"
        self._loop = loop
        loop.add_reader(self._tun.fileno(), readable)

    def stop(self) -> None:
        if self._loop is not None and self._tun is not None and not self._tun.closed:
            self._loop.remove_reader(self._tun.fileno())
        self._loop = None

    def read_batch(self, max_n: int) -> list[bytes]:
        return [] if self._tun is None else self._tun.read_batch(max_n)

    def write_batch(self, packets: Sequence[bytes]) -> int:
        return 0 if self._tun is None else self._tun.write_batch(list(packets))


# -- the memory twin -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InnerStats:
    """Counters of the memory traffic source."""

    generated: int
    """Echo requests created."""
    overflow: int
    """Requests discarded because the loop did not take them in time."""
    received: int
    """Packets the tunnel delivered."""
    replies: int
    """Of those, echo replies to our requests."""


class MemoryInner:
    """An inner side without a device: a traffic source and a packet sink.

    With ``rate_pps > 0``, once the session has an inner address it generates ICMP echo
    requests (``payload_size`` bytes of payload) from that address to ``target``
    (default: the gateway's inner address) and counts echo replies. ``inject`` adds any
    packet as if the host had sent it (call it from the loop thread).
    """

    name = "memory"

    def __init__(
        self,
        *,
        rate_pps: float = 20.0,
        payload_size: int = 56,
        target: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_pps < 0:
            raise ValueError(f"rate_pps must be >= 0, not {rate_pps!r}")
        if not 0 <= payload_size <= 1400:
            raise ValueError(f"payload_size must be 0..1400, not {payload_size!r}")
        self.rate_pps = rate_pps
        self.payload_size = payload_size
        self.target = target
        self._clock = clock
        self._src: str | None = None
        self._dst: str | None = None
        self._backlog: deque[bytes] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._readable: Callable[[], None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._t0 = 0.0
        self._base = 0
        self._ident = os.getpid() & 0xFFFF
        self.generated = 0
        self.overflow = 0
        self.received = 0
        self.replies = 0
        self.recent: deque[bytes] = deque(maxlen=MEMORY_RECENT)
        """The last packets the tunnel delivered (newest last)."""

    def stats(self) -> InnerStats:
        return InnerStats(self.generated, self.overflow, self.received, self.replies)

    def setup(self) -> None:
        """Nothing to create."""

    def teardown(self) -> None:
        """Nothing to undo."""

    def start(self, loop: asyncio.AbstractEventLoop, readable: Callable[[], None]) -> None:
        self._loop = loop
        self._readable = readable
        self._arm()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._loop = None

    def set_rate(self, rate_pps: float) -> None:
        """Change the request rate (loop thread); 0 pauses the source."""
        if rate_pps < 0:
            raise ValueError(f"rate_pps must be >= 0, not {rate_pps!r}")
        self.rate_pps = rate_pps
        self._t0 = self._clock()
        self._base = self.generated
        self._arm()

    def set_inner_address(
        self, address: str, prefix: int, gateway: str, mtu: int, *, address6: str = ""
    ) -> concurrent.futures.Future[None] | None:
        self._src = address
        self._dst = self.target or gateway
        self._t0 = self._clock()
        self._base = self.generated
        self._arm()
        return None

    def inject(self, packet: bytes) -> None:
        """The host sends ``packet`` into the tunnel (loop thread)."""
        self._push(packet)
        if self._readable is not None:
            self._readable()

    def _push(self, packet: bytes) -> None:
        if len(self._backlog) >= MEMORY_BACKLOG:
            self.overflow += 1
            return
        self._backlog.append(packet)

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._loop is None or self.rate_pps <= 0 or self._src is None:
            return
        self._timer = self._loop.call_later(max(MEMORY_TICK_S, 1 / self.rate_pps), self._tick)

    def _tick(self) -> None:
        self._timer = None
        assert self._src is not None and self._dst is not None
        due = int((self._clock() - self._t0) * self.rate_pps) + self._base - self.generated
        for _ in range(min(due, MEMORY_BACKLOG)):
            self.generated += 1
            seq = self.generated & 0xFFFF
            payload = struct.pack("!d", self._clock()).ljust(self.payload_size, b"\xa5")
            self._push(icmp_echo(self._src, self._dst, self._ident, seq, payload))
        self._arm()
        if due > 0 and self._readable is not None:
            self._readable()

    def read_batch(self, max_n: int) -> list[bytes]:
        n = min(max_n, len(self._backlog))
        return [self._backlog.popleft() for _ in range(n)]

    def write_batch(self, packets: Sequence[bytes]) -> int:
        for packet in packets:
            self.received += 1
            self.recent.append(packet)
            if is_echo_reply(packet, self._ident):
                self.replies += 1
        return len(packets)


# -- ICMP echo helpers -----------------------------------------------------------------------


def inet_checksum(data: bytes | bytearray) -> int:
    """RFC 1071 ones' complement sum."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _ipv4(src: bytes, dst: bytes, proto: int, payload: bytes, ident: int = 0) -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0, 64, proto, 0, src, dst
    )
    header = header[:10] + struct.pack("!H", inet_checksum(header)) + header[12:]
    return header + payload


def icmp_echo(src: str, dst: str, ident: int, seq: int, payload: bytes) -> bytes:
    """An IPv4 ICMP echo request with valid checksums."""
    body = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, seq) + payload
    body = body[:2] + struct.pack("!H", inet_checksum(body)) + body[4:]
    return _ipv4(
        ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed, IPPROTO_ICMP, body
    )


def _icmp(packet: bytes) -> tuple[int, bytes] | None:
    """(ICMP type, ICMP bytes) of an unfragmented IPv4 ICMP packet, else None."""
    if len(packet) < 28 or packet[0] >> 4 != 4 or packet[9] != IPPROTO_ICMP:
        return None
    ihl = (packet[0] & 0x0F) * 4
    if ihl < 20 or len(packet) < ihl + 8:
        return None
    return packet[ihl], packet[ihl:]


def echo_reply(packet: bytes) -> bytes | None:
    """The echo reply a host would send to ``packet``, or None if it is no echo request."""
    parsed = _icmp(packet)
    if parsed is None or parsed[0] != ICMP_ECHO_REQUEST:
        return None
    body = bytes([ICMP_ECHO_REPLY, 0, 0, 0]) + parsed[1][4:]
    body = body[:2] + struct.pack("!H", inet_checksum(body)) + body[4:]
    return _ipv4(packet[16:20], packet[12:16], IPPROTO_ICMP, body)


def is_echo_reply(packet: bytes, ident: int | None = None) -> bool:
    """True for an IPv4 ICMP echo reply (with identifier ``ident`` if given)."""
    parsed = _icmp(packet)
    if parsed is None or parsed[0] != ICMP_ECHO_REPLY:
        return False
    return ident is None or struct.unpack_from("!H", parsed[1], 4)[0] == ident
