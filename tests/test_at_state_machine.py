"""Acceptance tests AT-01..AT-09 and AT-20 (SPEC-DIGEST §10.1, §10.2): the state machine.

Level 1 and 2 of the test pyramid: the SessionMachine on its own, and a real client and
gateway over memory links with a fake clock (tests/simkit.py). No sockets, no sleeping.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from simkit import (
    CLIENT_INNER,
    GATEWAY_INNER,
    assert_gap_free,
    build,
    ipv4_packet,
    make_policy,
    of_type,
    state_changes,
)

from tunnel.core.constants import MAX_STATE_VERSION, MSG_CONTROL
from tunnel.core.events import Event, EventType, Reason
from tunnel.core.gateway_session import GatewaySession
from tunnel.core.session import (
    IllegalTransition,
    SessionMachine,
    State,
    Trigger,
    most_urgent,
)
from tunnel.core.wire import (
    STATE_CODES,
    Control,
    ReattachAck,
    ReattachKind,
    ReattachRequest,
    StateUpdate,
    Terminate,
    pack_control,
    parse_control,
)
from tunnel.io.memory import Simulation

SID = "5e" * 16

ROUTE: dict[State, list[Trigger]] = {
    State.BIRTH: [],
    State.ATTACHED: [Trigger.HANDSHAKE_OK],
    State.VOLATILE: [Trigger.HANDSHAKE_OK, Trigger.INSTABILITY],
    State.RECOVERING: [Trigger.HANDSHAKE_OK, Trigger.TRANSPORT_DEAD],
    State.DEGRADED: [Trigger.HANDSHAKE_OK, Trigger.INSTABILITY, Trigger.DEGRADE],
    State.TERMINATED: [Trigger.HANDSHAKE_OK, Trigger.TERMINATE],
}
"""A legal trigger sequence from BIRTH to each state."""

SPEC_EDGES: dict[tuple[State, Trigger], tuple[str, State]] = {
    # SPEC-DIGEST §2.3, the reconciled graph, with the choices of DESIGN D2.
    (State.BIRTH, Trigger.HANDSHAKE_OK): ("T01", State.ATTACHED),  # handshake accepted
    (State.BIRTH, Trigger.TERMINATE): ("T02", State.TERMINATED),  # rejected, TTL, operator
    (State.ATTACHED, Trigger.INSTABILITY): ("T03", State.VOLATILE),  # loss, drops, heartbeat
    (State.ATTACHED, Trigger.TRANSPORT_DEAD): ("T04", State.RECOVERING),  # D2: directly
    (State.VOLATILE, Trigger.TRANSPORT_DEAD): ("T05", State.RECOVERING),  # dies while VOLATILE
    (State.VOLATILE, Trigger.STABILITY_RESTORED): ("T06", State.ATTACHED),  # D2: same path
    (State.VOLATILE, Trigger.DEGRADE): ("T07", State.DEGRADED),  # persisted, switch denied
    (State.DEGRADED, Trigger.TRANSPORT_DEAD): ("T08", State.RECOVERING),
    (State.DEGRADED, Trigger.RECOVERY_RETRY): ("T08", State.RECOVERING),
    (State.DEGRADED, Trigger.STABILITY_RESTORED): ("T09", State.ATTACHED),  # D2: same path
    (State.RECOVERING, Trigger.REATTACH_OK): ("T10", State.ATTACHED),  # validated reattach only
    (State.RECOVERING, Trigger.DEGRADE): ("T11", State.DEGRADED),  # D2: non-fatal reject
    (State.RECOVERING, Trigger.TERMINATE): ("T12", State.TERMINATED),
    (State.DEGRADED, Trigger.TERMINATE): ("T13", State.TERMINATED),
    (State.ATTACHED, Trigger.TERMINATE): ("T14", State.TERMINATED),  # any non-terminal state
    (State.VOLATILE, Trigger.TERMINATE): ("T14", State.TERMINATED),
    # T15: nothing leaves TERMINATED.
    # DESIGN D2: a switch from a live path is one versioned rebind, never through RECOVERING.
    (State.ATTACHED, Trigger.REBIND): ("R1", State.ATTACHED),
    (State.VOLATILE, Trigger.REBIND): ("R2", State.ATTACHED),
    (State.DEGRADED, Trigger.REBIND): ("R3", State.ATTACHED),
    # Seed §3 (SPEC-DIGEST §9.3): repeated security failures may degrade, no further.
    (State.ATTACHED, Trigger.SECURITY_ESCALATION): ("X1", State.DEGRADED),
    (State.VOLATILE, Trigger.SECURITY_ESCALATION): ("X1", State.DEGRADED),
    (State.RECOVERING, Trigger.SECURITY_ESCALATION): ("X1", State.DEGRADED),
}
"""The legal (state, trigger) pairs and their (edge id, target), written from the spec:
the oracle for the machine's table (tunnel.core.session.TRANSITIONS is the code under test)."""

