"""Binary wire formats (DESIGN D1): strict parsing, typed drop reasons, never an exception.

Datagrams::

    HANDSHAKE_INIT   HEADER(type=1, phase=0, receiver_index=0) | sender_index:u32 | noise msg 1
                     | mac1:16 | mac2:16                              (cookie.py)
    HANDSHAKE_RESP   HEADER(type=2, phase=0, receiver_index=<initiator's index>) | sender_index:u32
                     | noise msg 2
    COOKIE_REPLY     HEADER(type=5, phase=0, receiver_index=<initiator's index>) | nonce:12
                     | AEAD(cookie):32                                 (cookie.py, 52 bytes)
    DATA / CONTROL   TRANSPORT_HEADER | AEAD(ciphertext)      (sealed and opened by aead.py)

CONTROL plaintext is ``ctype:u8`` followed by the fixed fields of that type (struct), never
JSON. Handshake payloads (inside Noise) are fixed structs too.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from enum import IntEnum
from operator import attrgetter
from typing import Any, ClassVar, Final

from tunnel.core.constants import (
    AEAD_TAG_LEN,
    HEADER,
    MARKED_TRANSPORT_HEADER,
    MAX_DATAGRAM,
    MAX_INNER_PACKET,
    MAX_MARK,
    MIN_MTU,
    MSG_CONTROL,
    MSG_COOKIE_REPLY,
    MSG_DATA,
    MSG_HANDSHAKE_INIT,
    MSG_HANDSHAKE_RESP,
    MSG_STANDBY_ACK,
    SESSION_ID_LEN,
    TRANSPORT_HEADER,
)
from tunnel.core.cookie import COOKIE_REPLY_LEN, INIT_MACS_LEN, MAC_LEN
from tunnel.core.drops import Drop

_U32 = struct.Struct("<I")
HANDSHAKE_PREFIX = struct.Struct("<BBxxII")
"""HEADER + sender_index: the clear part of a handshake datagram."""

MAX_NOISE_INIT = 512
"""Noise IK message 1 is 96 bytes + payload; anything above this is not ours."""
MIN_NOISE_INIT = 96
"""e (32) + encrypted s (48) + payload tag (16): the smallest message 1."""
MIN_NOISE_RESP = 32 + 16
"""e (32) + payload tag (16)."""


@dataclass(frozen=True, slots=True)
class Header:
    msg_type: int
    phase: int
    receiver_index: int
    epoch: int = 0
    """DATA/CONTROL binding mark: low 8 bits of a binding epoch (0 when ``mark`` is 0)."""
    mark: int = 0
    """DATA/CONTROL binding mark (constants.MAX_MARK): from a client 1 + the ReattachKind
    of a binding move to ``epoch``, from the gateway what it knows of the destination; 0:
    none. Unauthenticated until the AEAD tag verified (it is associated data)."""


_TRANSPORT_TYPES = (MSG_DATA, MSG_CONTROL)


def parse_header(data: bytes) -> Header | Drop:
    """First look at any datagram: size limits and the message type."""
    n = len(data)
    if n > MAX_DATAGRAM:
        return Drop.OVERSIZED
    if n < HEADER.size:
        return Drop.TRUNCATED
    msg_type, phase, receiver_index = HEADER.unpack_from(data)
    epoch, mark = data[2], data[3]
    if mark > MAX_MARK or (epoch and not mark) or (mark and msg_type not in _TRANSPORT_TYPES):
        return Drop.MALFORMED  # a binding mark exists in DATA/CONTROL only, and names its epoch
    shape = _SHAPES.get(msg_type)
    if shape is None:
        return Drop.UNKNOWN_TYPE
    drop = shape(n, phase, receiver_index)
    return Header(msg_type, phase, receiver_index, epoch, mark) if drop is None else drop


_MIN_TRANSPORT = TRANSPORT_HEADER.size + AEAD_TAG_LEN
"""The smallest DATA/CONTROL datagram: the header and an AEAD tag (empty plaintext)."""

TransportFields = tuple[int, int, int, int, int, int]
"""``(msg_type, phase, epoch, mark, receiver_index, counter)`` of a transport datagram."""


def transport_fields(data: bytes) -> TransportFields | None:
    """The header fields of a well-formed DATA or CONTROL datagram, in one unpack (the
    receive fast path: no ``Header`` object), else None. Accepts exactly the DATA and
    CONTROL datagrams ``parse_header`` accepts; for any other input ``parse_header`` says
    what it is (a handshake message) or why it is dropped."""
    if not _MIN_TRANSPORT <= len(data) <= MAX_DATAGRAM:
        return None
    fields: TransportFields = MARKED_TRANSPORT_HEADER.unpack_from(data)
    msg_type, mark = fields[0], fields[3]
    if (msg_type != MSG_DATA and msg_type != MSG_CONTROL) or mark > MAX_MARK:
        return None
    return fields if mark or not fields[2] else None


def _transport_shape(n: int, phase: int, receiver_index: int) -> Drop | None:
    return Drop.TRUNCATED if n < _MIN_TRANSPORT else None


def _init_shape(n: int, phase: int, receiver_index: int) -> Drop | None:
    if receiver_index != 0 or phase != 0:
        return Drop.MALFORMED
    if n < HANDSHAKE_PREFIX.size + MIN_NOISE_INIT + INIT_MACS_LEN:
        return Drop.TRUNCATED
    if n > HANDSHAKE_PREFIX.size + MAX_NOISE_INIT + INIT_MACS_LEN:
        return Drop.OVERSIZED
    return None


def _resp_shape(n: int, phase: int, receiver_index: int) -> Drop | None:
    if phase != 0:
        return Drop.MALFORMED
    return Drop.TRUNCATED if n < HANDSHAKE_PREFIX.size + MIN_NOISE_RESP else None


def _cookie_reply_shape(n: int, phase: int, receiver_index: int) -> Drop | None:
    if phase != 0:
        return Drop.MALFORMED
    if n != COOKIE_REPLY_LEN:
        return Drop.TRUNCATED if n < COOKIE_REPLY_LEN else Drop.OVERSIZED
    return None


STANDBY_ACK_LEN = HEADER.size + 12 + 1 + 22 + AEAD_TAG_LEN
"""HEADER, a random 96-bit nonce, a sealed PROBE_ACK control message (tunnel/core/standby.py)."""


def _standby_ack_shape(n: int, phase: int, receiver_index: int) -> Drop | None:
    if n != STANDBY_ACK_LEN:
        return Drop.TRUNCATED if n < STANDBY_ACK_LEN else Drop.OVERSIZED
    return None


_SHAPES: dict[int, Callable[[int, int, int], Drop | None]] = {
    MSG_STANDBY_ACK: _standby_ack_shape,
    MSG_DATA: _transport_shape,
    MSG_CONTROL: _transport_shape,
    MSG_HANDSHAKE_INIT: _init_shape,
    MSG_HANDSHAKE_RESP: _resp_shape,
    MSG_COOKIE_REPLY: _cookie_reply_shape,
}
"""Per message type: the size and field checks of its fixed part (None: well formed)."""


def pack_handshake(msg_type: int, receiver_index: int, sender_index: int, noise: bytes) -> bytes:
    return HANDSHAKE_PREFIX.pack(msg_type, 0, receiver_index, sender_index) + noise


def split_handshake(data: bytes) -> tuple[int, bytes]:
    """(sender_index, noise message) of a datagram that parse_header accepted."""
    return _U32.unpack_from(data, HEADER.size)[0], data[HANDSHAKE_PREFIX.size :]


def split_init(data: bytes) -> tuple[int, bytes, bytes, bytes]:
    """(sender_index, noise message 1, mac1, mac2) of an INIT that parse_header accepted."""
    end = len(data) - INIT_MACS_LEN
    return (
        _U32.unpack_from(data, HEADER.size)[0],
        data[HANDSHAKE_PREFIX.size : end],
        data[end : end + MAC_LEN],
        data[end + MAC_LEN :],
    )


# -- handshake payloads ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InitPayload:
    """Inside Noise message 1: protocol version and the client's wall clock (freshness, skew).

    After the fixed part come optional extensions, ``type:u8 | length:u8 | value`` as in
    ``RespPayload`` (a type this build does not know is skipped):

    - type 1 (EXT_PREVIOUS_SESSION): the id of the session the client wants to continue
      (DESIGN D15c): the gateway creates a new session only when it holds no live
      session of that id for this client;
    - type 2 (EXT_CIPHERS): the data ciphers the client accepts, one wire code (u8) each,
      in its order of preference (tunnel/core/ciphers.py); without it (a client that
      predates the extension) the client speaks ChaCha20-Poly1305 only.
    """

    STRUCT: ClassVar = struct.Struct("<BQB")
    EXT_PREVIOUS_SESSION: ClassVar = 1
    EXT_CIPHERS: ClassVar = 2
    version: int
    ts_ms: int
    path_id: int
    previous_session: bytes = b""
    """The session id the client continues (16 bytes), or empty: a first handshake."""
    ciphers: tuple[int, ...] = ()
    """Data cipher codes the client accepts, preferred first; empty: no extension."""

    def pack(self) -> bytes:
        out = self.STRUCT.pack(self.version, self.ts_ms, self.path_id)
        if self.previous_session:
            ext = _EXT_HEADER.pack(self.EXT_PREVIOUS_SESSION, len(self.previous_session))
            out += ext + self.previous_session
        return out + _cipher_extension(self.EXT_CIPHERS, self.ciphers)

    @classmethod
    def parse(cls, data: bytes) -> InitPayload | Drop:
        if len(data) < cls.STRUCT.size:
            return Drop.MALFORMED
        extensions = _walk_extensions(data, cls.STRUCT.size)
        if isinstance(extensions, Drop):
            return extensions
        previous = extensions.get(cls.EXT_PREVIOUS_SESSION)
        if previous is not None and len(previous) != SESSION_ID_LEN:
            return Drop.MALFORMED
        ciphers = _cipher_list(extensions.get(cls.EXT_CIPHERS))
        if ciphers is None:
            return Drop.MALFORMED
        version, ts_ms, path_id = cls.STRUCT.unpack_from(data)
        return cls(version, ts_ms, path_id, previous or b"", ciphers)


@dataclass(frozen=True, slots=True)
class RespPayload:
    """Inside Noise message 2: the session the gateway created, or why it refused.

    status 0 = accepted; otherwise a wire reason code (the session was not created).
    Advertised endpoints (D7) are (ip, port) pairs, at most MAX_ENDPOINTS. After them come
    optional extensions, ``type:u8 | length:u8 | value``: a parser skips a type it does
    not know, so a later field never needs a version bump. Type 1 (EXT_INNER_IPV6) is the
    inner IPv6 address, present when the gateway has an inner IPv6 subnet. Type 2
    (EXT_CIPHERS): accepted, the data cipher the gateway chose (one code); refused with
    ``cipher_mismatch``, the ciphers the gateway allows; absent (a gateway that predates
    it): ChaCha20-Poly1305. Type 3 (EXT_NODE): ``owner_epoch:u32 | node id`` (1-64
    characters of NODE_ID_RE), the cluster node serving the session; absent: the gateway
    is not a cluster node.
    """

    FIXED: ClassVar = struct.Struct("<BH16sQQI4sB4sHB")
    ENDPOINT: ClassVar = struct.Struct("<B16sH")
    EXT_HEADER: ClassVar = struct.Struct("<BB")
    EXT_INNER_IPV6: ClassVar = 1
    EXT_CIPHERS: ClassVar = 2
    EXT_NODE: ClassVar = 3
    INNER_IPV6: ClassVar = struct.Struct("<16sB16s")
    """address, prefix length (1..128), the gateway's inner IPv6 address."""
    MAX_ENDPOINTS: ClassVar = 4
    version: int
    status: int
    session_id: bytes
    gw_ts_ms: int
    state_version: int
    epoch: int
    inner_address: str
    inner_prefix: int
    inner_gateway: str
    mtu: int
    endpoints: tuple[tuple[str, int], ...] = ()
    inner_address6: str = ""
    """The client's inner IPv6 address; empty: the session carries no IPv6."""
    inner_prefix6: int = 0
    inner_gateway6: str = ""
    ciphers: tuple[int, ...] = ()
    """Data cipher codes (EXT_CIPHERS): the choice, or what the gateway allows."""
    node_id: str = ""
    """The cluster node serving the session (EXT_NODE); empty: not a cluster node."""
    owner_epoch: int = 0
    """The session's owner epoch on that node (EXT_NODE)."""

    def pack(self) -> bytes:
        out = [
            self.FIXED.pack(
                self.version,
                self.status,
                self.session_id,
                self.gw_ts_ms,
                self.state_version,
                self.epoch,
                ipaddress.IPv4Address(self.inner_address).packed,
                self.inner_prefix,
                ipaddress.IPv4Address(self.inner_gateway).packed,
                self.mtu,
                len(self.endpoints),
            )
        ]
        for host, port in self.endpoints[: self.MAX_ENDPOINTS]:
            ip = ipaddress.ip_address(host)
            out.append(self.ENDPOINT.pack(ip.version, ip.packed.ljust(16, b"\0"), port))
        if self.inner_address6:
            value = self.INNER_IPV6.pack(
                ipaddress.IPv6Address(self.inner_address6).packed,
                self.inner_prefix6,
                ipaddress.IPv6Address(self.inner_gateway6 or "::").packed,
            )
            out.append(self.EXT_HEADER.pack(self.EXT_INNER_IPV6, len(value)) + value)
        out.append(_cipher_extension(self.EXT_CIPHERS, self.ciphers))
        if self.node_id:
            value = _U32.pack(self.owner_epoch) + self.node_id.encode("ascii")
            out.append(self.EXT_HEADER.pack(self.EXT_NODE, len(value)) + value)
        return b"".join(out)

    @classmethod
    def parse(cls, data: bytes) -> RespPayload | Drop:
        if len(data) < cls.FIXED.size:
            return Drop.TRUNCATED
        (ver, status, sid, ts, sv, epoch, addr, prefix, gw, mtu, n) = cls.FIXED.unpack_from(data)
        end = cls.FIXED.size + n * cls.ENDPOINT.size
        if n > cls.MAX_ENDPOINTS or len(data) < end:
            return Drop.MALFORMED
        if prefix > 32 or not MIN_MTU <= mtu <= MAX_INNER_PACKET:
            return Drop.MALFORMED
        eps = []
        for i in range(n):
            fam, raw, port = cls.ENDPOINT.unpack_from(data, cls.FIXED.size + i * cls.ENDPOINT.size)
            if fam == 4:
                eps.append((str(ipaddress.IPv4Address(raw[:4])), port))
            elif fam == 6:
                eps.append((str(ipaddress.IPv6Address(raw)), port))
            else:
                return Drop.MALFORMED
        extensions = _walk_extensions(data, end)
        if isinstance(extensions, Drop):
            return extensions
        inner6 = _inner_ipv6(extensions.get(cls.EXT_INNER_IPV6))
        ciphers = _cipher_list(extensions.get(cls.EXT_CIPHERS))
        node = _node_extension(extensions.get(cls.EXT_NODE))
        if inner6 is None or ciphers is None or node is None:
            return Drop.MALFORMED
        return cls(
            ver, status, sid, ts, sv, epoch,
            str(ipaddress.IPv4Address(addr)), prefix, str(ipaddress.IPv4Address(gw)), mtu,
            tuple(eps), *inner6, ciphers, *node,
        )  # fmt: skip


