"""Issue 14: reordering is not a replay.

A stale authentic datagram is one of three things (docs/policy.md, docs/events.md):
- ``too_old``: its counter is below the replay window and it came from a validated path of
  the session (a late datagram of a slower path): counted, no SECURITY_EVENT;
- ``duplicate``: already seen inside the window, from a validated path, while duplicates
  stay within ``duplicate_alarm_ratio`` of the session's datagrams: counted, no event;
- ``replay_detected``: either of those from an address that is no validated path of the
  session, or duplicates above the ratio: counted and reported as a SECURITY_EVENT.

The window itself (three verdicts) is checked against a set-based model; the meter against
its documented rule; the receive sides of both the gateway and the client in the memory
simulation (fake clock).
"""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from simkit import CLIENT_INNER, GATEWAY_INNER, build, ipv4_packet
from test_at_security import (
    ATTACKER,
    addr,
    drops,
    established,
    gw_session,
    new_events,
    seal_from_client,
    view,
)

from tunnel.core.aead import SessionCipher, TrafficKeys
from tunnel.core.constants import MSG_DATA
from tunnel.core.drops import Drop
from tunnel.core.events import EventType, Reason
from tunnel.core.policy import POLICY_DEFAULT, PolicyError
from tunnel.core.replay import DuplicateMeter, ReplayVerdict, ReplayWindow
from tunnel.core.session import State
from tunnel.core.wire import Probe
from tunnel.io.memory import Simulation

FRESH, TOO_OLD, DUPLICATE = ReplayVerdict.FRESH, ReplayVerdict.TOO_OLD, ReplayVerdict.DUPLICATE


# -- the window: three verdicts ------------------------------------------------------------


