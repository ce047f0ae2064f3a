"""Gateway scale: N real sessions from one driver process against a real gateway over loopback.

The gateway is a separate process (this script with ``serve``): a ``GatewayRuntime`` with N
allowed clients (keys derived from a seed, so the driver knows them), the echo inner side
and the default policy. The driver runs N ``ClientSession`` cores, each on its own UDP
socket bound to its own loopback address (127.x.y.z: the gateway's per-source handshake
budget sees N hosts, as with N real clients), in one selector loop with one timer
(the same ``DeadlineQueue`` the gateway uses). It measures, in this order:

- burst arrival: all N start their handshakes at once from lean handshake-only driver
  processes (bench/burst.py: ``--burst-drivers``, one per core but one by default); how
  many attach within ``--burst-window`` (60 s), attached count against time, the handshake
  rate, CPU of gateway and drivers, load average; then this driver's full clients connect
  in waves until all are attached (or ``--setup-limit``);
- gateway memory per session: RSS (/proc/<pid>/status) after minus before, over N;
- idle gateway CPU: utime+stime (/proc/<pid>/stat) over ``--idle`` (30 s) of idle sessions
  at the default policy (the clients only probe);
- reattach validations per second: every client asks for a manual reattach at once; the
  rate at which the gateway's REATTACH_ACKs come back (driver and gateway share the cores);
- shutdown: SIGTERM to the gateway; seconds until it has exited, its exit status and how
  many clients received their TERMINATE.

``python bench/scale.py -n 2000`` prints a table with the machine facts (CPU model).

``python bench/scale.py idle-process`` measures the idle gateway CPU alone, with a driver
that keeps to the idle schedule (``idle_process``): the idle row of the full run above is
taken while one driver loop serves every client, and when it reads answers late (over
150 ms) the clients retry their probes fast, so the gateway sees more datagrams than the
schedule gives. ``idle`` and ``core`` measure the gateway core alone, in process.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import os
import random
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tunnel.core.client import ClientSession, PathSpec
from tunnel.core.constants import MSG_DATA
from tunnel.core.events import Reason, ReattachResult, StateChange
from tunnel.core.handshake import public_key
from tunnel.core.policy import POLICY_DEFAULT, Policy
from tunnel.core.session import State

if TYPE_CHECKING:
    from tunnel.core.gateway import GatewaySessions
    from tunnel.core.timers import DeadlineQueue

HERE = Path(__file__).resolve().parent
INNER_GATEWAY = "10.64.0.1"
INNER_PREFIX = 10
WAVE = 200
"""Clients connected at once after the burst: about the gateway's handshake budget per
second, so every response arrives before its client sends a new INIT."""


def policy_for(probe_ms: int) -> Policy:
    """The default policy, or (``probe_ms`` > 0) one whose idle sessions probe every
    ``probe_ms`` (death after five silent intervals). Clients end at the gateway's
    ``gateway_shutdown`` (``lost_state = "terminate"``): the shutdown is what is measured."""
    base = dataclasses.replace(POLICY_DEFAULT, lost_state="terminate")
    if probe_ms <= 0:
        return base
    return dataclasses.replace(
        base, probe_interval_ms=probe_ms,
        standby_probe_interval_ms=max(probe_ms, POLICY_DEFAULT.standby_probe_interval_ms),
        dead_min_ms=5 * probe_ms,
    )  # fmt: skip


def key_of(seed: bytes, i: int) -> bytes:
    """Client ``i``'s static private key (any 32 bytes are an X25519 key)."""
    return hashlib.sha256(seed + i.to_bytes(4, "big")).digest()


def host_of(i: int) -> str:
    """Client ``i``'s own loopback address (never 127.0.0.1, the gateway's)."""
    return f"127.{2 + i // 62_500}.{1 + i // 250 % 250}.{1 + i % 250}"


def inner_of(i: int) -> str:
    j = i + 2
    return f"10.{64 + j // 65_536}.{j // 256 % 256}.{j % 256}"


