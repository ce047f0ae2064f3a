"""Real tunnels in throwaway namespaces: jvpn-gateway and ``jvpn-tui --headless`` for real.

The ``realnet`` fixture (a factory) builds a :class:`netns.Topology` (a client and a
gateway namespace joined by 2-3 veth paths), generates keys, writes ``gateway.toml`` /
``client.toml`` into ``tmp_path``, optionally puts a ``jvpn-impair`` relay on some paths,
starts ``jvpn-gateway`` in the gateway namespace and ``jvpn-tui --headless`` in the client
namespace (a real TUN on both sides, inner subnet 10.77.0.0/24), and reads both programs'
JSON event lines on threads. Both programs serve their control socket
(``gateway_socket``, ``client_socket``, in a short temporary directory) for ``jvpn``.
Teardown always runs: SIGTERM, then SIGKILL after a grace
period, namespaces removed, and a check that no jvpn TUN or veth of this run is left in
the host's namespace.

The test process never changes its own namespace. To talk to something inside a namespace
(the relay's control socket, the gateway's metrics endpoint, a packet capture, a UDP
client on the inner address) it creates the socket in a short-lived thread that first
joined that namespace (:func:`ns_socket`); a socket keeps the namespace it was created in.
Bulk inner traffic runs in small Python programs started inside the namespaces, so the
measuring receiver does not share the test process's interpreter lock.

Layout (path ``i`` is 0-based here; the client calls it transport ``i + 1``)::

    client ns                                   gateway ns
    jvpn-tui  --path i: 10.200.i.1 (veth) ----> 10.200.i.2:51820            jvpn-gateway
                     or, with a relay:  ----> 10.200.i.2:51900+i jvpn-impair -> 127.0.0.1:51820
    TUN jtc-<tag> 10.77.0.2                     TUN jtg-<tag> 10.77.0.1
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import pytest
from netns import NETNS_DIR, Topology, read_line, require_tun
from pyroute2 import IPRoute

from tunnel.keys import write_private_key, write_public_key

INNER_SUBNET = "10.77.0.0/24"
GATEWAY_INNER = "10.77.0.1"
CLIENT_INNER = "10.77.0.2"
INNER_SUBNET6 = "fd00:77::/64"
GATEWAY_INNER6 = "fd00:77::1"
CLIENT_INNER6 = "fd00:77::2"
"""With ``ipv6=True``: the gateway's inner IPv6 subnet; the client gets its address from it."""
GATEWAY_PORT = 51820
RELAY_PORT_BASE = 51900
"""Relay on path i listens on <gateway veth address>:51900+i (gateway side placement)."""
RELAY_CONTROL_BASE = 52000
"""Relay on path i has its JSON control socket on 127.0.0.1:52000+i in its namespace."""
METRICS_PORT = 9108
"""Gateway Prometheus endpoint on 127.0.0.1 inside the gateway namespace."""
RELAY_SEED_BASE = 1000
"""The relay on path i draws its randomness from ``random.Random(RELAY_SEED_BASE + i)``."""


def seeded_loss(path: int, ratio: float, count: int) -> list[bool]:
    """Which of the first ``count`` datagrams the relay on ``path`` drops once its only
    impairment is ``loss = ratio`` in one direction (it draws once per datagram of that
    direction, and nothing while no ratio is set): the fixed loss pattern of a test."""
    rng = random.Random(RELAY_SEED_BASE + path)
    return [rng.random() < ratio for _ in range(count)]


START_TIMEOUT_S = 20.0
"""Generous: the machine has 2 cores and other test runs share them."""
STOP_GRACE_S = 8.0
"""SIGTERM -> exit; then SIGKILL."""

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def program(name: str, module: str) -> list[str]:
    """argv for a console script of this package (the venv's, else ``python -m``)."""
    exe = Path(sys.executable).parent / name
    return [str(exe)] if exe.exists() else [sys.executable, "-m", module]


# -- sockets inside a namespace ----------------------------------------------------------


def ns_socket(
    ns: str, family: int = socket.AF_INET, type: int = socket.SOCK_DGRAM, proto: int = 0
) -> socket.socket:
    """A socket created inside network namespace ``ns`` (the caller's namespace is untouched).

    A helper thread joins ``ns`` (setns affects only the calling thread), creates the
    socket and ends; the socket stays bound to ``ns`` for its whole life.
    """
    out: list[socket.socket | BaseException] = []

    def create() -> None:
        try:
            fd = os.open(NETNS_DIR / ns, os.O_RDONLY)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {ns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            out.append(socket.socket(family, type, proto))
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=create, name=f"setns-{ns}")
    thread.start()
    thread.join()
    [result] = out
    if isinstance(result, BaseException):
        raise result
    return result


