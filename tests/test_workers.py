"""``workers = 2``: the jvpn-gateway program as two worker processes (issue 11, item 3).

Level 3: the real program on loopback UDP (inner_echo: no TUN, no root) and real
ClientSessions, stepped by one select loop in the test. What docs/gateway.md "Workers"
promises: every session lives on the worker its client's sender index names (low byte
modulo the number of workers) and stays there with all its traffic; each worker has its own
control socket (``PATH``, ``PATH.1``) and node id (``NODE-w0``, ``NODE-w1``); a worker
killed is reported and started again on the same slot, its sessions are lost (a client
handshakes again and lands on the new worker), the other worker's sessions are untouched;
SIGTERM to the supervisor stops every worker and tells every client. One control socket
for the whole gateway (the supervisor's): its status lists every worker's sessions with
the worker, names a worker that does not answer, its reload reaches every worker; one
``/metrics`` for every worker, counters summed. ``workers`` is one per core by default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import re
import select
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tunnel.core.client import ClientSession, PathSpec
from tunnel.core.events import EventType, Reason
from tunnel.core.handshake import generate_keypair
from tunnel.core.policy import POLICY_DEFAULT
from tunnel.core.session import State
from tunnel.gateway.config import ConfigError, load_gateway_config
from tunnel.gateway.inner import inet_checksum
from tunnel.gateway.workers import worker_config
from tunnel.io.udp import PathSocket
from tunnel.keys import write_private_key

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")
GATEWAY_INNER = "10.66.0.1"


def icmp_echo(src: str, dst: str, seq: int) -> bytes:
    body = bytearray(bytes((8, 0, 0, 0)) + (0x4242).to_bytes(2, "big") + seq.to_bytes(2, "big"))
    body += b"workers"
    body[2:4] = inet_checksum(body).to_bytes(2, "big")
    total = 20 + len(body)
    header = bytearray(
        bytes((0x45, 0)) + total.to_bytes(2, "big") + bytes(4) + bytes((64, 1, 0, 0))
        + bytes(int(x) for x in src.split(".")) + bytes(int(x) for x in dst.split("."))
    )  # fmt: skip
    header[10:12] = inet_checksum(header).to_bytes(2, "big")
    return bytes(header) + bytes(body)


@dataclass
class Client:
    name: str
    private: bytes
    address: str
    seed: int
    session: ClientSession
    sock: PathSocket
    replies: int = 0

    @property
    def worker(self) -> int:
        """The worker the docs say gets this client's INITs (and so its session)."""
        return (self.session.index & 0xFF) % 2


