"""The session ownership stores (DESIGN D15, D15a): CAS on the record version, never two
winners. One contract, run against every store: ``memory`` and ``sqlite`` (a fresh file in a
temporary directory each time)."""

from __future__ import annotations

import sqlite3
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel.ownership import (
    MemorySessionStore,
    ResumableStore,
    SessionRecord,
    SessionStore,
    StoreUnavailable,
)
from tunnel.ownership.sqlite import SqliteSessionStore

SID = "ab" * 16

Store = MemorySessionStore | SqliteSessionStore


@pytest.fixture(params=["memory", "sqlite"])
def new_store(request: pytest.FixtureRequest) -> Iterator[Callable[[], Store]]:
    """A factory of empty stores of one kind (sqlite: each in its own temporary file)."""
    made: list[SqliteSessionStore] = []
    with tempfile.TemporaryDirectory(prefix="jvpn-store-") as tmp:

        def make() -> Store:
            if request.param == "memory":
                return MemorySessionStore()
            store = SqliteSessionStore(Path(tmp) / f"s{len(made)}.sqlite3")
            made.append(store)
            return store

        yield make
        for store in made:
            store.close()


def record(
    version: int, *, node: str = "gw1", state: str = "ATTACHED", sid: str = SID
) -> SessionRecord:
    return SessionRecord(
        session_id=sid,
        state=state,
        state_version=version,
        binding_epoch=1,
        owner_node=node,
        policy_version="1.0+abc",
        updated_ms=1_700_000_000_000 + version,
    )


def test_stores_satisfy_the_protocols(new_store: Callable[[], Store]) -> None:
    store = new_store()
    assert isinstance(store, SessionStore) and isinstance(store, ResumableStore)
    assert store.persistent == isinstance(store, SqliteSessionStore)


def test_create_get_cas_delete_roundtrip(new_store: Callable[[], Store]) -> None:
    store = new_store()
    assert store.get(SID) is None
    assert store.create(record(1))
    assert not store.create(record(1, node="gw2"))  # exists: nothing written
    assert store.get(SID) == record(1)
    assert not store.cas(SID, 0, record(2))  # wrong expected version
    assert store.get(SID) == record(1)
    assert store.cas(SID, 1, record(2, state="RECOVERING"))
    assert store.get(SID) == record(2, state="RECOVERING")
    assert not store.cas(SID, 1, record(3))  # the old version is gone for good
    assert not store.delete(SID, expected_version=1)
    assert store.delete(SID, expected_version=2)
    assert store.get(SID) is None and len(store) == 0
    assert not store.cas(SID, 2, record(3))  # no record: no CAS
    assert not store.delete(SID)
    assert store.conflicts == 6


def test_cas_misuse_raises(new_store: Callable[[], Store]) -> None:
    store = new_store()
    store.create(record(3))
    with pytest.raises(ValueError, match="forward"):
        store.cas(SID, 3, record(3))
    with pytest.raises(ValueError, match="forward"):
        store.cas(SID, 3, record(2))
    with pytest.raises(ValueError, match="record of session"):
        store.cas(SID, 3, record(4, sid="cd" * 16))
    assert store.get(SID) == record(3)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("session_id", "AB" * 16),
        ("session_id", "ab" * 15),
        ("state", "REATTACHING"),
        ("state_version", -1),
        ("state_version", True),
        ("binding_epoch", 1.0),
        ("owner_node", ""),
    ],
)
def test_records_are_validated(field: str, value: object) -> None:
    with pytest.raises(ValueError):
        record(1).evolve(**{field: value})


def test_records_carry_no_key_material_in_the_clear() -> None:
    names = set(SessionRecord.__dataclass_fields__)
    assert names == {
        "session_id", "state", "state_version", "binding_epoch", "owner_node",
        "policy_version", "updated_ms", "resume",
    }  # fmt: skip
    assert not any("key" in n or "secret" in n for n in names)
    # resume is sealed by the gateway (test_resume.py); it never shows in a repr either
    assert "resume" not in repr(record(1).evolve(resume=b"sealed bytes"))


def test_refresh_replaces_resume_at_the_same_version_only(new_store: Callable[[], Store]) -> None:
    store = new_store()
    assert not store.refresh(record(1).evolve(resume=b"r0"))  # no record
    assert store.create(record(1).evolve(resume=b"r1"))
    assert store.refresh(record(1).evolve(resume=b"r2", updated_ms=5))
    got = store.get(SID)
    assert got is not None and got.resume == b"r2" and got.updated_ms == 5
    assert got.state == "ATTACHED" and got.state_version == 1
    assert not store.refresh(record(2).evolve(resume=b"r3"))  # another version
    assert not store.refresh(record(1, node="gw2").evolve(resume=b"r3"))  # another owner
    assert store.cas(SID, 1, record(2, state="RECOVERING").evolve(resume=b"r4"))
    got = store.get(SID)
    assert got is not None and got.resume == b"r4" and got.state == "RECOVERING"
    assert store.records() == [got] and len(store) == 1
    assert store.conflicts == 3


def test_sqlite_records_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "sessions.sqlite3"
    first = SqliteSessionStore(path)
    other = "cd" * 16
    assert first.create(record(4).evolve(resume=b"\x00sealed"))
    assert first.create(record(1, sid=other))
    assert first.cas(other, 1, record(2, sid=other, state="RECOVERING"))
    first.close()
    again = SqliteSessionStore(path)
    try:
        assert again.records() == [record(4).evolve(resume=b"\x00sealed"),
                                   record(2, sid=other, state="RECOVERING")]  # fmt: skip
        assert not again.create(record(9))  # still there
        journal = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
        assert journal == "wal"
    finally:
        again.close()


