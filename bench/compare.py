#!/usr/bin/env python3
"""Inner TCP throughput of jvpn beside wireguard-go and OpenVPN: one table, one run, one rig.

One pair of namespaces joined by two 1500-MTU veth paths (tests/netns.py ``Topology``, the
rig of bench/throughput.py and bench/failover.py) carries, one after the other:

* **bare veth**: no tunnel, iperf3 straight over path 1 (the ceiling of the rig);
* **jvpn**: ``jvpn-gateway`` + ``jvpn-tui --headless``, real TUNs, default policy;
* **wireguard-go**: userspace WireGuard on both ends (ChaCha20-Poly1305);
* **OpenVPN AES-256-GCM** and **OpenVPN ChaCha20-Poly1305**: OpenVPN 2.6 peer-to-peer over
  UDP with TLS (self-signed certificates pinned by ``--peer-fingerprint``) and that one
  data cipher, userspace (``--disable-dco``).

Every tunnel has the inner addresses 10.66.0.1 (gateway) / 10.66.0.2 (client) and inner
MTU 1420 (bench/failover_kit/tunnels.py sets each up). For each tunnel, iperf3 TCP runs
from the client namespace to the gateway's inner address with each ``--streams`` count
(``-P``), in both directions (client -> gateway, and ``-R`` gateway -> client). A
repetition is one round over all tunnels (each started, measured in every column and
stopped before the next); ``--reps`` repetitions interleave the tunnels, so that a slow
minute on the machine hurts all of them instead of one. The table shows the **median**
Mbit/s of the repetitions, the ratios jvpn / wireguard-go and jvpn / OpenVPN AES-256-GCM
per column, and the **CPU** (user + sys seconds from /proc/PID/stat) of each tunnel
process (gateway side, client side) during each iperf3 run, median over the repetitions.

A missing anchor (or iperf3) is installed with apt-get (as root, unless ``--no-install``);
one still missing, or one that does not come up, is skipped with a one-line note. Every
namespace, veth, process and file it creates is removed on exit, on Ctrl-C and on SIGTERM.

    sudo .venv/bin/python bench/compare.py                      # 5 tunnels x 4 x 3 x 10 s
    sudo .venv/bin/python bench/compare.py --duration 3 --reps 1   # a smoke run
    sudo .venv/bin/python bench/compare.py --only jvpn,wireguard-go --streams 1 --json out.json

Measurements only: nothing here passes or fails on speed. On a 2-core machine every other
busy process is taken out of these numbers: check /proc/loadavg (printed at start and end).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent / "tests")]  # failover_kit, throughput, netns

from failover_kit.install import have, install, missing, skip_note  # noqa: E402
from failover_kit.tunnels import (  # noqa: E402
    Jvpn,
    OpenvpnChacha,
    OpenvpnTls,
    Tool,
    ToolError,
    Wireguard,
)
from netns import Topology, netns_unavailable  # noqa: E402
from throughput import (  # noqa: E402
    CLK_TCK,
    INNER_GATEWAY,
    INNER_MTU,
    cannot_run,
    cpu_model,
    cpu_ticks,
    iperf,
    iperf_row,
    iperf_server,
    loadavg,
    machine_facts,
)

IPERF = {"iperf3": "iperf3"}
"""What every run needs (command -> package)."""


class Bare(Tool):
    """No tunnel: iperf3 over path 1's veth itself."""

    name = "bare"

    def describe(self) -> str:
        path = self.topo.paths[0]
        return (
            f"no tunnel: iperf3 over path 1's veth ({path.client_ip} -> {path.gateway_ip}), "
            "MTU 1500"
        )

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


TUNNELS: dict[str, tuple[str, type[Tool]]] = {
    "bare": ("bare veth (no tunnel)", Bare),
    "jvpn": ("jvpn", Jvpn),
    "wireguard-go": ("wireguard-go", Wireguard),
    "openvpn-aes": ("OpenVPN AES-256-GCM", OpenvpnTls),
    "openvpn-chacha": ("OpenVPN ChaCha20-Poly1305", OpenvpnChacha),
}
"""Name (for --only) -> (label in the table, the class that runs it), in run order."""
BASES = ("wireguard-go", "openvpn-aes")
"""The ratio rows: jvpn / each of these, per column."""


