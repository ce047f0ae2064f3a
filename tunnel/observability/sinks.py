"""Event sinks: where the pipeline's JSON lines end up.

A sink has a ``name``, ``write(line)`` and ``close()``. ``write`` gets one compact JSON
object without the trailing newline and raises on any failure; the pipeline owns retry,
backoff, buffering and health, so a sink stays a thin, synchronous writer that only its
own pipeline thread ever calls. Sinks open files and sockets lazily on the first write,
so a sink whose target is missing at start-up shows as ``failing`` and recovers by itself.

A sink may also have ``check() -> str | None``: why it cannot work right now (a missing
directory, a host name that does not resolve), or None. The programs call it at start to
report (or refuse, for a sink the configuration marks ``required``) in one line, and the
pipeline calls it when the sink's thread starts (:func:`sink_problems`).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Final, Literal, Protocol, TextIO

from tunnel.observability.syslog import (
    DEFAULT_SD_ID,
    FACILITY_LOCAL0,
    NILVALUE,
    format_message,
    octet_frame,
    pri,
    truncate_utf8,
)

DEFAULT_MAX_BYTES: Final = 10 * 1024 * 1024
"""JSONL file size at which it is rotated: small enough to ship, large enough to be rare."""

DEFAULT_BACKUPS: Final = 5
"""Rotated JSONL files kept (path.1 .. path.5); older ones are deleted."""

FILE_MODE: Final = 0o640
"""Owner writes, the log-reading group reads, nobody else: events name sessions."""

SYSLOG_PORT: Final = 514
UDP_MAX_BYTES: Final = 2048
"""RFC 5426 §3.2: every syslog receiver SHOULD accept 2048-octet datagrams; longer
messages are truncated (the header and structured data survive, the JSON MSG is cut)."""

CONNECT_TIMEOUT_S: Final = 3.0
SEND_TIMEOUT_S: Final = 3.0
"""A SIEM that accepts but never reads fails the write after this long instead of hanging."""


class Sink(Protocol):
    """What the pipeline needs from a sink."""

    name: str

    def write(self, line: str) -> None:
        """Deliver one JSON line (no newline); raise on failure."""

    def close(self) -> None:
        """Release files and sockets; must not raise for an already closed sink."""


class JsonlFileSink:
    """Appends JSON lines to a file, rotating it by size (path.1 is the newest backup)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        backups: int = DEFAULT_BACKUPS,
        fsync: bool = False,
        name: str | None = None,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        if backups < 0:
            raise ValueError("backups must be >= 0")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.fsync = fsync
        self.name = name or f"jsonl:{self.path.name}"
        self._fd: int | None = None
        self._size = 0

    def check(self) -> str | None:
        """Why lines cannot be appended now (missing or unwritable directory or file)."""
        directory = self.path.parent
        if self.path.exists():
            if self.path.is_dir():
                return f"{self.path} is a directory"
            if not os.access(self.path, os.W_OK):
                return f"{self.path} is not writable"
            return None
        if not directory.is_dir():
            return f"directory {directory} does not exist"
        if not os.access(directory, os.W_OK | os.X_OK):
            return f"directory {directory} is not writable"
        return None

    def write(self, line: str) -> None:
        data = line.encode("utf-8") + b"\n"
        fd = self._open()
        if self._size > 0 and self._size + len(data) > self.max_bytes:
            self._rotate()
            fd = self._open()
        start = self._size
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
                self._size += written
            if self.fsync:
                os.fsync(fd)
        except OSError:
            # Never leave half a line behind: the retry writes the whole line again.
            self._truncate_to(start)
            raise

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def _open(self) -> int:
        if self._fd is not None:
            return self._fd
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags | os.O_EXCL, FILE_MODE)
            os.fchmod(fd, FILE_MODE)  # the umask may have narrowed or widened it
        except FileExistsError:
            fd = os.open(self.path, flags, FILE_MODE)
        self._fd = fd
        self._size = os.fstat(fd).st_size
        return fd

    def _rotate(self) -> None:
        self.close()
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
            return
        for index in range(self.backups - 1, 0, -1):
            older = self._backup(index)
            if older.exists():
                os.replace(older, self._backup(index + 1))
        os.replace(self.path, self._backup(1))

    def _backup(self, index: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{index}")

    def _truncate_to(self, size: int) -> None:
        fd = self._fd
        if fd is None:
            return
        try:
            os.ftruncate(fd, size)
            self._size = size
        except OSError:
            # The file is unusable; reopen (and re-read its size) on the next write.
            self.close()


class SyslogSink:
    """RFC 5424 messages to a syslog receiver or SIEM over UDP or TCP (RFC 6587 framing)."""

    def __init__(
        self,
        host: str,
        port: int = SYSLOG_PORT,
        *,
        transport: Literal["udp", "tcp"] = "udp",
        app_name: str = "jvpn",
        hostname: str | None = None,
        facility: int = FACILITY_LOCAL0,
        procid: str | None = None,
        sd_id: str = DEFAULT_SD_ID,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        send_timeout: float = SEND_TIMEOUT_S,
        udp_max_bytes: int = UDP_MAX_BYTES,
        wall_clock: Callable[[], float] = time.time,
        name: str | None = None,
    ) -> None:
        if transport not in ("udp", "tcp"):
            raise ValueError(f"syslog transport must be 'udp' or 'tcp', not {transport!r}")
        pri(facility, 0)  # validates the facility
        self.host = host
        self.port = port
        self.transport = transport
        self.app_name = app_name
        self.hostname = hostname or socket.gethostname() or NILVALUE
        self.facility = facility
        self.procid = procid or str(os.getpid())
        self.sd_id = sd_id
        self.connect_timeout = connect_timeout
        self.send_timeout = send_timeout
        self.udp_max_bytes = udp_max_bytes
        self._wall_clock = wall_clock
        self.name = name or f"syslog-{transport}:{host}:{port}"
        self._sock: socket.socket | None = None

    def check(self) -> str | None:
        """Why the receiver cannot be reached by name now (the host does not resolve).

        A receiver that is down is not a problem here: the sink retries it.
        """
        kind = socket.SOCK_DGRAM if self.transport == "udp" else socket.SOCK_STREAM
        try:
            socket.getaddrinfo(self.host, self.port, type=kind)
        except (socket.gaierror, UnicodeError) as exc:
            reason = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
            return f"cannot resolve syslog host {self.host!r}: {reason}"
        return None

    def format(self, line: str) -> bytes:
        """The RFC 5424 message (unframed, untruncated) for one JSON line."""
        decoded = json.loads(line)
        event: Mapping[str, object] = decoded if isinstance(decoded, dict) else {}
        message = format_message(
            event,
            line,
            now_ms=int(self._wall_clock() * 1000),
            hostname=self.hostname,
            app_name=self.app_name,
            procid=self.procid,
            facility=self.facility,
            sd_id=self.sd_id,
        )
        return message.encode("utf-8")

    def write(self, line: str) -> None:
        message = self.format(line)
        if self.transport == "udp":
            self._send_udp(truncate_utf8(message, self.udp_max_bytes))
        else:
            self._send_tcp(octet_frame(message))

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def _send_udp(self, datagram: bytes) -> None:
        if self._sock is None:
            family, _, _, _, address = socket.getaddrinfo(
                self.host, self.port, type=socket.SOCK_DGRAM
            )[0]
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.settimeout(self.send_timeout)
            try:
                sock.connect(address)
            except OSError:
                sock.close()
                raise
            self._sock = sock
        try:
            self._sock.send(datagram)
        except OSError:
            self.close()  # e.g. ECONNREFUSED from an earlier ICMP: start afresh next time
            raise

    def _send_tcp(self, frame: bytes) -> None:
        if self._sock is None:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
            sock.settimeout(self.send_timeout)  # bounds the whole sendall (Python >= 3.5)
            self._sock = sock
        try:
            self._sock.sendall(frame)
        except OSError:
            # A partial frame breaks the octet counting: drop the connection, reconnect later.
            self.close()
            raise


class StdoutSink:
    """One JSON line per event on a text stream, flushed at once (used by --headless)."""

    def __init__(self, stream: TextIO | None = None, *, name: str = "stdout") -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.name = name

    def write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if not self.stream.closed:
            self.stream.flush()  # never close the process's stdout


class CallbackSink:
    """Hands each JSON line to a function (the TUI, tests)."""

    def __init__(self, fn: Callable[[str], object], *, name: str = "callback") -> None:
        self.fn = fn
        self.name = name

    def write(self, line: str) -> None:
        self.fn(line)

    def close(self) -> None:
        return None


def sink_problems(sinks: Iterable[object]) -> list[tuple[str, str]]:
    """(sink name, problem) for every sink whose ``check()`` names one, in order."""
    problems = []
    for sink in sinks:
        check = getattr(sink, "check", None)
        problem = check() if check is not None else None
        if problem:
            problems.append((str(getattr(sink, "name", "?")), problem))
    return problems
