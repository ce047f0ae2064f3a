"""The client engine's control socket: what ``jvpn status`` and ``jvpn-tui --attach`` reach.

:class:`EngineControl` adapts a :class:`tunnel.client.engine.ClientEngine` to
:class:`tunnel.control.server.ControlTarget`. Its status is the engine's own
:class:`tunnel.api.EngineSnapshot` (what the embedded UI draws; no secrets); its history
is the session-changing events (:data:`tunnel.api.SESSION_EVENT_TYPES`) it saw, in a ring
as long as the UI channel's; its commands go into the engine's :class:`CommandQueue`,
the one the UI uses, so a command from the socket and a key press in the UI take the
same path and produce the same events.

Where the socket is (:func:`control_socket_for`): ``--control-socket`` on the command
line, else ``control_socket`` in the client config (``"off"``: none), else
:func:`tunnel.control.protocol.default_socket`. A path given explicitly must work (the
engine does not start otherwise); the default path is best effort: when another client
already listens there, this one runs without a socket and says so in one line.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from tunnel.api import (
    HISTORY_SIZE,
    SESSION_EVENT_TYPES,
    EngineSnapshot,
    ForceReattach,
    ReloadPolicy,
    SetAutoSwitch,
    SwitchTo,
    Terminate,
)  # fmt: skip
from tunnel.api import (
    Command as ApiCommand,
)
from tunnel.control.protocol import Command, Result, default_socket

__all__ = ["CONTROL_OFF", "ControlSocket", "EngineControl", "control_socket_for"]

CONTROL_OFF: Final = "off"
"""``control_socket = "off"`` (or ``--control-socket off``): no control socket."""


@dataclass(frozen=True, slots=True)
class ControlSocket:
    """Where the engine listens, and whether failing to is fatal."""

    path: Path
    required: bool
    """True for a path the operator gave: the engine does not start without it."""


def control_socket_for(configured: str | None, override: str | None = None) -> ControlSocket | None:
    """The socket an engine listens on (see the module docstring); None: none."""
    chosen = override if override is not None else configured
    if chosen is None:
        return ControlSocket(default_socket("client"), required=False)
    if chosen == CONTROL_OFF:
        return None
    return ControlSocket(Path(chosen), required=True)


class EngineControl:
    """The client engine as a control target (runs on the engine's loop only)."""

    role: Final = "client"

    def __init__(
        self,
        snapshot: Callable[[], EngineSnapshot],
        send: Callable[[ApiCommand], bool],
        path_ids: Callable[[], Sequence[int]],
    ) -> None:
        """``path_ids``: the session's paths now (they come and go with ``paths = "auto"``)."""
        self._snapshot = snapshot
        self._send = send
        self._path_ids = path_ids
        self._history: deque[Mapping[str, object]] = deque(maxlen=HISTORY_SIZE)

    def remember(self, event: Mapping[str, object]) -> None:
        """Keep a session-changing event for watchers that connect later."""
        if event.get("event_type") in SESSION_EVENT_TYPES:
            self._history.append(event)

    # -- ControlTarget ---------------------------------------------------------------------

    def status(self) -> EngineSnapshot:
        return self._snapshot()

    def history(self) -> Sequence[Mapping[str, object]]:
        return tuple(self._history)

    def command(self, request: Command) -> Result:
        if request.session is not None:
            return Result(ok=False, detail="a client has one session: 'session' is for a gateway")
        try:
            command, detail = self._translate(request)
        except ValueError as exc:
            return Result(ok=False, detail=str(exc))
        if not self._send(command):
            return Result(ok=False, detail="the engine's command queue is full; try again")
        return Result(ok=True, detail=detail)

    def _translate(self, request: Command) -> tuple[ApiCommand, str]:
        name = request.command
        if name == "switch":
            return self._switch(request.path)
        if name == "auto":
            if request.on is None:
                raise ValueError("auto needs 'on': true or false")
            return SetAutoSwitch(request.on), f"automatic switching {'on' if request.on else 'off'}"
        simple: dict[str, tuple[ApiCommand, str]] = {
            "reattach": (ForceReattach(), "reattach on the active path requested"),
            "reload_policy": (ReloadPolicy(), "policy reload requested"),
            "terminate": (Terminate(), "session termination requested"),
        }
        if name not in simple:
            raise ValueError(f"unknown command {name!r} (switch, auto, reattach, "
                             "reload_policy, terminate)")  # fmt: skip
        return simple[name]

    def _switch(self, path: int | None) -> tuple[ApiCommand, str]:
        now = self._path_ids()
        ids = ", ".join(map(str, now))
        if path is None:
            raise ValueError(f"switch needs 'path' (this client's paths: {ids})")
        if path not in now:
            raise ValueError(f"no path {path} (this client's paths: {ids})")
        return SwitchTo(path), f"switch to path {path} requested (the outcome is an event)"
