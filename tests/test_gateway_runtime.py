"""The gateway runtime over loopback UDP (level 3): real sockets, echo inner side, no root.

A real ``ClientSession`` is driven by a small select loop in the test (``LoopbackClient``)
against an embedded gateway (``start_in_thread``): handshake, inner echo replies, policy
reload (AT-43/44/45), the ownership store mirror and its CAS failure path (D15), and an
orderly stop that tells the client.
"""

from __future__ import annotations

import dataclasses
import random
import select
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tunnel.core.client import ClientSession, PathSpec
from tunnel.core.events import Event, EventType, PolicyEvent, Reason, SecurityEvent, StateChange
from tunnel.core.gateway_session import ClientEntry
from tunnel.core.handshake import generate_keypair
from tunnel.core.policy import POLICY_DEFAULT, Policy, policy_to_toml
from tunnel.core.session import State
from tunnel.gateway.inner import echo_response, inet_checksum
from tunnel.gateway.thread import GatewayThread, start_in_thread
from tunnel.io.udp import PathSocket
from tunnel.ownership import MemorySessionStore, SessionRecord

GATEWAY_INNER = "10.66.0.1"


# -- inner packets ---------------------------------------------------------------------------


def _ip(text: str) -> bytes:
    return bytes(int(x) for x in text.split("."))


def ipv4(src: str, dst: str, proto: int, payload: bytes, ident: int = 1) -> bytes:
    header = bytearray(
        struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0, 64, proto, 0,
                    _ip(src), _ip(dst))
    )  # fmt: skip
    header[10:12] = inet_checksum(header).to_bytes(2, "big")
    return bytes(header) + payload


def icmp_echo(src: str, dst: str, seq: int, data: bytes = b"jvpn-echo") -> bytes:
    body = bytearray(struct.pack("!BBHHH", 8, 0, 0, 0x1234, seq) + data)
    body[2:4] = inet_checksum(body).to_bytes(2, "big")
    return ipv4(src, dst, 1, bytes(body))


def udp(src: str, dst: str, sport: int, dport: int, data: bytes) -> bytes:
    return ipv4(src, dst, 17, struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data)


# -- a client driven by a select loop --------------------------------------------------------


class LoopbackClient:
    """A ClientSession on loopback PathSockets, stepped by ``run_until`` in the test thread."""

    def __init__(
        self,
        gateway: tuple[str, int],
        gateway_public: bytes,
        private: bytes,
        *,
        n_paths: int = 1,
        policy: Policy = POLICY_DEFAULT,
    ) -> None:
        self.gateway = gateway
        self.socks = {pid: PathSocket(pid, ("127.0.0.1", 0)) for pid in range(1, n_paths + 1)}
        now = time.monotonic()
        self.session = ClientSession(
            static_private=private, gateway_public=gateway_public,
            paths=[PathSpec(pid, f"lo{pid}") for pid in self.socks], policy=policy, now=now,
            rng=random.Random(7), wall_offset=time.time() - now,
        )  # fmt: skip
        self.events: list[Event] = []
        self.inner: list[bytes] = []
        self.session.connect(now)
        self._pump()

    def _pump(self) -> None:
        for pid, data in self.session.datagrams_to_send():
            self.socks[pid].send(data, self.gateway)
        self.inner.extend(self.session.packets_for_tun())
        self.events.extend(self.session.events())

    def step(self, max_wait: float = 0.02) -> None:
        deadline = self.session.next_deadline()
        wait = max_wait if deadline is None else min(max_wait, deadline - time.monotonic())
        ready, _, _ = select.select(list(self.socks.values()), [], [], max(0.0, wait))
        now = time.monotonic()
        for sock in ready:
            for data, _addr in sock.recv_batch():
                self.session.receive_datagram(data, sock.path_id, now)
        deadline = self.session.next_deadline()
        if deadline is not None and deadline <= now:
            self.session.handle_timer(now)
        self._pump()

    def run_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return True
            self.step()
        return predicate()

    def command(self, fn: Callable[[ClientSession, float], object]) -> None:
        fn(self.session, time.monotonic())
        self._pump()

    def send_inner(self, packet: bytes) -> None:
        self.session.receive_tun_packet(packet, time.monotonic())
        self._pump()

    @property
    def state(self) -> State:
        return self.session.state

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close()


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


