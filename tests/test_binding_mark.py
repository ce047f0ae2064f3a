"""Issue 10 item 1: standby paths carry traffic without a round trip (the binding mark).

A real ClientSession and GatewaySessions over memory links with a fake clock
(tests/simkit.py). docs/wire-format.md ("Binding mark") is the contract: an automatic
switch to a path the gateway has validated moves the binding with the first authentic,
newest datagram marked with the next epoch from a validated address; the gateway marks
what it sends with what it knows of the destination; a replayed or stolen datagram moves
nothing; unconfirmed, the attempt falls back to the explicit REATTACH_REQUEST.
"""

from __future__ import annotations

from typing import Any

from simkit import (
    CLIENT_INNER,
    GATEWAY_INNER,
    assert_gap_free,
    build,
    ipv4_packet,
    make_policy,
    of_type,
)  # fmt: skip

from tunnel.core.aead import SessionCipher
from tunnel.core.constants import MARK_BINDING, MARK_VALIDATED, MSG_DATA
from tunnel.core.drops import Drop
from tunnel.core.events import EventType, Reason
from tunnel.core.gateway_session import GatewaySession
from tunnel.core.session import State
from tunnel.core.switching import MARK_NONCE_BUDGET
from tunnel.core.wire import Control, ReattachAck, ReattachReject, ReattachRequest, parse_header
from tunnel.io.memory import Simulation

ATTACKER = ("203.0.113.66", 6666)
"""An address no client path uses (TEST-NET-3)."""


class Spy:
    """Every control message the gateway seals, and every datagram each side receives."""

    def __init__(self, sim: Simulation) -> None:
        self.gw_sent: list[tuple[Any, Control]] = []
        self.client_sent: list[tuple[int, Control]] = []
        self.to_gateway: list[tuple[Any, bytes, float]] = []
        gateway = sim.gateway
        original = gateway.outbox.control

        def send(cipher: SessionCipher, peer_index: int, where: Any, msg: Control) -> int:
            self.gw_sent.append((where, msg))
            return original(cipher, peer_index, where, msg)

        gateway.outbox.control = send  # type: ignore[method-assign]
        client = sim.client
        client_send = client.send_control

        def client_control(path_id: int, msg: Control) -> None:
            self.client_sent.append((path_id, msg))
            client_send(path_id, msg)

        client.send_control = client_control  # type: ignore[method-assign]
        sim.taps.append(
            lambda d: self.to_gateway.append((d.src, d.data, sim.now)) if d.to_gateway else None
        )

    def gw_of(self, cls: type) -> list[Any]:
        return [m for _, m in self.gw_sent if isinstance(m, cls)]

    def client_of(self, cls: type) -> list[Any]:
        return [m for _, m in self.client_sent if isinstance(m, cls)]


def gw_session(sim: Simulation) -> GatewaySession:
    (s,) = sim.gateway.sessions.values()
    return s


def addr(sim: Simulation, path_id: int) -> tuple[str, int]:
    return sim.links[path_id].client_addr


def view(s: GatewaySession) -> tuple[Any, ...]:
    return (s.machine.state, s.machine.version, s.epoch, s.binding, s.total_switches)


def ready(**policy: Any) -> Simulation:
    """ATTACHED on path 1; path 2 validated at the gateway, and the client knows it."""
    sim = build(policy=make_policy(**policy))
    sim.advance(2.5)
    assert sim.client.state is State.ATTACHED and sim.client.active == 1
    assert addr(sim, 2) in gw_session(sim).validated
    assert sim.client.paths.get(2).gateway_validated
    return sim


def marked(data: bytes) -> bool:
    header = parse_header(data)
    return not isinstance(header, Drop) and header.mark != 0


# -- the move -------------------------------------------------------------------------------


