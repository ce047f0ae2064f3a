"""Idle sessions probe slowly (issue 11 item 4; docs/policy.md, "Idle sessions").

A real client and gateway over memory links with a fake clock (tests/simkit.py), at the
default policy unless a test says otherwise: a session with no inner data either way for
``idle_after_ms`` probes its active path every ``idle_probe_interval_ms`` and its standby
paths every ``idle_standby_probe_interval_ms``; the first inner packet after idleness is
followed at once by a probe; a path that dies while the session is idle is still found
(by the next slow probe, or at once when data leaves), and the gateway does not call an
idle session's binding dead between two slow probes.
"""

from __future__ import annotations

import dataclasses
import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from simkit import CLIENT_INNER, GATEWAY_INNER, build, ipv4_packet, of_type

from tunnel.core.aead import SessionCipher, TrafficKeys
from tunnel.core.ciphers import ALL_CIPHERS, DataCipher
from tunnel.core.constants import MAX_MARK, MSG_CONTROL
from tunnel.core.events import EventType, Reason
from tunnel.core.policy import POLICY_DEFAULT
from tunnel.core.session import State
from tunnel.core.wire import (
    PROBE_ACK_BODY,
    STATE_CODES,
    CType,
    ProbeAck,
    pack_control,
    parse_control,
)
from tunnel.io.memory import Simulation

POL = POLICY_DEFAULT
IDLE_S = POL.idle_after_ms / 1000
ACTIVE_S = POL.idle_probe_interval_ms / 1000
STANDBY_S = POL.idle_standby_probe_interval_ms / 1000


def _controls_up(sim: Simulation) -> list[tuple[float, int]]:
    """Record (time, path id) of every CONTROL datagram the client puts on a link."""
    seen: list[tuple[float, int]] = []
    real = sim.client.datagrams_to_send

    def watched() -> list[tuple[int, bytes]]:
        out = real()
        seen.extend((sim.now, pid) for pid, d in out if d[0] == MSG_CONTROL)
        return out

    sim.client.datagrams_to_send = watched  # type: ignore[method-assign]
    return seen


def _idle_sim(n_paths: int = 2) -> tuple[Simulation, list[tuple[float, int]]]:
    sim = build(n_paths=n_paths, policy=POL)
    sent = _controls_up(sim)
    sim.advance(IDLE_S + 2 * POL.standby_probe_interval_ms / 1000)
    assert sim.client.state is State.ATTACHED and sim.client.active == 1
    assert sim.client.idle(sim.now)
    return sim, sent


def test_the_default_policy_makes_a_session_idle_after_idle_after_ms() -> None:
    assert (POL.idle_after_ms, POL.idle_probe_interval_ms) == (5_000, 10_000)
    assert POL.idle_standby_probe_interval_ms == 15_000
    assert POL.idle_probe_interval_ms < 30_000  # NAT mappings are refreshed well inside 30 s
    sim = build(policy=POL)
    sim.advance(IDLE_S - 0.5)
    assert not sim.client.idle(sim.now)
    sim.advance(1.0)
    assert sim.client.idle(sim.now)


def test_an_idle_session_probes_at_the_idle_intervals() -> None:
    sim, sent = _idle_sim()
    t0, window = sim.now, 100.0  # before the first rekey (120 s): its REKEY is a CONTROL too
    sim.advance(window)
    active = [t for t, pid in sent if pid == 1 and t >= t0]
    standby = [t for t, pid in sent if pid == 2 and t >= t0]
    assert window / ACTIVE_S - 1 <= len(active) <= window / ACTIVE_S + 1, active
    assert window / STANDBY_S - 1 <= len(standby) <= window / STANDBY_S + 1, standby
    gaps = [b - a for a, b in itertools.pairwise(active)]
    assert all(abs(g - ACTIVE_S) < 0.05 for g in gaps), gaps
    # nothing changed meanwhile: no death on either side, no state change, no path event
    assert sim.client.state is State.ATTACHED
    assert not of_type(sim.client_events, EventType.TRANSPORT_DEAD)
    assert not of_type(sim.gateway_events, EventType.TRANSPORT_DEAD)
    assert not [e for e in sim.gateway_events if e.event_type == EventType.STATE_CHANGE
                and e.ts_ms >= t0 * 1000]  # fmt: skip
    assert all(v.role in ("active", "standby") for v in sim.client.snapshot(sim.now).paths)


def test_a_busy_session_keeps_the_busy_rates() -> None:
    sim = build(policy=POL)
    sent = _controls_up(sim)
    sim.advance(1.0)
    t0 = sim.now
    for _ in range(200):  # one packet each 50 ms for 10 s: never idle
        sim.client_tun.inject(ipv4_packet(CLIENT_INNER, GATEWAY_INNER))
        sim.advance(0.05)
    assert not sim.client.idle(sim.now)
    active = [t for t, pid in sent if pid == 1 and t >= t0]
    expected = (sim.now - t0) * 1000 / POL.probe_interval_ms
    assert 0.9 * expected <= len(active) <= 1.1 * expected


