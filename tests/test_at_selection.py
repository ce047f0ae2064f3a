"""Acceptance tests for anti-flap and candidate selection (SPEC-DIGEST §10.3, AT-23..AT-28).

A real client and gateway over memory links with a fake clock (tests/simkit.py), plus the
pure selection pieces where the spec states a rule about scores.
"""

from __future__ import annotations

from typing import Any

import pytest
from simkit import assert_gap_free, build, make_policy, of_type, state_changes

from tunnel.core.events import EventType, Reason
from tunnel.core.selection import HoldDown, Selector, best_candidate
from tunnel.io.memory import Simulation


def _switches(events: list[Any]) -> list[Any]:
    """Committed changes of transport (re-attaching the same path is not a switch)."""
    return [
        e
        for e in of_type(events, EventType.TRANSPORT_SWITCH)
        if e.previous_transport != e.new_transport
    ]


def _transition_ts(events: list[Any], new_state: str) -> list[int]:
    return [e.ts_ms for e in of_type(events, EventType.STATE_CHANGE) if e.new_state == new_state]


def _max_in_window(times_ms: list[int], window_ms: int = 60_000) -> int:
    return max(
        (sum(1 for u in times_ms[: i + 1] if u > t - window_ms) for i, t in enumerate(times_ms)),
        default=0,
    )


def _flap(sim: Simulation, half_period_s: float, until_s: float) -> None:
    """A and B alternate: exactly one of them is up at any time."""
    a, b = sim.links[1], sim.links[2]
    while sim.now < until_s and sim.client.state != "TERMINATED":
        a.imp.up, b.imp.up = not a.imp.up, a.imp.up
        sim.advance(half_period_s)


# -- AT-23 / AT-24 ---------------------------------------------------------------------------
def test_at23_flapping_paths_hit_the_cap_then_switching_is_denied_and_degraded() -> None:
    sim = build()
    sim.advance(2.0)
    pol = sim.client.policy
    sim.links[2].imp.up = False
    _flap(sim, 2.5, 90.0)

    ev = sim.client_events
    switches = _switches(ev)
    assert len(switches) >= pol.max_switches_per_min  # the cap was reached ...
    assert _max_in_window([s.ts_ms for s in switches]) <= pol.max_switches_per_min  # ... kept
    denied = of_type(ev, EventType.TRANSPORT_SWITCH_DENIED)
    assert Reason.SWITCH_RATE_LIMITED in {d.reason_code for d in denied}
    assert ("RECOVERING", "DEGRADED", "switch_rate_limited") in [c[:3] for c in state_changes(ev)]
    # No storm: denials and transitions stay proportional to the path events (36 flips):
    # at most one recovery denial and one auto-switch denial (live standby) per flip.
    assert len(denied) <= 2 * 36
    assert len(of_type(ev, EventType.STATE_CHANGE)) <= 120
    # If the session ends, it ends explicitly (bounds kept being exceeded, attack 6).
    for term in of_type(ev, EventType.SESSION_TERMINATED):
        assert term.reason_code == Reason.TRANSPORT_TTL_EXCEEDED
    assert {e.session_id for e in ev if e.session_id} == {sim.client.machine.session_id}
    assert_gap_free(ev)
    assert_gap_free(list(sim.gateway_events))


def test_at24_switch_cap_five_no_sixth_switch_within_the_window() -> None:
    pol = make_policy(max_switches_per_min=5)
    sim = build(policy=pol)
    sim.advance(2.0)
    sim.links[2].imp.up = False
    _flap(sim, 1.0, 40.0)  # a transport death every second

    ev = sim.client_events
    switches = _switches(ev)
    assert len(switches) == 5
    first = switches[0].ts_ms
    assert all(s.ts_ms < first + 60_000 for s in switches)
    assert sim.client.snapshot(sim.now).switch_budget_left == 0
    after_cap = [c for c in state_changes(ev) if c[3] > switches[-1].state_version]
    assert after_cap and after_cap[-1][1] in ("DEGRADED", "TERMINATED", "RECOVERING")
    assert ("RECOVERING", "DEGRADED", "switch_rate_limited") in [c[:3] for c in after_cap]
    assert_gap_free(ev)