class Crowd:
    """Many ClientSessions on their own loopback sockets, stepped by one select loop."""

    def __init__(
        self,
        gateway: tuple[str, int],
        gateway_public: bytes,
        make_socket: Callable[[], PathSocket] = lambda: PathSocket(1, ("127.0.0.1", 0)),
        gateway_inner: str = GATEWAY_INNER,
    ) -> None:
        self.gateway = gateway
        self.gateway_public = gateway_public
        self.clients: list[Client] = []
        self._make_socket = make_socket
        self.gateway_inner = gateway_inner

    def new_session(self, private: bytes, seed: int) -> ClientSession:
        now = time.monotonic()
        return ClientSession(
            static_private=private, gateway_public=self.gateway_public,
            paths=[PathSpec(1, "lo")], policy=POLICY_DEFAULT, now=now,
            rng=random.Random(seed), wall_offset=time.time() - now,
        )  # fmt: skip

    def add(self, name: str, private: bytes, address: str, seed: int) -> Client:
        c = Client(
            name, private, address, seed, self.new_session(private, seed), self._make_socket()
        )  # fmt: skip
        self.clients.append(c)
        return c

    def restart(self, c: Client) -> None:
        """The client program starts again (same key and seed: the same sender index)."""
        c.session = self.new_session(c.private, c.seed)
        c.session.connect(time.monotonic())
        self._pump(c)

    def connect_all(self) -> None:
        for c in self.clients:
            c.session.connect(time.monotonic())
            self._pump(c)

    def _pump(self, c: Client) -> None:
        for _, data in c.session.datagrams_to_send():
            c.sock.send(data, self.gateway)
        c.replies += sum(1 for p in c.session.packets_for_tun() if p[20] == 0)  # echo reply

    def step(self) -> None:
        ready, _, _ = select.select([c.sock for c in self.clients], [], [], 0.02)
        now = time.monotonic()
        for c in self.clients:
            if c.sock in ready:
                for data, _ in c.sock.recv_batch():
                    c.session.receive_datagram(data, 1, now)
            deadline = c.session.next_deadline()
            if deadline is not None and deadline <= now:
                c.session.handle_timer(now)
            self._pump(c)

    def run_until(self, what: Callable[[], bool], timeout: float, message: str) -> None:
        end = time.monotonic() + timeout
        while not what():
            if time.monotonic() > end:
                raise AssertionError(f"timed out: {message}")
            self.step()

    def run_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.step()

    def ping(self, clients: list[Client], count: int = 3) -> None:
        """Each client sends ``count`` echo requests to the gateway's inner address and
        gets every reply."""
        want = {c.name: c.replies + count for c in clients}
        for c in clients:
            for seq in range(count):
                c.session.receive_tun_packet(
                    icmp_echo(c.address, self.gateway_inner, seq), time.monotonic()
                )
                self._pump(c)
        self.run_until(lambda: all(c.replies >= want[c.name] for c in clients), 20, "echo replies")

    def close(self) -> None:
        for c in self.clients:
            c.sock.close()


class Stderr:
    """The program's stderr lines, read on a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        assert proc.stderr is not None
        self._thread = threading.Thread(target=self._run, args=(proc.stderr,), daemon=True)
        self._thread.start()

    def _run(self, stream: Any) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if m := re.search(pattern, line):
                        return m
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no line {pattern!r} in {self.lines}")
                self._cond.wait(left)


def jvpn(sock: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tunnel.cli", "--socket", str(sock), *args],
        cwd=REPO, capture_output=True, text=True, timeout=30, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip


def status(sock: Path) -> dict[str, Any]:
    proc = jvpn(sock, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)["status"]
    return doc


@dataclass
class Rig:
    proc: subprocess.Popen[str]
    err: Stderr
    crowd: Crowd
    socket: Path
    """The gateway's (the supervisor's) control socket."""
    pids: list[int]
    tmp: Path
    metrics: str
    """The supervisor's /metrics URL."""

    def beside(self, fn: Callable[[], T]) -> T:
        """``fn()`` on a thread while the clients keep running (their probes)."""
        out: list[T] = []
        thread = threading.Thread(target=lambda: out.append(fn()))
        thread.start()
        while thread.is_alive():
            self.crowd.step()
        assert out, "no answer"
        return out[0]

    def status(self) -> dict[str, Any]:
        """The gateway's status (every worker's sessions)."""
        return self.beside(lambda: status(self.socket))

    def sessions(self, k: int) -> dict[str, dict[str, Any]]:
        """Worker ``k``'s sessions, as the gateway's status lists them."""
        return {s["client"]: s for s in self.status()["sessions"] if s["worker"] == k}


