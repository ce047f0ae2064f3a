"""The gateway's embedded persistent store (DESIGN D15a): one SQLite file in WAL mode.

Every operation is one SQL statement in autocommit mode, so each is atomic on its own: a
CAS is ``UPDATE ... WHERE session_id = ? AND state_version = ?`` and it wrote iff one row
changed. SQLite serialises writers across connections and processes, so two store
objects on the same file (two processes) can never both win one version either.
``synchronous = FULL``: a write the gateway was told succeeded is on disk before the
datagrams that depend on it leave (a counter block, see docs/gateway.md "[state]"), also
across a power loss, not only a ``kill -9``.

Any ``sqlite3`` error (the file is locked past the busy timeout, the disk failed, the
file is not a database) raises :class:`~tunnel.ownership.store.StoreUnavailable`; the
callers fail closed. A connection is shared by the threads of one process behind a lock
(the gateway's loop thread writes; the control socket reads on the same thread).

A sync to disk costs milliseconds, so :meth:`SqliteSessionStore.batch` makes every write of
a block one transaction: the gateway wraps each turn of its loop in one (a burst of
handshakes or reattaches costs one sync, not one each).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from tunnel.ownership.store import SessionRecord, StoreUnavailable, check_cas_arguments

STORE_FILE: Final = "sessions.sqlite3"
"""The file's name in ``state_dir``."""

BUSY_TIMEOUT_S: Final = 2.0
"""How long a statement waits for another connection's write lock before the store is
reported unavailable (a healthy write takes well under a millisecond)."""

SCHEMA_VERSION: Final = 1
"""``PRAGMA user_version`` of the file; another value is refused (no silent migration)."""