REASON_FOR: dict[Trigger, Reason] = {
    Trigger.HANDSHAKE_OK: Reason.ATTACHED_TO_TRANSPORT,
    Trigger.INSTABILITY: Reason.LOSS_THRESHOLD_EXCEEDED,
    Trigger.TRANSPORT_DEAD: Reason.TRANSPORT_DEAD,
    Trigger.STABILITY_RESTORED: Reason.STABILITY_RESTORED,
    Trigger.DEGRADE: Reason.VOLATILE_PERSISTED,
    Trigger.SECURITY_ESCALATION: Reason.SECURITY_FAILURES_REPEATED,
    Trigger.RECOVERY_RETRY: Reason.RECOVERY_RETRY,
    Trigger.REATTACH_OK: Reason.REATTACH_SUCCESS,
    Trigger.REBIND: Reason.MANUAL_SWITCH,
    Trigger.TERMINATE: Reason.OPERATOR_TERMINATED,
}


# == helpers ================================================================================
def new_machine(max_version: int = MAX_STATE_VERSION) -> tuple[SessionMachine, list[Event]]:
    events: list[Event] = []
    m = SessionMachine(
        node_id="n1", policy_version="test+0", emit=events.append, max_version=max_version
    )
    m.assign_id(SID)
    return m, events


def machine_in(state: State) -> tuple[SessionMachine, list[Event]]:
    m, events = new_machine()
    for i, trig in enumerate(ROUTE[state]):
        assert m.fire(trig, REASON_FOR[trig], 1000 + i)
    assert m.state is state
    events.clear()
    return m, events


def gw_session(sim: Simulation) -> GatewaySession:
    (s,) = sim.gateway.sessions.values()
    return s


def attached(**kw: Any) -> Simulation:
    sim = build(**kw)
    sim.advance(1.0)
    assert sim.client.state is State.ATTACHED
    assert gw_session(sim).machine.state is State.ATTACHED
    return sim


def from_client(sim: Simulation, msg: Control) -> bytes:
    """A genuine datagram sealed with the client's session keys (a valid-looking request)."""
    cipher = sim.client.cipher
    assert cipher is not None
    return cipher.seal(MSG_CONTROL, sim.client.peer_index, pack_control(msg))


def from_gateway(sim: Simulation, msg: Control) -> bytes:
    s = gw_session(sim)
    assert s.cipher is not None
    return s.cipher.seal(MSG_CONTROL, s.peer_index, pack_control(msg))


def reattach_request(sim: Simulation, *, epoch: int, path_id: int = 1) -> ReattachRequest:
    s = gw_session(sim)
    return ReattachRequest(
        nonce=s.nonces.last + 1,
        ts_ms=sim.client.ts_ms(sim.now),
        expected_epoch=epoch,
        path_id=path_id,
        kind=int(ReattachKind.RECOVERY),
        client_version=sim.client.machine.version,
    )


def scenario(sim: Simulation) -> None:
    """Kill, restore, manual switch, loss, NAT rebinding, operator end: many transitions."""
    sim.advance(1.0)
    sim.links[1].imp.up = False
    sim.advance(3.0)
    sim.links[1].imp.up = True
    sim.advance(3.0)
    sim.client.switch_to(1, sim.now)
    sim.advance(2.0)
    sim.links[1].imp.loss_up = sim.links[1].imp.loss_down = 0.4
    sim.advance(6.0)
    sim.links[1].imp.loss_up = sim.links[1].imp.loss_down = 0.0
    sim.advance(4.0)
    active = sim.client.active
    if active is not None:
        sim.links[active].rebind()  # NAT: the active path's source port changes
    for i in range(20):  # data from the new address: challenge, then a versioned rebind
        sim.client_tun.inject(ipv4_packet(CLIENT_INNER, GATEWAY_INNER, ident=i))
        sim.advance(0.1)
    sim.advance(2.0)
    sim.client.terminate(sim.now)
    sim.advance(1.0)


def check_stream(events: list[Any], machine: SessionMachine) -> None:
    """AT-07: one STATE_CHANGE per version, gap free, a consistent chain, reasons present."""
    assert_gap_free(events)
    changes = of_type(events, EventType.STATE_CHANGE)
    assert len(changes) == machine.version
    previous = str(State.BIRTH)
    for ev in changes:
        assert ev.previous_state == previous, ev
        assert isinstance(ev.reason_code, Reason) and ev.reason_code
        assert SPEC_EDGES[(State(ev.previous_state), Trigger(ev.trigger))] == (
            ev.edge,
            State(ev.new_state),
        )
        previous = ev.new_state
    assert previous == str(machine.state)
    # Every event carries the version current when it was produced: never decreasing.
    versions = [e.state_version for e in events if e.session_id]
    assert versions == sorted(versions)


