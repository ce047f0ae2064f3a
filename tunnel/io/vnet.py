"""TUN offload helpers: the ``virtio_net_hdr`` and TCP receive coalescing for TUN writes.

With ``IFF_VNET_HDR`` every TUN read and write starts with a 10-byte ``virtio_net_hdr``
(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset; little-endian here). Reads
need nothing more while TUNSETOFFLOAD is not used (the kernel then never hands us GSO or
partially checksummed packets: the header is all zeros and is skipped). Writes may carry
one *GSO* packet: consecutive in-order TCP segments of one flow, merged into one IPv4 or
IPv6 packet of up to 64 KiB with ``gso_type = TCPV4`` / ``TCPV6`` and ``gso_size`` = the
segment payload size. The kernel's TCP receive path then handles one large packet instead
of dozens of MSS-sized ones, which is most of the cost of a TUN write (userspace GRO, as
wireguard-go does it).

:func:`coalesce` plans the writes for a batch of decrypted inner packets: each entry is a
list of buffers for one ``writev`` (header first). Only plain TCP data segments (IPv4
without options, IPv6 without extension headers) with ACK (and PSH on the last) are
merged, and only when everything but sequence number, IP id, lengths and checksums is
identical; anything else is written as it came, in order.
The merged packet's TCP checksum is left partial (``NEEDS_CSUM``): the packets were
authenticated by the AEAD, and the kernel treats a partial checksum of a locally
injected packet as verified.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final

VNET_HDR = struct.Struct("<BBHHHH")
"""flags, gso_type, hdr_len, gso_size, csum_start, csum_offset."""
VNET_HDR_LEN: Final = VNET_HDR.size
NO_OFFLOAD_HDR: Final = bytes(VNET_HDR_LEN)
"""The header of a plain packet: no GSO, checksum complete."""

VIRTIO_NET_HDR_F_NEEDS_CSUM: Final = 1
VIRTIO_NET_HDR_GSO_TCPV4: Final = 1
VIRTIO_NET_HDR_GSO_TCPV6: Final = 4

MAX_COALESCED: Final = 65535
"""An IPv4 packet's total length is a u16 (an IPv6 packet is kept to the same size)."""

MAX_SEGMENTS: Final = 64
"""Segments merged into one write at most (the kernel's GSO segment cap)."""

_TCP_ACK: Final = 0x10
_TCP_PSH: Final = 0x08
_IPPROTO_TCP: Final = 6
_IPV4_HEADER: Final = 20
_IPV6_HEADER: Final = 40
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


def ipv4_header_checksum(header: bytes | bytearray) -> int:
    """RFC 1071 checksum of an IPv4 header whose checksum field is zero."""
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _pseudo_sum(addresses: bytes, tcp_length: int) -> int:
    """Folded (not complemented) sum of the TCP pseudo-header: what a partial checksum holds.

    ``addresses`` is source and destination (8 bytes IPv4, 32 bytes IPv6); both families'
    pseudo-headers then add the protocol and the TCP length (RFC 793, RFC 8200 8.1).
    """
    total = sum(struct.unpack(f"!{len(addresses) // 2}H", addresses)) + _IPPROTO_TCP + tcp_length
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


_IPV4_FIELDS = struct.Struct("!BxHxxHxB")
"""version/IHL, total length, flags/fragment offset, protocol (the first 10 bytes)."""
_IPV6_FIELDS = struct.Struct("!B3xHB")
"""version/class, payload length, next header (the first 7 bytes)."""
_TCP_FIELDS = struct.Struct("!4xI4xBB")
"""seq, data offset, flags (the first 14 bytes of the TCP header)."""


def _ip_header_len(packet: bytes, n: int) -> int:
    """20 or 40 for a plain IPv4 / IPv6 TCP packet of exactly ``n`` bytes that could be merged
    (no IPv4 options or fragment, no IPv6 extension header), else 0."""
    first = packet[0]
    if first == 0x45:
        _, total, frag, proto = _IPV4_FIELDS.unpack_from(packet)
        if proto != _IPPROTO_TCP or total != n or frag & 0x3FFF:
            return 0  # not TCP, not exactly this packet, or a fragment
        return _IPV4_HEADER
    if first >> 4 == 6:
        _, payload, next_header = _IPV6_FIELDS.unpack_from(packet)
        return _IPV6_HEADER if next_header == _IPPROTO_TCP and payload + _IPV6_HEADER == n else 0
    return 0


def _segment(packet: bytes) -> tuple[int, int, int, int] | None:
    """(IP header length, TCP header length, payload length, seq) of a mergeable segment,
    else None."""
    n = len(packet)
    if n < 40:
        return None
    iphl = _ip_header_len(packet, n)
    if not iphl or n < iphl + 20:
        return None
    seq, offset, flags = _TCP_FIELDS.unpack_from(packet, iphl)
    thl = (offset >> 4) * 4
    if thl < 20 or iphl + thl >= n or flags & ~_TCP_PSH != _TCP_ACK:
        return None  # no payload, or SYN/FIN/RST/URG/ECE/CWR
    return iphl, thl, n - iphl - thl, seq


