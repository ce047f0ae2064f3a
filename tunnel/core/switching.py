"""The client's switch controller: recovery after a path death and switches between paths.

``SwitchController`` owns everything that moves the binding to another path: the
``Selector`` (hysteresis and dwell), the ``SwitchLimiter`` (budget and cooldown),
auto-switch, the one REATTACH_REQUEST in flight (``Pending``) with its nonces and
retransmission clock, the candidates excluded in this recovery round and the denials
already reported once. It enters RECOVERING on a dead active path, DEGRADED when recovery
or a switch cannot proceed, chooses candidates and handles the gateway's REATTACH_ACK and
REATTACH_REJECT. It acts through its host (the session: state machine, clocks, outputs)
and the host's ``PathSet``; it exposes ``next_deadline()`` for its own clocks.

An automatic switch (recovery or proactive) to a path the gateway has validated (its
PROBE_ACKs say so) needs no request: the controller *marks* every datagram it sends there
with the next binding epoch (``mark_for``) and moves the data there at once; the first of
them that reaches the gateway moves the binding, and the first datagram back on that path
carrying the new epoch (``confirm``) commits the switch here, with the same events and
the same transition as an acknowledged request. Unconfirmed after ``reattach_retry_ms``,
the attempt falls back to the explicit REATTACH_REQUEST with its own nonce. Manual
switches, resumes and unvalidated targets use the request from the start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from tunnel.core.client_rows import QualityClocks
from tunnel.core.drops import Drop
from tunnel.core.endpoint import Reporter
from tunnel.core.events import (
    EventBase,
    PeerState,
    Reason,
    ReattachAttempt,
    ReattachResult,
    TransportDead,
    TransportSwitch,
    TransportSwitchDenied,
    reason_from_wire,
)
from tunnel.core.path import PathSet
from tunnel.core.policy import Policy
from tunnel.core.selection import Selector, SwitchLimiter, best_candidate
from tunnel.core.session import State, Trigger
from tunnel.core.timers import SessionClocks
from tunnel.core.wire import (
    STATE_CODES,
    Control,
    ReattachAck,
    ReattachKind,
    ReattachReject,
    ReattachRequest,
)

__all__ = ["PeerView", "Pending", "SwitchController"]

RETRYABLE_REJECTS = frozenset(
    {Reason.STALE_BINDING_EPOCH, Reason.PATH_NOT_VALIDATED, Reason.RATE_LIMITED}
)
"""Rejects that say 'try again' (with the epoch the reject carries), not 'you failed'."""

LIMITER_REASONS = frozenset({Reason.SWITCH_RATE_LIMITED, Reason.COOLDOWN_ACTIVE})
"""Denials by the switch limiter: their ``retry_after_ms`` is when it allows one again."""

MARK_NONCE_BUDGET = 64
"""Attempts moved by a binding mark use a nonce the gateway never sees. At most this many
nonces past the last one the gateway acknowledged are spent that way; then the next attempt
is an explicit request, so the gateway's nonce gap (NonceGuard, 256) is never exceeded."""

MARKED_KINDS = frozenset({ReattachKind.RECOVERY, ReattachKind.PROACTIVE})
"""Switches that may move by a binding mark: the automatic ones. A manual switch keeps the
explicit request (its nonce is audited by the gateway, the operator waits one round trip),
a resume does not move the binding at all."""

PROACTIVE_ATTEMPTS = 4
"""Sends of one proactive/manual request before the candidate is given up."""

RECOVERY_ATTEMPTS_PER_PATH = 3
"""Sends of one recovery request on one candidate before another candidate is tried."""


@dataclass(slots=True)
class Pending:
    """One REATTACH_REQUEST in flight."""

    path_id: int
    nonce: int
    kind: ReattachKind
    reason: Reason
    started: float
    last_sent: float
    sends: int
    previous: int | None
    epoch_to: int = 0
    """The binding epoch this switch moves to (the one it expects, plus one)."""
    marked: bool = False
    """Moving by binding mark: datagrams to ``path_id`` carry ``epoch_to`` and the move,
    data goes there already; no request sent (yet)."""


@dataclass(slots=True)
class PeerView:
    """What the client knows of the gateway's view: its state, version and the epoch."""

    epoch: int = 0
    state: str = "BIRTH"
    version: int = 0
    update_seq: int = 0
    """The last STATE_UPDATE sequence number taken."""


