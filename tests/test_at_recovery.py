"""Acceptance tests for transport failure and recovery (SPEC-DIGEST §10.2, §10.4, §10.8).

AT-10, AT-12, AT-13, AT-14, AT-15, AT-18, AT-35, AT-58, AT-59: a real client and gateway
over memory links (tests/simkit.py) with a fake clock. Assertions are on the event
streams (types, reasons, fields) and the snapshots only.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import pytest
from simkit import (
    CLIENT_INNER,
    assert_gap_free,
    build,
    ipv4_packet,
    make_policy,
    of_type,
    state_changes,
)

from tunnel.core.constants import MSG_CONTROL
from tunnel.core.events import EventType, Reason
from tunnel.core.wire import Probe, ReattachKind, ReattachRequest, pack_control
from tunnel.io.memory import Simulation

PEER = "10.66.0.9"


def _gw_events(sim: Simulation) -> list[Any]:
    return list(sim.gateway_events)


def _transition_ts(events: list[Any], new_state: str) -> list[int]:
    return [e.ts_ms for e in of_type(events, EventType.STATE_CHANGE) if e.new_state == new_state]


def _packets_flow(sim: Simulation) -> None:
    """Inner packets reach the other side in both directions."""
    up = ipv4_packet(CLIENT_INNER, PEER, b"up" * 20, ident=7)
    down = ipv4_packet(PEER, CLIENT_INNER, b"dn" * 20, ident=8)
    sim.client_tun.inject(up)
    sim.gateway_tun.inject(down)
    sim.advance(0.2)
    assert up in sim.gateway_tun.from_tunnel
    assert down in sim.client_tun.from_tunnel


def _one_identity(sim: Simulation) -> str:
    sid = sim.client.machine.session_id
    assert sid
    assert {e.session_id for e in sim.client_events if e.session_id} == {sid}
    assert {e.session_id for e in _gw_events(sim) if e.session_id} == {sid}
    assert len(of_type(sim.client_events, EventType.SESSION_CREATED)) == 1
    assert len(of_type(_gw_events(sim), EventType.SESSION_CREATED)) == 1
    return sid


# -- AT-10 ---------------------------------------------------------------------------------
def test_at10_transport_death_with_backup_switches_within_bound_same_session() -> None:
    sim = build()
    sim.advance(2.0)
    sid = sim.client.machine.session_id
    pol = sim.client.policy
    kill_ms = int(sim.now * 1000)
    sim.links[1].imp.up = False  # socket gone, no teardown
    sim.advance(2.0)

    ev = sim.client_events
    (dead,) = of_type(ev, EventType.TRANSPORT_DEAD)
    assert dead.transport_id == 1 and dead.reason_code == Reason.TRANSPORT_DEAD
    assert state_changes(ev) == [
        ("BIRTH", "ATTACHED", "attached_to_transport", 1),
        ("ATTACHED", "RECOVERING", "transport_dead", 2),
        ("RECOVERING", "ATTACHED", "reattach_success", 3),
    ]
    into_recovering = of_type(ev, EventType.STATE_CHANGE)[1]
    assert into_recovering.from_transport == 1 and into_recovering.candidate_set_size == 1
    (attempt,) = of_type(ev, EventType.REATTACH_ATTEMPT)
    assert attempt.candidate_transport == 2 and attempt.kind == "recovery" and attempt.nonce >= 1
    (switch,) = of_type(ev, EventType.TRANSPORT_SWITCH)
    assert (switch.previous_transport, switch.new_transport) == (1, 2)
    assert switch.reason_code == Reason.REATTACH_SUCCESS
    assert switch.explicit and switch.auditable
    assert 0 < switch.switch_latency_ms <= pol.recovery_window_ms
    # Kill -> new binding: death detection plus the reattach round trip, far inside the bound.
    assert switch.ts_ms - kill_ms <= pol.dead_min_ms + pol.probe_interval_ms + 100
    (result,) = of_type(ev, EventType.REATTACH_RESULT)
    assert result.status == "SUCCESS" and result.candidate_transport == 2

    gw_switch = of_type(_gw_events(sim), EventType.TRANSPORT_SWITCH)
    assert [(s.previous_transport, s.new_transport) for s in gw_switch] == [(1, 2)]
    snap = sim.client.snapshot(sim.now)
    assert (snap.session_id, snap.state, snap.active, snap.total_switches) == (
        sid, "ATTACHED", 2, 1,
    )  # fmt: skip
    (view,) = sim.gateway.session_views(sim.now)
    assert view.state == "ATTACHED" and view.binding == "198.51.100.2:40200"
    assert view.binding_epoch == snap.binding_epoch == 2
    assert not of_type(ev, EventType.SESSION_TERMINATED)
    assert _one_identity(sim) == sid  # no renegotiation: one handshake, one id
    _packets_flow(sim)
    assert_gap_free(ev)
    assert_gap_free(_gw_events(sim))


# -- AT-12 / AT-13 --------------------------------------------------------------------------
def _blackout(recovery_window_ms: int) -> tuple[Simulation, int]:
    """Both paths down; returns the sim and the ts_ms at which the client entered RECOVERING."""
    sim = build(policy=make_policy(recovery_window_ms=recovery_window_ms))
    sim.advance(2.0)
    for link in sim.links.values():
        link.imp.up = False
    sim.advance(0.5)
    (t_rec,) = _transition_ts(sim.client_events, "RECOVERING")
    assert sim.client.state == "RECOVERING"
    return sim, t_rec


def test_at12_recovery_inside_bound_reattaches() -> None:
    sim, t_rec = _blackout(1000)
    sim.run_until(t_rec / 1000 + 0.5)
    assert sim.client.state == "RECOVERING"
    sim.links[2].imp.up = True  # a candidate is back 500 ms after the death
    sim.advance(1.5)

    ev = sim.client_events
    (t_ok,) = _transition_ts(ev, "ATTACHED")[1:]
    assert t_rec + 500 <= t_ok <= t_rec + 1000
    assert state_changes(ev)[-1] == ("RECOVERING", "ATTACHED", "reattach_success", 3)
    assert not of_type(ev, EventType.SESSION_TERMINATED)
    assert sim.client.snapshot(sim.now).active == 2
    # While nothing was reachable the client said so once, without a storm.
    denied = of_type(ev, EventType.TRANSPORT_SWITCH_DENIED)
    assert [d.reason_code for d in denied] == [Reason.NO_VALID_CANDIDATE]
    _one_identity(sim)
    _packets_flow(sim)


def test_at12_the_path_that_died_comes_back_clean_and_is_not_judged_by_its_death() -> None:
    """The dead path returns and is re-attached: its probe misses while it was dead belong
    to the past (the REATTACH_ACK is a round trip on it), so no VOLATILE/DEGRADED follows."""
    sim, _ = _blackout(10_000)
    sim.advance(2.5)  # ~3 s of misses on both paths
    sim.links[1].imp.up = True
    sim.advance(0.3)
    sim.links[2].imp.up = True
    sim.advance(8.0)

    assert state_changes(sim.client_events)[1:] == [
        ("ATTACHED", "RECOVERING", "transport_dead", 2),
        ("RECOVERING", "ATTACHED", "reattach_success", 3),
    ]
    (switch,) = of_type(sim.client_events, EventType.TRANSPORT_SWITCH)
    assert (switch.previous_transport, switch.new_transport) == (1, 1)
    assert sim.client.snapshot(sim.now).paths[0].stats.loss_ratio < 0.05
    _one_identity(sim)
    _packets_flow(sim)


def test_at13_recovery_timeout_terminates_at_the_bound_and_stays_dead() -> None:
    sim, t_rec = _blackout(1000)
    sim.run_until(t_rec / 1000 + 2.0)

    ev = sim.client_events
    assert state_changes(ev)[-1] == ("RECOVERING", "TERMINATED", "recovery_window_exceeded", 3)
    (t_end,) = _transition_ts(ev, "TERMINATED")
    assert t_end == t_rec + 1000
    (term,) = of_type(ev, EventType.SESSION_TERMINATED)
    assert term.reason_code == Reason.RECOVERY_WINDOW_EXCEEDED
    assert term.transportless_age_ms == pytest.approx(1000, abs=1)
    assert term.session_age_ms > term.transportless_age_ms
    # The gateway ends it explicitly on its own clock too (death by silence + window).
    gw_term = of_type(_gw_events(sim), EventType.SESSION_TERMINATED)
    assert [t.reason_code for t in gw_term] == [Reason.RECOVERY_WINDOW_EXCEEDED]

    # Later: the path is back, but nothing revives the session.
    version = sim.client.machine.version
    sim.links[2].imp.up = True
    assert sim.client.switch_to(2, sim.now) == Reason.INVALID_STATE_FOR_REATTACH
    sim.client.force_reattach(sim.now)
    sim.advance(3.0)
    assert sim.client.machine.version == version and sim.client.state == "TERMINATED"
    assert not of_type(ev, EventType.REATTACH_ATTEMPT)
    assert sim.client.next_deadline() is None
    assert_gap_free(ev)
    assert_gap_free(_gw_events(sim))


def test_at12_no_candidate_denial_names_no_transport_not_the_dead_one() -> None:
    """Every path down: recovery finds nothing to move to. SPEC-DIGEST §8.3 says so with a
    TransportSwitchDenied(no_valid_candidate); its requested_transport is "the transport
    the switch would have moved to" (docs/events.md), and there is none: the path that
    just died is not a target."""
    sim, t_rec = _blackout(1000)
    sim.run_until(t_rec / 1000 + 0.5)  # every path had its chance to answer
    ev = sim.client_events
    (dead,) = of_type(ev, EventType.TRANSPORT_DEAD)
    denied = of_type(ev, EventType.TRANSPORT_SWITCH_DENIED)
    assert [(d.reason_code, d.requested_transport, d.manual) for d in denied] == [
        (Reason.NO_VALID_CANDIDATE, None, False)
    ]
    assert denied[0].requested_transport != dead.transport_id
    # No time to try again is known (the switch budget has nothing to do with it).
    assert denied[0].retry_after_ms is None


def test_at10_every_path_is_asked_at_the_death_no_denial_no_waiting() -> None:
    """The active path dies while the standby paths were last probed seconds ago (slow
    standby probing). With no active path every path is judged by its silence, so each is
    asked at once: the recovery takes one that answers within a round trip or two. It does
    not first deny "no valid candidate" (they had no chance to answer yet), nor wait for
    the next standby probe, and the untouched paths do not read "down" meanwhile."""
    sim = build(n_paths=3, policy=make_policy(standby_probe_interval_ms=5_000))
    sim.advance(7.0)  # the standby paths answered their probes about 2 s ago
    sim.links[1].imp.up = False
    roles: list[tuple[str, ...]] = []
    for _ in range(30):  # 3 s, a look every 100 ms
        sim.advance(0.1)
        roles.append(tuple(p.role for p in sim.client.snapshot(sim.now).paths))

    ev = sim.client_events
    (dead,) = of_type(ev, EventType.TRANSPORT_DEAD)
    assert not of_type(ev, EventType.TRANSPORT_SWITCH_DENIED)
    (switch,) = of_type(ev, EventType.TRANSPORT_SWITCH)
    assert switch.previous_transport == 1 and switch.new_transport in (2, 3)
    # two round trips of 20 ms (probe, reattach) and a timer turn; the standby interval is 5 s
    assert switch.ts_ms - dead.ts_ms <= 100
    assert all(r[1:] != ("down", "down") for r in roles), roles
    assert_gap_free(ev)


def test_operator_reattach_on_the_active_path_ends_in_a_result_and_is_no_switch() -> None:
    """The operator's reattach (a resume of the binding on the active path) is an attempt
    like any other: SPEC-DIGEST §3.3 ReattachAttempt "every reattach initiation", then a
    ReattachResult for its outcome. The binding stays on the same path: no switch, no
    transition."""
    sim = build()
    sim.advance(2.0)
    version, mark = sim.client.machine.version, len(sim.client_events)
    sim.client.force_reattach(sim.now)
    sim.advance(1.0)

    new = sim.client_events[mark:]
    (attempt,) = of_type(new, EventType.REATTACH_ATTEMPT)
    assert (attempt.kind, attempt.candidate_transport) == ("resume", 1)
    (result,) = of_type(new, EventType.REATTACH_RESULT)
    assert (result.status, result.reason_code, result.candidate_transport) == (
        "SUCCESS", Reason.REATTACH_SUCCESS, 1,
    )  # fmt: skip
    assert result.ts_ms >= attempt.ts_ms
    assert of_type(new, EventType.TRANSPORT_SWITCH) == []
    assert state_changes(new) == [] and sim.client.machine.version == version
    assert sim.client.active == 1
    _packets_flow(sim)


# -- AT-14 / AT-15 --------------------------------------------------------------------------
#
# Random loss on a fake clock: whether a given run crosses the threshold depends on where the
# losses fall, so each test runs the same fixed range of seeds and asserts a bound on how many
# runs show the documented outcome; what must hold in EVERY run (one identity, gap-free
# versions, the right switch when there is one, the loss really measured) is asserted per run.
# Rates were measured over seeds 0-1199; each bound is the count a correct build falls below
# with probability < 0.1 % (binomial, 100 runs) when a change merely reshuffles the random
# draws, so a real regression fails while a reshuffle does not.

LOSS_SEEDS = range(100)
"""The fixed seed range of the loss tests (100 runs: about 3 s each test on an idle core)."""


def _misses(run: Callable[[int], str | None]) -> dict[int, str]:
    """seed -> why the run missed the documented outcome (per-run invariants assert inside)."""
    out: dict[int, str] = {}
    for seed in LOSS_SEEDS:
        miss = run(seed)
        if miss is not None:
            out[seed] = miss
    return out


def _switched_to_backup(sim: Simulation, spike_ms: int, bound_ms: int) -> str | None:
    """Per-run checks after a loss spike; None when the run took the documented way (A went
    VOLATILE, no death, one switch to B within bound_ms), else what it did instead."""
    ev = sim.client_events
    changes = state_changes(ev)
    switches = of_type(ev, EventType.TRANSPORT_SWITCH)
    assert all(s.explicit and s.auditable for s in switches)
    _one_identity(sim)  # whatever the way, no renegotiation
    _packets_flow(sim)
    assert_gap_free(ev)
    if of_type(ev, EventType.TRANSPORT_DEAD):
        return f"judged dead: {changes[1:]}"
    if not switches:
        return f"no switch: {changes[1:]}"
    (switch,) = switches  # not dead: the one switch is the loss switch
    assert (switch.previous_transport, switch.new_transport) == (1, 2)
    assert switch.reason_code == Reason.LOSS_RECOVERY
    # DESIGN D2: a switch away from a live path is one versioned rebind VOLATILE -> ATTACHED.
    assert changes[1:] == [changes[1], ("VOLATILE", "ATTACHED", "loss_recovery", 3)]
    assert changes[1][:2] == ("ATTACHED", "VOLATILE") and changes[1][3] == 2
    t_volatile = _transition_ts(ev, "VOLATILE")[0]
    assert switch.ts_ms - t_volatile <= sim.client.policy.recovery_window_ms
    assert sim.client.snapshot(sim.now).active == 2
    if switch.ts_ms - spike_ms > bound_ms:
        return f"switched {switch.ts_ms - spike_ms} ms after the loss started"
    return None


def _spike(seed: int) -> str | None:
    sim = build(seed=seed)  # DEFAULT policy
    sim.advance(3.0)
    a = sim.links[1].imp
    a.loss_up = a.loss_down = 0.30  # 30 % of A's datagrams lost each way for 3 s (bench B)
    spike_ms = int(sim.now * 1000)
    sim.advance(3.0)
    a.loss_up = a.loss_down = 0.0
    sim.advance(2.0)
    miss = _switched_to_backup(sim, spike_ms, 3000)
    if miss is None:
        reason = state_changes(sim.client_events)[1][2]
        assert reason in ("loss_threshold_exceeded", "consecutive_drop_exceeded")
    return miss


def test_at14_loss_spike_on_active_path_switches_to_backup() -> None:
    """30 % loss each way on A for 3 s (51 % of round trips): A goes VOLATILE and the session
    switches to B within 3 s of the spike's start, without judging A dead. Measured:
    1064/1200 seeds (88.7 %; the others: no switch, or A judged dead first and the session
    recovered through RECOVERING); asserted >= 78/100."""
    misses = _misses(_spike)
    assert len(LOSS_SEEDS) - len(misses) >= 78, misses


def _one_way_spike(direction: str, seed: int) -> str | None:
    sim = build(seed=seed)
    sim.advance(3.0)
    setattr(sim.links[1].imp, f"loss_{direction}", 0.30)
    spike_ms = int(sim.now * 1000)
    sim.advance(6.0)
    miss = _switched_to_backup(sim, spike_ms, 6000)
    if miss is None and state_changes(sim.client_events)[1][2] != "loss_threshold_exceeded":
        return f"VOLATILE by {state_changes(sim.client_events)[1][2]}"
    return miss


@pytest.mark.parametrize("direction", ["up", "down"])
def test_at14_loss_in_one_direction_only_switches_to_backup(direction: str) -> None:
    """30 % loss one way loses only 30 % of probe round trips (below the round-trip form of
    the threshold, 0.36): the gateway's probe count in PROBE_ACK splits it by direction, and
    A goes VOLATILE by loss_threshold_exceeded and switches to B within 6 s.
    Measured: 1124/1200 seeds (93.7 %; 28/30 over seeds 0-29, where the commit that added the
    split said 29/30), the same seeds in both directions; asserted >= 85/100."""
    misses = _misses(lambda seed: _one_way_spike(direction, seed))
    assert len(LOSS_SEEDS) - len(misses) >= 85, misses


def _nothing_changed(sim: Simulation) -> bool:
    """Per-run checks under sub-threshold loss; True when the session saw no state change."""
    ev = sim.client_events
    _one_identity(sim)
    assert_gap_free(ev)
    changes = state_changes(ev)
    assert changes[0] == ("BIRTH", "ATTACHED", "attached_to_transport", 1)
    if changes[1:] or of_type(ev, EventType.TRANSPORT_SWITCH):
        return False
    assert not of_type(ev, EventType.TRANSPORT_SWITCH_DENIED)
    assert not of_type(ev, EventType.TRANSPORT_DEAD)
    return True


def _sub_threshold(seed: int) -> float | None:
    """The run's measured round-trip loss on A, or None if the session changed state."""
    sim = build(seed=seed)
    sim.advance(2.0)
    assert sim.client.policy.loss_volatile_threshold == 0.20
    a = sim.links[1].imp
    a.loss_up = a.loss_down = 0.10
    sim.advance(10.0)
    if not _nothing_changed(sim):
        return None
    stats = sim.client.snapshot(sim.now).paths[0].stats
    # Round trips lost (0.19 expected), below the round-trip form of 0.20 each way (0.36).
    assert stats.loss_ratio < 1 - (1 - 0.20) ** 2
    return stats.loss_ratio


