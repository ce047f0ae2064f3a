"""The fault driver of the cluster checker: nodes, a wire collector, relays, random faults.

:class:`ChaosLab` runs, against a real etcd cluster (:class:`etcd_cluster.EtcdCluster`),

- ``nodes`` node processes (``tests/cluster_node.py``: a real ``NodeOwnership`` each,
  "forwarding" the sessions they own to the wire collector), each reaching etcd only
  through its own TCP relays (one per etcd member) so that it can be cut from etcd alone;
- the **wire collector**: one UDP socket; every datagram is written to ``wire.jsonl`` with
  its arrival time (``CLOCK_MONOTONIC``);
- a **reattacher** thread: every few hundred milliseconds a session is reattached through
  one, two or three nodes at once (``acquire`` on each: concurrent transfers);

and injects randomized faults (:data:`FAULTS`): ``kill -9`` a node and restart it, SIGSTOP
a node past its lease (and briefly), cut a node from etcd (connections reset, or stalled
and delivered late), stop one etcd member, freeze one, stop a majority, reattach one
session through every node at once. :meth:`ChaosLab.finish` heals everything, stops the
nodes, and reads the store's history of every session entry into ``history.jsonl``;
``tests/cluster_check.py`` then judges the directory.

Everything started here (node processes, relays, collector) is stopped in
:meth:`ChaosLab.close`, also after a failure; node processes also die with the process
that started them (``PR_SET_PDEATHSIG``). The etcd cluster belongs to the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from etcd_cluster import DIE_WITH_PARENT, EtcdCluster, wait_until

from tunnel.ownership import StoreUnavailable
from tunnel.ownership.etcd import EtcdSessionStore, decode_entry

REPO = Path(__file__).resolve().parents[1]
NODE = REPO / "tests" / "cluster_node.py"


# -- the wire collector ---------------------------------------------------------------------------


class Collector:
    """One UDP socket on loopback; writes each datagram with its arrival time."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with contextlib.suppress(OSError):  # root may exceed rmem_max: no drops under load
            self.sock.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.received = 0
        self._out = path.open("a", buffering=1)  # tests read it while it runs
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wire", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(2048)
            except TimeoutError:
                continue
            rx = time.monotonic()
            doc = json.loads(data)
            doc["rx"] = rx
            self._out.write(json.dumps(doc, separators=(",", ":")) + "\n")
            self.received += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        self._out.close()


# -- per-node relays to etcd ----------------------------------------------------------------------


