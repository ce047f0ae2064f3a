"""Handshake cookies under load (tunnel/core/cookie.py), core level with a fake clock.

The gateway spends no DH on an INIT whose mac1 is wrong, and while its handshake bucket
runs low it answers INITs without a valid mac2 with a COOKIE_REPLY bound to the source
address; the client retries once with mac2 and completes the handshake.
"""

from __future__ import annotations

import random

from simkit import build

from tunnel.core.admission import (
    COOKIE_LOAD_FRACTION,
    COOKIE_REPLY_BURST,
    HANDSHAKE_BURST,
    MAX_INIT_SOURCES,
    SOURCE_INIT_BURST,
    SOURCE_INIT_RATE,
)
from tunnel.core.client import ClientSession, PathSpec
from tunnel.core.constants import HEADER, MSG_COOKIE_REPLY, MSG_HANDSHAKE_INIT
from tunnel.core.cookie import (
    COOKIE_CLIENT_TTL_S,
    COOKIE_REPLY_LEN,
    COOKIE_SECRET_S,
    MAC_LEN,
    CookieChecker,
    CookieJar,
    address_bytes,
)
from tunnel.core.drops import Drop
from tunnel.core.gateway import GatewaySessions
from tunnel.core.handshake import generate_keypair
from tunnel.core.policy import POLICY_DEFAULT
from tunnel.core.session import State
from tunnel.io.memory import Simulation, _Delivery

ATTACKER = ("203.0.113.9", 4444)


def drops(endpoint: GatewaySessions | ClientSession, reason: Drop) -> int:
    return endpoint.drops.get(str(reason), 0)


class Wire:
    """Records every datagram delivered in the simulation, by direction and type."""

    def __init__(self, sim: Simulation) -> None:
        self.up: list[_Delivery] = []
        self.down: list[_Delivery] = []
        sim.taps.append(lambda d: (self.up if d.to_gateway else self.down).append(d))

    def inits(self) -> list[bytes]:
        """INITs the client sent (injected datagrams have path_id -1)."""
        return [d.data for d in self.up if d.data[0] == MSG_HANDSHAKE_INIT and d.path_id > 0]

    def cookie_replies(self) -> list[bytes]:
        return [d.data for d in self.down if d.data[0] == MSG_COOKIE_REPLY]


def loaded_sim(threshold: float = 1.0) -> tuple[Simulation, Wire]:
    """A client about to connect to a gateway that requires cookies (``threshold`` 1)."""
    sim = build(n_paths=1, start=False)
    sim.gateway.admission.set_cookie_threshold(threshold)
    return sim, Wire(sim)


def stranger_init(gateway_public: bytes) -> bytes:
    """A well-formed INIT with a valid mac1 from a key the gateway does not allow."""
    priv, _ = generate_keypair()
    stranger = ClientSession(
        static_private=priv, gateway_public=gateway_public, paths=[PathSpec(1, "p")],
        policy=POLICY_DEFAULT, now=0.0, rng=random.Random(9),
    )  # fmt: skip
    stranger.connect(0.0)
    ((_, init),) = stranger.datagrams_to_send()
    return init


def gateway_public(sim: Simulation) -> bytes:
    return sim.client.handshake.gateway_public


# -- normal operation ----------------------------------------------------------------------


def test_without_load_the_handshake_needs_no_cookie() -> None:
    sim, wire = loaded_sim(threshold=COOKIE_LOAD_FRACTION)
    sim.start()
    sim.run_until(1.0)
    assert sim.client.state is State.ATTACHED
    assert len(wire.inits()) == 1 and wire.cookie_replies() == []
    assert drops(sim.gateway, Drop.COOKIE_REQUIRED) == 0
    assert wire.inits()[0][-MAC_LEN:] == bytes(MAC_LEN)  # no cookie, mac2 is zero


