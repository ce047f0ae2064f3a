"""DESIGN D15c: a gateway that lost the session (restarted with the memory store) or says it
shuts down (docs/client.md, "When the gateway loses the session"). Level 2: a real client
and real gateways over memory links in fake time; the gateway "restarts" as a new
GatewaySessions with the same identity and clients and no sessions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from simkit import CLIENT_INNER, GATEWAY_INNER, ipv4_packet, make_policy, of_type, state_changes

from tunnel.client.engine import exit_code_for
from tunnel.core.client import ClientSession, PathSpec
from tunnel.core.constants import MSG_HANDSHAKE_INIT, MSG_HANDSHAKE_RESP, SESSION_ID_LEN
from tunnel.core.drops import Drop
from tunnel.core.events import EventType, Reason, reason_to_wire
from tunnel.core.gateway import GatewaySessions
from tunnel.core.gateway_session import ClientEntry
from tunnel.core.handshake import generate_keypair
from tunnel.core.policy import Policy
from tunnel.core.session import State
from tunnel.core.wire import InitPayload
from tunnel.io.memory import MemoryLink, Simulation

CLIENT_INNER6 = "fd00:66::2"


@dataclass
class Lab:
    sim: Simulation
    gw_priv: bytes
    clients: list[ClientEntry]
    policy: Policy
    seed: int
    up: list[tuple[float, bytes]]
    """Every datagram that reached the gateway (time, bytes)."""
    down: list[tuple[float, bytes]]

    @property
    def client(self) -> ClientSession:
        return self.sim.client

    def gateway_down(self) -> None:
        """The gateway process is gone: nothing reaches it, nothing comes back."""
        for link in self.sim.links.values():
            link.imp.loss_up = link.imp.loss_down = 1.0

    def restart_gateway(self) -> GatewaySessions:
        """A new gateway process with the same key and clients and an empty memory store."""
        self.seed += 10
        self.sim.gateway = self._gateway(self.sim.now)
        for link in self.sim.links.values():
            link.imp.loss_up = link.imp.loss_down = 0.0
        return self.sim.gateway

    def _gateway(self, now: float) -> GatewaySessions:
        return GatewaySessions(
            static_private=self.gw_priv, clients=self.clients, policy=self.policy, now=now,
            urandom=random.Random(self.seed + 2).randbytes, rng=random.Random(self.seed + 3),
            inner_gateway6="fd00:66::1", inner_prefix6=64,
        )  # fmt: skip

    def events(self, kind: EventType) -> list:  # type: ignore[type-arg]
        return of_type(self.sim.client_events, kind)


def lab(policy: Policy | None = None, n_paths: int = 2, seed: int = 1) -> Lab:
    pol = policy or make_policy()
    gw_priv, gw_pub = generate_keypair()
    cl_priv, cl_pub = generate_keypair()
    clients = [ClientEntry("alice", cl_pub, CLIENT_INNER, inner_address6=CLIENT_INNER6)]
    client = ClientSession(
        static_private=cl_priv, gateway_public=gw_pub,
        paths=[PathSpec(i, f"path{i}") for i in range(1, n_paths + 1)], policy=pol, now=0.0,
        rng=random.Random(seed + 1),
    )  # fmt: skip
    rng = random.Random(seed)
    links = [MemoryLink(i, rng=rng, delay_s=0.010) for i in range(1, n_paths + 1)]
    up: list[tuple[float, bytes]] = []
    down: list[tuple[float, bytes]] = []
    out = Lab(None, gw_priv, clients, pol, seed, up, down)  # type: ignore[arg-type]
    sim = Simulation(client, out._gateway(0.0), links)
    sim.taps.append(lambda d: (up if d.to_gateway else down).append((sim.now, d.data)))
    out.sim = sim
    sim.start()
    sim.run_until(2.0)
    assert client.state is State.ATTACHED
    return out


def inner_packet_reaches_gateway(t: Lab) -> bool:
    before = len(t.sim.gateway_tun.from_tunnel)
    t.sim.client_tun.inject(ipv4_packet(CLIENT_INNER, GATEWAY_INNER, ident=7))
    t.sim.run_until(t.sim.now + 0.2)
    return len(t.sim.gateway_tun.from_tunnel) > before


# -- the gateway lost the session --------------------------------------------------------------


def test_restarted_gateway_without_state_gets_a_new_session_linked_to_the_old() -> None:
    t = lab()
    old = t.client.machine.session_id
    t.gateway_down()
    t.sim.run_until(3.0)
    assert t.client.state is State.RECOVERING
    gateway = t.restart_gateway()
    back = t.sim.now
    t.sim.run_until(back + 3.0)

    c = t.client
    assert c.state is not State.TERMINATED and c.machine.session_id != old
    (ended,) = t.events(EventType.SESSION_TERMINATED)
    assert (ended.session_id, ended.reason_code) == (old, Reason.GATEWAY_LOST_STATE)
    (linked,) = t.events(EventType.SESSION_LINKED)
    assert (linked.session_id, linked.previous_session_id) == (c.machine.session_id, old)
    assert linked.reason_code == Reason.GATEWAY_LOST_STATE
    assert (linked.inner_address, linked.inner_address6) == (CLIENT_INNER, CLIENT_INNER6)
    assert (c.inner_address, c.inner_address6) == (CLIENT_INNER, CLIENT_INNER6)
    # the old session's last event, then the link, then the new session's birth
    kinds = [e.event_type for e in t.sim.client_events]
    at = kinds.index(EventType.SESSION_TERMINATED)
    assert kinds[at + 1 : at + 5] == [
        EventType.SESSION_LINKED, EventType.STATE_CHANGE, EventType.SESSION_CREATED,
        EventType.TRANSPORT_ATTACHED,
    ]  # fmt: skip
    born = ("BIRTH", "ATTACHED", "attached_to_transport")
    assert state_changes(t.sim.client_events)[-1][:3] == born  # no trouble after
    # the gateway links them too, and the new session carries traffic
    gw_linked = of_type(t.sim.gateway_events, EventType.SESSION_LINKED)
    assert [e.previous_session_id for e in gw_linked] == [old]
    assert [v.session_id for v in gateway.session_views(t.sim.now)] == [c.machine.session_id]
    assert inner_packet_reaches_gateway(t)


def test_the_re_handshake_names_the_old_session_and_starts_only_after_silence() -> None:
    t = lab()
    old = bytes.fromhex(t.client.machine.session_id)
    for link in t.sim.links.values():
        link.imp.loss_down = 1.0  # the client hears nothing; what it sends is seen (``up``)
    t.sim.run_until(2.1)
    lost_at = t.sim.now
    t.sim.run_until(4.0)
    recovering = next(
        e.ts_ms for e in t.events(EventType.STATE_CHANGE) if e.new_state == "RECOVERING"
    )
    inits = [(at, d) for at, d in t.up if d[0] == MSG_HANDSHAKE_INIT and at > lost_at]
    assert inits, "no re-handshake while the gateway was silent"
    # two reattach intervals of silence after the recovery began
    first = inits[0][0] * 1000
    assert first >= recovering + 2 * t.policy.reattach_retry_ms - 1
    assert t.client.rescue.previous == old and t.client.rescue.armed


def test_a_path_failover_asks_nothing_of_the_gateway() -> None:
    """The active path dies, the other one answers: the recovery reattaches there and no
    INIT leaves (the gateway answers under the session's keys, so it knows the session)."""
    t = lab()
    t.sim.links[1].imp.loss_up = t.sim.links[1].imp.loss_down = 1.0
    t.sim.run_until(8.0)
    c = t.client
    assert c.state is State.ATTACHED and c.active == 2
    assert [s[1] for s in state_changes(t.sim.client_events)].count("RECOVERING") == 1
    assert not [d for at, d in t.up if d[0] == MSG_HANDSHAKE_INIT and at > 1.0]
    assert c.rescue.rounds == 0 and not t.events(EventType.SESSION_LINKED)


def test_policy_terminate_ends_with_gateway_lost_state_and_frees_the_new_gateway_session() -> None:
    t = lab(make_policy(lost_state="terminate"))
    old = t.client.machine.session_id
    t.gateway_down()
    t.sim.run_until(3.0)
    gateway = t.restart_gateway()
    t.sim.run_until(t.sim.now + 3.0)
    c = t.client
    assert c.state is State.TERMINATED and c.machine.session_id == old
    (ended,) = t.events(EventType.SESSION_TERMINATED)
    assert ended.reason_code == Reason.GATEWAY_LOST_STATE
    assert not t.events(EventType.SESSION_LINKED)
    code = exit_code_for("gateway_lost_state")
    assert code == 10 + reason_to_wire(Reason.GATEWAY_LOST_STATE) and code not in (0, 1, 2, 3)
    # the session the gateway created for the question was ended by the client at once
    views = gateway.session_views(t.sim.now)
    assert [v.state for v in views] == ["TERMINATED"]


def test_a_gateway_that_knows_the_session_does_not_answer_the_re_handshake() -> None:
    """The downlink fails long enough for the client to ask; the gateway still holds the
    session: it counts the INIT and keeps the session, whose reattach lands once the
    downlink works again. No new session, no link."""
    t = lab()
    sid = t.client.machine.session_id
    for link in t.sim.links.values():
        link.imp.loss_down = 1.0
    t.sim.run_until(4.0)
    assert any(d[0] == MSG_HANDSHAKE_INIT for at, d in t.up if at > 2.0)
    assert t.sim.gateway.drops.get(Drop.SESSION_STILL_LIVE, 0) >= 1
    assert not [d for at, d in t.down if d[0] == MSG_HANDSHAKE_RESP and at > 2.0]
    for link in t.sim.links.values():
        link.imp.loss_down = 0.0
    t.sim.run_until(7.0)
    c = t.client
    assert c.state is State.ATTACHED and c.machine.session_id == sid
    assert not t.events(EventType.SESSION_LINKED) and not t.events(EventType.SESSION_TERMINATED)
    assert not c.rescue.armed


def test_an_ended_session_named_by_the_re_handshake_is_refused_with_its_reason() -> None:
    """The operator ended the session at the gateway and its TERMINATE was lost: the
    re-handshake that names it gets the refusal with that reason, never a new session."""
    t = lab()
    for link in t.sim.links.values():
        link.imp.loss_down = 1.0
    assert t.sim.gateway.terminate(t.client.machine.session_id, t.sim.now)
    t.sim.run_until(2.6)
    for link in t.sim.links.values():
        link.imp.loss_down = 0.0
    t.sim.run_until(5.0)
    assert t.client.state is State.TERMINATED
    (ended,) = t.events(EventType.SESSION_TERMINATED)
    assert ended.reason_code == Reason.OPERATOR_TERMINATED
    assert not t.events(EventType.SESSION_LINKED)
    assert len(t.sim.gateway.session_views(t.sim.now)) == 1  # no second session


# -- the gateway shuts down --------------------------------------------------------------------


def test_gateway_shutdown_and_restart_gets_the_client_back_with_a_linked_session() -> None:
    t = lab()
    old = t.client.machine.session_id
    t.sim.gateway.terminate_all(t.sim.now, Reason.GATEWAY_SHUTDOWN)
    t.sim.run_until(2.05)  # the TERMINATEs arrive; then the process is gone
    t.gateway_down()
    t.sim.run_until(3.0)
    c = t.client
    assert c.state is State.RECOVERING and c.machine.session_id == old
    dead = t.events(EventType.TRANSPORT_DEAD)
    assert dead and dead[-1].reason_code == Reason.GATEWAY_SHUTDOWN
    t.restart_gateway()
    t.sim.run_until(t.sim.now + 3.0)
    assert c.state is not State.TERMINATED and c.machine.session_id != old
    (ended,) = t.events(EventType.SESSION_TERMINATED)
    assert (ended.session_id, ended.reason_code) == (old, Reason.GATEWAY_SHUTDOWN)
    (linked,) = t.events(EventType.SESSION_LINKED)
    assert linked.previous_session_id == old and linked.reason_code == Reason.GATEWAY_SHUTDOWN
    assert c.inner_address == CLIENT_INNER
    assert inner_packet_reaches_gateway(t)


def test_gateway_shutdown_without_restart_ends_with_gateway_shutdown_after_the_window() -> None:
    t = lab()
    t.sim.gateway.terminate_all(t.sim.now, Reason.GATEWAY_SHUTDOWN)
    t.sim.run_until(2.05)
    t.gateway_down()
    told = t.sim.now
    t.sim.run_until(told + t.policy.recovery_window_ms / 1000 + 1.0)
    assert t.client.state is State.TERMINATED
    (ended,) = t.events(EventType.SESSION_TERMINATED)
    assert ended.reason_code == Reason.GATEWAY_SHUTDOWN
    # the client kept asking for a new session while the window lasted
    assert t.client.rescue.rounds >= 2  # a new attempt after each handshake deadline
    code = exit_code_for("gateway_shutdown")
    assert code == 10 + reason_to_wire(Reason.GATEWAY_SHUTDOWN) and code != 0


def test_gateway_shutdown_with_policy_terminate_ends_at_once() -> None:
    t = lab(make_policy(lost_state="terminate"))
    t.sim.gateway.terminate_all(t.sim.now, Reason.GATEWAY_SHUTDOWN)
    t.sim.run_until(2.1)
    assert t.client.state is State.TERMINATED
    (ended,) = t.events(EventType.SESSION_TERMINATED)
    assert (ended.reason_code, ended.initiator) == (Reason.GATEWAY_SHUTDOWN, "peer")
    assert not [d for at, d in t.up if d[0] == MSG_HANDSHAKE_INIT and at > 2.0]


# -- nothing forged or replayed ends, replaces or re-keys a live session -------------------------


def test_replayed_and_forged_datagrams_do_not_end_or_re_key_a_live_session() -> None:
    t = lab()
    c, sim = t.client, t.sim
    sid, index, phase = c.machine.session_id, c.index, c.keys.cipher.phase  # type: ignore[union-attr]
    sim.run_until(3.0)
    # everything the gateway ever sent, replayed; forged datagrams for the client's index;
    # the gateway's handshake answer replayed
    for _at, data in list(t.down):
        sim.inject_to_client(data, 1)
    forged = bytes([4, 0, 0, 0]) + index.to_bytes(4, "little") + bytes(80)
    for _ in range(20):
        sim.inject_to_client(forged, 2)
    sim.run_until(4.0)
    assert c.state is State.ATTACHED and c.machine.session_id == sid and c.index == index
    assert c.keys.cipher is not None and c.keys.cipher.phase == phase
    assert not c.rescue.armed
    assert not t.events(EventType.SESSION_TERMINATED) and not t.events(EventType.SESSION_LINKED)


def test_a_replayed_re_handshake_does_not_replace_the_new_session() -> None:
    t = lab()
    t.gateway_down()
    t.sim.run_until(3.0)
    gateway = t.restart_gateway()
    back = t.sim.now
    t.sim.run_until(back + 3.0)
    c = t.client
    new_sid = c.machine.session_id
    inits = [d for at, d in t.up if d[0] == MSG_HANDSHAKE_INIT and at >= back]
    assert inits
    src = t.sim.links[1].client_addr
    for data in inits:
        t.sim.inject_to_gateway(data, src)
    t.sim.run_until(t.sim.now + 2.0)
    assert c.state is not State.TERMINATED and c.machine.session_id == new_sid
    views = gateway.session_views(t.sim.now)
    assert [(v.session_id, v.state) for v in views if v.state != "TERMINATED"] == [
        (new_sid, views[0].state)
    ]
    assert len(views) == 1
    assert gateway.drops.get(Drop.REPLAY, 0) >= len(inits)


def test_a_replayed_shutdown_of_the_old_session_does_not_end_the_new_one() -> None:
    t = lab()
    before = len(t.down)
    t.sim.gateway.terminate_all(t.sim.now, Reason.GATEWAY_SHUTDOWN)
    t.sim.run_until(2.05)
    terminates = [d for _, d in t.down[before:]]
    assert terminates
    t.gateway_down()
    t.sim.run_until(3.0)
    t.restart_gateway()
    t.sim.run_until(t.sim.now + 3.0)
    c = t.client
    sid = c.machine.session_id
    assert t.events(EventType.SESSION_LINKED)
    for data in terminates:
        t.sim.inject_to_client(data, 1)
    t.sim.run_until(t.sim.now + 1.0)
    assert c.state is not State.TERMINATED and c.machine.session_id == sid
    assert len(t.events(EventType.SESSION_LINKED)) == 1


# -- the INIT payload --------------------------------------------------------------------------


@pytest.mark.parametrize("previous", [b"", bytes(range(SESSION_ID_LEN))])
def test_init_payload_round_trips_the_previous_session(previous: bytes) -> None:
    p = InitPayload(1, 123456789, 2, previous)
    assert InitPayload.parse(p.pack()) == p


def test_init_payload_skips_unknown_extensions_and_refuses_broken_ones() -> None:
    base = InitPayload(1, 5, 1).pack()
    assert InitPayload.parse(base + bytes([9, 2, 0xAA, 0xBB])) == InitPayload(1, 5, 1)
    assert InitPayload.parse(base + bytes([1, 3, 1, 2, 3])) is Drop.MALFORMED  # wrong length
    # cut off by the end of the payload: truncated, as in message 2 (docs/wire-format.md)
    assert InitPayload.parse(base + bytes([1, 16, 1])) is Drop.TRUNCATED
    assert InitPayload.parse(base + bytes([1])) is Drop.TRUNCATED
    assert InitPayload.parse(base[:-1]) is Drop.MALFORMED
