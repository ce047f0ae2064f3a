"""Standby acknowledgements: probes answered by a cluster node that does not own the session.

A client with paths to several nodes of a gateway cluster probes each path. A probe that
reaches a node that does not own the session must neither move the session (else probes
would bounce it between nodes) nor be answered with the session's own keys and counters:
the owner seals with those counters, and a (key, counter) pair must never be used twice
(DESIGN D15a). The non-owner therefore answers under a key of its own, derived one way
from the session's gateway-to-client key:

    standby key = HKDF-SHA256(gateway send key, info = STANDBY_INFO)
    MSG_STANDBY_ACK = HEADER(type 6, key phase, client's receiver index)
                      | nonce (12 random bytes)
                      | ChaCha20-Poly1305(standby key, nonce, PROBE_ACK message, AD = the 20
                        bytes before)

The nonce is random (96 bits: no counter, no state shared with the owner; the chance of a
repeat over 2^32 acks is below 2^-32). The client opens it with the same derivation of its
receive key, and accepts it only for a probe it still awaits (the ack echoes the probe's
id; a replayed ack matches no outstanding probe): it validates the path and touches
neither the session's replay window nor its view of the gateway's state. Sans-I/O: the
caller supplies the nonce (``os.urandom(12)``).
"""

from __future__ import annotations

from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tunnel.core.constants import HEADER, KEY_LEN, MSG_STANDBY_ACK
from tunnel.core.drops import Drop
from tunnel.core.wire import STANDBY_ACK_LEN, ProbeAck, pack_control, parse_control

STANDBY_INFO: Final = b"jvpn standby ack v1"
NONCE_LEN: Final = 12
_AD_LEN: Final = HEADER.size + NONCE_LEN


def standby_key(gateway_send_key: bytes) -> bytes:
    """The standby-ack key of a session's gateway-to-client direction."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_LEN, salt=None, info=STANDBY_INFO)
    return hkdf.derive(gateway_send_key)


def seal_standby_ack(
    gateway_send_key: bytes, phase: int, receiver_index: int, ack: ProbeAck, nonce: bytes
) -> bytes:
    """The MSG_STANDBY_ACK datagram answering a probe (see the module docstring)."""
    if len(nonce) != NONCE_LEN:
        raise ValueError("a standby ack nonce is 12 bytes")
    ad = HEADER.pack(MSG_STANDBY_ACK, phase, receiver_index) + nonce
    sealed = ChaCha20Poly1305(standby_key(gateway_send_key)).encrypt(nonce, pack_control(ack), ad)
    return ad + sealed


def open_standby_ack(client_recv_key: bytes, data: bytes) -> ProbeAck | Drop:
    """The PROBE_ACK inside a MSG_STANDBY_ACK, or why not (never raises)."""
    if len(data) != STANDBY_ACK_LEN:
        return Drop.TRUNCATED if len(data) < STANDBY_ACK_LEN else Drop.OVERSIZED
    ad = data[:_AD_LEN]
    try:
        plain = ChaCha20Poly1305(standby_key(client_recv_key)).decrypt(
            ad[HEADER.size :], data[_AD_LEN:], ad
        )
    except InvalidTag:
        return Drop.BAD_TAG
    msg = parse_control(plain)
    if isinstance(msg, Drop):
        return msg
    return msg if isinstance(msg, ProbeAck) else Drop.UNKNOWN_TYPE
