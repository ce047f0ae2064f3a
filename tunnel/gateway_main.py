"""``jvpn-gateway``: the gateway program (placeholder until its own issue lands).

The options are the ones the gateway will have; for now every run says so and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

NOT_BUILT = "jvpn-gateway: the gateway is not built yet (it comes with its own issue)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jvpn-gateway",
        description="jvpn gateway: UDP listeners, TUN, session table, policy, event sinks.",
    )
    parser.add_argument("--config", metavar="PATH", help="gateway configuration file (TOML)")
    parser.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics here (loopback by default)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    _parser().parse_args(argv)
    print(NOT_BUILT, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
