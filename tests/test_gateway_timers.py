"""The gateway's timed triggers (level 1/2: real client and gateway, fake clock).

* ``handle_timer`` and ``next_deadline`` read the same rows: for random traffic, link
  cuts, NAT rebinds and policy reloads, every ``handle_timer(now)`` applies the most urgent
  row due for each session (its trigger and reason show up as that session's
  STATE_CHANGE), and afterwards ``next_deadline()`` is never at or before ``now`` (a
  deadline left in the past would make the driver spin or the rule never fire).
* A policy reload changes the death judgement of running sessions (docs/policy.md: a
  reload applies strictly to running sessions): the silence after which the gateway
  declares the binding dead follows the NEW ``dead_min_ms``, in both directions.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from simkit import build, make_policy

from tunnel.core.constants import MSG_CONTROL
from tunnel.core.events import Event, StateChange, TransportDead
from tunnel.core.gateway import GatewaySessions
from tunnel.core.gateway_session import GATEWAY_ROWS, GatewaySession
from tunnel.core.policy import Policy
from tunnel.core.session import State
from tunnel.core.timers import due_rows, most_urgent_row
from tunnel.core.wire import ReattachKind, ReattachRequest, pack_control
from tunnel.io.memory import Simulation

FAST = dict(
    transport_lost_ttl_ms=4_000,
    recovery_window_ms=2_000,
    reattach_retry_ms=500,
    max_lifetime_ms=60_000,
)
"""Short TTLs so that random runs reach recovery, degradation and termination."""


class TimerAudit:
    """Wraps a gateway's ``handle_timer``: checks the rows against what the call did."""

    def __init__(self, gateway: GatewaySessions) -> None:
        self.gateway = gateway
        self.calls = 0
        self.fired: list[tuple[str, str]] = []
        self._handle = gateway.handle_timer
        gateway.handle_timer = self.handle_timer  # type: ignore[method-assign]

    def _drain(self) -> list[Event]:
        out = []
        while (ev := self.gateway.next_event()) is not None:
            out.append(ev)
        return out

    def handle_timer(self, now: float) -> None:
        gw = self.gateway
        expected: dict[str, tuple[str, str]] = {}
        for s in gw.sessions.values():
            if s.machine.terminated:
                continue
            row = most_urgent_row(due_rows(GATEWAY_ROWS, s, s.machine.state, now), s)
            if row is not None:
                expected[s.machine.session_id] = (str(row.fires(s)), str(row.reason))
        before = self._drain()
        self._handle(now)
        during = self._drain()
        for ev in before + during:  # the driver still sees every event, in order
            gw.emit(ev)
        self.calls += 1
        changes = {
            (ev.session_id, ev.trigger, str(ev.reason_code))
            for ev in during
            if isinstance(ev, StateChange)
        }
        for sid, (trigger, reason) in expected.items():
            assert (sid, trigger, reason) in changes, (now, sid, trigger, reason, changes)
            self.fired.append((trigger, reason))
        deadline = gw.next_deadline()
        assert deadline is None or deadline > now, (now, deadline)
        for s in gw.sessions.values():
            if not s.machine.terminated:
                assert not due_rows(GATEWAY_ROWS, s, s.machine.state, now), now


def _gateway_session(sim: Simulation) -> GatewaySession | None:
    live = [s for s in sim.gateway.sessions.values() if not s.machine.terminated]
    return live[0] if live else None


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("run"), st.floats(0.01, 3.0)),
        st.tuples(st.just("cut"), st.integers(1, 2)),
        st.tuples(st.just("heal"), st.integers(1, 2)),
        st.tuples(st.just("rebind"), st.integers(1, 2)),
        st.tuples(st.just("loss"), st.integers(1, 2), st.floats(0.0, 0.9)),
        st.tuples(st.just("reload"), st.sampled_from([300, 600, 1_500]), st.booleans()),
        st.tuples(st.just("bad_request"), st.integers(1, 2)),
    ),
    min_size=1,
    max_size=14,
)


def _apply(sim: Simulation, op: tuple[Any, ...]) -> None:
    kind = op[0]
    if kind == "run":
        sim.advance(op[1])
    elif kind == "cut":
        sim.links[op[1]].imp.up = False
    elif kind == "heal":
        sim.links[op[1]].imp.up = True
    elif kind == "rebind":
        sim.links[op[1]].rebind()
    elif kind == "loss":
        sim.links[op[1]].imp.loss_up = sim.links[op[1]].imp.loss_down = op[2]
    elif kind == "reload":
        timeout = "degrade" if op[2] else "terminate"
        policy = make_policy(**FAST, dead_min_ms=op[1], on_recovery_timeout=timeout)
        sim.gateway.set_policy(policy, sim.now)
    else:
        _bad_request(sim, op[1])