def test_init_with_wrong_mac1_costs_no_dh() -> None:
    sim, _ = loaded_sim(threshold=0.0)
    other_gateway_public = generate_keypair()[1]
    init = stranger_init(other_gateway_public)  # mac1 keyed to another gateway
    for i in range(1000):
        sim.gateway.receive_datagram(init, ("198.51.100.1", i), 0.0)
    assert drops(sim.gateway, Drop.BAD_MAC) == 1000
    assert drops(sim.gateway, Drop.UNKNOWN_CLIENT_KEY) == 0  # never decrypted
    assert sim.gateway.admission.handshakes.tokens == HANDSHAKE_BURST  # no handshake token spent
    assert sim.gateway.datagrams_to_send() == []


# -- under load ----------------------------------------------------------------------------


def test_cookie_reply_is_no_larger_than_the_init() -> None:
    sim, wire = loaded_sim()
    sim.start()
    sim.run_until(0.5)
    (reply, *_) = wire.cookie_replies()
    assert len(reply) == COOKIE_REPLY_LEN <= min(len(i) for i in wire.inits())
    assert HEADER.unpack_from(reply)[2] == sim.client.index


def test_client_under_load_completes_the_handshake_after_one_retry() -> None:
    sim, wire = loaded_sim(threshold=COOKIE_LOAD_FRACTION)
    gw = sim.gateway
    # A flood of INITs with a valid mac1 (an unknown key) drains the handshake bucket
    # until the gateway is under load; from then on they cost a cookie reply, not a DH.
    # The flood arrives just before the client's INIT (same instant, queued first).
    flood = stranger_init(gateway_public(sim))
    for i in range(2000):
        sim.inject_to_gateway(flood, ("198.51.100.2", i), delay=sim.links[1].imp.delay_s)
    sim.start()
    sim.run_until(0.2)  # far less than the client's handshake retransmit interval
    dh_spent = drops(gw, Drop.UNKNOWN_CLIENT_KEY)
    assert dh_spent == HANDSHAKE_BURST * (1 - COOKIE_LOAD_FRACTION) + 1
    flood_cookies = 2000 - dh_spent
    assert sim.client.state is State.ATTACHED
    first, retry = wire.inits()
    assert len(wire.cookie_replies()) == 1
    assert first[-MAC_LEN:] == bytes(MAC_LEN) and retry[-MAC_LEN:] != bytes(MAC_LEN)
    assert first[:-MAC_LEN] == retry[:-MAC_LEN]  # the same INIT, now with mac2
    assert sim.client.handshake.sends == 1  # the retry is not a handshake attempt of its own
    assert drops(gw, Drop.COOKIE_REQUIRED) == flood_cookies + 1
    assert drops(gw, Drop.UNKNOWN_CLIENT_KEY) == dh_spent
    assert len([s for s in gw.sessions.values() if not s.machine.terminated]) == 1


def test_spoofed_source_cannot_use_a_cookie_issued_to_another_address() -> None:
    sim, wire = loaded_sim()
    sim.start()
    sim.run_until(0.5)
    assert sim.client.state is State.ATTACHED
    _, good = wire.inits()  # carries a valid mac2 for the client's address
    gw = sim.gateway
    cookies, created = drops(gw, Drop.COOKIE_REQUIRED), len(gw.sessions)
    replays = drops(gw, Drop.REPLAY)
    for port in range(100):
        gw.receive_datagram(good, ("192.0.2.66", port), sim.now)
    assert drops(gw, Drop.COOKIE_REQUIRED) == cookies + 100  # not accepted, re-challenged
    assert drops(gw, Drop.REPLAY) == replays  # no DH: the fixation check never ran
    assert len(gw.sessions) == created
    out = gw.datagrams_to_send()
    assert {addr for addr, _ in out} == {("192.0.2.66", p) for p in range(100)}
    assert all(len(d) == COOKIE_REPLY_LEN and d[0] == MSG_COOKIE_REPLY for _, d in out)
    (s,) = gw.sessions.values()
    assert s.machine.state is State.ATTACHED and s.machine.version == 1


