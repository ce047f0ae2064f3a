"""REATTACH_REQUEST validation of one gateway session (spec/security-binding order, §4.4).

``ReattachGuard`` owns what the checks remember: the nonce guard, the reattach token
bucket, the request held until its address is validated, and the last REATTACH_ACK (a
retransmitted request gets the same answer). ``check`` runs the checks after the session
limits (lifetime and TTL, which the session's timer rows decide) in order: nonce, epoch,
proof age, rate, address; it returns a ``ReattachVerdict`` and sends nothing. The session
carries the verdict out (gateway_session.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from tunnel.core.admission import TokenBucket
from tunnel.core.events import Reason
from tunnel.core.gateway_paths import Addr
from tunnel.core.replay import NonceGuard, NonceVerdict
from tunnel.core.wire import ReattachAck, ReattachRequest


class ReattachAction(Enum):
    """What the session does with a request."""

    COMMIT = "commit"
    """Every check passed: commit the nonce, move (or confirm) the binding, ACK."""
    HOLD = "hold"
    """Valid, from an address not validated yet: held, the address is challenged."""
    REJECT = "reject"
    """Answered with REATTACH_REJECT (``reason``, ``fatal``; ``escalate``: counts as a
    security failure; ``violation``: reported as a SECURITY_EVENT first)."""
    REPEAT_ACK = "repeat_ack"
    """A retransmission of the acknowledged request on the binding: the same ACK again."""
    REPLAY = "replay"
    """The acknowledged request again from elsewhere: not answered, counted as a replay."""


@dataclass(frozen=True, slots=True)
class ReattachVerdict:
    action: ReattachAction
    reason: Reason | None = None
    fatal: bool = False
    escalate: bool = False
    violation: str | None = None


_COMMIT = ReattachVerdict(ReattachAction.COMMIT)
_HOLD = ReattachVerdict(ReattachAction.HOLD)
_REPEAT_ACK = ReattachVerdict(ReattachAction.REPEAT_ACK)
_REPLAY = ReattachVerdict(ReattachAction.REPLAY)
_RATE_LIMITED = ReattachVerdict(ReattachAction.REJECT, Reason.RATE_LIMITED)
_WRONG_EPOCH = ReattachVerdict(ReattachAction.REJECT, Reason.STALE_BINDING_EPOCH)
_OVERTAKEN = ReattachVerdict(ReattachAction.REJECT, Reason.STALE_REQUEST)
_TOO_OLD = ReattachVerdict(
    ReattachAction.REJECT, Reason.STALE_REQUEST, escalate=True, violation="STALE_REQUEST"
)
_WINDOW_EXCEEDED = ReattachVerdict(
    ReattachAction.REJECT,
    Reason.NONCE_WINDOW_EXCEEDED,
    escalate=True,
    violation="NONCE_WINDOW_EXCEEDED",
)
_MALFORMED = ReattachVerdict(ReattachAction.REJECT, Reason.MALFORMED_REQUEST, escalate=True)


class ReattachGuard:
    """Nonces, rate, the held request and the last ACK of one session's reattaches."""

    __slots__ = ("_bucket", "_held", "_last_ack", "nonces")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.nonces = NonceGuard()
        """Read by tests and the session (``nonces.last``); committed only through here."""
        self._bucket = TokenBucket(rate, burst, now)
        self._held: tuple[ReattachRequest, Addr] | None = None
        self._last_ack: tuple[int, ReattachAck] | None = None

    @property
    def last_ack(self) -> tuple[int, ReattachAck] | None:
        return self._last_ack

    def configure(self, rate: float, burst: float) -> None:
        """A reloaded policy's reattach rate and burst."""
        self._bucket.configure(rate, burst)

    def check(
        self,
        req: ReattachRequest,
        now: float,
        *,
        epoch: int,
        at_binding: bool,
        validated: bool,
        age_ms: int,
        max_age_ms: int,
        moved_here: bool = False,
    ) -> ReattachVerdict:
        """The verdict on ``req`` (the session has checked its lifetime and TTL).
        ``moved_here``: the binding moved to this very address by a binding mark, to
        ``epoch`` (docs/wire-format.md): a request that expected the epoch before it is
        that move's own (late) request, answered with the ACK of the binding as it is,
        without a second token."""
        verdict = self.nonces.check(req.nonce)
        if verdict is NonceVerdict.DUPLICATE and self._last_ack is not None:
            if self._last_ack[0] == req.nonce:
                return _REPEAT_ACK if at_binding else _REPLAY
        if verdict is not NonceVerdict.ACCEPTED:
            return _refused_nonce(verdict, req.expected_epoch == epoch)
        confirms_move = moved_here and at_binding and req.expected_epoch + 1 == epoch
        if req.expected_epoch != epoch and not confirms_move:
            return _WRONG_EPOCH
        if age_ms > max_age_ms:
            return _TOO_OLD
        if confirms_move:
            return _COMMIT
        if not self._bucket.allow(now):
            return _RATE_LIMITED
        return _COMMIT if validated else _HOLD

    def commit_valid(
        self, nonce: int, expected_epoch: int, epoch: int, age_ms: int, max_age_ms: int,
        now: float,
    ) -> bool:  # fmt: skip
        """:meth:`check` and :meth:`commit` in one for a request from a validated address
        (the receive fast path, no request object): True when ``check`` would say COMMIT
        (the nonce is then committed and a token spent); False changes nothing."""
        if (
            self.nonces.check(nonce) is not NonceVerdict.ACCEPTED
            or expected_epoch != epoch
            or age_ms > max_age_ms
            or not self._bucket.allow(now)
        ):
            return False
        self.nonces.commit(nonce)
        return True

    def allow_move(self, now: float) -> bool:
        """A binding mark would move the binding: it spends a token of the same bucket as
        a request (one move, one token)."""
        return self._bucket.allow(now)

    def hold(self, req: ReattachRequest, addr: Addr) -> None:
        """Answer ``req`` once ``addr`` proves it is the client's (one held at a time)."""
        self._held = (req, addr)

    def release(self, addr: Addr) -> ReattachRequest | None:
        """The request held for ``addr`` (now validated), taken out; else None."""
        if self._held is None or self._held[1] != addr:
            return None
        req, self._held = self._held[0], None
        return req

    def forget_held(self) -> None:
        self._held = None

    def commit(self, req: ReattachRequest) -> None:
        """``req`` passed every check: its nonce is used up (whatever the commit does)."""
        self.nonces.commit(req.nonce)

    def acked(self, nonce: int, ack: ReattachAck) -> None:
        """The request ``nonce`` was answered by ``ack`` (repeated for a retransmission)."""
        self._last_ack = (nonce, ack)


def _refused_nonce(verdict: NonceVerdict, epoch_ok: bool) -> ReattachVerdict:
    if verdict in (NonceVerdict.DUPLICATE, NonceVerdict.STALE):
        # Not a replay: an exact replay never gets here (the AEAD replay window drops it as
        # Drop.REPLAY with a SECURITY_EVENT). An older nonce inside a freshly sealed,
        # authenticated datagram comes from the key holder: a request overtaken by a newer
        # one (reordering, AT-47). Stale, answered with the current epoch, no security
        # event, no escalation.
        return _OVERTAKEN if epoch_ok else _WRONG_EPOCH
    if verdict is NonceVerdict.WINDOW_EXCEEDED:
        return _WINDOW_EXCEEDED
    return _MALFORMED
