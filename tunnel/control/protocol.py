"""The control socket's protocol: JSON lines over a unix stream socket.

A running client engine or gateway listens on a unix socket (mode 0600 in a 0700
directory by default, so only its user, normally root, can use it). Every message, in
both directions, is one JSON object on one line (UTF-8, at most :data:`MAX_LINE` bytes),
tagged by its ``"type"`` field. Messages are msgspec structs: decoding validates every
field, so a malformed request gets one :class:`Error` line naming what is wrong
(``Expected `int`, got `str` - at `$.path```) and the connection stays usable.

A conversation::

    server: {"type":"hello","protocol":1,"role":"client","version":"0.6.0","pid":4242}
    peer:   {"type":"status"}
    server: {"type":"status_reply","role":"client","status":{...}}
    peer:   {"type":"command","command":"switch","path":2}
    server: {"type":"result","ok":true,"detail":"switch to path 2 requested"}
    peer:   {"type":"watch","snapshots":true}
    server: {"type":"event","event":{...}}  ... {"type":"snapshot","snapshot":{...}} ...

``status`` of a client is its :class:`tunnel.api.EngineSnapshot` (the same value the
embedded UI draws, no secrets); of a gateway, :class:`GatewayStatus`. ``watch`` first
replays the session-changing events the server remembers (``history``), then streams
every event as it happens and, with ``snapshots``, every published status. A watcher
that reads too slowly never slows the server: its bounded queue drops the oldest
messages and the next message it gets is a :class:`Loss` with the count.

Commands (:data:`COMMANDS`) are the ones the TUI has. A refused command answers
``ok: false`` with the reason; an accepted one says what was asked (the outcome arrives
as events, exactly as in the UI: a switch may still be denied by the session).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal

import msgspec

from tunnel.api import EngineSnapshot

__all__ = [
    "COMMANDS", "MAX_LINE", "PROTOCOL_VERSION", "Command", "ControlError", "Error",
    "EventMsg", "GatewayPathStatus", "GatewaySessionStatus", "GatewayStatus", "Hello",
    "Loss", "Message", "Request", "Result", "SnapshotMsg", "Status", "StatusReply", "Watch",
    "client_status", "decode_reply", "decode_request", "default_socket", "encode",
    "gateway_status", "raw", "to_builtins",
]  # fmt: skip

PROTOCOL_VERSION: Final = 1
"""Bumped when a message changes incompatibly; a peer refuses another version."""

MAX_LINE: Final = 1 << 20
"""Longest line either side accepts (bytes); a longer one ends the connection."""

COMMANDS: Final = ("switch", "auto", "reattach", "reload_policy", "terminate")
"""Command names: ``switch`` (needs ``path``), ``auto`` (needs ``on``), ``reattach``,
``reload_policy``, ``terminate`` (a gateway takes ``session`` with it: one session)."""

Role = Literal["client", "gateway"]


class ControlError(Exception):
    """The control socket cannot be used: no server, wrong protocol, bad path, refused."""


# -- requests (peer -> server) ---------------------------------------------------------


class Status(msgspec.Struct, tag="status", forbid_unknown_fields=True):
    """Ask for one status."""


class Watch(msgspec.Struct, tag="watch", forbid_unknown_fields=True):
    """Stream events (after the remembered history) and, with ``snapshots``, statuses."""

    snapshots: bool = False
    history: bool = True


class Command(msgspec.Struct, tag="command", forbid_unknown_fields=True):
    """One of :data:`COMMANDS`."""

    command: str
    path: int | None = None
    on: bool | None = None
    session: str | None = None


Request = Status | Watch | Command


# -- replies and stream messages (server -> peer) -----------------------------------------


class Hello(msgspec.Struct, tag="hello"):
    """First line from the server."""

    protocol: int
    role: str
    version: str
    pid: int


class GatewayPathStatus(msgspec.Struct):
    """One validated address of a gateway session."""

    address: str
    active: bool
    validated: bool


class GatewaySessionStatus(msgspec.Struct):
    """One session as the gateway sees it. No keys."""

    session_id: str
    client: str
    inner_address: str
    state: str
    state_version: int
    binding_epoch: int
    key_phase: int
    owner: str
    paths: tuple[GatewayPathStatus, ...]
    rx_packets: int
    tx_packets: int
    rx_bytes: int
    tx_bytes: int
    last_seen_s: float
    drops: tuple[tuple[str, int], ...] = ()


class GatewayStatus(msgspec.Struct):
    """What a gateway says about itself."""

    node_id: str
    listen: tuple[str, ...]
    policy_version: str
    uptime_s: float
    sessions: tuple[GatewaySessionStatus, ...]
    handshakes_refused: int = 0
    drops: tuple[tuple[str, int], ...] = ()
    observability_ok: bool = True


class StatusReply(msgspec.Struct, tag="status_reply"):
    """The answer to :class:`Status`: ``status`` is an EngineSnapshot or a GatewayStatus,
    as ``role`` says (decoded by :func:`client_status` / :func:`gateway_status`)."""

    role: str
    status: msgspec.Raw


class Result(msgspec.Struct, tag="result"):
    """The answer to :class:`Command`."""

    ok: bool
    detail: str


class Error(msgspec.Struct, tag="error"):
    """A request the server could not read or does not know."""

    error: str


class EventMsg(msgspec.Struct, tag="event"):
    """One event, as its ``to_dict()`` mapping (docs/events.md)."""

    event: dict[str, Any]


class SnapshotMsg(msgspec.Struct, tag="snapshot"):
    """One published status (same shape as :attr:`StatusReply.status`)."""

    status: msgspec.Raw


class Loss(msgspec.Struct, tag="loss"):
    """This watcher lost ``lost`` messages (it read too slowly)."""

    lost: int


Message = Hello | StatusReply | Result | Error | EventMsg | SnapshotMsg | Loss

_ENCODER: Final = msgspec.json.Encoder()
_REQUESTS: Final = msgspec.json.Decoder(Request)
_MESSAGES: Final = msgspec.json.Decoder(Message)
_SNAPSHOT: Final = msgspec.json.Decoder(EngineSnapshot)
_GATEWAY: Final = msgspec.json.Decoder(GatewayStatus)


def encode(message: msgspec.Struct | Mapping[str, object]) -> bytes:
    """One message as its line (newline included)."""
    return _ENCODER.encode(message) + b"\n"


def raw(value: object) -> msgspec.Raw:
    """``value`` (a snapshot, a GatewayStatus) encoded once, to embed in messages."""
    return msgspec.Raw(_ENCODER.encode(value))


def decode_request(line: bytes) -> Request:
    """A request line; raises :class:`ControlError` saying what is wrong with it."""
    try:
        return _REQUESTS.decode(line)
    except msgspec.DecodeError as exc:
        raise ControlError(f"bad request: {exc}") from None


def decode_reply(line: bytes) -> Message:
    """A server line; raises :class:`ControlError` saying what is wrong with it."""
    try:
        return _MESSAGES.decode(line)
    except msgspec.DecodeError as exc:
        raise ControlError(f"bad message from the server: {exc}") from None


def client_status(status: msgspec.Raw) -> EngineSnapshot:
    """A client's status (or watched snapshot) as the UI's snapshot type."""
    try:
        return _SNAPSHOT.decode(status)
    except msgspec.DecodeError as exc:
        raise ControlError(f"bad client status: {exc}") from None


def gateway_status(status: msgspec.Raw) -> GatewayStatus:
    """A gateway's status."""
    try:
        return _GATEWAY.decode(status)
    except msgspec.DecodeError as exc:
        raise ControlError(f"bad gateway status: {exc}") from None


def to_builtins(value: object) -> Any:
    """``value`` as plain JSON-able Python (for ``jvpn status --json``)."""
    return msgspec.to_builtins(value)


def default_socket(role: str, environ: Mapping[str, str] | None = None) -> Path:
    """Where a ``role`` (``client`` or ``gateway``) listens unless configured otherwise.

    root: ``/run/jvpn/<role>.sock``; anyone else: ``$XDG_RUNTIME_DIR/jvpn/<role>.sock``,
    or ``/tmp/jvpn-<uid>/<role>.sock`` without XDG_RUNTIME_DIR.
    """
    env = os.environ if environ is None else environ
    if os.geteuid() == 0:
        base = Path("/run/jvpn")
    elif env.get("XDG_RUNTIME_DIR"):
        base = Path(env["XDG_RUNTIME_DIR"]) / "jvpn"
    else:
        base = Path(f"/tmp/jvpn-{os.geteuid()}")
    return base / f"{role}.sock"