# == the gateway process ====================================================================
def serve(n: int, seed: bytes, handshake_rate: float, probe_ms: int, gc_freeze: bool) -> int:
    """Run a gateway for N clients until SIGTERM; print its port, then exit 0. With
    ``gc_freeze`` the runtime has the program's collector policy (jvpn-gateway's)."""
    from tunnel.core.gateway_session import ClientEntry
    from tunnel.gateway.gcfreeze import GcFreezer
    from tunnel.gateway.inner import EchoInner
    from tunnel.gateway.runtime import GatewayRuntime

    clients = [ClientEntry(f"c{i}", public_key(key_of(seed, i)), inner_of(i)) for i in range(n)]
    rt = GatewayRuntime(
        static_private=key_of(seed, 1 << 31), clients=clients, policy=policy_for(probe_ms),
        policy_poll_s=None, inner=EchoInner(INNER_GATEWAY, ""), inner_gateway=INNER_GATEWAY,
        inner_prefix=INNER_PREFIX, node_id="scale-gw",
    )  # fmt: skip
    if handshake_rate > 0:  # a test's setup: a larger budget, and no cookie round trip
        rt.gateway.admission.handshakes.configure(handshake_rate, handshake_rate)
        rt.gateway.admission.set_cookie_threshold(0.0)
    pauses = gc_pauses()
    rt.open()
    if gc_freeze:
        rt.set_gc_freezer(GcFreezer().install())
    budget = rt.gateway.admission.handshakes
    print(f"gateway: handshake budget {budget.rate:.0f}/s (bucket {budget.burst:.0f})",
          file=sys.stderr, flush=True)  # fmt: skip
    print(f"PORT {rt.addresses[0][1]}", flush=True)
    rt.run(install_signals=True)
    rt.close()
    t = rt.traffic
    print(f"gateway: {t.datagrams_out} datagrams sent, {t.send_failed} failed", file=sys.stderr)
    print(f"gateway: drops {dict(sorted(rt.gateway.drops.items()))}", file=sys.stderr)
    frozen = f", gc.freeze: {rt.gc_freezer.frozen} objects frozen" if rt.gc_freezer else ""
    print(f"gateway: garbage collections {pauses.summary()}{frozen}", file=sys.stderr)
    return 0


@dataclass
class GcPauses:
    """The garbage collector's pauses of this process, by generation (gc.callbacks)."""

    count: list[int] = field(default_factory=lambda: [0, 0, 0])
    total: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    longest: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    _start: float = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        g, took = info["generation"], time.perf_counter() - self._start
        self.count[g] += 1
        self.total[g] += took
        self.longest[g] = max(self.longest[g], took)

    def summary(self) -> str:
        return ", ".join(
            f"gen{g} {self.count[g]} ({1000 * self.total[g]:.0f} ms, longest "
            f"{1000 * self.longest[g]:.0f} ms)"
            for g in range(3)
        )


def gc_pauses() -> GcPauses:
    import gc

    pauses = GcPauses()
    gc.callbacks.append(pauses)
    return pauses


# == the driver =============================================================================
@dataclass
class Peer:
    """One client: its core and its socket."""

    i: int
    core: ClientSession
    sock: socket.socket
    terminated_by: Reason | None = None
    got_terminate: bool = False
    reattach_done: bool = False
    attached_at: float | None = None


@dataclass
class SendTiming:
    """Per client: the time between two of its sends, and from a send to the next
    datagram it reads (the answer's delay as the driver sees it, its own loop included)."""

    gaps: list[float] = field(default_factory=list)
    delays: list[float] = field(default_factory=list)
    last: dict[int, float] = field(default_factory=dict)
    waiting: dict[int, float] = field(default_factory=dict)

    def sent(self, i: int, t: float) -> None:
        before = self.last.get(i)
        if before is not None:
            self.gaps.append(t - before)
        self.last[i] = t
        self.waiting[i] = t

    def answered(self, i: int, t: float) -> None:
        asked = self.waiting.pop(i, None)
        if asked is not None:
            self.delays.append(t - asked)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[round(q * (len(ordered) - 1))] if ordered else float("nan")


