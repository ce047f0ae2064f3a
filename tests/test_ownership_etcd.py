"""The etcd session store and node ownership against a real three-member etcd (D15, D15b).

The CAS contract runs against the memory store and the etcd store alike. Then the
cluster cases of SPEC-DIGEST §10: AT-48 (two concurrent valid transfers: exactly one CAS
wins, the loser gets a conflict and changes nothing), AT-49 (no quorum: every operation
raises StoreUnavailable within its bound, nothing is granted; all works again after the
members return), AT-51 (a node that does not own the session cannot write it), and the
lease: an owner frozen past its TTL loses the session to another node and, on waking,
checks its fence before it sends anything; an owner whose keep-alives stop closes its
fence before etcd expires the lease.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from etcd_cluster import EtcdCluster, etcd_cluster, etcd_cluster_fn, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunnel.ownership import MemorySessionStore, SessionRecord, SessionStore, StoreUnavailable
from tunnel.ownership.etcd import EtcdSessionStore, encode_entry
from tunnel.ownership.etcd_owner import NodeOwnership, Outcome, Transfer, owner_token

__all__ = ["etcd_cluster", "etcd_cluster_fn"]  # fixtures

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 1.0
"""The store's bound for one call (seconds)."""


def new_sid() -> str:
    return uuid.uuid4().hex


def record(version: int, sid: str, *, node: str = "gw1", state: str = "ATTACHED") -> SessionRecord:
    return SessionRecord(
        session_id=sid, state=state, state_version=version, binding_epoch=1,
        owner_node=node, policy_version="1.0+abc", updated_ms=1_700_000_000_000 + version,
    )  # fmt: skip


def prefix() -> str:
    return f"/jvpn/t{uuid.uuid4().hex[:8]}/"


@pytest.fixture(params=["memory", "etcd"])
def store(request: pytest.FixtureRequest) -> Iterator[SessionStore]:
    if request.param == "memory":
        yield MemorySessionStore()
        return
    cluster: EtcdCluster = request.getfixturevalue("etcd_cluster")
    s = EtcdSessionStore(cluster.endpoints, prefix(), timeout=5.0)  # a loaded machine
    try:
        yield s
    finally:
        s.close()


# -- the CAS contract, on both stores ----------------------------------------------------------


def test_store_satisfies_the_protocol(store: SessionStore) -> None:
    assert isinstance(store, SessionStore)


def test_create_get_cas_delete_roundtrip(store: SessionStore) -> None:
    sid = new_sid()
    assert store.get(sid) is None
    assert store.create(record(1, sid))
    assert not store.create(record(1, sid, node="gw2"))  # exists: nothing written
    assert store.get(sid) == record(1, sid)
    assert not store.cas(sid, 0, record(2, sid))  # wrong expected version
    assert store.get(sid) == record(1, sid)
    assert store.cas(sid, 1, record(2, sid, state="RECOVERING"))
    assert store.get(sid) == record(2, sid, state="RECOVERING")
    assert not store.cas(sid, 1, record(3, sid))  # the old version is gone for good
    assert not store.delete(sid, expected_version=1)
    assert store.delete(sid, expected_version=2)
    assert store.get(sid) is None and len(store) == 0
    assert not store.cas(sid, 2, record(3, sid))  # no record: no CAS
    assert not store.delete(sid)
    assert store.conflicts == 6  # type: ignore[attr-defined]


def test_cas_misuse_raises(store: SessionStore) -> None:
    sid = new_sid()
    store.create(record(3, sid))
    with pytest.raises(ValueError, match="forward"):
        store.cas(sid, 3, record(3, sid))
    with pytest.raises(ValueError, match="forward"):
        store.cas(sid, 3, record(2, sid))
    with pytest.raises(ValueError, match="record of session"):
        store.cas(sid, 3, record(4, new_sid()))
    assert store.get(sid) == record(3, sid)


