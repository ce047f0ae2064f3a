"""Security acceptance tests at core level (SPEC-DIGEST §10.4, AT-29..AT-42, AT-47, AT-55, AT-60).

A real ClientSession and GatewaySessions run over memory links with a fake clock
(tests/simkit.py). Attack traffic is hand-crafted: requests sealed with the client's own
keys (what a retransmitting or buggy client could send), with foreign keys (what an
attacker who knows the receiver index can send), or not sealed at all. Every test checks
the observable outcome: typed drop counters, SECURITY_EVENT / REATTACH_RESULT events,
what the gateway sent back, and that state, state_version, binding and epoch did not move.
"""

from __future__ import annotations

import os
import random
import struct
from typing import Any

import pytest
from simkit import CLIENT_INNER, GATEWAY_INNER, assert_gap_free, build, ipv4_packet, make_policy

from tunnel.core.admission import HANDSHAKE_BURST
from tunnel.core.aead import SessionCipher, TrafficKeys
from tunnel.core.client import ClientSession, PathSpec
from tunnel.core.constants import HEADER, MAX_DATAGRAM, MSG_CONTROL, MSG_DATA, TRANSPORT_HEADER
from tunnel.core.drops import Drop
from tunnel.core.endpoint import EVENT_QUEUE_LIMIT
from tunnel.core.events import EventType, Reason, reason_to_wire
from tunnel.core.gateway import GatewaySessions
from tunnel.core.gateway_paths import MAX_CHALLENGES, MAX_VALIDATED
from tunnel.core.gateway_session import TOMBSTONE_S, ClientEntry, GatewaySession
from tunnel.core.handshake import generate_keypair
from tunnel.core.policy import POLICY_DEFAULT, Policy
from tunnel.core.replay import NonceGuard, NonceVerdict, ReplayWindow
from tunnel.core.session import State
from tunnel.core.wire import (
    STATE_CODES,
    Control,
    NodeInfo,
    Probe,
    ProbeAck,
    ReattachAck,
    ReattachKind,
    ReattachReject,
    ReattachRequest,
    StateUpdate,
    pack_control,
)
from tunnel.io.memory import MemoryLink, Simulation

ATTACKER = ("203.0.113.66", 6666)
"""An address no client path uses (TEST-NET-3)."""


# -- helpers --------------------------------------------------------------------------------


def established(n_paths: int = 2, policy: Policy | None = None, until: float = 2.0) -> Simulation:
    """ATTACHED on path 1, every path validated on both sides."""
    sim = build(n_paths=n_paths, policy=policy)
    sim.run_until(until)
    assert sim.client.state is State.ATTACHED
    gs = gw_session(sim)
    assert all(addr(sim, pid) in gs.validated for pid in sim.links)
    return sim


def gw_session(sim: Simulation) -> GatewaySession:
    (s,) = sim.gateway.sessions.values()
    return s


def addr(sim: Simulation, path_id: int) -> tuple[str, int]:
    return sim.links[path_id].client_addr


def view(s: GatewaySession) -> tuple[Any, ...]:
    """Everything a rejected request must leave alone."""
    return (
        s.session_id, s.index, s.machine.state, s.machine.version, s.epoch, s.binding,
        s.nonces.last, s.total_switches,
    )  # fmt: skip


def client_view(c: ClientSession) -> tuple[Any, ...]:
    return (c.machine.session_id, c.state, c.machine.version, c.epoch, c.active, c.total_switches)


def seal_from_client(sim: Simulation, msg: Control | bytes, msg_type: int = MSG_CONTROL) -> bytes:
    """A datagram sealed with the client's real keys (a genuine client could send it)."""
    cipher = sim.client.cipher
    assert cipher is not None
    plaintext = msg if isinstance(msg, bytes) else pack_control(msg)
    return cipher.seal(msg_type, sim.client.peer_index, plaintext)


def seal_from_gateway(sim: Simulation, msg: Control | bytes) -> bytes:
    s = gw_session(sim)
    assert s.cipher is not None
    plaintext = msg if isinstance(msg, bytes) else pack_control(msg)
    return s.cipher.seal(MSG_CONTROL, s.peer_index, plaintext)


def foreign_cipher() -> SessionCipher:
    """Keys nobody in the simulation has: an attacker who knows only the receiver index."""
    return SessionCipher(TrafficKeys(send=os.urandom(32), recv=os.urandom(32)))


def request(
    sim: Simulation,
    path_id: int,
    *,
    nonce: int | None = None,
    age_ms: int = 0,
    epoch: int | None = None,
    kind: ReattachKind = ReattachKind.MANUAL,
) -> ReattachRequest:
    """A REATTACH_REQUEST as the client would build it now (fresh unless told otherwise)."""
    s = gw_session(sim)
    return ReattachRequest(
        nonce=s.nonces.last + 1 if nonce is None else nonce,
        ts_ms=sim.client.ts_ms(sim.now) - age_ms,
        expected_epoch=s.epoch if epoch is None else epoch,
        path_id=path_id,
        kind=int(kind),
        client_version=sim.client.machine.version,
    )


def to_gateway(sim: Simulation, data: bytes, src: Any, settle: float = 0.0) -> None:
    sim.inject_to_gateway(data, src)
    sim.advance(settle)


class GatewaySpy:
    """Records every control message the gateway seals, with its destination."""

    def __init__(self, gateway: GatewaySessions) -> None:
        self.sent: list[tuple[Any, Control]] = []
        original = gateway.outbox.control

        def send(cipher: SessionCipher, peer_index: int, where: Any, msg: Control) -> int:
            self.sent.append((where, msg))
            return original(cipher, peer_index, where, msg)

        gateway.outbox.control = send  # type: ignore[method-assign]

    def of(self, cls: type) -> list[tuple[Any, Any]]:
        return [(a, m) for a, m in self.sent if isinstance(m, cls)]


def new_events(events: list[Any], mark: int, kind: EventType) -> list[Any]:
    return [e for e in events[mark:] if e.event_type == kind]


def security(events: list[Any], mark: int, violation: str) -> list[Any]:
    return [
        e
        for e in new_events(events, mark, EventType.SECURITY_EVENT)
        if e.violation_type == violation
    ]


def drops(endpoint: Any, reason: Drop | str) -> int:
    return int(endpoint.drops.get(str(reason), 0))


def switch_and_capture(sim: Simulation, path_id: int) -> bytes:
    """Operator switch to ``path_id``; returns the exact REATTACH_REQUEST datagram sent."""
    assert sim.client.switch_to(path_id, sim.now) is None
    out = sim.client.datagrams_to_send()
    (dgram,) = [d for pid, d in out if pid == path_id and d[0] == MSG_CONTROL]
    to_gateway(sim, dgram, addr(sim, path_id), settle=0.5)
    assert sim.client.active == path_id
    return dgram


# -- AT-29 ---------------------------------------------------------------------------------