def test_recovery_moves_the_binding_with_the_first_marked_datagram_no_request() -> None:
    sim = ready()
    s = gw_session(sim)
    spy = Spy(sim)
    epoch, mark_c, mark_g = s.epoch, len(sim.client_events), len(sim.gateway_events)
    sim.links[1].imp.up = False  # blackholed both ways
    sim.advance(1.0)

    client_new, gw_new = sim.client_events[mark_c:], sim.gateway_events[mark_g:]
    (attempt,) = of_type(client_new, EventType.REATTACH_ATTEMPT)
    assert (attempt.kind, attempt.candidate_transport) == ("recovery", 2) and attempt.nonce >= 1
    assert attempt.expected_epoch == epoch
    # No REATTACH round trip: the client sent no request, the gateway no ACK or REJECT, and
    # no nonce reached the gateway's guard.
    assert not spy.client_of(ReattachRequest)
    assert not spy.gw_of(ReattachAck) and not spy.gw_of(ReattachReject)
    assert s.nonces.last == 0
    # The gateway moved when the first marked datagram arrived, one way (10 ms) after the
    # client decided: no round trip before the move.
    first = next((a, t) for a, d, t in spy.to_gateway if marked(d))
    assert first[0] == addr(sim, 2)
    (gw_switch,) = of_type(gw_new, EventType.TRANSPORT_SWITCH)
    assert gw_switch.ts_ms == round(first[1] * 1000) == attempt.ts_ms + 10
    assert (gw_switch.previous_transport, gw_switch.new_transport) == (1, 2)
    assert gw_switch.reason_code == Reason.DEAD_TRANSPORT_RECOVERY  # the kind in the mark
    assert gw_switch.binding_epoch == epoch + 1 == s.epoch and s.binding == addr(sim, 2)
    (gw_result,) = of_type(gw_new, EventType.REATTACH_RESULT)
    assert gw_result.status == "SUCCESS" and gw_result.candidate_transport == 2
    # The client commits on the first datagram back from the new binding: same events and
    # transition as an acknowledged request.
    (switch,) = of_type(client_new, EventType.TRANSPORT_SWITCH)
    assert (switch.previous_transport, switch.new_transport) == (1, 2)
    assert switch.reason_code == Reason.REATTACH_SUCCESS and switch.binding_epoch == epoch + 1
    (result,) = of_type(client_new, EventType.REATTACH_RESULT)
    assert result.status == "SUCCESS" and result.candidate_transport == 2
    assert [c[1:3] for c in _changes(client_new)] == [
        ("RECOVERING", "transport_dead"), ("ATTACHED", "reattach_success"),
    ]  # fmt: skip
    assert sim.client.active == 2 and sim.client.epoch == s.epoch
    assert sim.client.total_switches == 1 and s.total_switches == 1
    _flows(sim)
    assert_gap_free(sim.client_events)
    assert_gap_free(sim.gateway_events)


def test_proactive_switch_moves_by_mark_with_its_reason() -> None:
    sim = ready(dead_min_ms=1_000)  # the lossy path must not look dead
    s = gw_session(sim)
    spy = Spy(sim)
    sim.links[1].imp.loss_up = 0.35
    sim.advance(8.0)

    (switch,) = of_type(sim.client_events, EventType.TRANSPORT_SWITCH)
    assert switch.new_transport == 2 and switch.reason_code == Reason.LOSS_RECOVERY
    gw_switch = of_type(sim.gateway_events, EventType.TRANSPORT_SWITCH)
    assert [(g.new_transport, g.reason_code) for g in gw_switch] == [(2, Reason.LOSS_RECOVERY)]
    assert not spy.client_of(ReattachRequest) and s.nonces.last == 0
    assert s.binding == addr(sim, 2) and sim.client.epoch == s.epoch
    assert_gap_free(sim.client_events)
    assert_gap_free(sim.gateway_events)


def test_the_gateway_marks_what_it_sends_with_what_it_knows_of_the_destination() -> None:
    sim = ready()
    s = gw_session(sim)
    seen: list[tuple[int, int, int]] = []
    sim.taps.append(lambda d: d.to_gateway or seen.append((d.path_id, d.data[2], d.data[3])))
    sim.gateway_tun.inject(ipv4_packet(GATEWAY_INNER, CLIENT_INNER))
    sim.advance(2.0)
    assert (1, s.epoch & 0xFF, MARK_BINDING) in seen  # data and probe answers to the binding
    assert (2, s.epoch & 0xFF, MARK_VALIDATED) in seen  # probe answers to the standby
    assert {mark for _, _, mark in seen} <= {MARK_BINDING, MARK_VALIDATED}


