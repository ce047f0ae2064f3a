"""GatewaySessions: the gateway protocol machine (sans-I/O), one object for all sessions.

Inputs: ``receive_datagram(data, addr, now)`` (``addr`` is any hashable source address,
e.g. ``(host, port)``), ``receive_tun_packet(packet, now)``, ``handle_timer(now)``,
``set_policy`` and ``terminate``. Outputs are pulled: ``datagrams_to_send()`` ->
[(addr, bytes)], ``packets_for_tun()``, ``next_event()``, ``next_deadline()``.

The gateway record is authoritative for the *binding* (DESIGN D3): which source address
carries the session's data, under a ``binding_epoch`` incremented on every committed
binding change. The binding moves only by
- a validated REATTACH_REQUEST naming the current epoch (recovery, proactive, manual), or
- NAT rebinding (D4): an authenticated, newest DATA packet (or PROBE of the bound path: an
  idle session) from an unknown address starts a PATH_CHALLENGE there (at most 3x the
  bytes received from it until validated), and only the PATH_RESPONSE commits a versioned
  rebind with reason ``nat_rebind``.
An authenticated packet from an unknown address never moves the binding by itself.
"""

from __future__ import annotations

import ipaddress
import random
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from tunnel.core.aead import KeyExhausted, SessionCipher
from tunnel.core.constants import (
    MAX_INNER_PACKET,
    MAX_STATE_VERSION,
    MSG_CONTROL,
    MSG_COOKIE_REPLY,
    MSG_DATA,
    MSG_HANDSHAKE_INIT,
    MSG_HANDSHAKE_RESP,
    PROTOCOL_VERSION,
    SESSION_ID_LEN,
    TRANSPORT_HEADER,
)
from tunnel.core.cookie import CookieChecker, address_bytes
from tunnel.core.drops import Drop
from tunnel.core.endpoint import EndpointBase
from tunnel.core.events import (
    Event,
    EventBase,
    KeyRotated,
    PathValidated,
    PolicyEvent,
    Reason,
    ReattachResult,
    SessionCreated,
    TransportAttached,
    TransportDead,
    TransportSwitch,
    reason_from_wire,
    reason_to_wire,
)
from tunnel.core.handshake import HandshakeError, Responder, public_key
from tunnel.core.policy import Policy
from tunnel.core.replay import NonceGuard, NonceVerdict
from tunnel.core.session import SessionMachine, State, Trigger, most_urgent
from tunnel.core.wire import (
    STATE_CODES,
    Control,
    InitPayload,
    PathChallenge,
    PathResponse,
    Probe,
    ProbeAck,
    ReattachAck,
    ReattachKind,
    ReattachReject,
    ReattachRequest,
    Rekey,
    RespPayload,
    StateAck,
    StateUpdate,
    Terminate,
    pack_control,
    pack_handshake,
    parse_control,
    parse_header,
    split_init,
)

Addr = Hashable

AMPLIFICATION_FACTOR = 3
"""D4: bytes sent to an unvalidated address stay within 3x the bytes received from it."""

MAX_VALIDATED = 8
"""Validated source addresses remembered per session (one per client path, with room)."""

MAX_CHALLENGES = 8
"""Outstanding path challenges per session; the oldest is forgotten beyond this."""

CHALLENGE_RESEND_S = 0.25
"""A challenge is repeated at most this often while packets keep coming from the address."""

STATE_UPDATE_RESEND_S = 0.3
"""STATE_UPDATE retransmit interval until acknowledged."""

STATE_UPDATE_SENDS = 6
"""STATE_UPDATE sends at most (then the next transition or probe ack carries the news)."""

TOMBSTONE_S = 10.0
"""A terminated session's index stays known this long: late packets are counted, and an
authentic one is answered with TERMINATE (a client whose TERMINATE was lost learns it)."""

TOMBSTONE_ANSWER_S = 1.0
"""At most one TERMINATE answer per tombstone per this many seconds (<= 10 per session)."""

HANDSHAKE_RATE = 200.0
"""Handshake initiations per second the gateway spends DH on (token bucket refill)."""

HANDSHAKE_BURST = 400.0
"""Handshake bucket size."""

COOKIE_LOAD_FRACTION = 0.25
"""Under load (cookies required) while the handshake bucket holds less than this share of
its burst: a quarter left means a flood is draining it faster than it refills."""

COOKIE_REPLY_RATE = 5000.0
"""Cookie replies per second at most (token bucket refill); beyond, INITs without a
cookie are dropped as rate_limited. Bounds the work a spoofed INIT flood can cause."""

COOKIE_REPLY_BURST = 5000.0
"""Cookie reply bucket size."""

KIND_REASON = {
    ReattachKind.RECOVERY: Reason.DEAD_TRANSPORT_RECOVERY,
    ReattachKind.PROACTIVE: Reason.LOSS_RECOVERY,
    ReattachKind.MANUAL: Reason.MANUAL_SWITCH,
    ReattachKind.RESUME: Reason.TRANSPORT_RESUMED,
}


def addr_label(addr: Addr) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr)


@dataclass(frozen=True, slots=True)
class ClientEntry:
    """An allowed client: its static public key and the inner address it gets."""

    name: str
    public_key: bytes
    inner_address: str

    def __repr__(self) -> str:
        return f"ClientEntry(name={self.name!r}, inner_address={self.inner_address!r})"


