"""Handshake cookies: spend no DH on a flood (WireGuard whitepaper §5.4.4 and §5.4.7).

Every HANDSHAKE_INIT ends in two MACs (keyed BLAKE2s, 16 bytes)::

    INIT = HANDSHAKE_PREFIX | noise msg 1 | mac1 | mac2
    mac1 = MAC(HASH(LABEL_MAC1 | gateway public key), prefix | noise)
    mac2 = MAC(cookie, prefix | noise | mac1)      16 zero bytes without a fresh cookie

mac1 is always checked: an INIT from someone who does not know the gateway's public key
costs one BLAKE2s, never a DH. mac2 is checked only while the gateway is under load; an
INIT without a valid one is answered by a COOKIE_REPLY instead of a handshake::

    COOKIE_REPLY = HEADER(type=5, phase=0, receiver_index=<the INIT's sender_index>)
                   | nonce:12 | ChaCha20-Poly1305(cookie):16+16                 (52 bytes)
    key    = HASH(LABEL_COOKIE | gateway public key)
    AD     = mac1 of the INIT it answers (only whoever saw that INIT can open it)
    cookie = MAC(secret, source address), secret: 32 random bytes, replaced every
             COOKIE_SECRET_S seconds (a cookie dies with its secret)

The reply is smaller than the INIT (no amplification) and the gateway keeps no state per
source: the cookie is recomputed from the address on every check.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import deque
from collections.abc import Callable
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from tunnel.core.constants import AEAD_TAG_LEN, HEADER, MSG_COOKIE_REPLY
from tunnel.core.drops import Drop

MAC_LEN: Final = 16
"""mac1, mac2 and the cookie are 16-byte keyed BLAKE2s digests, as in WireGuard."""

INIT_MACS_LEN: Final = 2 * MAC_LEN
"""mac1 | mac2 at the end of every HANDSHAKE_INIT."""

COOKIE_NONCE_LEN: Final = 12
"""ChaCha20-Poly1305 nonce, random per reply (the key is long-lived; 96 random bits)."""

COOKIE_REPLY_LEN: Final = HEADER.size + COOKIE_NONCE_LEN + MAC_LEN + AEAD_TAG_LEN
"""52 bytes, always: far below the smallest INIT, so a reply never amplifies."""

COOKIE_SECRET_S: Final = 120.0
"""The gateway replaces its cookie secret this often (WireGuard: 2 minutes)."""

COOKIE_CLIENT_TTL_S: Final = COOKIE_SECRET_S - 5.0
"""A client uses a cookie this long at most (a little less than the secret lives)."""

LABEL_MAC1: Final = b"mac1----"
LABEL_COOKIE: Final = b"cookie--"
_ZERO_MAC: Final = bytes(MAC_LEN)


def _hash(*parts: bytes) -> bytes:
    return hashlib.blake2s(b"".join(parts)).digest()


def _mac(key: bytes, data: bytes) -> bytes:
    return hashlib.blake2s(data, key=key, digest_size=MAC_LEN).digest()


def address_bytes(label: str) -> bytes:
    """What a cookie is bound to: the source address as text (host and port)."""
    return label.encode()


class CookieChecker:
    """Gateway side: checks mac1 and mac2, writes cookie replies. No per-source state."""

    __slots__ = ("_aead", "_mac1_key", "_secret", "_secret_born", "_urandom")

    def __init__(self, gateway_public: bytes, urandom: Callable[[int], bytes], now: float) -> None:
        self._mac1_key = _hash(LABEL_MAC1, gateway_public)
        self._aead = ChaCha20Poly1305(_hash(LABEL_COOKIE, gateway_public))
        self._urandom = urandom
        self._secret = b""
        self._secret_born = now
        self._rotate(now)

    def __repr__(self) -> str:
        return "CookieChecker(<redacted>)"

    def _rotate(self, now: float) -> None:
        if not self._secret or now >= self._secret_born + COOKIE_SECRET_S:
            self._secret = self._urandom(32)
            self._secret_born = now

    def _cookie(self, addr: bytes, now: float) -> bytes:
        self._rotate(now)
        return _mac(self._secret, addr)

    def mac1_ok(self, init: bytes) -> bool:
        """The INIT's mac1 proves its sender knows our public key (cheap, no DH)."""
        if len(init) < INIT_MACS_LEN:
            return False
        body, mac1 = init[:-INIT_MACS_LEN], init[-INIT_MACS_LEN:-MAC_LEN]
        return hmac.compare_digest(_mac(self._mac1_key, body), mac1)

    def mac2_ok(self, init: bytes, addr: bytes, now: float) -> bool:
        """The INIT carries a cookie we issued to ``addr`` under the current secret."""
        mac2 = init[-MAC_LEN:]
        if mac2 == _ZERO_MAC:
            return False
        return hmac.compare_digest(_mac(self._cookie(addr, now), init[:-MAC_LEN]), mac2)

    def reply(self, init: bytes, sender_index: int, addr: bytes, now: float) -> bytes:
        """The COOKIE_REPLY for ``init`` received from ``addr``."""
        nonce = self._urandom(COOKIE_NONCE_LEN)
        mac1 = init[-INIT_MACS_LEN:-MAC_LEN]
        sealed = self._aead.encrypt(nonce, self._cookie(addr, now), mac1)
        return HEADER.pack(MSG_COOKIE_REPLY, 0, sender_index) + nonce + sealed