def _bad_request(sim: Simulation, path_id: int) -> None:
    """An authentic REATTACH_REQUEST without a nonce: a security failure the gateway
    counts (three make the session DEGRADED; the stability window then runs)."""
    s = _gateway_session(sim)
    cipher = sim.client.cipher
    if s is None or cipher is None or sim.client.machine.terminated:
        return
    req = ReattachRequest(
        nonce=0, ts_ms=sim.client.ts_ms(sim.now), expected_epoch=s.epoch, path_id=path_id,
        kind=int(ReattachKind.MANUAL), client_version=sim.client.machine.version,
    )  # fmt: skip
    data = cipher.seal(MSG_CONTROL, sim.client.peer_index, pack_control(req))
    sim.inject_to_gateway(data, sim.links[path_id].client_addr)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(ops=OPS)
def test_handle_timer_and_next_deadline_never_disagree(ops: list[tuple[Any, ...]]) -> None:
    sim = build(policy=make_policy(**FAST), start=False)
    audit = TimerAudit(sim.gateway)
    sim.start()
    sim.run_until(0.5)
    for op in ops:
        _apply(sim, op)
    sim.advance(61.0)  # past every TTL and the lifetime: each open rule has its turn
    assert audit.calls > 0


@pytest.mark.parametrize(
    ("on_timeout", "expected"),
    [
        (
            "terminate",
            [("transport_dead", "transport_dead"), ("terminate", "recovery_window_exceeded")],
        ),
        (
            "degrade",
            [
                ("transport_dead", "transport_dead"),
                ("degrade", "recovery_window_exceeded"),
                ("terminate", "transport_ttl_exceeded"),
            ],
        ),
    ],
)
def test_the_audit_sees_rows_fire(on_timeout: str, expected: list[tuple[str, str]]) -> None:
    """The property above is not vacuous: a blackout walks the session through binding
    death, the recovery window (then TERMINATED, or DEGRADED as the policy says) and the
    transport-lost TTL, each fired at its deadline and checked by the audit."""
    sim = build(policy=make_policy(**FAST, on_recovery_timeout=on_timeout), start=False)
    audit = TimerAudit(sim.gateway)
    sim.start()
    sim.run_until(0.5)
    for link in sim.links.values():
        link.imp.up = False
    sim.advance(10.0)
    assert audit.fired == expected
    assert _gateway_session(sim) is None


# -- a policy reload changes the death judgement of running sessions -----------------------


def _established(policy: Policy) -> tuple[Simulation, GatewaySession]:
    sim = build(policy=policy)
    sim.run_until(0.5)
    s = _gateway_session(sim)
    assert s is not None and s.machine.state is State.ATTACHED and s.binding is not None
    return sim, s


def _death_after_silence(gw: GatewaySessions, s: GatewaySession, start: float) -> float:
    """Step the gateway alone (the client is silent) from ``start`` in 10 ms steps; the
    silence after which it declared the binding dead."""
    last = s.last_inbound
    t = start
    while s.binding is not None:
        t += 0.01
        assert t < last + 120.0, "the binding never died"
        gw.handle_timer(t)
    dead = [ev for ev in gw.events() if isinstance(ev, TransportDead)]
    assert len(dead) == 1
    return t - last


SHORT = make_policy(dead_min_ms=500)
LONG = make_policy(dead_min_ms=2_000)


def _baseline(policy: Policy) -> float:
    sim, s = _established(policy)
    sim.gateway.events()
    return _death_after_silence(sim.gateway, s, sim.now)


def test_reload_to_a_longer_dead_min_keeps_a_binding_alive_longer() -> None:
    short, long = _baseline(SHORT), _baseline(LONG)
    assert short + 1.0 < long  # the premise: the policy value matters at all
    sim, s = _established(SHORT)
    sim.gateway.set_policy(LONG, sim.now)
    sim.gateway.events()
    silence = _death_after_silence(sim.gateway, s, sim.now)
    # A silence between the old and the new dead-after no longer kills the binding.
    assert silence > short + 0.5
    assert abs(silence - long) < 0.05


def test_reload_to_a_shorter_dead_min_declares_death_sooner() -> None:
    short, long = _baseline(SHORT), _baseline(LONG)
    assert short + 1.0 < long
    sim, s = _established(LONG)
    sim.gateway.set_policy(SHORT, sim.now)
    sim.gateway.events()
    silence = _death_after_silence(sim.gateway, s, sim.now)
    assert silence < long - 0.5
    assert abs(silence - short) < 0.05
