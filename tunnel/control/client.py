"""The control socket's client side: a small blocking connection (CLI, attached UI).

:class:`ControlConnection` connects, reads and checks the server's hello, then sends
requests and reads messages. Every failure is a :class:`ControlError` whose message says
what to do (no server at that path, permission denied on a root-only socket, another
protocol version, the server went away), never a traceback.
"""

from __future__ import annotations

import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import msgspec

from tunnel.control.protocol import (
    MAX_LINE,
    PROTOCOL_VERSION,
    Command,
    ControlClosed,
    ControlError,
    Error,
    Hello,
    Message,
    Request,
    Result,
    Status,
    StatusReply,
    decode_reply,
    encode,
)  # fmt: skip

__all__ = ["CONNECT_TIMEOUT", "ControlConnection"]

CONNECT_TIMEOUT: Final = 5.0
"""Seconds to wait for the server's hello and for each reply."""


def _connect_error(path: Path, exc: OSError) -> ControlError:
    if isinstance(exc, FileNotFoundError):
        return ControlError(
            f"no control socket at {path}: is the client or gateway running? "
            "(--socket names another path)"
        )
    if isinstance(exc, PermissionError):
        return ControlError(
            f"permission denied on {path}: the control socket is for its owner only "
            "(run as root, or as the user that started the program)"
        )
    if isinstance(exc, ConnectionRefusedError):
        if not _is_socket(path):
            return ControlError(f"{path} is not a socket (--socket names the control socket)")
        return ControlError(f"nobody listens on {path} (a stale socket: the program ended)")
    return ControlError(f"cannot connect to {path}: {exc.strerror or exc}")


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.stat().st_mode)
    except OSError:
        return True  # cannot tell: keep the usual message


class ControlConnection:
    """One connection to a control socket (blocking; not thread-safe)."""

    def __init__(self, path: Path, *, timeout: float | None = CONNECT_TIMEOUT) -> None:
        self._path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._buffer = bytearray()
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(str(path))
        except OSError as exc:
            self._sock.close()
            raise _connect_error(path, exc) from None
        hello = self.read()
        if not isinstance(hello, Hello):
            self.close()
            raise ControlError(f"{path}: the server did not say hello: {_describe(hello)}")
        if hello.protocol != PROTOCOL_VERSION:
            self.close()
            raise ControlError(
                f"{path}: the server speaks control protocol {hello.protocol}, "
                f"this program {PROTOCOL_VERSION} (jvpn {hello.version} there)"
            )
        self.hello: Final = hello

    def __enter__(self) -> ControlConnection:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._sock.close()

    def settimeout(self, timeout: float | None) -> None:
        """Reply timeout from now on (None: wait forever, as a watcher does)."""
        self._sock.settimeout(timeout)

    def send(self, request: Request) -> None:
        """Send one request."""
        try:
            self._sock.sendall(encode(request))
        except OSError as exc:
            raise ControlError(f"{self._path}: the server went away ({exc.strerror})") from None

    def read(self) -> Message:
        """The next message from the server."""
        while (end := self._buffer.find(b"\n")) < 0:
            if len(self._buffer) > MAX_LINE:
                raise ControlError(f"{self._path}: a message longer than {MAX_LINE} bytes")
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                raise ControlError(f"{self._path}: no answer from the server in time") from None
            except OSError as exc:
                raise ControlError(f"{self._path}: {exc.strerror or exc}") from None
            if not chunk:
                raise ControlClosed(f"{self._path}: the server closed the connection")
            self._buffer += chunk
        line = bytes(self._buffer[: end + 1])
        del self._buffer[: end + 1]
        return decode_reply(line)

    def messages(self) -> Iterator[Message]:
        """Messages as they come, until the server closes (then ControlError)."""
        while True:
            yield self.read()

    def status(self) -> StatusReply:
        """One status."""
        self.send(Status())
        reply = self.read()
        if not isinstance(reply, StatusReply):
            raise ControlError(f"{self._path}: status refused: {_describe(reply)}")
        return reply

    def command(self, request: Command) -> Result:
        """One command and its result (``ok`` False: refused, ``detail`` says why)."""
        self.send(request)
        reply = self.read()
        if isinstance(reply, Error):
            return Result(ok=False, detail=reply.error)
        if not isinstance(reply, Result):
            raise ControlError(f"{self._path}: unexpected answer: {_describe(reply)}")
        return reply


def _describe(message: msgspec.Struct) -> str:
    if isinstance(message, Error):
        return message.error
    return type(message).__name__
