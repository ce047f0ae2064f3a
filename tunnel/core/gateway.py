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

The machine is split by concern; this module composes it and re-exports its names:
- gateway_session.py: ``GatewaySession`` (the record), ``ClientEntry``, ``TokenBucket``,
  ``SessionView`` and ``_GatewayBase`` (send, fire, STATE_UPDATE, terminate, tombstone);
- gateway_handshake.py: INIT -> RESP, cookies, handshake rate limiting (``_HandshakeMixin``);
- gateway_binding.py: path validation, NAT rebinding, resume, reattach (``_BindingMixin``);
- here: ``GatewaySessions`` with the inputs (datagram dispatch, TUN), timers, commands and
  outputs.
"""

from __future__ import annotations

import random
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence

from tunnel.core.aead import KeyExhausted
from tunnel.core.constants import (
    MAX_INNER_PACKET,
    MAX_STATE_VERSION,
    MSG_COOKIE_REPLY,
    MSG_DATA,
    MSG_HANDSHAKE_INIT,
    MSG_HANDSHAKE_RESP,
    TRANSPORT_HEADER,
)
from tunnel.core.cookie import CookieChecker
from tunnel.core.drops import Drop
from tunnel.core.events import (
    Event,
    KeyRotated,
    PolicyEvent,
    Reason,
    TransportDead,
    reason_from_wire,
)
from tunnel.core.gateway_binding import (
    AMPLIFICATION_FACTOR,
    CHALLENGE_RESEND_S,
    KIND_REASON,
    _BindingMixin,
)
from tunnel.core.gateway_handshake import (
    COOKIE_LOAD_FRACTION,
    COOKIE_REPLY_BURST,
    COOKIE_REPLY_RATE,
    HANDSHAKE_BURST,
    HANDSHAKE_RATE,
    MAX_INIT_SOURCES,
    SOURCE_INIT_BURST,
    SOURCE_INIT_RATE,
    _HandshakeMixin,
)
from tunnel.core.gateway_session import (
    MAX_CHALLENGES,
    MAX_VALIDATED,
    STATE_UPDATE_RESEND_S,
    STATE_UPDATE_SENDS,
    TOMBSTONE_ANSWER_S,
    TOMBSTONE_S,
    Addr,
    ClientEntry,
    GatewaySession,
    SessionView,
    TokenBucket,
    addr_label,
)
from tunnel.core.handshake import Responder, public_key
from tunnel.core.policy import Policy
from tunnel.core.session import State, Trigger, most_urgent
from tunnel.core.wire import (
    STATE_CODES,
    Control,
    PathResponse,
    Probe,
    ProbeAck,
    ReattachRequest,
    Rekey,
    StateAck,
    Terminate,
    parse_control,
    parse_header,
)

__all__ = [
    "AMPLIFICATION_FACTOR",
    "CHALLENGE_RESEND_S",
    "COOKIE_LOAD_FRACTION",
    "COOKIE_REPLY_BURST",
    "COOKIE_REPLY_RATE",
    "HANDSHAKE_BURST",
    "HANDSHAKE_RATE",
    "KIND_REASON",
    "MAX_CHALLENGES",
    "MAX_INIT_SOURCES",
    "MAX_VALIDATED",
    "SOURCE_INIT_BURST",
    "SOURCE_INIT_RATE",
    "STATE_UPDATE_RESEND_S",
    "STATE_UPDATE_SENDS",
    "TOMBSTONE_ANSWER_S",
    "TOMBSTONE_S",
    "Addr",
    "ClientEntry",
    "GatewaySession",
    "GatewaySessions",
    "SessionView",
    "TokenBucket",
    "addr_label",
]


class GatewaySessions(_HandshakeMixin, _BindingMixin):
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
        self._init_sources: OrderedDict[Hashable, TokenBucket] = OrderedDict()
        self._out: list[tuple[Addr, bytes]] = []
        self._tun: list[bytes] = []
        self._policy_base_version = policy.policy_version if policy else "invalid"

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
