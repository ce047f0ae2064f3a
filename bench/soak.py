#!/usr/bin/env python3
"""Flapping soak: the client's memory (RSS) over a long run whose paths keep dying.

The real programs on loopback, no root: ``jvpn-gateway`` with ``inner_echo = true`` (no
TUN) and ``jvpn-tui --headless`` with the ``memory`` inner side (20 ICMP echo requests a
second through the tunnel), two paths, each through its own impairment relay in this
process. Every ``--period`` seconds the relay of the *active* path blackholes it both ways
for ``--down`` seconds: the client declares it dead, switches to the other path
(TRANSPORT_SWITCH), and the dead one comes back as a standby. Every ``--sample`` seconds
the client's RSS (``VmRSS``) and CPU time are read from /proc. Prints one row per sample,
then the RSS slope (least squares over the samples after ``--warmup`` seconds) in
MiB/hour, the first and last RSS, flaps, switches and the client's exit status.

    nice .venv/bin/python bench/soak.py                  # 30 minutes
    nice .venv/bin/python bench/soak.py --minutes 10 --sample 30

A flat line is the goal: every structure the flapping grows is bounded, so after the
warm-up (rings filling up) the slope stays near 0. The last line is the verdict: FLAT when
the slope after the warm-up (and after the session-event history is full) is within
+-0.1 MiB/hour and the RSS within 0.25 MiB. Uses little CPU (the client about 5% of a
core); run it niced on a shared machine.

Finding what grows: ``--smaps N`` splits the resident memory by kind of mapping (malloc
heap, thread arenas, pymalloc's 1 MiB arenas, files); ``--trace-objects 0`` runs the
client under ``bench/soak_probe.py`` (pymalloc's blocks per size class, CPython's tuple
free lists, gc object counts; ``SOAK_PROBE_LEAVES=1`` also counts the str/int/float/bytes
values that gc does not track, by holder; ``SOAK_PROBE_COLLECT=1`` forces a full collection
before each sample), ``--trace-objects 10`` adds tracemalloc's top growth by traceback.
Faster flapping (``--period 5 --down 2.5``) shows in minutes what takes an hour.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(Path(__file__).resolve().parent)]

from throughput import loadavg, machine_facts  # noqa: E402

from tunnel.api import HISTORY_SIZE, SESSION_EVENT_TYPES  # noqa: E402
from tunnel.core.handshake import generate_keypair  # noqa: E402
from tunnel.impair.thread import RelayThread, run_relay_in_thread  # noqa: E402
from tunnel.keys import encode_key, write_private_key, write_public_key  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")
FLAT_SLOPE = 0.1
"""MiB/hour: the RSS slope after the warm-up that counts as flat (issue 12: 30 minutes)."""
FLAT_RANGE = 0.25
"""MiB: the most the RSS may vary after the warm-up and still count as flat (the engine's
full collection every minute and key rotations make small steps)."""
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Mapping:
    """One line of /proc/PID/smaps: address range, permissions, name, resident KiB."""

    start: int
    size_kib: int
    perms: str
    name: str
    rss_kib: int

    @property
    def kind(self) -> str:
        """What an anonymous mapping most likely is, from its size and neighbours."""
        if self.name:
            return self.name if self.name.startswith("[") else "file"
        if self.size_kib == 8188:
            return "thread stack"
        if self.start % (64 * 2**20) == 0 and self.size_kib <= 65536:
            return "malloc thread arena"
        return "anon"


def read_smaps(pid: int) -> list[Mapping]:
    """The process's mappings with their resident size (KiB)."""
    maps: list[Mapping] = []
    head: list[str] = []
    with open(f"/proc/{pid}/smaps") as fh:
        for line in fh:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):
                head = line.split(maxsplit=5)
            elif first == "Rss:":
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                name = head[5].strip() if len(head) > 5 else ""
                maps.append(Mapping(lo, (hi - lo) // 1024, head[1], name, int(line.split()[1])))
    return maps


def smaps_by_kind(maps: Sequence[Mapping]) -> Counter[str]:
    kinds: Counter[str] = Counter()
    for m in maps:
        kinds[m.kind] += m.rss_kib
    return kinds


def print_smaps_diff(before: Sequence[Mapping], after: Sequence[Mapping], top: int) -> None:
    """Resident KiB per kind of mapping, then the mappings whose RSS changed most."""
    kb, ka = smaps_by_kind(before), smaps_by_kind(after)
    print("\nresident KiB by kind of mapping (first steady sample -> end):")
    for kind in sorted(set(kb) | set(ka), key=lambda k: -abs(ka[k] - kb[k])):
        print(f"  {kind:<22} {kb[kind]:>8} -> {ka[kind]:>8}  ({ka[kind] - kb[kind]:+d})")
    old = {(m.start, m.perms): m for m in before}
    rows = []
    for m in after:
        prev = old.pop((m.start, m.perms), None)
        rows.append((m.rss_kib - (prev.rss_kib if prev else 0), m, prev))
    rows += [(-m.rss_kib, m, m) for m in old.values()]  # unmapped since
    rows.sort(key=lambda r: -abs(r[0]))
    print(f"mappings whose RSS changed most (top {top}):")
    for delta, m, prev in rows[:top]:
        status = "new" if prev is None else ("gone" if prev is m else "")
        print(f"  {m.start:012x} {m.size_kib:>7} KiB {m.perms} {m.kind:<20} "
              f"rss {prev.rss_kib if prev else 0:>6} -> {m.rss_kib if prev is not m else 0:>6} "
              f"({delta:+d}) {status} {m.name}")  # fmt: skip


@dataclass
class Sample:
    elapsed_s: float
    rss_mib: float
    cpu_s: float
    flaps: int
    switches: int
    state: str
    anon_kib: int = 0
    threads: int = 0
    session_events: int = 0


class EventReader:
    """Reads the client's JSON lines: counts event types, follows the active path."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.counts: Counter[str] = Counter()
        self.active: int | None = None
        self.state = "?"
        self.last: dict[str, Any] | None = None
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for line in self.stream:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            kind = event.get("event_type", "?")
            with self.lock:
                self.counts[kind] += 1
                self.last = event
                if kind in ("TRANSPORT_ATTACHED", "TRANSPORT_SWITCH"):
                    self.active = event.get("transport_id", event.get("new_transport"))
                elif kind == "STATE_CHANGE":
                    self.state = str(event.get("new_state"))


def rss_and_cpu(pid: int) -> tuple[float, float]:
    """(RSS in MiB, user+system CPU seconds) of a process, from /proc."""
    with open(f"/proc/{pid}/statm") as fh:
        rss_pages = int(fh.read().split()[1])
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / TICKS
    return rss_pages * PAGE / 2**20, cpu


def thread_count(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("Threads:"))


def slope_per_hour(samples: Sequence[Sample]) -> float:
    """Least-squares slope of RSS over time, MiB per hour (0 with fewer than 2 samples)."""
    if len(samples) < 2:
        return 0.0
    xs = [s.elapsed_s / 3600 for s in samples]
    ys = [s.rss_mib for s in samples]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0


def write_configs(work: Path) -> tuple[Path, Path]:
    """gateway.toml (inner_echo, one client) and client.toml without paths yet."""
    gw_private, gw_public = generate_keypair()
    cl_private, cl_public = generate_keypair()
    write_private_key(work / "gateway.key", gw_private)
    write_public_key(work / "client.pub", cl_public)
    gateway = work / "gateway.toml"
    gateway.write_text(
        'node_id = "soak-gw"\nlisten = ["127.0.0.1:0"]\nprivate_key = "gateway.key"\n'
        'inner_echo = true\nworkers = 1\n[state]\nstore = "memory"\n'
        '[tun]\nsubnet = "10.66.0.0/24"\n'
        '[[clients]]\nname = "soak"\npublic_key = "client.pub"\n'
        f'[control]\nsocket = "{work / "gateway.sock"}"\n'  # never the host's default socket
    )
    client = work / "client.toml"
    client.write_text(
        f'private_key = "{encode_key(cl_private)}"\n'
        f'gateway_public_key = "{encode_key(gw_public)}"\n'
        f'control_socket = "{work / "client.sock"}"\n'
        '[inner]\nkind = "memory"\nrate_pps = 20\n'
    )
    return gateway, client


def start_gateway(config: Path) -> tuple[subprocess.Popen[str], tuple[str, int]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunnel.gateway.main", "--config", str(config)],
        stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    assert proc.stderr is not None
    for _ in range(20):
        line = proc.stderr.readline()
        if "listening on" in line:
            where = line.split("listening on ", 1)[1].split(",", 1)[0]
            host, port = where.rsplit(":", 1)
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep it drained
            return proc, (host, int(port))
    proc.kill()
    raise SystemExit(f"the gateway did not start: {line.strip()}")


def take_sample(
    pid: int,
    reader: EventReader,
    elapsed: float,
    flaps: int,
    maps: Sequence[Mapping],
    samples: Sequence[Sample],
) -> Sample:
    """Read the client's RSS, CPU, threads and event counts; print the table row."""
    rss, cpu = rss_and_cpu(pid)
    with reader.lock:
        switches, state = reader.counts["TRANSPORT_SWITCH"], reader.state
        history = sum(reader.counts[str(t)] for t in SESSION_EVENT_TYPES)
    prev = samples[-1] if samples else None
    cpu_pct = 100 * (cpu - prev.cpu_s) / (elapsed - prev.elapsed_s) if prev else 0.0
    anon = sum(m.rss_kib for m in maps if m.kind != "file")
    threads = thread_count(pid)
    print(f"{elapsed:>7.0f}s {rss:>8.2f} {cpu_pct:>6.1f} {flaps:>6} {switches:>8} "
          f"{anon:>8} {threads:>4}  {state}", flush=True)  # fmt: skip
    return Sample(elapsed, rss, cpu, flaps, switches, state, anon, threads, history)


def flap_loop(
    args: argparse.Namespace,
    client: subprocess.Popen[str],
    reader: EventReader,
    relays: dict[int, RelayThread],
    smaps: list[list[Mapping]],
) -> list[Sample]:
    for _ in range(300):  # the session first (bounded: 60 s), then the clock starts
        with reader.lock:
            if reader.active is not None or client.poll() is not None:
                break
        time.sleep(0.2)
    start = time.monotonic()
    end = start + args.minutes * 60
    next_flap = start + args.period
    next_sample = start
    samples: list[Sample] = []
    flaps = 0
    print(f"{'elapsed':>8} {'RSS MiB':>8} {'CPU %':>6} {'flaps':>6} {'switches':>8} "
          f"{'anon KiB':>8} {'thr':>4}  state")  # fmt: skip
    while time.monotonic() < end and client.poll() is None:
        now = time.monotonic()
        if now >= next_sample:
            maps = read_smaps(client.pid)
            samples.append(take_sample(client.pid, reader, now - start, flaps, maps, samples))
            if now - start >= args.warmup and not smaps:
                smaps.append(maps)
            smaps[1:] = [maps] if smaps else []
            next_sample += args.sample
        if now >= next_flap:
            with reader.lock:
                active = reader.active
            relay = relays.get(active or 1, relays[1])
            relay.set("both", blackhole=True)
            time.sleep(args.down)
            relay.set("both", blackhole=False)
            flaps += 1
            next_flap += args.period
        time.sleep(0.2)
    return samples


def report(samples: list[Sample], args: argparse.Namespace, code: int | None) -> None:
    full = next((s for s in samples if s.session_events >= HISTORY_SIZE), None)
    settled = max(args.warmup, full.elapsed_s if full else 0.0)
    steady = [s for s in samples if s.elapsed_s >= args.warmup]
    first, last = samples[0], samples[-1]
    print()
    print(f"RSS {first.rss_mib:.2f} -> {last.rss_mib:.2f} MiB over {last.elapsed_s / 60:.1f} min; "
          f"flaps {last.flaps}, switches {last.switches}")  # fmt: skip
    half = [s for s in samples if s.elapsed_s >= last.elapsed_s / 2]
    steady_slope, all_slope = slope_per_hour(steady), slope_per_hour(samples)
    print(
        f"slope after the {args.warmup:.0f} s warm-up: {steady_slope:+.3f} MiB/hour "
        f"({len(steady)} samples); second half: {slope_per_hour(half):+.3f} MiB/hour; "
        f"all samples: {all_slope:+.3f} MiB/hour"
    )
    cpu_pct = 100 * (last.cpu_s - first.cpu_s) / max(1e-9, last.elapsed_s - first.elapsed_s)
    print(f"client CPU {cpu_pct:.1f}% of a core on average; client exit status {code}")
    print(f"session events {last.session_events}; the UI channel's and control socket's "
          f"history ({HISTORY_SIZE}) was full "
          f"{f'at {full.elapsed_s:.0f} s' if full else 'not yet'}")  # fmt: skip
    print(verdict([s for s in samples if s.elapsed_s >= settled], settled))


def verdict(steady: Sequence[Sample], warmup: float) -> str:
    """FLAT when, after the warm-up (``--warmup``, or later if the session-event history
    was not full yet: that ring is the last bounded structure to fill), the RSS slope is
    within +-FLAT_SLOPE and its range within FLAT_RANGE (at least 10 samples), else
    GROWING or TOO SHORT."""
    if len(steady) < 10:
        return f"verdict: TOO SHORT ({len(steady)} samples after the {warmup:.0f} s warm-up)"
    slope = slope_per_hour(steady)
    span = max(s.rss_mib for s in steady) - min(s.rss_mib for s in steady)
    flat = abs(slope) <= FLAT_SLOPE and span <= FLAT_RANGE
    return (
        f"verdict: {'FLAT' if flat else 'GROWING'} (after the {warmup:.0f} s warm-up: slope "
        f"{slope:+.3f} MiB/hour, limit +-{FLAT_SLOPE}; max-min {span:.2f} MiB, limit "
        f"{FLAT_RANGE})"
    )


def print_class_changes(first: dict[str, Any], last: dict[str, Any]) -> None:
    """pymalloc's size classes whose pools or blocks changed between two probe lines."""
    old = {int(k): v for k, v in first.get("classes", {}).items()}
    moved = [(int(k), old.get(int(k), [0, 0]), v) for k, v in last.get("classes", {}).items()]
    moved = [m for m in moved if m[1] != m[2]]
    moved.sort(key=lambda m: -abs(m[2][0] - m[1][0]))
    print(f"pymalloc size classes whose pools changed most, t={first['t']} -> {last['t']} s "
          "(block size: pools, blocks in use):")  # fmt: skip
    for size, (p0, b0), (p1, b1) in moved[:10]:
        print(f"  {size:>4} B: pools {p0} -> {p1} ({p1 - p0:+d}), blocks {b0} -> {b1} "
              f"({b1 - b0:+d})")  # fmt: skip


def print_probe(path: Path, warmup: float) -> None:
    """The probe's lines: blocks, traced bytes, objects over time; the last line's diffs."""
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    if not lines:
        return
    keys = ["blocks", "objects", "arenas", "used", "free_blocks", "tuple_freelist_bytes"]
    keys += ["traced"] if "traced" in lines[-1] else []
    print("\nprobe (in the client, pymalloc and gc; bytes):")
    print(f"  {'t':>6} " + " ".join(f"{k:>11}" for k in keys))
    for line in lines[:: max(1, len(lines) // 12)] + lines[-1:]:
        print(f"  {line['t']:>5}s " + " ".join(f"{line.get(k, -1):>11}" for k in keys))
    last = lines[-1]
    print_class_changes(next((x for x in lines if x["t"] >= warmup), lines[0]), last)
    print("object types whose count changed most since the warm-up:", last.get("types"))
    for row in last.get("top", []):
        print(f"  {row['size']:>+9} B {row['count']:>+6}  {' <- '.join(reversed(row['where']))}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--minutes", type=float, default=30.0, help="soak length (30)")
    parser.add_argument("--period", type=float, default=20.0, help="seconds between flaps (20)")
    parser.add_argument("--down", type=float, default=5.0, help="seconds a flap lasts (5)")
    parser.add_argument("--sample", type=float, default=30.0, help="seconds between samples")
    parser.add_argument(
        "--warmup", type=float, default=600.0,
        help="seconds left out of the slope and the verdict (600: the last 20 minutes of "
        "30 count; bounded structures fill meanwhile, e.g. the first key rotation, RTT and "
        "loss windows, most of the 256 session events of the UI channel's history)",
    )  # fmt: skip
    parser.add_argument(
        "--smaps", type=int, default=0, metavar="N",
        help="after the table: the client's resident memory by kind of mapping (heap, "
        "thread stacks, malloc arenas, other anonymous, files) at the first sample after "
        "the warm-up and at the end, and the N mappings whose RSS changed most",
    )  # fmt: skip
    parser.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE",
        help="an environment variable for the client (A/B runs: MALLOC_ARENA_MAX=1, "
        "PYTHONMALLOC=malloc, ...); repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--trace-objects", type=int, nargs="?", const=10, metavar="FRAMES",
        help="run the client under bench/soak_probe.py: pymalloc's arenas, pools and "
        "blocks, gc object counts by type every --sample s (baseline at --warmup), and with "
        "FRAMES > 0 (10 if not given) tracemalloc's top growth by traceback; prints them",
    )  # fmt: skip
    args = parser.parse_args(argv)
    smaps: list[list[Mapping]] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up as after Ctrl-C
    print(machine_facts())
    print(f"load before: {loadavg()}; {args.minutes:g} min, a flap every {args.period:g} s "
          f"for {args.down:g} s, a sample every {args.sample:g} s")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="jvpn-soak-") as tmp:
        work = Path(tmp)
        gw_config, client_config = write_configs(work)
        gateway, gw_address = start_gateway(gw_config)
        try:
            with (
                run_relay_in_thread(upstream=gw_address, seed=1) as r1,
                run_relay_in_thread(upstream=gw_address, seed=2) as r2,
            ):
                relays = {1: r1, 2: r2}
                with client_config.open("a") as fh:
                    for pid, relay in relays.items():
                        host, port = relay.bound_address[:2]
                        fh.write(f'[[path]]\nname = "lo{pid}"\ngateway = "{host}:{port}"\n'
                                 'bind = "127.0.0.1"\n')  # fmt: skip
                probe = work / "probe.jsonl"
                wrap = [str(REPO / "bench" / "soak_probe.py"), str(probe), str(args.sample),
                        str(args.warmup), str(args.trace_objects)]  # fmt: skip
                wrap = wrap if args.trace_objects is not None else []
                client = subprocess.Popen(
                    [sys.executable, *wrap, "-m", "tunnel.client.headless", "--config",
                     str(client_config)],
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO,
                    env={**os.environ, **dict(kv.split("=", 1) for kv in args.env)},
                )  # fmt: skip
                assert client.stdout is not None
                reader = EventReader(client.stdout)
                try:
                    samples = flap_loop(args, client, reader, relays, smaps)
                finally:
                    if client.poll() is None:
                        client.send_signal(signal.SIGTERM)
                    code = client.wait(15)
                if args.trace_objects is not None and probe.exists():
                    print_probe(probe, args.warmup)
        finally:
            gateway.send_signal(signal.SIGTERM)
            gateway.wait(15)
    print(f"load after: {loadavg()}")
    if samples:
        report(samples, args, code)
    if args.smaps and len(smaps) == 2:
        print_smaps_diff(smaps[0], smaps[1], args.smaps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