def test_at15_sub_threshold_loss_changes_nothing() -> None:
    """DEFAULT policy, 10 s of 10 % loss each way (19 % of probe round trips): no state
    change, no switch (0/30 with the D12 starter numbers, see docs/policy.md: loss is judged
    per direction, 3 s window, 5 drops, suspicion probing). Measured: 1103/1200 seeds
    (91.9 %; the commit that tuned it said 29/30); asserted >= 82/100. The loss is really
    measured: 0.178 on average over the unchanged runs of seeds 0-99."""
    measured = {seed: _sub_threshold(seed) for seed in LOSS_SEEDS}
    unchanged = [m for m in measured.values() if m is not None]
    assert len(unchanged) >= 82, [seed for seed, m in measured.items() if m is None]
    assert 0.19 - 0.05 <= statistics.mean(unchanged) <= 0.19 + 0.05


def _one_way_sub_threshold(direction: str, seed: int) -> float | None:
    """The run's measured loss in `direction` on A, or None if the session changed state."""
    sim = build(seed=seed)
    sim.advance(2.0)
    setattr(sim.links[1].imp, f"loss_{direction}", 0.10)
    sim.advance(10.0)
    if not _nothing_changed(sim):
        return None
    stats = sim.client.snapshot(sim.now).paths[0].stats
    measured = stats.loss_up if direction == "up" else stats.loss_down
    assert measured < 0.25
    assert (stats.loss_down if direction == "up" else stats.loss_up) < 0.05
    return measured


