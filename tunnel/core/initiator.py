"""The client's side of the handshake: the HANDSHAKE_INIT, its retries and the cookie.

``HandshakeInitiator`` owns the Noise initiator of the attempt in flight, the retry clock
(one path after another, with jittered exponential backoff: :func:`retry_interval`), the
overall deadline, the cookie jar and the INIT body that is resent once with mac2 when
a COOKIE_REPLY arrives. It verifies the gateway's answers (``on_cookie_reply``,
``on_response``), returns datagrams for the session to send and exposes its own
``next_deadline()``; the session decides what a timeout or an accepted session means.
It also keeps what came back, so that a timeout can say which of the cases the client can
tell apart it was (:meth:`HandshakeInitiator.failure`, a ``HandshakeFailure``).

The INIT offers the data ciphers of ``offer`` (tunnel/core/ciphers.py); a response whose
choice is not one of them ends the attempt with ``cipher_mismatch``, as does a gateway
that refuses with it (``gateway_ciphers`` then holds what the gateway allows).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from tunnel.core.aead import TrafficKeys
from tunnel.core.ciphers import ALL_CIPHERS, DataCipher, accepted_choice
from tunnel.core.constants import MSG_HANDSHAKE_INIT, PROTOCOL_VERSION
from tunnel.core.cookie import CookieJar
from tunnel.core.drops import Drop
from tunnel.core.events import HandshakeFailure, Reason, reason_from_wire
from tunnel.core.handshake import HandshakeError, Initiator
from tunnel.core.policy import Policy
from tunnel.core.wire import InitPayload, RespPayload, pack_handshake, split_handshake

__all__ = ["Accepted", "HandshakeInitiator", "retry_interval", "retry_window"]

RETRY_MIN_S: Final = 0.25
"""The floor of every wait between two INITs: an answer needs a round trip (and, at a
gateway working through a burst, a queue) before a retry can help."""
RETRY_BASE_S: Final = 0.25
"""The jitter window after the first INIT is ``RETRY_BASE_S * RETRY_FACTOR``."""
RETRY_FACTOR: Final = 2.0
"""The window grows by this factor with every INIT."""
RETRY_MAX_S: Final = 4.0
"""No jitter window is wider than this: a client that keeps losing to a burst keeps
asking every few seconds, so the gateway's DH budget is never left unused."""
KEPT_INITS: Final = 20
"""The ephemeral state of this many latest INITs is kept: the largest
``handshake_attempts`` (docs/policy.md), i.e. every INIT of an attempt, so an answer to
any of them is read (a gateway working through a burst answers late, and answers a
retry with the answer it already gave: docs/gateway.md). Bounds the DHs a forged answer
costs the client (two per kept INIT)."""


def retry_window(sends: int) -> float:
    """The width of the jitter window after the ``sends``-th INIT (1-based)."""
    return float(min(RETRY_MAX_S, RETRY_BASE_S * RETRY_FACTOR**sends))


def retry_interval(sends: int, rng: random.Random) -> float:
    """The wait after the ``sends``-th INIT (1-based) before the next one (docs/client.md,
    "Handshake retries"): full jitter above a floor, ``RETRY_MIN_S + U(0, window)`` with
    ``window = min(RETRY_MAX_S, RETRY_BASE_S * RETRY_FACTOR**sends)``."""
    return RETRY_MIN_S + rng.uniform(0.0, retry_window(sends))


@dataclass(frozen=True, slots=True)
class Accepted:
    """The gateway created the session: its index, its parameters, the traffic keys and
    the data cipher it chose (one of our offer)."""

    sender_index: int
    payload: RespPayload
    keys: TrafficKeys
    cipher: DataCipher = DataCipher.CHACHA20_POLY1305


