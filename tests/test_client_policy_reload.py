"""Policy reload reaches every path's health estimators (core, fake clock).

A reload is strict (D14): new numbers apply from the moment of the reload. These tests look
at the effect, not at the stored object: after a reload that lengthens ``dead_min_ms`` a
silence shorter than the new value no longer kills the active path, after one that
shortens it a silence longer than the new value does, and a reloaded ``loss_window_ms``
decides how long a loss burst stays in the measured loss ratio.
"""

from __future__ import annotations

import pytest
from simkit import build, make_policy, of_type

from tunnel.core.events import EventType
from tunnel.core.policy import Policy
from tunnel.core.session import State

SILENCE_S = 1.5
"""Between the short (0.3 s) and the long (4 s) dead_min, with a wide margin to both."""


def quiet_policy(dead_min_ms: int, **changes: object) -> Policy:
    """Only death can move the session: loss and misses never make it VOLATILE."""
    return make_policy(
        dead_min_ms=dead_min_ms, loss_volatile_threshold=1.0, max_consecutive_drops=100,
        **changes,
    )  # fmt: skip


GATEWAY_POLICY = quiet_policy(4000)
"""The gateway declares the binding dead after max(1 s, 3 x dead_min): not in these tests."""


@pytest.mark.parametrize(
    ("before_ms", "after_ms", "dies"),
    [
        (300, 4000, False),  # the reload saves the path
        (4000, 300, True),  # the reload makes the same silence fatal
        (300, None, True),  # controls: without a reload the old number decides
        (4000, None, False),
    ],
)
def test_reloaded_dead_min_decides_whether_a_silence_kills_the_active_path(
    before_ms: int, after_ms: int | None, dies: bool
) -> None:
    sim = build(n_paths=1, policy=quiet_policy(before_ms), gateway_policy=GATEWAY_POLICY)
    sim.run_until(1.0)
    c = sim.client
    assert c.state is State.ATTACHED and c.active == 1
    if after_ms is not None:
        new = quiet_policy(after_ms)
        c.apply_policy(new, sim.now)
        assert c.snapshot(sim.now).policy_version == new.policy_version
    mark = len(sim.client_events)
    sim.links[1].imp.up = False
    sim.advance(SILENCE_S)
    sim.links[1].imp.up = True
    sim.advance(1.0)
    events = sim.client_events[mark:]
    dead = of_type(events, EventType.TRANSPORT_DEAD)
    if dies:
        assert [d.transport_id for d in dead] == [1]
        silence_ms = after_ms if after_ms is not None else before_ms
        assert silence_ms <= dead[0].silence_ms < SILENCE_S * 1000
    else:
        assert dead == []
        assert not of_type(events, EventType.STATE_CHANGE)
        assert c.state is State.ATTACHED and c.active == 1


@pytest.mark.parametrize(("window_ms", "remembered"), [(1500, False), (9000, True)])
def test_reloaded_loss_window_decides_how_long_a_loss_burst_is_remembered(
    window_ms: int, remembered: bool
) -> None:
    """A 0.5 s burst of upstream loss (its probes count as lost once unanswered for
    dead_min, 1 s), judged 4 s after it: a 1.5 s window has forgotten it, a 9 s window
    still counts it. The reload happens before the burst."""
    sim = build(n_paths=1, policy=quiet_policy(1000), gateway_policy=GATEWAY_POLICY)
    sim.run_until(1.0)
    c = sim.client
    c.apply_policy(quiet_policy(1000, loss_window_ms=window_ms), sim.now)
    sim.links[1].imp.loss_up = 1.0
    sim.advance(0.5)
    sim.links[1].imp.loss_up = 0.0
    sim.advance(4.0)
    stats = c.snapshot(sim.now).paths[0].stats
    assert stats.loss_known
    assert (stats.loss_ratio > 0.0) is remembered, stats
    assert c.state is State.ATTACHED and c.active == 1
