"""The userspace impairment relay over loopback UDP: every knob has an observable effect."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tunnel.impair.control import control
from tunnel.impair.main import main
from tunnel.impair.model import Impairment
from tunnel.impair.net import RelayStartError, format_address, parse_address
from tunnel.impair.relay import ImpairRelay
from tunnel.impair.thread import RelayThread, run_relay_in_thread

ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 2.0


class UdpServer:
    """Loopback upstream: records (payload, source) of what it receives, optionally echoes."""

    def __init__(self, *, echo: bool = True) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.address: tuple[str, int] = self.sock.getsockname()
        self.echo = echo
        self.received: list[tuple[bytes, tuple[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, src = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            self.received.append((data, src))
            if self.echo:
                self.sock.sendto(data, src)

    def sources(self) -> list[tuple[str, int]]:
        return [src for _, src in self.received]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def client_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.settimeout(WAIT_S)
    return sock


def receive_all(sock: socket.socket, count: int, quiet_s: float = 0.3) -> list[bytes]:
    """Read until ``count`` datagrams arrived or nothing came for ``quiet_s``."""
    out: list[bytes] = []
    sock.settimeout(quiet_s)
    try:
        while len(out) < count:
            out.append(sock.recv(65535))
    except TimeoutError:
        pass
    finally:
        sock.settimeout(WAIT_S)
    return out


def ping(sock: socket.socket, relay: RelayThread, payload: bytes = b"ping") -> bytes:
    sock.sendto(payload, relay.bound_address)
    return sock.recv(65535)


def wait_for(predicate: Callable[[], bool], timeout: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


@pytest.fixture
def echo() -> Iterator[UdpServer]:
    server = UdpServer()
    yield server
    server.close()


@pytest.fixture
def relay(echo: UdpServer) -> Iterator[RelayThread]:
    handle = run_relay_in_thread(
        ("127.0.0.1", 0), echo.address, control=("127.0.0.1", 0), seed=1234
    )
    yield handle
    handle.stop()


@pytest.fixture
def client() -> Iterator[socket.socket]:
    sock = client_socket()
    yield sock
    sock.close()


def test_pass_through_both_directions(
    relay: RelayThread, echo: UdpServer, client: socket.socket
) -> None:
    payloads = [f"datagram-{i}".encode() for i in range(20)]
    for payload in payloads:
        assert ping(client, relay, payload) == payload
    stats = relay.stats()
    assert stats["up"]["received"] == stats["up"]["forwarded"] == 20
    assert stats["down"]["received"] == stats["down"]["forwarded"] == 20
    assert stats["mappings"] == 1
    # the upstream sees the relay's mapping socket, never the client itself
    assert {src for src in echo.sources()} != {client.getsockname()}
    assert len(set(echo.sources())) == 1


def test_loss_one_drops_everything_and_counts(
    relay: RelayThread, echo: UdpServer, client: socket.socket
) -> None:
    relay.set("up", loss=1.0)
    for i in range(50):
        client.sendto(b"x%d" % i, relay.bound_address)
    assert wait_for(lambda: relay.stats()["up"]["received"] == 50)
    assert receive_all(client, 1, quiet_s=0.2) == []
    stats = relay.stats()
    assert stats["up"]["dropped_loss"] == 50
    assert stats["up"]["forwarded"] == 0
    assert echo.received == []


def _lossy_run(seed: int, count: int = 2000) -> int:
    sink = UdpServer(echo=False)
    handle = run_relay_in_thread(("127.0.0.1", 0), sink.address, up=Impairment(loss=0.3), seed=seed)
    sock = client_socket()
    try:
        for start in range(0, count, 100):  # paced: the kernel must not drop anything
            for i in range(start, start + 100):
                sock.sendto(i.to_bytes(4, "big"), handle.bound_address)
            assert wait_for(lambda n=start + 100: handle.stats()["up"]["received"] == n)
        stats = handle.stats()["up"]
        assert stats["dropped_loss"] + stats["forwarded"] == count
        assert wait_for(lambda: len(sink.received) == stats["forwarded"])
        return int(stats["dropped_loss"])
    finally:
        sock.close()
        handle.stop()
        sink.close()


def test_loss_ratio_is_close_and_reproducible_for_a_seed() -> None:
    first = _lossy_run(seed=42)
    assert 600 - 90 <= first <= 600 + 90  # 30 % of 2000, about 4.5 standard deviations
    assert _lossy_run(seed=42) == first


def test_delay_adds_at_least_delay_ms(relay: RelayThread, client: socket.socket) -> None:
    relay.set("both", delay_ms=30)
    for _ in range(5):
        started = time.monotonic()
        assert ping(client, relay) == b"ping"
        assert time.monotonic() - started >= 0.059  # 30 ms each way; lower bound only
    assert relay.stats()["delayed"] == 0


def test_blackhole_drops_both_directions_then_restores(
    relay: RelayThread, echo: UdpServer, client: socket.socket
) -> None:
    assert ping(client, relay) == b"ping"
    relay.set("both", blackhole=True)
    for _ in range(10):
        client.sendto(b"lost", relay.bound_address)
    assert receive_all(client, 1, quiet_s=0.2) == []
    assert relay.stats()["up"]["dropped_blackhole"] == 10
    assert len(echo.received) == 1

    relay.set("up", blackhole=False)  # up restored, down still dead
    client.sendto(b"half", relay.bound_address)
    assert wait_for(lambda: len(echo.received) == 2)
    assert wait_for(lambda: relay.stats()["down"]["dropped_blackhole"] == 1)
    assert receive_all(client, 1, quiet_s=0.2) == []

    relay.set("down", blackhole=False)
    assert ping(client, relay, b"back") == b"back"


def test_duplicate_one_doubles_every_datagram(
    relay: RelayThread, echo: UdpServer, client: socket.socket
) -> None:
    relay.set("up", duplicate=1.0)
    for i in range(10):
        client.sendto(b"d%d" % i, relay.bound_address)
    got = receive_all(client, 20)
    assert sorted(got) == sorted([b"d%d" % i for i in range(10)] * 2)
    assert len(echo.received) == 20
    stats = relay.stats()["up"]
    assert (stats["received"], stats["duplicated"], stats["forwarded"]) == (10, 10, 20)


def test_reorder_makes_later_datagrams_overtake(relay: RelayThread, client: socket.socket) -> None:
    relay.set("up", reorder=0.2)
    count = 200
    for i in range(count):
        client.sendto(i.to_bytes(4, "big"), relay.bound_address)
        if i % 20 == 19:
            time.sleep(0.001)
    got = [int.from_bytes(d, "big") for d in receive_all(client, count)]
    assert sorted(got) == list(range(count))  # nothing lost, only reordered
    assert got != sorted(got)
    assert relay.stats()["up"]["reordered"] > 0


def test_rebind_gives_new_source_port_and_client_keeps_working(
    relay: RelayThread, echo: UdpServer, client: socket.socket
) -> None:
    assert ping(client, relay, b"before") == b"before"
    assert relay.rebind() == 1
    assert ping(client, relay, b"after") == b"after"
    (before_src, after_src) = echo.sources()
    assert before_src[1] != after_src[1]
    stats = relay.stats()
    assert stats["rebinds"] == 1 and stats["mappings"] == 1


def test_control_socket_set_stats_rebind_reset(
    relay: RelayThread, echo: UdpServer, client: socket.socket
) -> None:
    addr = relay.control_address
    assert addr is not None
    reply = control(addr, {"cmd": "set", "dir": "up", "loss": 1.0, "id": 7})
    assert reply["ok"] is True and reply["id"] == 7
    assert reply["impairment"]["up"]["loss"] == 1.0
    assert reply["impairment"]["down"]["loss"] == 0.0
    client.sendto(b"gone", relay.bound_address)
    assert wait_for(lambda: control(addr, {"cmd": "stats"})["stats"]["up"]["dropped_loss"] == 1)

    assert control(addr, {"cmd": "reset"})["ok"] is True
    assert ping(client, relay, b"one") == b"one"
    assert control(addr, {"cmd": "rebind"}) == {"ok": True, "rebinds": 1}
    assert ping(client, relay, b"two") == b"two"
    assert echo.sources()[0][1] != echo.sources()[1][1]

    reply = control(addr, {"cmd": "reset", "counters": True})
    assert reply["ok"] is True
    stats = control(addr, {"cmd": "stats"})["stats"]
    assert stats["up"]["received"] == 0 and stats["rebinds"] == 0
    json.dumps(stats)  # JSON-safe


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"not json", "invalid JSON"),
        (b"\xff\xfe", "invalid JSON"),
        (b"[1, 2]", "JSON object"),
        (b"[" * 3000 + b"]" * 3000, "larger than"),
        (b"[" * 2000 + b"]" * 2000, "invalid JSON"),
        (b'{"cmd": "explode"}', "unknown cmd"),
        (b'{"loss": 0.5}', "unknown cmd"),
        (b'{"cmd": "set", "loss": 2}', "loss"),
        (b'{"cmd": "set", "loss": NaN}', "loss"),
        (b'{"cmd": "set", "delay_ms": -1}', "delay_ms"),
        (b'{"cmd": "set", "blackhole": 1}', "blackhole"),
        (b'{"cmd": "set", "rate_kbit": 0}', "rate_kbit"),
        (b'{"cmd": "set", "lossy": 0.1}', "lossy"),
        (b'{"cmd": "set", "dir": "sideways", "loss": 0.1}', "direction"),
        (b'{"cmd": "set", "dir": 3, "loss": 0.1}', "dir"),
        (b'{"cmd": "set"}', "at least one field"),
        (b'{"cmd": "stats", "dir": "up"}', "no field dir"),
        (b'{"cmd": "reset", "counters": "yes"}', "counters"),
    ],
)
def test_control_socket_malformed_command_gets_error_reply(
    relay: RelayThread, client: socket.socket, raw: bytes, needle: str
) -> None:
    addr = relay.control_address
    assert addr is not None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(WAIT_S)
        sock.sendto(raw, addr)
        reply = json.loads(sock.recv(65535))
    assert reply["ok"] is False
    assert needle in reply["error"]
    # the relay is unchanged and alive
    assert relay.impairments()["up"] == Impairment()
    assert ping(client, relay) == b"ping"


def test_mapping_table_is_bounded_and_idle_mappings_expire(echo: UdpServer) -> None:
    handle = run_relay_in_thread(("127.0.0.1", 0), echo.address, max_mappings=8, mapping_idle_s=0.5)
    clients = [client_socket() for _ in range(30)]
    try:
        for sock in clients:
            assert ping(sock, handle) == b"ping"
        stats = handle.stats()
        assert stats["mappings"] == 8
        assert stats["mappings_evicted"] == 22
        assert len(set(echo.sources())) == 30
        assert ping(clients[-1], handle, b"still") == b"still"
        assert wait_for(lambda: handle.stats()["mappings"] == 0, timeout=3.0)
        assert handle.stats()["mappings_expired"] == 8
        assert ping(clients[0], handle, b"again") == b"again"  # a fresh mapping
    finally:
        for sock in clients:
            sock.close()
        handle.stop()


def test_rate_limit_spaces_datagrams(relay: RelayThread, client: socket.socket) -> None:
    relay.set("up", rate_kbit=100)  # 1000 bytes = 80 ms at 100 kbit/s
    started = time.monotonic()
    for _ in range(3):
        client.sendto(b"r" * 1000, relay.bound_address)
    assert len(receive_all(client, 3)) == 3
    assert time.monotonic() - started >= 0.239
    relay.set("up", rate_kbit=None)
    assert ping(client, relay) == b"ping"


def test_delayed_datagrams_are_bounded(echo: UdpServer, client: socket.socket) -> None:
    handle = run_relay_in_thread(
        ("127.0.0.1", 0), echo.address, up=Impairment(delay_ms=500), max_delayed=5
    )
    try:
        for i in range(12):
            client.sendto(b"q%d" % i, handle.bound_address)
        assert wait_for(lambda: handle.stats()["up"]["received"] == 12)
        stats = handle.stats()
        assert stats["up"]["dropped_overflow"] == 7 and stats["delayed"] == 5
        assert len(receive_all(client, 5, quiet_s=1.0)) == 5
    finally:
        handle.stop()


def test_handle_propagates_validation_errors_and_changes_nothing(relay: RelayThread) -> None:
    with pytest.raises(ValueError, match="reorder"):
        relay.set("both", loss=0.5, reorder=1.5)
    with pytest.raises(ValueError, match="direction"):
        relay.set("left", loss=0.5)
    assert relay.impairments() == {"up": Impairment(), "down": Impairment()}
    relay.stop()
    relay.stop()  # idempotent
    with pytest.raises(RuntimeError, match="stopped"):
        relay.stats()


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"loss": -0.1}, "loss"),
        ({"loss": 1.01}, "loss"),
        ({"duplicate": 2}, "duplicate"),
        ({"reorder": float("nan")}, "reorder"),
        ({"delay_ms": -5}, "delay_ms"),
        ({"jitter_ms": float("inf")}, "jitter_ms"),
        ({"delay_ms": "10"}, "delay_ms"),
        ({"loss": True}, "loss"),
        ({"blackhole": "yes"}, "blackhole"),
        ({"rate_kbit": 0}, "rate_kbit"),
        ({"rate_kbit": -1.0}, "rate_kbit"),
    ],
)
def test_impairment_validation_names_the_field(fields: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        Impairment(**fields)  # type: ignore[arg-type]


def test_impairment_replace_and_defaults() -> None:
    imp = Impairment().replace(loss=1, delay_ms=5)
    assert imp.loss == 1.0 and isinstance(imp.loss, float) and imp.delay_ms == 5.0
    assert not imp.clean and Impairment().clean
    with pytest.raises(ValueError, match="unknown impairment field 'lost'"):
        imp.replace(lost=0.1)


def test_start_errors_are_specific(echo: UdpServer) -> None:
    with pytest.raises(RelayStartError, match="cannot resolve"):
        run_relay_in_thread(("no-such-host.invalid", 0), echo.address)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    with pytest.raises(RelayStartError, match="is the upstream address"):
        run_relay_in_thread(("0.0.0.0", free_port), ("127.0.0.1", free_port))
    with pytest.raises(ValueError, match="upstream port"):
        ImpairRelay(("127.0.0.1", 0), ("127.0.0.1", 0))


def test_bind_failure_carries_the_errno_and_a_plain_message(echo: UdpServer) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        with pytest.raises(RelayStartError) as info:
            run_relay_in_thread(taken.getsockname(), echo.address)
    assert info.value.errno == errno.EADDRINUSE
    assert str(info.value).startswith("cannot listen on 127.0.0.1:")  # no "[Errno 98]" prefix
    assert str(info.value).endswith("address already in use")


def test_impair_imports_nothing_else_of_tunnel() -> None:
    """DESIGN §2: the relay is a standalone tool (imports nothing else of tunnel)."""
    code = (
        "import sys, tunnel.impair.main, tunnel.impair.thread\n"
        "print(' '.join(m for m in sys.modules if m.startswith('tunnel.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.split()
    assert out and all(m.startswith("tunnel.impair") for m in out), out


def test_same_seed_same_decisions_without_sockets() -> None:
    def decisions(seed: int) -> list[int]:
        relay = ImpairRelay(
            ("127.0.0.1", 0),
            ("127.0.0.1", 9),
            up=Impairment(loss=0.3, duplicate=0.2, reorder=0.1, jitter_ms=5),
            rng=random.Random(seed),
        )
        link = relay._up
        return [len(link.plan(100, 0.0, relay._rng)) for _ in range(500)]

    assert decisions(5) == decisions(5)
    assert decisions(5) != decisions(6)


@pytest.mark.parametrize(
    ("text", "addr"),
    [
        ("127.0.0.1:51820", ("127.0.0.1", 51820)),
        ("[::1]:51821", ("::1", 51821)),
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_parse_and_format_address(text: str, addr: tuple[str, int]) -> None:
    assert parse_address(text) == addr
    assert format_address(addr) == text


@pytest.mark.parametrize(
    "text", ["51820", ":51820", "host:", "host:65536", "::1:51820", "[]:1", "h:-1", "h:1x"]
)
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="bad address"):
        parse_address(text)


def test_cli_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "--upstream" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--listen", "nope", "--upstream", "127.0.0.1:1"], "bad address 'nope'"),
        (["--listen", "127.0.0.1:0"], "--upstream"),
        (["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1", "--loss", "3"], "loss"),
        (["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1", "--bogus"], "--bogus"),
    ],
)
def test_cli_usage_errors_exit_two_with_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("jvpn-impair: ") and needle in err


def _cli(*args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "tunnel.impair", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_cli_port_in_use_exits_two_with_one_line() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        proc = _cli("--listen", f"127.0.0.1:{port}", "--upstream", "127.0.0.1:9")
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 2
    assert err == f"jvpn-impair: cannot listen on 127.0.0.1:{port}: address already in use\n"
    assert out == ""


def test_cli_relays_and_exits_zero_on_sigterm(echo: UdpServer, client: socket.socket) -> None:
    proc = _cli(
        "--listen", "127.0.0.1:0", "--upstream", format_address(echo.address),
        "--control", "127.0.0.1:0", "--delay-ms", "1", "--seed", "3",
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        started = json.loads(proc.stdout.readline())
        assert started["event"] == "listening"
        listen = parse_address(started["listen"])
        client.sendto(b"via-cli", listen)
        assert client.recv(65535) == b"via-cli"
        reply = control(parse_address(started["control"]), {"cmd": "stats"})
        assert reply["stats"]["impairment"]["up"]["delay_ms"] == 1.0
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert err == ""
    stopped = json.loads(out.splitlines()[-1])
    assert stopped["event"] == "stopped" and stopped["stats"]["up"]["forwarded"] == 1