def test_first_data_after_idleness_probes_the_active_path_at_once() -> None:
    sim, sent = _idle_sim()
    sim.advance(ACTIVE_S / 2)  # between two slow probes
    t_data = sim.now
    before = len([1 for t, pid in sent if pid == 1])
    sim.client_tun.inject(ipv4_packet(CLIENT_INNER, GATEWAY_INNER))
    sim.advance(0.001)
    at_once = [t for t, pid in sent if pid == 1][before:]
    assert at_once and at_once[0] - t_data < 0.001, at_once
    assert not sim.client.idle(sim.now)
    sim.advance(1.0)  # then the busy schedule
    busy = [t for t, pid in sent if pid == 1 and t_data <= t <= t_data + 1.0]
    assert len(busy) >= 0.8 * 1000 / POL.probe_interval_ms


def test_data_from_the_gateway_ends_idleness_too() -> None:
    sim, _sent = _idle_sim()
    sim.gateway_tun.inject(ipv4_packet(GATEWAY_INNER, CLIENT_INNER))
    sim.advance(0.1)
    assert sim.client_tun.from_tunnel
    assert not sim.client.idle(sim.now)


def _death(sim: Simulation) -> tuple[float, Reason]:
    dead = of_type(sim.client_events, EventType.TRANSPORT_DEAD)
    assert dead, "the dead path was not found"
    return dead[0].ts_ms / 1000, dead[0].reason_code


def test_a_path_that_dies_while_idle_is_found_by_the_next_slow_probe() -> None:
    sim, _sent = _idle_sim()
    sim.links[1].imp.up = False
    t_kill = sim.now
    sim.advance(ACTIVE_S + 2.0)
    t_dead, _ = _death(sim)
    # found within one idle probe interval and a busy death time
    assert t_dead - t_kill <= ACTIVE_S + (POL.dead_min_ms + 100) / 1000, t_dead - t_kill
    sim.advance(2.0)
    assert sim.client.state is State.ATTACHED and sim.client.active == 2


def test_a_path_that_died_while_idle_is_found_fast_when_data_leaves() -> None:
    sim, _sent = _idle_sim()
    sim.advance(0.5)  # just after a slow probe was answered
    sim.links[1].imp.up = False
    sim.advance(1.0)
    assert not of_type(sim.client_events, EventType.TRANSPORT_DEAD)  # not probed yet
    t_data = sim.now
    sim.client_tun.inject(ipv4_packet(CLIENT_INNER, GATEWAY_INNER))
    sim.advance(2.0)
    t_dead, _ = _death(sim)
    # as a busy session: dead_min_ms (300 ms) after the probe that left with the data
    assert t_dead - t_data <= (POL.dead_min_ms + 50) / 1000, t_dead - t_data
    assert sim.client.state is State.ATTACHED and sim.client.active == 2


def test_no_false_death_when_data_leaves_long_after_the_last_answer() -> None:
    """The active path's last answer is up to a slow interval old when data leaves: its
    silence counts from then, so it is not dead at once."""
    sim, _sent = _idle_sim()
    sim.advance(ACTIVE_S - 0.2)
    for _ in range(20):
        sim.client_tun.inject(ipv4_packet(CLIENT_INNER, GATEWAY_INNER))
        sim.advance(0.05)
    assert not of_type(sim.client_events, EventType.TRANSPORT_DEAD)
    assert sim.client.active == 1 and sim.client.state is State.ATTACHED


def test_one_lost_slow_probe_is_retried_fast_and_is_no_death() -> None:
    sim, sent = _idle_sim()
    link = sim.links[1]
    # lose exactly the next slow probe (and nothing after it)
    sim.advance(ACTIVE_S - 0.05 - (sim.now % ACTIVE_S))
    lost = link.lost
    link.imp.loss_up = 1.0
    n = len(sent)
    for _ in range(2000):
        sim.advance(0.005)
        if len(sent) > n:
            break
    link.imp.loss_up = 0.0
    assert link.lost == lost + 1
    t_lost = sent[n][0]
    sim.advance(1.0)
    retries = [t for t, pid in sent[n + 1 :] if pid == 1 and t < t_lost + 0.5]
    assert retries and retries[0] - t_lost <= 0.2, retries
    assert not of_type(sim.client_events, EventType.TRANSPORT_DEAD)
    assert sim.client.state is State.ATTACHED and sim.client.active == 1


def test_gateway_waits_longer_for_an_idle_client_but_not_forever() -> None:
    sim, _sent = _idle_sim(n_paths=1)
    for link in sim.links.values():
        link.imp.up = False
    t_kill = sim.now
    sim.advance(ACTIVE_S + 5.0)
    dead = of_type(sim.gateway_events, EventType.TRANSPORT_DEAD)
    assert dead
    busy_s = max(1.0, 3 * POL.dead_min_ms / 1000)
    assert dead[0].ts_ms / 1000 - t_kill <= busy_s + ACTIVE_S + 0.1


