"""A tiny real gateway for client-engine tests: GatewaySessions on one loopback UDP socket.

It runs in a thread with a selector loop and one timer from ``next_deadline()``, answers
inner ICMP echo requests itself (no TUN), records every event, and can blackhole the
datagrams of chosen client source addresses (a dead path). Tests touch the
GatewaySessions only through :meth:`LoopbackGateway.call` (under its lock).
"""

from __future__ import annotations

import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from tunnel.core.events import Event
from tunnel.core.gateway import GatewaySessions
from tunnel.core.gateway_session import ClientEntry
from tunnel.core.handshake import generate_keypair
from tunnel.core.policy import POLICY_DEFAULT, Policy
from tunnel.io.inner import echo_reply

_T = TypeVar("_T")

CLIENT_INNER = "10.66.0.2"
GATEWAY_INNER = "10.66.0.1"


class LoopbackGateway:
    def __init__(self, client_public: bytes, *, policy: Policy = POLICY_DEFAULT) -> None:
        private, self.public_key = generate_keypair()
        now = time.monotonic()
        self.sessions = GatewaySessions(
            static_private=private,
            clients=[ClientEntry("alice", client_public, CLIENT_INNER)],
            policy=policy,
            now=now,
            urandom=os.urandom,
            wall_offset=time.time() - now,
            inner_gateway=GATEWAY_INNER,
        )
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.address: tuple[str, int] = self.sock.getsockname()
        self.events: list[Event] = []
        self.blackholed: set[Any] = set()
        self.echoed = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loopback-gw", daemon=True)

    def __enter__(self) -> LoopbackGateway:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def call(self, fn: Callable[[GatewaySessions], _T]) -> _T:
        with self._lock:
            return fn(self.sessions)

    def event_types(self) -> list[str]:
        with self._lock:
            return [str(e.event_type) for e in self.events]

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ)
        gw = self.sessions
        while not self._stop.is_set():
            with self._lock:
                deadline = gw.next_deadline()
            timeout = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
            sel.select(max(0.0, timeout))
            with self._lock:
                now = time.monotonic()
                for _ in range(1024):
                    try:
                        data, addr = self.sock.recvfrom(65535)
                    except BlockingIOError:
                        break
                    if addr not in self.blackholed:
                        gw.receive_datagram(data, addr, now)
                deadline = gw.next_deadline()
                if deadline is not None and deadline <= now:
                    gw.handle_timer(now)
                for _ in range(2):  # echo replies produce a second round of output
                    for addr, data in gw.datagrams_to_send():
                        if addr not in self.blackholed:
                            try:
                                self.sock.sendto(data, addr)
                            except OSError:
                                pass  # loopback buffer full: a lost datagram
                    for packet in gw.packets_for_tun():
                        reply = echo_reply(packet)
                        if reply is not None:
                            self.echoed += 1
                            gw.receive_tun_packet(reply, now)
                self.events.extend(gw.events())
        sel.close()