def test_at29_valid_fresh_nonce_is_accepted_and_bumps_version_and_epoch() -> None:
    sim = established()
    s = gw_session(sim)
    v_gw, v_cl, epoch, sid = s.machine.version, sim.client.machine.version, s.epoch, s.session_id
    mark_g, mark_c = len(sim.gateway_events), len(sim.client_events)

    switch_and_capture(sim, 2)

    (attempt,) = new_events(sim.client_events, mark_c, EventType.REATTACH_ATTEMPT)
    assert attempt.nonce > 0 and attempt.expected_epoch == epoch
    assert s.nonces.last == attempt.nonce  # committed
    assert s.machine.version == v_gw + 1 and sim.client.machine.version == v_cl + 1
    assert s.epoch == epoch + 1 == sim.client.epoch
    assert s.binding == addr(sim, 2) and s.session_id == sid
    (result,) = new_events(sim.gateway_events, mark_g, EventType.REATTACH_RESULT)
    assert result.status == "SUCCESS" and result.reason_code is Reason.REATTACH_SUCCESS
    (switch,) = new_events(sim.gateway_events, mark_g, EventType.TRANSPORT_SWITCH)
    assert switch.binding_epoch == epoch + 1 and switch.explicit and switch.auditable
    assert not new_events(sim.gateway_events, mark_g, EventType.SECURITY_EVENT)
    assert_gap_free(sim.gateway_events)
    assert_gap_free(sim.client_events)


# -- AT-30 ---------------------------------------------------------------------------------


def test_at30_replayed_reattach_datagram_is_dropped_from_any_source() -> None:
    """Issue 14: a single copy from a validated path of the session (the binding, the old
    path) is a counted ``duplicate`` (a network copy looks the same); from a third address
    it is ``replay_detected`` with a SECURITY_EVENT. Nothing changes either way."""
    sim = established()
    dgram = switch_and_capture(sim, 2)
    s = gw_session(sim)
    before, spy = view(s), GatewaySpy(sim.gateway)
    mark = len(sim.gateway_events)
    replays = drops(sim.gateway, Drop.REPLAY)
    duplicates = drops(sim.gateway, Drop.DUPLICATE)

    for src in (addr(sim, 2), addr(sim, 1), ATTACKER):
        to_gateway(sim, dgram, src, settle=1.1)  # 1.1 s apart: one SECURITY_EVENT each

    assert drops(sim.gateway, Drop.DUPLICATE) == duplicates + 2
    assert drops(sim.gateway, Drop.REPLAY) == replays + 1
    events = security(sim.gateway_events, mark, "REPLAY_DETECTED")
    assert len(events) == 1 and {e.reason_code for e in events} == {Reason.REPLAY_DETECTED}
    assert ATTACKER[0] in events[0].source
    assert view(s) == before
    assert not spy.of(ReattachAck) and not spy.of(ReattachReject)
    assert not new_events(sim.gateway_events, mark, EventType.STATE_CHANGE)
    assert not new_events(sim.gateway_events, mark, EventType.TRANSPORT_SWITCH)
    assert not new_events(sim.gateway_events, mark, EventType.REATTACH_RESULT)
    assert ATTACKER not in s.validated and ATTACKER not in s.challenges


def test_at30_same_nonce_resealed_is_idempotent_on_binding_and_dropped_elsewhere() -> None:
    """NonceGuard: nonce == last is DUPLICATE. The gateway answers a duplicate of the last
    committed request (a client retransmit whose ACK was lost) with the *same* ACK when it
    comes from the binding, changes nothing, and counts it as a replay drop otherwise."""
    sim = established()
    mark_c = len(sim.client_events)
    switch_and_capture(sim, 2)
    (attempt,) = new_events(sim.client_events, mark_c, EventType.REATTACH_ATTEMPT)
    s = gw_session(sim)
    assert s.last_ack is not None
    first_ack = s.last_ack[1]
    before, spy = view(s), GatewaySpy(sim.gateway)
    mark = len(sim.gateway_events)
    replays = drops(sim.gateway, Drop.REPLAY)

    dup = request(sim, 2, nonce=attempt.nonce, epoch=attempt.expected_epoch)
    to_gateway(sim, seal_from_client(sim, dup), addr(sim, 2))
    assert spy.of(ReattachAck) == [(addr(sim, 2), first_ack)]
    to_gateway(sim, seal_from_client(sim, dup), addr(sim, 1))
    assert len(spy.of(ReattachAck)) == 1  # nothing for the non-binding source
    assert drops(sim.gateway, Drop.REPLAY) == replays + 1

    assert view(s) == before
    assert not spy.of(ReattachReject)
    assert not new_events(sim.gateway_events, mark, EventType.STATE_CHANGE)
    assert not new_events(sim.gateway_events, mark, EventType.REATTACH_RESULT)
    sim.advance(0.5)
    assert client_view(sim.client)[1:] == (State.ATTACHED, 2, s.epoch, 2, 1)


def test_at30_older_nonce_resealed_is_a_stale_request_not_a_replay() -> None:
    """An exact replay never reaches the nonce check (the AEAD window drops it, see above).
    An older nonce in a freshly sealed datagram can only come from the key holder: a
    request overtaken by a newer one. Rejected as stale, no SECURITY_EVENT, no escalation."""
    sim = established()
    switch_and_capture(sim, 2)
    s = gw_session(sim)
    # Re-assert the binding with nonce 5 (no state change) so that an older, unseen one exists.
    to_gateway(sim, seal_from_client(sim, request(sim, 2, nonce=5)), addr(sim, 2))
    assert s.nonces.last == 5
    before, spy = view(s), GatewaySpy(sim.gateway)
    mark = len(sim.gateway_events)

    old = request(sim, 1, nonce=3)
    assert s.nonces.check(old.nonce) is NonceVerdict.STALE
    to_gateway(sim, seal_from_client(sim, old), addr(sim, 1))

    assert view(s) == before
    ((reject_to, reject),) = spy.of(ReattachReject)
    assert reject_to == addr(sim, 1) and reject.nonce == old.nonce and reject.fatal == 0
    assert reject.reason == reason_to_wire(Reason.STALE_REQUEST) and reject.epoch == s.epoch
    (result,) = new_events(sim.gateway_events, mark, EventType.REATTACH_RESULT)
    assert result.status == "DENIED" and result.reason_code is Reason.STALE_REQUEST
    assert not new_events(sim.gateway_events, mark, EventType.SECURITY_EVENT)
    assert s.security_failures == 0  # stale, never escalated
    assert not new_events(sim.gateway_events, mark, EventType.STATE_CHANGE)


