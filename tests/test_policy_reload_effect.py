"""A reloaded policy changes how the running client judges its path (engine level).

A real ClientEngine over loopback UDP reaches a real GatewaySessions (tests/
loopback_gateway.py) through an impairment relay. ReloadPolicy with a new ``dead_min_ms``,
then the relay blackholes the path in both directions for a bounded time between the old
and the new value: the new value decides whether the client declares the path dead.
Margins are wide against scheduling noise (0.3 s and 4 s against a 1.5 s silence).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from engine_watch import Watcher
from loopback_gateway import LoopbackGateway

from tunnel.api import ReloadPolicy
from tunnel.client.config import ClientConfig, PathConfig
from tunnel.client.engine import ClientEngine
from tunnel.core.handshake import generate_keypair
from tunnel.core.policy import POLICY_DEFAULT, Policy, policy_to_toml
from tunnel.impair.thread import RelayThread, run_relay_in_thread
from tunnel.io.inner import MemoryInner

SHORT_MS = 300
LONG_MS = 4000
SILENCE_S = 1.5
"""The blackhole lasts this long: far above SHORT_MS, far below LONG_MS."""


def quiet_policy(dead_min_ms: int) -> Policy:
    """Only death can move the session (loss and misses never make it VOLATILE)."""
    return dataclasses.replace(
        POLICY_DEFAULT,
        dead_min_ms=dead_min_ms,
        loss_volatile_threshold=1.0,
        max_consecutive_drops=100,
    )


Rig = Callable[[int], tuple[ClientEngine, Watcher, RelayThread]]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    """Start a client whose policy has ``dead_min_ms``; its policy file is the reload source."""
    private, public = generate_keypair()
    policy_file = tmp_path / "policy.toml"
    engines: list[ClientEngine] = []
    with LoopbackGateway(public, policy=quiet_policy(LONG_MS)) as gw:
        with run_relay_in_thread(upstream=gw.address, seed=1) as relay:

            def start(dead_min_ms: int) -> tuple[ClientEngine, Watcher, RelayThread]:
                path = PathConfig(1, "lo1", ("127.0.0.1", 0), None, relay.bound_address)
                cfg = ClientConfig(
                    private_key=private, gateway_public_key=gw.public_key, paths=(path,),
                    policy=quiet_policy(dead_min_ms), policy_file=policy_file,
                )  # fmt: skip
                engine = ClientEngine(cfg, inner=MemoryInner())
                engines.append(engine)
                w = Watcher(engine, timeout=15.0)
                engine.start()
                w.wait(lambda: w.of("SESSION_CREATED"))
                w.wait(lambda: w.snapshot and w.snapshot.session.state == "ATTACHED")
                return engine, w, relay

            try:
                yield start
            finally:
                for engine in engines:
                    engine.stop()


def reload_to(engine: ClientEngine, w: Watcher, dead_min_ms: int) -> None:
    policy_file = engine.config.policy_file
    assert policy_file is not None
    policy_file.write_text(policy_to_toml(quiet_policy(dead_min_ms)))
    engine.commands.send(ReloadPolicy())
    applied = w.wait(lambda: w.of("POLICY_EVENT"))
    assert [e["policy_name"] for e in applied] == ["POLICY_APPLIED"], applied


def test_a_reload_that_lengthens_dead_min_keeps_the_session_on_a_silent_path(rig: Rig) -> None:
    engine, w, relay = rig(SHORT_MS)
    reload_to(engine, w, LONG_MS)
    mark = len(w.events)
    relay.set("both", blackhole=True)
    until = time.monotonic() + SILENCE_S  # the bound of the silence, not a wait for luck
    try:
        w.wait(lambda: time.monotonic() >= until, timeout=SILENCE_S + 5.0)
    finally:
        relay.set("both", blackhole=False)
    # The path answers again (a new RTT sample, no misses in a row) ...
    history = w.wait(lambda: w.snapshot).session.paths[0].stats.rtt_history
    w.wait(
        lambda: (
            w.snapshot
            and w.snapshot.session.paths[0].stats.rtt_history != history
            and w.snapshot.session.paths[0].stats.consecutive_misses == 0
        )
    )
    # ... and the session never left ATTACHED on it.
    later = w.events[mark:]
    assert [e for e in later if e["event_type"] == "TRANSPORT_DEAD"] == []
    assert [e for e in later if e["event_type"] == "STATE_CHANGE"] == []
    assert w.snapshot is not None
    assert (w.snapshot.session.state, w.snapshot.session.active) == ("ATTACHED", 1)


def test_a_reload_that_shortens_dead_min_makes_the_same_silence_fatal_to_the_path(
    rig: Rig,
) -> None:
    engine, w, relay = rig(LONG_MS)
    reload_to(engine, w, SHORT_MS)
    mark = len(w.events)
    relay.set("both", blackhole=True)
    try:
        dead = w.wait(
            lambda: [e for e in w.events[mark:] if e["event_type"] == "TRANSPORT_DEAD"],
            timeout=SILENCE_S + 10.0,
        )
    finally:
        relay.set("both", blackhole=False)
    assert dead[0]["transport_id"] == 1
    assert SHORT_MS <= dead[0]["silence_ms"] < LONG_MS  # the new number decided, not the old
    # The path answers again: recovery resumes it.
    w.wait(lambda: w.snapshot and w.snapshot.session.state == "ATTACHED")
