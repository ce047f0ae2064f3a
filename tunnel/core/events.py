"""One event vocabulary for the TUI, the JSONL trace, the SIEM sink and the tests.

Every event is a frozen, slotted dataclass. The base fields are those of the observability
contract (SPEC-DIGEST §3.3): ``ts_ms``, ``session_id``, ``node_id``, ``policy_version`` and
``state_version``. Reason codes are lowercase snake case (DESIGN D6: the spec convention);
the mapping to the UPPER_SNAKE names of the source docs is in docs/events.md.

No event carries key material, payload bytes or proofs: fields are ids, numbers, states,
reason codes and path labels only (AT-54).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any, ClassVar, TypedDict


class Reason(StrEnum):
    """Reason codes. Append only: the wire carries a member's index in WIRE_REASONS."""

    # establishment
    ATTACHED_TO_TRANSPORT = "attached_to_transport"
    HANDSHAKE_FAILED = "handshake_failed"
    # volatility signals (ATTACHED -> VOLATILE)
    LOSS_THRESHOLD_EXCEEDED = "loss_threshold_exceeded"
    CONSECUTIVE_DROP_EXCEEDED = "consecutive_drop_exceeded"
    LATENCY_THRESHOLD_EXCEEDED = "latency_threshold_exceeded"
    HEARTBEAT_TIMEOUT = "heartbeat_timeout"
    TRANSPORT_DEAD = "transport_dead"
    # switching and recovery
    LOSS_RECOVERY = "loss_recovery"
    LATENCY_RECOVERY = "latency_recovery"
    DEAD_TRANSPORT_RECOVERY = "dead_transport_recovery"
    POLICY_FORCED_RECOVERY = "policy_forced_recovery"
    MANUAL_SWITCH = "manual_switch"
    NAT_REBIND = "nat_rebind"
    RECOVERY_RETRY = "recovery_retry"
    REATTACH_SUCCESS = "reattach_success"
    TRANSPORT_RESUMED = "transport_resumed"
    STABILITY_RESTORED = "stability_restored"
    # degradation and denials
    VOLATILE_PERSISTED = "volatile_persisted"
    SWITCH_RATE_LIMITED = "switch_rate_limited"
    COOLDOWN_ACTIVE = "cooldown_active"
    NO_VALID_CANDIDATE = "no_valid_candidate"
    NO_CANDIDATE_TRANSPORTS = "no_candidate_transports"
    REATTACH_VALIDATION_FAILED = "reattach_validation_failed"
    POLICY_DENIED = "policy_denied"
    RECOVERY_WINDOW_EXCEEDED = "recovery_window_exceeded"
    SECURITY_FAILURES_REPEATED = "security_failures_repeated"
    # termination
    SESSION_LIFETIME_EXCEEDED = "session_lifetime_exceeded"
    TRANSPORT_TTL_EXCEEDED = "transport_ttl_exceeded"
    SECURITY_FAILURE = "security_failure"
    OPERATOR_TERMINATED = "operator_terminated"
    PEER_TERMINATED = "peer_terminated"
    DEGRADED_TIMEOUT = "degraded_timeout"
    INVARIANT_VIOLATION = "invariant_violation"
    STATE_VERSION_EXHAUSTED = "state_version_exhausted"
    SESSION_REPLACED = "session_replaced"
    OWNERSHIP_CONFLICT = "ownership_conflict"
    # reattach denials (spec/security-binding §8, plus D3/D4 additions)
    UNKNOWN_SESSION = "unknown_session"
    INVALID_STATE_FOR_REATTACH = "invalid_state_for_reattach"
    SESSION_EXPIRED = "session_expired"
    BAD_PROOF = "bad_proof"
    REPLAY_DETECTED = "replay_detected"
    STALE_REQUEST = "stale_request"
    INVALID_TRANSPORT_CANDIDATE = "invalid_transport_candidate"
    ATOMICITY_FAILED = "atomicity_failed"
    STALE_STATE_VERSION = "stale_state_version"
    STALE_BINDING_EPOCH = "stale_binding_epoch"
    PATH_NOT_VALIDATED = "path_not_validated"
    RATE_LIMITED = "rate_limited"
    NONCE_WINDOW_EXCEEDED = "nonce_window_exceeded"
    MALFORMED_REQUEST = "malformed_request"
    # keys
    TIME_ELAPSED = "time_elapsed"
    KEY_EXPIRED = "key_expired"
    # policy and diagnostics
    POLICY_INVALID = "policy_invalid"
    POLICY_APPLIED = "policy_applied"
    INVALID_STATE_TRANSITION = "invalid_state_transition"
    UNEXPECTED_RESPONSE = "unexpected_response"
    SESSION_FIXATION_ATTEMPT = "session_fixation_attempt"
    UNKNOWN_CLIENT_KEY = "unknown_client_key"
    EVENT_LOSS = "event_loss"
    PROTOCOL_VERSION_MISMATCH = "protocol_version_mismatch"
    # demo (jvpn-tui --demo: a scripted or keyed impairment was applied)
    DEMO_ACTION = "demo_action"
    # handshakes the gateway cannot answer
    WRONG_GATEWAY_KEY = "wrong_gateway_key"
    # the kernel's view of the client's paths (netlink; docs/client.md "Link monitor")
    LINK_DOWN = "link_down"
    LINK_UP = "link_up"
    NETLINK_UNAVAILABLE = "netlink_unavailable"
    # the gateway lost the session or is going away (DESIGN D15c, docs/client.md)
    GATEWAY_LOST_STATE = "gateway_lost_state"
    GATEWAY_SHUTDOWN = "gateway_shutdown"
    # the data cipher negotiated in the handshake (tunnel/core/ciphers.py)
    CIPHER_MISMATCH = "cipher_mismatch"
    # a gateway cluster on etcd (docs/cluster.md)
    STORE_UNAVAILABLE = "store_unavailable"
    OWNED_ELSEWHERE = "owned_elsewhere"
    OWNER_FENCED = "owner_fenced"
    OWNERSHIP_MOVED = "ownership_moved"
    # inner routing follows the owner (gateway cluster, tunnel/gateway/routehook.py)
    ROUTE_HOOK_FAILED = "route_hook_failed"