class TokenBucket:
    """Deterministic token bucket (SPEC-DIGEST 4.6); starts full; time is a parameter."""

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.tokens, self.last = rate, burst, burst, now

    def level(self, now: float) -> float:
        """Tokens available at ``now`` (refills; takes none)."""
        if now > self.last:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now
        return self.tokens

    def allow(self, now: float, cost: float = 1.0) -> bool:
        if self.level(now) >= cost:
            self.tokens -= cost
            return True
        return False


@dataclass(slots=True)
class _Challenge:
    token: bytes
    purpose: str  # "probe", "nat" or "reattach"
    received: int
    sent: int
    last_sent: float


class GatewaySession:
    """The gateway's record of one session (its keys never leave this object)."""

    def __init__(
        self,
        *,
        machine: SessionMachine,
        client: ClientEntry,
        index: int,
        peer_index: int,
        session_id: bytes,
        addr: Addr,
        path_id: int,
        skew_ms: int,
        policy: Policy,
        now: float,
    ) -> None:
        self.machine = machine
        self.client = client
        self.index = index
        self.peer_index = peer_index
        self.session_id = session_id
        self.cipher: SessionCipher | None = None
        self.binding: Addr | None = addr
        self.binding_path: int | None = path_id
        self.last_binding: Addr | None = addr
        self.epoch = 1
        self.validated: OrderedDict[Addr, float] = OrderedDict({addr: now})
        self.challenges: OrderedDict[Addr, _Challenge] = OrderedDict()
        self.received_from: dict[Addr, int] = {}
        self.probes_rx: dict[int, int] = {}
        """PROBEs received per path_id (a u8: at most 256 keys), echoed in PROBE_ACK."""
        self.last_inbound = now
        self.born = now
        self.transportless_since: float | None = None
        self.recovery_started: float | None = None
        self.dead_until: float | None = None
        self.nonces = NonceGuard()
        self.skew_ms = skew_ms
        self.policy = policy
        self.security_failures = 0
        self.last_failure: float | None = None
        self.state_seq = 0
        self.unacked: StateUpdate | None = None
        self.unacked_sent = 0.0
        self.unacked_sends = 0
        self.held: tuple[ReattachRequest, Addr] | None = None
        self.last_ack: tuple[int, ReattachAck] | None = None
        self.bucket = TokenBucket(policy.reattach_rate_per_s, policy.reattach_burst, now)
        self.queue: deque[bytes] = deque()
        self.queue_bytes = 0
        self.rx_high = -1
        self.rx_phase = 0
        self.total_switches = 0
        self.tombstone_until: float | None = None
        self.end_reason: Reason | None = None
        self.terminate_answered: float | None = None


@dataclass(frozen=True, slots=True)
class SessionView:
    session_id: str
    client: str
    state: str
    state_version: int
    binding_epoch: int
    binding: str
    policy_version: str
    age_s: float
    security_failures: int
    total_switches: int


