#!/usr/bin/env python3
"""Per-packet cost of the protocol cores' data path, in process (no sockets, no TUN).

One client (``ClientSession``) and one gateway (``GatewaySessions``) complete a real
handshake in memory; then N inner packets are driven through each step of the data path
as the runtimes drive it (inputs in batches of ``BATCH``, after each batch the outputs
pulled and ``next_deadline()`` read, as ``DriverLoop.pump`` does):

- ``client send``: ``ClientSession.receive_tun_packet`` (seal) -> ``datagrams_to_send``;
- ``gateway receive``: ``GatewaySessions.receive_datagram`` (parse, session lookup, open,
  replay window, accounting) -> ``packets_for_tun``;
- ``gateway send``: ``GatewaySessions.receive_tun_packet`` (route, seal) -> datagrams;
- ``client receive``: ``ClientSession.receive_datagram`` -> ``packets_for_tun``.

For each step it also times the AEAD alone on the same sizes (the cipher class the
session uses, called directly: the *crypto floor*), and prints us/packet for the step,
the floor and the rest (step - floor: what the core adds around the cipher). Times are
the process's CPU time (``time.process_time``: time other processes hold the cores is
not counted, their cache and frequency effects are). Each step runs ``--runs`` times;
the medians are printed (the machine is shared: compare medians, and before/after runs
made close together). ``--json FILE`` writes the figures with a label (``--label``,
default the git revision) and the CPU model; ``--compare A.json B.json`` prints two such
files side by side; ``--ab TREE_A TREE_B`` measures two checkouts alternately (one
process per measurement, ``--rounds`` each) and prints both and their ratios.
``--profile`` runs the receive steps once under cProfile and prints their top functions.
For figures that do not depend on the load, count instructions instead (valgrind
``--tool=callgrind`` around a run with and without a step: docs/performance.md).

    .venv/bin/python bench/datapath.py                       # 20,000 packets, 7 runs
    .venv/bin/python bench/datapath.py -n 50000 --size 1400 --json /tmp/after.json
    .venv/bin/python bench/datapath.py --compare /tmp/before.json /tmp/after.json
    .venv/bin/python bench/datapath.py --ab /path/to/before . --rounds 8
    .venv/bin/python bench/datapath.py --profile

A measurement, never a pass/fail: a busy machine makes every figure larger.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import random
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _tree() -> Path:
    """The checkout whose ``tunnel`` package is measured: ``--tree DIR``, else this one."""
    for i, arg in enumerate(sys.argv):
        if arg == "--tree" and i + 1 < len(sys.argv):
            return Path(sys.argv[i + 1]).resolve()
        if arg.startswith("--tree="):
            return Path(arg.split("=", 1)[1]).resolve()
    return REPO


TREE = _tree()
sys.path[:1] = [sys.path[0], str(TREE)]

from tunnel.core.client import ClientSession, PathSpec  # noqa: E402
from tunnel.core.constants import TRANSPORT_HEADER  # noqa: E402
from tunnel.core.gateway import GatewaySessions  # noqa: E402
from tunnel.core.gateway_session import ClientEntry  # noqa: E402
from tunnel.core.handshake import generate_keypair  # noqa: E402
from tunnel.core.policy import POLICY_DEFAULT  # noqa: E402
from tunnel.core.session import State  # noqa: E402

BATCH = 64
"""Inputs per driver batch (tunnel.io.loop.BATCH)."""

CLIENT_INNER = "10.66.0.2"
GATEWAY_INNER = "10.66.0.1"
PATH_ID = 1
CLIENT_ADDR = ("192.0.2.10", 40000, 0)
"""How the gateway sees the client (the runtime's PeerAddr is a 3-4 field tuple too)."""

STEPS = ("client send", "gateway receive", "gateway send", "client receive")


def ipv4_packet(src: str, dst: str, size: int, ident: int) -> bytes:
    """An IPv4/UDP packet of ``size`` bytes (checksums zero: the tunnel ignores them)."""
    payload = bytes(size - 28)
    s = bytes(int(x) for x in src.split("."))
    d = bytes(int(x) for x in dst.split("."))
    udp = struct.pack("!HHHH", 5000, 5001, 8 + len(payload), 0) + payload
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, size, ident & 0xFFFF, 0, 64, 17, 0, s, d)
    return hdr + udp