@pytest.mark.parametrize("direction", ["up", "down"])
def test_at15_sub_threshold_loss_in_one_direction_changes_nothing(direction: str) -> None:
    """10 s of 10 % loss one way: no state change, no switch, the loss measured on its own
    direction only (0.094 on average over the unchanged runs of seeds 0-99; a single run's
    3 s window may hold no loss at all). Measured: 1180/1200 seeds (98.3 %); asserted
    >= 93/100."""
    measured = {seed: _one_way_sub_threshold(direction, seed) for seed in LOSS_SEEDS}
    unchanged = [m for m in measured.values() if m is not None]
    assert len(unchanged) >= 93, [seed for seed, m in measured.items() if m is None]
    assert 0.10 - 0.05 <= statistics.mean(unchanged) <= 0.10 + 0.05


# -- AT-18 -----------------------------------------------------------------------------------
def test_at18_nat_rebinding_validates_new_address_then_rebinds() -> None:
    sim = build()
    sim.advance(2.0)
    link = sim.links[1]
    old_addr = link.client_addr
    link.rebind()  # the NAT gives the client's path a new source port
    new_addr = link.client_addr
    for i in range(20):  # the host keeps sending
        sim.client_tun.inject(ipv4_packet(CLIENT_INNER, PEER, ident=i))
    sim.advance(1.0)

    gw = _gw_events(sim)
    # Data from the unvalidated address was not accepted as the binding by itself ...
    assert sim.gateway.drops.get("unvalidated_path", 0) >= 1
    # ... a challenge was answered from there, then one versioned, reason-coded rebind.
    validated = [e for e in of_type(gw, EventType.PATH_VALIDATED) if e.path == "198.51.100.1:40101"]
    assert validated
    rebinds = [c for c in state_changes(gw) if c[2] == "nat_rebind"]
    assert rebinds == [("ATTACHED", "ATTACHED", "nat_rebind", 2)]
    (switch,) = of_type(gw, EventType.TRANSPORT_SWITCH)
    assert switch.reason_code == Reason.NAT_REBIND and switch.path == "198.51.100.1:40101"
    assert switch.binding_epoch == 2 and switch.explicit
    assert validated[0].ts_ms <= switch.ts_ms
    (view,) = sim.gateway.session_views(sim.now)
    assert view.binding == f"{new_addr[0]}:{new_addr[1]}" and view.state == "ATTACHED"
    # The client saw no transport change (its path is the same) but learns the new epoch.
    assert sim.client.state == "ATTACHED" and sim.client.snapshot(sim.now).binding_epoch == 2
    _packets_flow(sim)

    # The old address is no longer accepted: a fresh authentic packet from it is refused.
    delivered = len(sim.gateway_tun.from_tunnel)
    sim.client.receive_tun_packet(ipv4_packet(CLIENT_INNER, PEER, b"stale-nat" * 4), sim.now)
    ((_, fresh),) = sim.client.datagrams_to_send()
    before = sim.gateway.drops.get("unvalidated_path", 0)
    sim.inject_to_gateway(fresh, old_addr)
    sim.advance(0.5)
    assert sim.gateway.drops.get("unvalidated_path", 0) == before + 1
    assert len(sim.gateway_tun.from_tunnel) == delivered
    (view,) = sim.gateway.session_views(sim.now)
    assert view.binding == f"{new_addr[0]}:{new_addr[1]}" and view.binding_epoch == 2
    _one_identity(sim)
    assert_gap_free(gw)
    assert_gap_free(sim.client_events)


