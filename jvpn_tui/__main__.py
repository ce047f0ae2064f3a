"""``jvpn-tui``: the Textual client (placeholder until its own issue lands).

The options are the ones the client will have; for now every run says so and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

NOT_BUILT = "jvpn-tui: the client is not built yet (see issue 'jvpn-tui: the Textual client')"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jvpn-tui", description="jvpn client: a session that outlives any one UDP path."
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="run a complete local setup on loopback: no root, no config",
    )
    parser.add_argument(
        "--headless",
        action="store_true",
        help="run the engine without a UI; print one JSON event per line on stdout",
    )
    parser.add_argument("--config", metavar="PATH", help="client configuration file (TOML)")
    parser.add_argument(
        "--duration", metavar="SECONDS", type=float, help="stop after this many seconds"
    )
    parser.add_argument(
        "--theme",
        choices=("dark", "light", "high-contrast"),
        help="colour theme of the UI",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    _parser().parse_args(argv)
    print(NOT_BUILT, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