N_CLIENTS = 8


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    gw_private, gw_public = generate_keypair()
    write_private_key(tmp_path / "gateway.key", gw_private)
    crowd = Crowd(("127.0.0.1", 0), gw_public)
    add_balanced(crowd, N_CLIENTS, "10.66.0")
    (tmp_path / "clients.d").mkdir()
    for c in crowd.clients:
        write_client_file(tmp_path / "clients.d", c)
    config = tmp_path / "gateway.toml"
    config.write_text(
        'node_id = "gwt"\nlisten = "127.0.0.1:0"\nprivate_key = "gateway.key"\n'
        'inner_echo = true\nworkers = 2\nclients_dir = "clients.d"\nmetrics = "127.0.0.1:0"\n'
        '[control]\nsocket = "gw.sock"\n[state]\nstore = "memory"\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunnel.gateway.main", "--config", str(config)],
        cwd=REPO, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path)},
    )  # fmt: skip
    err = Stderr(proc)
    try:
        ready = err.wait(
            r"node gwt: 2 workers ready \(pids (\d+), (\d+)\), control (\S+), "
            r"metrics (http://\S+)$"
        )
        assert ready.group(3) == str(tmp_path / "gw.sock")
        port = int(err.wait(r"node gwt-w0 listening on 127\.0\.0\.1:(\d+)").group(1))
        assert err.wait(r"node gwt-w1 listening on 127\.0\.0\.1:(\d+)").group(1) == str(port)
        crowd.gateway = ("127.0.0.1", port)
        yield Rig(
            proc, err, crowd, tmp_path / "gw.sock", [int(ready.group(1)), int(ready.group(2))],
            tmp_path, ready.group(4),
        )  # fmt: skip
    finally:
        children = _children(proc.pid)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        crowd.close()


def write_client_file(directory: Path, c: Client) -> None:
    (directory / f"{c.name}.toml").write_text(
        f'public_key = "{_b64(c.private)}"\naddress = "{c.address}"\n'
    )


def add_balanced(crowd: Crowd, n: int, net: str, first: int = 2) -> str:
    """``n`` clients, half on each worker (by their sender index), addresses ``net.2``...;
    their ``[[clients]]`` tables."""
    seed = 0
    while len(crowd.clients) < n:
        private, _ = generate_keypair()
        i = len(crowd.clients)
        c = crowd.add(f"c{i}", private, f"{net}.{i + first}", seed)
        seed += 1
        if sum(1 for d in crowd.clients if d.worker == c.worker) > n // 2:
            crowd.clients.pop().sock.close()
    return "".join(
        f'[[clients]]\nname = "{c.name}"\npublic_key = "{_b64(c.private)}"\n'
        f'address = "{c.address}"\n'
        for c in crowd.clients
    )


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _b64(private: bytes) -> str:
    import base64

    from tunnel.core.handshake import public_key

    return base64.b64encode(public_key(private)).decode()


def attached(clients: list[Client]) -> Callable[[], bool]:
    return lambda: all(c.session.state is State.ATTACHED for c in clients)


