"""The client's one timer (hypothesis): what next_deadline reports, handle_timer acts on.

A real client and gateway over memory links (tests/simkit.py) are driven through random
path kills, restores, loss, NAT rebindings, manual switches, auto-switch toggles, forced
reattaches, policy reloads and time steps, under randomly chosen policies. Every
``handle_timer(now)`` the simulator makes is checked:

* afterwards ``next_deadline()`` is None or strictly after ``now`` (the timer never spins:
  nothing handle_timer leaves undone is reported as due);
* every timed row (``CLIENT_ROWS``) due at ``now`` fires: the first STATE_CHANGE of the
  call is that row's trigger and reason, or one more urgent (SPEC-DIGEST §2.4:
  termination > transport death > quality > stability). Rows that judge the active
  path's health (instability, stability) read the sample ``observe(now)`` takes; the
  checker takes the same sample first, so it sees the rows exactly as the timer does.

The simulator calls handle_timer exactly at the deadline it was given, so a row is
checked at the very instant it becomes due.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from simkit import build, make_policy

from tunnel.core.client_rows import CLIENT_ROWS, ClientClocksView
from tunnel.core.events import EventType, Reason
from tunnel.core.policy import POLICY_DEFAULT, Policy
from tunnel.core.session import PRIORITY, TERMINATION_PRIORITY, State, Trigger
from tunnel.core.timers import TimedRow, due_rows, most_urgent_row
from tunnel.io.memory import Simulation

MAX_STEPS = 100_000
"""Simulation steps per advance: a spinning timer fails fast instead of after 2 million."""


def urgency(trigger: Trigger, reason: Reason) -> tuple[int, int]:
    sub = (
        TERMINATION_PRIORITY.index(reason)
        if reason in TERMINATION_PRIORITY
        else len(TERMINATION_PRIORITY)
    )
    return PRIORITY[trigger], sub


class TimerChecker:
    """Wraps the client's handle_timer in the simulation with the two checks."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.fired: Counter[str] = Counter()
        """Rows seen due and fired as themselves (what the run exercised)."""
        self.calls = 0
        real: Callable[[float], None] = sim.client.handle_timer

        def checked(now: float) -> None:
            self.check(real, now)

        sim.client.handle_timer = checked  # type: ignore[method-assign]

    def check(self, real: Callable[[float], None], now: float) -> None:
        c = self.sim.client
        self.calls += 1
        expected: TimedRow[ClientClocksView] | None = None
        if not c.machine.terminated and c.state is not State.BIRTH:
            c.observe(now)  # the health sample handle_timer takes first (idempotent)
            expected = most_urgent_row(due_rows(CLIENT_ROWS, c, c.state, now), c)
        want = None if expected is None else (expected.fires(c), expected.reason)
        real(now)
        events = c.events()
        self.sim.client_events.extend(events)
        deadline = c.next_deadline()
        assert deadline is None or deadline > now, (now, deadline, c.state)
        if expected is None or want is None:
            return
        changes = [e for e in events if e.event_type is EventType.STATE_CHANGE]
        assert changes, f"row {expected.name} due at {now} but no transition"
        first = changes[0]
        fired = (Trigger(first.trigger), Reason(first.reason_code))
        assert fired == want or urgency(*fired) < urgency(*want), (expected.name, fired)
        if fired == want:
            self.fired[expected.name] += 1


# == random drives =========================================================================
POLICY_CHOICES: dict[str, list[Any]] = {
    "dead_min_ms": [300, 800],
    "degraded_terminate_after_ms": [None, 1000, 4000],
    "on_recovery_timeout": ["terminate", "degrade"],
    "recovery_window_ms": [500, 2000, 6000],
    "volatile_to_degraded_ms": [100, 1500],
    "stability_window_ms": [100, 1000],
    "transport_lost_ttl_ms": [1000, 4000, 30_000],
    "max_switches_per_min": [1, 8],
    "switch_cooldown_ms": [100, 2000],
    "switch_dwell_ms": [10, 300],
    "reattach_retry_ms": [20, 250],
    "failed_path_holddown_ms": [100, 1500],
    "loss_window_ms": [250, 3000],
    "max_lifetime_ms": [60_000],
    "rekey_after_s": [10, 120],
    "idle_after_ms": [2_000, 3_600_000],  # issue 11: idle sessions probe slowly
    "idle_probe_interval_ms": [100, 2_000, 10_000],
}


