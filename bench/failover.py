#!/usr/bin/env python3
"""Failover stall through a real jvpn tunnel: N path kills under a running inner flow.

Same rig as bench/throughput.py (client and gateway namespaces, two veth paths with a
1500-byte MTU, ``jvpn-gateway`` and ``jvpn-tui --headless`` with real TUNs, default
policy unless ``--policy`` is given). Two inner UDP flows run for the whole bench, one
each way (``--rate`` packets/s, sequence-numbered). Every ``--period`` seconds the link
of the *active* path goes down (its client-side veth), stays down ``--down`` seconds,
and comes back. Per kill it measures, at the receivers:

* **stall**: the longest gap between two delivered packets around the kill
  (receiver-side; at 1000 packets/s the resolution is about 1 ms);
* **lost**: packets sent around the kill that never arrived;

and from the client's TRANSPORT_SWITCH event: the new path, the reason and
``switch_latency_ms`` (death detection to committed binding), plus the time from the
link going down to the event being printed (includes the headless 50 ms drain tick).
Prints one row per kill and min / median / p95 / max. With the default 8 kills at a 10 s
period it finishes in about 2 minutes. The default policy allows 8 switches a minute;
a shorter ``--period`` makes the limit show up as TRANSPORT_SWITCH_DENIED.

    sudo .venv/bin/python bench/failover.py
    sudo .venv/bin/python bench/failover.py -n 20 --period 8 --policy fast.toml

Needs root, iproute2 and /dev/net/tun; exits 0 with a message when it cannot run.
"""

from __future__ import annotations

import argparse
import array
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import itertools

from throughput import (
    INNER_CLIENT,
    INNER_GATEWAY,
    TunnelRig,
    cannot_run,
    loadavg,
    machine_facts,
)

UP_PORT = 9101
"""client -> gateway flow."""
DOWN_PORT = 9102
"""gateway -> client flow."""

SENDER = r"""
import select, socket, struct, sys, time
dst, port, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
pad = b"\xa5" * 92
seq, errors, t0 = 0, 0, time.monotonic()
print("ready", flush=True)
while True:
    now = time.monotonic()
    due = int((now - t0) * rate) + 1
    while seq < due:
        try:
            s.sendto(struct.pack("!Qd", seq, now) + pad, (dst, port))
        except OSError:
            errors += 1  # the route or the queue refused it: it counts as lost
        seq += 1
    if select.select([sys.stdin], [], [], 0.001)[0]:
        break
print(seq, errors, flush=True)
"""
"""Sends ``rate`` datagrams/s (seq:u64, send time:f64, padding) until stdin has input."""

RECEIVER = r"""
import array, select, socket, struct, sys, time
host, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
s.bind((host, port))
s.setblocking(False)
seqs, times = array.array("q"), array.array("d")
print("ready", flush=True)
while True:
    ready = select.select([s, sys.stdin], [], [], 1.0)[0]
    if s in ready:
        while True:
            try:
                data = s.recv(2048)
            except BlockingIOError:
                break
            seqs.append(struct.unpack_from("!Q", data)[0])
            times.append(time.monotonic())
    if sys.stdin in ready:
        break
with open(out, "wb") as fh:
    array.array("q", [len(seqs)]).tofile(fh)
    seqs.tofile(fh)
    times.tofile(fh)
print("done", len(seqs), flush=True)
"""
"""Records (seq, arrival time) of every datagram on host:port; dumps them to a file when
stdin has input."""


@dataclass
class Flow:
    name: str
    sender: subprocess.Popen[bytes]
    receiver: subprocess.Popen[bytes]
    out: Path
    seqs: array.array[int] | None = None
    times: array.array[float] | None = None
    sent: int = 0

    def finish(self) -> None:
        for proc in (self.sender, self.receiver):
            assert proc.stdin is not None
            proc.stdin.write(b"stop\n")
            proc.stdin.flush()
        sent_line = _line(self.sender, 10.0)
        self.sent = int(sent_line.split()[0]) if sent_line else 0
        _line(self.receiver, 20.0)  # "done N"
        with open(self.out, "rb") as fh:
            count = array.array("q")
            count.fromfile(fh, 1)
            self.seqs = array.array("q")
            self.seqs.fromfile(fh, count[0])
            self.times = array.array("d")
            self.times.fromfile(fh, count[0])

    def stall_and_loss(self, t_from: float, t_to: float) -> tuple[float | None, int]:
        """Longest delivery gap overlapping [t_from, t_to] and the datagrams lost there."""
        assert self.seqs is not None and self.times is not None
        times, seqs = self.times, self.seqs
        before = [i for i in range(len(times)) if times[i] < t_from]
        inside = [i for i in range(len(times)) if t_from <= times[i] <= t_to]
        if not inside:
            return None, 0
        idx = ([before[-1]] if before else []) + inside
        gap = max((times[b] - times[a] for a, b in itertools.pairwise(idx)), default=0.0)
        got = {seqs[i] for i in idx}
        lo, hi = min(got), max(got)
        return gap, (hi - lo + 1) - len(got)


def _line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    from netns import read_line

    try:
        return read_line(proc, timeout)
    except (TimeoutError, EOFError):
        return ""