class Pair:
    """A client and a gateway core, attached over one in-memory path."""

    def __init__(self) -> None:
        gw_priv, gw_pub = generate_keypair()
        cl_priv, cl_pub = generate_keypair()
        self.now = 1000.0
        self.client = ClientSession(
            static_private=cl_priv, gateway_public=gw_pub, paths=[PathSpec(PATH_ID, "p1")],
            policy=POLICY_DEFAULT, now=self.now, rng=random.Random(1),
        )  # fmt: skip
        self.gateway = GatewaySessions(
            static_private=gw_priv, clients=[ClientEntry("bench", cl_pub, CLIENT_INNER)],
            policy=POLICY_DEFAULT, now=self.now, urandom=os.urandom, rng=random.Random(2),
        )  # fmt: skip
        self.client.connect(self.now)
        for _ in range(4):
            self._exchange()
        if self.client.state is not State.ATTACHED or not self.gateway.sessions:
            raise SystemExit(f"handshake did not complete: client {self.client.state}")

    def _exchange(self) -> None:
        self.now += 0.001
        for _, data in self.client.datagrams_to_send():
            self.gateway.receive_datagram(data, CLIENT_ADDR, self.now)
        for _, data in self.gateway.datagrams_to_send():
            self.client.receive_datagram(data, PATH_ID, self.now)
        self.client.events()
        self.gateway.events()

    def tick(self) -> float:
        self.now += 0.0002
        return self.now


def _batches(items: list[Any]) -> list[list[Any]]:
    return [items[i : i + BATCH] for i in range(0, len(items), BATCH)]


def client_send(pair: Pair, packets: list[bytes]) -> tuple[float, list[bytes]]:
    client = pair.client
    out: list[bytes] = []
    t0 = time.process_time()
    for batch in _batches(packets):
        now = pair.tick()
        for pkt in batch:
            client.receive_tun_packet(pkt, now)
        out.extend(d for _, d in client.datagrams_to_send())
        client.packets_for_tun()
        while client.next_event() is not None:
            pass
        client.next_deadline()
    return time.process_time() - t0, out


def gateway_receive(pair: Pair, datagrams: list[bytes]) -> tuple[float, list[bytes]]:
    gateway = pair.gateway
    out: list[bytes] = []
    t0 = time.process_time()
    for batch in _batches(datagrams):
        now = pair.tick()
        for data in batch:
            gateway.receive_datagram(data, CLIENT_ADDR, now)
        while gateway.next_event() is not None:
            pass
        gateway.datagrams_to_send()
        out.extend(gateway.packets_for_tun())
        gateway.next_deadline()
    return time.process_time() - t0, out


def gateway_send(pair: Pair, packets: list[bytes]) -> tuple[float, list[bytes]]:
    gateway = pair.gateway
    out: list[bytes] = []
    t0 = time.process_time()
    for batch in _batches(packets):
        now = pair.tick()
        for pkt in batch:
            gateway.receive_tun_packet(pkt, now)
        while gateway.next_event() is not None:
            pass
        out.extend(d for _, d in gateway.datagrams_to_send())
        gateway.packets_for_tun()
        gateway.next_deadline()
    return time.process_time() - t0, out


def client_receive(pair: Pair, datagrams: list[bytes]) -> tuple[float, list[bytes]]:
    client = pair.client
    out: list[bytes] = []
    t0 = time.process_time()
    for batch in _batches(datagrams):
        now = pair.tick()
        for data in batch:
            client.receive_datagram(data, PATH_ID, now)
        while client.next_event() is not None:
            pass
        client.datagrams_to_send()
        out.extend(client.packets_for_tun())
        client.next_deadline()
    return time.process_time() - t0, out