# -- AT-25 -----------------------------------------------------------------------------------
def test_at25_automatic_switch_inside_cooldown_is_denied_without_a_nonce() -> None:
    # VOLATILE must outlast the cooldown (D13: DEGRADED would suspend automatic switching)
    sim = build(
        policy=make_policy(
            dead_min_ms=1_000, switch_cooldown_ms=5_000, volatile_to_degraded_ms=10_000
        )
    )
    sim.advance(3.0)
    pol = sim.client.policy
    assert sim.client.switch_to(2, sim.now) is None  # manual: exempt from cooldown, counted
    sim.advance(0.2)
    sim.links[2].imp.loss_up = 0.35  # the new path turns bad at once; A is clean
    sim.advance(8.0)

    ev = sim.client_events
    manual, auto = _switches(ev)[:2]
    assert (manual.new_transport, manual.reason_code) == (2, Reason.MANUAL_SWITCH)
    assert auto.new_transport == 1 and auto.reason_code == Reason.LOSS_RECOVERY
    denied = [
        d for d in of_type(ev, EventType.TRANSPORT_SWITCH_DENIED)
        if d.reason_code == Reason.COOLDOWN_ACTIVE
    ]  # fmt: skip
    assert len(denied) == 1 and denied[0].requested_transport == 1
    assert manual.ts_ms < denied[0].ts_ms < manual.ts_ms + pol.switch_cooldown_ms
    assert denied[0].retry_after_ms is not None and denied[0].retry_after_ms > 0
    assert auto.ts_ms >= manual.ts_ms + pol.switch_cooldown_ms
    # The refusal built no request: the next attempt uses the very next nonce.
    attempts = of_type(ev, EventType.REATTACH_ATTEMPT)
    assert [a.kind for a in attempts] == ["manual", "proactive"]
    assert attempts[1].nonce == attempts[0].nonce + 1
    assert attempts[1].ts_ms >= manual.ts_ms + pol.switch_cooldown_ms
    assert_gap_free(ev)


# -- AT-26 -----------------------------------------------------------------------------------
def test_at26_candidate_only_five_percent_better_is_never_proposed() -> None:
    sel = Selector(improvement_factor=1.10, dwell_ms=300)
    scores = {1: 10.0, 2: 10.5}
    assert all(sel.evaluate(t / 10, 1, scores, [2]) is None for t in range(100))
    scores[2] = 11.5  # 15 % better: proposed, but only after the dwell
    assert sel.evaluate(10.0, 1, scores, [2]) is None
    assert sel.evaluate(10.29, 1, scores, [2]) is None
    assert sel.evaluate(10.3, 1, scores, [2]) == 2


def test_at26_single_latency_spike_on_active_path_causes_no_switch() -> None:
    sim = build(policy=make_policy(latency_volatile_threshold_ms=100))
    sim.advance(3.0)
    link = sim.links[1]
    link.imp.delay_s = 0.200  # one 400 ms round trip, once
    sim.advance(0.12)
    link.imp.delay_s = 0.010
    sim.advance(5.0)

    ev = sim.client_events
    assert max(sim.client.snapshot(sim.now).paths[0].stats.rtt_history) >= 200
    assert state_changes(ev) == [("BIRTH", "ATTACHED", "attached_to_transport", 1)]
    assert not of_type(ev, EventType.TRANSPORT_SWITCH)
    assert not of_type(ev, EventType.REATTACH_ATTEMPT)