def test_threaded_writers_never_both_win_the_same_version(store: SessionStore) -> None:
    """4 writers race CAS N -> N+1 from their own view; exactly one wins each step."""
    sid = new_sid()
    store.create(record(0, sid))
    writers, steps = 4, 40
    wins: Counter[int] = Counter()
    lock = threading.Lock()
    start = threading.Barrier(writers)

    def writer(name: str) -> None:
        start.wait()
        while True:
            current = store.get(sid)
            assert current is not None
            if current.state_version >= steps:
                return
            v = current.state_version
            if store.cas(sid, v, record(v + 1, sid, node=name)):
                with lock:
                    wins[v] += 1

    threads = [threading.Thread(target=writer, args=(f"gw{i}",)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert set(wins) == set(range(steps))  # every version was committed ...
    assert set(wins.values()) == {1}  # ... by exactly one writer
    final = store.get(sid)
    assert final is not None and final.state_version == steps


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["create", "cas", "delete"]),
            st.integers(min_value=0, max_value=6),
            st.integers(min_value=1, max_value=3),
        ),
        max_size=15,
    )
)
def test_cas_matches_a_sequential_model(
    store: SessionStore, ops: list[tuple[str, int, int]]
) -> None:
    """Against a trivial model: versions never go back, a stale expectation never writes."""
    sid = new_sid()
    model: int | None = None
    for op, expected, step in ops:
        if op == "create":
            ok = store.create(record(expected, sid))
            assert ok == (model is None)
            model = expected if ok else model
        elif op == "cas":
            ok = store.cas(sid, expected, record(expected + step, sid))
            assert ok == (model == expected)
            model = expected + step if ok else model
        else:
            ok = store.delete(sid, expected)
            assert ok == (model == expected)
            model = None if ok else model
        current = store.get(sid)
        assert (None if current is None else current.state_version) == model


# -- etcd specifics ----------------------------------------------------------------------------


@pytest.fixture
def estore(etcd_cluster: EtcdCluster) -> Iterator[EtcdSessionStore]:
    s = EtcdSessionStore(etcd_cluster.endpoints, prefix(), timeout=5.0)
    try:
        yield s
    finally:
        s.close()


def test_wrapped_keys_are_kept_opaque_and_carried_across_writes(
    estore: EtcdSessionStore,
) -> None:
    sid = new_sid()
    wrapped = bytes(range(256))  # any bytes, e.g. an AEAD ciphertext
    assert estore.create(record(1, sid), wrapped)
    assert estore.cas(sid, 1, record(2, sid))  # no new keys: the wrapped ones stay
    entry = estore.entry(sid)
    assert entry is not None and entry.wrapped_keys == wrapped and entry.owner_epoch == 1
    assert estore.cas(sid, 2, record(3, sid), wrapped_keys=b"rewrapped")
    entry = estore.entry(sid)
    assert entry is not None and entry.wrapped_keys == b"rewrapped"


def test_a_second_writer_with_a_stale_view_never_overwrites(
    etcd_cluster: EtcdCluster,
) -> None:
    """Two stores (two nodes) on one prefix: each CAS compares the entry in etcd, not what
    the writer last saw; a delete and re-create at the same version is a new entry that a
    CAS from that version may replace (the version is what the contract compares)."""
    p = prefix()
    a = EtcdSessionStore(etcd_cluster.endpoints, p, timeout=5.0)
    b = EtcdSessionStore(etcd_cluster.endpoints, p, timeout=5.0)
    try:
        sid = new_sid()
        assert a.create(record(1, sid, node="a"))
        assert b.get(sid) == record(1, sid, node="a")
        assert a.cas(sid, 1, record(2, sid, node="a"))
        assert not b.cas(sid, 1, record(2, sid, node="b"))  # b's view is stale
        assert b.cas(sid, 2, record(3, sid, node="b"))
        assert not a.cas(sid, 2, record(3, sid, node="a"))  # a's cached view is stale
        assert b.delete(sid, 3) and b.create(record(3, sid, node="b2"))
        assert a.get(sid) == record(3, sid, node="b2")
        assert b.cas(sid, 3, record(4, sid, node="b"))
        assert a.get(sid) == record(4, sid, node="b")
    finally:
        a.close()
        b.close()


def test_a_write_whose_ownership_compare_fails_changes_nothing(
    estore: EtcdSessionStore,
) -> None:
    """The version matches but the guard (the ownership key's value, as a node's fenced
    write compares it) does not: no write, a conflict."""
    sid = new_sid()
    assert estore.create(record(1, sid))

    async def guarded_cas(client: object) -> bool:
        tx = client.transactions  # type: ignore[attr-defined]
        guard = [tx.value(estore.owner_key(sid)) == b'{"epoch":1,"node":"x"}']
        return await estore.acas(client, sid, 1, record(2, sid), guard=guard)

    assert not estore.worker.call(guarded_cas)
    assert estore.get(sid) == record(1, sid) and estore.conflicts == 1