class HandshakeInitiator:
    """One client's handshake attempts until the gateway answers or the deadline passes."""

    def __init__(
        self,
        static_private: bytes,
        gateway_public: bytes,
        index: int,
        order: Sequence[int],
        rng: random.Random | None = None,
        previous_session: bytes = b"",
        offer: Sequence[DataCipher] = ALL_CIPHERS,
    ) -> None:
        """``rng``: the retry jitter (default: seeded with ``index``, itself random, so
        clients started together draw different waits). ``previous_session``: the id of
        the session this handshake continues (named in every INIT; DESIGN D15c).
        ``offer``: the data ciphers this client accepts, preferred first."""
        if not offer:
            raise ValueError("the cipher offer is empty")
        self._previous = previous_session
        self.offer = tuple(offer)
        self.gateway_ciphers: tuple[int, ...] = ()
        """What the gateway allows, when it refused with ``cipher_mismatch`` (codes)."""
        self._static = static_private
        self._rng = rng if rng is not None else random.Random(index)
        self.gateway_public = gateway_public
        self._index = index
        self._order = tuple(order)
        self.cookies = CookieJar(gateway_public, kept=KEPT_INITS)
        self.sends = 0
        """HANDSHAKE_INITs sent (a resend with mac2 after a cookie is not a new attempt)."""
        self.next_send: float | None = None
        self.deadline: float | None = None
        self._noise: deque[Initiator] = deque(maxlen=KEPT_INITS)
        """The Noise initiators of the latest INITs, newest last (an answer may be to any)."""
        self._body: bytes | None = None
        """The last INIT without its MACs, resent with mac2 once when a cookie arrives."""
        self._cookie_retried = False
        self.cookies_accepted = 0
        """COOKIE_REPLYs that verified with the gateway's key (it is under load)."""
        self.unverified = 0
        """Answers to our INIT (right index) that did not verify with the gateway's key."""

    @property
    def started(self) -> bool:
        return self.deadline is not None

    @property
    def waiting(self) -> bool:
        """An INIT is out and its response is still welcome."""
        return bool(self._noise)

    def start(self, now: float, policy: Policy, ts_ms: int) -> tuple[int, bytes]:
        """The first INIT; the overall deadline starts now."""
        self.deadline = now + policy.handshake_timeout_ms / 1000
        return self._send(now, policy, ts_ms)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def on_timer(self, now: float, policy: Policy, ts_ms: int) -> tuple[int, bytes] | None:
        """The retry due at ``now``, if any (check :meth:`expired` first)."""
        if self.next_send is not None and now >= self.next_send:
            return self._send(now, policy, ts_ms)
        return None

    def next_deadline(self) -> float | None:
        pending = [t for t in (self.next_send, self.deadline) if t is not None]
        return min(pending) if pending else None

    def _send(self, now: float, policy: Policy, ts_ms: int) -> tuple[int, bytes]:
        path_id = self._order[self.sends % len(self._order)]
        initiator = Initiator(self._static, self.gateway_public)
        self._noise.append(initiator)
        payload = InitPayload(PROTOCOL_VERSION, ts_ms, path_id, self._previous, self.offer).pack()
        noise = initiator.write_init(payload)
        self._body = pack_handshake(MSG_HANDSHAKE_INIT, 0, self._index, noise)
        self._cookie_retried = False
        self.sends += 1
        self.next_send = None
        if self.sends < policy.handshake_attempts:
            at = now + retry_interval(self.sends, self._rng)
            if self.deadline is None or at < self.deadline:
                self.next_send = at  # none at or after the deadline: handshake_failed then
        return path_id, self.cookies.seal_init(self._body, now)

    def on_cookie_reply(self, data: bytes, receiver_index: int, now: float) -> Drop | bytes | None:
        """Keep the gateway's cookie; the INIT to resend with mac2 (once), else None."""
        if not self.waiting or self._body is None:
            return Drop.WRONG_STATE
        if receiver_index != self._index:
            return Drop.UNKNOWN_SESSION
        drop = self.cookies.consume_reply(data, now)
        if drop is not None:
            self.unverified += 1
            return drop
        self.cookies_accepted += 1
        if self._cookie_retried:
            return None
        self._cookie_retried = True
        return self.cookies.seal_init(self._body, now)

    def on_response(self, data: bytes, receiver_index: int) -> Drop | Reason | Accepted:
        """The gateway's HANDSHAKE_RESP: a counted drop (not for us, or it does not verify;
        the attempt goes on), the reason it refused (the attempt is over), or the session."""
        if not self._noise:
            return Drop.WRONG_STATE
        if receiver_index != self._index:
            return Drop.UNKNOWN_SESSION
        sender_index, noise = split_handshake(data)
        read = _read_any(self._noise, noise)
        if read is None:
            self.unverified += 1
            return Drop.HANDSHAKE_FAILED
        payload_bytes, keys = read
        payload = RespPayload.parse(payload_bytes)
        if isinstance(payload, Drop):
            return payload
        self.stop()
        if payload.version != PROTOCOL_VERSION:
            return Reason.PROTOCOL_VERSION_MISMATCH
        if payload.status != 0:
            reason = reason_from_wire(payload.status) or Reason.POLICY_DENIED
            if reason is Reason.CIPHER_MISMATCH:
                self.gateway_ciphers = payload.ciphers
            return reason
        cipher = accepted_choice(payload.ciphers, self.offer)
        if cipher is None:  # a choice we did not offer (or a gateway without the extension)
            self.gateway_ciphers = payload.ciphers or (DataCipher.CHACHA20_POLY1305,)
            return Reason.CIPHER_MISMATCH
        return Accepted(sender_index, payload, keys, cipher)

    def failure(self) -> HandshakeFailure:
        """What came back, for a handshake that ends without a session at the deadline."""
        if self.cookies_accepted:
            return HandshakeFailure.GATEWAY_UNDER_LOAD
        if self.unverified:
            return HandshakeFailure.UNVERIFIED_ANSWER
        return HandshakeFailure.NO_ANSWER

    def stop(self) -> None:
        """Answered (or the session ended): no more retries, no deadline."""
        self._noise.clear()
        self.next_send = self.deadline = None


def _read_any(kept: deque[Initiator], noise: bytes) -> tuple[bytes, TrafficKeys] | None:
    """The response read by the initiator of the INIT it answers (the newest first), or
    None if none of the kept ones can read it (not for us, forged, too old, or a repeat of
    an answer already read)."""
    for initiator in reversed(kept):
        if initiator.done:  # it read an answer already (one with a payload we refused)
            continue
        try:
            return initiator.read_response(noise)
        except HandshakeError:
            continue
    return None
