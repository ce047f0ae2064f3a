"""The attached UI's engine: a running client, reached through its control socket.

``jvpn-tui --attach`` draws and drives a client that runs elsewhere (``jvpn-tui
--headless``, a service) the way it draws its own engine: :class:`RemoteEngine`
implements :class:`tunnel.api.EngineHandle`. It holds two connections, so that a
command's reply never races the event stream:

* the **watch** connection (``watch`` with snapshots and history) feeds a
  :class:`RemoteChannel`: the session-changing events the client remembers first, then
  every event and snapshot as the client publishes them. When the server reports a
  ``loss`` (this reader fell behind), a new watch replaces the old one and its history is
  what the UI rebuilds its timeline from (``UiBatch.lost``, as after a local overflow).
* the **command** connection carries the UI's :class:`~tunnel.api.CommandQueue`: each
  command becomes a protocol ``command`` and waits for its ``result``. A refusal becomes a
  DIAGNOSTIC event of :data:`ATTACH_NODE` (the UI's timeline shows it; the UI notifies it).

Stopping a RemoteEngine *detaches*: both connections close and the client runs on, its
tunnel up; only a ``terminate`` command ends the remote session. The stream ends when
the client ends (its final snapshot, ``running`` false, says why) or when it goes away
without one (killed): :attr:`RemoteEngine.went_away` then says so.

This module imports only ``tunnel.api`` and ``tunnel.control``, so the UI may use it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from tunnel.api import (
    HISTORY_SIZE,
    SESSION_EVENT_TYPES,
    UI_QUEUE_SIZE,
    Command,
    CommandQueue,
    EngineSnapshot,
    EventType,
    ExtensionCommand,
    ForceReattach,
    Reason,
    ReloadPolicy,
    SetAutoSwitch,
    SwitchTo,
    Terminate,
    UiBatch,
    UiChannel,
)  # fmt: skip
from tunnel.control import protocol
from tunnel.control.protocol import (
    MAX_LINE,
    PROTOCOL_VERSION,
    ControlError,
    Error,
    EventMsg,
    Hello,
    Loss,
    Message,
    Request,
    Result,
    SnapshotMsg,
    Watch,
    client_status,
    decode_reply,
    encode,
)  # fmt: skip

__all__ = ["ATTACH_NODE", "CONNECT_TIMEOUT", "RemoteChannel", "RemoteEngine", "to_request"]

ATTACH_NODE: Final = "jvpn-tui"
"""``node_id`` of the DIAGNOSTIC events the attached UI makes itself (a refused command)."""

CONNECT_TIMEOUT: Final = 5.0
"""Seconds to wait for a connection and the server's hello."""

COMMAND_POLL_S: Final = 0.05
"""How often the UI's command queue is looked at (the engine's own period)."""


def to_request(command: Command) -> protocol.Command | None:
    """The protocol command for a UI command; None for one the protocol cannot carry
    (an :class:`~tunnel.api.ExtensionCommand`: the demo's keys)."""
    if isinstance(command, SwitchTo):
        return protocol.Command(command="switch", path=command.path_id)
    if isinstance(command, SetAutoSwitch):
        return protocol.Command(command="auto", on=command.enabled)
    names: dict[type[Any], str] = {
        ForceReattach: "reattach", ReloadPolicy: "reload_policy", Terminate: "terminate",
    }  # fmt: skip
    name = names.get(type(command))
    return None if name is None else protocol.Command(command=name)


def _connect_error(path: Path, exc: OSError) -> ControlError:
    if isinstance(exc, FileNotFoundError):
        return ControlError(
            f"no control socket at {path}: is the client running? (start it with "
            "jvpn-tui --headless, or name its socket: --attach SOCKET)"
        )
    if isinstance(exc, PermissionError):
        return ControlError(
            f"permission denied on {path}: a client's control socket is for its owner only "
            "(run as root, or as the user that started the client)"
        )
    if isinstance(exc, ConnectionRefusedError):
        if path.exists() and not path.is_socket():
            return ControlError(f"{path} is not a socket (name the client's control socket)")
        return ControlError(f"nobody listens on {path} (a stale socket: the client ended)")
    return ControlError(f"cannot connect to {path}: {exc.strerror or exc}")


def _describe(message: Message) -> str:
    return message.error if isinstance(message, Error) else f"a {type(message).__name__}"