class SwitchHost(Protocol):
    """What the controller needs from its session."""

    @property
    def state(self) -> State: ...

    @property
    def policy(self) -> Policy: ...

    @property
    def clocks(self) -> SessionClocks: ...

    @property
    def quality(self) -> QualityClocks: ...

    @property
    def paths(self) -> PathSet: ...

    @property
    def peer(self) -> PeerView: ...

    @property
    def report(self) -> Reporter: ...

    @property
    def state_version(self) -> int: ...

    def fire(self, trigger: Trigger, reason: Reason, now: float, **fields: Any) -> bool: ...

    def send_control(self, path_id: int, msg: Control) -> None: ...

    def base(self, now: float) -> EventBase: ...

    def switched(self, path_id: int, now: float) -> None: ...

    def moving(self, path_id: int, now: float) -> None: ...


class SwitchController:
    """Recovery, proactive and manual switches and the reattach request in flight."""

    def __init__(self, host: SwitchHost, policy: Policy) -> None:
        self._host = host
        self.limiter = SwitchLimiter(policy.max_switches_per_min, policy.switch_cooldown_ms)
        self.selector = Selector(policy.switch_improvement_factor, policy.switch_dwell_ms)
        self.auto_switch = True
        self.pending: Pending | None = None
        self.nonce = 0
        """The last nonce sent."""
        self._last_acked_nonce = 0
        self._moved_nonce = 0
        """The nonce of the last attempt a binding mark committed (its request, if it was
        sent too, may still be answered)."""
        self._death_at: float | None = None
        self._excluded: set[int] = set()
        """Recovery candidates that did not answer in this round."""
        self._denied_once: set[Reason] = set()
        self.total_switches = 0

    # -- configuration and commands ---------------------------------------------------------
    def reconfigure(self, policy: Policy) -> None:
        self.limiter.reconfigure(policy.max_switches_per_min, policy.switch_cooldown_ms)
        self.selector.reconfigure(policy.switch_improvement_factor, policy.switch_dwell_ms)

    def set_auto(self, enabled: bool) -> None:
        self.auto_switch = enabled
        self.selector.reset()

    def give_up(self) -> None:
        """Forget the request in flight (its answer, if it comes, is late)."""
        self.pending = None

    def stop(self) -> None:
        """The session ended."""
        self.pending = None

    @property
    def pending_path(self) -> int | None:
        return None if self.pending is None else self.pending.path_id

    def data_path(self) -> int | None:
        """Where data goes ahead of the active path: the target of a switch by mark."""
        p = self.pending
        return p.path_id if p is not None and p.marked else None

    def mark_for(self, path_id: int) -> tuple[int, int]:
        """(epoch, mark) of the binding mark for a datagram sent on ``path_id``: none, or
        the epoch a switch by mark moves to with 1 + its kind."""
        p = self.pending
        if p is not None and p.marked and p.path_id == path_id:
            return p.epoch_to, int(p.kind) + 1
        return 0, 0

    def confirm(self, path_id: int, epoch8: int, now: float) -> None:
        """An authentic datagram from the gateway on ``path_id`` marked as sent to its
        binding at epoch ``epoch8`` (low 8 bits): if that is the switch by mark to
        ``path_id``, it is committed."""
        p = self.pending
        if p is None or not p.marked or p.path_id != path_id or epoch8 != p.epoch_to & 0xFF:
            return
        self.pending = None
        self._moved_nonce = p.nonce
        peer = self._host.peer
        peer.epoch = max(peer.epoch, p.epoch_to)
        self._rebind(p, now)

    def manual(self, path_id: int, now: float) -> Reason | None:
        """Operator switch to ``path_id``; the denial reason, or None if requested."""
        host = self._host
        paths = host.paths
        reason: Reason | None = None
        if host.state in (State.TERMINATED, State.BIRTH):
            reason = Reason.INVALID_STATE_FOR_REATTACH
        elif path_id == paths.active:
            reason = Reason.NO_VALID_CANDIDATE
        elif not paths.get(path_id).validated:
            reason = Reason.PATH_NOT_VALIDATED
        elif not paths.live(path_id, now):
            reason = Reason.NO_VALID_CANDIDATE
        else:
            reason = self.limiter.check(now, manual=True)
        if reason is not None:
            self._deny(reason, path_id, now, manual=True)
            return reason
        recovering = host.state is State.RECOVERING
        kind = ReattachKind.RECOVERY if recovering else ReattachKind.MANUAL
        why = Reason.DEAD_TRANSPORT_RECOVERY if recovering else Reason.MANUAL_SWITCH
        self.pending = None
        self.request(path_id, kind, why, now)
        return None

    def force(self, now: float) -> None:
        """Re-assert the binding now (RECOVERING: retry immediately)."""
        host = self._host
        if host.state is State.RECOVERING:
            self.pending = None
            self._excluded.clear()
            self._recovery_actions(now)
        elif host.paths.active is not None and self.pending is None:
            self.request(host.paths.active, ReattachKind.RESUME, Reason.TRANSPORT_RESUMED, now)

    def peer_recovering(self, now: float) -> None:
        """The gateway lost our binding while our path works: re-assert it (D3)."""
        active = self._host.paths.active
        if active is not None and self.pending is None and self._host.paths.live(active, now):
            self.request(active, ReattachKind.RESUME, Reason.TRANSPORT_RESUMED, now)

    # -- transitions the timer rows fire ----------------------------------------------------
    def on_transport_dead(
        self, now: float, reason: Reason = Reason.TRANSPORT_DEAD, detail: str = ""
    ) -> None:
        """The active path is dead: silence (``transport_dead``, the timed row) or the
        kernel's word (``link_down``, :meth:`ClientSession.path_down`), handled alike."""
        host = self._host
        paths = host.paths
        dead = paths.active
        assert dead is not None
        last = paths.get(dead).health.last_inbound
        silence = (now - last) * 1000 if last is not None else 0.0
        host.report.emit(
            TransportDead(
                **host.base(now), transport_id=dead, silence_ms=round(silence, 3),
                reason_code=reason, detail=detail,
            )
        )  # fmt: skip
        candidates = paths.eligible(now, self._excluded, exclude=dead)
        if host.fire(
            Trigger.TRANSPORT_DEAD, reason, now,
            from_transport=dead, candidate_set_size=len(candidates),
        ):  # fmt: skip
            paths.lose_active(now)
            # Every path is judged by silence now (no active path): ask each of them at
            # once, not at its next standby probe (up to a standby interval away), so the
            # recovery sees which ones answer within a round trip.
            paths.probe_all_soon(now)
            if self.pending is not None and self.pending.kind is ReattachKind.RESUME:
                self.pending = None
            self._death_at = now
            host.clocks.transport_lost(now)
            host.clocks.recovery_begun(now)
            host.quality.reset()
            self._denied_once.clear()

    def on_instability(self, reason: Reason, now: float) -> None:
        if self._host.fire(Trigger.INSTABILITY, reason, now):
            self._host.quality.volatile(now)
            self.selector.reset()

    def on_stability(self, now: float) -> None:
        if self._host.fire(Trigger.STABILITY_RESTORED, Reason.STABILITY_RESTORED, now):
            self._host.quality.stable()
            self._excluded.clear()
            self._denied_once.clear()

    def enter_degraded(self, reason: Reason, now: float) -> None:
        host = self._host
        persisted = host.state is State.VOLATILE and reason is Reason.VOLATILE_PERSISTED
        if host.fire(Trigger.DEGRADE, reason, now):
            host.quality.degraded(now)
            # The recovery round is over: a candidate that did not answer in it may be
            # tried again (else a transportless DEGRADED session waits for its TTL).
            self._excluded.clear()
            if persisted and self.auto_switch and not self._passing_candidate(now):
                # SPEC 8.3 / AT-28: nothing passed the filters during VOLATILE. Once per
                # entry into DEGRADED (this transition), never per tick.
                self._deny(Reason.NO_VALID_CANDIDATE, None, now)

    def _passing_candidate(self, now: float) -> bool:
        """Some live candidate beats the active path by the hysteresis factor right now."""
        paths = self._host.paths
        scores = paths.scores(now)
        best = best_candidate(scores, paths.targets(now, self._excluded, exclude=paths.active))
        if best is None:
            return False
        active = scores.get(paths.active, 0.0) if paths.active is not None else 0.0
        return scores[best] > self._host.policy.switch_improvement_factor * active

    def _deny(
        self, reason: Reason, requested: int | None, now: float, *, manual: bool = False
    ) -> None:
        # Only the limiter's own refusals have a known time to try again; a missing
        # candidate does not come back when the budget does.
        retry = self.limiter.next_change(now) if reason in LIMITER_REASONS else None
        self._host.report.emit(
            TransportSwitchDenied(
                **self._host.base(now), reason_code=reason, requested_transport=requested,
                manual=manual,
                retry_after_ms=None if retry is None else round((retry - now) * 1000, 3),
            )
        )  # fmt: skip

    def _deny_once(self, reason: Reason, requested: int | None, now: float) -> None:
        if reason not in self._denied_once:
            self._denied_once.add(reason)
            self._deny(reason, requested, now)

    # -- the timer ----------------------------------------------------------------------------
    def on_timer(self, now: float) -> None:
        """Recovery and switch decisions due at ``now``, then the request in flight."""
        self._recovery_actions(now)
        self._switch_actions(now)
        self._pending_timer(now)

    def _recovery_actions(self, now: float) -> None:
        st = self._host.state
        if self.pending is not None:
            return
        if st is State.RECOVERING:
            self._recover(now)
        elif st is State.DEGRADED and self._host.paths.active is None:
            self._maybe_retry(now)

    def _recover(self, now: float) -> None:
        paths = self._host.paths
        dead = paths.previous_dead
        candidates = paths.eligible(now, self._excluded)
        # Anti-flap: prefer paths not held down after a failure; a held one is still
        # better than none (transport death must not become session death).
        choice = best_candidate(paths.scores(now), paths.targets(now, self._excluded) or candidates)
        if choice is None:
            if self._may_still_answer(now):
                return  # a path that answered its standby probes has not had time to answer
            # Nothing to move to: the denial names no transport (the one that died is not a
            # target; re-attaching it when it answers again is not a switch).
            self._deny_once(Reason.NO_VALID_CANDIDATE, None, now)
            return
        # Hard-death recovery is exempt from the cooldown (a dead path must be replaced)
        # but never from the per-minute cap (an invariant). Resuming the path that died
        # is not a switch, so it stays possible with the budget spent.
        if self.limiter.check(now, manual=True) is not None:
            if dead in candidates:
                self.request(dead, ReattachKind.RECOVERY, Reason.DEAD_TRANSPORT_RECOVERY, now)
                return
            self._deny(Reason.SWITCH_RATE_LIMITED, choice, now)
            self.enter_degraded(Reason.SWITCH_RATE_LIMITED, now)
            return
        self.request(choice, ReattachKind.RECOVERY, Reason.DEAD_TRANSPORT_RECOVERY, now)

    def _may_still_answer(self, now: float) -> bool:
        """Some path the recovery may use has not had time to answer its fast probes yet
        (it answered its standby probes): no candidate is no verdict yet."""
        paths = self._host.paths
        return any(pid not in self._excluded and paths.answering(pid, now) for pid in paths.order)

    def _maybe_retry(self, now: float) -> None:
        """DEGRADED without an active path: try recovery again once a candidate is live."""
        host = self._host
        candidates = host.paths.eligible(now, self._excluded)
        if candidates and (
            self.limiter.check(now, manual=True) is None or host.paths.previous_dead in candidates
        ):
            if host.fire(Trigger.RECOVERY_RETRY, Reason.RECOVERY_RETRY, now):
                host.clocks.recovery_begun(now)
                host.quality.retrying()

    def _switch_targets(self, now: float) -> list[int] | None:
        """Where an automatic switch may go now; None when no switch is considered."""
        paths = self._host.paths
        active = paths.active
        if not self.auto_switch or self.pending is not None or active is None:
            return None
        targets = paths.targets(now, self._excluded, exclude=active)
        st = self._host.state
        if st is State.DEGRADED:
            # DEGRADED reduces switching, it does not end it (DESIGN D13 amended): while
            # the active path is still judged bad, a candidate that is itself judged
            # healthy, beats it by the hysteresis factor for the dwell and fits the
            # limiter and the cooldown is taken (R3). Otherwise a session that found no
            # candidate once would stay on a lossy path after a good one came back.
            if paths.classify(active, now) is None:
                return None  # the active path recovers: stability_window brings ATTACHED
            return [pid for pid in targets if paths.classify(pid, now) is None]
        return targets if st is State.VOLATILE else None

    def _switch_actions(self, now: float) -> None:
        targets = self._switch_targets(now)
        if targets is None:
            return
        paths = self._host.paths
        active = paths.active
        choice = self.selector.evaluate(now, active, paths.scores(now), targets)
        if choice is None:
            return
        denied = self.limiter.check(now)
        if denied is Reason.SWITCH_RATE_LIMITED:
            if self._host.state is State.VOLATILE:
                self._deny(Reason.SWITCH_RATE_LIMITED, choice, now)
                self.enter_degraded(Reason.SWITCH_RATE_LIMITED, now)
                self._denied_once.add(Reason.SWITCH_RATE_LIMITED)
            else:
                self._deny_once(Reason.SWITCH_RATE_LIMITED, choice, now)  # DEGRADED: once
            return
        if denied is Reason.COOLDOWN_ACTIVE:
            self._deny_once(Reason.COOLDOWN_ACTIVE, choice, now)
            return
        assert active is not None
        verdict = paths.classify(active, now)
        reason = (
            Reason.LATENCY_RECOVERY
            if verdict is Reason.LATENCY_THRESHOLD_EXCEEDED
            else Reason.LOSS_RECOVERY
        )
        self.request(choice, ReattachKind.PROACTIVE, reason, now)

    def _pending_timer(self, now: float) -> None:
        p = self.pending
        if p is None or now < self._retransmit_at(p):
            return
        limit = (
            RECOVERY_ATTEMPTS_PER_PATH if p.kind is ReattachKind.RECOVERY else PROACTIVE_ATTEMPTS
        )
        if p.marked:
            # No datagram back with the new epoch: from now on only the request moves it.
            p.marked = False
        if p.sends < limit and self._host.paths.live(p.path_id, now):
            self._send_pending(p, now)
            return
        # This candidate did not answer: give it up (recovery tries the next one).
        self.pending = None
        if p.kind is ReattachKind.RECOVERY:
            self._excluded.add(p.path_id)
            if not self._host.paths.eligible(now, self._excluded):
                self._excluded.clear()
        elif p.kind is not ReattachKind.RESUME:
            self._deny(
                Reason.NO_VALID_CANDIDATE, p.path_id, now, manual=p.kind is ReattachKind.MANUAL
            )

    def _retransmit_at(self, p: Pending) -> float:
        return p.last_sent + self._host.policy.reattach_retry_ms / 1000

    def next_deadline(self, after: float) -> float | None:
        """The earliest of this controller's clocks that its :meth:`on_timer` acts on:
        the retransmission of the request in flight, a recovery that can start (a live
        candidate while RECOVERING with nothing in flight), the end of a dwell the selector is
        timing, and (while recovery or switching waits for them) the next change of the
        switch budget or cooldown after ``after`` (the last timer turn)."""
        host = self._host
        st = host.state
        times = []
        if self.pending is not None:
            times.append(self._retransmit_at(self.pending))
        elif st is State.RECOVERING and host.paths.eligible(after, self._excluded):
            # A candidate answered since the last turn (an inbound datagram, no timer made
            # it live): recover now, not at the next probe. ``_recover`` then requests or
            # leaves RECOVERING, so this never repeats at the same time.
            times.append(after)
        dwell = self.selector.next_deadline()
        if dwell is not None and self._switch_considered():
            times.append(dwell)
        if st in (State.RECOVERING, State.DEGRADED, State.VOLATILE):
            for t in (self.limiter.next_change(after), host.paths.holddown_change(after)):
                if t is not None:
                    times.append(t)
        return min(times) if times else None

    def _switch_considered(self) -> bool:
        """True when :meth:`_switch_actions` evaluates the selector in VOLATILE."""
        return (
            self._host.state is State.VOLATILE
            and self._host.paths.active is not None
            and self.auto_switch
            and self.pending is None
        )

    # -- the request in flight ------------------------------------------------------------------
    def request(self, path_id: int, kind: ReattachKind, reason: Reason, now: float) -> None:
        """Send a REATTACH_REQUEST for ``path_id`` (it replaces any request in flight)."""
        host = self._host
        paths = host.paths
        self.nonce += 1
        self.pending = Pending(
            path_id=path_id, nonce=self.nonce, kind=kind, reason=reason,
            started=now, last_sent=now, sends=0,
            previous=paths.active if paths.active is not None else paths.previous_dead,
        )  # fmt: skip
        deadline = None
        started = host.clocks.recovery_started
        if kind is ReattachKind.RECOVERY and started is not None:
            deadline = host.report.ts_ms(started + host.policy.recovery_window_ms / 1000)
        host.report.emit(
            ReattachAttempt(
                **host.base(now), candidate_transport=path_id, nonce=self.nonce,
                expected_epoch=host.peer.epoch, kind=kind.name.lower(),
                recovery_deadline_ms=deadline,
            )
        )  # fmt: skip
        if self._may_mark(path_id, kind):
            self.pending.marked = True
            self.pending.epoch_to = host.peer.epoch + 1
            host.moving(path_id, now)
            return
        self._send_pending(self.pending, now)

    def _may_mark(self, path_id: int, kind: ReattachKind) -> bool:
        """The switch may move by binding mark: automatic, to a path the gateway said it
        validated, within the nonce budget."""
        pending = self.pending
        return (
            kind in MARKED_KINDS
            and pending is not None
            and path_id != pending.previous  # the binding may never have left it: ask
            and self._host.paths.get(path_id).gateway_validated
            and self.nonce - self._last_acked_nonce <= MARK_NONCE_BUDGET
        )

    def _send_pending(self, p: Pending, now: float) -> None:
        host = self._host
        p.sends += 1
        p.last_sent = now
        host.send_control(
            p.path_id,
            ReattachRequest(
                nonce=p.nonce, ts_ms=host.report.ts_ms(now), expected_epoch=host.peer.epoch,
                path_id=p.path_id, kind=int(p.kind), client_version=host.state_version,
            ),
        )  # fmt: skip

    def _superseded(self, nonce: int) -> bool:
        """A nonce we sent that is no longer pending: its answer (authentic, it opened under
        the session keys) arrives after a newer request replaced it, e.g. reordered (AT-47)."""
        pending = self.pending
        return 0 < nonce <= self.nonce and (pending is None or nonce < pending.nonce)

    def _unexpected(self, nonce: int, now: float, **fields: Any) -> None:
        host = self._host
        host.report.count_drop(Drop.WRONG_STATE)
        if not self._superseded(nonce):  # else: a late answer to a request we gave up
            host.report.security(
                now, host.base(now), "UNEXPECTED_RESPONSE", Reason.UNEXPECTED_RESPONSE, **fields
            )

    def on_ack(self, msg: ReattachAck, path_id: int, now: float) -> None:
        host = self._host
        pending = self.pending
        if pending is None or msg.nonce != pending.nonce:
            if msg.nonce and msg.nonce == self._moved_nonce:
                # The request of a switch a binding mark committed first: nothing moves.
                self._last_acked_nonce = max(self._last_acked_nonce, msg.nonce)
                return
            if msg.nonce and msg.nonce == self._last_acked_nonce:
                return  # a duplicate ACK of a retransmitted request
            self._unexpected(msg.nonce, now, transport_id=path_id)
            return
        peer = host.peer
        if msg.gw_version < peer.version:
            host.report.count_drop(Drop.WRONG_STATE)
            host.report.security(
                now, host.base(now), "STALE_RESPONSE", Reason.STALE_STATE_VERSION,
                transport_id=path_id,
            )  # fmt: skip
            return
        self.pending = None
        self._last_acked_nonce = msg.nonce
        peer.epoch = msg.epoch
        peer.state, peer.version = STATE_CODES[msg.gw_state], msg.gw_version
        if pending.kind is ReattachKind.RESUME:
            base = host.base(now)
            host.report.emit(
                PeerState(
                    **base, peer_state=peer.state,
                    peer_state_version=peer.version, binding_epoch=peer.epoch,
                )
            )  # fmt: skip
            # Every validation outcome has its REATTACH_RESULT (SPEC-DIGEST §3.3), a resume
            # on the active path too: the attempt does not stay open.
            host.report.emit(
                ReattachResult(
                    **base, status="SUCCESS", reason_code=Reason.REATTACH_SUCCESS,
                    candidate_transport=pending.path_id,
                    path=host.paths.get(pending.path_id).label,
                )
            )  # fmt: skip
            return
        self._rebind(pending, now)

    def _rebind(self, pending: Pending, now: float) -> None:
        """The gateway moved the binding to ``pending.path_id``: the session follows."""
        host = self._host
        recovering = host.state is State.RECOVERING
        if recovering:
            latency_from = self._death_at if self._death_at is not None else pending.started
            ok = host.fire(Trigger.REATTACH_OK, Reason.REATTACH_SUCCESS, now)
        else:
            latency_from = pending.started
            ok = host.fire(Trigger.REBIND, pending.reason, now)
        if not ok:
            return
        paths = host.paths
        previous = paths.active if paths.active is not None else pending.previous
        new = pending.path_id
        paths.activate(new, now)
        host.clocks.transport_regained()
        host.quality.reset()
        self._death_at = None
        self._excluded.clear()
        self._denied_once.clear()
        self.selector.reset()
        if new != previous:
            # Re-attaching the path that was declared dead is not a transport switch (the
            # gateway's binding never moved): it must not spend the switch budget.
            self.limiter.record(now)
            self.total_switches += 1
        health = paths.get(new).health
        stats = health.stats(now)
        # The ACK is a round trip on ``new``: what it lost before (its death, if it is the
        # path that died) says nothing about it now, and must not make it VOLATILE.
        health.reset_loss()
        base = host.base(now)
        label = paths.get(new).label
        host.report.emit(
            TransportSwitch(
                **base, previous_transport=previous, new_transport=new,
                reason_code=Reason.REATTACH_SUCCESS if recovering else pending.reason,
                switch_latency_ms=round((now - latency_from) * 1000, 3),
                binding_epoch=host.peer.epoch,
                candidate_count=len(paths.eligible(now, self._excluded)),
                loss_ratio=stats.loss_ratio, latency_estimate_ms=stats.srtt_ms, path=label,
            )
        )  # fmt: skip
        host.report.emit(
            ReattachResult(
                **base, status="SUCCESS", reason_code=Reason.REATTACH_SUCCESS,
                candidate_transport=new, path=label,
            )
        )  # fmt: skip
        host.switched(new, now)

    def on_reject(self, msg: ReattachReject, now: float) -> None:
        host = self._host
        pending = self.pending
        if pending is None or msg.nonce != pending.nonce:
            self._unexpected(msg.nonce, now)
            return
        reason = reason_from_wire(msg.reason) or Reason.REATTACH_VALIDATION_FAILED
        if msg.epoch > host.peer.epoch:
            host.peer.epoch = msg.epoch
        if reason in RETRYABLE_REJECTS and not msg.fatal:
            if reason is Reason.STALE_BINDING_EPOCH:
                # This attempt was denied (its REATTACH_RESULT says so); the next one goes
                # to the same candidate with a fresh nonce and the epoch the gateway told us.
                self._result_denied(pending, reason, now)
                self.request(pending.path_id, pending.kind, pending.reason, now)
            return  # others: the retransmit timer tries again (same request, same nonce)
        self.pending = None
        self._result_denied(pending, reason, now, fatal=bool(msg.fatal))
        if msg.fatal:
            host.fire(Trigger.TERMINATE, reason, now, initiator="peer")
            return
        host.report.emit(
            TransportSwitchDenied(
                **host.base(now), reason_code=reason, requested_transport=pending.path_id,
                manual=pending.kind is ReattachKind.MANUAL,
            )
        )  # fmt: skip
        if host.state is State.RECOVERING:
            self.enter_degraded(Reason.REATTACH_VALIDATION_FAILED, now)

    def _result_denied(
        self, pending: Pending, reason: Reason, now: float, *, fatal: bool = False
    ) -> None:
        host = self._host
        host.report.emit(
            ReattachResult(
                **host.base(now), status="DENIED", reason_code=reason,
                candidate_transport=pending.path_id, fatal=fatal,
                path=host.paths.get(pending.path_id).label,
            )
        )  # fmt: skip
