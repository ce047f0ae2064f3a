"""The client's single timer: what is due now and when the next deadline falls.

``_TimersMixin`` gives ``ClientSession`` ``handle_timer(now)`` (everything that expired:
timed triggers, health events, recovery and switch actions, retransmissions, probes,
rekey), ``_state_timers`` (evaluate every timed trigger, apply the most urgent) and
``next_deadline()`` (the minimum of all named deadlines, for the driver's one timer). They
sit together because they must agree: a deadline ``handle_timer`` does not act on would
make the driver's timer spin.
"""

from __future__ import annotations

from tunnel.core.client_handshake import _HandshakeMixin
from tunnel.core.client_reattach import _ReattachMixin
from tunnel.core.events import KeyRotated, Reason
from tunnel.core.session import State, Trigger, most_urgent
from tunnel.core.wire import Rekey


class _TimersMixin(_HandshakeMixin, _ReattachMixin):
    """``handle_timer`` and ``next_deadline`` of ``ClientSession``, with what they run."""

    _timer_now: float

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
