"""The cluster fault checker catches what it claims to (tests/cluster_check.py).

First on records written by hand, one violation each (the checker's contract: an
overlap of two owners' fence-checked sends, an owner epoch that goes back, a datagram
of an old owner arriving between the new owner's that was not delayed by a pause, a
state version written twice, a version a node was told is committed missing from the
store, a write nobody attempted, a (key, counter) used twice, a counter outside the
blocks committed to its sender). Then on real node processes broken on purpose
(``cluster_node.py --unsafe``): a node that ignores its fence and one that reuses
counters, each caught by the checker in a short run against a real etcd.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cluster_chaos import ChaosLab
from cluster_check import PAUSE_SLACK, check, check_dir, check_gateways, read_jsonl
from etcd_cluster import EtcdCluster, etcd_cluster, wait_until

__all__ = ["etcd_cluster"]  # fixture

SID = "ab" * 16


def dgram(
    node: str, epoch: int, ctr: int, t: float, rx: float | None = None, **kw: Any
) -> dict[str, Any]:
    return {"n": node, "p": 1 if node == "a" else 2, "q": ctr + 1, "s": SID, "e": epoch,
            "k": "k1", "c": ctr, "t": t, "rx": t + 0.001 if rx is None else rx, **kw}  # fmt: skip


def hist(rev: int, ver: int, node: str, epoch: int, nxt: int) -> dict[str, Any]:
    return {"rev": rev, "sid": SID, "ver": ver, "node": node, "epoch": epoch, "key": "k1",
            "next": nxt}  # fmt: skip


def attempt(node: str, ver: int, op: str = "acquire") -> dict[str, Any]:
    return {"e": "attempt", "op": op, "sid": SID, "ver": ver, "node": node}


def ok(node: str, ver: int, op: str = "acquire") -> dict[str, Any]:
    return {"e": "result", "op": op, "sid": SID, "ver": ver, "node": node, "outcome": "ok"}


HISTORY = [hist(10, 1, "a", 1, 64), hist(11, 2, "b", 2, 128)]
JOURNAL = [attempt("a", 1, "create"), ok("a", 1, "create"), attempt("b", 2), ok("b", 2)]
WIRE = [dgram("a", 1, 0, 1.0), dgram("a", 1, 1, 1.1), dgram("b", 2, 64, 2.0),
        dgram("b", 2, 65, 2.1)]  # fmt: skip


def kinds(report: Any) -> set[str]:
    return {v.split(":")[0] for v in report.violations}


def test_a_clean_run_passes_and_is_counted() -> None:
    report = check(WIRE, JOURNAL, HISTORY)
    assert report.ok, report.table()
    assert report.counts["ownership intervals"] == 2
    assert report.counts["transfers (owner epoch + 1)"] == 1
    assert report.counts["(key, counter) pairs"] == 4


def test_overlapping_ownership_is_a_violation() -> None:
    wire = [*WIRE[:2], WIRE[2], dgram("a", 1, 2, 2.05, rx=2.051), WIRE[3]]
    assert "overlapping ownership" in kinds(check(wire, JOURNAL, HISTORY))


def test_an_owner_epoch_going_back_is_a_violation() -> None:
    wire = [dgram("b", 2, 64, 1.0), dgram("a", 1, 0, 2.0)]
    assert "owner epoch went back" in kinds(check(wire, JOURNAL, HISTORY))


def test_an_old_owner_arriving_late_counts_only_when_its_sender_was_paused() -> None:
    # a checked its fence at 1.2 (before b's first check at 2.0), then was frozen before
    # its send: the datagram arrives between b's, long after its check
    paused = dgram("a", 1, 2, 1.2, rx=2.0 + PAUSE_SLACK)
    report = check([*WIRE[:3], paused, WIRE[3]], JOURNAL, HISTORY)
    assert report.ok and report.counts["late_after_pause"] == 1, report.table()
    # the same order with no pause to explain it (checked at 1.95, arrived 10 ms later)
    quick = dgram("a", 1, 2, 1.95, rx=1.96)
    first_b = dgram("b", 2, 64, 1.955, rx=1.956)
    wire = [*WIRE[:2], first_b, quick, WIRE[3]]
    assert "interleaved on the wire" in kinds(check(wire, JOURNAL, HISTORY))


def test_a_state_version_written_twice_is_a_violation() -> None:
    history = [*HISTORY, dict(hist(12, 2, "a", 2, 192))]  # another owner, the same version
    assert "state version committed twice or went back" in kinds(check(WIRE, JOURNAL, history))
    back = [*HISTORY, hist(12, 1, "b", 2, 192)]
    assert "state version committed twice or went back" in kinds(check(WIRE, JOURNAL, back))


def test_a_refresh_by_the_owner_is_not_a_second_commit() -> None:
    """A gateway rewrites its record at the same version with a new counter block."""
    history = [*HISTORY, hist(12, 2, "b", 2, 192)]
    report = check(WIRE, JOURNAL, history)
    assert report.ok and report.counts["refreshes (same version, same owner)"] == 1


def test_a_version_reported_committed_but_missing_from_the_store_is_lost() -> None:
    journal = [*JOURNAL, attempt("b", 3, "reserve"), ok("b", 3, "reserve")]
    assert "state version lost" in kinds(check(WIRE, journal, HISTORY))


def test_a_store_write_nobody_attempted_is_a_violation() -> None:
    history = [*HISTORY, hist(12, 3, "c", 3, 192)]
    assert "write nobody attempted" in kinds(check(WIRE, JOURNAL, history))


def test_a_reused_counter_is_a_violation() -> None:
    wire = [*WIRE, dgram("b", 2, 1, 2.2)]
    found = kinds(check(wire, JOURNAL, HISTORY))
    assert {"nonce reuse", "counter outside a committed block"} <= found


def test_a_counter_outside_the_senders_blocks_is_a_violation() -> None:
    wire = [*WIRE[:2], dgram("b", 2, 200, 2.0)]
    assert kinds(check(wire, JOURNAL, HISTORY)) == {"counter outside a committed block"}


def owner_event(kind: str, node: str, epoch: int, span: tuple[float, float] | None = None,
                mono: float = 0.0) -> dict[str, Any]:  # fmt: skip
    first, last = span if span is not None else (None, None)
    return {"event_type": f"SESSION_OWNER_{kind}", "session_id": SID, "node_id": node,
            "owner_epoch": epoch, "mono": mono, "forwarded": 0 if span is None else 10,
            "first_forward_mono": first, "last_forward_mono": last}  # fmt: skip


def test_layer_2_reads_the_gateways_owner_events() -> None:
    """Real gateways report each ended ownership interval (RELEASED, TRANSFERRED on the
    old owner) with its forwarding bounds; the newest owner's runs from its ACQUIRED on;
    ACQUIRED must be a write in the store."""
    events = [owner_event("ACQUIRED", "a", 1, mono=0.5),
              owner_event("RELEASED", "a", 1, (1.0, 1.9), mono=1.95),
              owner_event("ACQUIRED", "b", 2, mono=2.0)]  # fmt: skip
    report = check_gateways(events, HISTORY, [])
    assert report.ok and report.counts["ownership intervals"] == 2, report.table()
    # b holds it from its acquisition on: a's forwarding must have ended before
    late = [events[0], owner_event("RELEASED", "a", 1, (1.0, 2.5), mono=2.6), events[2]]
    assert kinds(check_gateways(late, HISTORY, [])) == {"overlapping ownership"}
    overlap = [*events, owner_event("TRANSFERRED", "b", 2, (1.5, 3.0), mono=3.1)]
    assert kinds(check_gateways(overlap, HISTORY, [])) == {"overlapping ownership"}
    phantom = [*events, owner_event("ACQUIRED", "c", 3, mono=4.0)]
    assert kinds(check_gateways(phantom, HISTORY, [])) == {"acquisition not in the store"}
    assert kinds(check_gateways(events, HISTORY, [("down", 0, 7)])) == {"nonce reuse"}


# -- broken nodes, real programs -----------------------------------------------------------------


@pytest.fixture
def broken(
    request: pytest.FixtureRequest, etcd_cluster: EtcdCluster, tmp_path: Path
) -> Iterator[ChaosLab]:
    lab = ChaosLab(etcd_cluster, tmp_path, nodes=2, sessions=1, ttl=2, reattacher=False,
                   node_args=("--unsafe", request.param))  # fmt: skip
    try:
        lab.start()
        yield lab
    finally:
        lab.close()


def sent_by(lab: ChaosLab, node: str) -> list[dict[str, Any]]:
    return [d for d in read_jsonl(lab.dir / "wire.jsonl") if d["n"] == node]


def acquire_until_granted(lab: ChaosLab, node: int) -> None:
    journal = lab.dir / f"node-n{node}.jsonl"

    def granted() -> bool:
        lab.nodes[node].send(f"acquire {lab.sids[0]}")
        time.sleep(0.3)  # one reattach every 0.3 s (a polling interval, not a timing assumption)
        return any(d["e"] == "result" and d["op"] == "acquire" and d["outcome"] == "ok"
                   for d in read_jsonl(journal))  # fmt: skip

    wait_until(granted, 30.0, 0.0, what=f"n{node} granted the session")


@pytest.mark.parametrize("broken", ["fence"], indirect=True)
def test_a_node_that_ignores_its_fence_is_caught(broken: ChaosLab) -> None:
    """n0 owns the session, is frozen past its lease, n1 takes over; n0 wakes and sends
    with its old block (it does not ask its fence): the checker reports the overlap."""
    wait_until(lambda: len(sent_by(broken, "n0")) >= 5, 30.0, what="n0 forwarding")
    broken.nodes[0].signal(signal.SIGSTOP)
    acquire_until_granted(broken, 1)
    wait_until(lambda: sent_by(broken, "n1"), 30.0, what="n1 forwarding")
    woke = time.monotonic()
    broken.nodes[0].signal(signal.SIGCONT)
    wait_until(lambda: [d for d in sent_by(broken, "n0") if d["t"] > woke], 30.0,
               what="n0 sending after it woke")  # fmt: skip
    broken.finish()
    assert "overlapping ownership" in kinds(check_dir(broken.dir))


@pytest.mark.parametrize("broken", ["counters"], indirect=True)
def test_a_node_that_reuses_counters_is_caught(broken: ChaosLab) -> None:
    """n1 starts its block two blocks early after a live hand-over: the counters n0 used
    cross the wire twice, and n1 sends outside what the store committed to it."""
    wait_until(lambda: len(sent_by(broken, "n0")) >= 40, 30.0, what="n0 forwarding")
    acquire_until_granted(broken, 1)
    wait_until(lambda: len(sent_by(broken, "n1")) >= 40, 30.0, what="n1 forwarding")
    broken.finish()
    found = kinds(check_dir(broken.dir))
    assert {"nonce reuse", "counter outside a committed block"} <= found
