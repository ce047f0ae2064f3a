"""Reattach validations per second of the gateway core, in-process (issue 11: >= 20,000/s).

N sessions are opened in a ``GatewaySessions`` by real handshakes (a lean initiator per
client: ``HandshakeInitiator``, no ``ClientSession``). For each session the driver then
pre-builds one valid REATTACH_REQUEST datagram, sealed with the client's traffic keys as a
client would (CONTROL, the session's epoch, a fresh nonce and timestamp, kind MANUAL, from
the binding's address), so the measured loop is only the gateway's work: for every
request ``receive_datagram`` (open, checks in spec order, commit, REATTACH_ACK sealed and
queued), then ``datagrams_to_send()``, ``events()`` and ``next_deadline()`` once per batch
of 64, as the runtime takes its outputs and re-arms its timer. Every request must be
answered by a REATTACH_ACK (checked). Times are the process's CPU time
(``time.process_time``: what other processes take of the cores is not counted; their cache
and frequency effects are), the median of ``--reps`` rounds.

``python bench/reattach.py --compare ../before`` measures another checkout's gateway core
too (a before/after pair in one run), each in its own process, interleaved ``--rounds``
times.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BATCH = 64


def key_of(seed: bytes, i: int) -> bytes:
    return hashlib.sha256(seed + i.to_bytes(4, "big")).digest()


def inner_of(i: int) -> str:
    j = i + 2
    return f"10.{64 + j // 65_536}.{j // 256 % 256}.{j % 256}"


def host_of(i: int) -> tuple[str, int]:
    return (f"127.{2 + i // 62_500}.{1 + i // 250 % 250}.{1 + i % 250}", 40000)


def measure(n: int, reps: int, profile: Any = None) -> dict[str, float]:
    """Open ``n`` sessions, then time ``reps`` rounds of one request per session."""
    import random

    from tunnel.core.aead import SessionCipher
    from tunnel.core.constants import MSG_CONTROL, MSG_HANDSHAKE_RESP
    from tunnel.core.gateway import GatewaySessions
    from tunnel.core.gateway_session import ClientEntry
    from tunnel.core.handshake import public_key
    from tunnel.core.initiator import Accepted, HandshakeInitiator
    from tunnel.core.policy import POLICY_DEFAULT
    from tunnel.core.wire import CType, ReattachKind, ReattachRequest, pack_control

    seed = b"reattach-bench"
    gw_key = key_of(seed, 1 << 31)
    gw_pub = public_key(gw_key)
    now = 1000.0
    clients = [ClientEntry(f"c{i}", public_key(key_of(seed, i)), inner_of(i)) for i in range(n)]
    gw = GatewaySessions(
        static_private=gw_key, clients=clients, policy=POLICY_DEFAULT, now=now,
        urandom=random.Random(1).randbytes, rng=random.Random(2), inner_gateway="10.64.0.1",
        inner_prefix=10, cookie_threshold=0.0,
    )  # fmt: skip
    gw.admission.handshakes.configure(1e9, 1e9)
    sessions: list[tuple[int, SessionCipher, int]] = []  # (receiver index, cipher, skew ts)
    t0 = time.perf_counter()
    for i in range(n):
        now += 1e-4  # the handshake bucket refills with time (configure keeps its tokens)
        hi = HandshakeInitiator(key_of(seed, i), gw_pub, 1 + i, [0], rng=random.Random(i))
        _path, init = hi.start(now, POLICY_DEFAULT, ts_ms=1_000_000)
        gw.receive_datagram(init, host_of(i), now)
        out = gw.datagrams_to_send()
        gw.events()
        resp = next(d for _a, d in out if d[0] == MSG_HANDSHAKE_RESP)
        accepted = hi.on_response(resp, int.from_bytes(resp[4:8], "little"))
        assert isinstance(accepted, Accepted), accepted
        cipher = SessionCipher(accepted.keys, now=now, suite=accepted.cipher)
        sessions.append((accepted.sender_index, cipher, accepted.payload.epoch))
    setup = time.perf_counter() - t0
    assert len(gw.sessions) == n
    gw_ts0 = gw.ts_ms(now)
    rates: list[float] = []
    for rep in range(reps):
        now += 1.0  # a token of each session's reattach bucket again
        client_ts = 1_000_000 + int(gw.ts_ms(now) - gw_ts0)
        requests = []
        for i, (index, cipher, epoch) in enumerate(sessions):
            req = ReattachRequest(
                nonce=rep + 1, ts_ms=client_ts, expected_epoch=epoch, path_id=0,
                kind=int(ReattachKind.MANUAL), client_version=1,
            )  # fmt: skip
            requests.append((cipher.seal(MSG_CONTROL, index, pack_control(req)), host_of(i)))
        gc.collect()
        acks = 0
        receive = gw.receive_datagram
        if profile is not None:
            profile.enable()
        t0 = time.process_time()
        for start in range(0, n, BATCH):
            for data, addr in requests[start : start + BATCH]:
                receive(data, addr, now)
            out = gw.datagrams_to_send()
            gw.events()
            gw.next_deadline()  # the driver re-arms its one timer after every turn
            acks += len(out)
        took = time.process_time() - t0
        if profile is not None:
            profile.disable()
        # every request answered: one sealed CONTROL datagram (REATTACH_ACK) each
        assert acks == n, (acks, n, gw.drops)
        rates.append(n / took)
    # the answers are ACKs (open one with the client's keys)
    index, cipher, _ = sessions[-1]
    assert out[-1][1][0] == MSG_CONTROL
    plain = cipher.open(out[-1][1], now)
    assert isinstance(plain, bytes) and plain[0] == CType.REATTACH_ACK, plain
    return {"setup_s": setup, "best": max(rates), "median": sorted(rates)[len(rates) // 2]}


def run_in(path: str, n: int, reps: int) -> dict[str, float]:
    """``measure`` in a fresh interpreter with ``path`` as the code under test."""
    env = dict(os.environ, PYTHONPATH=path)
    cmd = [sys.executable, str(HERE / "reattach.py"), "--child", "-n", str(n), "--reps", str(reps)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return {k: float(v) for k, v in (w.split("=") for w in out.split())}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=10_000, help="sessions (default 10,000)")
    parser.add_argument("--reps", type=int, default=5, help="requests per session, timed")
    parser.add_argument("--compare", metavar="BEFORE", help="another checkout: before/after")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (--compare)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        r = measure(args.n, args.reps)
        print(" ".join(f"{k}={v}" for k, v in r.items()))
        return 0
    here = str(HERE.parent)
    if not args.compare:
        r = run_in(here, args.n, args.reps)
        print(f"reattach validations: {r['median']:,.0f}/s (best {r['best']:,.0f}/s), "
              f"n={args.n}, load {os.getloadavg()[0]:.2f}")  # fmt: skip
        return 0
    rows: dict[str, list[float]] = {"before": [], "after": []}
    for _ in range(args.rounds):
        for name, path in (("before", args.compare), ("after", here)):
            load = os.getloadavg()[0]
            r = run_in(path, args.n, args.reps)
            rows[name].append(r["median"])
            print(f"{name}: {r['median']:,.0f}/s (best {r['best']:,.0f}), load {load:.2f}",
                  flush=True)  # fmt: skip
    for name, values in rows.items():
        values.sort()
        print(f"{name}: median of rounds {values[len(values) // 2]:,.0f}/s  {values}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
