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


class EventsLost(Message):
    """The channel lost ``lost`` events: rebuild the event views from ``history`` (the
    session-changing events the engine still remembers, oldest first); ``events`` are the
    ones taken with it (for notifications; ``history`` already holds the ones that belong
    in a view)."""

    def __init__(
        self,
        lost: int,
        history: Sequence[Mapping[str, object]],
        events: Sequence[Mapping[str, object]],
    ) -> None:
        super().__init__()
        self.lost = lost
        self.history = history
        self.events = events