# == AT-01 Determinism ======================================================================
def test_at01_machine_same_trigger_sequence_same_transitions_and_rejections() -> None:
    sequence = [
        (Trigger.HANDSHAKE_OK, Reason.ATTACHED_TO_TRANSPORT),
        (Trigger.TRANSPORT_DEAD, Reason.TRANSPORT_DEAD),
        (Trigger.REBIND, Reason.MANUAL_SWITCH),  # illegal in RECOVERING: rejected
        (Trigger.REATTACH_OK, Reason.REATTACH_SUCCESS),
        (Trigger.INSTABILITY, None),  # no reason: rejected
        (Trigger.INSTABILITY, Reason.LOSS_THRESHOLD_EXCEEDED),
        (Trigger.TERMINATE, Reason.SESSION_LIFETIME_EXCEEDED),
        (Trigger.TRANSPORT_DEAD, Reason.TRANSPORT_DEAD),  # after TERMINATED: rejected
    ]
    runs = []
    for _ in range(2):
        m, events = new_machine()
        results = [m.fire(t, r, 5000 + i) for i, (t, r) in enumerate(sequence)]
        runs.append((results, m.state, m.version, [e.to_dict() for e in events]))
    assert runs[0] == runs[1]
    results, state, version, dicts = runs[0]
    assert results == [True, True, False, True, False, True, True, False]
    assert (state, version) == (State.TERMINATED, 5)
    second = [d for d in dicts if d["event_type"] == "STATE_CHANGE"][1]
    assert (second["previous_state"], second["new_state"], second["state_version"]) == (
        "ATTACHED",
        "RECOVERING",
        2,
    )
    assert sum(d["event_type"] == "DIAGNOSTIC" for d in dicts) == 3


def _audit_view(events: list[Any]) -> list[tuple[Any, ...]]:
    keep = {
        EventType.STATE_CHANGE,
        EventType.TRANSPORT_SWITCH,
        EventType.TRANSPORT_SWITCH_DENIED,
        EventType.TRANSPORT_DEAD,
        EventType.REATTACH_RESULT,
        EventType.SESSION_TERMINATED,
        EventType.DIAGNOSTIC,
    }
    return [
        (
            e.event_type,
            e.ts_ms,
            e.state_version,
            getattr(e, "new_state", None),
            str(getattr(e, "reason_code", "")),
        )
        for e in events
        if e.event_type in keep
    ]


def test_at01_engines_same_inputs_same_timeline() -> None:
    runs = []
    for _ in range(2):
        sim = build(seed=11, start=True)
        scenario(sim)
        runs.append(
            (
                _audit_view(sim.client_events),
                _audit_view(sim.gateway_events),
                [e.to_dict() for e in sim.client_events],
            )
        )
    (client_a, gw_a, full_a), (client_b, gw_b, full_b) = runs
    assert client_a == client_b
    assert gw_a == gw_b
    assert full_a == full_b  # session id from the seeded urandom, times from the fake clock
    # The timeline has substance: recovery happened and the session ended on request.
    reasons = [r for (_, _, _, new, r) in client_a if new is not None]
    assert "transport_dead" in reasons and "reattach_success" in reasons
    assert reasons[-1] == "operator_terminated"


# == AT-02 Version increment ================================================================
def test_at02_version_3_attached_transport_dead_gives_4() -> None:
    m, events = new_machine()
    m.fire(Trigger.HANDSHAKE_OK, Reason.ATTACHED_TO_TRANSPORT, 1)
    m.fire(Trigger.INSTABILITY, Reason.LOSS_THRESHOLD_EXCEEDED, 2)
    m.fire(Trigger.STABILITY_RESTORED, Reason.STABILITY_RESTORED, 3)
    assert (m.state, m.version) == (State.ATTACHED, 3)
    assert m.fire(Trigger.TRANSPORT_DEAD, Reason.TRANSPORT_DEAD, 4)
    assert (m.state, m.version) == (State.RECOVERING, 4)
    assert events[-1].state_version == 4
    assert events[-1].new_state == "RECOVERING"


def test_at02_engine_transport_death_adds_exactly_one_per_transition() -> None:
    sim = attached()
    before = sim.client.machine.version
    sim.links[1].imp.up = False
    sim.advance(3.0)
    assert sim.client.state is State.ATTACHED and sim.client.active == 2
    assert state_changes(sim.client_events)[before:] == [
        ("ATTACHED", "RECOVERING", "transport_dead", before + 1),
        ("RECOVERING", "ATTACHED", "reattach_success", before + 2),
    ]
    assert sim.client.machine.version == before + 2


