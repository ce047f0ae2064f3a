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
  versioned rebind VOLATILE -> ATTACHED (R2); otherwise DEGRADED after volatile_to_degraded,
  where switching goes on with stricter filters (the active path still judged bad, the
  candidate judged healthy): DEGRADED -> ATTACHED (R3);
- operator switch: a versioned rebind (R1-R3), exempt from cooldown, counted in the budget.

This module holds the session's state, the datagram and TUN inputs, the commands and the
outputs. The rest is split by concern into mixins that ``ClientSession`` inherits:
``client_handshake`` (BIRTH: ``connect``, INIT, cookie, response), ``client_paths``
(per-path liveness, scores, classification, probes), ``client_reattach`` (path death,
recovery, proactive switches, the REATTACH_REQUEST in flight) and ``client_timers``
(``handle_timer``, timed triggers, rekey, ``next_deadline``). ``PathSpec`` and ``PathView``
stay importable from here.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tunnel.core.aead import KeyExhausted, SessionCipher
from tunnel.core.client_handshake import _HandshakeMixin
from tunnel.core.client_paths import PathSpec, PathView, _Path, _PathsMixin
from tunnel.core.client_reattach import _Pending, _ReattachMixin
from tunnel.core.client_timers import _TimersMixin
from tunnel.core.constants import (
    MAX_INNER_PACKET,
    MAX_STATE_VERSION,
    MSG_CONTROL,
    MSG_COOKIE_REPLY,
    MSG_DATA,
    MSG_HANDSHAKE_INIT,
    MSG_HANDSHAKE_RESP,
)
from tunnel.core.cookie import CookieJar
from tunnel.core.drops import Drop
from tunnel.core.events import (
    Diagnostic,
    Event,
    EventBase,
    KeyRotated,
    PeerState,
    PolicyEvent,
    Reason,
    reason_from_wire,
    reason_to_wire,
)
from tunnel.core.handshake import Initiator
from tunnel.core.policy import Policy
from tunnel.core.selection import Selector, SwitchLimiter
from tunnel.core.session import SessionMachine, State, Trigger
from tunnel.core.wire import (
    STATE_CODES,
    Control,
    PathChallenge,
    PathResponse,
    ProbeAck,
    ReattachAck,
    ReattachKind,
    ReattachReject,
    Rekey,
    StateAck,
    StateUpdate,
    Terminate,
    pack_control,
    parse_control,
    parse_header,
)

__all__ = ["ClientSession", "ClientSnapshot", "PathSpec", "PathView"]

TERMINATE_COPIES = 2
"""TERMINATE is sent this many times on each live path: best effort, it is not acked."""


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


class ClientSession(_TimersMixin, _HandshakeMixin, _ReattachMixin, _PathsMixin):
    """The client protocol machine; see the module docstring for its inputs and outputs."""

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

    # == inputs ============================================================================
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
