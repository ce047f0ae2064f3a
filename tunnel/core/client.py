"""ClientSession: the client protocol machine (sans-I/O).

Inputs: ``connect(now)``, ``receive_datagram(data, path_id, now)``,
``receive_tun_packet(packet, now)``, ``handle_timer(now)`` and the operator commands
(``switch_to``, ``set_auto_switch``, ``force_reattach``, ``terminate``, ``apply_policy``).
Outputs are pulled: ``datagrams_to_send()`` -> [(path_id, bytes)], ``packets_for_tun()``,
``next_event()``, and one ``next_deadline()`` for the driver's single timer.

The client keeps every candidate path probed (PathHealth), carries data on exactly one
active path, and changes it only through a REATTACH_REQUEST the gateway acknowledges:
- hard death of the active path: ATTACHED/VOLATILE/DEGRADED -> RECOVERING, then reattach
  on the best live candidate -> ATTACHED (T04/T05/T08, T10);
- quality trouble: ATTACHED -> VOLATILE; with auto-switch, a candidate that beats the
  active path by the hysteresis factor for the dwell time gets a proactive switch, one
  versioned rebind VOLATILE -> ATTACHED (R2); otherwise DEGRADED after volatile_to_degraded;
- operator switch: a versioned rebind (R1-R3), exempt from cooldown, counted in the budget.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
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
)
from tunnel.core.cookie import CookieJar
from tunnel.core.drops import Drop
from tunnel.core.endpoint import EndpointBase
from tunnel.core.events import (
    Diagnostic,
    Event,
    EventBase,
    KeyRotated,
    PathHealthChanged,
    PathValidated,
    PeerState,
    PolicyEvent,
    Reason,
    ReattachAttempt,
    ReattachResult,
    SessionCreated,
    TransportAttached,
    TransportDead,
    TransportSwitch,
    TransportSwitchDenied,
    reason_from_wire,
    reason_to_wire,
)
from tunnel.core.handshake import HandshakeError, Initiator
from tunnel.core.health import PathHealth, PathStats, path_score
from tunnel.core.policy import Policy
from tunnel.core.selection import HoldDown, Selector, SwitchLimiter, best_candidate
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
    split_handshake,
)

RETRYABLE_REJECTS = frozenset(
    {Reason.STALE_BINDING_EPOCH, Reason.PATH_NOT_VALIDATED, Reason.RATE_LIMITED}
)
"""Rejects that say 'try again' (with the epoch the reject carries), not 'you failed'."""

PROACTIVE_ATTEMPTS = 4
"""Sends of one proactive/manual request before the candidate is given up."""

RECOVERY_ATTEMPTS_PER_PATH = 3
"""Sends of one recovery request on one candidate before another candidate is tried."""

STANDBY_LIVENESS_INTERVALS = 2
"""A standby path stays live while answered within this many standby probe intervals."""

TERMINATE_COPIES = 2
"""TERMINATE is sent this many times on each live path: best effort, it is not acked."""

SUSPECT_AFTER = 1.5
"""The active path is suspect once silent for this many probe intervals ..."""

SUSPECT_PROBE_SPEEDUP = 8
"""... and is then probed this many times faster until it answers (robust death: 10 %
loss each way leaves ~3 lost round trips in a row common, ~8 practically never)."""

SUSPECT_PROBE_MIN_S = 0.01
"""Suspicion probing is never faster than this (the policy's probe_interval floor)."""

ONE_WAY_LOSS_MARGIN = 0.05
"""Loss in one direction (PROBE_ACK ``rx_probes``) is judged against the policy threshold
plus this margin: a 3 s window holds ~30 probes, whose estimate of 10 % loss has a standard
error of ~0.055. Measured in the simulator over 30 seeds at the default policy: 30 % loss
one way switches 29/30 within 6 s (17/30 judged by round trips alone), 10 % one way or
each way stays ATTACHED 29/30 (a margin of 0: 26/30 and 19/30)."""


@dataclass(frozen=True, slots=True)
class PathSpec:
    """A candidate transport as the core sees it: an id and a human label."""

    path_id: int
    label: str


class _Path:
    __slots__ = ("health", "holddown", "next_probe", "spec", "validated", "was_alive")

    def __init__(self, spec: PathSpec, policy: Policy, now: float) -> None:
        self.spec = spec
        self.health = _health(spec.path_id, policy, now)
        self.holddown = HoldDown(policy.failed_path_holddown_ms)
        self.validated = False
        self.next_probe = now
        self.was_alive = False


def _health(path_id: int, policy: Policy, now: float) -> PathHealth:
    return PathHealth(
        path_id,
        loss_window_ms=policy.loss_window_ms,
        dead_min_ms=policy.dead_min_ms,
        dead_rtt_multiplier=policy.dead_rtt_multiplier,
        min_loss_samples=policy.min_loss_samples,
        now=now,
    )


@dataclass(slots=True)
class _Pending:
    """One REATTACH_REQUEST in flight."""

    path_id: int
    nonce: int
    kind: ReattachKind
    reason: Reason
    started: float
    last_sent: float
    sends: int
    previous: int | None


@dataclass(frozen=True, slots=True)
class PathView:
    stats: PathStats
    label: str
    role: str
    validated: bool


@dataclass(frozen=True, slots=True)
class ClientSnapshot:
    """Immutable view for the UI and tests; no secrets."""

    session_id: str
    state: str
    state_version: int
    binding_epoch: int
    peer_state: str
    peer_state_version: int
    active: int | None
    pending: int | None
    paths: tuple[PathView, ...]
    auto_switch: bool
    switch_budget_left: int
    cooldown_remaining_ms: float
    key_phase: int
    key_age_s: float
    policy_version: str
    uptime_s: float
    queue_depth: int
    queue_dropped: int
    total_switches: int
    drops: tuple[tuple[str, int], ...]
    inner_address: str


class ClientSession(EndpointBase):
    def __init__(
        self,
        *,
        static_private: bytes,
        gateway_public: bytes,
        paths: Sequence[PathSpec],
        policy: Policy,
        now: float,
        rng: random.Random | None = None,
        node_id: str = "client",
        wall_offset: float = 0.0,
        max_version: int = MAX_STATE_VERSION,
    ) -> None:
        super().__init__(node_id=node_id, wall_offset=wall_offset, now=now)
        if not paths:
            raise ValueError("a client needs at least one path")
        if len({p.path_id for p in paths}) != len(paths):
            raise ValueError("path ids must be unique")
        if len(paths) > policy.max_candidate_count:
            raise ValueError(
                f"{len(paths)} paths configured, policy allows {policy.max_candidate_count}"
            )
        self.policy = policy
        self._static = static_private
        self._gateway_public = gateway_public
        self._rng = rng or random.Random()
        self._paths: dict[int, _Path] = {p.path_id: _Path(p, policy, now) for p in paths}
        self._order = [p.path_id for p in paths]
        self.machine = SessionMachine(
            node_id=node_id,
            policy_version=policy.policy_version,
            emit=self.emit,
            max_version=max_version,
        )
        self.limiter = SwitchLimiter(policy.max_switches_per_min, policy.switch_cooldown_ms)
        self.selector = Selector(policy.switch_improvement_factor, policy.switch_dwell_ms)
        self.auto_switch = True
        self.index = self._rng.getrandbits(32) or 1
        self.peer_index = 0
        self.cipher: SessionCipher | None = None
        self.active: int | None = None
        self.epoch = 0
        self.peer_state = "BIRTH"
        self.peer_version = 0
        self.inner_address = ""
        self.inner_prefix = 0
        self.inner_gateway = ""
        self.mtu = 1420
        self.advertised: tuple[tuple[str, int], ...] = ()
        self.total_switches = 0
        self._out: list[tuple[int, bytes]] = []
        self._tun: list[bytes] = []
        self._queue: deque[bytes] = deque()
        self._queue_bytes = 0
        self.queue_dropped = 0
        self._initiator: Initiator | None = None
        self._hs_sends = 0
        self._hs_next: float | None = None
        self._hs_deadline: float | None = None
        self._cookies = CookieJar(gateway_public)
        self._hs_body: bytes | None = None
        """The last INIT without its MACs, resent with mac2 once when a cookie arrives."""
        self._cookie_retried = False
        self._born = now
        self._started = now
        self._transportless_since: float | None = now
        self._recovery_started: float | None = None
        self._death_at: float | None = None
        self._volatile_since: float | None = None
        self._degraded_since: float | None = None
        self._stable_since: float | None = None
        self._pending: _Pending | None = None
        self._nonce = 0
        self._last_acked_nonce = 0
        self._state_seq = 0
        self._probe_seq = 0
        self._denied_once: set[Reason] = set()
        self._excluded: set[int] = set()
        self._previous_dead: int | None = None
        self._timer_now = now

    # == helpers ===========================================================================
    @property
    def state(self) -> State:
        return self.machine.state

    def _base(self, now: float) -> EventBase:
        return self.machine.base(self.ts_ms(now))

    def _fire(self, trigger: Trigger, reason: Reason, now: float, **fields: Any) -> bool:
        if trigger is Trigger.TERMINATE:
            fields.setdefault("session_age_ms", (now - self._born) * 1000)
            fields.setdefault("transportless_age_ms", self._transportless_ms(now))
            fields.setdefault("total_switches", self.total_switches)
        ok = self.machine.fire(trigger, reason, self.ts_ms(now), **fields)
        if self.machine.terminated:
            self._on_terminated()
        return ok

    def _transportless_ms(self, now: float) -> float:
        if self._transportless_since is None:
            return 0.0
        return (now - self._transportless_since) * 1000

    def _send_control(self, path_id: int, msg: Control) -> None:
        if self.cipher is None:
            return
        try:
            self._out.append(
                (path_id, self.cipher.seal(MSG_CONTROL, self.peer_index, pack_control(msg)))
            )
        except KeyExhausted:
            self.count_drop(Drop.KEY_EXHAUSTED)

    def _live(self, path_id: int, now: float) -> bool:
        """Validated and answering. The active path (and every path while none is active)
        is probed fast and dies by silence (D5); a standby path is probed slowly, so it is
        live while its last probes were answered within a few standby intervals."""
        p = self._paths[path_id]
        if not p.validated:
            return False
        if path_id == self.active or self.active is None:
            return not p.health.is_dead(now)
        last = p.health.last_inbound
        window = STANDBY_LIVENESS_INTERVALS * self.policy.standby_probe_interval_ms / 1000
        return (
            last is not None
            and now - last <= window + p.health.dead_after_ms() / 1000
            and p.health.consecutive_misses < self.policy.max_consecutive_drops
        )

    def _eligible(self, now: float, exclude: int | None = None) -> list[int]:
        return [
            pid
            for pid in self._order
            if pid != exclude and pid not in self._excluded and self._live(pid, now)
        ]

    def _targets(self, now: float, exclude: int | None = None) -> list[int]:
        """Eligible paths that are not held down after a recent failure (anti-flap)."""
        return [
            pid for pid in self._eligible(now, exclude) if not self._paths[pid].holddown.held(now)
        ]

    def _scores(self, now: float) -> dict[int, float]:
        return {pid: self._score(pid, now) for pid in self._paths}

    def _score(self, path_id: int, now: float) -> float:
        """The path's score, 0.0 unless :meth:`_live`. A standby path is judged by the
        standby liveness rule: its fast-probe death timer (``PathHealth.score``) runs out
        between two slow standby probes, which would make every standby score 0.0."""
        h = self._paths[path_id].health
        if not self._live(path_id, now):
            return 0.0
        return path_score(h.loss_ratio(now), h.srtt_ms, h.jitter_ms)

    def _stats(self, path_id: int, now: float) -> PathStats:
        """``PathHealth.stats`` with ``alive`` and ``score`` as the session judges them."""
        stats = self._paths[path_id].health.stats(now)
        return replace(stats, alive=self._live(path_id, now), score=self._score(path_id, now))

    def _classify(self, path_id: int, now: float) -> str | None:
        pol = self.policy
        # Probes measure round trips: loss p each way loses 1 - (1 - p)^2 of them. The
        # policy threshold is per packet (SPEC 8.1), so compare like with like: 10 % each
        # way (19 % of round trips) stays below 0.20 (36 % of round trips). Loss in one
        # direction only is judged on its own, from the gateway's probe counts.
        round_trip_threshold = 1.0 - (1.0 - pol.loss_volatile_threshold) ** 2
        return self._paths[path_id].health.classify(
            now,
            loss_threshold=round_trip_threshold,
            max_consecutive_drops=pol.max_consecutive_drops,
            latency_threshold_ms=pol.latency_volatile_threshold_ms,
            one_way_threshold=pol.loss_volatile_threshold + ONE_WAY_LOSS_MARGIN,
        )

    # == inputs ============================================================================
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

    def receive_datagram(self, data: bytes, path_id: int, now: float) -> None:
        if path_id not in self._paths:
            raise ValueError(f"unknown path id {path_id}")
        if self.machine.terminated:
            self.count_drop(Drop.WRONG_STATE)
            return
        header = parse_header(data)
        if isinstance(header, Drop):
            self.count_drop(header)
            return
        if header.msg_type == MSG_HANDSHAKE_RESP:
            self._on_handshake_response(data, header.receiver_index, path_id, now)
            return
        if header.msg_type == MSG_COOKIE_REPLY:
            self._on_cookie_reply(data, header.receiver_index, path_id, now)
            return
        if header.msg_type == MSG_HANDSHAKE_INIT or self.cipher is None:
            self.count_drop(Drop.WRONG_STATE)
            return
        if header.receiver_index != self.index:
            self.count_drop(Drop.UNKNOWN_SESSION)
            return
        phase_before = self.cipher.phase
        plaintext = self.cipher.open(data, now)
        if isinstance(plaintext, Drop):
            self._on_bad_packet(plaintext, path_id, now)
            return
        if self.cipher.phase != phase_before:
            self.emit(KeyRotated(**self._base(now), key_phase=self.cipher.phase, initiator="peer"))
        path = self._paths[path_id]
        path.health.inbound(now)
        if header.msg_type == MSG_DATA:
            if not plaintext or plaintext[0] >> 4 not in (4, 6):
                self.count_drop(Drop.MALFORMED)
                return
            self._tun.append(plaintext)
            return
        msg = parse_control(plaintext)
        if isinstance(msg, Drop):
            self.count_drop(msg)
            return
        self._on_control(msg, path_id, now)

    def _on_bad_packet(self, drop: Drop, path_id: int, now: float) -> None:
        self.count_drop(drop)
        if drop is Drop.BAD_TAG:
            self._security(
                now, self._base(now), "INVALID_PROOF", Reason.BAD_PROOF, transport_id=path_id
            )
        elif drop is Drop.REPLAY:
            self._security(
                now, self._base(now), "REPLAY_DETECTED", Reason.REPLAY_DETECTED,
                transport_id=path_id,
            )  # fmt: skip

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

    def _mark_validated(self, path_id: int, now: float) -> None:
        path = self._paths[path_id]
        if not path.validated:
            path.validated = True
            self.emit(PathValidated(**self._base(now), path=path.spec.label, transport_id=path_id))

    # -- control messages ------------------------------------------------------------------
    def _on_control(self, msg: Control, path_id: int, now: float) -> None:
        if isinstance(msg, ProbeAck):
            self._paths[path_id].health.probe_acked(msg.probe_id, now, msg.rx_probes)
            self._mark_validated(path_id, now)
            self._peer_view(STATE_CODES[msg.gw_state], self.peer_version, msg.epoch, now)
        elif isinstance(msg, PathChallenge):
            self._send_control(path_id, PathResponse(msg.token))
        elif isinstance(msg, ReattachAck):
            self._on_reattach_ack(msg, path_id, now)
        elif isinstance(msg, ReattachReject):
            self._on_reattach_reject(msg, now)
        elif isinstance(msg, StateUpdate):
            self._send_control(path_id, StateAck(msg.seq))
            if msg.seq <= self._state_seq:
                return
            self._state_seq = msg.seq
            if msg.gw_version < self.peer_version:
                self.emit(
                    Diagnostic(
                        **self._base(now),
                        reason_code=Reason.STALE_STATE_VERSION,
                        detail=(
                            f"gateway state update v{msg.gw_version} < known v{self.peer_version}"
                        ),
                        state=str(self.state),
                    )
                )
                return
            self._peer_view(STATE_CODES[msg.gw_state], msg.gw_version, msg.epoch, now)
        elif isinstance(msg, Terminate):
            reason = reason_from_wire(msg.reason) or Reason.PEER_TERMINATED
            self._fire(Trigger.TERMINATE, reason, now, initiator="peer")
        elif isinstance(msg, Rekey):
            pass  # the key phase change itself was handled by SessionCipher.open
        else:
            self.count_drop(Drop.UNKNOWN_TYPE)

    def _peer_view(self, state: str, version: int, epoch: int, now: float) -> None:
        changed = state != self.peer_state or version != self.peer_version
        if epoch > self.epoch:
            self.epoch = epoch
            changed = True
        self.peer_state, self.peer_version = state, max(version, self.peer_version)
        if changed:
            self.emit(
                PeerState(
                    **self._base(now),
                    peer_state=state,
                    peer_state_version=self.peer_version,
                    binding_epoch=self.epoch,
                )
            )
        if state == "TERMINATED":
            self._fire(Trigger.TERMINATE, Reason.PEER_TERMINATED, now, initiator="peer")
        elif (
            state == "RECOVERING"
            and self.active is not None
            and self._pending is None
            and self._live(self.active, now)
        ):
            # The gateway lost our binding while our path works: re-assert it (D3).
            self._start_reattach(self.active, ReattachKind.RESUME, Reason.TRANSPORT_RESUMED, now)

    def _on_reattach_ack(self, msg: ReattachAck, path_id: int, now: float) -> None:
        pending = self._pending
        if pending is None or msg.nonce != pending.nonce:
            if msg.nonce and msg.nonce == self._last_acked_nonce:
                return  # a duplicate ACK of a retransmitted request
            self.count_drop(Drop.WRONG_STATE)
            if self._superseded(msg.nonce):
                return  # authentic answer to a request we gave up: late, not an attack
            self._security(
                now, self._base(now), "UNEXPECTED_RESPONSE", Reason.UNEXPECTED_RESPONSE,
                transport_id=path_id,
            )  # fmt: skip
            return
        if msg.gw_version < self.peer_version:
            self.count_drop(Drop.WRONG_STATE)
            self._security(
                now, self._base(now), "STALE_RESPONSE", Reason.STALE_STATE_VERSION,
                transport_id=path_id,
            )  # fmt: skip
            return
        self._pending = None
        self._last_acked_nonce = msg.nonce
        self.epoch = msg.epoch
        self.peer_state, self.peer_version = STATE_CODES[msg.gw_state], msg.gw_version
        new = pending.path_id
        if pending.kind is ReattachKind.RESUME:
            self.emit(
                PeerState(
                    **self._base(now),
                    peer_state=self.peer_state,
                    peer_state_version=self.peer_version,
                    binding_epoch=self.epoch,
                )
            )
            return
        recovering = self.state is State.RECOVERING
        if recovering:
            latency_from = self._death_at if self._death_at is not None else pending.started
            ok = self._fire(Trigger.REATTACH_OK, Reason.REATTACH_SUCCESS, now)
        else:
            latency_from = pending.started
            ok = self._fire(Trigger.REBIND, pending.reason, now)
        if not ok:
            return
        previous = self.active if self.active is not None else pending.previous
        self.active = new
        self._transportless_since = None
        self._recovery_started = self._death_at = None
        self._volatile_since = self._degraded_since = self._stable_since = None
        self._excluded.clear()
        self._denied_once.clear()
        self.selector.reset()
        if new != previous:
            # Re-attaching the path that was declared dead is not a transport switch (the
            # gateway's binding never moved): it must not spend the switch budget.
            self.limiter.record(now)
            self.total_switches += 1
        stats = self._paths[new].health.stats(now)
        # The ACK is a round trip on ``new``: what it lost before (its death, if it is the
        # path that died) says nothing about it now, and must not make it VOLATILE.
        self._paths[new].health.reset_loss()
        base = self._base(now)
        self.emit(
            TransportSwitch(
                **base,
                previous_transport=previous,
                new_transport=new,
                reason_code=Reason.REATTACH_SUCCESS if recovering else pending.reason,
                switch_latency_ms=round((now - latency_from) * 1000, 3),
                binding_epoch=self.epoch,
                candidate_count=len(self._eligible(now)),
                loss_ratio=stats.loss_ratio,
                latency_estimate_ms=stats.srtt_ms,
                path=self._paths[new].spec.label,
            )
        )
        self.emit(
            ReattachResult(
                **base, status="SUCCESS", reason_code=Reason.REATTACH_SUCCESS,
                candidate_transport=new, path=self._paths[new].spec.label,
            )
        )  # fmt: skip
        self._paths[new].next_probe = now
        self._flush_queue()

    def _superseded(self, nonce: int) -> bool:
        """A nonce we sent that is no longer pending: its answer (authentic, it opened under
        the session keys) arrives after a newer request replaced it, e.g. reordered (AT-47)."""
        pending = self._pending
        return 0 < nonce <= self._nonce and (pending is None or nonce < pending.nonce)

    def _on_reattach_reject(self, msg: ReattachReject, now: float) -> None:
        pending = self._pending
        if pending is None or msg.nonce != pending.nonce:
            self.count_drop(Drop.WRONG_STATE)
            if not self._superseded(msg.nonce):
                self._security(
                    now, self._base(now), "UNEXPECTED_RESPONSE", Reason.UNEXPECTED_RESPONSE
                )
            return
        reason = reason_from_wire(msg.reason) or Reason.REATTACH_VALIDATION_FAILED
        if msg.epoch > self.epoch:
            self.epoch = msg.epoch
        if reason in RETRYABLE_REJECTS and not msg.fatal:
            if reason is Reason.STALE_BINDING_EPOCH:
                # Same candidate, fresh nonce, the epoch the gateway just told us.
                self._pending = None
                self._start_reattach(pending.path_id, pending.kind, pending.reason, now)
            return  # others: the retransmit timer tries again
        self._pending = None
        self.emit(
            ReattachResult(
                **self._base(now), status="DENIED", reason_code=reason,
                candidate_transport=pending.path_id, fatal=bool(msg.fatal),
                path=self._paths[pending.path_id].spec.label,
            )
        )  # fmt: skip
        if msg.fatal:
            self._fire(Trigger.TERMINATE, reason, now, initiator="peer")
            return
        self.emit(
            TransportSwitchDenied(
                **self._base(now), reason_code=reason, requested_transport=pending.path_id,
                manual=pending.kind is ReattachKind.MANUAL,
            )
        )  # fmt: skip
        if self.state is State.RECOVERING:
            self._enter_degraded(Reason.REATTACH_VALIDATION_FAILED, now)

    # -- data ------------------------------------------------------------------------------
    def receive_tun_packet(self, packet: bytes, now: float) -> None:
        """An inner IP packet to carry. Waits in a bounded queue while no path is active."""
        if not packet or len(packet) > MAX_INNER_PACKET:
            self.count_drop(Drop.OVERSIZED if packet else Drop.TRUNCATED)
            return
        if self.machine.terminated:
            self.count_drop(Drop.WRONG_STATE)
            return
        if self.active is not None and self.cipher is not None:
            try:
                self._out.append((self.active, self.cipher.seal(MSG_DATA, self.peer_index, packet)))
            except KeyExhausted:
                self.count_drop(Drop.KEY_EXHAUSTED)
            return
        if (
            len(self._queue) >= self.policy.outbound_queue_packets
            or self._queue_bytes + len(packet) > self.policy.outbound_queue_bytes
        ):
            self.queue_dropped += 1
            return
        self._queue.append(packet)
        self._queue_bytes += len(packet)

    def _flush_queue(self) -> None:
        queue, self._queue, self._queue_bytes = self._queue, deque(), 0
        for packet in queue:
            self.receive_tun_packet(packet, 0.0)

    # == timers ============================================================================
    def handle_timer(self, now: float) -> None:
        self._timer_now = max(self._timer_now, now)
        if self.machine.terminated:
            return
        if self.state is State.BIRTH:
            self._handshake_timer(now)
            return
        for p in self._paths.values():
            p.health.expire(now)
        for _ in range(4):  # a few chained transitions per tick at most; the rest next tick
            if self.machine.terminated or not self._state_timers(now):
                break
        if self.machine.terminated:
            return
        self._health_events(now)
        self._recovery_actions(now)
        self._switch_actions(now)
        self._pending_timer(now)
        self._probe_timer(now)
        self._rekey_timer(now)
        if self.cipher is not None:
            self.cipher.discard_expired(now)
        self._maybe_drop_summary(now, self._base(now))

    def _handshake_timer(self, now: float) -> None:
        if self._hs_deadline is not None and now >= self._hs_deadline:
            self._fire(Trigger.TERMINATE, Reason.HANDSHAKE_FAILED, now)
        elif self._hs_next is not None and now >= self._hs_next:
            self._send_handshake(now)

    def _state_timers(self, now: float) -> bool:
        """Evaluate every timed trigger; apply the most urgent (AT-08). True if one fired."""
        pol = self.policy
        st = self.state
        found: list[tuple[Trigger, Reason]] = []
        if now >= self._born + pol.max_lifetime_ms / 1000:
            found.append((Trigger.TERMINATE, Reason.SESSION_LIFETIME_EXCEEDED))
        if (
            self._transportless_since is not None
            and now >= self._transportless_since + pol.transport_lost_ttl_ms / 1000
        ):
            found.append((Trigger.TERMINATE, Reason.TRANSPORT_TTL_EXCEEDED))
        if (
            st is State.RECOVERING
            and self._recovery_started is not None
            and now >= self._recovery_started + pol.recovery_window_ms / 1000
        ):
            trig = Trigger.TERMINATE if pol.on_recovery_timeout == "terminate" else Trigger.DEGRADE
            found.append((trig, Reason.RECOVERY_WINDOW_EXCEEDED))
        if (
            st is State.DEGRADED
            and pol.degraded_terminate_after_ms is not None
            and self._degraded_since is not None
            and now >= self._degraded_since + pol.degraded_terminate_after_ms / 1000
        ):
            found.append((Trigger.TERMINATE, Reason.DEGRADED_TIMEOUT))
        active = self.active
        if active is not None and self._paths[active].health.is_dead(now):
            found.append((Trigger.TRANSPORT_DEAD, Reason.TRANSPORT_DEAD))
        elif active is not None:
            verdict = self._classify(active, now)
            if verdict is None:
                self._stable_since = self._stable_since if self._stable_since else now
            else:
                self._stable_since = None
            if st is State.ATTACHED and verdict is not None:
                found.append((Trigger.INSTABILITY, Reason(verdict)))
            elif (
                st in (State.VOLATILE, State.DEGRADED)
                and self._stable_since is not None
                and now >= self._stable_since + pol.stability_window_ms / 1000
            ):
                found.append((Trigger.STABILITY_RESTORED, Reason.STABILITY_RESTORED))
            if (
                st is State.VOLATILE
                and self._volatile_since is not None
                and now >= self._volatile_since + pol.volatile_to_degraded_ms / 1000
            ):
                found.append((Trigger.DEGRADE, Reason.VOLATILE_PERSISTED))
        chosen = most_urgent(found)
        if chosen is None:
            return False
        trigger, reason = chosen
        if trigger is Trigger.TRANSPORT_DEAD:
            self._on_transport_dead(now)
        elif trigger is Trigger.INSTABILITY:
            if self._fire(trigger, reason, now):
                self._volatile_since = now
                self._stable_since = None
                self.selector.reset()
        elif trigger is Trigger.DEGRADE:
            self._enter_degraded(reason, now)
        elif trigger is Trigger.STABILITY_RESTORED:
            if self._fire(trigger, reason, now):
                self._volatile_since = self._degraded_since = None
                self._excluded.clear()
                self._denied_once.clear()
        else:
            self._fire(trigger, reason, now)
        return True

    def _on_transport_dead(self, now: float) -> None:
        dead = self.active
        assert dead is not None
        path = self._paths[dead]
        last = path.health.last_inbound
        silence = (now - last) * 1000 if last is not None else 0.0
        self.emit(TransportDead(**self._base(now), transport_id=dead, silence_ms=round(silence, 3)))
        candidates = self._eligible(now, exclude=dead)
        if self._fire(
            Trigger.TRANSPORT_DEAD, Reason.TRANSPORT_DEAD, now,
            from_transport=dead, candidate_set_size=len(candidates),
        ):  # fmt: skip
            self.active = None
            if self._pending is not None and self._pending.kind is ReattachKind.RESUME:
                self._pending = None
            self._death_at = now
            self._recovery_started = now
            self._transportless_since = now
            self._volatile_since = self._degraded_since = self._stable_since = None
            self._denied_once.clear()
            self._previous_dead = dead

    def _enter_degraded(self, reason: Reason, now: float) -> None:
        persisted = self.state is State.VOLATILE and reason is Reason.VOLATILE_PERSISTED
        if self._fire(Trigger.DEGRADE, reason, now):
            self._degraded_since = now
            self._volatile_since = None
            # The recovery round is over: a candidate that did not answer in it may be
            # tried again (else a transportless DEGRADED session waits for its TTL).
            self._excluded.clear()
            if persisted and self.auto_switch and not self._passing_candidate(now):
                # SPEC 8.3 / AT-28: nothing passed the filters during VOLATILE. Once per
                # entry into DEGRADED (this transition), never per tick.
                self._deny(Reason.NO_VALID_CANDIDATE, None, now)

    def _passing_candidate(self, now: float) -> bool:
        """Some live candidate beats the active path by the hysteresis factor right now."""
        scores = self._scores(now)
        best = best_candidate(scores, self._targets(now, exclude=self.active))
        if best is None:
            return False
        active = scores.get(self.active, 0.0) if self.active is not None else 0.0
        return scores[best] > self.policy.switch_improvement_factor * active

    def _health_events(self, now: float) -> None:
        for pid in self._order:
            p = self._paths[pid]
            alive = self._live(pid, now)
            if alive != p.was_alive:
                p.was_alive = alive
                if alive:
                    p.holddown.recovered(now)
                elif p.health.consecutive_misses > 0 or pid == self._previous_dead:
                    # A real failure (probes went unanswered, or it died as the active
                    # path), not merely the stricter liveness rule of "no active path".
                    p.holddown.failed(now)
                stats = self._stats(pid, now)
                self.emit(
                    PathHealthChanged(
                        **self._base(now),
                        transport_id=pid,
                        alive=alive,
                        classification=self._classify(pid, now) or "healthy",
                        rtt_ms=stats.srtt_ms,
                        loss_ratio=stats.loss_ratio,
                        loss_up=round(stats.loss_up, 4),
                        loss_down=round(stats.loss_down, 4),
                        score=stats.score,
                    )
                )

    def _deny(
        self, reason: Reason, requested: int | None, now: float, *, manual: bool = False
    ) -> None:
        retry = self.limiter.next_change(now)
        self.emit(
            TransportSwitchDenied(
                **self._base(now), reason_code=reason, requested_transport=requested,
                manual=manual,
                retry_after_ms=None if retry is None else round((retry - now) * 1000, 3),
            )
        )  # fmt: skip

    def _recovery_actions(self, now: float) -> None:
        st = self.state
        if st is State.RECOVERING and self._pending is None:
            dead = self._previous_dead
            candidates = self._eligible(now)
            # Anti-flap: prefer paths not held down after a failure; a held one is still
            # better than none (transport death must not become session death).
            choice = best_candidate(self._scores(now), self._targets(now) or candidates)
            if choice is None:
                if Reason.NO_VALID_CANDIDATE not in self._denied_once:
                    self._denied_once.add(Reason.NO_VALID_CANDIDATE)
                    self._deny(Reason.NO_VALID_CANDIDATE, dead, now)
                return
            # Hard-death recovery is exempt from the cooldown (a dead path must be replaced)
            # but never from the per-minute cap (an invariant). Resuming the path that died
            # is not a switch, so it stays possible with the budget spent.
            if self.limiter.check(now, manual=True) is not None:
                if dead in candidates:
                    self._start_reattach(
                        dead, ReattachKind.RECOVERY, Reason.DEAD_TRANSPORT_RECOVERY, now
                    )
                    return
                self._deny(Reason.SWITCH_RATE_LIMITED, choice, now)
                self._enter_degraded(Reason.SWITCH_RATE_LIMITED, now)
                return
            self._start_reattach(choice, ReattachKind.RECOVERY, Reason.DEAD_TRANSPORT_RECOVERY, now)
        elif st is State.DEGRADED and self.active is None and self._pending is None:
            candidates = self._eligible(now)
            if candidates and (
                self.limiter.check(now, manual=True) is None or self._previous_dead in candidates
            ):
                if self._fire(Trigger.RECOVERY_RETRY, Reason.RECOVERY_RETRY, now):
                    self._recovery_started = now
                    self._degraded_since = None

    def _switch_actions(self, now: float) -> None:
        if (
            self.state is not State.VOLATILE
            or not self.auto_switch
            or self._pending is not None
            or self.active is None
        ):
            return
        choice = self.selector.evaluate(
            now, self.active, self._scores(now), self._targets(now, exclude=self.active)
        )
        if choice is None:
            return
        denied = self.limiter.check(now)
        if denied == "switch_rate_limited":
            self._deny(Reason.SWITCH_RATE_LIMITED, choice, now)
            self._enter_degraded(Reason.SWITCH_RATE_LIMITED, now)
            return
        if denied == "cooldown_active":
            if Reason.COOLDOWN_ACTIVE not in self._denied_once:
                self._denied_once.add(Reason.COOLDOWN_ACTIVE)
                self._deny(Reason.COOLDOWN_ACTIVE, choice, now)
            return
        verdict = self._classify(self.active, now)
        reason = (
            Reason.LATENCY_RECOVERY
            if verdict == Reason.LATENCY_THRESHOLD_EXCEEDED
            else Reason.LOSS_RECOVERY
        )
        self._start_reattach(choice, ReattachKind.PROACTIVE, reason, now)

    def _start_reattach(self, path_id: int, kind: ReattachKind, reason: Reason, now: float) -> None:
        self._nonce += 1
        self._pending = _Pending(
            path_id=path_id, nonce=self._nonce, kind=kind, reason=reason,
            started=now, last_sent=now, sends=0,
            previous=self.active if self.active is not None else self._previous_dead,
        )  # fmt: skip
        deadline = None
        if kind is ReattachKind.RECOVERY and self._recovery_started is not None:
            deadline = self.ts_ms(self._recovery_started + self.policy.recovery_window_ms / 1000)
        self.emit(
            ReattachAttempt(
                **self._base(now), candidate_transport=path_id, nonce=self._nonce,
                expected_epoch=self.epoch, kind=kind.name.lower(), recovery_deadline_ms=deadline,
            )
        )  # fmt: skip
        self._send_pending(now)

    def _send_pending(self, now: float) -> None:
        p = self._pending
        assert p is not None
        p.sends += 1
        p.last_sent = now
        self._send_control(
            p.path_id,
            ReattachRequest(
                nonce=p.nonce, ts_ms=self.ts_ms(now), expected_epoch=self.epoch,
                path_id=p.path_id, kind=int(p.kind), client_version=self.machine.version,
            ),
        )  # fmt: skip

    def _pending_timer(self, now: float) -> None:
        p = self._pending
        if p is None or now < p.last_sent + self.policy.reattach_retry_ms / 1000:
            return
        limit = (
            RECOVERY_ATTEMPTS_PER_PATH if p.kind is ReattachKind.RECOVERY else PROACTIVE_ATTEMPTS
        )
        if p.sends < limit and self._live(p.path_id, now):
            self._send_pending(now)
            return
        # This candidate did not answer: give it up (recovery tries the next one).
        self._pending = None
        if p.kind is ReattachKind.RECOVERY:
            self._excluded.add(p.path_id)
            if not self._eligible(now):
                self._excluded.clear()
        elif p.kind is not ReattachKind.RESUME:
            self._deny(
                Reason.NO_VALID_CANDIDATE, p.path_id, now, manual=p.kind is ReattachKind.MANUAL
            )

    def _probe_timer(self, now: float) -> None:
        pol = self.policy
        fast = pol.probe_interval_ms / 1000
        slow = pol.standby_probe_interval_ms / 1000
        for pid in self._order:
            p = self._paths[pid]
            if now < p.next_probe:
                continue
            self._probe_seq = (self._probe_seq + 1) & 0xFFFFFFFF
            p.health.probe_sent(self._probe_seq, now)
            self._send_control(pid, Probe(self._probe_seq, pid, self.ts_ms(now)))
            # The active path is probed fast (loss and death detection, D5); while no path
            # is active every path is, so a live candidate is found quickly.
            interval = fast if pid == self.active or self.active is None else slow
            last = p.health.last_inbound
            if pid == self.active and last is not None and now - last > SUSPECT_AFTER * fast:
                # Suspicion: the active path missed an answer. Probe faster so that only
                # real silence lasts until the dead timer (a few lost probes do not).
                interval = max(SUSPECT_PROBE_MIN_S, fast / SUSPECT_PROBE_SPEEDUP)
            p.next_probe = now + interval

    def _rekey_timer(self, now: float) -> None:
        cipher = self.cipher
        # Compare with the very deadline next_deadline() reports: now - born < rekey_after
        # can stay true at that deadline in floating point and spin the timer.
        if cipher is None or now < self._rekey_at():
            return
        if cipher.rekey(now):
            target = self.active if self.active is not None else self._order[0]
            self._send_control(target, Rekey(cipher.phase))
            self.emit(KeyRotated(**self._base(now), key_phase=cipher.phase, initiator="local"))

    def next_deadline(self) -> float | None:
        """The earliest ``now`` at which handle_timer has work. One timer for everything."""
        if self.machine.terminated:
            return None
        if self.state is State.BIRTH:
            pending = [t for t in (self._hs_next, self._hs_deadline) if t is not None]
            return min(pending) if pending else None
        pol = self.policy
        times: list[float] = [self._born + pol.max_lifetime_ms / 1000]
        if self._transportless_since is not None:
            times.append(self._transportless_since + pol.transport_lost_ttl_ms / 1000)
        if self._recovery_started is not None and self.state is State.RECOVERING:
            # Only RECOVERING evaluates the window; after RECOVERING -> DEGRADED a stale
            # start would put a past deadline here forever (a spinning timer).
            times.append(self._recovery_started + pol.recovery_window_ms / 1000)
        if self._degraded_since is not None and pol.degraded_terminate_after_ms is not None:
            times.append(self._degraded_since + pol.degraded_terminate_after_ms / 1000)
        if self._volatile_since is not None:
            times.append(self._volatile_since + pol.volatile_to_degraded_ms / 1000)
        if self._stable_since is not None and self.state in (State.VOLATILE, State.DEGRADED):
            times.append(self._stable_since + pol.stability_window_ms / 1000)
        for p in self._paths.values():
            times.append(p.next_probe)
            t = p.health.next_deadline()
            if t is not None:
                times.append(t)
        if self._pending is not None:
            times.append(self._pending.last_sent + pol.reattach_retry_ms / 1000)
        sel = self.selector.next_deadline()
        if (
            sel is not None
            and self.state is State.VOLATILE
            and self.active is not None
            and self.auto_switch
            and self._pending is None
        ):
            # Only _switch_actions evaluates the selector, under exactly these conditions;
            # a dwell it will not look at is not a deadline (it would spin the timer).
            times.append(sel)
        if self.state in (State.RECOVERING, State.DEGRADED, State.VOLATILE):
            # Changes after the last timer turn (the budget or cooldown the recovery and
            # switch actions of handle_timer wait for); not after times[0], the lifetime end.
            t = self.limiter.next_change(self._timer_now)
            if t is not None:
                times.append(t)
            for p in self._paths.values():
                t = p.holddown.next_change(self._timer_now)
                if t is not None:
                    times.append(t)
        if self.cipher is not None:
            if not self.cipher.rekey_pending:
                # While our last rekey is unconfirmed, rekey() refuses: no deadline (the
                # peer's first new-phase datagram confirms it and brings it back).
                times.append(self._rekey_at())
            t = self.cipher.next_deadline()
            if t is not None:
                times.append(t)
        t = self._drop_summary_due()
        if t is not None:
            times.append(t)
        return min(times)

    def _rekey_at(self) -> float:
        assert self.cipher is not None
        # key_age(now) = now - generation start, so the start is -key_age(0).
        return -self.cipher.key_age(0.0) + self.policy.rekey_after_s

    # == commands ==========================================================================
    def switch_to(self, path_id: int, now: float) -> Reason | None:
        """Operator switch to ``path_id``. Returns the denial reason, or None if requested."""
        if path_id not in self._paths:
            raise ValueError(f"unknown path id {path_id}")
        reason: Reason | None = None
        if self.machine.terminated or self.state is State.BIRTH:
            reason = Reason.INVALID_STATE_FOR_REATTACH
        elif path_id == self.active:
            reason = Reason.NO_VALID_CANDIDATE
        elif not self._paths[path_id].validated:
            reason = Reason.PATH_NOT_VALIDATED
        elif not self._live(path_id, now):
            reason = Reason.NO_VALID_CANDIDATE
        else:
            denied = self.limiter.check(now, manual=True)
            if denied is not None:
                reason = Reason(denied)
        if reason is not None:
            self._deny(reason, path_id, now, manual=True)
            return reason
        kind = ReattachKind.RECOVERY if self.state is State.RECOVERING else ReattachKind.MANUAL
        why = (
            Reason.DEAD_TRANSPORT_RECOVERY
            if kind is ReattachKind.RECOVERY
            else Reason.MANUAL_SWITCH
        )
        self._pending = None
        self._start_reattach(path_id, kind, why, now)
        return None

    def set_auto_switch(self, enabled: bool) -> None:
        self.auto_switch = enabled
        self.selector.reset()

    def force_reattach(self, now: float) -> None:
        """Re-assert the binding now (RECOVERING: retry immediately)."""
        if self.machine.terminated or self.state is State.BIRTH:
            return
        if self.state is State.RECOVERING:
            self._pending = None
            self._excluded.clear()
            self._recovery_actions(now)
        elif self.active is not None and self._pending is None:
            self._start_reattach(self.active, ReattachKind.RESUME, Reason.TRANSPORT_RESUMED, now)

    def terminate(self, now: float, reason: Reason = Reason.OPERATOR_TERMINATED) -> None:
        """Explicit end: TERMINATE to the gateway on every live path, then TERMINATED."""
        if self.machine.terminated:
            return
        if self.cipher is not None:
            targets = [pid for pid in self._order if self._paths[pid].validated]
            for _ in range(TERMINATE_COPIES):
                for pid in targets:
                    self._send_control(pid, Terminate(reason_to_wire(reason)))
        self._fire(Trigger.TERMINATE, reason, now)

    def apply_policy(self, policy: Policy, now: float) -> None:
        """Strict mode (D14): new bounds apply from now on; history is not rewritten."""
        if len(self._paths) > policy.max_candidate_count:
            self.emit(
                PolicyEvent(
                    **self._base(now), policy_name="POLICY_REJECTED",
                    reason_code=Reason.POLICY_INVALID,
                    detail=(
                        f"max_candidate_count {policy.max_candidate_count}"
                        f" < {len(self._paths)} configured paths"
                    ),
                )
            )  # fmt: skip
            return
        self.policy = policy
        self.machine.policy_version = policy.policy_version
        self.limiter.reconfigure(policy.max_switches_per_min, policy.switch_cooldown_ms)
        for p in self._paths.values():
            p.holddown.reconfigure(policy.failed_path_holddown_ms)
        self.selector.reconfigure(policy.switch_improvement_factor, policy.switch_dwell_ms)
        self.emit(
            PolicyEvent(
                **self._base(now), policy_name="POLICY_APPLIED", reason_code=Reason.POLICY_APPLIED
            )
        )

    def _on_terminated(self) -> None:
        self.active = None
        self._pending = None
        self._initiator = None
        self._hs_next = self._hs_deadline = None
        self.queue_dropped += len(self._queue)
        self._queue.clear()
        self._queue_bytes = 0

    # == outputs ===========================================================================
    def datagrams_to_send(self) -> list[tuple[int, bytes]]:
        out, self._out = self._out, []
        return out

    def packets_for_tun(self) -> list[bytes]:
        out, self._tun = self._tun, []
        return out

    def events(self) -> list[Event]:
        """All pending events at once (convenience for drivers and tests)."""
        out = []
        while (ev := self.next_event()) is not None:
            out.append(ev)
        return out

    def snapshot(self, now: float) -> ClientSnapshot:
        views = []
        for pid in self._order:
            p = self._paths[pid]
            if pid == self.active:
                role = "active"
            elif self._pending is not None and pid == self._pending.path_id:
                role = "switching"
            elif self._live(pid, now):
                role = "standby"
            else:
                role = "down" if p.validated else "unvalidated"
            views.append(PathView(self._stats(pid, now), p.spec.label, role, p.validated))
        cipher = self.cipher
        return ClientSnapshot(
            session_id=self.machine.session_id,
            state=str(self.state),
            state_version=self.machine.version,
            binding_epoch=self.epoch,
            peer_state=self.peer_state,
            peer_state_version=self.peer_version,
            active=self.active,
            pending=None if self._pending is None else self._pending.path_id,
            paths=tuple(views),
            auto_switch=self.auto_switch,
            switch_budget_left=self.limiter.budget_left(now),
            cooldown_remaining_ms=self.limiter.cooldown_remaining_ms(now),
            key_phase=cipher.phase if cipher else 0,
            key_age_s=cipher.key_age(now) if cipher else 0.0,
            policy_version=self.machine.policy_version,
            uptime_s=now - self._born,
            queue_depth=len(self._queue),
            queue_dropped=self.queue_dropped,
            total_switches=self.total_switches,
            drops=tuple(sorted(self.drops.items())),
            inner_address=self.inner_address,
        )
