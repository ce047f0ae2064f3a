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
warm-up (rings filling up) the slope stays near 0. Uses little CPU (the client about 5%
of a core); run it niced on a shared machine.
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

from tunnel.core.handshake import generate_keypair  # noqa: E402
from tunnel.impair.thread import RelayThread, run_relay_in_thread  # noqa: E402
from tunnel.keys import encode_key, write_private_key, write_public_key  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Sample:
    elapsed_s: float
    rss_mib: float
    cpu_s: float
    flaps: int
    switches: int
    state: str


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
        'inner_echo = true\n[state]\nstore = "memory"\n[tun]\nsubnet = "10.66.0.0/24"\n'
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


def flap_loop(
    args: argparse.Namespace,
    client: subprocess.Popen[str],
    reader: EventReader,
    relays: dict[int, RelayThread],
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
    print(f"{'elapsed':>8} {'RSS MiB':>8} {'CPU %':>6} {'flaps':>6} {'switches':>8}  state")
    while time.monotonic() < end and client.poll() is None:
        now = time.monotonic()
        if now >= next_sample:
            rss, cpu = rss_and_cpu(client.pid)
            with reader.lock:
                switches, state = reader.counts["TRANSPORT_SWITCH"], reader.state
            prev = samples[-1] if samples else None
            cpu_pct = 100 * (cpu - prev.cpu_s) / (now - start - prev.elapsed_s) if prev else 0.0
            samples.append(Sample(now - start, rss, cpu, flaps, switches, state))
            print(f"{now - start:>7.0f}s {rss:>8.2f} {cpu_pct:>6.1f} {flaps:>6} {switches:>8}  "
                  f"{state}", flush=True)  # fmt: skip
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--minutes", type=float, default=30.0, help="soak length (30)")
    parser.add_argument("--period", type=float, default=20.0, help="seconds between flaps (20)")
    parser.add_argument("--down", type=float, default=5.0, help="seconds a flap lasts (5)")
    parser.add_argument("--sample", type=float, default=30.0, help="seconds between samples")
    parser.add_argument(
        "--warmup", type=float, default=900.0,
        help="seconds left out of the slope (900: the bounded rings fill, e.g. the UI "
        "channel's 256 session events at about 8 a flap)",
    )  # fmt: skip
    args = parser.parse_args(argv)
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
                client = subprocess.Popen(
                    [sys.executable, "-m", "tunnel.client.headless", "--config",
                     str(client_config)],
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO,
                )  # fmt: skip
                assert client.stdout is not None
                reader = EventReader(client.stdout)
                try:
                    samples = flap_loop(args, client, reader, relays)
                finally:
                    if client.poll() is None:
                        client.send_signal(signal.SIGTERM)
                    code = client.wait(15)
        finally:
            gateway.send_signal(signal.SIGTERM)
            gateway.wait(15)
    print(f"load after: {loadavg()}")
    if samples:
        report(samples, args, code)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