@dataclass
class Swarm:
    """N client cores in one selector loop with one timer (a DeadlineQueue)."""

    gateway: tuple[str, int]
    gateway_public: bytes
    seed: bytes
    policy: Policy = POLICY_DEFAULT
    peers: dict[int, Peer] = field(default_factory=dict)
    sel: selectors.BaseSelector = field(default_factory=selectors.DefaultSelector)

    def __post_init__(self) -> None:
        from tunnel.core.timers import DeadlineQueue  # here: a "before" gateway lacks it

        self.timers: DeadlineQueue[int] = DeadlineQueue(self._deadline)
        self._out: set[int] = set()
        self.sent = 0
        """Datagrams the clients sent (probes, when idle)."""
        self.timing: SendTiming | None = None
        """Set: every send and answer is timed (``idle-process`` mode)."""

    def _deadline(self, i: int) -> float | None:
        p = self.peers.get(i)
        return None if p is None else p.core.next_deadline()

    def connect(self, i: int, now: float) -> None:
        old = self.peers.pop(i, None)
        if old is not None:
            self.sel.unregister(old.sock)
            old.sock.close()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((host_of(i), 0))
        sock.setblocking(False)
        sock.connect(self.gateway)
        core = ClientSession(
            static_private=key_of(self.seed, i), gateway_public=self.gateway_public,
            paths=[PathSpec(0, "lo")], policy=self.policy, now=now,
            # its own random stream: not the one whose first draw was the burst driver's
            # sender index for client 0 (the gateway would take the INIT for a retry)
            rng=random.Random(f"full client {i}"), node_id=f"c{i}",
            # wall-clock INIT timestamps, as the real client's: the burst's lean drivers
            # sent these clients' keys before, and the gateway refuses an older timestamp
            wall_offset=time.time() - time.monotonic(),
        )  # fmt: skip
        self.peers[i] = Peer(i, core, sock)
        self.sel.register(sock, selectors.EVENT_READ, i)
        core.connect(now)
        self._touched(i)

    def _touched(self, i: int) -> None:
        self.timers.touch(i)
        self._out.add(i)

    def count(self, state: State) -> int:
        return sum(1 for p in self.peers.values() if p.core.state is state)

    def step(self, max_wait: float = 0.05) -> None:
        deadline = self.timers.next_deadline()
        now = time.monotonic()
        wait = max_wait if deadline is None else min(max_wait, deadline - now)
        ready = self.sel.select(max(0.0, wait))
        now = time.monotonic()
        for key, _ in ready:
            self._read(key.data, now)
        for i in self.timers.due(now):
            p = self.peers.get(i)
            if p is not None:
                p.core.handle_timer(now)
                self._out.add(i)
        self._flush()

    def _read(self, i: int, now: float) -> None:
        p = self.peers.get(i)
        if p is None:
            return
        timing = self.timing
        if timing is not None:
            timing.answered(i, time.monotonic())
        for _ in range(64):
            try:
                data = p.sock.recv(2048)
            except (BlockingIOError, ConnectionRefusedError):
                break
            p.core.receive_datagram(data, 0, now)
        self._touched(i)

    def _flush(self) -> None:
        out, self._out = self._out, set()
        for i in out:
            p = self.peers.get(i)
            if p is None:
                continue
            for _pid, data in p.core.datagrams_to_send():
                self.sent += 1
                if self.timing is not None:
                    self.timing.sent(i, time.monotonic())
                try:
                    p.sock.send(data)
                except OSError:
                    pass  # a full loopback queue: a lost datagram, as on a network
            for ev in p.core.events():
                self._note(p, ev)

    @staticmethod
    def _note(p: Peer, ev: object) -> None:
        if isinstance(ev, ReattachResult) and ev.status == "SUCCESS":
            p.reattach_done = True
        elif not isinstance(ev, StateChange):
            return
        elif ev.previous_state == State.BIRTH and ev.new_state == State.ATTACHED:
            p.attached_at = time.monotonic()
        elif ev.new_state == State.TERMINATED:
            p.terminated_by = ev.reason_code
            p.got_terminate = ev.reason_code == Reason.GATEWAY_SHUTDOWN

    def keep_share(self, k: int, parts: int) -> None:
        """After a fork: keep only clients ``i % parts == k`` (close the others' sockets),
        on a selector and timer of this process's own (an epoll set is shared by fork)."""
        self.sel = selectors.DefaultSelector()  # the inherited one is left open: the parent's
        for i in list(self.peers):
            if i % parts != k:
                self.peers.pop(i).sock.close()
            else:
                self.sel.register(self.peers[i].sock, selectors.EVENT_READ, i)
        from tunnel.core.timers import DeadlineQueue

        self.timers = DeadlineQueue(self._deadline)
        self.timers.touch_all(self.peers)
        self._out = set(self.peers)

    def run_until(self, done: object, limit: float) -> bool:
        end = time.monotonic() + limit
        while time.monotonic() < end:
            if done():  # type: ignore[operator]
                return True
            self.step()
        return bool(done())  # type: ignore[operator]

    def close(self) -> None:
        for p in self.peers.values():
            p.sock.close()
        self.sel.close()


