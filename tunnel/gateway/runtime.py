"""The gateway's I/O loop: feeds a sans-I/O GatewaySessions from UDP sockets and a TUN.

One :class:`GatewayRuntime` runs one asyncio loop (uvloop when importable). Per listen
address it opens a :class:`~tunnel.io.udp.GatewaySocket` and registers a reader that
drains the socket until it would block (bounded per wake-up); the inner side (a TUN, or
:class:`~tunnel.gateway.inner.EchoInner` for the demo and tests) is read the same
way. After every input the runtime *pumps*: events first (each STATE_CHANGE is mirrored
into the :class:`~tunnel.ownership.SessionStore` with compare-and-swap before any reply
leaves), then datagrams, then inner packets, and finally it re-arms exactly one timer
from ``next_deadline()``. Time is ``time.monotonic()``, read once per input.

Ownership (DESIGN D15): a session's record is created at its first transition and then
replaced only by CAS from the version this node last wrote. A failed CAS (or a store
that cannot answer) means this node is not authoritative: the session is terminated
with ``ownership_conflict`` (TERMINATE sent to the client) and a SECURITY_EVENT is
emitted; the store is not touched again for it. A terminated session's record is removed.

Policy (DESIGN D14): ``reload_policy()`` (SIGHUP in the program, a file-change poll every
second, the thread wrapper) installs a valid policy for new and running sessions; an
invalid one keeps running sessions on the last valid policy, denies new sessions
(``GatewaySessions.set_policy(None)``), emits POLICY_EVENT and clears the health flag.

Host changes happen in :meth:`GatewayRuntime.open` before the loop starts (sockets,
metrics listener, then the TUN and its addresses) and are undone in reverse order by
:meth:`GatewayRuntime.close`. An exception inside a loop callback is an engine failure:
every session is terminated with ``invariant_violation`` and the runtime stops.

The runtime is split by concern; this module composes it and re-exports the public
names of the parts:
- gateway_ownership.py: the ownership-store mirror (``_OwnershipMixin``);
- gateway_policy.py: ``load_initial_policy``, ``reload_policy()`` and the policy-file
  poll (``_PolicyMixin``, ``POLICY_POLL_S``);
- gateway_metrics.py: ``health()``, ``session_views()`` and the Prometheus families with
  the counters behind them (``_MetricsMixin``, ``GatewayHealth``, ``RuntimeCounters``);
- gateway_thread.py: ``GatewayThread`` and ``start_in_thread`` (``CALL_TIMEOUT_S``);
- gateway_inner.py: the inner side (``GatewayTun``, ``EchoInner``);
- here: ``GatewayRuntime`` with construction, the lifecycle, the inputs (sockets, inner
  side, timer) and the pump (events, datagrams, inner packets, the one timer).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NamedTuple, TypeVar

from tunnel.core.events import (
    Event,
    EventType,
    PolicyEvent,
    Reason,
    ReattachResult,
    SecurityEvent,
    SessionTerminated,
    StateChange,
    TransportSwitch,
)
from tunnel.core.gateway import ClientEntry, GatewaySession, GatewaySessions
from tunnel.core.policy import POLICY_DEFAULT, Policy
from tunnel.gateway.inner import EchoInner, GatewayInner, GatewayTun
from tunnel.gateway.metrics import GatewayHealth, RuntimeCounters, _MetricsMixin
from tunnel.gateway.ownership import _OwnershipMixin
from tunnel.gateway.policy_reload import (
    POLICY_POLL_S,
    _policy_signature,
    _PolicyMixin,
    load_initial_policy,
)
from tunnel.gateway.thread import CALL_TIMEOUT_S, GatewayThread, start_in_thread
from tunnel.io.loop import new_event_loop
from tunnel.io.udp import GatewaySocket
from tunnel.observability.metrics import MetricsServer
from tunnel.observability.pipeline import EventPipeline
from tunnel.ownership import MemorySessionStore, SessionStore

__all__ = [
    "BATCH",
    "CALL_TIMEOUT_S",
    "DRAIN_LIMIT",
    "POLICY_POLL_S",
    "TIMER_SLACK_S",
    "GatewayHealth",
    "GatewayRuntime",
    "GatewayThread",
    "PeerAddr",
    "RuntimeCounters",
    "load_initial_policy",
    "start_in_thread",
]

DRAIN_LIMIT: Final = 1024
"""Datagrams (or inner packets) taken per readiness callback: drains a burst, yet one
flooded socket cannot starve the timer and the other sockets."""

BATCH: Final = 64
"""Packets per recv/read call."""

TIMER_SLACK_S: Final = 0.0005
"""A deadline this close to now is handled now instead of arming a ~0 s timer."""

if TYPE_CHECKING:
    from tunnel.gateway.config import GatewayConfig

T = TypeVar("T")


class PeerAddr(NamedTuple):
    """A client's source address as the core sees it, plus the listen socket it used.

    Replies must leave through the socket the client talks to (its source address is
    what the client checks), so the socket index is part of the address.
    """

    host: str
    port: int
    via: int
    """Index of the listen socket."""
    scope_id: int = 0
    """IPv6 scope (link-local); 0 for IPv4."""


class GatewayRuntime(_OwnershipMixin, _PolicyMixin, _MetricsMixin):
    """Drives one GatewaySessions on an asyncio loop; see the module docstring.

    Lifecycle: ``open()`` (binds, configures the host; before any loop runs) ->
    ``await serve()`` on a loop (until ``request_stop()``) -> ``close()``. ``run()`` does
    all three on a fresh loop in the calling thread; :class:`GatewayThread` does it on
    its own thread.
    """

    def __init__(
        self,
        *,
        static_private: bytes,
        clients: Sequence[ClientEntry],
        policy: Policy | None = POLICY_DEFAULT,
        policy_error: str | None = None,
        policy_path: str | os.PathLike[str] | None = None,
        policy_poll_s: float | None = POLICY_POLL_S,
        listen: Sequence[tuple[str, int]] = (("127.0.0.1", 0),),
        inner: GatewayInner | None = None,
        node_id: str = "gateway",
        inner_gateway: str = "10.66.0.1",
        inner_prefix: int = 24,
        mtu: int = 1420,
        pipeline: EventPipeline | None = None,
        own_pipeline: bool = False,
        store: SessionStore | None = None,
        metrics: tuple[str, int] | None = None,
        on_event: Callable[[Event], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        urandom: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if not listen:
            raise ValueError("at least one listen address")
        self.clock = clock
        now = clock()
        self.node_id = node_id
        self.gateway = GatewaySessions(
            static_private=static_private, clients=clients, policy=policy, now=now,
            urandom=urandom, node_id=node_id, wall_offset=wall_clock() - now,
            inner_gateway=inner_gateway, inner_prefix=inner_prefix, mtu=mtu,
        )  # fmt: skip
        if policy is None:
            self.gateway.policy_error = policy_error or "no valid policy loaded"
        self.listen = tuple(listen)
        self.inner: GatewayInner = inner if inner is not None else EchoInner(inner_gateway)
        self.pipeline = pipeline
        self._own_pipeline = own_pipeline
        self.store: SessionStore = store if store is not None else MemorySessionStore()
        self.policy_path = Path(policy_path) if policy_path is not None else None
        self.policy_poll_s = policy_poll_s
        self.metrics_address = metrics
        self.counters = RuntimeCounters()
        self.policy_ok = policy is not None
        self.policy_error: str | None = None if policy is not None else self.gateway.policy_error
        self._last_valid_version = policy.policy_version if policy is not None else "invalid"
        self._on_event = on_event
        self._sockets: list[GatewaySocket] = []
        self._metrics_server: MetricsServer | None = None
        self._inner_ready = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._poll_handle: asyncio.TimerHandle | None = None
        self._policy_sig = _policy_signature(self.policy_path) if self.policy_path else None
        self._by_sid: dict[str, GatewaySession] = {}
        self._not_authoritative: set[str] = set()
        self._opened = False
        self._stop_requested = False
        self.crash: BaseException | None = None
        """The exception that stopped the loop (an engine bug), if any."""
        self.switches: Counter[str] = Counter()
        self.terminations: Counter[str] = Counter()
        self.reattach_rejects: Counter[str] = Counter()
        self.security: Counter[str] = Counter()
        self.sessions_created = 0
        self.sessions_denied = 0

    # -- construction from a configuration file ------------------------------------------

    @classmethod
    def from_config(
        cls,
        config: GatewayConfig,
        *,
        metrics: tuple[str, int] | None = None,
        store: SessionStore | None = None,
        on_event: Callable[[Event], None] | None = None,
    ) -> GatewayRuntime:
        """A runtime for a :class:`tunnel.gateway.config.GatewayConfig` (nothing opened).

        ``metrics`` overrides the file's metrics address. The runtime owns the event
        pipeline built from the configured sinks and closes it in :meth:`close`.
        """
        from tunnel.observability.sinks import JsonlFileSink, Sink, StdoutSink, SyslogSink

        sinks: list[Sink] = []
        for sc in config.sinks:
            if sc.kind == "jsonl" and sc.path is not None:
                sinks.append(JsonlFileSink(sc.path, max_bytes=sc.max_bytes, backups=sc.backups))
            elif sc.kind == "syslog" and sc.host is not None:
                sinks.append(
                    SyslogSink(sc.host, sc.port, transport=sc.transport, app_name="jvpn-gateway")
                )
            elif sc.kind == "stdout":
                sinks.append(StdoutSink())
        policy, error = load_initial_policy(config.policy_path)
        prefix = config.subnet.prefixlen
        inner: GatewayInner = (
            EchoInner(config.gateway_address)
            if config.inner_echo
            else GatewayTun(config.tun_name, config.mtu, config.gateway_address, prefix)
        )
        return cls(
            static_private=config.private_key, clients=config.clients, policy=policy,
            policy_error=error, policy_path=config.policy_path, listen=config.listen,
            inner=inner, node_id=config.node_id, inner_gateway=config.gateway_address,
            inner_prefix=prefix, mtu=config.mtu,
            pipeline=EventPipeline(sinks) if sinks else None, own_pipeline=True,
            store=store, metrics=metrics if metrics is not None else config.metrics,
            on_event=on_event,
        )  # fmt: skip

    # -- lifecycle -----------------------------------------------------------------------

    def open(self) -> GatewayRuntime:
        """Bind the sockets and the metrics listener, then set up the inner side.

        Runs before the loop (never on it). On failure everything done so far is undone
        and the error (PathError, OSError, TunError, NetConfError) propagates.
        """
        if self._opened:
            return self
        self._opened = True
        try:
            for host, port in self.listen:
                self._sockets.append(GatewaySocket((host, port)))
            if self.metrics_address is not None:
                host, port = self.metrics_address
                self._metrics_server = MetricsServer(host, port, self.collect_metrics)
            self.inner.setup()
            self._inner_ready = True
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Undo :meth:`open` in reverse order and close an owned pipeline. Idempotent."""
        errors: list[BaseException] = []
        if self._inner_ready:
            self._inner_ready = False
            try:
                self.inner.teardown()
            except Exception as exc:  # keep closing the rest; reported below
                errors.append(exc)
        if self._metrics_server is not None:
            self._metrics_server.close()
            self._metrics_server = None
        for sock in self._sockets:
            sock.close()
        if self.pipeline is not None and self._own_pipeline:
            self.pipeline.close()
        if errors:
            raise errors[0]

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The bound listen addresses (the kernel's ports when 0 was asked)."""
        return [(str(s.local_address[0]), int(s.local_address[1])) for s in self._sockets]

    @property
    def metrics_bound(self) -> tuple[str, int] | None:
        """The metrics listener's bound address, if any."""
        return self._metrics_server.address if self._metrics_server is not None else None

    def run(
        self, *, install_signals: bool = False, on_ready: Callable[[], None] | None = None
    ) -> None:
        """open(), serve on a fresh loop in this thread until stopped, close()."""
        self.open()
        try:
            loop = new_event_loop()
            try:
                loop.run_until_complete(
                    self.serve(install_signals=install_signals, on_ready=on_ready)
                )
            finally:
                loop.close()
        finally:
            self.close()

    async def serve(
        self, *, install_signals: bool = False, on_ready: Callable[[], None] | None = None
    ) -> None:
        """Run on the current loop until :meth:`request_stop`; then end every session.

        ``on_ready`` is called once readers and signal handlers are in place.
        """
        if not self._opened:
            raise RuntimeError("GatewayRuntime.open() must be called before serve()")
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stop = asyncio.Event()
        if self._stop_requested:
            self._stop.set()
        for index, sock in enumerate(self._sockets):
            loop.add_reader(sock.fileno(), self._guard, self._on_socket, index)
        self.inner.start(loop, lambda: self._guard(self._on_inner))
        if install_signals:
            loop.add_signal_handler(signal.SIGINT, self.request_stop)
            loop.add_signal_handler(signal.SIGTERM, self.request_stop)
            loop.add_signal_handler(signal.SIGHUP, self._guard, self._reload_from_signal)
        if self.policy_path is not None and self.policy_poll_s:
            self._poll_handle = loop.call_later(self.policy_poll_s, self._guard, self._poll)
        if not self.policy_ok:
            self._guard(self._announce_invalid_start)
        self._guard(self.pump)
        if on_ready is not None:
            on_ready()
        try:
            await self._stop.wait()
        finally:
            self._shutdown(loop, install_signals)

    def _shutdown(self, loop: asyncio.AbstractEventLoop, signals: bool) -> None:
        if self.crash is None:
            try:
                now = self.clock()
                self.gateway.terminate_all(now, Reason.OPERATOR_TERMINATED)
                self.pump(now)
            except Exception as exc:  # the engine failed while stopping: still clean up
                self.crash = exc
        if self._timer is not None:
            self._timer.cancel()
        if self._poll_handle is not None:
            self._poll_handle.cancel()
        for sock in self._sockets:
            if not sock.closed:
                loop.remove_reader(sock.fileno())
        self.inner.stop()
        if signals:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        self._loop = None

    def request_stop(self) -> None:
        """Ask the loop to end every session and return from serve(); any thread."""
        self._stop_requested = True
        loop, stop = self._loop, self._stop
        if loop is None or stop is None:
            return
        try:
            loop.call_soon_threadsafe(stop.set)
        except RuntimeError:
            pass  # the loop already closed: serve() has returned

    def call(self, fn: Callable[[], T], timeout: float = CALL_TIMEOUT_S) -> T:
        """Run ``fn()`` on the loop thread and return its result (from any other thread)."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("the gateway loop is not running")

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), loop).result(timeout)

    # -- inputs --------------------------------------------------------------------------

    def _guard(self, fn: Callable[..., None], *args: Any) -> None:
        if self.crash is not None:
            return
        try:
            fn(*args)
        except Exception as exc:  # the engine boundary: a coded termination, then stop
            self.crash = exc
            try:
                now = self.clock()
                self.gateway.terminate_all(now, Reason.INVARIANT_VIOLATION)
                self._flush_datagrams()
                for event in self.gateway.events():
                    self._deliver(event)
            except Exception as again:  # nothing more can be done for the sessions
                exc.add_note(f"terminating sessions after the failure also failed: {again!r}")
            self.request_stop()

    def _on_socket(self, index: int) -> None:
        now = self.clock()
        sock = self._sockets[index]
        receive = self.gateway.receive_datagram
        taken = 0
        last: object = None
        peer = PeerAddr("", 0, index)
        while taken < DRAIN_LIMIT:
            batch = sock.recv_batch(BATCH)
            for data, addr in batch:
                if addr != last:  # a burst (a GRO read) comes from one address
                    last = addr
                    peer = PeerAddr(addr[0], addr[1], index, addr[3] if len(addr) > 3 else 0)
                receive(data, peer, now)
            taken += len(batch)
            if len(batch) < BATCH:
                break
        self.counters.datagrams_in += taken
        self.pump(now)

    def _on_inner(self) -> None:
        now = self.clock()
        receive = self.gateway.receive_tun_packet
        taken = 0
        while taken < DRAIN_LIMIT:
            batch = self.inner.read_batch(BATCH)
            for packet in batch:
                receive(packet, now)
            taken += len(batch)
            if len(batch) < BATCH:
                break
        self.counters.inner_in += taken
        self.pump(now)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        now = self.clock()
        self.gateway.handle_timer(now)
        self.pump(now)

    # -- outputs -------------------------------------------------------------------------

    def pump(self, now: float | None = None) -> None:
        """Events (with store mirroring), then datagrams, then inner packets; re-arm."""
        if now is None:
            now = self.clock()
        gateway = self.gateway
        while events := gateway.events():
            for event in events:
                if isinstance(event, StateChange):
                    self._mirror(event, now)
                self._deliver(event)
        self._flush_datagrams()
        packets = gateway.packets_for_tun()
        if packets:
            self.counters.inner_out += len(packets)
            self.inner.write_batch(packets)
        self._arm(now)

    def _flush_datagrams(self) -> None:
        """Send what the core produced; consecutive datagrams to one client leave in one
        ``send_many`` (UDP GSO)."""
        out = self.gateway.datagrams_to_send()
        if not out:
            return
        run: list[bytes] = []
        run_addr: object = None
        for addr, data in out:
            if addr != run_addr:
                if run:
                    self._send_run(run_addr, run)
                run = []
                run_addr = addr
            run.append(data)
        self._send_run(run_addr, run)

    def _send_run(self, addr: object, run: list[bytes]) -> None:
        counters = self.counters
        if not isinstance(addr, PeerAddr):
            counters.send_failed += len(run)
            return
        sock = self._sockets[addr.via]
        target: tuple[Any, ...] = (
            (addr.host, addr.port, 0, addr.scope_id)
            if sock.family == socket.AF_INET6
            else (addr.host, addr.port)
        )
        sent = sock.send_many(run, target)
        counters.datagrams_out += sent
        counters.send_failed += len(run) - sent

    def _deliver(self, event: Event) -> None:
        kind = event.event_type
        if kind is EventType.TRANSPORT_SWITCH and isinstance(event, TransportSwitch):
            self.switches[str(event.reason_code)] += 1
        elif kind is EventType.SESSION_TERMINATED and isinstance(event, SessionTerminated):
            self.terminations[str(event.reason_code)] += 1
        elif kind is EventType.SESSION_CREATED:
            self.sessions_created += 1
        elif kind is EventType.REATTACH_RESULT and isinstance(event, ReattachResult):
            if event.status != "SUCCESS":
                self.reattach_rejects[str(event.reason_code)] += 1
        elif kind is EventType.SECURITY_EVENT and isinstance(event, SecurityEvent):
            self.security[event.violation_type] += event.count
        elif kind is EventType.POLICY_EVENT and isinstance(event, PolicyEvent):
            if event.policy_name == "SESSION_DENIED":
                self.sessions_denied += 1
        if self.pipeline is not None:
            self.pipeline.emit(event)
        if self._on_event is not None:
            self._on_event(event)

    def _arm(self, now: float) -> None:
        deadline = self.gateway.next_deadline()
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
