"""The client's I/O loop: feeds a sans-I/O ClientSession from real sockets and a TUN.

One :class:`ClientRuntime` lives on one asyncio loop (uvloop when importable, see
:func:`tunnel.io.loop.new_event_loop`). It registers a reader on every path socket and on the inner
side, drains each until it would block (bounded per wake-up, so one busy fd cannot
starve the others), and after every input flushes the session's outputs (datagrams per
path, packets for the TUN, events) and re-arms exactly ONE timer from
``session.next_deadline()``. Time is ``time.monotonic()``, read once per input.

Inner packets from the host: IPv4 goes to the session; IPv6 is dropped and counted
(the gateway assigns IPv4 inner addresses only and does not route IPv6); anything that
is not IP is counted as malformed. Datagrams on a path socket from anything but that
path's gateway address are dropped and counted (``foreign_source``).

Every callback runs under :meth:`ClientRuntime._guard`: an exception is an engine
failure, handed to ``on_crash`` (the engine turns it into a reason-coded termination),
never swallowed and never left to asyncio's default handler.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from tunnel.core.client import ClientSession
from tunnel.core.events import Event
from tunnel.io.inner import TunLike
from tunnel.io.tun import ip_version
from tunnel.io.udp import Address, PathSocket

DRAIN_LIMIT: Final = 1024
"""Datagrams (or inner packets) taken per readiness callback: drains a burst until
EAGAIN, yet one flooded fd cannot starve the timer and the other fds."""

BATCH: Final = 64
"""Packets per recv/read call."""

TIMER_SLACK_S: Final = 0.0005
"""A deadline this close to now is handled now instead of arming a ~0 s timer."""


@dataclass(frozen=True, slots=True)
class PathTarget:
    """One candidate path on the wire: its socket and the gateway address it talks to."""

    path_id: int
    sock: PathSocket
    remote: Address


@dataclass(slots=True)
class RuntimeCounters:
    """Inner traffic and local drops of the loop (read by the engine for snapshots)."""

    tx_packets: int = 0
    """Inner packets handed to the session (host -> tunnel)."""
    tx_bytes: int = 0
    rx_packets: int = 0
    """Inner packets written to the inner side (tunnel -> host)."""
    rx_bytes: int = 0
    inner_ipv6_dropped: int = 0
    """IPv6 packets from the host, dropped: the tunnel carries IPv4."""
    inner_malformed: int = 0
    """Packets from the host that are not IP at all."""
    foreign_source: int = 0
    """Datagrams on a path socket from an address other than the path's gateway."""
    datagrams_in: int = 0
    datagrams_out: int = 0
    send_failed: int = 0
    """Datagrams the kernel refused (counted by errno on the PathSocket)."""