def test_replayed_init_flood_under_load_spends_bounded_work() -> None:
    sim, wire = loaded_sim(threshold=COOKIE_LOAD_FRACTION)
    sim.start()
    sim.run_until(0.5)
    gw = sim.gateway
    (s,) = gw.sessions.values()
    (init,) = wire.inits()
    now = sim.now
    for i in range(20_000):
        gw.receive_datagram(init, ("198.51.100.3", i), now)
    dh = drops(gw, Drop.REPLAY)  # each DH'd replay is caught by the timestamp check
    assert dh <= HANDSHAKE_BURST * (1 - COOKIE_LOAD_FRACTION) + 1
    assert drops(gw, Drop.COOKIE_REQUIRED) <= COOKIE_REPLY_BURST
    assert drops(gw, Drop.RATE_LIMITED) >= 20_000 - dh - COOKIE_REPLY_BURST
    sent = gw.datagrams_to_send()
    assert sum(len(d) for _, d in sent) <= 20_000 * len(init)  # never amplified
    assert s.machine.state is State.ATTACHED and s.machine.version == 1


def test_a_host_holding_a_cookie_gets_only_its_own_share_of_handshakes() -> None:
    """Under load a valid mac2 is not enough: each source host has a small token bucket
    (WireGuard's 20/s, burst 5), so one host with a cookie cannot spend the handshake
    budget that every other client needs."""
    sim, _ = loaded_sim()  # cookies required from the first INIT
    gw = sim.gateway
    priv, _ = generate_keypair()
    stranger = ClientSession(
        static_private=priv, gateway_public=gateway_public(sim), paths=[PathSpec(1, "p")],
        policy=POLICY_DEFAULT, now=0.0, rng=random.Random(9),
    )  # fmt: skip
    stranger.connect(0.0)
    ((_, first),) = stranger.datagrams_to_send()
    gw.receive_datagram(first, ATTACKER, 0.0)
    ((to, reply),) = gw.datagrams_to_send()
    assert to == ATTACKER and reply[0] == MSG_COOKIE_REPLY
    stranger.receive_datagram(reply, 1, 0.0)
    ((_, with_cookie),) = stranger.datagrams_to_send()
    assert with_cookie[-MAC_LEN:] != bytes(MAC_LEN)

    dh0, limited0 = drops(gw, Drop.UNKNOWN_CLIENT_KEY), drops(gw, Drop.RATE_LIMITED)
    for _ in range(1000):  # a burst at one instant: only the bucket's burst gets DH
        gw.receive_datagram(with_cookie, ATTACKER, 0.01)
    assert drops(gw, Drop.UNKNOWN_CLIENT_KEY) - dh0 == SOURCE_INIT_BURST
    for k in range(1, 101):  # then one every 10 ms for a second: the refill rate
        gw.receive_datagram(with_cookie, ATTACKER, 0.01 + k * 0.01)
    dh = drops(gw, Drop.UNKNOWN_CLIENT_KEY) - dh0
    assert SOURCE_INIT_BURST + SOURCE_INIT_RATE - 1 <= dh <= SOURCE_INIT_BURST + SOURCE_INIT_RATE
    assert drops(gw, Drop.RATE_LIMITED) - limited0 == 1100 - dh
    # another host (the real client, its own cookie) is not held back by that one
    sim.start()
    sim.run_until(1.5)
    assert sim.client.state is State.ATTACHED


def test_cookies_expire_with_the_secret_rotation() -> None:
    pub = generate_keypair()[1]
    rnd = random.Random(3)
    checker = CookieChecker(pub, rnd.randbytes, now=0.0)
    jar = CookieJar(pub)
    body = bytes([MSG_HANDSHAKE_INIT]) + bytes(11) + rnd.randbytes(106)
    addr = address_bytes("127.0.0.1:5000")
    first = jar.seal_init(body, 1.0)
    assert checker.mac1_ok(first) and not checker.mac2_ok(first, addr, 1.0)
    assert jar.consume_reply(checker.reply(first, 7, addr, 1.0), 1.0) is None

    fresh = jar.seal_init(body, 60.0)
    assert checker.mac2_ok(fresh, addr, 60.0)
    assert not checker.mac2_ok(fresh, address_bytes("127.0.0.1:5001"), 60.0)
    # The secret is replaced after COOKIE_SECRET_S: the same mac2 no longer verifies.
    assert not checker.mac2_ok(fresh, addr, COOKIE_SECRET_S + 0.5)
    # The client stops using a cookie before the secret it came from is replaced.
    assert jar.has_cookie(1.0 + COOKIE_CLIENT_TTL_S - 0.1)
    assert not jar.has_cookie(1.0 + COOKIE_CLIENT_TTL_S)
    stale = jar.seal_init(body, 1.0 + COOKIE_CLIENT_TTL_S)
    assert stale[-MAC_LEN:] == bytes(MAC_LEN) and checker.mac1_ok(stale)


