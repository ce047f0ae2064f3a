"""The real programs on loopback: a gateway, relays, clients, an attacker and a fake SIEM.

``Lab`` (a context manager, one per test) writes keys, policies and configurations into
a temporary directory and starts

* ``jvpn-gateway --config gw.toml`` (``inner_echo``, listen and metrics on port 0, a
  stdout sink whose JSON lines are parsed, optional syslog/jsonl sinks),
* ``jvpn-impair`` relays (one per client path, controlled over their JSON socket),
* ``jvpn-tui --headless --config client.toml`` with the ``memory`` inner side (a built-in
  ICMP echo source, no TUN, no root),

and stops everything (SIGTERM, then SIGKILL) when the test ends. Every process's JSON
lines are collected by a reader thread; ``wait_for`` polls them with generous timeouts
(the machine is shared and small).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from realnet import prioritize

from tunnel.core.client import ClientSession, PathSpec
from tunnel.core.handshake import generate_keypair
from tunnel.core.policy import POLICY_DEFAULT
from tunnel.impair.control import control
from tunnel.keys import encode_key, write_private_key

BIN = Path(sys.executable).parent
FAULTS = Path(__file__).with_name("faults.py")

GATEWAY_INNER = "10.66.0.1"

Event = dict[str, Any]


def fast_policy(version: str = "fi-1", **overrides: object) -> str:
    """A valid policy with short timers, as TOML text. ``section.key=value`` overrides."""
    values: dict[str, dict[str, object]] = {
        "session": {"max_lifetime_ms": 600_000, "transport_lost_ttl_ms": 6_000},
        "volatility": {
            "probe_interval_ms": 100,
            "standby_probe_interval_ms": 200,
            "dead_min_ms": 300,
            "loss_volatile_threshold": 0.2,
            # never idle (issue 11): these tests judge deaths at the busy probing rate,
            # also of sessions that carry no inner data
            "idle_after_ms": 3_600_000,
        },
        "switching": {
            "max_switches_per_min": 8,
            "switch_cooldown_ms": 500,
            "recovery_window_ms": 4_000,
        },
        "security": {"reattach_proof_max_age_ms": 5_000},
    }
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        values.setdefault(section, {})[name] = value
    lines = [f'version = "{version}"']
    for section, table in values.items():
        lines.append(f"[{section}]")
        for name, value in table.items():
            text = f'"{value}"' if isinstance(value, str) else str(value).lower()
            lines.append(f"{name} = {text}")
    return "\n".join(lines) + "\n"


class Proc:
    """A subprocess whose stdout JSON lines (and stderr lines) are collected."""

    def __init__(self, name: str, argv: list[str], *, cwd: Path) -> None:
        self.name = name
        self.argv = argv
        self.events: list[Event] = []
        self.stderr: list[str] = []
        self.exit_code: int | None = None
        self._lock = threading.Lock()
        self.popen = subprocess.Popen(
            argv,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        prioritize(self.popen.pid)  # the program under test, above unrelated load (realnet)
        self._threads = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _read_stdout(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            obj["_t"] = time.monotonic()
            with self._lock:
                self.events.append(obj)

    def _read_stderr(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            with self._lock:
                self.stderr.append(line.rstrip("\n"))

    @property
    def pid(self) -> int:
        return self.popen.pid

    def snapshot(self) -> list[Event]:
        with self._lock:
            return list(self.events)

    def of(self, event_type: str, **match: object) -> list[Event]:
        """Events of one type whose fields equal ``match``."""
        return [
            e
            for e in self.snapshot()
            if e.get("event_type") == event_type and all(e.get(k) == v for k, v in match.items())
        ]

    def wait_for(
        self, pred: Callable[[], Any], timeout: float = 20.0, what: str = "condition"
    ) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            result = pred()
            if result:
                return result
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"{self.name}: timed out after {timeout}s waiting for {what}\n"
                    f"exit={self.popen.poll()} stderr tail={self.stderr[-5:]}\n"
                    f"last events={[e.get('event_type') for e in self.snapshot()[-15:]]}"
                )
            time.sleep(0.05)

    def wait_event(self, event_type: str, timeout: float = 20.0, **match: object) -> Event:
        found = self.wait_for(
            lambda: self.of(event_type, **match), timeout, f"{event_type} {match}"
        )
        return found[0]  # type: ignore[no-any-return]

    def wait_stderr(self, text: str, timeout: float = 20.0) -> str:
        def find() -> str | None:
            with self._lock:
                return next((line for line in self.stderr if text in line), None)

        return self.wait_for(find, timeout, f"stderr {text!r}")  # type: ignore[no-any-return]

    def rss_kb(self) -> int:
        """Resident set size of the process (kB), from /proc."""
        with open(f"/proc/{self.pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def wait_exit(self, timeout: float = 20.0) -> int:
        try:
            self.exit_code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} did not exit within {timeout}s; stderr={self.stderr[-5:]}"
            ) from None
        for t in self._threads:
            t.join(5)
        return self.exit_code

    def stop(self, timeout: float = 8.0) -> int:
        """SIGTERM (explicit terminate in every program), SIGKILL if it hangs."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.wait_exit(timeout)
        except AssertionError:
            self.popen.kill()
            self.popen.wait(5)
            raise


