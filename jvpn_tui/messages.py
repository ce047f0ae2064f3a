"""Messages the app posts to itself after draining the engine channel.

A snapshot carries the whole state, so only the newest one matters: ``SnapshotReady``
replaces any older one still waiting in the queue (``can_replace``). Events are
discrete and are never coalesced.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from textual.message import Message

from tunnel.api import EngineSnapshot


class SnapshotReady(Message):
    """The newest engine snapshot."""

    def __init__(self, snapshot: EngineSnapshot) -> None:
        super().__init__()
        self.snapshot = snapshot

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, SnapshotReady)


class EventsReady(Message):
    """Events drained from the channel, oldest first (``to_dict()`` mappings)."""

    def __init__(self, events: Sequence[Mapping[str, object]]) -> None:
        super().__init__()
        self.events = events
