"""In-memory twins of the drivers (wireguard-go conn/bindtest, tun/tuntest style).

``MemoryLink`` is one UDP path between a client and a gateway with loss, delay, jitter,
up/down and NAT rebinding, deterministic under a seeded ``random.Random`` and a clock the
caller steps. ``MemoryTun`` is a TUN device as two packet queues. ``Simulation`` runs a
real ``ClientSession`` against a real ``GatewaySessions`` over such links with a fake
clock: level 2 of the test pyramid (two whole engines, no sockets), also usable by demos.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field

from tunnel.core.client import ClientSession
from tunnel.core.events import Event
from tunnel.core.gateway import GatewaySessions

GATEWAY_ADDR = ("192.0.2.1", 51820)
"""Where every memory path ends on the gateway side (TEST-NET-1: never routed)."""


@dataclass
class Impairment:
    loss_up: float = 0.0
    loss_down: float = 0.0
    delay_s: float = 0.010
    jitter_s: float = 0.0
    up: bool = True


class MemoryLink:
    """One client path. Its client-side source address changes on ``rebind()`` (NAT)."""

    def __init__(self, path_id: int, *, rng: random.Random, delay_s: float = 0.010) -> None:
        self.path_id = path_id
        self.rng = rng
        self.imp = Impairment(delay_s=delay_s)
        self._port = 40000 + path_id * 100
        self.rebinds = 0
        self.sent_up = self.sent_down = self.lost = 0

    @property
    def client_addr(self) -> tuple[str, int]:
        return (f"198.51.100.{self.path_id}", self._port + self.rebinds)

    def rebind(self) -> None:
        self.rebinds += 1

    def transit(self, up: bool) -> float | None:
        """Delay for one datagram, or None when it is lost."""
        imp = self.imp
        loss = imp.loss_up if up else imp.loss_down
        if not imp.up or (loss and self.rng.random() < loss):
            self.lost += 1
            return None
        if up:
            self.sent_up += 1
        else:
            self.sent_down += 1
        jitter = self.rng.uniform(-imp.jitter_s, imp.jitter_s) if imp.jitter_s else 0.0
        return max(0.0, imp.delay_s + jitter)


class MemoryTun:
    """A TUN device as queues: ``inject`` = the host sends into the tunnel."""

    def __init__(self) -> None:
        self.to_tunnel: deque[bytes] = deque()
        self.from_tunnel: list[bytes] = []

    def inject(self, packet: bytes) -> None:
        self.to_tunnel.append(packet)


@dataclass(order=True)
class _Delivery:
    at: float
    seq: int
    to_gateway: bool = field(compare=False)
    path_id: int = field(compare=False)
    src: Hashable = field(compare=False)
    data: bytes = field(compare=False)


class Simulation:
    """Step a client and a gateway against each other in fake time."""

    def __init__(
        self,
        client: ClientSession,
        gateway: GatewaySessions,
        links: Iterable[MemoryLink],
        *,
        now: float = 0.0,
    ) -> None:
        self.client = client
        self.gateway = gateway
        self.links = {link.path_id: link for link in links}
        self.now = now
        self.client_tun = MemoryTun()
        self.gateway_tun = MemoryTun()
        self.client_events: list[Event] = []
        self.gateway_events: list[object] = []
        self._heap: list[_Delivery] = []
        self._seq = itertools.count()
        self.taps: list[Callable[[_Delivery], None]] = []

    # -- moving data ---------------------------------------------------------------------
    def _collect(self) -> None:
        for path_id, data in self.client.datagrams_to_send():
            link = self.links[path_id]
            delay = link.transit(up=True)
            if delay is not None:
                self._push(self.now + delay, True, path_id, link.client_addr, data)
        for addr, data in self.gateway.datagrams_to_send():
            back = next((lk for lk in self.links.values() if lk.client_addr == addr), None)
            if back is None:
                continue  # NAT mapping gone, or an address no path has: lost
            link = back
            delay = link.transit(up=False)
            if delay is not None:
                self._push(self.now + delay, False, link.path_id, addr, data)
        self.client_tun.from_tunnel.extend(self.client.packets_for_tun())
        self.gateway_tun.from_tunnel.extend(self.gateway.packets_for_tun())
        while (ev := self.client.next_event()) is not None:
            self.client_events.append(ev)
        while (gev := self.gateway.next_event()) is not None:
            self.gateway_events.append(gev)

    def _push(self, at: float, to_gateway: bool, path_id: int, src: Hashable, data: bytes) -> None:
        heapq.heappush(self._heap, _Delivery(at, next(self._seq), to_gateway, path_id, src, data))

    def inject_to_gateway(self, data: bytes, src: Hashable, delay: float = 0.0) -> None:
        """An attacker or a test puts a datagram on the wire towards the gateway."""
        self._push(self.now + delay, True, -1, src, data)

    def inject_to_client(self, data: bytes, path_id: int, delay: float = 0.0) -> None:
        self._push(self.now + delay, False, path_id, None, data)

    def _deliver(self, d: _Delivery) -> None:
        for tap in self.taps:
            tap(d)
        if d.to_gateway:
            self.gateway.receive_datagram(d.data, d.src, self.now)
        else:
            self.client.receive_datagram(d.data, d.path_id, self.now)

    # -- time ------------------------------------------------------------------------------
    def start(self) -> None:
        self.client.connect(self.now)
        self._collect()

    def run_until(self, t_end: float, *, max_steps: int = 2_000_000) -> None:
        for _ in range(max_steps):
            self._feed_tuns()
            self._collect()
            nxt = self._next_time(t_end)
            if nxt > t_end or (nxt == t_end and not self._due(t_end)):
                self.now = t_end
                self.client.handle_timer(self.now)
                self.gateway.handle_timer(self.now)
                self._collect()
                return
            self.now = max(self.now, nxt)
            self._step()
        raise RuntimeError("simulation did not reach t_end: a timer is spinning")

    def _feed_tuns(self) -> None:
        while self.client_tun.to_tunnel:
            self.client.receive_tun_packet(self.client_tun.to_tunnel.popleft(), self.now)
        while self.gateway_tun.to_tunnel:
            self.gateway.receive_tun_packet(self.gateway_tun.to_tunnel.popleft(), self.now)

    def _next_time(self, t_end: float) -> float:
        """The earliest of ``t_end``, either side's deadline and the next delivery."""
        candidates = [t_end]
        for t in (self.client.next_deadline(), self.gateway.next_deadline()):
            if t is not None:
                candidates.append(max(t, self.now))
        if self._heap:
            candidates.append(self._heap[0].at)
        return min(candidates)

    def _step(self) -> None:
        """Deliver what is due at ``now``, then fire the timers that are due."""
        while self._heap and self._heap[0].at <= self.now:
            self._deliver(heapq.heappop(self._heap))
            self._collect()
        ct, gt = self.client.next_deadline(), self.gateway.next_deadline()
        if ct is not None and ct <= self.now:
            self.client.handle_timer(self.now)
        if gt is not None and gt <= self.now:
            self.gateway.handle_timer(self.now)
        self._collect()

    def _due(self, t: float) -> bool:
        ct, gt = self.client.next_deadline(), self.gateway.next_deadline()
        return bool(
            (self._heap and self._heap[0].at <= t)
            or (ct is not None and ct <= t)
            or (gt is not None and gt <= t)
        )

    def advance(self, dt: float) -> None:
        self.run_until(self.now + dt)