class Model:
    """The obvious reference: every recorded counter and the highest one."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.seen: set[int] = set()
        self.highest = -1

    def update(self, counter: int) -> ReplayVerdict:
        if counter < 0 or counter >= 2**64 or counter <= self.highest - self.size:
            return TOO_OLD
        if counter in self.seen:
            return DUPLICATE
        self.seen.add(counter)
        self.highest = max(self.highest, counter)
        return FRESH


@pytest.mark.parametrize("size", [64, 2048, 8192])
def test_window_boundaries_duplicate_and_slide(size: int) -> None:
    window = ReplayWindow(size)
    top = 3 * size + 17
    assert window.update(top) is FRESH
    assert window.update(top - size + 1) is FRESH  # the oldest counter still inside
    assert window.update(top - size) is TOO_OLD  # one below the window
    assert window.update(top - size + 1) is DUPLICATE
    assert window.update(top) is DUPLICATE
    assert window.update(top + 5) is FRESH  # above the highest: slides
    assert window.highest == top + 5
    assert window.update(top - size + 1) is TOO_OLD  # slid out
    assert window.update(top - size + 6) is FRESH  # the new oldest one inside


@settings(max_examples=200, deadline=None)
@given(size=st.sampled_from([64, 100, 2048, 8192]), data=st.data())
def test_window_verdicts_match_the_model(size: int, data: st.DataObject) -> None:
    window, model = ReplayWindow(size), Model(size)
    position = data.draw(st.integers(0, 2**20))
    steps = st.one_of(
        st.integers(-size - 70, 70),  # reorder, duplicate, just outside
        st.integers(-3 * size, 3 * size),
        st.integers(0, 2**40),  # far jump
        st.just(0),  # the same counter again
    )
    for delta in data.draw(st.lists(steps, min_size=1, max_size=300)):
        counter = position + delta
        assert window.update(counter) is model.update(counter), counter
        assert window.highest == model.highest
        if counter >= 0:
            position = counter


def test_default_window_is_sized_for_multipath() -> None:
    """At least 8,192 counters by default (WireGuard's window), in the policy and the cipher."""
    assert POLICY_DEFAULT.replay_window_size == 8192
    assert ReplayWindow().size >= 8192
    keys = TrafficKeys(send=bytes(range(32)), recv=bytes(range(32, 64)))
    peer = TrafficKeys(send=keys.recv, recv=keys.send)
    a, b = SessionCipher(keys), SessionCipher(peer)
    oldest, below = a.seal(MSG_DATA, 1, b"oldest"), None
    for _ in range(8191):
        below = a.seal(MSG_DATA, 1, b"x")  # counters 1..8191
    top = a.seal(MSG_DATA, 1, b"top")  # counter 8192
    assert below is not None and b.open(top, 0.0) == b"top"
    assert b.open(oldest, 0.0) is Drop.TOO_OLD  # 8192 below the highest
    assert b.open(below, 0.0) == b"x"  # 1 below
    assert b.open(below, 0.0) is Drop.DUPLICATE


@pytest.mark.parametrize("ratio", [0.0, 0.009, 0.51, 1.0])
def test_duplicate_alarm_ratio_is_bounded(ratio: float) -> None:
    with pytest.raises(PolicyError):
        dataclasses.replace(POLICY_DEFAULT, duplicate_alarm_ratio=ratio)


# -- the duplicate meter -------------------------------------------------------------------


def test_meter_alarms_once_duplicates_exceed_the_ratio_plus_the_slack() -> None:
    meter = DuplicateMeter(0.10, 0.0)
    for _ in range(100):
        meter.fresh(0.5)
    # duplicates > 0.10 * (100 + duplicates) + DUPLICATE_ALARM_SLACK (8): from the 21st on
    verdicts = [meter.duplicate(0.6) for _ in range(23)]
    assert verdicts == [False] * 20 + [True] * 3


def test_meter_carries_a_busy_second_and_forgets_silence() -> None:
    busy = DuplicateMeter(0.10, 0.0)
    for _ in range(1000):
        busy.fresh(0.5)
    # next window: the busy one still weighs (halved to 500): 64 copies stay below the line
    assert not any(busy.duplicate(1.01) for _ in range(64))
    assert busy.duplicate(1.01)
    quiet = DuplicateMeter(0.10, 0.0)
    for _ in range(1000):
        quiet.fresh(0.5)
    # Two silent windows later nothing is carried: only the slack is left.
    assert not any(quiet.duplicate(2.5) for _ in range(8))
    assert quiet.duplicate(2.5)


@pytest.mark.parametrize("rate", [10, 100, 2000])
@pytest.mark.parametrize("run", range(10))
def test_meter_never_alarms_on_five_percent_duplication(run: int, rate: int) -> None:
    """From the session's first datagram, at probe rate up to bulk rate, for 10 s, on a
    link that copies 5 % of the datagrams: never an alarm (bound ~1e-10, replay.py)."""
    rng = random.Random(run)
    meter = DuplicateMeter(0.10, 0.0)
    for i in range(10 * rate):
        now = i / rate
        meter.fresh(now)
        if rng.random() < 0.05:
            assert not meter.duplicate(now), (run, i)


# -- the receive sides ----------------------------------------------------------------------


def data_from_client(sim: Simulation, ident: int) -> bytes:
    return seal_from_client(sim, ipv4_packet(CLIENT_INNER, GATEWAY_INNER, ident=ident), MSG_DATA)


def data_from_gateway(sim: Simulation, ident: int) -> bytes:
    s = gw_session(sim)
    packet = ipv4_packet(GATEWAY_INNER, CLIENT_INNER, ident=ident)
    return s.cipher.seal(MSG_DATA, s.peer_index, packet)


def busy_gateway(sim: Simulation, count: int) -> list[bytes]:
    """``count`` authentic DATA datagrams delivered to the gateway on the binding now."""
    sent = [data_from_client(sim, i) for i in range(count)]
    for data in sent:
        sim.gateway.receive_datagram(data, addr(sim, 1), sim.now)
    return sent


def too_old_datagram(sim: Simulation, seal: object, deliver: object) -> bytes:
    """An authentic datagram that is 8,192+ counters older than one delivered after it."""
    assert callable(seal) and callable(deliver)
    old = seal(sim, 0)
    for i in range(POLICY_DEFAULT.replay_window_size):
        newest = seal(sim, i + 1)
    deliver(newest)
    return bytes(old)


def gateway_events(sim: Simulation, mark: int) -> list[object]:
    sim.advance(0.01)  # the simulation collects the queued events
    return new_events(sim.gateway_events, mark, EventType.SECURITY_EVENT)


def test_gateway_too_old_from_a_validated_path_is_counted_without_an_event() -> None:
    sim = established()
    s = gw_session(sim)
    old = too_old_datagram(
        sim, data_from_client, lambda d: sim.gateway.receive_datagram(d, addr(sim, 1), sim.now)
    )
    before, mark, count = view(s), len(sim.gateway_events), drops(sim.gateway, Drop.TOO_OLD)
    for path_id in (1, 2):  # the binding and the other validated path
        sim.gateway.receive_datagram(old, addr(sim, path_id), sim.now)
    assert drops(sim.gateway, Drop.TOO_OLD) == count + 2
    assert not gateway_events(sim, mark)
    assert view(s) == before


def test_gateway_stale_datagram_from_an_unvalidated_address_is_a_replay() -> None:
    sim = established()
    s = gw_session(sim)
    old = too_old_datagram(
        sim, data_from_client, lambda d: sim.gateway.receive_datagram(d, addr(sim, 1), sim.now)
    )
    (copy,) = busy_gateway(sim, 1)
    before, mark, count = view(s), len(sim.gateway_events), drops(sim.gateway, Drop.REPLAY)
    sim.gateway.receive_datagram(old, ATTACKER, sim.now)  # too old
    sim.gateway.receive_datagram(copy, ATTACKER, sim.now)  # duplicate
    assert drops(sim.gateway, Drop.REPLAY) == count + 2
    events = gateway_events(sim, mark)
    assert events and {e.reason_code for e in events} == {Reason.REPLAY_DETECTED}
    assert sum(e.count for e in events) <= 2  # rate-limited: one report may fold both
    assert view(s) == before


def test_gateway_duplicate_from_a_validated_path_below_the_ratio_is_counted() -> None:
    sim = established()
    s = gw_session(sim)
    sent = busy_gateway(sim, 100)
    before, mark = view(s), len(sim.gateway_events)
    duplicates, replays = drops(sim.gateway, Drop.DUPLICATE), drops(sim.gateway, Drop.REPLAY)
    for data, path_id in zip(sent[:5], (1, 2, 1, 2, 1), strict=True):
        sim.gateway.receive_datagram(data, addr(sim, path_id), sim.now)
    assert drops(sim.gateway, Drop.DUPLICATE) == duplicates + 5
    assert drops(sim.gateway, Drop.REPLAY) == replays
    assert not gateway_events(sim, mark)
    assert view(s) == before


def test_gateway_duplicates_above_the_ratio_are_a_replay_flood() -> None:
    sim = established()
    s = gw_session(sim)
    sent = busy_gateway(sim, 100)
    before, mark = view(s), len(sim.gateway_events)
    duplicates, replays = drops(sim.gateway, Drop.DUPLICATE), drops(sim.gateway, Drop.REPLAY)
    for data in sent:  # every one of them again, from the binding itself
        sim.gateway.receive_datagram(data, addr(sim, 1), sim.now)
    new_duplicates = drops(sim.gateway, Drop.DUPLICATE) - duplicates
    new_replays = drops(sim.gateway, Drop.REPLAY) - replays
    assert new_duplicates + new_replays == 100
    assert new_replays > 50, (new_duplicates, new_replays)
    events = gateway_events(sim, mark)
    assert events and {e.reason_code for e in events} == {Reason.REPLAY_DETECTED}
    assert view(s) == before and s.machine.state is State.ATTACHED


def test_gateway_ratio_follows_a_policy_reload() -> None:
    sim = established()
    s = gw_session(sim)
    s.apply_policy(dataclasses.replace(POLICY_DEFAULT, duplicate_alarm_ratio=0.5))
    sent = busy_gateway(sim, 100)
    mark, replays = len(sim.gateway_events), drops(sim.gateway, Drop.REPLAY)
    for data in sent[:60]:  # 60 of 160 is below a half
        sim.gateway.receive_datagram(data, addr(sim, 1), sim.now)
    assert drops(sim.gateway, Drop.REPLAY) == replays
    assert not gateway_events(sim, mark)


def client_with_unvalidated_path() -> Simulation:
    """ATTACHED on path 1 with path 2 validated; path 3's link never carried anything."""
    sim = build(n_paths=3, start=False)
    sim.links[3].imp.up = False
    sim.start()
    sim.run_until(2.0)
    assert sim.client.state is State.ATTACHED
    assert [p.validated for p in sim.client.paths] == [True, True, False]
    return sim


def client_security(sim: Simulation, mark: int) -> list[object]:
    sim.advance(0.01)
    return new_events(sim.client_events, mark, EventType.SECURITY_EVENT)


def test_client_receive_side_classes() -> None:
    sim = client_with_unvalidated_path()
    c = sim.client
    old = too_old_datagram(sim, data_from_gateway, lambda d: c.receive_datagram(d, 1, sim.now))
    sent = [data_from_gateway(sim, i) for i in range(100)]
    for data in sent:
        c.receive_datagram(data, 1, sim.now)
    state = (c.machine.session_id, c.state, c.machine.version, c.active)

    # too old and a few duplicates on validated paths: counted, no event
    mark = len(sim.client_events)
    counts = {d: drops(c, d) for d in (Drop.TOO_OLD, Drop.DUPLICATE, Drop.REPLAY)}
    c.receive_datagram(old, 2, sim.now)
    for data, path_id in zip(sent[:4], (1, 2, 1, 2), strict=True):
        c.receive_datagram(data, path_id, sim.now)
    assert drops(c, Drop.TOO_OLD) == counts[Drop.TOO_OLD] + 1
    assert drops(c, Drop.DUPLICATE) == counts[Drop.DUPLICATE] + 4
    assert drops(c, Drop.REPLAY) == counts[Drop.REPLAY]
    assert not client_security(sim, mark)

    # the same on a path that was never validated: replays, reported
    mark = len(sim.client_events)
    c.receive_datagram(old, 3, sim.now)
    c.receive_datagram(sent[10], 3, sim.now)
    assert drops(c, Drop.REPLAY) == counts[Drop.REPLAY] + 2
    events = client_security(sim, mark)
    assert events and {e.reason_code for e in events} == {Reason.REPLAY_DETECTED}

    # a flood of copies on the active path: above the ratio, reported
    sim.advance(1.1)  # past the rate limit of SECURITY_EVENT reports
    mark = len(sim.client_events)
    replays = drops(c, Drop.REPLAY)
    for data in sent[20:]:
        c.receive_datagram(data, 1, sim.now)
    assert drops(c, Drop.REPLAY) - replays > 40
    events = client_security(sim, mark)
    assert events and {e.reason_code for e in events} == {Reason.REPLAY_DETECTED}
    assert (c.machine.session_id, c.state, c.machine.version, c.active) == state


def test_probe_copies_on_an_idle_validated_path_are_duplicates_not_replays_when_busy() -> None:
    """A PROBE copied by the network while data flows: one duplicate, no event."""
    sim = established()
    busy_gateway(sim, 50)
    probe = seal_from_client(sim, Probe(200, 2, sim.client.ts_ms(sim.now)))
    mark, duplicates = len(sim.gateway_events), drops(sim.gateway, Drop.DUPLICATE)
    sim.gateway.receive_datagram(probe, addr(sim, 2), sim.now)
    sim.gateway.receive_datagram(probe, addr(sim, 2), sim.now)
    assert drops(sim.gateway, Drop.DUPLICATE) == duplicates + 1
    assert not gateway_events(sim, mark)
