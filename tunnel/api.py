"""The engine <-> UI contract (DESIGN §4): snapshots and events out, commands in.

The engine runs in its own thread. It publishes immutable :class:`EngineSnapshot` values
(4-10 Hz) and discrete event dicts into a :class:`UiChannel`, which never blocks the
publisher. The newest snapshot sits in a single slot that each publication replaces (a
snapshot carries the whole state, so an older one is never worth keeping); events travel
in their own bounded queue, so snapshots can never push an event out. If the event queue
itself overflows, its oldest events are lost and counted, and the UI re-reads the
session-changing events (:data:`SESSION_EVENT_TYPES`) from the channel's bounded history
ring. The UI takes what is waiting on a timer (:meth:`UiChannel.take`). Commands go the
other way through a :class:`CommandQueue`, which the engine polls; the UI never calls
into engine objects.

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
    "COMMAND_QUEUE_SIZE", "HISTORY_SIZE", "NO_SESSION", "SESSION_EVENT_TYPES", "UI_QUEUE_SIZE",
    "UI_QUEUE_SIZE_ENV", "ChannelCounters", "Command", "CommandQueue", "EngineHandle",
    "EngineSnapshot", "EventType", "ExtensionCommand", "ForceReattach", "ObservabilityView",
    "PathStatsView", "PathView", "Reason", "ReloadPolicy", "SessionView", "SetAutoSwitch",
    "SinkView", "SwitchTo", "Terminate", "TrafficStats", "UiBatch", "UiChannel", "UiItem",
    "ui_queue_size",
]  # fmt: skip
"""``EventType`` and ``Reason`` are the events' vocabulary (``tunnel.core.events``), named
here so that the UI reads event mappings in the project's terms without importing the core."""

UI_QUEUE_SIZE: Final = 256
"""Events the UI channel's queue holds; one more pushes the oldest event out (counted).
Snapshots do not count: the newest one has its own slot."""

UI_QUEUE_SIZE_ENV: Final = "JVPN_UI_QUEUE_SIZE"
"""Environment variable that overrides :data:`UI_QUEUE_SIZE` for the program's channel
(a test knob: a small queue overflows after a short UI stall)."""

HISTORY_SIZE: Final = 256
"""Session-changing events the channel keeps for a UI that lost some (a ring)."""

SESSION_EVENT_TYPES: Final = frozenset({
    EventType.STATE_CHANGE, EventType.TRANSPORT_ATTACHED, EventType.TRANSPORT_SWITCH,
    EventType.TRANSPORT_SWITCH_DENIED, EventType.TRANSPORT_DEAD, EventType.REATTACH_ATTEMPT,
    EventType.REATTACH_RESULT, EventType.SECURITY_EVENT, EventType.POLICY_EVENT,
    EventType.KEY_ROTATED, EventType.SESSION_TERMINATED, EventType.PATH_ADDED,
    EventType.PATH_REMOVED, EventType.SESSION_LINKED,
})  # fmt: skip
"""Events that change the session (or report an attack on it): what the switch timeline
and the security panel show, and what the channel's history ring keeps."""

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
    """(drop reason, count) of every datagram the session dropped, by reason name; with
    what the client's loop dropped before the session (``foreign_source``,
    ``inner_ipv6_dropped``, ``inner_malformed``; docs/events.md, "Drop reasons")."""
    inner_address: str
    """The tunnel address the gateway assigned (empty before the handshake)."""
    inner_address6: str = ""
    """The inner IPv6 address the gateway assigned (empty before the handshake, and for
    good when the gateway has no inner IPv6 subnet: the session then carries no IPv6)."""
    cipher: str = ""
    """The data cipher negotiated in the handshake, ``aes-256-gcm`` or
    ``chacha20-poly1305`` (empty before the handshake); rekeys and reattaches keep it."""
    serving_node: str = ""
    """The gateway cluster node serving the session (empty: the gateway is not a cluster
    node, or has not said yet; docs/cluster.md)."""
    owner_epoch: int = 0
    """The session's owner epoch in the cluster (each takeover by another node adds 1)."""


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
    """Events the UI channel lost because its event queue overflowed (the UI re-reads the
    session-changing ones from the channel's history). Snapshots are never lost: a newer
    one replaces an older one that was not taken yet."""
    running: bool = True
    """False once the engine has stopped (then ``final_reason`` says why)."""
    final_reason: str | None = None
    """Termination reason code, or an engine failure description."""
    handshake_failure: str | None = None
    """With ``handshake_failed``: what came back before the deadline (``no_answer``,
    ``unverified_answer`` or ``gateway_under_load``; docs/events.md); else None."""
    explanation: str | None = None
    """One line for a person: what ``final_reason`` means here and what to check (key
    fingerprints only, never a secret); None when there is nothing to add."""
    demo: bool = False
    """The demo plug-in is in the engine: the UI offers the demo keys."""


UiItem = EngineSnapshot | Mapping[str, object]
"""What the channel carries: a snapshot, or one event as its ``to_dict()`` mapping."""


