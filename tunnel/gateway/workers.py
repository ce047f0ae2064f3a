"""``workers = N``: N gateway processes sharing the listen ports, one session on one worker.

The supervisor (:func:`supervise`, the ``jvpn-gateway`` process itself) binds one
:class:`~tunnel.io.reuseport.ReuseportGroup` per listen address (N sockets, the steering
program attached), then forks N workers. Worker ``k`` runs the ordinary
:class:`~tunnel.gateway.runtime.GatewayRuntime` on slot ``k`` of every group, allocating
receiver indexes in its stripe (``index_stripe=(k, N)``), so the kernel hands it every
datagram of its own sessions and no other's (tunnel/io/reuseport.py says how INITs are
spread).

Return traffic (inner packets from the host to a client) reaches the owning worker by
routing: each worker has a TUN of its own, and a worker adds a host route (``/32``,
``/128``) for each of its sessions' inner addresses to its TUN when the session starts
and removes it when the session ends (:class:`SessionRoutes`). Worker 0's TUN carries
the subnet (``tun.address/prefix``, as with one process: an address no session holds is
dropped ``no_route`` there); the others carry the gateway's address alone (``/32``,
``/128``). Why not a multi-queue TUN (``IFF_MULTI_QUEUE``): the kernel picks the queue of
a packet by a flow hash (and the queue that last wrote that flow), not by destination
address, so a packet for a session of worker 1 would often be read by worker 0 and need a
hand-off between processes (a copy through a pipe or shared memory per packet, in
Python); a route per session costs one netlink message at start and end and nothing per
packet. The kernel's reverse-path check also wants it: a client's packets enter through
its worker's TUN, so the route back to the client's address must point there.

Per worker, as documented in docs/gateway.md "Workers": node id ``NODE-wK``, TUN
``NAME-K`` (``NAME`` as configured for worker 0, or with ``%d`` left to the kernel),
JSONL sink ``FILE.K`` (worker 0: ``FILE``), a private control socket ``wK.sock`` in the
supervisor's private directory (:attr:`Supervisor.rundir`, mode 0700), no metrics
endpoint. The gateway stays one to its operator: the supervisor serves the public
control socket over the workers' (:class:`~tunnel.gateway.fanout.CombinedControl`) and
the one ``/metrics``, from the files the workers publish into (prometheus_client's
multiprocess mode, the ``metrics`` directory of the private one); it creates the
directory before the first fork and removes it at the end.

The supervisor forwards SIGTERM, SIGINT and SIGHUP to every worker (each worker has a
process group of its own, so a terminal's ^C reaches it once, through the supervisor, and
stops when the supervisor ends, even by SIGKILL: PR_SET_PDEATHSIG). A worker that dies
is reported on stderr with its sessions' fate (they are lost, as any lost gateway
state: their clients re-handshake) and is started again on the same slot after
:data:`RESTART_DELAY_S`; the supervisor keeps every socket of the groups open meanwhile,
so no other worker's sessions move. A worker that cannot start (its TUN, its control
socket) stops the gateway with that worker's exit status.
"""

from __future__ import annotations

import ctypes
import dataclasses
import ipaddress
import os
import queue
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from tunnel.control.protocol import ControlError
from tunnel.core.events import Event, SessionCreated, SessionTerminated
from tunnel.gateway.fanout import CombinedControl, WorkerState, worker_socket
from tunnel.gateway.inner import GatewayInner, GatewayTun
from tunnel.io.reuseport import ReuseportGroup
from tunnel.io.udp import GatewaySocket
from tunnel.observability.metrics import (
    MetricsServer,
    multiprocess_exposition,
    process_ended,
    use_multiprocess_dir,
)  # fmt: skip

if TYPE_CHECKING:
    from pyroute2 import IPRoute

    from tunnel.core.gateway import ClientEntry
    from tunnel.gateway.config import GatewayConfig
    from tunnel.gateway.runtime import GatewayRuntime

RESTART_DELAY_S: Final = 1.0
"""A dead worker is started again after this long."""

RESTART_LIMIT: Final = 5
"""More deaths of one worker than this within RESTART_WINDOW_S stop the gateway (exit 1)."""