# -- AT-31 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("forgery", ["foreign_keys", "no_keys", "random_bytes"])
def test_at31_bad_proof_is_dropped_counted_and_never_escalates(forgery: str) -> None:
    sim = established()
    s = gw_session(sim)
    before, before_client = view(s), client_view(sim.client)
    spy = GatewaySpy(sim.gateway)
    mark, mark_c = len(sim.gateway_events), len(sim.client_events)
    bad = drops(sim.gateway, Drop.BAD_TAG)
    forger = foreign_cipher()
    rng = random.Random(31)
    n = 200

    for i in range(n):
        req = request(sim, 2, nonce=s.nonces.last + 1 + i)
        if forgery == "foreign_keys":
            dgram = forger.seal(MSG_CONTROL, s.index, pack_control(req))
        elif forgery == "no_keys":  # the request in clear, a zero "tag"
            header = TRANSPORT_HEADER.pack(MSG_CONTROL, 0, s.index, 10_000 + i)
            dgram = header + pack_control(req) + bytes(16)
        else:
            header = TRANSPORT_HEADER.pack(MSG_CONTROL, 0, s.index, rng.getrandbits(40))
            dgram = header + rng.randbytes(rng.randrange(16, 200))
        to_gateway(sim, dgram, ATTACKER if i % 2 else addr(sim, 2), settle=0.05)

    assert drops(sim.gateway, Drop.BAD_TAG) == bad + n
    reports = security(sim.gateway_events, mark, "INVALID_PROOF")
    assert 1 <= len(reports) <= n * 0.05 + 2  # rate-limited: about one per second
    assert all(e.reason_code is Reason.BAD_PROOF for e in reports)
    assert sum(e.count for e in reports) <= n
    assert view(s) == before and s.security_failures == 0
    assert s.machine.state is State.ATTACHED
    assert not [m for _, m in spy.sent if isinstance(m, (ReattachAck, ReattachReject))]
    assert ATTACKER not in s.challenges and ATTACKER not in s.validated
    for kind in (EventType.STATE_CHANGE, EventType.REATTACH_RESULT, EventType.TRANSPORT_SWITCH):
        assert not new_events(sim.gateway_events, mark, kind)
    assert client_view(sim.client) == before_client
    assert not new_events(sim.client_events, mark_c, EventType.STATE_CHANGE)


# -- AT-32 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("age_ms", [6_000, -6_000, 60_000])
def test_at32_stale_proof_is_rejected_without_burning_the_nonce(age_ms: int) -> None:
    sim = established(until=65.0)  # wall ms > 60 000, so "60 s ago" is a valid u64
    s = gw_session(sim)
    assert POLICY_DEFAULT.reattach_proof_max_age_ms == 5_000
    before, spy = view(s), GatewaySpy(sim.gateway)
    mark = len(sim.gateway_events)

    stale = request(sim, 2, age_ms=age_ms)
    to_gateway(sim, seal_from_client(sim, stale), addr(sim, 2))

    assert view(s) == before
    (_, reject) = spy.of(ReattachReject)[-1]
    assert reject.reason == reason_to_wire(Reason.STALE_REQUEST) and not reject.fatal
    (result,) = new_events(sim.gateway_events, mark, EventType.REATTACH_RESULT)
    assert result.reason_code is Reason.STALE_REQUEST and result.status == "DENIED"
    assert security(sim.gateway_events, mark, "STALE_REQUEST")
    # The nonce was not consumed: the same nonce, fresh, is accepted right after.
    fresh = request(sim, 2, nonce=stale.nonce, age_ms=4_000)
    to_gateway(sim, seal_from_client(sim, fresh), addr(sim, 2))
    assert s.nonces.last == stale.nonce and s.binding == addr(sim, 2)
    assert s.epoch == before[4] + 1


def test_at32_repeated_authenticated_failures_degrade_then_terminate() -> None:
    """Spec FM §4 / seed §3: repeated validation failures -> DEGRADED, then TERMINATED
    security_failure at the policy counts (3 and 10 by default); never a switch."""
    sim = established(until=25.0)
    s = gw_session(sim)
    pol = s.policy
    mark = len(sim.gateway_events)
    for i in range(1, pol.security_failures_to_terminate + 1):
        stale = request(sim, 2, age_ms=20_000)
        to_gateway(sim, seal_from_client(sim, stale), addr(sim, 2))
        if i < pol.security_failures_to_degrade:
            assert s.machine.state is State.ATTACHED
        elif i < pol.security_failures_to_terminate:
            assert s.machine.state is State.DEGRADED
    assert s.machine.state is State.TERMINATED
    changes = [
        (e.new_state, e.reason_code)
        for e in new_events(sim.gateway_events, mark, EventType.STATE_CHANGE)
    ]
    assert changes == [
        ("DEGRADED", Reason.SECURITY_FAILURES_REPEATED),
        ("TERMINATED", Reason.SECURITY_FAILURE),
    ]
    assert not new_events(sim.gateway_events, mark, EventType.TRANSPORT_SWITCH)
    sim.advance(0.5)
    assert sim.client.state is State.TERMINATED  # told explicitly, with the reason
    (term,) = new_events(sim.client_events, 0, EventType.SESSION_TERMINATED)
    assert term.reason_code is Reason.SECURITY_FAILURE and term.initiator == "peer"
    assert_gap_free(sim.gateway_events)


# -- AT-33 ---------------------------------------------------------------------------------


def test_at33_nonce_guard_reference_verdicts() -> None:
    guard = NonceGuard(max_gap=8)
    assert guard.check(0) is NonceVerdict.MISSING
    guard.commit(1)
    assert guard.check(1) is NonceVerdict.DUPLICATE
    assert guard.check(9) is NonceVerdict.ACCEPTED
    assert guard.check(10) is NonceVerdict.WINDOW_EXCEEDED
    guard.commit(9)
    assert guard.check(5) is NonceVerdict.STALE  # never seen, but older: stale
    with pytest.raises(ValueError, match="nonce_stale"):
        guard.commit(5)
    assert guard.last == 9


@pytest.mark.parametrize(
    ("case", "reason", "violation", "escalates"),
    [
        ("gap", Reason.NONCE_WINDOW_EXCEEDED, "NONCE_WINDOW_EXCEEDED", True),
        ("missing", Reason.MALFORMED_REQUEST, None, True),
        ("old_unseen", Reason.STALE_REQUEST, None, False),
    ],
)
def test_at33_nonce_gap_missing_and_old_are_rejected_without_mutation(
    case: str, reason: Reason, violation: str | None, escalates: bool
) -> None:
    sim = established()
    s = gw_session(sim)
    # Commit nonce 10 with a request that re-asserts the current binding (no state change).
    to_gateway(sim, seal_from_client(sim, request(sim, 1, nonce=10)), addr(sim, 1))
    assert s.nonces.last == 10
    before, spy = view(s), GatewaySpy(sim.gateway)
    mark = len(sim.gateway_events)
    nonce = {"gap": 10 + s.nonces.max_gap + 1, "missing": 0, "old_unseen": 7}[case]

    to_gateway(sim, seal_from_client(sim, request(sim, 2, nonce=nonce)), addr(sim, 2))

    assert view(s) == before
    (_, reject) = spy.of(ReattachReject)[-1]
    assert reject.reason == reason_to_wire(reason) and reject.nonce == nonce
    assert s.security_failures == (1 if escalates else 0)
    if violation is not None:
        assert security(sim.gateway_events, mark, violation)
    else:
        assert not new_events(sim.gateway_events, mark, EventType.SECURITY_EVENT)
    assert not new_events(sim.gateway_events, mark, EventType.STATE_CHANGE)
    # Boundary: exactly max_gap ahead is still fresh.
    edge = request(sim, 2, nonce=10 + s.nonces.max_gap)
    to_gateway(sim, seal_from_client(sim, edge), addr(sim, 2))
    assert s.nonces.last == edge.nonce and s.binding == addr(sim, 2)


