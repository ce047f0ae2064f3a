"""ClientEngine: the client session on real I/O, in its own thread (DESIGN §4).

``ClientEngine(config)`` implements :class:`tunnel.api.EngineHandle`. ``start()`` spawns
one thread that builds the session, opens one UDP socket per candidate path, sets the
inner side up (TUN + host configuration, before the asyncio loop starts), then runs the
loop (:class:`tunnel.client.runtime.ClientRuntime`) until the session is TERMINATED.
Meanwhile it publishes an :class:`EngineSnapshot` every 200 ms (5 Hz) into the UiChannel's
snapshot slot and every event's ``to_dict()`` into its event queue (bounded, never
blocks; session-changing events also into its history ring), sends every event to the
EventPipeline (JSONL / syslog sinks), and polls the CommandQueue every 50 ms.

When the loop ends (termination, engine failure, hard stop) the host is restored in
reverse order (inner side, then the kill switch and endpoint exceptions of
:mod:`tunnel.io.killswitch`, which stay after any end but the operator's, then sockets),
a final snapshot with ``running=False`` and ``final_reason`` is published, and the thread
ends. A handshake that found no session adds
what came back and a line that explains it (``handshake_failure``, ``explanation``;
:mod:`tunnel.client.explain`). An exception anywhere in the engine becomes
``final_reason = "engine_error: <one line>"``; a live session is first ended with reason
``invariant_violation`` (TERMINATE sent).

The UI sees the session through the contract's own types: :func:`session_view` turns the
core's ``ClientSnapshot`` into a :class:`tunnel.api.SessionView`. Extra behaviour plugs in
from outside through an :class:`EnginePlugin` given at construction (the demo's embedded
gateway and impairments are one): it may rewrite the configuration before the session
starts, see every datagram sent, answer :class:`tunnel.api.ExtensionCommand` values and
mark the snapshots; it acts on the running engine only through a :class:`PluginHost`.

:func:`exit_code_for` maps a final reason to the process exit code (docs/client.md).
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import itertools
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Protocol

from tunnel.api import (
    NO_SESSION,
    Command,
    CommandQueue,
    EngineSnapshot,
    ExtensionCommand,
    ForceReattach,
    ObservabilityView,
    PathStatsView,
    PathView,
    ReloadPolicy,
    SessionView,
    SetAutoSwitch,
    SinkView,
    SwitchTo,
    Terminate,
    TrafficStats,
    UiChannel,
)
from tunnel.client.autopaths import EngineWatch, start_paths, tun_names
from tunnel.client.config import ClientConfig, PathConfig
from tunnel.client.control import ControlSocket, EngineControl
from tunnel.client.explain import cipher_explanation, handshake_explanation
from tunnel.client.runtime import ClientRuntime, PathTarget
from tunnel.client.sinks import client_sinks
from tunnel.control.protocol import ControlError
from tunnel.control.server import ControlServer, prepare_socket_path
from tunnel.core.ciphers import default_offer
from tunnel.core.client import ClientSession, ClientSnapshot, PathSpec
from tunnel.core.events import (
    Diagnostic,
    Event,
    EventBase,
    HandshakeFailure,
    PolicyEvent,
    Reason,
    ReattachAttempt,
    SessionTerminated,
    TransportSwitchDenied,
    reason_to_wire,
)
from tunnel.core.handshake import fingerprint, public_key
from tunnel.core.health import PathStats
from tunnel.core.policy import PolicyError, load_policy
from tunnel.core.session import State
from tunnel.io.cpu import cpu_has_aes
from tunnel.io.inner import KernelTun, MemoryInner, TunLike
from tunnel.io.killswitch import Endpoint, KillSwitchError, RouteGuard, tunnel_routes
from tunnel.io.loop import new_event_loop
from tunnel.io.netconf import NetConfError
from tunnel.io.tun import TunError
from tunnel.io.udp import Address, PathError, PathSocket
from tunnel.observability import EventPipeline, Sink

SNAPSHOT_INTERVAL_S: Final = 0.2
"""Snapshot publication period (5 Hz, inside DESIGN §4's 4-10 Hz)."""

COMMAND_POLL_S: Final = 0.05
"""Command queue poll period; ``notify()`` wakes the loop at once."""

CONTROL_FLUSH_S: Final = 1.0
"""At the end, how long the control socket's watchers get to read the final snapshot."""

RATE_WINDOW_S: Final = 1.0
"""Traffic rates are averaged over this window."""

FULL_GC_INTERVAL_S: Final = 60.0
"""A full garbage collection this often (about 35 ms of CPU here, 48,000 objects). Only a
full collection empties CPython's free lists, and a running engine makes so few long-lived
objects that CPython almost never starts one itself; meanwhile every tuple built by
resizing (``tuple()`` of a generator: snapshots, events) lands on the free list of its size
when freed, up to 2,000 per size, 4.5 MB for sizes 1-19. That was the client's slow RSS
growth under flapping (issue 12, bench/soak.py); now one interval's worth piles up."""

ENGINE_ERROR: Final = "engine_error"
"""Prefix of the final reason when the engine itself failed."""

EXIT_OK: Final = 0
"""Operator stop: the final reason is ``operator_terminated`` (so its own 10 + n is never
used), or the engine stopped before a session reason existed."""
EXIT_UNKNOWN_REASON: Final = 1
"""The final reason is one this build does not know."""
EXIT_ENGINE_ERROR: Final = 3
"""``engine_error: <cause>``: the engine failed or could not start (cause also on stderr);
the host is restored. ``jvpn-tui --attach`` exits 3 too when no client answers at the
socket or the client went away while attached (no engine of its own ran)."""
EXIT_REASON_BASE: Final = 10
"""Plus n: the session ended with the reason code of wire index n (stable: reason codes are
only ever appended)."""


def exit_code_for(reason: str | None) -> int:
    """Process exit code for a final reason (docs/client.md has the table).

    0: operator stop (``operator_terminated``, or no session reason at all);
    3: ``engine_error: ...``; 10 + wire index: every other reason code (stable, because
    reason codes are append-only); 1: a reason this build does not know.
    """
    if reason is None:
        return EXIT_OK
    if reason == ENGINE_ERROR or reason.startswith(ENGINE_ERROR + ":"):
        return EXIT_ENGINE_ERROR
    try:
        code = Reason(reason)
    except ValueError:
        return EXIT_UNKNOWN_REASON
    if code is Reason.OPERATOR_TERMINATED:
        return EXIT_OK
    return EXIT_REASON_BASE + reason_to_wire(code)


def exit_code_table() -> list[tuple[str, int]]:
    """(final reason, exit code) for every reason, in code order (for the docs)."""
    rows = [(str(r), exit_code_for(str(r))) for r in Reason]
    rows.append((f"{ENGINE_ERROR}: ...", EXIT_ENGINE_ERROR))
    return sorted(rows, key=lambda row: row[1])


_PLAIN_ERRORS = (
    OSError, ValueError, RuntimeError, PathError, TunError, NetConfError, KillSwitchError,
)  # fmt: skip
"""Errors whose message already says what went wrong; other types are named (bugs)."""


def one_line(exc: BaseException) -> str:
    """``TypeName: message`` on one line, cut to 200 characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, _PLAIN_ERRORS) or not str(exc):
        text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= 200 else text[:197] + "..."


# -- the core's snapshot as the UI contract's view ------------------------------------------


def _stats_view(st: PathStats) -> PathStatsView:
    return PathStatsView(
        path_id=st.path_id, srtt_ms=st.srtt_ms, jitter_ms=st.jitter_ms,
        loss_ratio=st.loss_ratio, consecutive_misses=st.consecutive_misses, score=st.score,
        alive=st.alive, rtt_history=st.rtt_history, loss_up=st.loss_up,
        loss_down=st.loss_down, loss_known=st.loss_known, direction_known=st.direction_known,
    )  # fmt: skip


def session_view(snap: ClientSnapshot) -> SessionView:
    """The core's ``ClientSnapshot`` as the UI contract's :class:`SessionView` (same
    field names and meanings; the UI never sees a core type)."""
    return SessionView(
        session_id=snap.session_id, state=snap.state, state_version=snap.state_version,
        binding_epoch=snap.binding_epoch, peer_state=snap.peer_state,
        peer_state_version=snap.peer_state_version, active=snap.active, pending=snap.pending,
        paths=tuple(
            PathView(_stats_view(p.stats), p.label, p.role, p.validated) for p in snap.paths
        ),
        auto_switch=snap.auto_switch,
        switch_budget_left=snap.switch_budget_left,
        cooldown_remaining_ms=snap.cooldown_remaining_ms, key_phase=snap.key_phase,
        key_age_s=snap.key_age_s, policy_version=snap.policy_version, uptime_s=snap.uptime_s,
        queue_depth=snap.queue_depth, queue_dropped=snap.queue_dropped,
        total_switches=snap.total_switches, drops=snap.drops,
        inner_address=snap.inner_address, inner_address6=snap.inner_address6,
        cipher=snap.cipher, serving_node=snap.serving_node, owner_epoch=snap.owner_epoch,
    )  # fmt: skip


# -- plug-ins -------------------------------------------------------------------------------


class PluginHost:
    """What a plug-in may use of a running engine (handed over by ``EnginePlugin.attach``).

    Every method runs on the engine loop thread, except :meth:`emit_threadsafe`.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        runtime: ClientRuntime,
        *,
        emit: Callable[[Event], None],
        base: Callable[[float], EventBase],
        threadsafe: Callable[[Callable[[], object]], None],
    ) -> None:
        self.loop = loop
        """The engine's event loop (schedule work on it; never block it)."""
        self._runtime = runtime
        self._emit = emit
        self._base = base
        self._threadsafe = threadsafe

    def now(self) -> float:
        """The engine's clock (monotonic seconds)."""
        return self._runtime.clock()

    def session(self) -> SessionView:
        """The session as the UI sees it, now."""
        return session_view(self._runtime.session.snapshot(self.now()))

    def ended(self) -> bool:
        """The session is TERMINATED."""
        return self._runtime.session.state is State.TERMINATED

    def report(self, reason: Reason, detail: str) -> None:
        """Emit a DIAGNOSTIC event of the session (to the UI and the event pipeline)."""
        self._emit(Diagnostic(**self._base(self.now()), reason_code=reason, detail=detail))

    def emit_threadsafe(self, event: Event) -> None:
        """Any thread: emit ``event`` on the engine loop (dropped once the loop is gone)."""
        self._threadsafe(lambda: self._emit(event))