# == AT-03 Stale / future version ===========================================================
# Our design (DESIGN D3): the gateway is authoritative for the binding, and a reattach names
# the binding epoch it expects; each endpoint versions its own machine. So a stale or
# future *binding epoch* in REATTACH_REQUEST is what the gateway refuses, and a stale
# gateway state_version in STATE_UPDATE / REATTACH_ACK is what the client refuses.
@pytest.mark.parametrize("delta", [-1, +1], ids=["stale", "future"])
def test_at03_reattach_with_stale_or_future_epoch_rejected_without_mutation(delta: int) -> None:
    sim = attached()
    s = gw_session(sim)
    for link in sim.links.values():
        link.imp.up = False
    sim.advance(1.5)
    assert s.machine.state is State.RECOVERING and s.binding is None
    version, epoch, n_events = s.machine.version, s.epoch, len(sim.gateway_events)
    # A candidate path (2), validated by its probes; not the last binding, whose authentic
    # packets would resume the session by themselves.
    addr = sim.links[2].client_addr
    assert addr in s.validated and addr != s.last_binding

    request = reattach_request(sim, epoch=epoch + delta, path_id=2)
    sim.inject_to_gateway(from_client(sim, request), addr)
    sim.advance(0.0)
    new = sim.gateway_events[n_events:]
    assert (s.machine.state, s.machine.version, s.epoch, s.binding) == (
        State.RECOVERING,
        version,
        epoch,
        None,
    )
    (result,) = of_type(new, EventType.REATTACH_RESULT)
    assert (result.status, result.reason_code) == ("DENIED", Reason.STALE_BINDING_EPOCH)
    assert of_type(new, EventType.STATE_CHANGE) == []

    # Control: the same request naming the current epoch is accepted (+1, new binding).
    sim.inject_to_gateway(from_client(sim, reattach_request(sim, epoch=epoch, path_id=2)), addr)
    sim.advance(0.0)
    assert (s.machine.state, s.machine.version, s.epoch, s.binding) == (
        State.ATTACHED,
        version + 1,
        epoch + 1,
        addr,
    )


def test_at03_client_refuses_state_update_with_stale_gateway_version() -> None:
    sim = attached()
    c = sim.client
    peer_version, n = c.peer_version, len(sim.client_events)
    assert peer_version >= 1
    stale = StateUpdate(
        seq=1000,
        gw_state=STATE_CODES.index("RECOVERING"),
        gw_version=peer_version - 1,
        epoch=c.epoch,
        reason=0,
    )
    sim.inject_to_client(from_gateway(sim, stale), path_id=1)
    sim.advance(0.0)
    new = sim.client_events[n:]
    diags = of_type(new, EventType.DIAGNOSTIC)
    assert [e.reason_code for e in diags] == [Reason.STALE_STATE_VERSION]
    assert (c.peer_state, c.peer_version) == ("ATTACHED", peer_version)
    assert of_type(new, EventType.PEER_STATE) == []
    assert (c.state, c.machine.version, c.active) == (State.ATTACHED, 1, 1)


def test_at03_client_refuses_reattach_ack_with_stale_gateway_version() -> None:
    sim = attached()
    c = sim.client
    assert c.switch_to(2, sim.now) is None
    n = len(sim.client_events)
    sim.advance(0.0)
    (attempt,) = of_type(sim.client_events[n:], EventType.REATTACH_ATTEMPT)
    forged = ReattachAck(
        nonce=attempt.nonce,
        epoch=c.epoch + 1,
        gw_version=c.peer_version - 1,
        gw_state=STATE_CODES.index("ATTACHED"),
    )
    sim.inject_to_client(from_gateway(sim, forged), path_id=2)
    sim.advance(0.001)  # before the genuine ACK (two 10 ms link crossings)
    new = sim.client_events[n:]
    sec = of_type(new, EventType.SECURITY_EVENT)
    assert [e.reason_code for e in sec] == [Reason.STALE_STATE_VERSION]
    assert (c.state, c.machine.version, c.active) == (State.ATTACHED, 1, 1)
    assert of_type(new, EventType.TRANSPORT_SWITCH) == []
    # The genuine ACK still completes the switch: the forged one did not consume anything.
    sim.advance(1.0)
    assert (c.state, c.machine.version, c.active) == (State.ATTACHED, 2, 2)


