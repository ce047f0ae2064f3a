"""The gateway's inner side: a real TUN, or an echo responder that needs no root.

:class:`GatewayTun` is a :class:`~tunnel.io.tun.TunDevice` plus its reversible host
configuration (address ``gateway/prefix``, MTU, link up; with an inner IPv6 subnet also
``gateway6/prefix6`` and IPv6 switched on quietly, else IPv6 off). ``setup`` runs before
the asyncio loop starts (pyroute2's synchronous API cannot run inside a running loop) and
``teardown`` after it stopped, undoing the changes newest first, then closing the device.

:class:`EchoInner` replaces the TUN for the demo and for tests: every inner packet
addressed to the gateway's inner address, IPv4 or (with an inner IPv6 subnet) IPv6, is
answered (ICMP or ICMPv6 echo request -> echo reply; UDP -> the same datagram back with
addresses and ports swapped), so a client sees replies without any host change.
Everything else is counted and dropped.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Final, Protocol

from tunnel.io.inner import ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, IPPROTO_ICMP, inet_checksum
from tunnel.io.netconf import HostConfig
from tunnel.io.tun import TunDevice, TunError, set_ipv6

IPPROTO_UDP: Final = 17
IPPROTO_ICMPV6: Final = 58
ICMPV6_ECHO_REQUEST: Final = 128
ICMPV6_ECHO_REPLY: Final = 129

ECHO_BACKLOG: Final = 1024
"""Replies waiting for the loop to take them; beyond this they are dropped and counted."""


class GatewayInner(Protocol):
    """The gateway loop's view of its inner side."""

    name: str
    """Interface name (``jvpn0``) or ``echo``."""

    def setup(self) -> None:
        """Make the host changes; called before the loop starts, never on it."""

    def start(self, loop: asyncio.AbstractEventLoop, readable: Callable[[], None]) -> None:
        """Register with the running loop; call ``readable()`` when packets wait."""

    def read_batch(self, max_n: int) -> list[bytes]:
        """Packets from the host towards clients, at most ``max_n``."""

    def write_batch(self, packets: Sequence[bytes]) -> int:
        """Packets from clients to the host; returns how many were accepted."""

    def stop(self) -> None:
        """Unregister from the loop (the loop is still running)."""

    def teardown(self) -> None:
        """Undo every host change, newest first; idempotent."""


def echo_response(packet: bytes, gateway_ip: bytes) -> bytes | str:
    """The answer to an inner packet for ``gateway_ip`` (4 bytes), or why there is none.

    Swapping source and destination (and UDP ports) leaves the IPv4 header and UDP
    checksums valid (one's complement sums commute); ICMP's is recomputed.
    """
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return "not_ipv4"
    ihl = (packet[0] & 0x0F) * 4
    total = int.from_bytes(packet[2:4], "big")
    if ihl < 20 or total < ihl or total > len(packet):
        return "malformed"
    if packet[16:20] != gateway_ip:
        return "not_for_gateway"
    if int.from_bytes(packet[6:8], "big") & 0x3FFF:
        return "fragment"
    out = bytearray(packet[:total])
    out[12:16], out[16:20] = packet[16:20], packet[12:16]
    proto = packet[9]
    if proto == IPPROTO_ICMP:
        if total - ihl < 8 or packet[ihl] != ICMP_ECHO_REQUEST:
            return "icmp_not_echo"
        out[ihl] = ICMP_ECHO_REPLY
        out[ihl + 2 : ihl + 4] = b"\0\0"
        out[ihl + 2 : ihl + 4] = inet_checksum(out[ihl:]).to_bytes(2, "big")
        return bytes(out)
    if proto == IPPROTO_UDP:
        if total - ihl < 8:
            return "malformed"
        out[ihl : ihl + 2], out[ihl + 2 : ihl + 4] = (
            packet[ihl + 2 : ihl + 4],
            packet[ihl : ihl + 2],
        )
        return bytes(out)
    return "unsupported_protocol"


def echo_response6(packet: bytes, gateway_ip: bytes) -> bytes | str:
    """The answer to an inner IPv6 packet for ``gateway_ip`` (16 bytes), or why there is
    none. As :func:`echo_response`; the ICMPv6 checksum (over the pseudo-header) is
    recomputed. A packet with extension headers (a fragment, for one) is not answered."""
    if len(packet) < 40 or packet[0] >> 4 != 6:
        return "not_ipv6"
    total = 40 + int.from_bytes(packet[4:6], "big")
    if total > len(packet):
        return "malformed"
    if packet[24:40] != gateway_ip:
        return "not_for_gateway"
    out = bytearray(packet[:total])
    out[8:24], out[24:40] = packet[24:40], packet[8:24]
    proto = packet[6]
    if proto == IPPROTO_ICMPV6:
        if total - 40 < 8 or packet[40] != ICMPV6_ECHO_REQUEST:
            return "icmp_not_echo"
        out[40] = ICMPV6_ECHO_REPLY
        out[42:44] = b"\0\0"
        pseudo = bytes(out[8:40]) + (total - 40).to_bytes(4, "big") + bytes((0, 0, 0, proto))
        out[42:44] = inet_checksum(pseudo + out[40:]).to_bytes(2, "big")
        return bytes(out)
    if proto == IPPROTO_UDP:
        if total - 40 < 8:
            return "malformed"
        out[40:42], out[42:44] = packet[42:44], packet[40:42]
        return bytes(out)
    return "unsupported_protocol"