def test_each_session_lives_on_the_worker_its_index_names_with_all_its_traffic(
    rig: Rig,
) -> None:
    crowd = rig.crowd
    crowd.connect_all()
    crowd.run_until(attached(crowd.clients), 30, "every client attached")
    crowd.ping(crowd.clients)
    by_worker = [rig.sessions(0), rig.sessions(1)]
    for c in crowd.clients:
        here, there = by_worker[c.worker], by_worker[1 - c.worker]
        assert c.name in here and c.name not in there, c.name
        s = here[c.name]
        assert s["owner"] == f"gwt-w{c.worker}" and s["state"] == "ATTACHED"
        # the session's traffic all went through that worker: every echo answered there
        assert s["rx_packets"] >= 3 and s["tx_packets"] >= 3
    assert [len(b) for b in by_worker] == [N_CLIENTS // 2, N_CLIENTS // 2]
    doc = rig.status()
    live = [x for x in doc["sessions"] if x["state"] != "TERMINATED"]
    assert doc["node_id"] == "gwt" and len(live) == N_CLIENTS
    assert doc["sessions_created"] >= N_CLIENTS  # (a client that sent its INIT again: one more)
    workers = [(w["index"], w["node_id"], w["pid"], w["ok"], w["sessions"]) for w in doc["workers"]]
    assert workers == [(k, f"gwt-w{k}", rig.pids[k], True, N_CLIENTS // 2) for k in (0, 1)]
    # the workers' own sockets are private: 0600 in a 0700 directory of the supervisor's
    private = Path(rig.err.wait(r"node gwt-w0 listening on .*, control (\S+)/w0\.sock").group(1))
    assert private.parent == rig.tmp and stat.S_IMODE(private.stat().st_mode) == 0o700
    for k in (0, 1):
        assert stat.S_IMODE((private / f"w{k}.sock").stat().st_mode) == 0o600


def test_a_killed_worker_loses_only_its_sessions_and_comes_back_on_its_slot(rig: Rig) -> None:
    crowd = rig.crowd
    crowd.connect_all()
    crowd.run_until(attached(crowd.clients), 30, "every client attached")
    survivors = [c for c in crowd.clients if c.worker == 0]
    lost = [c for c in crowd.clients if c.worker == 1]
    before = {c.name: c.session.snapshot(time.monotonic()) for c in survivors}
    ids = {name: s["session_id"] for name, s in rig.sessions(0).items()}
    old = {c.name: c.session.snapshot(time.monotonic()).session_id for c in lost}

    os.kill(rig.pids[1], signal.SIGKILL)
    rig.err.wait(r"worker 1 died \(killed by SIGKILL\); its sessions are lost")
    restarted = int(rig.err.wait(r"worker 1 restarted \(pid (\d+)\)").group(1))
    assert restarted not in rig.pids and rig.proc.poll() is None

    # worker 0's sessions: untouched, same ids, traffic flows, no event about them
    crowd.ping(survivors)
    assert {name: s["session_id"] for name, s in rig.sessions(0).items()} == ids
    for c in survivors:
        assert c.session.state is State.ATTACHED
        assert c.session.snapshot(time.monotonic()).session_id == before[c.name].session_id
        assert not [e for e in c.session.events() if e.event_type is EventType.SESSION_TERMINATED]
    # worker 1's clients notice the lost state and handshake again, naming their old
    # session (docs/client.md "When the gateway loses the session"); their INITs reach
    # the new worker 1, the slot of the old session (docs/gateway.md "Workers")

    def recovered() -> bool:
        return all(
            c.session.state is State.ATTACHED
            and c.session.snapshot(time.monotonic()).session_id != old[c.name]
            for c in lost
        )

    crowd.run_until(recovered, 90, "worker 1's clients in new sessions")
    crowd.ping(lost)
    again = rig.sessions(1)
    assert set(again) == {c.name for c in lost}
    assert all(s["owner"] == "gwt-w1" for s in again.values())
    linked = [e for c in lost for e in c.session.events()
              if e.event_type is EventType.SESSION_LINKED]  # fmt: skip
    assert sorted(e.previous_session_id for e in linked) == sorted(old.values())
    assert {c.name for c in survivors} == set(rig.sessions(0))


def test_sigterm_stops_every_worker_and_every_client_is_told(rig: Rig) -> None:
    crowd = rig.crowd
    crowd.connect_all()
    crowd.run_until(attached(crowd.clients), 30, "every client attached")
    rig.proc.send_signal(signal.SIGTERM)
    assert rig.proc.wait(30) == 0
    rig.err.wait(r"jvpn-gateway: stopped; sessions terminated, host restored")
    crowd.run_until(
        lambda: all(c.session.state is State.TERMINATED for c in crowd.clients),
        20, "every client told",
    )  # fmt: skip
    ends = [
        e for c in crowd.clients for e in c.session.events()
        if e.event_type is EventType.SESSION_TERMINATED
    ]  # fmt: skip
    assert len(ends) == N_CLIENTS and all(e.initiator == "peer" for e in ends)
    assert {e.reason_code for e in ends} <= set(Reason)
    assert not rig.socket.exists()
    assert not list(rig.tmp.glob("jvpn-gwt.*")), "the private directory stayed"


# -- configuration -----------------------------------------------------------------------------


def _config(tmp_path: Path, extra: str) -> Path:
    if not (tmp_path / "gateway.key").exists():
        write_private_key(tmp_path / "gateway.key", generate_keypair()[0])
    path = tmp_path / "gateway.toml"
    path.write_text(
        'node_id = "gw1"\nlisten = "127.0.0.1:0"\nprivate_key = "gateway.key"\n'
        f'metrics = "127.0.0.1:9108"\n{extra}\n[control]\nsocket = "run/gw.sock"\n'
        '[state]\nstore = "memory"\n'
        '[tun]\nname = "jvpn-gw"\n'
        '[[sinks]]\ntype = "jsonl"\npath = "events.jsonl"\n'
        f'[[clients]]\nname = "a"\npublic_key = "{_b64(generate_keypair()[0])}"\n'
    )
    return path


def test_workers_is_one_per_core_by_default_a_count_or_auto(tmp_path: Path) -> None:
    """docs/gateway.md: one per core this process may run on (its CPU affinity)."""
    cores = len(os.sched_getaffinity(0))
    assert load_gateway_config(_config(tmp_path, "")).workers == cores
    assert load_gateway_config(_config(tmp_path, 'workers = "auto"')).workers == cores
    assert load_gateway_config(_config(tmp_path, "workers = 3")).workers == 3
    assert load_gateway_config(_config(tmp_path, "workers = 1")).workers == 1
    for bad in ("workers = 0", "workers = 257", 'workers = "many"', "workers = 1.5"):
        with pytest.raises(ConfigError, match=r"workers = "):
            load_gateway_config(_config(tmp_path, bad))


def test_each_worker_has_names_of_its_own(tmp_path: Path) -> None:
    """docs/gateway.md "Workers": a private control socket in the supervisor's private
    directory, no metrics endpoint of its own (the supervisor serves every worker's)."""
    config = load_gateway_config(_config(tmp_path, "workers = 3"))
    one = dataclasses.replace(config, workers=1)
    assert worker_config(one, 0, None) == one  # workers = 1: the configuration as it is
    private = tmp_path / "private"
    w0 = worker_config(config, 0, None, private)
    w2 = worker_config(config, 2, ("127.0.0.1", 9200), private)
    assert (w0.node_id, w0.tun_name, w0.control_socket, w0.metrics) == (
        "gw1-w0", "jvpn-gw", private / "w0.sock", None,
    )  # fmt: skip
    assert (w2.node_id, w2.tun_name, w2.control_socket, w2.metrics) == (
        "gw1-w2", "jvpn-gw-2", private / "w2.sock", None,
    )  # fmt: skip
    assert [s.path for s in w0.sinks] == [tmp_path / "events.jsonl"]
    assert [s.path for s in w2.sinks] == [tmp_path / "events.jsonl.2"]


def test_sighup_reaches_every_worker_and_a_killed_supervisor_takes_them_along(rig: Rig) -> None:
    """Two new client files, one client for each worker: after SIGHUP to jvpn-gateway
    both attach, so both workers read the directory again."""
    crowd = rig.crowd
    newcomers = Crowd(crowd.gateway, crowd.gateway_public)
    add_balanced(newcomers, 2, "10.66.0", first=200)
    for c in newcomers.clients:
        c.name = f"new{c.worker}"
    try:
        newcomers.connect_all()
        newcomers.run_for(1.0)  # their INITs are refused (unknown keys): no answer at all
        assert all(c.session.state is State.BIRTH for c in newcomers.clients)
        for c in newcomers.clients:
            write_client_file(rig.tmp / "clients.d", c)
        rig.proc.send_signal(signal.SIGHUP)
        for c in newcomers.clients:
            newcomers.restart(c)
        newcomers.run_until(attached(newcomers.clients), 30, "both newcomers attached")
        for k in (0, 1):
            assert f"new{k}" in rig.sessions(k)
    finally:
        newcomers.close()
    workers = list(rig.pids)
    rig.proc.kill()
    rig.proc.wait(10)
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in workers), "a worker outlived the supervisor"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


def test_a_worker_that_cannot_start_stops_the_gateway_with_its_exit_status(
    tmp_path: Path,
) -> None:
    """Worker 1's session store cannot be created (docs/gateway.md: ``state_dir/w1``):
    exit 3, as one gateway process with that problem, and worker 0 is stopped too."""
    config = _config(tmp_path, "workers = 2\ninner_echo = true")
    text = config.read_text().replace('metrics = "127.0.0.1:9108"\n', "")
    config.write_text(text.replace('store = "memory"', 'store = "sqlite"\nstate_dir = "state"'))
    (tmp_path / "state").mkdir(mode=0o700)
    (tmp_path / "state" / "w1").write_text("not a directory")
    proc = subprocess.run(
        [sys.executable, "-m", "tunnel.gateway.main", "--config", str(config)],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path)},
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert f"state_dir {tmp_path}/state/w1: cannot create" in proc.stderr
    assert "jvpn-gateway: worker 1 could not start (exit status 3); stopping" in proc.stderr
    assert not (tmp_path / "run" / "gw.sock").exists()
    assert not list(tmp_path.glob("jvpn-gw1.*")), "the private directory stayed"


def test_the_gateways_control_socket_taken_is_exit_5_before_any_worker(tmp_path: Path) -> None:
    config = _config(tmp_path, "workers = 2\ninner_echo = true")
    config.write_text(config.read_text().replace('metrics = "127.0.0.1:9108"\n', ""))
    (tmp_path / "run").mkdir(mode=0o700)
    (tmp_path / "run" / "gw.sock").write_text("keep")
    proc = subprocess.run(
        [sys.executable, "-m", "tunnel.gateway.main", "--config", str(config)],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path)},
    )  # fmt: skip
    assert proc.returncode == 5, proc.stderr
    assert f"control socket: {tmp_path}/run/gw.sock exists and is not a socket" in proc.stderr
    assert "worker" not in proc.stderr and (tmp_path / "run" / "gw.sock").read_text() == "keep"
    assert not list(tmp_path.glob("jvpn-gw1.*")), "the private directory stayed"