class ClientRuntime:
    """Drives one ClientSession on the running loop. Construct, then :meth:`install`."""

    def __init__(
        self,
        session: ClientSession,
        paths: Sequence[PathTarget],
        inner: TunLike,
        *,
        on_event: Callable[[Event], None],
        on_crash: Callable[[BaseException], None],
        on_terminated: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
        tap: Callable[[int, bytes], None] | None = None,
    ) -> None:
        self.session = session
        self.tap = tap
        """Called with (path_id, datagram) for every datagram sent (the demo captures)."""
        self.paths = {p.path_id: p for p in paths}
        self.inner = inner
        self.counters = RuntimeCounters()
        self.clock = clock
        self._on_event = on_event
        self._on_crash = on_crash
        self._on_terminated = on_terminated
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._inner_set = False
        self._terminated_seen = False
        self._crashed = False

    # -- lifetime ------------------------------------------------------------------------

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Register readers, start the handshake, flush, arm the timer (loop thread)."""
        self._loop = loop
        for p in self.paths.values():
            loop.add_reader(p.sock.fileno(), self._guard, self._on_socket, p)
        self.inner.start(loop, lambda: self._guard(self._on_inner))
        self._guard(self._connect)

    def uninstall(self) -> None:
        """Remove readers and the timer (loop thread, loop still usable). Idempotent."""
        loop, self._loop = self._loop, None
        if loop is None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for p in self.paths.values():
            if not p.sock.closed:
                loop.remove_reader(p.sock.fileno())
        self.inner.stop()

    def _guard(self, fn: Callable[..., None], *args: Any) -> None:
        if self._crashed:
            return
        try:
            fn(*args)
        except Exception as exc:  # the engine boundary: turned into a coded termination
            self._crashed = True
            self._on_crash(exc)

    # -- inputs ------------------------------------------------------------------------------

    def _connect(self) -> None:
        self.session.connect(self.clock())
        self.pump()

    def _on_socket(self, p: PathTarget) -> None:
        now = self.clock()
        # The current target: the engine replaces it when a gateway name re-resolves (D7).
        session, remote, counters = self.session, self.paths[p.path_id].remote, self.counters
        taken = 0
        while taken < DRAIN_LIMIT:
            batch = p.sock.recv_batch(BATCH)
            for data, addr in batch:
                if addr[0] != remote[0] or addr[1] != remote[1]:
                    counters.foreign_source += 1
                    continue
                counters.datagrams_in += 1
                session.receive_datagram(data, p.path_id, now)
            taken += len(batch)
            if len(batch) < BATCH:
                break
        self.pump(now)

    def _on_inner(self) -> None:
        now = self.clock()
        counters = self.counters
        receive = self.session.receive_tun_packet
        taken = 0
        while taken < DRAIN_LIMIT:
            batch = self.inner.read_batch(BATCH)
            for packet in batch:
                if len(packet) >= 20 and packet[0] >> 4 == 4:  # ip_version() == 4, inlined
                    counters.tx_packets += 1
                    counters.tx_bytes += len(packet)
                    receive(packet, now)
                elif ip_version(packet) == 6:
                    counters.inner_ipv6_dropped += 1
                else:
                    counters.inner_malformed += 1
            taken += len(batch)
            if len(batch) < BATCH:
                break
        self.pump(now)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        now = self.clock()
        self.session.handle_timer(now)
        self.pump(now)

    def run_command(self, fn: Callable[[float], None]) -> None:
        """Apply an operator command ``fn(now)`` to the session, then flush (loop thread)."""
        self._guard(self._command, fn)

    def _command(self, fn: Callable[[float], None]) -> None:
        now = self.clock()
        fn(now)
        self.pump(now)

    # -- outputs -------------------------------------------------------------------------

    def pump(self, now: float | None = None) -> None:
        """Flush every output of the session and re-arm the one timer."""
        session = self.session
        counters = self.counters
        tap = self.tap
        out = session.datagrams_to_send()
        if out:
            # Consecutive datagrams for one path leave in one send_many (UDP GSO).
            run: list[bytes] = []
            run_path = out[0][0]
            for path_id, data in out:
                if tap is not None:
                    tap(path_id, data)
                if path_id != run_path:
                    self._send_run(run_path, run)
                    run = []
                    run_path = path_id
                run.append(data)
            self._send_run(run_path, run)
        packets = session.packets_for_tun()
        if packets:
            counters.rx_packets += len(packets)
            counters.rx_bytes += sum(len(pk) for pk in packets)
            self.inner.write_batch(packets)
        for event in session.events():
            self._on_event(event)
        if not self._inner_set and session.inner_address:
            self._inner_set = True
            self._configure_inner()
        if session.machine.terminated:
            if not self._terminated_seen:
                self._terminated_seen = True
                self._on_terminated()
            return
        self._arm(now if now is not None else self.clock())

    def _send_run(self, path_id: int, run: list[bytes]) -> None:
        p = self.paths[path_id]
        sent = p.sock.send_many(run, p.remote)
        self.counters.datagrams_out += sent
        self.counters.send_failed += len(run) - sent

    def _configure_inner(self) -> None:
        s = self.session
        future = self.inner.set_inner_address(
            s.inner_address, s.inner_prefix, s.inner_gateway, s.mtu
        )
        if future is None or self._loop is None:
            return
        loop = self._loop

        def done(f: Any) -> None:
            loop.call_soon_threadsafe(self._guard, f.result)  # raises there if it failed

        future.add_done_callback(done)

    def _arm(self, now: float) -> None:
        deadline = self.session.next_deadline()
        if deadline == self._timer_at and self._timer is not None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is None or self._loop is None:
            return
        delay = max(0.0, deadline - now)
        if delay < TIMER_SLACK_S:
            delay = 0.0
        self._timer = self._loop.call_later(delay, self._guard, self._on_timer)