RESTART_WINDOW_S: Final = 60.0

PUBLISH_METRICS_S: Final = 1.0
"""A worker publishes its metrics this often for the supervisor's ``/metrics`` (a scrape
sees values at most this old; the loop counts in plain integers meanwhile)."""

STOP_GRACE_S: Final = 15.0
"""Workers not gone this long after a stop are killed (below systemd's TimeoutStopSec=20)."""

EXIT_ENGINE_FAILURE: Final = 1

PR_SET_PDEATHSIG: Final = 1
"""linux/prctl.h: the signal a process gets when its parent ends."""

_libc = ctypes.CDLL(None, use_errno=True)

_SIGNALS: Final = frozenset({signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
_STARTUP_BLOCKED: Final = frozenset({signal.SIGTERM, signal.SIGHUP})
"""Held in a worker from its fork until its runtime handles them (WorkerSlot.ready)."""


def _console(line: str) -> None:
    print(f"jvpn-gateway: {line}", file=sys.stderr, flush=True)


# -- one worker's view ---------------------------------------------------------------------


class SessionRoutes:
    """A host route per inner address of this worker's sessions, to this worker's TUN.

    Added with ``replace`` (a client that restarted may have landed on another worker
    while its old session here waits for its dead timer: the newest session wins) and
    removed only through this TUN (the other worker's route stays). The netlink calls run
    on a thread of their own, in order (pyroute2's calls cannot run on the gateway's
    asyncio loop); the loop only queues them.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[str, str] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._routes: dict[str, tuple[str, ...]] = {}
        self.failures = 0
        """Routes that could not be added (each also one console line)."""

    def open(self, ifname: str) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(ifname,), name="jvpn-routes", daemon=True
        )
        self._thread.start()

    def on_event(self, event: Event, clients: Sequence[ClientEntry]) -> None:
        if self._thread is None:
            return
        if isinstance(event, SessionCreated):
            entry = next((c for c in clients if c.name == event.peer), None)
            extra = (entry.inner_address6,) if entry is not None and entry.inner_address6 else ()
            addresses = (event.inner_address, *extra)
            self._routes[event.session_id] = addresses
            for address in addresses:
                self._queue.put(("replace", address))
        elif isinstance(event, SessionTerminated):
            for address in self._routes.pop(event.session_id, ()):
                self._queue.put(("del", address))

    def _run(self, ifname: str) -> None:
        from pyroute2 import IPRoute

        ipr = IPRoute()
        try:
            oif = ipr.link_lookup(ifname=ifname)[0]
            while (change := self._queue.get()) is not None:
                self._change(ipr, oif, *change)
        finally:
            ipr.close()

    def _change(self, ipr: IPRoute, oif: int, command: str, address: str) -> None:
        from pyroute2 import NetlinkError

        ip = ipaddress.ip_address(address)
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        try:
            ipr.route(command, dst=address, dst_len=ip.max_prefixlen, oif=oif, family=family)
        except NetlinkError as exc:
            if command == "del":
                return  # already gone (replaced by another worker's, or the TUN's end)
            self.failures += 1
            _console(f"warning: cannot route {address} to this worker's TUN: {exc}")

    def close(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(5.0)


class WorkerSlot:
    """Worker ``index`` of ``count``: its sockets, its inner side and its routes."""

    def __init__(
        self,
        index: int,
        count: int,
        sockets: Sequence[GatewaySocket],
        inner: GatewayInner | None,
        ready_fd: int,
        routed: bool = True,
    ) -> None:
        """``inner``: the inner side replacing the configured one (None: keep it);
        ``routed``: a TUN that gets a route per session (not in inner_echo mode)."""
        self.index = index
        self.count = count
        self.sockets = tuple(sockets)
        self.inner = inner
        self.routes: SessionRoutes | None = SessionRoutes() if routed else None
        """None in inner_echo mode (no TUN to route to)."""
        self._ready_fd = ready_fd
        self._runtime: GatewayRuntime | None = None

    def runtime_kwargs(self) -> dict[str, Any]:
        """What :meth:`GatewayRuntime.from_config` takes for this worker."""
        kwargs: dict[str, Any] = {
            "index_stripe": (self.index, self.count),
            "sockets": self.sockets,
            "publish_metrics_s": PUBLISH_METRICS_S,
        }
        if self.inner is not None:
            kwargs["inner"] = self.inner
        return kwargs

    def attach(self, runtime: GatewayRuntime) -> None:
        self._runtime = runtime

    def on_event(self, event: Event) -> None:
        if self.routes is not None and self._runtime is not None:
            self.routes.on_event(event, self._runtime.clients)

    def ready(self) -> None:
        """The runtime serves (its TUN exists, its signal handlers are in place): start the
        routes; tell the supervisor; take the stop signals held since the fork."""
        if self.routes is not None and self._runtime is not None:
            self.routes.open(self._runtime.inner.name)
        os.write(self._ready_fd, bytes((self.index,)))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STARTUP_BLOCKED)

    def close(self) -> None:
        if self.routes is not None:
            self.routes.close()


def worker_config(
    config: GatewayConfig, k: int, metrics: tuple[str, int] | None, rundir: Path | None = None
) -> GatewayConfig:
    """The configuration worker ``k`` runs (names of its own; module docstring): no
    metrics endpoint (the supervisor serves everyone's), its private control socket in
    ``rundir`` when the gateway has a control socket."""
    if config.workers == 1:
        return dataclasses.replace(config, metrics=metrics or config.metrics)
    # each worker its own session store (a sqlite file takes one process): state_dir/wK;
    # a restarted worker resumes its own sessions from it; the state key is shared
    state = dataclasses.replace(config.state, state_dir=config.state.state_dir / f"w{k}")
    private = config.control_socket is not None and rundir is not None
    worker = dataclasses.replace(
        config, node_id=f"{config.node_id}-w{k}", metrics=None, state=state,
        control_socket=worker_socket(rundir, k) if private and rundir else None,
        control_required=True,
    )  # fmt: skip
    if k == 0:
        return worker
    suffix = f"-{k}"
    name = config.tun_name if "%d" in config.tun_name else config.tun_name[: 15 - len(suffix)]
    return dataclasses.replace(
        worker,
        tun_name=name if "%d" in name else name + suffix,
        sinks=tuple(
            dataclasses.replace(s, path=s.path.with_name(f"{s.path.name}.{k}")) if s.path else s
            for s in config.sinks
        ),
    )


def worker_inner(config: GatewayConfig, k: int) -> GatewayInner | None:
    """Worker ``k``'s TUN (None: the configured inner side, for worker 0 and inner_echo)."""
    if config.inner_echo or k == 0:
        return None
    return GatewayTun(config.tun_name, config.mtu, config.gateway_address, 32, _cidr6(config, 128))


def _cidr6(config: GatewayConfig, prefix: int) -> str | None:
    return f"{config.gateway_address6}/{prefix}" if config.gateway_address6 else None


# -- the supervisor ------------------------------------------------------------------------

Serve = Callable[["GatewayConfig", WorkerSlot], int]
"""Runs one worker to its end (tunnel.gateway.main.serve): its exit status."""


@dataclass(slots=True)
class _Worker:
    """A record: one slot's current process and its history."""

    pid: int = 0
    ready: bool = False
    deaths: deque[float] = field(default_factory=deque)
    restart_at: float | None = None


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.WEXITSTATUS(status)}"


def _exit_code(status: int) -> int:
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else EXIT_ENGINE_FAILURE


class Supervisor:
    """Forks the workers, forwards signals, reports and restarts dead workers."""

    def __init__(
        self,
        config: GatewayConfig,
        metrics: tuple[str, int] | None,
        serve: Serve,
        groups: Sequence[ReuseportGroup],
    ) -> None:
        self.config = config
        self.metrics = metrics
        self._serve = serve
        self.groups = tuple(groups)
        self.workers = [_Worker() for _ in range(config.workers)]
        self.stopping = False
        self.started = False
        self.exit_code = 0
        self._pid = os.getpid()
        self._stop_at: float | None = None
        self._ready_r, self._ready_w = os.pipe()
        os.set_blocking(self._ready_r, False)
        self.rundir = Path(tempfile.mkdtemp(prefix=f"jvpn-{config.node_id}."))
        """Private (0700): the workers' control sockets and the metrics files."""
        self._metrics_dir = self.rundir / "metrics"
        self.control: CombinedControl | None = (
            CombinedControl(config.control_socket, config.node_id, self.rundir, self.states)
            if config.control_socket is not None
            else None
        )
        self.control_warning: str | None = None
        """Why the (default, best-effort) control socket is not served, if it is not."""
        self._metrics_server: MetricsServer | None = None

    # -- the public endpoints ------------------------------------------------------------

    def open(self) -> None:
        """The metrics endpoint (every worker's metrics, summed) and the public control
        socket, before any worker starts. Raises OSError (metrics) or ControlError (a
        configured control socket); on failure everything is undone."""
        try:
            self._metrics_dir.mkdir(mode=0o700)
            use_multiprocess_dir(self._metrics_dir)
            if self.metrics is not None:
                collect = multiprocess_exposition(self._metrics_dir)
                self._metrics_server = MetricsServer(*self.metrics, collect)
            self._listen_control()
        except BaseException:
            self.close()
            raise

    def _listen_control(self) -> None:
        if self.control is None:
            return
        try:
            self.control.listen()
        except ControlError as exc:
            if self.config.control_required:
                raise
            self.control_warning = str(exc)
            self.control = None

    @property
    def metrics_bound(self) -> tuple[str, int] | None:
        return self._metrics_server.address if self._metrics_server is not None else None

    def states(self) -> list[WorkerState]:
        """What the combined control socket needs to know of each worker (any thread)."""
        return [WorkerState(k, w.pid, w.ready) for k, w in enumerate(self.workers)]

    def close(self) -> None:
        """Stop the endpoints, close the groups, remove the private directory. Idempotent."""
        if self.control is not None:
            self.control.stop()
        if self._metrics_server is not None:
            self._metrics_server.close()
            self._metrics_server = None
        for group in self.groups:
            group.close()
        shutil.rmtree(self.rundir, ignore_errors=True)

    # -- processes -----------------------------------------------------------------------

    def _spawn(self, k: int) -> None:
        worker: _Worker = self.workers[k]
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the worker: never returns
            code = EXIT_ENGINE_FAILURE
            try:
                code = self._run_worker(k)
            except BaseException as exc:  # the worker's end: said, then exit 1
                _console(f"worker {k} failed: {exc!r}")
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        worker.pid, worker.ready, worker.restart_at = pid, False, None

    def _run_worker(self, k: int) -> int:
        os.setpgid(0, 0)  # a terminal's ^C reaches the supervisor alone, which forwards it
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)  # the supervisor gone: stop too
        if os.getppid() != self._pid:
            return EXIT_ENGINE_FAILURE  # it was gone before prctl
        # A stop that comes while the worker starts waits until its runtime handles it
        # (WorkerSlot.ready unblocks it): dying by the default action half-way through
        # would leave its control socket and TUN behind.
        signal.pthread_sigmask(signal.SIG_SETMASK, _STARTUP_BLOCKED)
        for signo in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signo, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.close(self._ready_r)
        for group in self.groups:  # this worker's copies of the other slots
            for i, sock in enumerate(group.sockets):
                if i != k:
                    sock.close()
        config = worker_config(self.config, k, self.metrics, self.rundir)
        slot = WorkerSlot(
            k, self.config.workers, [g.sockets[k] for g in self.groups],
            worker_inner(config, k), self._ready_w, routed=not config.inner_echo,
        )  # fmt: skip
        try:
            return self._serve(config, slot)
        finally:
            slot.close()

    def _signal_all(self, signo: int) -> None:
        for worker in self.workers:
            if worker.pid:
                try:
                    os.kill(worker.pid, signo)
                except ProcessLookupError:
                    pass

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> int:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            if self.control is not None:  # its thread inherits the blocked signals
                self.control.start()
            for k in range(len(self.workers)):
                self._spawn(k)
            while self._alive():
                self._step()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
            os.close(self._ready_r)
            os.close(self._ready_w)
            self.close()
        return self.exit_code

    def _alive(self) -> bool:
        return any(w.pid for w in self.workers) or (
            not self.stopping and any(w.restart_at is not None for w in self.workers)
        )

    def _step(self) -> None:
        info = signal.sigtimedwait(_SIGNALS, self._wait_s())
        if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
            self._stop(self.exit_code, info.si_signo)
        elif info is not None and info.si_signo == signal.SIGHUP:
            self._signal_all(signal.SIGHUP)
        self._read_ready()
        self._reap()
        self._restart_due()
        if self._stop_at is not None and time.monotonic() > self._stop_at + STOP_GRACE_S:
            _console(f"workers still running {STOP_GRACE_S:g}s after the stop; killing them")
            self._signal_all(signal.SIGKILL)
            self.exit_code = self.exit_code or EXIT_ENGINE_FAILURE
            self._stop_at = None

    def _wait_s(self) -> float:
        if not self.started:
            return 0.05
        due = [w.restart_at for w in self.workers if w.restart_at is not None]
        return max(0.0, min(due) - time.monotonic()) if due else 1.0

    def _read_ready(self) -> None:
        try:
            data = os.read(self._ready_r, 256)
        except BlockingIOError:
            return
        for k in data:
            worker: _Worker = self.workers[k]
            worker.ready = True
            if self.started:
                _console(f"worker {k} restarted (pid {worker.pid})")
        if not self.started and all(w.ready for w in self.workers):
            self.started = True
            pids = ", ".join(str(w.pid) for w in self.workers)
            _console(
                f"node {self.config.node_id}: {len(self.workers)} workers ready (pids {pids})"
                + self._endpoints()
            )

    def _endpoints(self) -> str:
        """The ready line's public endpoints."""
        out = ""
        if self.control is not None:
            out += f", control {self.control.path}"
        if self.metrics_bound is not None:
            out += ", metrics http://{}:{}/metrics".format(*self.metrics_bound)
        return out

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            k = next((i for i, w in enumerate(self.workers) if w.pid == pid), None)
            if k is not None:
                self._ended(k, status)

    def _ended(self, k: int, status: int) -> None:
        worker: _Worker = self.workers[k]
        process_ended(self._metrics_dir, worker.pid)
        worker.pid = 0
        if self.stopping:
            self.exit_code = self.exit_code or _exit_code(status)
            return
        if not self.started or (not worker.ready and _exit_code(status)):
            _console(f"worker {k} could not start ({_describe(status)}); stopping")
            self._stop(_exit_code(status))
            return
        now = time.monotonic()
        worker.deaths.append(now)
        while worker.deaths and worker.deaths[0] < now - RESTART_WINDOW_S:
            worker.deaths.popleft()
        if len(worker.deaths) > RESTART_LIMIT:
            _console(f"worker {k} died {len(worker.deaths)} times in a minute; stopping")
            self._stop(EXIT_ENGINE_FAILURE)
            return
        _console(
            f"worker {k} died ({_describe(status)}); its sessions are lost (their clients "
            f"handshake again), the other workers' are untouched; restarting it in "
            f"{RESTART_DELAY_S:g}s"
        )
        worker.restart_at = now + RESTART_DELAY_S

    def _stop(self, code: int, signo: int = signal.SIGTERM) -> None:
        """Stop every worker (once; a second signal is not forwarded again)."""
        self.exit_code = code
        if not self.stopping:
            self.stopping = True
            self._stop_at = time.monotonic()
            self._signal_all(signo)

    def _restart_due(self) -> None:
        if self.stopping:
            return
        now = time.monotonic()
        worker: _Worker
        for k, worker in enumerate(self.workers):
            if worker.restart_at is not None and worker.restart_at <= now:
                self._spawn(k)


def supervise(config: GatewayConfig, metrics: tuple[str, int] | None, serve: Serve) -> Supervisor:
    """The supervisor for ``config`` with its groups bound (PathError, ReuseportError)."""
    from tunnel.io.reuseport import open_groups

    groups = open_groups(config.listen, config.workers)
    return Supervisor(config, metrics or config.metrics, serve, groups)
