"""Network-namespace test harness: real links without touching the host's network.

``Topology(n_paths=2)`` creates a client namespace and a gateway namespace joined by
``n_paths`` independent veth pairs; path ``i`` is ``10.200.<i>.1/24`` (client side) <->
``10.200.<i>.2/24`` (gateway side). Everything lives inside the two namespaces, so those
fixed addresses cannot clash with the host or with a parallel run (each run has its own
pair of namespaces, with its own routing tables). The veths are created inside the
client namespace with their peer placed directly in the gateway namespace: no interface
ever exists in the host's namespace, even for a moment.

Namespace names are ``jvt<pid>-<tag>-c`` / ``-g`` (the creating process id and a random
tag), so :func:`cleanup_stale` can remove what a crashed earlier run left behind without
touching a namespace of a run that is still alive. ``Topology`` always removes its
namespaces on exit (also when the body raises) and checks that they are gone.

The test process never changes its own namespace: link and address work goes through
pyroute2 sockets opened inside the namespaces; programs run there through
``ip netns exec`` (:meth:`Topology.exec`).
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

from pyroute2 import IPRoute

REPO_ROOT = Path(__file__).resolve().parents[1]
NETNS_DIR = Path("/run/netns")
PREFIX = "jvt"
"""Every namespace the harness creates starts with this; nothing else is ever removed."""
_NAME_RE = re.compile(rf"^{PREFIX}(\d+)-([0-9a-f]{{6}})-[cg]$")
IP = shutil.which("ip") or "/usr/sbin/ip"


class PathLink(NamedTuple):
    """One veth pair between the namespaces."""

    client_ip: str
    gateway_ip: str
    client_ifname: str
    gateway_ifname: str


# -- skipping -------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def netns_unavailable() -> str | None:
    """Why namespace tests cannot run here, or None if they can (probed once)."""
    if os.geteuid() != 0:
        return "needs root: creates network namespaces, veth pairs and TUN devices"
    if not Path(IP).exists():
        return "iproute2 `ip` not found (apt-get install iproute2)"
    name = f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:6]}-c"
    proc = subprocess.run([IP, "netns", "add", name], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"cannot create a network namespace: {proc.stderr.strip()}"
    subprocess.run([IP, "netns", "del", name], capture_output=True)
    return None


def require_netns() -> None:
    """pytest.skip with the reason when namespace tests cannot run."""
    import pytest

    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)


def require_tun() -> None:
    import pytest

    require_netns()
    if not Path("/dev/net/tun").exists():
        pytest.skip("/dev/net/tun missing (modprobe tun)")


# -- namespaces -----------------------------------------------------------------------------


def list_namespaces() -> set[str]:
    """Names in /run/netns (what ``ip netns list`` shows)."""
    try:
        return set(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return set()


def harness_namespaces() -> set[str]:
    """Namespaces that look like the harness's own."""
    return {n for n in list_namespaces() if _NAME_RE.match(n)}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_namespace_processes(name: str) -> None:
    proc = subprocess.run([IP, "netns", "pids", name], capture_output=True, text=True)
    for pid in proc.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def delete_namespace(name: str) -> None:
    """Kill what runs in ``name`` and delete it (its veths go with it)."""
    if not _NAME_RE.match(name):
        raise ValueError(f"refusing to delete {name!r}: not a harness namespace")
    if name not in list_namespaces():
        return
    _kill_namespace_processes(name)
    subprocess.run([IP, "netns", "del", name], capture_output=True, text=True)


def cleanup_stale() -> list[str]:
    """Remove harness namespaces whose creating process is gone; return their names.

    Matches only ``jvt<pid>-<tag>-c|g`` names, and only when <pid> is dead, so a run in
    progress (even a parallel one) is never disturbed.
    """
    removed = []
    for name in sorted(harness_namespaces()):
        match = _NAME_RE.match(name)
        assert match is not None
        if not _pid_alive(int(match.group(1))):
            delete_namespace(name)
            removed.append(name)
    return removed


# -- child processes ------------------------------------------------------------------------


def read_line(proc: subprocess.Popen[Any], timeout: float) -> str:
    """Next line of ``proc``'s stdout (must be a PIPE), without waiting past ``timeout``."""
    assert proc.stdout is not None, "start the process with stdout=subprocess.PIPE"
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    line = bytearray()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(
                f"no line from {proc.args!r} within {timeout}s (got {bytes(line)!r})"
                + _stderr_tail(proc)
            )
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        byte = os.read(fd, 1)
        if not byte:
            proc.wait(timeout=5)
            raise EOFError(
                f"{proc.args!r} exited with {proc.returncode} before a full line "
                f"(got {bytes(line)!r})" + _stderr_tail(proc)
            )
        if byte == b"\n":
            return line.decode()
        line += byte


def _stderr_tail(proc: subprocess.Popen[Any]) -> str:
    if proc.stderr is None or proc.poll() is None:
        return ""
    data = proc.stderr.read() or b""
    text = data.decode(errors="replace") if isinstance(data, bytes) else data
    return f"\n--- stderr ---\n{text[-3000:]}"


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for children: ours, with the repository importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


# -- the topology ---------------------------------------------------------------------------