def test_manual_switch_keeps_the_explicit_request() -> None:
    sim = ready()
    s = gw_session(sim)
    spy = Spy(sim)
    assert sim.client.switch_to(2, sim.now) is None
    sim.advance(0.5)
    (req,) = spy.client_of(ReattachRequest)
    assert req.kind == 2 and s.nonces.last == req.nonce  # ReattachKind.MANUAL, committed
    assert len(spy.gw_of(ReattachAck)) == 1 and s.binding == addr(sim, 2)


# -- what cannot move anything ---------------------------------------------------------------


def _marked_datagrams(sim: Simulation) -> list[tuple[Any, bytes]]:
    """Kill path 1 and run until the client sends its first marked datagrams; the network
    hands those to the test instead of the gateway (everything else is delivered)."""
    stolen: list[tuple[Any, bytes]] = []
    original = sim.gateway.receive_datagram

    def receive(data: bytes, src: Any, now: float) -> None:
        if marked(data):
            stolen.append((src, data))
        else:
            original(data, src, now)

    sim.gateway.receive_datagram = receive  # type: ignore[method-assign]
    sim.links[1].imp.up = False
    for _ in range(200):
        sim.advance(0.005)
        if stolen:
            break
    sim.gateway.receive_datagram = original  # type: ignore[method-assign]
    assert stolen, "the client never started a switch by mark"
    return stolen


def test_a_stolen_marked_datagram_from_a_third_address_moves_nothing() -> None:
    """The attacker races the client: its copy arrives first, from an address the session
    never validated. Then the original arrives (a duplicate now), then the next marked one
    moves the binding where the client asked, never to the attacker."""
    sim = ready()
    s = gw_session(sim)
    before = view(s)
    ((src, stolen), *_) = _marked_datagrams(sim)
    assert src == addr(sim, 2)
    mark_g = len(sim.gateway_events)

    sim.gateway.receive_datagram(stolen, ATTACKER, sim.now)
    assert view(s) == before and s.binding != ATTACKER
    assert ATTACKER not in s.validated
    duplicates = sim.gateway.drops.get(str(Drop.DUPLICATE), 0)
    sim.gateway.receive_datagram(stolen, addr(sim, 2), sim.now)  # the original, late
    assert view(s) == before
    assert sim.gateway.drops.get(str(Drop.DUPLICATE), 0) == duplicates + 1
    assert not of_type(sim.gateway_events[mark_g:], EventType.TRANSPORT_SWITCH)

    sim.advance(1.0)  # the client keeps sending marked datagrams on path 2
    assert s.binding == addr(sim, 2) and ATTACKER not in s.validated
    assert [g.new_transport for g in of_type(sim.gateway_events, EventType.TRANSPORT_SWITCH)] == [2]


def test_a_replayed_marked_datagram_moves_nothing_from_any_source() -> None:
    sim = ready()
    s = gw_session(sim)
    spy = Spy(sim)
    sim.links[1].imp.up = False
    sim.advance(1.0)
    mover = next(d for a, d, _ in spy.to_gateway if a == addr(sim, 2) and marked(d))
    assert s.binding == addr(sim, 2)
    sim.links[1].imp.up = True
    sim.advance(3.0)
    before, mark_g = view(s), len(sim.gateway_events)
    replays = sim.gateway.drops.get(str(Drop.REPLAY), 0)

    for src in (ATTACKER, addr(sim, 2), addr(sim, 1)):
        sim.inject_to_gateway(mover, src)
        sim.advance(1.1)

    assert view(s) == before
    assert not of_type(sim.gateway_events[mark_g:], EventType.TRANSPORT_SWITCH)
    assert not of_type(sim.gateway_events[mark_g:], EventType.STATE_CHANGE)
    assert sim.gateway.drops.get(str(Drop.REPLAY), 0) == replays + 1  # from the attacker
    assert ATTACKER not in s.validated