class Setup:
    """Keys, one allowed client, an embedded gateway and the events it emitted."""

    def __init__(self, **gateway_kwargs: object) -> None:
        self.gw_priv, self.gw_pub = generate_keypair()
        self.cl_priv, self.cl_pub = generate_keypair()
        self.other_priv, self.other_pub = generate_keypair()
        self.events: list[Event] = []
        self.store = MemorySessionStore()
        clients = [
            ClientEntry("alice", self.cl_pub, "10.66.0.2"),
            ClientEntry("bob", self.other_pub, "10.66.0.3"),
        ]
        kwargs: dict[str, object] = {"store": self.store, "on_event": self.events.append}
        kwargs.update(gateway_kwargs)
        self.gateway: GatewayThread = start_in_thread(
            static_private=self.gw_priv, clients=clients, node_id="gw-test", **kwargs
        )
        self.clients: list[LoopbackClient] = []

    def client(
        self, *, other: bool = False, n_paths: int = 1, policy: Policy = POLICY_DEFAULT
    ) -> LoopbackClient:
        priv = self.other_priv if other else self.cl_priv
        c = LoopbackClient(self.gateway.address, self.gw_pub, priv, n_paths=n_paths, policy=policy)
        self.clients.append(c)
        return c

    def of_type(self, kind: EventType) -> list[Event]:
        return [e for e in list(self.events) if e.event_type == kind]

    def close(self) -> None:
        self.gateway.stop()
        for c in self.clients:
            c.close()


@pytest.fixture
def setup() -> Iterator[Callable[..., Setup]]:
    made: list[Setup] = []

    def make(**kwargs: object) -> Setup:
        s = Setup(**kwargs)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def attached(c: LoopbackClient) -> Callable[[], bool]:
    return lambda: c.state is State.ATTACHED


def echo_replies(c: LoopbackClient) -> list[bytes]:
    return [p for p in c.inner if p[9] == 1 and p[20] == 0]


# -- tests -----------------------------------------------------------------------------------


def test_echo_response_answers_icmp_and_udp_for_the_gateway_only() -> None:
    gw = _ip(GATEWAY_INNER)
    request = icmp_echo("10.66.0.2", GATEWAY_INNER, seq=5)
    reply = echo_response(request, gw)
    assert isinstance(reply, bytes)
    assert reply[12:16] == gw and reply[16:20] == _ip("10.66.0.2")
    assert reply[20] == 0 and reply[24:] == request[24:]  # echo reply, same id/seq/data
    assert inet_checksum(reply[20:]) == 0 and inet_checksum(reply[:20]) == 0
    datagram = udp("10.66.0.2", GATEWAY_INNER, 4000, 7, b"hello")
    back = echo_response(datagram, gw)
    assert isinstance(back, bytes)
    assert struct.unpack("!HH", back[20:24]) == (7, 4000) and back[28:] == b"hello"
    assert echo_response(icmp_echo("10.66.0.2", "10.66.0.9", 1), gw) == "not_for_gateway"
    assert echo_response(b"\x60" + bytes(47), gw) == "not_ipv4"
    assert echo_response(request[:10], gw) == "not_ipv4"
    assert echo_response(ipv4("10.66.0.2", GATEWAY_INNER, 6, bytes(20)), gw) == (
        "unsupported_protocol"
    )


def test_handshake_echo_replies_and_store_record_over_loopback(
    setup: Callable[..., Setup],
) -> None:
    s = setup()
    c = s.client()
    assert c.run_until(attached(c))
    assert c.session.inner_address == "10.66.0.2"
    assert c.session.inner_gateway == GATEWAY_INNER

    for seq in range(3):
        c.send_inner(icmp_echo("10.66.0.2", GATEWAY_INNER, seq))
    assert c.run_until(lambda: len(echo_replies(c)) == 3)
    assert sorted(struct.unpack("!H", p[26:28])[0] for p in echo_replies(c)) == [0, 1, 2]
    c.send_inner(udp("10.66.0.2", GATEWAY_INNER, 40000, 9, b"ping"))
    assert c.run_until(lambda: any(p[9] == 17 for p in c.inner))
    assert next(p for p in c.inner if p[9] == 17)[28:] == b"ping"

    sid = c.session.machine.session_id
    record = s.store.get(sid)
    view = next(v for v in s.gateway.sessions() if v.session_id == sid)
    assert record == SessionRecord(
        session_id=sid, state="ATTACHED", state_version=view.state_version,
        binding_epoch=view.binding_epoch, owner_node="gw-test",
        policy_version=POLICY_DEFAULT.policy_version, updated_ms=record.updated_ms,
    )  # fmt: skip
    assert abs(record.updated_ms - time.time() * 1000) < 60_000  # wall-clock ms
    health = s.gateway.health()
    assert (health.policy_ok, health.sessions, health.crashed) == (True, 1, None)


