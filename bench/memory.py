"""Gateway memory per session: N sessions attached to a gateway core, without sockets.

The gateway core (``GatewaySessions``) runs alone in a child process (``memory.py gateway``,
PYTHONPATH given by ``--gateway-path``: another checkout makes a before/after run); this
process runs N ``ClientSession`` cores and exchanges their datagrams with it over a pipe,
in virtual time: every client attaches with a real handshake (INIT, RESPONSE), then all of
them run ``--seconds`` of idle time at the default policy (probes and their answers, the
gateway's timers), so what a session allocates on its first probe is counted too. The
child's heap holds nothing but the gateway, so its numbers are the gateway's own:

- RSS delta / N (``/proc/self/status``, after ``gc.collect()``) between the gateway built
  with its N allowed clients and the gateway with N attached, probed sessions;
- with ``--trace``: the tracemalloc delta / N (Python allocations only: the OpenSSL
  contexts of the AEAD objects are not Python allocations), the top allocation sites,
  and the bytes of one session by component (objects reachable from one session and not
  from another one, by the attribute they hang from), plus the gateway's per-session
  table entries;
- the native size of one AEAD object (``--aead``: RSS of 10,000 of them in a fresh
  process), what tracemalloc cannot see.

``python bench/memory.py -n 10000`` prints a table with the machine facts (CPU model, load).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import pickle
import random
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

HERE = Path(__file__).resolve().parent
ROUND_S = 0.05
"""Virtual time step of the idle phase (the default policy probes every 100 ms)."""
_LEN = struct.Struct("<I")


def _scale() -> Any:
    """bench/scale.py (its key, address and machine helpers), loaded as a module."""
    spec = importlib.util.spec_from_file_location("bench_scale", HERE / "scale.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_scale"] = module
    spec.loader.exec_module(module)
    return module


def _send(out: BinaryIO, obj: object) -> None:
    blob = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    out.write(_LEN.pack(len(blob)) + blob)
    out.flush()


def _recv(inp: BinaryIO) -> Any:
    head = inp.read(_LEN.size)
    if len(head) < _LEN.size:
        raise EOFError("peer closed the pipe")
    (size,) = _LEN.unpack(head)
    return pickle.loads(inp.read(size))


def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# == the gateway process ====================================================================
def gateway(n: int, seed: bytes, trace: bool) -> int:
    """The gateway core for N clients, fed by the driver over stdin/stdout."""
    sc = _scale()
    from tunnel.core.gateway import GatewaySessions
    from tunnel.core.gateway_session import ClientEntry
    from tunnel.core.handshake import public_key
    from tunnel.core.policy import POLICY_DEFAULT

    inp, out = sys.stdin.buffer, sys.stdout.buffer
    clients = [
        ClientEntry(f"c{i}", public_key(sc.key_of(seed, i)), sc.inner_of(i)) for i in range(n)
    ]
    gw = GatewaySessions(
        static_private=sc.key_of(seed, 1 << 31), clients=clients, policy=POLICY_DEFAULT,
        now=1000.0, urandom=os.urandom, inner_gateway=sc.INNER_GATEWAY,
        inner_prefix=sc.INNER_PREFIX, cookie_threshold=0.0,
    )  # fmt: skip
    gw.admission.handshakes.configure(1e9, 1e9)
    addrs = [(sc.host_of(i), 40000) for i in range(n)]
    index_of = {a: i for i, a in enumerate(addrs)}
    if trace:
        import tracemalloc

        tracemalloc.start(1)
    baseline: Any = None
    while True:
        msg = _recv(inp)
        if msg[0] == "in":
            _, now, batch = msg
            for i, data in batch:
                gw.receive_datagram(data, addrs[i], now)
            deadline = gw.next_deadline()
            if deadline is not None and deadline <= now:
                gw.handle_timer(now)
            gw.events()
            _send(out, [(index_of[a], d) for a, d in gw.datagrams_to_send() if a in index_of])
        elif msg[0] == "baseline":
            baseline = _measure(trace)
            _send(out, {"rss": baseline[0]})
        elif msg[0] == "measure":
            _send(out, _report(gw, n, baseline, _measure(trace)))
        else:
            return 0


def _measure(trace: bool) -> tuple[int, Any]:
    gc.collect()
    snap = None
    if trace:
        import tracemalloc

        snap = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__)]
        )
    return rss_bytes(), snap


def _report(gw: Any, n: int, before: Any, after: Any) -> dict[str, Any]:
    live = sum(1 for s in gw.sessions.values() if not s.machine.terminated)
    ended = Counter(str(s.end_reason) for s in gw.sessions.values() if s.machine.terminated)
    rep: dict[str, Any] = {"rss0": before[0], "rss1": after[0], "sessions": live}
    rep["ended"], rep["drops"] = dict(ended), dict(gw.drops)
    if after[1] is not None:
        stats = after[1].compare_to(before[1], "lineno")
        rep["traced"] = sum(s.size_diff for s in stats)
        rep["sites"] = [
            (f"{s.traceback[0].filename.rsplit('/tunnel/', 1)[-1]}:{s.traceback[0].lineno}",
             s.size_diff, s.count_diff)
            for s in stats[:25]
        ]  # fmt: skip
        rep["components"] = components(gw)
    return rep


# == one session by component ===============================================================
def _children(obj: object) -> list[object]:
    return list(gc.get_referents(obj))


def _reach(roots: Sequence[object], stop: set[int]) -> dict[int, object]:
    """Objects reachable from ``roots`` (not through ``stop``), by id."""
    seen: dict[int, object] = {}
    todo = list(roots)
    while todo:
        obj = todo.pop()
        key = id(obj)
        bound = callable(obj) and hasattr(obj, "__self__")  # a bound method: its object
        if key in seen or key in stop or isinstance(obj, type) or (callable(obj) and not bound):
            continue
        if type(obj).__name__ == "module":
            continue
        seen[key] = obj
        todo.extend(_children(obj))
    return seen


def instance_dict(obj: object) -> dict[str, Any] | None:
    """``obj``'s instance ``__dict__`` if it has one (reading ``obj.__dict__`` of a slotted
    class with a ``__dict__`` slot would make an empty one)."""
    slots = {s for k in type(obj).__mro__ for s in getattr(k, "__slots__", ())}
    if "__dict__" not in slots:
        return getattr(obj, "__dict__", None)
    values = [getattr(obj, s, None) for s in slots if s not in ("__dict__", "__weakref__")]
    found = [
        r for r in gc.get_referents(obj) if type(r) is dict and all(r is not v for v in values)
    ]
    return found[0] if found else None


def _attrs(obj: object) -> list[tuple[str, object]]:
    names: list[str] = []
    for klass in type(obj).__mro__:
        slots = getattr(klass, "__slots__", ())
        names += [s for s in slots if s not in ("__weakref__", "__dict__")]
    names += list(instance_dict(obj) or {})
    out = []
    for name in dict.fromkeys(names):
        try:
            out.append((name, getattr(obj, name)))
        except AttributeError:
            continue
    return out


def components(gw: Any) -> list[tuple[str, int, list[str]]]:
    """Bytes held by one session alone, by the attribute they hang from (the object itself
    first), then the gateway's tables per session: objects reachable from one session and
    not from another one (shared objects, such as the policy, the ports or interned
    strings, are reachable from both)."""
    sessions = [s for s in gw.sessions.values() if not s.machine.terminated]
    one, other = sessions[len(sessions) // 2], sessions[len(sessions) // 3]
    shared_roots = [gw.report, gw.outbox, gw.admission, gw.handshakes, gw.policy]
    tables = {id(gw), id(gw.sessions), id(one), id(other)}
    stop = set(_reach(shared_roots, tables)) | tables
    stop |= set(_reach([other], stop - {id(other)}))
    counted: set[int] = {id(one)}
    rows = [("GatewaySession object", sys.getsizeof(one) + _dict_size(one), [])]
    for name, value in _attrs(one):
        objs = _reach([value], stop | counted)
        counted |= set(objs)
        size = sum(sys.getsizeof(o) for o in objs.values())
        aeads = [type(o).__name__ for o in objs.values() if type(o).__name__ in AEAD_CLASSES]
        if size:
            rows.append((name, size, aeads))
    return rows


def _dict_size(obj: object) -> int:
    d = instance_dict(obj)
    return sys.getsizeof(d) if d is not None else 0


AEAD_CLASSES = ("AESGCM", "ChaCha20Poly1305")
AEAD_NATIVE: dict[str, int] = {}
"""Native bytes per AEAD object by class name (``--aead`` measures them)."""


def aead_native(n: int = 10_000) -> dict[str, int]:
    """RSS per AEAD object beyond its Python object, each class in a fresh process."""
    out = {}
    for name in AEAD_CLASSES:
        code = (
            "import gc, os, sys; from cryptography.hazmat.primitives.ciphers.aead import "
            f"{name} as C\n"
            f"sys.path.insert(0, {str(HERE)!r}); from memory import rss_bytes\n"
            f"keys = [os.urandom(32) for _ in range({n})]; C(keys[0]); gc.collect()\n"
            f"r0 = rss_bytes(); objs = [C(k) for k in keys]; gc.collect()\n"
            f"print((rss_bytes() - r0) // {n} - sys.getsizeof(objs[0]))"
        )
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        out[name] = int(res.stdout.strip() or 0)
    return out


# == the driver =============================================================================
class Driver:
    """N client cores talking to the gateway process through its pipe, in virtual time."""

    def __init__(self, n: int, seed: bytes, gateway_path: str, trace: bool) -> None:
        self.sc = _scale()
        from tunnel.core.client import ClientSession, PathSpec
        from tunnel.core.handshake import public_key
        from tunnel.core.policy import POLICY_DEFAULT

        env = dict(os.environ, PYTHONPATH=gateway_path)
        cmd = [
            sys.executable,
            str(HERE / "memory.py"),
            "gateway",
            "-n",
            str(n),
            "--seed",
            seed.hex(),
        ]
        self.proc = subprocess.Popen(
            cmd + (["--trace"] if trace else []), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env=env,
        )  # fmt: skip
        gw_pub = public_key(self.sc.key_of(seed, 1 << 31))
        self.now = 1000.0
        self.policy = POLICY_DEFAULT
        self.clients = [self._client(ClientSession, PathSpec, gw_pub, seed, i) for i in range(n)]

    def _client(self, cls: Any, spec: Any, gw_pub: bytes, seed: bytes, i: int) -> Any:
        return cls(
            static_private=self.sc.key_of(seed, i), gateway_public=gw_pub, paths=[spec(0, "lo")],
            policy=self.policy, now=self.now, rng=random.Random(i),
        )  # fmt: skip

    def ask(self, msg: object) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        _send(self.proc.stdin, msg)  # type: ignore[arg-type]
        return _recv(self.proc.stdout)  # type: ignore[arg-type]

    def exchange(self, batch: list[tuple[int, bytes]]) -> None:
        """Datagrams to the gateway at ``now``; its answers to their clients (until quiet)."""
        while batch:
            answers = self.ask(("in", self.now, batch))
            touched = set()
            for i, data in answers:
                self.clients[i].receive_datagram(data, 0, self.now)
                touched.add(i)
            batch = [(i, d) for i in touched for _p, d in self.clients[i].datagrams_to_send()]
            for i in touched:
                self.clients[i].events()

    def attach_all(self, chunk: int = 500) -> int:
        from tunnel.core.session import State

        for start in range(0, len(self.clients), chunk):
            self.now += 0.001  # the handshake bucket (configured without limit) refills
            batch = []
            for i in range(start, min(start + chunk, len(self.clients))):
                c = self.clients[i]
                c.connect(self.now)
                batch += [(i, d) for _p, d in c.datagrams_to_send()]
                c.events()
            self.exchange(batch)
        return sum(1 for c in self.clients if c.state is State.ATTACHED)

    def idle(self, seconds: float) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now += ROUND_S
            batch = []
            for i, c in enumerate(self.clients):
                deadline = c.next_deadline()
                if deadline is not None and deadline <= self.now:
                    c.handle_timer(self.now)
                    batch += [(i, d) for _p, d in c.datagrams_to_send()]
                    c.events()
            self.exchange(batch)
            self.ask(("in", self.now, []))  # the gateway's own timers

    def close(self) -> None:
        assert self.proc.stdin is not None
        _send(self.proc.stdin, ("quit",))  # type: ignore[arg-type]
        self.proc.wait(30)


def run(n: int, seconds: float, gateway_path: str, trace: bool) -> dict[str, Any]:
    drv = Driver(n, os.urandom(8), gateway_path, trace)
    try:
        drv.ask(("baseline",))
        t0 = time.monotonic()
        attached = drv.attach_all()
        drv.idle(seconds)
        rep: dict[str, Any] = drv.ask(("measure",))
        rep.update(attached=attached, wall=time.monotonic() - t0)
    finally:
        drv.close()
    return rep


def print_report(label: str, n: int, rep: dict[str, Any]) -> None:
    per = (rep["rss1"] - rep["rss0"]) / max(1, rep["sessions"])
    print(f"\n### {label}: N = {n}, {rep['sessions']} live sessions ({rep['wall']:.0f} s)")
    print(
        f"RSS {rep['rss0'] / 2**20:.1f} -> {rep['rss1'] / 2**20:.1f} MiB: {per:.0f} B per session"
    )
    print(f"clients attached {rep['attached']}; ended: {rep['ended']}; drops: {rep['drops']}")
    if "traced" not in rep:
        return
    print(f"tracemalloc: {rep['traced'] / rep['sessions']:.0f} B per session\n")
    print("| allocation site | B per session | blocks per session |\n|---|---:|---:|")
    for site, size, count in rep["sites"]:
        print(f"| {site} | {size / rep['sessions']:.0f} | {count / rep['sessions']:.2f} |")
    print("\n| one session, by component | bytes |\n|---|---:|")
    total = 0
    for name, size, aeads in rep["components"]:
        native = sum(AEAD_NATIVE.get(a, 0) for a in aeads)
        total += size + native
        extra = f" (+ {native} native: {len(aeads)} AEAD objects)" if native else ""
        print(f"| {name} | {size}{extra} |")
    print(f"| total (this session alone) | {total} |")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", default="run", choices=["run", "gateway"])
    parser.add_argument("-n", type=int, default=10_000, help="sessions (default 10,000)")
    parser.add_argument("--seed", default="", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=1.0, help="idle virtual seconds")
    parser.add_argument("--trace", action="store_true", help="tracemalloc breakdown too")
    parser.add_argument("--aead", action="store_true", help="native bytes per AEAD object")
    parser.add_argument(
        "--gateway-path", action="append", default=None, metavar="DIR",
        help="PYTHONPATH of the gateway process (repeat: one run per checkout, interleaved)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.mode == "gateway":
        return gateway(args.n, bytes.fromhex(args.seed), args.trace)
    paths = args.gateway_path or [os.environ.get("PYTHONPATH", str(HERE.parent))]
    print(f"bench/memory.py -n {args.n}  ({time.strftime('%Y-%m-%d %H:%M')})")
    print(_scale().machine_facts(), f"; load average {os.getloadavg()[0]:.2f}")
    if args.aead:
        AEAD_NATIVE.update(aead_native())
        print("native bytes per AEAD object:", AEAD_NATIVE)
    for path in paths:
        print_report(path, args.n, run(args.n, args.seconds, path, args.trace))
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