def _aead_class(pair: Pair) -> Callable[[bytes], Any]:
    """The AEAD class the session's cipher uses (ChaCha20-Poly1305 if it cannot be seen): its
    negotiated suite, else (an older tree) the class of its generation's AEAD object."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

    suite = getattr(getattr(pair.client.cipher, "suite", None), "label", "")
    if suite:
        return AESGCM if suite == "aes-256-gcm" else ChaCha20Poly1305
    current = getattr(pair.client.cipher, "_current", None)
    cls = type(getattr(current, "rx", None))
    return cls if hasattr(cls, "decrypt") else ChaCha20Poly1305  # type: ignore[no-any-return]


def crypto_floor(aead_cls: Callable[[bytes], Any], size: int, n: int) -> tuple[float, float]:
    """Seconds to seal, then to open, ``n`` plaintexts of ``size`` bytes with the AEAD alone
    (a fresh nonce and the 16-byte header as associated data, as the cores do)."""
    aead = aead_cls(bytes(range(32)))
    nonce = struct.Struct("<4xQ")
    header = bytes(TRANSPORT_HEADER.size)
    plaintext = bytes(size)
    t0 = time.process_time()
    sealed = [aead.encrypt(nonce.pack(i), plaintext, header) for i in range(n)]
    t1 = time.process_time()
    for i, ct in enumerate(sealed):
        aead.decrypt(nonce.pack(i), memoryview(ct), memoryview(header))
    return t1 - t0, time.process_time() - t1


def one_run(pair: Pair, n: int, size: int) -> dict[str, float]:
    """Seconds per step for ``n`` packets (client send, gateway receive, gateway send,
    client receive), each checked to have carried every packet."""
    up = [ipv4_packet(CLIENT_INNER, GATEWAY_INNER, size, i) for i in range(n)]
    down = [ipv4_packet(GATEWAY_INNER, CLIENT_INNER, size, i) for i in range(n)]
    t_cs, dgrams_up = client_send(pair, up)
    t_gr, delivered_up = gateway_receive(pair, dgrams_up)
    t_gs, dgrams_down = gateway_send(pair, down)
    t_cr, delivered_down = client_receive(pair, dgrams_down)
    if delivered_up != up or delivered_down != down:
        raise SystemExit(
            f"packets lost: up {len(delivered_up)}/{n}, down {len(delivered_down)}/{n};"
            f" client drops {pair.client.drops}, gateway drops {pair.gateway.drops}"
        )
    return dict(zip(STEPS, (t_cs, t_gr, t_gs, t_cr), strict=True))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def git_label() -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(TREE), "describe", "--always", "--dirty"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return str(TREE)  # not a git checkout (an exported tree): its path
    return rev


def measure(n: int, size: int, runs: int) -> dict[str, Any]:
    pair = Pair()
    aead_cls = _aead_class(pair)
    one_run(pair, min(n, 2000), size)  # warm-up: caches, first allocations
    per_step: dict[str, list[float]] = {s: [] for s in STEPS}
    seal: list[float] = []
    open_: list[float] = []
    for _ in range(runs):
        for step, secs in one_run(pair, n, size).items():
            per_step[step].append(secs / n * 1e6)
        t_seal, t_open = crypto_floor(aead_cls, size, n)
        seal.append(t_seal / n * 1e6)
        open_.append(t_open / n * 1e6)
    floors = {
        "client send": seal,
        "gateway receive": open_,
        "gateway send": seal,
        "client receive": open_,
    }
    rows: dict[str, dict[str, Any]] = {}
    for step in STEPS:
        total = statistics.median(per_step[step])
        floor = statistics.median(floors[step])
        rows[step] = {
            "us_per_packet": round(total, 3),
            "crypto_us": round(floor, 3),
            "rest_us": round(total - floor, 3),
            "runs_us": [round(x, 3) for x in per_step[step]],
            "crypto_runs_us": [round(x, 3) for x in floors[step]],
        }
    total = sum(r["us_per_packet"] for r in rows.values())
    rest = sum(r["rest_us"] for r in rows.values())
    return {
        "packets": n,
        "size": size,
        "runs": runs,
        "batch": BATCH,
        "aead": getattr(aead_cls, "__name__", str(aead_cls)),
        "cpu": cpu_model(),
        "python": sys.version.split()[0],
        "loadavg": _loadavg(),
        "steps": rows,
        "total_us": round(total, 3),
        "total_rest_us": round(rest, 3),
    }


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def print_result(res: dict[str, Any]) -> None:
    print(f"label: {res['label']}   cpu: {res['cpu']}   python {res['python']}")
    print(
        f"{res['packets']} packets of {res['size']} bytes, batches of {res['batch']}, "
        f"median of {res['runs']} runs, aead {res['aead']}, loadavg {res['loadavg']}"
    )
    print(f"{'step':<18}{'us/packet':>11}{'crypto':>9}{'rest':>9}   runs (us/packet)")
    for step, row in res["steps"].items():
        runs = " ".join(f"{x:.2f}" for x in row["runs_us"])
        print(
            f"{step:<18}{row['us_per_packet']:>11.2f}{row['crypto_us']:>9.2f}"
            f"{row['rest_us']:>9.2f}   {runs}"
        )
    print(f"{'total':<18}{res['total_us']:>11.2f}{'':>9}{res['total_rest_us']:>9.2f}")


def print_compare(a: dict[str, Any], b: dict[str, Any]) -> None:
    print(f"A: {a['label']} ({a['cpu']}, loadavg {a['loadavg']})")
    print(f"B: {b['label']} ({b['cpu']}, loadavg {b['loadavg']})")
    print(f"{'step':<18}{'A us':>8}{'B us':>8}{'B/A':>7}{'A rest':>9}{'B rest':>9}{'B/A':>7}")
    keys = [(s, a["steps"][s], b["steps"][s]) for s in STEPS]
    for step, ra, rb in keys:
        print(
            f"{step:<18}{ra['us_per_packet']:>8.2f}{rb['us_per_packet']:>8.2f}"
            f"{rb['us_per_packet'] / ra['us_per_packet']:>7.2f}"
            f"{ra['rest_us']:>9.2f}{rb['rest_us']:>9.2f}{rb['rest_us'] / ra['rest_us']:>7.2f}"
        )
    print(
        f"{'total':<18}{a['total_us']:>8.2f}{b['total_us']:>8.2f}"
        f"{b['total_us'] / a['total_us']:>7.2f}{a['total_rest_us']:>9.2f}"
        f"{b['total_rest_us']:>9.2f}{b['total_rest_us'] / a['total_rest_us']:>7.2f}"
    )


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Several results of one build as one: the medians over all their runs."""
    out = dict(results[-1])
    out["runs"] = sum(r["runs"] for r in results)
    out["loadavg"] = " / ".join(r["loadavg"] for r in results)
    rows = {}
    for step in STEPS:
        runs = [x for r in results for x in r["steps"][step]["runs_us"]]
        floors = [x for r in results for x in r["steps"][step]["crypto_runs_us"]]
        total, floor = statistics.median(runs), statistics.median(floors)
        rows[step] = {
            "us_per_packet": round(total, 3), "crypto_us": round(floor, 3),
            "rest_us": round(total - floor, 3), "runs_us": runs, "crypto_runs_us": floors,
        }  # fmt: skip
    out["steps"] = rows
    out["total_us"] = round(sum(r["us_per_packet"] for r in rows.values()), 3)
    out["total_rest_us"] = round(sum(r["rest_us"] for r in rows.values()), 3)
    return out


