"""Seed §7 Cluster coordination failure (network partition between nodes), and §9's
"cluster race does not create dual identity".

    If cluster partition occurs: reattach must fail if authoritative state unreachable;
    prefer termination over dual-active identity; prevent split-brain.
    Consistency > availability.

What runs: a real three-member etcd (``tests/etcd_cluster.py``) in every test. The
section 7 tests and the first §9 test run cluster **node processes**
(``tests/cluster_node.py``: each a real ``NodeOwnership`` with its lease and fence,
"forwarding" the sessions it owns as datagrams to a wire collector, counters in durable
blocks), each reaching etcd through relays of its own so one node can be cut from etcd
alone (``tests/cluster_chaos.py``): the faults they need (a partition of one node, a
node frozen between its fence check and its send) are injected there at will. The last
§9 test runs real **``jvpn-gateway`` programs** with ``[cluster]`` and a real client core
(``tests/cluster_gateways.py``); the gateway-level AT-48..51 tests are in
``tests/test_cluster_gateway.py``. The checker (``tests/cluster_check.py``) reads files
only, and judges both.

Every test ends with the checker over everything that crossed the wire and everything
the store committed: no overlapping ownership interval, no state version committed
twice or lost, no (key, counter) used twice.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster_chaos import ChaosLab
from cluster_check import check_dir, read_jsonl
from cluster_gateways import MoveIncomplete, run_gateway_faults
from etcd_cluster import EtcdCluster, etcd_cluster, etcd_cluster_fn, wait_until

from tunnel.ownership import StoreUnavailable

__all__ = ["etcd_cluster", "etcd_cluster_fn"]  # fixtures

TTL = 2
"""Lease seconds of the nodes (etcd's minimum with its default election timeout)."""


@pytest.fixture
def lab2(etcd_cluster: EtcdCluster, tmp_path: Path) -> Iterator[ChaosLab]:
    """Two nodes, one session created on n0, no background reattaches."""
    lab = ChaosLab(etcd_cluster, tmp_path, nodes=2, sessions=1, ttl=TTL, reattacher=False)
    try:
        lab.start()
        yield lab
    finally:
        lab.close()


def wire(lab: ChaosLab, node: str | None = None, after: float = 0.0) -> list[dict[str, Any]]:
    """Datagrams received so far (of ``node``; fence-checked after ``after``)."""
    return [d for d in read_jsonl(lab.dir / "wire.jsonl")
            if (node is None or d["n"] == node) and d["t"] > after]  # fmt: skip


def results(lab: ChaosLab, node: str, op: str = "acquire") -> list[dict[str, Any]]:
    return [d for d in read_jsonl(lab.dir / f"node-{node}.jsonl")
            if d["e"] == "result" and d["op"] == op]  # fmt: skip


def new_result(lab: ChaosLab, node: str, seen: int, op: str = "acquire") -> dict[str, Any]:
    """Wait for the ``seen``-th + 1 result of ``op`` in ``node``'s journal."""
    found = wait_until(lambda: results(lab, node, op)[seen:], 30.0, 0.05,
                       what=f"{node}'s {op} result")  # fmt: skip
    return dict(found[0])


def acquire(lab: ChaosLab, node: str) -> dict[str, Any]:
    """A reattach of the session through ``node``; its journal's result."""
    seen = len(results(lab, node))
    lab.nodes[int(node[1:])].send(f"acquire {lab.sids[0]}")
    return new_result(lab, node, seen)


def acquire_until_granted(lab: ChaosLab, node: str, bound: float) -> dict[str, Any]:
    def granted() -> dict[str, Any] | None:
        r = acquire(lab, node)
        return r if r["outcome"] == "ok" else None

    return dict(wait_until(granted, bound, 0.1, what=f"{node} to be granted the session"))


def writes_attempted(lab: ChaosLab, node: str, t0: float, t1: float) -> list[dict[str, Any]]:
    """Results of the store writes ``node`` attempted between t0 and t1 (its control thread
    is serial: an attempt's result is the next result line)."""
    out, pending = [], False
    for d in read_jsonl(lab.dir / f"node-{node}.jsonl"):
        if d["e"] == "attempt":
            pending = t0 < d["mono"] < t1
        elif d["e"] == "result" and pending:
            out.append(d)
            pending = False
    return out


def finish_and_check(lab: ChaosLab) -> None:
    lab.finish()
    report = check_dir(lab.dir)
    print(report.table())
    assert report.ok, report.table()
    assert report.counts["datagrams"] > 0 and report.counts["history writes"] > 0


def test_07_reattach_fails_if_authoritative_state_unreachable(lab2: ChaosLab) -> None:
    """AT-49, partition: n1 is cut from etcd (its connections reset, new ones refused)
    while the rest of the cluster works. A reattach through n1 fails closed: nothing is
    granted, n1 never forwards; n0, which reaches the store, keeps the session. Healed,
    the same reattach is granted by CAS (owner epoch 2)."""
    wait_until(lambda: len(wire(lab2, "n0")) >= 10, 30.0, what="n0 forwarding")
    lab2.relays.cut("n1", "reset")
    outcomes = {acquire(lab2, "n1")["outcome"] for _ in range(3)}
    assert outcomes <= {"unavailable", "unknown"}, outcomes
    cut_over = time.monotonic()
    wait_until(lambda: len(wire(lab2, "n0", after=cut_over)) >= 20, 30.0,
               what="n0 still forwarding")  # fmt: skip
    assert wire(lab2, "n1") == []
    lab2.relays.heal("n1")
    granted = acquire_until_granted(lab2, "n1", 30.0)
    assert granted["epoch"] == 2  # (previous: n0, or n1 itself when an earlier answer was lost)
    wait_until(lambda: wire(lab2, "n1"), 30.0, what="n1 forwarding")
    finish_and_check(lab2)


def test_07_prefer_termination_over_dual_active_identity(lab2: ChaosLab) -> None:
    """The owner n0 is cut from etcd (its requests stall, delivered late on healing): it
    cannot know whether it still owns the session, so it stops forwarding at its lease
    deadline rather than keep an identity another node may take. n1 takes over once the
    lease expired; every datagram of n0 was fence-checked before n1's first one, and n0,
    reconnected, never forwards the session again."""
    wait_until(lambda: len(wire(lab2, "n0")) >= 10, 30.0, what="n0 forwarding")
    cut_at = time.monotonic()
    lab2.relays.cut("n0", "stall")
    granted = acquire_until_granted(lab2, "n1", 6 * TTL + 20)
    assert granted["epoch"] == 2  # (previous: n0, or n1 itself when an earlier answer was lost)
    first_n1 = wait_until(lambda: wire(lab2, "n1"), 30.0, what="n1 forwarding")[0]
    n0_sent = [d["t"] for d in wire(lab2, "n0")]
    assert max(n0_sent) < first_n1["t"]
    assert max(n0_sent) < cut_at + TTL  # it fenced itself by its lease deadline
    lab2.relays.heal("n0")
    healed = time.monotonic()
    wait_until(lambda: len(wire(lab2, "n1", after=healed)) >= 100, 30.0,
               what="n1 forwarding after the heal")  # fmt: skip
    assert wire(lab2, "n0", after=cut_at + TTL) == []
    finish_and_check(lab2)


def test_07_prevent_split_brain(etcd_cluster: EtcdCluster, tmp_path: Path) -> None:
    """AT-48: the two nodes that do not own the session get a valid reattach at the same
    moment, five times over: each time exactly one transfer commits (owner epoch + 1), the
    other is refused and writes nothing, and only the winner forwards afterwards."""
    lab = ChaosLab(etcd_cluster, tmp_path, nodes=3, sessions=1, ttl=TTL, reattacher=False)
    try:
        lab.start()
        owner, epoch, decided = "n0", 1, 0
        for _ in range(10):
            got = race(lab, [n for n in ("n0", "n1", "n2") if n != owner])
            if any(r["outcome"] in ("unknown", "unavailable") for r in got.values()):
                # a store call ran past its bound (a loaded machine): its outcome is
                # unknown and the round proves nothing; race again from what etcd holds
                entry = wait_until(lambda: read_entry(lab), 30.0, what="the entry")
                owner, epoch = entry.record.owner_node, entry.owner_epoch
                continue
            winners = [n for n, r in got.items() if r["outcome"] == "ok"]
            assert len(winners) == 1, got
            (loser,) = set(got) - set(winners)
            assert got[loser]["outcome"] in ("conflict", "owned_elsewhere"), got
            assert got[winners[0]]["epoch"] == epoch + 1
            owner, epoch = winners[0], epoch + 1
            since = got[owner]["mono"]  # the winner's journal line after its grant
            wait_until(lambda o=owner, t=since: len(wire(lab, o, after=t)) >= 5, 30.0,
                       what=f"{owner} forwarding")  # fmt: skip
            assert {d["n"] for d in wire(lab, after=since)} == {owner}
            decided += 1
            if decided == 5:
                break
        assert decided == 5
        lab.finish()
        report = check_dir(lab.dir)
        assert report.ok, report.table()
        assert report.counts["transfers (owner epoch + 1)"] == epoch - 1
    finally:
        lab.close()


def read_entry(lab: ChaosLab) -> Any:
    """The session's entry as etcd holds it, or None when etcd did not answer in time."""
    try:
        return lab.store.entry(lab.sids[0])
    except StoreUnavailable:
        return None


def race(lab: ChaosLab, contenders: list[str]) -> dict[str, dict[str, Any]]:
    """The same reattach through every contender at once; each one's result."""
    seen = {n: len(results(lab, n)) for n in contenders}
    for n in contenders:
        lab.nodes[int(n[1:])].send(f"acquire {lab.sids[0]}")
    return {n: new_result(lab, n, seen[n]) for n in contenders}


def test_07_consistency_over_availability(etcd_cluster_fn: EtcdCluster, tmp_path: Path) -> None:
    """AT-49, no quorum: an etcd majority is stopped. Availability is given up, never
    consistency: every store write in the outage fails closed (no ``ok``), the owner stops
    forwarding at its lease deadline and nobody forwards until quorum returns; then a
    reattach is granted and the session continues, its versions in sequence (none
    committed twice, none lost)."""
    lab = ChaosLab(etcd_cluster_fn, tmp_path, nodes=2, sessions=1, ttl=TTL, reattacher=False)
    try:
        lab.start()
        wait_until(lambda: len(wire(lab, "n0")) >= 10, 30.0, what="n0 forwarding")
        for i in (0, 1):
            etcd_cluster_fn.stop(i)
        stopped = time.monotonic()
        during = [acquire(lab, "n1") for _ in range(2)]
        wait_until(lambda: time.monotonic() > stopped + TTL + 2.0, TTL + 6.0, what="the outage")
        assert all(r["outcome"] in ("unavailable", "unknown") for r in during), during
        # nobody forwards without quorum: the owner's fence closes at its lease deadline
        # (a leader that lost quorum answers keep-alives until it notices, one election
        # timeout: 1 s)
        assert wire(lab, after=stopped + TTL + 1.0) == []
        healing = time.monotonic()
        outage_writes = writes_attempted(lab, "n0", stopped, healing)
        outage_writes += writes_attempted(lab, "n1", stopped, healing)
        assert all(r["outcome"] == "unknown" for r in outage_writes), outage_writes
        etcd_cluster_fn.heal()
        healed = time.monotonic()
        acquire_until_granted(lab, "n1", 60.0)  # the session resumes: a reattach is granted
        wait_until(lambda: wire(lab, "n1", after=healed), 30.0, what="forwarding after quorum")
        lab.finish()
        report = check_dir(lab.dir)
        assert report.ok, report.table()
        assert report.counts["store writes: reserve ok"] > 0
    finally:
        lab.close()


def test_09_cluster_race_does_not_create_dual_identity(
    etcd_cluster_fn: EtcdCluster, tmp_path: Path
) -> None:
    """About a minute of randomized faults (``kill -9`` and restart of a node, SIGSTOP past
    its lease, a node cut from etcd, an etcd minority and majority stopped, one member
    frozen) while three nodes race to reattach four sessions, one to three nodes at once.
    The checker (the same as ``bench/cluster_faults.py``'s long run) finds no overlapping
    ownership, no state version committed twice or lost, no (key, counter) used twice."""
    lab = ChaosLab(etcd_cluster_fn, tmp_path, nodes=3, sessions=4, ttl=TTL)
    try:
        lab.start()
        lab.run(seconds=50.0)
        lab.finish()
    finally:
        lab.close()
    report = check_dir(tmp_path)
    print(f"seed {lab.seed}; faults {dict(lab.faults)}")
    print(report.table())
    assert report.ok, f"seed {lab.seed}\n{report.table()}"
    assert sum(lab.faults.values()) >= 8
    assert report.counts["transfers (owner epoch + 1)"] >= 5
    assert report.counts["datagrams"] >= 1000


# -- layer 2: real jvpn-gateway nodes ------------------------------------------------------------

LIVELOCK = (
    "s8-cluster up to 797276b: a node that fenced itself while frozen (SESSION_OWNER_RELEASED "
    "owner_fenced), later granted the session again (ACQUIRED, epoch + 1), fails its first "
    "write (RELEASED ownership_conflict) and then re-acquires and releases it every ~100 ms "
    "(same epoch, state_version + 1 each time): the move never completes. Liveness only: "
    "a safety violation still fails this test."
)


@pytest.mark.xfail(raises=MoveIncomplete, strict=False, reason=LIVELOCK)
def test_09_cluster_race_does_not_create_dual_identity_between_gateways(
    etcd_cluster_fn: EtcdCluster, tmp_path: Path
) -> None:
    """Layer 2: the same checker over three real ``jvpn-gateway`` nodes with ``[cluster]``
    and a real client core (tests/cluster_gateways.py). Ten times, the client's traffic
    moves to another node while the owner is alive (it hands over), killed -9 (then
    restarted) or frozen past its lease (then resumed), sometimes with an etcd member
    stopped; echo replies must come back through the new node each time. The checker
    reads the nodes' SESSION_OWNER_* events and the store's history: no overlapping
    ownership interval, no state version committed twice, every acquisition a committed
    write, no (direction, key phase, counter) twice on the wire; the session id never
    changed."""
    run = run_gateway_faults(etcd_cluster_fn, tmp_path, rounds=10)
    print(f"seed {run.seed}; {dict(run.faults)}\n{run.report.table()}")
    assert run.report.ok, f"seed {run.seed}\n{run.report.table()}"
    assert run.same_session
    assert run.report.counts["transfers (owner epoch + 1)"] >= 10
    assert run.report.counts["ownership intervals"] >= 3
