"""``jvpn-tui --demo``: the real client engine against an embedded gateway on loopback.

No root and no configuration: :class:`DemoEngine` generates fresh key pairs, starts a
gateway (a real :class:`GatewaySessions` on a loopback UDP socket, in its own thread,
answering inner ICMP echo requests itself instead of a TUN), one impairment relay per
path (:func:`tunnel.impair.thread.run_relay_in_thread`), and runs the ordinary
:class:`ClientEngine` with the memory traffic source over real Noise + AEAD over real
UDP. ``DemoImpair`` commands act on the relays:

* ``kill``: blackhole the path both ways; ``restore``: clear every impairment;
* ``loss``: loss ratio ``value`` both ways; ``rebind``: new NAT source port;
* ``replay``: re-send the datagrams the gateway last received on that path from another
  address (the gateway rejects them; its SECURITY_EVENTs are forwarded to the UI);
* ``script``: play :data:`DEMO_SCRIPT` (``path_id`` ignored), the golden timeline in the
  spirit of SPEC-DIGEST AT-22: loss on the active path (VOLATILE, then a switch), death of
  the active path (TRANSPORT_DEAD, then recovery on another path), a replay (rejected by
  the gateway: SECURITY_EVENT), then every path restored. ``DemoEngine(script=True)``
  plays it from the start (``jvpn-tui --demo --headless`` does); the UI plays it with
  ``g``. Each step targets the path that is active when the step runs.

Every command's outcome and every script step is reported as a DIAGNOSTIC event
(``detail`` starts "demo:").
"""

from __future__ import annotations

import asyncio
import os
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from tunnel.api import DemoImpair, UiChannel
from tunnel.client.config import ClientConfig, PathConfig
from tunnel.client.engine import ClientEngine, one_line
from tunnel.client.runtime import ClientRuntime
from tunnel.core.events import Diagnostic, Event, Reason, SecurityEvent
from tunnel.core.gateway import ClientEntry, GatewaySessions
from tunnel.core.handshake import generate_keypair
from tunnel.core.policy import POLICY_DEFAULT
from tunnel.impair.thread import RelayThread, run_relay_in_thread
from tunnel.io.inner import MemoryInner, echo_reply

DEMO_PATHS: Final = 3
DEMO_RATE_PPS: Final = 20.0
"""Echo requests per second from the built-in traffic source."""
DEMO_CLIENT_INNER: Final = "10.66.0.2"
DEMO_GATEWAY_INNER: Final = "10.66.0.1"
CAPTURE: Final = 32
"""Datagrams the demo keeps per path (as sent by the client) for the ``replay`` action."""
GATEWAY_TICK_S: Final = 0.05
"""Longest sleep of the demo gateway's selector (its stop flag is checked this often)."""


@dataclass(frozen=True, slots=True)
class ScriptStep:
    """One step of the scripted demo timeline."""

    at_s: float
    """Seconds after the script started."""
    action: str
    """A DemoImpair action; ``restore`` acts on every path, the others on the active one."""
    value: float
    """The action's value (loss ratio for ``loss``)."""
    expect: str
    """What the viewer should see next (announced in the step's DIAGNOSTIC)."""


DEMO_SCRIPT: Final = (
    ScriptStep(3.0, "loss", 0.3, "VOLATILE, then a switch to a healthier path"),
    ScriptStep(8.0, "kill", 0.0, "TRANSPORT_DEAD, then recovery on another path"),
    ScriptStep(12.0, "replay", 0.0, "a rejected replay (SECURITY_EVENT from the gateway)"),
    ScriptStep(15.0, "restore", 0.0, "every path answering again"),
)
"""The golden demo timeline: a switch, a recovery and a rejected replay within 20 s."""

