"""A real three-member etcd cluster on loopback for tests (Debian ``etcd-server``).

``EtcdCluster`` starts three ``etcd`` processes on 127.0.0.1, each with a unique free
client and peer port and its own data directory under one temporary directory; the
cluster token is unique per cluster, so two runs side by side never join each other.
:meth:`EtcdCluster.close` always kills every member it started and removes the data
directories (also after a failed test: the fixtures call it in ``finally``); a member
also dies with the process that started it (``PR_SET_PDEATHSIG``), even one killed -9.

Faults a test can inject: :meth:`stop` / :meth:`start` one member (SIGTERM, then the same
command line on the same data directory), :meth:`stop_majority`, :meth:`freeze` /
:meth:`thaw` (SIGSTOP / SIGCONT) a member.

Readiness is judged by etcd's own ``/health`` on the client port (``{"health":"true"}``
needs a leader and a committed proposal, i.e. quorum), polled with a bound.

Use the fixtures ``etcd_cluster`` (module-scoped: one cluster per test module, which saves
the ~1 s start; tests that stop members restart them with :meth:`heal` afterwards) or
``etcd_cluster_fn`` (a cluster of the test's own, for tests that break it badly). Both
skip with a reason when no ``etcd`` binary is installed (``make test`` installs
``etcd-server``).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
SETPRIV = shutil.which("setpriv")
DIE_WITH_PARENT = [SETPRIV, "--pdeathsig", "KILL"] if SETPRIV else []
"""util-linux ``setpriv`` sets PR_SET_PDEATHSIG, then execs etcd: a member is killed when
the process that started it dies, even by SIGKILL. (Not a ``preexec_fn``: forking Python
code in a process with gRPC threads is unsafe.)"""
START_TIMEOUT = 30.0
"""Seconds a cluster (or a restarted member) may take to report healthy; generous: the
machine may be loaded."""


def etcd_unavailable() -> str | None:
    """Why etcd tests cannot run here, or None if they can."""
    if not Path(ETCD).exists():
        return "etcd not installed (apt-get install etcd-server; `make test` does it)"
    return None


def require_etcd() -> None:
    """pytest.skip with the reason when there is no etcd binary."""
    import pytest

    reason = etcd_unavailable()
    if reason is not None:
        pytest.skip(reason)


def free_tcp_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that were free on 127.0.0.1 a moment ago (bound together,
    so the kernel hands out distinct ones)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns a truthy value (returned) or ``timeout`` passes
    (AssertionError naming ``what``)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Member:
    """One etcd member: its name, ports, data directory and process (None when stopped)."""

    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    frozen: bool = False

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class EtcdCluster:
    """Three (or ``size``) etcd members on loopback; see the module docstring."""

    size: int = 3
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="jvpn-etcd-")))
    token: str = field(default_factory=lambda: f"jvpn-test-{uuid.uuid4().hex[:12]}")
    members: list[Member] = field(default_factory=list)

    def __post_init__(self) -> None:
        ports = free_tcp_ports(2 * self.size)
        for i in range(self.size):
            name = f"m{i}"
            self.members.append(
                Member(
                    name=name, client_port=ports[2 * i], peer_port=ports[2 * i + 1],
                    data_dir=self.root / name, log_path=self.root / f"{name}.log",
                )
            )  # fmt: skip

    # -- addresses ----------------------------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        """``host:port`` of every member's client URL, in member order."""
        return [m.endpoint for m in self.members]

    def _initial_cluster(self) -> str:
        return ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    def command(self, m: Member) -> list[str]:
        """The etcd command line of member ``m`` (the same on a restart)."""
        return [
            ETCD, "--name", m.name, "--data-dir", str(m.data_dir),
            "--listen-client-urls", m.client_url, "--advertise-client-urls", m.client_url,
            "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
            "--initial-cluster", self._initial_cluster(),
            "--initial-cluster-token", self.token, "--initial-cluster-state", "new",
            "--log-level", "warn", "--logger", "zap",
        ]  # fmt: skip

    # -- lifecycle ----------------------------------------------------------------------

    def start_all(self) -> None:
        """Start every member and wait until each one reports healthy."""
        for m in self.members:
            self._spawn(m)
        for m in self.members:
            self.wait_healthy(m)

    def _spawn(self, m: Member) -> None:
        m.data_dir.mkdir(parents=True, exist_ok=True)
        log = m.log_path.open("ab")
        try:
            m.proc = subprocess.Popen(
                [*DIE_WITH_PARENT, *self.command(m)], stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        finally:
            log.close()
        m.frozen = False

    def healthy(self, m: Member) -> bool:
        """True when member ``m`` answers ``/health`` with ``"health": "true"``."""
        if not m.running or m.frozen:
            return False
        try:
            with urllib.request.urlopen(f"{m.client_url}/health", timeout=1.0) as resp:
                return bool(json.loads(resp.read()).get("health") == "true")
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def wait_healthy(self, m: Member, timeout: float = START_TIMEOUT) -> None:
        def check() -> bool:
            if m.proc is not None and m.proc.poll() is not None:
                raise AssertionError(f"etcd {m.name} exited: {self.log_tail(m)}")
            return self.healthy(m)

        wait_until(check, timeout, 0.1, f"etcd member {m.name} to be healthy")

    def log_tail(self, m: Member, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(m.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def stop(self, i: int) -> None:
        """Stop member ``i`` (SIGTERM, SIGKILL after 10 s); its data directory stays."""
        m = self.members[i]
        if m.proc is None:
            return
        if m.frozen:
            m.proc.send_signal(signal.SIGCONT)
        m.proc.terminate()
        try:
            m.proc.wait(10)
        except subprocess.TimeoutExpired:
            m.proc.kill()
            m.proc.wait(10)
        m.proc = None
        m.frozen = False

    def start(self, i: int, wait: bool = True) -> None:
        """Start member ``i`` again on its data directory (a no-op when it runs)."""
        m = self.members[i]
        if m.running:
            return
        self._spawn(m)
        if wait:
            self.wait_healthy(m)

    def stop_majority(self) -> list[int]:
        """Stop the first ``size // 2 + 1`` members; returns their indexes."""
        stopped = list(range(self.size // 2 + 1))
        for i in stopped:
            self.stop(i)
        return stopped

    def freeze(self, i: int) -> None:
        """SIGSTOP member ``i`` (its sockets stay open; it answers nothing)."""
        m = self.members[i]
        assert m.proc is not None and m.running, f"{m.name} is not running"
        m.proc.send_signal(signal.SIGSTOP)
        m.frozen = True

    def thaw(self, i: int) -> None:
        """SIGCONT member ``i``."""
        m = self.members[i]
        if m.proc is not None and m.frozen:
            m.proc.send_signal(signal.SIGCONT)
        m.frozen = False

    def heal(self) -> None:
        """Thaw and start every member, then wait until all are healthy."""
        for i, m in enumerate(self.members):
            self.thaw(i)
            if not m.running:
                self._spawn(m)
        for m in self.members:
            self.wait_healthy(m)

    def close(self) -> None:
        """Kill every member and remove the data directories (idempotent)."""
        for m in self.members:
            if m.proc is None:
                continue
            if m.frozen:
                with contextlib.suppress(ProcessLookupError):
                    m.proc.send_signal(signal.SIGCONT)
            with contextlib.suppress(ProcessLookupError):
                m.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                m.proc.wait(10)
            m.proc = None
            m.frozen = False
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def running_cluster(size: int = 3) -> Iterator[EtcdCluster]:
    """A started cluster, always closed and removed on exit."""
    cluster = EtcdCluster(size=size)
    try:
        cluster.start_all()
        yield cluster
    finally:
        cluster.close()


def _cluster_fixture() -> Iterator[EtcdCluster]:
    require_etcd()
    with running_cluster() as cluster:
        yield cluster


def _import_pytest_fixtures() -> tuple[object, object]:
    import pytest

    module_fixture = pytest.fixture(scope="module", name="etcd_cluster")(_cluster_fixture)
    fn_fixture = pytest.fixture(scope="function", name="etcd_cluster_fn")(_cluster_fixture)
    return module_fixture, fn_fixture


etcd_cluster, etcd_cluster_fn = _import_pytest_fixtures()
"""Import both names into a test module (``from etcd_cluster import etcd_cluster``)."""
