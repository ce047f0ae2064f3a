"""Noise_IK_25519_ChaChaPoly_BLAKE2s handshake (noiseprotocol), yielding ``TrafficKeys``.

DESIGN D10: Noise is used for the two handshake messages only. Its transport
CipherStates count nonces implicitly, which breaks on UDP loss, so after ``Split()`` we
take just their raw keys into ``TrafficKeys`` and seal datagrams with explicit counters
(``tunnel.core.aead``). The payloads of the two messages carry the negotiation of the data
cipher that seals them (AES-256-GCM or ChaCha20-Poly1305, ``tunnel.core.ciphers``): being
Noise payloads they are encrypted, authenticated and bound into the handshake hash, so no
one on the path can strip an offered cipher or alter the choice (no downgrade). The
handshake itself always uses ChaCha20-Poly1305, as its protocol name says.

IK: the initiator (client) knows the responder's (gateway's) static public key; message 1
carries the client's static key, encrypted, so the gateway learns who is connecting
(``PendingHandshake.client_static``) and checks it against its allow-list itself.

Message 1 can be replayed to a fresh ``Responder`` and will verify again (Noise IK has no
replay protection of its own; WireGuard puts a TAI64N timestamp in the payload). The
replayer cannot use the resulting keys, but the gateway must not let a replayed message 1
replace a live session: put a monotonic timestamp or nonce in the payload and check it
per client key.

Bad input from the network becomes ``HandshakeError`` and nothing else; wrong local
arguments (key lengths, calling methods out of order) raise ``ValueError`` or
``HandshakeUsageError``.
"""

from __future__ import annotations

import base64
import hashlib
from typing import TYPE_CHECKING, Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from tunnel.core import constants
from tunnel.core.aead import TrafficKeys

if TYPE_CHECKING:
    from noise.connection import NoiseConnection

PROTOCOL_NAME: Final = b"Noise_IK_25519_ChaChaPoly_BLAKE2s"
PROLOGUE: Final = b"jvpn v1"
"""Mixed into the handshake hash: a peer speaking another protocol version cannot agree."""

INIT_OVERHEAD: Final = 32 + (32 + 16) + 16
"""Message 1 length without payload: ephemeral key, encrypted static key + tag, payload tag."""
RESPONSE_OVERHEAD: Final = 32 + 16
"""Message 2 length without payload: ephemeral key, payload tag."""
MAX_MESSAGE: Final = 65535
"""Noise's limit on one handshake message."""


class HandshakeError(Exception):
    """A handshake message from the peer did not verify: the peer's fault (HANDSHAKE_FAILED)."""


class HandshakeUsageError(RuntimeError):
    """A handshake object was used out of order by local code."""


def generate_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as raw 32-byte ``(private, public)``."""
    private = x25519.X25519PrivateKey.generate()
    raw = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return raw, private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


FINGERPRINT_PREFIX: Final = "SHA256:"
"""A fingerprint names its hash, as OpenSSH's ``SHA256:...`` fingerprints do."""

FINGERPRINT_CHARS: Final = 16
"""Base64 characters of the digest kept: 96 bits, enough to tell keys apart in a log line."""


def fingerprint(public: bytes) -> str:
    """The fingerprint of a raw 32-byte PUBLIC key, e.g. ``SHA256:q2Jk3nW0u7sT9xYb``.

    ``SHA256:`` then the first 16 characters of the standard base64 of SHA-256(key). It
    names a key in log lines and messages (jvpn-keygen, the client, the gateway) without
    the whole key; it is never computed from a private key.
    """
    _check_len(public, "public key")
    digest = base64.standard_b64encode(hashlib.sha256(public).digest()).decode("ascii")
    return FINGERPRINT_PREFIX + digest[:FINGERPRINT_CHARS]


def public_key(private: bytes) -> bytes:
    """The raw X25519 public key of a raw 32-byte private key."""
    _check_len(private, "private key")
    key = x25519.X25519PrivateKey.from_private_bytes(private)
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _check_len(key: bytes, what: str) -> None:
    if len(key) != constants.KEY_LEN:
        raise ValueError(f"{what} must be {constants.KEY_LEN} bytes, got {len(key)}")


def _noise_errors() -> tuple[type[BaseException], ...]:
    """Everything noiseprotocol/cryptography raise for a message that does not verify."""
    from noise import exceptions as ne

    return (
        ne.NoiseValueError,  # wrong-length key fields (truncated message)
        ne.NoiseInvalidMessage,
        ne.NoiseHandshakeError,
        ne.NoiseMaxNonceError,
        InvalidTag,  # AEAD failure: wrong keys, tampered, random bytes
        ValueError,  # cryptography: low-order X25519 point ("Error computing shared key")
    )


def _new_connection(initiator: bool, static_private: bytes, remote_public: bytes | None) -> Any:
    # Imported here: noiseprotocol loads cryptography's OpenSSL binding, which imports
    # threading; importing tunnel.core stays free of it until a handshake actually runs.
    from noise.connection import Keypair, NoiseConnection

    conn = NoiseConnection.from_name(PROTOCOL_NAME)
    conn.set_prologue(PROLOGUE)
    conn.set_keypair_from_private_bytes(Keypair.STATIC, static_private)
    if remote_public is not None:
        conn.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, remote_public)
    if initiator:
        conn.set_as_initiator()
    else:
        conn.set_as_responder()
    conn.start_handshake()
    return conn


def _split_keys(conn: NoiseConnection) -> TrafficKeys:
    """Raw keys of the finished handshake's two CipherStates (explicit counters from here)."""
    protocol = conn.noise_protocol
    return TrafficKeys(
        send=bytes(protocol.cipher_state_encrypt.k), recv=bytes(protocol.cipher_state_decrypt.k)
    )


