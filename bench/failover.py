#!/usr/bin/env python3
"""Failover stall through real tunnels: N kills of the active path under running inner flows.

The rig (bench/throughput.py, tests/netns.py): a client and a gateway namespace joined by
two veth paths with a 1500-byte MTU. Inner flows (bench/failover_kit/flows.py) run for the
whole run: UDP ``--rate`` packets/s each way (sequence-numbered) and one paced inner TCP
connection (gateway -> client, 100 kB/s). Every ``--period`` seconds the *active* path
(the client veth whose packet counters grow) is killed for ``--down`` seconds:

* ``--mode silent`` (default): every packet is dropped on arrival at both ends of the
  path while the links stay up (nftables ``netdev`` ingress drop; without nftables a
  ``tc`` ``blackhole`` qdisc at both ends drops them as they are sent): nothing tells
  either host;
* ``--mode linkdown``: the client-side veth goes down (``ip link set down``).

Per kill, at the receivers: **stall** = the longest gap between two delivered UDP
packets in the window after the kill (the worse direction; about 1 ms resolution at 1000
packets/s), **TCP stall** = the same for the inner TCP connection's reads, **lost** = UDP
packets sent around the kill that never arrived (both directions). Then median and p95
(nearest rank: the sorted values' element ``round(0.95 * (n - 1))``, the maximum for
n <= 10) per tool.

``--compare`` runs the same kills on the same rig (same namespaces, paths and flows, one
tool after the other, the same number of kills each) against two anchors
(bench/failover_kit/tunnels.py says exactly how each is set up):

* wireguard-go + ``bench/failover_kit/wg-watchdog.sh``: every 1 s, if the peer's received-
  bytes counter did not grow since the previous check, the peer's endpoint moves to the
  other path;
* OpenVPN 2.6, UDP p2p, static key, both paths as ``--remote``, ``--keepalive 1 3``,
  ``--connect-retry 0``; the gateway ``--float``s.

and prints each anchor's numbers divided by jvpn's (``2.0x`` = the anchor stalls twice as
long). A tool that is missing and cannot be installed (apt-get, as root, unless
``--no-install``), or does not come up, is skipped with a one-line note.

    sudo .venv/bin/python bench/failover.py                    # jvpn, silent, ~2 minutes
    sudo .venv/bin/python bench/failover.py --mode linkdown
    sudo .venv/bin/python bench/failover.py --compare -n 10    # + anchors, ~8 minutes

Needs root, iproute2 and /dev/net/tun; exits 0 with a message when it cannot run.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent / "tests")]  # failover_kit, throughput, netns

from failover_kit.flows import Flows, start_flows  # noqa: E402
from failover_kit.install import have, install, missing, skip_note  # noqa: E402
from failover_kit.kills import LinkDown, NftDrop, PathKiller, TcDrop, active_path  # noqa: E402
from failover_kit.tunnels import ANCHORS, Jvpn, Tool, ToolError  # noqa: E402
from netns import Topology  # noqa: E402
from throughput import cannot_run, loadavg, machine_facts  # noqa: E402

MODES = ("silent", "linkdown")
PERIOD, DOWN = 10.0, 3.0
"""jvpn alone: a kill every 10 s, the path dead 3 s (8 kills: about 2 minutes)."""
COMPARE_PERIOD, COMPARE_DOWN = 12.0, 6.0
"""--compare: the path stays dead longer than OpenVPN's 3 s ping-restart plus its TCP
retransmission backoff, so every tool has to fail over rather than wait the kill out."""
WARMUP_S = 2.0
"""Flows run this long before the first kill."""


# -- statistics ------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest rank: the sorted values' element ``round(q * (n - 1))``."""
    if not values:
        raise ValueError("percentile of no values")
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


@dataclass(frozen=True)
class KillResult:
    index: int
    path: int
    """0-based index of the path killed."""
    stall_up_ms: float
    stall_down_ms: float
    tcp_stall_ms: float
    lost_up: int
    lost_down: int
    note: str = ""

    @property
    def stall_ms(self) -> float:
        """The worse direction."""
        return max(self.stall_up_ms, self.stall_down_ms)


@dataclass(frozen=True)
class Stats:
    kills: int
    stall_median: float
    stall_p95: float
    tcp_median: float
    lost: int
    """UDP packets lost around all kills, both directions."""


def stats(kills: Sequence[KillResult]) -> Stats | None:
    if not kills:
        return None
    stalls = [k.stall_ms for k in kills]
    return Stats(
        kills=len(kills),
        stall_median=statistics.median(stalls),
        stall_p95=percentile(stalls, 0.95),
        tcp_median=statistics.median(k.tcp_stall_ms for k in kills),
        lost=sum(k.lost_up + k.lost_down for k in kills),
    )


def ratio(anchor: float, jvpn: float) -> float | None:
    """How many times jvpn's value the anchor's is (None when jvpn's is 0)."""
    return anchor / jvpn if jvpn > 0 else None


