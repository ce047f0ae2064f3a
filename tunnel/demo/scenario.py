"""``jvpn-tui --demo``: the real client engine against an embedded gateway on loopback.

No root and no configuration: :class:`DemoEngine` is the ordinary :class:`ClientEngine`
(with the memory traffic source, real Noise + AEAD over real UDP) with :class:`DemoPlugin`
plugged in from outside. When the engine starts, the plug-in starts a gateway
(:class:`tunnel.demo.gateway.DemoGateway`: a real ``GatewaySessions`` on a loopback UDP
socket, in its own thread, answering inner ICMP echo requests itself instead of a TUN)
and one impairment relay per path (:func:`tunnel.impair.thread.run_relay_in_thread`), and
points the paths at the relays. ``DemoImpair`` commands (``tunnel.demo.commands``) act on
the relays:

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
import dataclasses
import socket
from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import Final

from tunnel.api import CommandQueue, EngineSnapshot, ExtensionCommand, UiChannel
from tunnel.client.config import ClientConfig, PathConfig
from tunnel.client.engine import ClientEngine, PluginHost, one_line
from tunnel.core.events import Event, Reason
from tunnel.core.handshake import generate_keypair
from tunnel.demo.commands import DemoAction, DemoImpair
from tunnel.demo.gateway import DemoGateway
from tunnel.impair.thread import RelayThread, run_relay_in_thread
from tunnel.io.inner import MemoryInner

DEMO_PATHS: Final = 3
DEMO_RATE_PPS: Final = 20.0
"""Echo requests per second from the built-in traffic source."""
CAPTURE: Final = 32
"""Datagrams the demo keeps per path (as sent by the client) for the ``replay`` action."""


@dataclass(frozen=True, slots=True)
class ScriptStep:
    """One step of the scripted demo timeline."""

    at_s: float
    """Seconds after the script started."""
    action: DemoAction
    """``restore`` acts on every path, the others on the active one."""
    value: float
    """The action's value (loss ratio for ``loss``)."""
    expect: str
    """What the viewer should see next (announced in the step's DIAGNOSTIC)."""


DEMO_SCRIPT: Final = (
    ScriptStep(3.0, DemoAction.LOSS, 0.3, "VOLATILE, then a switch to a healthier path"),
    ScriptStep(8.0, DemoAction.KILL, 0.0, "TRANSPORT_DEAD, then recovery on another path"),
    ScriptStep(12.0, DemoAction.REPLAY, 0.0,
               "a rejected replay (SECURITY_EVENT from the gateway)"),
    ScriptStep(15.0, DemoAction.RESTORE, 0.0, "every path answering again"),
)  # fmt: skip
"""The golden demo timeline: a switch, a recovery and a rejected replay within 20 s."""

SCRIPT_LENGTH_S: Final = DEMO_SCRIPT[-1].at_s + 3.0
"""Script start to a settled end (the restored paths answer their probes again)."""

_STEP_VERB: Final = {
    DemoAction.LOSS: "{value:.0%} loss on",
    DemoAction.KILL: "kill",
    DemoAction.REPLAY: "replay on",
}
"""How a step's announcement names its action (format with the step's ``value``)."""