def label(name: str) -> str:
    return TUNNELS[name][0]


FIRST = 2 + max(len(f"jvpn / {label(b)}") for b in BASES)
"""Width of the tables' first column."""


# -- arguments -------------------------------------------------------------------------------


def stream_counts(text: str) -> list[int]:
    """``"1,4"`` -> [1, 4]: positive, each once, in the order given."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of stream counts: {text!r}") from None
    if not counts or any(n < 1 or n > 128 for n in counts):
        raise argparse.ArgumentTypeError(f"stream counts are 1..128: {text!r}")
    return list(dict.fromkeys(counts))


def tunnel_names(text: str) -> list[str]:
    """``"wireguard-go,jvpn"`` -> the named tunnels, in run order (``TUNNELS``)."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in TUNNELS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown tunnel {', '.join(unknown) or text!r}; choose from {', '.join(TUNNELS)}"
        )
    return [n for n in TUNNELS if n in names]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None, allow_abbrev=False
    )
    add = parser.add_argument
    add("--duration", type=int, default=10, help="seconds per iperf3 run (default 10)")
    add("--reps", type=int, default=3, help="repetitions, tunnels round-robin (default 3)")
    add(
        "--streams",
        type=stream_counts,
        default=[1, 4],
        help="iperf3 parallel streams, comma-separated (default 1,4)",
    )
    add(
        "--only",
        type=tunnel_names,
        default=list(TUNNELS),
        help=f"comma-separated tunnels to run (default all: {','.join(TUNNELS)})",
    )
    add("--json", type=Path, default=None, metavar="FILE", help="also write the results as JSON")
    add("--no-install", action="store_true", help="never apt-get install a missing tool")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.duration < 1:
        parser.error("--duration must be at least 1 s")
    if args.reps < 1:
        parser.error("--reps must be at least 1")
    return args


# -- columns, samples and their arithmetic ---------------------------------------------------


@dataclass(frozen=True)
class Column:
    streams: int
    reverse: bool

    @property
    def label(self) -> str:
        plural = "s" if self.streams > 1 else ""
        return f"{self.streams} stream{plural} {'g->c' if self.reverse else 'c->g'}"


def columns(streams: Sequence[int]) -> list[Column]:
    """Each stream count in both directions: client -> gateway, then gateway -> client."""
    return [Column(n, reverse) for n in streams for reverse in (False, True)]


@dataclass
class Sample:
    """One iperf3 run through one tunnel."""

    tunnel: str
    rep: int
    column: str
    mbit: float | None
    retransmits: int | None = None
    cpu_s: dict[str, float] = field(default_factory=dict)
    """user + sys seconds of each tunnel process (by role) during the run."""
    error: str = ""


def median(values: Sequence[float | None]) -> float | None:
    """Median of the values that are there (None: a run that failed), or None."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is 0."""
    return a / b if a is not None and b else None


Grid = dict[str, dict[str, float | None]]
"""tunnel -> column label -> value."""


def median_mbit(samples: Sequence[Sample], tunnels: Sequence[str], cols: Sequence[str]) -> Grid:
    return {
        t: {c: median([s.mbit for s in samples if (s.tunnel, s.column) == (t, c)]) for c in cols}
        for t in tunnels
    }


