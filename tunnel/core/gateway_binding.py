"""How a gateway session's binding moves: path validation, NAT rebinding, resume, reattach.

``_BindingMixin`` gives ``GatewaySessions`` (gateway.py) every rule that may change which
address carries a session's data (DESIGN D3/D4): PATH_CHALLENGE within the amplification
limit and the PATH_RESPONSE that validates an address (and commits a NAT rebind), the
resume of the last binding while RECOVERING, and REATTACH_REQUEST validation in the
spec/security-binding order (lifetime, TTL, nonce, epoch, proof age, rate, address) with
its REATTACH_ACK / REATTACH_REJECT and security escalation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tunnel.core.constants import MSG_CONTROL
from tunnel.core.drops import Drop
from tunnel.core.events import (
    PathValidated,
    Reason,
    ReattachResult,
    TransportSwitch,
    reason_to_wire,
)
from tunnel.core.gateway_session import (
    MAX_CHALLENGES,
    MAX_VALIDATED,
    Addr,
    GatewaySession,
    _Challenge,
    _GatewayBase,
    addr_label,
)
from tunnel.core.replay import NonceVerdict
from tunnel.core.session import State, Trigger
from tunnel.core.wire import (
    STATE_CODES,
    PathChallenge,
    PathResponse,
    ReattachAck,
    ReattachKind,
    ReattachReject,
    ReattachRequest,
    pack_control,
)

AMPLIFICATION_FACTOR = 3
"""D4: bytes sent to an unvalidated address stay within 3x the bytes received from it."""

CHALLENGE_RESEND_S = 0.25
"""A challenge is repeated at most this often while packets keep coming from the address."""

KIND_REASON = {
    ReattachKind.RECOVERY: Reason.DEAD_TRANSPORT_RECOVERY,
    ReattachKind.PROACTIVE: Reason.LOSS_RECOVERY,
    ReattachKind.MANUAL: Reason.MANUAL_SWITCH,
    ReattachKind.RESUME: Reason.TRANSPORT_RESUMED,
}


class _BindingMixin(_GatewayBase):
    """Path validation and reattach: the only code that moves a session's binding."""

    if TYPE_CHECKING:  # provided by GatewaySessions

        def _flush(self, s: GatewaySession) -> None: ...

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
