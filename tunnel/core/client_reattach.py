"""The client's reattach side: recovery after a path death and switches between paths.

``_ReattachMixin`` gives ``ClientSession`` the machinery that moves the binding to
another path: entering RECOVERING on a dead active path and DEGRADED when recovery or a
switch cannot proceed, choosing a candidate (recovery and proactive switch, within the
switch budget and cooldown), and one REATTACH_REQUEST in flight (``_Pending``): sent,
retransmitted, given up, answered by the gateway's REATTACH_ACK or REATTACH_REJECT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tunnel.core.client_paths import _PathsMixin
from tunnel.core.drops import Drop
from tunnel.core.events import (
    PeerState,
    Reason,
    ReattachAttempt,
    ReattachResult,
    TransportDead,
    TransportSwitch,
    TransportSwitchDenied,
    reason_from_wire,
)
from tunnel.core.selection import Selector, SwitchLimiter, best_candidate
from tunnel.core.session import SessionMachine, State, Trigger
from tunnel.core.wire import STATE_CODES, ReattachAck, ReattachKind, ReattachReject, ReattachRequest

RETRYABLE_REJECTS = frozenset(
    {Reason.STALE_BINDING_EPOCH, Reason.PATH_NOT_VALIDATED, Reason.RATE_LIMITED}
)
"""Rejects that say 'try again' (with the epoch the reject carries), not 'you failed'."""

PROACTIVE_ATTEMPTS = 4
"""Sends of one proactive/manual request before the candidate is given up."""

RECOVERY_ATTEMPTS_PER_PATH = 3
"""Sends of one recovery request on one candidate before another candidate is tried."""


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


class _ReattachMixin(_PathsMixin):
    """Recovery, proactive switches and reattach requests for ``ClientSession``."""

    machine: SessionMachine
    limiter: SwitchLimiter
    selector: Selector
    auto_switch: bool
    epoch: int
    peer_state: str
    peer_version: int
    total_switches: int
    _transportless_since: float | None
    _recovery_started: float | None
    _death_at: float | None
    _volatile_since: float | None
    _degraded_since: float | None
    _stable_since: float | None
    _pending: _Pending | None
    _nonce: int
    _last_acked_nonce: int
    _denied_once: set[Reason]

    if TYPE_CHECKING:  # provided by ClientSession

        @property
        def state(self) -> State: ...

        def _fire(self, trigger: Trigger, reason: Reason, now: float, **fields: Any) -> bool: ...

        def _flush_queue(self) -> None: ...

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
        if not self.auto_switch or self._pending is not None or self.active is None:
            return
        targets = self._targets(now, exclude=self.active)
        if self.state is State.DEGRADED:
            # DEGRADED reduces switching, it does not end it (DESIGN D13 amended): while
            # the active path is still judged bad, a candidate that is itself judged
            # healthy, beats it by the hysteresis factor for the dwell and fits the
            # limiter and the cooldown is taken (R3). Otherwise a session that found no
            # candidate once would stay on a lossy path after a good one came back.
            if self._classify(self.active, now) is None:
                return  # the active path recovers: stability_window brings ATTACHED
            targets = [pid for pid in targets if self._classify(pid, now) is None]
        elif self.state is not State.VOLATILE:
            return
        choice = self.selector.evaluate(now, self.active, self._scores(now), targets)
        if choice is None:
            return
        denied = self.limiter.check(now)
        if denied == "switch_rate_limited":
            if self.state is State.VOLATILE:
                self._deny(Reason.SWITCH_RATE_LIMITED, choice, now)
                self._enter_degraded(Reason.SWITCH_RATE_LIMITED, now)
                self._denied_once.add(Reason.SWITCH_RATE_LIMITED)
            elif Reason.SWITCH_RATE_LIMITED not in self._denied_once:
                self._denied_once.add(Reason.SWITCH_RATE_LIMITED)  # DEGRADED: said once
                self._deny(Reason.SWITCH_RATE_LIMITED, choice, now)
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