class CookieJar:
    """Client side: adds mac1/mac2 to INITs, keeps the latest cookie for a while."""

    __slots__ = ("_aead", "_cookie", "_cookie_at", "_mac1_key", "_mac1s")

    def __init__(self, gateway_public: bytes, kept: int = 1) -> None:
        """``kept``: a COOKIE_REPLY to any of this many latest INITs is read (a gateway
        working through a burst answers late)."""
        self._mac1_key = _hash(LABEL_MAC1, gateway_public)
        self._aead = ChaCha20Poly1305(_hash(LABEL_COOKIE, gateway_public))
        self._cookie: bytes | None = None
        self._cookie_at = 0.0
        self._mac1s: deque[bytes] = deque(maxlen=kept)

    def __repr__(self) -> str:
        return f"CookieJar(has_cookie={self._cookie is not None})"

    def has_cookie(self, now: float) -> bool:
        return self._cookie is not None and now < self._cookie_at + COOKIE_CLIENT_TTL_S

    def seal_init(self, body: bytes, now: float) -> bytes:
        """``body`` (prefix | noise) with mac1 and, with a fresh cookie, mac2 appended."""
        mac1 = _mac(self._mac1_key, body)
        if not self._mac1s or self._mac1s[-1] != mac1:  # a resend with mac2 is the same INIT
            self._mac1s.append(mac1)
        if self._cookie is not None and self.has_cookie(now):
            return body + mac1 + _mac(self._cookie, body + mac1)
        return body + mac1 + _ZERO_MAC

    def consume_reply(self, data: bytes, now: float) -> Drop | None:
        """Store the cookie of a COOKIE_REPLY to one of our latest INITs; a Drop if it is
        not one."""
        if len(data) != COOKIE_REPLY_LEN:
            return Drop.TRUNCATED if len(data) < COOKIE_REPLY_LEN else Drop.OVERSIZED
        if not self._mac1s:
            return Drop.WRONG_STATE
        nonce = data[HEADER.size : HEADER.size + COOKIE_NONCE_LEN]
        sealed = data[HEADER.size + COOKIE_NONCE_LEN :]
        for mac1 in reversed(self._mac1s):
            try:
                cookie = self._aead.decrypt(nonce, sealed, mac1)
            except InvalidTag:
                continue
            self._cookie, self._cookie_at = cookie, now
            return None
        return Drop.BAD_TAG
