"""UDP path sockets over loopback (tunnel/io/udp.py): exchange, draining, error counting."""

from __future__ import annotations

import errno
import os
import select
import socket
import time

import pytest

from tunnel.io.udp import GatewaySocket, PathError, PathSocket, UdpFeatures


def recv_n(sock: PathSocket, n: int, timeout: float = 2.0) -> list[tuple[bytes, tuple]]:
    """Collect ``n`` datagrams from ``sock`` (select + recv_batch), or fail after timeout."""
    got: list[tuple[bytes, tuple]] = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"received {len(got)} of {n} datagrams"
        select.select([sock], [], [], remaining)
        got += sock.recv_batch()
    return got


def wait_for_error_report(sock: PathSocket, timeout: float = 2.0) -> None:
    """Block until the kernel has queued an error (ICMP) report on ``sock``."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLERR)
    assert poller.poll(timeout * 1000), "no ICMP error arrived"


@pytest.fixture
def pair():
    with PathSocket(1, ("127.0.0.1", 0)) as a, PathSocket(2, ("127.0.0.1", 0)) as b:
        yield a, b


def closed_port(host: str = "127.0.0.1") -> tuple[str, int]:
    """A loopback address nobody listens on (bound, then released)."""
    with PathSocket(99, (host, 0)) as s:
        return s.local_address[:2]


def test_two_path_sockets_exchange_datagrams(pair) -> None:
    a, b = pair

    assert a.send(b"ping", b.local_address) is True
    [(data, source)] = recv_n(b, 1)
    assert (data, source) == (b"ping", a.local_address)

    assert b.send(b"pong", source) is True
    assert recv_n(a, 1) == [(b"pong", b.local_address)]
    assert (a.sent, a.received, b.sent, b.received) == (1, 1, 1, 1)
    assert not a.errors and not b.errors


def test_recv_batch_drains_until_empty_and_respects_max_n(pair) -> None:
    a, b = pair
    payloads = [f"datagram-{i}".encode() for i in range(150)]
    assert a.send_batch((p, b.local_address) for p in payloads) == 150
    assert a.sent == 150
    select.select([b], [], [], 2.0)
    time.sleep(0.05)  # loopback delivers synchronously; let the last ones land

    first = b.recv_batch(max_n=64)
    assert len(first) == 64
    rest = b.recv_batch(max_n=1000)
    assert [d for d, _ in first + rest] == payloads
    assert b.recv_batch() == []  # drained: would block, returns nothing
    assert b.received == 150


def test_send_to_closed_port_counts_errors_and_never_raises(pair) -> None:
    a, b = pair
    dead = closed_port()

    assert a.send(b"hello?", dead) is True  # the kernel took it; the ICMP comes later
    wait_for_error_report(a)

    # the port-unreachable surfaces on the next send (that datagram is lost) ...
    assert a.send(b"to b", b.local_address) is False
    assert a.send_errors == {"ECONNREFUSED": 1}
    # ... and the queued ICMP report is read and counted by the next receive
    assert a.recv_batch() == []
    assert a.icmp_errors == {"ECONNREFUSED": 1}
    assert a.last_icmp is not None and a.last_icmp.address == dead
    assert a.errors == {"ECONNREFUSED": 2}

    # the path works again afterwards
    assert a.send(b"to b again", b.local_address) is True
    assert recv_n(b, 1)[0][0] == b"to b again"


def test_error_report_is_counted_by_receive_alone(pair) -> None:
    a, _ = pair
    a.send(b"x", closed_port())
    wait_for_error_report(a)

    assert a.recv_batch() == []
    assert a.icmp_errors == {"ECONNREFUSED": 1}
    assert a.send_errors == {}
    assert a.drain_errors() == 0  # queue already empty: no busy loop on POLLERR


def test_gateway_socket_is_not_disturbed_by_one_unreachable_client() -> None:
    with GatewaySocket(("127.0.0.1", 0)) as gw, PathSocket(1, ("127.0.0.1", 0)) as client:
        assert gw.send(b"to a client that left", closed_port()) is True
        time.sleep(0.05)
        assert gw.send(b"to a live client", client.local_address) is True
        assert recv_n(client, 1)[0][0] == b"to a live client"
        assert not gw.errors


def test_send_batch_counts_every_refused_datagram(pair) -> None:
    a, b = pair
    with PathSocket(3, ("127.0.0.1", 0)) as c:
        items = [(b"1", b.local_address), (b"2", ("127.0.0.1", 0)), (b"3", c.local_address)]
        assert a.send_batch(items) == 2  # port 0 is refused by the kernel (EINVAL)
    assert a.send_errors == {"EINVAL": 1}
    assert a.sent == 2


def test_bind_to_port_in_use_names_the_address(pair) -> None:
    _, b = pair
    port = b.local_address[1]
    with pytest.raises(PathError) as info:
        PathSocket(7, ("127.0.0.1", port))
    assert str(info.value) == f"cannot bind UDP 127.0.0.1:{port}: address already in use"
    assert info.value.errno == errno.EADDRINUSE


def test_bind_to_missing_device_raises_path_error() -> None:
    with pytest.raises(PathError, match=r"device 'jvnodev0': no such device") as info:
        PathSocket(7, ("127.0.0.1", 0), device="jvnodev0")
    assert info.value.errno == errno.ENODEV


@pytest.mark.parametrize(
    ("local", "message"),
    [
        (("gateway.example", 0), "cannot bind UDP gateway.example:0: not a numeric IP address"),
        (("192.0.2.77", 0), "cannot bind UDP 192.0.2.77:0: cannot assign requested address"),
    ],
)
def test_bad_local_address_raises_path_error(local, message) -> None:
    with pytest.raises(PathError) as info:
        PathSocket(7, local)
    assert str(info.value) == message


def test_closed_socket_is_misuse(pair) -> None:
    a, b = pair
    a.close()
    a.close()  # idempotent
    assert a.closed and a.fileno() == -1
    with pytest.raises(ValueError, match="closed"):
        a.send(b"x", b.local_address)
    with pytest.raises(ValueError, match="closed"):
        a.recv_batch()


def test_address_of_the_wrong_family_is_misuse(pair) -> None:
    a, _ = pair
    with pytest.raises(ValueError, match="AF_INET"):
        a.send(b"x", ("::1", 9))


def ipv6_loopback_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback (::1) here")
def test_ipv6_loopback_works() -> None:
    with PathSocket(1, ("::1", 0)) as a, PathSocket(2, family=socket.AF_INET6) as b:
        assert a.family == socket.AF_INET6 and b.local_address[0] == "::"
        assert a.send(b"six", ("::1", b.local_address[1])) is True
        [(data, source)] = recv_n(b, 1)
        assert data == b"six" and source[:2] == a.local_address[:2]


def test_burst_of_64_kib_arrives_intact(pair) -> None:
    a, b = pair
    sizes = [1, 1400, 8192, 65507] + [1024] * 60  # includes the largest IPv4 UDP payload
    payloads = [os.urandom(n) for n in sizes]
    assert sum(sizes) > 64 * 1024

    assert a.send_batch((p, b.local_address) for p in payloads) == len(payloads)
    got = recv_n(b, len(payloads))

    assert [d for d, _ in got] == payloads
    assert all(src == a.local_address for _, src in got)


def test_socket_options_and_features_are_reported(pair) -> None:
    a, _ = pair
    rcv, snd = a.buffer_sizes
    assert rcv >= 2 * 212992 and snd >= 2 * 212992  # at least the usual sysctl cap, doubled
    assert isinstance(a.features, UdpFeatures)
    with PathSocket(5) as other:
        assert a.features == other.features  # a property of the kernel, probed per socket


# -- UDP GSO / GRO (send_many, coalesced reads) ---------------------------------------------


def test_send_many_delivers_every_datagram_in_order_as_single_datagrams(pair) -> None:
    a, b = pair
    # Equal-sized runs with a shorter tail, a size change, and more than one GSO send's worth.
    payloads = [bytes([i]) * 1400 for i in range(50)] + [b"tail"]
    payloads += [bytes([i]) * 300 for i in range(3)] + [b"x" * 2000 for _ in range(40)]
    assert a.send_many(payloads, b.local_address) == len(payloads)
    assert a.sent == len(payloads)
    got = recv_n(b, len(payloads))
    assert [d for d, _ in got] == payloads
    assert all(src == a.local_address for _, src in got)
    assert b.received == len(payloads)
    if a.features.gso:
        assert 0 < a.gso_sends < len(payloads)  # batched, not one send per datagram
    if a.features.gso and b.features.gro:
        assert b.gro_reads > 0  # coalesced reads were split back into datagrams


def test_send_many_without_offload_sends_one_by_one() -> None:
    with PathSocket(1, ("127.0.0.1", 0), offload=False) as a, PathSocket(2, ("127.0.0.1", 0)) as b:
        payloads = [b"p" * 500] * 10
        assert a.send_many(payloads, b.local_address) == 10
        assert a.gso_sends == 0
        assert [d for d, _ in recv_n(b, 10)] == payloads


def test_send_many_counts_every_refused_datagram(pair) -> None:
    a, _ = pair
    assert a.send_many([b"q" * 100] * 5, ("127.0.0.1", 0)) == 0  # port 0: EINVAL
    assert a.send_errors == {"EINVAL": 5}
    assert a.sent == 0