class DemoPlugin:
    """The demo as an :class:`tunnel.client.engine.EnginePlugin`: the embedded gateway, one
    impairment relay per path, the datagrams captured for ``replay``, the script."""

    def __init__(self, client_public: bytes, *, seed: int | None = None) -> None:
        self.gateway = DemoGateway(client_public, self._gateway_event)
        self.relays: dict[int, RelayThread] = {}
        """path id -> its impairment relay (started by :meth:`prepare`)."""
        self.script_started: float | None = None
        """Engine time the script last started (None: never played)."""
        self._seed = seed
        self._captured: dict[int, deque[bytes]] = {}
        self._script: list[asyncio.TimerHandle] = []
        self._host: PluginHost | None = None

    # -- EnginePlugin -----------------------------------------------------------------------

    def prepare(self, config: ClientConfig) -> ClientConfig:
        """Engine thread, before the session: start the gateway and a relay per path;
        every path talks to its relay."""
        self.gateway.start()
        paths = []
        for p in config.paths:
            seed = None if self._seed is None else self._seed + p.path_id
            relay = run_relay_in_thread(
                ("127.0.0.1", 0), self.gateway.address, seed=seed,
                name=f"jvpn-demo-relay{p.path_id}",
            )  # fmt: skip
            self.relays[p.path_id] = relay
            paths.append(PathConfig(p.path_id, p.name, p.bind, None, relay.bound_address))
        return dataclasses.replace(config, paths=tuple(paths))

    def attach(self, host: PluginHost) -> None:
        self._host = host

    def tap(self, path_id: int, data: bytes) -> None:
        """Engine loop: keep the last datagrams sent on each path (for ``replay``)."""
        ring = self._captured.get(path_id)
        if ring is None:
            ring = self._captured[path_id] = deque(maxlen=CAPTURE)
        ring.append(data)

    def handle(self, command: ExtensionCommand) -> bool:
        if not isinstance(command, DemoImpair):
            return False
        self._impair(command)
        return True

    def annotate(self, snapshot: EngineSnapshot) -> EngineSnapshot:
        """Every snapshot says it comes from the demo (the UI offers the demo keys)."""
        return dataclasses.replace(snapshot, demo=True)

    def close(self) -> None:
        for relay in self.relays.values():
            relay.stop()
        self.gateway.stop()

    # -- gateway security events into the UI stream ---------------------------------------

    def _gateway_event(self, event: Event) -> None:
        """Gateway thread: hand the event to the engine loop."""
        host = self._host
        if host is not None:
            host.emit_threadsafe(event)

    # -- demo commands ------------------------------------------------------------------------

    def _impair(self, command: DemoImpair) -> None:
        """Engine loop: act on a relay (in an executor: relays answer over a socket)."""
        host = self._host
        assert host is not None, "the engine attaches its plug-in before taking commands"
        if command.action == DemoAction.SCRIPT:
            self._play_script(host)
            return
        relay = self.relays.get(command.path_id)
        if relay is None:
            self._report(f"demo: no path {command.path_id}", ok=False)
            return
        future = host.loop.run_in_executor(None, self._act, command, relay)
        future.add_done_callback(partial(self._acted, command.action))

    def _act(self, command: DemoImpair, relay: RelayThread) -> str:
        """Executor thread: do it; the line that says what was done."""
        pid, value = command.path_id, command.value
        action = command.action
        if action == DemoAction.KILL:
            relay.set("both", blackhole=True)
            return f"demo: path {pid} killed (blackhole both ways)"
        if action == DemoAction.RESTORE:
            relay.reset()
            return f"demo: path {pid} restored"
        if action == DemoAction.LOSS:
            relay.set("both", loss=value)
            return f"demo: path {pid} loss {value:.0%} both ways"
        if action == DemoAction.REBIND:
            return f"demo: path {pid} NAT rebinding #{relay.rebind()} (new source port)"
        if action == DemoAction.REPLAY:
            sent = self._replay(pid, relay)
            return f"demo: replayed {sent} captured datagrams of path {pid} from another address"
        raise ValueError(f"unknown demo action {str(action)!r}")

    def _acted(self, action: DemoAction, future: asyncio.Future[str]) -> None:
        exc = future.exception()
        if exc is None:
            self._report(future.result(), ok=True)
        else:
            self._report(f"demo: {action} failed: {one_line(exc)}", ok=False)

    def _replay(self, path_id: int, relay: RelayThread) -> int:
        """Re-send the captured datagrams of ``path_id`` from a fresh socket (an attacker
        elsewhere): through the relay, the gateway sees them from a new address."""
        datagrams = list(self._captured.get(path_id, ()))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
            attacker.bind(("127.0.0.1", 0))
            for data in datagrams:
                attacker.sendto(data, relay.bound_address)
        return len(datagrams)

    def _report(self, detail: str, *, ok: bool) -> None:
        host = self._host
        if host is not None:
            host.report(Reason.DEMO_ACTION if ok else Reason.INVALID_TRANSPORT_CANDIDATE, detail)

    # -- the scripted timeline -------------------------------------------------------------

    def _play_script(self, host: PluginHost) -> None:
        """Engine loop: schedule every step of DEMO_SCRIPT (a replay restarts it)."""
        restarted = bool(self._script)
        for handle in self._script:
            handle.cancel()
        self.script_started = host.now()
        self._script = [
            host.loop.call_later(step.at_s, self._script_step, n, step, host)
            for n, step in enumerate(DEMO_SCRIPT, start=1)
        ]
        plan = ", ".join(f"{s.action} at {s.at_s:g} s" for s in DEMO_SCRIPT)
        again = "restarted" if restarted else "started"
        self._report(f"demo: script {again}: {plan}", ok=True)

    def _script_step(self, n: int, step: ScriptStep, host: PluginHost) -> None:
        """Engine loop: announce one step, then run it as an ordinary DemoImpair."""
        if host.ended():
            return
        where = f"step {n}/{len(DEMO_SCRIPT)} at {step.at_s:g} s"
        if step.action == DemoAction.RESTORE:
            self._report(f"demo: {where}: restore every path; expect {step.expect}", ok=True)
            for pid in sorted(self.relays):
                self._impair(DemoImpair(pid, DemoAction.RESTORE))
            return
        session = host.session()
        target = session.active if session.active is not None else session.pending
        if target is None:
            self._report(f"demo: {where}: {step.action} skipped, no active path right now",
                         ok=False)  # fmt: skip
            return
        what = _STEP_VERB.get(step.action, str(step.action)).format(value=step.value)
        self._report(
            f"demo: {where}: {what} the active path {target}; expect {step.expect}", ok=True
        )
        self._impair(DemoImpair(target, step.action, step.value))