def test_sqlite_refuses_what_is_not_its_store(tmp_path: Path) -> None:
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreUnavailable, match=r"junk\.sqlite3"):
        SqliteSessionStore(junk)
    newer = tmp_path / "newer.sqlite3"
    with sqlite3.connect(newer) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreUnavailable, match="schema version 99"):
        SqliteSessionStore(newer)


def test_sqlite_that_cannot_answer_raises_store_unavailable(tmp_path: Path) -> None:
    """Another connection holds the write lock past the busy timeout: every write fails
    closed with StoreUnavailable and changes nothing; reads of the last commit still work
    (WAL)."""
    path = tmp_path / "sessions.sqlite3"
    store = SqliteSessionStore(path, busy_timeout_s=0.05)
    assert store.create(record(1))
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreUnavailable, match="locked"):
            store.cas(SID, 1, record(2))
        with pytest.raises(StoreUnavailable):
            store.create(record(1, sid="cd" * 16))
        assert store.get(SID) == record(1)  # WAL: readers see the last commit meanwhile
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert store.get(SID) == record(1)
    store.close()


def test_threaded_writers_never_both_win_the_same_version(
    new_store: Callable[[], Store], tmp_path: Path
) -> None:
    """8 threads race CAS version N -> N+1 from their own view; exactly one wins each step.
    With sqlite, half the writers go through a second store object on the same file (what
    two processes do): the file's write lock, not the object's, decides."""
    store = new_store()
    stores: list[Store] = [store, store]
    if isinstance(store, SqliteSessionStore):
        stores[1] = SqliteSessionStore(store.path, busy_timeout_s=10.0)
    store.create(record(0))
    writers, steps = 8, 300
    wins: Counter[int] = Counter()
    winners: dict[int, list[str]] = {}
    lock = threading.Lock()
    start = threading.Barrier(writers)

    def writer(name: str, store: Store) -> None:
        start.wait()
        while True:
            current = store.get(SID)
            assert current is not None
            if current.state_version >= steps:
                return
            v = current.state_version
            if store.cas(SID, v, record(v + 1, node=name)):
                with lock:
                    wins[v] += 1
                    winners.setdefault(v, []).append(name)

    threads = [
        threading.Thread(target=writer, args=(f"gw{i}", stores[i % 2])) for i in range(writers)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert set(wins) == set(range(steps))  # every version was committed ...
    assert set(wins.values()) == {1}  # ... by exactly one writer
    final = store.get(SID)
    assert final is not None and final.state_version == steps
    assert final.owner_node == winners[steps - 1][0]
    if stores[1] is not store:
        stores[1].close()


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["create", "cas", "delete"]),
            st.integers(min_value=0, max_value=6),
            st.integers(min_value=1, max_value=3),
        ),
        max_size=40,
    )
)
def test_cas_matches_a_sequential_model(ops: list[tuple[str, int, int]]) -> None:
    """Against a trivial model: versions never go back, a stale expectation never writes.
    Both stores take the same operations and must agree with the model at every step."""
    with tempfile.TemporaryDirectory(prefix="jvpn-store-") as tmp:
        sqlite = SqliteSessionStore(Path(tmp) / "model.sqlite3")
        try:
            for store in (MemorySessionStore(), sqlite):
                _check_against_model(store, ops)
        finally:
            sqlite.close()


def _check_against_model(store: Store, ops: list[tuple[str, int, int]]) -> None:
    model: int | None = None
    for op, expected, step in ops:
        if op == "create":
            ok = store.create(record(expected))
            assert ok == (model is None)
            if ok:
                model = expected
        elif op == "cas":
            ok = store.cas(SID, expected, record(expected + step))
            assert ok == (model == expected)
            if ok:
                model = expected + step
        else:
            ok = store.delete(SID, expected)
            assert ok == (model == expected)
            if ok:
                model = None
        current = store.get(SID)
        assert (None if current is None else current.state_version) == model


def test_a_batch_commits_together_or_not_at_all(new_store: Callable[[], Store]) -> None:
    store = new_store()
    other = "cd" * 16
    with store.batch():
        assert store.create(record(1))
        assert store.create(record(1, sid=other))
        assert store.cas(SID, 1, record(2))
    assert [r.state_version for r in store.records()] == [2, 1]
    with pytest.raises(RuntimeError), store.batch():
        assert store.cas(SID, 2, record(3))
        assert store.delete(other)
        raise RuntimeError("the block failed")
    if store.persistent:  # sqlite: the transaction was rolled back
        assert [r.state_version for r in store.records()] == [2, 1]


def test_sqlite_batch_is_invisible_to_others_until_committed(tmp_path: Path) -> None:
    path = tmp_path / "sessions.sqlite3"
    store, reader = SqliteSessionStore(path), SqliteSessionStore(path)
    try:
        with store.batch():
            assert store.create(record(1))
            assert store.get(SID) == record(1)  # the writer sees its own writes
            assert reader.get(SID) is None  # nobody else does yet
        assert reader.get(SID) == record(1)
    finally:
        store.close()
        reader.close()
