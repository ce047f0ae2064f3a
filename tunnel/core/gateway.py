"""GatewaySessions: the gateway protocol machine (sans-I/O), one object for all sessions.

Inputs: ``receive_datagram(data, addr, now)`` (``addr`` is any hashable source address,
e.g. ``(host, port)``), ``receive_tun_packet(packet, now)``, ``handle_timer(now)``,
``set_policy`` and ``terminate``. Outputs are pulled: ``datagrams_to_send()`` ->
[(addr, bytes)], ``packets_for_tun()``, ``next_event()``, ``next_deadline()``.

``GatewaySessions`` routes: a datagram to the session its receiver index names (or, an
INIT, through the handshake admission and responder), a TUN packet to the session of its
inner destination, a timer tick to every session. It owns the components that are not per
session, each with its own state:
- ``Reporter`` (endpoint.py): events, drop counters, rate-limited reports;
- ``HandshakeAdmission`` (admission.py): mac1/cookies, handshake and per-source budgets;
- ``HandshakeResponder`` (gateway_handshake.py): Noise, allowed clients, INIT freshness;
- ``Outbox`` (gateway_outbox.py): the datagrams to send;
and the sessions, ``GatewaySession`` (gateway_session.py), which keep their own binding,
paths, reattach state and timers.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random
from collections.abc import Callable, Sequence

from tunnel.core.admission import COOKIE_LOAD_FRACTION, HandshakeAdmission
from tunnel.core.aead import SessionCipher
from tunnel.core.ciphers import ALL_CIPHERS, DataCipher, choose, cipher_names
from tunnel.core.constants import (
    MAX_INNER_PACKET,
    MAX_STATE_VERSION,
    MSG_HANDSHAKE_INIT,
    MSG_HANDSHAKE_RESP,
    PROTOCOL_VERSION,
    SESSION_ID_LEN,
)
from tunnel.core.drops import Drop
from tunnel.core.endpoint import Reporter
from tunnel.core.events import (
    Event,
    EventBase,
    PolicyEvent,
    Reason,
    SessionCreated,
    SessionLinked,
    TransportAttached,
    reason_to_wire,
)
from tunnel.core.gateway_handshake import HandshakeResponder, Initiation
from tunnel.core.gateway_outbox import Outbox, SessionPorts
from tunnel.core.gateway_paths import Addr, addr_label
from tunnel.core.gateway_resume import ResumeState
from tunnel.core.gateway_session import INITIAL_EPOCH, ClientEntry, GatewaySession, SessionView
from tunnel.core.handshake import public_key
from tunnel.core.policy import Policy
from tunnel.core.session import SessionMachine, Trigger
from tunnel.core.timers import DeadlineQueue
from tunnel.core.wire import RespPayload, pack_handshake, parse_header, transport_fields

ANSWER_TTL_S = 10.0
"""A HANDSHAKE_RESP is sent again for a retried INIT this long at most: a client that has
read it speaks within a round trip, INITs still in flight arrive within seconds."""


class GatewaySessions:
    """All sessions of one gateway: inputs, timers, commands and outputs (sans-I/O)."""

    def __init__(
        self,
        *,
        static_private: bytes,
        clients: Sequence[ClientEntry],
        policy: Policy | None,
        now: float,
        urandom: Callable[[int], bytes],
        rng: random.Random | None = None,
        node_id: str = "gateway",
        wall_offset: float = 0.0,
        inner_gateway: str = "10.66.0.1",
        inner_prefix: int = 24,
        inner_gateway6: str = "",
        inner_prefix6: int = 0,
        mtu: int = 1420,
        endpoints: Sequence[tuple[str, int]] = (),
        max_version: int = MAX_STATE_VERSION,
        cookie_threshold: float = COOKIE_LOAD_FRACTION,
        policy_error: str | None = None,
        counter_reservations: bool = False,
        ciphers: Sequence[DataCipher] = ALL_CIPHERS,
        index_stripe: tuple[int, int] = (0, 1),
        announce_node: bool = False,
    ) -> None:
        """``announce_node``: a cluster node tells its clients which node serves them
        (EXT_NODE in message 2, NODE_INFO; docs/wire-format.md).
        ``index_stripe`` ``(w, n)``: worker ``w`` of ``n`` allocates only receiver
        indexes whose low byte is ``w`` modulo ``n``, so the kernel steers their datagrams
        to it (tunnel/io/reuseport.py).
        ``cookie_threshold``: share of the handshake bucket below which the gateway is
        under load and answers INITs without a valid cookie with a COOKIE_REPLY (0: never,
        1: always). ``policy_error``: why ``policy`` is None (shown until a valid one).
        ``inner_gateway6``/``inner_prefix6``: the gateway's inner IPv6 address and the
        subnet's prefix length; empty: IPv6 is not routed (clients' IPv6 addresses then
        unused). ``ciphers``: the data ciphers this gateway allows; a handshake gets the
        first of the client's offer that is one of them (tunnel/core/ciphers.py).
        ``counter_reservations``: a persistent store keeps the sessions; each seals only
        counters reserved in it (gateway_resume.py, :meth:`reservations_due`)."""
        self.report = Reporter(node_id=node_id, wall_offset=wall_offset, now=now)
        self.node_id = node_id
        self.admission = HandshakeAdmission(
            public_key(static_private), urandom, now, cookie_threshold=cookie_threshold
        )
        self.handshakes = HandshakeResponder(static_private, clients, self.report)
        self.outbox = Outbox(self.report)
        self.policy = policy
        self.policy_error: str | None = None if policy else policy_error or "no valid policy loaded"
        self._urandom = urandom
        self._rng = rng or random.Random()
        if not 0 <= index_stripe[0] < index_stripe[1] <= 256:
            raise ValueError(f"index_stripe {index_stripe}: need 0 <= worker < workers <= 256")
        self._index_stripe = index_stripe
        self.inner_gateway = inner_gateway
        self.inner_prefix = inner_prefix
        self.inner_gateway6 = inner_gateway6
        self.inner_prefix6 = inner_prefix6
        self.mtu = mtu
        if not ciphers:
            raise ValueError("a gateway needs at least one data cipher")
        self.ciphers = tuple(ciphers)
        self.endpoints = tuple(endpoints)
        self.max_version = max_version
        self.sessions: dict[int, GatewaySession] = {}
        self._by_key: dict[bytes, GatewaySession] = {}
        self._by_inner: dict[bytes, GatewaySession] = {}
        """Packed inner address (4 bytes IPv4, 16 bytes IPv6) -> the session that owns it."""
        self._timers: DeadlineQueue[int] = DeadlineQueue(self._session_deadline)
        """Every session's next deadline (a heap): touched after each input that may have
        changed it (plain DATA from the binding only pushes the silence deadline later: its
        entry stays as a lower bound, re-read when it comes to the top)."""
        self._touch = self._timers.touch
        self.on_unknown: Callable[[int, bytes, Addr, float], bool] | None = None
        """A cluster node's hook for a DATA/CONTROL datagram whose receiver index no session
        here has (the session may live on another node): True when the driver looks it
        up (the datagram is then counted ``owner_lookup``, else ``unknown_session``)."""
        self.on_unknown_named: Callable[[bytes, float], bool] | None = None
        """A cluster node's hook for a HANDSHAKE_INIT naming a session not held here (the
        client asks whether it was lost): True while the session may live on another node
        (the INIT is then not answered, counted ``owner_lookup``)."""
        self._answers: dict[bytes, tuple[int, int, bytes, float]] = {}
        """Client key -> (index, the client's sender index, HANDSHAKE_RESP, when) of the
        newest session opened for it, for ``ANSWER_TTL_S``: a retry of the same INIT gets
        the same answer (``_answer_again``)."""
        self._tun: list[bytes] = []
        self._reserve_due: list[GatewaySession] = []
        self._ports = SessionPorts(
            report=self.report, outbox=self.outbox, deliver=self._tun.append,
            urandom=urandom, ended=self._forget_routes,
            reserve=self._reserve_due.append if counter_reservations else None,
            node=node_id if announce_node else "",
        )  # fmt: skip

    # == reporting (the Reporter's surface the drivers and tests read) =====================
    @property
    def drops(self) -> dict[str, int]:
        return self.report.drops

    @property
    def events_dropped(self) -> int:
        return self.report.events_dropped

    def ts_ms(self, now: float) -> int:
        return self.report.ts_ms(now)

    def emit(self, event: Event) -> None:
        self.report.emit(event)

    def next_event(self) -> Event | None:
        return self.report.next_event()

    def events(self) -> list[Event]:
        out: list[Event] = []
        while (ev := self.report.next_event()) is not None:
            out.append(ev)
        return out

    def under_load(self, now: float) -> bool:
        """True while handshakes need a cookie (the handshake bucket is running low)."""
        return self.admission.under_load(now)

    def _base(self, now: float) -> EventBase:
        return {
            "ts_ms": self.report.ts_ms(now),
            "session_id": "",
            "node_id": self.node_id,
            "policy_version": self.policy.policy_version if self.policy else "invalid",
            "state_version": 0,
        }

    # == inputs ============================================================================
    def receive_datagram(self, data: bytes, addr: Addr, now: float) -> None:
        """A datagram from ``addr``. DATA and CONTROL take the fast path: one unpack of
        the transport header (``wire.transport_fields``), one dict access for the session,
        no per-datagram object; everything else (handshakes, malformed headers) is parsed
        by ``wire.parse_header``, which counts the same drops."""
        fields = transport_fields(data)
        if fields is None:
            self._receive_other(data, addr, now)
            return
        msg_type, phase, epoch, mark, index, counter = fields
        s = self.sessions.get(index)
        if s is None:
            held = self.on_unknown is not None and self.on_unknown(index, data, addr, now)
            self.report.count_drop(Drop.OWNER_LOOKUP if held else Drop.UNKNOWN_SESSION)
            return
        if s.receive(data, msg_type, phase, epoch, mark, counter, addr, now):
            self._touch(index)  # else only the silence deadline moved, later: a lower bound

    def _receive_other(self, data: bytes, addr: Addr, now: float) -> None:
        """A datagram that is not a well-formed DATA or CONTROL one."""
        header = parse_header(data)
        if isinstance(header, Drop):
            self.report.count_drop(header)
        elif header.msg_type == MSG_HANDSHAKE_INIT:
            self._on_init(data, addr, now)
        else:  # HANDSHAKE_RESP, COOKIE_REPLY: only a client takes those
            self.report.count_drop(Drop.WRONG_STATE)

    def receive_tun_packet(self, packet: bytes, now: float) -> None:
        if len(packet) < 20 or len(packet) > MAX_INNER_PACKET:
            self.report.count_drop(Drop.MALFORMED if packet else Drop.TRUNCATED)
            return
        version = packet[0] >> 4
        if version == 4:
            dst = packet[16:20]
        elif version != 6 or len(packet) < 40:
            self.report.count_drop(Drop.MALFORMED)
            return
        elif not self.inner_gateway6:
            self.report.count_drop(Drop.IPV6_NOT_ROUTED)
            return
        else:
            dst = packet[24:40]
        s = self._by_inner.get(dst)
        if s is None:
            self.report.count_drop(Drop.NO_ROUTE)
            return
        s.send_inner(packet)  # moves no deadline: the timer entry stays as it is

    # -- handshakes ----------------------------------------------------------------------
    def _on_init(self, data: bytes, addr: Addr, now: float) -> None:
        # Cheap checks first (admission.py): mac1 always, mac2 under load; DH only after.
        refused = self.admission.admit(data, addr, now)
        if isinstance(refused, bytes):
            self.outbox.push(addr, refused)
            self.report.count_drop(Drop.COOKIE_REQUIRED)
            return
        if refused is not None:
            self._refused(refused, addr, now)
            return
        init = self.handshakes.read(data, addr, now, self._base(now))
        if init is None:
            return
        if init.payload.version != PROTOCOL_VERSION:
            self._deny(init, addr, Reason.PROTOCOL_VERSION_MISMATCH, now)
        elif self.policy is None:
            self.report.emit(
                PolicyEvent(
                    **self._base(now), policy_name="SESSION_DENIED",
                    reason_code=Reason.POLICY_DENIED, detail=self.policy_error or "",
                )
            )  # fmt: skip
            self._deny(init, addr, Reason.POLICY_DENIED, now)
        elif self._answer_again(init, addr):
            self.report.count_drop(Drop.HANDSHAKE_REPEATED)
        elif (named := self._named(init)) is not None and not named.machine.terminated:
            self.report.count_drop(Drop.SESSION_STILL_LIVE)
        elif named is not None:
            self._deny(init, addr, named.end_reason or Reason.PEER_TERMINATED, now)
        elif self.on_unknown_named is not None and self._elsewhere(init, now):
            self.report.count_drop(Drop.OWNER_LOOKUP)
        elif (suite := choose(init.payload.ciphers, self.ciphers)) is None:
            self._no_common_cipher(init, addr, now)
        else:
            self._open_session(init, self.policy, addr, now, suite)

    def _elsewhere(self, init: Initiation, now: float) -> bool:
        """A cluster node: the INIT names a session this node does not hold, which another
        node may (the driver looks; True: not answered meanwhile)."""
        previous = init.payload.previous_session
        return (
            bool(previous)
            and self.on_unknown_named is not None
            and (self.on_unknown_named(previous, now))
        )

    def _answer_again(self, init: Initiation, addr: Addr) -> bool:
        """A retry of the INIT that opened this client's newest session (the same sender
        index: the same attempt of the same client) while that session has heard nothing
        from the client: the same HANDSHAKE_RESP again to ``addr``, no second session. The
        client reads it (it keeps its latest INITs' state, initiator.KEPT_INITS); a second
        session would replace the one the client may already have taken."""
        answer = self._answers.get(init.client.public_key)
        if answer is None:
            return False
        index, peer_index, resp, _at = answer
        s = self.sessions.get(index)
        if s is None or s.machine.terminated or s.heard or peer_index != init.sender_index:
            return False
        self.outbox.push(addr, resp)
        return True

    def _forget_answers(self, now: float) -> None:
        """Forget the answers older than ``ANSWER_TTL_S`` (kept in the order given)."""
        answers = self._answers
        while answers:
            key = next(iter(answers))
            if answers[key][3] + ANSWER_TTL_S > now:
                break
            del answers[key]

    def _named(self, init: Initiation) -> GatewaySession | None:
        """The session of this client the INIT names as the one it continues, if this
        gateway holds it (DESIGN D15c: the client asks whether its session was lost). Live:
        it was not lost (no answer; the client's reattach is answered). Ended (a tombstone):
        the answer is a refusal with the reason it ended, never a new session."""
        previous = init.payload.previous_session
        if not previous:
            return None
        key = init.client.public_key
        for s in self.sessions.values():
            if s.session_id == previous and s.client.public_key == key:
                return s
        return None

    def _refused(self, drop: Drop, addr: Addr, now: float) -> None:
        """An INIT the admission dropped: counted. One whose mac1 does not match our key
        is also reported (rate-limited): its sender has another key for this gateway."""
        self.report.count_drop(drop)
        if drop is Drop.BAD_MAC:
            self.report.security(
                now, self._base(now), "WRONG_GATEWAY_KEY", Reason.WRONG_GATEWAY_KEY,
                source=addr_label(addr),
            )  # fmt: skip

    def _no_common_cipher(self, init: Initiation, addr: Addr, now: float) -> None:
        """The client accepts none of the ciphers this gateway allows: refused, and the
        client is told which ones are allowed (inside Noise, like every payload)."""
        offered = init.payload.ciphers or (DataCipher.CHACHA20_POLY1305,)
        detail = (
            f"{init.client.name} from {addr_label(addr)}: no data cipher in common: the "
            f"client accepts {cipher_names(offered)}; this gateway allows "
            f"{cipher_names(self.ciphers)}"
        )
        self.report.emit(
            PolicyEvent(
                **self._base(now), policy_name="SESSION_DENIED",
                reason_code=Reason.CIPHER_MISMATCH, detail=detail,
            )
        )  # fmt: skip
        # A client without the extension gets none back: it may predate all extensions.
        allowed = self.ciphers if init.payload.ciphers else ()
        self._deny(init, addr, Reason.CIPHER_MISMATCH, now, ciphers=allowed)

    def _deny(
        self, init: Initiation, addr: Addr, status: Reason, now: float,
        ciphers: Sequence[int] = (),
    ) -> None:  # fmt: skip
        resp = RespPayload(
            PROTOCOL_VERSION, reason_to_wire(status), bytes(SESSION_ID_LEN), self.ts_ms(now),
            0, 0, "0.0.0.0", 0, "0.0.0.0", self.mtu, ciphers=tuple(ciphers),
        )  # fmt: skip
        noise_resp, _ = init.pending.write_response(resp.pack())
        self.outbox.push(addr, pack_handshake(MSG_HANDSHAKE_RESP, init.sender_index, 0, noise_resp))

    def _open_session(
        self, init: Initiation, policy: Policy, addr: Addr, now: float, suite: DataCipher
    ) -> None:
        client, payload = init.client, init.payload
        if client.inner_address6 and not self.inner_gateway6:
            client = dataclasses.replace(client, inner_address6="")  # IPv6 is not routed
        old = self._by_key.get(client.public_key)
        if old is not None:
            old.terminate(Reason.SESSION_REPLACED, now, notify=False)
            self._timers.touch(old.index)
        index = self._new_index()
        session_id = self._urandom(SESSION_ID_LEN)
        machine = SessionMachine(
            node_id=self.node_id, policy_version=policy.policy_version, emit=self.report.emit,
            max_version=self.max_version, session_id=session_id.hex(),
        )  # fmt: skip
        machine.fire(Trigger.HANDSHAKE_OK, Reason.ATTACHED_TO_TRANSPORT, self.ts_ms(now))
        resp = RespPayload(
            PROTOCOL_VERSION, 0, session_id, self.ts_ms(now), machine.version, INITIAL_EPOCH,
            client.inner_address, self.inner_prefix, self.inner_gateway, self.mtu, self.endpoints,
            *self._inner6(client), (suite,) if payload.ciphers else (), self._ports.node,
        )  # fmt: skip
        noise_resp, keys = init.pending.write_response(resp.pack())
        s = GatewaySession(
            machine=machine, client=client, index=index, peer_index=init.sender_index,
            session_id=session_id,
            cipher=SessionCipher(
                keys, replay_window=policy.replay_window_size, now=now, suite=suite
            ),
            addr=addr, path_id=payload.path_id, skew_ms=self.ts_ms(now) - payload.ts_ms,
            policy=policy, now=now, ports=self._ports,
        )  # fmt: skip
        self.sessions[index] = s
        self._timers.touch(index)
        self._by_key[client.public_key] = s
        for inner in _inner_keys(client):
            self._by_inner[inner] = s
        resp_dgram = pack_handshake(MSG_HANDSHAKE_RESP, init.sender_index, index, noise_resp)
        self.outbox.push(addr, resp_dgram)
        self._answers.pop(client.public_key, None)  # re-inserted last: the order is by time
        self._answers[client.public_key] = (index, init.sender_index, resp_dgram, now)
        self._forget_answers(now)
        base = s.machine.base(self.ts_ms(now))
        self.report.emit(
            SessionCreated(
                **base, peer=client.name, inner_address=client.inner_address, cipher=suite.label
            )
        )
        if payload.previous_session:  # the client lost its session here: this one follows it
            self.report.emit(
                SessionLinked(
                    **base, previous_session_id=payload.previous_session.hex(),
                    reason_code=Reason.GATEWAY_LOST_STATE, inner_address=client.inner_address,
                    inner_address6=client.inner_address6,
                )
            )  # fmt: skip
        self.report.emit(
            TransportAttached(
                **base, transport_id=payload.path_id, path=addr_label(addr), binding_epoch=s.epoch
            )
        )

    def _new_index(self) -> int:
        while True:
            index = self._rng.getrandbits(32)
            worker, workers = self._index_stripe
            if workers > 1:  # the low byte steers (index_stripe)
                index = index & ~0xFF | self._rng.randrange(worker, 256, workers)
            if index and index not in self.sessions:
                return index

    def _forget_routes(self, s: GatewaySession) -> None:
        """``s`` terminated: INITs and TUN packets no longer reach it (its index stays
        known as a tombstone until ``handle_timer`` removes it)."""
        if self._by_key.get(s.client.public_key) is s:
            del self._by_key[s.client.public_key]
        for inner in _inner_keys(s.client):
            if self._by_inner.get(inner) is s:
                del self._by_inner[inner]

    def _inner6(self, client: ClientEntry) -> tuple[str, int, str]:
        """The IPv6 part of a handshake response: empty for a client without IPv6."""
        if not client.inner_address6:
            return "", 0, ""
        return client.inner_address6, self.inner_prefix6, self.inner_gateway6

    # == timers ============================================================================
    def handle_timer(self, now: float) -> None:
        """Act on the sessions whose deadline has come (only those: the timer queue
        knows them), then the drop summary."""
        for index in self._timers.due(now):
            s = self.sessions.get(index)
            if s is None:
                continue
            if s.tombstone_expired(now):
                del self.sessions[index]
            else:
                s.handle_timer(now)
        self._forget_answers(now)
        self.report.maybe_drop_summary(now, self._base(now))

    def next_deadline(self) -> float | None:
        best = self.report.drop_summary_due()
        t = self._timers.next_deadline()
        if t is not None and (best is None or t < best):
            best = t
        return best

    def _session_deadline(self, index: int) -> float | None:
        s = self.sessions.get(index)
        return None if s is None else s.next_deadline()

    # == commands ==========================================================================
    def set_policy(self, policy: Policy | None, now: float, *, error: str | None = None) -> None:
        """Install a reloaded policy, or record that the reload was invalid (D14, seed §4).

        Valid: applies to new sessions and, strictly, to running ones (their events carry
        the new version, their timers read the new values). Invalid (``policy`` None):
        running sessions keep the last valid policy; new sessions are denied until a valid
        one arrives; POLICY_EVENT either way.
        """
        if policy is None:
            self.policy_error = error or "invalid policy"
            self.policy = None
            self.report.emit(
                PolicyEvent(
                    **self._base(now), policy_name="POLICY_INVALID",
                    reason_code=Reason.POLICY_INVALID, detail=self.policy_error,
                )
            )  # fmt: skip
            return
        self.policy = policy
        self.policy_error = None
        for s in self.sessions.values():
            if not s.machine.terminated:
                s.apply_policy(policy)
        self._timers.touch_all(self.sessions)
        self.report.emit(
            PolicyEvent(
                **self._base(now), policy_name="POLICY_APPLIED",
                reason_code=Reason.POLICY_APPLIED,
            )
        )  # fmt: skip

    @property
    def accepting(self) -> bool:
        """False while no valid policy is loaded (new sessions are denied)."""
        return self.policy is not None

    def terminate(
        self, session_id: str, now: float, reason: Reason = Reason.OPERATOR_TERMINATED,
        *, notify: bool = True,
    ) -> bool:  # fmt: skip
        for s in self.sessions.values():
            if s.machine.session_id == session_id and not s.machine.terminated:
                s.terminate(reason, now, notify=notify)
                self._timers.touch(s.index)
                return True
        return False

    def terminate_all(self, now: float, reason: Reason = Reason.OPERATOR_TERMINATED) -> None:
        self.terminate_many(list(self.sessions), now, reason)

    def terminate_many(
        self, indexes: Sequence[int], now: float, reason: Reason = Reason.OPERATOR_TERMINATED
    ) -> None:
        """End the sessions ``indexes`` name (TERMINATE to each; ended or unknown ones are
        skipped). A driver ending many sessions passes them in batches and sends each
        batch's output before the next, so the outbox stays short (ending a session voids
        what is queued for it: a linear scan of the outbox)."""
        for index in indexes:
            s = self.sessions.get(index)
            if s is not None and not s.machine.terminated:
                s.terminate(reason, now)
                self._timers.touch(index)

    # == resume after a restart (DESIGN D15a; gateway_resume.py) ===========================
    def resume(self, state: ResumeState, now: float) -> GatewaySession | str:
        """Rebuild a session another process of this gateway ran, from its stored state
        (no events; its next transition continues the stored version). Why not, if it
        cannot be: no valid policy, or its index, client or inner address is taken."""
        policy = self.policy
        if policy is None:
            return "no valid policy"
        client = state.client
        taken = [self._by_inner.get(k) for k in _inner_keys(client)]
        if state.index in self.sessions or client.public_key in self._by_key or any(taken):
            return "its receiver index, client or inner address is in use"
        machine = SessionMachine(
            node_id=self.node_id, policy_version=policy.policy_version, emit=self.report.emit,
            max_version=self.max_version, session_id=state.session_id.hex(),
        )  # fmt: skip
        s = GatewaySession(
            machine=machine, client=client, index=state.index, peer_index=state.peer_index,
            session_id=state.session_id,
            cipher=SessionCipher(
                state.keys, replay_window=policy.replay_window_size, now=now, suite=state.suite
            ),
            addr=state.last_binding, path_id=state.binding_path or 0, skew_ms=state.skew_ms,
            policy=policy, now=now, ports=self._ports,
        )  # fmt: skip
        s.resume_from(state, now)
        self.sessions[state.index] = s
        self._by_key[client.public_key] = s
        for inner in _inner_keys(client):
            self._by_inner[inner] = s
        self._timers.touch(state.index)
        return s

    def set_cluster_hooks(
        self,
        on_unknown: Callable[[int, bytes, Addr, float], bool] | None,
        on_unknown_named: Callable[[bytes, float], bool] | None,
    ) -> None:
        """A cluster node's hooks (see :attr:`on_unknown`, :attr:`on_unknown_named`);
        None, None: a single gateway again."""
        self.on_unknown = on_unknown
        self.on_unknown_named = on_unknown_named

    def release(self, session_id: str) -> GatewaySession | None:
        """Forget a live session without ending it (no event, no TERMINATE): another node
        of a cluster owns it now. What is queued for it is voided; nothing more of it
        leaves from here. The session, or None if there is no live one by that id."""
        found = [
            s for s in self.sessions.values()
            if s.machine.session_id == session_id and not s.machine.terminated
        ]  # fmt: skip
        if not found:
            return None
        s = found[0]
        index = s.index
        del self.sessions[index]
        self._forget_routes(s)
        self.outbox.void_for(s.peer_index, handshake=True)  # a session that is not here
        self._timers.touch(index)
        return s

    def reservations_due(self) -> list[GatewaySession]:
        """Sessions that sealed past their counter reservation since the last call: the
        driver reserves (``reservation_made``) before their datagrams leave."""
        due, self._reserve_due[:] = self._reserve_due[:], []
        return due

    # == outputs ===========================================================================
    def datagrams_to_send(self) -> list[tuple[Addr, bytes]]:
        return self.outbox.take()

    def packets_for_tun(self) -> list[bytes]:
        out = self._tun[:]  # the sessions deliver into this very list (SessionPorts)
        self._tun.clear()
        return out

    def session_views(self, now: float) -> list[SessionView]:
        return [s.view(now) for s in self.sessions.values()]


def _inner_keys(client: ClientEntry) -> list[bytes]:
    """The packed inner addresses TUN packets reach ``client`` by (IPv4, then IPv6)."""
    keys = [ipaddress.IPv4Address(client.inner_address).packed]
    if client.inner_address6:
        keys.append(ipaddress.IPv6Address(client.inner_address6).packed)
    return keys
