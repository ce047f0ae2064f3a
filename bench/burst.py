"""Burst arrival with lean drivers: N clients start their handshakes at one instant.

The driver of ``bench/scale.py`` runs a full ``ClientSession`` per client in one Python
process; at 10,000 clients that process, not the gateway, was the bottleneck. Here each
client is only what a handshake needs: a ``HandshakeInitiator`` (the client core's own
INIT, retries with backoff, cookies, the answer to any of its INITs) and a UDP socket bound
to its own loopback address (127.x.y.z: the gateway's per-source budget sees N hosts).
``--drivers`` processes (default: one per core but the gateway's, at least one) take N/k
clients each. Every first INIT is built
before the common start instant (the DH is paid
before the clock starts, as N machines would have done it each on its own CPU); retries,
cookie resends and reading the answers are paid during the burst. Each driver reports the
instant each of its clients attached (CLOCK_MONOTONIC is one clock for all processes) and
its own CPU time.

``run_burst`` is what ``bench/scale.py`` calls; ``python bench/burst.py -n 10000`` runs a
gateway (``scale.py serve``) and the burst alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import os
import random
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
START_DELAY_S = 2.0
"""The drivers start together this long after they were started, plus their preparation."""
TIMERS_PER_TURN = 64
"""Retries (each a new INIT: a DH) sent before the sockets are read again."""
PREP_S = 0.004
"""Preparation time allowed per client of a driver (its socket and first INIT: a DH)."""


def burst_policy(window_s: float) -> Any:
    """The default policy with a connect deadline of the burst window and 20 attempts."""
    from tunnel.core.policy import POLICY_DEFAULT

    return dataclasses.replace(
        POLICY_DEFAULT, handshake_timeout_ms=int(window_s * 1000), handshake_attempts=20
    )


def drive(
    seed: bytes,
    port: int,
    gw_pub: bytes,
    first: int,
    last: int,
    window: float,
    start_at: float,
) -> int:
    """One driver process: clients ``first`` ..
    ``last - 1``; builds their first INITs, sends them at ``start_at`` (CLOCK_MONOTONIC),
    runs the burst, prints one JSON line of results."""
    from scale import host_of, key_of  # type: ignore[import-not-found]

    from tunnel.core.constants import MSG_COOKIE_REPLY, MSG_HANDSHAKE_RESP
    from tunnel.core.initiator import Accepted, HandshakeInitiator

    policy = burst_policy(window)
    sel = selectors.DefaultSelector()
    clients: dict[int, tuple[HandshakeInitiator, socket.socket]] = {}
    firsts: dict[int, bytes] = {}
    rng = random.Random(first)
    ts0 = int(time.time() * 1000) + int((start_at - time.monotonic()) * 1000)
    for i in range(first, last):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((host_of(i), 0))
        sock.setblocking(False)
        sock.connect(("127.0.0.1", port))
        hi = HandshakeInitiator(key_of(seed, i), gw_pub, rng.getrandbits(32) | 1, [0], rng=rng)
        firsts[i] = hi.start(start_at, policy, ts0)[1]  # the DH before the clock starts
        clients[i] = (hi, sock)
        sel.register(sock, selectors.EVENT_READ, i)
    late = max(0.0, time.monotonic() - start_at)
    cpu0 = time.process_time()
    time.sleep(max(0.0, start_at - time.monotonic()))
    for i, data in firsts.items():
        _send(clients[i][1], data)
    timers = [(hi.next_deadline() or start_at, i) for i, (hi, _s) in clients.items()]
    heapq.heapify(timers)
    attached: dict[int, float] = {}
    counts: dict[int, int] = {}
    """Datagrams received, by message type."""
    failed = 0
    while clients and time.monotonic() < start_at + late + window + 1.0:
        wait = max(0.0, min(0.05, timers[0][0] - time.monotonic())) if timers else 0.05
        for key, _ev in sel.select(wait):
            now = time.monotonic()
            i = key.data
            hi, sock = clients[i]
            for _ in range(8):
                try:
                    data = sock.recv(2048)
                except (BlockingIOError, ConnectionRefusedError):
                    break
                receiver = int.from_bytes(data[4:8], "little") if len(data) >= 8 else 0
                counts[data[0]] = counts.get(data[0], 0) + 1
                if data[:1] == bytes((MSG_COOKIE_REPLY,)):
                    again = hi.on_cookie_reply(data, receiver, now)
                    if isinstance(again, bytes):
                        _send(sock, again)
                elif data[:1] == bytes((MSG_HANDSHAKE_RESP,)):
                    if isinstance(hi.on_response(data, receiver), Accepted):
                        attached[i] = now - start_at
                        break
            if i in attached:
                sel.unregister(sock)
                sock.close()
                del clients[i]
        now = time.monotonic()
        for _ in range(TIMERS_PER_TURN):
            if not timers or timers[0][0] > now:
                break
            _at, i = heapq.heappop(timers)
            if i not in clients:
                continue
            hi, sock = clients[i]
            if hi.expired(now):
                failed += 1
                sel.unregister(sock)
                sock.close()
                del clients[i]
                continue
            ts = ts0 + int((now - start_at) * 1000)
            out = hi.on_timer(now, policy, ts)
            if out is not None:
                _send(sock, out[1])
            deadline = hi.next_deadline()
            if deadline is not None:
                heapq.heappush(timers, (deadline, i))
    for _hi, sock in clients.values():
        sock.close()
    result = {
        "attached": sorted(attached.values()),
        "failed": failed,
        "cpu_s": time.process_time() - cpu0,
        "late_s": late,
        "received": counts,
    }
    print(json.dumps(result), flush=True)
    return 0


def _send(sock: socket.socket, data: bytes) -> None:
    try:
        sock.send(data)
    except OSError:
        pass  # a full loopback queue: a lost datagram, as on a network


@dataclasses.dataclass
class BurstResult:
    n: int
    drivers: int
    attached: list[float]
    """Seconds after the start at which each attached client had its session."""
    failed: int
    driver_cpu_s: float
    gateway_cpu_s: float
    wall_s: float
    load: tuple[float, float]
    """Load average (1 min) at the start and at the end."""
    late_s: float = 0.0
    """How late the slowest driver was ready (its first INITs left that much late)."""

    def rows(self, window: float) -> list[tuple[str, str]]:
        a = self.attached
        rows = [
            (
                f"burst: attached within {window:.0f} s ({self.drivers} lean driver processes)",
                f"{len(a)} / {self.n}",
            ),
        ]
        marks = [t for t in (1, 2, 5, 10, 15, 20, 30, 45, 60) if t <= window]
        rows.append(
            (
                "burst: attached after " + ", ".join(f"{t} s" for t in marks),
                ", ".join(str(sum(1 for x in a if x <= t)) for t in marks),
            ),
        )
        if a:
            rows.append(("burst: last attach after", f"{a[-1]:.1f} s"))
            rows.append(
                (
                    "burst: handshake rate (attached / last attach)",
                    f"{len(a) / max(a[-1], 1e-3):.0f}/s",
                )
            )
        rows.append(
            (
                "burst: gateway CPU",
                f"{self.gateway_cpu_s:.1f} s over {self.wall_s:.1f} s "
                f"({100 * self.gateway_cpu_s / max(self.wall_s, 1e-3):.0f} % of a core)",
            )
        )
        rows.append(("burst: driver CPU (all drivers)", f"{self.driver_cpu_s:.1f} s"))
        rows.append(
            ("burst: clients at their connect deadline without a session", str(self.failed))
        )
        if self.late_s:
            rows.append(("burst: a driver was ready late by", f"{self.late_s:.1f} s"))
        rows.append(
            ("burst: load average (1 min) start / end", f"{self.load[0]:.2f} / {self.load[1]:.2f}")
        )
        return rows


def run_burst(
    n: int,
    seed: bytes,
    port: int,
    gw_pub: bytes,
    gw_pid: int,
    window: float,
    drivers: int = 0,
) -> BurstResult:
    """All N clients at once through ``drivers`` lean driver processes (0: one per core
    but one, at least one)."""
    from scale import cpu_s  # type: ignore[import-not-found]

    k = drivers or max(1, (os.cpu_count() or 2) - 1)
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", str(HERE.parent))]),
    )
    start_at = time.monotonic() + START_DELAY_S + PREP_S * n / k
    procs = []
    for j in range(k):
        first, last = n * j // k, n * (j + 1) // k
        cmd = [
            sys.executable,
            str(HERE / "burst.py"),
            "drive",
            "--seed",
            seed.hex(),
            "--port",
            str(port),
            "--gw-pub",
            gw_pub.hex(),
            "--first",
            str(first),
            "--last",
            str(last),
            "--window",
            str(window),
            "--start-at",
            str(start_at),
        ]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env))
    load0 = os.getloadavg()[0]
    time.sleep(max(0.0, start_at - time.monotonic()))
    c0 = cpu_s(gw_pid)
    attached: list[float] = []
    failed, driver_cpu, late = 0, 0.0, 0.0
    for p in procs:
        assert p.stdout is not None
        line = p.stdout.readline()
        p.wait()
        r = json.loads(line)
        attached += r["attached"]
        failed += r["failed"]
        driver_cpu += r["cpu_s"]
        late = max(late, r["late_s"])
    wall = time.monotonic() - start_at
    return BurstResult(
        n,
        k,
        sorted(attached),
        failed,
        driver_cpu,
        cpu_s(gw_pid) - c0,
        wall,
        (load0, os.getloadavg()[0]),
        late,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", default="run", choices=["run", "drive"])
    parser.add_argument("-n", type=int, default=10_000)
    parser.add_argument("--window", type=float, default=60.0, help="burst window (s)")
    parser.add_argument("--drivers", type=int, default=0, help="0: one per core but one")
    parser.add_argument("--seed", default="")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--gw-pub", default="")
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--last", type=int, default=0)
    parser.add_argument("--start-at", type=float, default=0.0)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    if args.mode == "drive":
        return drive(
            bytes.fromhex(args.seed),
            args.port,
            bytes.fromhex(args.gw_pub),
            args.first,
            args.last,
            args.window,
            args.start_at,
        )
    import resource

    from scale import key_of, machine_facts, start_gateway  # type: ignore[import-not-found]

    from tunnel.core.handshake import public_key

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    seed = os.urandom(8)
    proc, port = start_gateway(args.n, seed, 0.0, os.environ.get("PYTHONPATH", str(HERE.parent)))
    try:
        time.sleep(0.5)
        r = run_burst(
            args.n,
            seed,
            port,
            public_key(key_of(seed, 1 << 31)),
            proc.pid,
            args.window,
            args.drivers,
        )
    finally:
        proc.terminate()
        proc.wait()
    print(f"\nbench/burst.py -n {args.n}  ({time.strftime('%Y-%m-%d')})\n{machine_facts()}")
    print("\n| measurement | value |\n|---|---|")
    for name, value in r.rows(args.window):
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
