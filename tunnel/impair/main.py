"""Userspace UDP impairment relay: a lossy, slow, flapping or NAT-rebinding path.

The kernel here has no netem, so integration tests, benchmarks and ``jvpn-tui --demo``
put this relay between a client and the gateway::

    client --> listen socket --[up]--> mapping socket (one per client) --> upstream
    client <-- listen socket <-[down]-- mapping socket <------------------ upstream

Each downstream source address gets its own upstream socket, like a NAT mapping, so the
upstream sees one source port per client; ``rebind()`` swaps every mapping socket for a
new one, which the upstream sees as a NAT rebinding. Each direction has its own
:class:`Impairment` (loss, delay, jitter, duplicate, reorder, blackhole, rate), changed
at run time through the Python API, a JSON-over-UDP control socket, or a thread handle.

Randomness comes from one injected ``random.Random``: with a fixed seed and the same
input sequence, the same datagrams are dropped, duplicated and held back.

The relay only ever sends to the configured upstream (mapping sockets are connected to
it) and to downstream addresses that sent to the listen socket; control replies go to
the control requester. Everything a peer can grow is bounded: mappings
(``max_mappings``, least recently used evicted), delayed datagrams (``max_delayed``),
the rate-limiter backlog. The hot path logs nothing and reads the clock once per batch.

This module is the ``jvpn-impair`` command line and the public face of the relay; the
parts live in ``tunnel.impair.model`` (the :class:`Impairment` settings and how each
datagram is planned), ``tunnel.impair.net`` (addresses and UDP sockets),
``tunnel.impair.relay`` (:class:`ImpairRelay`), ``tunnel.impair.control`` (the control
protocol) and ``tunnel.impair.thread`` (:func:`run_relay_in_thread`).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import ipaddress
import json
import random
import signal
import sys
from collections.abc import Sequence
from typing import Any, Final

from tunnel.impair.model import Impairment
from tunnel.impair.net import Address, RelayStartError, format_address, parse_address
from tunnel.impair.relay import DEFAULT_MAPPING_IDLE_S, DEFAULT_MAX_MAPPINGS, ImpairRelay

__all__ = ["main"]


# -- command line ----------------------------------------------------------------------


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, no usage dump
        raise _UsageError(f"{message} (try --help)")


def _version() -> str:
    """The installed jvpn version (this tool imports nothing else of tunnel, so it does not
    use tunnel.version)."""
    try:
        return importlib.metadata.version("jvpn")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed: running from a source tree)"


def _address_arg(text: str) -> Address:
    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="jvpn-impair",
        description="Userspace UDP impairment relay: forwards datagrams between "
        "downstream clients and one upstream, with loss, delay, jitter, duplication, "
        "reordering, blackholing, rate limiting and NAT rebinding controllable at run "
        "time through a JSON control socket (see docs/impair.md).",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "--listen",
        required=True,
        type=_address_arg,
        metavar="HOST:PORT",
        help="address clients send to (port 0 = any free port)",
    )
    parser.add_argument(
        "--upstream",
        required=True,
        type=_address_arg,
        metavar="HOST:PORT",
        help="address datagrams are relayed to (the gateway)",
    )
    parser.add_argument(
        "--control",
        type=_address_arg,
        metavar="HOST:PORT",
        help="JSON control socket (unauthenticated: keep it on loopback)",
    )
    parser.add_argument(
        "--dir",
        choices=("both", "up", "down"),
        default="both",
        help="direction the impairment options apply to (default: both)",
    )
    parser.add_argument("--loss", type=float, default=0.0, help="drop probability 0..1")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="+/- delay variation")
    parser.add_argument("--duplicate", type=float, default=0.0, help="duplication probability 0..1")
    parser.add_argument(
        "--reorder",
        type=float,
        default=0.0,
        help="probability a datagram is held back so later ones overtake it",
    )
    parser.add_argument("--rate-kbit", type=float, default=None, help="bottleneck kbit/s")
    parser.add_argument("--blackhole", action="store_true", help="start with the path dead")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible runs")
    parser.add_argument(
        "--max-mappings",
        type=int,
        default=DEFAULT_MAX_MAPPINGS,
        help="downstream sources tracked at once (LRU evicted)",
    )
    parser.add_argument(
        "--mapping-idle-s",
        type=float,
        default=DEFAULT_MAPPING_IDLE_S,
        help="idle seconds before a mapping expires",
    )
    return parser


def _emit(obj: dict[str, Any]) -> None:
    try:
        print(json.dumps(obj), flush=True)
    except OSError:
        pass  # stdout closed by the reader: keep relaying, the output was informational


async def _serve(relay: ImpairRelay) -> None:
    await relay.start()
    _emit(
        {
            "event": "listening",
            "listen": format_address(relay.bound_address),
            "upstream": format_address(relay.upstream_address),
            "control": format_address(relay.control_address) if relay.control_address else None,
        }
    )
    control_addr = relay.control_address
    if control_addr is not None and not ipaddress.ip_address(control_addr[0]).is_loopback:
        print(
            "jvpn-impair: warning: control socket is not on loopback and has no authentication",
            file=sys.stderr,
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        relay.close()
    _emit({"event": "stopped", "stats": relay.stats()})


EXIT_OK: Final = 0
"""Stopped by SIGINT/SIGTERM (after the ``stopped`` line with the counters)."""
EXIT_FAILURE: Final = 1
"""Internal error (one line on stderr)."""
EXIT_USAGE: Final = 2
"""Bad option or value, or the listen/control address cannot be bound (one line on stderr)."""


def main(argv: Sequence[str] | None = None) -> int:
    """``jvpn-impair``: 0 on SIGINT/SIGTERM, 2 on usage or bind errors, 1 otherwise."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        print(f"jvpn-impair: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help / --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    try:
        imp = Impairment(
            loss=args.loss,
            delay_ms=args.delay_ms,
            jitter_ms=args.jitter_ms,
            duplicate=args.duplicate,
            reorder=args.reorder,
            blackhole=args.blackhole,
            rate_kbit=args.rate_kbit,
        )
        relay = ImpairRelay(
            args.listen,
            args.upstream,
            control=args.control,
            up=imp if args.dir in ("both", "up") else None,
            down=imp if args.dir in ("both", "down") else None,
            rng=random.Random(args.seed),
            max_mappings=args.max_mappings,
            mapping_idle_s=args.mapping_idle_s,
        )
    except ValueError as exc:
        print(f"jvpn-impair: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        asyncio.run(_serve(relay))
    except RelayStartError as exc:
        print(f"jvpn-impair: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as exc:  # the boundary: one line, never a traceback
        print(f"jvpn-impair: internal error: {exc!r}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
