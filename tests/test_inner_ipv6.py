"""IPv6 inside the tunnel (issue 12, item 6) without root: the handshake field, routing by
inner destination, the source check and TUN write coalescing for IPv6.

docs/wire-format.md ("Message 2 payload", extensions) and docs/gateway.md ("IPv6 inside
the tunnel") are the spec these tests hold the code to.
"""

from __future__ import annotations

import ipaddress
import random
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from simkit import ipv4_packet

from tunnel.core.client import ClientSession, PathSpec
from tunnel.core.drops import Drop
from tunnel.core.events import SessionTerminated
from tunnel.core.gateway import GatewaySessions
from tunnel.core.gateway_session import ClientEntry
from tunnel.core.handshake import generate_keypair
from tunnel.core.policy import POLICY_DEFAULT
from tunnel.core.wire import RespPayload
from tunnel.io.memory import MemoryLink, Simulation
from tunnel.io.vnet import (
    NO_OFFLOAD_HDR,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VNET_HDR,
    coalesce,
)

CLIENT4, GATEWAY4 = "10.66.0.2", "10.66.0.1"
CLIENT6, GATEWAY6 = "fd00:6a76::2", "fd00:6a76::1"
OTHER6 = "fd00:6a76::99"


# -- the handshake response field -------------------------------------------------------------


def response(**changes: object) -> RespPayload:
    fields: dict[str, object] = dict(
        version=1, status=0, session_id=bytes(range(16)), gw_ts_ms=5, state_version=1,
        epoch=1, inner_address=CLIENT4, inner_prefix=24, inner_gateway=GATEWAY4, mtu=1420,
        endpoints=(("192.0.2.1", 51820), ("2001:db8::1", 51820)),
    )  # fmt: skip
    fields.update(changes)
    return RespPayload(**fields)  # type: ignore[arg-type]


V6 = dict(inner_address6=CLIENT6, inner_prefix6=64, inner_gateway6=GATEWAY6)
BASE_LEN = RespPayload.FIXED.size + 2 * RespPayload.ENDPOINT.size
EXT_LEN = 2 + 33
"""type:u8 | length:u8 | address:16 | prefix:u8 | gateway:16 (docs/wire-format.md)."""


def test_without_ipv6_the_response_is_the_format_before_the_extension() -> None:
    plain = response().pack()
    assert len(plain) == BASE_LEN  # nothing after the endpoints: older clients parse it
    parsed = RespPayload.parse(plain)
    assert isinstance(parsed, RespPayload)
    assert (parsed.inner_address6, parsed.inner_prefix6, parsed.inner_gateway6) == ("", 0, "")


def test_the_ipv6_extension_round_trips_with_its_documented_layout() -> None:
    data = response(**V6).pack()
    assert len(data) == BASE_LEN + EXT_LEN
    ext = data[BASE_LEN:]
    assert ext[:2] == bytes([1, 33])
    assert ext[2:18] == ipaddress.IPv6Address(CLIENT6).packed
    assert ext[18] == 64
    assert ext[19:35] == ipaddress.IPv6Address(GATEWAY6).packed
    assert RespPayload.parse(data) == response(**V6)


def test_an_unknown_extension_is_skipped_whatever_it_holds() -> None:
    data = response(**V6).pack()
    unknown = bytes([200, 5]) + b"\xff" * 5
    assert RespPayload.parse(data[:BASE_LEN] + unknown + data[BASE_LEN:]) == response(**V6)
    assert RespPayload.parse(data[:BASE_LEN] + unknown) == response()


def test_a_cut_off_extension_is_a_truncated_drop() -> None:
    data = response(**V6).pack()
    for cut in range(1, EXT_LEN):
        assert RespPayload.parse(data[:-cut]) is Drop.TRUNCATED, cut


def ext6(address: str = CLIENT6, prefix: int = 64, gateway: str = GATEWAY6) -> bytes:
    raw = ipaddress.IPv6Address(address).packed
    return bytes([1, 33]) + raw + bytes([prefix]) + ipaddress.IPv6Address(gateway).packed


def test_impossible_ipv6_values_are_a_malformed_drop() -> None:
    base = response().pack()
    assert isinstance(RespPayload.parse(base + ext6()), RespPayload)
    for bad in (
        ext6(prefix=0),
        ext6(prefix=129),
        ext6(prefix=255),
        ext6(address="::"),
        ext6(address="ff02::1"),
        ext6(address="::1"),
        ext6() + ext6(),  # twice
        bytes([1, 34]) + ext6()[2:] + b"\0",  # the known type with another length
        bytes([1, 32]) + ext6()[2:-1],
    ):
        assert RespPayload.parse(base + bad) is Drop.MALFORMED, bad.hex()


SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(tail=st.binary(max_size=120))
def test_any_bytes_after_the_endpoints_parse_to_a_payload_or_a_drop(tail: bytes) -> None:
    parsed = RespPayload.parse(response().pack() + tail)
    assert isinstance(parsed, (RespPayload, Drop))
    if isinstance(parsed, RespPayload):
        assert RespPayload.parse(parsed.pack()) == parsed
        if parsed.inner_address6:
            assert 1 <= parsed.inner_prefix6 <= 128


@SETTINGS
@given(
    address=st.integers(1 << 100, (1 << 127) - 1), prefix=st.integers(1, 128),
    gateway=st.integers(0, (1 << 128) - 1),
)  # fmt: skip
def test_every_valid_ipv6_assignment_round_trips(address: int, prefix: int, gateway: int) -> None:
    a, g = str(ipaddress.IPv6Address(address)), str(ipaddress.IPv6Address(gateway))
    sent = response(inner_address6=a, inner_prefix6=prefix, inner_gateway6=g)
    got = RespPayload.parse(sent.pack())
    assert isinstance(got, RespPayload)
    assert (got.inner_address6, got.inner_prefix6) == (a, prefix)
    assert got.inner_gateway6 == ("" if gateway == 0 else g)


# -- two whole engines over memory links ---------------------------------------------------------


def build(
    *, gateway6: bool = True, client6: str = CLIENT6, prefix6: int = 64, seed: int = 7
) -> Simulation:
    rng = random.Random(seed)
    gw_priv, gw_pub = generate_keypair()
    cl_priv, cl_pub = generate_keypair()
    client = ClientSession(
        static_private=cl_priv, gateway_public=gw_pub, paths=[PathSpec(1, "path1")],
        policy=POLICY_DEFAULT, now=0.0, rng=random.Random(seed + 1),
    )  # fmt: skip
    six = {"inner_gateway6": GATEWAY6, "inner_prefix6": prefix6} if gateway6 else {}
    gateway = GatewaySessions(
        static_private=gw_priv, clients=[ClientEntry("alice", cl_pub, CLIENT4, client6)],
        policy=POLICY_DEFAULT, now=0.0, urandom=random.Random(seed + 2).randbytes,
        rng=random.Random(seed + 3), inner_gateway=GATEWAY4, **six,
    )  # fmt: skip
    sim = Simulation(client, gateway, [MemoryLink(1, rng=rng)])
    sim.start()
    sim.advance(1.0)
    return sim


def udp6(src: str, dst: str, payload: bytes = b"six" * 10) -> bytes:
    """A minimal IPv6/UDP packet (checksum zero: the tunnel does not look at it)."""
    udp = struct.pack("!HHHH", 5000, 5001, 8 + len(payload), 0) + payload
    header = struct.pack("!IHBB", 6 << 28, len(udp), 17, 64)
    return header + ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed + udp


def drops(sim: Simulation, reason: Drop) -> int:
    return sim.gateway.drops.get(reason.value, 0)


def test_the_client_learns_its_inner_ipv6_address_from_the_handshake() -> None:
    sim = build()
    assert sim.client.state == "ATTACHED"
    c = sim.client
    assert (c.inner_address6, c.inner_prefix6, c.inner_gateway6) == (CLIENT6, 64, GATEWAY6)
    assert c.inner_address == CLIENT4  # IPv4 as before


def test_inner_ipv6_is_carried_both_ways_and_routed_by_destination() -> None:
    sim = build()
    up = udp6(CLIENT6, "fd00:1::7", b"up" * 20)
    sim.client_tun.inject(up)
    down = udp6("fd00:1::7", CLIENT6, b"down" * 20)
    sim.gateway_tun.inject(down)
    sim.advance(0.5)
    assert list(sim.gateway_tun.from_tunnel) == [up]
    assert list(sim.client_tun.from_tunnel) == [down]


def test_a_spoofed_inner_source_is_dropped_and_counted_for_ipv6_and_ipv4() -> None:
    sim = build()
    sim.client_tun.inject(udp6(OTHER6, GATEWAY6))
    sim.client_tun.inject(ipv4_packet("10.66.0.77", GATEWAY4))
    good6, good4 = udp6(CLIENT6, GATEWAY6), ipv4_packet(CLIENT4, GATEWAY4)
    sim.client_tun.inject(good6)
    sim.client_tun.inject(good4)
    sim.advance(0.5)
    assert list(sim.gateway_tun.from_tunnel) == [good6, good4]
    assert drops(sim, Drop.INNER_SOURCE_SPOOFED) == 2


def test_gateway_tun_ipv6_for_nobody_is_no_route() -> None:
    sim = build()
    sim.gateway_tun.inject(udp6(GATEWAY6, OTHER6))
    sim.advance(0.2)
    assert drops(sim, Drop.NO_ROUTE) == 1
    assert not sim.client_tun.from_tunnel