# -- ownership -------------------------------------------------------------------------------


class Nodes:
    """Cluster nodes on one prefix, each with its own store (own gRPC channel)."""

    def __init__(self, endpoints: list[str], ttl: int = 2) -> None:
        self.endpoints = endpoints
        self.prefix = prefix()
        self.ttl = ttl
        self.nodes: list[NodeOwnership] = []

    def node(self, name: str, **kw: object) -> NodeOwnership:
        store = EtcdSessionStore(self.endpoints, self.prefix, timeout=TIMEOUT)
        n = NodeOwnership(store, name, ttl=self.ttl, **kw)  # type: ignore[arg-type]
        n.start()
        self.nodes.append(n)
        return n

    def close(self) -> None:
        for n in self.nodes:
            n.close()
            n.store.close()


@pytest.fixture
def nodes(etcd_cluster: EtcdCluster) -> Iterator[Nodes]:
    ns = Nodes(etcd_cluster.endpoints)
    try:
        yield ns
    finally:
        ns.close()


def test_create_takes_ownership_and_only_the_owner_writes(nodes: Nodes) -> None:
    """AT-51: a node that does not own the session cannot mutate it."""
    a, b = nodes.node("A"), nodes.node("B")
    sid = new_sid()
    assert a.create(record(1, sid, node="A"))
    assert a.owner_epoch(sid) == 1 and a.may_forward(sid) and not b.may_forward(sid)
    assert not b.create(record(1, sid, node="B"))
    assert not b.cas(sid, 1, record(2, sid, node="B"))  # not the owner
    assert not b.delete(sid, 1)
    assert a.get(sid) == record(1, sid, node="A")
    assert a.cas(sid, 1, record(2, sid, node="A"))
    assert b.get(sid) == record(2, sid, node="A")


def test_a_live_owner_hands_over_when_asked(nodes: Nodes) -> None:
    stopped: list[str] = []

    def stop_forwarding(sid: str, requester: str) -> bool:
        stopped.append(f"{sid}->{requester}")
        return True

    a = nodes.node("A", on_handover=stop_forwarding)
    b = nodes.node("B")
    sid = new_sid()
    assert a.create(record(1, sid, node="A"), b"wrapped")
    result = b.acquire(sid, 1, record(2, sid, node="B", state="RECOVERING"), wait=10)
    assert result.outcome == Outcome.GRANTED
    assert (result.owner_epoch, result.previous_owner) == (2, "A")
    assert stopped == [f"{sid}->B"]
    assert [c.change for c in a.history] == ["created", "released"]  # handed over, not lost
    assert a.leases_lost == 0 and a.fence.may_forward(time.monotonic())
    assert not a.may_forward(sid) and b.may_forward(sid)
    entry = b.store.entry(sid)
    assert entry is not None
    assert (entry.owner_epoch, entry.record.owner_node, entry.record.state_version) == (2, "B", 2)
    assert entry.wrapped_keys == b"wrapped"
    assert not a.cas(sid, 2, record(3, sid, node="A"))  # AT-51: the old owner is out
    assert b.cas(sid, 2, record(3, sid, node="B"))


def test_an_owner_that_keeps_the_session_is_not_overruled(nodes: Nodes) -> None:
    a = nodes.node("A", on_handover=lambda _sid, _req: False)  # alive, refuses
    b = nodes.node("B")
    sid = new_sid()
    assert a.create(record(1, sid, node="A"))
    result = b.acquire(sid, 1, record(2, sid, node="B"), wait=0.5)
    assert result.outcome == Outcome.OWNED_ELSEWHERE and result.previous_owner == "A"
    assert a.may_forward(sid) and not b.may_forward(sid)
    assert a.get(sid) == record(1, sid, node="A")
    assert b.store.worker.call(lambda c: c.get(b.store.handover_key(sid))) is None  # withdrawn