_FLOW_KEYS: dict[tuple[int, int], struct.Struct] = {}
"""(IP header length, TCP header length) -> the struct of a segment's flow key (at most
2 x 11 entries: TCP headers are 20..60 bytes in steps of 4)."""


def _flow_key(iphl: int, thl: int) -> struct.Struct:
    """The bytes of a mergeable segment that every segment of one GSO packet shares, in
    one unpack (a run compares its first segment's key with each next one's): everything
    but the IP length, id and checksum, and the TCP seq, flags and checksum. IPv4: TOS,
    flags/fragment offset (0 in a mergeable segment), TTL, protocol, addresses, ports;
    IPv6: version, class, flow label, next header, hop limit, addresses, ports; then
    ack and data offset, window, urgent pointer and options."""
    st = _FLOW_KEYS.get((iphl, thl))
    if st is None:
        t = iphl
        ip = f"xB4x4s2x{t + 4 - 12}s" if iphl == _IPV4_HEADER else f"4s2x{t + 4 - 6}s"
        st = struct.Struct(f"!{ip}4x5sx2s2x{thl - 18}s")
        _FLOW_KEYS[(iphl, thl)] = st
    return st


def coalesce(packets: Sequence[bytes]) -> list[list[bytes | memoryview]]:
    """The writes for ``packets`` (in order): ``[header, packet]`` or a merged GSO packet."""
    writes: list[list[bytes | memoryview]] = []
    i, n = 0, len(packets)
    while i < n:
        first = packets[i]
        seg = _segment(first)
        j, total, last_flags = _gso_run(packets, i, seg) if seg is not None else (i + 1, 0, 0)
        if seg is None or j - i == 1:
            writes.append([NO_OFFLOAD_HDR, first])
        else:
            writes.append(_merged(packets[i:j], seg, total, last_flags))
        i = j
    return writes


def _gso_run(
    packets: Sequence[bytes], i: int, seg: tuple[int, int, int, int]
) -> tuple[int, int, int]:
    """(end, IP total length, flags of the last) of the TCP segments from ``i`` that one
    GSO packet can carry: one flow, consecutive, equal-sized (a shorter one ends the run),
    no PSH before the last, within MAX_SEGMENTS and MAX_COALESCED."""
    first = packets[i]
    iphl, thl, size, seq = seg
    total = len(first)
    end = seq + size
    j = i + 1
    last_flags = first[iphl + 13]
    n = len(packets)
    key = _flow_key(iphl, thl)
    flow = key.unpack_from(first)
    while j < n and j - i < MAX_SEGMENTS and not last_flags & _TCP_PSH:
        nxt = packets[j]
        s2 = _segment(nxt)
        if s2 is None or s2[0] != iphl or s2[1] != thl or s2[2] > size or s2[3] != end:
            break
        if total + s2[2] > MAX_COALESCED or key.unpack_from(nxt) != flow:
            break
        total += s2[2]
        end += s2[2]
        last_flags = nxt[iphl + 13]
        j += 1
        if s2[2] < size:
            break  # a short segment ends a GSO run
    return j, total, last_flags


def _merged(
    run: Sequence[bytes], seg: tuple[int, int, int, int], total: int, last_flags: int
) -> list[bytes | memoryview]:
    """One GSO write for a run: the vnet header, the first segment's headers fixed up for
    the whole run (IP length, IPv4 header checksum, PSH of the last, TCP pseudo-header
    sum), then every segment's payload."""
    iphl, thl, size, _seq = seg
    first = run[0]
    hlen = iphl + thl
    header = bytearray(first[:hlen])
    if iphl == _IPV4_HEADER:
        header[2:4] = _U16.pack(total)
        header[10:12] = b"\0\0"
        header[10:12] = _U16.pack(ipv4_header_checksum(header[:20]))
        addresses, gso_type = first[12:20], VIRTIO_NET_HDR_GSO_TCPV4
    else:
        header[4:6] = _U16.pack(total - _IPV6_HEADER)
        addresses, gso_type = first[8:40], VIRTIO_NET_HDR_GSO_TCPV6
    header[iphl + 13] = last_flags  # PSH of the last segment, if any
    header[iphl + 16 : iphl + 18] = _U16.pack(_pseudo_sum(addresses, total - iphl))
    vnet = VNET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type, hlen, size, iphl, 16)
    write: list[bytes | memoryview] = [vnet, bytes(header)]
    write.extend(memoryview(p)[hlen:] for p in run)
    return write


# -- the read side: TSO packets from the kernel (TUNSETOFFLOAD) ------------------------------