def ratios(jvpn: Stats, anchor: Stats) -> dict[str, float | None]:
    return {
        "stall median": ratio(anchor.stall_median, jvpn.stall_median),
        "p95": ratio(anchor.stall_p95, jvpn.stall_p95),
        "TCP stall median": ratio(anchor.tcp_median, jvpn.tcp_median),
        "lost": ratio(anchor.lost, jvpn.lost),
    }


def format_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}x"


# -- tools and what they need ----------------------------------------------------------------


def killer_for(mode: str, exists: Callable[[str], bool] = have) -> type[PathKiller] | None:
    """LinkDown, or for silent NftDrop (TcDrop without nft); None when nothing can kill."""
    if mode == "linkdown":
        return LinkDown
    if exists("nft"):
        return NftDrop
    return TcDrop if exists("tc") else None


# -- arguments -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None, allow_abbrev=False
    )
    add = parser.add_argument
    add("-n", "--kills", type=int, default=8, help="path kills per tool (default 8)")
    add(
        "--mode",
        choices=MODES,
        default="silent",
        help="silent: packets dropped on arrival, links up (default); linkdown: veth down",
    )
    add(
        "--compare",
        action="store_true",
        help="also run wireguard-go + 1 s watchdog and OpenVPN on the same rig and kills",
    )
    add(
        "--period",
        type=float,
        default=None,
        help=f"seconds between kills (default {PERIOD:.0f}, {COMPARE_PERIOD:.0f} with --compare)",
    )
    add(
        "--down",
        type=float,
        default=None,
        help=f"seconds a killed path stays dead (default {DOWN:.0f}, "
        f"{COMPARE_DOWN:.0f} with --compare)",
    )
    add("--rate", type=float, default=1000.0, help="inner UDP packets/s each way")
    add("--policy", type=Path, default=None, help="jvpn policy file for both ends")
    add("--no-install", action="store_true", help="never apt-get install a missing tool")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.period is None:
        args.period = COMPARE_PERIOD if args.compare else PERIOD
    if args.down is None:
        args.down = COMPARE_DOWN if args.compare else DOWN
    if args.kills < 1:
        parser.error("-n/--kills must be at least 1")
    if args.down >= args.period - 1:
        parser.error("--down must leave at least 1 s of --period for the path to come back")
    return args


# -- one tool's run --------------------------------------------------------------------------