def test_switch_is_mirrored_into_the_store_with_cas(setup: Callable[..., Setup]) -> None:
    s = setup()
    c = s.client(n_paths=2)
    assert c.run_until(attached(c))
    sid = c.session.machine.session_id
    before = s.store.get(sid)
    assert before is not None
    assert c.run_until(lambda: c.session.snapshot(time.monotonic()).paths[1].validated)
    c.command(lambda session, now: session.switch_to(2, now))
    assert c.run_until(lambda: c.session.active == 2 and c.session.epoch > before.binding_epoch)
    assert wait_for(lambda: (r := s.store.get(sid)) is not None and r.state_version > 1)
    after = s.store.get(sid)
    assert after is not None
    assert after.state_version == before.state_version + 1
    assert after.binding_epoch == before.binding_epoch + 1 == c.session.epoch
    changes = [e for e in s.events if isinstance(e, StateChange) and e.session_id == sid]
    assert [e.state_version for e in changes] == [1, 2]


def test_cas_failure_terminates_the_session_as_not_authoritative(
    setup: Callable[..., Setup],
) -> None:
    s = setup()
    c = s.client(n_paths=2)
    assert c.run_until(attached(c))
    sid = c.session.machine.session_id
    mine = s.store.get(sid)
    assert mine is not None
    # Another node takes the session over in the shared store.
    theirs = mine.evolve(state_version=mine.state_version + 1, owner_node="gw-other")
    assert s.store.cas(sid, mine.state_version, theirs)
    assert c.run_until(lambda: c.session.snapshot(time.monotonic()).paths[1].validated)
    c.command(lambda session, now: session.switch_to(2, now))  # the next committed change
    assert c.run_until(lambda: c.state is State.TERMINATED)
    terminated = [e for e in c.events if e.event_type == EventType.SESSION_TERMINATED]
    assert terminated[-1].to_dict()["reason_code"] == Reason.OWNERSHIP_CONFLICT
    # the REATTACH_ACK of the refused transition never left: the client did not switch
    assert [e for e in c.events if e.event_type == EventType.TRANSPORT_SWITCH] == []
    assert wait_for(lambda: bool(s.of_type(EventType.SECURITY_EVENT)))
    security = [e for e in s.of_type(EventType.SECURITY_EVENT) if isinstance(e, SecurityEvent)]
    assert [e.violation_type for e in security] == ["OWNERSHIP_CONFLICT"]
    assert security[0].session_id == sid
    assert s.store.get(sid) == theirs  # the loser never wrote again
    gw_term = s.of_type(EventType.SESSION_TERMINATED)
    assert gw_term[-1].to_dict()["reason_code"] == "ownership_conflict"


def write_policy(path: Path, policy: Policy) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(policy_to_toml(policy))
    tmp.replace(path)