# -- AT-36 ---------------------------------------------------------------------------------


class Net:
    """A gateway with two allowed clients (alice on a Simulation, bob driven by hand)."""

    def __init__(self, policy: Policy | None = POLICY_DEFAULT, n_paths: int = 2) -> None:
        self.gw_priv, self.gw_pub = generate_keypair()
        self.alice_priv, alice_pub = generate_keypair()
        self.bob_priv, bob_pub = generate_keypair()
        self.gateway = GatewaySessions(
            static_private=self.gw_priv,
            clients=[
                ClientEntry("alice", alice_pub, CLIENT_INNER),
                ClientEntry("bob", bob_pub, "10.66.0.3"),
            ],
            policy=policy,
            now=0.0,
            urandom=random.Random(7).randbytes,
            rng=random.Random(8),
        )
        self.alice = self.client(self.alice_priv, n_paths)
        rng = random.Random(9)
        links = [MemoryLink(i, rng=rng) for i in range(1, n_paths + 1)]
        self.sim = Simulation(self.alice, self.gateway, links)

    def client(self, private: bytes, n_paths: int = 1) -> ClientSession:
        return ClientSession(
            static_private=private,
            gateway_public=self.gw_pub,
            paths=[PathSpec(i, f"path{i}") for i in range(1, n_paths + 1)],
            policy=POLICY_DEFAULT,
            now=self.sim.now if hasattr(self, "sim") else 0.0,
            rng=random.Random(len(private) + int.from_bytes(private[:2], "little")),
        )

    def exchange(self, client: ClientSession, where: Any, rounds: int = 3) -> None:
        """Drive one hand-held client against the gateway at the current sim time."""
        now = self.sim.now
        for _ in range(rounds):
            for _pid, data in client.datagrams_to_send():
                self.gateway.receive_datagram(data, where, now)
            keep: list[tuple[Any, bytes]] = []
            for dst, data in self.gateway.datagrams_to_send():
                if dst == where:
                    client.receive_datagram(data, 1, now)
                else:
                    keep.append((dst, data))
            for dst, data in keep:  # alice's traffic goes back onto her links
                link = next(lk for lk in self.sim.links.values() if lk.client_addr == dst)
                self.sim.inject_to_client(data, link.path_id, delay=0.01)


BOB = ("198.51.100.200", 47000)


def test_at36_replayed_handshake_cannot_replace_a_live_session() -> None:
    sim = build(start=False)
    sim.client.connect(sim.now)
    ((pid, init),) = sim.client.datagrams_to_send()
    to_gateway(sim, init, addr(sim, pid))
    sim.run_until(2.0)
    s = gw_session(sim)
    before, before_client = view(s), client_view(sim.client)
    mark = len(sim.gateway_events)
    replays = drops(sim.gateway, Drop.REPLAY)

    for src in (addr(sim, 1), ATTACKER):
        to_gateway(sim, init, src, settle=1.1)

    assert drops(sim.gateway, Drop.REPLAY) == replays + 2
    fixation = security(sim.gateway_events, mark, "FIXATION_ATTEMPT")
    assert len(fixation) == 2
    assert {e.reason_code for e in fixation} == {Reason.SESSION_FIXATION_ATTEMPT}
    assert list(sim.gateway.sessions.values()) == [s] and view(s) == before
    assert not new_events(sim.gateway_events, mark, EventType.SESSION_CREATED)
    assert not new_events(sim.gateway_events, mark, EventType.STATE_CHANGE)
    assert client_view(sim.client) == before_client
    # The session still carries data both ways.
    sim.client_tun.inject(ipv4_packet(CLIENT_INNER, GATEWAY_INNER))
    sim.advance(0.2)
    assert sim.gateway_tun.from_tunnel


def test_at36_other_clients_keys_cannot_take_over_a_session() -> None:
    net = Net()
    net.sim.start()
    net.sim.run_until(2.0)
    alice = gw_session_of(net.gateway, "alice")
    bob = net.client(net.bob_priv)
    bob.connect(net.sim.now)
    net.exchange(bob, BOB)
    assert bob.state is State.ATTACHED
    bob_s = gw_session_of(net.gateway, "bob")
    assert bob_s.session_id != alice.session_id and bob_s.index != alice.index
    before_alice, before_bob = view(alice), view(bob_s)
    mark = len(net.sim.gateway_events)
    bad = drops(net.gateway, Drop.BAD_TAG)

    # Bob seals a reattach naming alice's receiver index with *his* valid session keys.
    assert bob.cipher is not None
    req = ReattachRequest(
        nonce=alice.nonces.last + 1, ts_ms=bob.ts_ms(net.sim.now), expected_epoch=alice.epoch,
        path_id=1, kind=int(ReattachKind.RECOVERY), client_version=1,
    )  # fmt: skip
    for _ in range(5):
        net.sim.inject_to_gateway(bob.cipher.seal(MSG_CONTROL, alice.index, pack_control(req)), BOB)
    net.sim.advance(0.2)

    assert drops(net.gateway, Drop.BAD_TAG) == bad + 5
    assert view(alice) == before_alice and view(bob_s) == before_bob
    assert BOB not in alice.validated and BOB not in alice.challenges
    assert security(net.sim.gateway_events, mark, "INVALID_PROOF")
    alice_sid = alice.machine.session_id
    assert not [
        e
        for e in new_events(net.sim.gateway_events, mark, EventType.STATE_CHANGE)
        if e.session_id == alice_sid
    ]


def gw_session_of(gateway: GatewaySessions, name: str) -> GatewaySession:
    (s,) = [
        s for s in gateway.sessions.values() if s.client.name == name and not s.machine.terminated
    ]
    return s


def test_at36_terminated_session_id_is_never_revived() -> None:
    sim = established()
    s = gw_session(sim)
    old_sid, old_index = s.session_id, s.index
    keep = sim.client.cipher
    assert keep is not None
    sim.client.terminate(sim.now)
    sim.advance(0.5)
    assert s.machine.state is State.TERMINATED
    version = s.machine.version

    def late() -> bytes:
        req = ReattachRequest(s.nonces.last + 1, sim.client.ts_ms(sim.now), s.epoch, 2, 0, 0)
        return keep.seal(MSG_CONTROL, old_index, pack_control(req))

    wrong = drops(sim.gateway, Drop.WRONG_STATE)
    to_gateway(sim, late(), addr(sim, 2))
    assert drops(sim.gateway, Drop.WRONG_STATE) == wrong + 1  # tombstone: known, dead
    sim.advance(TOMBSTONE_S + 1)
    assert old_index not in sim.gateway.sessions
    unknown = drops(sim.gateway, Drop.UNKNOWN_SESSION)
    to_gateway(sim, late(), addr(sim, 2))
    assert drops(sim.gateway, Drop.UNKNOWN_SESSION) == unknown + 1
    assert not sim.gateway.sessions
    assert s.machine.version == version and s.session_id == old_sid