def test_at18_idle_session_is_rebound_by_its_probes_without_a_recovery() -> None:
    """No inner traffic: the probes of the bound path, now from a new source port, are what
    shows the NAT rebinding. The gateway validates and rebinds (nat_rebind), it does not
    first declare the binding dead; traffic sent afterwards reaches the new address."""
    sim = build()
    sim.advance(2.0)
    link = sim.links[1]
    link.rebind()
    new_addr = link.client_addr
    sim.advance(5.0)

    gw = _gw_events(sim)
    assert state_changes(gw)[1:] == [("ATTACHED", "ATTACHED", "nat_rebind", 2)]
    (switch,) = of_type(gw, EventType.TRANSPORT_SWITCH)
    assert switch.reason_code == Reason.NAT_REBIND
    assert switch.path == f"{new_addr[0]}:{new_addr[1]}"
    assert switch.ts_ms - 2000 <= sim.client.policy.probe_interval_ms + 100
    assert state_changes(sim.client_events)[1:] == []
    assert of_type(sim.client_events, EventType.TRANSPORT_SWITCH) == []
    _one_identity(sim)
    _packets_flow(sim)


# -- AT-35 -----------------------------------------------------------------------------------
def _pump(sim: Simulation, now: float, rounds: int = 6) -> None:
    """Move datagrams both ways at one instant, running client timers but NOT the gateway's:
    a driver that handles an input before the gateway timer that is already due."""
    sim.now = now
    sim.client.handle_timer(now)
    for _ in range(rounds):
        for path_id, data in sim.client.datagrams_to_send():
            link = sim.links[path_id]
            if link.imp.up:
                sim.gateway.receive_datagram(data, link.client_addr, now)
        for addr, data in sim.gateway.datagrams_to_send():
            link = next((lk for lk in sim.links.values() if lk.client_addr == addr), None)
            if link is not None and link.imp.up:
                sim.client.receive_datagram(data, link.path_id, now)
        sim.client.handle_timer(now)
    sim.client_events.extend(sim.client.events())
    sim.gateway_events.extend(sim.gateway.events())