_COLUMNS: Final = (
    "session_id, state, state_version, binding_epoch, owner_node, policy_version, "
    "updated_ms, resume"
)

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    state_version INTEGER NOT NULL,
    binding_epoch INTEGER NOT NULL,
    owner_node TEXT NOT NULL,
    policy_version TEXT NOT NULL,
    updated_ms INTEGER NOT NULL,
    resume BLOB NOT NULL
) WITHOUT ROWID
"""


def _row(record: SessionRecord) -> tuple[object, ...]:
    return (
        record.session_id, record.state, record.state_version, record.binding_epoch,
        record.owner_node, record.policy_version, record.updated_ms, record.resume,
    )  # fmt: skip


def _record(row: tuple[Any, ...]) -> SessionRecord:
    sid, state, version, epoch, owner, policy, updated, resume = row
    return SessionRecord(
        session_id=str(sid), state=str(state), state_version=int(version),
        binding_epoch=int(epoch), owner_node=str(owner), policy_version=str(policy),
        updated_ms=int(updated), resume=bytes(resume),
    )  # fmt: skip


class SqliteSessionStore:
    """A :class:`~tunnel.ownership.store.ResumableStore` in one SQLite file (WAL)."""

    persistent = True

    def __init__(
        self, path: str | Path, *, busy_timeout_s: float = BUSY_TIMEOUT_S, exclusive: bool = False
    ) -> None:
        """Open (or create) the store file. StoreUnavailable when it cannot be used (not a
        database, another schema version, no permission) or, ``exclusive``, when another
        process holds it (a lock on ``<file>.lock`` for the life of this object: one
        gateway per store file; the kernel releases it when the process dies)."""
        self.path = Path(path)
        self._lock = threading.RLock()
        """Held per call, and for a whole :meth:`batch` by the thread that runs it."""
        self._lock_fd: int | None = self._take_lock() if exclusive else None
        self._batching = False
        self.conflicts = 0
        """CAS, create, refresh and delete calls that failed on a version or existence check."""
        try:
            # Created 0600 (sqlite gives its -wal and -shm files the same mode).
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
            self._db = sqlite3.connect(
                self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            self.close()
            raise StoreUnavailable(f"{self.path}: {exc}") from None
        try:
            self._setup()
        except (sqlite3.Error, StoreUnavailable) as exc:
            self.close()
            raise StoreUnavailable(f"{self.path}: {exc}") from None

    def _take_lock(self) -> int:
        lock = self.path.with_name(self.path.name + ".lock")
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreUnavailable(f"{lock}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StoreUnavailable(
                f"{self.path} is in use by another process (another gateway with this state_dir?)"
            ) from None
        return fd

    def _setup(self) -> None:
        db = self._db
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreUnavailable(f"cannot use write-ahead logging (journal mode {mode})")
        db.execute("PRAGMA synchronous = FULL")
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version not in (0, SCHEMA_VERSION):
            raise StoreUnavailable(f"schema version {version}, this gateway reads {SCHEMA_VERSION}")
        db.execute(_SCHEMA)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        """Close the file and release the lock (idempotent)."""
        with self._lock:
            if hasattr(self, "_db"):
                self._db.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def _run(self, sql: str, args: tuple[object, ...] = ()) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, args)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"{self.path}: {exc}") from None

    def _changed(self, sql: str, args: tuple[object, ...]) -> bool:
        """Run a write (in the batch's transaction, begun here if need be); True iff it
        changed a row (else one more conflict)."""
        if self._batching and not self._db.in_transaction:
            with contextlib.suppress(StoreUnavailable):  # locked: this write answers alone
                self._run("BEGIN IMMEDIATE")
        ok = self._run(sql, args).rowcount == 1
        if not ok:
            self.conflicts += 1
        return ok

    @contextmanager
    def batch(self) -> Iterator[None]:
        """The writes inside are one transaction, committed at the end (each write's answer
        stands only if the commit succeeds: StoreUnavailable from the exit means none of
        them was written). Other threads wait for the end; a nested batch joins the outer.
        The transaction begins at the first write (a turn that writes nothing costs
        nothing); one that cannot begin (the file is locked) runs its writes one by one."""
        with self._lock:
            if self._batching:
                yield
                return
            self._batching = True
            try:
                yield
            except BaseException:
                if self._db.in_transaction:
                    self._db.rollback()
                raise
            finally:
                self._batching = False
            if not self._db.in_transaction:
                return
            try:
                self._db.commit()
            except sqlite3.Error as exc:
                self._db.rollback()
                raise StoreUnavailable(f"{self.path}: commit failed: {exc}") from None

    # -- SessionStore ------------------------------------------------------------------------

    def get(self, session_id: str) -> SessionRecord | None:
        with self._lock:
            row = self._run(
                f"SELECT {_COLUMNS} FROM sessions WHERE session_id = ?", (session_id,)
            ).fetchone()
        return None if row is None else _record(row)

    def create(self, record: SessionRecord) -> bool:
        with self._lock:
            return self._changed(
                f"INSERT OR IGNORE INTO sessions ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                _row(record),
            )

    def cas(self, session_id: str, expected_version: int, new_record: SessionRecord) -> bool:
        check_cas_arguments(session_id, expected_version, new_record)
        with self._lock:
            return self._changed(
                "UPDATE sessions SET state = ?, state_version = ?, binding_epoch = ?, "
                "owner_node = ?, policy_version = ?, updated_ms = ?, resume = ? "
                "WHERE session_id = ? AND state_version = ?",
                (*_row(new_record)[1:], session_id, expected_version),
            )

    def refresh(self, record: SessionRecord) -> bool:
        with self._lock:
            return self._changed(
                "UPDATE sessions SET resume = ?, updated_ms = ? "
                "WHERE session_id = ? AND state_version = ? AND owner_node = ?",
                (record.resume, record.updated_ms, record.session_id, record.state_version,
                 record.owner_node),
            )  # fmt: skip

    def delete(self, session_id: str, expected_version: int | None = None) -> bool:
        with self._lock:
            if expected_version is None:
                return self._changed("DELETE FROM sessions WHERE session_id = ?", (session_id,))
            return self._changed(
                "DELETE FROM sessions WHERE session_id = ? AND state_version = ?",
                (session_id, expected_version),
            )

    def records(self) -> list[SessionRecord]:
        """Every record, in session-id order (one consistent read)."""
        with self._lock:
            rows = self._run(f"SELECT {_COLUMNS} FROM sessions ORDER BY session_id").fetchall()
        return [_record(row) for row in rows]

    def __len__(self) -> int:
        with self._lock:
            return int(self._run("SELECT count(*) FROM sessions").fetchone()[0])