class _Line:
    """One control connection: a blocking reader that another thread can end (:meth:`shutdown`)."""

    def __init__(self, path: Path, timeout: float) -> None:
        self._path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._buffer = bytearray()
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(str(path))
            hello = self.read()
        except OSError as exc:
            self._sock.close()
            raise _connect_error(path, exc) from None
        except ControlError:
            self._sock.close()
            raise
        if not isinstance(hello, Hello) or hello.protocol != PROTOCOL_VERSION:
            self._sock.close()
            raise ControlError(f"{path}: {_refusal(hello)}")
        self._sock.settimeout(None)  # from now on, shutdown() is what ends a read
        self.hello: Final = hello

    def send(self, request: Request) -> None:
        try:
            self._sock.sendall(encode(request))
        except OSError as exc:
            raise ControlError(f"{self._path}: the client went away ({exc.strerror})") from None

    def read(self) -> Message:
        """The next message (ControlError at the end of the stream)."""
        while (end := self._buffer.find(b"\n")) < 0:
            if len(self._buffer) > MAX_LINE:
                raise ControlError(f"{self._path}: a message longer than {MAX_LINE} bytes")
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                raise ControlError(f"{self._path}: no answer from the client in time") from None
            except OSError as exc:
                raise ControlError(f"{self._path}: {exc.strerror or exc}") from None
            if not chunk:
                raise ControlError(f"{self._path}: the connection closed")
            self._buffer += chunk
        line = bytes(self._buffer[: end + 1])
        del self._buffer[: end + 1]
        return decode_reply(line)

    def shutdown(self) -> None:
        """End a read blocked in another thread (it raises ControlError)."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._sock.close()


def _refusal(first: Message) -> str:
    """Why the first message of a connection is not a usable hello."""
    if isinstance(first, Hello):
        return (
            f"the client speaks control protocol {first.protocol}, this program "
            f"{PROTOCOL_VERSION} (jvpn {first.version} there)"
        )
    return f"the server did not say hello: {_describe(first)}"


class RemoteChannel(UiChannel):
    """A :class:`~tunnel.api.UiChannel` that also reports what the watch connection lost.

    Besides its own overflow (the UI stalled), messages can be lost between the client and
    this process (the server says ``loss``). :meth:`resync` then replaces the history the
    UI rebuilds from with the client's own. After either loss, :meth:`take` hands over the
    history kept here: the client's remembered events, then the session-changing ones
    published since. Only :meth:`take` (the UI's way) reports these losses.
    """

    def __init__(self, maxsize: int = UI_QUEUE_SIZE, history: int = HISTORY_SIZE) -> None:
        super().__init__(maxsize, history)
        self._sync = threading.Lock()
        self._ring: deque[Mapping[str, object]] = deque(maxlen=history)
        self._gap = 0
        self.remote_lost = 0
        """Messages the watch connection lost on the server's side, in total."""

    def publish_event(self, event: Mapping[str, object]) -> None:
        with self._sync:
            super().publish_event(event)
            if event.get("event_type") in SESSION_EVENT_TYPES:
                self._ring.append(event)

    def resync(self, lost: int, history: Sequence[Mapping[str, object]]) -> None:
        """The watch lost ``lost`` messages; ``history`` is what the client remembers now."""
        with self._sync:
            stale = super().take()  # it predates ``history``, which holds what mattered of it
            self._ring.clear()
            self._ring.extend(history)
            self._gap += lost + stale.lost
            self.remote_lost += lost

    def take(self) -> UiBatch:
        with self._sync:
            batch = super().take()
            gap, self._gap = self._gap, 0
            if not (gap or batch.lost):
                return batch
            return UiBatch(batch.events, batch.snapshot, batch.lost + gap, tuple(self._ring))


class RemoteEngine:
    """A running client engine seen through its control socket (see the module docstring).

    Constructing one connects (the command connection) and checks that a client answers
    at ``path``: a :class:`~tunnel.control.protocol.ControlError` with a one-line message
    otherwise. :meth:`start` opens the watch; :meth:`stop` detaches.
    """

    def __init__(
        self,
        path: Path,
        *,
        channel: RemoteChannel | None = None,
        timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self.path: Final = path
        """The client's control socket."""
        self._timeout = timeout
        self._commands_line = _Line(path, timeout)
        self.hello: Final = self._commands_line.hello
        """The client's hello (its jvpn version and pid)."""
        if self.hello.role != "client":
            self._commands_line.close()
            raise ControlError(
                f"{path} is a {self.hello.role}'s control socket; --attach needs a client's"
            )
        self.channel: RemoteChannel = channel if channel is not None else RemoteChannel()
        self.commands: CommandQueue = CommandQueue()
        self.attached_ms: Final = int(time.time() * 1000)
        """Wall-clock ms when this UI attached: the client's events from before are its
        history (see :meth:`before_attach`)."""
        self.went_away: str | None = None
        """Set when the stream ended without the client's final snapshot (it was killed,
        or the watch could not be opened): what the UI says."""
        self.final: EngineSnapshot | None = None
        """The client's final snapshot (``running`` false), once it ended."""
        self._last: EngineSnapshot | None = None
        self._watch_line: _Line | None = None
        self._lines = threading.Lock()
        self._detached = threading.Event()
        self._closing = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="attach-watch", daemon=True)
        self._sender = threading.Thread(
            target=self._forward_commands, name="attach-commands", daemon=True
        )

    # -- EngineHandle -----------------------------------------------------------------------

    def start(self) -> None:
        """Open the watch and start forwarding commands (two threads); returns at once."""
        self._watcher.start()
        self._sender.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Detach: close both connections. The client and its session run on. Idempotent."""
        self._detached.set()
        self._closing.set()
        with self._lines:
            lines = [line for line in (self._watch_line, self._commands_line) if line]
        for line in lines:
            line.shutdown()
        for thread in (self._watcher, self._sender):
            if thread.ident is not None:
                thread.join(timeout)
        for line in lines:
            line.close()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the stream to end (the client ended, went away, or we detached)."""
        if self._watcher.ident is None:
            return self._detached.is_set()
        self._watcher.join(timeout)
        return not self._watcher.is_alive()

    def before_attach(self, event: Mapping[str, object]) -> bool:
        """``event`` happened before this UI attached (the client's remembered history):
        the UI draws it but does not notify it as news."""
        ts = event.get("ts_ms")
        return isinstance(ts, int) and ts < self.attached_ms

    # -- the watch ----------------------------------------------------------------------------

    def _watch(self) -> None:
        try:
            self._follow()
        except ControlError as exc:
            if not self._detached.is_set() and self.final is None:
                seen = self._last is not None
                self.went_away = f"the client at {self.path} went away" if seen else str(exc)
        finally:
            self._closing.set()
            with self._lines:
                line, self._watch_line = self._watch_line, None
            if line is not None:
                line.close()

    def _follow(self) -> None:
        line, history, snapshot = self._open_watch()
        for event in history:
            self.channel.publish_event(event)
        self._publish(snapshot)
        while self.final is None:
            message = line.read()
            if isinstance(message, EventMsg):
                self.channel.publish_event(message.event)
            elif isinstance(message, SnapshotMsg):
                self._publish(client_status(message.status))
            elif isinstance(message, Loss):
                line, history, snapshot = self._open_watch()
                self.channel.resync(message.lost, history)
                self._publish(snapshot)
            elif isinstance(message, Error):
                raise ControlError(f"{self.path}: {message.error}")

    def _open_watch(self) -> tuple[_Line, list[dict[str, Any]], EngineSnapshot]:
        """A new watch (replacing the current one): its history, up to its first snapshot."""
        line = _Line(self.path, self._timeout)
        with self._lines:
            if self._detached.is_set():
                line.close()
                raise ControlError("detached")
            old, self._watch_line = self._watch_line, line
        if old is not None:
            old.close()
        line.send(Watch(snapshots=True, history=True))
        history: list[dict[str, Any]] = []
        while True:  # the server sends the history, then one snapshot, then the stream
            message = line.read()
            if isinstance(message, EventMsg):
                history.append(message.event)
            elif isinstance(message, SnapshotMsg):
                return line, history, client_status(message.status)
            elif isinstance(message, Error):
                raise ControlError(f"{self.path}: {message.error}")

    def _publish(self, snapshot: EngineSnapshot) -> None:
        self._last = snapshot
        self.channel.publish_snapshot(snapshot)
        if not snapshot.running:
            self.final = snapshot

    # -- commands ------------------------------------------------------------------------------

    def _forward_commands(self) -> None:
        while not self._closing.wait(COMMAND_POLL_S):
            for command in self.commands.take_all():
                if not self._forward(command):
                    return

    def _forward(self, command: Command) -> bool:
        """Send one command and read its result; False once the connection is gone."""
        request = to_request(command)
        if request is None:
            assert isinstance(command, ExtensionCommand)
            self._note(
                f"{type(command).__name__} cannot reach an attached client: its control "
                "socket takes switch, auto, reattach, reload_policy and terminate",
                Reason.INVALID_TRANSPORT_CANDIDATE,
            )
            return True
        try:
            self._commands_line.send(request)
            reply = self._commands_line.read()
        except ControlError:
            return False  # detaching, or the client went away (the watch says which)
        if not (isinstance(reply, Result) and reply.ok):
            detail = reply.detail if isinstance(reply, Result) else _describe(reply)
            self._note(f"{request.command}: refused by the client: {detail}",
                       Reason.UNEXPECTED_RESPONSE)  # fmt: skip
        return True

    def _note(self, detail: str, reason: Reason) -> None:
        """A DIAGNOSTIC event of this UI's own (the timeline shows it, the UI notifies it)."""
        last = self._last
        session = last.session if last is not None else None
        self.channel.publish_event({
            "event_type": str(EventType.DIAGNOSTIC),
            "ts_ms": int(time.time() * 1000),
            "session_id": session.session_id if session else "",
            "node_id": ATTACH_NODE,
            "policy_version": session.policy_version if session else "",
            "state_version": session.state_version if session else 0,
            "reason_code": str(reason),
            "detail": detail,
            "state": session.state if session else "",
        })  # fmt: skip
