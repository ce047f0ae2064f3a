"""Issue 10 item 2: death detection scaled to RTT and traffic (docs/policy.md,
``volatility.dead_traffic_min_ms``; tunnel/core/health.py, "Death has two rules").

Fake clock, memory links (tests/simkit.py). While data flows, a silent active path is
probed at once and declared dead within a few RTTs, never before the policy floor; an idle
session probes and dies exactly as before; 10 % random loss with traffic flowing makes no
false deaths.
"""

from __future__ import annotations

from simkit import CLIENT_INNER, GATEWAY_INNER, build, ipv4_packet, make_policy, of_type

from tunnel.core.events import EventType
from tunnel.core.health import PathHealth
from tunnel.core.policy import POLICY_DEFAULT
from tunnel.core.session import State
from tunnel.io.memory import Simulation


def flow(sim: Simulation, seconds: float, period: float = 0.002) -> None:
    """Inner packets both ways every ``period`` for ``seconds``."""
    end, i = sim.now + seconds, 0
    while sim.now < end - 1e-9:
        sim.client_tun.inject(ipv4_packet(CLIENT_INNER, GATEWAY_INNER, ident=i))
        sim.gateway_tun.inject(ipv4_packet(GATEWAY_INNER, CLIENT_INNER, ident=i))
        i += 1
        sim.advance(period)


def test_with_traffic_a_silent_path_dies_at_the_floor_not_at_dead_min() -> None:
    sim = build()
    sim.advance(2.0)
    flow(sim, 1.0)
    pol = sim.client.policy
    sim.links[1].imp.up = False
    flow(sim, 1.0)
    (dead,) = of_type(sim.client_events, EventType.TRANSPORT_DEAD)
    # RTT 20 ms (two 10 ms links): the probe burst goes unanswered for two RTOs, which is
    # more than the 50 ms floor and far less than the idle rule's 300 ms.
    assert pol.dead_traffic_min_ms <= dead.silence_ms < pol.dead_min_ms
    assert sim.client.state is State.ATTACHED and sim.client.active == 2


def test_the_floor_is_the_policy_value() -> None:
    sim = build(policy=make_policy(dead_traffic_min_ms=200), delay_s=0.001)
    sim.advance(2.0)
    flow(sim, 1.0)
    sim.links[1].imp.up = False
    flow(sim, 1.0)
    (dead,) = of_type(sim.client_events, EventType.TRANSPORT_DEAD)
    assert 200 <= dead.silence_ms < 210  # RTT 2 ms: the floor decides


def test_a_gateway_silent_on_every_path_is_judged_by_the_idle_rule() -> None:
    """A busy gateway (or a stall of this host) silences every path at once: that is no
    reason to switch. The traffic rule needs another path to answer meanwhile."""
    sim = build(delay_s=0.001)
    sim.advance(2.0)
    flow(sim, 1.0)
    for link in sim.links.values():
        link.imp.delay_s = 0.2  # what leaves now arrives 200 ms later, on every path
    flow(sim, 0.2)  # 200 ms of silence everywhere: far past the 50 ms floor
    for link in sim.links.values():
        link.imp.delay_s = 0.001
    flow(sim, 1.0)
    # No death (the probes' late answers may still count as loss: the loss judgement is
    # not the traffic rule's business and reacts the same with the rule off).
    assert not of_type(sim.client_events, EventType.TRANSPORT_DEAD)


def test_without_traffic_the_idle_rule_is_unchanged() -> None:
    sim = build(delay_s=0.001)
    sim.advance(2.0)
    sim.links[1].imp.up = False
    sim.advance(1.0)
    (dead,) = of_type(sim.client_events, EventType.TRANSPORT_DEAD)
    assert dead.silence_ms >= POLICY_DEFAULT.dead_min_ms


def test_an_idle_session_probes_no_faster_than_the_probe_interval() -> None:
    sim = build()
    sim.advance(2.0)
    flow(sim, 0.5)  # traffic, then nothing: the traffic rule must let go
    sim.advance(0.1)  # the last data has arrived
    sent: list[float] = []
    sim.taps.append(lambda d: d.to_gateway and d.path_id == 1 and sent.append(sim.now))
    sim.advance(10.0)
    interval = sim.client.policy.probe_interval_ms / 1000
    assert len(sent) <= 10.0 / interval + 2  # the active path's probes only


def test_health_traffic_rule_needs_a_flow_and_lets_go_after_an_answer() -> None:
    h = PathHealth(1, dead_min_ms=300, dead_traffic_min_ms=50)
    for i in range(5):  # too few arrivals: no flow yet
        h.inbound(i * 0.001)
        h.data_inbound(i * 0.001)
    assert h.traffic_suspect_at() is None and h.traffic_dead_at() is None
    for i in range(5, 20):
        h.inbound(i * 0.001)
        h.data_inbound(i * 0.001)
    suspect = h.traffic_suspect_at()
    assert suspect is not None and abs(suspect - (0.019 + 0.010)) < 1e-9  # 4 gaps < 10 ms
    assert h.traffic_dead_at() == 0.019 + 0.050  # no RTT yet: the floor
    assert h.dead_at() == 0.019 + 0.3  # the idle rule is unchanged
    h.inbound(0.040)  # a probe answered after the data stopped: alive, the flow is over
    assert h.traffic_suspect_at() is None and h.traffic_dead_at() is None


def _ten_percent_loss_with_traffic(seed: int) -> bool:
    """True if path 1 was never declared dead through 10 s of 10 % loss each way with 100
    packets/s flowing both ways."""
    sim = build(seed=seed)
    sim.advance(2.0)
    a = sim.links[1].imp
    a.loss_up = a.loss_down = 0.10
    flow(sim, 10.0, period=0.01)
    return not of_type(sim.client_events, EventType.TRANSPORT_DEAD)


def test_ten_percent_loss_with_traffic_makes_no_false_deaths() -> None:
    """Issue 10: false deaths must not grow. 30 seeds, 10 % loss each way on the active
    path with traffic flowing: no TRANSPORT_DEAD in at least 28 runs. Measured: 30/30
    (3 of them switch proactively on the loss judgement, as they do with the traffic rule
    off, i.e. dead_traffic_min_ms = 60000; AT-15 bounds those runs)."""
    survived = [seed for seed in range(30) if _ten_percent_loss_with_traffic(seed)]
    assert len(survived) >= 28, sorted(set(range(30)) - set(survived))