class DemoEngine:
    """The demo: an ordinary :class:`ClientEngine` with :class:`DemoPlugin` plugged in
    (an :class:`tunnel.api.EngineHandle`)."""

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
        self.plugin = DemoPlugin(public, seed=seed)
        self.memory = MemoryInner(rate_pps=rate_pps)
        """The inner side: an ICMP echo source (its counters show traffic carried)."""
        placeholder = ("127.0.0.1", 9)  # the plug-in points every path at its relay
        paths = tuple(
            PathConfig(i, f"demo{i}", ("127.0.0.1", 0), None, placeholder)
            for i in range(1, n_paths + 1)
        )
        config = ClientConfig(
            private_key=private, gateway_public_key=self.plugin.gateway.public_key,
            paths=paths, node_id="demo-client", source="<demo>",
        )  # fmt: skip
        self.engine = ClientEngine(config, channel=channel, inner=self.memory, plugin=self.plugin)
        self.channel: UiChannel = self.engine.channel
        self.commands: CommandQueue = self.engine.commands
        if script:
            self.commands.send(DemoImpair(0, DemoAction.SCRIPT))  # taken when the loop starts

    # -- EngineHandle, by the engine ------------------------------------------------------

    def start(self) -> None:
        self.engine.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.engine.stop(timeout)

    def join(self, timeout: float | None = None) -> bool:
        return self.engine.join(timeout)

    def notify(self) -> None:
        """Wake the engine loop to take commands now (any thread)."""
        self.engine.notify()

    @property
    def final_reason(self) -> str | None:
        return self.engine.final_reason

    @property
    def final_snapshot(self) -> EngineSnapshot | None:
        return self.engine.final_snapshot

    @property
    def relays(self) -> dict[int, RelayThread]:
        return self.plugin.relays