# == measurements ===========================================================================
def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_gateway(
    n: int, seed: bytes, handshake_rate: float, pythonpath: str, probe_ms: int = 0,
    gc_freeze: bool = True,
) -> tuple[subprocess.Popen[str], int]:  # fmt: skip
    env = dict(os.environ, PYTHONPATH=pythonpath)
    cmd = [sys.executable, str(HERE / "scale.py"), "serve", "-n", str(n), "--seed", seed.hex()]
    cmd += ["--handshake-rate", str(handshake_rate), "--probe-ms", str(probe_ms)]
    cmd += [] if gc_freeze else ["--no-gc-freeze"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        proc.kill()
        raise RuntimeError(f"gateway did not start: {line!r}")
    return proc, int(line.split()[1])


@dataclass
class Results:
    rows: list[tuple[str, str]] = field(default_factory=list)

    def add(self, name: str, value: str) -> None:
        self.rows.append((name, value))
        print(f"  {name}: {value}", file=sys.stderr, flush=True)


def attach_all(
    sw: Swarm, n: int, window: float, setup_limit: float, res: Results, gw_pid: int,
    drivers: int = 0,
) -> int:  # fmt: skip
    """Burst arrival: all N at once from lean handshake-only driver processes
    (bench/burst.py: the measurement is the gateway's, not one driver's); then the full
    clients of this driver connect in waves (the rest of the measurements need them)."""
    from burst import run_burst  # type: ignore[import-not-found]

    t0 = time.monotonic()
    burst = run_burst(n, sw.seed, sw.gateway[1], sw.gateway_public, gw_pid, window, drivers)
    for name, value in burst.rows(window):
        res.add(name, value)
    t1 = time.monotonic()
    attached = attach_in_waves(sw, n, setup_limit)
    res.add(
        "full clients of this driver attached in waves",
        f"{attached} / {n} in {time.monotonic() - t1:.1f} s "
        f"(burst and waves {time.monotonic() - t0:.1f} s)",
    )
    return attached


def attach_in_waves(
    sw: Swarm, n: int, limit: float, wave: int = WAVE, *, stall: float | None = None
) -> int:
    """Connect every client that is not attached, ``wave`` at a time, until all are or
    ``limit`` seconds have passed (``stall`` given: until no client attached for that
    long, however slow the machine is); the number attached."""
    end = time.monotonic() + limit
    progress_at, attached = time.monotonic(), sw.count(State.ATTACHED)
    while time.monotonic() < end if stall is None else time.monotonic() - progress_at < stall:
        todo = [
            i for i in range(n) if i not in sw.peers or sw.peers[i].core.state is State.TERMINATED
        ]
        if not todo:
            break
        chunk = todo[:wave]
        for i in chunk:
            sw.connect(i, time.monotonic())
        sw.run_until(
            lambda c=chunk: all(sw.peers[i].core.state is not State.BIRTH for i in c), 10.0
        )
        if (now_attached := sw.count(State.ATTACHED)) > attached:
            progress_at, attached = time.monotonic(), now_attached
    return sw.count(State.ATTACHED)


def measure_idle(sw: Swarm, pid: int, idle: float, res: Results) -> None:
    # settle: the handshake replies and first probes, and (default policy) until the last
    # sessions to attach are idle too (idle_after_ms without inner data)
    sw.run_until(lambda: False, 2.0 + sw.policy.idle_after_ms / 1000)
    c0, t0, sent0 = cpu_s(pid), time.monotonic(), sw.sent
    sw.run_until(lambda: False, idle)
    used, wall, sent = cpu_s(pid) - c0, time.monotonic() - t0, sw.sent - sent0
    res.add(f"idle gateway CPU over {wall:.0f} s", f"{100 * used / wall:.1f} % of a core")
    res.add("idle: datagrams from clients (/s)", f"{sent / wall:.0f}")
    res.add("idle: gateway CPU per datagram", f"{1e6 * used / max(1, sent):.0f} us")


def drive_in_parts(sw: Swarm, parts: int, window: float) -> tuple[int, float, SendTiming]:
    """Run the attached clients for ``window`` seconds split over ``parts`` processes
    (forked: each keeps its share of the clients, sockets and cores, so no one driver loop
    answers 10,000 clients late); the datagrams they sent, their CPU seconds and the
    merged timing."""
    import json

    children: list[tuple[int, int]] = []
    for k in range(1, parts):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # a driver of its own share; reports through the pipe, then exits
            os.close(r)
            sw.keep_share(k, parts)
            sw.timing, c0, sent0 = SendTiming(), time.process_time(), sw.sent
            sw.run_until(lambda: False, window)
            report = [sw.sent - sent0, time.process_time() - c0, sw.timing.gaps,
                      sw.timing.delays]  # fmt: skip
            with os.fdopen(w, "w") as out:
                json.dump(report, out)
            os._exit(0)
        os.close(w)
        children.append((pid, r))
    if parts > 1:
        sw.keep_share(0, parts)
    sw.timing, c0, sent0 = SendTiming(), time.process_time(), sw.sent
    sw.run_until(lambda: False, window)
    timing, sent, used = sw.timing, sw.sent - sent0, time.process_time() - c0
    for pid, r in children:
        with os.fdopen(r) as inp:
            n, cpu, gaps, delays = json.load(inp)
        os.waitpid(pid, 0)
        sent, used = sent + n, used + cpu
        timing.gaps += gaps
        timing.delays += delays
    return sent, used, timing


def raise_fd_limit() -> None:
    """One socket per client: open files up to the hard limit."""
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def idle_process(args: argparse.Namespace) -> list[tuple[str, str]]:
    """Idle CPU of the real gateway process at the default policy. One driver attaches
    the N clients ``--wave`` at a time (25: their probe schedules are spread over the
    10 s interval, as real clients' are; waves of 200 made them probe in bursts that the
    driver answered late, and late answers are retried after 150 ms, docs/policy.md), lets
    them become idle (``idle_after_ms`` + 2 s), then takes the gateway's utime+stime over
    ``--idle`` seconds. The table shows whether the driver kept to the idle schedule (its
    datagrams per second against N / ``idle_probe_interval``, how many sends came within
    1 s of the client's previous one: fast retries) and how late answers were read."""
    raise_fd_limit()
    seed = os.urandom(8)
    policy = policy_for(args.probe_ms)
    proc, port = start_gateway(
        args.n, seed, 2000.0, args.gateway_path, args.probe_ms, not args.no_gc_freeze
    )
    sw = Swarm(("127.0.0.1", port), public_key(key_of(seed, 1 << 31)), seed, policy)
    rows: list[tuple[str, str]] = []
    try:
        time.sleep(0.5)
        rss0, t0 = rss_kib(proc.pid), time.monotonic()
        attached = attach_in_waves(sw, args.n, args.setup_limit, args.wave, stall=30.0)
        rows.append(("idle (process): clients attached",
                     f"{attached} / {args.n} in {time.monotonic() - t0:.0f} s, "
                     f"{args.wave} at a time"))  # fmt: skip
        sw.run_until(lambda: False, 2.0 + policy.idle_after_ms / 1000)
        rss1 = rss_kib(proc.pid)
        rows.append(("gateway RSS, memory per session",
                     f"{rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB, "
                     f"{(rss1 - rss0) * 1024 / max(1, attached):.0f} B"))  # fmt: skip
        c0, w0 = cpu_s(proc.pid), time.monotonic()
        sent, dused, timing = drive_in_parts(sw, args.drivers, args.idle)
        wall = time.monotonic() - w0
        used = cpu_s(proc.pid) - c0
        schedule = attached / (policy.idle_probe_interval_ms / 1000)
        fast = sum(1 for g in timing.gaps if g < 1.0)
        ms = [1000 * quantile(timing.delays, q) for q in (0.5, 0.9, 0.99)]
        rows += [
            (f"idle gateway CPU over {wall:.0f} s (real process)",
             f"{100 * used / wall:.1f} % of a core"),
            ("idle: datagrams from clients (/s)", f"{sent / wall:.0f} (schedule: {schedule:.0f})"),
            ("idle: gateway CPU per datagram (socket I/O included)",
             f"{1e6 * used / max(1, sent):.0f} us"),
            ("idle: sends within 1 s of the client's previous one (fast retries)",
             f"{fast} of {len(timing.gaps)}"),
            ("idle: answer read after (median / p90 / p99)",
             " / ".join(f"{v:.0f} ms" for v in ms)),
            (f"idle: CPU of the {args.drivers} driver processes",
             f"{100 * dused / wall:.1f} % of a core"),
            ("load average at the end", " ".join(f"{x:.2f}" for x in os.getloadavg())),
        ]  # fmt: skip
    finally:
        sw.timing = None
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        sw.close()
    return rows


def measure_reattach(sw: Swarm, res: Results) -> None:
    now = time.monotonic()
    live = [p for p in sw.peers.values() if p.core.state is State.ATTACHED]
    t0 = time.monotonic()
    for p in live:
        p.core.force_reattach(now)
        sw._touched(p.i)
    sw.run_until(lambda: all(p.reattach_done for p in live), 60.0)
    took = time.monotonic() - t0
    done = sum(1 for p in live if p.reattach_done)
    res.add("reattach validations (/s, driver on the same cores)", f"{done / took:.0f}")


def measure_shutdown(sw: Swarm, proc: subprocess.Popen[str], res: Results) -> tuple[int, int]:
    live = [p for p in sw.peers.values() if p.core.state is not State.TERMINATED]
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code: int | None = None
    while time.monotonic() - t0 < 60.0 and code is None:
        sw.step(0.01)
        code = proc.poll()
    took = time.monotonic() - t0
    if code is None:
        proc.kill()
        code = proc.wait()
    sw.run_until(lambda: all(p.got_terminate for p in live), 5.0)
    got = sum(1 for p in live if p.got_terminate)
    res.add("SIGTERM shutdown", f"{took:.2f} s, exit {code}, TERMINATE to {got} / {len(live)}")
    return code, got


def core(n: int, seed: bytes) -> list[tuple[str, str]]:
    """The gateway core alone (no sockets, no driver loop): N sessions opened by real
    INITs, then the cost of ``next_deadline()`` after one input (the timer structure),
    ``handle_timer`` when one session is due, and a shutdown (TERMINATE to every session,
    batched where the core supports it, with the outputs taken as the runtime does)."""

    from tunnel.core.gateway import GatewaySessions
    from tunnel.core.gateway_session import ClientEntry

    now = 1000.0
    clients = [ClientEntry(f"c{i}", public_key(key_of(seed, i)), inner_of(i)) for i in range(n)]
    gw = GatewaySessions(
        static_private=key_of(seed, 1 << 31), clients=clients, policy=POLICY_DEFAULT, now=now,
        urandom=os.urandom, inner_gateway=INNER_GATEWAY, inner_prefix=INNER_PREFIX,
        cookie_threshold=0.0,
    )  # fmt: skip
    gw.admission.handshakes.configure(1e9, 1e9)
    gw_pub = public_key(key_of(seed, 1 << 31))
    prober: ClientSession | None = None
    for i in range(n):
        c = ClientSession(
            static_private=key_of(seed, i), gateway_public=gw_pub, paths=[PathSpec(0, "lo")],
            policy=POLICY_DEFAULT, now=now, rng=random.Random(i),
        )  # fmt: skip
        at = now + i * 1e-4  # the handshake bucket refills with time
        c.connect(at)
        for _pid, data in c.datagrams_to_send():
            gw.receive_datagram(data, (host_of(i), 40000), at)
        replies = gw.datagrams_to_send()
        gw.events()
        if prober is None:
            for _addr, data in replies:
                c.receive_datagram(data, 0, at)
            prober = c
    now += n * 1e-4
    rows = [("core: sessions", str(len(gw.sessions)))]
    if prober is not None:
        rows.append(("core: PROBE -> PROBE_ACK (one session)", probe_cost(gw, prober, now)))
    first = next(iter(gw.sessions.values()))
    forged = bytes([MSG_DATA, 0, 0, 0]) + first.index.to_bytes(4, "little") + bytes(40)
    reps = 200
    t0 = time.perf_counter()
    for _ in range(reps):
        gw.receive_datagram(forged, (host_of(0), 40000), now)  # one session's input
        gw.next_deadline()
    per = (time.perf_counter() - t0) / reps * 1e6
    rows.append(("core: one input + next_deadline()", f"{per:.0f} us"))
    batched = hasattr(gw, "terminate_many")
    t0 = time.perf_counter()
    sent = 0
    if batched:
        indexes = list(gw.sessions)
        for start in range(0, len(indexes), 64):  # as the runtime's shutdown does
            gw.terminate_many(indexes[start : start + 64], now, Reason.OPERATOR_TERMINATED)
            sent += len(gw.datagrams_to_send())
            gw.events()
    else:
        gw.terminate_all(now, Reason.OPERATOR_TERMINATED)
    sent += len(gw.datagrams_to_send())
    gw.events()
    took = time.perf_counter() - t0
    rows.append(("core: shutdown (terminate + outputs)", f"{took:.2f} s, {sent} TERMINATEs"))
    return rows


def idle_core(n: int, seed: bytes, window: float) -> list[tuple[str, str]]:
    """Idle gateway CPU at the default policy without a driver bottleneck: N real client
    cores and the gateway core in one process on a simulated clock (replies arrive at once).
    Every gateway call (``receive_datagram``, ``datagrams_to_send``, ``handle_timer``,
    ``next_deadline``, ``events``) is timed in CPU time of this thread (``time.thread_time``:
    time other processes hold the cores is not counted; the cost of reading that clock,
    calibrated, is subtracted per timed block); the sum over ``window`` simulated seconds of
    idle sessions (after ``idle_after_ms`` + 2 s without inner data) is the gateway core's
    share of one core. Socket I/O is not included (see docs/performance.md)."""
    import heapq

    from tunnel.core.gateway import GatewaySessions
    from tunnel.core.gateway_session import ClientEntry

    now = 1000.0
    entries = [ClientEntry(f"c{i}", public_key(key_of(seed, i)), inner_of(i)) for i in range(n)]
    gw = GatewaySessions(
        static_private=key_of(seed, 1 << 31), clients=entries, policy=POLICY_DEFAULT, now=now,
        urandom=os.urandom, inner_gateway=INNER_GATEWAY, inner_prefix=INNER_PREFIX,
        cookie_threshold=0.0,
    )  # fmt: skip
    gw.admission.handshakes.configure(1e9, 1e9)
    gw_pub = public_key(key_of(seed, 1 << 31))
    cores: list[ClientSession] = []
    index_of = {(host_of(i), 40000): i for i in range(n)}
    spent, datagrams = 0.0, 0
    parts = {"receive": 0.0, "outputs": 0.0, "timer": 0.0, "next_deadline": 0.0}

    def account(part: str, t0: float) -> None:
        nonlocal spent
        took = time.thread_time() - t0 - clock_cost
        spent += took
        parts[part] += took

    clock_cost = 0.0
    t_cal = time.thread_time()
    for _ in range(20_000):
        account("receive", time.thread_time())
    clock_cost = (time.thread_time() - t_cal) / 20_000 / 2
    spent = 0.0
    parts["receive"] = 0.0

    def to_clients(t: float) -> None:
        nonlocal spent
        t0 = time.thread_time()
        replies = gw.datagrams_to_send()
        gw.events()
        account("outputs", t0)
        for addr, data in replies:
            i = index_of[addr]  # type: ignore[index]  # an Addr is a (host, port) here
            cores[i].receive_datagram(data, 0, t)
            heapq.heappush(heap, (cores[i].next_deadline() or t + 1e9, i))

    def to_gateway(i: int, t: float) -> bool:
        nonlocal spent, datagrams
        out = cores[i].datagrams_to_send()
        cores[i].events()
        if not out:
            return False
        t0 = time.thread_time()
        for _pid, data in out:
            gw.receive_datagram(data, (host_of(i), 40000), t)
        account("receive", t0)
        datagrams += len(out)
        return True

    heap: list[tuple[float, int]] = []
    for i in range(n):
        c = ClientSession(
            static_private=key_of(seed, i), gateway_public=gw_pub, paths=[PathSpec(0, "lo")],
            policy=POLICY_DEFAULT, now=now, rng=random.Random(i),
        )  # fmt: skip
        cores.append(c)
        at = now + i * 1e-4  # the handshake bucket refills with time
        c.connect(at)
        to_gateway(i, at)
        to_clients(at)
    now += n * 1e-4
    attached = sum(1 for c in cores if c.state is State.ATTACHED)

    def gateway_deadline() -> float | None:
        """What the runtime asks after each input batch (timed)."""
        nonlocal spent
        t0 = time.thread_time()
        g = gw.next_deadline()
        account("next_deadline", t0)
        return g

    def run(until: float) -> None:
        nonlocal spent
        g = gateway_deadline()
        while True:
            t = min(heap[0][0] if heap else until, g if g is not None else until)
            if t >= until:
                return
            if g is not None and g <= t:
                t0 = time.thread_time()
                gw.handle_timer(t)
                account("timer", t0)
                to_clients(t)
                g = gateway_deadline()
                continue
            _due, i = heapq.heappop(heap)
            c = cores[i]
            d = c.next_deadline()
            if d is not None and d > t:
                heapq.heappush(heap, (d, i))
                continue
            c.handle_timer(t)
            if to_gateway(i, t):
                to_clients(t)
                g = gateway_deadline()
            nd = c.next_deadline()
            if nd is not None:
                heapq.heappush(heap, (nd, i))

    # getattr: the same script measures a checkout from before idle sessions existed
    warm = now + getattr(POLICY_DEFAULT, "idle_after_ms", 0) / 1000 + 2.0
    run(warm)
    now = warm
    spent, datagrams = 0.0, 0
    parts.update(dict.fromkeys(parts, 0.0))
    run(now + window)
    idle = sum(1 for c in cores if getattr(c, "idle", lambda _t: False)(now + window))
    return [
        ("idle (core, simulated clock): sessions attached / idle", f"{attached} / {idle}"),
        (f"idle gateway core CPU over {window:.0f} s", f"{100 * spent / window:.2f} % of a core"),
        ("idle: datagrams from clients (/s)", f"{datagrams / window:.0f}"),
        ("idle: gateway core CPU per datagram", f"{1e6 * spent / max(1, datagrams):.1f} us"),
        ("idle: gateway core CPU by call (receive / outputs / timer / next_deadline)",
         " / ".join(f"{100 * v / max(spent, 1e-9):.0f} %" for v in parts.values())),
    ]  # fmt: skip


def probe_cost(gw: GatewaySessions, client: ClientSession, now: float) -> str:
    """Gateway CPU per PROBE answered: ``receive_datagram`` of a real PROBE from the
    session's binding and taking the PROBE_ACK (``datagrams_to_send``), as the runtime
    does; best of 5 rounds of 2,000 probes (each with its own counter: no replay drop)."""
    from tunnel.core.wire import Probe

    reps, best = 2_000, float("inf")
    addr = (host_of(0), 40000)
    for _ in range(5):
        probes: list[bytes] = []
        for k in range(reps):
            client.send_control(0, Probe(k, 0, 0))
            probes.extend(d for _pid, d in client.datagrams_to_send())
        t0 = time.perf_counter()
        for data in probes:
            gw.receive_datagram(data, addr, now)
            gw.datagrams_to_send()
        best = min(best, (time.perf_counter() - t0) / reps)
        gw.events()
    return f"{best * 1e6:.1f} us"


def machine_facts() -> str:
    spec = importlib.util.spec_from_file_location("bench_throughput", HERE / "throughput.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_throughput"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return str(module.machine_facts())


def run(args: argparse.Namespace) -> int:
    raise_fd_limit()
    seed = os.urandom(8)
    proc, port = start_gateway(
        args.n, seed, args.handshake_rate, args.gateway_path, args.probe_ms, not args.no_gc_freeze
    )
    res = Results()
    gw_pub = public_key(key_of(seed, 1 << 31))
    sw = Swarm(("127.0.0.1", port), gw_pub, seed, policy_for(args.probe_ms))
    try:
        time.sleep(0.5)
        rss0 = rss_kib(proc.pid)
        attached = attach_all(
            sw, args.n, args.burst_window, args.setup_limit, res, proc.pid, args.burst_drivers
        )
        if args.burst_only:
            return _report(args, res)
        sw.run_until(lambda: False, 2.0)
        rss1 = rss_kib(proc.pid)
        res.add("gateway RSS", f"{rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB")
        per = f"{(rss1 - rss0) * 1024 / attached:.0f} B" if attached else "- (none attached)"
        res.add("gateway memory per session", per)
        measure_idle(sw, proc.pid, args.idle, res)
        if not args.no_reattach:
            measure_reattach(sw, res)
        measure_shutdown(sw, proc, res)
    finally:
        if proc.poll() is None:
            proc.kill()
        sw.close()
    return _report(args, res)


def _report(args: argparse.Namespace, res: Results) -> int:
    print(f"\nbench/scale.py -n {args.n}  ({time.strftime('%Y-%m-%d')})")
    print(machine_facts())
    print("\n| measurement | value |\n|---|---|")
    for name, value in res.rows:
        print(f"| {name} | {value} |")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "mode", nargs="?", default="run", choices=["run", "serve", "core", "idle", "idle-process"]
    )
    parser.add_argument("-n", type=int, default=10_000, help="sessions (default 10,000)")
    parser.add_argument("--seed", default="", help=argparse.SUPPRESS)
    parser.add_argument(
        "--handshake-rate", type=float, default=0.0,
        help="override the gateway's handshake budget (/s, cookies off; 0: its defaults)",
    )  # fmt: skip
    parser.add_argument(
        "--probe-ms", type=int, default=0,
        help="idle probe interval of gateway and clients (0: the default policy's)",
    )  # fmt: skip
    parser.add_argument("--idle", type=float, default=30.0, help="idle CPU window (s)")
    parser.add_argument("--burst-window", type=float, default=60.0)
    parser.add_argument("--setup-limit", type=float, default=180.0)
    parser.add_argument("--no-reattach", action="store_true")
    parser.add_argument(
        "--burst-drivers", type=int, default=0,
        help="lean driver processes of the burst (0: one per core but one)",
    )  # fmt: skip
    parser.add_argument("--burst-only", action="store_true", help="stop after the burst")
    parser.add_argument(
        "--wave", type=int, default=25, help="idle-process: clients attached at a time"
    )
    parser.add_argument(
        "--drivers", type=int, default=2, help="idle-process: driver processes of the window"
    )
    parser.add_argument(
        "--no-gc-freeze", action="store_true",
        help="the gateway process without jvpn-gateway's collector policy (a before/after run)",
    )  # fmt: skip
    parser.add_argument(
        "--gateway-path", default=os.environ.get("PYTHONPATH", str(HERE.parent)),
        help="PYTHONPATH of the gateway process (another checkout: a before/after run)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.mode == "core":
        print(f"bench/scale.py core -n {args.n}  ({time.strftime('%Y-%m-%d')})\n{machine_facts()}")
        print("\n| measurement | value |\n|---|---|")
        for name, value in core(args.n, os.urandom(8)):
            print(f"| {name} | {value} |")
        return 0
    if args.mode == "idle":
        print(f"bench/scale.py idle -n {args.n}  ({time.strftime('%Y-%m-%d')})\n{machine_facts()}")
        print("\n| measurement | value |\n|---|---|")
        for name, value in idle_core(args.n, os.urandom(8), args.idle):
            print(f"| {name} | {value} |")
        return 0
    if args.mode == "idle-process":
        print(f"bench/scale.py idle-process -n {args.n}  ({time.strftime('%Y-%m-%d')})\n"
              f"{machine_facts()}")  # fmt: skip
        print("\n| measurement | value |\n|---|---|")
        for name, value in idle_process(args):
            print(f"| {name} | {value} |")
        return 0
    if args.mode == "serve":
        return serve(
            args.n, bytes.fromhex(args.seed), args.handshake_rate, args.probe_ms,
            not args.no_gc_freeze,
        )  # fmt: skip
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
