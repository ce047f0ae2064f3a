"""The session ownership store (DESIGN D15): CAS on the record version, never two winners."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel.ownership import MemorySessionStore, SessionRecord, SessionStore

SID = "ab" * 16


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


def test_memory_store_satisfies_the_protocol() -> None:
    assert isinstance(MemorySessionStore(), SessionStore)


def test_create_get_cas_delete_roundtrip() -> None:
    store = MemorySessionStore()
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


def test_cas_misuse_raises() -> None:
    store = MemorySessionStore()
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


def test_records_carry_no_key_material() -> None:
    names = set(SessionRecord.__dataclass_fields__)
    assert names == {
        "session_id", "state", "state_version", "binding_epoch", "owner_node",
        "policy_version", "updated_ms",
    }  # fmt: skip
    assert not any("key" in n or "secret" in n for n in names)


def test_threaded_writers_never_both_win_the_same_version() -> None:
    """8 threads race CAS version N -> N+1 from their own view; exactly one wins each step."""
    store = MemorySessionStore()
    store.create(record(0))
    writers, steps = 8, 300
    wins: Counter[int] = Counter()
    winners: dict[int, list[str]] = {}
    lock = threading.Lock()
    start = threading.Barrier(writers)

    def writer(name: str) -> None:
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

    threads = [threading.Thread(target=writer, args=(f"gw{i}",)) for i in range(writers)]
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
    """Against a trivial model: versions never go back, a stale expectation never writes."""
    store = MemorySessionStore()
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