class EchoInner:
    """Answers inner packets addressed to the gateway; no device, no host change.

    ``gateway_address6``: the gateway's inner IPv6 address; empty: IPv6 is not answered.
    """

    def __init__(self, gateway_address: str, gateway_address6: str = "") -> None:
        self.name = "echo"
        self.gateway_address = gateway_address
        self._ip = ipaddress.IPv4Address(gateway_address).packed
        self._ip6 = ipaddress.IPv6Address(gateway_address6).packed if gateway_address6 else None
        self._replies: deque[bytes] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._readable: Callable[[], None] | None = None
        self._scheduled = False
        self.answered = 0
        """Packets answered."""
        self.ignored: Counter[str] = Counter()
        """Packets not answered, by reason (``not_for_gateway``, ``backlog_full`` ...)."""

    def setup(self) -> None:
        return None

    def teardown(self) -> None:
        self._replies.clear()

    def start(self, loop: asyncio.AbstractEventLoop, readable: Callable[[], None]) -> None:
        self._loop, self._readable = loop, readable

    def stop(self) -> None:
        self._loop = self._readable = None

    def write_batch(self, packets: Sequence[bytes]) -> int:
        for packet in packets:
            reply = self._answer(packet)
            if isinstance(reply, str):
                self.ignored[reply] += 1
            elif len(self._replies) >= ECHO_BACKLOG:
                self.ignored["backlog_full"] += 1
            else:
                self._replies.append(reply)
                self.answered += 1
        if self._replies and not self._scheduled and self._loop is not None:
            self._scheduled = True
            self._loop.call_soon(self._wake)
        return len(packets)

    def _answer(self, packet: bytes) -> bytes | str:
        if packet[:1] and packet[0] >> 4 == 6:
            return "ipv6_not_routed" if self._ip6 is None else echo_response6(packet, self._ip6)
        return echo_response(packet, self._ip)

    def _wake(self) -> None:
        self._scheduled = False
        if self._readable is not None:
            self._readable()

    def read_batch(self, max_n: int) -> list[bytes]:
        out: list[bytes] = []
        while self._replies and len(out) < max_n:
            out.append(self._replies.popleft())
        return out


class GatewayTun:
    """The gateway's TUN with its address ``gateway_address/prefix``, MTU and link up.

    ``cidr6`` (``fd00:6a76::1/64``): the inner IPv6 address too, IPv6 on; None: IPv6 off
    on the device (the kernel then sends no router solicitations into it).
    """

    def __init__(
        self, name: str, mtu: int, gateway_address: str, prefix: int, cidr6: str | None = None
    ) -> None:
        self.name = name
        self.mtu = mtu
        self.cidr = f"{gateway_address}/{prefix}"
        self.cidr6 = cidr6
        self._tun: TunDevice | None = None
        self._host: HostConfig | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def device(self) -> TunDevice | None:
        return self._tun

    def setup(self) -> None:
        tun = TunDevice(self.name, self.mtu).open()
        self._tun = tun
        self.name = tun.name
        try:
            host = HostConfig().open()
            self._host = host
            ipv6 = set_ipv6(tun.name, self.cidr6 is not None)
            host.add_address(tun.name, self.cidr)
            if self.cidr6 is not None:
                if not ipv6:
                    raise TunError(f"cannot switch IPv6 on for {tun.name} (tun.subnet6)")
                host.add_address(tun.name, self.cidr6)
            host.link_up(tun.name)
        except BaseException:
            self.teardown()
            raise

    def teardown(self) -> None:
        host, self._host = self._host, None
        try:
            if host is not None:
                try:
                    host.undo()
                finally:
                    host.close()
        finally:
            tun, self._tun = self._tun, None
            if tun is not None:
                tun.close()

    def start(self, loop: asyncio.AbstractEventLoop, readable: Callable[[], None]) -> None:
        assert self._tun is not None, "setup() first"
        self._loop = loop
        loop.add_reader(self._tun.fileno(), readable)

    def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and self._tun is not None and not self._tun.closed:
            loop.remove_reader(self._tun.fileno())

    def read_batch(self, max_n: int) -> list[bytes]:
        return [] if self._tun is None else self._tun.read_batch(max_n)

    def write_batch(self, packets: Sequence[bytes]) -> int:
        return 0 if self._tun is None else self._tun.write_batch(list(packets))