class Gateway(Proc):
    address: tuple[str, int]
    metrics_address: tuple[str, int] | None

    def metrics(self) -> dict[str, float]:
        """``name{labels}`` -> value from GET /metrics."""
        assert self.metrics_address is not None
        url = "http://{}:{}/metrics".format(*self.metrics_address)
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def session_events(self, session_id: str) -> list[Event]:
        return [e for e in self.snapshot() if e.get("session_id") == session_id]


class Relay(Proc):
    listen: tuple[str, int]
    control_address: tuple[str, int]

    def set(self, direction: str = "both", **fields: object) -> None:
        reply = control(self.control_address, {"cmd": "set", "dir": direction, **fields})
        assert reply["ok"], reply

    def kill_path(self) -> None:
        self.set("both", blackhole=True)

    def revive(self) -> None:
        self.set("both", blackhole=False, loss=0.0)

    def rebind(self) -> None:
        assert control(self.control_address, {"cmd": "rebind"})["ok"]

    def stats(self) -> dict[str, Any]:
        reply = control(self.control_address, {"cmd": "stats"})
        return reply["stats"]  # type: ignore[no-any-return]


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


class Lab:
    """Keys, files and processes of one test; everything is stopped on exit."""

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="jvpn-fi-")
        self.dir = Path(self._tmp.name)
        self.gw_private, self.gw_public = generate_keypair()
        write_private_key(self.dir / "gw.key", self.gw_private)
        self.clients: dict[str, tuple[bytes, bytes, str]] = {}
        for i, name in enumerate(("alice", "bob", "carol"), start=2):
            private, public = generate_keypair()
            write_private_key(self.dir / f"{name}.key", private)
            self.clients[name] = (private, public, f"10.66.0.{i}")
        self.procs: list[Proc] = []

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.procs):
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.popen.wait(8)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(5)
        self._tmp.cleanup()

    def write(self, name: str, text: str) -> Path:
        path = self.dir / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)  # atomic: the gateway's poll never reads half a file
        return path

    # -- programs ------------------------------------------------------------------------

    def gateway(
        self,
        *,
        policy: str | None = None,
        sinks: Iterable[str] = (),
        listen: str = "127.0.0.1:0",
        fault: str | None = None,
    ) -> Gateway:
        """Start jvpn-gateway; returns once it is listening. ``sinks``: extra TOML."""
        lines = [
            'node_id = "gw"',
            f'listen = "{listen}"',
            'private_key = "gw.key"',
            'metrics = "127.0.0.1:0"',
            "inner_echo = true",
            "workers = 1",
        ]
        if policy is not None:
            self.write("gw-policy.toml", policy)
            lines.append('policy = "gw-policy.toml"')
        for name, (_, public, address) in self.clients.items():
            lines += [
                "[[clients]]",
                f'name = "{name}"',
                f'public_key = "{encode_key(public)}"',
                f'address = "{address}"',
            ]
        lines += ["[control]", 'socket = "off"']  # no control socket: it is not under test
        lines += ["[state]", 'store = "memory"']  # a stop ends the sessions (no state dir)
        lines += ["[[sinks]]", 'type = "stdout"', *sinks]
        self.write("gw.toml", "\n".join(lines) + "\n")
        argv = [str(BIN / "jvpn-gateway"), "--config", "gw.toml"]
        if fault is not None:
            argv = [sys.executable, str(FAULTS), fault, "gateway", *argv[1:]]
        gw = Gateway("gateway", argv, cwd=self.dir)
        self.procs.append(gw)
        ready = gw.wait_stderr("listening on", timeout=20)
        listening = ready.split("listening on ", 1)[1].split(",", 1)[0]
        gw.address = _addr(listening)
        gw.metrics_address = (
            _addr(ready.split("metrics http://", 1)[1].split("/", 1)[0])
            if "metrics http://" in ready
            else None
        )
        return gw

    def relay(self, upstream: tuple[str, int], *, extra: Iterable[str] = ()) -> Relay:
        argv = [
            str(BIN / "jvpn-impair"),
            "--listen", "127.0.0.1:0",
            "--upstream", "{}:{}".format(*upstream),
            "--control", "127.0.0.1:0",
            "--seed", "7",
            *extra,
        ]  # fmt: skip
        relay = Relay(f"relay{len(self.procs)}", argv, cwd=self.dir)
        self.procs.append(relay)
        line = relay.wait_for(
            lambda: [e for e in relay.snapshot() if e.get("event") == "listening"],
            10,
            "relay listening",
        )[0]
        relay.listen = _addr(line["listen"])
        relay.control_address = _addr(line["control"])
        return relay

    def client(
        self,
        paths: Iterable[tuple[str, int]],
        *,
        name: str = "alice",
        policy: str | None = None,
        events: Iterable[str] = (),
        rate_pps: float = 50.0,
        fault: str | None = None,
    ) -> Proc:
        """Start ``jvpn-tui --headless`` for client ``name`` over ``paths``."""
        lines = [
            f'private_key = "{name}.key"',
            f'gateway_public_key = "{encode_key(self.gw_public)}"',
            f'node_id = "{name}"',
            'control_socket = "off"',  # not under test; the default may be taken
        ]
        if policy is not None:
            self.write(f"{name}-policy.toml", policy)
            lines.append(f'policy = "{name}-policy.toml"')
        lines += ["[inner]", 'kind = "memory"', f"rate_pps = {rate_pps}"]
        if events:
            lines += ["[events]", *events]
        for i, (host, port) in enumerate(paths, start=1):
            lines += ["[[path]]", f'name = "p{i}"', f'gateway = "{host}:{port}"']
        self.write(f"{name}.toml", "\n".join(lines) + "\n")
        argv = [str(BIN / "jvpn-tui"), "--headless", "--config", f"{name}.toml"]
        if fault is not None:
            argv = [sys.executable, str(FAULTS), fault, "client", "--config", f"{name}.toml"]
        proc = Proc(name, argv, cwd=self.dir)
        self.procs.append(proc)
        return proc


