#!/usr/bin/env python3
"""Inner TCP throughput through a real jvpn tunnel (iperf3 over TUN, in network namespaces).

Builds a client and a gateway namespace joined by veth paths (tests/netns.py ``Topology``,
1500-byte MTU on every path), starts ``jvpn-gateway`` (real TUN) in one and
``jvpn-tui --headless`` (real TUN) in the other, then runs iperf3 TCP over the inner
addresses (client -> gateway, and ``-R`` gateway -> client) and, as a reference in the
same run, the same iperf3 directly over the first veth path. Prints one table: Mbit/s,
TCP retransmits, CPU of the gateway and client processes (percent of one core, from
/proc/<pid>/stat) and the machine's busy CPU (percent of all cores, /proc/stat).

Needs root, iproute2, iperf3 and /dev/net/tun; exits 0 with a message when it cannot run.
Measurements only: nothing here passes or fails on speed.

    sudo .venv/bin/python bench/throughput.py                # 10 s per run
    sudo .venv/bin/python bench/throughput.py -t 5 --switch-at 2
    sudo .venv/bin/python bench/throughput.py --profile /tmp/prof   # cProfile both loops
    sudo .venv/bin/python bench/throughput.py --offloads off        # per-packet baseline

``--switch-at S`` adds a run in which the active path's link goes down S seconds into
the transfer (forcing a switch to the other path; restored 2 s later) and reports the
switch latency from the client's TRANSPORT_SWITCH event. ``--profile DIR`` runs both
engines' loops under cProfile and writes ``DIR/gateway.prof`` and ``DIR/client.prof``.

:class:`TunnelRig` (the namespaces and the two programs) is reused by bench/failover.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from netns import Topology, child_env, netns_unavailable  # noqa: E402

GATEWAY_PORT = 51820
INNER_PREFIX = "10.66.0"
INNER_GATEWAY = f"{INNER_PREFIX}.1"
INNER_CLIENT = f"{INNER_PREFIX}.2"
IPERF_PORT = 5201
INNER_MTU = 1420
"""The programs' default: a 1500-byte path minus outer IPv6/UDP and jvpn framing."""

CLK_TCK = os.sysconf("SC_CLK_TCK")

# Runs a program with bench-only settings (argv: profile file or "-", offloads, which,
# program argv...). offloads: "on" (the defaults), "off" (no UDP GSO/GRO, no TUN vnet
# header), "tso" (defaults plus the TUN read-side TSO prototype). With a profile file the
# engine loop runs under cProfile: the client loop runs on the engine thread, so its
# _run_loop is wrapped; the gateway loop runs on the main thread, in GatewayRuntime.run.
WRAPPER = r"""
import cProfile, sys
out, offloads, which, argv = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
def force(cls, **kw):
    orig = cls.__init__
    def init(self, *a, **k):
        k.update(kw)
        orig(self, *a, **k)
    cls.__init__ = init
if offloads != "on":
    from tunnel.io.tun import TunDevice
    from tunnel.io.udp import PathSocket
    if offloads == "off":
        force(TunDevice, offload=False)
        force(PathSocket, offload=False)
    else:
        force(TunDevice, tso=True)
def wrap(cls, name):
    orig = getattr(cls, name)
    def run(*a, **k):
        prof = cProfile.Profile()
        prof.enable()
        try:
            return orig(*a, **k)
        finally:
            prof.disable()
            prof.dump_stats(out)
    setattr(cls, name, run)
if which == "gateway":
    from tunnel.gateway.runtime import GatewayRuntime
    if out != "-":
        wrap(GatewayRuntime, "run")
    from tunnel.gateway.main import main
else:
    from tunnel.client.engine import ClientEngine
    if out != "-":
        wrap(ClientEngine, "_run_loop")
    from jvpn_tui.__main__ import main
sys.exit(main(argv))
"""


def cannot_run() -> str | None:
    """Why this benchmark cannot run here, or None."""
    reason = netns_unavailable()
    if reason:
        return reason
    if not Path("/dev/net/tun").exists():
        return "/dev/net/tun missing (modprobe tun)"
    if shutil.which("iperf3") is None:
        return "iperf3 not installed (apt-get install iperf3)"
    return None


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process (all its threads) and of its live children (a gateway's
    workers), in clock ticks; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            children = [int(c) for c in fh.read().split()]
    except OSError:
        children = []
    return int(fields[11]) + int(fields[12]) + sum(cpu_ticks(c) for c in children)