def test_at35_reattach_after_transport_ttl_is_rejected_fatally() -> None:
    client_pol = make_policy()
    gw_pol = make_policy(transport_lost_ttl_ms=2_000, recovery_window_ms=2_000)
    sim = build(policy=client_pol, gateway_policy=gw_pol)
    sim.advance(2.0)
    for link in sim.links.values():
        link.imp.up = False
    sim.advance(1.5)  # the gateway has declared the binding dead: transportless
    gw_dead = [e for e in of_type(_gw_events(sim), EventType.TRANSPORT_DEAD)]
    assert gw_dead and sim.client.state == "RECOVERING"
    ttl_end = gw_dead[0].ts_ms / 1000 + gw_pol.transport_lost_ttl_ms / 1000

    sim.links[2].imp.up = True
    _pump(sim, ttl_end + 0.05)  # the late reattach arrives before the gateway's TTL tick

    gw = _gw_events(sim)
    denied = [r for r in of_type(gw, EventType.REATTACH_RESULT) if r.status == "DENIED"]
    assert [(r.reason_code, r.fatal) for r in denied] == [(Reason.TRANSPORT_TTL_EXCEEDED, True)]
    assert not [r for r in of_type(gw, EventType.REATTACH_RESULT) if r.status == "SUCCESS"]
    (gw_term,) = of_type(gw, EventType.SESSION_TERMINATED)
    assert gw_term.reason_code == Reason.TRANSPORT_TTL_EXCEEDED
    # The client is told, and ends with the same reason (no revival, no silent continuation).
    ev = sim.client_events
    assert state_changes(ev)[-1][1:3] == ("TERMINATED", "transport_ttl_exceeded")
    (term,) = of_type(ev, EventType.SESSION_TERMINATED)
    assert term.initiator == "peer"
    sim.advance(5.0)
    assert sim.client.state == "TERMINATED"
    (view,) = sim.gateway.session_views(sim.now)
    assert view.state == "TERMINATED"
    assert_gap_free(ev)
    assert_gap_free(gw)