_EXT_HEADER = struct.Struct("<BB")
"""``type:u8 | length:u8`` of a handshake payload extension."""

MAX_CIPHER_CODES = 16
"""Longest cipher list an extension may carry (this build knows 2)."""


def _walk_extensions(data: bytes, offset: int) -> dict[int, bytes] | Drop:
    """The extensions of a handshake payload from ``offset``: type -> value. A cut-off
    extension is ``truncated``, a type twice ``malformed``; the values are checked by
    whoever knows the type (unknown types are ignored)."""
    found: dict[int, bytes] = {}
    while offset < len(data):
        if len(data) - offset < _EXT_HEADER.size:
            return Drop.TRUNCATED
        ext_type, length = _EXT_HEADER.unpack_from(data, offset)
        offset += _EXT_HEADER.size
        if len(data) - offset < length:
            return Drop.TRUNCATED
        if ext_type in found:
            return Drop.MALFORMED
        found[ext_type] = bytes(data[offset : offset + length])
        offset += length
    return found


def _cipher_extension(ext_type: int, codes: tuple[int, ...]) -> bytes:
    """The cipher-list extension for ``codes`` (nothing when empty)."""
    return _EXT_HEADER.pack(ext_type, len(codes)) + bytes(codes) if codes else b""


def _cipher_list(value: bytes | None) -> tuple[int, ...] | None:
    """The codes of a cipher-list extension (() when absent), or None when impossible:
    empty, longer than MAX_CIPHER_CODES, a zero code or a code twice."""
    if value is None:
        return ()
    codes = tuple(value)
    if not 0 < len(codes) <= MAX_CIPHER_CODES or 0 in codes or len(set(codes)) != len(codes):
        return None
    return codes


