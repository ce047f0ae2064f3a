"""Session-store writes one etcd cluster here sustains: CAS transactions per second.

Starts three etcd members on loopback (``tests/etcd_cluster.py``: free ports, data
directories under /tmp on this machine's disk, default heartbeat/election, fsync on), then
measures, each phase for ``--seconds`` (default 6):

- **sync**: one thread calling ``EtcdSessionStore.cas`` back to back (what a gateway
  mirroring a state change does: the caller waits for the commit);
- **async xN**: N coroutines on the store's worker loop, each doing ``acas`` on its own
  session back to back (N transactions in flight: the rate a busy gateway could reach);

Every write is the real one: a transaction comparing the entry's mod revision, writing a
record JSON with 64 bytes of wrapped keys. It prints, per phase, transactions, txn/s and
latency median / p95 (ms), then the entry size, the WAL fsync mean from the leader's
``/metrics``, the CPU model and the load. The bench, etcd's three members and the
gRPC client share this machine's cores: the numbers are a floor for a real cluster
(three machines, one member each).

``python bench/etcd_writes.py`` (about 35 s).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import time
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from etcd_cluster import EtcdCluster, etcd_unavailable, running_cluster  # noqa: E402

from tunnel.ownership import SessionRecord  # noqa: E402
from tunnel.ownership.etcd import EtcdSessionStore, encode_entry  # noqa: E402

WRAPPED = bytes(64)
"""Stand-in for the wrapped session keys (two 32-byte keys; AEAD adds 16+12 per wrap)."""


@dataclass
class Phase:
    name: str
    txns: int
    seconds: float
    latencies: list[float]

    @property
    def rate(self) -> float:
        return self.txns / self.seconds if self.seconds > 0 else 0.0


def record(sid: str, version: int) -> SessionRecord:
    return SessionRecord(
        session_id=sid, state="ATTACHED", state_version=version, binding_epoch=version,
        owner_node="gw-node-01", policy_version="1.0+0123abcd", updated_ms=int(time.time() * 1e3),
    )  # fmt: skip


def phase_sync(store: EtcdSessionStore, seconds: float) -> Phase:
    sid = uuid.uuid4().hex
    assert store.create(record(sid, 0), WRAPPED)
    version, lat = 0, []
    began = time.monotonic()
    while time.monotonic() - began < seconds:
        t = time.monotonic()
        assert store.cas(sid, version, record(sid, version + 1))
        lat.append(time.monotonic() - t)
        version += 1
    return Phase("sync (1 caller)", version, time.monotonic() - began, lat)


def phase_async(store: EtcdSessionStore, seconds: float, inflight: int) -> Phase:
    sids = [uuid.uuid4().hex for _ in range(inflight)]
    for sid in sids:
        assert store.create(record(sid, 0), WRAPPED)
    lat: list[float] = []

    async def writer(client: Any, sid: str, until: float) -> int:
        version = 0
        while time.monotonic() < until:
            t = time.monotonic()
            ok = await store.acas(client, sid, version, record(sid, version + 1))
            assert ok
            lat.append(time.monotonic() - t)
            version += 1
        return version

    async def run(client: Any) -> int:
        until = time.monotonic() + seconds
        counts = await asyncio.gather(*(writer(client, s, until) for s in sids))
        return sum(counts)

    began = time.monotonic()
    txns = store.worker.call(run, timeout=seconds + 30)
    return Phase(f"async x{inflight}", txns, time.monotonic() - began, lat)


def fsync_mean_ms(cluster: EtcdCluster) -> str:
    """Mean WAL fsync (ms) over the members' /metrics (etcd_disk_wal_fsync_duration)."""
    total = count = 0.0
    for m in cluster.members:
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{m.client_url}/metrics", timeout=2) as resp:
                for line in resp.read().decode().splitlines():
                    if line.startswith("etcd_disk_wal_fsync_duration_seconds_sum"):
                        total += float(line.split()[-1])
                    elif line.startswith("etcd_disk_wal_fsync_duration_seconds_count"):
                        count += float(line.split()[-1])
    return f"{1000 * total / count:.2f} ms over {int(count)} fsyncs" if count else "?"


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "?"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[round(q * (len(ordered) - 1))] if ordered else 0.0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="seconds per phase")
    parser.add_argument(
        "--inflight", type=int, nargs="*", default=[8, 32, 128], help="async concurrencies"
    )
    args = parser.parse_args(argv)
    reason = etcd_unavailable()
    if reason is not None:
        print(f"skipped: {reason}")
        return 0
    print(f"load before: {open('/proc/loadavg').read().strip()}")
    with running_cluster() as cluster:
        store = EtcdSessionStore(cluster.endpoints, "/jvpn/bench/", timeout=10.0)
        try:
            phases = [phase_sync(store, args.seconds)]
            phases += [phase_async(store, args.seconds, n) for n in args.inflight]
            fsync = fsync_mean_ms(cluster)
        finally:
            store.close()
    entry = encode_entry(record(uuid.uuid4().hex, 1), 1, WRAPPED)
    print(f"\n{'phase':<18} {'txns':>7} {'txn/s':>8} {'median ms':>10} {'p95 ms':>8}")
    for p in phases:
        med = 1000 * statistics.median(p.latencies) if p.latencies else 0.0
        p95 = 1000 * percentile(p.latencies, 0.95)
        print(f"{p.name:<18} {p.txns:>7} {p.rate:>8.0f} {med:>10.2f} {p95:>8.2f}")
    print(f"\nentry value: {len(entry)} bytes (+ key ~{len('/jvpn/bench/s/') + 32} bytes)")
    print(f"WAL fsync mean: {fsync}")
    print(f"CPU {cpu_model()}, {os.cpu_count()} cores; etcd {cluster_version()}; 3 members on")
    print("loopback, all on this machine (with the bench and its gRPC client)")
    print(f"load after: {open('/proc/loadavg').read().strip()}")
    return 0


def cluster_version() -> str:
    import subprocess

    from etcd_cluster import ETCD

    out = subprocess.run([ETCD, "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0].split(":", 1)[-1].strip() if out else "?"


if __name__ == "__main__":
    sys.exit(main())
