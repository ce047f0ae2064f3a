"""The client's handshake: BIRTH until the gateway's HANDSHAKE_RESP attaches the session.

``_HandshakeMixin`` gives ``ClientSession`` ``connect()``, the HANDSHAKE_INIT with its
retransmissions (one path after another) and overall timeout, the single resend with
mac2 after a COOKIE_REPLY, and the response that creates the session keys, takes the
gateway's parameters and attaches the first path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tunnel.core.aead import SessionCipher
from tunnel.core.client_paths import _PathsMixin
from tunnel.core.constants import MSG_HANDSHAKE_INIT, PROTOCOL_VERSION
from tunnel.core.cookie import CookieJar
from tunnel.core.drops import Drop
from tunnel.core.events import Reason, SessionCreated, TransportAttached, reason_from_wire
from tunnel.core.handshake import HandshakeError, Initiator
from tunnel.core.session import SessionMachine, State, Trigger
from tunnel.core.wire import InitPayload, RespPayload, pack_handshake, split_handshake


class _HandshakeMixin(_PathsMixin):
    """The BIRTH phase of ``ClientSession``."""

    machine: SessionMachine
    cipher: SessionCipher | None
    index: int
    peer_index: int
    epoch: int
    peer_state: str
    peer_version: int
    inner_address: str
    inner_prefix: int
    inner_gateway: str
    mtu: int
    advertised: tuple[tuple[str, int], ...]
    _static: bytes
    _gateway_public: bytes
    _out: list[tuple[int, bytes]]
    _initiator: Initiator | None
    _hs_sends: int
    _hs_next: float | None
    _hs_deadline: float | None
    _cookies: CookieJar
    _hs_body: bytes | None
    _cookie_retried: bool
    _born: float
    _transportless_since: float | None

    if TYPE_CHECKING:  # provided by ClientSession

        @property
        def state(self) -> State: ...

        def _fire(self, trigger: Trigger, reason: Reason, now: float, **fields: Any) -> bool: ...

        def _flush_queue(self) -> None: ...

    def connect(self, now: float) -> None:
        """Start the handshake (BIRTH). Idempotent."""
        if self.state is not State.BIRTH or self._hs_deadline is not None:
            return
        self._born = now
        self._transportless_since = now
        self._hs_deadline = now + self.policy.handshake_timeout_ms / 1000
        self._send_handshake(now)

    def _send_handshake(self, now: float) -> None:
        path_id = self._order[self._hs_sends % len(self._order)]
        self._initiator = Initiator(self._static, self._gateway_public)
        payload = InitPayload(PROTOCOL_VERSION, self.ts_ms(now), path_id).pack()
        noise = self._initiator.write_init(payload)
        self._hs_body = pack_handshake(MSG_HANDSHAKE_INIT, 0, self.index, noise)
        self._cookie_retried = False
        self._out.append((path_id, self._cookies.seal_init(self._hs_body, now)))
        self._hs_sends += 1
        interval = self.policy.handshake_timeout_ms / 1000 / self.policy.handshake_attempts
        self._hs_next = now + interval if self._hs_sends < self.policy.handshake_attempts else None

    def _handshake_timer(self, now: float) -> None:
        if self._hs_deadline is not None and now >= self._hs_deadline:
            self._fire(Trigger.TERMINATE, Reason.HANDSHAKE_FAILED, now)
        elif self._hs_next is not None and now >= self._hs_next:
            self._send_handshake(now)

    def _on_cookie_reply(self, data: bytes, receiver_index: int, path_id: int, now: float) -> None:
        """The gateway is under load: keep its cookie, resend the INIT with mac2 once."""
        if self.state is not State.BIRTH or self._initiator is None or self._hs_body is None:
            self.count_drop(Drop.WRONG_STATE)
            return
        if receiver_index != self.index:
            self.count_drop(Drop.UNKNOWN_SESSION)
            return
        drop = self._cookies.consume_reply(data, now)
        if drop is not None:
            self.count_drop(drop)
            return
        if not self._cookie_retried:
            self._cookie_retried = True
            self._out.append((path_id, self._cookies.seal_init(self._hs_body, now)))

    def _on_handshake_response(
        self, data: bytes, receiver_index: int, path_id: int, now: float
    ) -> None:
        if self.state is not State.BIRTH or self._initiator is None:
            self.count_drop(Drop.WRONG_STATE)
            return
        if receiver_index != self.index:
            self.count_drop(Drop.UNKNOWN_SESSION)
            return
        sender_index, noise = split_handshake(data)
        try:
            payload_bytes, keys = self._initiator.read_response(noise)
        except HandshakeError:
            self.count_drop(Drop.HANDSHAKE_FAILED)
            return
        payload = RespPayload.parse(payload_bytes)
        if isinstance(payload, Drop):
            self.count_drop(payload)
            return
        self._initiator = None
        self._hs_next = self._hs_deadline = None
        if payload.version != PROTOCOL_VERSION or payload.status != 0:
            reason = (
                Reason.PROTOCOL_VERSION_MISMATCH
                if payload.version != PROTOCOL_VERSION
                else reason_from_wire(payload.status) or Reason.POLICY_DENIED
            )
            self._fire(Trigger.TERMINATE, reason, now, initiator="peer")
            return
        self.cipher = SessionCipher(keys, replay_window=self.policy.replay_window_size, now=now)
        self.peer_index = sender_index
        self.machine.session_id = payload.session_id.hex()
        self.epoch = payload.epoch
        self.peer_state, self.peer_version = "ATTACHED", payload.state_version
        self.inner_address, self.inner_prefix = payload.inner_address, payload.inner_prefix
        self.inner_gateway, self.mtu = payload.inner_gateway, payload.mtu
        self.advertised = payload.endpoints
        path = self._paths[path_id]
        path.health.inbound(now)
        self._mark_validated(path_id, now)
        self._born = now
        self.active = path_id
        self._transportless_since = None
        self._fire(Trigger.HANDSHAKE_OK, Reason.ATTACHED_TO_TRANSPORT, now)
        base = self._base(now)
        self.emit(
            SessionCreated(
                **base, peer=f"gateway via {path.spec.label}", inner_address=self.inner_address
            )
        )
        self.emit(
            TransportAttached(
                **base, transport_id=path_id, path=path.spec.label, binding_epoch=self.epoch
            )
        )
        for pid in self._order:
            self._paths[pid].next_probe = now
        self._flush_queue()