def test_at36_unknown_client_key_gets_no_session() -> None:
    net = Net()
    net.sim.start()
    net.sim.run_until(1.0)
    alice = gw_session_of(net.gateway, "alice")
    before = view(alice)
    mallory_priv, _ = generate_keypair()
    mallory = net.client(mallory_priv)
    mark = len(net.sim.gateway_events)
    mallory.connect(net.sim.now)
    net.exchange(mallory, ATTACKER)
    net.sim.advance(0.1)
    assert mallory.state is State.BIRTH  # no response at all
    assert drops(net.gateway, Drop.UNKNOWN_CLIENT_KEY) == 1
    assert security(net.sim.gateway_events, mark, "UNKNOWN_CLIENT")
    assert [x.client.name for x in net.gateway.sessions.values()] == ["alice"]
    assert view(alice) == before


# -- AT-40 ---------------------------------------------------------------------------------


def kill_all_links(sim: Simulation) -> None:
    for link in sim.links.values():
        link.imp.up = False


def test_at40_key_validity_ends_with_session_lifetime_even_while_recovering() -> None:
    """Key validity = session lifetime (risk R5). A reattach proved with those keys at the
    moment they expire is refused (fatal session_expired), never half-accepted."""
    pol = make_policy(max_lifetime_ms=60_000)
    sim = established(policy=pol)
    sim.run_until(50.0)
    kill_all_links(sim)
    sim.run_until(52.0)
    s = gw_session(sim)
    assert s.machine.state is State.RECOVERING and sim.client.state is State.RECOVERING
    spy = GatewaySpy(sim.gateway)
    mark = len(sim.gateway_events)
    expiry = s.born + pol.max_lifetime_ms / 1000

    req = ReattachRequest(
        nonce=s.nonces.last + 1, ts_ms=sim.gateway.ts_ms(expiry), expected_epoch=s.epoch,
        path_id=2, kind=int(ReattachKind.RECOVERY), client_version=sim.client.machine.version,
    )  # fmt: skip
    sim.gateway.receive_datagram(seal_from_client(sim, req), addr(sim, 2), expiry)

    assert s.machine.state is State.TERMINATED and s.binding is None
    (_, reject) = spy.of(ReattachReject)[-1]
    assert reject.reason == reason_to_wire(Reason.SESSION_EXPIRED) and reject.fatal == 1
    events = sim.gateway.events()
    assert [e.new_state for e in events if e.event_type == EventType.STATE_CHANGE] == ["TERMINATED"]
    assert not [e for e in events if e.event_type == EventType.TRANSPORT_SWITCH]
    # The client's own view ends the same way by its timer: explicit, reason-coded.
    sim.run_until(61.0)
    assert sim.client.state is State.TERMINATED
    (term,) = new_events(sim.client_events, 0, EventType.SESSION_TERMINATED)
    assert term.reason_code in (Reason.SESSION_LIFETIME_EXCEEDED, Reason.RECOVERY_WINDOW_EXCEEDED)
    assert not new_events(sim.gateway_events, mark, EventType.TRANSPORT_SWITCH)


def test_at40_reattach_under_discarded_keys_fails_and_recovery_ends_deterministically() -> None:
    """A request sealed under a key generation the gateway has already forgotten (rekeyed
    and past the grace period) is dropped (unknown_key_phase): RECOVERING then ends by its
    window, deterministically, and never reaches ATTACHED through the expired keys."""
    pol = make_policy(rekey_after_s=10)
    sim = established(policy=pol)
    s = gw_session(sim)
    assert s.cipher is not None and s.cipher.phase == 0
    old_req = request(sim, 2, kind=ReattachKind.RECOVERY)
    old_dgram = seal_from_client(sim, old_req)  # phase 0, kept back
    sim.run_until(22.0)  # the client rekeyed at 10 s (and 20 s); old keys are gone
    assert s.cipher.phase >= 1
    kill_all_links(sim)
    sim.run_until(24.0)
    assert s.machine.state is State.RECOVERING
    before = view(s)
    mark = len(sim.gateway_events)
    phase_drops = drops(sim.gateway, Drop.UNKNOWN_KEY_PHASE) + drops(sim.gateway, Drop.BAD_TAG)

    to_gateway(sim, old_dgram, addr(sim, 2))

    assert drops(sim.gateway, Drop.UNKNOWN_KEY_PHASE) + drops(sim.gateway, Drop.BAD_TAG) == (
        phase_drops + 1
    )
    assert view(s) == before
    sim.run_until(24.0 + pol.recovery_window_ms / 1000 + 1)
    assert s.machine.state is State.TERMINATED
    changes = [
        (e.new_state, e.reason_code)
        for e in new_events(sim.gateway_events, mark, EventType.STATE_CHANGE)
    ]
    assert changes == [("TERMINATED", Reason.RECOVERY_WINDOW_EXCEEDED)]


# -- AT-41 ---------------------------------------------------------------------------------