# == AT-04 Illegal transitions ==============================================================
@pytest.mark.parametrize("state", [State.ATTACHED, State.VOLATILE, State.DEGRADED])
def test_at04_no_transition_into_birth(state: State) -> None:
    for trig in Trigger:
        m, events = machine_in(state)
        version = m.version
        assert not m.fire(trig, REASON_FOR[trig], 9, expect=State.BIRTH)
        assert (m.state, m.version) == (state, version)
        assert of_type(events, EventType.STATE_CHANGE) == []
        (diag,) = of_type(events, EventType.DIAGNOSTIC)
        assert diag.reason_code is Reason.INVALID_STATE_TRANSITION
        assert "BIRTH" in diag.detail


def test_at04_recovering_to_attached_only_by_validated_reattach() -> None:
    for trig in Trigger:
        if trig is Trigger.REATTACH_OK:
            continue
        m, events = machine_in(State.RECOVERING)
        assert not m.fire(trig, REASON_FOR[trig], 9, expect=State.ATTACHED), trig
        assert (m.state, m.version) == (State.RECOVERING, 2)
        assert of_type(events, EventType.STATE_CHANGE) == []
    m, _ = machine_in(State.RECOVERING)
    assert m.fire(Trigger.REATTACH_OK, Reason.REATTACH_SUCCESS, 9, expect=State.ATTACHED)


def test_at04_attached_to_attached_needs_a_reason() -> None:
    m, events = machine_in(State.ATTACHED)
    assert not m.fire(Trigger.REBIND, None, 9)
    assert (m.state, m.version) == (State.ATTACHED, 1)
    (diag,) = of_type(events, EventType.DIAGNOSTIC)
    assert "no reason code" in diag.detail
    assert of_type(events, EventType.STATE_CHANGE) == []
    # With a reason it is a legal, versioned rebind (R1).
    assert m.fire(Trigger.REBIND, Reason.NAT_REBIND, 10)
    assert (m.state, m.version) == (State.ATTACHED, 2)


def test_at04_the_spec_table_never_enters_birth_nor_leaves_terminated() -> None:
    # SPEC-DIGEST §2.5 (the literal table above is data: check it says what the spec says)
    assert all(target is not State.BIRTH for _, target in SPEC_EDGES.values())
    assert all(state is not State.TERMINATED for state, _ in SPEC_EDGES)
    assert {edge for edge, _ in SPEC_EDGES.values()} == {
        *(f"T{i:02}" for i in range(1, 15)), "R1", "R2", "R3", "X1",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("state", "trigger"), list(SPEC_EDGES), ids=[f"{s}-{t}" for s, t in SPEC_EDGES]
)
def test_at04_every_edge_of_the_spec_is_taken_to_its_target(state: State, trigger: Trigger) -> None:
    edge, target = SPEC_EDGES[(state, trigger)]
    m, events = machine_in(state)
    version = m.version
    assert m.fire(trigger, REASON_FOR[trigger], 9, expect=target)
    assert (m.state, m.version) == (target, version + 1)
    (change,) = of_type(events, EventType.STATE_CHANGE)
    assert (change.previous_state, change.new_state) == (str(state), str(target))
    assert (change.edge, change.trigger, change.state_version) == (edge, str(trigger), version + 1)
    assert change.reason_code is REASON_FOR[trigger]


@pytest.mark.parametrize("state", list(State))
def test_at04_every_pair_outside_the_table_is_rejected(state: State) -> None:
    for trig in Trigger:
        if (state, trig) in SPEC_EDGES:
            continue
        m, events = machine_in(state)
        version = m.version
        assert not m.fire(trig, REASON_FOR[trig], 9)
        assert (m.state, m.version) == (state, version)
        assert [e.event_type for e in events] == [EventType.DIAGNOSTIC]


def test_at04_detected_corruption_terminates_explicitly() -> None:
    m, events = machine_in(State.VOLATILE)
    m.corruption("two active transports", 9)
    assert (m.state, m.version) == (State.TERMINATED, 3)
    kinds = [e.event_type for e in events]
    assert kinds == [EventType.DIAGNOSTIC, EventType.STATE_CHANGE, EventType.SESSION_TERMINATED]
    assert events[1].reason_code is Reason.INVARIANT_VIOLATION
    assert events[2].reason_code is Reason.INVARIANT_VIOLATION


def test_at04_client_in_recovering_ignores_unsolicited_reattach_ack() -> None:
    sim = attached()
    c = sim.client
    for link in sim.links.values():
        link.imp.up = False
    sim.advance(0.6)
    assert c.state is State.RECOVERING
    version, n = c.machine.version, len(sim.client_events)
    forged = ReattachAck(
        nonce=999, epoch=c.epoch + 1, gw_version=50, gw_state=STATE_CODES.index("ATTACHED")
    )
    sim.inject_to_client(from_gateway(sim, forged), path_id=2)
    sim.advance(0.0)
    new = sim.client_events[n:]
    assert (c.state, c.machine.version, c.active) == (State.RECOVERING, version, None)
    assert of_type(new, EventType.STATE_CHANGE) == []
    security = of_type(new, EventType.SECURITY_EVENT)
    assert Reason.UNEXPECTED_RESPONSE in [e.reason_code for e in security]


