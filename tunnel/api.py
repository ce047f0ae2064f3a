"""The engine <-> UI contract (DESIGN §4): snapshots and events out, commands in.

The engine runs in its own thread. It publishes immutable :class:`EngineSnapshot` values
(4-10 Hz) and discrete event dicts into a :class:`UiChannel`, a bounded queue that never
blocks the publisher: when it is full the oldest item is dropped and counted. The UI
drains it on a timer. Commands go the other way through a :class:`CommandQueue`, which
the engine polls; the UI never calls into engine objects.

The contract owns its types: :class:`SessionView`, :class:`PathView` and
:class:`PathStatsView` are what the UI draws (the engine converts the protocol core's
snapshot into them), so the UI never imports ``tunnel.core``. Events travel as their
``to_dict()`` mappings; their vocabulary (:class:`EventType`, :class:`Reason`) is the
project's one, and the UI names it through this module.

Commands are this module's own (switch, auto-switch, reattach, policy reload, terminate)
plus :class:`ExtensionCommand` values that an engine plug-in answers (the demo's
``tunnel.demo.commands.DemoImpair``); an engine without a plug-in for one says so in a
DIAGNOSTIC event.

Anything implementing :class:`EngineHandle` can drive the UI: the real engine
(``tunnel.client.engine``), the demo, and the scripted fake engine of the snapshot tests.
This module is thread-safe by construction (``queue``/``collections.deque`` with one
lock) and imports nothing from the UI.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol

from tunnel.core.events import EventType, Reason

__all__ = [
    "COMMAND_QUEUE_SIZE", "NO_SESSION", "UI_QUEUE_SIZE", "Command", "CommandQueue",
    "EngineHandle", "EngineSnapshot", "EventType", "ExtensionCommand", "ForceReattach",
    "ObservabilityView", "PathStatsView", "PathView", "Reason", "ReloadPolicy", "SessionView",
    "SetAutoSwitch", "SinkView", "SwitchTo", "Terminate", "TrafficStats", "UiChannel",
    "UiItem",
]  # fmt: skip
"""``EventType`` and ``Reason`` are the events' vocabulary (``tunnel.core.events``), named
here so that the UI reads event mappings in the project's terms without importing the core."""

UI_QUEUE_SIZE: Final = 256
"""Items (snapshots + events) the UI channel holds before it drops the oldest."""

COMMAND_QUEUE_SIZE: Final = 64
"""Commands waiting for the engine; a UI that floods it gets ``False`` from ``send``."""


# -- commands (UI -> engine) -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SwitchTo:
    """Switch the active transport to ``path_id`` (manual switch; may be denied)."""

    path_id: int
    """The path to make active."""


@dataclass(frozen=True, slots=True)
class SetAutoSwitch:
    """Turn automatic (health-driven) switching on or off."""

    enabled: bool
    """True: the session switches by itself when the active path degrades."""


@dataclass(frozen=True, slots=True)
class ForceReattach:
    """Re-run the reattach exchange on the active path (operator request)."""


@dataclass(frozen=True, slots=True)
class ReloadPolicy:
    """Re-read the policy file; an invalid one keeps the last valid policy."""


@dataclass(frozen=True, slots=True)
class Terminate:
    """End the session explicitly (TERMINATE sent, reason operator_terminated)."""


class ExtensionCommand:
    """Base of the commands an engine plug-in answers (the demo's ``DemoImpair`` is one).

    The engine routes them to its plug-in; an engine without one that takes the command
    reports :meth:`ignored` as a DIAGNOSTIC event instead. Subclasses are frozen, slotted
    dataclasses like the commands above.
    """

    __slots__ = ()

    def ignored(self) -> str:
        """The DIAGNOSTIC detail when no plug-in of the engine takes this command."""
        return f"{type(self).__name__} ignored: this engine has no plug-in for it"


Command = SwitchTo | SetAutoSwitch | ForceReattach | ReloadPolicy | Terminate | ExtensionCommand


class CommandQueue:
    """Thread-safe, bounded UI -> engine command queue. ``send`` never blocks."""

    def __init__(self, maxsize: int = COMMAND_QUEUE_SIZE) -> None:
        self._q: queue.Queue[Command] = queue.Queue(maxsize)
        self.rejected = 0
        """Commands refused because the queue was full."""

    def send(self, command: Command) -> bool:
        try:
            self._q.put_nowait(command)
        except queue.Full:
            self.rejected += 1
            return False
        return True

    def take_all(self) -> list[Command]:
        """Every waiting command, oldest first (engine side)."""
        out: list[Command] = []
        while True:
            try:
                out.append(self._q.get_nowait())
            except queue.Empty:
                return out