def consistent_policy(changes: dict[str, Any]) -> Policy:
    """The chosen numbers, with the recovery window cut to fit the TTL (spec I4)."""
    ttl = changes["transport_lost_ttl_ms"]
    changes["recovery_window_ms"] = min(changes["recovery_window_ms"], ttl)
    return make_policy(**changes)


POLICIES = st.fixed_dictionaries(
    {name: st.sampled_from(values) for name, values in POLICY_CHOICES.items()}
).map(consistent_policy)

ACTIONS = st.one_of(
    st.tuples(st.just("kill"), st.integers(1, 3)),
    st.tuples(st.just("restore"), st.integers(1, 3)),
    st.tuples(st.just("loss"), st.integers(1, 3), st.sampled_from([0.0, 0.1, 0.3, 0.6])),
    st.tuples(st.just("delay"), st.integers(1, 3), st.sampled_from([0.005, 0.05, 0.3])),
    st.tuples(st.just("switch"), st.integers(1, 3)),
    st.tuples(st.just("rebind"), st.integers(1, 3)),
    st.tuples(st.just("auto"), st.booleans()),
    st.tuples(st.just("force"), st.just(0)),
    st.tuples(st.just("reload"), POLICIES),
)
STEPS = st.lists(
    st.tuples(ACTIONS, st.one_of(st.floats(0.001, 4.0), st.just(30.0))),
    min_size=1,
    max_size=12,
)


def apply(sim: Simulation, action: tuple[Any, ...], n_paths: int) -> None:
    kind, arg = action[0], action[1]
    c = sim.client
    if kind == "auto":
        c.set_auto_switch(arg)
    elif kind == "force":
        c.force_reattach(sim.now)
    elif kind == "reload":
        c.apply_policy(arg, sim.now)
    else:
        path = (arg - 1) % n_paths + 1
        link = sim.links[path]
        if kind == "kill":
            link.imp.up = False
        elif kind == "restore":
            link.imp.up = True
            link.imp.loss_up = link.imp.loss_down = 0.0
        elif kind == "loss":
            link.imp.loss_up = link.imp.loss_down = action[2]
        elif kind == "delay":
            link.imp.delay_s = action[2]
        elif kind == "switch":
            c.switch_to(path, sim.now)
        elif kind == "rebind":
            link.rebind()


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    n_paths=st.integers(min_value=1, max_value=3),
    policy=POLICIES,
    seed=st.integers(min_value=0, max_value=2**16),
    steps=STEPS,
)
def test_handle_timer_leaves_no_past_deadline_and_fires_every_due_row(
    n_paths: int, policy: Policy, seed: int, steps: list[tuple[tuple[Any, ...], float]]
) -> None:
    sim = build(n_paths=n_paths, seed=seed, policy=policy, start=False)
    checker = TimerChecker(sim)
    sim.start()
    sim.run_until(0.5, max_steps=MAX_STEPS)
    for action, dt in steps:
        apply(sim, action, n_paths)
        sim.run_until(sim.now + dt, max_steps=MAX_STEPS)
    assert checker.calls > 0
    sim.client.terminate(sim.now)
    assert sim.client.next_deadline() is None


# == each row, once on purpose ================================================================
def _run(
    policy: Policy,
    script: Callable[[Simulation], None],
    n_paths: int = 2,
    gateway_policy: Policy | None = None,
) -> TimerChecker:
    sim = build(n_paths=n_paths, seed=7, policy=policy, gateway_policy=gateway_policy, start=False)
    checker = TimerChecker(sim)
    sim.start()
    sim.run_until(1.0, max_steps=MAX_STEPS)
    assert sim.client.state is State.ATTACHED
    script(sim)
    return checker


def _kill_all(sim: Simulation, then: float) -> None:
    for link in sim.links.values():
        link.imp.up = False
    sim.run_until(sim.now + then, max_steps=MAX_STEPS)


def _lossy_active(sim: Simulation, then: float, loss: float = 0.3) -> None:
    sim.links[1].imp.loss_up = sim.links[1].imp.loss_down = loss
    sim.run_until(sim.now + then, max_steps=MAX_STEPS)


def _slow_active(sim: Simulation) -> None:
    sim.links[1].imp.delay_s = 0.2
    sim.run_until(sim.now + 8.0, max_steps=MAX_STEPS)


def _lossy_then_clean(sim: Simulation) -> None:
    _lossy_active(sim, 3.0)
    sim.links[1].imp.loss_up = sim.links[1].imp.loss_down = 0.0
    sim.run_until(sim.now + 6.0, max_steps=MAX_STEPS)