def test_at41_forged_and_replayed_server_responses_are_ignored_and_counted() -> None:
    sim = established()
    captured: list[bytes] = []
    sim.taps.append(lambda d: captured.append(d.data) if not d.to_gateway else None)
    switch_and_capture(sim, 2)
    sim.taps.clear()
    assert len(captured) >= 2  # probe acks and the REATTACH_ACK
    c = sim.client
    before = client_view(c)
    mark = len(sim.client_events)
    s = gw_session(sim)

    # 1. A fake REATTACH_ACK under keys the gateway does not have.
    fake = foreign_cipher().seal(
        MSG_CONTROL, c.index, pack_control(ReattachAck(c.switching.nonce + 1, s.epoch + 5, 99, 1))
    )
    bad = drops(c, Drop.BAD_TAG)
    sim.inject_to_client(fake, 1)
    sim.advance(0.05)
    assert drops(c, Drop.BAD_TAG) == bad + 1
    assert security(sim.client_events, mark, "INVALID_PROOF")

    # 2. Every gateway datagram of the switch (the real ACK among them), replayed again and
    # again on the session's own path: all dropped and counted. A few copies on a validated
    # path look like network duplicates (issue 14: counted ``duplicate``); this many are
    # above duplicate_alarm_ratio and its slack, so they are reported as a replay.
    replays, duplicates = drops(c, Drop.REPLAY), drops(c, Drop.DUPLICATE)
    copies = captured * -(-40 // len(captured))
    for data in copies:
        sim.inject_to_client(data, 2)
    sim.advance(0.05)
    new_replays = drops(c, Drop.REPLAY) - replays
    assert new_replays + drops(c, Drop.DUPLICATE) - duplicates == len(copies)
    assert new_replays > 0
    assert security(sim.client_events, mark, "REPLAY_DETECTED")
    assert client_view(c) == before
    assert not new_events(sim.client_events, mark, EventType.STATE_CHANGE)
    assert not new_events(sim.client_events, mark, EventType.TRANSPORT_SWITCH)


def test_at41_authentic_but_unsolicited_or_stale_acks_are_refused() -> None:
    sim = established()
    c = sim.client
    s = gw_session(sim)
    # A request in flight that the gateway never sees.
    assert c.switch_to(2, sim.now) is None
    c.datagrams_to_send()
    pending_nonce = c.switching.nonce
    before = client_view(c)
    mark = len(sim.client_events)
    wrong_state = drops(c, Drop.WRONG_STATE)

    unsolicited = ReattachAck(pending_nonce + 7, s.epoch + 1, s.machine.version + 1, 1)
    sim.inject_to_client(seal_from_gateway(sim, unsolicited), 2)
    stale = ReattachAck(pending_nonce, s.epoch + 1, c.peer_version - 1, 1)
    sim.inject_to_client(seal_from_gateway(sim, stale), 2)
    reject = ReattachReject(pending_nonce + 9, reason_to_wire(Reason.SECURITY_FAILURE), 1, 0)
    sim.inject_to_client(seal_from_gateway(sim, reject), 2)
    sim.advance(0.0)

    assert client_view(c) == before and c.snapshot(sim.now).pending == 2
    assert security(sim.client_events, mark, "UNEXPECTED_RESPONSE")
    assert security(sim.client_events, mark, "STALE_RESPONSE")
    assert drops(c, Drop.WRONG_STATE) == wrong_state + 3
    assert not new_events(sim.client_events, mark, EventType.STATE_CHANGE)
    assert not new_events(sim.client_events, mark, EventType.SESSION_TERMINATED)


# -- AT-42 ---------------------------------------------------------------------------------

_REQ = ReattachRequest(1, 0, 1, 2, 0, 0)
_REQ_RAW = pack_control(_REQ)


@pytest.mark.parametrize(
    ("plaintext", "msg_type", "expected"),
    [
        (b"", MSG_CONTROL, Drop.TRUNCATED),
        (b"\x00", MSG_CONTROL, Drop.UNKNOWN_TYPE),
        (b"\x0d" + bytes(8), MSG_CONTROL, Drop.UNKNOWN_TYPE),  # the first type not defined
        (pack_control(NodeInfo.of("gw-b", 2)), MSG_CONTROL, Drop.UNKNOWN_TYPE),  # wrong way
        (b"\xff" * 40, MSG_CONTROL, Drop.UNKNOWN_TYPE),
        (_REQ_RAW[:-1], MSG_CONTROL, Drop.TRUNCATED),
        (_REQ_RAW[:1], MSG_CONTROL, Drop.TRUNCATED),
        (_REQ_RAW + b"\x00", MSG_CONTROL, Drop.OVERSIZED),
        (b"\x05" + ReattachRequest.STRUCT.pack(1, 0, 1, 2, 9, 0), MSG_CONTROL, Drop.MALFORMED),
        (pack_control(ReattachAck(1, 1, 1, 1)), MSG_CONTROL, Drop.UNKNOWN_TYPE),  # wrong way
        (pack_control(StateUpdate(1, 1, 1, 1, 0)), MSG_CONTROL, Drop.UNKNOWN_TYPE),
        (b"", MSG_DATA, Drop.MALFORMED),
        (b"\x00not an ip packet", MSG_DATA, Drop.MALFORMED),
    ],
)
def test_at42_malformed_control_to_gateway_is_a_typed_drop(
    plaintext: bytes, msg_type: int, expected: Drop
) -> None:
    sim = established()
    s = gw_session(sim)
    before, spy = view(s), GatewaySpy(sim.gateway)
    mark = len(sim.gateway_events)
    count = drops(sim.gateway, expected)
    to_gateway(sim, seal_from_client(sim, plaintext, msg_type), addr(sim, 1))
    assert drops(sim.gateway, expected) == count + 1
    assert view(s) == before and s.security_failures == 0
    assert not spy.sent
    assert not new_events(sim.gateway_events, mark, EventType.STATE_CHANGE)


@pytest.mark.parametrize(
    ("plaintext", "expected"),
    [
        (b"\x08" + StateUpdate.STRUCT.pack(99, len(STATE_CODES), 5, 5, 0), Drop.MALFORMED),
        (b"\x07" + ReattachReject.STRUCT.pack(1, 3, 2, 1), Drop.MALFORMED),
        (b"\x02" + ProbeAck.STRUCT.pack(1, 1, 0, 200, 1, 1), Drop.MALFORMED),
        (b"\x06" + ReattachAck.STRUCT.pack(1, 1, 1, 6), Drop.MALFORMED),
        (pack_control(Probe(1, 1, 0)), Drop.UNKNOWN_TYPE),  # wrong way
        (pack_control(_REQ), Drop.UNKNOWN_TYPE),
        (b"\x08" + bytes(5), Drop.TRUNCATED),
        (b"", Drop.TRUNCATED),
    ],
)
def test_at42_malformed_control_to_client_is_a_typed_drop(plaintext: bytes, expected: Drop) -> None:
    sim = established()
    c = sim.client
    before = client_view(c)
    mark = len(sim.client_events)
    count = drops(c, expected)
    sim.inject_to_client(seal_from_gateway(sim, plaintext), 1)
    sim.advance(0.0)
    assert drops(c, expected) == count + 1
    assert client_view(c) == before
    assert not new_events(sim.client_events, mark, EventType.STATE_CHANGE)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"", Drop.TRUNCATED),
        (b"\x04\x00\x00", Drop.TRUNCATED),
        (bytes(MAX_DATAGRAM + 1), Drop.OVERSIZED),
        (b"\x09" + bytes(60), Drop.UNKNOWN_TYPE),
        (b"\x05" + bytes(51), Drop.WRONG_STATE),  # cookie reply: for clients only
        (HEADER.pack(MSG_CONTROL, 0, 1)[:2] + b"\x01\x00" + bytes(60), Drop.MALFORMED),
        (TRANSPORT_HEADER.pack(MSG_DATA, 0, 1, 0) + bytes(15), Drop.TRUNCATED),
        (TRANSPORT_HEADER.pack(MSG_DATA, 0, 0xDEADBEEF, 0) + bytes(16), Drop.UNKNOWN_SESSION),
        (struct.pack("<BBxxII", 1, 0, 5, 1) + bytes(200), Drop.MALFORMED),  # init, index != 0
        (struct.pack("<BBxxII", 1, 0, 0, 1) + bytes(20), Drop.TRUNCATED),
        (struct.pack("<BBxxII", 1, 0, 0, 1) + os.urandom(150), Drop.BAD_MAC),  # before DH
        (struct.pack("<BBxxII", 2, 0, 1, 1) + bytes(100), Drop.WRONG_STATE),
    ],
    ids=lambda v: v.name.lower() if isinstance(v, Drop) else f"{len(v)}B",
)
def test_at42_malformed_datagram_headers_are_typed_drops(raw: bytes, expected: Drop) -> None:
    sim = established()
    s = gw_session(sim)
    before = view(s)
    count = drops(sim.gateway, expected)
    total = sum(sim.gateway.drops.values())
    to_gateway(sim, raw, ATTACKER)
    assert drops(sim.gateway, expected) == count + 1
    assert sum(sim.gateway.drops.values()) == total + 1
    assert view(s) == before