# -- AT-27 -----------------------------------------------------------------------------------
def test_at27_equal_scores_break_on_lowest_transport_id() -> None:
    for _ in range(3):
        assert best_candidate({3: 5.0, 2: 5.0, 4: 5.0}, [4, 3, 2]) == 2
        assert best_candidate({3: 5.0, 2: 5.0, 1: 5.0}, [3, 2, 1], exclude=1) == 2
    sel = Selector(improvement_factor=1.10, dwell_ms=0)
    assert sel.evaluate(0.0, 1, {1: 1.0, 2: 5.0, 3: 5.0}, [3, 2]) == 2


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_at27_recovery_with_identical_candidates_picks_lowest_id(seed: int) -> None:
    sim = build(n_paths=3, seed=seed, delay_s=0.010)
    sim.advance(3.0)
    sim.links[1].imp.up = False
    sim.advance(2.0)
    (switch,) = _switches(sim.client_events)
    assert (switch.previous_transport, switch.new_transport) == (1, 2)


# -- AT-28 -----------------------------------------------------------------------------------
def test_at28_no_candidate_after_death_is_denied_once_no_valid_candidate() -> None:
    sim = build(policy=make_policy(recovery_window_ms=8_000, on_recovery_timeout="degrade"))
    sim.advance(2.0)
    sim.links[2].imp.up = False
    sim.advance(2.0)  # B is known to be down
    sim.links[1].imp.up = False
    sim.advance(9.0)

    ev = sim.client_events
    denied = of_type(ev, EventType.TRANSPORT_SWITCH_DENIED)
    # No target: nothing to move to (path 1 is the one that died, not a candidate).
    assert [(d.reason_code, d.requested_transport) for d in denied] == [
        (Reason.NO_VALID_CANDIDATE, None)
    ]
    assert not of_type(ev, EventType.REATTACH_ATTEMPT)
    assert state_changes(ev)[-1][:3] == ("RECOVERING", "DEGRADED", "recovery_window_exceeded")
    assert sim.client.state == "DEGRADED"
    assert_gap_free(ev)


def test_at28_volatile_without_any_better_candidate_degrades() -> None:
    sim = build(policy=make_policy(dead_min_ms=1_000, max_consecutive_drops=7))
    sim.advance(2.0)
    sim.links[2].imp.up = False
    sim.advance(2.0)
    sim.links[1].imp.loss_up = 0.5
    sim.advance(8.0)

    ev = sim.client_events
    changes = [c[:3] for c in state_changes(ev)]
    assert changes[1] == ("ATTACHED", "VOLATILE", "loss_threshold_exceeded")
    assert ("VOLATILE", "DEGRADED", "volatile_persisted") in changes
    # Nothing to switch to: at most the lossy path itself is re-attached after a death.
    assert not _switches(ev)
    assert {a.candidate_transport for a in of_type(ev, EventType.REATTACH_ATTEMPT)} <= {1}
    assert sim.client.state == "DEGRADED"
    # SPEC 8.3: entering DEGRADED because nothing passed says so, once for that entry.
    (entry,) = [
        e for e in of_type(ev, EventType.STATE_CHANGE)
        if e.reason_code == Reason.VOLATILE_PERSISTED
    ]  # fmt: skip
    denied = of_type(ev, EventType.TRANSPORT_SWITCH_DENIED)
    at_entry = [d for d in denied if d.ts_ms == entry.ts_ms]
    assert [(d.reason_code, d.requested_transport) for d in at_entry] == [
        (Reason.NO_VALID_CANDIDATE, None)
    ]
    unrequested = [d for d in denied if d.requested_transport is None]
    assert [d.ts_ms for d in unrequested] == [entry.ts_ms]  # never again per tick
    assert_gap_free(ev)


def test_at28_degraded_session_takes_a_healthy_candidate_when_one_returns() -> None:
    """DEGRADED reduces switching, it does not end it: the lossy active path is left for a
    candidate that came back healthy (hysteresis, dwell, limiter and cooldown all apply),
    as one versioned DEGRADED -> ATTACHED rebind (R3) with reason loss_recovery."""
    sim = build(seed=1)
    sim.advance(2.0)
    sim.links[2].imp.up = False
    sim.advance(2.0)
    a = sim.links[1].imp
    a.loss_up = a.loss_down = 0.30
    sim.advance(10.0)
    assert sim.client.state == "DEGRADED" and not _switches(sim.client_events)
    back_ms = int(sim.now * 1000)
    sim.links[2].imp.up = True
    sim.advance(6.0)

    ev = sim.client_events
    assert state_changes(ev)[-1] == ("DEGRADED", "ATTACHED", "loss_recovery", 4)
    (switch,) = _switches(ev)
    assert (switch.previous_transport, switch.new_transport) == (1, 2)
    assert switch.reason_code == Reason.LOSS_RECOVERY
    assert back_ms < switch.ts_ms <= back_ms + 4000
    assert sim.client.snapshot(sim.now).active == 2
    assert_gap_free(ev)