def test_gateway_keeps_its_fast_death_while_the_client_sends_data() -> None:
    sim = build(n_paths=1, policy=POL)
    sim.advance(0.5)
    for _ in range(20):
        sim.client_tun.inject(ipv4_packet(CLIENT_INNER, GATEWAY_INNER))
        sim.advance(0.05)
    sim.links[1].imp.up = False
    t_kill = sim.now
    sim.advance(3.0)
    dead = of_type(sim.gateway_events, EventType.TRANSPORT_DEAD)
    assert dead and dead[0].ts_ms / 1000 - t_kill <= 1.2


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**16),
    idle_after_ms=st.sampled_from([2_000, 5_000]),
    idle_probe_ms=st.sampled_from([100, 2_000, 10_000]),
    steps=st.lists(
        st.tuples(
            st.sampled_from(["data", "gw_data", "kill", "restore", "wait"]),
            st.integers(1, 2),
            st.floats(0.01, 25.0),
        ),
        min_size=1,
        max_size=10,
    ),
)
def test_no_deadline_is_missed_idle_or_busy(
    seed: int, idle_after_ms: int, idle_probe_ms: int, steps: list[tuple[str, int, float]]
) -> None:
    """Property: whatever the mix of idleness, data and path deaths, after every timer call
    nothing is left due (next_deadline is after now), a session idle with a live active path
    probes it at least every idle_probe_interval_ms, and the active path is never declared
    dead while it answers."""
    policy = dataclasses.replace(
        POL, idle_after_ms=idle_after_ms, idle_probe_interval_ms=idle_probe_ms
    )
    sim = build(seed=seed, policy=policy)
    client = sim.client
    real = client.handle_timer
    late: list[float] = []

    def checked(now: float) -> None:
        real(now)
        deadline = client.next_deadline()
        if deadline is not None and deadline <= now:
            late.append(now)

    client.handle_timer = checked  # type: ignore[method-assign]
    sent = _controls_up(sim)
    sim.advance(1.0)
    for kind, path, dt in steps:
        if kind == "data":
            sim.client_tun.inject(ipv4_packet(CLIENT_INNER, GATEWAY_INNER))
        elif kind == "gw_data":
            sim.gateway_tun.inject(ipv4_packet(GATEWAY_INNER, CLIENT_INNER))
        elif kind in ("kill", "restore"):
            sim.links[path].imp.up = kind == "restore"
        sim.advance(dt)
        if client.state is State.TERMINATED:
            break
    assert not late, late
    sim.links[1].imp.up = sim.links[2].imp.up = True
    sim.advance(3.0)  # recovered, if it could
    start = sim.now
    sim.advance(3 * idle_probe_ms / 1000 + idle_after_ms / 1000)
    assert not late, late
    if client.state is State.ATTACHED and client.active is not None:
        probes = [
            t for t, pid in sent if pid == client.active and t >= start + idle_after_ms / 1000
        ]
        gaps = [b - a for a, b in itertools.pairwise(probes)]
        assert all(g <= idle_probe_ms / 1000 + 0.001 for g in gaps), gaps
        dead = [e for e in of_type(sim.client_events, EventType.TRANSPORT_DEAD)
                if e.ts_ms >= start * 1000]  # fmt: skip
        assert not dead, dead


# == the gateway's PROBE_ACK, sealed from its fields (issue 11 item 4) ========================
@settings(max_examples=60, deadline=None)
@given(
    fields=st.tuples(
        st.integers(0, 2**32 - 1),
        st.integers(0, 255),
        st.integers(0, 2**64 - 1),
        st.integers(0, len(STATE_CODES) - 1),
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1),
    ),
    mark=st.tuples(st.integers(0, 2**32 - 1), st.integers(0, MAX_MARK)),
    cipher=st.sampled_from(ALL_CIPHERS),
)
def test_a_probe_ack_sealed_from_its_fields_is_the_datagram_seal_makes(
    fields: tuple[int, int, int, int, int, int], mark: tuple[int, int], cipher: DataCipher
) -> None:
    """``seal_packed`` (reusable buffers, no record) makes byte for byte the datagram that
    ``seal(pack_control(ProbeAck(...)))`` makes, and the peer opens it to those fields."""
    keys = TrafficKeys(send=bytes(range(32)), recv=bytes(range(32, 64)))
    fast, slow = (SessionCipher(keys, now=0.0, suite=cipher) for _ in range(2))
    peer = SessionCipher(TrafficKeys(send=keys.recv, recv=keys.send), now=0.0, suite=cipher)
    for c in (fast, slow):
        c.set_mark(*mark)
    for _ in range(3):  # the buffers are reused: each datagram is its own
        a = fast.seal_packed(MSG_CONTROL, 7, PROBE_ACK_BODY, CType.PROBE_ACK, *fields)
        b = slow.seal(MSG_CONTROL, 7, pack_control(ProbeAck(*fields)))
        assert a == b and type(a) is bytes
        opened = peer.open(a, 1.0)
        assert isinstance(opened, bytes) and parse_control(opened) == ProbeAck(*fields)