def test_at42_reattach_with_missing_nonce_is_a_reasoned_reject() -> None:
    sim = established()
    s = gw_session(sim)
    before, spy = view(s), GatewaySpy(sim.gateway)
    to_gateway(sim, seal_from_client(sim, request(sim, 2, nonce=0)), addr(sim, 2))
    assert view(s) == before
    (_, reject) = spy.of(ReattachReject)[-1]
    assert reject.reason == reason_to_wire(Reason.MALFORMED_REQUEST)


# -- AT-47 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["in_order", "reordered"])
def test_at47_concurrent_reattach_exactly_one_wins(order: str) -> None:
    sim = established(n_paths=3)
    kill_all_links(sim)
    sim.run_until(sim.now + 2.0)
    s = gw_session(sim)
    assert s.machine.state is State.RECOVERING and s.binding is None
    version, epoch = s.machine.version, s.epoch
    spy = GatewaySpy(sim.gateway)
    mark = len(sim.gateway_events)
    base = s.nonces.last
    a = request(sim, 2, nonce=base + 1, kind=ReattachKind.RECOVERY)
    b = request(sim, 3, nonce=base + 2, kind=ReattachKind.RECOVERY)
    da, db = seal_from_client(sim, a), seal_from_client(sim, b)
    first, second = ((da, 2), (db, 3)) if order == "in_order" else ((db, 3), (da, 2))
    sim.inject_to_gateway(first[0], addr(sim, first[1]))
    sim.inject_to_gateway(second[0], addr(sim, second[1]))
    sim.advance(0.0)

    winner, loser = first[1], second[1]
    assert s.machine.state is State.ATTACHED
    assert s.machine.version == version + 1 and s.epoch == epoch + 1
    assert s.binding == addr(sim, winner)
    results = new_events(sim.gateway_events, mark, EventType.REATTACH_RESULT)
    assert [r.status for r in results] == ["SUCCESS", "DENIED"]
    # Reordered, the loser's nonce is older than the winner's: still a legitimate request
    # of the key holder overtaken by a newer binding, not a replay (no false positive).
    assert results[1].reason_code is Reason.STALE_BINDING_EPOCH
    (acked,) = spy.of(ReattachAck)
    ((reject_to, reject),) = spy.of(ReattachReject)
    assert acked[0] == addr(sim, winner) and reject_to == addr(sim, loser)
    assert reject.fatal == 0 and reject.epoch == s.epoch
    assert not new_events(sim.gateway_events, mark, EventType.SECURITY_EVENT)
    assert s.security_failures == 0
    assert len(new_events(sim.gateway_events, mark, EventType.TRANSPORT_SWITCH)) == 1
    assert_gap_free(sim.gateway_events)


def test_at47_client_ignores_late_answer_to_a_superseded_request_quietly() -> None:
    """The client gave up request n and sent n+1; the gateway's answer to n arrives late.
    Authentic and ours: a counted drop, not an UNEXPECTED_RESPONSE security event."""
    sim = established()
    c = sim.client
    s = gw_session(sim)
    assert c.switch_to(2, sim.now) is None
    old_nonce = c.switching.nonce
    c.datagrams_to_send()  # lost
    c.switching.give_up()  # given up (as the retransmission timer does)
    assert c.switch_to(2, sim.now) is None
    c.datagrams_to_send()  # also lost: n+1 stays pending
    before = client_view(c)
    mark = len(sim.client_events)
    wrong_state = drops(c, Drop.WRONG_STATE)

    late_reject = ReattachReject(old_nonce, reason_to_wire(Reason.STALE_BINDING_EPOCH), 0, s.epoch)
    late_ack = ReattachAck(old_nonce, s.epoch, s.machine.version, 1)
    for msg in (late_reject, late_ack):
        sim.inject_to_client(seal_from_gateway(sim, msg), 2)
    sim.advance(0.0)

    assert drops(c, Drop.WRONG_STATE) == wrong_state + 2
    assert not new_events(sim.client_events, mark, EventType.SECURITY_EVENT)
    assert client_view(c) == before and c.snapshot(sim.now).pending == 2
    # A never-sent nonce is still an unexpected response.
    forged = ReattachReject(c.switching.nonce + 3, reason_to_wire(Reason.STALE_REQUEST), 0, s.epoch)
    sim.inject_to_client(seal_from_gateway(sim, forged), 2)
    sim.advance(0.0)
    assert security(sim.client_events, mark, "UNEXPECTED_RESPONSE")


def test_at47_client_attempt_denied_for_a_stale_epoch_has_its_result_then_a_new_attempt() -> None:
    """SPEC-DIGEST §3.3: every validation outcome is a ReattachResult. The gateway refuses
    the request for its binding epoch (non-fatal, retryable): that attempt ends DENIED,
    and the client tries again, same candidate, a new nonce and the epoch it was told."""
    sim = established()
    c = sim.client
    s = gw_session(sim)
    mark = len(sim.client_events)
    assert c.switch_to(2, sim.now) is None
    nonce = c.switching.nonce
    c.datagrams_to_send()  # lost: the gateway answers the reject below instead
    stale = ReattachReject(nonce, reason_to_wire(Reason.STALE_BINDING_EPOCH), 0, s.epoch)
    sim.inject_to_client(seal_from_gateway(sim, stale), 2)
    sim.advance(1.0)

    attempts = new_events(sim.client_events, mark, EventType.REATTACH_ATTEMPT)
    results = new_events(sim.client_events, mark, EventType.REATTACH_RESULT)
    assert [(a.candidate_transport, a.nonce) for a in attempts] == [(2, nonce), (2, nonce + 1)]
    assert [(r.status, r.reason_code, r.candidate_transport) for r in results] == [
        ("DENIED", Reason.STALE_BINDING_EPOCH, 2),
        ("SUCCESS", Reason.REATTACH_SUCCESS, 2),
    ]
    assert attempts[0].ts_ms <= results[0].ts_ms <= attempts[1].ts_ms
    assert not results[0].fatal
    # Retryable: no switch was denied, and the second attempt moved the binding.
    assert not new_events(sim.client_events, mark, EventType.TRANSPORT_SWITCH_DENIED)
    (switch,) = new_events(sim.client_events, mark, EventType.TRANSPORT_SWITCH)
    assert (switch.previous_transport, switch.new_transport) == (1, 2)
    assert c.active == 2
    assert_gap_free(sim.client_events)


# -- AT-55 ---------------------------------------------------------------------------------

N = 100_000