def _gw_recovering_since(gw_pol: Any) -> tuple[Simulation, float]:
    sim = build(gateway_policy=gw_pol)
    sim.advance(2.0)
    for link in sim.links.values():
        link.imp.up = False
    sim.advance(1.5)
    (s,) = sim.gateway.sessions.values()
    assert s.transportless_since is not None
    return sim, s.transportless_since


def test_at35_reattach_at_the_exact_ttl_instant_is_refused_like_the_timer() -> None:
    """The reattach check and the TTL timer agree on the boundary (now >= start + ttl): at
    the instant the timer would end the session, a reattach cannot revive it. Floating
    point makes ``now - start`` a hair below ``ttl`` there; the old check let it through."""
    _, t0 = _gw_recovering_since(make_policy(on_recovery_timeout="degrade"))
    ttl_ms = next(
        ms for ms in range(2_000, 600_001) if (t0 + ms / 1000) - t0 < ms / 1000
    )  # a TTL whose deadline rounds below start + ttl when subtracted back
    gw_pol = make_policy(
        transport_lost_ttl_ms=ttl_ms, recovery_window_ms=ttl_ms, on_recovery_timeout="degrade"
    )
    sim, start = _gw_recovering_since(gw_pol)
    assert start == t0  # same seed, same death instant
    deadline = t0 + ttl_ms / 1000
    (s,) = sim.gateway.sessions.values()
    assert s.machine.state.name == "RECOVERING"
    sim.run_until(deadline - 0.001)
    c = sim.client
    assert c.cipher is not None
    req = ReattachRequest(
        nonce=s.nonces.last + 1, ts_ms=c.ts_ms(deadline), expected_epoch=s.epoch, path_id=2,
        kind=int(ReattachKind.RECOVERY), client_version=c.machine.version,
    )  # fmt: skip
    dgram = c.cipher.seal(MSG_CONTROL, c.peer_index, pack_control(req))
    sim.gateway.receive_datagram(dgram, sim.links[2].client_addr, deadline)

    gw = list(sim.gateway.events())
    results = of_type(gw, EventType.REATTACH_RESULT)
    assert [(r.status, r.reason_code, r.fatal) for r in results] == [
        ("DENIED", Reason.TRANSPORT_TTL_EXCEEDED, True)
    ]
    assert s.machine.state.name == "TERMINATED" and s.binding is None


