"""Issue 10 item 1 over real UDP on loopback: a pre-validated standby takes the binding on
the first authenticated datagram, with no REATTACH round trip, and a replay of that
datagram from a third address moves nothing.

The gateway is tests/loopback_gateway.py (GatewaySessions on a loopback socket in its own
thread, able to blackhole a source address); the client is a ClientSession driven here
over two loopback sockets, one per path. Waits are bounded polls, never bare sleeps.
"""

from __future__ import annotations

import dataclasses
import selectors
import socket
import time
from collections.abc import Callable
from typing import Any

from loopback_gateway import LoopbackGateway

from tunnel.core.client import ClientSession, PathSpec
from tunnel.core.drops import Drop
from tunnel.core.events import EventType
from tunnel.core.gateway import GatewaySessions
from tunnel.core.gateway_session import GatewaySession
from tunnel.core.handshake import generate_keypair
from tunnel.core.policy import POLICY_DEFAULT
from tunnel.core.session import State
from tunnel.core.wire import Control, ReattachAck, ReattachRequest, parse_header

POLICY = dataclasses.replace(POLICY_DEFAULT, standby_probe_interval_ms=200)
"""The default policy, with the standby validated (and known to be) sooner."""


class Client:
    """A ClientSession on two loopback sockets (path 1, path 2), stepped by :meth:`run`."""

    def __init__(self, private: bytes, gateway: LoopbackGateway) -> None:
        self.session = ClientSession(
            static_private=private, gateway_public=gateway.public_key,
            paths=[PathSpec(1, "one"), PathSpec(2, "two")], policy=POLICY,
            now=time.monotonic(),
        )  # fmt: skip
        self.gateway = gateway.address
        self.socks = {pid: socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for pid in (1, 2)}
        self.sel = selectors.DefaultSelector()
        for pid, sock in self.socks.items():
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
            self.sel.register(sock, selectors.EVENT_READ, pid)
        self.sent: list[tuple[int, bytes, float]] = []
        self.controls: list[tuple[int, Control]] = []
        self.events: list[Any] = []
        send_control = self.session.send_control

        def spy(path_id: int, msg: Control) -> None:
            self.controls.append((path_id, msg))
            send_control(path_id, msg)

        self.session.send_control = spy  # type: ignore[method-assign]
        self.session.connect(time.monotonic())
        self._flush()

    def addr(self, path_id: int) -> tuple[str, int]:
        name: tuple[str, int] = self.socks[path_id].getsockname()
        return name

    def _flush(self) -> None:
        for pid, data in self.session.datagrams_to_send():
            self.sent.append((pid, data, time.monotonic()))
            self.socks[pid].sendto(data, self.gateway)
        self.events.extend(self.session.events())

    def run(self, until: Callable[[], bool], timeout: float = 10.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if until():
                return True
            deadline = self.session.next_deadline()
            wait = 0.02 if deadline is None else min(0.02, deadline - time.monotonic())
            for key, _ in self.sel.select(max(0.0, wait)):
                data = key.fileobj.recv(65535)  # type: ignore[union-attr]
                self.session.receive_datagram(data, key.data, time.monotonic())
            now = time.monotonic()
            deadline = self.session.next_deadline()
            if deadline is not None and deadline <= now:
                self.session.handle_timer(now)
            self._flush()
        return until()

    def close(self) -> None:
        self.sel.close()
        for sock in self.socks.values():
            sock.close()


def _session(gw: GatewaySessions) -> GatewaySession:
    (s,) = gw.sessions.values()
    return s


def test_standby_takes_the_binding_on_the_first_datagram_and_a_replay_moves_nothing() -> None:
    private, public = generate_keypair()
    received: list[tuple[Any, bytes, float, bool]] = []
    with LoopbackGateway(public, policy=POLICY) as lg:

        def capture(gw: GatewaySessions) -> None:
            original = gw.receive_datagram

            def receive(data: bytes, addr: Any, now: float) -> None:
                s = next(iter(gw.sessions.values()), None)
                before = None if s is None else s.binding
                original(data, addr, now)
                moved = s is not None and s.binding != before and s.binding == addr
                received.append((addr, data, now, moved))

            gw.receive_datagram = receive  # type: ignore[method-assign]

        lg.call(capture)
        gw_sent: list[Control] = []

        def spy_outbox(gw: GatewaySessions) -> None:
            original = gw.outbox.control

            def control(cipher: Any, peer_index: int, where: Any, msg: Control) -> int:
                gw_sent.append(msg)
                return original(cipher, peer_index, where, msg)

            gw.outbox.control = control  # type: ignore[method-assign]

        lg.call(spy_outbox)
        client = Client(private, lg)
        try:
            c = client.session
            assert client.run(
                lambda: c.state is State.ATTACHED and c.paths.get(2).gateway_validated
            ), "no session with a validated standby"
            assert c.active == 1
            epoch = lg.call(lambda gw: _session(gw).epoch)

            lg.blackholed.add(client.addr(1))  # path 1 dies silently, both ways
            assert client.run(lambda: c.state is State.ATTACHED and c.active == 2)

            # The move: no REATTACH_REQUEST left the client, no REATTACH_ACK the gateway.
            assert not [m for _, m in client.controls if isinstance(m, ReattachRequest)]
            assert not [m for m in gw_sent if isinstance(m, ReattachAck)]
            # The first datagram the gateway received from path 2 after the client's
            # attempt carried the mark, and that very datagram moved the binding.
            (attempt,) = [e for e in client.events if e.event_type == EventType.REATTACH_ATTEMPT]
            t_attempt = next(t for pid, d, t in client.sent if pid == 2 and d[3] != 0)
            after = [r for r in received if r[0] == client.addr(2) and r[2] >= t_attempt]
            first = after[0]
            header = parse_header(first[1])
            assert not isinstance(header, Drop) and header.mark == 1  # 1 + RECOVERY
            assert header.epoch == (epoch + 1) & 0xFF and first[3]
            assert attempt.kind == "recovery" and attempt.candidate_transport == 2
            state = lg.call(lambda gw: (_session(gw).binding, _session(gw).epoch,
                                        _session(gw).machine.version,
                                        _session(gw).nonces.last))  # fmt: skip
            assert state[0] == client.addr(2) and state[1] == epoch + 1 == c.epoch
            assert state[3] == 0  # no request nonce ever reached the gateway

            # A replay of that datagram from a third address moves nothing.
            replays = lg.call(lambda gw: gw.drops.get(str(Drop.REPLAY), 0))
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
                attacker.bind(("127.0.0.1", 0))
                attacker.sendto(first[1], lg.address)
                third = attacker.getsockname()
                assert client.run(lambda: any(r[0] == third for r in received), timeout=5.0)
            assert lg.call(lambda gw: gw.drops.get(str(Drop.REPLAY), 0)) == replays + 1
            assert not any(r[3] for r in received if r[0] == third)
            after_replay = lg.call(lambda gw: (_session(gw).binding, _session(gw).epoch,
                                               _session(gw).machine.version,
                                               _session(gw).nonces.last))  # fmt: skip
            assert after_replay == state
        finally:
            client.close()
