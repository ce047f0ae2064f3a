"""``jvpn-tui --demo``: the real client engine against an embedded gateway on loopback.

No root and no configuration: :class:`DemoEngine` is the ordinary :class:`ClientEngine`
(with the memory traffic source, real Noise + AEAD over real UDP) with :class:`DemoPlugin`
plugged in from outside. When the engine starts, the plug-in starts a gateway
(:class:`tunnel.demo.gateway.DemoGateway`: a real ``GatewaySessions`` on a loopback UDP
socket, in its own thread, answering inner ICMP echo requests itself instead of a TUN)
and one impairment relay per path (:func:`tunnel.impair.thread.run_relay_in_thread`), and
points the paths at the relays. ``DemoImpair`` commands (``tunnel.demo.commands``) act on
the relays:

* ``kill``: blackhole the path both ways; ``restore``: clear every impairment (of every
  path for ``path_id`` 0);
* ``loss``: loss ratio ``value`` both ways; ``rebind``: new NAT source port;
* ``replay``: re-send the datagrams the gateway last received on that path from another
  address (the gateway rejects them; its SECURITY_EVENTs are forwarded to the UI);
* ``script``: play :data:`~tunnel.demo.script.DEMO_SCRIPT` from its start (``path_id``
  ignored); ``play_pause``: pause, resume or replay it (the play key). Each step targets
  the path that is active when the step runs. ``DemoEngine(script=True)`` plays it from
  the start (``jvpn-tui --demo`` does, with or without the UI).

Every command's outcome, every script step and every change of the script's status is
reported as a DIAGNOSTIC event (``detail`` starts "demo:"; its format:
``tunnel.demo.commands``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections import deque
from functools import partial
from typing import Final

from tunnel.api import CommandQueue, EngineSnapshot, ExtensionCommand, UiChannel
from tunnel.client.config import ClientConfig, PathConfig
from tunnel.client.control import ControlSocket
from tunnel.client.engine import ClientEngine, PluginHost, one_line
from tunnel.core.events import Event, Reason
from tunnel.core.handshake import generate_keypair
from tunnel.demo.commands import ALL_PATHS, DemoAction, DemoImpair, step_detail
from tunnel.demo.gateway import DemoGateway
from tunnel.demo.script import (
    DEMO_SCRIPT,
    SCRIPT_LENGTH_S,
    DemoScript,
    ScriptPlayer,
    ScriptStep,
    step_summary,
)
from tunnel.impair.thread import RelayThread, run_relay_in_thread
from tunnel.io.inner import MemoryInner

DEMO_PATHS: Final = 3
DEMO_RATE_PPS: Final = 20.0
"""Echo requests per second from the built-in traffic source."""
CAPTURE: Final = 32
"""Datagrams the demo keeps per path (as sent by the client) for the ``replay`` action."""


__all__ = ["DEMO_SCRIPT", "SCRIPT_LENGTH_S", "DemoEngine", "DemoPlugin", "DemoScript",
           "ScriptStep"]  # fmt: skip


class DemoPlugin:
    """The demo as an :class:`tunnel.client.engine.EnginePlugin`: the embedded gateway, one
    impairment relay per path, the datagrams captured for ``replay``, the script."""

    def __init__(
        self, client_public: bytes, *, seed: int | None = None, script: DemoScript = DEMO_SCRIPT
    ) -> None:
        self.gateway = DemoGateway(client_public, self._gateway_event)
        self.relays: dict[int, RelayThread] = {}
        """path id -> its impairment relay (started by :meth:`prepare`)."""
        self.script = script
        """The timeline ``script`` / ``play_pause`` play."""
        self.player: ScriptPlayer | None = None
        """Plays :attr:`script` (made by :meth:`attach`: it needs the engine loop)."""
        self._seed = seed
        self._captured: dict[int, deque[bytes]] = {}
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
        self.player = ScriptPlayer(
            self.script, host.loop, host.now,
            run_step=partial(self._script_step, host),
            say=partial(self._report, ok=True),
        )  # fmt: skip

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
        if self.player is not None:
            self.player.stop()
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
        """Engine loop: act on the script, or on a relay (in an executor: relays answer
        over a socket)."""
        host, player = self._host, self.player
        assert host is not None and player is not None, "attached before taking commands"
        if command.action == DemoAction.SCRIPT:
            player.play()
            return
        if command.action == DemoAction.PLAY_PAUSE:
            player.toggle()
            return
        if command.action == DemoAction.RESTORE and command.path_id == ALL_PATHS:
            relays = sorted(self.relays.items())
        elif command.path_id in self.relays:
            relays = [(command.path_id, self.relays[command.path_id])]
        else:
            self._report(f"demo: there is no path {command.path_id}", ok=False)
            return
        future = host.loop.run_in_executor(None, self._act, command, relays)
        future.add_done_callback(partial(self._acted, command))

    def _act(self, command: DemoImpair, relays: list[tuple[int, RelayThread]]) -> str:
        """Executor thread: do it; the line that says what was done."""
        action, value = command.action, command.value
        if action == DemoAction.RESTORE:
            for _, relay in relays:
                relay.reset()
            if command.path_id == ALL_PATHS:
                return "every path restored (no impairment left)"
            return f"path {command.path_id}: restored (no impairment left)"
        pid, relay = relays[0]
        if action == DemoAction.KILL:
            relay.set("both", blackhole=True)
            return f"path {pid}: blackholed both ways"
        if action == DemoAction.LOSS:
            relay.set("both", loss=value)
            return f"path {pid}: {value:.0%} loss both ways"
        if action == DemoAction.REBIND:
            return f"path {pid}: NAT rebinding #{relay.rebind()} (new source port)"
        if action == DemoAction.REPLAY:
            sent = self._replay(pid, relay)
            return f"path {pid}: {sent} captured datagrams replayed from another address"
        raise ValueError(f"unknown demo action {str(action)!r}")

    def _acted(self, command: DemoImpair, future: asyncio.Future[str]) -> None:
        exc = future.exception()
        if exc is None:
            self._report(f"demo: {future.result()}", ok=True)
            return
        where = "every path" if command.path_id == ALL_PATHS else f"path {command.path_id}"
        self._report(f"demo: {where}: {command.action} failed: {one_line(exc)}", ok=False)

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

    def _script_step(self, host: PluginHost, n: int, step: ScriptStep, last_try: bool) -> bool:
        """Engine loop (the player's timer): announce one step, then run it as an ordinary
        DemoImpair on the path active now (``restore``: on every path). False: there is no
        active path yet (the player waits and tries again); on the ``last_try`` such a
        step is skipped, saying so."""
        if host.ended():
            return True
        total = len(self.script.steps)
        if step.action == DemoAction.RESTORE:
            self._report(step_detail(n, total, step.at_s, step_summary(step), step.expect),
                         ok=True)  # fmt: skip
            self._impair(DemoImpair(ALL_PATHS, DemoAction.RESTORE))
            return True
        session = host.session()
        target = session.active if session.active is not None else session.pending
        if target is None:
            if not last_try:
                return False
            skipped = f"{step.action} skipped: no active path right now"
            self._report(step_detail(n, total, step.at_s, skipped, "nothing from this step"),
                         ok=False)  # fmt: skip
            return True
        what = step_summary(step, target)
        self._report(step_detail(n, total, step.at_s, what, step.expect), ok=True)
        self._impair(DemoImpair(target, step.action, step.value))
        return True


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
        timeline: DemoScript = DEMO_SCRIPT,
        control: ControlSocket | None = None,
    ) -> None:
        """``script``: play ``timeline`` from the start (``jvpn-tui --demo`` does)."""
        if not 1 <= n_paths <= 9:
            raise ValueError(f"n_paths must be 1..9, not {n_paths}")
        private, public = generate_keypair()
        self.plugin = DemoPlugin(public, seed=seed, script=timeline)
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
        self.engine = ClientEngine(
            config, channel=channel, inner=self.memory, plugin=self.plugin, control=control
        )
        self.channel: UiChannel = self.engine.channel
        self.commands: CommandQueue = self.engine.commands
        if script:
            self.commands.send(DemoImpair(ALL_PATHS, DemoAction.SCRIPT))  # taken at loop start

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
