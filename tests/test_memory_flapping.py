"""Flapping does not grow the session's memory (issue 12, item 8 d).

A client and a gateway session over memory links (simulated time): the active path dies
and comes back again and again, each time a switch. After a warm-up that fills every
bounded structure (probe maps, late probes, loss samples, RTT histories, the switch
limiter), many more flaps must not grow what the protocol core keeps alive: tracemalloc
compares the live allocations made in ``tunnel/`` before and after. The test cannot pass
vacuously: it checks that the flaps happened (one TRANSPORT_SWITCH each) and that the
same measurement does see the warm-up fill and a planted leak of the same size.

Below the core, the interpreter: tuples left on CPython's free lists stay allocated until
a full collection (what made the real client's RSS creep up in bench/soak.py). Turning
events into records must leave no blocks behind, and a running engine must run full
collections on its own thread; the block count is shown to see such tuples.
"""

from __future__ import annotations

import dataclasses
import gc
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator

import pytest
from loopback_gateway import LoopbackGateway
from simkit import build, make_policy, of_type

from tunnel.client import engine as engine_module
from tunnel.client.config import ClientConfig, PathConfig
from tunnel.client.engine import ClientEngine
from tunnel.core.events import EventType, Reason, TransportSwitch
from tunnel.core.handshake import generate_keypair
from tunnel.io.inner import MemoryInner
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


RECORDS = 3_000
BLOCK_GROWTH_LIMIT = 100
"""pymalloc blocks that RECORDS more event records may leave allocated (measured: 0-10)."""


def allocated_blocks_after(action: Callable[[], object], times: int) -> int:
    """pymalloc blocks still allocated after ``action`` ran ``times`` times (results
    dropped), with no garbage collection in between: the client runs almost no full
    collections, so nothing would empty CPython's free lists either."""
    gc.collect()  # a full collection empties the free lists: a known start
    gc.disable()
    try:
        for _ in range(50):
            action()
        before = sys.getallocatedblocks()
        for _ in range(times):
            action()
        return sys.getallocatedblocks() - before
    finally:
        gc.enable()


def switch_event() -> TransportSwitch:
    return TransportSwitch(
        ts_ms=1, session_id="e" * 32, node_id="client", policy_version="1", state_version=3,
        previous_transport=1, new_transport=2, reason_code=Reason.TRANSPORT_DEAD,
        switch_latency_ms=12.5, binding_epoch=2, path="lo2",
    )  # fmt: skip


def test_turning_events_into_records_leaves_no_memory_behind() -> None:
    """Every event becomes a record (``Event.to_dict``) for the UI channel, the control
    socket and headless stdout: 3,000 more records must not leave allocations behind.
    (``dataclasses.fields()`` per event left one 11-19-item tuple a record on CPython's
    free lists, up to 2,000 per size, emptied only by a full collection: the client's
    RSS rose slowly under flapping in bench/soak.py.)"""
    event = switch_event()
    assert 11 <= len(dataclasses.fields(event)) <= 19  # a size that has a free list
    assert event.to_dict()["path"] == "lo2"  # the record is complete
    assert event.to_dict()["reason_code"] == "transport_dead"
    grown = allocated_blocks_after(event.to_dict, RECORDS)
    assert grown < BLOCK_GROWTH_LIMIT, grown


def test_the_block_count_sees_tuples_left_on_a_free_list() -> None:
    """The same measurement over what ``dataclasses.fields()`` does (a tuple built from a
    generator, freed at once) shows one block a call: the test above can fail."""
    event = switch_event()
    grown = allocated_blocks_after(lambda: dataclasses.fields(event), RECORDS)
    assert grown > RECORDS // 2, grown


def test_a_running_engine_empties_the_free_lists_with_full_collections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The engine runs a full collection every FULL_GC_INTERVAL_S (here 0.2 s) on its own
    thread: tuples left on CPython's free lists (2,000 here) are given back."""
    monkeypatch.setattr(engine_module, "FULL_GC_INTERVAL_S", 0.2)
    full: list[int] = []

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "stop" and info["generation"] == 2:
            full.append(threading.get_ident())

    private, public = generate_keypair()
    with LoopbackGateway(public) as gw:
        config = ClientConfig(
            private_key=private, gateway_public_key=gw.public_key,
            paths=(PathConfig(1, "lo1", ("127.0.0.1", 0), None, gw.address),),
        )  # fmt: skip
        engine = ClientEngine(config, inner=MemoryInner(rate_pps=20))
        event = switch_event()
        gc.collect()
        gc.callbacks.append(on_gc)
        engine.start()
        try:
            assert engine._thread is not None
            ident = engine._thread.ident or 0

            def wait_for_full_collections(n: int) -> None:
                goal, deadline = full.count(ident) + n, time.monotonic() + 20
                while full.count(ident) < goal and time.monotonic() < deadline:
                    time.sleep(0.05)

            wait_for_full_collections(3)  # started and settled
            for _ in range(2_000):
                dataclasses.fields(event)  # 2,000 tuples onto one free list
            left = sys.getallocatedblocks()
            wait_for_full_collections(2)
            emptied = left - sys.getallocatedblocks()
        finally:
            gc.callbacks.remove(on_gc)
            engine.stop()
    assert full.count(ident) >= 5  # on the engine's thread, again and again
    assert emptied > 1_000, emptied