def test_a_mark_moves_only_to_the_next_epoch_only_newest_only_from_a_validated_address() -> None:
    sim = ready()
    s = gw_session(sim)
    cipher, index = sim.client.cipher, sim.client.peer_index
    assert cipher is not None
    packet = ipv4_packet(CLIENT_INNER, GATEWAY_INNER)
    before = view(s)

    def seal(epoch: int, mark: int = 1) -> bytes:
        return cipher.seal(MSG_DATA, index, packet, mark=(epoch, mark))

    sim.gateway.receive_datagram(seal(s.epoch + 2), addr(sim, 2), sim.now)  # epoch + 2
    sim.gateway.receive_datagram(seal(s.epoch), addr(sim, 2), sim.now)  # the current epoch
    sim.gateway.receive_datagram(seal(s.epoch + 1), ("198.51.100.9", 9), sim.now)  # unvalidated
    assert view(s) == before
    older, newer = seal(s.epoch + 1), seal(0, 0)
    sim.gateway.receive_datagram(newer, addr(sim, 1), sim.now)
    sim.gateway.receive_datagram(older, addr(sim, 2), sim.now)  # marked, but not the newest
    assert view(s) == before
    sim.gateway.receive_datagram(seal(s.epoch + 1, 2), addr(sim, 2), sim.now)
    assert s.binding == addr(sim, 2) and s.epoch == before[2] + 1
    (gw_switch,) = of_type(sim.gateway.events(), EventType.TRANSPORT_SWITCH)
    assert gw_switch.reason_code == Reason.LOSS_RECOVERY  # mark 2: 1 + PROACTIVE


def test_a_mark_spends_a_reattach_token_like_a_request() -> None:
    sim = ready()
    s = gw_session(sim)
    cipher, index = sim.client.cipher, sim.client.peer_index
    assert cipher is not None
    packet = ipv4_packet(CLIENT_INNER, GATEWAY_INNER)
    burst, epoch = sim.client.policy.reattach_burst, s.epoch
    for i in range(burst + 2):
        dgram = cipher.seal(MSG_DATA, index, packet, mark=(s.epoch + 1, 2))
        sim.gateway.receive_datagram(dgram, addr(sim, 2 if i % 2 == 0 else 1), sim.now)
    # The bucket (full, no refill at a frozen clock) stops the moves after the burst.
    assert s.epoch - epoch == s.total_switches == burst


# -- fallback and budget ---------------------------------------------------------------------


def test_unconfirmed_move_falls_back_to_the_request() -> None:
    """The gateway never sees a marked datagram (dropped on the way): after
    reattach_retry_ms the attempt sends its REATTACH_REQUEST, with the attempt's nonce."""
    sim = ready()
    s = gw_session(sim)
    spy = Spy(sim)
    original = sim.gateway.receive_datagram

    def receive(data: bytes, src: Any, now: float) -> None:
        if not marked(data):
            original(data, src, now)

    sim.gateway.receive_datagram = receive  # type: ignore[method-assign]
    mark_c = len(sim.client_events)
    sim.links[1].imp.up = False
    sim.advance(1.5)

    (attempt,) = of_type(sim.client_events[mark_c:], EventType.REATTACH_ATTEMPT)
    requests = spy.client_of(ReattachRequest)
    assert requests and {r.nonce for r in requests} == {attempt.nonce}
    assert s.nonces.last == attempt.nonce and s.binding == addr(sim, 2)
    (switch,) = of_type(sim.client_events[mark_c:], EventType.TRANSPORT_SWITCH)
    assert switch.new_transport == 2 and sim.client.epoch == s.epoch
    assert_gap_free(sim.client_events)


def test_marks_never_outrun_the_gateways_nonce_window() -> None:
    """After MARK_NONCE_BUDGET nonces the gateway never saw, the next switch asks with a
    request (the gateway's nonce guard allows a gap of 256)."""
    sim = ready()
    spy = Spy(sim)
    sim.client.switching.nonce = MARK_NONCE_BUDGET  # as if that many moves went by mark
    sim.links[1].imp.up = False
    sim.advance(1.0)
    (req,) = spy.client_of(ReattachRequest)
    assert req.nonce == MARK_NONCE_BUDGET + 1 and gw_session(sim).nonces.last == req.nonce
    assert sim.client.active == 2


def _changes(events: list[Any]) -> list[tuple[str, str, str]]:
    return [
        (e.previous_state, e.new_state, str(e.reason_code))
        for e in of_type(events, EventType.STATE_CHANGE)
    ]


def _flows(sim: Simulation) -> None:
    up = ipv4_packet(CLIENT_INNER, GATEWAY_INNER, b"up" * 20, ident=7)
    down = ipv4_packet(GATEWAY_INNER, CLIENT_INNER, b"dn" * 20, ident=8)
    sim.client_tun.inject(up)
    sim.gateway_tun.inject(down)
    sim.advance(0.2)
    assert up in sim.gateway_tun.from_tunnel and down in sim.client_tun.from_tunnel