def test_at35_late_packets_after_gateway_ttl_never_revive_the_session() -> None:
    gw_pol = make_policy(transport_lost_ttl_ms=2_000, recovery_window_ms=2_000)
    sim = build(gateway_policy=gw_pol)
    sim.advance(2.0)
    for link in sim.links.values():
        link.imp.up = False
    sim.advance(5.0)  # the gateway's timer ends it: transport TTL
    (gw_term,) = of_type(_gw_events(sim), EventType.SESSION_TERMINATED)
    assert gw_term.reason_code == Reason.TRANSPORT_TTL_EXCEEDED
    version = sim.gateway.session_views(sim.now)[0].state_version

    sim.links[2].imp.up = True  # the client comes back, still recovering on its side
    sim.advance(3.0)
    (view,) = sim.gateway.session_views(sim.now)
    assert view.state == "TERMINATED" and view.state_version == version
    assert sim.gateway.drops.get("wrong_state", 0) > 0
    assert not [r for r in of_type(_gw_events(sim), EventType.REATTACH_RESULT)]
    # The tombstone answers the client's authentic packets with TERMINATE: it learns why.
    assert state_changes(sim.client_events)[-1][1:3] == ("TERMINATED", "transport_ttl_exceeded")


# -- AT-58 -----------------------------------------------------------------------------------
def _reach(sim: Simulation, state: str, lifetime_s: float) -> None:
    """Drive the session into ``state`` just before its lifetime ends."""
    sim.run_until(lifetime_s - (12.0 if state == "DEGRADED" else 6.0))
    if state == "RECOVERING":
        for link in sim.links.values():
            link.imp.up = False
        sim.run_until(lifetime_s - 0.5)
    elif state == "DEGRADED":
        sim.links[1].imp.loss_up = 0.5
        while sim.client.state != "DEGRADED":
            sim.advance(0.1)
        sim.run_until(lifetime_s - 0.5)  # still lossy: no stability_restored
    else:
        sim.run_until(lifetime_s - 0.5)
    assert str(sim.client.state) == state


@pytest.mark.parametrize("state", ["ATTACHED", "DEGRADED", "RECOVERING"])
def test_at58_session_ttl_terminates_from_any_state(state: str) -> None:
    pol = make_policy(max_lifetime_ms=60_000, max_consecutive_drops=7, dead_min_ms=1_000)
    sim = build(n_paths=1, policy=pol)
    lifetime_s = sim.client.snapshot(0.0).uptime_s  # 0: the clock starts at build
    born = _transition_ts(sim.client_events, "ATTACHED") or [20]
    lifetime_end = born[0] / 1000 + pol.max_lifetime_ms / 1000 + lifetime_s
    _reach(sim, state, lifetime_end)
    sim.run_until(lifetime_end + 1.0)

    ev = sim.client_events
    assert state_changes(ev)[-1][0:3] == (state, "TERMINATED", "session_lifetime_exceeded")
    (term,) = of_type(ev, EventType.SESSION_TERMINATED)
    assert term.session_age_ms == pytest.approx(pol.max_lifetime_ms, abs=1)
    gw_term = of_type(_gw_events(sim), EventType.SESSION_TERMINATED)
    assert [t.reason_code for t in gw_term] == [Reason.SESSION_LIFETIME_EXCEEDED]
    # No further transitions; a new session needs a new handshake.
    version = sim.client.machine.version
    sim.client.receive_tun_packet(ipv4_packet(CLIENT_INNER, PEER), sim.now)
    sim.advance(5.0)
    assert sim.client.machine.version == version
    assert sim.client.drops.get("wrong_state", 0) >= 1
    assert_gap_free(ev)
    assert_gap_free(_gw_events(sim))