def median_cpu(
    samples: Sequence[Sample], tunnels: Sequence[str], cols: Sequence[str]
) -> dict[str, dict[str, dict[str, float | None]]]:
    """tunnel -> column -> role -> median CPU seconds (runs that measured something)."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for t in tunnels:
        out[t] = {}
        for c in cols:
            runs = [s.cpu_s for s in samples if (s.tunnel, s.column) == (t, c) and s.mbit]
            roles = dict.fromkeys(role for cpu in runs for role in cpu)
            out[t][c] = {r: median([cpu.get(r) for cpu in runs]) for r in roles}
    return out


def ratios(mbit: Grid, cols: Sequence[str]) -> dict[str, dict[str, float | None]]:
    """Per base measured: "jvpn/<base>" -> column -> jvpn's median over the base's."""
    if "jvpn" not in mbit:
        return {}
    return {
        f"jvpn/{base}": {c: ratio(mbit["jvpn"][c], mbit[base][c]) for c in cols}
        for base in BASES
        if base in mbit
    }


def short_counts(samples: Sequence[Sample], reps: int) -> list[str]:
    """Cells with fewer measured runs than repetitions ("jvpn 4 streams g->c: 2 of 3")."""
    counts: dict[tuple[str, str], int] = {}
    for s in samples:
        counts.setdefault((s.tunnel, s.column), 0)
        counts[(s.tunnel, s.column)] += s.mbit is not None
    return [f"{label(t)} {c}: {n} of {reps}" for (t, c), n in counts.items() if n < reps]


# -- report ----------------------------------------------------------------------------------


def _cell(value: float | None, fmt: str, width: int) -> str:
    return f"{'-' if value is None else format(value, fmt):>{width}}"


def _ratio_cell(value: float | None, width: int) -> str:
    return f"{'-' if value is None else f'{value:.2f}x':>{width}}"


def _cpu_cell(cpu: dict[str, float | None], width: int) -> str:
    if not cpu:
        return f"{'-':>{width}}"
    gw, cl = cpu.get("gateway"), cpu.get("client")
    text = "/".join("-" if v is None else f"{v:.2f}" for v in (gw, cl))
    return f"{text:>{width}}"


def table_lines(
    mbit: Grid,
    cpu: dict[str, dict[str, dict[str, float | None]]],
    cols: Sequence[str],
    reps: int,
    skipped: dict[str, str] | None = None,
) -> list[str]:
    """The final tables: median Mbit/s with the ratio rows, then CPU seconds per run."""
    skipped = skipped or {}
    first = FIRST
    width = max(14, *(len(c) + 1 for c in cols))
    head = f"{'Mbit/s, median of ' + str(reps):<{first}}" + "".join(f"{c:>{width}}" for c in cols)
    lines = [head, "-" * len(head)]
    for t, row in mbit.items():
        lines.append(f"{label(t):<{first}}" + "".join(_cell(row[c], ".0f", width) for c in cols))
    for t, why in skipped.items():
        lines.append(f"{label(t):<{first}}{why}")
    for key, row in ratios(mbit, cols).items():
        name = f"jvpn / {label(key.split('/', 1)[1])}"
        lines.append(f"{name:<{first}}" + "".join(_ratio_cell(row[c], width) for c in cols))
    cpu_head = f"{'CPU s gw/cl, median':<{first}}" + "".join(f"{c:>{width}}" for c in cols)
    lines += ["", cpu_head, "-" * len(cpu_head)]
    for t, row_cpu in cpu.items():
        lines.append(f"{label(t):<{first}}" + "".join(_cpu_cell(row_cpu[c], width) for c in cols))
    return lines


def sample_line(s: Sample) -> str:
    """The progress line printed after each run."""
    if s.mbit is None:
        return f"  {label(s.tunnel):<26} {s.column:<16} failed: {s.error[:150]}"
    cpu = " ".join(f"{role} {sec:.2f} s" for role, sec in s.cpu_s.items())
    return (
        f"  {label(s.tunnel):<26} {s.column:<16} {s.mbit:8.0f} Mbit/s  "
        f"retr {s.retransmits if s.retransmits is not None else '-':>5}"
        + (f"  CPU {cpu}" if cpu else "")
    )


def report(run: Run) -> dict[str, Any]:
    """Everything --json writes."""
    args, samples = run.args, run.samples
    cols = [c.label for c in columns(args.streams)]
    ran = [t for t in args.only if any(s.tunnel == t for s in samples)]
    mbit = median_mbit(samples, ran, cols)
    return {
        "cpu_model": cpu_model(),
        "machine": machine_facts(),
        "loadavg": run.loads,
        "settings": {
            "duration_s": args.duration,
            "reps": args.reps,
            "streams": args.streams,
            "tunnels": args.only,
            "inner_mtu": INNER_MTU,
        },
        "tunnels": run.tools,
        "columns": cols,
        "samples": [asdict(s) for s in samples],
        "median_mbit": mbit,
        "median_cpu_s": median_cpu(samples, ran, cols),
        "ratios": ratios(mbit, cols),
        "notes": run.notes,
    }


# -- preparing -------------------------------------------------------------------------------


def prepare(
    tunnels: Sequence[str],
    no_install: bool,
    exists: Callable[[str], bool] = have,
    installer: Callable[[Sequence[str]], str] = install,
) -> tuple[list[str], list[str]]:
    """Install what is missing (unless ``no_install``); the tunnels that can run, notes.

    Without iperf3 nothing can run (empty list)."""
    needed = dict(IPERF)
    for name in tunnels:
        needed.update(TUNNELS[name][1].requires)
    notes = []
    packages = list(dict.fromkeys(needed[c] for c in missing(needed, exists)))
    if packages and not no_install:
        notes.append(installer(packages))
    if missing(IPERF, exists):
        return [], [*notes, skip_note("compare", IPERF, ["iperf3"])]
    runnable = []
    for name in tunnels:
        requires = TUNNELS[name][1].requires
        absent = missing(requires, exists)
        if absent:
            notes.append(skip_note(name, requires, absent))
        else:
            runnable.append(name)
    return runnable, notes


# -- running ---------------------------------------------------------------------------------


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, handled like Ctrl-C: stop and clean up."""


