"""Shared builders for level-2 tests: a real client and gateway over memory links."""

from __future__ import annotations

import dataclasses
import random
import struct
from typing import Any

from tunnel.core.client import ClientSession, PathSpec
from tunnel.core.events import Event, EventType
from tunnel.core.gateway import GatewaySessions
from tunnel.core.gateway_session import ClientEntry
from tunnel.core.handshake import generate_keypair
from tunnel.core.policy import POLICY_DEFAULT, Policy
from tunnel.io.memory import MemoryLink, Simulation

CLIENT_INNER = "10.66.0.2"
GATEWAY_INNER = "10.66.0.1"


BUSY = dataclasses.replace(POLICY_DEFAULT, idle_after_ms=3_600_000)
"""The default policy, except that the session never becomes idle (issue 11). The
simulated sessions carry no inner traffic unless a test sends some, and the tests built
here were written for a session whose active path is probed every ``probe_interval_ms``
(before issue 11 every session was): they say so by using this policy. How an idle
session probes and dies is tested with ``POLICY_DEFAULT`` (tests/test_idle_sessions.py)."""


def make_policy(**changes: Any) -> Policy:
    """``BUSY`` with ``changes``."""
    return dataclasses.replace(BUSY, **changes) if changes else BUSY


def build(
    *,
    n_paths: int = 2,
    seed: int = 1,
    policy: Policy | None = None,
    gateway_policy: Policy | None = None,
    delay_s: float = 0.010,
    max_version: int | None = None,
    start: bool = True,
) -> Simulation:
    rng = random.Random(seed)
    gw_priv, gw_pub = generate_keypair()
    cl_priv, cl_pub = generate_keypair()
    pol = policy or BUSY
    extra = {} if max_version is None else {"max_version": max_version}
    client = ClientSession(
        static_private=cl_priv,
        gateway_public=gw_pub,
        paths=[PathSpec(i, f"path{i}") for i in range(1, n_paths + 1)],
        policy=pol,
        now=0.0,
        rng=random.Random(seed + 1),
        **extra,
    )
    gateway = GatewaySessions(
        static_private=gw_priv,
        clients=[ClientEntry("alice", cl_pub, CLIENT_INNER)],
        policy=gateway_policy or pol,
        now=0.0,
        urandom=random.Random(seed + 2).randbytes,
        rng=random.Random(seed + 3),
        **extra,
    )
    links = [MemoryLink(i, rng=rng, delay_s=delay_s) for i in range(1, n_paths + 1)]
    sim = Simulation(client, gateway, links)
    if start:
        sim.start()
    return sim


def ipv4_packet(src: str, dst: str, payload: bytes = b"x" * 32, ident: int = 0) -> bytes:
    """A minimal IPv4/UDP packet (checksums zero: the tunnel does not look at them)."""
    s = bytes(int(x) for x in src.split("."))
    d = bytes(int(x) for x in dst.split("."))
    udp = struct.pack("!HHHH", 5000, 5001, 8 + len(payload), 0) + payload
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), ident & 0xFFFF, 0, 64, 17, 0, s, d)
    return hdr + udp


def of_type(events: list[Any], kind: EventType) -> list[Any]:
    return [e for e in events if e.event_type == kind]


def state_changes(events: list[Event]) -> list[tuple[str, str, str, int]]:
    return [
        (e.previous_state, e.new_state, str(e.reason_code), e.state_version)
        for e in of_type(events, EventType.STATE_CHANGE)
    ]


def assert_gap_free(events: list[Any]) -> None:
    """I-OBS-1: exactly one STATE_CHANGE per version, in order, starting at 1."""
    versions = [e.state_version for e in of_type(events, EventType.STATE_CHANGE)]
    assert versions == list(range(1, len(versions) + 1)), versions
