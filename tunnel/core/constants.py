"""Protocol constants, each with the reason it has the value it has.

Wire layout (DESIGN D1), little-endian throughout::

    every datagram      type:u8 | phase:u8 | reserved:2 | receiver_index:u32          (8 bytes)
    DATA / CONTROL      header  | counter:u64 | AEAD ciphertext (plaintext + 16-byte tag)
                        the 16 bytes header+counter are the AEAD associated data; the
                        two reserved bytes are the binding mark ``epoch:u8 | mark:u8``

``phase`` is the key phase (0..255, wraps): it tells the receiver which generation of
traffic keys sealed the packet, so a rekey needs no extra round trip.
"""

from __future__ import annotations

import struct
from typing import Final

PROTOCOL_VERSION: Final = 2
"""Carried in the handshake payload; a peer speaking another version is refused. 2: DATA
and CONTROL headers carry the binding mark (a version 1 peer would drop them as
``malformed``; refused at the handshake instead, with ``protocol_version_mismatch``)."""

# -- message types (first byte of every datagram) -------------------------------------
MSG_HANDSHAKE_INIT: Final = 1
MSG_HANDSHAKE_RESP: Final = 2
MSG_DATA: Final = 3
MSG_CONTROL: Final = 4
MSG_COOKIE_REPLY: Final = 5
MSG_STANDBY_ACK: Final = 6
"""A cluster node's answer to a probe of a session it does not own (tunnel/core/standby.py)."""

HEADER = struct.Struct("<BBxxI")
"""type, key phase, 2 reserved zero bytes, receiver_index: 8 bytes."""

TRANSPORT_HEADER = struct.Struct("<BBxxIQ")
"""HEADER followed by the explicit 64-bit AEAD counter: 16 bytes, also the AEAD AD."""

MARKED_TRANSPORT_HEADER = struct.Struct("<BBBBIQ")
"""TRANSPORT_HEADER with its two reserved bytes filled: type, phase, epoch, mark, index,
counter. What ``SessionCipher.seal`` writes (docs/wire-format.md, "Binding mark")."""

BINDING_MARK_OFFSET: Final = 2
"""Byte offset of ``epoch:u8`` (then ``mark:u8``) in a DATA/CONTROL header."""

MAX_MARK: Final = 3
"""Largest ``mark``. 0: no mark (then ``epoch`` is 0 too). Client -> gateway: 1 + the
ReattachKind of a binding move to ``epoch`` (RECOVERY, PROACTIVE; 3 is MANUAL, which the
client does not send). Gateway -> client: what the gateway knows of the address it sends to
(MARK_UNVALIDATED, MARK_VALIDATED, MARK_BINDING), ``epoch`` its binding epoch."""

MARK_UNVALIDATED: Final = 1
"""Gateway -> client: the destination address is not validated for the session."""
MARK_VALIDATED: Final = 2
"""Gateway -> client: the destination is validated (a binding mark from it can move)."""
MARK_BINDING: Final = 3
"""Gateway -> client: the destination is the session's binding, at ``epoch``."""

AEAD_TAG_LEN: Final = 16
"""Tag length of both data ciphers (ChaCha20-Poly1305, AES-256-GCM)."""

KEY_LEN: Final = 32
"""ChaCha20-Poly1305, AES-256-GCM and X25519 key length."""

SESSION_ID_LEN: Final = 16
"""DESIGN D17: 128 random bits, unguessable."""

MAX_DATAGRAM: Final = 1500 + TRANSPORT_HEADER.size + AEAD_TAG_LEN
"""Largest datagram we accept: a 1500-byte inner packet plus framing. Larger is dropped."""

MAX_INNER_PACKET: Final = 1500
"""Largest inner IP packet carried (the TUN MTU never exceeds this)."""

MIN_MTU: Final = 576
"""Smallest inner MTU: the IPv4 datagram every host must accept (RFC 791). Client and
gateway TUN MTUs lie in [MIN_MTU, MAX_INNER_PACKET]: a larger MTU would let the host hand
the tunnel packets it drops as oversized."""

REPLAY_WINDOW_MIN: Final = 2048
"""DESIGN D12: at least 2048 counters, enough for reordering across paths at high rate."""

REKEY_AFTER_MESSAGES: Final = 2**60
"""Start a rekey long before the 64-bit counter could wrap (WireGuard uses the same bound)."""

REJECT_AFTER_MESSAGES: Final = 2**64 - 2**13 - 1
"""Never seal with a counter at or above this: the nonce must never repeat."""

MAX_STATE_VERSION: Final = 2**63 - 1
"""state_version is a signed-64-bit-safe integer; reaching it terminates (never wraps)."""