@dataclass
class ToolRun:
    name: str
    description: str = ""
    kills: list[KillResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str = ""


@dataclass(frozen=True)
class Kill:
    index: int
    path: int
    t_down: float
    note: str


def kill_loop(tool: Tool, killer: PathKiller, args: argparse.Namespace) -> list[Kill]:
    """``args.kills`` kills of the active path, one every ``args.period`` s."""
    kills: list[Kill] = []
    t_next = time.monotonic() + WARMUP_S
    victim = 0
    for k in range(args.kills):
        time.sleep(max(0.0, t_next - 0.4 - time.monotonic()))
        victim = active_path(killer.topo, default=victim)
        time.sleep(max(0.0, t_next - time.monotonic()))
        t_down = time.monotonic()
        killer.kill(victim)
        time.sleep(args.down)
        killer.restore(victim)
        t_next = t_down + args.period
        time.sleep(max(0.0, t_next - 0.5 - time.monotonic()))
        kills.append(Kill(k + 1, victim, t_down, tool.kill_note(t_down, t_next - 0.5)))
        if not tool.alive():
            raise ToolError(f"{tool.name} exited during kill {k + 1}:\n{tool.diagnostics()}")
    time.sleep(max(0.0, t_next - time.monotonic()))
    return kills


def evaluate(kills: Sequence[Kill], flows: Flows, period: float) -> list[KillResult]:
    out = []
    for kill in kills:
        window = (kill.t_down, kill.t_down + period - 0.5)
        stall_up, lost_up = flows.up.stall_and_loss(*window)
        stall_down, lost_down = flows.down.stall_and_loss(*window)
        out.append(
            KillResult(
                kill.index,
                kill.path,
                stall_up * 1000,
                stall_down * 1000,
                flows.tcp.stall(*window) * 1000,
                lost_up,
                lost_down,
                kill.note,
            )
        )
    return out


def measure(tool: Tool, killer: PathKiller, args: argparse.Namespace) -> ToolRun:
    run = ToolRun(tool.name, tool.describe())
    try:
        tool.start()
    except (ToolError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
        why = (str(exc).splitlines() or [type(exc).__name__])[0]
        run.skipped = f"{tool.name}: skipped: did not come up: {why}"
        _stop_quietly(tool, run)
        return run
    flows = None
    try:
        flows = start_flows(killer.topo, tool.workdir, args.rate)
        kills = kill_loop(tool, killer, args)
        flows.finish()
        run.kills = evaluate(kills, flows, args.period)
        run.notes += _flow_notes(flows) + tool.run_notes()
    except (ToolError, RuntimeError, OSError, ValueError, subprocess.SubprocessError) as exc:
        run.notes.append(f"run broken off: {exc}")
        if flows is not None:
            flows.kill()
    finally:
        _stop_quietly(tool, run)
    return run


def _stop_quietly(tool: Tool, run: ToolRun) -> None:
    try:
        tool.stop()
    except (ToolError, RuntimeError, OSError) as exc:
        run.notes.append(f"stop: {exc}")


def _flow_notes(flows: Flows) -> list[str]:
    up, down, tcp = flows.up, flows.down, flows.tcp
    broke = "none" if tcp.error == "-" else tcp.error
    return [
        f"whole run: UDP up lost {up.sent - up.received} of {up.sent}, down lost "
        f"{down.sent - down.received} of {down.sent}; inner TCP received {tcp.received} bytes, "
        f"connection broken: {broke}"
    ]


# -- report ----------------------------------------------------------------------------------


def print_tool(run: ToolRun) -> None:
    print(f"\n== {run.name}: {run.description}")
    if run.skipped:
        print(run.skipped)
        return
    head = (
        f"{'kill':>4} {'path':>4} {'stall up':>9} {'stall dn':>9} {'TCP stall':>9} "
        f"{'lost up':>7} {'lost dn':>7}  note (ms)"
    )
    print(head)
    print("-" * len(head))
    for k in run.kills:
        print(
            f"{k.index:4d} {k.path + 1:4d} {k.stall_up_ms:9.0f} {k.stall_down_ms:9.0f} "
            f"{k.tcp_stall_ms:9.0f} {k.lost_up:7d} {k.lost_down:7d}  {k.note}"
        )
    if run.kills:
        print(f"stall (worse direction), ms: {summary([k.stall_ms for k in run.kills])}")
        print(f"inner TCP stall, ms:         {summary([k.tcp_stall_ms for k in run.kills])}")
    for note in run.notes:
        print(note)


def comparison_lines(runs: Sequence[ToolRun], mode: str) -> list[str]:
    """The final table: one row per tool, then each anchor's ratios to jvpn."""
    head = (
        f"{'tool':<22} {'mode':<8} {'kills':>5} {'stall median':>12} {'p95':>6} "
        f"{'TCP stall median':>16} {'lost':>6}"
    )
    lines = [head, "-" * len(head)]
    for run in runs:
        s = stats(run.kills)
        if s is None:
            lines.append(f"{run.name:<22} {mode:<8} {run.skipped or 'no kills measured'}")
            continue
        lines.append(
            f"{run.name:<22} {mode:<8} {s.kills:5d} {s.stall_median:12.0f} "
            f"{s.stall_p95:6.0f} {s.tcp_median:16.0f} {s.lost:6d}"
        )
    base = stats(runs[0].kills) if runs else None
    for run in runs[1:]:
        s = stats(run.kills)
        if base is None or s is None:
            continue
        parts = ", ".join(f"{k} {format_ratio(v)}" for k, v in ratios(base, s).items())
        lines.append(f"{run.name} / jvpn: {parts}")
    return lines


# -- main ------------------------------------------------------------------------------------


Prepared = tuple[type[PathKiller] | None, list[type[Tool]], list[str]]


def prepare(
    args: argparse.Namespace,
    exists: Callable[[str], bool] = have,
    installer: Callable[[Sequence[str]], str] = install,
) -> Prepared:
    """Install what is missing (unless --no-install); the killer, runnable anchors, notes."""
    notes: list[str] = []
    anchors = list(ANCHORS) if args.compare else []
    needed = {cmd: pkg for a in anchors for cmd, pkg in a.requires.items()}
    if args.mode == "silent":
        needed["nft"] = "nftables"
    packages = list(dict.fromkeys(needed[c] for c in missing(needed, exists)))
    if packages and not args.no_install:
        notes.append(installer(packages))
    runnable = []
    for anchor in anchors:
        absent = missing(anchor.requires, exists)
        if absent:
            notes.append(skip_note(anchor.name, anchor.requires, absent))
        else:
            runnable.append(anchor)
    return killer_for(args.mode, exists), runnable, notes


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    reason = cannot_run()
    if reason:
        print(f"failover: skipped: {reason}")
        return 0
    killer_cls, anchors, notes = prepare(args)
    if killer_cls is None:
        print("failover: skipped: --mode silent needs nft (nftables) or tc (iproute2)")
        return 0
    policy = args.policy.read_text() if args.policy else None
    print(f"failover: {machine_facts()}")
    print(
        f"load at start: {loadavg()}; mode {args.mode}; {args.kills} kills per tool, one "
        f"every {args.period:.0f} s, path dead {args.down:.0f} s; inner UDP {args.rate:.0f} "
        f"pkt/s each way + one paced inner TCP connection"
    )
    for note in filter(None, notes):
        print(note)
    runs: list[ToolRun] = []
    workdir = Path(tempfile.mkdtemp(prefix="jvpn-failover-"))
    try:
        with Topology(2) as topo, killer_cls(topo) as killer:
            print(f"kill: {killer.how}")
            tools: list[Tool] = [Jvpn(topo, workdir / "jvpn", policy)]
            tools += [cls(topo, workdir / cls.name) for cls in anchors]
            for tool in tools:
                tool.workdir.mkdir(parents=True, exist_ok=True)
                runs.append(measure(tool, killer, args))
                print_tool(runs[-1])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print("\n".join(comparison_lines(runs, args.mode)))
    print(f"load at end: {loadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