MAIN_PID = os.getpid()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    if os.getpid() != MAIN_PID:
        # A forked helper: pyroute2 forks for namespace work and ends the child with
        # SIGTERM; an exception there would let the child run on as a copy of this bench.
        os._exit(128 + signum)
    raise Interrupted(signal.Signals(signum).name)


def _defer(got: list[int], signum: int, frame: FrameType | None) -> None:
    if os.getpid() != MAIN_PID:
        os._exit(128 + signum)  # a forked helper, as in _interrupt
    got.append(signum)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Cleanup that a second Ctrl-C or SIGTERM cannot cut short; raised once it is done."""
    got: list[int] = []
    watched = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, partial(_defer, got)) for s in watched}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if got:
            raise Interrupted(signal.Signals(got[0]).name)


class Iperf:
    """The iperf3 server in the gateway namespace; restarted for each tunnel and after a
    failed run."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.server = iperf_server(topo)

    BUSY_WAIT_S = 10.0
    """How long a run waits for a server still finishing the previous test."""

    def run(self, host: str, seconds: int, col: Column) -> dict[str, Any]:
        deadline = time.monotonic() + self.BUSY_WAIT_S
        while True:
            result = iperf(self.topo, host, seconds, col.reverse, col.streams)
            busy = "server is busy" in str(result.get("error", ""))
            if not busy or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if "error" in result:
            self.restart()
        return result

    def restart(self) -> None:
        self.stop()
        self.server = iperf_server(self.topo)

    def stop(self) -> None:
        if self.server.poll() is None:
            self.server.kill()
        self.server.wait(timeout=5)


def target(tool: Tool) -> str:
    return tool.topo.paths[0].gateway_ip if isinstance(tool, Bare) else INNER_GATEWAY


def measure(tool: Tool, iperf3: Iperf, col: Column, seconds: int, rep: int) -> Sample:
    pids = tool.pids()
    before = {role: cpu_ticks(pid) for role, pid in pids.items()}
    result = iperf3.run(target(tool), seconds, col)
    cpu = {role: (cpu_ticks(pid) - before[role]) / CLK_TCK for role, pid in pids.items()}
    row = iperf_row(tool.name, result, {})
    sample = Sample(tool.name, rep, col.label, row.mbit, row.retransmits, cpu)
    if row.mbit is None:
        sample.error = row.note or "no result"
    if not tool.alive():
        sample.error = (sample.error + "; " if sample.error else "") + "tunnel process exited"
    return sample


@dataclass
class Run:
    """What one run of the bench has collected so far."""

    args: argparse.Namespace
    workdir: Path
    samples: list[Sample] = field(default_factory=list)
    tools: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    loads: dict[str, str] = field(default_factory=dict)
    """/proc/loadavg at "start", at each "repetition N" and at "end"."""
    out: TextIO = sys.stdout

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)


