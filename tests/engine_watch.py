"""Watching a running ClientEngine from a test: its UI channel drained into event dicts
and the newest snapshot, and condition waits on them (never bare sleeps)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from tunnel.api import EngineSnapshot
from tunnel.client.engine import ClientEngine


class Watcher:
    """Drains an engine's channel; keeps every event dict and the newest snapshot."""

    def __init__(self, engine: ClientEngine, timeout: float = 10.0) -> None:
        self.engine = engine
        self.timeout = timeout
        """Default bound of :meth:`wait`, in seconds."""
        self.events: list[dict[str, Any]] = []
        self.snapshot: EngineSnapshot | None = None

    def drain(self) -> None:
        for item in self.engine.channel.drain():
            if isinstance(item, EngineSnapshot):
                self.snapshot = item
            else:
                self.events.append(dict(item))

    def of(self, event_type: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event_type"] == event_type]

    def wait(self, what: Callable[[], object], timeout: float | None = None) -> Any:
        """Drain until ``what()`` is truthy and return it; fail after ``timeout``."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while time.monotonic() < deadline:
            self.drain()
            result = what()
            if result:
                return result
            time.sleep(0.02)
        raise AssertionError(f"timed out; events: {[e['event_type'] for e in self.events]}")