class Topology:
    """A client and a gateway namespace joined by ``n_paths`` veth pairs.

    Use as a context manager. Nothing is created in ``__init__``; everything created is
    removed on exit, and exit asserts the namespaces are gone.
    """

    def __init__(self, n_paths: int = 2) -> None:
        if not 1 <= n_paths <= 250:
            raise ValueError("n_paths must be 1..250")
        self.n_paths = n_paths
        self.tag = uuid.uuid4().hex[:6]
        pid = os.getpid()
        self.client_ns = f"{PREFIX}{pid}-{self.tag}-c"
        self.gateway_ns = f"{PREFIX}{pid}-{self.tag}-g"
        self.paths: list[PathLink] = [
            PathLink(f"10.200.{i}.1", f"10.200.{i}.2", f"jvc{i}-{self.tag}", f"jvg{i}-{self.tag}")
            for i in range(n_paths)
        ]
        self._ipr: dict[str, IPRoute] = {}
        self._procs: list[subprocess.Popen[Any]] = []
        self._created: list[str] = []

    @property
    def namespaces(self) -> tuple[str, str]:
        return (self.client_ns, self.gateway_ns)

    # -- lifetime ----------------------------------------------------------------------

    def __enter__(self) -> Topology:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def open(self) -> Topology:
        require_netns()
        cleanup_stale()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        for ns in self.namespaces:
            subprocess.run([IP, "netns", "add", ns], check=True, capture_output=True, text=True)
            self._created.append(ns)
            self._ipr[ns] = IPRoute(netns=ns, flags=0, groups=0)
            ipr = self._ipr[ns]
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        client = self._ipr[self.client_ns]
        gateway = self._ipr[self.gateway_ns]
        for link in self.paths:
            client.link(
                "add",
                ifname=link.client_ifname,
                kind="veth",
                peer={"ifname": link.gateway_ifname, "net_ns_fd": self.gateway_ns},
            )
            for ipr, ifname, address in (
                (client, link.client_ifname, link.client_ip),
                (gateway, link.gateway_ifname, link.gateway_ip),
            ):
                index = ipr.link_lookup(ifname=ifname)[0]
                ipr.addr("add", index=index, address=address, prefixlen=24)
                ipr.link("set", index=index, state="up")

    def close(self) -> None:
        """Stop children, delete the namespaces, and check they are gone."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        self._procs.clear()
        for ipr in self._ipr.values():
            with contextlib.suppress(Exception):
                ipr.close()
        self._ipr.clear()
        for ns in self._created:
            delete_namespace(ns)
        left = set(self._created) & list_namespaces()
        self._created.clear()
        if left:
            raise RuntimeError(f"network namespaces left behind: {sorted(left)}")

    # -- links -------------------------------------------------------------------------

    def ipr(self, ns: str) -> IPRoute:
        """The pyroute2 handle opened inside ``ns`` (client_ns or gateway_ns)."""
        return self._ipr[ns]

    def _set_client_link(self, path_i: int, state: str) -> None:
        ipr = self._ipr[self.client_ns]
        ifname = self.paths[path_i].client_ifname
        ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], state=state)

    def link_down(self, path_i: int) -> None:
        """Kill path ``path_i``: its client-side veth goes down (the peer loses carrier)."""
        self._set_client_link(path_i, "down")

    def link_up(self, path_i: int) -> None:
        """Restore path ``path_i`` (the kernel restores its connected route)."""
        self._set_client_link(path_i, "up")

    # -- processes ---------------------------------------------------------------------

    def exec(self, ns: str, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside namespace ``ns``; it is killed when the topology closes.

        The repository is on PYTHONPATH unless ``env`` is given.
        """
        if ns not in self._created:
            raise ValueError(f"{ns!r} is not a namespace of this topology")
        popen_kwargs.setdefault("env", child_env())
        proc = subprocess.Popen([IP, "netns", "exec", ns, *argv], **popen_kwargs)
        self._procs.append(proc)
        return proc

    def python(self, ns: str, code: str, *args: str, **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Run ``python -c code args...`` inside ``ns`` with stdin/stdout/stderr piped."""
        for stream in ("stdin", "stdout", "stderr"):
            popen_kwargs.setdefault(stream, subprocess.PIPE)
        return self.exec(ns, [sys.executable, "-c", code, *args], **popen_kwargs)

    def run(
        self, ns: str, argv: Sequence[str], timeout: float = 10.0, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside ``ns`` to completion; capture text output."""
        kwargs.setdefault("env", child_env())
        return subprocess.run(
            [IP, "netns", "exec", ns, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **kwargs,
        )


# -- small programs the tests run inside the namespaces -----------------------------------

UDP_ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    data, addr = s.recvfrom(65535)
    s.sendto(data, addr)
"""
"""Echo every datagram on 0.0.0.0:<argv[1]>; prints ``ready`` once bound."""

PATH_PROBE = r"""
import json, select, sys, time
from tunnel.io.udp import PathSocket
spec = json.loads(sys.argv[1])
socks = [PathSocket(i, (p["client_ip"], 0), device=p["client_ifname"])
         for i, p in enumerate(spec["paths"])]
answered = {}
deadline = time.monotonic() + spec["timeout"]
next_send = 0.0
while len(answered) < len(socks) and time.monotonic() < deadline:
    if time.monotonic() >= next_send:
        for i, (sock, p) in enumerate(zip(socks, spec["paths"])):
            if i not in answered:
                sock.send(f"probe-{i}".encode(), (p["gateway_ip"], spec["port"]))
        next_send = time.monotonic() + 0.05
    ready, _, _ = select.select(socks, [], [], 0.02)
    for sock in ready:
        for data, addr in sock.recv_batch():
            if data == f"probe-{sock.path_id}".encode():
                answered[sock.path_id] = addr[0]
print(json.dumps({
    "answered": {str(k): v for k, v in answered.items()},
    "send_errors": [dict(s.send_errors) for s in socks],
}), flush=True)
"""
"""Probe every path (argv[1] = JSON {paths, port, timeout}) through a PathSocket pinned to
the path's client veth; print which paths got their echo back."""