# -- AT-59 -----------------------------------------------------------------------------------
def _into(sim: Simulation, state: str) -> None:
    if state == "VOLATILE":
        sim.links[1].imp.loss_up = 0.5
        while sim.client.state != "VOLATILE":
            sim.advance(0.05)
    elif state == "DEGRADED":
        sim.links[1].imp.loss_up = 0.5
        while sim.client.state != "DEGRADED":
            sim.advance(0.1)
        sim.links[1].imp.loss_up = 0.0
    elif state == "RECOVERING":
        sim.links[1].imp.loss_down = 1.0  # answers lost: the client sees A dead ...
        while sim.client.state != "RECOVERING":
            sim.advance(0.05)
    assert str(sim.client.state) == state


@pytest.mark.parametrize("state", ["ATTACHED", "VOLATILE", "DEGRADED", "RECOVERING"])
def test_at59_operator_terminates_client_from_any_state(state: str) -> None:
    pol = make_policy(max_consecutive_drops=7)
    sim = build(n_paths=1, policy=pol)
    sim.advance(2.0)
    _into(sim, state)
    sim.client.terminate(sim.now)
    assert sim.client.state == "TERMINATED"
    sim.advance(0.5)

    ev = sim.client_events
    assert state_changes(ev)[-1][0:3] == (state, "TERMINATED", "operator_terminated")
    (term,) = of_type(ev, EventType.SESSION_TERMINATED)
    assert term.reason_code == Reason.OPERATOR_TERMINATED and term.initiator == "local"
    # TERMINATE reached the gateway (uplink still works in every one of these states).
    gw_term = of_type(_gw_events(sim), EventType.SESSION_TERMINATED)
    assert [(t.reason_code, t.initiator) for t in gw_term] == [(Reason.OPERATOR_TERMINATED, "peer")]
    assert sim.client.next_deadline() is None
    assert_gap_free(ev)
    assert_gap_free(_gw_events(sim))


def test_at59_operator_terminates_at_the_gateway_and_client_follows() -> None:
    sim = build()
    sim.advance(2.0)
    sid = sim.client.machine.session_id
    assert sim.gateway.terminate(sid, sim.now)
    sim.advance(0.5)
    (gw_term,) = of_type(_gw_events(sim), EventType.SESSION_TERMINATED)
    assert gw_term.reason_code == Reason.OPERATOR_TERMINATED
    ev = sim.client_events
    assert state_changes(ev)[-1][0:3] == ("ATTACHED", "TERMINATED", "operator_terminated")
    (term,) = of_type(ev, EventType.SESSION_TERMINATED)
    assert term.initiator == "peer"
    assert not sim.gateway.terminate(sid, sim.now)  # already gone: nothing to do


def test_at59_lost_gateway_terminate_is_repeated_to_the_next_authentic_packet() -> None:
    """The gateway's TERMINATE is lost; the client keeps probing. The tombstone answers the
    first authentic packet with TERMINATE (once per second at most), so the client ends with
    the gateway's reason within a probe interval instead of waiting for its own TTL."""
    sim = build()
    sim.advance(2.0)
    for link in sim.links.values():
        link.imp.loss_down = 1.0  # everything from the gateway is lost for a moment
    down: list[bytes] = []
    up: list[bytes] = []
    sim.taps.append(lambda d: (up if d.to_gateway else down).append(d.data))
    assert sim.gateway.terminate(sim.client.machine.session_id, sim.now)
    sim.advance(0.15)
    assert sim.client.state == "ATTACHED"  # it did not hear the TERMINATE
    for link in sim.links.values():
        link.imp.loss_down = 0.0
    healed = sim.now
    sim.advance(1.5)

    ev = sim.client_events
    assert state_changes(ev)[-1][1:3] == ("TERMINATED", "operator_terminated")
    (term,) = of_type(ev, EventType.SESSION_TERMINATED)
    # The answer sent while the loss lasted was lost too; the next one is due a second later.
    assert term.initiator == "peer" and term.ts_ms <= int((healed + 1.0) * 1000)
    assert len(down) == 1  # exactly one answer delivered so far

    # A replayed or forged datagram is never answered; an authentic one is, once a second.
    c, src = sim.client, sim.links[1].client_addr
    assert c.cipher is not None and up
    sim.advance(1.2)
    sim.inject_to_gateway(up[-1], src)  # replay of a delivered datagram
    sim.inject_to_gateway(up[-1][:-1] + bytes([up[-1][-1] ^ 1]), src)  # forged tag
    sim.advance(0.1)
    assert len(down) == 1
    for i in range(20):  # 2 s of fresh, authentic probes
        sim.inject_to_gateway(c.cipher.seal(MSG_CONTROL, c.peer_index, _probe(i)), src)
        sim.advance(0.1)
    assert len(down) == 3
    assert sim.gateway.drops.get("wrong_state", 0) >= 22


def _probe(i: int) -> bytes:
    return pack_control(Probe(1000 + i, 1, 0))
