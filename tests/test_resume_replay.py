"""No datagram a gateway process accepted is accepted again by the process that resumes its
session (issue 9, DESIGN D15a; docs/gateway.md "[state]"): core level, fake time.

A real client and a gateway core run over memory links; a small store stand-in plays the
driver's part (every write the core asks for is made before that turn's datagrams leave,
as ``tunnel/gateway/resume.py`` does). A record is taken, the client then sends N inner
packets that the gateway accepts (captured on the wire), and the gateway "crashes": a new
core resumes the session from that record, as after ``kill -9``. Replaying the N captures
into it delivers none of them (each a counted ``retired_key_phase`` drop with a
SECURITY_EVENT); the client follows the new key phase and its new traffic goes through,
in the same session; no (direction, key phase, counter) crosses the wire twice.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from simkit import CLIENT_INNER, GATEWAY_INNER, ipv4_packet, of_type

from tunnel.core.aead import SessionCipher, TrafficKeys, peek_header
from tunnel.core.client import ClientSession, PathSpec
from tunnel.core.constants import MSG_CONTROL, MSG_DATA
from tunnel.core.drops import Drop
from tunnel.core.events import EventType
from tunnel.core.gateway import GatewaySessions
from tunnel.core.gateway_resume import ResumeState
from tunnel.core.gateway_session import ClientEntry, GatewaySession
from tunnel.core.handshake import generate_keypair
from tunnel.core.policy import POLICY_DEFAULT
from tunnel.core.session import State
from tunnel.io.memory import MemoryLink, Simulation

BLOCK = 64
"""Send counters reserved per write (small, so that reservations happen in the test)."""


@dataclass
class Store:
    """What the driver writes for the one session: its latest resume state."""

    record: ResumeState | None = None
    writes: int = 0

    def write(self, s: GatewaySession) -> None:
        state = s.resume_state(s.cipher.send_counter + BLOCK)
        self.record = state
        self.writes += 1
        s.reservation_made(state.key_phase, state.send_from, state.retired is not None)


@dataclass
class Wire:
    """Every sealed datagram on the links: (direction, key phase, counter) counts, and
    the client's DATA datagrams in order."""

    seen: Counter[tuple[str, int, int]] = field(default_factory=Counter)
    client_data: list[tuple[object, bytes]] = field(default_factory=list)

    def repeats(self) -> list[tuple[str, int, int]]:
        return [k for k, n in self.seen.items() if n > 1]


class DrivenSimulation(Simulation):
    """The simulation with the driver's store writes before anything leaves."""

    store: Store
    identity: Identity

    def _collect(self) -> None:
        for s in self.gateway.reservations_due():
            self.store.write(s)
        super()._collect()


@dataclass(frozen=True)
class Identity:
    """The gateway's static key and clients: what every process of it is started with."""

    static_private: bytes
    clients: list[ClientEntry]


def new_gateway(identity: Identity, seed: int) -> GatewaySessions:
    """A gateway process: same identity, clients and policy, empty memory."""
    return GatewaySessions(
        static_private=identity.static_private,
        clients=identity.clients,
        policy=POLICY_DEFAULT,
        now=0.0,
        urandom=random.Random(seed).randbytes,
        rng=random.Random(seed + 1),
        counter_reservations=True,
    )


def setup() -> tuple[DrivenSimulation, Store, Wire]:
    gw_priv, gw_pub = generate_keypair()
    cl_priv, cl_pub = generate_keypair()
    identity = Identity(gw_priv, [ClientEntry("alice", cl_pub, CLIENT_INNER)])
    client = ClientSession(
        static_private=cl_priv, gateway_public=gw_pub,
        paths=[PathSpec(i, f"path{i}") for i in (1, 2)], policy=POLICY_DEFAULT, now=0.0,
        rng=random.Random(2),
    )  # fmt: skip
    rng = random.Random(1)
    links = [MemoryLink(i, rng=rng, delay_s=0.010) for i in (1, 2)]
    sim = DrivenSimulation(client, new_gateway(identity, 7), links)
    sim.store = Store()
    sim.identity = identity
    wire = Wire()

    def tap(d: Any) -> None:
        head = peek_header(d.data)
        if not isinstance(head, tuple) or head[0] not in (MSG_DATA, MSG_CONTROL):
            return
        if d.path_id == -1:
            return  # injected by the test (a replay): not the endpoints' own sending
        wire.seen[("up" if d.to_gateway else "down", head[1], head[3])] += 1
        if d.to_gateway and head[0] == MSG_DATA:
            wire.client_data.append((d.src, d.data))

    sim.taps.append(tap)
    sim.start()
    sim.run_until(2.0)
    assert sim.client.state is State.ATTACHED
    return sim, sim.store, wire


def send_inner(sim: Simulation, first: int, count: int, until: float) -> list[bytes]:
    idents = range(first, first + count)
    packets = [ipv4_packet(CLIENT_INNER, GATEWAY_INNER, ident=i) for i in idents]
    for p in packets:
        sim.client_tun.inject(p)
    sim.run_until(until)
    return packets