NODE_ID_RE = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""A node id on the wire: what ``node_id`` allows in gateway.toml, ASCII."""
MAX_NODE_ID = 64


def _node_extension(value: bytes | None) -> tuple[str, int] | None:
    """(node id, owner epoch) of EXT_NODE (("", 0) when absent), or None when it is
    impossible: shorter than the epoch and one character, or not a valid node id."""
    if value is None:
        return "", 0
    if len(value) < _U32.size + 1 or not NODE_ID_RE.fullmatch(value[_U32.size :]):
        return None
    return value[_U32.size :].decode("ascii"), _U32.unpack_from(value)[0]


def _inner_ipv6(value: bytes | None) -> tuple[str, int, str] | None:
    """The value of EXT_INNER_IPV6 (("", 0, "") when absent), or None when it is
    impossible: the wrong length, a prefix outside 1..128, or an unspecified, multicast or
    loopback address."""
    if value is None:
        return "", 0, ""
    if len(value) != RespPayload.INNER_IPV6.size:
        return None
    raw, prefix, raw_gw = RespPayload.INNER_IPV6.unpack(value)
    address = ipaddress.IPv6Address(raw)
    gateway = ipaddress.IPv6Address(raw_gw)
    if not 1 <= prefix <= 128:
        return None
    if address.is_unspecified or address.is_multicast or address.is_loopback:
        return None
    return str(address), prefix, "" if gateway.is_unspecified else str(gateway)


# -- control messages ----------------------------------------------------------------------


class CType(IntEnum):
    PROBE = 1
    PROBE_ACK = 2
    PATH_CHALLENGE = 3
    PATH_RESPONSE = 4
    REATTACH_REQUEST = 5
    REATTACH_ACK = 6
    REATTACH_REJECT = 7
    STATE_UPDATE = 8
    STATE_ACK = 9
    TERMINATE = 10
    REKEY = 11
    NODE_INFO = 12


class ReattachKind(IntEnum):
    RECOVERY = 0
    PROACTIVE = 1
    MANUAL = 2
    RESUME = 3
    """The gateway lost the binding (its view is RECOVERING) while the client's path works."""


