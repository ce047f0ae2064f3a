"""The reuseport steering program, with real sockets on loopback (issue 11, item 3).

docs/gateway.md "Workers": DATA and CONTROL go to worker ``low byte of the receiver
index % N``, a HANDSHAKE_INIT to ``low byte of the sender index % N``, a datagram shorter
than 12 bytes to worker 0.
"""

from __future__ import annotations

import random
import select
import socket
import struct
import time

import pytest

from tests.crowd import Crowd
from tunnel.core.constants import MSG_CONTROL, MSG_DATA, MSG_HANDSHAKE_INIT
from tunnel.core.events import Reason
from tunnel.core.gateway import GatewaySessions
from tunnel.core.gateway_session import ClientEntry
from tunnel.core.handshake import generate_keypair
from tunnel.core.policy import POLICY_DEFAULT
from tunnel.core.rescue import LostStateRescue
from tunnel.io.reuseport import MAX_WORKERS, ReuseportGroup, steering_program
from tunnel.io.udp import GatewaySocket, PathError

TRANSPORT = struct.Struct("<BBxxIQ")


def transport(msg_type: int, receiver_index: int, counter: int = 0) -> bytes:
    return TRANSPORT.pack(msg_type, 0, receiver_index, counter) + bytes(32)


def init(sender_index: int) -> bytes:
    return struct.pack("<BBxxII", MSG_HANDSHAKE_INIT, 0, 0, sender_index) + bytes(128)


def collect(group: ReuseportGroup, expected: int, bound_s: float = 10.0) -> list[list[bytes]]:
    """Every datagram each socket of the group received, until ``expected`` arrived."""
    got: list[list[bytes]] = [[] for _ in group.sockets]
    deadline = time.monotonic() + bound_s
    while sum(map(len, got)) < expected and time.monotonic() < deadline:
        ready, _, _ = select.select(group.sockets, [], [], 0.2)
        for sock in ready:
            i = group.sockets.index(sock)
            got[i].extend(data for data, _ in sock.recv_batch())
    return got


@pytest.fixture
def sender() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    yield s
    s.close()


@pytest.mark.parametrize("workers", [2, 3])
def test_each_receiver_index_lands_on_its_worker_every_time(
    workers: int, sender: socket.socket
) -> None:
    group = ReuseportGroup(("127.0.0.1", 0), workers)
    try:
        rng = random.Random(7)
        indexes = [rng.getrandbits(32) or 1 for _ in range(40)]
        sent = 0
        for rep in range(3):  # the same index again: the same socket
            for index in indexes:
                kind = MSG_DATA if rep != 1 else MSG_CONTROL
                sender.sendto(transport(kind, index, rep), group.local_address)
                sent += 1
        got = collect(group, sent)
        assert sum(map(len, got)) == sent
        for worker, datagrams in enumerate(got):
            for data in datagrams:
                index = struct.unpack_from("<I", data, 4)[0]
                assert (index & 0xFF) % workers == worker, (hex(index), worker)
        # every worker got some (40 random indexes over 2 or 3 workers)
        assert all(got)
    finally:
        group.close()


def test_inits_follow_the_sender_index_and_short_datagrams_go_to_worker_0(
    sender: socket.socket,
) -> None:
    group = ReuseportGroup(("127.0.0.1", 0), 3)
    try:
        senders = [0x100, 0x201, 0x302, 0x4FF, 0xABCDEF05]
        for sender_index in senders:
            sender.sendto(init(sender_index), group.local_address)
        shorts = [b"", b"\x03", b"\x03\x00\x00\x00\x01\x00\x00\x00", bytes(11)]
        for data in shorts:
            sender.sendto(data, group.local_address)
        got = collect(group, len(senders) + len(shorts))
        inits = {struct.unpack_from("<I", d, 8)[0]: w for w, ds in enumerate(got) for d in ds
                 if len(d) >= 12}  # fmt: skip
        assert inits == {s: (s & 0xFF) % 3 for s in senders}
        assert sorted(d for d in got[0] if len(d) < 12) == sorted(shorts)
        assert not any(len(d) < 12 for ds in got[1:] for d in ds)
    finally:
        group.close()


