"""The client's I/O loop: feeds a sans-I/O ClientSession from real sockets and a TUN.

One :class:`ClientRuntime` lives on one asyncio loop (uvloop when importable, see
:func:`tunnel.io.loop.new_event_loop`) and is driven by the shared
:class:`tunnel.io.loop.DriverLoop`: a reader on every path socket and on the inner side
drains each until it would block (bounded per wake-up, so one busy fd cannot starve the
others), and after every input the runtime flushes the session's outputs (datagrams per
path, packets for the TUN, events) and the driver re-arms exactly ONE timer from
``session.next_deadline()``. Time is ``time.monotonic()``, read once per input.

Inner packets from the host: IPv4 goes to the session; IPv6 too once the gateway gave
the session an inner IPv6 address, else it is dropped and counted (that gateway does not
route IPv6); anything that is not IP is counted as malformed. Datagrams on a path socket
from anything but that path's gateway address are dropped and counted
(``foreign_source``). These three are counted here and with the session's own drops
(:meth:`ClientSession.count_drop`: the snapshot's ``drops``, DROP_SUMMARY).

Every callback runs under :meth:`tunnel.io.loop.DriverLoop.guard`: an exception is an engine
failure, handed to ``on_crash`` (the engine turns it into a reason-coded termination),
never swallowed and never left to asyncio's default handler.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tunnel.core.client import ClientSession
from tunnel.core.drops import Drop
from tunnel.core.events import Event
from tunnel.io.inner import TunLike
from tunnel.io.loop import DriverLoop, drain
from tunnel.io.tun import ip_version
from tunnel.io.udp import Address, PathSocket


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
    """IPv6 packets from the host, dropped: the session has no inner IPv6 address."""
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
        self.session: ClientSession = session
        self.tap = tap
        """Called with (path_id, datagram) for every datagram sent (the demo captures)."""
        self.paths: dict[int, PathTarget] = {p.path_id: p for p in paths}
        self.inner: TunLike = inner
        self.counters: RuntimeCounters = RuntimeCounters()
        self.clock = clock
        self.driver: DriverLoop = DriverLoop(
            session, flush=self._flush, on_crash=on_crash, clock=clock
        )
        self._on_event = on_event
        self._on_terminated = on_terminated
        self._inner_set = False
        self._terminated_seen = False

    # -- lifetime ------------------------------------------------------------------------

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Register readers, start the handshake, flush, arm the timer (loop thread)."""
        driver = self.driver
        driver.attach(loop)
        for p in self.paths.values():
            driver.add_reader(p.sock.fileno(), self._on_socket, p)
        self.inner.start(loop, lambda: driver.guard(self._on_inner))
        driver.guard(driver.input, self.session.connect)

    def attach_path(self, target: PathTarget) -> None:
        """A path added while the loop runs (``paths = "auto"``): read its socket too."""
        self.paths[target.path_id] = target
        self.driver.add_reader(target.sock.fileno(), self._on_socket, target)

    def detach_path(self, path_id: int) -> PathTarget | None:
        """A path removed while the loop runs: stop reading its socket (the caller closes
        it); what the session still sends on it is dropped and counted as send_failed."""
        target = self.paths.pop(path_id, None)
        loop = self.driver.loop
        if target is not None and loop is not None and not target.sock.closed:
            loop.remove_reader(target.sock.fileno())
        return target

    def uninstall(self) -> None:
        """Remove readers and the timer (loop thread, loop still usable). Idempotent."""
        loop = self.driver.detach()
        if loop is None:
            return
        for p in self.paths.values():
            if not p.sock.closed:
                loop.remove_reader(p.sock.fileno())
        self.inner.stop()

    # -- inputs ------------------------------------------------------------------------------

    def _on_socket(self, p: PathTarget) -> None:
        self.driver.input(self._read_socket, p)

    def _read_socket(self, now: float, p: PathTarget) -> None:
        # The current target: the engine replaces it when a gateway name re-resolves (D7).
        current = self.paths.get(p.path_id)
        if current is not None:
            drain(p.sock.recv_batch, self._take_datagrams, p.path_id, current.remote, now)

    def _take_datagrams(
        self, batch: Sequence[tuple[bytes, Any]], path_id: int, remote: Address, now: float
    ) -> None:
        counters = self.counters
        receive = self.session.receive_datagram
        for data, addr in batch:
            if addr[0] != remote[0] or addr[1] != remote[1]:
                counters.foreign_source += 1
                self.session.count_drop(Drop.FOREIGN_SOURCE)
                continue
            counters.datagrams_in += 1
            receive(data, path_id, now)

    def _on_inner(self) -> None:
        self.driver.input(self._read_inner)

    def _read_inner(self, now: float) -> None:
        drain(self.inner.read_batch, self._take_packets, now)

    def _take_packets(self, batch: Sequence[bytes], now: float) -> None:
        counters = self.counters
        receive = self.session.receive_tun_packet
        for packet in batch:
            if len(packet) >= 20 and packet[0] >> 4 == 4:  # ip_version() == 4, inlined
                counters.tx_packets += 1
                counters.tx_bytes += len(packet)
                receive(packet, now)
            elif ip_version(packet) == 6:
                if self.session.inner_address6:
                    counters.tx_packets += 1
                    counters.tx_bytes += len(packet)
                    receive(packet, now)
                else:
                    counters.inner_ipv6_dropped += 1
                    self.session.count_drop(Drop.INNER_IPV6_DROPPED)
            else:
                counters.inner_malformed += 1
                self.session.count_drop(Drop.INNER_MALFORMED)

    def run_command(self, fn: Callable[[float], None]) -> None:
        """Apply an operator command ``fn(now)`` to the session, then flush (loop thread)."""
        self.driver.guard(self.driver.input, fn)

    # -- outputs -------------------------------------------------------------------------

    def pump(self, now: float | None = None) -> None:
        """Flush every output of the session and re-arm the one timer."""
        self.driver.pump(now)

    def _flush(self, now: float) -> bool:
        """Send the session's outputs; False once it is terminated (no timer then)."""
        session = self.session
        self._send_datagrams(session.datagrams_to_send())
        packets = session.packets_for_tun()
        if packets:
            counters = self.counters
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
            return False
        return True

    def _send_datagrams(self, out: Sequence[tuple[int, bytes]]) -> None:
        """Consecutive datagrams for one path leave in one send_many (UDP GSO)."""
        if not out:
            return
        tap = self.tap
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

    def _send_run(self, path_id: int, run: list[bytes]) -> None:
        p = self.paths.get(path_id)
        counters = self.counters
        if p is None:  # a path removed while the session had something for it
            counters.send_failed += len(run)
            return
        sent = p.sock.send_many(run, p.remote)
        counters.datagrams_out += sent
        counters.send_failed += len(run) - sent

    def _configure_inner(self) -> None:
        s = self.session
        address6 = f"{s.inner_address6}/{s.inner_prefix6}" if s.inner_address6 else ""
        future = self.inner.set_inner_address(
            s.inner_address, s.inner_prefix, s.inner_gateway, s.mtu, address6=address6
        )
        loop = self.driver.loop
        if future is None or loop is None:
            return
        guard = self.driver.guard

        def done(f: Any) -> None:
            loop.call_soon_threadsafe(guard, f.result)  # raises there if it failed

        future.add_done_callback(done)
