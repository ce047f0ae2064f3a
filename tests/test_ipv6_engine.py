"""IPv6 inside the tunnel without root: ClientEngine (memory inner side) over loopback UDP
against an embedded gateway whose echo inner side answers ICMPv6 for its inner IPv6
address (docs/gateway.md ``inner_echo``; docs/client.md, "IPv6 inside the tunnel")."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from engine_watch import Watcher

from tunnel.client.config import ClientConfig, PathConfig
from tunnel.client.engine import ClientEngine
from tunnel.core.gateway_session import ClientEntry
from tunnel.core.handshake import generate_keypair
from tunnel.gateway.inner import EchoInner, echo_response6
from tunnel.gateway.thread import GatewayThread, start_in_thread
from tunnel.io.inner import MemoryInner, inet_checksum

CLIENT4, GATEWAY4 = "10.66.0.2", "10.66.0.1"
CLIENT6, GATEWAY6 = "fd00:6a76::2", "fd00:6a76::1"
SPOOF6 = "fd00:6a76::99"
ECHOES = 4


def icmp6_echo(src: str, dst: str, seq: int) -> bytes:
    """An ICMPv6 echo request with a valid checksum (RFC 4443)."""
    s, d = ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
    body = bytearray(struct.pack("!BBHHH", 128, 0, 0, 0x6A76, seq) + b"ping6" * 8)
    pseudo = s + d + len(body).to_bytes(4, "big") + bytes((0, 0, 0, 58))
    body[2:4] = inet_checksum(pseudo + body).to_bytes(2, "big")
    return struct.pack("!IHBB", 6 << 28, len(body), 58, 64) + s + d + bytes(body)


def echo_replies6(packets: list[bytes], src: str) -> list[int]:
    """Sequence numbers of the ICMPv6 echo replies from ``src`` among ``packets``."""
    raw = ipaddress.IPv6Address(src).packed
    return [
        struct.unpack_from("!H", p, 46)[0]
        for p in packets
        if len(p) >= 48 and p[0] >> 4 == 6 and p[6] == 58 and p[40] == 129 and p[8:24] == raw
    ]


class SixInner(MemoryInner):
    """The memory inner side; once the session has its inner address, the host sends
    ECHOES ICMPv6 echo requests from each of ``sources`` to the gateway's IPv6 address."""

    def __init__(self, sources: tuple[str, ...]) -> None:
        super().__init__(rate_pps=0)
        self.sources = sources
        self.assigned6: str | None = None
        self._sent = False

    def start(self, loop: asyncio.AbstractEventLoop, readable: Callable[[], None]) -> None:
        super().start(loop, readable)
        self.loop = loop

    def set_inner_address(
        self, address: str, prefix: int, gateway: str, mtu: int, *, address6: str = ""
    ) -> concurrent.futures.Future[None] | None:
        self.assigned6 = address6
        if not self._sent:
            self._sent = True
            for src in self.sources:
                for seq in range(ECHOES):
                    self.loop.call_soon(self.inject, icmp6_echo(src, GATEWAY6, seq))
        return super().set_inner_address(address, prefix, gateway, mtu, address6=address6)


@contextlib.contextmanager
def gateway(client_public: bytes, gw_private: bytes, *, ipv6: bool) -> Iterator[GatewayThread]:
    """A started embedded gateway (echo inner side), stopped at the end."""
    six: dict[str, Any] = {"inner_gateway6": GATEWAY6, "inner_prefix6": 64} if ipv6 else {}
    gw = start_in_thread(
        static_private=gw_private, clients=[ClientEntry("alice", client_public, CLIENT4, CLIENT6)],
        inner_gateway=GATEWAY4, **six,
    )  # fmt: skip
    try:
        yield gw
    finally:
        gw.stop()


def engine_for(
    gw: GatewayThread, private: bytes, gw_public: bytes, inner: MemoryInner
) -> ClientEngine:
    config = ClientConfig(
        private_key=private, gateway_public_key=gw_public,
        paths=(PathConfig(1, "lo", ("127.0.0.1", 0), None, gw.address),),
    )  # fmt: skip
    return ClientEngine(config, inner=inner)


def metric(gw: GatewayThread, line_start: str) -> float:
    for line in gw.metrics_text().splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    return 0.0


