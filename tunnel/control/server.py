"""The control socket's server: one asyncio unix server on the program's own loop.

The server runs on the loop of the engine or gateway it serves, so it reads their state
and applies their commands with no lock and no thread hand-off. Its :class:`ControlTarget`
(the engine's or the gateway's adapter) answers status and commands; the program calls
:meth:`ControlServer.publish_event` and :meth:`ControlServer.publish_status` from the same
loop. Nothing it does can block or slow the program: every watcher has a bounded queue
that drops its oldest messages (counted, then reported to that watcher as a ``loss``
message), a line longer than :data:`~tunnel.control.protocol.MAX_LINE` ends its
connection, and connections beyond ``max_clients`` are refused with an error line.

The socket file is created with ``mode`` (0600) before it listens, in a directory made
0700 when the server creates it; an existing socket that nobody answers on is replaced,
one that answers is refused (another program listens there), and a path that is not a
socket is never removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import os
import socket
import stat
from collections import deque
from collections.abc import Awaitable, Mapping, Sequence
from pathlib import Path
from typing import Final, Protocol, TypeVar

from tunnel.control.protocol import (
    MAX_LINE,
    PROTOCOL_VERSION,
    Command,
    ControlError,
    Error,
    EventMsg,
    Hello,
    Loss,
    Result,
    SnapshotMsg,
    Status,
    StatusReply,
    Watch,
    decode_request,
    encode,
    raw,
)  # fmt: skip
from tunnel.version import package_version

__all__ = ["MAX_CLIENTS", "WATCH_QUEUE", "ControlServer", "ControlTarget", "prepare_socket_path"]

MAX_CLIENTS: Final = 16
"""Connections served at once; one more gets an error line and is closed."""

WATCH_QUEUE: Final = 1024
"""Messages one watcher may have waiting; one more drops its oldest (counted)."""


class ControlTarget(Protocol):
    """What the server serves: the client engine's or the gateway's adapter."""

    @property
    def role(self) -> str:
        """``client`` or ``gateway``."""
        ...

    def status(self) -> object:
        """The current status (an EngineSnapshot or a GatewayStatus), or an awaitable of it
        (a gateway's supervisor asks its workers first)."""
        ...

    def history(self) -> Sequence[Mapping[str, object]]:
        """Remembered session-changing events, oldest first (a new watcher gets them)."""
        ...

    def command(self, request: Command) -> Result | Awaitable[Result]:
        """Apply one command (or an awaitable doing it); never raises (a refusal is
        ``Result(ok=False, ...)``)."""
        ...


def prepare_socket_path(path: Path) -> None:
    """Make ``path`` bindable: parent directory (0700 if created), stale socket removed.

    Raises ControlError when the path is taken by a listening server or is not a socket.
    """
    if not path.parent.is_dir():
        try:
            path.parent.mkdir(mode=0o700, parents=True)
        except OSError as exc:
            raise ControlError(
                f"cannot create the directory {path.parent} for {path.name}: {exc.strerror}"
            ) from None
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ControlError(f"{path} exists and is not a socket; remove it or choose another")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ControlError(f"{path}: {exc.strerror}") from None
        path.unlink(missing_ok=True)  # stale: nobody listens
        return
    finally:
        probe.close()
    raise ControlError(f"another program already listens on {path}")


class _Watcher:
    """One watching connection: a bounded queue of encoded lines and its loss count."""

    __slots__ = ("lines", "lost", "ready", "snapshots")

    def __init__(self, snapshots: bool, size: int) -> None:
        self.lines: deque[bytes] = deque(maxlen=size)
        self.lost = 0
        self.ready = asyncio.Event()
        self.snapshots = snapshots

    def put(self, line: bytes) -> None:
        if len(self.lines) == self.lines.maxlen:
            self.lost += 1
        self.lines.append(line)
        self.ready.set()

    def take(self) -> bytes | None:
        """The next line to write (a loss report first, if any); None when empty."""
        if not self.lines:
            return None
        if self.lost:
            lost, self.lost = self.lost, 0
            return encode(Loss(lost=lost))
        return self.lines.popleft()


class ControlServer:
    """The unix-socket control server of one program (see the module docstring)."""

    def __init__(
        self,
        path: Path,
        target: ControlTarget,
        *,
        mode: int = 0o600,
        max_clients: int = MAX_CLIENTS,
        watch_queue: int = WATCH_QUEUE,
    ) -> None:
        self._path = path
        self._target = target
        self._mode = mode
        self._max_clients = max_clients
        self._watch_queue = watch_queue
        self._server: asyncio.AbstractServer | None = None
        self._sock: socket.socket | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._watchers: set[_Watcher] = set()
        self._hello = encode(
            Hello(protocol=PROTOCOL_VERSION, role=target.role, version=package_version(),
                  pid=os.getpid())
        )  # fmt: skip

    @property
    def path(self) -> Path:
        """The socket's path."""
        return self._path

    @property
    def watchers(self) -> int:
        """Connections currently watching."""
        return len(self._watchers)

    @property
    def status_watchers(self) -> int:
        """Watchers that asked for statuses (a program builds none for nobody)."""
        return sum(1 for w in self._watchers if w.snapshots)

    def listen(self) -> None:
        """Bind and listen now, before any loop runs (a program checks its socket at
        start-up, before it changes the host); :meth:`start` then serves. Raises
        ControlError. Idempotent."""
        if self._sock is not None:
            return
        prepare_socket_path(self._path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self._path))
            os.chmod(self._path, self._mode)
            sock.listen(self._max_clients)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise ControlError(f"cannot listen on {self._path}: {exc.strerror or exc}") from None
        self._sock = sock

    async def start(self) -> None:
        """Bind (mode set before listening; unless :meth:`listen` did) and serve. Raises
        ControlError."""
        self.listen()
        sock, self._sock = self._sock, None
        assert sock is not None
        try:
            self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_LINE)
        except OSError as exc:
            sock.close()
            raise ControlError(f"cannot listen on {self._path}: {exc.strerror or exc}") from None

    async def close(self, flush: float = 0.0) -> None:
        """Stop serving, end every connection, remove the socket file.

        ``flush``: up to this many seconds for the watchers to read what is queued for
        them (the final snapshot of an engine that ends)."""
        self.discard()
        if self._server is not None:
            self._server.close()
            self._server = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + flush
        while any(w.lines for w in self._watchers) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        for task in list(self._connections):
            task.cancel()
        for task in list(self._connections):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(self._path.lstat().st_mode):
                self._path.unlink()

    def discard(self) -> None:
        """Close a socket :meth:`listen` bound that was never served, and remove its file
        (no loop needed: a start-up that failed later). Idempotent."""
        if self._sock is None:
            return
        self._sock.close()
        self._sock = None
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(self._path.lstat().st_mode):
                self._path.unlink()

    def publish_event(self, event: Mapping[str, object]) -> None:
        """Queue one event to every watcher (loop thread only; never blocks)."""
        if not self._watchers:
            return
        line = encode(EventMsg(event=dict(event)))
        for watcher in self._watchers:
            watcher.put(line)

    def publish_status(self, status: object) -> None:
        """Queue one status to the watchers that asked for them (loop thread only)."""
        wanted = [w for w in self._watchers if w.snapshots]
        if not wanted:
            return
        line = encode(SnapshotMsg(status=raw(status)))
        for watcher in wanted:
            watcher.put(line)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= self._max_clients:
            writer.write(encode(Error(error="too many control connections; try again later")))
            await _close(writer)
            return
        self._connections.add(task)
        watcher: _Watcher | None = None
        streamer: asyncio.Task[None] | None = None
        try:
            writer.write(self._hello)
            await writer.drain()
            while (line := await _read_line(reader, writer)) is not None:
                reply, watch = await self._answer(line)
                if watch is not None and watcher is None:
                    watcher = await self._watch(watch)
                    streamer = asyncio.ensure_future(_stream(watcher, writer))
                if reply is not None:
                    writer.write(reply)
                    await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            if watcher is not None:
                self._watchers.discard(watcher)
            if streamer is not None:
                streamer.cancel()
            self._connections.discard(task)
            await _close(writer)

    async def _answer(self, line: bytes) -> tuple[bytes | None, Watch | None]:
        """The reply line to one request (None: a watch has no reply), and the watch."""
        try:
            request = decode_request(line)
        except ControlError as exc:
            return encode(Error(error=str(exc))), None
        if isinstance(request, Status):
            status = await _resolved(self._target.status())
            return encode(StatusReply(role=self._target.role, status=raw(status))), None
        if isinstance(request, Watch):
            return None, request
        return encode(await _resolved(self._target.command(request))), None

    async def _watch(self, request: Watch) -> _Watcher:
        watcher = _Watcher(request.snapshots, self._watch_queue)
        if request.history:
            for event in self._target.history():
                watcher.put(encode(EventMsg(event=dict(event))))
        if request.snapshots:
            status = await _resolved(self._target.status())
            watcher.put(encode(SnapshotMsg(status=raw(status))))
        self._watchers.add(watcher)
        return watcher


T = TypeVar("T")


async def _resolved(value: T | Awaitable[T]) -> T:
    """A target's answer, awaited when it is awaitable."""
    if inspect.isawaitable(value):
        return await value
    return value


async def _read_line(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes | None:
    """The next request line; None at end of input or after an over-long line."""
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError:
        return None
    except asyncio.LimitOverrunError:
        writer.write(encode(Error(error=f"request longer than {MAX_LINE} bytes; closing")))
        return None
    return line if line.strip() else b"{}"


async def _stream(watcher: _Watcher, writer: asyncio.StreamWriter) -> None:
    """Write a watcher's queue as it fills; a loss is reported before the next message."""
    while True:
        await watcher.ready.wait()
        watcher.ready.clear()
        while (line := watcher.take()) is not None:
            writer.write(line)
            await writer.drain()


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