def start_flow(rig: TunnelRig, name: str, up: bool, rate: float) -> Flow:
    topo = rig.topo
    tx_ns, rx_ns = (topo.client_ns, topo.gateway_ns) if up else (topo.gateway_ns, topo.client_ns)
    host, port = (INNER_GATEWAY, UP_PORT) if up else (INNER_CLIENT, DOWN_PORT)
    out = rig.workdir / f"{name}.bin"
    receiver = topo.python(rx_ns, RECEIVER, host, str(port), str(out))
    if _line(receiver, 10.0) != "ready":
        raise RuntimeError(f"{name} receiver did not start")
    sender = topo.python(tx_ns, SENDER, host, str(port), str(rate))
    if _line(sender, 10.0) != "ready":
        raise RuntimeError(f"{name} sender did not start")
    return Flow(name, sender, receiver, out)


@dataclass
class Kill:
    index: int
    path: int
    t_down: float
    t_up: float
    switch: dict[str, Any] | None
    t_event: float | None
    denied: int


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))
    return ordered[k]


def summary(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return (
        f"min {min(values):7.0f}  median {statistics.median(values):7.0f}  "
        f"p95 {percentile(values, 0.95):7.0f}  max {max(values):7.0f}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--kills", type=int, default=8, help="path kills (default 8)")
    parser.add_argument("--period", type=float, default=10.0, help="seconds between kills")
    parser.add_argument("--down", type=float, default=3.0, help="seconds a killed link stays down")
    parser.add_argument("--rate", type=float, default=1000.0, help="inner packets/s each way")
    parser.add_argument("--policy", type=Path, default=None, help="policy file for both ends")
    args = parser.parse_args(argv)
    if args.down >= args.period - 1:
        parser.error("--down must leave at least 1 s of --period for the path to come back")

    reason = cannot_run()
    if reason:
        print(f"failover: skipped: {reason}")
        return 0
    policy = args.policy.read_text() if args.policy else None
    print(f"failover: {machine_facts()}")
    print(f"load before: {loadavg()}; {args.kills} kills every {args.period:.0f} s, link down "
          f"{args.down:.0f} s; inner UDP {args.rate:.0f} pkt/s each way; policy "
          f"{args.policy or 'default'}")  # fmt: skip
    kills: list[Kill] = []
    with TunnelRig(2, policy_toml=policy) as rig:
        flows = [start_flow(rig, "up", True, args.rate), start_flow(rig, "down", False, args.rate)]
        time.sleep(2.0)
        t_next = time.monotonic()
        for k in range(args.kills):
            time.sleep(max(0.0, t_next - time.monotonic()))
            victim = rig.current_active()
            t_down = time.monotonic()
            rig.topo.link_down(victim)
            time.sleep(args.down)
            rig.topo.link_up(victim)
            t_up = time.monotonic()
            t_next = t_down + args.period
            switches = rig.events("TRANSPORT_SWITCH", since=t_down)
            denied = len(rig.events("TRANSPORT_SWITCH_DENIED", since=t_down))
            sw = switches[0] if switches else None
            kills.append(Kill(k + 1, victim, t_down, t_up, sw[1] if sw else None,
                              sw[0] if sw else None, denied))  # fmt: skip
            if not rig.alive():
                print("a tunnel program exited:\n" + rig.diagnostics())
                break
        time.sleep(max(0.0, t_next - time.monotonic()))
        for flow in flows:
            flow.finish()
        terminated = rig.events("SESSION_TERMINATED")

    print()
    head = (f"{'kill':>4} {'path':>4} {'->':>3} {'reason':<18} {'switch ms':>9} "
            f"{'event ms':>8} {'stall up ms':>11} {'stall dn ms':>11} {'lost up':>7} "
            f"{'lost dn':>7}")  # fmt: skip
    print(head)
    print("-" * len(head))
    stalls: list[float] = []
    latencies: list[float] = []
    lost_total = [0, 0]
    for kill in kills:
        window_end = kill.t_down + args.period - 0.5
        results = [flow.stall_and_loss(kill.t_down, window_end) for flow in flows]
        row_stall = [r[0] for r in results]
        for i, r in enumerate(results):
            lost_total[i] += r[1]
        sw = kill.switch
        if sw is not None:
            latencies.append(float(sw["switch_latency_ms"]))
        valid = [s for s in row_stall if s is not None]
        if valid:
            stalls.append(max(valid) * 1000)
        new = str(sw["new_transport"]) if sw else "-"
        reason = str(sw["reason_code"]) if sw else f"none ({kill.denied} denied)"
        lat = f"{float(sw['switch_latency_ms']):9.0f}" if sw else f"{'-':>9}"
        ev = f"{(kill.t_event - kill.t_down) * 1000:8.0f}" if kill.t_event else f"{'-':>8}"
        cells = [f"{s * 1000:11.0f}" if s is not None else f"{'-':>11}" for s in row_stall]
        print(f"{kill.index:4d} {kill.path + 1:4d} {new:>3} {reason:<18} {lat} {ev} "
              f"{cells[0]} {cells[1]} {results[0][1]:7d} {results[1][1]:7d}")  # fmt: skip
    print()
    print(f"stall (worse direction), ms:  {summary(stalls)}")
    print(f"switch_latency_ms (events):   {summary(latencies)}")
    sent = [f.sent for f in flows]
    got = [len(f.seqs or ()) for f in flows]
    print(
        f"packets lost around kills: up {lost_total[0]}, down {lost_total[1]}; "
        f"whole run: up {sent[0] - got[0]} of {sent[0]}, down {sent[1] - got[1]} of {sent[1]}"
    )
    print(
        f"switches seen: {sum(1 for k in kills if k.switch)} of {len(kills)} kills; "
        f"session terminated: {'yes' if terminated else 'no'}"
    )
    print(f"load after: {loadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