SCRIPT_LENGTH_S: Final = DEMO_SCRIPT[-1].at_s + 3.0
"""Script start to a settled end (the restored paths answer their probes again)."""


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
        now = time.monotonic()
        for _ in range(1024):
            try:
                data, addr = sock.recvfrom(65535)
            except BlockingIOError:
                break
            except OSError:
                continue  # an ICMP error for an earlier send: nothing to read
            gw.receive_datagram(data, addr, now)
        deadline = gw.next_deadline()
        if deadline is not None and deadline <= now:
            gw.handle_timer(now)
        for _ in range(2):  # echo replies make a second round of output
            for addr, data in gw.datagrams_to_send():
                assert isinstance(addr, tuple)
                try:
                    sock.sendto(data, addr)
                except OSError:
                    pass  # loopback buffer full or relay gone: a lost datagram
            for packet in gw.packets_for_tun():
                reply = echo_reply(packet)
                if reply is not None:
                    self.echoed += 1
                    gw.receive_tun_packet(reply, now)
        for event in gw.events():
            if isinstance(event, SecurityEvent):
                self._on_event(event)


class DemoEngine(ClientEngine):
    """The demo: a ClientEngine whose gateway and paths are embedded (EngineHandle)."""

    demo = True

    def __init__(
        self,
        *,
        channel: UiChannel | None = None,
        n_paths: int = DEMO_PATHS,
        rate_pps: float = DEMO_RATE_PPS,
        seed: int | None = None,
        script: bool = False,
    ) -> None:
        if not 1 <= n_paths <= 9:
            raise ValueError(f"n_paths must be 1..9, not {n_paths}")
        private, public = generate_keypair()
        self.gateway = DemoGateway(public, self._gateway_event)
        self.relays: dict[int, RelayThread] = {}
        self._seed = seed
        placeholder = ("127.0.0.1", 9)
        paths = tuple(
            PathConfig(i, f"demo{i}", ("127.0.0.1", 0), None, placeholder)
            for i in range(1, n_paths + 1)
        )
        config = ClientConfig(
            private_key=private,
            gateway_public_key=self.gateway.public_key,
            paths=paths,
            node_id="demo-client",
            source="<demo>",
        )
        self.memory = MemoryInner(rate_pps=rate_pps)
        super().__init__(config, channel=channel, inner=self.memory)
        self._captured: dict[int, deque[bytes]] = {}
        self._tap = self._capture
        self._script: list[asyncio.TimerHandle] = []
        self.script_started: float | None = None
        """Monotonic time the script last started (None: never played)."""
        if script:
            self.commands.send(DemoImpair(0, "script"))  # taken when the loop starts

    # -- set-up around the ordinary engine ------------------------------------------------

    def _before_loop(self) -> None:
        self.gateway.start()
        paths = []
        for p in self.config.paths:
            seed = None if self._seed is None else self._seed + p.path_id
            relay = run_relay_in_thread(
                ("127.0.0.1", 0),
                self.gateway.address,
                seed=seed,
                name=f"jvpn-demo-relay{p.path_id}",
            )
            self.relays[p.path_id] = relay
            paths.append(PathConfig(p.path_id, p.name, p.bind, None, relay.bound_address))
        self.config = ClientConfig(
            private_key=self.config.private_key,
            gateway_public_key=self.config.gateway_public_key,
            paths=tuple(paths),
            node_id=self.config.node_id,
            source=self.config.source,
        )

    def _after_loop(self) -> None:
        for relay in self.relays.values():
            relay.stop()
        self.gateway.stop()

    # -- gateway security events into the UI stream ---------------------------------------

    def _gateway_event(self, event: Event) -> None:
        """Gateway thread: hand the event to the engine loop."""
        with self._loop_lock:
            loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._emit, event)

    # -- demo commands ------------------------------------------------------------------------

    def _demo_impair(self, command: DemoImpair, runtime: ClientRuntime) -> None:
        if command.action == "script":
            self._play_script(runtime)
            return
        relay = self.relays.get(command.path_id)
        with self._loop_lock:
            loop = self._loop
        if relay is None or loop is None:
            self._demo_report(runtime, f"demo: no path {command.path_id}", ok=False)
            return
        action, value, pid = command.action, command.value, command.path_id

        def act() -> str:
            if action == "kill":
                relay.set("both", blackhole=True)
                return f"demo: path {pid} killed (blackhole both ways)"
            if action == "restore":
                relay.reset()
                return f"demo: path {pid} restored"
            if action == "loss":
                relay.set("both", loss=value)
                return f"demo: path {pid} loss {value:.0%} both ways"
            if action == "rebind":
                n = relay.rebind()
                return f"demo: path {pid} NAT rebinding #{n} (new source port)"
            if action == "replay":
                sent = self._replay(pid, relay)
                return (
                    f"demo: replayed {sent} captured datagrams of path {pid} from another address"
                )
            raise ValueError(f"unknown demo action {action!r}")

        future = loop.run_in_executor(None, act)

        def done(f: asyncio.Future[str]) -> None:
            exc = f.exception()
            if exc is None:
                self._demo_report(runtime, f.result(), ok=True)
            else:
                self._demo_report(runtime, f"demo: {action} failed: {one_line(exc)}", ok=False)

        future.add_done_callback(done)

    # -- the scripted timeline -------------------------------------------------------------

    def _play_script(self, runtime: ClientRuntime) -> None:
        """Engine loop: schedule every step of DEMO_SCRIPT (a replay restarts it)."""
        with self._loop_lock:
            loop = self._loop
        if loop is None:
            return
        restarted = bool(self._script)
        for handle in self._script:
            handle.cancel()
        self.script_started = runtime.clock()
        self._script = [
            loop.call_later(step.at_s, self._script_step, n, step, runtime)
            for n, step in enumerate(DEMO_SCRIPT, start=1)
        ]
        plan = ", ".join(f"{s.action} at {s.at_s:g} s" for s in DEMO_SCRIPT)
        again = "restarted" if restarted else "started"
        self._demo_report(runtime, f"demo: script {again}: {plan}", ok=True)

    def _script_step(self, n: int, step: ScriptStep, runtime: ClientRuntime) -> None:
        """Engine loop: announce one step, then run it as an ordinary DemoImpair."""
        session = runtime.session
        if session.machine.terminated:
            return
        where = f"step {n}/{len(DEMO_SCRIPT)} at {step.at_s:g} s"
        if step.action == "restore":
            self._demo_report(runtime, f"demo: {where}: restore every path; expect "
                              f"{step.expect}", ok=True)  # fmt: skip
            for pid in sorted(self.relays):
                self._demo_impair(DemoImpair(pid, "restore"), runtime)
            return
        snap = session.snapshot(runtime.clock())
        target = snap.active if snap.active is not None else snap.pending
        if target is None:
            self._demo_report(runtime, f"demo: {where}: {step.action} skipped, no active "
                              "path right now", ok=False)  # fmt: skip
            return
        what = {"loss": f"{step.value:.0%} loss on", "kill": "kill", "replay": "replay on"}
        self._demo_report(
            runtime,
            f"demo: {where}: {what.get(step.action, step.action)} the active path {target}; "
            f"expect {step.expect}",
            ok=True,
        )
        self._demo_impair(DemoImpair(target, step.action, step.value), runtime)

    def _capture(self, path_id: int, data: bytes) -> None:
        """Engine loop: keep the last datagrams sent on each path (for ``replay``)."""
        ring = self._captured.get(path_id)
        if ring is None:
            ring = self._captured[path_id] = deque(maxlen=CAPTURE)
        ring.append(data)

    def _replay(self, path_id: int, relay: RelayThread) -> int:
        """Re-send the captured datagrams of ``path_id`` from a fresh socket (an attacker
        elsewhere): through the relay, the gateway sees them from a new address."""
        datagrams = list(self._captured.get(path_id, ()))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
            attacker.bind(("127.0.0.1", 0))
            for data in datagrams:
                attacker.sendto(data, relay.bound_address)
        return len(datagrams)

    def _demo_report(self, runtime: ClientRuntime, detail: str, *, ok: bool) -> None:
        self._emit(
            Diagnostic(
                **self._base(runtime.clock()),
                reason_code=Reason.DEMO_ACTION if ok else Reason.INVALID_TRANSPORT_CANDIDATE,
                detail=detail,
            )
        )
