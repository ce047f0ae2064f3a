"""The cluster fault checker, long: at least 200 randomized faults, then the verdict.

Starts three etcd members on loopback (``tests/etcd_cluster.py``), three cluster node
processes (``tests/cluster_node.py``: a real ``NodeOwnership`` each, forwarding the
sessions it owns under its lease fence, counters in durable blocks) and a reattacher
that moves four sessions between them, one to three nodes at once
(``tests/cluster_chaos.py``). Then it injects ``--faults`` randomized faults (default
200): ``kill -9`` a node and restart it, SIGSTOP a node past its lease (and briefly), cut
a node from etcd (connections reset, or stalled and delivered late), stop one etcd
member, freeze one, stop a majority, reattach one session through every node at once.
At the end it heals everything, reads the store's history of every session entry, and
runs ``tests/cluster_check.py`` over the nodes' journals, the wire and the history: zero
overlapping ownership intervals, zero state versions committed twice or lost, zero
(key, counter) reuse.

Prints the faults injected, the checker's counts, the CPU model and the load; exit status
1 on any violation (the directory with the journals is kept then, and named), 0 otherwise.
No root. About 3 s per fault: ~10 minutes for 200.

``--gateways`` runs layer 2 instead (``tests/cluster_gateways.py``): three real
``jvpn-gateway`` nodes with ``[cluster]`` and one real client core; each fault is a move
of the client's traffic to another node with the owner alive, killed -9 or frozen past
its lease (and one etcd member stopped or not); the checker reads the gateways'
SESSION_OWNER_* events, the store's history and the client's wire record. A move that
does not complete (no echo reply through the new node within 30 s) ends the run, exit 1.

``python bench/cluster_faults.py [--faults 200] [--seed N] [--keep DIR] [--gateways]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from cluster_chaos import FAULTS, ChaosLab  # noqa: E402
from cluster_check import check_dir  # noqa: E402
from etcd_cluster import etcd_unavailable, running_cluster  # noqa: E402


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--faults", type=int, default=200, help="faults to inject (default 200)")
    p.add_argument("--seed", type=int, default=None, help="random seed (printed either way)")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--sessions", type=int, default=4)
    p.add_argument("--keep", type=Path, default=None, help="keep the journals in this directory")
    p.add_argument("--gateways", action="store_true", help="layer 2: real jvpn-gateway nodes")
    args = p.parse_args(argv)
    reason = etcd_unavailable()
    if reason is not None:
        print(f"skipped: {reason}")
        return 0
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="jvpn-cluster-faults-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"CPU model: {cpu_model()} ({os.cpu_count()} cores); load before: {loadavg()}")
    if args.gateways:
        return gateways(args, workdir)
    began = time.monotonic()
    with running_cluster() as etcd:
        lab = ChaosLab(etcd, workdir, nodes=args.nodes, sessions=args.sessions, seed=args.seed)
        print(f"seed {lab.seed}; {args.nodes} nodes, {args.sessions} sessions, lease TTL "
              f"{lab.ttl} s; journals in {workdir}", flush=True)  # fmt: skip
        try:
            lab.start()
            lab.run(faults=args.faults, progress=lambda i, kind: progress(i, args.faults, kind))
            lab.finish()
        finally:
            lab.close()
    minutes = (time.monotonic() - began) / 60
    report = check_dir(workdir)
    print(f"\nfaults injected ({sum(lab.faults.values())} in {minutes:.1f} min; "
          f"{lab.reattaches} background reattaches):")  # fmt: skip
    for kind in FAULTS:
        print(f"  {kind:<44} {lab.faults.get(kind, 0):>5}")
    print(f"  (nodes that exited on their own, restarted: {lab.unplanned_restarts})")
    print("\nchecker:")
    print("  " + report.table().replace("\n", "\n  "))
    print(f"\nCPU model: {cpu_model()} ({os.cpu_count()} cores); load after: {loadavg()}")
    if not report.ok:
        print(f"journals kept in {workdir}")
        return 1
    if args.keep is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def gateways(args: argparse.Namespace, workdir: Path) -> int:
    from cluster_gateways import run_gateway_faults

    began = time.monotonic()
    with running_cluster() as etcd:
        try:
            run = run_gateway_faults(etcd, workdir, args.faults, args.seed,
                                     lambda i, kind: progress(i, args.faults, kind))  # fmt: skip
        except AssertionError as exc:
            print(f"FAILED: {exc}\njournals kept in {workdir}")
            return 1
    minutes = (time.monotonic() - began) / 60
    print(f"\nseed {run.seed}; moves under faults ({sum(run.faults.values())} in "
          f"{minutes:.1f} min), same session id throughout: {run.same_session}")  # fmt: skip
    for kind, n in sorted(run.faults.items()):
        print(f"  {kind:<52} {n:>5}")
    print("\nchecker:")
    print("  " + run.report.table().replace("\n", "\n  "))
    print(f"\nCPU model: {cpu_model()} ({os.cpu_count()} cores); load after: {loadavg()}")
    if not run.report.ok or not run.same_session:
        print(f"journals kept in {workdir}")
        return 1
    if args.keep is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def progress(i: int, total: int, kind: str) -> None:
    if i % 10 == 0 or i == total:
        print(f"  {time.strftime('%H:%M:%S')} fault {i}/{total}: {kind} (load {loadavg()})",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
