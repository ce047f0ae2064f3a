"""Inner flows through whichever tunnel is up, and what they saw around each kill.

Three flows run for the whole of one tool's run, all on the inner addresses (gateway
10.66.0.1, client 10.66.0.2), each a small Python program inside a namespace so the
measuring receivers do not share the bench's interpreter lock:

* UDP up (client -> gateway) and UDP down (gateway -> client), ``rate`` datagrams/s each,
  sequence-numbered (stall and loss per kill);
* one paced inner TCP connection, gateway -> client (a download: ``TCP_CHUNK`` bytes
  ``TCP_RATE`` times a second, written non-blocking, so a stalled tunnel drops writes
  instead of queueing them); its receiver records the time of every read (stall per kill)
  and whether the connection broke (reset or EOF before the end).
"""

from __future__ import annotations

import array
import itertools
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from netns import Topology, read_line
from throughput import INNER_CLIENT, INNER_GATEWAY

UP_PORT = 9101
"""client -> gateway UDP flow."""
DOWN_PORT = 9102
"""gateway -> client UDP flow."""
TCP_PORT = 9103
"""gateway -> client TCP flow (the client connects)."""
TCP_RATE = 200.0
"""TCP writes per second."""
TCP_CHUNK = 500
"""Bytes per TCP write (200 x 500 B = 100 kB/s: paced, far below any tool's capacity)."""

SENDER = r"""
import select, socket, struct, sys, time
dst, port, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
pad = b"\xa5" * 92
seq, errors, t0 = 0, 0, time.monotonic()
print("ready", flush=True)
while True:
    now = time.monotonic()
    due = int((now - t0) * rate) + 1
    while seq < due:
        try:
            s.sendto(struct.pack("!Qd", seq, now) + pad, (dst, port))
        except OSError:
            errors += 1  # the route or the queue refused it: it counts as lost
        seq += 1
    if select.select([sys.stdin], [], [], 0.001)[0]:
        break
print(seq, errors, flush=True)
"""
"""Sends ``rate`` datagrams/s (seq:u64, send time:f64, padding) until stdin has input."""

RECEIVER = r"""
import array, select, socket, struct, sys, time
host, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
s.bind((host, port))
s.setblocking(False)
seqs, times = array.array("q"), array.array("d")
print("ready", flush=True)
while True:
    ready = select.select([s, sys.stdin], [], [], 1.0)[0]
    if s in ready:
        while True:
            try:
                data = s.recv(2048)
            except BlockingIOError:
                break
            seqs.append(struct.unpack_from("!Q", data)[0])
            times.append(time.monotonic())
    if sys.stdin in ready:
        break
with open(out, "wb") as fh:
    array.array("q", [len(seqs)]).tofile(fh)
    seqs.tofile(fh)
    times.tofile(fh)
print("done", len(seqs), flush=True)
"""
"""Records (seq, arrival time) of every datagram on host:port; dumps them to a file when
stdin has input."""


TCP_SOURCE = r"""
import select, socket, sys, time
host, port, rate, size = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port))
srv.listen(1)
print("ready", flush=True)
conn, _ = srv.accept()
conn.setblocking(False)
chunk = b"\x5a" * size
sent, skipped, error, n, t0 = 0, 0, "-", 0, time.monotonic()
while True:
    due = int((time.monotonic() - t0) * rate) + 1
    while n < due:
        n += 1
        if error != "-":
            continue
        try:
            sent += conn.send(chunk)
        except BlockingIOError:
            skipped += 1  # the send buffer is full (stalled tunnel): this write is dropped
        except OSError as exc:
            error = type(exc).__name__
    if select.select([sys.stdin], [], [], 0.002)[0]:
        break
print(sent, skipped, error, flush=True)
"""
"""Accepts one connection on host:port and writes ``size`` bytes ``rate`` times a second
until stdin has input; prints bytes sent, writes dropped, and the error that broke it."""

TCP_SINK = r"""
import array, select, socket, sys, time
host, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.create_connection((host, port), timeout=15)
s.setblocking(False)
times, got, error = array.array("d"), 0, "-"
print("ready", flush=True)
while True:
    watch = [sys.stdin] + ([s] if error == "-" else [])
    ready = select.select(watch, [], [], 1.0)[0]
    if s in ready:
        try:
            data = s.recv(65536)
        except BlockingIOError:
            data = None
        except OSError as exc:
            error, data = type(exc).__name__, None
        if data == b"":
            error = "EOF"
        elif data:
            got += len(data)
            times.append(time.monotonic())
    if sys.stdin in ready:
        break
with open(out, "wb") as fh:
    array.array("q", [len(times)]).tofile(fh)
    times.tofile(fh)
print("done", got, error, flush=True)
"""
"""Connects to host:port, records the arrival time of every read until stdin has input;
dumps the times to a file and prints the bytes received and what broke the connection."""


def longest_gap(times: Sequence[float], t_from: float, t_to: float) -> float:
    """Longest time without a delivery in [t_from, t_to], in seconds.

    Counts from the last delivery before ``t_from`` (the flow was running) to the first
    one inside, between deliveries inside, and from the last one inside to ``t_to`` (a
    flow that never came back stalls until the end of the window). ``times`` is sorted.
    """
    before = [t for t in times if t < t_from]
    inside = [t for t in times if t_from <= t <= t_to]
    points = [before[-1] if before else t_from, *inside, t_to]
    return max(b - a for a, b in itertools.pairwise(points))