@dataclass(frozen=True, slots=True)
class Probe:
    """Client -> gateway on every path. Padded to the size of PROBE_ACK (no amplification)."""

    CTYPE: ClassVar = CType.PROBE
    STRUCT: ClassVar = struct.Struct("<IBQ9x")
    probe_id: int
    path_id: int
    ts_ms: int


@dataclass(frozen=True, slots=True)
class ProbeAck:
    """Gateway -> client, same path. Carries the gateway's view so probes also sync state."""

    CTYPE: ClassVar = CType.PROBE_ACK
    STRUCT: ClassVar = struct.Struct("<IBQBII")
    probe_id: int
    path_id: int
    gw_ts_ms: int
    gw_state: int
    epoch: int
    rx_probes: int
    """PROBEs the gateway has received from this session with this ``path_id`` (this one
    included, mod 2^32): against the client's own count it splits loss by direction."""


@dataclass(frozen=True, slots=True)
class PathChallenge:
    CTYPE: ClassVar = CType.PATH_CHALLENGE
    STRUCT: ClassVar = struct.Struct("<8s")
    token: bytes


@dataclass(frozen=True, slots=True)
class PathResponse:
    CTYPE: ClassVar = CType.PATH_RESPONSE
    STRUCT: ClassVar = struct.Struct("<8s")
    token: bytes