def system_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # without guest time (already in user)
    return total - idle, total


def loadavg() -> str:
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


class CpuMeter:
    """CPU used by some processes and by the whole machine between start() and stop()."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._t0 = 0.0
        self._ticks: dict[str, int] = {}
        self._sys = (0, 0)
        self.percent: dict[str, float] = {}
        """Per name: percent of ONE core; "system": percent of all cores busy."""

    def start(self) -> CpuMeter:
        self._t0 = time.monotonic()
        self._ticks = {name: cpu_ticks(pid) for name, pid in self.pids.items()}
        self._sys = system_ticks()
        return self

    def stop(self) -> dict[str, float]:
        wall = max(time.monotonic() - self._t0, 1e-6)
        for name, pid in self.pids.items():
            used = (cpu_ticks(pid) - self._ticks[name]) / CLK_TCK
            self.percent[name] = 100.0 * used / wall
        busy, total = system_ticks()
        dbusy, dtotal = busy - self._sys[0], total - self._sys[1]
        self.percent["system"] = 100.0 * dbusy / dtotal if dtotal else 0.0
        return self.percent


@dataclass
class LineLog:
    """Lines of a child's stream, each with the monotonic time it arrived."""

    lines: list[tuple[float, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False

    def follow(self, stream: Any) -> threading.Thread:
        def run() -> None:
            for raw in iter(stream.readline, b""):
                with self.lock:
                    self.lines.append((time.monotonic(), raw.decode(errors="replace").rstrip()))
            self.closed = True

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def snapshot(self) -> list[tuple[float, str]]:
        with self.lock:
            return list(self.lines)

    def text(self) -> str:
        return "\n".join(line for _, line in self.snapshot())


class RigError(RuntimeError):
    """The tunnel did not come up (the message carries the programs' output)."""


def _write_keys(workdir: Path) -> dict[str, str]:
    from cryptography.hazmat.primitives.asymmetric import x25519
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
        PublicFormat,
    )

    from tunnel.keys import write_private_key, write_public_key

    paths = {}
    for who in ("gateway", "client"):
        key = x25519.X25519PrivateKey.generate()
        raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        pub = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        write_private_key(workdir / f"{who}.key", raw)
        write_public_key(workdir / f"{who}.pub", pub)
        paths[who] = str(workdir / who)
    return paths


class TunnelRig:
    """Namespaces + jvpn-gateway + jvpn-tui --headless with real TUNs, ready for traffic.

    Use as a context manager; everything (processes, namespaces, files) goes on exit.
    ``client_events`` holds the client's JSON events with their arrival time.
    """

    def __init__(
        self,
        n_paths: int = 2,
        *,
        policy_toml: str | None = None,
        profile_dir: Path | None = None,
        offloads: str = "on",
        ready_timeout: float = 30.0,
        workers: int = 1,
    ) -> None:
        self.n_paths = n_paths
        self.workers = workers
        self.policy_toml = policy_toml
        self.profile_dir = profile_dir
        self.offloads = offloads
        self.ready_timeout = ready_timeout
        self.topo = Topology(n_paths)
        self.workdir = Path(tempfile.mkdtemp(prefix="jvpn-bench-"))
        self.gateway: subprocess.Popen[bytes] | None = None
        self.client: subprocess.Popen[bytes] | None = None
        self.gateway_log = LineLog()
        self.client_out = LineLog()
        self.client_err = LineLog()
        self.active_path = 0

    # -- lifetime ------------------------------------------------------------------------

    def __enter__(self) -> TunnelRig:
        try:
            self.topo.open()
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        for proc in (self.client, self.gateway):
            if proc is not None and proc.poll() is None:
                proc.terminate()  # explicit terminate: profiles get written, hosts restored
                try:
                    proc.wait(timeout=8)
                except subprocess.TimeoutExpired:
                    proc.kill()
        try:
            self.topo.close()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _program(self, which: str, argv: Sequence[str]) -> list[str]:
        if self.profile_dir is None and self.offloads == "on":
            module = "tunnel.gateway.main" if which == "gateway" else "jvpn_tui"
            return [sys.executable, "-m", module, *argv]
        out = "-" if self.profile_dir is None else str(self.profile_dir / f"{which}.prof")
        return [sys.executable, "-c", WRAPPER, out, self.offloads, which, *argv]

    def _start(self) -> None:
        keys = _write_keys(self.workdir)
        policy_line = ""
        if self.policy_toml is not None:
            (self.workdir / "policy.toml").write_text(self.policy_toml)
            policy_line = 'policy = "policy.toml"\n'
        (self.workdir / "gateway.toml").write_text(
            f'node_id = "gw-bench"\nlisten = ["0.0.0.0:{GATEWAY_PORT}"]\n'
            f'private_key = "{keys["gateway"]}.key"\n{policy_line}mtu = {INNER_MTU}\n'
            f'inner_echo = false\nworkers = {self.workers}\n\n[state]\nstore = "memory"\n\n'
            f'[tun]\nname = "jvpn%d"\nsubnet = "{INNER_PREFIX}.0/24"\n'
            f'address = "{INNER_GATEWAY}"\n\n[[clients]]\nname = "bench"\n'
            f'public_key = "{keys["client"]}.pub"\naddress = "{INNER_CLIENT}"\n'
        )
        paths = "".join(
            f'\n[[path]]\nname = "veth{i}"\nbind = "{p.client_ip}"\n'
            f'device = "{p.client_ifname}"\ngateway = "{p.gateway_ip}:{GATEWAY_PORT}"\n'
            for i, p in enumerate(self.topo.paths)
        )
        (self.workdir / "client.toml").write_text(
            f'private_key = "{keys["client"]}.key"\n'
            f'gateway_public_key = "{keys["gateway"]}.pub"\n{policy_line}'
            f'node_id = "bench"\n\n[tun]\nname = "jvpn%d"\nmtu = {INNER_MTU}\n{paths}'
        )
        env = child_env()
        self.gateway = self.topo.exec(
            self.topo.gateway_ns,
            self._program("gateway", ["--config", str(self.workdir / "gateway.toml")]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        self.gateway_log.follow(self.gateway.stderr)
        self._wait(lambda: any("listening on" in ln for _, ln in self.gateway_log.snapshot()),
                   "gateway ready")  # fmt: skip
        self.client = self.topo.exec(
            self.topo.client_ns,
            self._program("client", ["--headless", "--config", str(self.workdir / "client.toml")]),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        self.client_out.follow(self.client.stdout)
        self.client_err.follow(self.client.stderr)
        self._wait(lambda: bool(self.events("SESSION_CREATED")), "session created")
        self._wait(self._inner_up, "inner address on the client TUN")

    def _inner_up(self) -> bool:
        ipr = self.topo.ipr(self.topo.client_ns)
        return any(a.get_attr("IFA_ADDRESS") == INNER_CLIENT for a in ipr.addr("dump"))

    def _wait(self, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if ready():
                return
            for proc in (self.gateway, self.client):
                if proc is not None and proc.poll() is not None:
                    break
            else:
                time.sleep(0.05)
                continue
            break
        raise RigError(f"tunnel not up: no {what}\n{self.diagnostics()}")

    def diagnostics(self) -> str:
        return (
            f"--- gateway stderr ---\n{self.gateway_log.text()[-3000:]}\n"
            f"--- client stdout ---\n{self.client_out.text()[-3000:]}\n"
            f"--- client stderr ---\n{self.client_err.text()[-3000:]}"
        )

    # -- views ---------------------------------------------------------------------------

    @property
    def pids(self) -> dict[str, int]:
        assert self.gateway is not None and self.client is not None
        return {"gateway": self.gateway.pid, "client": self.client.pid}

    def events(
        self, kind: str | None = None, since: float = 0.0
    ) -> list[tuple[float, dict[str, Any]]]:
        """Client events (arrival time, dict), optionally of one type, arrived after ``since``."""
        out = []
        for t, line in self.client_out.snapshot():
            if t < since or not line.startswith("{"):
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if kind is None or event.get("event_type") == kind:
                out.append((t, event))
        return out

    def current_active(self) -> int:
        """Topology index of the active path (the client numbers transports from 1)."""
        transport = 1
        for _, event in self.events():
            kind = event.get("event_type")
            if kind == "TRANSPORT_ATTACHED":
                transport = int(event["transport_id"])
            elif kind == "TRANSPORT_SWITCH":
                transport = int(event["new_transport"])
        return transport - 1

    def alive(self) -> bool:
        return all(p is not None and p.poll() is None for p in (self.gateway, self.client))

    # -- traffic helpers -----------------------------------------------------------------

    def iperf_server(self) -> subprocess.Popen[bytes]:
        return iperf_server(self.topo)

    def iperf(
        self, host: str, seconds: float, reverse: bool = False, streams: int = 1
    ) -> dict[str, Any]:
        return iperf(self.topo, host, seconds, reverse, streams)


def iperf_server(topo: Topology) -> subprocess.Popen[bytes]:
    """``iperf3 -s`` in the gateway namespace (all addresses); killed with the topology."""
    proc = topo.exec(
        topo.gateway_ns,
        ["iperf3", "-s", "-p", str(IPERF_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.3)
    return proc


def iperf(
    topo: Topology, host: str, seconds: float, reverse: bool = False, streams: int = 1
) -> dict[str, Any]:
    """One iperf3 TCP run from the client namespace to ``host``: its JSON, or {"error": ...}.

    ``reverse``: ``-R`` (the server sends); ``streams`` > 1: ``-P streams``.
    """
    argv = ["iperf3", "-c", host, "-p", str(IPERF_PORT), "-t", str(seconds), "-J"]
    if reverse:
        argv.append("-R")
    if streams > 1:
        argv += ["-P", str(streams)]
    proc = topo.run(topo.client_ns, argv, timeout=seconds + 30)
    try:
        result: dict[str, Any] = json.loads(proc.stdout)
    except ValueError:
        result = {"error": (proc.stdout + proc.stderr).strip()[-500:]}
    return result


@dataclass
class Row:
    name: str
    mbit: float | None
    retransmits: int | None
    cpu: dict[str, float]
    note: str = ""


def iperf_row(name: str, result: dict[str, Any], cpu: dict[str, float], note: str = "") -> Row:
    if "error" in result:
        return Row(name, None, None, cpu, f"iperf3: {result['error']}")
    end = result.get("end", {})
    received = end.get("sum_received", {}).get("bits_per_second")
    retrans = end.get("sum_sent", {}).get("retransmits")
    return Row(name, received / 1e6 if received else None, retrans, cpu, note)


def run_iperf(
    rig: TunnelRig,
    name: str,
    host: str,
    seconds: float,
    *,
    reverse: bool = False,
    during: Callable[[], str] | None = None,
    streams: int = 1,
) -> Row:
    meter = CpuMeter(rig.pids).start()
    note = ""
    if during is None:
        result = rig.iperf(host, seconds, reverse, streams)
    else:
        box: dict[str, dict[str, Any]] = {}
        worker = threading.Thread(target=lambda: box.update(r=rig.iperf(host, seconds, reverse)))
        worker.start()
        note = during()
        worker.join()
        result = box.get("r", {"error": "no result"})
    cpu = meter.stop()
    return iperf_row(name, result, cpu, note)


def switch_during(rig: TunnelRig, at: float, restore_after: float = 2.0) -> Callable[[], str]:
    """Kill the active path ``at`` seconds into a run; restore it later; describe the switch."""

    def act() -> str:
        time.sleep(at)
        victim = rig.current_active()
        t_kill = time.monotonic()
        rig.topo.link_down(victim)
        time.sleep(restore_after)
        rig.topo.link_up(victim)
        switches = rig.events("TRANSPORT_SWITCH", since=t_kill)
        if not switches:
            return f"path {victim + 1} killed at {at:.0f}s: no switch within {restore_after:.0f}s"
        ev = switches[0][1]
        return (
            f"path {victim + 1} killed at {at:.0f}s -> {ev['new_transport']} "
            f"({ev['reason_code']}, switch_latency {ev['switch_latency_ms']:.0f} ms)"
        )

    return act


def print_table(rows: Sequence[Row], out: Any = sys.stdout) -> None:
    head = f"{'run':<34} {'Mbit/s':>8} {'retr':>6} {'gw CPU%':>8} {'cl CPU%':>8} {'sys CPU%':>9}"
    print(head, file=out)
    print("-" * len(head), file=out)
    for r in rows:
        mbit = f"{r.mbit:8.0f}" if r.mbit is not None else f"{'-':>8}"
        retr = f"{r.retransmits:6d}" if r.retransmits is not None else f"{'-':>6}"
        gw = r.cpu.get("gateway")
        cl = r.cpu.get("client")
        gw_s = f"{gw:8.0f}" if gw is not None else f"{'-':>8}"
        cl_s = f"{cl:8.0f}" if cl is not None else f"{'-':>8}"
        print(f"{r.name:<34} {mbit} {retr} {gw_s} {cl_s} {r.cpu.get('system', 0):9.0f}", file=out)
        if r.note:
            print(f"  {r.note}", file=out)


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The first "model name" of /proc/cpuinfo, or "?"."""
    with contextlib.suppress(OSError), open(cpuinfo) as fh:
        for line in fh:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "?"


def machine_facts() -> str:
    model = cpu_model()
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio (uvloop not installed)"
    return (
        f"CPU {model}, {os.cpu_count()} cores; kernel {os.uname().release}; "
        f"Python {sys.version.split()[0]}; loop {loop}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-t", "--time", type=float, default=10.0, help="seconds per iperf3 run")
    parser.add_argument(
        "--switch-at", type=float, default=None, metavar="S",
        help="add a run that kills the active path S seconds in (forced switch)",
    )  # fmt: skip
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="cProfile both engine loops into DIR/{gateway,client}.prof",
    )
    parser.add_argument("--no-reference", action="store_true", help="skip the veth runs")
    parser.add_argument(
        "--offloads", choices=("on", "off", "tso"), default="on",
        help="on: the programs' defaults (UDP GSO/GRO, TUN write coalescing); off: none of "
        "them (the per-packet baseline); tso: defaults plus the TUN read-side TSO prototype",
    )  # fmt: skip
    parser.add_argument(
        "--only", choices=("forward", "reverse"), default=None, help="run just one tunnel direction"
    )
    parser.add_argument(
        "--workers", type=int, default=1, metavar="N",
        help="the gateway's worker processes (default 1; its CPU column sums them)",
    )  # fmt: skip
    parser.add_argument("-P", "--streams", type=int, default=1, help="parallel iperf3 streams")
    args = parser.parse_args(argv)

    reason = cannot_run()
    if reason:
        print(f"throughput: skipped: {reason}")
        return 0
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)

    print(f"throughput: {machine_facts()}")
    print(f"load before: {loadavg()}; path MTU 1500 (veth), inner MTU {INNER_MTU}, "
          f"iperf3 TCP {args.time:.0f} s per run")  # fmt: skip
    rows: list[Row] = []
    print(f"offloads: {args.offloads}")
    print(f"gateway workers: {args.workers}; iperf3 streams: {args.streams}")
    rig_args = {"profile_dir": args.profile, "offloads": args.offloads, "workers": args.workers}
    with TunnelRig(2, **rig_args) as rig:
        server = rig.iperf_server()
        try:
            if args.only != "reverse":
                rows.append(run_iperf(rig, "tunnel client->gateway", INNER_GATEWAY, args.time,
                                      streams=args.streams))  # fmt: skip
            if args.only != "forward":
                rows.append(run_iperf(rig, "tunnel gateway->client (-R)", INNER_GATEWAY,
                                      args.time, reverse=True, streams=args.streams))  # fmt: skip
            if args.switch_at is not None:
                rows.append(
                    run_iperf(
                        rig, f"tunnel c->g, path kill at {args.switch_at:.0f}s",
                        INNER_GATEWAY, args.time, during=switch_during(rig, args.switch_at),
                    )
                )  # fmt: skip
            if not args.no_reference:
                veth = rig.topo.paths[0].gateway_ip
                rows.append(run_iperf(rig, "reference: veth, no tunnel", veth, args.time))
                rows.append(run_iperf(rig, "reference: veth, no tunnel (-R)", veth,
                                      args.time, reverse=True))  # fmt: skip
            if not rig.alive():
                print("warning: a tunnel program exited during the run\n" + rig.diagnostics())
            changes = [
                f"{e['new_state']} ({e['reason_code']})" for _, e in rig.events("STATE_CHANGE")
            ]
            switches = len(rig.events("TRANSPORT_SWITCH"))
        finally:
            server.kill()
    print()
    print_table(rows)
    print(f"\nclient over all runs: {switches} transport switch(es); state changes: "
          f"{', '.join(changes) or 'none'}")  # fmt: skip
    print(f"\nload after: {loadavg()}  (CPU%: gw/cl = percent of one core used by that "
          "process; sys = percent of all cores busy)")  # fmt: skip
    if args.profile is not None:
        print(f"profiles: {args.profile}/gateway.prof, {args.profile}/client.prof "
              "(python -m pstats FILE, then: sort tottime / stats 25)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