def test_at55_replay_window_and_nonce_guard_are_constant_size() -> None:
    window = ReplayWindow(2048)
    ring = len(window._ring)
    rng = random.Random(55)
    counter = 0
    for _ in range(N):
        counter += rng.randrange(0, 300)
        window.update(counter - rng.randrange(0, 3000))
    assert ring <= len(window._ring) <= 2048 // 64 + 1
    guard = NonceGuard()
    for nonce in range(1, N + 1):
        guard.commit(nonce)
    assert guard.__slots__ == ("last", "max_gap") and guard.last == N


def test_at55_floods_leave_every_gateway_table_bounded() -> None:
    sim = established()
    gw = sim.gateway
    s = gw_session(sim)
    assert s.cipher is not None
    ring = len(s.cipher._current.replay._ring)
    now = sim.now
    sessions = len(gw.sessions)

    # 10^5 datagrams naming unknown sessions: nothing allocated.
    for i in range(N):
        index = i + 7 if i + 7 != s.index else 3
        gw.receive_datagram(TRANSPORT_HEADER.pack(MSG_DATA, 0, index, i) + bytes(32), ATTACKER, now)
    assert drops(gw, Drop.UNKNOWN_SESSION) >= N
    assert len(gw.sessions) == sessions

    # 10^5 authentic reattach requests, all denied (stale binding epoch; same fresh nonce,
    # so the nonce guard never moves and no request escalates).
    req = request(sim, 1, epoch=s.epoch + 1)
    spy = GatewaySpy(gw)
    bytes_in = bytes_out = 0
    for _ in range(N):
        dgram = seal_from_client(sim, req)
        bytes_in += len(dgram)
        gw.receive_datagram(dgram, addr(sim, 1), now)
        bytes_out += sum(len(d) for _, d in gw.datagrams_to_send())
    rejects = spy.of(ReattachReject)
    assert len(rejects) == N
    assert {m.reason for _, m in rejects} == {reason_to_wire(Reason.STALE_BINDING_EPOCH)}
    assert bytes_out <= bytes_in  # denials never amplify
    assert s.nonces.last < req.nonce and s.machine.state is State.ATTACHED
    assert s.security_failures == 0

    # Handshake floods from many sources: rejected by mac1 before DH, no per-source state
    # (INITs with a valid mac1 under load: tests/test_cookie.py).
    init = struct.pack("<BBxxII", 1, 0, 0, 1) + bytes(150)
    for i in range(N // 10):
        gw.receive_datagram(init, ("203.0.113.1", i), now)
    assert drops(gw, Drop.HANDSHAKE_FAILED) <= HANDSHAKE_BURST  # DH spent at most a burst
    assert drops(gw, Drop.BAD_MAC) >= N // 10
    assert gw.handshakes.remembered <= gw.handshakes.clients

    # Authentic probes from 10^4 source addresses (NAT churn): per-source tables bounded.
    for i in range(N // 10):
        probe = Probe(i, 1, sim.client.ts_ms(now))
        gw.receive_datagram(seal_from_client(sim, probe), ("198.51.100.77", i), now)
        gw.datagrams_to_send()
    assert len(s.received_from) == 2 * MAX_VALIDATED  # full, never more
    assert len(s.challenges) == MAX_CHALLENGES
    assert len(s.validated) <= MAX_VALIDATED

    # Nothing pulled the events: the queue stays at its limit and counts what it dropped.
    assert gw.report.queued_events == EVENT_QUEUE_LIMIT
    assert gw.events_dropped > 0
    assert len(gw.drops) < 30 and gw.report.security_kinds < 20
    assert len(s.cipher._current.replay._ring) <= max(ring, 8192 // 64 + 1)
    assert s.binding == addr(sim, 1) and s.machine.state is State.ATTACHED


# -- AT-60 ---------------------------------------------------------------------------------


def test_at60a_transport_death_never_raises_a_security_event() -> None:
    sim = established()
    s = gw_session(sim)
    sim.links[1].imp.up = False  # A dies: recovery to B
    sim.run_until(6.0)
    assert sim.client.active == 2
    sim.links[2].imp.loss_up = sim.links[2].imp.loss_down = 0.3  # lossy B
    sim.links[2].imp.jitter_s = 0.008
    sim.run_until(12.0)
    kill_all_links(sim)  # total blackout until the end
    sim.run_until(40.0)
    assert sim.client.state is State.TERMINATED
    for events in (sim.client_events, sim.gateway_events):
        assert not [e for e in events if e.event_type == EventType.SECURITY_EVENT]
        terms = [e for e in events if e.event_type == EventType.SESSION_TERMINATED]
        assert all(e.reason_code is not Reason.SECURITY_FAILURE for e in terms)
    assert s.security_failures == 0 and s.machine.state is State.TERMINATED


def test_at60b_bad_proof_stream_never_starts_recovery_or_a_switch() -> None:
    sim = established()
    s = gw_session(sim)
    mark_g, mark_c = len(sim.gateway_events), len(sim.client_events)
    forger = foreign_cipher()
    for i in range(1_000):  # 10 s of forged reattach/data from everywhere
        req = request(sim, 1 + i % 2, nonce=s.nonces.last + 1, kind=ReattachKind.RECOVERY)
        sim.inject_to_gateway(forger.seal(MSG_CONTROL, s.index, pack_control(req)), ATTACKER)
        sim.inject_to_gateway(forger.seal(MSG_DATA, s.index, b"E" * 40), addr(sim, 2))
        sim.inject_to_client(forger.seal(MSG_CONTROL, sim.client.index, pack_control(req)), 1)
        sim.advance(0.01)
    for events, mark in ((sim.gateway_events, mark_g), (sim.client_events, mark_c)):
        for kind in (
            EventType.STATE_CHANGE, EventType.TRANSPORT_SWITCH, EventType.REATTACH_ATTEMPT,
            EventType.REATTACH_RESULT, EventType.TRANSPORT_DEAD,
        ):  # fmt: skip
            assert not new_events(events, mark, kind), kind
        assert len(new_events(events, mark, EventType.SECURITY_EVENT)) <= 12
    assert s.security_failures == 0 and s.machine.state is State.ATTACHED
    assert sim.client.state is State.ATTACHED and sim.client.active == 1


def test_at60b_forged_packets_do_not_keep_a_dead_path_alive() -> None:
    """Bad proofs must not mask a transport failure either: path 1 goes silent while an
    attacker keeps injecting forged datagrams on it; both sides still declare it dead."""
    sim = established()
    s = gw_session(sim)
    sim.links[1].imp.up = False
    forger = foreign_cipher()
    for _ in range(300):
        sim.inject_to_client(forger.seal(MSG_DATA, sim.client.index, b"E" * 40), 1)
        sim.inject_to_gateway(forger.seal(MSG_DATA, s.index, b"E" * 40), addr(sim, 1))
        sim.advance(0.01)
    assert sim.client.active == 2
    assert s.binding == addr(sim, 2)
    assert s.security_failures == 0