LOSSY = {"dead_min_ms": 1000}
"""30 % loss each way makes the path VOLATILE (51 % of round trips) but never silent 1 s."""

SCENARIOS: dict[str, tuple[dict[str, Any], Callable[[Simulation], None], int]] = {
    "active_path_dead": ({}, lambda sim: _kill_all(sim, 1.0), 2),
    "recovery_window": ({"transport_lost_ttl_ms": 30_000}, lambda sim: _kill_all(sim, 20.0), 2),
    "transport_lost_ttl": (
        {
            "transport_lost_ttl_ms": 3000,
            "recovery_window_ms": 2000,
            "on_recovery_timeout": "degrade",
        },
        lambda sim: _kill_all(sim, 10.0),
        2,
    ),
    "degraded_timeout": (
        {
            "on_recovery_timeout": "degrade",
            "degraded_terminate_after_ms": 1000,
            "transport_lost_ttl_ms": 60_000,
        },
        lambda sim: _kill_all(sim, 30.0),
        2,
    ),
    "instability:consecutive_drop_exceeded": (
        {"dead_min_ms": 1000, "max_consecutive_drops": 3, "loss_volatile_threshold": 1.0},
        lambda sim: _lossy_active(sim, 8.0, loss=0.6),
        1,
    ),
    "instability:loss_threshold_exceeded": (
        {**LOSSY, "max_consecutive_drops": 100},
        lambda sim: _lossy_active(sim, 8.0),
        1,
    ),
    "instability:latency_threshold_exceeded": (
        {"dead_min_ms": 1000, "latency_volatile_threshold_ms": 100},
        _slow_active,
        1,
    ),
    "volatile_persisted": (LOSSY, lambda sim: _lossy_active(sim, 8.0), 1),
    "stability_restored": (LOSSY, _lossy_then_clean, 1),
    "session_lifetime": (  # the gateway lives longer, or its TERMINATE would come first
        {"max_lifetime_ms": 60_000},
        lambda sim: sim.run_until(sim.now + 60.0, max_steps=MAX_STEPS),
        2,
    ),
}


@pytest.mark.parametrize("row", sorted(SCENARIOS))
def test_each_client_row_fires_at_its_deadline(row: str) -> None:
    """The checker is not vacuous: every row of the table is seen due and fired."""
    changes, script, n_paths = SCENARIOS[row]
    policy = dataclasses.replace(make_policy(), **changes) if changes else make_policy()
    gateway_policy = make_policy(max_lifetime_ms=120_000)
    checker = _run(policy, script, n_paths, gateway_policy)
    assert checker.fired[row] >= 1, checker.fired


def test_the_scenarios_cover_every_clock_row() -> None:
    assert {r.name for r in CLIENT_ROWS} == set(SCENARIOS)


def test_a_volatile_session_probes_its_standby_paths_at_the_active_rate() -> None:
    """docs/policy.md: a standby path is probed every ``standby_probe_interval_ms`` (1 s)
    while the session is healthy, and at the active path's rate (``probe_interval_ms``,
    100 ms) while it is VOLATILE or DEGRADED, looking for a candidate on fresh samples.
    Counted on the wire: the datagrams the client sends on B (no data flows: only probes).
    Auto-switch is off, so the session stays VOLATILE/DEGRADED instead of moving to B."""
    pol = POLICY_DEFAULT
    sim = build(seed=3)
    sim.advance(3.0)
    sim.client.set_auto_switch(False)
    b = sim.links[2]
    before, t0 = b.sent_up, sim.now
    sim.advance(3.0)
    calm = (b.sent_up - before) / (sim.now - t0)
    assert calm <= 1.5 * 1000 / pol.standby_probe_interval_ms, calm

    a = sim.links[1].imp
    a.loss_up = a.loss_down = 0.5
    for _ in range(1000):
        sim.advance(0.01)
        if sim.client.state in (State.VOLATILE, State.DEGRADED):
            break
    assert sim.client.state in (State.VOLATILE, State.DEGRADED)
    before, t0 = b.sent_up, sim.now
    sim.advance(2.0)
    assert sim.client.state in (State.VOLATILE, State.DEGRADED)
    hunting = (b.sent_up - before) / (sim.now - t0)
    expected = 1000 / pol.probe_interval_ms
    assert 0.7 * expected <= hunting <= 1.3 * expected, (hunting, expected)
