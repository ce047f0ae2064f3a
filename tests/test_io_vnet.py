"""TUN write coalescing (tunnel/io/vnet.py): which TCP segments merge, and into what."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel.io.vnet import (
    NO_OFFLOAD_HDR,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VNET_HDR,
    coalesce,
    from_kernel,
    ipv4_header_checksum,
)

SRC = bytes([10, 66, 0, 2])
DST = bytes([10, 66, 0, 1])
OPTIONS = b"\x01\x01\x08\x0a" + struct.pack("!II", 1000, 2000)  # NOP NOP timestamps


def tcp(seq: int, payload: bytes, *, flags: int = 0x10, sport: int = 40000, ident: int = 0,
        ack: int = 77, options: bytes = OPTIONS) -> bytes:  # fmt: skip
    thl = 20 + len(options)
    tcp_header = struct.pack("!HHIIBBHHH", sport, 5201, seq, ack, (thl // 4) << 4, flags,
                             512, 0xBEEF, 0) + options  # fmt: skip
    total = 20 + thl + len(payload)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, ident, 0x4000, 64, 6, 0,
                               SRC, DST))  # fmt: skip
    ip[10:12] = struct.pack("!H", ipv4_header_checksum(bytes(ip)))
    return bytes(ip) + tcp_header + payload


def flatten(write: list) -> bytes:
    return b"".join(bytes(part) for part in write)


def test_contiguous_segments_of_one_flow_become_one_gso_write() -> None:
    mss = 1368
    payloads = [bytes([i]) * mss for i in range(5)] + [b"end" * 10]
    seq = 1_000_000
    packets = []
    for i, p in enumerate(payloads):
        flags = 0x18 if i == len(payloads) - 1 else 0x10
        packets.append(tcp(seq, p, ident=i, flags=flags))
        seq += len(p)
    [write] = coalesce(packets)
    vnet = VNET_HDR.unpack(bytes(write[0]))
    hlen = 20 + 20 + len(OPTIONS)
    assert vnet == (VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, hlen, mss, 20, 16)
    merged = flatten(write[1:])
    assert merged[hlen:] == b"".join(payloads)  # every byte, in order
    assert struct.unpack_from("!H", merged, 2)[0] == len(merged)  # IP total length
    assert ipv4_header_checksum(merged[:20]) == 0  # valid IP header checksum
    assert struct.unpack_from("!I", merged, 24)[0] == 1_000_000  # first segment's seq
    assert merged[33] == 0x18  # the last segment's PSH is kept
    # partial TCP checksum = folded pseudo-header sum over the merged length
    words = sum(struct.unpack("!4H", SRC + DST)) + 6 + len(merged) - 20
    while words >> 16:
        words = (words & 0xFFFF) + (words >> 16)
    assert struct.unpack_from("!H", merged, 36)[0] == words


def test_anything_unmergeable_is_written_as_it_came_in_order() -> None:
    a = tcp(100, b"a" * 500)
    gap = tcp(700, b"b" * 500)  # seq 600 missing
    other_flow = tcp(1200, b"c" * 500, sport=40001)
    syn = tcp(5, b"", flags=0x02)
    fin = tcp(1700, b"d" * 500, flags=0x11)
    bigger = tcp(1200, b"e" * 600)  # after other_flow: not contiguous anyway
    udp = bytearray(tcp(0, b"x" * 40))
    udp[9] = 17
    packets = [a, gap, other_flow, syn, fin, bigger, bytes(udp), b"\x60" + bytes(39)]
    writes = coalesce(packets)
    assert [w[0] for w in writes] == [NO_OFFLOAD_HDR] * len(packets)
    assert [flatten(w[1:]) for w in writes] == packets


def test_runs_end_at_a_short_segment_a_flag_change_or_an_option_change() -> None:
    seq = 0
    packets = []
    for size, ack in ((1000, 1), (1000, 1), (400, 1), (1000, 1), (1000, 2), (1000, 2)):
        packets.append(tcp(seq, b"z" * size, ack=ack))
        seq += size
    writes = coalesce(packets)
    # [1000, 1000, 400] merge (short ends the run); [1000] alone (the ack changes next);
    # [1000, 1000] with ack 2 merge.
    assert [len(w) - 2 if len(w) > 2 else 1 for w in writes] == [3, 1, 2]
    payload = b"".join(flatten(w[1:])[52:] for w in writes)  # 52: IP + TCP + options
    assert payload == b"".join(p[52:] for p in packets)


# -- the read side: splitting a TSO packet (tso=True prototype) ----------------------------


def rfc1071(data: bytes) -> int:
    """Independent reference: fold 16-bit words with end-around carry."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for (word,) in struct.iter_unpack("!H", data):
        total += word
        total = (total & 0xFFFF) + (total >> 16)
    return total


