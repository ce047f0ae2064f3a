"""The gateway's handshake budget: what its core can do on this CPU (docs/gateway.md,
"Arrivals in bursts").

An admitted HANDSHAKE_INIT costs the gateway its Noise work (two DHs to read the INIT, two
to answer it) and a session's setup. :func:`handshake_cost` measures that once per
process: ``SAMPLES`` INITs of throwaway clients through a throwaway ``GatewaySessions``,
in CPU time (``time.process_time``: what other processes take of the core is not
counted), after one unmeasured warm-up. The budget, :func:`handshake_budget`, is
``HANDSHAKE_CPU_SHARE`` of one core at that cost, within the admission's bounds
(``HANDSHAKE_RATE`` .. ``HANDSHAKE_RATE_MAX``, tunnel/core/admission.py): a burst of
clients is admitted as fast as half the core allows, the other half stays for the
sessions already in, and past the bucket the cookies and the per-source budget defend
it as before.
"""

from __future__ import annotations

import functools
import os
import random
import time
from typing import Final

from tunnel.core.admission import HANDSHAKE_RATE, HANDSHAKE_RATE_MAX
from tunnel.core.gateway import GatewaySessions
from tunnel.core.gateway_session import ClientEntry
from tunnel.core.handshake import generate_keypair
from tunnel.core.initiator import HandshakeInitiator
from tunnel.core.policy import POLICY_DEFAULT

__all__ = ["HANDSHAKE_CPU_SHARE", "SAMPLES", "handshake_budget", "handshake_cost"]

HANDSHAKE_CPU_SHARE: Final = 0.5
"""The share of one core the gateway may spend on handshakes (the rest is for the
sessions' traffic during a burst)."""

SAMPLES: Final = 24
"""Handshakes measured (about 20-40 ms at start on a 2020s server core)."""


@functools.cache
def handshake_cost() -> float:
    """CPU seconds of one admitted handshake in the gateway core (measured once)."""
    gw_private, gw_public = generate_keypair()
    keys = [generate_keypair() for _ in range(SAMPLES + 1)]
    gateway = GatewaySessions(
        static_private=gw_private, policy=POLICY_DEFAULT, now=0.0, urandom=os.urandom,
        clients=[ClientEntry(f"c{i}", pub, f"10.99.0.{i + 2}") for i, (_, pub) in enumerate(keys)],
        inner_gateway="10.99.0.1", cookie_threshold=0.0,
    )  # fmt: skip
    inits = []
    for i, (private, _) in enumerate(keys):
        initiator = HandshakeInitiator(private, gw_public, i + 1, [0], rng=random.Random(i))
        inits.append(initiator.start(0.0, POLICY_DEFAULT, ts_ms=1)[1])
    spent = 0.0
    for i, init in enumerate(inits):
        t0 = time.process_time()
        gateway.receive_datagram(init, (f"192.0.2.{i + 1}", 1), 0.0)
        gateway.datagrams_to_send()
        gateway.events()
        if i:  # the first warms up
            spent += time.process_time() - t0
    if len(gateway.sessions) != len(inits):
        raise RuntimeError("the handshake measurement did not open its sessions")
    return spent / SAMPLES


def handshake_budget(share: float = HANDSHAKE_CPU_SHARE) -> float:
    """Admitted handshakes per second: ``share`` of one core at :func:`handshake_cost`,
    within the admission's bounds."""
    cost = handshake_cost()
    rate = share / cost if cost > 0 else HANDSHAKE_RATE_MAX
    return min(max(rate, HANDSHAKE_RATE), HANDSHAKE_RATE_MAX)