@dataclass(frozen=True, slots=True)
class ReattachRequest:
    """Proof of possession is the AEAD itself (D8); nonce and ts_ms give freshness."""

    CTYPE: ClassVar = CType.REATTACH_REQUEST
    STRUCT: ClassVar = struct.Struct("<QQIBBQ")
    nonce: int
    ts_ms: int
    expected_epoch: int
    path_id: int
    kind: int
    client_version: int


@dataclass(frozen=True, slots=True)
class ReattachAck:
    CTYPE: ClassVar = CType.REATTACH_ACK
    STRUCT: ClassVar = struct.Struct("<QIQB")
    nonce: int
    epoch: int
    gw_version: int
    gw_state: int


@dataclass(frozen=True, slots=True)
class ReattachReject:
    CTYPE: ClassVar = CType.REATTACH_REJECT
    STRUCT: ClassVar = struct.Struct("<QHBI")
    nonce: int
    reason: int
    fatal: int
    epoch: int


@dataclass(frozen=True, slots=True)
class StateUpdate:
    """Gateway -> client after each gateway transition; retransmitted until STATE_ACK."""

    CTYPE: ClassVar = CType.STATE_UPDATE
    STRUCT: ClassVar = struct.Struct("<IBQIH")
    seq: int
    gw_state: int
    gw_version: int
    epoch: int
    reason: int