def run_tunnel(run: Run, topo: Topology, iperf3: Iperf, name: str, rep: int) -> None:
    """Start one tunnel, measure it in every column, stop it; failures become notes."""
    workdir = run.workdir / f"{name}-{rep}"
    workdir.mkdir(parents=True)
    tool = TUNNELS[name][1](topo, workdir)
    info = run.tools.setdefault(name, {"label": label(name), "description": tool.describe()})
    try:
        tool.start()
        iperf3.restart()  # a fresh server: none left waiting on the previous tunnel's test
        for col in columns(run.args.streams):
            run.samples.append(measure(tool, iperf3, col, run.args.duration, rep))
            run.say(sample_line(run.samples[-1]))
        info["data_cipher"] = tool.data_cipher() or info.get("data_cipher")
    except (ToolError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
        why = (str(exc).splitlines() or [type(exc).__name__])[0]
        run.notes.append(f"{name}: repetition {rep}: {why}")
        run.say(f"  {label(name):<26} did not come up or broke off: {why}")
    finally:
        with shielded():
            try:
                tool.stop()
            except (ToolError, RuntimeError, OSError) as exc:
                run.notes.append(f"{name}: repetition {rep}: stop: {exc}")


def run_all(run: Run, tunnels: Sequence[str]) -> None:
    """``--reps`` rounds over the tunnels on one topology, removed at the end whatever
    happens (its close kills every process started in it, the iperf3 server included)."""
    topo = Topology(2).open()
    try:
        iperf3 = Iperf(topo)
        for rep in range(1, run.args.reps + 1):
            load = run.loads[f"repetition {rep}"] = loadavg()
            run.say(f"\nrepetition {rep}/{run.args.reps} (load {load})")
            for name in tunnels:
                run_tunnel(run, topo, iperf3, name, rep)
    finally:
        with shielded():
            topo.close()


def describe_tools(run: Run, out: TextIO) -> None:
    for name, info in run.tools.items():
        cipher = info.get("data_cipher")
        if name == "jvpn":
            cipher = cipher or "not reported by the client's events"
        print(f"{info['label']}: {info['description']}", file=out)
        if cipher:
            print(f"  data cipher: {cipher}", file=out)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    reason = netns_unavailable()
    if reason:
        print(f"compare: skipped: {reason}")
        return 0
    tunnels, notes = prepare(args.only, args.no_install)
    reason = cannot_run()
    if reason or not tunnels:
        print(f"compare: skipped: {reason or '; '.join(filter(None, notes))}")
        return 0
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    run = Run(args, Path(tempfile.mkdtemp(prefix="jvpn-compare-")), notes=notes)
    run.say(f"compare: {machine_facts()}")
    run.loads["start"] = loadavg()
    run.say(
        f"load at start: {run.loads['start']}; iperf3 TCP {args.duration} s per run, streams "
        f"{','.join(map(str, args.streams))}, both directions, {args.reps} repetition(s), "
        f"tunnels round-robin; two 1500-MTU veth paths, inner MTU {INNER_MTU}"
    )
    for note in filter(None, notes):
        run.say(note)
    t0 = time.monotonic()
    status = 0
    try:
        run_all(run, tunnels)
    except KeyboardInterrupt as exc:
        run.notes.append(f"interrupted ({str(exc) or 'SIGINT'}): the tables hold what was measured")
        status = 130
    finally:
        shutil.rmtree(run.workdir, ignore_errors=True)
    print_results(run, tunnels)
    run.loads["end"] = loadavg()
    print(f"load at end: {run.loads['end']}; {time.monotonic() - t0:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(report(run), indent=2))
        print(f"results: {args.json}")
    return status


def print_results(run: Run, tunnels: Sequence[str]) -> None:
    cols = [c.label for c in columns(run.args.streams)]
    print()
    describe_tools(run, sys.stdout)
    ran = [t for t in tunnels if any(s.tunnel == t for s in run.samples)]
    skipped = {n: "not measured (see the notes)" for n in run.args.only if n not in ran}
    mbit = median_mbit(run.samples, ran, cols)
    print(f"\nCPU model: {cpu_model()} ({os.cpu_count()} cores)")
    print("\n".join(table_lines(mbit, median_cpu(run.samples, ran, cols), cols, run.args.reps,
                                skipped)))  # fmt: skip
    for line in short_counts(run.samples, run.args.reps):
        print(f"fewer runs than repetitions: {line}")
    for note in filter(None, run.notes):
        print(f"note: {note}")


if __name__ == "__main__":
    raise SystemExit(main())