def test_at44_invalid_policy_reload_keeps_sessions_and_denies_new_ones(
    setup: Callable[..., Setup], tmp_path: Path
) -> None:
    policy_file = tmp_path / "policy.toml"
    v1 = POLICY_DEFAULT
    write_policy(policy_file, v1)
    s = setup(policy_path=policy_file, policy_poll_s=0.1)
    alice = s.client()
    assert alice.run_until(attached(alice))

    text = policy_to_toml(v1)
    assert "max_lifetime_ms = 28800000" in text
    policy_file.write_text(text.replace("max_lifetime_ms = 28800000", "max_lifetime_ms = -5"))
    assert s.gateway.reload_policy() is False
    health = s.gateway.health()
    assert not health.policy_ok and health.policy_version == v1.policy_version
    assert health.policy_error is not None and "max_lifetime_ms" in health.policy_error
    invalid = [e for e in s.of_type(EventType.POLICY_EVENT) if isinstance(e, PolicyEvent)]
    assert invalid[-1].policy_name == "POLICY_INVALID"

    # The running session keeps working under v1 ...
    alice.send_inner(icmp_echo("10.66.0.2", GATEWAY_INNER, 1))
    assert alice.run_until(lambda: len(echo_replies(alice)) == 1)
    assert alice.state is State.ATTACHED
    assert s.gateway.sessions()[0].policy_version == v1.policy_version
    # ... a new one is denied, with the reason.
    bob = s.client(other=True)
    assert bob.run_until(lambda: bob.state is State.TERMINATED)
    ended = [e for e in bob.events if e.event_type == EventType.SESSION_TERMINATED]
    assert ended[-1].to_dict()["reason_code"] == "policy_denied"
    denied = [e for e in s.of_type(EventType.POLICY_EVENT) if isinstance(e, PolicyEvent)]
    assert denied[-1].policy_name == "SESSION_DENIED"

    # AT-45: a valid file is picked up by the change poll; new sessions are allowed again.
    v2 = Policy(version="2.0")
    write_policy(policy_file, v2)
    assert wait_for(lambda: s.gateway.health().policy_ok)
    assert s.gateway.health().policy_version == v2.policy_version
    carol = s.client(other=True)
    assert carol.run_until(attached(carol))
    views = {v.client: v.policy_version for v in s.gateway.sessions() if v.state == "ATTACHED"}
    assert views == {"alice": v2.policy_version, "bob": v2.policy_version}


def test_at43_invalid_policy_at_start_denies_sessions_and_says_why(
    setup: Callable[..., Setup], tmp_path: Path
) -> None:
    s = setup(policy=None, policy_error="policy.toml: session.max_lifetime_ms missing")
    assert wait_for(lambda: bool(s.of_type(EventType.POLICY_EVENT)))
    first = s.of_type(EventType.POLICY_EVENT)[0]
    assert isinstance(first, PolicyEvent) and first.policy_name == "POLICY_INVALID"
    assert "max_lifetime_ms" in first.detail
    c = s.client()
    assert c.run_until(lambda: c.state is State.TERMINATED)
    assert not s.gateway.health().policy_ok
    assert len(s.store) == 0


def test_stop_terminates_sessions_tells_clients_and_clears_the_store(
    setup: Callable[..., Setup],
) -> None:
    s = setup()
    # lost_state = "terminate": the client ends at the TERMINATE (docs/client.md)
    c = s.client(policy=dataclasses.replace(POLICY_DEFAULT, lost_state="terminate"))
    assert c.run_until(attached(c))
    assert len(s.store) == 1
    s.gateway.stop()
    assert not s.gateway.alive
    assert c.run_until(lambda: c.state is State.TERMINATED)
    ended = [e for e in c.events if e.event_type == EventType.SESSION_TERMINATED]
    # the memory store keeps nothing: the clients are told the gateway went (D15c)
    assert ended[-1].to_dict()["reason_code"] == "gateway_shutdown"
    assert len(s.store) == 0
    assert s.gateway.error is None


def test_port_in_use_is_reported_by_start(setup: Callable[..., Setup]) -> None:
    s = setup()
    from tunnel.io.udp import PathError

    with pytest.raises(PathError, match="in use"):
        start_in_thread(
            static_private=s.gw_priv, clients=[], listen=[("127.0.0.1", s.gateway.address[1])]
        )


class BrokenStore(MemorySessionStore):
    """A store implementation with a bug: its create() raises."""

    def create(self, record: SessionRecord) -> bool:
        raise RuntimeError("store bug")


def test_engine_failure_terminates_sessions_with_a_reason_and_stops(
    setup: Callable[..., Setup],
) -> None:
    s = setup(store=BrokenStore())
    c = s.client()
    assert c.run_until(lambda: c.state is State.TERMINATED)
    ended = [e for e in c.events if e.event_type == EventType.SESSION_TERMINATED]
    assert ended[-1].to_dict()["reason_code"] == "invariant_violation"
    assert wait_for(lambda: not s.gateway.alive)
    assert isinstance(s.gateway.error, RuntimeError) and str(s.gateway.error) == "store bug"