def test_without_an_inner_ipv6_subnet_ipv6_is_not_routed_either_way() -> None:
    sim = build(gateway6=False)  # the client entry has an address6: still no IPv6
    assert sim.client.inner_address6 == ""
    sim.gateway_tun.inject(udp6(GATEWAY6, CLIENT6))
    sim.advance(0.2)
    assert drops(sim, Drop.IPV6_NOT_ROUTED) == 1
    sim.client.receive_tun_packet(udp6(CLIENT6, GATEWAY6), sim.now)  # a client that tries
    sim.advance(0.2)
    assert drops(sim, Drop.IPV6_NOT_ROUTED) == 2
    assert not sim.gateway_tun.from_tunnel and not sim.client_tun.from_tunnel


def test_a_client_without_an_ipv6_address_sends_no_ipv6() -> None:
    sim = build(client6="")
    assert sim.client.inner_address6 == ""
    sim.client.receive_tun_packet(udp6(CLIENT6, GATEWAY6), sim.now)
    sim.advance(0.2)
    assert drops(sim, Drop.IPV6_NOT_ROUTED) == 1
    assert not sim.gateway_tun.from_tunnel


def test_an_ended_session_no_longer_owns_its_ipv6_address() -> None:
    sim = build()
    sim.gateway.terminate_all(sim.now)
    sim.advance(0.5)
    assert any(isinstance(e, SessionTerminated) for e in sim.client_events)
    sim.gateway_tun.inject(udp6(GATEWAY6, CLIENT6))
    sim.advance(0.2)
    assert drops(sim, Drop.NO_ROUTE) == 1


# -- TUN write coalescing (GSO) for IPv6 --------------------------------------------------------

OPTIONS = b"\x01\x01\x08\x0a" + struct.pack("!II", 1000, 2000)


def tcp6(seq: int, payload: bytes, *, flags: int = 0x10, next_header: int = 6) -> bytes:
    thl = 20 + len(OPTIONS)
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 77, (thl // 4) << 4, flags, 512, 0xBEEF, 0)
    body = tcp + OPTIONS + payload
    header = struct.pack("!IHBB", (6 << 28) | 0x12345, len(body), next_header, 64)
    src, dst = ipaddress.IPv6Address(GATEWAY6).packed, ipaddress.IPv6Address(CLIENT6).packed
    return header + src + dst + body


def test_consecutive_ipv6_tcp_segments_become_one_tcpv6_gso_write() -> None:
    mss = 1348
    payloads = [bytes([i]) * mss for i in range(4)] + [b"tail" * 7]
    seq, packets = 5_000, []
    for i, p in enumerate(payloads):
        packets.append(tcp6(seq, p, flags=0x18 if i == len(payloads) - 1 else 0x10))
        seq += len(p)
    [write] = coalesce(packets)
    hlen = 40 + 20 + len(OPTIONS)
    vnet = VNET_HDR.unpack(bytes(write[0]))
    assert vnet == (VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV6, hlen, mss, 40, 16)
    merged = b"".join(bytes(part) for part in write[1:])
    assert merged[hlen:] == b"".join(payloads)
    assert struct.unpack_from("!H", merged, 4)[0] == len(merged) - 40  # payload length
    assert merged[:4] == packets[0][:4] and merged[6:40] == packets[0][6:40]
    assert struct.unpack_from("!I", merged, 44)[0] == 5_000
    assert merged[53] == 0x18  # PSH of the last segment
    words = sum(struct.unpack("!16H", merged[8:40])) + 6 + len(merged) - 40
    while words >> 16:
        words = (words & 0xFFFF) + (words >> 16)
    assert struct.unpack_from("!H", merged, 56)[0] == words  # partial: pseudo-header sum


def test_ipv6_packets_that_cannot_merge_are_written_as_they_came() -> None:
    a, b = tcp6(1, b"a" * 100), tcp6(101, b"b" * 100)
    with_extension = [tcp6(1, b"a" * 100, next_header=0), tcp6(101, b"b" * 100, next_header=0)]
    gap = [a, tcp6(500, b"b" * 100)]
    for packets in (with_extension, gap, [a[:50], b[:50]]):
        writes = coalesce(packets)
        assert writes == [[NO_OFFLOAD_HDR, p] for p in packets]


def test_a_response_with_an_impossible_ipv6_field_is_a_counted_drop_not_a_session() -> None:
    sim = build(prefix6=129)  # a gateway that announces an impossible prefix length
    assert sim.client.report.drops.get(Drop.MALFORMED.value, 0) >= 1
    assert sim.client.state == "BIRTH" and sim.client.inner_address6 == ""