WIRE_REASONS: tuple[Reason, ...] = tuple(Reason)
"""Wire code of a reason = its index here. Members are only ever appended to Reason."""
_WIRE_INDEX = {r: i for i, r in enumerate(WIRE_REASONS)}


def reason_to_wire(reason: Reason) -> int:
    return _WIRE_INDEX[reason]


def reason_from_wire(code: int) -> Reason | None:
    """The reason for a wire code, or None for a code this build does not know."""
    return WIRE_REASONS[code] if 0 <= code < len(WIRE_REASONS) else None


class HandshakeFailure(StrEnum):
    """What the client saw before its handshake deadline passed without a session: the
    reason ``handshake_failed`` precisely, as far as the client can know it."""

    NO_ANSWER = "no_answer"
    """Nothing came back on any path: the gateway is down, blocked, does not know this
    client's key, or is not the gateway whose key is configured (it stays silent then)."""
    UNVERIFIED_ANSWER = "unverified_answer"
    """Answers came back, but none verified with the configured gateway key: something
    other than that gateway answers, or the answers were forged or damaged."""
    GATEWAY_UNDER_LOAD = "gateway_under_load"
    """The gateway answered with a cookie (it is under load) and no session followed: it
    is rate-limiting handshakes, or it does not know this client's key."""


class EventBase(TypedDict):
    """The base fields every event of a session carries (built once per event batch)."""

    ts_ms: int
    session_id: str
    node_id: str
    policy_version: str
    state_version: int