class EnginePlugin(Protocol):
    """Behaviour plugged into a :class:`ClientEngine` from outside (``tunnel.demo``).

    The engine calls, on its own thread: :meth:`prepare` before the session is built,
    :meth:`attach` once its loop runs, :meth:`tap` for every datagram sent,
    :meth:`handle` for every :class:`ExtensionCommand`, :meth:`annotate` for every snapshot
    and :meth:`close` after the host is restored (also after a failure).
    """

    def prepare(self, config: ClientConfig) -> ClientConfig:
        """Set up what the plug-in needs; the configuration returned is the one run."""

    def attach(self, host: PluginHost) -> None:
        """The engine loop runs (loop thread): what the plug-in may use of it."""

    def tap(self, path_id: int, data: bytes) -> None:
        """Loop thread: ``data`` was sent on ``path_id``."""

    def handle(self, command: ExtensionCommand) -> bool:
        """Loop thread: act on ``command``; False when it is not this plug-in's."""

    def annotate(self, snapshot: EngineSnapshot) -> EngineSnapshot:
        """The snapshot as published (a plug-in may mark it)."""

    def close(self) -> None:
        """Release what :meth:`prepare` set up (errors end up in the final reason)."""


def _is_numeric(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _resolve(host: str, port: int, family: int) -> Address:
    """Numeric (host, port[, ...]) for the gateway; names are resolved here at start (and
    again, without blocking the loop, on every reattach attempt: see ``_re_resolve``)."""
    try:
        infos = socket.getaddrinfo(host, port, family, socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise OSError(f"cannot resolve gateway host {host!r}: {exc.strerror}") from None
    if not infos:
        raise OSError(f"cannot resolve gateway host {host!r}: no address")
    return tuple(infos[0][4])


class ClientEngine:
    """The real client engine (an :class:`tunnel.api.EngineHandle`)."""

    def __init__(
        self,
        config: ClientConfig,
        *,
        channel: UiChannel | None = None,
        inner: TunLike | None = None,
        plugin: EnginePlugin | None = None,
        control: ControlSocket | None = None,
    ) -> None:
        """``control``: where to serve the control socket (:mod:`tunnel.client.control`);
        None: no socket (the library default; the programs pass one)."""
        self.config = config
        """The configuration; a plug-in's ``prepare`` may replace it when the engine starts."""
        self.channel = channel if channel is not None else UiChannel()
        self.commands = CommandQueue()
        self.inner: TunLike = inner if inner is not None else _inner_for(config)
        self.final_reason: str | None = None
        """Why the engine ended (set before the final snapshot is published)."""
        self.final_snapshot: EngineSnapshot | None = None
        self.handshake_failure: HandshakeFailure | None = None
        """What came back when the handshake ended without a session (else None)."""
        self.explanation: str | None = None
        """The line that explains the final reason (set with it), if there is one."""
        self.session: ClientSession | None = None
        self.runtime: ClientRuntime | None = None
        self._plugin = plugin
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_lock = threading.Lock()
        self._pipeline: EventPipeline | None = None
        self._seq = itertools.count(1)
        self._samples: deque[tuple[float, int, int]] = deque()
        self._wall_offset = 0.0
        self._error: BaseException | None = None
        self._terminal_reason: str | None = None
        self._stop_requested = False
        self._names: dict[int, tuple[str, int, int]] = {}
        """path id -> (host name, port, family) of every path whose gateway is a name."""
        self._resolving: set[int] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.resolutions = 0
        """Gateway name look-ups finished after the start (D7: one per reattach attempt)."""
        self._control_spec = control
        self._control: EngineControl | None = None
        self._control_server: ControlServer | None = None
        self._spent_loop: asyncio.AbstractEventLoop | None = None
        self.control_socket: Path | None = None
        """Where the control socket listens (set once it does; None: no socket)."""
        self.notices: list[str] = []
        """One-line notices for the person running the program (appended by the engine
        thread, e.g. a default control socket that another client already holds)."""
        self._guard: RouteGuard | None = None
        self.kill_switch_notice: str | None = None
        """Set when the engine ended and left its kill switch in place: the one line that
        says so and how to release it (docs/client.md, "Kill switch")."""

    # -- EngineHandle ------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._thread = threading.Thread(target=self._main, name="jvpn-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the session (operator_terminated), stop, restore the host. Idempotent."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        self._stop_requested = True
        self.commands.send(Terminate())
        self.notify()
        deadline = time.monotonic() + timeout
        thread.join(max(0.0, timeout * 0.8))
        if thread.is_alive():
            self._hard_stop()
            thread.join(max(0.0, deadline - time.monotonic()))

    def join(self, timeout: float | None = None) -> bool:
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    # -- extras ------------------------------------------------------------------------------

    def notify(self) -> None:
        """Wake the engine loop to take commands now (any thread)."""
        self._threadsafe(lambda: self._poll_commands(False))

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _hard_stop(self) -> None:
        with self._loop_lock:
            loop = self._loop
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(loop.stop)

    def _threadsafe(self, fn: Callable[[], object]) -> None:
        """Any thread: run ``fn`` on the engine loop soon (nothing once the loop is gone)."""
        with self._loop_lock:
            loop = self._loop
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(fn)

    # -- the engine thread -------------------------------------------------------------------

    def _sinks(self) -> list[Sink]:
        return [sink for _, sink in client_sinks(self.config)]

    def _main(self) -> None:
        sockets: list[PathSocket] = []
        inner_touched = False
        try:
            # EVENT_LOSS and SINK_HEALTH reach the UI (and headless stdout) as they happen.
            self._pipeline = EventPipeline(self._sinks(), on_report=self.channel.publish_event)
            if self._plugin is not None:
                self.config = self._plugin.prepare(self.config)
            self.config = start_paths(self.config, tun_names(self.config, self.inner))
            session = self._new_session()
            targets = [self._open_path(p, sockets) for p in self.config.paths]
            if self._control_spec is not None and self._control_spec.required:
                prepare_socket_path(self._control_spec.path)  # refuse before touching the host
            inner_touched = True
            self._install_guard(targets)  # exceptions and kill switch: before the TUN routes
            self.inner.setup()  # host changes: before the loop (pyroute2 is synchronous)
            self._run_loop(session, targets)
        except Exception as exc:  # the engine boundary: reported as engine_error
            self._error = self._error or exc
        finally:
            self._finish(sockets, inner_touched)

    def _new_session(self) -> ClientSession:
        now = time.monotonic()
        cfg = self.config
        self._wall_offset = time.time() - now
        self.session = ClientSession(
            static_private=cfg.private_key,
            gateway_public=cfg.gateway_public_key,
            paths=[PathSpec(p.path_id, p.label) for p in cfg.paths],
            policy=cfg.policy,
            now=now,
            node_id=cfg.node_id,
            wall_offset=self._wall_offset,
            ciphers=cfg.ciphers or default_offer(cpu_has_aes()),
        )
        return self.session

    def _open_path(self, p: PathConfig, sockets: list[PathSocket]) -> PathTarget:
        """The path's socket (added to ``sockets`` at once, to be closed whatever happens)
        and its gateway address; a gateway given by name is remembered for D7."""
        remote_host, remote_port = p.gateway
        local = p.bind if p.bind is not None else ("0.0.0.0", 0)
        family = socket.AF_INET6 if ":" in local[0] else socket.AF_INET
        if p.bind is None and ":" in remote_host:
            local, family = ("::", 0), socket.AF_INET6
        sock = PathSocket(p.path_id, local, device=p.device)
        sockets.append(sock)
        target = PathTarget(p.path_id, sock, _resolve(remote_host, remote_port, family))
        if not _is_numeric(remote_host):
            self._names[p.path_id] = (remote_host, remote_port, family)
        return target

    def _install_guard(self, targets: list[PathTarget]) -> None:
        """Kill switch and endpoint exceptions (tunnel.io.killswitch) for a kernel TUN with
        routes: the next hops are taken now, before the TUN's routes could capture them."""
        cfg = self.config
        if not isinstance(self.inner, KernelTun) or not cfg.routes:
            return
        self._guard = guard = RouteGuard(cfg.routes, kill_switch=cfg.kill_switch)
        devices = {p.path_id: p.device for p in cfg.paths}
        guard.install([Endpoint(t.path_id, t.remote[0], devices[t.path_id]) for t in targets])

    def _run_loop(self, session: ClientSession, targets: list[PathTarget]) -> None:
        loop = new_event_loop()
        loop.set_exception_handler(self._loop_exception)
        plugin = self._plugin
        runtime = ClientRuntime(
            session,
            targets,
            self.inner,
            on_event=self._on_event,
            on_crash=self._on_crash,
            on_terminated=lambda: self._later(loop.stop),
            tap=plugin.tap if plugin is not None else None,
        )
        self.runtime = runtime
        monitor = EngineWatch(
            self.config, runtime, self.inner, report=self._monitor_report,
            remember_name=self._remember_name,
        )  # fmt: skip
        with self._loop_lock:
            self._loop = loop
        try:
            self._start_control(loop)
            loop.call_soon(runtime.install, loop)
            loop.call_soon(monitor.start, loop)  # the kernel's word on the paths, auto paths
            if plugin is not None:
                host = PluginHost(
                    loop, runtime, emit=self._emit, base=self._base, threadsafe=self._threadsafe
                )
                loop.call_soon(plugin.attach, host)
            loop.call_soon(self._snapshot_tick)
            loop.call_soon(self._poll_commands, True)
            loop.call_later(FULL_GC_INTERVAL_S, self._collect_tick)
            loop.run_forever()
            runtime.uninstall()
        finally:
            monitor.stop()
            with self._loop_lock:
                self._loop = None
            self._spent_loop = loop  # closed by _finish, after the control socket's goodbye

    def _start_control(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve the control socket on the engine loop (before the loop runs)."""
        spec = self._control_spec
        if spec is None:
            return
        control = EngineControl(
            lambda: self._snapshot(running=True),
            self._command_from_socket,
            self._path_ids,
        )
        server = ControlServer(spec.path, control)
        try:
            loop.run_until_complete(server.start())
        except ControlError as exc:
            if spec.required:
                raise
            self.notices.append(f"no control socket: {exc} (set control_socket to choose one)")
            return
        self._control, self._control_server = control, server
        self.control_socket = spec.path

    def _path_ids(self) -> list[int]:
        """Loop thread: the session's paths now (``paths = "auto"`` adds and removes them)."""
        runtime = self.runtime
        return sorted(runtime.paths) if runtime is not None else []

    def _command_from_socket(self, command: Command) -> bool:
        """Loop thread: a control-socket command joins the UI's queue, taken at once."""
        if not self.commands.send(command):
            return False
        self._later(lambda: self._poll_commands(False))
        return True

    def _close_control(self, final: EngineSnapshot) -> None:
        """Send watchers the final snapshot, close the socket, then the spent loop."""
        loop, server = self._spent_loop, self._control_server
        self._spent_loop = self._control_server = None
        if loop is None:
            return
        try:
            if server is not None:
                server.publish_status(final)
                loop.run_until_complete(server.close(flush=CONTROL_FLUSH_S))
        finally:
            loop.close()

    def _later(self, fn: Callable[[], object]) -> None:
        with self._loop_lock:
            loop = self._loop
        if loop is not None:
            loop.call_soon(fn)

    def _finish(self, sockets: list[PathSocket], inner_touched: bool) -> None:
        errors: list[str] = []
        if inner_touched:
            try:
                self.inner.teardown()
            except Exception as exc:  # reported in the final reason, never hidden
                errors.append(f"host restore failed: {one_line(exc)}")
        self._finish_guard(errors)
        for sock in reversed(sockets):
            sock.close()
        if self._plugin is not None:
            try:
                self._plugin.close()
            except Exception as exc:  # reported in the final reason, never hidden
                errors.append(one_line(exc))
        self.final_reason = self._final_reason(errors)
        if self._error is None and not errors:  # the session's own end, explained
            self.explanation = self._explain(sockets)
        snap = self._snapshot(running=False)
        self.final_snapshot = snap
        self.channel.publish_snapshot(snap)
        try:
            self._close_control(snap)
        except Exception as exc:  # the session has ended already; say so, never hide it
            self.notices.append(f"closing the control socket failed: {one_line(exc)}")
        if self._pipeline is not None:
            self._pipeline.close(timeout=1.0)

    def _finish_guard(self, errors: list[str]) -> None:
        """The TUN is gone: the kill switch goes only when the operator ended the session
        (operator_terminated, asked for here); after any other end it stays."""
        guard = self._guard
        if guard is None:
            return
        ended = Reason(self._terminal_reason or Reason.OPERATOR_TERMINATED)
        on_purpose = (
            self._stop_requested and self._error is None and not errors
            and ended is Reason.OPERATOR_TERMINATED
        )  # fmt: skip
        try:
            self.kill_switch_notice = guard.finish(on_purpose=on_purpose)
        except KillSwitchError as exc:
            errors.append(f"kill switch release failed: {one_line(exc)}")

    def _final_reason(self, errors: list[str]) -> str | None:
        """Engine failure first (with the clean-up errors), then the session's own end."""
        if self._error is not None:
            reason = f"{ENGINE_ERROR}: {one_line(self._error)}"
            return f"{reason}; {'; '.join(errors)}" if errors else reason
        if errors:
            return f"{ENGINE_ERROR}: {'; '.join(errors)}"
        if self._terminal_reason is not None:
            return self._terminal_reason
        return str(Reason.OPERATOR_TERMINATED) if self._stop_requested else None

    def _explain(self, sockets: list[PathSocket]) -> str | None:
        """The line for a session that never started; None for any other end."""
        failure = self.handshake_failure
        ended = Reason(self._terminal_reason) if self._terminal_reason else None
        if ended is Reason.CIPHER_MISMATCH and self.session is not None:
            handshake = self.session.handshake
            return cipher_explanation(handshake.offer, handshake.gateway_ciphers)
        if failure is None:
            return None
        cfg = self.config
        errors = {s.path_id: [name for name, _ in s.errors.most_common()] for s in sockets}
        return handshake_explanation(
            failure,
            client_key=fingerprint(public_key(cfg.private_key)),
            gateway_key=fingerprint(cfg.gateway_public_key),
            errors=errors,
        )

    # -- loop callbacks --------------------------------------------------------------------

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        self._on_crash(exc if isinstance(exc, BaseException) else RuntimeError(context["message"]))

    def _on_crash(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        session, runtime = self.session, self.runtime
        if session is not None and runtime is not None:
            self._end_after(exc, session, runtime)
        with self._loop_lock:
            loop = self._loop
        if loop is not None:
            loop.stop()

    def _end_after(
        self, exc: BaseException, session: ClientSession, runtime: ClientRuntime
    ) -> None:
        """Seed §5: the broken invariant is diagnosed, then the session ends explicitly
        (TERMINATE sent), even when the diagnosis fails; what fails is noted on ``exc``."""
        try:
            if _ended(session):
                return
            self._emit(
                Diagnostic(
                    **self._base(runtime.clock()), reason_code=Reason.INVARIANT_VIOLATION,
                    detail=f"engine failure: {one_line(exc)}", state=str(session.state),
                )
            )  # fmt: skip
        except Exception as again:  # a broken session may fail to describe itself
            exc.add_note(f"diagnosing the failure also failed: {one_line(again)}")
        try:
            session.terminate(runtime.clock(), Reason.INVARIANT_VIOLATION)
            runtime.pump()
        except Exception as again:  # the session itself is broken: stop anyway
            exc.add_note(f"terminating after the failure also failed: {one_line(again)}")

    def _on_event(self, event: Event) -> None:
        if isinstance(event, SessionTerminated):
            self._terminal_reason = str(event.reason_code)
            self.handshake_failure = event.handshake_failure
        elif isinstance(event, ReattachAttempt):
            self._re_resolve(event.candidate_transport)
        elif _nothing_to_move_to(event):  # every path failed: the gateway may have moved
            for path_id in list(self._names):
                self._re_resolve(path_id)
        if self._pipeline is not None:
            self._pipeline.emit(event)
        record = event.to_dict()
        self.channel.publish_event(record)
        if self._control is not None and self._control_server is not None:
            self._control.remember(record)
            self._control_server.publish_event(record)

    # -- D7: gateway names re-resolved on every reattach attempt ------------------------------

    def _re_resolve(self, path_id: int) -> None:
        """Loop thread: look the path's gateway name up again, without blocking the loop.

        The attempt that triggered it has already left for the cached address; its
        retransmissions and every later datagram go to the fresh one. Numeric gateways
        are never looked up; one look-up per path is in flight at most.
        """
        name = self._names.get(path_id)
        with self._loop_lock:
            loop = self._loop
        if name is None or path_id in self._resolving or loop is None or loop.is_closed():
            return
        self._resolving.add(path_id)
        task = loop.create_task(self._refresh_target(path_id, *name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _lookup(self, host: str, port: int, family: int) -> Address:
        """The first address of ``host`` (the loop's resolver: a thread, or uvloop's)."""
        with self._loop_lock:
            loop = self._loop
        if loop is None:
            raise OSError("engine loop stopped")
        infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM)
        if not infos:
            raise OSError("no address")
        return tuple(infos[0][4])

    async def _refresh_target(self, path_id: int, host: str, port: int, family: int) -> None:
        try:
            try:
                address = await self._lookup(host, port, family)
            except OSError as exc:  # socket.gaierror included: keep the old address
                self.resolutions += 1
                self._resolve_report(
                    f"cannot re-resolve gateway host {host!r} of path {path_id}: "
                    f"{getattr(exc, 'strerror', None) or one_line(exc)}; keeping the old address",
                    Reason.INVALID_TRANSPORT_CANDIDATE,
                )
                return
            self.resolutions += 1
            if await self._keep_out(path_id, host, address):
                self._retarget(path_id, host, address)
        finally:
            self._resolving.discard(path_id)

    async def _keep_out(self, path_id: int, host: str, address: Address) -> bool:
        """A re-resolved endpoint gets its exception from the tunnel routes first; False
        (reported, old address kept) when it cannot have one."""
        guard, runtime = self._guard, self.runtime
        with self._loop_lock:
            loop = self._loop
        if guard is None or loop is None or runtime is None or path_id not in runtime.paths:
            return True
        if tuple(runtime.paths[path_id].remote[:2]) == tuple(address[:2]):
            return True  # unchanged: its exception (if it needs one) is in place
        try:
            await loop.run_in_executor(None, guard.except_endpoint, path_id, address[0])
        except KillSwitchError as exc:
            self._resolve_report(
                f"gateway host {host!r} of path {path_id} now resolves to {address[0]}, "
                f"but {exc}; keeping the old address",
                Reason.INVALID_TRANSPORT_CANDIDATE,
            )
            return False
        return True

    def _retarget(self, path_id: int, host: str, address: Address) -> None:
        """Send the path's datagrams to ``address`` from now on, if it changed."""
        runtime = self.runtime
        if runtime is None or path_id not in runtime.paths:
            return
        old = runtime.paths[path_id]
        if tuple(old.remote[:2]) != tuple(address[:2]):
            runtime.paths[path_id] = PathTarget(path_id, old.sock, address)
            self._resolve_report(
                f"gateway host {host!r} of path {path_id} now resolves to "
                f"{address[0]}:{address[1]} (was {old.remote[0]}:{old.remote[1]})",
                Reason.NAT_REBIND,
            )

    def _remember_name(self, path_id: int, host: str, port: int, family: int) -> None:
        """A path added while running (paths = "auto") whose gateway is a name (D7)."""
        self._names[path_id] = (host, port, family)

    def _monitor_report(self, reason: Reason, detail: str) -> None:
        self._resolve_report(detail, reason)

    def _resolve_report(self, detail: str, reason: Reason) -> None:
        runtime, session = self.runtime, self.session
        if runtime is None or session is None or _ended(session):
            return
        self._emit(Diagnostic(**self._base(runtime.clock()), reason_code=reason, detail=detail))

    def _base(self, now: float) -> EventBase:
        """The base fields of an event the engine itself emits for the session."""
        assert self.session is not None
        snap = self.session.snapshot(now)
        return {
            "ts_ms": int((now + self._wall_offset) * 1000),
            "session_id": snap.session_id,
            "node_id": self.config.node_id,
            "policy_version": snap.policy_version,
            "state_version": snap.state_version,
        }

    def _snapshot_tick(self) -> None:
        try:
            snap = self._snapshot(running=True)
            self.channel.publish_snapshot(snap)
            if self._control_server is not None:
                self._control_server.publish_status(snap)
        except Exception as exc:
            self._on_crash(exc)
            return
        with self._loop_lock:
            loop = self._loop
        if loop is not None:
            loop.call_later(SNAPSHOT_INTERVAL_S, self._snapshot_tick)

    def _collect_tick(self) -> None:
        """A full collection (see :data:`FULL_GC_INTERVAL_S`), then the next one."""
        gc.collect()
        with self._loop_lock:
            loop = self._loop
        if loop is not None:
            loop.call_later(FULL_GC_INTERVAL_S, self._collect_tick)

    # -- commands ----------------------------------------------------------------------------

    def _poll_commands(self, reschedule: bool) -> None:
        runtime = self.runtime
        try:
            if runtime is not None:
                for command in self.commands.take_all():
                    self._apply(command, runtime)
        except Exception as exc:
            self._on_crash(exc)
            return
        with self._loop_lock:
            loop = self._loop
        if reschedule and loop is not None:
            loop.call_later(COMMAND_POLL_S, self._poll_commands, True)

    def _apply(self, command: Command, runtime: ClientRuntime) -> None:
        session = runtime.session
        if _ended(session):
            return
        if isinstance(command, SwitchTo):
            self._switch(command.path_id, runtime)
        elif isinstance(command, SetAutoSwitch):
            enabled = command.enabled
            runtime.run_command(lambda now: session.set_auto_switch(enabled))
        elif isinstance(command, ForceReattach):
            runtime.run_command(session.force_reattach)
        elif isinstance(command, ReloadPolicy):
            runtime.run_command(self._reload_policy)
        elif isinstance(command, Terminate):
            self._stop_requested = True
            runtime.run_command(lambda now: session.terminate(now))
        else:
            self._extension(command, runtime)

    def _switch(self, path_id: int, runtime: ClientRuntime) -> None:
        session = runtime.session
        if path_id not in runtime.paths:
            self._emit(
                TransportSwitchDenied(
                    **self._base(runtime.clock()), reason_code=Reason.INVALID_TRANSPORT_CANDIDATE,
                    requested_transport=path_id, manual=True,
                )
            )  # fmt: skip
            return
        # a denial's reason is already in the TRANSPORT_SWITCH_DENIED event the session emits
        runtime.run_command(lambda now: self._ignore(session.switch_to(path_id, now)))

    @staticmethod
    def _ignore(_: object) -> None:
        """Discard a result the session has already reported as an event."""

    def _extension(self, command: ExtensionCommand, runtime: ClientRuntime) -> None:
        """A plug-in's command: its plug-in acts, or the engine says it was ignored."""
        if self._plugin is not None and self._plugin.handle(command):
            return
        self._emit(
            Diagnostic(
                **self._base(runtime.clock()), reason_code=Reason.INVALID_TRANSPORT_CANDIDATE,
                detail=command.ignored(),
            )
        )  # fmt: skip

    def _reload_policy(self, now: float) -> None:
        session = self.session
        assert session is not None
        path = self.config.policy_file
        if path is None:
            self._emit(
                PolicyEvent(
                    **self._base(now), policy_name="POLICY_UNCHANGED",
                    reason_code=Reason.POLICY_APPLIED,
                    detail="no policy file configured: the built-in default stays in force",
                )
            )  # fmt: skip
            return
        try:
            policy = load_policy(path)
        except PolicyError as exc:
            base = self._base(now)
            self._emit(
                PolicyEvent(
                    **base, policy_name="POLICY_INVALID", reason_code=Reason.POLICY_INVALID,
                    detail=f"{exc}; keeping policy {base['policy_version']}",
                )
            )  # fmt: skip
            return
        session.apply_policy(policy, now)

    def _emit(self, event: Event) -> None:
        self._on_event(event)

    # -- snapshots -----------------------------------------------------------------------------

    def _traffic(self, now: float) -> TrafficStats:
        runtime = self.runtime
        if runtime is None:
            return TrafficStats()
        c = runtime.counters
        samples = self._samples
        samples.append((now, c.tx_bytes, c.rx_bytes))
        while len(samples) > 2 and now - samples[1][0] >= RATE_WINDOW_S:
            samples.popleft()
        t0, tx0, rx0 = samples[0]
        span = now - t0
        tx_rate = (c.tx_bytes - tx0) * 8 / span if span > 0 else 0.0
        rx_rate = (c.rx_bytes - rx0) * 8 / span if span > 0 else 0.0
        return TrafficStats(
            tx_packets=c.tx_packets, rx_packets=c.rx_packets, tx_bytes=c.tx_bytes,
            rx_bytes=c.rx_bytes, tx_rate_bps=tx_rate, rx_rate_bps=rx_rate,
        )  # fmt: skip

    def _observability(self) -> ObservabilityView:
        if self._pipeline is None:
            return ObservabilityView()
        h = self._pipeline.health()
        return ObservabilityView(
            ok=h.ok,
            ring_depth=h.ring_depth,
            ring_dropped=h.ring_dropped,
            sinks=tuple(
                SinkView(s.name, str(s.state), s.queue_depth, s.dropped, s.last_error)
                for s in h.sinks
            ),
        )

    def _snapshot(self, *, running: bool) -> EngineSnapshot:
        now = time.monotonic()
        session = self.session
        snap = EngineSnapshot(
            seq=next(self._seq),
            ts_ms=int(time.time() * 1000),
            session=session_view(session.snapshot(now)) if session else NO_SESSION,
            traffic=self._traffic(now),
            observability=self._observability(),
            ui_dropped=self.channel.dropped,
            running=running,
            final_reason=None if running else self.final_reason,
            handshake_failure=None if running else _value(self.handshake_failure),
            explanation=None if running else self.explanation,
        )
        return self._plugin.annotate(snap) if self._plugin is not None else snap


def _value(failure: HandshakeFailure | None) -> str | None:
    return None if failure is None else str(failure)


def _nothing_to_move_to(event: Event) -> bool:
    """The session found no candidate at all (every path failed; the denial names none)."""
    return (
        isinstance(event, TransportSwitchDenied)
        and event.reason_code is Reason.NO_VALID_CANDIDATE
        and event.requested_transport is None
    )


def _ended(session: ClientSession) -> bool:
    return session.state is State.TERMINATED


def _inner_for(config: ClientConfig) -> TunLike:
    """The inner side the configuration names: the memory traffic source or a kernel TUN."""
    if config.inner_kind == "memory":
        return MemoryInner(rate_pps=config.inner_rate_pps, payload_size=config.inner_payload_size)
    routes = tunnel_routes(config.routes)  # a default route: its two halves (killswitch.py)
    return KernelTun(
        config.tun_name, config.mtu, address=config.address, address6=config.address6,
        routes=routes,
    )  # fmt: skip
