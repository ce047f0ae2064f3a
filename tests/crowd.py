"""Many real ClientSessions against one real GatewaySessions, sans-I/O, on a fake clock.

Each client has one path and its own source host (as distinct machines would); datagrams
are delivered instantly. The clock jumps from one deadline to the next (a heap of the
clients' deadlines; the gateway's timers are run every ``gateway_tick_s``, which the
admission does not need: its buckets read ``now``). Used by the burst-arrival and the
clients_dir reload tests.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

from tunnel.core.client import ClientSession, PathSpec
from tunnel.core.constants import MSG_HANDSHAKE_INIT
from tunnel.core.gateway import GatewaySessions
from tunnel.core.policy import Policy
from tunnel.core.session import State

PATH = 1


@dataclass
class Member:
    """One client of the crowd: its session, its source address and what it saw."""

    name: str
    index: int
    session: ClientSession
    addr: tuple[str, int]
    inits: list[float] = field(default_factory=list)
    """When each HANDSHAKE_INIT left (a resend with mac2 after a cookie included)."""
    attached_at: float | None = None


def host(i: int) -> tuple[str, int]:
    return (f"198.18.{i // 250}.{i % 250 + 1}", 40000 + i % 1000)


class Crowd:
    """The clients and the gateway, and the fake clock that drives them."""

    def __init__(self, gateway: GatewaySessions, gateway_tick_s: float = 1.0) -> None:
        self.gateway = gateway
        self.members: list[Member] = []
        self.now = 0.0
        self._heap: list[tuple[float, int]] = []
        self._by_addr: dict[tuple[str, int], Member] = {}
        self.gateway_tick_s = gateway_tick_s
        self._next_tick = gateway_tick_s

    def add(
        self, name: str, private: bytes, gateway_public: bytes, policy: Policy, seed: int
    ) -> Member:
        session = ClientSession(
            static_private=private, gateway_public=gateway_public,
            paths=[PathSpec(PATH, "p")], policy=policy, now=self.now,
            rng=random.Random(seed),
        )  # fmt: skip
        i = len(self.members)
        m = Member(name, i, session, host(i))
        self.members.append(m)
        self._by_addr[m.addr] = m
        return m

    def connect(self, m: Member) -> None:
        m.session.connect(self.now)
        self._after(m)
        self.settle()

    def _after(self, m: Member) -> None:
        """Send what ``m`` produced; re-arm its deadline."""
        for _, data in m.session.datagrams_to_send():
            if data[0] == MSG_HANDSHAKE_INIT:
                m.inits.append(self.now)
            self.gateway.receive_datagram(data, m.addr, self.now)
        if m.attached_at is None and m.session.state is not State.BIRTH:
            m.attached_at = self.now
        deadline = m.session.next_deadline()
        if deadline is not None:
            heapq.heappush(self._heap, (deadline, m.index))

    def settle(self) -> None:
        """Deliver until nothing is in flight (instant links)."""
        while out := self.gateway.datagrams_to_send():
            touched: list[Member] = []
            for addr, data in out:
                m = self._by_addr.get(addr)  # type: ignore[arg-type]
                if m is not None:
                    m.session.receive_datagram(data, PATH, self.now)
                    touched.append(m)
            for m in touched:
                self._after(m)

    def run_until(self, end: float, *, stop_when_attached: bool = True) -> None:
        """Advance the clock deadline by deadline up to ``end`` (attached clients are no
        longer driven when ``stop_when_attached``: the burst is about attaching)."""
        while self._heap and self._heap[0][0] <= end:
            when, i = heapq.heappop(self._heap)
            m = self.members[i]
            if m.session.next_deadline() != when:
                continue  # stale entry
            if stop_when_attached and m.attached_at is not None:
                continue
            self.now = max(self.now, when)
            self._tick()
            m.session.handle_timer(self.now)
            self._after(m)
            self.settle()
        self.now = max(self.now, end)
        self._tick()

    def _tick(self) -> None:
        while self._next_tick <= self.now:
            self.gateway.handle_timer(self._next_tick)
            self._next_tick += self.gateway_tick_s
        self.settle()