# == AT-05 TERMINATED absorbing =============================================================
def test_at05_machine_terminated_rejects_every_trigger() -> None:
    m, events = machine_in(State.TERMINATED)
    for trig in Trigger:
        assert not m.fire(trig, REASON_FOR[trig], 9)
    assert not m.terminate(Reason.SESSION_LIFETIME_EXCEEDED, 10)
    assert (m.state, m.version) == (State.TERMINATED, 2)
    assert of_type(events, EventType.STATE_CHANGE) == []
    assert of_type(events, EventType.SESSION_TERMINATED) == []


def test_at05_gateway_terminated_session_refuses_valid_looking_reattach() -> None:
    sim = attached()
    s = gw_session(sim)
    addr = sim.links[1].client_addr
    request = from_client(sim, reattach_request(sim, epoch=s.epoch))  # valid before the end
    assert sim.gateway.terminate(s.machine.session_id, sim.now)
    sim.advance(0.5)
    assert s.machine.state is State.TERMINATED
    assert sim.client.state is State.TERMINATED  # TERMINATE reached the client
    version, n = s.machine.version, len(sim.gateway_events)
    wrong_state = sim.gateway.drops.get("wrong_state", 0)
    sent: list[Any] = []
    sim.taps.append(lambda d: sent.append(d) if not d.to_gateway else None)

    sim.inject_to_gateway(request, addr)
    sim.advance(5.0)  # also: no timer (TTL, transport death) moves a terminated session
    assert (s.machine.state, s.machine.version, s.binding) == (State.TERMINATED, version, None)
    assert sim.gateway.drops.get("wrong_state", 0) == wrong_state + 1
    new = sim.gateway_events[n:]
    assert of_type(new, EventType.STATE_CHANGE) == []
    assert of_type(new, EventType.REATTACH_RESULT) == []
    # No ACK, no reject: the authentic sender is only told (again) that the session ended.
    (answer,) = sent
    assert sim.client.cipher is not None
    plaintext = sim.client.cipher.open(answer.data, sim.now)
    assert isinstance(plaintext, bytes) and isinstance(parse_control(plaintext), Terminate)
    # Even the session id cannot be revived under another identity.
    with pytest.raises(IllegalTransition):
        s.machine.assign_id("00" * 16)


def test_at05_client_terminated_ignores_datagrams_timers_and_commands() -> None:
    sim = attached()
    c = sim.client
    c.terminate(sim.now)
    sim.advance(0.1)
    version, n = c.machine.version, len(sim.client_events)
    ack = ReattachAck(nonce=1, epoch=9, gw_version=9, gw_state=STATE_CODES.index("ATTACHED"))
    sim.inject_to_client(from_gateway(sim, ack), path_id=1)
    assert c.switch_to(2, sim.now) is Reason.INVALID_STATE_FOR_REATTACH
    c.force_reattach(sim.now)
    sim.advance(30.0)
    assert (c.state, c.machine.version, c.active) == (State.TERMINATED, version, None)
    assert of_type(sim.client_events[n:], EventType.STATE_CHANGE) == []
    assert c.next_deadline() is None


# == AT-06 Forced identity reset ============================================================
def test_at06_machine_refuses_a_new_session_id() -> None:
    m, events = machine_in(State.RECOVERING)
    with pytest.raises(IllegalTransition):
        m.assign_id("ff" * 16)
    assert m.session_id == SID
    m.assign_id(SID)  # re-asserting the same identity is harmless
    assert (m.state, m.version) == (State.RECOVERING, 2)
    assert m.fire(Trigger.REATTACH_OK, Reason.REATTACH_SUCCESS, 9)
    assert {e.session_id for e in events} == {SID}


def test_at06_gateway_cannot_reassign_identity_during_reattach() -> None:
    sim = attached()
    s = gw_session(sim)
    sid = s.machine.session_id
    for link in sim.links.values():
        link.imp.up = False
    sim.advance(1.5)
    assert s.machine.state is State.RECOVERING
    with pytest.raises(IllegalTransition):
        s.machine.assign_id("ab" * 16)  # server logic trying a new id mid-reattach
    assert s.machine.session_id == sid
    for link in sim.links.values():
        link.imp.up = True
    sim.advance(6.0)  # reattach, then the loss window of the outage clears
    assert s.machine.state is State.ATTACHED and sim.client.state is State.ATTACHED
    assert sim.client.machine.session_id == sid