class EventType(StrEnum):
    STATE_CHANGE = "STATE_CHANGE"
    SESSION_CREATED = "SESSION_CREATED"
    TRANSPORT_ATTACHED = "TRANSPORT_ATTACHED"
    TRANSPORT_SWITCH = "TRANSPORT_SWITCH"
    TRANSPORT_SWITCH_DENIED = "TRANSPORT_SWITCH_DENIED"
    TRANSPORT_DEAD = "TRANSPORT_DEAD"
    REATTACH_ATTEMPT = "REATTACH_ATTEMPT"
    REATTACH_RESULT = "REATTACH_RESULT"
    PATH_VALIDATED = "PATH_VALIDATED"
    PATH_HEALTH = "PATH_HEALTH"
    PEER_STATE = "PEER_STATE"
    SECURITY_EVENT = "SECURITY_EVENT"
    POLICY_EVENT = "POLICY_EVENT"
    DIAGNOSTIC = "DIAGNOSTIC"
    KEY_ROTATED = "KEY_ROTATED"
    DROP_SUMMARY = "DROP_SUMMARY"
    SESSION_TERMINATED = "SESSION_TERMINATED"
    EVENT_LOSS = "EVENT_LOSS"
    PATH_ADDED = "PATH_ADDED"
    PATH_REMOVED = "PATH_REMOVED"
    SINK_HEALTH = "SINK_HEALTH"
    SESSION_LINKED = "SESSION_LINKED"
    SESSION_OWNER_ACQUIRED = "SESSION_OWNER_ACQUIRED"
    SESSION_OWNER_TRANSFERRED = "SESSION_OWNER_TRANSFERRED"
    SESSION_OWNER_REJECTED = "SESSION_OWNER_REJECTED"
    SESSION_OWNER_CONFLICT = "SESSION_OWNER_CONFLICT"
    SESSION_OWNER_RELEASED = "SESSION_OWNER_RELEASED"


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Base of every event."""

    event_type: ClassVar[EventType]
    ts_ms: int
    """Wall-clock milliseconds (the driver's clock offset applied to the core's ``now``)."""
    session_id: str
    """Hex of the 16-byte session id; empty before the handshake assigned one."""
    node_id: str
    """Which endpoint produced the event (client name or gateway node id)."""
    policy_version: str
    """Version of the policy the session runs under."""
    state_version: int
    """The session's state_version when the event was produced (after a transition: the new one)."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"event_type": str(self.event_type)}
        for name in field_names(type(self)):
            value = getattr(self, name)
            if isinstance(value, StrEnum):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[name] = value
        return out


_FIELD_NAMES: dict[type[Event], tuple[str, ...]] = {}
"""One entry per Event class: bounded by the classes in this module."""


def field_names(cls: type[Event]) -> tuple[str, ...]:
    """The field names of an event class, in order, computed once per class.

    Not ``dataclasses.fields()`` per event: it builds its tuple from a generator, which
    CPython sizes by resizing, so the tuple never comes from the free list of its size
    but is returned to it when freed. Called for every event, that moved one tuple per
    event onto the free lists of 11- to 19-item tuples, which only a full garbage
    collection empties (up to 2,000 tuples per size): part of the client's slow RSS rise
    under flapping (issue 12; ``bench/soak.py --trace-objects 0`` shows the free lists).
    """
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in fields(cls))
    return names