@dataclass(frozen=True, slots=True)
class UiBatch:
    """What :meth:`UiChannel.take` hands the UI: everything that waited, at one instant."""

    events: tuple[Mapping[str, object], ...]
    """Events that waited, oldest first."""
    snapshot: EngineSnapshot | None
    """The newest snapshot, if one was published since the last take."""
    lost: int = 0
    """Events the queue lost since the last take (0: none; then ``history`` is empty)."""
    history: tuple[Mapping[str, object], ...] = ()
    """When ``lost``: the session-changing events the channel still remembers, oldest
    first, taken at the same instant as ``events`` (so it ends with their
    session-changing ones): the UI rebuilds its timeline from it instead of adding
    ``events``."""


@dataclass(frozen=True, slots=True)
class ChannelCounters:
    """A :class:`UiChannel`'s accounting at one instant: every item ever published was
    taken, superseded (a snapshot), dropped (an event), or is waiting."""

    published: int
    superseded: int
    dropped: int
    waiting: int
    """Items waiting: the events plus the snapshot in its slot (0 or 1)."""


def ui_queue_size(environ: Mapping[str, str]) -> int:
    """The channel size the program uses: :data:`UI_QUEUE_SIZE`, or the test knob
    :data:`UI_QUEUE_SIZE_ENV` when it is set (``ValueError`` when it is not a size)."""
    raw = environ.get(UI_QUEUE_SIZE_ENV)
    if raw is None:
        return UI_QUEUE_SIZE
    size = int(raw)
    if size < 1:
        raise ValueError(f"{UI_QUEUE_SIZE_ENV} must be at least 1, not {raw!r}")
    return size


class UiChannel:
    """Engine -> UI: a snapshot slot, a bounded event queue and a history ring.

    ``publish`` never blocks and never raises; it holds one lock for O(1) work. A
    snapshot replaces the one in the slot (counted in :attr:`superseded`); an event goes
    to the queue, which holds ``maxsize`` events and loses its oldest one when full
    (counted in :attr:`dropped`), so snapshots never push an event out. Session-changing
    events (:data:`SESSION_EVENT_TYPES`) are also kept in a ring of ``history`` events,
    so a UI that lost some can rebuild its timeline (:meth:`take` hands them over).
    """

    def __init__(self, maxsize: int = UI_QUEUE_SIZE, history: int = HISTORY_SIZE) -> None:
        if maxsize < 1:
            raise ValueError("UiChannel needs room for at least one event")
        if history < 1:
            raise ValueError("UiChannel needs a history of at least one event")
        self.maxsize = maxsize
        self._events: deque[Mapping[str, object]] = deque()
        self._history: deque[Mapping[str, object]] = deque(maxlen=history)
        self._snapshot: EngineSnapshot | None = None
        self._lock = threading.Lock()
        self._lost_taken = 0
        self.superseded = 0
        """Snapshots replaced by a newer one before the UI took them (nothing is lost:
        the newer one carries the whole state)."""
        self.dropped = 0
        """Events pushed out of the full queue (oldest first): lost to the UI, except the
        session-changing ones its history still holds."""
        self.published = 0
        """Items ever published: every one was taken, superseded, dropped, or is waiting."""

    def publish(self, item: UiItem) -> None:
        """Engine side: a snapshot goes to the slot, anything else to the event queue."""
        if isinstance(item, EngineSnapshot):
            self.publish_snapshot(item)
        else:
            self.publish_event(item)

    def publish_snapshot(self, snapshot: EngineSnapshot) -> None:
        with self._lock:
            if self._snapshot is not None:
                self.superseded += 1
            self._snapshot = snapshot
            self.published += 1

    def publish_event(self, event: Mapping[str, object]) -> None:
        with self._lock:
            if len(self._events) >= self.maxsize:
                self._events.popleft()
                self.dropped += 1
            self._events.append(event)
            if event.get("event_type") in SESSION_EVENT_TYPES:
                self._history.append(event)
            self.published += 1

    def take(self) -> UiBatch:
        """UI side: every waiting event and the newest snapshot; after a loss, the history."""
        with self._lock:
            events, self._events = self._events, deque()
            snapshot, self._snapshot = self._snapshot, None
            lost = self.dropped - self._lost_taken
            self._lost_taken = self.dropped
            history = tuple(self._history) if lost else ()  # O(history), only after a loss
        return UiBatch(tuple(events), snapshot, lost, history)

    def drain(self, max_items: int | None = None) -> list[UiItem]:
        """Simple consumers (headless, tests): waiting events oldest first, then the
        newest snapshot; at most ``max_items`` items (the rest keep waiting)."""
        with self._lock:
            n = len(self._events) if max_items is None else min(max_items, len(self._events))
            out: list[UiItem] = [self._events.popleft() for _ in range(n)]
            if self._snapshot is not None and (max_items is None or n < max_items):
                out.append(self._snapshot)
                self._snapshot = None
            return out

    def __len__(self) -> int:
        """Events waiting (the snapshot slot is not a queue; see :attr:`has_snapshot`)."""
        return len(self._events)

    def counters(self) -> ChannelCounters:
        """The accounting, read consistently (under the channel's lock)."""
        with self._lock:
            waiting = len(self._events) + (self._snapshot is not None)
            return ChannelCounters(self.published, self.superseded, self.dropped, waiting)

    @property
    def has_snapshot(self) -> bool:
        """A snapshot waits in the slot."""
        return self._snapshot is not None


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