def test_a_worker_dying_again_and_again_stops_the_gateway(rig: Rig) -> None:
    """docs/gateway.md: more than 5 deaths of one worker in a minute stop the gateway
    (exit 1); until then each death is a restart."""
    pid = rig.pids[1]
    for death in range(1, 7):
        os.kill(pid, signal.SIGKILL)
        if death <= 5:
            restarts = r"worker 1 restarted \(pid (\d+)\)"
            end = time.monotonic() + 30
            while sum(bool(re.search(restarts, line)) for line in rig.err.lines) < death:
                assert time.monotonic() < end, rig.err.lines
                time.sleep(0.05)
            pid = int(re.findall(restarts, "\n".join(rig.err.lines))[-1])
    assert rig.proc.wait(30) == 1
    rig.err.wait(r"worker 1 died 6 times in a minute; stopping")
    assert not _alive(rig.pids[0])


def test_a_client_whose_address_changes_stays_on_its_worker(rig: Rig) -> None:
    """Steering follows the receiver index, not the source address: after a NAT
    rebinding (every client's source port changes) each session is still served by the
    same worker, with the same id, at the new address."""
    crowd = rig.crowd
    crowd.connect_all()
    crowd.run_until(attached(crowd.clients), 30, "every client attached")
    before = [rig.sessions(0), rig.sessions(1)]
    for c in crowd.clients:  # the NAT gives each client a new source port
        c.sock.close()
        c.sock = PathSocket(1, ("127.0.0.1", 0))

    def moved() -> bool:  # the gateway follows each client to its new address
        now = [rig.sessions(0), rig.sessions(1)]
        return all(
            any(p["address"].endswith(f":{c.sock.local_address[1]}") and p["active"]
                for p in now[c.worker].get(c.name, {}).get("paths", []))
            for c in crowd.clients
        )  # fmt: skip

    crowd.run_until(moved, 60, "every session at its new address")
    crowd.ping(crowd.clients)
    after = [rig.sessions(0), rig.sessions(1)]
    for c in crowd.clients:
        old, new = before[c.worker][c.name], after[c.worker][c.name]
        assert new["session_id"] == old["session_id"] and new["state"] == "ATTACHED"
        port = c.sock.local_address[1]
        assert any(p["address"].endswith(f":{port}") for p in new["paths"]), new["paths"]
        assert c.name not in after[1 - c.worker]