@dataclass(frozen=True, slots=True)
class StateAck:
    CTYPE: ClassVar = CType.STATE_ACK
    STRUCT: ClassVar = struct.Struct("<I")
    seq: int


@dataclass(frozen=True, slots=True)
class Terminate:
    CTYPE: ClassVar = CType.TERMINATE
    STRUCT: ClassVar = struct.Struct("<H")
    reason: int


@dataclass(frozen=True, slots=True)
class Rekey:
    """First message sealed under a new key phase, so the peer promotes without data."""

    CTYPE: ClassVar = CType.REKEY
    STRUCT: ClassVar = struct.Struct("<B")
    phase: int


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """Gateway -> client: the cluster node serving the session and its owner epoch. Sent
    with every REATTACH_ACK and STATE_UPDATE of a cluster node (docs/wire-format.md)."""

    CTYPE: ClassVar = CType.NODE_INFO
    STRUCT: ClassVar = struct.Struct("<IB64s")
    owner_epoch: int
    node_len: int
    node_id: bytes
    """``node_len`` characters of NODE_ID_RE, then zeros to 64 bytes."""

    @classmethod
    def of(cls, node_id: str, owner_epoch: int) -> NodeInfo:
        raw = node_id.encode("ascii")
        return cls(owner_epoch, len(raw), raw.ljust(MAX_NODE_ID, b"\0"))

    @property
    def node(self) -> str:
        return self.node_id[: self.node_len].decode("ascii")

    def valid(self) -> bool:
        if not 0 < self.node_len <= MAX_NODE_ID:
            return False
        raw, rest = self.node_id[: self.node_len], self.node_id[self.node_len :]
        return bool(NODE_ID_RE.fullmatch(raw)) and not any(rest)