class Relays:
    """TCP relays, one per (node, etcd member), on one asyncio loop thread.

    :meth:`cut` a node: ``reset`` aborts its connections and refuses new ones (connection
    errors); ``stall`` stops moving bytes both ways (calls time out; what was held is
    delivered late on :meth:`heal`).
    """

    def __init__(self, member_ports: list[int]) -> None:
        self.member_ports = member_ports
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="relays", daemon=True)
        self._thread.start()
        self._servers: list[asyncio.base_events.Server] = []
        self._state: dict[str, str] = {}
        self._gate: dict[str, asyncio.Event] = {}
        self._conns: dict[str, set[asyncio.StreamWriter]] = {}

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def add(self, node: str) -> list[str]:
        """Start the node's relays; their ``host:port`` endpoints, in member order."""

        async def start() -> list[str]:
            self._state[node] = "open"
            self._gate[node] = asyncio.Event()
            self._gate[node].set()
            self._conns[node] = set()
            endpoints = []
            for port in self.member_ports:
                server = await asyncio.start_server(
                    lambda r, w, p=port: self._serve(node, p, r, w), "127.0.0.1", 0
                )
                self._servers.append(server)
                endpoints.append(f"127.0.0.1:{server.sockets[0].getsockname()[1]}")
            return endpoints

        result: list[str] = self._run(start())
        return result

    async def _serve(
        self, node: str, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self._state[node] == "reset":
            writer.transport.abort()
            return
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            writer.transport.abort()
            return
        conns = self._conns[node]
        conns.update((writer, up_w))
        try:
            await asyncio.gather(self._pipe(node, reader, up_w), self._pipe(node, up_r, writer))
        finally:
            conns.discard(writer)
            conns.discard(up_w)
            for w in (writer, up_w):
                w.transport.abort()

    async def _pipe(
        self, node: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await reader.read(65536):
                await self._gate[node].wait()
                if self._state[node] == "reset":
                    break
                writer.write(data)
                await writer.drain()
        writer.transport.abort()

    def cut(self, node: str, mode: str) -> None:
        async def cut() -> None:
            self._state[node] = mode
            if mode == "stall":
                self._gate[node].clear()
                return
            self._gate[node].set()
            for w in list(self._conns[node]):
                w.transport.abort()

        self._run(cut())

    def heal(self, node: str) -> None:
        async def heal() -> None:
            self._state[node] = "open"
            self._gate[node].set()

        self._run(heal())

    def close(self) -> None:
        async def stop() -> None:
            for server in self._servers:
                server.close()
            for conns in self._conns.values():
                for w in list(conns):
                    w.transport.abort()

        with contextlib.suppress(Exception):
            self._run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


# -- node processes -------------------------------------------------------------------------------


class NodeProc:
    """One ``cluster_node.py`` process (respawned under the same node id and journal)."""

    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name = name
        self.argv = argv
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.frozen = False
        self.starts = 0
        self._lock = threading.Lock()

    def spawn(self) -> None:
        with self._lock, self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [*DIE_WITH_PARENT, sys.executable, str(NODE), *self.argv],
                stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            self.frozen = False
            self.starts += 1

    def started(self) -> bool:
        """True once the current process has its lease (its ``ready`` line)."""
        if not self.alive:
            raise AssertionError(f"node {self.name} exited: {self.log.read_text()[-2000:]}")
        return self.log.read_text().count("ready") >= self.starts

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send(self, line: str) -> None:
        with self._lock:
            if self.proc is None or self.proc.stdin is None or not self.alive:
                return
            with contextlib.suppress(OSError, ValueError):
                self.proc.stdin.write(line.encode() + b"\n")
                self.proc.stdin.flush()

    def signal(self, sig: signal.Signals) -> None:
        if self.alive and self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            self.frozen = sig == signal.SIGSTOP

    def kill9(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self.frozen = False

    def quit(self) -> None:
        if self.proc is None:
            return
        if self.frozen:
            self.signal(signal.SIGCONT)
        self.send("quit")
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.kill9()


# -- the lab --------------------------------------------------------------------------------------


class ChaosLab:
    """Nodes, relays, collector and reattacher on one etcd cluster (module docstring)."""

    def __init__(
        self, etcd: EtcdCluster, workdir: Path, nodes: int = 3, sessions: int = 4,
        ttl: int = 2, seed: int | None = None, reattacher: bool = True,
        node_args: tuple[str, ...] = (),
    ) -> None:  # fmt: skip
        self.etcd = etcd
        self.dir = workdir
        self.ttl = ttl
        self.seed = seed if seed is not None else random.randrange(1 << 32)
        self.rng = random.Random(self.seed)
        self.prefix = f"/jvpn/chaos{uuid.uuid4().hex[:8]}/"
        self.sids = [uuid.uuid4().hex for _ in range(sessions)]
        self.faults: Counter[str] = Counter()
        self.collector = Collector(workdir / "wire.jsonl")
        self.relays = Relays([m.client_port for m in etcd.members])
        self.nodes: list[NodeProc] = []
        for i in range(nodes):
            name = f"n{i}"
            endpoints = self.relays.add(name)
            argv = [
                "--endpoints", ",".join(endpoints), "--prefix", self.prefix, "--node", name,
                "--journal", str(workdir / f"node-{name}.jsonl"),
                "--wire", self.collector.address, "--ttl", str(ttl), *node_args,
            ]  # fmt: skip
            self.nodes.append(NodeProc(name, argv, workdir / f"node-{name}.log"))
        self.store = EtcdSessionStore(etcd.endpoints, self.prefix, timeout=2.0)
        self._stop = threading.Event()
        self._reattacher: threading.Thread | None = None
        self._with_reattacher = reattacher
        self.reattaches = 0
        self.unplanned_restarts = 0
        """Nodes that exited on their own and were started again (not injected faults)."""

    # -- start ------------------------------------------------------------------------------

    def start(self) -> None:
        for n in self.nodes:
            n.spawn()
        for n in self.nodes:
            wait_until(lambda n=n: n.started(), 60.0, 0.1, f"node {n.name} started")
        for i, sid in enumerate(self.sids):
            node = self.nodes[i % len(self.nodes)]

            def created(sid: str = sid, node: NodeProc = node) -> bool:
                node.send(f"create {sid}")
                with contextlib.suppress(StoreUnavailable):
                    return self.store.get(sid) is not None
                return False

            wait_until(created, 60.0, 0.5, f"session {sid[:8]} created")
        if self._with_reattacher:
            self._reattacher = threading.Thread(target=self._reattach_loop, daemon=True)
            self._reattacher.start()

    def _reattach_loop(self) -> None:
        while not self._stop.wait(self.rng.uniform(0.15, 0.6)):
            sid = self.rng.choice(self.sids)
            alive = [n for n in self.nodes if n.alive]
            if not alive:
                continue
            k = min(len(alive), self.rng.choice([1, 1, 2, 2, 3]))
            for n in self.rng.sample(alive, k):
                n.send(f"acquire {sid}")
            self.reattaches += 1

    # -- faults -----------------------------------------------------------------------------

    def pause(self, lo: float, hi: float) -> None:
        time.sleep(self.rng.uniform(lo, hi))

    def fault_kill(self) -> None:
        n = self.rng.choice(self.nodes)
        n.kill9()
        self.pause(0.2, 2.5)
        n.spawn()

    def fault_stop_past_lease(self) -> None:
        n = self.rng.choice(self.nodes)
        n.signal(signal.SIGSTOP)
        self.pause(self.ttl + 0.5, self.ttl + 2.0)
        n.signal(signal.SIGCONT)

    def fault_stop_short(self) -> None:
        n = self.rng.choice(self.nodes)
        n.signal(signal.SIGSTOP)
        self.pause(0.05, 1.0)
        n.signal(signal.SIGCONT)

    def _cut(self, mode: str) -> None:
        n = self.rng.choice(self.nodes)
        self.relays.cut(n.name, mode)
        self.pause(0.5, self.ttl + 2.0)
        self.relays.heal(n.name)

    def fault_cut_reset(self) -> None:
        self._cut("reset")

    def fault_cut_stall(self) -> None:
        self._cut("stall")

    def fault_etcd_minority(self) -> None:
        i = self.rng.randrange(len(self.etcd.members))
        self.etcd.stop(i)
        self.pause(1.0, 4.0)
        self.etcd.start(i)

    def fault_etcd_freeze(self) -> None:
        i = self.rng.randrange(len(self.etcd.members))
        self.etcd.freeze(i)
        self.pause(0.5, 3.0)
        self.etcd.thaw(i)

    def fault_etcd_majority(self) -> None:
        members = self.rng.sample(range(len(self.etcd.members)), len(self.etcd.members) // 2 + 1)
        for i in members:
            self.etcd.stop(i)
        self.pause(1.0, 4.0)
        self.etcd.heal()

    def fault_concurrent_reattach(self) -> None:
        sid = self.rng.choice(self.sids)
        for n in self.nodes:
            n.send(f"acquire {sid}")
        self.pause(0.3, 1.0)

    def one_fault(self) -> str:
        kind = self.rng.choices(list(FAULTS), weights=[w for w, _ in FAULTS.values()])[0]
        FAULTS[kind][1](self)
        self.faults[kind] += 1
        self._respawn_dead()
        self.pause(0.3, 1.0)
        return kind

    def _respawn_dead(self) -> None:
        """A node that exited on its own (e.g. no lease at start: etcd unreachable)."""
        for n in self.nodes:
            if not n.alive:
                n.spawn()
                self.unplanned_restarts += 1

    def run(self, faults: int | None = None, seconds: float | None = None,
            progress: Callable[[int, str], None] | None = None) -> None:  # fmt: skip
        """Inject faults until ``faults`` were injected or ``seconds`` passed."""
        began = time.monotonic()
        done = 0
        while (faults is None or done < faults) and (
            seconds is None or time.monotonic() - began < seconds
        ):
            kind = self.one_fault()
            done += 1
            if progress is not None:
                progress(done, kind)

    # -- finish -----------------------------------------------------------------------------

    def finish(self) -> None:
        """Heal, let traffic settle, stop the nodes, read the store's history."""
        for n in self.nodes:
            self.relays.heal(n.name)
            if n.frozen:
                n.signal(signal.SIGCONT)
        self.etcd.heal()
        self._respawn_dead()
        time.sleep(self.ttl + 1.0)
        self._stop.set()
        if self._reattacher is not None:
            self._reattacher.join(5)
        for n in self.nodes:
            n.quit()
        time.sleep(0.3)
        self.collector.close()
        self.dump_history(self.dir / "history.jsonl")

    def dump_history(self, path: Path) -> None:
        dump_history(self.store, path)

    def close(self) -> None:
        self._stop.set()
        for n in self.nodes:
            if n.alive:
                n.signal(signal.SIGCONT)
                n.kill9()
        with contextlib.suppress(Exception):
            self.collector.close()
        self.relays.close()
        self.store.close()


def dump_history(store: EtcdSessionStore, path: Path) -> None:
    """Every write of every session entry under the store's prefix, in revision order,
    as JSON lines (etcd keeps them all: the test clusters never compact). ``key`` and
    ``next`` are the counter reservation of a record written by ``cluster_node.py``
    (None for a gateway's sealed resume state)."""
    sentinel = store.prefix + b"end"
    sprefix = store.prefix + b"s/"

    async def read(client: Any) -> list[Any]:
        await client.put(sentinel, b"1")
        watch = await client.watch_prefix(store.prefix, start_revision=1)
        events = []
        async for ev in watch:
            if ev.kv.key == sentinel:
                break
            if ev.kv.key.startswith(sprefix) and ev.kind == "PUT":
                events.append(ev.kv)
        await watch.cancel()
        return events

    kvs = store.worker.call(read, 60.0)
    with path.open("w") as out:
        for kv in kvs:
            entry = decode_entry(kv.value, kv.mod_revision)
            try:
                res = json.loads(entry.record.resume)
            except ValueError:
                res = {"key": None, "next": None}
            doc = {
                "rev": kv.mod_revision, "sid": entry.record.session_id,
                "ver": entry.record.state_version, "state": entry.record.state,
                "node": entry.record.owner_node,
                "epoch": entry.owner_epoch, "key": res["key"], "next": res["next"],
            }  # fmt: skip
            out.write(json.dumps(doc, sort_keys=True) + "\n")


FAULTS: dict[str, tuple[float, Callable[[ChaosLab], None]]] = {
    "kill -9 a node, restart it": (3, ChaosLab.fault_kill),
    "SIGSTOP a node past its lease": (3, ChaosLab.fault_stop_past_lease),
    "SIGSTOP a node briefly": (1, ChaosLab.fault_stop_short),
    "cut a node from etcd (reset)": (2, ChaosLab.fault_cut_reset),
    "cut a node from etcd (stall)": (2, ChaosLab.fault_cut_stall),
    "stop an etcd minority (1 member)": (2, ChaosLab.fault_etcd_minority),
    "freeze an etcd member": (1, ChaosLab.fault_etcd_freeze),
    "stop an etcd majority (2 members)": (2, ChaosLab.fault_etcd_majority),
    "reattach one session through every node": (3, ChaosLab.fault_concurrent_reattach),
}
"""Fault kind -> (weight, injector)."""