SPOOFED = 'jvpn_gateway_drops_total{reason="inner_source_spoofed"}'


def test_ipv6_echo_through_the_engine_and_a_spoofed_source_is_dropped() -> None:
    private, public = generate_keypair()
    gw_private, gw_public = generate_keypair()
    inner = SixInner((SPOOF6, CLIENT6))
    with gateway(public, gw_private, ipv6=True) as gw:
        engine = engine_for(gw, private, gw_public, inner)
        w = Watcher(engine)
        engine.start()
        try:
            w.wait(lambda: len(echo_replies6(list(inner.recent), GATEWAY6)) >= ECHOES)
            assert inner.assigned6 == f"{CLIENT6}/64"  # from the handshake response
            assert sorted(echo_replies6(list(inner.recent), GATEWAY6)) == list(range(ECHOES))
            replies = [p for p in inner.recent if p[0] >> 4 == 6]
            assert {p[24:40] for p in replies} == {ipaddress.IPv6Address(CLIENT6).packed}
            w.wait(lambda: metric(gw, SPOOFED) >= ECHOES)
            assert metric(gw, SPOOFED) == ECHOES
        finally:
            engine.stop()
    assert engine.final_reason == "operator_terminated"


def test_without_an_inner_ipv6_subnet_the_client_keeps_ipv6_out_of_the_tunnel() -> None:
    private, public = generate_keypair()
    gw_private, gw_public = generate_keypair()
    inner = SixInner((CLIENT6,))
    with gateway(public, gw_private, ipv6=False) as gw:
        engine = engine_for(gw, private, gw_public, inner)
        w = Watcher(engine)
        engine.start()
        try:
            w.wait(lambda: engine.runtime and engine.runtime.counters.inner_ipv6_dropped >= ECHOES)
            assert inner.assigned6 == ""  # the gateway sent no IPv6 address
            assert engine.runtime is not None
            assert engine.runtime.counters.inner_ipv6_dropped == ECHOES
            assert engine.runtime.counters.tx_packets == 0  # nothing of it reached the session
            assert not echo_replies6(list(inner.recent), GATEWAY6)
            assert metric(gw, 'jvpn_gateway_drops_total{reason="ipv6_not_routed"}') == 0
        finally:
            engine.stop()


def test_the_echo_inner_side_answers_icmpv6_and_udp_for_its_ipv6_address_only() -> None:
    gw6 = ipaddress.IPv6Address(GATEWAY6).packed
    request = icmp6_echo(CLIENT6, GATEWAY6, 9)
    reply = echo_response6(request, gw6)
    assert isinstance(reply, bytes)
    assert echo_replies6([reply], GATEWAY6) == [9]
    assert reply[24:40] == ipaddress.IPv6Address(CLIENT6).packed
    pseudo = reply[8:40] + (len(reply) - 40).to_bytes(4, "big") + bytes((0, 0, 0, 58))
    assert inet_checksum(pseudo + reply[40:]) == 0  # a valid ICMPv6 checksum
    udp = struct.pack("!HHHH", 5000, 7, 12, 0xABCD) + b"abcd"
    src, dst = ipaddress.IPv6Address(CLIENT6).packed, gw6
    datagram = struct.pack("!IHBB", 6 << 28, len(udp), 17, 64) + src + dst + udp
    back = echo_response6(datagram, gw6)
    assert isinstance(back, bytes) and back[40:44] == struct.pack("!HH", 7, 5000)
    assert back[44:] == udp[4:]  # length, checksum (still valid: a swap) and payload kept
    assert echo_response6(icmp6_echo(CLIENT6, SPOOF6, 1), gw6) == "not_for_gateway"
    echo = EchoInner(GATEWAY4)  # no inner IPv6 address: IPv6 is not answered
    assert echo.write_batch([request]) == 1 and echo.ignored["ipv6_not_routed"] == 1


@pytest.mark.parametrize("cut", [1, 20])
def test_a_cut_ipv6_packet_is_not_answered(cut: int) -> None:
    request = icmp6_echo(CLIENT6, GATEWAY6, 1)
    assert echo_response6(request[:-cut], ipaddress.IPv6Address(GATEWAY6).packed) == "malformed"