Control = (
    Probe | ProbeAck | PathChallenge | PathResponse | ReattachRequest | ReattachAck
    | ReattachReject | StateUpdate | StateAck | Terminate | Rekey | NodeInfo
)  # fmt: skip

_CONTROL_TYPES: dict[int, type] = {
    cls.CTYPE: cls
    for cls in (
        Probe, ProbeAck, PathChallenge, PathResponse, ReattachRequest, ReattachAck,
        ReattachReject, StateUpdate, StateAck, Terminate, Rekey, NodeInfo,
    )
}  # fmt: skip

STATE_CODES = ("BIRTH", "ATTACHED", "VOLATILE", "RECOVERING", "DEGRADED", "TERMINATED")
"""Wire code of a state name = its index."""

PROBE_ACK_BODY: Final = struct.Struct("<B" + ProbeAck.STRUCT.format[1:])
"""A PROBE_ACK plaintext in one pack: its CType, then ``ProbeAck``'s fields (issue 11: the
gateway answers a probe without building the record)."""
PROBE_BODY: Final = Probe.STRUCT
"""A PROBE's fields after its CType byte (``unpack_from(plaintext, 1)``)."""


def _packer(cls: type) -> Callable[[Any], bytes]:
    """The packer of one control message class: its type byte, then its fields in order,
    read by one ``attrgetter`` (no per-message list of values)."""
    prefix = bytes((cls.CTYPE,))  # type: ignore[attr-defined]
    pack = cls.STRUCT.pack  # type: ignore[attr-defined]
    names = tuple(f.name for f in dataclass_fields(cls))
    get = attrgetter(*names)
    if len(names) == 1:  # attrgetter of one name returns the value, not a tuple
        return lambda msg: prefix + pack(get(msg))
    return lambda msg: prefix + pack(*get(msg))


_PACKERS: dict[type, Callable[[Any], bytes]] = {
    cls: _packer(cls) for cls in _CONTROL_TYPES.values()
}


def pack_control(msg: Control) -> bytes:
    return _PACKERS[type(msg)](msg)


def parse_control(plaintext: bytes) -> Control | Drop:
    """Decode an authenticated CONTROL plaintext. Exact lengths only; never raises."""
    if not plaintext:
        return Drop.TRUNCATED
    cls = _CONTROL_TYPES.get(plaintext[0])
    if cls is None:
        return Drop.UNKNOWN_TYPE
    st: struct.Struct = cls.STRUCT  # type: ignore[attr-defined]
    if len(plaintext) - 1 < st.size:
        return Drop.TRUNCATED
    if len(plaintext) - 1 > st.size:
        return Drop.OVERSIZED
    values = st.unpack_from(plaintext, 1)
    msg = cls(*values)
    if isinstance(msg, (ProbeAck, StateUpdate, ReattachAck)) and msg.gw_state >= len(STATE_CODES):
        return Drop.MALFORMED
    if isinstance(msg, ReattachRequest) and msg.kind not in ReattachKind._value2member_map_:
        return Drop.MALFORMED
    if isinstance(msg, ReattachReject) and msg.fatal not in (0, 1):
        return Drop.MALFORMED
    if isinstance(msg, NodeInfo) and not msg.valid():
        return Drop.MALFORMED
    return msg  # type: ignore[no-any-return]