# -- snapshots and events (engine -> UI) ------------------------------------------------


@dataclass(frozen=True, slots=True)
class PathStatsView:
    """One path's measured health, as the transports table shows it."""

    path_id: int
    """Transport id (the number the ``1``-``9`` keys switch to)."""
    srtt_ms: float | None
    """Smoothed round-trip time in ms; None until the first RTT sample."""
    jitter_ms: float
    """RTT variation in ms (0.0 before the first sample)."""
    loss_ratio: float
    """Probe round trips lost over the loss window, 0..1 (0.0 while not ``loss_known``)."""
    consecutive_misses: int
    """Probes lost in a row since the last timely answer."""
    score: float
    """Selection score, higher is better; 0.0 when the path is dead."""
    alive: bool
    """False once the path has been silent for longer than the policy's dead time."""
    rtt_history: tuple[float, ...]
    """The last RTT samples in ms, oldest first (bounded): the sparkline."""
    loss_up: float = 0.0
    """Client -> gateway loss over the loss window, 0..1."""
    loss_down: float = 0.0
    """Gateway -> client loss over the loss window, 0..1."""
    loss_known: bool = False
    """``loss_ratio`` rests on enough probes to be shown (else the UI shows a dash)."""
    direction_known: bool = False
    """``loss_up``/``loss_down`` rest on enough probes (a standby path's rarely do)."""


@dataclass(frozen=True, slots=True)
class PathView:
    """One candidate path of the session: its health and its role."""

    stats: PathStatsView
    """The path's measured health."""
    label: str
    """Human-readable ``local -> remote`` description from the configuration."""
    role: str
    """``active``, ``switching`` (a switch to it is in flight), ``standby``, ``down``
    (validated once, silent now) or ``unvalidated``."""
    validated: bool
    """The path answered a validation challenge (only validated paths can be switched to)."""


@dataclass(frozen=True, slots=True)
class SessionView:
    """The client session at one instant, as the UI draws it. No keys, no secrets."""

    session_id: str
    """Hex session id (empty before the handshake)."""
    state: str
    """Client state machine state (``BIRTH``, ``ATTACHED``, ``VOLATILE``, ...)."""
    state_version: int
    """Monotonic version of the client's state (bumped on every transition)."""
    binding_epoch: int
    """Epoch of the session's binding to a transport (bumped by every reattach)."""
    peer_state: str
    """The gateway's view of the session's state, as last reported by it."""
    peer_state_version: int
    """Version of ``peer_state``."""
    active: int | None
    """Path id of the active transport; None while transportless."""
    pending: int | None
    """Path id a switch is in flight to; None when no switch is pending."""
    paths: tuple[PathView, ...]
    """Every candidate path, in configuration order."""
    auto_switch: bool
    """Automatic, health-driven switching is on."""
    switch_budget_left: int
    """Switches the rate limiter still allows in its window."""
    cooldown_remaining_ms: float
    """Time until the next switch is allowed (0.0: none pending)."""
    key_phase: int
    """Current key phase (bumped by every rekey; 0 before the handshake)."""
    key_age_s: float
    """Age of the current keys in seconds."""
    policy_version: str
    """Version string of the policy in force."""
    uptime_s: float
    """Seconds since the session was born."""
    queue_depth: int
    """Inner packets held while no transport carries them."""
    queue_dropped: int
    """Inner packets dropped because that queue was full (or the session ended)."""
    total_switches: int
    """Committed transport switches since the session was born."""
    drops: tuple[tuple[str, int], ...]
    """(drop reason, count) of every datagram the session dropped, by reason name."""
    inner_address: str
    """The tunnel address the gateway assigned (empty before the handshake)."""


NO_SESSION: Final = SessionView(
    session_id="", state="TERMINATED", state_version=0, binding_epoch=0, peer_state="",
    peer_state_version=0, active=None, pending=None, paths=(), auto_switch=True,
    switch_budget_left=0, cooldown_remaining_ms=0.0, key_phase=0, key_age_s=0.0,
    policy_version="", uptime_s=0.0, queue_depth=0, queue_dropped=0, total_switches=0,
    drops=(), inner_address="",
)  # fmt: skip
"""What a snapshot shows when the engine never built a session (it failed first)."""