def ab(trees: list[Path], rounds: int, passthrough: list[str]) -> tuple[Any, Any]:
    """Measure two checkouts alternately (``rounds`` times each, one process per
    measurement), so that both see the same machine load; the merged results of each."""
    results: list[list[dict[str, Any]]] = [[], []]
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for k, tree in enumerate(trees if r % 2 == 0 else trees[::-1]):
                which = k if r % 2 == 0 else 1 - k
                out = Path(tmp) / f"{which}-{r}.json"
                cmd = [sys.executable, str(Path(__file__).resolve()), "--tree", str(tree)]
                subprocess.run([*cmd, *passthrough, "--json", str(out)], check=True,
                               stdout=subprocess.DEVNULL)  # fmt: skip
                results[which].append(json.loads(out.read_text()))
    return merge(results[0]), merge(results[1])


def profile(n: int, size: int) -> None:
    """cProfile of the gateway receive step (the issue's bottleneck) and the client's."""
    pair = Pair()
    up = [ipv4_packet(CLIENT_INNER, GATEWAY_INNER, size, i) for i in range(n)]
    down = [ipv4_packet(GATEWAY_INNER, CLIENT_INNER, size, i) for i in range(n)]
    _, dgrams_up = client_send(pair, up)
    _, dgrams_down = gateway_send(pair, down)
    for title, fn, arg in (
        ("gateway receive", gateway_receive, dgrams_up),
        ("client receive", client_receive, dgrams_down),
    ):
        prof = cProfile.Profile()
        prof.enable()
        fn(pair, arg)
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(14)
        print(f"== {title}: {n} packets ==")
        print(buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--packets", type=int, default=20_000)
    ap.add_argument("--size", type=int, default=1400, help="inner packet bytes (>= 28)")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--label", default=None, help="name of this build (default: git rev)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--json-a", type=Path, default=None, help="with --ab: TREE_A's figures")
    ap.add_argument("--compare", type=Path, nargs=2, metavar=("A", "B"))
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--tree", type=Path, default=REPO, help="checkout to measure")
    ap.add_argument("--ab", type=Path, nargs=2, metavar=("TREE_A", "TREE_B"))
    ap.add_argument("--rounds", type=int, default=4, help="alternations for --ab")
    args = ap.parse_args(argv)
    if args.ab:
        passthrough = ["-n", str(args.packets), "--size", str(args.size), "--runs", str(args.runs)]
        a, b = ab(args.ab, args.rounds, passthrough)
        print_result(a)
        print_result(b)
        print_compare(a, b)
        for path, res in ((args.json, b), (args.json_a, a)):
            if path:
                path.write_text(json.dumps(res, indent=1) + "\n")
        return 0
    if args.compare:
        a, b = (json.loads(p.read_text()) for p in args.compare)
        print_compare(a, b)
        return 0
    if args.size < 28:
        ap.error("--size must be at least 28 (IPv4 + UDP headers)")
    if args.profile:
        profile(args.packets, args.size)
        return 0
    res = {"label": args.label or git_label(), **measure(args.packets, args.size, args.runs)}
    print_result(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
