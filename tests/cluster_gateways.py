"""Layer 2 of the cluster fault checker: real ``jvpn-gateway`` nodes and a real client.

:func:`run_gateway_faults` starts three gateway programs with ``[cluster]`` (the harness
of ``tests/test_cluster_gateway.py``: one identity and state key, each its own port, node
id and JSONL event sink) on the caller's etcd cluster, attaches one client core
(``WireClient``: it records every (direction, key phase, counter) it sends and
receives), then ``rounds`` times moves the client's traffic to another node under a
random fault: the owner alive (it hands over when asked), killed ``-9`` (restarted after
the move) or frozen past its lease (resumed after the move), each time with one etcd
member stopped or not. Every move must bring echo replies back, and the store must then
name the new node as the owner.
Then :func:`cluster_check.check_gateways` judges the nodes' SESSION_OWNER_* events, the
store's history (:func:`cluster_chaos.dump_history`) and the client's wire record.

Everything it starts is stopped before it returns (also on failure); etcd belongs to the
caller.
"""

from __future__ import annotations

import random
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cluster_chaos import dump_history
from cluster_check import Report, check_gateways, read_jsonl
from etcd_cluster import EtcdCluster
from test_cluster_gateway import Cluster, attached, moved

from tunnel.ownership.etcd import EtcdSessionStore

KINDS = ("owner alive", "owner killed -9", "owner frozen past its lease")
MOVE_TIMEOUT = 30.0
"""Seconds a move may take (a dead or frozen owner's lease must expire first: TTL 2 s)."""


class MoveIncomplete(AssertionError):
    """A move of the client's traffic did not bring echo replies back (liveness, not
    safety: the checker's verdict is about what was forwarded and committed)."""


@dataclass
class GatewayRun:
    seed: int
    faults: Counter[str]
    report: Report
    same_session: bool


def run_gateway_faults(
    etcd: EtcdCluster, workdir: Path, rounds: int, seed: int | None = None,
    progress: Callable[[int, str], None] | None = None,
) -> GatewayRun:  # fmt: skip
    """See the module docstring. AssertionError when a move does not complete."""
    seed = seed if seed is not None else random.randrange(1 << 32)
    rng = random.Random(seed)
    cluster = Cluster(workdir, etcd)
    faults: Counter[str] = Counter()
    try:
        for name in ("gw-a", "gw-b", "gw-c"):
            cluster.node(name)
        client, sid = attached(cluster, cluster.nodes["gw-a"])
        for r in range(rounds):
            kind = one_move(cluster, etcd, client, sid, rng, f"seed {seed} round {r}")
            faults[kind] += 1
            if progress is not None:
                progress(r + 1, kind)
        same = client.session.machine.session_id == sid
        store = EtcdSessionStore(etcd.endpoints, cluster.prefix, timeout=5.0)
        try:
            dump_history(store, workdir / "history.jsonl")
        finally:
            store.close()
        events = [e for n in cluster.nodes.values() for e in n.events()]
        history = list(read_jsonl(workdir / "history.jsonl"))
        return GatewayRun(seed, faults, check_gateways(events, history, client.repeats()), same)
    finally:
        cluster.close()
        etcd.heal()


def one_move(
    cluster: Cluster, etcd: EtcdCluster, client: object, sid: str, rng: random.Random,
    label: str,
) -> str:  # fmt: skip
    """Move the client's traffic to another node under a random fault; the fault's name."""
    owner = cluster.nodes[cluster.entry(sid).record.owner_node]
    target = rng.choice([n for n in cluster.nodes.values() if n is not owner])
    kind = rng.choice(KINDS)
    member = rng.choice([None, None, 0, 1, 2])
    if member is not None:
        etcd.stop(member)
    if kind == "owner killed -9":
        owner.kill()
    elif kind == "owner frozen past its lease":
        owner.signal(signal.SIGSTOP)
    client.gateway = target.address  # type: ignore[attr-defined]
    replies = moved(client, timeout=MOVE_TIMEOUT)  # type: ignore[arg-type]
    ok = replies and owned_by(cluster, sid, target.name)
    if kind == "owner killed -9":
        owner.start()
    elif kind == "owner frozen past its lease":
        owner.signal(signal.SIGCONT)
    if member is not None:
        etcd.start(member)
    if not ok:
        raise MoveIncomplete(
            f"{label}: the move ({kind}) from {owner.name} to {target.name} did not "
            f"complete (echo replies: {replies})\n{recent_owner_events(cluster)}"
        )
    return kind + ("" if member is None else ", an etcd member stopped")


def owned_by(cluster: Cluster, sid: str, node: str, timeout: float = 10.0) -> bool:
    """The store names ``node`` as the owner within ``timeout`` (echo replies alone do not
    prove the move: a reply to a request sent before it may still arrive)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cluster.entry(sid).record.owner_node == node:
            return True
        time.sleep(0.2)
    return False


def recent_owner_events(cluster: Cluster, n: int = 6) -> str:
    """The last SESSION_OWNER_* / SESSION_TERMINATED events of every node (diagnostics)."""
    lines = []
    for node in cluster.nodes.values():
        events = [e for e in node.events() if e["event_type"].startswith("SESSION_OWNER")
                  or e["event_type"] == "SESSION_TERMINATED"]  # fmt: skip
        for e in events[-n:]:
            fields = {k: e.get(k) for k in ("owner_epoch", "mono", "peer_node", "reason_code")}
            lines.append(f"{node.name} {e['event_type']} {fields}")
    return "\n".join(lines)