def test_at06_reattach_switch_rekey_and_nat_rebind_keep_the_session_id() -> None:
    sim = build(seed=5, policy=make_policy(rekey_after_s=10))
    sim.advance(1.0)
    sid = sim.client.machine.session_id
    assert len(sid) == 32 and sid == gw_session(sim).machine.session_id
    scenario(sim)
    kinds = {e.event_type for e in sim.client_events}
    assert {EventType.TRANSPORT_SWITCH, EventType.KEY_ROTATED} <= kinds
    gw_reasons = {r for (_, _, r, _) in state_changes(sim.gateway_events)}  # type: ignore[arg-type]
    assert {"nat_rebind", "dead_transport_recovery"} <= gw_reasons
    assert {e.session_id for e in sim.client_events if e.session_id} == {sid}
    assert {e.session_id for e in sim.gateway_events if e.session_id} == {sid}  # type: ignore[attr-defined]
    assert len(sim.gateway.sessions) == 1  # no second session was ever created
    assert sim.client.snapshot(sim.now).session_id == sid


# == AT-07 One event per transition =========================================================
def test_at07_one_state_change_per_version_on_both_sides() -> None:
    sim = build(seed=3)
    scenario(sim)
    c, s = sim.client, gw_session(sim)
    assert c.machine.version >= 6  # the scenario produced a real timeline
    check_stream(sim.client_events, c.machine)
    check_stream(sim.gateway_events, s.machine)
    assert c.state is State.TERMINATED and s.machine.state is State.TERMINATED


def test_at07_rejections_emit_no_state_change() -> None:
    m, events = new_machine()
    m.fire(Trigger.REATTACH_OK, Reason.REATTACH_SUCCESS, 1)  # illegal in BIRTH
    m.fire(Trigger.HANDSHAKE_OK, Reason.ATTACHED_TO_TRANSPORT, 2)
    m.fire(Trigger.HANDSHAKE_OK, Reason.ATTACHED_TO_TRANSPORT, 3)  # illegal now
    m.fire(Trigger.TRANSPORT_DEAD, Reason.TRANSPORT_DEAD, 4)
    changes = of_type(events, EventType.STATE_CHANGE)
    assert [(e.state_version, e.edge) for e in changes] == [(1, "T01"), (2, "T04")]
    assert len(of_type(events, EventType.DIAGNOSTIC)) == 2


# == AT-08 Trigger priority =================================================================
def test_at08_most_urgent_follows_the_spec_order() -> None:
    ttl = (Trigger.TERMINATE, Reason.SESSION_LIFETIME_EXCEEDED)
    owner = (Trigger.TERMINATE, Reason.OWNERSHIP_CONFLICT)
    transport_ttl = (Trigger.TERMINATE, Reason.TRANSPORT_TTL_EXCEEDED)
    dead = (Trigger.TRANSPORT_DEAD, Reason.TRANSPORT_DEAD)
    quality = (Trigger.INSTABILITY, Reason.LOSS_THRESHOLD_EXCEEDED)
    stable = (Trigger.STABILITY_RESTORED, Reason.STABILITY_RESTORED)
    ordered = [ttl, owner, transport_ttl, dead, quality, stable]
    for i, winner in enumerate(ordered):
        rest = ordered[i:]
        for perm in (rest, list(reversed(rest))):
            assert most_urgent(perm) == winner
    assert most_urgent([]) is None


def test_at08_client_session_ttl_beats_simultaneous_transport_death() -> None:
    sim = attached(policy=make_policy(max_lifetime_ms=60_000))
    c = sim.client
    for link in sim.links.values():
        link.imp.up = False
    n = len(sim.client_events)
    c.handle_timer(61.0)  # lifetime and the active path's death are both overdue this tick
    changes = [e for e in c.events() if e.event_type is EventType.STATE_CHANGE]
    assert [(e.previous_state, e.new_state, e.reason_code) for e in changes] == [
        ("ATTACHED", "TERMINATED", Reason.SESSION_LIFETIME_EXCEEDED)
    ]
    assert of_type(sim.client_events[n:], EventType.TRANSPORT_DEAD) == []


def test_at08_gateway_session_ttl_beats_simultaneous_transport_death() -> None:
    sim = attached(policy=make_policy(max_lifetime_ms=60_000))
    s = gw_session(sim)
    sim.gateway.handle_timer(61.0)  # binding silent for 60 s and lifetime over
    events = sim.gateway.events()
    changes = of_type(events, EventType.STATE_CHANGE)
    assert [(e.previous_state, e.new_state, e.reason_code) for e in changes] == [
        ("ATTACHED", "TERMINATED", Reason.SESSION_LIFETIME_EXCEEDED)
    ]
    assert of_type(events, EventType.TRANSPORT_DEAD) == []
    assert s.machine.version == 2