def test_a_closed_slot_moves_no_other_socket_while_the_group_holds_it(
    sender: socket.socket,
) -> None:
    """The group keeps every socket: a worker that stops reading loses only its own."""
    group = ReuseportGroup(("127.0.0.1", 0), 3)
    try:
        # worker 1 "dies": nobody reads socket 1, but the group still holds it
        for index in (0x00, 0x01, 0x02, 0x03, 0x04, 0x05):
            sender.sendto(transport(MSG_DATA, index | 0x100), group.local_address)
        got = collect(group, 6)
        assert [len(g) for g in got] == [2, 2, 2]
    finally:
        group.close()


def test_the_port_is_shared_only_within_the_group() -> None:
    group = ReuseportGroup(("127.0.0.1", 0), 2)
    try:
        with pytest.raises(PathError):
            GatewaySocket(group.local_address)  # no SO_REUSEPORT: the port is in use
    finally:
        group.close()


def test_worker_counts_are_checked() -> None:
    with pytest.raises(ValueError):
        steering_program(0)
    with pytest.raises(ValueError):
        steering_program(MAX_WORKERS + 1)
    assert len(steering_program(1)) == 10


def attached_crowd(stripe: tuple[int, int], n: int = 24) -> Crowd:
    gw_priv, gw_pub = generate_keypair()
    keys = [generate_keypair() for _ in range(n)]
    clients = [ClientEntry(f"c{i}", pub, f"10.66.0.{i + 2}") for i, (_, pub) in enumerate(keys)]
    gateway = GatewaySessions(
        static_private=gw_priv, clients=clients, policy=POLICY_DEFAULT, now=0.0,
        urandom=random.Random(3).randbytes, rng=random.Random(3), index_stripe=stripe,
    )  # fmt: skip
    crowd = Crowd(gateway)
    for i, (priv, _) in enumerate(keys):
        crowd.connect(crowd.add(f"c{i}", priv, gw_pub, POLICY_DEFAULT, seed=100 + i))
    assert all(m.attached_at is not None for m in crowd.members)
    return crowd


@pytest.mark.parametrize("stripe", [(0, 2), (1, 2), (2, 3)])
def test_a_worker_allocates_receiver_indexes_that_steer_back_to_it(
    stripe: tuple[int, int],
) -> None:
    """What the clients put in their DATA and CONTROL headers (the gateway's receiver
    index) has the low byte the worker's socket is steered by."""
    crowd = attached_crowd(stripe)
    worker, workers = stripe
    indexes = {m.session.peer_index for m in crowd.members}
    assert len(indexes) == len(crowd.members) and set(crowd.gateway.sessions) == indexes
    assert all((index & 0xFF) % workers == worker for index in indexes)


def test_an_index_stripe_outside_the_workers_is_refused() -> None:
    for stripe in [(2, 2), (-1, 2), (0, 257), (0, 0)]:
        with pytest.raises(ValueError):
            attached_crowd(stripe, n=0)


@pytest.mark.parametrize("peer_index", [0x1234AB00, 0x1234AB01, 0xFFFFFFFF, 0x102])
def test_a_rescue_handshake_is_steered_to_the_worker_of_the_lost_session(
    peer_index: int,
) -> None:
    """The re-handshake naming a lost session (tunnel/core/rescue.py) reaches the worker
    its old receiver index named, with every new attempt: only that worker can know
    whether the session still lives."""
    client_priv, _ = generate_keypair()
    _, gw_pub = generate_keypair()
    rescue = LostStateRescue(client_priv, gw_pub, [1], random.Random(5))
    rescue.arm(Reason.GATEWAY_LOST_STATE, bytes(16), 0.0, peer_index)
    now, inits = 0.0, []
    while len(inits) < 12 and now < 600:
        out = rescue.on_timer(now, POLICY_DEFAULT, int(now * 1000))
        if out is not None:
            inits.append(out[1])
        now = rescue.next_deadline() or now + 1.0
    assert len(inits) == 12 and rescue.rounds >= 2  # new attempts, new indexes
    assert len({struct.unpack_from("<I", d, 8)[0] for d in inits}) >= 2
    for workers in (2, 3, 7):
        data = transport(MSG_DATA, peer_index)
        assert {(d[8] % workers) for d in inits} == {data[4] % workers}
