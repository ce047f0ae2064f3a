#!/usr/bin/env python3
"""Seal and open time of the two data ciphers: the bare AEAD, and jvpn's ``SessionCipher``.

A microbenchmark (a few seconds), not a throughput test: how long one DATA datagram of
``--size`` plaintext bytes takes to seal and to open with AES-256-GCM and with
ChaCha20-Poly1305 (tunnel/core/ciphers.py), interleaved over ``--rounds`` rounds of
``--count`` datagrams each, best round kept (many short rounds: on a busy machine the
best of them is the least disturbed by other processes).
``aead``: the ``cryptography`` primitive alone; ``session``: through ``SessionCipher``
(header, counter, replay window). Prints the CPU model, whether it has AES instructions,
microseconds per datagram and the ChaCha20/AES ratios (how much faster AES-256-GCM is).

    python bench/cipher.py [--size 1400] [--count 1000] [--rounds 60] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tunnel.core.aead import SessionCipher, TrafficKeys
from tunnel.core.ciphers import DataCipher
from tunnel.core.constants import MSG_DATA
from tunnel.io.cpu import CPUINFO, cpu_has_aes


def cpu_model() -> str:
    for line in CPUINFO.read_text(errors="replace").splitlines():
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "?"


def aead_round(suite: DataCipher, size: int, count: int) -> tuple[float, float]:
    """Seconds per datagram to encrypt and to decrypt with the bare primitive."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

    aead = (AESGCM if suite is DataCipher.AES_256_GCM else ChaCha20Poly1305)(bytes(32))
    payload, ad = bytes(size), bytes(16)
    nonces = [i.to_bytes(12, "little") for i in range(count)]
    start = time.perf_counter()
    sealed = [aead.encrypt(n, payload, ad) for n in nonces]
    middle = time.perf_counter()
    for n, c in zip(nonces, sealed, strict=True):
        aead.decrypt(n, c, ad)
    end = time.perf_counter()
    return (middle - start) / count, (end - middle) / count


def session_round(suite: DataCipher, size: int, count: int) -> tuple[float, float]:
    """Seconds per datagram to seal and to open, for ``count`` fresh datagrams."""
    a, b = bytes(range(32)), bytes(range(32, 64))
    tx = SessionCipher(TrafficKeys(send=a, recv=b), suite=suite, replay_window=count + 64)
    rx = SessionCipher(TrafficKeys(send=b, recv=a), suite=suite, replay_window=count + 64)
    payload = bytes(size)
    start = time.perf_counter()
    sealed = [tx.seal(MSG_DATA, 1, payload) for _ in range(count)]
    middle = time.perf_counter()
    for datagram in sealed:
        rx.open(datagram, 0.0)
    end = time.perf_counter()
    return (middle - start) / count, (end - middle) / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--size", type=int, default=1400)
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    kinds = {"aead": aead_round, "session": session_round}
    best = {(k, s): [1.0, 1.0] for k in kinds for s in DataCipher}
    for _ in range(args.rounds):
        for (kind, suite), times in best.items():  # interleaved: all see the same load
            seal, open_ = kinds[kind](suite, args.size, args.count)
            times[:] = [min(times[0], seal), min(times[1], open_)]
    result: dict[str, object] = {
        "cpu": cpu_model(), "aes_instructions": cpu_has_aes(), "size": args.size,
    }  # fmt: skip
    for kind in kinds:
        aes, chacha = best[kind, DataCipher.AES_256_GCM], best[kind, DataCipher.CHACHA20_POLY1305]
        result[kind] = {
            **{
                s.label: {"seal_us": round(v[0] * 1e6, 2), "open_us": round(v[1] * 1e6, 2)}
                for s, v in ((DataCipher.AES_256_GCM, aes), (DataCipher.CHACHA20_POLY1305, chacha))
            },
            "chacha_over_aes": round(sum(chacha) / sum(aes), 2),
        }
    if args.json:
        print(json.dumps(result))
        return
    aes_flag = "yes" if result["aes_instructions"] else "no"
    print(f"CPU: {result['cpu']} (AES instructions: {aes_flag}), {args.size}-byte datagrams")
    for kind in kinds:
        for s in DataCipher:
            t = best[kind, s]
            print(f"{kind:>8} {s.label:>18}: seal {t[0] * 1e6:6.2f} us, open {t[1] * 1e6:6.2f} us")
        ratio = result[kind]["chacha_over_aes"]  # type: ignore[index]
        print(f"{kind:>8} ChaCha20-Poly1305 / AES-256-GCM (seal + open): {ratio}x")


if __name__ == "__main__":
    main()