def test_a_tso_read_is_split_into_valid_mss_segments() -> None:
    mss = 1000
    payload = bytes(range(256)) * 14  # 3584 bytes: 3 full segments and a 584-byte tail
    big = bytearray(tcp(5000, payload, flags=0x18, ident=300))
    vnet = VNET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 52, mss, 20, 16)
    buf = memoryview(vnet + bytes(big))
    out: list[bytes] = []
    assert from_kernel(buf, len(buf), out) is None
    assert [len(p) - 52 for p in out] == [1000, 1000, 1000, 584]
    assert b"".join(p[52:] for p in out) == payload
    for k, seg in enumerate(out):
        assert rfc1071(seg[:20]) == 0xFFFF  # IP header checksum valid
        assert struct.unpack_from("!H", seg, 2)[0] == len(seg)
        assert struct.unpack_from("!H", seg, 4)[0] == 300 + k
        assert struct.unpack_from("!I", seg, 24)[0] == 5000 + k * mss
        assert seg[33] == (0x18 if k == len(out) - 1 else 0x10)  # PSH on the last only
        pseudo = SRC + DST + struct.pack("!HH", 6, len(seg) - 20)
        assert rfc1071(pseudo + seg[20:]) == 0xFFFF  # TCP checksum valid


def test_a_partial_checksum_read_is_completed_and_bad_reads_are_refused() -> None:
    udp = bytearray(tcp(0, b"q" * 33))  # odd payload length
    udp[9] = 17
    vnet = VNET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 20, 6)
    out: list[bytes] = []
    assert from_kernel(memoryview(vnet + bytes(udp)), 10 + len(udp), out) is None
    [done] = out
    assert done[:26] == bytes(udp[:26]) and done[28:] == bytes(udp[28:])
    # the completed field makes the sum from csum_start on verify (the pseudo-header part
    # was pre-seeded by the kernel; here the field held TCP bytes, so only the fold matters)
    assert rfc1071(done[20:]) == 0xFFFF
    assert from_kernel(memoryview(vnet), 10, out) == "truncated"
    bad = VNET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 20, 4000)
    assert from_kernel(memoryview(bad + bytes(udp)), 10 + len(udp), out) == "bad_csum_offsets"
    v6 = VNET_HDR.pack(0, 4, 60, 1000, 40, 16)  # GSO_TCPV6: not supported
    assert from_kernel(memoryview(v6 + bytes(60)), 70, out) == "unsupported_gso"


# -- property: coalescing loses, reorders and mixes nothing ---------------------------------


def _masked(packet: bytes) -> bytes:
    """``packet``'s IP and TCP headers with what may differ inside one GSO packet zeroed:
    IP total length, id and checksum, TCP seq, PSH and checksum."""
    thl = (packet[32] >> 4) * 4
    h = bytearray(packet[: 20 + thl])
    h[2:6], h[10:12], h[24:28], h[36:38] = bytes(4), bytes(2), bytes(4), bytes(2)
    h[33] &= ~0x08
    return bytes(h)


@st.composite
def segment_batches(draw: st.DrawFn) -> list[bytes]:
    """Batches of IPv4 TCP segments that are mostly mergeable, with random breaks: a gap or
    overlap in seq, another flow, another ack, window or options, PSH, SYN/FIN, short
    segments, non-TCP packets."""
    packets = []
    seq = draw(st.integers(0, 2**32 - 1))
    for _ in range(draw(st.integers(1, 90))):
        size = draw(st.sampled_from([700, 700, 700, 300, 0]))
        kind = draw(st.sampled_from(["same"] * 6 + ["gap", "flow", "ack", "psh", "fin", "opt",
                                                     "win", "udp"]))  # fmt: skip
        flags = {"psh": 0x18, "fin": 0x11}.get(kind, 0x10)
        pkt = bytearray(tcp(
            (seq + 5) % 2**32 if kind == "gap" else seq, bytes([len(packets) % 251]) * size,
            flags=flags, sport=40001 if kind == "flow" else 40000, ack=78 if kind == "ack" else 77,
            ident=draw(st.integers(0, 0xFFFF)),
            options=OPTIONS[:8] + b"\0\0\0\1" if kind == "opt" else OPTIONS,
        ))  # fmt: skip
        if kind == "win":
            pkt[34:36] = b"\x01\x00"
        if kind == "udp":
            pkt[9] = 17
        packets.append(bytes(pkt))
        seq = (seq + size) % 2**32
    return packets


@settings(max_examples=150, deadline=None)
@given(segment_batches())
def test_coalescing_keeps_every_segment_in_order_and_merges_only_one_flow(
    packets: list[bytes],
) -> None:
    out: list[bytes] = []  # the input packets as the writes carry them, in order
    for write in coalesce(packets):
        if write[0] == NO_OFFLOAD_HDR:
            assert len(write) == 2
            out.append(flatten(write[1:]))
            continue
        flags, gso_type, hlen, gso_size, _, _ = VNET_HDR.unpack(bytes(write[0]))
        assert (flags, gso_type) == (VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4)
        merged = flatten(write[1:])
        assert len(merged) <= 65535
        run = packets[len(out) : len(out) + len(write) - 2]
        assert 2 <= len(run) <= 64
        first = run[0]
        seq = struct.unpack_from("!I", first, 24)[0]
        for k, p in enumerate(run):
            assert p[hlen:] == merged[hlen + k * gso_size : hlen + k * gso_size + len(p) - hlen]
            assert _masked(p) == _masked(first)  # one flow, one ack, window, options
            assert struct.unpack_from("!I", p, 24)[0] == (seq + k * gso_size) % 2**32
            assert p[33] & 0x08 == 0 or k == len(run) - 1  # PSH ends a run
            assert p[33] & ~0x08 == 0x10  # plain ACK data segments only
            assert len(p) - hlen == gso_size or k == len(run) - 1  # a short one ends a run
        assert hlen + sum(len(p) - hlen for p in run) == len(merged)
        out.extend(run)
    assert out == packets
