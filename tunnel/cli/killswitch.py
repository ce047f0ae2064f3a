"""``jvpn killswitch show|release``: the kill switch a client left in place (docs/client.md).

A client whose session ended abnormally keeps its kill switch (unreachable routes for the
tunnel's routes, and the endpoint exceptions, tagged with their own routing protocol
number) so that nothing falls back to the plain network. These commands need no control
socket and no configuration: they find the routes by their tag in this network
namespace (:mod:`tunnel.io.killswitch`). ``release`` needs root (CAP_NET_ADMIN).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TextIO

from tunnel.cli.exits import EXIT_OK, EXIT_REFUSED
from tunnel.io.killswitch import KillSwitchError, KillSwitchRoute, find_installed, release

__all__ = ["run_killswitch"]


def _line(route: KillSwitchRoute) -> str:
    if route.kind == "unreachable":
        return f"unreachable {route.dst} (kill switch)"
    via = f" via {route.gateway}" if route.gateway else ""
    dev = f" dev {route.device}" if route.device else ""
    return f"{route.dst}{via}{dev} (endpoint exception)"


def run_killswitch(action: str, out: TextIO, error: Callable[[str], None]) -> int:
    """``show``: list the routes; ``release``: remove them. One line per route."""
    try:
        routes = release() if action == "release" else find_installed()
    except KillSwitchError as exc:
        error(f"cannot {'release' if action == 'release' else 'read'} the kill switch: {exc}")
        return EXIT_REFUSED
    verb = "removed " if action == "release" else ""
    for route in routes:
        out.write(f"{verb}{_line(route)}\n")
    if not routes:
        out.write("no kill switch installed\n")
    return EXIT_OK