def test_at08_transport_death_beats_simultaneous_quality_signal() -> None:
    # One missed probe is a quality violation under this policy; the link is clean, so
    # none happens until the link goes down. Then one late tick finds both due.
    sim = attached(policy=make_policy(max_consecutive_drops=1))
    c = sim.client
    sim.links[1].imp.up = False
    sim.advance(0.1)  # probes go out unanswered; neither their timeout nor death yet
    assert (c.state, c.machine.version) == (State.ATTACHED, 1)
    tick = sim.now + 0.5
    c.handle_timer(tick)
    misses = c.snapshot(tick).paths[0].stats.consecutive_misses
    assert misses >= 1  # the quality trigger was due at this tick too
    changes = of_type(c.events(), EventType.STATE_CHANGE)
    assert [(e.previous_state, e.new_state, e.reason_code) for e in changes] == [
        ("ATTACHED", "RECOVERING", Reason.TRANSPORT_DEAD)
    ]


# == AT-09 Version overflow =================================================================
def test_at09_machine_terminates_at_the_version_ceiling_deterministically() -> None:
    outcomes = []
    for _ in range(2):
        m, events = new_machine(max_version=3)
        assert m.fire(Trigger.HANDSHAKE_OK, Reason.ATTACHED_TO_TRANSPORT, 1)
        assert m.fire(Trigger.TRANSPORT_DEAD, Reason.TRANSPORT_DEAD, 2)
        assert not m.fire(Trigger.REATTACH_OK, Reason.REATTACH_SUCCESS, 3)
        assert (m.state, m.version) == (State.TERMINATED, 3)
        for trig in Trigger:  # no wrap, no revival
            assert not m.fire(trig, REASON_FOR[trig], 4)
        assert m.version == 3
        outcomes.append([e.to_dict() for e in events])
        last_change = of_type(events, EventType.STATE_CHANGE)[-1]
        assert (last_change.new_state, last_change.reason_code) == (
            "TERMINATED",
            Reason.STATE_VERSION_EXHAUSTED,
        )
        (ended,) = of_type(events, EventType.SESSION_TERMINATED)
        assert ended.reason_code is Reason.STATE_VERSION_EXHAUSTED
    assert outcomes[0] == outcomes[1]


def test_at09_a_requested_termination_at_the_ceiling_keeps_its_reason() -> None:
    m, _ = new_machine(max_version=2)
    m.fire(Trigger.HANDSHAKE_OK, Reason.ATTACHED_TO_TRANSPORT, 1)
    assert m.terminate(Reason.OPERATOR_TERMINATED, 2)
    assert (m.state, m.version) == (State.TERMINATED, 2)


def test_at09_engine_hits_the_ceiling_during_recovery() -> None:
    sim = attached(max_version=3)
    c = sim.client
    sim.links[1].imp.up = False
    sim.advance(3.0)
    assert (c.state, c.machine.version) == (State.TERMINATED, 3)
    assert state_changes(sim.client_events) == [
        ("BIRTH", "ATTACHED", "attached_to_transport", 1),
        ("ATTACHED", "RECOVERING", "transport_dead", 2),
        ("RECOVERING", "TERMINATED", "state_version_exhausted", 3),
    ]
    assert gw_session(sim).machine.version <= 3
    assert_gap_free(sim.gateway_events)


# == AT-20 Transport death != session death =================================================
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_paths=st.integers(min_value=2, max_value=3),
    seed=st.integers(min_value=0, max_value=10_000),
    kills=st.lists(st.floats(min_value=2.0, max_value=4.0), min_size=1, max_size=4),
)
def test_at20_killing_the_active_path_with_a_live_candidate_never_terminates(
    n_paths: int, seed: int, kills: list[float]
) -> None:
    sim = attached(n_paths=n_paths, seed=seed)
    c = sim.client
    down: int | None = None
    for gap in kills:
        if down is not None:
            sim.links[down].imp.up = True  # the previous victim comes back as a candidate
        victim = c.active
        assert victim is not None
        sim.links[victim].imp.up = False
        down = victim
        sim.run_until(sim.now + gap, max_steps=50_000)  # a spinning timer fails fast
        assert c.state is not State.TERMINATED
    sim.run_until(sim.now + 3.0, max_steps=50_000)
    assert c.state is State.ATTACHED and c.active not in (None, down)
    assert gw_session(sim).machine.state is State.ATTACHED
    for events in (sim.client_events, sim.gateway_events):
        assert of_type(events, EventType.SESSION_TERMINATED) == []
    deaths = of_type(sim.client_events, EventType.TRANSPORT_DEAD)
    assert len(deaths) == len(kills)
