"""The gateway program's garbage-collector policy (docs/gateway.md, "Garbage collection";
tunnel/gateway/gcfreeze.py).

- What survived a full collection is frozen at the next tick, so the next full
  collection walks only what was made since.
- A cycle among frozen objects is collected at the next reclaim (every ``reclaim_s``),
  not before and not never.
- The policy is safe for sessions only because an ended session frees its objects by
  reference counting alone: no cycle, nothing left for the collector.
"""

from __future__ import annotations

import gc
import os
import random
import weakref
from collections.abc import Iterator

import pytest

from tunnel.core.gateway import GatewaySessions
from tunnel.core.gateway_session import ClientEntry
from tunnel.core.handshake import generate_keypair
from tunnel.core.initiator import HandshakeInitiator
from tunnel.core.policy import POLICY_DEFAULT
from tunnel.gateway.gcfreeze import GcFreezer, gc_families


class Node:
    """A weakref-able object that can be put in a cycle."""

    def __init__(self) -> None:
        self.other: object = None


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def freezer() -> Iterator[tuple[GcFreezer, Clock]]:
    clock = Clock()
    f = GcFreezer(reclaim_s=3600.0, clock=clock)
    f.install()
    try:
        yield f, clock
    finally:
        f.uninstall()
    assert gc.get_freeze_count() == 0  # uninstall thaws everything


def test_install_freezes_what_exists_and_uninstall_thaws_it(
    freezer: tuple[GcFreezer, Clock],
) -> None:
    f, _ = freezer
    assert f.frozen > 0 and f.frozen == gc.get_freeze_count()


def test_survivors_of_a_full_collection_are_frozen_at_the_next_tick(
    freezer: tuple[GcFreezer, Clock],
) -> None:
    f, _ = freezer
    kept = [Node() for _ in range(2000)]  # made after install: not frozen yet
    before, full_before = f.frozen, f.pauses[2]
    f.tick()
    if f.pauses[2] == full_before:  # (the 2000 objects rarely start one on their own)
        assert f.frozen == before  # no full collection since: nothing new is frozen
    gc.collect()
    assert f.pauses[2] >= 1 and f.longest[2] > 0
    f.tick()
    assert f.frozen >= before + len(kept)
    assert kept  # (kept alive until here)


def test_a_cycle_among_frozen_objects_is_collected_at_the_reclaim_and_not_before(
    freezer: tuple[GcFreezer, Clock],
) -> None:
    f, clock = freezer
    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    gc.collect()
    f.tick()  # a and b survived a full collection: frozen
    del a, b  # now a cycle nobody references
    gc.collect()
    assert gone() is not None, "a frozen cycle is not collected before the reclaim"
    clock.now = 3599.0
    f.tick()
    assert gone() is not None and f.reclaims == 0
    clock.now = 3600.0
    f.tick()
    assert gone() is None, "the reclaim thaws and collects the cycle"
    assert f.reclaims == 1 and f.frozen > 0  # and freezes the survivors again


def test_the_metrics_show_frozen_objects_collections_and_longest_pauses(
    freezer: tuple[GcFreezer, Clock],
) -> None:
    f, _ = freezer
    gc.collect()
    families = {fam.name: fam for fam in gc_families(f)}
    ((_, frozen),) = families["jvpn_gateway_gc_frozen_objects"].samples
    assert frozen == f.frozen
    collections = {labels["generation"]: v for labels, v in families[
        "jvpn_gateway_gc_collections_total"].samples}  # fmt: skip
    assert set(collections) == {"0", "1", "2"} and collections["2"] >= 1
    longest = {labels["generation"]: v for labels, v in families[
        "jvpn_gateway_gc_longest_pause_seconds"].samples}  # fmt: skip
    assert longest["2"] > 0


def test_an_ended_session_frees_everything_without_the_collector() -> None:
    """The precondition of freezing sessions: ended sessions of a gateway core leave no
    cyclic garbage (were there a cycle, a frozen session would stay until the reclaim)."""
    n = 50
    gw_private, gw_public = generate_keypair()
    keys = [generate_keypair() for _ in range(n)]
    gateway = GatewaySessions(
        static_private=gw_private, policy=POLICY_DEFAULT, now=0.0, urandom=os.urandom,
        clients=[ClientEntry(f"c{i}", pub, f"10.99.0.{i + 2}") for i, (_, pub) in enumerate(keys)],
        inner_gateway="10.99.0.1", cookie_threshold=0.0,
    )  # fmt: skip
    for i, (private, _) in enumerate(keys):
        initiator = HandshakeInitiator(private, gw_public, i + 1, [0], rng=random.Random(i))
        init = initiator.start(0.0, POLICY_DEFAULT, ts_ms=1)[1]
        gateway.receive_datagram(init, (f"192.0.2.{i + 1}", 1), 0.01 * i)
    gateway.datagrams_to_send()
    gateway.events()
    assert len(gateway.sessions) == n
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        gateway.terminate_all(10.0)
        now = 10.0
        while gateway.sessions and now < 1000.0:  # the timers forget ended sessions
            deadline = gateway.next_deadline()
            now = max(now + 1.0, deadline or 0.0)
            gateway.handle_timer(now)
            gateway.datagrams_to_send()
            gateway.events()
        assert not gateway.sessions
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = [o for o in gc.garbage if type(o).__module__.startswith("tunnel.")]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if enabled:
            gc.enable()
    assert not left, sorted({type(o).__qualname__ for o in left})