# -- one control socket, one /metrics -------------------------------------------------------


def test_reload_through_the_gateways_socket_reaches_every_worker(rig: Rig) -> None:
    """Two new client files, one client for each worker: after ``jvpn reload`` on the
    gateway's socket both attach (both workers read the directory again), and the answer
    says per worker what happened."""
    crowd = rig.crowd
    newcomers = Crowd(crowd.gateway, crowd.gateway_public)
    add_balanced(newcomers, 2, "10.66.0", first=200)
    for c in newcomers.clients:
        c.name = f"new{c.worker}"
    try:
        for c in newcomers.clients:
            write_client_file(rig.tmp / "clients.d", c)
        proc = rig.beside(lambda: jvpn(rig.socket, "reload"))
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert [line.split(":", 1)[0] for line in lines] == ["worker 0", "worker 1"], lines
        assert all("clients_dir: " in line for line in lines), lines
        newcomers.connect_all()
        newcomers.run_until(attached(newcomers.clients), 30, "both newcomers attached")
        for k in (0, 1):
            assert f"new{k}" in rig.sessions(k)
    finally:
        newcomers.close()


def test_a_worker_that_does_not_answer_is_named_and_the_others_sessions_still_listed(
    rig: Rig,
) -> None:
    """docs/gateway.md "Workers": a worker that is stuck (SIGSTOP) or dead is named in the
    gateway's status, which lists the other worker's sessions and does not wait for it."""
    crowd = rig.crowd
    crowd.connect_all()
    crowd.run_until(attached(crowd.clients), 30, "every client attached")
    zero = {c.name for c in crowd.clients if c.worker == 0}
    old = {s["session_id"] for s in rig.sessions(1).values()}
    os.kill(rig.pids[1], signal.SIGSTOP)
    try:
        doc = rig.status()
        text = rig.beside(lambda: jvpn(rig.socket, "status")).stdout
    finally:
        os.kill(rig.pids[1], signal.SIGCONT)
    assert f"1 NOT ANSWERING: no answer in 2s (pid {rig.pids[1]})" in text, text
    assert {s["client"] for s in doc["sessions"]} == zero
    w0, w1 = doc["workers"]
    assert (w0["ok"], w0["sessions"], w1["ok"], w1["pid"]) == (True, len(zero), False, rig.pids[1])
    assert w1["problem"] == f"no answer in 2s (pid {rig.pids[1]})"

    os.kill(rig.pids[1], signal.SIGKILL)
    rig.err.wait(r"worker 1 died \(killed by SIGKILL\)")
    doc = rig.status()
    w1 = doc["workers"][1]
    if w1["ok"]:  # already started again (the 1 s went by): a new process, new sessions
        assert w1["pid"] != rig.pids[1]
        assert not old & {s["session_id"] for s in doc["sessions"] if s["worker"] == 1}
    else:
        assert w1["problem"].startswith(("not running", "starting", "not answering")), w1
        assert all(s["worker"] == 0 for s in doc["sessions"])
    assert {s["client"] for s in doc["sessions"] if s["worker"] == 0} == zero