def race(contenders: tuple[NodeOwnership, ...], sid: str, version: int) -> dict[str, Transfer]:
    """Every contender asks for the session at ``version`` at the same moment (results by
    node id, ``#i`` appended when one node races itself)."""
    results: dict[str, Transfer] = {}
    start = threading.Barrier(len(contenders))

    def reattach(i: int, node: NodeOwnership) -> None:
        start.wait()
        new = record(version + 1, sid, node=node.node_id, state=("ATTACHED", "RECOVERING")[i])
        key = node.node_id if len({n.node_id for n in contenders}) > 1 else f"{node.node_id}#{i}"
        results[key] = node.acquire(sid, version, new, 10)

    threads = [threading.Thread(target=reattach, args=(i, n)) for i, n in enumerate(contenders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_at47_two_concurrent_reattaches_on_one_node(nodes: Nodes) -> None:
    """AT-47: two valid reattaches of one session at once on the same node, first on the
    node that owns it, then on one that does not: one is accepted (version + 1), the
    other gets CONFLICT; the entry holds exactly the winner's record."""
    a, b = nodes.node("A"), nodes.node("B")
    sid = new_sid()
    assert a.create(record(1, sid, node="A"))
    for node, version, epoch in ((a, 1, 1), (b, 2, 2)):
        results = race((node, node), sid, version)
        assert sorted(r.outcome for r in results.values()) == [Outcome.CONFLICT, Outcome.GRANTED]
        won = next(r for r in results.values() if r.outcome == Outcome.GRANTED)
        assert won.owner_epoch == epoch and won.record is not None
        entry = a.store.entry(sid)
        assert entry is not None and entry.record == won.record
        assert entry.record.state_version == version + 1 and entry.owner_epoch == epoch
        assert [n.node_id for n in (a, b) if n.may_forward(sid)] == [node.node_id]


def lost_answer_transfer(node: NodeOwnership, sid: str) -> None:
    """What a transfer to ``node`` whose answer was lost leaves in etcd: the entry at
    version 2 / epoch 2 owned by ``node``, its ownership key on ``node``'s lease, the old
    owner's key gone, and ``node`` not knowing any of it."""
    store = node.store

    async def commit(client: object) -> None:
        tx = client.transactions  # type: ignore[attr-defined]
        await client.transaction(  # type: ignore[attr-defined]
            compare=[],
            success=[
                tx.put(
                    store.session_key(sid), encode_entry(record(2, sid, node=node.node_id), 2, b"")
                ),
                tx.put(store.owner_key(sid), owner_token(node.node_id, 2), lease=node.lease_id),
            ],
            failure=[],
        )

    store.worker.call(commit)
    assert node.owner_epoch(sid) is None


def test_an_ownership_key_a_node_did_not_know_of_is_given_up_or_adopted(nodes: Nodes) -> None:
    """A create or transfer that raised StoreUnavailable may have committed: the node holds
    the key in etcd without knowing it (and forwards nothing). Asked to hand over, it gives
    the key up; reattaching there itself, it adopts it. The session is never stuck."""
    a, b, c = nodes.node("A"), nodes.node("B"), nodes.node("C")
    sid = new_sid()
    assert a.create(record(1, sid, node="A"))
    assert a.release(sid)
    lost_answer_transfer(b, sid)
    moved = c.acquire(sid, 2, record(3, sid, node="C"), wait=5)
    assert (moved.outcome, moved.owner_epoch, moved.previous_owner) == (Outcome.GRANTED, 3, "B")
    assert c.release(sid)
    sid2 = new_sid()
    assert a.create(record(1, sid2, node="A")) and a.release(sid2)
    lost_answer_transfer(b, sid2)
    again = b.acquire(sid2, 2, record(3, sid2, node="B"), wait=5)
    assert (again.outcome, again.owner_epoch) == (Outcome.GRANTED, 2)
    assert b.may_forward(sid2) and [x.change for x in b.history][-1:] == ["adopted"]


def test_an_asyncio_caller_awaits_a_transfer_while_its_loop_runs(nodes: Nodes) -> None:
    """The gateway's loop must not stall on a transfer that waits for a hand-over: the
    future of submit_acquire is awaited while other tasks of the loop keep running."""
    released: list[str] = []
    a = nodes.node("A", on_handover=lambda sid, _req: released.append(sid) is None and False)
    b = nodes.node("B")
    sid = new_sid()
    assert a.create(record(1, sid, node="A"))

    async def gateway_loop() -> tuple[object, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        task = asyncio.create_task(ticker())
        future = b.submit_acquire(sid, 1, record(2, sid, node="B"), wait=1.0)
        result = await asyncio.wrap_future(future)
        seen = ticks
        task.cancel()
        return result, seen

    result, ticks = asyncio.run(gateway_loop())
    assert result.outcome == Outcome.OWNED_ELSEWHERE  # type: ignore[attr-defined]
    assert set(released) == {sid}  # A was asked (and kept it; asked again by the scan)
    assert ticks > 1  # the loop ran other tasks while the transfer waited


def test_at48_two_concurrent_transfers_exactly_one_wins(nodes: Nodes) -> None:
    """AT-48 at the store level: two nodes get a valid reattach for one session at once.
    Exactly one CAS commits (epoch + 1, version + 1); the other gets CONFLICT and nothing
    of it is written. Ten rounds; the winner gives the session back after each."""
    a, b, c = nodes.node("A"), nodes.node("B"), nodes.node("C")
    by_name = {n.node_id: n for n in (a, b, c)}
    sid = new_sid()
    assert a.create(record(1, sid, node="A"))
    for round_ in range(10):
        version = epoch = round_ + 1
        results = race((b, c), sid, version)
        outcomes = sorted(r.outcome for r in results.values())
        assert outcomes == [Outcome.CONFLICT, Outcome.GRANTED]
        winner = next(k for k, r in results.items() if r.outcome == Outcome.GRANTED)
        loser = next(k for k, r in results.items() if r.outcome == Outcome.CONFLICT)
        entry = a.store.entry(sid)
        assert entry is not None
        assert (entry.record.owner_node, entry.record.state_version) == (winner, version + 1)
        assert entry.owner_epoch == epoch + 1 == results[loser].owner_epoch
        assert by_name[loser].owner_epoch(sid) is None
        assert [n.node_id for n in (a, b, c) if n.may_forward(sid)] == [winner]  # never two
        assert by_name[winner].release(sid)


def test_at49_no_quorum_fails_closed_and_recovers(etcd_cluster_fn: EtcdCluster) -> None:
    """AT-49: with the majority of etcd stopped every call raises StoreUnavailable within
    its bound, no transfer is granted, the owner's fence closes at its lease deadline;
    when the members return, the same calls succeed, and the session is still the
    owner's (epoch 1)."""
    ns = Nodes(etcd_cluster_fn.endpoints)
    try:
        a, b = ns.node("A", on_handover=lambda _s, _r: False), ns.node("B")
        sid = new_sid()
        assert a.create(record(1, sid, node="A"))
        etcd_cluster_fn.stop_majority()
        bound = TIMEOUT + 1.5  # the call's bound plus scheduling slack on a loaded machine
        calls = {
            "get": lambda: b.get(sid),
            "cas": lambda: a.cas(sid, 1, record(2, sid, node="A")),
            "create": lambda: a.store.create(record(1, new_sid())),
            "delete": lambda: a.store.delete(sid, 1),
        }
        for name, call in calls.items():
            began = time.monotonic()
            with pytest.raises(StoreUnavailable):
                call()
            assert time.monotonic() - began < bound, name
        began = time.monotonic()
        with pytest.raises(StoreUnavailable):  # a reattach elsewhere is denied, not granted
            b.acquire(sid, 1, record(2, sid, node="B"), wait=0.5)
        assert time.monotonic() - began < 0.5 + 2 * TIMEOUT + 1.5
        assert b.owner_epoch(sid) is None and not b.may_forward(sid)
        # the owner forwards only until its lease deadline, then fences itself
        wait_until(lambda: not a.may_forward(sid), a.ttl + 2.0, what="A's fence to close")
        etcd_cluster_fn.heal()
        got = wait_until(lambda: _quietly(lambda: b.get(sid)), 30.0, 0.2, what="etcd back")
        # StoreUnavailable means "outcome unknown": A's CAS, queued in the surviving
        # member, may still commit when quorum returns. B's transfer never could.
        assert got in (record(1, sid, node="A"), record(2, sid, node="A"))
        entry = b.store.entry(sid)
        assert entry is not None and entry.owner_epoch == 1
        assert b.store.create(record(1, new_sid()))
    finally:
        ns.close()


def test_a_frozen_or_stopped_minority_member_is_left_for_the_others(
    etcd_cluster_fn: EtcdCluster,
) -> None:
    """The client starts with the first endpoint; SIGSTOP that member (its sockets stay
    open, it answers nothing): calls fail closed until the client has moved on to another
    member, then succeed while it is still frozen. The same with the member stopped."""
    s = EtcdSessionStore(etcd_cluster_fn.endpoints, prefix(), timeout=TIMEOUT)
    try:
        sid = new_sid()
        assert s.create(record(1, sid))
        etcd_cluster_fn.freeze(0)
        wait_until(lambda: _quietly(lambda: s.get(sid)) == record(1, sid), 30.0, 0.1,
                   what="a read through another member")  # fmt: skip
        assert s.cas(sid, 1, record(2, sid))
        assert etcd_cluster_fn.members[0].frozen
        etcd_cluster_fn.thaw(0)
        etcd_cluster_fn.stop(1)
        wait_until(lambda: _quietly(lambda: s.get(sid)) == record(2, sid), 30.0, 0.1,
                   what="a read with one member stopped")  # fmt: skip
        assert s.cas(sid, 2, record(3, sid))
        assert s.get(sid) == record(3, sid)
    finally:
        s.close()


def _quietly(call):  # type: ignore[no-untyped-def]
    try:
        return call()
    except StoreUnavailable:
        return None


def test_a_silent_owner_fences_before_its_lease_expires(nodes: Nodes) -> None:
    """Keep-alives stop (the keeper paused) and the owner does not answer hand-over
    requests: its fence closes strictly before etcd drops the lease; then another node
    takes the session over by CAS (epoch + 1) and the old owner can write nothing."""
    a = nodes.node("A", on_handover=lambda _s, _r: False)
    b = nodes.node("B")
    sid = new_sid()
    assert a.create(record(1, sid, node="A"))
    lease = a.lease_id
    a.pause_keeper()
    fence_closed = lease_gone = None
    deadline = time.monotonic() + a.ttl + 10
    while lease_gone is None and time.monotonic() < deadline:
        now = time.monotonic()
        if fence_closed is None and not a.may_forward(sid, now):
            fence_closed = now
        info = b.store.worker.call(lambda c: c.get_lease_info(lease, keys=False))
        if info.TTL < 0:  # etcd dropped it
            lease_gone = time.monotonic()
        time.sleep(0.01)
    assert fence_closed is not None and lease_gone is not None
    assert fence_closed < lease_gone
    result = b.acquire(sid, 1, record(2, sid, node="B"), wait=a.ttl + 2)
    assert result.outcome == Outcome.GRANTED and result.owner_epoch == 2
    assert not a.may_forward(sid)
    assert not a.cas(sid, 1, record(2, sid, node="A"))  # AT-51: its token is gone
    a.pause_keeper(False)
    wait_until(lambda: a.leases_lost == 1, a.ttl + 5, what="A to learn its lease is gone")
    assert a.owned() == [] and [c.change for c in a.history] == ["created", "lost"]


def test_an_owner_frozen_past_its_lease_checks_its_fence_on_waking(
    etcd_cluster: EtcdCluster, tmp_path: Path
) -> None:
    """AT-50 at the store level: the owner process is SIGSTOPped past its TTL; another node
    takes the session over (the lease expired: no hand-over from the frozen owner); the
    owner is resumed and must not send one more datagram for the session (its fence is
    checked with a fresh clock first), and its state write is rejected."""
    p = prefix()
    sid = new_sid()
    out = tmp_path / "owner.out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable, str(REPO / "tests" / "etcd_owner_proc.py"),
        ",".join(etcd_cluster.endpoints), p, "A", sid, "2",
    ]  # fmt: skip
    with out.open("wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env)
    b_store = EtcdSessionStore(etcd_cluster.endpoints, p, timeout=TIMEOUT)
    b = NodeOwnership(b_store, "B", ttl=2)
    try:
        wait_until(lambda: "ready 1" in out.read_text(), 30.0, what="the owner process")
        wait_until(lambda: out.read_text().count("\nF ") >= 3, 10.0, what="forwarding")
        proc.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        b.start()
        result = b.acquire(sid, 1, record(2, sid, node="B"), wait=15)
        assert result.outcome == Outcome.GRANTED
        assert (result.owner_epoch, result.previous_owner) == (2, "A")
        proc.send_signal(signal.SIGCONT)
        wait_until(lambda: "cas " in out.read_text(), 15.0, what="the owner to wake and fence")
        lines = out.read_text().splitlines()
        forwarded = [float(x.split()[1]) for x in lines if x.startswith("F ")]
        assert forwarded and max(forwarded) < stopped_at  # not one datagram after waking
        assert "cas False" in lines  # its write after the takeover is rejected
        entry = b_store.entry(sid)
        assert entry is not None and entry.record.owner_node == "B" and entry.owner_epoch == 2
        assert entry.record.state_version == 2 and entry.wrapped_keys == b"wrapped"
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait(10)
        b.close()
        b_store.close()