def only_session(gateway: GatewaySessions) -> GatewaySession:
    (s,) = gateway.sessions.values()
    return s


def crash_and_resume(sim: DrivenSimulation, record: ResumeState, seed: int) -> GatewaySessions:
    """The gateway process dies (nothing more is written) and a new one resumes ``record``."""
    restarted = new_gateway(sim.identity, seed)
    assert isinstance(restarted.resume(record, sim.now), GatewaySession)
    sim.gateway = restarted
    sim.gateway_tun.from_tunnel.clear()
    return restarted


def replay(sim: Simulation, captures: list[tuple[object, bytes]], until: float) -> None:
    for src, data in captures:
        sim.inject_to_gateway(data, src)
    sim.run_until(until)


def test_replayed_datagrams_accepted_before_a_crash_are_rejected_after_the_resume() -> None:
    sim, store, wire = setup()
    sid = sim.client.machine.session_id
    send_inner(sim, 0, 5, sim.now + 1.0)
    record = store.record
    assert record is not None and record.retired is None  # taken before the N below

    n = 40
    before = len(wire.client_data)
    accepted = send_inner(sim, 100, n, sim.now + 1.0)
    assert sim.gateway_tun.from_tunnel[-n:] == accepted  # the old process accepted all N
    captures = wire.client_data[before:]
    assert len(captures) == n

    gateway = crash_and_resume(sim, record, seed=20)
    # The attacker is quicker than the client: the captures arrive first.
    replay(sim, captures, sim.now + 0.001)
    for p in accepted:
        assert p not in sim.gateway_tun.from_tunnel  # none of the N delivered again
    assert gateway.drops.get("retired_key_phase", 0) >= n
    security = [
        e for e in of_type(sim.gateway_events, EventType.SECURITY_EVENT)
        if e.violation_type == "RETIRED_KEY_PHASE"
    ]  # fmt: skip
    assert security and sum(e.count for e in security) >= 1
    assert str(security[0].reason_code) == "replay_detected"

    # The client follows the new phase (the REKEY sent at resume) and goes on.
    sim.run_until(sim.now + 2.0)
    assert sim.client.keys.cipher is not None
    assert sim.client.keys.cipher.phase == record.key_phase + 1
    fresh = send_inner(sim, 500, 10, sim.now + 1.0)
    assert [p for p in sim.gateway_tun.from_tunnel if p in fresh] == fresh
    # Replayed again, now that the client is in the new phase: still nothing.
    replay(sim, captures, sim.now + 0.5)
    for p in accepted:
        assert p not in sim.gateway_tun.from_tunnel
    s = only_session(gateway)
    assert s.machine.session_id == sid and not s.machine.terminated
    assert sim.client.state is not State.TERMINATED
    assert of_type(sim.client_events, EventType.SESSION_TERMINATED) == []
    assert wire.repeats() == []  # no (key, nonce) pair twice, either direction


def test_a_second_crash_before_the_client_followed_resumes_in_the_same_phase() -> None:
    """A record taken while the rotation is unconfirmed keeps the retired keys: a second
    crash then resumes in the same new phase (the client could not follow two), sealing
    above the reserved counter; once the client follows, the record says so."""
    sim, store, wire = setup()
    record = store.record
    assert record is not None
    gateway = crash_and_resume(sim, record, seed=30)
    s = only_session(gateway)
    assert s.cipher.rekey_pending and s.cipher.phase == record.key_phase + 1
    sim.run_until(sim.now + 0.0001)  # the REKEY left, its write made first
    pending = store.record
    assert pending is not None and pending.retired is not None
    assert pending.key_phase == record.key_phase + 1

    # Crash again before the client's answer arrives: the same phase again, from the
    # counters reserved (nothing the last process sealed is sealed again).
    gateway = crash_and_resume(sim, pending, seed=31)
    s = only_session(gateway)
    assert s.cipher.phase == pending.key_phase
    assert s.cipher.send_counter == pending.send_from + 1  # its REKEY: the first counter

    writes = store.writes
    sim.run_until(sim.now + 2.0)
    confirmed = store.record
    assert confirmed is not None and confirmed.retired is None  # the client followed
    assert store.writes > writes
    assert confirmed.key_phase == pending.key_phase and not s.cipher.rekey_pending
    packets = send_inner(sim, 0, 5, sim.now + 1.0)
    assert sim.gateway_tun.from_tunnel[-5:] == packets
    assert wire.repeats() == []


