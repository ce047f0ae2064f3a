"""``jvpn``: status, events and commands of a running client or gateway (docs/control.md).

The command talks to the program's control socket (:mod:`tunnel.control`); the server's
hello says whether it is a client or a gateway, so the same commands work on both and
``status`` renders what that role knows. Output is plain text (colour only on a
terminal) or, with ``--json``, the documented JSON. An error is one line on stderr,
``jvpn: <what went wrong>``, and its own exit status (``EXIT_*``).
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tunnel.cli.exits import EXIT_OK, EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_USAGE
from tunnel.version import package_version

EPILOG = """\
examples:
  jvpn status                    the client (default socket; --gateway: the gateway's)
  jvpn --gateway status --json   the gateway's status as JSON (docs/control.md)
  jvpn watch                     events as they happen (Ctrl-C ends)
  jvpn switch 2                  move the client's traffic to path 2
  jvpn auto off                  stop automatic switching (jvpn auto on: resume)
  jvpn reattach                  re-assert the binding on the active path
  jvpn reload                    reload the policy file (as SIGHUP)
  jvpn terminate                 end the client's session (the client stops)
  jvpn --gateway terminate 3fa2  end one session on the gateway (id or unique prefix)
  jvpn killswitch release        remove the kill switch a client left after an abnormal end

sockets: the client's default is /run/jvpn/client.sock, the gateway's
/run/jvpn/gateway.sock (as root; else under $XDG_RUNTIME_DIR/jvpn/); --socket PATH names
another (the program's control_socket / [control] socket setting).

exit status:
  0  done
  1  the program refused the command (the reason on stderr)
  2  bad command line
  3  cannot use the control socket (no program there, permission denied, ...)
"""


def _path_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a path number (1-9)") from None
    if not 1 <= value <= 9:
        raise argparse.ArgumentTypeError(f"path {value} does not exist: paths are 1-9")
    return value


def _socket_options(parser: argparse.ArgumentParser, default: Any) -> None:
    """``--socket`` / ``--gateway``, before or after the command (``jvpn status --gateway``)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--socket", metavar="PATH", type=Path, default=default,
        help="the control socket to use (default: the client's)",
    )  # fmt: skip
    group.add_argument(
        "--gateway", action="store_true", default=default if default is not None else False,
        help="use the gateway's default socket",
    )  # fmt: skip


def parser() -> argparse.ArgumentParser:
    """The ``jvpn`` command line."""
    top = argparse.ArgumentParser(
        prog="jvpn", allow_abbrev=False, epilog=EPILOG,
        description="Show and drive a running jvpn client or gateway through its control "
        "socket.", formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    top.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    _socket_options(top, None)
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    _socket_options(common, argparse.SUPPRESS)
    sub = top.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, parents=[common],
                              allow_abbrev=False)  # fmt: skip

    status = command("status", "show the client's paths and session, or the gateway's sessions")
    status.add_argument("--json", action="store_true", help="JSON (docs/control.md)")
    watch = command("watch", "print events as they happen (after the recent ones); Ctrl-C ends")
    watch.add_argument("--json", action="store_true", help="one JSON object per line")
    watch.add_argument("--no-history", action="store_true",
                       help="only new events, not the recent session-changing ones")  # fmt: skip
    switch = command("switch", "client: move the traffic to path N (the TUI's 1-9)")
    switch.add_argument("path", metavar="N", type=_path_id, help="path number, 1-9")
    auto = command("auto", "client: automatic, health-driven switching on or off")
    auto.add_argument("state", choices=("on", "off"))
    command("reattach", "client: re-assert the binding on the active path")
    command("reload", "reload the policy file (as SIGHUP)")
    terminate = command(
        "terminate", "client: end the session (the client stops); gateway: end one session"
    )
    terminate.add_argument(
        "session", nargs="?", metavar="SESSION",
        help="gateway: a session id, or a unique prefix (4+ hex digits)",
    )  # fmt: skip
    killswitch = sub.add_parser(
        "killswitch", allow_abbrev=False,
        help="show or release the kill switch a client left in place (no socket needed)",
        description="A client whose session ended abnormally keeps its kill switch: the "
        "tunnel's routes stay unreachable. 'show' lists those routes, 'release' removes them "
        "(root).",
    )  # fmt: skip
    killswitch.add_argument("action", choices=("show", "release"))
    return top


def _socket(args: argparse.Namespace) -> Path:
    from tunnel.control.protocol import default_socket

    if args.socket is not None:
        return Path(args.socket)
    return default_socket("gateway" if args.gateway else "client")


def main(argv: Sequence[str] | None = None) -> int:
    cli = parser()
    args = cli.parse_args(argv)
    if args.socket is not None and args.gateway:  # one before, one after the command
        cli.error("argument --gateway: not allowed with argument --socket")
    if args.command == "killswitch":  # the host's routes, not a program's socket
        from tunnel.cli.killswitch import run_killswitch

        return run_killswitch(args.action, sys.stdout, _error)
    from tunnel.cli.commands import run  # after --help / usage errors: keeps them fast

    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `jvpn watch | head` ends quietly
    return run(args, _socket(args), sys.stdout, _error)


def _error(message: str) -> None:
    print(f"jvpn: {message}", file=sys.stderr, flush=True)


__all__ = [
    "EXIT_OK", "EXIT_REFUSED", "EXIT_UNREACHABLE", "EXIT_USAGE", "main", "parser",
]  # fmt: skip