def test_an_expired_cookie_is_challenged_again_and_the_client_recovers() -> None:
    sim, wire = loaded_sim()
    sim.start()
    sim.run_until(0.5)
    _, good = wire.inits()
    gw = sim.gateway
    cookies = drops(gw, Drop.COOKIE_REQUIRED)
    addr = wire.up[0].src
    gw.receive_datagram(good, addr, sim.now + COOKIE_SECRET_S + 1)  # secret rotated
    assert drops(gw, Drop.COOKIE_REQUIRED) == cookies + 1
    ((to, reply),) = gw.datagrams_to_send()
    assert to == addr and len(reply) == COOKIE_REPLY_LEN


def test_garbage_cookie_replies_are_dropped_by_the_client() -> None:
    sim, _ = loaded_sim()
    sim.client.connect(0.0)
    c = sim.client
    ((path, init),) = c.datagrams_to_send()
    rng = random.Random(4)
    header = HEADER.pack(MSG_COOKIE_REPLY, 0, c.index)
    wrong_index = HEADER.pack(MSG_COOKIE_REPLY, 0, c.index ^ 1) + bytes(44)
    # A genuine reply, but to another INIT (its AD is another mac1).
    other = stranger_init(gateway_public(sim))
    gw = sim.gateway
    gw.receive_datagram(other, ("192.0.2.1", 1), 0.0)
    ((_, foreign),) = gw.datagrams_to_send()
    foreign = header + foreign[HEADER.size :]
    cases = [
        (header + rng.randbytes(44), Drop.BAD_TAG),
        (foreign, Drop.BAD_TAG),
        (wrong_index, Drop.UNKNOWN_SESSION),
        (header + bytes(43), Drop.TRUNCATED),
        (header + bytes(45), Drop.OVERSIZED),
        (HEADER.pack(MSG_COOKIE_REPLY, 1, c.index) + bytes(44), Drop.MALFORMED),
    ]
    for data, reason in cases:
        before = drops(c, reason)
        c.receive_datagram(data, path, 0.01)
        assert drops(c, reason) == before + 1, reason
        assert c.datagrams_to_send() == [] and c.state is State.BIRTH
        assert not c.handshake.cookies.has_cookie(0.01)

    # The real reply: one retry; replaying that reply triggers no second one.
    gw.receive_datagram(init, wire_addr(sim), 0.02)
    ((_, reply),) = gw.datagrams_to_send()
    c.receive_datagram(reply, path, 0.03)
    assert len(c.datagrams_to_send()) == 1
    c.receive_datagram(reply, path, 0.04)
    assert c.datagrams_to_send() == []


def test_a_cookie_reply_after_the_handshake_is_a_wrong_state_drop() -> None:
    sim, wire = loaded_sim()
    sim.start()
    sim.run_until(0.5)
    c = sim.client
    assert c.state is State.ATTACHED
    before = drops(c, Drop.WRONG_STATE)
    c.receive_datagram(wire.cookie_replies()[0], 1, sim.now)
    assert drops(c, Drop.WRONG_STATE) == before + 1
    assert c.state is State.ATTACHED


def wire_addr(sim: Simulation) -> object:
    return sim.links[1].client_addr


def test_per_source_handshake_buckets_are_bounded() -> None:
    sim, _ = loaded_sim()
    gw = sim.gateway
    for i in range(MAX_INIT_SOURCES + 500):
        addr = (f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 1)
        assert gw.admission.source_allows(addr, 0.0)
    assert gw.admission.sources == MAX_INIT_SOURCES
    # the least recently seen hosts were forgotten: they start again with a full bucket
    known = gw.admission.knows_source
    assert not known("10.0.0.0") and not known("10.0.1.243")
    assert known("10.0.1.244")  # host 500: the oldest one kept
