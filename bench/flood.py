"""UDP flood sender for the gateway (seed §8 resource exhaustion): one core, top speed.

    python bench/flood.py --target 127.0.0.1:51820 --duration 10 [--replay captured.bin]

Sends, round-robin from one socket as fast as one Python thread can, a mix of

* ``garbage``: random bytes (random type byte and length),
* ``unknown_session``: well-formed DATA headers naming no session,
* ``bad_init``: well-formed HANDSHAKE_INITs with a wrong mac1,
* ``replay``: datagrams captured from a real session (``--replay``: a file of
  ``len:u16 | bytes`` records), sent again verbatim,
* ``replay_init``: the captured HANDSHAKE_INITs alone (valid mac1), if there are any.

Prints one JSON line: elapsed time, datagrams sent per category, the send rate, and for
the synthetic categories the drop reason the gateway must count for each datagram
(``expected``, computed with the protocol's own parser). The sender never reads replies.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import struct
import sys
import time
from pathlib import Path

from tunnel.core.constants import (
    MSG_COOKIE_REPLY,
    MSG_DATA,
    MSG_HANDSHAKE_INIT,
    MSG_HANDSHAKE_RESP,
    TRANSPORT_HEADER,
)
from tunnel.core.drops import Drop
from tunnel.core.wire import parse_header

POOL = 256
"""Distinct datagrams per synthetic category (cycled)."""


def expected_reason(data: bytes, live_indexes: set[int]) -> str:
    """The drop reason a gateway without a session named in ``data`` counts for it."""
    header = parse_header(data)
    if isinstance(header, Drop):
        return str(header)
    if header.msg_type == MSG_HANDSHAKE_INIT:
        return str(Drop.BAD_MAC)  # random bytes never carry a valid mac1
    if header.msg_type in (MSG_HANDSHAKE_RESP, MSG_COOKIE_REPLY):
        return str(Drop.WRONG_STATE)
    if header.receiver_index in live_indexes:  # pragma: no cover - 2^-32 per datagram
        raise ValueError("garbage named a live session")
    return str(Drop.UNKNOWN_SESSION)


def pools(rng: random.Random, live: set[int]) -> dict[str, list[bytes]]:
    garbage = []
    for i in range(POOL):
        n = rng.choice((0, 3, 8, 20, 60, 150, 200, 1400, 1600)) + rng.randrange(8)
        data = bytearray(rng.randbytes(n))
        if data and i % 2:  # half of it with a known type byte and zero reserved bytes
            data[0] = rng.choice((1, 2, 3, 4, 5))
            data[2:4] = b"\0\0"[: max(0, min(2, len(data) - 2))]
        garbage.append(bytes(data))
    unknown = []
    for i in range(POOL):
        index = rng.getrandbits(32)
        while index in live or index == 0:
            index = rng.getrandbits(32)
        unknown.append(TRANSPORT_HEADER.pack(MSG_DATA, 0, index, i) + rng.randbytes(64))
    bad_init = [
        struct.pack("<BBxxII", MSG_HANDSHAKE_INIT, 0, 0, rng.getrandbits(32))
        + rng.randbytes(106 + 32)
        for _ in range(POOL)
    ]
    return {"garbage": garbage, "unknown_session": unknown, "bad_init": bad_init}


def read_replay(path: Path) -> list[bytes]:
    raw = path.read_bytes()
    out, at = [], 0
    while at + 2 <= len(raw):
        (n,) = struct.unpack_from("<H", raw, at)
        out.append(raw[at + 2 : at + 2 + n])
        at += 2 + n
    return out


def write_replay(path: Path, datagrams: list[bytes]) -> None:
    path.write_bytes(b"".join(struct.pack("<H", len(d)) + d for d in datagrams))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", required=True, help="host:port of the gateway")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--replay", type=Path, help="captured datagrams to replay")
    ap.add_argument(
        "--live-index",
        type=int,
        action="append",
        default=[],
        help="receiver index of a live session (never named by garbage)",
    )
    ap.add_argument("--seed", type=int, default=8)
    args = ap.parse_args(argv)  # fmt: skip
    host, _, port = args.target.rpartition(":")
    rng = random.Random(args.seed)
    live = set(args.live_index)
    cats = pools(rng, live)
    if args.replay is not None:
        cats["replay"] = read_replay(args.replay)
        inits = [d for d in cats["replay"] if d[:1] == bytes((MSG_HANDSHAKE_INIT,))]
        if inits:  # a handshake flood the gateway must answer with cookies, not DH
            cats["replay_init"] = inits
    names = list(cats)
    # One schedule: every category in turn, cycling through each pool.
    schedule: list[tuple[int, bytes]] = []
    longest = max(len(v) for v in cats.values())
    for i in range(longest):
        for c, name in enumerate(names):
            pool = cats[name]
            schedule.append((c, pool[i % len(pool)]))
    payloads = [d for _, d in schedule]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    sock.connect((host, int(port)))
    send = sock.send
    failed: dict[int, int] = {}
    rounds = 0
    start = time.monotonic()
    end = start + args.duration
    while True:
        for k, data in enumerate(payloads):
            try:
                send(data)
            except OSError:  # ENOBUFS/ECONNREFUSED: not sent, not counted
                failed[k] = failed.get(k, 0) + 1
        rounds += 1
        if time.monotonic() >= end:
            break
    elapsed = time.monotonic() - start
    sent = [0] * len(names)
    expected: dict[str, int] = {}
    for k, (c, data) in enumerate(schedule):
        ok = rounds - failed.get(k, 0)
        sent[c] += ok
        if not names[c].startswith("replay"):
            reason = expected_reason(data, live)
            expected[reason] = expected.get(reason, 0) + ok
    total = sum(sent)
    print(json.dumps({
        "elapsed_s": round(elapsed, 3),
        "sent": dict(zip(names, sent, strict=True)),
        "total": total,
        "send_failed": sum(failed.values()),
        "rate_pps": round(total / elapsed),
        "expected": expected,
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
