"""The embedded default store (DESIGN D15): a dict behind one lock, for one gateway node.

Thread-safe: every operation holds the lock for its whole read-compare-write, so a CAS is
atomic against any other operation from any thread.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from tunnel.ownership.store import SessionRecord, check_cas_arguments


class MemorySessionStore:
    """A thread-safe, in-process :class:`~tunnel.ownership.store.SessionStore`."""

    persistent = False
    """Records live as long as this object (a test may hand it to a second runtime)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, SessionRecord] = {}
        self.conflicts = 0
        """CAS, create and delete calls that failed on a version or existence check."""

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Nothing to group: every write is immediate (the ResumableStore protocol)."""
        yield

    def get(self, session_id: str) -> SessionRecord | None:
        with self._lock:
            return self._records.get(session_id)

    def create(self, record: SessionRecord) -> bool:
        with self._lock:
            if record.session_id in self._records:
                self.conflicts += 1
                return False
            self._records[record.session_id] = record
            return True

    def cas(self, session_id: str, expected_version: int, new_record: SessionRecord) -> bool:
        check_cas_arguments(session_id, expected_version, new_record)
        with self._lock:
            current = self._records.get(session_id)
            if current is None or current.state_version != expected_version:
                self.conflicts += 1
                return False
            self._records[session_id] = new_record
            return True

    def refresh(self, record: SessionRecord) -> bool:
        with self._lock:
            current = self._records.get(record.session_id)
            if (
                current is None
                or current.state_version != record.state_version
                or current.owner_node != record.owner_node
            ):
                self.conflicts += 1
                return False
            self._records[record.session_id] = current.evolve(
                resume=record.resume, updated_ms=record.updated_ms
            )
            return True

    def delete(self, session_id: str, expected_version: int | None = None) -> bool:
        with self._lock:
            current = self._records.get(session_id)
            if current is None or (
                expected_version is not None and current.state_version != expected_version
            ):
                self.conflicts += 1
                return False
            del self._records[session_id]
            return True

    def records(self) -> list[SessionRecord]:
        """Every record, in session-id order (a consistent copy)."""
        with self._lock:
            return [self._records[k] for k in sorted(self._records)]

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)
