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

Persistence (DESIGN D15a): with a persistent store and a state sealer
(``[state] store = "sqlite"``, the program's default) a
:class:`~tunnel.gateway.resume.SessionPersistence` seals each session's resume state into
its record, reserves send counters in blocks before datagrams leave (a step of the flush,
after the events), resumes the stored sessions when :meth:`GatewayRuntime.serve` starts,
and a stop (SIGTERM) ends no session: it saves them, and clients resume when the gateway
is back. With the memory store a stop ends every session.

Policy (DESIGN D14): ``reload_policy()`` (SIGHUP in the program, a file-change poll every
second, the thread wrapper) installs a valid policy for new and running sessions; an
invalid one keeps running sessions on the last valid policy, denies new sessions
(``GatewaySessions.set_policy(None)``), emits POLICY_EVENT and clears the health flag.

Host changes happen in :meth:`GatewayRuntime.open` before the loop starts (sockets,
metrics listener, then the TUN and its addresses) and are undone in reverse order by
:meth:`GatewayRuntime.close`. An exception inside a loop callback is an engine failure:
every session is terminated with ``invariant_violation`` and the runtime stops.

The runtime is composed of components it owns and calls (each owns its state):
- :class:`tunnel.io.loop.DriverLoop`: guarded callbacks, bounded drains, the one timer;
- :class:`tunnel.gateway.ownership.OwnershipMirror`: the ownership-store mirror;
- :class:`tunnel.gateway.policy_reload.PolicyReloader`: the policy file and its status;
- :class:`tunnel.gateway.clients_reload.ClientsReloader`: the clients and their reloads
  from ``clients_dir`` (SIGHUP and the control socket's ``reload``: ``reload_clients()``);
- :class:`tunnel.gateway.metrics.GatewayMetrics`: health, session views, the Prometheus
  families and the event tallies behind them;
- :class:`tunnel.gateway.control.GatewayControl` (with a control socket): the control
  server, its status, history and commands (``reload_policy_guarded``,
  ``terminate_session``), and the per-client inner traffic counters;
- the inner side (:mod:`tunnel.gateway.inner`).
Here: ``GatewayRuntime`` with construction, the lifecycle, the inputs (sockets, inner
side, signals, the policy poll) and the flush (events, datagrams, inner packets).
:mod:`tunnel.gateway.thread` runs it on a thread of its own.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NamedTuple, TypeGuard, TypeVar

from tunnel.control.protocol import ControlError
from tunnel.core.ciphers import ALL_CIPHERS, DataCipher
from tunnel.core.events import Diagnostic, Event, Reason, StateChange
from tunnel.core.gateway import ClientEntry, GatewaySessions, SessionView
from tunnel.core.policy import POLICY_DEFAULT, Policy
from tunnel.gateway.clients_reload import ClientsReloader
from tunnel.gateway.cluster import ClusterNode, open_cluster
from tunnel.gateway.control import STATUS_INTERVAL_S, GatewayControl
from tunnel.gateway.gcfreeze import TICK_S as GC_TICK_S
from tunnel.gateway.gcfreeze import GcFreezer, gc_families
from tunnel.gateway.handshake_budget import handshake_budget
from tunnel.gateway.inner import EchoInner, GatewayInner, GatewayTun
from tunnel.gateway.metrics import GatewayHealth, GatewayMetrics, TrafficCounters
from tunnel.gateway.ownership import OwnershipMirror
from tunnel.gateway.policy_reload import POLICY_POLL_S, PolicyReloader, load_initial_policy
from tunnel.gateway.resume import SessionPersistence, open_state
from tunnel.gateway.routehook import RouteConfig, RouteHook, RouteResult, SessionRoutes
from tunnel.io.loop import DriverLoop, drain, new_event_loop
from tunnel.io.udp import GatewaySocket
from tunnel.observability.metrics import MetricFamily, MetricsServer, PrometheusPublisher
from tunnel.observability.pipeline import EventPipeline, Report
from tunnel.ownership import MemorySessionStore, ResumableStore, SessionStore
from tunnel.ownership.statekey import StateSealer

CALL_TIMEOUT_S: Final = 5.0
"""How long a thread waits for the loop to run something for it (metrics, commands)."""

CONTROL_FLUSH_S: Final = 1.0
"""At the end, how long control-socket watchers get to read the last events (bounded)."""

SHUTDOWN_BATCH: Final = 64
"""Sessions ended per step of a shutdown (their TERMINATEs and events leave before the
next step: the outbox and the event queue stay bounded whatever the number of sessions)."""

EVENT_ROUNDS: Final = 8
"""Rounds of the core's event queue taken per flush. Mirroring an event can make the core
emit more (an ownership conflict ends the session); a round bound keeps one flush finite
whatever a peer sends. Events left over wait for the next flush."""

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


def _clustered(config: GatewayConfig | None) -> TypeGuard[GatewayConfig]:
    """``config`` has a ``[cluster]`` section."""
    return config is not None and config.cluster is not None


def _persistence(
    gateway: GatewaySessions,
    store: SessionStore,
    sealer: StateSealer | None,
    node_id: str,
    make_addr: Callable[..., PeerAddr],
    persistent: bool,
    on_refused: Callable[[str, float], bool] | None,
) -> SessionPersistence | None:
    """The resume side of a persistent store with a sealer, else None."""
    if persistent and isinstance(store, ResumableStore) and sealer is not None:
        return SessionPersistence(gateway, store, sealer, node_id, make_addr, on_refused=on_refused)
    return None


def _set_handshake_budget(
    gateway: GatewaySessions, config: GatewayConfig | None, workers: int, now: float
) -> None:
    """DH on as many INITs as half this core can answer (measured once per process), or
    this worker's share of the configured ``handshake_rate``."""
    rate = config.handshake_rate if config is not None else None
    if rate is None:
        gateway.admission.set_handshake_rate(handshake_budget(), now)
    else:
        gateway.admission.set_handshake_rate(rate, now, share=workers)


class GatewayRuntime:
    """Drives one GatewaySessions on an asyncio loop; see the module docstring.

    Lifecycle: ``open()`` (binds, configures the host; before any loop runs) ->
    ``await serve()`` on a loop (until ``request_stop()``) -> ``close()``. ``run()`` does
    all three on a fresh loop in the calling thread;
    :class:`~tunnel.gateway.thread.GatewayThread` does it on its own thread.
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
        inner_gateway6: str = "",
        inner_prefix6: int = 0,
        mtu: int = 1420,
        pipeline: EventPipeline | None = None,
        own_pipeline: bool = False,
        store: SessionStore | None = None,
        sealer: StateSealer | None = None,
        own_store: bool = False,
        metrics: tuple[str, int] | None = None,
        control: Path | None = None,
        control_required: bool = True,
        on_event: Callable[[Event], None] | None = None,
        config: GatewayConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        urandom: Callable[[int], bytes] = os.urandom,
        ciphers: Sequence[DataCipher] = ALL_CIPHERS,
        index_stripe: tuple[int, int] = (0, 1),
        sockets: Sequence[GatewaySocket] = (),
        publish_metrics_s: float | None = None,
        route: RouteConfig | None = None,
        announce_node: bool = False,
    ) -> None:
        """``index_stripe`` and ``sockets`` make it worker ``w`` of ``n``
        (:mod:`tunnel.gateway.workers`): receiver indexes in its stripe, and its slot of
        each listen address's reuseport group, already bound (``listen`` is not bound);
        ``publish_metrics_s``: publish the metrics this often (and at the end) for a
        scraper elsewhere (the workers' supervisor); otherwise a scrape publishes.
        ``route``: how inner routing follows this node ([cluster] route keys).
        ``announce_node``: a cluster node: clients are told ``node_id`` and their owner
        epoch (docs/wire-format.md, NODE_INFO)."""
        if not listen:
            raise ValueError("at least one listen address")
        self.clock = clock
        now = clock()
        self.node_id = node_id
        cluster_config = config if store is None and _clustered(config) else None
        clustered = cluster_config is not None
        store = store if store is not None else MemorySessionStore()
        self._own_store = own_store
        persistent = clustered or (
            isinstance(store, ResumableStore) and store.persistent and sealer is not None
        )
        self.gateway: GatewaySessions = GatewaySessions(
            static_private=static_private, clients=clients, policy=policy, now=now,
            urandom=urandom, node_id=node_id, wall_offset=wall_clock() - now,
            inner_gateway=inner_gateway, inner_prefix=inner_prefix, mtu=mtu,
            inner_gateway6=inner_gateway6, inner_prefix6=inner_prefix6, ciphers=ciphers,
            index_stripe=index_stripe, counter_reservations=persistent,
            announce_node=announce_node,
        )  # fmt: skip
        _set_handshake_budget(self.gateway, config, index_stripe[1], now)
        self.cluster: ClusterNode | None = (
            open_cluster(cluster_config, self.gateway, self._stored_addr)
            if cluster_config is not None
            else None
        )
        """With ``[cluster]``: this node's ownership (tunnel/gateway/cluster.py)."""
        store, sealer = self.cluster.store_and_sealer() if self.cluster else (store, sealer)
        # a cluster node: a refused write takes the session away, without a word
        refused = self.cluster.not_authoritative if self.cluster is not None else None
        self.persistence: SessionPersistence | None = _persistence(
            self.gateway, store, sealer, node_id, self._stored_addr, persistent, refused
        )
        self.resumed: tuple[int, list[str]] = (0, [])
        """At start: how many stored sessions were resumed, and a line per one that was not."""
        self.listen = tuple(listen)
        self._given_sockets = tuple(sockets)
        self.clients = tuple(clients)
        self.inner: GatewayInner = (
            inner if inner is not None else EchoInner(inner_gateway, inner_gateway6)
        )
        self.pipeline = pipeline
        self._own_pipeline = own_pipeline
        self.metrics_address = metrics
        self.policy_poll_s = policy_poll_s
        self.driver: DriverLoop = DriverLoop(
            self.gateway, flush=self._flush, on_crash=self._on_crash, clock=clock
        )
        self.policy: PolicyReloader = PolicyReloader(
            self.gateway, Path(policy_path) if policy_path is not None else None,
            policy, policy_error,
        )  # fmt: skip
        self.clients_reload: ClientsReloader = ClientsReloader(self.gateway, config, clients)
        """The clients and their reloads from ``config.clients_dir`` (SIGHUP)."""
        self.ownership: OwnershipMirror = OwnershipMirror(
            self.gateway, store, node_id, self.persistence, on_refused=refused
        )
        self.traffic: TrafficCounters = TrafficCounters()
        self.metrics: GatewayMetrics = GatewayMetrics(
            self.gateway, traffic=self.traffic, policy=self.policy,
            ownership=self.ownership, pipeline=pipeline,
        )  # fmt: skip
        self.prometheus: PrometheusPublisher = PrometheusPublisher()
        """The metrics as prometheus_client's (published from :attr:`metrics`' families)."""
        self._publish_s = publish_metrics_s
        self._publish_handle: asyncio.TimerHandle | None = None
        self.control: GatewayControl | None = (
            GatewayControl(self, control) if control is not None else None
        )
        self._control_required = control_required
        self.control_warning: str | None = None
        """Why the (default, best-effort) control socket is not served, if it is not."""
        self._on_event = on_event
        self._sockets: list[GatewaySocket] = []
        self._metrics_server: MetricsServer | None = None
        self._inner_ready = False
        self._stop: asyncio.Event | None = None
        self._poll_handle: asyncio.TimerHandle | None = None
        self._status_handle: asyncio.TimerHandle | None = None
        self.gc_freezer: GcFreezer | None = None
        """The program's garbage-collector policy (tunnel/gateway/gcfreeze.py), ticked on
        the loop while the runtime runs; None in a process that is not a gateway program."""
        self._gc_handle: asyncio.TimerHandle | None = None
        self._opened = False
        self._stop_requested = False
        self.route_hook: RouteHook | None = self._route_hook(route)
        """Inner routing follows the owner ([cluster] route keys; tunnel/gateway/routehook.py):
        a cluster node's ownership drives it; a single gateway's session events do."""
        self.routes: SessionRoutes | None = self._session_routes()

    def _route_hook(self, route: RouteConfig | None) -> RouteHook | None:
        hook: object = (
            self.cluster.hook if self.cluster is not None
            else RouteHook.from_config(route) if route is not None else None
        )  # fmt: skip
        if not isinstance(hook, RouteHook):
            return None
        hook.report_to(self._route_result_threadsafe)
        return hook

    def _session_routes(self) -> SessionRoutes | None:
        if self.route_hook is None or self.cluster is not None:
            return None
        return SessionRoutes(self.route_hook, lambda: self.clients)

    @property
    def crash(self) -> BaseException | None:
        """The exception that stopped the loop (an engine bug), if any."""
        return self.driver.crash

    # -- construction from a configuration file ------------------------------------------

    @classmethod
    def from_config(
        cls,
        config: GatewayConfig,
        *,
        metrics: tuple[str, int] | None = None,
        store: SessionStore | None = None,
        on_event: Callable[[Event], None] | None = None,
        on_sink_report: Report | None = None,
        inner: GatewayInner | None = None,
        **worker: Any,
    ) -> GatewayRuntime:
        """A runtime for a :class:`tunnel.gateway.config.GatewayConfig` (nothing opened).

        ``metrics`` overrides the file's metrics address. The runtime owns the event
        pipeline built from the configured sinks and closes it in :meth:`close`;
        ``on_sink_report`` gets its EVENT_LOSS and SINK_HEALTH reports (the console).
        ``inner`` replaces the configured inner side; ``worker``: ``index_stripe`` and
        ``sockets`` of a worker (:mod:`tunnel.gateway.workers`).
        """
        from tunnel.gateway.sinks import gateway_sinks

        sinks = gateway_sinks(config)
        sealer: StateSealer | None = None
        own_store = store is None and config.state.persistent and config.cluster is None
        if own_store:
            store, sealer = open_state(config.state)  # StateError: the program's exit
        policy, error = load_initial_policy(config.policy_path)
        prefix = config.subnet.prefixlen
        prefix6 = config.subnet6.prefixlen if config.subnet6 is not None else 0
        cidr6 = f"{config.gateway_address6}/{prefix6}" if config.gateway_address6 else None
        inner = inner or (
            EchoInner(config.gateway_address, config.gateway_address6)
            if config.inner_echo
            else GatewayTun(config.tun_name, config.mtu, config.gateway_address, prefix, cidr6)
        )
        return cls(
            static_private=config.private_key, clients=config.clients, policy=policy,
            policy_error=error, policy_path=config.policy_path, listen=config.listen,
            inner=inner, node_id=config.node_id, inner_gateway=config.gateway_address,
            inner_prefix=prefix, mtu=config.mtu, inner_gateway6=config.gateway_address6,
            inner_prefix6=prefix6,
            pipeline=EventPipeline(sinks, on_report=on_sink_report) if sinks else None,
            own_pipeline=True,
            store=store, sealer=sealer, own_store=own_store,
            metrics=metrics if metrics is not None else config.metrics,
            control=config.control_socket, control_required=config.control_required,
            on_event=on_event, config=config, ciphers=config.ciphers, route=config.route,
            announce_node=config.cluster is not None, **worker,
        )  # fmt: skip

    # -- lifecycle -----------------------------------------------------------------------

    def open(self) -> GatewayRuntime:
        """Bind the sockets, the metrics listener and the control socket, then set up the
        inner side.

        Runs before the loop (never on it). On failure everything done so far is undone
        and the error (PathError, OSError, ControlError, TunError, NetConfError)
        propagates.
        """
        if self._opened:
            return self
        self._opened = True
        try:
            self._sockets.extend(self._given_sockets)
            for host, port in self.listen if not self._given_sockets else ():
                self._sockets.append(GatewaySocket((host, port)))
            if self.metrics_address is not None:
                host, port = self.metrics_address
                self._metrics_server = MetricsServer(host, port, self.metrics_text)
            self._listen_control()
            self.inner.setup()
            self._inner_ready = True
            if self.route_hook is not None:
                stale = [a for c in self.clients for a in (c.inner_address, c.inner_address6) if a]
                self.route_hook.start(stale)
        except BaseException:
            self.close()
            raise
        return self

    def _listen_control(self) -> None:
        """Create the control socket; a default one that cannot be (another gateway holds
        it) is left out with :attr:`control_warning`, a configured one raises."""
        if self.control is None:
            return
        try:
            self.control.listen()
        except ControlError as exc:
            if self._control_required:
                raise
            self.control_warning = str(exc)
            self.control = None

    def close(self) -> None:
        """Undo :meth:`open` in reverse order and close an owned pipeline. Idempotent."""
        errors: list[BaseException] = []
        if self.route_hook is not None:
            self.route_hook.close()
        if self._inner_ready:
            self._inner_ready = False
            try:
                self.inner.teardown()
            except Exception as exc:  # keep closing the rest; reported below
                errors.append(exc)
        if self.control is not None:
            self.control.discard()
        if self._metrics_server is not None:
            self._metrics_server.close()
            self._metrics_server = None
        for sock in self._sockets:
            sock.close()
        if self.cluster is not None:
            self.cluster.close()
        if self.pipeline is not None and self._own_pipeline:
            self.pipeline.close()
        store = self.ownership.store
        if self._own_store and hasattr(store, "close"):
            store.close()
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
        driver = self.driver
        driver.attach(loop)
        self._stop = asyncio.Event()
        if self._stop_requested:
            self._stop.set()
        if self.cluster is not None:
            self.cluster.attach(loop, lambda fn, *a: driver.guard(driver.input, fn, *a))
        elif self.persistence is not None:
            driver.guard(self._resume_sessions)
        for index, sock in enumerate(self._sockets):
            driver.add_reader(sock.fileno(), self._on_socket, index)
        self.inner.start(loop, lambda: driver.guard(self._on_inner))
        if install_signals:
            loop.add_signal_handler(signal.SIGINT, self.request_stop)
            loop.add_signal_handler(signal.SIGTERM, self.request_stop)
            loop.add_signal_handler(signal.SIGHUP, driver.guard, self._reload_from_signal)
        if self.policy.path is not None and self.policy_poll_s:
            self._poll_handle = driver.call_later(self.policy_poll_s, self._poll)
        if self.control is not None:
            await self.control.start()
            self._status_handle = driver.call_later(STATUS_INTERVAL_S, self._publish_status)
        if self._publish_s:
            self._publish_handle = driver.call_later(self._publish_s, self._publish_metrics)
        if self.gc_freezer is not None:
            self._gc_handle = driver.call_later(GC_TICK_S, self._gc_tick)
        if not self.policy.ok:
            driver.guard(self._announce_invalid_start)
        driver.guard(self.clients_reload.announce_start, self.clock())
        driver.guard(self.pump)
        if on_ready is not None:
            on_ready()
        try:
            await self._stop.wait()
        finally:
            self._shutdown(loop, install_signals)
            if self.control is not None:
                await self.control.close(CONTROL_FLUSH_S)

    def _stored_addr(self, host: str, port: int, via: int, scope_id: int = 0) -> PeerAddr:
        """A client address from the store; ValueError when its listen socket is gone."""
        if not 0 <= via < len(self.listen):
            raise ValueError(f"listen socket {via} is not configured")
        return PeerAddr(str(host), int(port), via, int(scope_id))

    def _resume_sessions(self) -> None:
        assert self.persistence is not None
        now = self.clock()
        self.resumed = self.persistence.restore(self.clients, now)
        if self.routes is not None:
            for s in self.gateway.sessions.values():
                if not s.machine.terminated:
                    addresses = [s.client.inner_address, s.client.inner_address6]
                    self.routes.acquire(s.machine.session_id, [a for a in addresses if a])
        self.pump(now)

    def _shutdown(self, loop: asyncio.AbstractEventLoop, signals: bool) -> None:
        if self.crash is None:
            try:
                if self.persistence is not None:  # sessions outlive the process (D15c)
                    self.persistence.save_all(self.clock())
                    if self.cluster is not None:  # then give them up (another node resumes)
                        self.cluster.shutdown(self.clock())
                        self.pump()
                else:
                    self._terminate_in_batches(self.clock())
            except Exception as exc:  # the engine failed while stopping: still clean up
                self.driver.fail(exc)
        if self._poll_handle is not None:
            self._poll_handle.cancel()
        if self._status_handle is not None:
            self._status_handle.cancel()
        if self._gc_handle is not None:
            self._gc_handle.cancel()
        if self._publish_handle is not None:
            self._publish_handle.cancel()
            self.publish_metrics()  # the final counts, for the scraper elsewhere
        for sock in self._sockets:
            if not sock.closed:
                loop.remove_reader(sock.fileno())
        self.inner.stop()
        if signals:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        self.driver.detach()

    def _terminate_in_batches(self, now: float, reason: Reason = Reason.GATEWAY_SHUTDOWN) -> None:
        """End every session, SHUTDOWN_BATCH at a time, each batch's TERMINATEs (and events)
        sent before the next: bounded work per step, linear in the number of sessions.
        ``gateway_shutdown``: the sessions die with this gateway (its store keeps nothing),
        and the clients know it is not their operator's stop (DESIGN D15c)."""
        indexes = list(self.gateway.sessions)
        for start in range(0, len(indexes), SHUTDOWN_BATCH):
            batch = indexes[start : start + SHUTDOWN_BATCH]
            self.gateway.terminate_many(batch, now, reason)
            self.pump(now)
        self.pump(now)

    def request_stop(self) -> None:
        """Ask the loop to end every session and return from serve(); any thread."""
        self._stop_requested = True
        loop, stop = self.driver.loop, self._stop
        if loop is None or stop is None:
            return
        try:
            loop.call_soon_threadsafe(stop.set)
        except RuntimeError:
            pass  # the loop already closed: serve() has returned

    def call(self, fn: Callable[[], T], timeout: float = CALL_TIMEOUT_S) -> T:
        """Run ``fn()`` on the loop thread and return its result (from any other thread)."""
        loop = self.driver.loop
        if loop is None:
            raise RuntimeError("the gateway loop is not running")

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), loop).result(timeout)

    # -- views (loop thread, or via :meth:`call`) ------------------------------------------

    def health(self) -> GatewayHealth:
        """The health flags."""
        return self.metrics.health(self.crash)

    def session_views(self) -> list[SessionView]:
        """Every session the core still holds."""
        return self.metrics.session_views(self.clock())

    def metric_families(self) -> list[MetricFamily]:
        """Every gateway metric (:meth:`metrics_text` from other threads)."""
        families = self.metrics.metric_families()
        if self.cluster is not None:
            families.extend(self.cluster.metric_families())
        if self.route_hook is not None:
            families.extend(self.route_hook.metric_families())
        if self.gc_freezer is not None:
            families.extend(gc_families(self.gc_freezer))
        return families

    def publish_metrics(self) -> None:
        """Publish :meth:`metric_families` into :attr:`prometheus` (loop thread)."""
        self.prometheus.publish(self.metric_families())

    def metrics_text(self) -> bytes:
        """The exposition, published on the loop thread first (safe from any thread)."""
        self.call(self.publish_metrics)
        return self.prometheus.exposition()

    def _publish_metrics(self) -> None:
        self._publish_handle = None
        if self._publish_s is None or self.driver.loop is None:
            return
        self.publish_metrics()
        self._publish_handle = self.driver.call_later(self._publish_s, self._publish_metrics)

    # -- policy --------------------------------------------------------------------------

    def reload_policy(self) -> bool:
        """Reload the policy file now (loop thread); True if it was valid and applied.

        Without a policy file the built-in defaults stay; this returns True.
        """
        if self.policy.path is None:
            return True
        now = self.clock()
        ok = self.policy.reload(now)
        self.driver.pump(now)
        return ok

    def reload_clients(self) -> bool:
        """Read ``clients_dir`` again (loop thread; tunnel/gateway/clients_reload.py);
        False if the directory could not be read. True without one."""
        if not self.clients_reload.reloadable:
            return True
        now = self.clock()
        ok = self.clients_reload.reload(now)
        self.clients = self.clients_reload.clients
        if self.control is not None:
            self.control.traffic.add(self.clients)
        self.driver.pump(now)
        return ok

    def _reload_from_signal(self) -> None:
        self.reload_policy()
        self.reload_clients()

    def reload_policy_guarded(self) -> bool:
        """SIGHUP's reload (the policy, then the clients) as a guarded callback (an
        exception is an engine failure, as for SIGHUP); False if either failed. Loop
        thread (the control socket's command)."""
        result: list[bool] = []
        self.driver.guard(lambda: result.extend((self.reload_policy(), self.reload_clients())))
        return bool(result and all(result))

    # -- operator commands (loop thread) -------------------------------------------------

    def terminate_session(self, session_id: str) -> bool:
        """End one session with ``operator_terminated`` (TERMINATE sent to the client);
        False if no live session has that id. Guarded like every input."""
        result: list[bool] = []

        def end(now: float) -> None:
            result.append(self.gateway.terminate(session_id, now, Reason.OPERATOR_TERMINATED))

        self.driver.guard(self.driver.input, end)
        return bool(result and result[0])

    def _publish_status(self) -> None:
        self._status_handle = None
        if self.control is None or self.driver.loop is None:
            return
        self.control.publish_status()
        self._status_handle = self.driver.call_later(STATUS_INTERVAL_S, self._publish_status)

    def set_gc_freezer(self, freezer: GcFreezer | None) -> None:
        """The program's collector policy, ticked on the loop while the runtime runs (set
        before :meth:`run`)."""
        self.gc_freezer = freezer

    def _gc_tick(self) -> None:
        self._gc_handle = None
        if self.gc_freezer is None or self.driver.loop is None:
            return
        self.gc_freezer.tick()
        self._gc_handle = self.driver.call_later(GC_TICK_S, self._gc_tick)

    def _announce_invalid_start(self) -> None:
        self.policy.announce_invalid_start(self.clock())

    def _poll(self) -> None:
        self._poll_handle = None
        assert self.policy_poll_s
        if self.policy.file_changed():
            self.reload_policy()
        if self.driver.loop is not None:
            self._poll_handle = self.driver.call_later(self.policy_poll_s, self._poll)

    # -- inputs --------------------------------------------------------------------------

    def _on_crash(self, exc: BaseException) -> None:
        """An engine failure in a loop callback: a coded termination of every session,
        then stop."""
        try:
            now = self.clock()
            self.gateway.terminate_all(now, Reason.INVARIANT_VIOLATION)
            self._reserve_counters(now)
            self._flush_datagrams()
            for event in self.gateway.events():
                self._deliver(event)
        except Exception as again:  # nothing more can be done for the sessions
            exc.add_note(f"terminating sessions after the failure also failed: {again!r}")
        self.request_stop()

    def _on_socket(self, index: int) -> None:
        self.driver.input(self._read_socket, index)

    def _read_socket(self, now: float, index: int) -> None:
        sock = self._sockets[index]
        self.traffic.datagrams_in += drain(sock.recv_batch, self._take_datagrams, index, now)

    def _take_datagrams(self, batch: Sequence[tuple[bytes, Any]], index: int, now: float) -> None:
        receive = self.gateway.receive_datagram
        last: object = None
        peer = PeerAddr("", 0, index)
        for data, addr in batch:
            if addr != last:  # a burst (a GRO read) comes from one address
                last = addr
                peer = PeerAddr(addr[0], addr[1], index, addr[3] if len(addr) > 3 else 0)
            receive(data, peer, now)

    def _on_inner(self) -> None:
        self.driver.input(self._read_inner)

    def _read_inner(self, now: float) -> None:
        self.traffic.inner_in += drain(self.inner.read_batch, self._take_packets, now)

    def _take_packets(self, batch: Sequence[bytes], now: float) -> None:
        if self.control is not None:
            self.control.traffic.to_clients(batch)
        receive = self.gateway.receive_tun_packet
        for packet in batch:
            receive(packet, now)

    # -- outputs -------------------------------------------------------------------------

    def pump(self, now: float | None = None) -> None:
        """Events (with store mirroring), then datagrams, then inner packets; re-arm."""
        self.driver.pump(now)

    def _flush(self, now: float) -> bool:
        if self.persistence is None:
            return self._flush_unbatched(now)
        with self.persistence.batch(now):  # one store transaction per turn
            self._mirror_events(now)
            self._reserve_counters(now)
        if self.persistence.uncommitted:  # nothing this turn accepted may act unrecorded
            self.gateway.packets_for_tun()
        self._flush_outputs()
        return True

    def _flush_unbatched(self, now: float) -> bool:
        self._mirror_events(now)
        self._flush_outputs()
        return True

    def _mirror_events(self, now: float) -> None:
        gateway = self.gateway
        for _ in range(EVENT_ROUNDS):
            events = gateway.events()
            if not events:
                break
            for event in events:
                if isinstance(event, StateChange):
                    self.ownership.mirror(event, now)
                self._deliver(event)
            if self.cluster is not None:
                self.cluster.after_mirror(now)
        else:
            if self.driver.loop is not None:  # more events: the next loop turn
                self.driver.call_later(0.0, self.pump)

    def _flush_outputs(self) -> None:
        """Datagrams, then inner packets (after the store writes they depend on). A
        cluster node sends nothing past its lease fence (checked with a fresh clock)."""
        cluster = self.cluster
        if cluster is not None and not cluster.may_send(self.clock()):
            cluster.fenced(len(self.gateway.datagrams_to_send()),
                           len(self.gateway.packets_for_tun()))  # fmt: skip
            return
        before = self.clock() if cluster is not None else 0.0
        out = self._flush_datagrams()
        packets = self.gateway.packets_for_tun()
        if cluster is not None:
            cluster.forwarded(out, packets, before, self.clock() if packets else before)
        if packets:
            self.traffic.inner_out += len(packets)
            if self.control is not None:
                self.control.traffic.from_clients(packets)
            self.inner.write_batch(packets)

    def _reserve_counters(self, now: float) -> None:
        """Persistent store: reserve the send counters sealed past their reservation
        before any datagram leaves (a failure ends that session; its events next turn)."""
        if self.persistence is None:
            return
        due = self.gateway.reservations_due()
        if due and not self.persistence.reserve(due, now) and self.driver.loop is not None:
            self.driver.call_later(0.0, self.pump)

    def _flush_datagrams(self) -> list[tuple[Any, bytes]]:
        """Send what the core produced; consecutive datagrams to one client leave in one
        ``send_many`` (UDP GSO). What was sent."""
        out = self.gateway.datagrams_to_send()
        if not out:
            return out
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
        return out

    def _send_run(self, addr: object, run: list[bytes]) -> None:
        traffic = self.traffic
        if not isinstance(addr, PeerAddr):
            traffic.send_failed += len(run)
            return
        sock = self._sockets[addr.via]
        target: tuple[Any, ...] = (
            (addr.host, addr.port, 0, addr.scope_id)
            if sock.family == socket.AF_INET6
            else (addr.host, addr.port)
        )
        sent = sock.send_many(run, target)
        traffic.datagrams_out += sent
        traffic.send_failed += len(run) - sent

    def _route_result_threadsafe(self, result: RouteResult) -> None:
        """The route hook's worker: a failure becomes an event on the loop."""
        loop = self.driver.loop
        if result.ok or loop is None:
            return
        try:
            loop.call_soon_threadsafe(self.driver.guard, self._route_failed, result)
        except RuntimeError:
            pass  # the loop closed meanwhile: the failure is still counted by the hook

    def _route_failed(self, result: RouteResult) -> None:
        now = self.clock()
        detail = f"{result.action} {' '.join(result.inner)}: {result.detail}"
        self.gateway.emit(
            Diagnostic(
                ts_ms=self.gateway.ts_ms(now), session_id=result.session_id,
                node_id=self.node_id, policy_version=self.policy.last_valid_version or "",
                state_version=0, reason_code=Reason.ROUTE_HOOK_FAILED, detail=detail,
            )
        )  # fmt: skip
        self.pump(now)

    def _deliver(self, event: Event) -> None:
        if self.routes is not None:
            self.routes.on_event(event)
        self.metrics.count(event)
        if self.pipeline is not None:
            self.pipeline.emit(event)
        if self.control is not None:
            self.control.on_event(event)
        if self._on_event is not None:
            self._on_event(event)