# -- switch limiter deadline ------------------------------------------------------------------
def test_at24_budget_wait_ends_exactly_when_the_oldest_switch_leaves_the_window() -> None:
    """DEGRADED (budget spent, no active path) retries at the very instant the sliding
    minute frees a switch: next_deadline() carries the limiter's change, so the driver's
    single timer fires then, not at some later probe tick."""
    pol = make_policy(
        max_switches_per_min=1, transport_lost_ttl_ms=120_000, on_recovery_timeout="degrade",
        probe_interval_ms=70,  # 60 s is no multiple of it: the budget frees between probes
    )  # fmt: skip
    sim = build(policy=pol)
    sim.advance(2.0)
    assert sim.client.switch_to(2, sim.now) is None  # the whole budget
    sim.advance(0.5)
    (switch,) = _switches(sim.client_events)
    sim.links[2].imp.up = False  # the new path dies; only a *switch* back to 1 could help
    sim.advance(3.0)
    assert sim.client.state == "DEGRADED" and sim.client.snapshot(sim.now).active is None
    sim.advance(60.0)

    retry = [
        e for e in of_type(sim.client_events, EventType.STATE_CHANGE)
        if e.reason_code == Reason.RECOVERY_RETRY
    ]  # fmt: skip
    assert retry, "the budget came back: recovery must be retried"
    assert 59_999 <= retry[0].ts_ms - switch.ts_ms <= 60_001


# -- anti-flap hold-down (SPEC 4.6) -------------------------------------------------------------
def test_at23_recently_failed_path_is_held_down_before_a_proactive_switch() -> None:
    """B failed and came back; A turns bad at once. B must be live for the hold-down
    (failed_path_holddown_ms) before the session switches to it, not at first sight."""
    sim = build()
    sim.advance(3.0)
    pol = sim.client.policy
    sim.links[2].imp.up = False
    sim.advance(4.0)  # B is seen down (a failure)
    mark = len(sim.client_events)
    sim.links[2].imp.up = True
    a = sim.links[1].imp
    a.loss_up = a.loss_down = 0.4  # volatile soon, but not dead
    sim.advance(8.0)

    ev = sim.client_events[mark:]
    (back,) = [e for e in of_type(ev, EventType.PATH_HEALTH) if e.transport_id == 2 and e.alive]
    volatile = _transition_ts(ev, "VOLATILE")
    switches = _switches(ev)
    assert volatile and switches and switches[0].new_transport == 2
    assert volatile[0] < back.ts_ms + pol.failed_path_holddown_ms  # it could have switched
    assert switches[0].ts_ms >= back.ts_ms + pol.failed_path_holddown_ms


def test_holddown_doubles_per_repeated_failure_and_is_bounded() -> None:
    hd = HoldDown(base_ms=1000)
    assert not hd.held(0.0)  # never failed: never held
    t = 0.0
    for expected in (1.0, 2.0, 4.0, 8.0, 16.0, 16.0):  # each failure within 60 s doubles
        hd.failed(t)
        assert hd.held(t + 0.5)  # down: held
        hd.recovered(t + 1.0)
        assert hd.held(t + 1.0 + expected - 0.001) and not hd.held(t + 1.0 + expected)
        assert hd.next_change(t + 1.0) == t + 1.0 + expected
        t += 2.0
    hd.failed(t)
    hd.recovered(t + 200.0)  # the old failures aged out: back to the base
    assert not hd.held(t + 201.0) and hd.held(t + 200.9)
