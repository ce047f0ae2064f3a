"""Flapping does not grow the session's memory (issue 12, item 8 d).

A client and a gateway session over memory links (simulated time): the active path dies
and comes back again and again, each time a switch. After a warm-up that fills every
bounded structure (probe maps, late probes, loss samples, RTT histories, the switch
limiter), many more flaps must not grow what the protocol core keeps alive: tracemalloc
compares the live allocations made in ``tunnel/`` before and after. The test cannot pass
vacuously: it checks that the flaps happened (one TRANSPORT_SWITCH each) and that the
same measurement does see the warm-up fill and a planted leak of the same size.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Iterator

import pytest
from simkit import build, make_policy, of_type

from tunnel.core.events import EventType
from tunnel.io.memory import Simulation

WARMUP_FLAPS = 40
FLAPS = 80
GROWTH_LIMIT = 8 * 1024
"""Bytes the live tunnel/ allocations may differ by after FLAPS more flaps (measured: about
2.5 KiB, the last bounded maps settling and which probes happen to be in flight); a leak
of 200 bytes a flap would be twice this."""


def flap(sim: Simulation) -> int:
    """Kill the active path for 2 s, bring it back, settle; returns the switches seen."""
    active = sim.client.snapshot(sim.now).active or 1
    sim.links[active].imp.up = False
    sim.run_until(sim.now + 2.0)
    sim.links[active].imp.up = True
    sim.run_until(sim.now + 4.0)
    switches = len(of_type(sim.client_events, EventType.TRANSPORT_SWITCH))
    sim.client_events.clear()  # the test's own record of events, not the session's
    sim.gateway_events.clear()
    return switches


def live_tunnel_bytes() -> int:
    gc.collect()
    snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, "*/tunnel/*")])
    return sum(stat.size for stat in snapshot.statistics("filename"))


@pytest.fixture
def traced() -> Iterator[None]:
    tracemalloc.start(1)
    try:
        yield
    finally:
        tracemalloc.stop()


def test_many_flaps_do_not_grow_what_the_session_keeps(traced: None) -> None:
    sim = build(policy=make_policy(max_switches_per_min=60))
    sim.run_until(3.0)
    assert sim.client.state == "ATTACHED"
    attached = live_tunnel_bytes()
    switches = sum(flap(sim) for _ in range(WARMUP_FLAPS))
    warm = live_tunnel_bytes()
    switches += sum(flap(sim) for _ in range(FLAPS))
    after = live_tunnel_bytes()

    assert sim.client.state == "ATTACHED"
    assert switches == WARMUP_FLAPS + FLAPS  # every flap moved the session
    assert warm - attached > 4 * GROWTH_LIMIT  # the measurement sees the bounded fill
    print(f"live tunnel/ bytes: attached {attached}, warm {warm}, after {after}")
    assert abs(after - warm) < GROWTH_LIMIT, (attached, warm, after)


def test_the_measurement_sees_a_leak_of_one_object_per_flap(traced: None) -> None:
    """Keeping one PathStats per flap (made by tunnel/core: the record, its RTT history
    tuple and floats, a few hundred bytes) over half as many flaps must show."""
    sim = build(policy=make_policy(max_switches_per_min=60))
    sim.run_until(3.0)
    for _ in range(WARMUP_FLAPS // 2):
        flap(sim)
    kept = []
    before = live_tunnel_bytes()
    for _ in range(FLAPS // 2):
        flap(sim)
        kept.append(sim.client.paths.get(1).health.stats(sim.now))
    grown = live_tunnel_bytes() - before
    print(f"40 kept PathStats: +{grown} bytes")
    assert grown > GROWTH_LIMIT