@dataclass(frozen=True, slots=True)
class TrafficStats:
    """Inner traffic counters of the client (packets/bytes to and from the TUN)."""

    tx_packets: int = 0
    """Inner packets taken from the host into the tunnel."""
    rx_packets: int = 0
    """Inner packets the tunnel delivered to the host."""
    tx_bytes: int = 0
    """Bytes of ``tx_packets``."""
    rx_bytes: int = 0
    """Bytes of ``rx_packets``."""
    tx_rate_bps: float = 0.0
    """Inner bits per second sent, averaged over the last second."""
    rx_rate_bps: float = 0.0
    """Inner bits per second received, averaged over the last second."""


@dataclass(frozen=True, slots=True)
class SinkView:
    """One observability sink, as the UI shows it."""

    name: str
    """The sink's name (``jsonl``, ``syslog``, ...)."""
    state: str
    """``ok`` or ``failing``."""
    queue_depth: int
    """Lines waiting in the sink's queue."""
    dropped: int
    """Lines this sink lost (queue overflow, given-up retries, unflushed at close)."""
    last_error: str | None = None
    """Most recent error (kept after recovery); None when it never failed."""


@dataclass(frozen=True, slots=True)
class ObservabilityView:
    """Health of the event pipeline (DESIGN D16)."""

    ok: bool = True
    """False while a sink is failing, or for a while after any loss."""
    ring_depth: int = 0
    """Events waiting in the pipeline's ring for the dispatcher."""
    ring_dropped: int = 0
    """Events lost before reaching any sink (ring overflow, or emitted after close)."""
    sinks: tuple[SinkView, ...] = ()
    """Every configured sink."""


@dataclass(frozen=True, slots=True)
class EngineSnapshot:
    """Everything the UI draws, at one instant. Immutable; contains no secrets."""

    seq: int
    """Monotonic publication number; a gap means snapshots were dropped."""
    ts_ms: int
    """Wall-clock time of the snapshot (ms since the epoch)."""
    session: SessionView
    """The client session (:data:`NO_SESSION` when none was ever built)."""
    traffic: TrafficStats = field(default_factory=TrafficStats)
    """Inner traffic through the tunnel."""
    observability: ObservabilityView = field(default_factory=ObservabilityView)
    """Health of the event pipeline."""
    ui_dropped: int = 0
    """Items the UI channel dropped because the UI did not drain it in time."""
    running: bool = True
    """False once the engine has stopped (then ``final_reason`` says why)."""
    final_reason: str | None = None
    """Termination reason code, or an engine failure description."""
    demo: bool = False
    """The demo plug-in is in the engine: the UI offers the demo keys."""


UiItem = EngineSnapshot | Mapping[str, object]
"""What the channel carries: a snapshot, or one event as its ``to_dict()`` mapping."""


class UiChannel:
    """Bounded engine -> UI queue. ``publish`` never blocks and never raises.

    When full, the oldest item is dropped and counted in :attr:`dropped`; the newest
    snapshot always survives, so a UI that resumes after a stall draws the present.
    """

    def __init__(self, maxsize: int = UI_QUEUE_SIZE) -> None:
        if maxsize < 1:
            raise ValueError("UiChannel needs room for at least one item")
        self.maxsize = maxsize
        self._items: deque[UiItem] = deque()
        self._lock = threading.Lock()
        self.dropped = 0
        """Items dropped because the queue was full (oldest first)."""
        self.published = 0
        """Items ever published: every one was drained, dropped, or is still waiting."""

    def publish(self, item: UiItem) -> None:
        with self._lock:
            if len(self._items) >= self.maxsize:
                self._items.popleft()
                self.dropped += 1
            self._items.append(item)
            self.published += 1

    def drain(self, max_items: int | None = None) -> list[UiItem]:
        """Take waiting items, oldest first (UI side)."""
        with self._lock:
            n = len(self._items) if max_items is None else min(max_items, len(self._items))
            return [self._items.popleft() for _ in range(n)]

    def __len__(self) -> int:
        return len(self._items)


class EngineHandle(Protocol):
    """What the UI needs from an engine: a channel to drain and a place for commands."""

    channel: UiChannel
    commands: CommandQueue

    def start(self) -> None:
        """Start the engine (its own thread); returns at once."""

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the session if live, stop the engine, restore the host. Idempotent."""

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the engine thread; True once it has stopped."""
