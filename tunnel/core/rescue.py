"""The explicit re-handshake of a client whose gateway lost the session (DESIGN D15c).

``LostStateRescue`` owns the last resort of a recovery: a NEW handshake (its own Noise
initiator, receiver index and retry clock) that names the session it wants to continue,
sent while the session is RECOVERING and the gateway has said nothing authenticated since.
The session (client.py) arms it, routes the gateway's HANDSHAKE_RESP and COOKIE_REPLY to it
while it runs, and decides what an accepted answer means (policy ``switching.lost_state``:
a new session linked to the old one, or the end).

How the client learns that the state is lost, and why nothing forged can make it so:

- The gateway never says "unknown session" in the clear: a datagram for an index it does
  not know is dropped (it has no key to authenticate an answer with, and an unauthenticated
  answer could be forged by anyone). So the client never acts on a claim of lost state; it
  *asks*, and only an answer it can verify counts.
- It asks only when its own observation says something is wrong: RECOVERING (or DEGRADED
  without a path) and no authenticated datagram from the gateway since the recovery began,
  for at least one reattach retransmission interval (``arm`` with ``gateway_lost_state``;
  any authenticated datagram disarms it). Or after the gateway's own authenticated
  TERMINATE ``gateway_shutdown`` (``gateway_shutdown``: it said it is going away). Forged
  and replayed datagrams fail the AEAD or the replay window and change nothing here: they
  neither arm the rescue nor count as an answer. Dropping packets (which an attacker on
  the path can always do) only leads to what it led to before: the recovery window ends.
- The INIT carries the old session id inside Noise message 1 (encrypted, authenticated by
  the client's static key; ``InitPayload.previous_session``). A gateway that still holds
  a live session of that id for this client does not answer it and keeps the session
  (its reattach answers will come): the re-handshake can never replace a session the
  gateway knows, whatever its timing (a gateway that resumed its sessions from a
  persistent store stays resumed).
- The answer that ends the old session is a HANDSHAKE_RESP to this very INIT: it verifies
  only with the gateway's static key (Noise IK) and this INIT's fresh ephemeral key, so it
  cannot be forged without the gateway's private key nor replayed from an earlier
  handshake. It proves that the gateway is alive now and held no live session of that id
  when it answered: the state is lost. A replayed rescue INIT is refused by the gateway's
  per-client INIT timestamps (AT-36), and after a restart it names a session the gateway
  does not have anyway, and its answer is useless to anyone but the client.

So no spoofed or replayed datagram can end, replace or re-key a live session; the worst an
attacker can do is what dropping packets already did.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from tunnel.core.ciphers import ALL_CIPHERS, DataCipher
from tunnel.core.drops import Drop
from tunnel.core.events import Reason
from tunnel.core.initiator import Accepted, HandshakeInitiator
from tunnel.core.policy import Policy

__all__ = ["LostStateRescue"]


class LostStateRescue:
    """The re-handshake of one session: armed with a cause and a start time, it sends
    INITs (the policy's handshake retries, again and again) until an answer arrives or the
    session stops it. The recovery window bounds it: the session's own timed rows end the
    session when it passes."""

    def __init__(
        self,
        static_private: bytes,
        gateway_public: bytes,
        order: Sequence[int],
        rng: random.Random,
        *,
        offer: Sequence[DataCipher] = ALL_CIPHERS,
    ) -> None:
        """``offer``: the data ciphers this client accepts, preferred first (every INIT
        offers them, as the first handshake did)."""
        self._offer = tuple(offer)
        self._static = static_private
        self._gateway_public = gateway_public
        self._order = tuple(order)
        self._rng = rng
        self.cause: Reason | None = None
        """``gateway_lost_state`` (silence) or ``gateway_shutdown`` (the gateway said so);
        None while not armed."""
        self.previous = b""
        """The id of the session the INITs name (the one to continue)."""
        self.not_before: float | None = None
        """When the first INIT may leave."""
        self.initiator: HandshakeInitiator | None = None
        """The attempt in flight (a new one after the previous one's deadline)."""
        self.index = 0
        """Receiver index of the attempt in flight: the new session's, if it is answered."""
        self.rounds = 0
        """Handshake attempts started (each with the policy's retries and deadline)."""

    @property
    def armed(self) -> bool:
        return self.cause is not None

    def arm(self, cause: Reason, previous: bytes, at: float) -> None:
        """Start asking at ``at``; an armed rescue keeps its start (a later cause replaces
        only ``gateway_lost_state``: the gateway's own word is the better explanation)."""
        if self.cause is None:
            self.not_before = at
        if self.cause is None or cause is Reason.GATEWAY_SHUTDOWN:
            self.cause = cause
        self.previous = previous

    def disarm(self) -> None:
        """The gateway answered under the session's keys (it knows the session), or the
        session ended: no more INITs; a late answer to one is dropped."""
        self.cause = None
        self.not_before = None
        self.initiator = None

    def on_timer(self, now: float, policy: Policy, ts_ms: int) -> tuple[int, bytes] | None:
        """The INIT due at ``now``, if any: the first one at ``not_before``, then the
        initiator's retries; after its deadline a new attempt with a new index."""
        if self.cause is None or self.not_before is None or now < self.not_before:
            return None
        initiator = self.initiator
        if initiator is None or initiator.expired(now):
            self.index = self._new_index()
            initiator = self.initiator = HandshakeInitiator(
                self._static, self._gateway_public, self.index, self._order,
                rng=self._rng, previous_session=self.previous, offer=self._offer,
            )  # fmt: skip
            self.rounds += 1
            return initiator.start(now, policy, ts_ms)
        return initiator.on_timer(now, policy, ts_ms)

    def next_deadline(self) -> float | None:
        if self.cause is None:
            return None
        if self.initiator is None:
            return self.not_before
        return self.initiator.next_deadline()

    def on_response(self, data: bytes, receiver_index: int) -> Drop | Reason | Accepted:
        """The gateway's answer to the INIT in flight (see ``HandshakeInitiator``)."""
        if self.initiator is None:
            return Drop.WRONG_STATE
        return self.initiator.on_response(data, receiver_index)

    def on_cookie_reply(self, data: bytes, receiver_index: int, now: float) -> Drop | bytes | None:
        if self.initiator is None:
            return Drop.WRONG_STATE
        return self.initiator.on_cookie_reply(data, receiver_index, now)

    def _new_index(self) -> int:
        return self._rng.getrandbits(32) or 1
