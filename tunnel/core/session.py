"""The session state machine as data (h11 style): an Enum, a table and one ``_transition``.

The table is the digest's reconciled graph T01-T15 with the DESIGN D2 choices:
hard death goes ATTACHED -> RECOVERING directly; VOLATILE/DEGRADED -> ATTACHED on same-path
stabilisation; a non-fatal reattach reject goes to DEGRADED, a fatal one to TERMINATED;
REATTACHING is not a state; a switch from a live path is one versioned rebind (R1-R3).

Both endpoints run this same table over their own view (D3). Each successful transition
adds exactly 1 to ``state_version`` and emits exactly one STATE_CHANGE; a rejected one
changes nothing and emits a DIAGNOSTIC. Reaching the version ceiling terminates the
session deterministically instead of wrapping.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Any

from tunnel.core.constants import MAX_STATE_VERSION
from tunnel.core.events import (
    Diagnostic,
    Event,
    EventBase,
    Reason,
    SessionTerminated,
    StateChange,
)


class State(StrEnum):
    BIRTH = "BIRTH"
    ATTACHED = "ATTACHED"
    VOLATILE = "VOLATILE"
    RECOVERING = "RECOVERING"
    DEGRADED = "DEGRADED"
    TERMINATED = "TERMINATED"


class Trigger(StrEnum):
    HANDSHAKE_OK = "handshake_ok"
    INSTABILITY = "instability"
    TRANSPORT_DEAD = "transport_dead"
    STABILITY_RESTORED = "stability_restored"
    DEGRADE = "degrade"
    SECURITY_ESCALATION = "security_escalation"
    RECOVERY_RETRY = "recovery_retry"
    REATTACH_OK = "reattach_ok"
    REBIND = "rebind"
    TERMINATE = "terminate"


S, T = State, Trigger

TRANSITIONS: dict[tuple[State, Trigger], tuple[str, State]] = {
    (S.BIRTH, T.HANDSHAKE_OK): ("T01", S.ATTACHED),
    (S.BIRTH, T.TERMINATE): ("T02", S.TERMINATED),
    (S.ATTACHED, T.INSTABILITY): ("T03", S.VOLATILE),
    (S.ATTACHED, T.TRANSPORT_DEAD): ("T04", S.RECOVERING),
    (S.VOLATILE, T.TRANSPORT_DEAD): ("T05", S.RECOVERING),
    (S.VOLATILE, T.STABILITY_RESTORED): ("T06", S.ATTACHED),
    (S.VOLATILE, T.DEGRADE): ("T07", S.DEGRADED),
    (S.DEGRADED, T.TRANSPORT_DEAD): ("T08", S.RECOVERING),
    (S.DEGRADED, T.RECOVERY_RETRY): ("T08", S.RECOVERING),
    (S.DEGRADED, T.STABILITY_RESTORED): ("T09", S.ATTACHED),
    (S.RECOVERING, T.REATTACH_OK): ("T10", S.ATTACHED),
    (S.RECOVERING, T.DEGRADE): ("T11", S.DEGRADED),
    (S.RECOVERING, T.TERMINATE): ("T12", S.TERMINATED),
    (S.DEGRADED, T.TERMINATE): ("T13", S.TERMINATED),
    (S.ATTACHED, T.TERMINATE): ("T14", S.TERMINATED),
    (S.VOLATILE, T.TERMINATE): ("T14", S.TERMINATED),
    # D2: a switch from a live path is one versioned rebind, never a pass through RECOVERING.
    (S.ATTACHED, T.REBIND): ("R1", S.ATTACHED),
    (S.VOLATILE, T.REBIND): ("R2", S.ATTACHED),
    (S.DEGRADED, T.REBIND): ("R3", S.ATTACHED),
    # Seed §3: repeated security failures may move a session to DEGRADED (no further).
    (S.ATTACHED, T.SECURITY_ESCALATION): ("X1", S.DEGRADED),
    (S.VOLATILE, T.SECURITY_ESCALATION): ("X1", S.DEGRADED),
    (S.RECOVERING, T.SECURITY_ESCALATION): ("X1", S.DEGRADED),
}
"""(state, trigger) -> (edge id, next state). Absent pairs are illegal (T15 for TERMINATED)."""

PRIORITY: dict[Trigger, int] = {
    T.TERMINATE: 0,
    T.TRANSPORT_DEAD: 1,
    T.INSTABILITY: 2,
    T.DEGRADE: 2,
    T.SECURITY_ESCALATION: 2,
    T.STABILITY_RESTORED: 3,
    T.RECOVERY_RETRY: 4,
    T.REATTACH_OK: 4,
    T.REBIND: 4,
    T.HANDSHAKE_OK: 4,
}
"""SPEC-DIGEST §2.4: TTL/termination > transport death > quality > stability. Lower wins."""

TERMINATION_PRIORITY: tuple[Reason, ...] = (
    Reason.SESSION_LIFETIME_EXCEEDED,
    Reason.OWNERSHIP_CONFLICT,
    Reason.TRANSPORT_TTL_EXCEEDED,
    Reason.RECOVERY_WINDOW_EXCEEDED,
)
"""Among simultaneous terminations, the session TTL wins, then ownership, then transport TTLs."""


def most_urgent(candidates: list[tuple[Trigger, Reason]]) -> tuple[Trigger, Reason] | None:
    """The one trigger to apply when several fire at the same tick (AT-08)."""
    if not candidates:
        return None

    def key(c: tuple[Trigger, Reason]) -> tuple[int, int]:
        trig, reason = c
        sub = TERMINATION_PRIORITY.index(reason) if reason in TERMINATION_PRIORITY else 99
        return (PRIORITY[trig], sub)

    return min(candidates, key=key)


class IllegalTransition(Exception):
    """Local code asked for a move the table does not allow (misuse, never network input)."""


class SessionMachine:
    """One endpoint's view of one session: state, state_version, and its audit stream.

    ``emit`` receives every event this machine produces. ``clock_ms`` returns the wall ms
    for event timestamps (the protocol machine provides it from ``now``). Slotted: a
    gateway holds one per session.
    """

    __slots__ = (
        "_emit", "_session_id", "history_edges", "max_version", "node_id", "policy_version",
        "state", "version",
    )  # fmt: skip

    def __init__(
        self,
        *,
        node_id: str,
        policy_version: str,
        emit: Callable[[Event], None],
        max_version: int = MAX_STATE_VERSION,
        session_id: str = "",
    ) -> None:
        """``session_id``: the hex id when it is known at creation (the gateway's), else
        set once by the handshake through :meth:`assign_id`."""
        self.node_id = node_id
        self.policy_version = policy_version
        self._session_id = session_id
        self.state = State.BIRTH
        self.version = 0
        self.max_version = max_version
        self._emit = emit
        self.history_edges = 0  # transitions taken, for audits (a counter, not a history list)

    @property
    def session_id(self) -> str:
        """Hex session id; empty until the handshake assigns it."""
        return self._session_id

    def assign_id(self, value: str) -> None:
        """Set once (handshake). AT-06: a later change of identity is refused, never applied."""
        if not value:
            raise ValueError("session id must not be empty")
        if self._session_id and value != self._session_id:
            raise IllegalTransition(
                f"session id is fixed for the life of the session ({self._session_id});"
                " a new identity needs a new session (TERMINATED + handshake)"
            )
        self._session_id = value

    @property
    def terminated(self) -> bool:
        return self.state is State.TERMINATED

    def resume_at(self, state: State, version: int) -> None:
        """A new machine continues a session another process ran (DESIGN D15a, a gateway
        restart): it takes that process's last committed state and version as they are (no
        transition, no event; the next transition is ``version + 1``). Misuse raises."""
        if self.state is not State.BIRTH or self.version != 0:
            raise IllegalTransition("only a new machine can resume a stored session")
        if state in (State.BIRTH, State.TERMINATED) or not 0 < version < self.max_version:
            raise IllegalTransition(f"cannot resume a session in {state} at version {version}")
        self.state = state
        self.version = version

    def policy_reloaded(self, policy_version: str) -> None:
        """A reloaded policy applies from now: later events carry its version."""
        self.policy_version = policy_version

    def can(self, trigger: Trigger) -> bool:
        return (self.state, trigger) in TRANSITIONS

    def base(self, ts_ms: int) -> EventBase:
        """The base fields every event of this session carries."""
        return {
            "ts_ms": ts_ms,
            "session_id": self.session_id,
            "node_id": self.node_id,
            "policy_version": self.policy_version,
            "state_version": self.version,
        }

    def fire(
        self,
        trigger: Trigger,
        reason: Reason | None,
        ts_ms: int,
        *,
        expect: State | None = None,
        **fields: Any,
    ) -> bool:
        """Apply ``trigger``. Returns True when the transition happened.

        ``expect`` is the target the caller believes it is moving to; a mismatch is an
        illegal request (AT-04: e.g. asking for ATTACHED -> BIRTH). An illegal or unreasoned
        request is rejected with a DIAGNOSTIC and no mutation.
        """
        entry = TRANSITIONS.get((self.state, trigger))
        if reason is None or entry is None or (expect is not None and entry[1] is not expect):
            what = f"{self.state} --{trigger}--> {expect or (entry[1] if entry else '?')}"
            why = "no reason code" if reason is None and entry else "not in the transition table"
            self._emit(
                Diagnostic(
                    **self.base(ts_ms),
                    reason_code=Reason.INVALID_STATE_TRANSITION,
                    detail=f"rejected {what}: {why}",
                    state=str(self.state),
                )
            )
            return False
        target = entry[1]
        if target is not State.TERMINATED and self.version + 1 >= self.max_version:
            # AT-09: the last version number is kept for an explicit, deterministic end.
            self._transition(T.TERMINATE, Reason.STATE_VERSION_EXHAUSTED, ts_ms, {})
            return False
        self._transition(trigger, reason, ts_ms, fields)
        return True

    def _transition(
        self, trigger: Trigger, reason: Reason, ts_ms: int, fields: dict[str, Any]
    ) -> None:
        edge, target = TRANSITIONS[(self.state, trigger)]
        previous = self.state
        self.state = target
        self.version += 1
        self.history_edges += 1
        change_fields = {
            k: fields.pop(k) for k in ("from_transport", "candidate_set_size") if k in fields
        }
        self._emit(
            StateChange(
                **self.base(ts_ms),
                previous_state=str(previous),
                new_state=str(target),
                reason_code=reason,
                trigger=str(trigger),
                edge=edge,
                **change_fields,
            )
        )
        if target is State.TERMINATED:
            self._emit(
                SessionTerminated(
                    **self.base(ts_ms),
                    reason_code=reason,
                    session_age_ms=fields.get("session_age_ms", 0.0),
                    transportless_age_ms=fields.get("transportless_age_ms", 0.0),
                    total_switches=fields.get("total_switches", 0),
                    initiator=fields.get("initiator", "local"),
                    handshake_failure=fields.get("handshake_failure"),
                )
            )

    def terminate(self, reason: Reason, ts_ms: int, **fields: Any) -> bool:
        """Explicit termination from any live state (T02/T12/T13/T14)."""
        if self.terminated:
            return False
        return self.fire(T.TERMINATE, reason, ts_ms, **fields)

    def corruption(self, detail: str, ts_ms: int, **fields: Any) -> None:
        """Seed §5: detected corruption -> DIAGNOSTIC, then deterministic termination."""
        self._emit(
            Diagnostic(
                **self.base(ts_ms),
                reason_code=Reason.INVARIANT_VIOLATION,
                detail=detail,
                state=str(self.state),
            )
        )
        self.terminate(Reason.INVARIANT_VIOLATION, ts_ms, **fields)


STATE_MEANING: dict[State, tuple[str, str]] = {
    S.BIRTH: ("session object exists, handshake in progress; state_version 0", "0"),
    S.ATTACHED: ("healthy: exactly one active binding that meets the quality floors", "1"),
    S.VOLATILE: ("active path over a quality threshold; adaptation under way", "1"),
    S.RECOVERING: ("active path died; a reattach on a candidate is in flight", "0"),
    S.DEGRADED: ("protective mode: persistent trouble, switch denied or recovery failed", "0 or 1"),
    S.TERMINATED: ("final and absorbing: identity ends, every later event is rejected", "0"),
}
"""State -> (meaning, active transports): rendered into docs/state-machine.md."""

EDGE_MEANING: dict[str, str] = {
    "T01": "handshake accepted and the first transport bound",
    "T02": "handshake failed or refused, or terminated before attaching",
    "T03": "loss, consecutive drops or latency over the policy threshold",
    "T04": "hard death of the active path; active := none",
    "T05": "the active path dies while VOLATILE",
    "T06": "the same path is healthy again for the stability window",
    "T07": "VOLATILE for too long, or a switch was denied",
    "T08": "a live candidate and the switch budget allow a new attempt (or the path died)",
    "T09": "the same path is healthy again for the stability window",
    "T10": "reattach validated and the new binding committed",
    "T11": "reattach rejected (non-fatal), no candidate, or recovery window with degrade",
    "T12": "fatal reattach reject, recovery window with terminate, TTL, operator",
    "T13": "policy bound reached in DEGRADED, TTL, operator",
    "T14": "session lifetime, transportless TTL, security, operator, peer, version exhausted",
    "R1": "versioned rebind from a live path (switch, NAT rebinding)",
    "R2": "proactive or manual switch away from a volatile path",
    "R3": "switch out of DEGRADED onto a better path",
    "X1": "repeated security failures on the session",
}
"""Edge id -> when it fires: rendered into docs/state-machine.md."""

_EDGE_ORDER = {"T": 0, "R": 1, "X": 2}


def _edge_key(edge: str) -> tuple[int, int]:
    return (_EDGE_ORDER[edge[0]], int(edge[1:]))


def _edges_in_order() -> list[tuple[str, State, Trigger, State]]:
    rows = [(edge, src, trig, dst) for (src, trig), (edge, dst) in TRANSITIONS.items()]
    return sorted(rows, key=lambda r: _edge_key(r[0]))


def mermaid_diagram() -> str:
    """The state diagram generated from TRANSITIONS (docs/state-machine.md embeds it)."""
    lines = ["stateDiagram-v2", "    [*] --> BIRTH"]
    for edge, src, trig, dst in _edges_in_order():
        lines.append(f"    {src} --> {dst}: {edge} {trig}")
    lines.append("    TERMINATED --> [*]")
    return "\n".join(lines) + "\n"


def transition_table_markdown() -> str:
    rows = ["| Edge | From | Trigger | To | When |", "|---|---|---|---|---|"]
    for edge, src, trig, dst in _edges_in_order():
        rows.append(f"| {edge} | {src} | `{trig}` | {dst} | {EDGE_MEANING[edge]} |")
    rows.append("| T15 | TERMINATED | any | (none) | rejected: no state or version change |")
    return "\n".join(rows) + "\n"


REGENERATE = ".venv/bin/python -m tunnel.core.session > docs/state-machine.md"
"""The command that rewrites docs/state-machine.md (tests/test_docs_state_machine.py)."""


def render_doc() -> str:
    """docs/state-machine.md, generated from the tables in this module."""
    states = ["| State | Meaning | Active transports |", "|---|---|---|"]
    for st in State:
        meaning, active = STATE_MEANING[st]
        states.append(f"| {st} | {meaning} | {active} |")
    prio = ["| Rank | Trigger |", "|---|---|"]
    for rank in sorted(set(PRIORITY.values())):
        trigs = ", ".join(f"`{t}`" for t in Trigger if PRIORITY[t] == rank)
        prio.append(f"| {rank} | {trigs} |")
    term = " > ".join(f"`{r}`" for r in TERMINATION_PRIORITY)
    accepted = ["| State | Accepted triggers |", "|---|---|"]
    for st in State:
        trigs = ", ".join(f"`{t}`" for t in Trigger if (st, t) in TRANSITIONS) or "none"
        accepted.append(f"| {st} | {trigs} |")
    parts = [
        "<!-- GENERATED from tunnel/core/session.py; do not edit by hand.",
        f"     Regenerate: {REGENERATE} -->",
        "",
        "# Session state machine",
        "",
        "Generated from `TRANSITIONS`, `PRIORITY` and `TERMINATION_PRIORITY` in",
        "`tunnel/core/session.py`; `tests/test_docs_state_machine.py` fails when this file is",
        f"stale. Regenerate with `{REGENERATE}`.",
        "",
        "Both endpoints run this one table over their own view of the session. Every accepted",
        "transition adds exactly 1 to `state_version` and emits exactly one `STATE_CHANGE`",
        "with a reason code; a rejected request changes nothing and emits a `DIAGNOSTIC`",
        "(`invalid_state_transition`). The session id is set once by the handshake and never",
        "changes. A transition that would reach the version ceiling ends the session instead",
        "(`TERMINATED`, `state_version_exhausted`); versions never wrap.",
        "",
        "## States",
        "",
        *states,
        "",
        "## Transitions",
        "",
        "T01-T15 follow the reconciled graph of SPEC-DIGEST §2.3 with the DESIGN D2 choices;",
        "R1-R3 are versioned rebinds (a switch from a live path never passes through",
        "RECOVERING); X1 is the security escalation of seed §3. Pairs absent from the table",
        "are illegal.",
        "",
        transition_table_markdown().rstrip("\n"),
        "",
        "### What commits T10 and R1-R3 (binding moves)",
        "",
        "The gateway's binding moves, and its transition fires, on one of: a validated",
        "REATTACH_REQUEST; a PATH_RESPONSE that completes a NAT rebinding (`nat_rebind`);",
        "or a *binding mark* (issue 10): the first authentic, newest DATA/CONTROL datagram",
        "marked with `epoch + 1` from an address the session validated earlier (a standby",
        "path that answered a PATH_CHALLENGE), within the reattach token bucket, the session",
        "lifetime and the transport TTL. The client fires the same transition when the",
        "REATTACH_ACK arrives, or, for a switch by mark, on the first datagram from the",
        "gateway on the new path marked as sent to its binding at the new epoch. Either way",
        "both ends change state exactly once, with the same events (TRANSPORT_SWITCH,",
        "REATTACH_RESULT), and the switch limiter and cooldown are checked before the",
        "client starts; a switch by mark only saves the round trip before traffic moves.",
        "Why it is safe: [wire-format.md](wire-format.md#binding-mark).",
        "",
        "## Diagram",
        "",
        "```mermaid",
        mermaid_diagram().rstrip("\n"),
        "```",
        "",
        "## Accepted triggers per state",
        "",
        *accepted,
        "",
        "## Trigger priority",
        "",
        "When several triggers are due at the same tick, the lowest rank wins (SPEC-DIGEST",
        "§2.4: session TTL > ownership conflict > transport death > quality > stability).",
        "",
        *prio,
        "",
        f"Among simultaneous terminations: {term}.",
        "",
    ]
    return "\n".join(parts)


if __name__ == "__main__":
    print(render_doc(), end="")