# -- helpers on event lists -----------------------------------------------------------------


def transitions(events: Iterable[Event], session_id: str | None = None) -> list[tuple[Any, ...]]:
    """(previous_state, new_state, reason_code, state_version) of every STATE_CHANGE."""
    return [
        (e["previous_state"], e["new_state"], e["reason_code"], e["state_version"])
        for e in events
        if e.get("event_type") == "STATE_CHANGE"
        and (session_id is None or e.get("session_id") == session_id)
    ]


def assert_versions_contiguous(trans: list[tuple[Any, ...]]) -> None:
    """Every transition adds exactly 1 to state_version, starting at 1."""
    versions = [t[3] for t in trans]
    assert versions == list(range(1, len(versions) + 1)), versions


def session_ids(events: Iterable[Event]) -> set[str]:
    return {e["session_id"] for e in events if e.get("session_id")}


def final_line(proc: Proc) -> Event:
    stopped = proc.of("ENGINE_STOPPED")
    assert stopped, f"{proc.name}: no ENGINE_STOPPED line; stderr={proc.stderr[-5:]}"
    return stopped[-1]


class Attacker:
    """A UDP tap on one client path that records the client's datagrams and can inject.

    client -> tap.listen -> gateway and back (one client). ``captured`` holds every
    client->gateway datagram; ``send`` injects bytes towards the gateway from a socket of
    its own (another source address, like an off-path attacker that saw the traffic).
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.down = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.down.bind(("127.0.0.1", 0))
        self.listen: tuple[str, int] = self.down.getsockname()
        self.up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.up.bind(("127.0.0.1", 0))
        self.up.connect(upstream)
        self.inject_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.inject_sock.bind(("127.0.0.1", 0))
        self.captured: list[bytes] = []
        self.client: tuple[str, int] | None = None
        self._stop = False
        self._threads = [
            threading.Thread(target=self._pump_up, daemon=True),
            threading.Thread(target=self._pump_down, daemon=True),
        ]
        for sock in (self.down, self.up):
            sock.settimeout(0.2)
        for t in self._threads:
            t.start()

    def _pump_up(self) -> None:
        while not self._stop:
            try:
                data, src = self.down.recvfrom(65535)
            except (TimeoutError, OSError):
                continue
            self.client = src
            if len(self.captured) < 5000:
                self.captured.append(data)
            try:
                self.up.send(data)
            except OSError:  # e.g. ECONNREFUSED while the gateway is down: a lost datagram
                continue

    def _pump_down(self) -> None:
        while not self._stop:
            try:
                data = self.up.recv(65535)
            except (TimeoutError, OSError):
                continue
            if self.client is not None:
                self.down.sendto(data, self.client)

    def send(self, data: bytes) -> None:
        self.inject_sock.sendto(data, self.upstream)

    def close(self) -> None:
        self._stop = True
        for t in self._threads:
            t.join(2)
        for sock in (self.down, self.up, self.inject_sock):
            sock.close()


def handshake_churn(lab: Lab, gateway: tuple[str, int], name: str, count: int, rate: float) -> int:
    """``count`` fresh handshake initiations of client ``name`` (each replaces its session).

    A real initiator (the client protocol machine) builds each one; every accepted one makes
    the gateway emit ~5 events. Returns how many were sent.
    """
    private = lab.clients[name][0]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sent = 0
    start = time.monotonic()
    try:
        for i in range(count):
            now = time.monotonic()
            session = ClientSession(
                static_private=private, gateway_public=lab.gw_public,
                paths=[PathSpec(1, "churn")], policy=POLICY_DEFAULT, now=now,
                node_id=name, wall_offset=time.time() - now + i * 0.001,
            )  # fmt: skip
            session.connect(now)
            for _, data in session.datagrams_to_send():
                sock.sendto(data, gateway)
                sent += 1
            ahead = start + sent / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
    finally:
        sock.close()
    return sent