@dataclass(frozen=True, slots=True, kw_only=True)
class StateChange(Event):
    """Exactly one per state_version (I-OBS-1)."""

    event_type: ClassVar[EventType] = EventType.STATE_CHANGE
    previous_state: str
    """State before the transition."""
    new_state: str
    """State after the transition."""
    reason_code: Reason
    """The one primary reason of the transition."""
    trigger: str
    """The trigger of the transition table that fired."""
    edge: str
    """Id of the transition-table edge (T01...), for audit."""
    from_transport: int | None = None
    """Active transport before the transition (into RECOVERING: the one that died)."""
    candidate_set_size: int | None = None
    """Live candidates when entering RECOVERING."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionCreated(Event):
    event_type: ClassVar[EventType] = EventType.SESSION_CREATED
    peer: str
    """Client name (gateway side) or gateway label (client side); never a key."""
    inner_address: str
    """Inner (tunnel) address of the client."""
    cipher: str = ""
    """Data cipher negotiated in the handshake (``aes-256-gcm`` or ``chacha20-poly1305``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionLinked(Event):
    """A new session continues an old one the gateway no longer knows (DESIGN D15c): the
    old one ended (SESSION_TERMINATED with ``reason_code``) and this one, with the same
    inner addresses, took its place. ``session_id`` is the new session's."""

    event_type: ClassVar[EventType] = EventType.SESSION_LINKED
    previous_session_id: str
    """Hex id of the session this one replaces (empty when the gateway's INIT named none)."""
    reason_code: Reason
    """Why the old session ended: gateway_lost_state (the gateway answered a new handshake
    and did not know the old session) or gateway_shutdown (it said it was stopping)."""
    inner_address: str
    """Inner IPv4 address of the new session (the old one's: inner connections survive)."""
    inner_address6: str = ""
    """Inner IPv6 address of the new session (empty: none)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TransportAttached(Event):
    event_type: ClassVar[EventType] = EventType.TRANSPORT_ATTACHED
    transport_id: int
    """Path id (client) or -1 (gateway; see ``path``)."""
    path: str
    """Human label of the path (addresses, never secrets)."""
    binding_epoch: int
    """Gateway binding epoch after the attach."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TransportSwitch(Event):
    event_type: ClassVar[EventType] = EventType.TRANSPORT_SWITCH
    previous_transport: int | None
    """Active transport before the switch (None when there was none)."""
    new_transport: int
    """Active transport after the switch."""
    reason_code: Reason
    """Why the switch happened."""
    switch_latency_ms: float
    """Decision (or death detection) to committed binding."""
    binding_epoch: int
    """Gateway binding epoch after the switch."""
    candidate_count: int = 0
    """Live candidates considered."""
    loss_ratio: float | None = None
    """Loss ratio of the new transport at the switch."""
    latency_estimate_ms: float | None = None
    """Smoothed RTT of the new transport at the switch."""
    path: str = ""
    """Label of the new path."""
    explicit: bool = True
    """Always true: switches are never implicit."""
    auditable: bool = True
    """Always true: every switch is in the audit stream."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TransportSwitchDenied(Event):
    event_type: ClassVar[EventType] = EventType.TRANSPORT_SWITCH_DENIED
    reason_code: Reason
    """switch_rate_limited, cooldown_active, no_valid_candidate, policy_denied, a reject reason."""
    requested_transport: int | None
    """The transport the switch would have moved to (the operator's choice, or the
    candidate the session chose); None when there was none (no valid candidate)."""
    manual: bool = False
    """True when an operator asked for the switch."""
    retry_after_ms: float | None = None
    """When the switch limiter allows a switch again (switch_rate_limited, cooldown_active);
    None for any other reason."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TransportDead(Event):
    event_type: ClassVar[EventType] = EventType.TRANSPORT_DEAD
    transport_id: int
    """The transport declared dead."""
    silence_ms: float
    """Time since the last authenticated inbound packet on it."""
    reason_code: Reason = Reason.TRANSPORT_DEAD
    """transport_dead (silence: nothing authenticated arrived for the dead time) or
    link_down (the kernel said the path cannot carry anything: see ``detail``)."""
    detail: str = ""
    """With link_down: the kernel's message (interface, what changed); else empty."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ReattachAttempt(Event):
    event_type: ClassVar[EventType] = EventType.REATTACH_ATTEMPT
    candidate_transport: int
    """Path the REATTACH_REQUEST is sent on (a switch by binding mark: the path its marked
    datagrams go to, docs/wire-format.md)."""
    nonce: int
    """The request's monotonic nonce (not a secret); a switch by binding mark sends its
    request with it only if the move is not confirmed in time."""
    expected_epoch: int
    """Binding epoch the request expects."""
    kind: str
    """recovery (after a death), proactive (automatic switch), manual (the operator's
    switch) or resume (re-assert the binding on the active path: the operator's reattach,
    or the gateway lost the binding)."""
    recovery_deadline_ms: int | None = None
    """Wall ms at which the recovery window closes (recovery only)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ReattachResult(Event):
    event_type: ClassVar[EventType] = EventType.REATTACH_RESULT
    status: str
    """SUCCESS or DENIED."""
    reason_code: Reason
    """reattach_success or the denial reason."""
    candidate_transport: int | None = None
    """Client: path id; gateway: -1 (see ``path``)."""
    path: str = ""
    """Label of the candidate path."""
    fatal: bool = False
    """A fatal denial terminates the session."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PathValidated(Event):
    event_type: ClassVar[EventType] = EventType.PATH_VALIDATED
    path: str
    """Label (address) of the path that answered the challenge or probe."""
    transport_id: int | None = None
    """Client path id, when known."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PathAdded(Event):
    """A candidate path appeared (client ``paths = "auto"``: an interface or address came
    up). It is probed at once and becomes a standby once it answers."""

    event_type: ClassVar[EventType] = EventType.PATH_ADDED
    transport_id: int
    """Its path id (a path that comes back keeps the id it had)."""
    path: str
    """Its label."""
    interface: str = ""
    """The local interface it leaves through."""
    address: str = ""
    """The local address it is bound to."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PathRemoved(Event):
    """A candidate path left (its interface or address went away): it is no candidate any
    more; the active one died first (TRANSPORT_DEAD ``link_down``, recovery elsewhere)."""

    event_type: ClassVar[EventType] = EventType.PATH_REMOVED
    transport_id: int
    """Its path id (not given to another path while the session lives)."""
    path: str
    """Its label."""
    detail: str = ""
    """Why: what the kernel said."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PathHealthChanged(Event):
    event_type: ClassVar[EventType] = EventType.PATH_HEALTH
    transport_id: int
    """Path id."""
    alive: bool
    """Whether the path is answering."""
    classification: str
    """'healthy' or the volatility reason."""
    rtt_ms: float | None
    """Smoothed RTT."""
    loss_ratio: float
    """Probe round trips lost over the window."""
    loss_up: float
    """Client -> gateway loss over the window (from the gateway's probe count)."""
    loss_down: float
    """Gateway -> client loss over the window."""
    score: float
    """Selection score."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerState(Event):
    event_type: ClassVar[EventType] = EventType.PEER_STATE
    peer_state: str
    """The other endpoint's state as it reported it."""
    peer_state_version: int
    """The other endpoint's state_version."""
    binding_epoch: int
    """The gateway's binding epoch."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SecurityEvent(Event):
    event_type: ClassVar[EventType] = EventType.SECURITY_EVENT
    violation_type: str
    """REPLAY_DETECTED, INVALID_PROOF, STALE_REQUEST, UNKNOWN_CLIENT, FIXATION_ATTEMPT,
    WRONG_GATEWAY_KEY, RETIRED_KEY_PHASE, ..."""
    reason_code: Reason
    """Lowercase reason."""
    count: int = 1
    """How many such violations this event stands for (rate-limited reporting)."""
    source: str = ""
    """Source address label, when known."""
    transport_id: int | None = None
    """Client path id, when known."""
    key_fingerprint: str = ""
    """Fingerprint (``SHA256:...``) of the public key concerned (UNKNOWN_CLIENT: the key
    the refused client offered); empty when none. Never a key."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyEvent(Event):
    event_type: ClassVar[EventType] = EventType.POLICY_EVENT
    policy_name: str
    """What fired: POLICY_LOADED, POLICY_INVALID, SESSION_DENIED, SWITCH_RATE_LIMIT_EXCEEDED, ..."""
    reason_code: Reason
    """Lowercase reason."""
    detail: str = ""
    """Human-readable detail (the validation error for an invalid policy)."""
    threshold_value: float | None = None
    """The limit that applied."""
    observed_value: float | None = None
    """The value that hit it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Diagnostic(Event):
    event_type: ClassVar[EventType] = EventType.DIAGNOSTIC
    reason_code: Reason
    """What was wrong."""
    detail: str
    """Human-readable detail."""
    state: str = ""
    """State when it happened."""


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyRotated(Event):
    event_type: ClassVar[EventType] = EventType.KEY_ROTATED
    key_phase: int
    """The new key phase."""
    reason_code: Reason = Reason.TIME_ELAPSED
    initiator: str = "local"
    """local (we rotated) or peer (we followed the peer)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DropSummary(Event):
    event_type: ClassVar[EventType] = EventType.DROP_SUMMARY
    counts: tuple[tuple[str, int], ...]
    """(drop reason, datagrams dropped since the last summary), sorted by reason."""
    total: int
    """Total drops since start."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionTerminated(Event):
    event_type: ClassVar[EventType] = EventType.SESSION_TERMINATED
    reason_code: Reason
    """Why the session ended."""
    session_age_ms: float
    """Time since the session was born."""
    transportless_age_ms: float
    """Time without an active transport at termination (0 when one was active)."""
    total_switches: int
    """Committed transport switches over the session's life."""
    initiator: str = "local"
    """local or peer."""
    handshake_failure: HandshakeFailure | None = None
    """With ``handshake_failed`` (client): what came back before the deadline, ``no_answer``,
    ``unverified_answer`` or ``gateway_under_load`` (docs/client.md); else null."""

    def to_dict(self) -> dict[str, Any]:
        out = Event.to_dict(self)
        out["total_lifetime_ms"] = self.session_age_ms
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionOwner(Event):
    """A gateway cluster node's ownership of a session (docs/cluster.md): the base of the
    SESSION_OWNER_* events. ``mono`` is the node's ``time.monotonic()`` (CLOCK_MONOTONIC,
    system-wide on Linux): intervals of several nodes on one host compare."""

    event_type: ClassVar[EventType] = EventType.SESSION_OWNER_ACQUIRED
    owner_epoch: int
    """The owner epoch (1 at creation, +1 at every move between nodes)."""
    mono: float
    """The node's monotonic clock when it happened (seconds)."""
    peer_node: str = ""
    """The other node: the previous owner (ACQUIRED, TRANSFERRED on the new owner), the
    new one (TRANSFERRED and RELEASED on the old owner), or the holder (REJECTED)."""
    reason_code: Reason | None = None
    """REJECTED/CONFLICT/RELEASED: why (``store_unavailable``, ``owned_elsewhere``,
    ``ownership_conflict``, ``owner_fenced``, ``ownership_moved``, the end reason ...)."""
    forwarded: int = 0
    """RELEASED and TRANSFERRED on the old owner: inner packets this node forwarded for the
    session (both directions) in the ownership interval that ended."""
    first_forward_mono: float | None = None
    """Bounds of that forwarding (monotonic seconds; null when nothing was forwarded):
    every packet left within [first_forward_mono, last_forward_mono]."""
    last_forward_mono: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionOwnerTransferred(SessionOwner):
    event_type: ClassVar[EventType] = EventType.SESSION_OWNER_TRANSFERRED


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionOwnerRejected(SessionOwner):
    event_type: ClassVar[EventType] = EventType.SESSION_OWNER_REJECTED


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionOwnerConflict(SessionOwner):
    event_type: ClassVar[EventType] = EventType.SESSION_OWNER_CONFLICT


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionOwnerReleased(SessionOwner):
    event_type: ClassVar[EventType] = EventType.SESSION_OWNER_RELEASED
