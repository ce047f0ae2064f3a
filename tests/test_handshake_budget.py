"""Issue 11 item 5, the gateway's side: admission follows what the core can do.

The gateway measures the CPU cost of an admitted handshake once per process and spends DH
on at most half a core's worth of INITs a second (tunnel/gateway/handshake_budget.py,
docs/gateway.md "Arrivals in bursts"); past its bucket, cookies and the per-source budget
defend it as before. Sans-I/O crowds on a fake clock (tests/crowd.py).
"""

from __future__ import annotations

import dataclasses
import random

from tests.crowd import Crowd
from tunnel.core.admission import (
    HANDSHAKE_BURST,
    HANDSHAKE_RATE,
    HANDSHAKE_RATE_MAX,
    SOURCE_INIT_BURST,
    SOURCE_INIT_RATE,
    HandshakeAdmission,
)
from tunnel.core.drops import Drop
from tunnel.core.gateway import GatewaySessions
from tunnel.core.gateway_session import ClientEntry
from tunnel.core.handshake import generate_keypair
from tunnel.core.initiator import HandshakeInitiator
from tunnel.core.policy import POLICY_DEFAULT
from tunnel.gateway.handshake_budget import HANDSHAKE_CPU_SHARE, handshake_budget, handshake_cost
from tunnel.gateway.runtime import GatewayRuntime


def test_the_budget_is_half_a_core_at_the_measured_cost_within_bounds() -> None:
    cost = handshake_cost()
    assert 1e-6 < cost < 0.1, "a handshake costs microseconds to milliseconds of CPU"
    budget = handshake_budget()
    assert HANDSHAKE_RATE <= budget <= HANDSHAKE_RATE_MAX
    if HANDSHAKE_RATE < HANDSHAKE_CPU_SHARE / cost < HANDSHAKE_RATE_MAX:
        assert budget == HANDSHAKE_CPU_SHARE / cost
    assert handshake_budget(share=1.0) >= budget


def test_the_gateway_program_admits_at_its_measured_budget() -> None:
    gw_priv, _ = generate_keypair()
    rt = GatewayRuntime(static_private=gw_priv, clients=[], policy_poll_s=None)
    bucket = rt.gateway.admission.handshakes
    assert bucket.rate == handshake_budget()
    assert bucket.burst == max(HANDSHAKE_BURST, bucket.rate)
    assert bucket.tokens == bucket.burst  # a fresh gateway starts with a full bucket


def test_set_handshake_rate_is_bounded() -> None:
    adm = HandshakeAdmission(generate_keypair()[1], random.Random(1).randbytes, 0.0)
    adm.set_handshake_rate(1.0, 0.0)
    assert (adm.handshakes.rate, adm.handshakes.burst) == (HANDSHAKE_RATE, HANDSHAKE_BURST)
    adm.set_handshake_rate(1e9, 0.0)
    assert adm.handshakes.rate == adm.handshakes.burst == HANDSHAKE_RATE_MAX
    adm.set_handshake_rate(1500.0, 5.0)
    assert adm.handshakes.rate == adm.handshakes.burst == adm.handshakes.level(5.0) == 1500.0


def crowd_of(n: int, rate: float, timeout_ms: int) -> tuple[Crowd, GatewaySessions]:
    p = dataclasses.replace(POLICY_DEFAULT, handshake_timeout_ms=timeout_ms)
    gw_priv, gw_pub = generate_keypair()
    keys = [generate_keypair() for _ in range(n)]
    gateway = GatewaySessions(
        static_private=gw_priv, policy=p, now=0.0, urandom=random.Random(3).randbytes,
        rng=random.Random(4), inner_prefix=16, inner_gateway="10.80.255.254",
        clients=[ClientEntry(f"c{i}", pub, f"10.80.{i // 250}.{i % 250 + 2}")
                 for i, (_, pub) in enumerate(keys)],
    )  # fmt: skip
    gateway.admission.set_handshake_rate(rate, 0.0)
    crowd = Crowd(gateway)
    for i, (priv, _) in enumerate(keys):
        crowd.add(f"c{i}", priv, gw_pub, p, seed=i)
    return crowd, gateway


def test_a_burst_beyond_the_bucket_attaches_at_the_budget_within_the_default_deadline() -> None:
    """1,600 clients at once, a budget of 800/s (bucket 800): at 200/s they would need 6 s,
    more than the default 5 s deadline; at the budget all are in, through cookies."""
    n, rate = 1600, 800.0
    crowd, gateway = crowd_of(n, rate, POLICY_DEFAULT.handshake_timeout_ms)
    for m in crowd.members:
        crowd.connect(m)
    crowd.run_until(POLICY_DEFAULT.handshake_timeout_ms / 1000)
    attached = sorted(m.attached_at for m in crowd.members if m.attached_at is not None)
    assert len(attached) == n, f"{n - len(attached)} did not attach"
    assert gateway.drops.get(Drop.COOKIE_REQUIRED.value, 0) > 0  # over the bucket: cookies
    for t in (0.25, 0.5, 1.0, 1.5):  # never more than the bucket allows
        assert sum(1 for a in attached if a <= t) <= rate + rate * t + 1
    assert attached[-1] <= 2 * (n - rate) / rate + 1.0


def test_under_load_one_source_host_gets_only_its_own_budget() -> None:
    """Many valid clients behind one address while the gateway is under load: cookies,
    then at most the per-source bucket (SOURCE_INIT_BURST + SOURCE_INIT_RATE a second)."""
    n = 60
    gw_priv, gw_pub = generate_keypair()
    keys = [generate_keypair() for _ in range(n)]
    gateway = GatewaySessions(
        static_private=gw_priv, policy=POLICY_DEFAULT, now=0.0, cookie_threshold=1.0,
        urandom=random.Random(5).randbytes, rng=random.Random(6), inner_prefix=16,
        inner_gateway="10.81.255.254",
        clients=[ClientEntry(f"c{i}", pub, f"10.81.{i // 250}.{i % 250 + 2}")
                 for i, (_, pub) in enumerate(keys)],
    )  # fmt: skip
    gateway.admission.set_handshake_rate(5000.0, 0.0)
    opened = 0
    for step in range(20):  # 2 s, every client asks (with the cookie it got) each 0.1 s
        now = step * 0.1
        for i, (priv, _) in enumerate(keys):
            hi = HandshakeInitiator(priv, gw_pub, i + 1, [0], rng=random.Random(i))
            _p, init = hi.start(now, POLICY_DEFAULT, ts_ms=1 + step)
            gateway.receive_datagram(init, ("203.0.113.9", 5000 + i), now)
            for _a, reply in gateway.datagrams_to_send():
                again = hi.on_cookie_reply(reply, i + 1, now)
                if isinstance(again, bytes):
                    gateway.receive_datagram(again, ("203.0.113.9", 5000 + i), now)
                    gateway.datagrams_to_send()
        opened = len(gateway.sessions)
    assert 0 < opened <= SOURCE_INIT_BURST + SOURCE_INIT_RATE * 2.0 + 1
    assert gateway.drops.get(Drop.RATE_LIMITED.value, 0) > 0