TUNSETOFFLOAD: Final = 0x400454D0
"""ioctl: which offloads the kernel may use for packets it hands to us."""
TUN_F_CSUM: Final = 0x01
TUN_F_TSO4: Final = 0x02
READ_OFFLOADS: Final = TUN_F_CSUM | TUN_F_TSO4
"""Partial checksums and IPv4 TCP segmentation: reads may then be up to 64 KiB."""

VIRTIO_NET_HDR_GSO_NONE: Final = 0
VIRTIO_NET_HDR_GSO_ECN: Final = 0x80
_TCP_FIN: Final = 0x01
_TCP_CWR: Final = 0x80


def _csum(*parts: bytes | bytearray | memoryview) -> int:
    """RFC 1071 checksum of the concatenated parts (each but the last of even length).

    One's complement sum of 16-bit words == the big-endian integer modulo 0xFFFF.
    """
    total = 0
    for part in parts:
        total += (
            int.from_bytes(part, "big")
            if len(part) % 2 == 0
            else (int.from_bytes(part, "big") << 8)
        )
    return ~(total % 0xFFFF) & 0xFFFF


def from_kernel(buf: memoryview, n: int, out: list[bytes]) -> str | None:
    """Append the plain IP packets of one read (``buf[:n]``, vnet header first) to ``out``.

    A packet with a partial checksum gets it completed; an IPv4 TCP GSO packet is split
    into ``gso_size`` segments with their own IP length, id, TCP seq, flags and
    checksums. Returns why a read was dropped (``None`` when it was not).
    """
    if n <= VNET_HDR_LEN:
        return "truncated"
    flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(buf)
    gso_type &= ~VIRTIO_NET_HDR_GSO_ECN
    packet = buf[VNET_HDR_LEN:n]
    length = n - VNET_HDR_LEN
    if gso_type == VIRTIO_NET_HDR_GSO_NONE:
        if not flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            out.append(bytes(packet))
            return None
        return _complete_csum(packet, length, csum_start, csum_offset, out)
    if gso_type != VIRTIO_NET_HDR_GSO_TCPV4 or length < 40 or packet[0] >> 4 != 4:
        return "unsupported_gso"
    return _split_tcp_gso(packet, length, gso_size, out)


def _complete_csum(
    packet: memoryview, length: int, csum_start: int, csum_offset: int, out: list[bytes]
) -> str | None:
    """A packet with a partial checksum (``NEEDS_CSUM``): complete it and append it."""
    field = csum_start + csum_offset
    if field + 2 > length:
        return "bad_csum_offsets"
    data = bytearray(packet)
    data[field : field + 2] = _U16.pack(_csum(data[csum_start:]))
    out.append(bytes(data))
    return None


def _split_tcp_gso(packet: memoryview, length: int, gso_size: int, out: list[bytes]) -> str | None:
    """An IPv4 TCP GSO packet: append its ``gso_size`` segments."""
    ihl = (packet[0] & 0x0F) * 4
    thl = (packet[ihl + 12] >> 4) * 4 if length > ihl + 12 else 0
    hlen = ihl + thl
    if ihl < 20 or thl < 20 or hlen > length or gso_size == 0:
        return "bad_gso_header"
    header = bytes(packet[:hlen])
    payload_len = length - hlen
    for k, off in enumerate(range(0, payload_len, gso_size)):
        chunk = packet[hlen + off : hlen + min(off + gso_size, payload_len)]
        last = off + gso_size >= payload_len
        out.append(_tcp_segment(header, ihl, k, off, chunk, last))
    return None


def _tcp_segment(header: bytes, ihl: int, k: int, off: int, chunk: memoryview, last: bool) -> bytes:
    """Segment ``k`` of a TCP GSO packet: ``header`` with its own IP length, id, TCP seq,
    flags and checksums, then ``chunk`` (the payload from offset ``off``)."""
    thl = len(header) - ihl
    seg = bytearray(header)
    seg[2:4] = _U16.pack(len(header) + len(chunk))
    seg[4:6] = _U16.pack((_U16.unpack_from(header, 4)[0] + k) & 0xFFFF)
    seg[10:12] = b"\0\0"
    seg[10:12] = _U16.pack(_csum(seg[:ihl]))
    seq = _U32.unpack_from(header, ihl + 4)[0]
    seg[ihl + 4 : ihl + 8] = _U32.pack((seq + off) & 0xFFFFFFFF)
    f = header[ihl + 13]
    if not last:
        f &= ~(_TCP_FIN | _TCP_PSH)  # only the last segment finishes or pushes
    if k:
        f &= ~_TCP_CWR  # only the first segment signals CWR
    seg[ihl + 13] = f
    seg[ihl + 16 : ihl + 18] = b"\0\0"
    pseudo = header[12:20] + _U16.pack(_IPPROTO_TCP) + _U16.pack(thl + len(chunk))
    seg[ihl + 16 : ihl + 18] = _U16.pack(_csum(pseudo, seg[ihl:], chunk))
    seg += chunk
    return bytes(seg)