def test_watch_on_the_gateways_socket_merges_every_workers_events(rig: Rig) -> None:
    crowd = rig.crowd
    crowd.connect_all()
    crowd.run_until(attached(crowd.clients), 30, "every client attached")
    watch = subprocess.Popen(
        [sys.executable, "-m", "tunnel.cli", "--socket", str(rig.socket), "watch", "--json"],
        cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    created: dict[str, str] = {}
    try:
        reader = _Lines(watch)

        def both() -> bool:
            for line in reader.lines:
                event = json.loads(line)
                if event.get("event_type") == "SESSION_CREATED":
                    created[event["peer"]] = event["node_id"]
            return len(created) == N_CLIENTS

        crowd.run_until(both, 30, "every session's creation in the merged history")
    finally:
        watch.kill()
        watch.wait(10)
    assert created == {c.name: f"gwt-w{c.worker}" for c in crowd.clients}

    # terminate on the gateway's socket finds the session's worker (by a unique prefix)
    victim = next(c for c in crowd.clients if c.worker == 1)
    sid = victim.session.snapshot(time.monotonic()).session_id
    proc = rig.beside(lambda: jvpn(rig.socket, "terminate", sid[:8]))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"worker 1: session {sid} terminated (operator_terminated)"
    crowd.run_until(lambda: victim.session.state is State.TERMINATED, 20, "the client told")


class _Lines:
    """A process's stdout lines, read on a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        assert proc.stdout is not None
        threading.Thread(target=self._run, args=(proc.stdout,), daemon=True).start()

    def _run(self, stream: Any) -> None:
        for line in stream:
            self.lines.append(line)


DOCUMENTED_METRICS = {
    "jvpn_gateway_sessions", "jvpn_gateway_sessions_created_total",
    "jvpn_gateway_sessions_denied_total", "jvpn_gateway_switches_total",
    "jvpn_gateway_terminations_total", "jvpn_gateway_reattach_rejects_total",
    "jvpn_gateway_drops_total", "jvpn_gateway_replay_drops_total",
    "jvpn_gateway_security_events_total", "jvpn_gateway_policy_valid",
    "jvpn_gateway_policy_reloads_total", "jvpn_gateway_store_conflicts_total",
    "jvpn_gateway_engine_events_dropped_total", "jvpn_gateway_datagrams_total",
    "jvpn_gateway_inner_packets_total", "jvpn_gateway_handshake_rate",
    "jvpn_gateway_gc_frozen_objects", "jvpn_gateway_gc_collections_total",
    "jvpn_gateway_gc_longest_pause_seconds",
}  # fmt: skip
"""docs/gateway.md "Metrics" (without a persistent store and without sinks)."""

LABELLED = {
    "jvpn_gateway_switches_total", "jvpn_gateway_terminations_total",
    "jvpn_gateway_reattach_rejects_total", "jvpn_gateway_drops_total",
    "jvpn_gateway_security_events_total",
}  # fmt: skip


def test_one_metrics_endpoint_for_every_worker_counters_summed(rig: Rig) -> None:
    from test_metrics import get, parse_exposition

    crowd = rig.crowd
    crowd.connect_all()
    crowd.run_until(attached(crowd.clients), 30, "every client attached")
    crowd.ping(crowd.clients, count=2)

    def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, _, body = rig.beside(lambda: get(rig.metrics))
        assert status == 200, body
        return parse_exposition(body)

    def summed() -> bool:
        now = scrape()
        return (
            now.get(("jvpn_gateway_sessions_created_total", ()), 0) >= N_CLIENTS
            and now.get(("jvpn_gateway_sessions", (("state", "ATTACHED"),))) == N_CLIENTS
            and now.get(("jvpn_gateway_inner_packets_total", (("direction", "from_clients"),)),
                        0) >= 2 * N_CLIENTS
        )  # fmt: skip

    end = time.monotonic() + 30
    while not summed():
        assert time.monotonic() < end, scrape()
        crowd.run_for(0.2)
    samples = scrape()
    # every family with a sample (a labelled counter with none yet has no series)
    names = {name for name, _ in samples}
    assert names <= DOCUMENTED_METRICS and DOCUMENTED_METRICS - names <= LABELLED, names
    # the sum of the workers' own counts (their statuses, summed by the gateway's)
    created = rig.status()["sessions_created"]
    assert samples[("jvpn_gateway_sessions_created_total", ())] == created
    assert samples[("jvpn_gateway_policy_valid", ())] == 1  # every worker's (livemin)
    # each worker measured its own budget, in [200, 10,000] a second: the gauge is the sum
    assert 2 * 200 <= samples[("jvpn_gateway_handshake_rate", ())] <= 2 * 10_000
    # jvpn-gateway's collector policy runs in every worker (docs/gateway.md)
    assert samples[("jvpn_gateway_gc_frozen_objects", ())] > 0
    assert samples[("jvpn_gateway_datagrams_total", (("direction", "in"),))] >= 3 * N_CLIENTS