def lost_between(seqs: Sequence[int], times: Sequence[float], t_from: float, t_to: float) -> int:
    """Sequence numbers missing between the last delivery before ``t_from`` and the last
    one up to ``t_to`` (what was sent around the kill and never arrived)."""
    idx = [i for i, t in enumerate(times) if t < t_from][-1:]
    idx += [i for i, t in enumerate(times) if t_from <= t <= t_to]
    got = {seqs[i] for i in idx}
    if not got:
        return 0
    return (max(got) - min(got) + 1) - len(got)


def _line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    try:
        return read_line(proc, timeout)
    except (TimeoutError, EOFError):
        return ""


def _stop(proc: subprocess.Popen[bytes], timeout: float) -> str:
    assert proc.stdin is not None
    try:
        proc.stdin.write(b"stop\n")
        proc.stdin.flush()
    except OSError:
        return ""
    return _line(proc, timeout)


@dataclass
class UdpFlow:
    name: str
    sender: subprocess.Popen[bytes]
    receiver: subprocess.Popen[bytes]
    out: Path
    seqs: array.array[int] | None = None
    times: array.array[float] | None = None
    sent: int = 0

    def finish(self) -> None:
        sent_line = _stop(self.sender, 10.0)
        self.sent = int(sent_line.split()[0]) if sent_line else 0
        _stop(self.receiver, 20.0)  # "done N"
        with open(self.out, "rb") as fh:
            count = array.array("q")
            count.fromfile(fh, 1)
            self.seqs = array.array("q")
            self.seqs.fromfile(fh, count[0])
            self.times = array.array("d")
            self.times.fromfile(fh, count[0])

    def stall_and_loss(self, t_from: float, t_to: float) -> tuple[float, int]:
        assert self.seqs is not None and self.times is not None
        return (
            longest_gap(self.times, t_from, t_to),
            lost_between(self.seqs, self.times, t_from, t_to),
        )

    @property
    def received(self) -> int:
        return len(self.seqs or ())


@dataclass
class TcpFlow:
    source: subprocess.Popen[bytes]
    sink: subprocess.Popen[bytes]
    out: Path
    times: array.array[float] | None = None
    error: str = "-"
    received: int = 0

    def finish(self) -> None:
        done = _stop(self.sink, 20.0).split()  # "done BYTES ERROR"; first: its EOF is ours
        _stop(self.source, 10.0)
        if len(done) == 3:
            self.received, self.error = int(done[1]), done[2]
        with open(self.out, "rb") as fh:
            count = array.array("q")
            count.fromfile(fh, 1)
            self.times = array.array("d")
            self.times.fromfile(fh, count[0])

    def stall(self, t_from: float, t_to: float) -> float:
        assert self.times is not None
        return longest_gap(self.times, t_from, t_to)


@dataclass
class Flows:
    up: UdpFlow
    down: UdpFlow
    tcp: TcpFlow

    def finish(self) -> None:
        for flow in (self.up, self.down, self.tcp):
            flow.finish()

    def kill(self) -> None:
        """Stop whatever is still running (after a failure; finish() ends them normally)."""
        _kill(
            [
                self.up.sender,
                self.up.receiver,
                self.down.sender,
                self.down.receiver,
                self.tcp.source,
                self.tcp.sink,
            ]
        )


def _ready(
    proc: subprocess.Popen[bytes], what: str, started: list[subprocess.Popen[bytes]]
) -> None:
    started.append(proc)
    if _line(proc, 20.0) != "ready":
        raise RuntimeError(f"{what} did not start")


def start_udp(
    topo: Topology, workdir: Path, up: bool, rate: float, started: list[subprocess.Popen[bytes]]
) -> UdpFlow:
    name = "up" if up else "down"
    tx_ns, rx_ns = (topo.client_ns, topo.gateway_ns) if up else (topo.gateway_ns, topo.client_ns)
    host, port = (INNER_GATEWAY, UP_PORT) if up else (INNER_CLIENT, DOWN_PORT)
    out = workdir / f"{name}.bin"
    receiver = topo.python(rx_ns, RECEIVER, host, str(port), str(out))
    _ready(receiver, f"UDP {name} receiver", started)
    sender = topo.python(tx_ns, SENDER, host, str(port), str(rate))
    _ready(sender, f"UDP {name} sender", started)
    return UdpFlow(name, sender, receiver, out)


def start_tcp(topo: Topology, workdir: Path, started: list[subprocess.Popen[bytes]]) -> TcpFlow:
    out = workdir / "tcp.bin"
    source = topo.python(
        topo.gateway_ns, TCP_SOURCE, INNER_GATEWAY, str(TCP_PORT), str(TCP_RATE), str(TCP_CHUNK)
    )
    _ready(source, "TCP source", started)
    sink = topo.python(topo.client_ns, TCP_SINK, INNER_GATEWAY, str(TCP_PORT), str(out))
    _ready(sink, "TCP sink (connect through the tunnel)", started)
    return TcpFlow(source, sink, out)


def start_flows(topo: Topology, workdir: Path, rate: float) -> Flows:
    """The three flows, running; on a failure, whatever had started is killed first."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        return Flows(
            start_udp(topo, workdir, True, rate, started),
            start_udp(topo, workdir, False, rate, started),
            start_tcp(topo, workdir, started),
        )
    except BaseException:
        _kill(started)
        raise


def _kill(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
