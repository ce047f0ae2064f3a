"""The demo's embedded gateway: a real GatewaySessions on one loopback UDP socket.

It runs in its own thread (a selector loop), answers the client's inner ICMP echo
requests itself instead of handing them to a TUN, and forwards its SECURITY_EVENTs (a
rejected replay, say) to a callback, which the demo hands on to the engine's event stream.
"""

from __future__ import annotations

import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Final

from tunnel.core.events import Event, SecurityEvent
from tunnel.core.gateway import ClientEntry, GatewaySessions
from tunnel.core.handshake import generate_keypair
from tunnel.core.policy import POLICY_DEFAULT
from tunnel.io.inner import echo_reply

DEMO_CLIENT_INNER: Final = "10.66.0.2"
DEMO_GATEWAY_INNER: Final = "10.66.0.1"
GATEWAY_TICK_S: Final = 0.05
"""Longest sleep of the demo gateway's selector (its stop flag is checked this often)."""


class DemoGateway:
    """GatewaySessions on one loopback UDP socket, in a thread; answers inner echoes."""

    def __init__(self, client_public: bytes, on_event: Callable[[Event], None]) -> None:
        self._private, self.public_key = generate_keypair()
        self._client_public = client_public
        self._on_event = on_event
        self.echoed = 0
        self.sessions: GatewaySessions | None = None
        self.address: tuple[str, int] = ("127.0.0.1", 0)
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        now = time.monotonic()
        self.sessions = GatewaySessions(
            static_private=self._private,
            clients=[ClientEntry("demo", self._client_public, DEMO_CLIENT_INNER)],
            policy=POLICY_DEFAULT,
            now=now,
            urandom=os.urandom,
            node_id="demo-gateway",
            wall_offset=time.time() - now,
            inner_gateway=DEMO_GATEWAY_INNER,
        )
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        self._sock = sock
        self.address = sock.getsockname()
        self._thread = threading.Thread(target=self._run, name="jvpn-demo-gw", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._sock is not None:
            self._sock.close()

    def _run(self) -> None:
        gw, sock = self.sessions, self._sock
        assert gw is not None and sock is not None
        sel = selectors.DefaultSelector()
        sel.register(sock, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                deadline = gw.next_deadline()
                wait = GATEWAY_TICK_S
                if deadline is not None:
                    wait = min(wait, max(0.0, deadline - time.monotonic()))
                sel.select(wait)
                self._turn(gw, sock)
        finally:
            sel.close()

    def _turn(self, gw: GatewaySessions, sock: socket.socket) -> None:
        """One round: take what arrived, fire due timers, send (twice: echo replies make
        a second round of output), forward the security events."""
        now = time.monotonic()
        _receive(gw, sock, now)
        deadline = gw.next_deadline()
        if deadline is not None and deadline <= now:
            gw.handle_timer(now)
        for _ in range(2):
            _send(gw, sock)
            self._echo(gw, now)
        for event in gw.events():
            if isinstance(event, SecurityEvent):
                self._on_event(event)

    def _echo(self, gw: GatewaySessions, now: float) -> None:
        """Answer the client's inner echo requests (the demo gateway has no TUN)."""
        for packet in gw.packets_for_tun():
            reply = echo_reply(packet)
            if reply is not None:
                self.echoed += 1
                gw.receive_tun_packet(reply, now)


def _receive(gw: GatewaySessions, sock: socket.socket, now: float) -> None:
    for _ in range(1024):
        try:
            data, addr = sock.recvfrom(65535)
        except BlockingIOError:
            return
        except OSError:
            continue  # an ICMP error for an earlier send: nothing to read
        gw.receive_datagram(data, addr, now)


def _send(gw: GatewaySessions, sock: socket.socket) -> None:
    for addr, data in gw.datagrams_to_send():
        assert isinstance(addr, tuple)
        try:
            sock.sendto(data, addr)
        except OSError:
            pass  # loopback buffer full or relay gone: a lost datagram
