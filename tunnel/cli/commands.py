"""What each ``jvpn`` command does over one control connection (docs/control.md)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from tunnel.cli.events import event_line, loss_line
from tunnel.cli.exits import EXIT_OK, EXIT_REFUSED, EXIT_UNREACHABLE
from tunnel.cli.status import client_text, gateway_text
from tunnel.cli.text import Style
from tunnel.control.client import ControlConnection
from tunnel.control.protocol import (
    Command,
    ControlClosed,
    ControlError,
    EventMsg,
    Loss,
    SnapshotMsg,
    Watch,
    client_status,
    gateway_status,
    to_builtins,
)  # fmt: skip

Report = Callable[[str], None]

EXIT_INTERRUPTED = 130
"""Ctrl-C during anything but ``watch`` (the shell's convention, 128 + SIGINT)."""


def run(args: argparse.Namespace, path: Path, out: IO[str], error: Report) -> int:
    """Connect, do ``args.command``, return the exit status (errors go to ``error``)."""
    try:
        with ControlConnection(path) as conn:
            if args.command == "status":
                return _status(conn, args.json, out)
            if args.command == "watch":
                return _watch(conn, args, out, error)
            return _command(conn, _request(args), out, error)
    except ControlError as exc:
        error(str(exc))
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return EXIT_OK if args.command == "watch" else EXIT_INTERRUPTED


def _request(args: argparse.Namespace) -> Command:
    name = args.command
    if name == "switch":
        return Command(command="switch", path=args.path)
    if name == "auto":
        return Command(command="auto", on=args.state == "on")
    if name == "reload":
        return Command(command="reload_policy")
    if name == "terminate":
        return Command(command="terminate", session=args.session)
    return Command(command=name)  # reattach


def _command(conn: ControlConnection, request: Command, out: IO[str], error: Report) -> int:
    result = conn.command(request)
    if not result.ok:
        error(f"refused: {result.detail}")
        return EXIT_REFUSED
    print(result.detail, file=out, flush=True)
    return EXIT_OK


def _status(conn: ControlConnection, as_json: bool, out: IO[str]) -> int:
    reply = conn.status()
    role = reply.role
    status: Any = gateway_status(reply.status) if role == "gateway" else client_status(reply.status)
    if as_json:
        document = {"role": role, "version": conn.hello.version, "status": to_builtins(status)}
        print(json.dumps(document, indent=2, sort_keys=False), file=out, flush=True)
        return EXIT_OK
    style = Style.for_stream(out)
    lines = gateway_text(status, style) if role == "gateway" else client_text(status, style)
    print("\n".join(lines), file=out, flush=True)
    return EXIT_OK


def _watch(conn: ControlConnection, args: argparse.Namespace, out: IO[str], error: Report) -> int:
    conn.send(Watch(history=not args.no_history))
    conn.settimeout(None)
    try:
        for message in conn.messages():
            _print_message(message, args.json, out)
    except ControlClosed:
        error(f"the {conn.hello.role} closed its control socket (it stopped): watch ended")
        return EXIT_OK
    return EXIT_OK  # pragma: no cover - messages() only ends by raising


def _print_message(message: object, as_json: bool, out: IO[str]) -> None:
    if isinstance(message, EventMsg):
        text = json.dumps(message.event) if as_json else event_line(message.event)
    elif isinstance(message, Loss):
        text = (
            json.dumps({"type": "loss", "lost": message.lost})
            if as_json
            else loss_line(message.lost)
        )
    elif isinstance(message, SnapshotMsg):
        return
    else:
        raise ControlError(f"unexpected message while watching: {type(message).__name__}")
    print(text, file=out, flush=True)