class GatewaySessions(EndpointBase):
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
        mtu: int = 1420,
        endpoints: Sequence[tuple[str, int]] = (),
        max_version: int = MAX_STATE_VERSION,
        cookie_threshold: float = COOKIE_LOAD_FRACTION,
    ) -> None:
        """``cookie_threshold``: share of the handshake bucket below which the gateway is
        under load and answers INITs without a valid cookie with a COOKIE_REPLY (0: never,
        1: always)."""
        super().__init__(node_id=node_id, wall_offset=wall_offset, now=now)
        self._responder = Responder(static_private)
        self._cookies = CookieChecker(public_key(static_private), urandom, now)
        self.cookie_threshold = cookie_threshold
        self._cookie_bucket = TokenBucket(COOKIE_REPLY_RATE, COOKIE_REPLY_BURST, now)
        self._clients = {c.public_key: c for c in clients}
        self.policy = policy
        self.policy_error: str | None = None if policy else "no valid policy loaded"
        self._urandom = urandom
        self._rng = rng or random.Random()
        self.inner_gateway = inner_gateway
        self.inner_prefix = inner_prefix
        self.mtu = mtu
        self.endpoints = tuple(endpoints)
        self.max_version = max_version
        self.sessions: dict[int, GatewaySession] = {}
        self._by_key: dict[bytes, GatewaySession] = {}
        self._by_inner: dict[bytes, GatewaySession] = {}
        self._last_init_ts: dict[bytes, int] = {}
        self._hs_bucket = TokenBucket(HANDSHAKE_RATE, HANDSHAKE_BURST, now)
        self._out: list[tuple[Addr, bytes]] = []
        self._tun: list[bytes] = []
        self._policy_base_version = policy.policy_version if policy else "invalid"

    # == helpers ===========================================================================
    def _base(self, s: GatewaySession | None, now: float) -> EventBase:
        if s is not None:
            return s.machine.base(self.ts_ms(now))
        return {
            "ts_ms": self.ts_ms(now),
            "session_id": "",
            "node_id": self.node_id,
            "policy_version": self.policy.policy_version if self.policy else "invalid",
            "state_version": 0,
        }

    def _send(self, s: GatewaySession, addr: Addr, msg: Control) -> int:
        if s.cipher is None:
            return 0
        try:
            dgram = s.cipher.seal(MSG_CONTROL, s.peer_index, pack_control(msg))
        except KeyExhausted:
            self.count_drop(Drop.KEY_EXHAUSTED)
            return 0
        self._out.append((addr, dgram))
        return len(dgram)

    def _fire(
        self, s: GatewaySession, trigger: Trigger, reason: Reason, now: float, **fields: Any
    ) -> bool:
        if trigger is Trigger.TERMINATE:
            s.end_reason = reason
            fields.setdefault("session_age_ms", (now - s.born) * 1000)
            tl = 0.0 if s.transportless_since is None else (now - s.transportless_since) * 1000
            fields.setdefault("transportless_age_ms", tl)
            fields.setdefault("total_switches", s.total_switches)
        ok = s.machine.fire(trigger, reason, self.ts_ms(now), **fields)
        if not ok and not s.machine.terminated:
            return False
        if s.machine.terminated:
            self._on_terminated(s, now)
        else:
            self._state_update(s, reason, now)
        return ok

    def _state_update(self, s: GatewaySession, reason: Reason, now: float) -> None:
        s.state_seq += 1
        s.unacked = StateUpdate(
            s.state_seq,
            STATE_CODES.index(str(s.machine.state)),
            s.machine.version,
            s.epoch,
            reason_to_wire(reason),
        )
        s.unacked_sends = 0
        self._send_state_update(s, now)

    def _send_state_update(self, s: GatewaySession, now: float) -> None:
        if s.unacked is None:
            return
        targets = [s.binding] if s.binding is not None else list(s.validated)
        for addr in targets:
            self._send(s, addr, s.unacked)
        s.unacked_sent = now
        s.unacked_sends += 1
        if s.unacked_sends >= STATE_UPDATE_SENDS:
            s.unacked = None

    def _terminate(
        self,
        s: GatewaySession,
        reason: Reason,
        now: float,
        *,
        notify: bool = True,
        initiator: str = "local",
    ) -> None:
        if s.machine.terminated:
            return
        if notify and s.cipher is not None:
            # Transport messages still queued for this client (e.g. the REATTACH_ACK whose
            # transition the session store refused) are void: TERMINATE is the last word.
            # A queued HANDSHAKE_RESP stays: without it the client cannot read TERMINATE.
            index = s.peer_index.to_bytes(4, "little")
            self._out = [
                (a, d) for a, d in self._out if d[4:8] != index or d[0] == MSG_HANDSHAKE_RESP
            ]
            targets = [s.binding] if s.binding is not None else list(s.validated)
            for addr in targets:
                self._send(s, addr, Terminate(reason_to_wire(reason)))
        self._fire(s, Trigger.TERMINATE, reason, now, initiator=initiator)

    def _on_terminated(self, s: GatewaySession, now: float) -> None:
        s.binding = None
        s.queue.clear()
        s.queue_bytes = 0
        s.held = None
        s.unacked = None
        s.challenges.clear()
        s.tombstone_until = now + TOMBSTONE_S
        if self._by_key.get(s.client.public_key) is s:
            del self._by_key[s.client.public_key]
        inner = ipaddress.IPv4Address(s.client.inner_address).packed
        if self._by_inner.get(inner) is s:
            del self._by_inner[inner]

    def _answer_tombstone(self, s: GatewaySession, data: bytes, addr: Addr, now: float) -> None:
        """A datagram for a terminated session: if it is authentic and fresh, tell the sender
        (again) that the session ended, at most once per TOMBSTONE_ANSWER_S. Forged and
        replayed datagrams fail to open and get nothing; a TERMINATE is not answered."""
        if s.cipher is None or s.tombstone_until is None or now >= s.tombstone_until:
            return
        plaintext = s.cipher.open(data, now)  # always: the replay window must see it
        if isinstance(plaintext, Drop):
            return
        if s.terminate_answered is not None and now < s.terminate_answered + TOMBSTONE_ANSWER_S:
            return
        if data[0] == MSG_CONTROL and isinstance(parse_control(plaintext), Terminate):
            return
        s.terminate_answered = now
        self._send(s, addr, Terminate(reason_to_wire(s.end_reason or Reason.PEER_TERMINATED)))

    # == inputs ============================================================================
    def receive_datagram(self, data: bytes, addr: Addr, now: float) -> None:
        header = parse_header(data)
        if isinstance(header, Drop):
            self.count_drop(header)
            return
        if header.msg_type == MSG_HANDSHAKE_INIT:
            self._on_init(data, addr, now)
            return
        if header.msg_type in (MSG_HANDSHAKE_RESP, MSG_COOKIE_REPLY):
            self.count_drop(Drop.WRONG_STATE)
            return
        s = self.sessions.get(header.receiver_index)
        if s is None or s.cipher is None:
            self.count_drop(Drop.UNKNOWN_SESSION)
            return
        if s.machine.terminated:
            self.count_drop(Drop.WRONG_STATE)
            self._answer_tombstone(s, data, addr, now)
            return
        phase_before = s.cipher.phase
        plaintext = s.cipher.open(data, now)
        if isinstance(plaintext, Drop):
            self.count_drop(plaintext)
            if plaintext is Drop.BAD_TAG:
                self._security(
                    now, self._base(s, now), "INVALID_PROOF", Reason.BAD_PROOF,
                    source=addr_label(addr),
                )  # fmt: skip
            elif plaintext is Drop.REPLAY:
                self._security(
                    now, self._base(s, now), "REPLAY_DETECTED", Reason.REPLAY_DETECTED,
                    source=addr_label(addr),
                )  # fmt: skip
            return
        if s.cipher.phase != phase_before:
            self.emit(KeyRotated(**self._base(s, now), key_phase=s.cipher.phase, initiator="peer"))
        counter = TRANSPORT_HEADER.unpack_from(data)[3]
        if header.phase != s.rx_phase:
            s.rx_phase, s.rx_high = header.phase, -1
        newest = counter > s.rx_high
        if newest:
            s.rx_high = counter
        s.received_from[addr] = s.received_from.get(addr, 0) + len(data)
        if len(s.received_from) > 2 * MAX_VALIDATED:
            s.received_from.pop(next(iter(s.received_from)))
        if addr == s.binding:
            s.last_inbound = now
        elif s.binding is None and addr == s.last_binding and addr in s.validated and newest:
            self._resume(s, addr, now)
        if header.msg_type == MSG_DATA:
            self._on_data(s, plaintext, addr, newest, now)
            return
        msg = parse_control(plaintext)
        if isinstance(msg, Drop):
            self.count_drop(msg)
            return
        self._on_control(s, msg, addr, newest, now)

    def _on_data(
        self, s: GatewaySession, packet: bytes, addr: Addr, newest: bool, now: float
    ) -> None:
        if addr == s.binding or addr in s.validated:
            if not packet or packet[0] >> 4 not in (4, 6):
                self.count_drop(Drop.MALFORMED)
                return
            self._tun.append(packet)
            return
        # Authentic data from an unknown address: a possible NAT rebinding (D4).
        self.count_drop("unvalidated_path")
        if newest and s.binding is not None:
            self._challenge(s, addr, "nat", now)

    def _on_control(
        self, s: GatewaySession, msg: Control, addr: Addr, newest: bool, now: float
    ) -> None:
        if isinstance(msg, Probe):
            state = STATE_CODES.index(str(s.machine.state))
            rx = (s.probes_rx.get(msg.path_id, 0) + 1) & 0xFFFFFFFF
            s.probes_rx[msg.path_id] = rx
            ack = ProbeAck(msg.probe_id, msg.path_id, self.ts_ms(now), state, s.epoch, rx)
            self._send(s, addr, ack)
            if addr not in s.validated:
                # A fresh probe of the bound path from a new address is a NAT rebinding of
                # an idle session (no data to show it): validate, then rebind like data.
                nat = newest and s.binding is not None and msg.path_id == s.binding_path
                self._challenge(s, addr, "nat" if nat else "probe", now)
        elif isinstance(msg, PathResponse):
            self._on_path_response(s, msg, addr, now)
        elif isinstance(msg, ReattachRequest):
            self._on_reattach(s, msg, addr, now)
        elif isinstance(msg, StateAck):
            if s.unacked is not None and msg.seq == s.unacked.seq:
                s.unacked = None
        elif isinstance(msg, Terminate):
            reason = reason_from_wire(msg.reason) or Reason.PEER_TERMINATED
            self._terminate(s, reason, now, notify=False, initiator="peer")
        elif isinstance(msg, Rekey):
            pass  # the phase change itself was handled by SessionCipher.open
        else:
            self.count_drop(Drop.UNKNOWN_TYPE)

    # -- path validation (D4) ----------------------------------------------------------------
    def _challenge(self, s: GatewaySession, addr: Addr, purpose: str, now: float) -> None:
        ch = s.challenges.get(addr)
        if ch is None:
            ch = _Challenge(self._urandom(8), purpose, 0, 0, -1.0)
            s.challenges[addr] = ch
            while len(s.challenges) > MAX_CHALLENGES:
                s.challenges.popitem(last=False)
        elif purpose != "probe":
            ch.purpose = purpose  # data or a reattach outranks a mere probe
        ch.received = s.received_from.get(addr, 0)
        if now - ch.last_sent < CHALLENGE_RESEND_S:
            return
        if s.cipher is None:
            return
        dgram = s.cipher.seal(MSG_CONTROL, s.peer_index, pack_control(PathChallenge(ch.token)))
        if ch.sent + len(dgram) > AMPLIFICATION_FACTOR * ch.received:
            self.count_drop("amplification_limit")
            return
        ch.sent += len(dgram)
        ch.last_sent = now
        self._out.append((addr, dgram))

    def _on_path_response(
        self, s: GatewaySession, msg: PathResponse, addr: Addr, now: float
    ) -> None:
        ch = s.challenges.get(addr)
        if ch is None or ch.token != msg.token:
            self.count_drop("unexpected_path_response")
            return
        del s.challenges[addr]
        s.validated[addr] = now
        s.validated.move_to_end(addr)
        while len(s.validated) > MAX_VALIDATED:
            old, _ = s.validated.popitem(last=False)
            if old == s.binding:  # never forget the binding itself
                s.validated[old] = now
                s.validated.move_to_end(old, last=False)
                break
        self.emit(PathValidated(**self._base(s, now), path=addr_label(addr)))
        if s.held is not None and s.held[1] == addr:
            request, _ = s.held
            s.held = None
            self._on_reattach(s, request, addr, now)
        elif ch.purpose == "nat" and s.binding is not None and addr != s.binding:
            old = s.binding
            if self._fire(s, Trigger.REBIND, Reason.NAT_REBIND, now):
                s.epoch += 1
                s.binding, s.last_binding, s.last_inbound = addr, addr, now
                s.validated.pop(old, None)  # the old address is no longer accepted
                s.total_switches += 1
                self.emit(
                    TransportSwitch(
                        **self._base(s, now), previous_transport=s.binding_path,
                        new_transport=s.binding_path if s.binding_path is not None else -1,
                        reason_code=Reason.NAT_REBIND, switch_latency_ms=0.0,
                        binding_epoch=s.epoch, path=addr_label(addr),
                    )
                )  # fmt: skip
                self._state_update(s, Reason.NAT_REBIND, now)

    def _resume(self, s: GatewaySession, addr: Addr, now: float) -> None:
        """RECOVERING, and the last binding speaks again with a newest packet: re-bind it."""
        if s.machine.state is State.RECOVERING and self._fire(
            s, Trigger.REATTACH_OK, Reason.TRANSPORT_RESUMED, now
        ):
            s.epoch += 1
            s.binding, s.last_inbound = addr, now
            s.transportless_since = s.recovery_started = None
            self._state_update(s, Reason.TRANSPORT_RESUMED, now)
            self._flush(s)

    # -- reattach (spec/security-binding order, digest §4.4) ----------------------------------
    def _reject(
        self, s: GatewaySession, req: ReattachRequest, addr: Addr, reason: Reason, now: float,
        *, fatal: bool = False, escalate: bool = False,
    ) -> None:  # fmt: skip
        self._send(s, addr, ReattachReject(req.nonce, reason_to_wire(reason), int(fatal), s.epoch))
        self.emit(
            ReattachResult(
                **self._base(s, now), status="DENIED", reason_code=reason,
                candidate_transport=req.path_id, path=addr_label(addr), fatal=fatal,
            )
        )  # fmt: skip
        if fatal:
            self._terminate(s, reason, now, notify=False)
        elif escalate:
            self._escalate(s, now)

    def _escalate(self, s: GatewaySession, now: float) -> None:
        """Seed §3: repeated authenticated validation failures -> DEGRADED, then TERMINATED."""
        s.security_failures += 1
        s.last_failure = now
        pol = s.policy
        if s.security_failures >= pol.security_failures_to_terminate:
            self._terminate(s, Reason.SECURITY_FAILURE, now)
        elif s.security_failures >= pol.security_failures_to_degrade and s.machine.can(
            Trigger.SECURITY_ESCALATION
        ):
            self._fire(s, Trigger.SECURITY_ESCALATION, Reason.SECURITY_FAILURES_REPEATED, now)

    def _on_reattach(self, s: GatewaySession, req: ReattachRequest, addr: Addr, now: float) -> None:
        pol = s.policy
        # The same comparisons as _session_timers (now >= start + interval): at the very
        # instant the timer would end the session, a reattach must not revive it.
        if now >= s.born + pol.max_lifetime_ms / 1000:
            self._reject(s, req, addr, Reason.SESSION_EXPIRED, now, fatal=True)
            return
        if (
            s.transportless_since is not None
            and now >= s.transportless_since + pol.transport_lost_ttl_ms / 1000
        ):
            self._reject(s, req, addr, Reason.TRANSPORT_TTL_EXCEEDED, now, fatal=True)
            return
        verdict = s.nonces.check(req.nonce)
        if (
            verdict is NonceVerdict.DUPLICATE
            and s.last_ack is not None
            and s.last_ack[0] == req.nonce
        ):
            if addr == s.binding:
                self._send(s, addr, s.last_ack[1])  # retransmitted request: same answer
            else:
                self.count_drop(Drop.REPLAY)  # not answered, but never silently
            return
        if verdict is not NonceVerdict.ACCEPTED:
            base = self._base(s, now)
            if verdict in (NonceVerdict.DUPLICATE, NonceVerdict.STALE):
                # Not a replay: an exact replay never gets here (the AEAD replay window
                # drops it as Drop.REPLAY with a SECURITY_EVENT). An older nonce inside a
                # freshly sealed, authenticated datagram comes from the key holder: a
                # request overtaken by a newer one (reordering, AT-47). Stale, answered
                # with the current epoch, no security event, no escalation.
                stale = (
                    Reason.STALE_BINDING_EPOCH
                    if req.expected_epoch != s.epoch
                    else Reason.STALE_REQUEST
                )
                self._reject(s, req, addr, stale, now)
            elif verdict is NonceVerdict.WINDOW_EXCEEDED:
                self._security(
                    now,
                    base,
                    "NONCE_WINDOW_EXCEEDED",
                    Reason.NONCE_WINDOW_EXCEEDED,
                    source=addr_label(addr),
                )
                self._reject(s, req, addr, Reason.NONCE_WINDOW_EXCEEDED, now, escalate=True)
            else:
                self._reject(s, req, addr, Reason.MALFORMED_REQUEST, now, escalate=True)
            return
        if req.expected_epoch != s.epoch:
            self._reject(s, req, addr, Reason.STALE_BINDING_EPOCH, now)
            return
        age = abs(self.ts_ms(now) - (req.ts_ms + s.skew_ms))
        if age > pol.reattach_proof_max_age_ms:
            self._security(
                now,
                self._base(s, now),
                "STALE_REQUEST",
                Reason.STALE_REQUEST,
                source=addr_label(addr),
            )
            self._reject(s, req, addr, Reason.STALE_REQUEST, now, escalate=True)
            return
        if not s.bucket.allow(now):
            self._reject(s, req, addr, Reason.RATE_LIMITED, now)
            return
        if addr not in s.validated:
            s.held = (req, addr)  # answered once the address proves it is the client's
            self._challenge(s, addr, "reattach", now)
            return
        self._commit_reattach(s, req, addr, now)

    def _commit_reattach(
        self, s: GatewaySession, req: ReattachRequest, addr: Addr, now: float
    ) -> None:
        s.nonces.commit(req.nonce)
        st = s.machine.state
        if addr == s.binding and st is not State.RECOVERING:
            ack = ReattachAck(req.nonce, s.epoch, s.machine.version, STATE_CODES.index(str(st)))
        else:
            previous = s.binding_path
            recovering = st is State.RECOVERING
            reason = KIND_REASON[ReattachKind(req.kind)]
            if recovering:
                ok = s.machine.fire(Trigger.REATTACH_OK, Reason.REATTACH_SUCCESS, self.ts_ms(now))
            else:
                ok = s.machine.fire(Trigger.REBIND, reason, self.ts_ms(now))
            if not ok:
                if s.machine.terminated:
                    self._on_terminated(s, now)
                    return
                self._reject(s, req, addr, Reason.INVALID_STATE_FOR_REATTACH, now)
                return
            s.epoch += 1
            s.binding, s.binding_path, s.last_binding, s.last_inbound = addr, req.path_id, addr, now
            latency = 0.0 if s.recovery_started is None else (now - s.recovery_started) * 1000
            s.transportless_since = s.recovery_started = None
            s.total_switches += 1
            s.unacked = None  # the ACK carries the new state
            self.emit(
                TransportSwitch(
                    **self._base(s, now), previous_transport=previous, new_transport=req.path_id,
                    reason_code=Reason.REATTACH_SUCCESS if recovering else reason,
                    switch_latency_ms=round(latency, 3), binding_epoch=s.epoch,
                    path=addr_label(addr),
                )
            )  # fmt: skip
            self.emit(
                ReattachResult(
                    **self._base(s, now), status="SUCCESS", reason_code=Reason.REATTACH_SUCCESS,
                    candidate_transport=req.path_id, path=addr_label(addr),
                )
            )  # fmt: skip
            ack = ReattachAck(
                req.nonce, s.epoch, s.machine.version, STATE_CODES.index(str(s.machine.state))
            )
        s.last_ack = (req.nonce, ack)
        self._send(s, addr, ack)
        self._flush(s)

    # -- handshake -----------------------------------------------------------------------------
    def under_load(self, now: float) -> bool:
        """True while handshakes need a cookie (the handshake bucket is running low)."""
        if self.cookie_threshold >= 1.0:
            return True
        return self._hs_bucket.level(now) < self.cookie_threshold * self._hs_bucket.burst

    def _on_init(self, data: bytes, addr: Addr, now: float) -> None:
        # Cheap checks first (cookie.py): mac1 always, mac2 under load; DH only after both.
        if not self._cookies.mac1_ok(data):
            self.count_drop(Drop.BAD_MAC)
            return
        sender_index, noise, _, _ = split_init(data)
        if self.under_load(now):
            source = address_bytes(addr_label(addr))
            if not self._cookies.mac2_ok(data, source, now):
                if self._cookie_bucket.allow(now):
                    self._out.append((addr, self._cookies.reply(data, sender_index, source, now)))
                    self.count_drop(Drop.COOKIE_REQUIRED)
                else:
                    self.count_drop(Drop.RATE_LIMITED)
                return
        if not self._hs_bucket.allow(now):
            self.count_drop(Drop.RATE_LIMITED)
            return
        try:
            pending = self._responder.read_init(noise)
        except HandshakeError:
            self.count_drop(Drop.HANDSHAKE_FAILED)
            return
        client = self._clients.get(pending.client_static)
        if client is None:
            self.count_drop(Drop.UNKNOWN_CLIENT_KEY)
            self._security(
                now,
                self._base(None, now),
                "UNKNOWN_CLIENT",
                Reason.UNKNOWN_CLIENT_KEY,
                source=addr_label(addr),
            )
            return
        payload = InitPayload.parse(pending.payload)
        if isinstance(payload, Drop):
            self.count_drop(payload)
            return
        last = self._last_init_ts.get(client.public_key)
        if last is not None and payload.ts_ms <= last:
            # A replayed initiation must not replace the live session (fixation, AT-36).
            self.count_drop(Drop.REPLAY)
            self._security(
                now,
                self._base(None, now),
                "FIXATION_ATTEMPT",
                Reason.SESSION_FIXATION_ATTEMPT,
                source=addr_label(addr),
            )
            return
        self._last_init_ts[client.public_key] = payload.ts_ms
        status: Reason | None = None
        if payload.version != PROTOCOL_VERSION:
            status = Reason.PROTOCOL_VERSION_MISMATCH
        elif self.policy is None:
            status = Reason.POLICY_DENIED
            self.emit(
                PolicyEvent(
                    **self._base(None, now), policy_name="SESSION_DENIED",
                    reason_code=Reason.POLICY_DENIED, detail=self.policy_error or "",
                )
            )  # fmt: skip
        if status is not None:
            resp = RespPayload(
                PROTOCOL_VERSION, reason_to_wire(status), bytes(SESSION_ID_LEN), self.ts_ms(now),
                0, 0, "0.0.0.0", 0, "0.0.0.0", self.mtu,
            )  # fmt: skip
            noise_resp, _ = pending.write_response(resp.pack())
            self._out.append(
                (addr, pack_handshake(MSG_HANDSHAKE_RESP, sender_index, 0, noise_resp))
            )
            return
        policy = self.policy
        assert policy is not None
        old = self._by_key.get(client.public_key)
        if old is not None:
            self._terminate(old, Reason.SESSION_REPLACED, now, notify=False)
        index = self._new_index()
        session_id = self._urandom(SESSION_ID_LEN)
        machine = SessionMachine(
            node_id=self.node_id, policy_version=policy.policy_version, emit=self.emit,
            max_version=self.max_version,
        )  # fmt: skip
        machine.session_id = session_id.hex()
        s = GatewaySession(
            machine=machine, client=client, index=index, peer_index=sender_index,
            session_id=session_id, addr=addr, path_id=payload.path_id,
            skew_ms=self.ts_ms(now) - payload.ts_ms, policy=policy, now=now,
        )  # fmt: skip
        machine.fire(Trigger.HANDSHAKE_OK, Reason.ATTACHED_TO_TRANSPORT, self.ts_ms(now))
        resp = RespPayload(
            PROTOCOL_VERSION, 0, session_id, self.ts_ms(now), machine.version, s.epoch,
            client.inner_address, self.inner_prefix, self.inner_gateway, self.mtu, self.endpoints,
        )  # fmt: skip
        noise_resp, keys = pending.write_response(resp.pack())
        s.cipher = SessionCipher(keys, replay_window=policy.replay_window_size, now=now)
        self.sessions[index] = s
        self._by_key[client.public_key] = s
        self._by_inner[ipaddress.IPv4Address(client.inner_address).packed] = s
        self._out.append(
            (addr, pack_handshake(MSG_HANDSHAKE_RESP, sender_index, index, noise_resp))
        )
        base = self._base(s, now)
        self.emit(SessionCreated(**base, peer=client.name, inner_address=client.inner_address))
        self.emit(
            TransportAttached(
                **base, transport_id=payload.path_id, path=addr_label(addr), binding_epoch=s.epoch
            )
        )

    def _new_index(self) -> int:
        while True:
            index = self._rng.getrandbits(32)
            if index and index not in self.sessions:
                return index

    # -- data from the TUN ---------------------------------------------------------------------
    def receive_tun_packet(self, packet: bytes, now: float) -> None:
        if len(packet) < 20 or len(packet) > MAX_INNER_PACKET:
            self.count_drop(Drop.MALFORMED if packet else Drop.TRUNCATED)
            return
        if packet[0] >> 4 != 4:
            self.count_drop("ipv6_not_routed")
            return
        s = self._by_inner.get(packet[16:20])
        if s is None:
            self.count_drop("no_route")
            return
        if s.binding is not None and s.cipher is not None:
            try:
                self._out.append((s.binding, s.cipher.seal(MSG_DATA, s.peer_index, packet)))
            except KeyExhausted:
                self.count_drop(Drop.KEY_EXHAUSTED)
            return
        pol = s.policy
        if (
            len(s.queue) >= pol.outbound_queue_packets
            or s.queue_bytes + len(packet) > pol.outbound_queue_bytes
        ):
            self.count_drop("queue_overflow")
            return
        s.queue.append(packet)
        s.queue_bytes += len(packet)

    def _flush(self, s: GatewaySession) -> None:
        queue, s.queue, s.queue_bytes = s.queue, deque(), 0
        for packet in queue:
            self.receive_tun_packet(packet, 0.0)

    # == timers ============================================================================
    def dead_after_s(self, s: GatewaySession) -> float:
        """Inbound silence on the binding that declares it dead: longer than the client's
        own detection (which probes every probe_interval), so the client normally acts first."""
        return max(1.0, 3 * s.policy.dead_min_ms / 1000)

    def handle_timer(self, now: float) -> None:
        for index in list(self.sessions):
            s = self.sessions[index]
            if s.machine.terminated:
                if s.tombstone_until is not None and now >= s.tombstone_until:
                    del self.sessions[index]
                continue
            self._session_timers(s, now)
            if s.cipher is not None:
                s.cipher.discard_expired(now)
        self._maybe_drop_summary(now, self._base(None, now))

    def _session_timers(self, s: GatewaySession, now: float) -> None:
        pol = s.policy
        st = s.machine.state
        found: list[tuple[Trigger, Reason]] = []
        if now >= s.born + pol.max_lifetime_ms / 1000:
            found.append((Trigger.TERMINATE, Reason.SESSION_LIFETIME_EXCEEDED))
        if (
            s.transportless_since is not None
            and now >= s.transportless_since + pol.transport_lost_ttl_ms / 1000
        ):
            found.append((Trigger.TERMINATE, Reason.TRANSPORT_TTL_EXCEEDED))
        if (
            st is State.RECOVERING
            and s.recovery_started is not None
            and now >= s.recovery_started + pol.recovery_window_ms / 1000
        ):
            trig = Trigger.TERMINATE if pol.on_recovery_timeout == "terminate" else Trigger.DEGRADE
            found.append((trig, Reason.RECOVERY_WINDOW_EXCEEDED))
        if s.binding is not None and now >= s.last_inbound + self.dead_after_s(s):
            found.append((Trigger.TRANSPORT_DEAD, Reason.TRANSPORT_DEAD))
        if (
            st is State.DEGRADED and s.binding is not None and s.last_failure is not None
            and now >= s.last_failure + pol.stability_window_ms / 1000
        ):  # fmt: skip
            found.append((Trigger.STABILITY_RESTORED, Reason.STABILITY_RESTORED))
        chosen = most_urgent(found)
        if chosen is not None:
            trigger, reason = chosen
            if trigger is Trigger.TERMINATE:
                self._terminate(s, reason, now)
            elif trigger is Trigger.TRANSPORT_DEAD:
                dead = s.binding
                self.emit(
                    TransportDead(
                        **self._base(s, now),
                        transport_id=-1 if s.binding_path is None else s.binding_path,
                        silence_ms=round((now - s.last_inbound) * 1000, 3),
                    )
                )  # fmt: skip
                s.binding = None
                s.transportless_since = s.recovery_started = now
                if not self._fire(s, trigger, reason, now, from_transport=s.binding_path):
                    s.binding = dead
                    s.transportless_since = s.recovery_started = None
            elif trigger is Trigger.STABILITY_RESTORED:
                if self._fire(s, trigger, reason, now):
                    s.security_failures = 0
                    s.last_failure = None
            else:
                self._fire(s, trigger, reason, now)
        if s.unacked is not None and now >= s.unacked_sent + STATE_UPDATE_RESEND_S:
            self._send_state_update(s, now)

    def next_deadline(self) -> float | None:
        times: list[float] = []
        for s in self.sessions.values():
            if s.machine.terminated:
                if s.tombstone_until is not None:
                    times.append(s.tombstone_until)
                continue
            pol = s.policy
            times.append(s.born + pol.max_lifetime_ms / 1000)
            if s.transportless_since is not None:
                times.append(s.transportless_since + pol.transport_lost_ttl_ms / 1000)
            if s.recovery_started is not None and s.machine.state is State.RECOVERING:
                # As in _session_timers: after RECOVERING -> DEGRADED it is not a deadline.
                times.append(s.recovery_started + pol.recovery_window_ms / 1000)
            if s.binding is not None:
                times.append(s.last_inbound + self.dead_after_s(s))
            if s.machine.state is State.DEGRADED and s.last_failure is not None:
                times.append(s.last_failure + pol.stability_window_ms / 1000)
            if s.unacked is not None:
                times.append(s.unacked_sent + STATE_UPDATE_RESEND_S)
            if s.cipher is not None:
                t = s.cipher.next_deadline()
                if t is not None:
                    times.append(t)
        t = self._drop_summary_due()
        if t is not None:
            times.append(t)
        return min(times) if times else None

    # == commands ==========================================================================
    def set_policy(self, policy: Policy | None, now: float, *, error: str | None = None) -> None:
        """Install a reloaded policy, or record that the reload was invalid (D14, seed §4).

        Valid: applies to new sessions and, strictly, to running ones (their events carry
        the new version). Invalid (``policy`` None): running sessions keep the last valid
        policy; new sessions are denied until a valid one arrives; POLICY_EVENT either way.
        """
        if policy is None:
            self.policy_error = error or "invalid policy"
            last_valid = self.policy
            self.policy = None
            self._last_valid = last_valid
            self.emit(
                PolicyEvent(
                    **self._base(None, now), policy_name="POLICY_INVALID",
                    reason_code=Reason.POLICY_INVALID, detail=self.policy_error,
                )
            )  # fmt: skip
            return
        self.policy = policy
        self.policy_error = None
        for s in self.sessions.values():
            if not s.machine.terminated:
                s.policy = policy
                s.machine.policy_version = policy.policy_version
                s.bucket.rate, s.bucket.burst = policy.reattach_rate_per_s, policy.reattach_burst
        self.emit(
            PolicyEvent(
                **self._base(None, now), policy_name="POLICY_APPLIED",
                reason_code=Reason.POLICY_APPLIED,
            )
        )  # fmt: skip

    @property
    def accepting(self) -> bool:
        """False while no valid policy is loaded (new sessions are denied)."""
        return self.policy is not None

    def terminate(
        self, session_id: str, now: float, reason: Reason = Reason.OPERATOR_TERMINATED
    ) -> bool:
        for s in self.sessions.values():
            if s.machine.session_id == session_id and not s.machine.terminated:
                self._terminate(s, reason, now)
                return True
        return False

    def terminate_all(self, now: float, reason: Reason = Reason.OPERATOR_TERMINATED) -> None:
        for s in list(self.sessions.values()):
            self._terminate(s, reason, now)

    # == outputs ===========================================================================
    def datagrams_to_send(self) -> list[tuple[Addr, bytes]]:
        out, self._out = self._out, []
        return out

    def packets_for_tun(self) -> list[bytes]:
        out, self._tun = self._tun, []
        return out

    def events(self) -> list[Event]:
        out: list[Event] = []
        while (ev := self.next_event()) is not None:
            out.append(ev)
        return out

    def session_views(self, now: float) -> list[SessionView]:
        return [
            SessionView(
                session_id=s.machine.session_id, client=s.client.name, state=str(s.machine.state),
                state_version=s.machine.version, binding_epoch=s.epoch,
                binding=addr_label(s.binding) if s.binding is not None else "-",
                policy_version=s.machine.policy_version, age_s=now - s.born,
                security_failures=s.security_failures, total_switches=s.total_switches,
            )
            for s in self.sessions.values()
        ]  # fmt: skip