def test_a_clean_record_resumes_in_a_new_phase_too_and_the_client_follows_it() -> None:
    """One rule after any resume: the client, idle meanwhile, follows the REKEY, and its
    data of the retired phase sent before it did is answered, never delivered."""
    sim, store, wire = setup()
    send_inner(sim, 0, 3, sim.now + 1.0)
    s_old = only_session(sim.gateway)
    store.write(s_old)  # what a clean stop writes
    record = store.record
    assert record is not None
    gateway = crash_and_resume(sim, record, seed=40)
    sim.run_until(sim.now + 2.0)
    packets = send_inner(sim, 50, 5, sim.now + 1.0)
    assert sim.gateway_tun.from_tunnel[-5:] == packets
    assert gateway.drops.get("retired_key_phase", 0) == 0  # the client followed first
    assert wire.repeats() == []


def test_a_client_the_first_rekey_misses_is_answered_from_where_it_sends() -> None:
    """The client's addresses changed while the gateway was down (a NAT rebinding): the
    REKEY sent at resume to the stored binding reaches nobody. The client's datagrams of
    the retired phase from its new address are answered with a REKEY there; it follows,
    and the session goes on (a NAT rebinding of the new phase, as any)."""
    sim, store, wire = setup()
    record = store.record
    assert record is not None
    for link in sim.links.values():
        link.rebind()
    gateway = crash_and_resume(sim, record, seed=50)
    sim.run_until(sim.now + 5.0)
    cipher = sim.client.keys.cipher
    assert cipher is not None and cipher.phase == record.key_phase + 1
    assert gateway.drops.get("retired_key_phase", 0) >= 1  # what it sent before following
    packets = send_inner(sim, 0, 5, sim.now + 2.0)
    assert [p for p in sim.gateway_tun.from_tunnel if p in packets] == packets
    s = only_session(gateway)
    assert not s.machine.terminated and s.binding in {k.client_addr for k in sim.links.values()}
    assert wire.repeats() == []


def test_the_clients_first_datagram_of_the_new_phase_asks_for_a_write_with_its_delivery() -> None:
    """Its inner packet and the write that records the confirmed rotation come out of the
    same input: the driver commits the write before it delivers (gateway_resume.py); a
    process resumed from the record before that write would accept this phase afresh."""
    sim, store, _wire = setup()
    record = store.record
    assert record is not None and record.binding is not None and record.key_phase == 0
    gateway = new_gateway(sim.identity, 60)
    s = gateway.resume(record, sim.now)
    assert isinstance(s, GatewaySession)
    for due in gateway.reservations_due():  # the REKEY's write (rotation unconfirmed)
        store.write(due)
    assert store.record is not None and store.record.retired is not None
    gateway.datagrams_to_send()

    # The client's side of the same keys, one phase on: what it seals once it followed.
    client = SessionCipher(TrafficKeys(record.keys.recv, record.keys.send), suite=record.suite)
    assert client.rekey(sim.now) and client.phase == 1
    packet = ipv4_packet(CLIENT_INNER, GATEWAY_INNER, ident=7)
    data = client.seal(MSG_DATA, record.index, packet)
    gateway.receive_datagram(data, record.binding, sim.now)
    assert gateway.packets_for_tun() == [packet]
    assert gateway.reservations_due() == [s]  # in the same turn as the delivery
    store.write(s)
    assert store.record is not None and store.record.retired is None


def test_a_resumed_cipher_retires_the_stored_phase_and_forgets_that_on_the_next_rotation() -> None:
    """SessionCipher.resume_at: the stored phase only authenticates (each counter once:
    ``retired_key_phase``, then a duplicate); the new phase opens; once the peer moves on
    again, the generation that becomes the previous one is an ordinary one."""
    keys = TrafficKeys(b"a" * 32, b"b" * 32)
    peer = SessionCipher(TrafficKeys(keys.recv, keys.send))
    old = [peer.seal(MSG_DATA, 1, b"old %d" % n) for n in range(3)]
    gw = SessionCipher(keys)
    gw.resume_at(0, 12345, None)
    assert gw.phase == 1 and gw.send_counter == 0 and gw.rekey_pending
    assert [gw.open(d, 0.0) for d in old] == [Drop.RETIRED_KEY_PHASE] * 3
    assert gw.open(old[0], 0.0) is Drop.DUPLICATE
    assert peer.open(gw.seal(MSG_CONTROL, 1, b"rekey"), 0.0) == b"rekey"  # the peer follows
    assert peer.phase == 1
    assert gw.open(peer.seal(MSG_DATA, 1, b"new"), 0.0) == b"new" and not gw.rekey_pending
    late = peer.seal(MSG_DATA, 1, b"late in phase 1")
    assert peer.rekey(1.0) and gw.open(peer.seal(MSG_DATA, 1, b"phase 2"), 1.0) == b"phase 2"
    assert gw.open(late, 1.0) == b"late in phase 1"  # phase 1 was never retired

    pending = SessionCipher(TrafficKeys(b"c" * 32, b"d" * 32))
    pending.resume_at(5, 700, keys)  # stays in 5 from counter 700; 4 (``keys``) retired
    assert pending.phase == 5 and pending.send_counter == 700 and pending.rekey_pending
