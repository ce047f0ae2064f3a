"""The engine <-> UI contract (DESIGN §4): snapshots and events out, commands in.

The engine runs in its own thread. It publishes immutable :class:`EngineSnapshot` values
(4-10 Hz) and discrete event dicts into a :class:`UiChannel`, a bounded queue that never
blocks the publisher: when it is full the oldest item is dropped and counted. The UI
drains it on a timer. Commands go the other way through a :class:`CommandQueue`, which
the engine polls; the UI never calls into engine objects.

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

from tunnel.core.client import ClientSnapshot

UI_QUEUE_SIZE: Final = 256
"""Items (snapshots + events) the UI channel holds before it drops the oldest."""

COMMAND_QUEUE_SIZE: Final = 64
"""Commands waiting for the engine; a UI that floods it gets ``False`` from ``send``."""


# -- commands (UI -> engine) -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SwitchTo:
    """Switch the active transport to ``path_id`` (manual switch; may be denied)."""

    path_id: int


@dataclass(frozen=True, slots=True)
class SetAutoSwitch:
    """Turn automatic (health-driven) switching on or off."""

    enabled: bool


@dataclass(frozen=True, slots=True)
class ForceReattach:
    """Re-run the reattach exchange on the active path (operator request)."""


@dataclass(frozen=True, slots=True)
class ReloadPolicy:
    """Re-read the policy file; an invalid one keeps the last valid policy."""


@dataclass(frozen=True, slots=True)
class Terminate:
    """End the session explicitly (TERMINATE sent, reason operator_terminated)."""


@dataclass(frozen=True, slots=True)
class DemoImpair:
    """Demo only: impair a path in the embedded relay.

    ``action`` is one of ``kill`` (blackhole both ways), ``restore`` (clear everything),
    ``loss`` (``value`` = loss ratio 0..1), ``rebind`` (new NAT source port),
    ``replay`` (re-send captured datagrams from another address) or ``script`` (play
    the demo's scripted timeline; ``path_id`` ignored, 0 by convention).
    """

    path_id: int
    action: str
    value: float = 0.0


Command = SwitchTo | SetAutoSwitch | ForceReattach | ReloadPolicy | Terminate | DemoImpair


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
class TrafficStats:
    """Inner traffic counters of the client (packets/bytes to and from the TUN)."""

    tx_packets: int = 0
    rx_packets: int = 0
    tx_bytes: int = 0
    rx_bytes: int = 0
    tx_rate_bps: float = 0.0
    """Inner bits per second sent, averaged over the last second."""
    rx_rate_bps: float = 0.0


@dataclass(frozen=True, slots=True)
class SinkView:
    """One observability sink, as the UI shows it."""

    name: str
    state: str
    """``ok`` or ``failing``."""
    queue_depth: int
    dropped: int
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class ObservabilityView:
    """Health of the event pipeline (DESIGN D16)."""

    ok: bool = True
    ring_depth: int = 0
    ring_dropped: int = 0
    sinks: tuple[SinkView, ...] = ()


@dataclass(frozen=True, slots=True)
class EngineSnapshot:
    """Everything the UI draws, at one instant. Immutable; contains no secrets."""

    seq: int
    """Monotonic publication number; a gap means snapshots were dropped."""
    ts_ms: int
    """Wall-clock time of the snapshot (ms since the epoch)."""
    session: ClientSnapshot
    traffic: TrafficStats = field(default_factory=TrafficStats)
    observability: ObservabilityView = field(default_factory=ObservabilityView)
    ui_dropped: int = 0
    """Items the UI channel dropped because the UI did not drain it in time."""
    running: bool = True
    """False once the engine has stopped (then ``final_reason`` says why)."""
    final_reason: str | None = None
    """Termination reason code, or an engine failure description."""
    demo: bool = False
    """The engine is the embedded demo (demo impairment keys are available)."""


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