def http_get(ns: str, port: int, path: str = "/metrics", timeout: float = 5.0) -> str:
    """Body of ``GET http://127.0.0.1:<port><path>`` inside ``ns``."""
    with ns_socket(ns, socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", port))
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].decode(errors="replace")
    if " 200 " not in status + " ":
        raise AssertionError(f"GET {path}: {status}")
    return body.decode()


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        out[key] = float(value)
    return out


# -- reading a child's output ------------------------------------------------------------


class LineLog:
    """Lines of one child stream, read on a daemon thread; JSON objects kept as dicts."""

    def __init__(self, stream: IO[bytes], name: str) -> None:
        self.name = name
        self.lines: list[str] = []
        self.events: list[dict[str, Any]] = []
        self.closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, args=(stream,), name=name, daemon=True)
        self._thread.start()

    def _run(self, stream: IO[bytes]) -> None:
        try:
            for raw in iter(stream.readline, b""):
                line = raw.decode(errors="replace").rstrip("\n")
                event = None
                if line.startswith("{"):
                    with contextlib.suppress(ValueError):
                        obj = json.loads(line)
                        event = obj if isinstance(obj, dict) else None
                with self._cond:
                    self.lines.append(line)
                    if event is not None:
                        self.events.append(event)
                    self._cond.notify_all()
        except (OSError, ValueError):
            pass  # the pipe was closed under us at teardown
        finally:
            with self._cond:
                self.closed = True
                self._cond.notify_all()

    def mark(self) -> int:
        """Index of the next event (pass as ``since``)."""
        with self._cond:
            return len(self.events)

    def where(self, pred: Callable[[dict[str, Any]], bool], since: int = 0) -> list[dict[str, Any]]:
        with self._cond:
            return [e for e in self.events[since:] if pred(e)]

    def of_type(self, event_type: str, since: int = 0, **fields: Any) -> list[dict[str, Any]]:
        """Events of ``event_type`` whose fields equal ``fields``."""
        return self.where(
            lambda e: (
                e.get("event_type") == event_type and all(e.get(k) == v for k, v in fields.items())
            ),
            since,
        )

    def wait_for(
        self,
        pred: Callable[[dict[str, Any]], bool],
        timeout: float,
        since: int = 0,
        what: str = "",
    ) -> dict[str, Any]:
        """First event from ``since`` on that satisfies ``pred``; AssertionError on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            seen = since
            while True:
                for event in self.events[seen:]:
                    if pred(event):
                        return event
                seen = len(self.events)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.closed and seen == len(self.events)):
                    break
                self._cond.wait(min(remaining, 0.5))
        raise AssertionError(
            f"{self.name}: no {what or 'matching event'} within {timeout}s "
            f"(closed={self.closed}); last lines:\n" + "\n".join(self.lines[-25:])
        )

    def wait_type(
        self, event_type: str, timeout: float, since: int = 0, **fields: Any
    ) -> dict[str, Any]:
        return self.wait_for(
            lambda e: (
                e.get("event_type") == event_type and all(e.get(k) == v for k, v in fields.items())
            ),
            timeout,
            since,
            what=f"{event_type} {fields or ''}",
        )

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


# -- the relay -----------------------------------------------------------------------------


class Relay:
    """A ``jvpn-impair`` process on one path, driven through its control socket."""

    def __init__(self, proc: subprocess.Popen[bytes], ns: str, control: tuple[str, int]) -> None:
        self.proc = proc
        self.ns = ns
        self.control_addr = control

    def command(self, obj: dict[str, Any], timeout: float = 3.0) -> dict[str, Any]:
        with ns_socket(self.ns) as sock:
            sock.settimeout(timeout)
            sock.connect(self.control_addr)
            sock.send(json.dumps(obj).encode())
            reply: dict[str, Any] = json.loads(sock.recv(65535))
        if not reply.get("ok"):
            raise AssertionError(f"relay command {obj} failed: {reply}")
        return reply

    def set(self, direction: str = "both", **fields: Any) -> None:
        self.command({"cmd": "set", "dir": direction, **fields})

    def reset(self) -> None:
        self.command({"cmd": "reset"})

    def rebind(self) -> int:
        return int(self.command({"cmd": "rebind"})["rebinds"])

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.command({"cmd": "stats"})["stats"]
        return stats


# -- the tunnel ------------------------------------------------------------------------------


@dataclass
class InnerResult:
    """What the two ends of an inner TCP transfer reported."""

    sender: dict[str, Any]
    receiver: dict[str, Any]
    progress: list[int]


class RealTunnel:
    """Both programs on a fresh topology. Build with the ``realnet`` fixture."""

    def __init__(
        self,
        tmp: Path,
        *,
        n_paths: int = 2,
        relays: Sequence[int] = (),
        relay_side: str = "gateway",
        policy: str | None = None,
        ipv6: bool = False,
        store: str = "memory",
    ) -> None:
        if relay_side not in ("gateway", "client"):
            raise ValueError("relay_side must be 'gateway' or 'client'")
        self.tmp = tmp
        self.n_paths = n_paths
        self.relay_paths = tuple(relays)
        self.relay_side = relay_side
        self.policy_text = policy
        self.ipv6 = ipv6
        self.store = store
        """``[state] store``: memory (a stop ends the sessions) or sqlite (they survive a
        restart; the store and its state key in ``tmp/state``)."""
        self.topo = Topology(n_paths)
        self.tag = self.topo.tag
        self.client_tun = f"jtc-{self.tag}"
        self.gateway_tun = f"jtg-{self.tag}"
        self.relays: dict[int, Relay] = {}
        self.gateway: subprocess.Popen[bytes] | None = None
        self.client: subprocess.Popen[bytes] | None = None
        self.gw_events: LineLog | None = None
        self.gw_stderr: LineLog | None = None
        self.client_stderr: LineLog | None = None
        self._events: LineLog | None = None
        self._helpers: list[subprocess.Popen[bytes]] = []
        self._open = False
        self.control_dir = Path(tempfile.mkdtemp(prefix="jvpn-ctl-"))
        """The programs' control sockets (short paths: a unix socket path is at most 107
        bytes; a test's tmp_path can be longer)."""
        self.gateway_socket = self.control_dir / "gateway.sock"
        self.client_socket = self.control_dir / "client.sock"

    # -- lifetime --------------------------------------------------------------------------

    def open(self) -> RealTunnel:
        self.topo.open()
        self._open = True
        self._write_files()
        for i in self.relay_paths:
            self.relays[i] = self._start_relay(i)
        self._start_gateway()
        return self

    @property
    def events(self) -> LineLog:
        """The client's JSON event lines (stdout of jvpn-tui --headless)."""
        assert self._events is not None, "start_client() first"
        return self._events

    def close(self) -> None:
        """Stop everything (SIGTERM, then SIGKILL), remove the namespaces, check the host."""
        if not self._open:
            return
        self._open = False
        procs = [p for p in (self.client, *self._helpers, self.gateway) if p is not None]
        procs += [r.proc for r in self.relays.values()]
        for proc in procs:
            stop_process(proc)
        try:
            self.topo.close()
        finally:
            shutil.rmtree(self.control_dir, ignore_errors=True)
            leftovers = host_leftovers(self.tag)
            assert not leftovers, f"left in the host namespace: {leftovers}"

    # -- configuration ---------------------------------------------------------------------

    def path_target(self, i: int) -> tuple[str, int]:
        """Where the client's path i sends (the gateway, or the relay on that path)."""
        link = self.topo.paths[i]
        if i in self.relay_paths:
            if self.relay_side == "gateway":
                return (link.gateway_ip, RELAY_PORT_BASE + i)
            return ("127.0.0.1", RELAY_PORT_BASE + i)
        return (link.gateway_ip, GATEWAY_PORT)

    def _write_files(self) -> None:
        from cryptography.hazmat.primitives.asymmetric import x25519
        from cryptography.hazmat.primitives.serialization import (
            Encoding,
            NoEncryption,
            PrivateFormat,
            PublicFormat,
        )

        for who in ("gateway", "client"):
            key = x25519.X25519PrivateKey.generate()
            raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
            pub = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            write_private_key(self.tmp / f"{who}.key", raw)
            write_public_key(self.tmp / f"{who}.pub", pub)
        policy_line = ""
        if self.policy_text is not None:
            (self.tmp / "policy.toml").write_text(self.policy_text)
            policy_line = 'policy = "policy.toml"\n'
        tun6 = f'subnet6 = "{INNER_SUBNET6}"\n' if self.ipv6 else ""
        client6 = f'address6 = "{CLIENT_INNER6}"\n' if self.ipv6 else ""
        (self.tmp / "gateway.toml").write_text(
            f'node_id = "gw-{self.tag}"\n'
            f'listen = ["0.0.0.0:{GATEWAY_PORT}"]\n'
            'private_key = "gateway.key"\n'
            "workers = 1\n"  # one process (tests/test_workers*.py run several)
            f"{policy_line}"
            f'metrics = "127.0.0.1:{METRICS_PORT}"\n'
            f"[control]\nsocket = {json.dumps(str(self.gateway_socket))}\n"
            f'[state]\nstore = "{self.store}"\nstate_dir = "state"\n'
            "[tun]\n"
            f'name = "{self.gateway_tun}"\n'
            f'subnet = "{INNER_SUBNET}"\n'
            f'address = "{GATEWAY_INNER}"\n'
            f"{tun6}"
            "[[clients]]\n"
            'name = "client"\n'
            'public_key = "client.pub"\n'
            f'address = "{CLIENT_INNER}"\n'
            f"{client6}"
            "[[sinks]]\n"
            'type = "stdout"\n'
        )
        paths = []
        for i, link in enumerate(self.topo.paths):
            host, port = self.path_target(i)
            if i in self.relay_paths and self.relay_side == "client":
                local = 'bind = "127.0.0.1"\n'
            else:
                local = f'bind = "{link.client_ip}"\ndevice = "{link.client_ifname}"\n'
            paths.append(f'[[path]]\nname = "{"ABC"[i]}"\n{local}gateway = "{host}:{port}"\n')
        (self.tmp / "client.toml").write_text(
            'private_key = "client.key"\n'
            'gateway_public_key = "gateway.pub"\n'
            f"{policy_line}"
            'node_id = "client"\n'
            f"control_socket = {json.dumps(str(self.client_socket))}\n"
            "[tun]\n"
            f'name = "{self.client_tun}"\n' + "".join(paths)
        )

    # -- programs ------------------------------------------------------------------------------

    def _start_relay(self, i: int) -> Relay:
        link = self.topo.paths[i]
        if self.relay_side == "gateway":
            ns, listen, upstream = (
                self.topo.gateway_ns,
                f"{link.gateway_ip}:{RELAY_PORT_BASE + i}",
                f"127.0.0.1:{GATEWAY_PORT}",
            )
        else:
            ns, listen, upstream = (
                self.topo.client_ns,
                f"127.0.0.1:{RELAY_PORT_BASE + i}",
                f"{link.gateway_ip}:{GATEWAY_PORT}",
            )
        control = ("127.0.0.1", RELAY_CONTROL_BASE + i)
        argv = [
            *program("jvpn-impair", "tunnel.impair"),
            "--listen", listen, "--upstream", upstream,
            "--control", f"{control[0]}:{control[1]}", "--seed", str(RELAY_SEED_BASE + i),
        ]  # fmt: skip
        proc = self.topo.exec(ns, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        prioritize(proc.pid)
        ready = json.loads(read_line(proc, START_TIMEOUT_S))
        assert ready.get("event") == "listening", ready
        return Relay(proc, ns, control)

    def _start_gateway(self) -> None:
        argv = [*program("jvpn-gateway", "tunnel.gateway.main"), "--config", "gateway.toml"]
        proc = self.topo.exec(
            self.topo.gateway_ns, argv, cwd=self.tmp, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        prioritize(proc.pid)
        self.gateway = proc
        assert proc.stdout is not None and proc.stderr is not None
        self.gw_events = LineLog(proc.stdout, "gateway-events")
        self.gw_stderr = stderr = LineLog(proc.stderr, "gateway-stderr")
        wait_until(
            lambda: any("listening on" in line for line in stderr.lines) or proc.poll() is not None,
            START_TIMEOUT_S,
            "jvpn-gateway ready",
        )
        if proc.poll() is not None:
            raise AssertionError(
                f"jvpn-gateway exited with {proc.returncode}:\n" + "\n".join(stderr.lines)
            )

    def start_client(self, wait_attached: bool = True) -> None:
        argv = [*program("jvpn-tui", "jvpn_tui"), "--headless", "--config", "client.toml"]
        proc = self.topo.exec(
            self.topo.client_ns, argv, cwd=self.tmp, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        prioritize(proc.pid)
        self.client = proc
        assert proc.stdout is not None and proc.stderr is not None
        self._events = LineLog(proc.stdout, "client-events")
        self.client_stderr = LineLog(proc.stderr, "client-stderr")
        if wait_attached:
            self.events.wait_type("STATE_CHANGE", START_TIMEOUT_S, new_state="ATTACHED")
            wait_until(self.client_inner_ready, START_TIMEOUT_S, "client TUN address")

    def client_inner_ready(self) -> bool:
        """The client TUN exists and carries the inner address."""
        ipr = self.topo.ipr(self.topo.client_ns)
        index = ipr.link_lookup(ifname=self.client_tun)
        if not index:
            return False
        addrs = [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=index[0])]
        return CLIENT_INNER in addrs

    def client_tun_exists(self) -> bool:
        return bool(self.topo.ipr(self.topo.client_ns).link_lookup(ifname=self.client_tun))

    def stop_client(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal the client and wait for its exit; its code."""
        assert self.client is not None
        if self.client.poll() is None:
            self.client.send_signal(sig)
        code = self.client.wait(timeout)
        self.events.join(5.0)
        return code

    def final(self, timeout: float = 15.0) -> dict[str, Any]:
        """The client's ENGINE_STOPPED line (waits for it)."""
        return self.events.wait_type("ENGINE_STOPPED", timeout)

    # -- observation -----------------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        return parse_metrics(http_get(self.topo.gateway_ns, METRICS_PORT))

    def session_ids(self) -> set[str]:
        """Every non-empty session id the client's events carried."""
        return {e["session_id"] for e in self.events.events if e.get("session_id")}

    def switches(self, since: int = 0) -> list[dict[str, Any]]:
        return self.events.of_type("TRANSPORT_SWITCH", since)

    def states(self, since: int = 0) -> list[str]:
        return [e["new_state"] for e in self.events.of_type("STATE_CHANGE", since)]

    # -- inner traffic ---------------------------------------------------------------------------

    def helper(self, ns: str, code: str, *args: str) -> subprocess.Popen[bytes]:
        proc = self.topo.python(ns, code, *args)
        self._helpers.append(proc)
        return proc

    def start_download(self, nbytes: int, port: int = 5001, rate: float = 0) -> InnerTransfer:
        """Gateway-side server sends ``nbytes`` to a client-side receiver over the inner TCP,
        paced at ``rate`` bytes/s (0: as fast as it goes)."""
        server = self.helper(
            self.topo.gateway_ns, TCP_SEND_SERVER, GATEWAY_INNER, str(port), str(nbytes), str(rate)
        )
        assert json.loads(read_line(server, START_TIMEOUT_S)) == {"ready": True}
        receiver = self.helper(self.topo.client_ns, TCP_RECV_CLIENT, GATEWAY_INNER, str(port))
        return InnerTransfer(server, receiver)

    def start_udp_stream(
        self, duration: float = 120.0, *, interval: float = 0.02, port: int = 7070
    ) -> subprocess.Popen[bytes]:
        """Inner UDP echo traffic (data packets on the active path) until :func:`stop_stream`
        (or for at most ``duration`` s).

        Returns the client-side sender; its last line is JSON {sent, received, ...}.
        """
        server = self.helper(self.topo.gateway_ns, UDP_ECHO_SOURCE, GATEWAY_INNER, str(port))
        assert read_line(server, START_TIMEOUT_S) == "ready"
        return self.helper(
            self.topo.client_ns, UDP_STREAM, CLIENT_INNER, GATEWAY_INNER, str(port),
            str(interval), str(duration),
        )  # fmt: skip

    def udp_echo(self, count: int = 50, port: int = 7070, timeout: float = 10.0) -> list[str]:
        """Send ``count`` datagrams client -> gateway inner address; the echoes' sources."""
        server = self.helper(self.topo.gateway_ns, UDP_ECHO_SOURCE, GATEWAY_INNER, str(port))
        assert read_line(server, START_TIMEOUT_S) == "ready"
        with ns_socket(self.topo.client_ns) as sock:
            sock.bind((CLIENT_INNER, 0))
            sock.settimeout(0.2)
            answers: dict[int, str] = {}
            deadline = time.monotonic() + timeout
            while len(answers) < count and time.monotonic() < deadline:
                for n in range(count):
                    if n not in answers:
                        sock.sendto(f"ping {n}".encode(), (GATEWAY_INNER, port))
                with contextlib.suppress(TimeoutError):
                    while len(answers) < count:
                        data, addr = sock.recvfrom(2048)
                        seen_from, _, payload = data.decode().partition("|")
                        assert addr == (GATEWAY_INNER, port)
                        answers[int(payload.split()[1])] = seen_from
        stop_process(server)
        return [answers[n] for n in sorted(answers)]


class InnerTransfer:
    """A running inner TCP transfer (see :meth:`RealTunnel.start_download`)."""

    def __init__(self, server: subprocess.Popen[bytes], receiver: subprocess.Popen[bytes]) -> None:
        self.server = server
        self.receiver = receiver
        self.progress: list[int] = []
        self.result: dict[str, Any] | None = None

    def wait_progress(self, nbytes: int, timeout: float) -> None:
        """Block until the receiver has reported at least ``nbytes``."""
        deadline = time.monotonic() + timeout
        while not self.progress or self.progress[-1] < nbytes:
            line = json.loads(read_line(self.receiver, max(0.1, deadline - time.monotonic())))
            if "progress" not in line:
                self.result = line
                raise AssertionError(f"transfer ended before {nbytes} bytes: {line}")
            self.progress.append(line["progress"])

    def finish(self, timeout: float) -> InnerResult:
        deadline = time.monotonic() + timeout
        while self.result is None:
            line = json.loads(read_line(self.receiver, max(0.1, deadline - time.monotonic())))
            if "progress" in line:
                self.progress.append(line["progress"])
            else:
                self.result = line
        sender = json.loads(read_line(self.server, max(1.0, deadline - time.monotonic())))
        return InnerResult(sender, self.result, self.progress)


# -- helpers ---------------------------------------------------------------------------------


def wait_until(pred: Callable[[], bool], timeout: float, what: str, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


def stop_process(proc: subprocess.Popen[Any], grace: float = STOP_GRACE_S) -> int | None:
    """SIGTERM, wait ``grace`` seconds, then SIGKILL. Returns the exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
    return proc.returncode


def host_leftovers(tag: str) -> list[str]:
    """Links in the host namespace that belong to run ``tag`` (TUNs or veths)."""
    with IPRoute() as ipr:
        names = [link.get_attr("IFLA_IFNAME") or "" for link in ipr.get_links()]
    return [n for n in names if tag in n]


@dataclass(frozen=True)
class Captured:
    """One UDP datagram seen by a packet capture."""

    src: tuple[str, int]
    dst: tuple[str, int]
    payload: bytes


class Capture:
    """AF_PACKET capture of IPv4/UDP (``ethertype=Capture.ETH_P_IPV6``: IPv6/UDP) on one
    interface of a namespace, on a thread.

    The socket asks for a virtio-net header with every packet (``PACKET_VNET_HDR``), so a
    UDP GSO super-packet (one skb carrying a run of datagrams, as the client sends them
    and a veth passes them on) is split back into the datagrams it carries.
    """

    ETH_P_IP = 0x0800
    ETH_P_IPV6 = 0x86DD
    SOL_PACKET = 263
    PACKET_VNET_HDR = 15  # SOCK_RAW only: frames come with their Ethernet header
    ETH_HDR = 14
    VNET_HDR = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_*

    def __init__(
        self, ns: str, ifname: str, dst_port: int | None = None, ethertype: int = ETH_P_IP
    ) -> None:
        self.sock = ns_socket(ns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ethertype))
        self.sock.setsockopt(self.SOL_PACKET, self.PACKET_VNET_HDR, 1)
        self.sock.bind((ifname, ethertype))
        self.sock.settimeout(0.2)
        self.dst_port = dst_port
        self.packets: list[Captured] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"capture-{ifname}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65535 + self.VNET_HDR.size)
            except TimeoutError:
                continue
            except OSError:
                return
            _, gso_type, _, gso_size, _, _ = self.VNET_HDR.unpack_from(data)
            packet = parse_udp(data[self.VNET_HDR.size + self.ETH_HDR :])
            if packet is None or (self.dst_port is not None and packet.dst[1] != self.dst_port):
                continue
            if gso_type == 0 or gso_size == 0:
                self.packets.append(packet)
                continue
            payload = packet.payload
            for at in range(0, len(payload), gso_size):
                self.packets.append(replace(packet, payload=payload[at : at + gso_size]))

    def stop(self) -> list[Captured]:
        self._stop.set()
        self._thread.join(2.0)
        self.sock.close()
        return list(self.packets)

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def parse_udp(data: bytes) -> Captured | None:
    """IPv4/UDP or IPv6/UDP (no extension headers) packet -> Captured; None for anything
    else."""
    if len(data) >= 48 and data[0] >> 4 == 6 and data[6] == socket.IPPROTO_UDP:
        src6, dst6 = (socket.inet_ntop(socket.AF_INET6, data[at : at + 16]) for at in (8, 24))
        sport, dport, length = struct.unpack_from("!HHH", data, 40)
        return Captured((src6, sport), (dst6, dport), bytes(data[48 : 40 + length]))
    if len(data) < 28 or data[0] >> 4 != 4 or data[9] != socket.IPPROTO_UDP:
        return None
    ihl = (data[0] & 0x0F) * 4
    src, dst = socket.inet_ntoa(data[12:16]), socket.inet_ntoa(data[16:20])
    sport, dport, length = struct.unpack_from("!HHH", data, ihl)
    return Captured((src, sport), (dst, dport), bytes(data[ihl + 8 : ihl + length]))


# -- CPU priority -----------------------------------------------------------------------------

SUT_NICE = -5
"""Nice value a flood test gives the programs under test (the flood stays at 0)."""


def prioritize(pid: int, nice: int = SUT_NICE) -> None:
    """Give every thread of ``pid`` the nice value ``nice`` (threads it starts later inherit
    it). Every program under test (client, gateway, relays) runs so: its path death is
    judged on a 300 ms silence, and a test asserts what the programs do, not whether an
    unrelated busy process starved them past that silence. A flood test raises the gateway
    and the client above the flood and above whatever
    else the machine runs: how much of the flood the gateway reads, and so how many of the
    session's own datagrams the kernel drops with the flood's, then depends on the gateway
    and the flood, not on the machine's other load."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)


# -- kernel and gateway counters ------------------------------------------------------------


def _udp_socket(pid: int, port: int) -> list[str]:
    """The /proc/<pid>/net/udp row of the socket bound to ``port``, split in columns."""
    suffix = f":{port:04X}"
    for line in Path(f"/proc/{pid}/net/udp").read_text().splitlines()[1:]:
        cols = line.split()
        if cols[1].endswith(suffix):
            return cols
    raise AssertionError(f"no UDP socket on port {port} in /proc/{pid}/net/udp")


def socket_drops(pid: int, port: int) -> int:
    """Datagrams the kernel dropped at ``pid``'s UDP socket on ``port`` (receive buffer full)."""
    return int(_udp_socket(pid, port)[-1])


def socket_backlog(pid: int, port: int) -> int:
    """Bytes waiting in the receive queue of ``pid``'s UDP socket on ``port``."""
    return int(_udp_socket(pid, port)[4].partition(":")[2], 16)


def wait_drained(pid: int, port: int, timeout: float = 30.0) -> None:
    """Until the socket's receive queue is empty: everything that arrived has been read
    (the gateway's counters are then current: its metrics are gathered on its loop thread,
    after the read that emptied the queue)."""
    wait_until(lambda: socket_backlog(pid, port) == 0, timeout, f"UDP port {port} drained")


def udp_snmp(pid: int) -> dict[str, int]:
    """The ``Udp:`` counters of ``pid``'s network namespace (/proc/<pid>/net/snmp)."""
    lines = [ln.split() for ln in Path(f"/proc/{pid}/net/snmp").read_text().splitlines()]
    names, values = [ln for ln in lines if ln and ln[0] == "Udp:"][:2]
    return {k: int(v) for k, v in zip(names[1:], values[1:], strict=True)}


def link_drops(pid: int, ifname: str) -> tuple[int, int]:
    """(rx, tx) drops of interface ``ifname`` in ``pid``'s namespace (/proc/<pid>/net/dev)."""
    for line in Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]:
        name, _, rest = line.partition(":")
        if name.strip() == ifname:
            cols = rest.split()
            return int(cols[3]), int(cols[11])
    raise AssertionError(f"no interface {ifname} in /proc/{pid}/net/dev")


def drop_counts(metrics: dict[str, float]) -> dict[str, int]:
    """The gateway's ``drops_total`` by reason, from its parsed metrics."""
    prefix = 'jvpn_gateway_drops_total{reason="'
    return {k[len(prefix) : -2]: int(v) for k, v in metrics.items() if k.startswith(prefix)}


def datagrams_in(metrics: dict[str, float]) -> int:
    """Datagrams the gateway has read (after splitting GRO reads)."""
    return int(metrics['jvpn_gateway_datagrams_total{direction="in"}'])


# -- the fixture -----------------------------------------------------------------------------


@pytest.fixture
def realnet(tmp_path: Path) -> Iterator[Callable[..., RealTunnel]]:
    """Factory: ``realnet(n_paths=2, relays=(0,), policy=TOML, ipv6=False, store="memory",
    client=True)`` -> RealTunnel (``ipv6``: the gateway gets an inner IPv6 subnet, see
    INNER_SUBNET6; ``store``: the gateway's ``[state] store``).

    Skips when not root / no namespaces / no /dev/net/tun. Everything built is torn down
    at the end of the test, also when it fails.
    """
    require_tun()
    built: list[RealTunnel] = []

    def make(client: bool = True, **kwargs: Any) -> RealTunnel:
        sub = tmp_path / f"t{len(built)}"
        sub.mkdir()
        tunnel = RealTunnel(sub, **kwargs)
        built.append(tunnel)
        tunnel.open()
        if client:
            tunnel.start_client()
        return tunnel

    try:
        yield make
    finally:
        errors = []
        for tunnel in reversed(built):
            try:
                tunnel.close()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


# -- small programs run inside the namespaces ------------------------------------------------

TCP_SEND_SERVER = r"""
import hashlib, json, socket, sys, time
ip, port, total, rate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
srv = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((ip, port)); srv.listen(1)
print(json.dumps({"ready": True}), flush=True)
conn, peer = srv.accept()
h = hashlib.sha256(); sent = 0; i = 0; err = None; start = time.monotonic()
try:
    while sent < total:
        block = (hashlib.sha256(i.to_bytes(8, "big")).digest() * 2048)[: total - sent]
        conn.sendall(block); h.update(block); sent += len(block); i += 1
        ahead = start + sent / rate - time.monotonic() if rate > 0 else 0
        if ahead > 0:
            time.sleep(ahead)
    conn.shutdown(socket.SHUT_WR)
    conn.settimeout(120)
    while conn.recv(65536):
        pass
except OSError as exc:
    err = repr(exc)
print(json.dumps({"sent": sent, "sha256": h.hexdigest(), "peer": peer[0], "error": err}),
      flush=True)
"""
"""Accept one inner TCP connection on argv[1]:argv[2], send argv[3] deterministic bytes
(paced at argv[4] bytes/s, 0: unpaced), wait for the peer to close; print what was sent
(count, sha256) and any error."""

TCP_RECV_CLIENT = r"""
import hashlib, json, socket, sys, time
ip, port = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 15
while True:
    try:
        s = socket.create_connection((ip, port), timeout=5); break
    except OSError:
        if time.monotonic() > deadline: raise
        time.sleep(0.2)
s.settimeout(60)
h = hashlib.sha256(); got = 0; err = None; step = 1 << 20; next_report = step
first = last = None; max_gap = 0.0; gap_at = 0
try:
    while True:
        data = s.recv(262144)
        now = time.monotonic()
        if not data:
            break
        if last is not None and now - last > max_gap:
            max_gap, gap_at = now - last, got
        if first is None:
            first = now
        last = now
        got += len(data); h.update(data)
        if got >= next_report:
            print(json.dumps({"progress": got}), flush=True); next_report += step
except OSError as exc:
    err = repr(exc)
s.close()
print(json.dumps({"received": got, "sha256": h.hexdigest(), "max_gap_ms": max_gap * 1000,
                  "gap_at": got and gap_at, "duration_s": (last - first) if first else 0.0,
                  "error": err}), flush=True)
"""
"""Connect to argv[1]:argv[2] over the inner network, receive to EOF; print progress every
MiB and then count, sha256, the longest gap between two receives (the stall), errors."""

UDP_ECHO_SOURCE = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    data, addr = s.recvfrom(65535)
    s.sendto(addr[0].encode() + b"|" + data, addr)
"""
"""UDP echo on argv[1]:argv[2] that prefixes each reply with the source address it saw."""


UDP_STREAM = r"""
import json, select, socket, sys, time
src, dst, port, interval, duration = (
    sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((src, 0)); s.setblocking(False)
start = time.monotonic(); end = start + duration; nxt = start
sent = received = 0; replies = []
while True:
    now = time.monotonic()
    if now >= end:
        break
    if select.select([sys.stdin], [], [], 0)[0]:  # told to stop
        end = now
        break
    if now >= nxt:
        try:
            s.sendto(b"seq %d" % sent, (dst, port)); sent += 1
        except OSError:
            pass
        nxt += interval
    try:
        while True:
            s.recvfrom(2048); received += 1; replies.append(time.monotonic())
    except BlockingIOError:
        pass
    time.sleep(min(0.005, max(0.0, nxt - time.monotonic())))
gaps = [b - a for a, b in zip(replies, replies[1:])]
print(json.dumps({"sent": sent, "received": received,
                  "max_reply_gap_ms": max(gaps, default=0.0) * 1000,
                  "replies_last_s": sum(1 for r in replies if r > end - 1.0)}), flush=True)
"""
"""Send a numbered datagram from argv[1] to argv[2]:argv[3] every argv[4] s for argv[5] s
(or until a line on stdin) and count the echoes; print totals, the longest gap between
echoes and the last second's."""


def stop_stream(stream: subprocess.Popen[bytes], timeout: float = 20.0) -> dict[str, Any]:
    """Stop a :meth:`RealTunnel.start_udp_stream` sender now; its totals."""
    assert stream.stdin is not None
    stream.stdin.write(b"stop\n")
    stream.stdin.flush()
    out: dict[str, Any] = json.loads(read_line(stream, timeout))
    return out


def policy_toml(**sections: dict[str, Any]) -> str:
    """A policy file: the mandatory keys at their defaults plus ``sections`` overrides."""
    merged: dict[str, dict[str, Any]] = {
        "session": {"max_lifetime_ms": 28_800_000, "transport_lost_ttl_ms": 15_000},
        "volatility": {"loss_volatile_threshold": 0.2},
        "switching": {"max_switches_per_min": 8, "recovery_window_ms": 8_000},
        "security": {"reattach_proof_max_age_ms": 5_000},
    }
    for name, values in sections.items():
        merged.setdefault(name, {}).update(values)
    lines = ['version = "it-1"']
    for name, values in merged.items():
        lines.append(f"[{name}]")
        for key, value in values.items():
            text = json.dumps(value) if not isinstance(value, bool) else str(value).lower()
            lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


def expected_sha256(nbytes: int) -> str:
    """sha256 of what TCP_SEND_SERVER sends for ``nbytes``."""
    h = hashlib.sha256()
    sent = i = 0
    while sent < nbytes:
        block = (hashlib.sha256(i.to_bytes(8, "big")).digest() * 2048)[: nbytes - sent]
        h.update(block)
        sent += len(block)
        i += 1
    return h.hexdigest()
