"""Mirroring each session's state into the ownership store (DESIGN D15).

:class:`OwnershipMirror` is a component the
:class:`~tunnel.gateway.runtime.GatewayRuntime` owns; its pump calls
:meth:`OwnershipMirror.mirror` for every STATE_CHANGE before any reply leaves. A session's
record is created at its first transition and then replaced only by compare-and-swap from
the version this node last wrote; a terminated session's record is removed. A failed CAS
(or a store that cannot answer) means this node is not authoritative: a diagnostic
(``stale_state_version``) and a SECURITY_EVENT (``ownership_conflict``) are emitted, the
session is terminated with ``ownership_conflict`` (TERMINATE sent to the client), and the
store is not touched again for it. The mirror counts its own conflicts and store errors.
With a persistent store, each record also carries the session's sealed resume state
(:class:`~tunnel.gateway.resume.SessionPersistence`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from tunnel.core.events import Diagnostic, Reason, SecurityEvent, StateChange
from tunnel.core.gateway import GatewaySession, GatewaySessions
from tunnel.core.session import State
from tunnel.ownership import SessionRecord, SessionStore, StoreUnavailable

if TYPE_CHECKING:
    from tunnel.gateway.resume import SessionPersistence


class OwnershipMirror:
    """The session-store mirror of one gateway node (see the module docstring)."""

    def __init__(
        self, gateway: GatewaySessions, store: SessionStore, node_id: str,
        persistence: SessionPersistence | None = None,
        on_refused: Callable[[str, float], bool] | None = None,
    ) -> None:  # fmt: skip
        self._gateway: GatewaySessions = gateway
        self.persistence = persistence
        self.store: SessionStore = store
        self.node_id = node_id
        self.conflicts = 0
        """Failed CAS (or create) answers: this node was not authoritative."""
        self.errors = 0
        """Store calls that raised StoreUnavailable (also counted as conflicts)."""
        self.on_refused: Callable[[str, float], bool] | None = on_refused
        """A cluster node's handler of a refused write: True when it took the session
        away without a word to the client (another node serves it), instead of ending it."""
        self._by_sid: dict[str, GatewaySession] = {}
        self._not_authoritative: set[str] = set()

    def _session(self, session_id: str) -> GatewaySession | None:
        s = self._by_sid.get(session_id)
        if s is None:
            live = self._gateway.sessions.values()
            self._by_sid = {x.machine.session_id: x for x in live}
            self._not_authoritative &= set(self._by_sid)
            s = self._by_sid.get(session_id)
        return s

    def _resume(self, s: GatewaySession | None) -> bytes:
        if self.persistence is None or s is None or s.machine.terminated:
            return b""
        return self.persistence.sealed(s)

    def mirror(self, event: StateChange, now: float) -> None:
        """Write one transition to the store; on a conflict, end the session (D15)."""
        sid = event.session_id
        if sid in self._not_authoritative:
            return
        s = self._session(sid)
        record = SessionRecord(
            session_id=sid, state=event.new_state, state_version=event.state_version,
            binding_epoch=s.epoch if s is not None else 0, owner_node=self.node_id,
            policy_version=event.policy_version, updated_ms=event.ts_ms,
            resume=self._resume(s),
        )  # fmt: skip
        detail = ""
        try:
            if event.previous_state == State.BIRTH:
                ok = self.store.create(record)
                detail = "a record for this session already exists"
            else:
                ok = self.store.cas(sid, event.state_version - 1, record)
                detail = f"record is not at version {event.state_version - 1}"
            if ok and event.new_state == State.TERMINATED:
                self.store.delete(sid, event.state_version)
        except StoreUnavailable as exc:
            ok = False
            detail = f"store unavailable: {exc}"
            self.errors += 1
        if ok:
            if self.persistence is not None and s is not None:
                self.persistence.written(s)
            return
        self.conflicts += 1
        self._not_authoritative.add(sid)
        base = (
            s.machine.base(self._gateway.ts_ms(now))
            if s is not None
            else {
                "ts_ms": event.ts_ms, "session_id": sid, "node_id": self.node_id,
                "policy_version": event.policy_version, "state_version": event.state_version,
            }
        )  # fmt: skip
        # Seed §5: an unexpected state version is diagnosed, then ends the session.
        self._gateway.emit(
            Diagnostic(
                **base, reason_code=Reason.STALE_STATE_VERSION,
                detail=f"transition to {event.new_state} v{event.state_version} rejected by "
                f"the session store: {detail}", state=str(event.new_state),
            )
        )  # fmt: skip
        self._gateway.emit(
            SecurityEvent(
                **base, violation_type="OWNERSHIP_CONFLICT",
                reason_code=Reason.OWNERSHIP_CONFLICT, source=detail,
            )
        )  # fmt: skip
        if event.new_state == State.TERMINATED:
            return
        if self.on_refused is None or not self.on_refused(sid, now):
            self._gateway.terminate(sid, now, Reason.OWNERSHIP_CONFLICT)