def _check_message(message: bytes, minimum: int) -> bytes:
    data = bytes(message)
    if len(data) < minimum:
        raise HandshakeError("handshake message truncated")
    if len(data) > MAX_MESSAGE:
        raise HandshakeError("handshake message oversized")
    return data


class Initiator:
    """Client side: ``write_init`` once, then ``read_response`` until one verifies.

    A response that does not verify leaves the Initiator unchanged, so a forged or
    corrupted response injected by an attacker cannot abort the handshake.
    """

    __slots__ = ("_conn", "_done", "_sent", "handshake_hash")

    def __init__(self, static_private: bytes, responder_public: bytes) -> None:
        _check_len(static_private, "static private key")
        _check_len(responder_public, "responder public key")
        self._conn = _new_connection(True, static_private, responder_public)
        self._sent = False
        self._done = False
        self.handshake_hash: bytes | None = None
        """Noise handshake hash once complete (channel binding), else None."""

    def __repr__(self) -> str:
        return f"Initiator(sent={self._sent}, done={self._done})"

    @property
    def done(self) -> bool:
        """A response verified (the Initiator cannot read another)."""
        return self._done

    def write_init(self, payload: bytes) -> bytes:
        """Noise IK message 1 carrying ``payload`` (encrypted, authenticated)."""
        if self._sent:
            raise HandshakeUsageError("write_init() may be called only once")
        if len(payload) > MAX_MESSAGE - INIT_OVERHEAD:
            raise ValueError("handshake payload too large")
        message = bytes(self._conn.write_message(bytes(payload)))
        self._sent = True
        return message

    def read_response(self, message: bytes) -> tuple[bytes, TrafficKeys]:
        """``(payload, keys)`` from message 2; HandshakeError if it does not verify."""
        if not self._sent:
            raise HandshakeUsageError("read_response() before write_init()")
        if self._done:
            raise HandshakeUsageError("handshake already complete")
        data = _check_message(message, RESPONSE_OVERHEAD)
        saved = _save(self._conn)
        try:
            payload = bytes(self._conn.read_message(data))
        except _noise_errors() as exc:
            _restore(self._conn, saved)
            raise HandshakeError("handshake response did not verify") from exc
        if not self._conn.handshake_finished:  # pragma: no cover - IK has two messages
            raise HandshakeUsageError("handshake not finished after message 2")
        self._done = True
        self.handshake_hash = bytes(self._conn.get_handshake_hash())
        return payload, _split_keys(self._conn)


class Responder:
    """Gateway side: one per static key; ``read_init`` for every message 1 received."""

    __slots__ = ("_static_private",)

    def __init__(self, static_private: bytes) -> None:
        _check_len(static_private, "static private key")
        self._static_private = bytes(static_private)

    def __repr__(self) -> str:
        return "Responder(<redacted>)"

    def read_init(self, message: bytes) -> PendingHandshake:
        """Verify message 1; HandshakeError on any bad input. Checks no allow-list."""
        data = _check_message(message, INIT_OVERHEAD)
        conn = _new_connection(False, self._static_private, None)
        try:
            payload = bytes(conn.read_message(data))
        except _noise_errors() as exc:
            raise HandshakeError("handshake initiation did not verify") from exc
        remote = conn.noise_protocol.handshake_state.rs.public_bytes
        return PendingHandshake(conn, bytes(remote), payload)


class PendingHandshake:
    """A verified message 1: decide (allow-list, payload), then ``write_response`` once."""

    __slots__ = ("_conn", "_done", "client_static", "handshake_hash", "payload")

    def __init__(self, conn: NoiseConnection, client_static: bytes, payload: bytes) -> None:
        self._conn = conn
        self._done = False
        self.client_static = client_static
        """The initiator's static X25519 public key (32 bytes), proven by message 1."""
        self.payload = payload
        """Decrypted payload of message 1."""
        self.handshake_hash: bytes | None = None
        """Noise handshake hash once the response is written, else None."""

    def __repr__(self) -> str:
        return f"PendingHandshake(payload_len={len(self.payload)}, done={self._done})"

    def write_response(self, payload: bytes) -> tuple[bytes, TrafficKeys]:
        """``(message 2, keys)``; the keys are usable as soon as message 2 is sent."""
        if self._done:
            raise HandshakeUsageError("write_response() may be called only once")
        if len(payload) > MAX_MESSAGE - RESPONSE_OVERHEAD:
            raise ValueError("handshake payload too large")
        message = bytes(self._conn.write_message(bytes(payload)))
        self._done = True
        self.handshake_hash = bytes(self._conn.get_handshake_hash())
        return message, _split_keys(self._conn)


# -- keeping an Initiator intact across a response that does not verify -------------------
# noiseprotocol mutates its HandshakeState while reading, even when the read then fails.
# For message 2 of IK ("e, ee, se" + payload) that is: the pending message patterns, re,
# the symmetric state's h and ck, and the handshake CipherState's key and nonce, plus
# NoiseConnection's "what comes next" marker. Pinned to noiseprotocol 0.3.1.


def _save(conn: Any) -> tuple[Any, ...]:
    hs = conn.noise_protocol.handshake_state
    ss = hs.symmetric_state
    cs = ss.cipher_state
    return (list(hs.message_patterns), hs.re, ss.h, ss.ck, cs.k, cs.n, conn._next_fn)


def _restore(conn: Any, saved: tuple[Any, ...]) -> None:
    patterns, re, h, ck, k, n, next_fn = saved
    hs = conn.noise_protocol.handshake_state
    ss = hs.symmetric_state
    hs.message_patterns = patterns
    hs.re = re
    ss.h = h
    ss.ck = ck
    ss.cipher_state.initialize_key(k)
    ss.cipher_state.n = n
    conn._next_fn = next_fn
