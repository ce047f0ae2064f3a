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
    "COMMANDS", "MAX_LINE", "PROTOCOL_VERSION", "Command", "ControlClosed", "ControlError",
    "Error",
    "EventMsg", "GatewayPathStatus", "GatewaySessionStatus", "GatewayStatus", "GatewayTraffic",
    "GatewayWorkerStatus", "Hello", "Loss", "Message", "Request", "Result", "SnapshotMsg",
    "Status", "StatusReply",
    "Watch", "client_status", "decode_reply", "decode_request", "default_socket", "encode",
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


class ControlClosed(ControlError):
    """The server closed the connection (the program stopped, or it ended the watch)."""


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
    """One source address a gateway session has validated (or is bound to)."""

    address: str
    """``host:port`` (``[v6]:port``) the client's datagrams come from."""
    active: bool
    """This is the binding: replies go here."""
    validated: bool
    """The address answered a path challenge (only validated addresses carry data)."""
    validated_s: float | None = None
    """Seconds since it was (last) validated; None if it is not validated."""


class GatewaySessionStatus(msgspec.Struct):
    """One session as the gateway sees it. No keys.

    Traffic is counted in inner packets (IPv4 and IPv6), per client, since the session was
    created: ``rx`` from the client into the gateway's inner side, ``tx`` from the inner
    side towards the client (counted when read from the inner side, also while the
    packets wait for a binding). Drops are counted gateway-wide (:class:`GatewayStatus`):
    most happen before a datagram can be tied to a session."""

    session_id: str
    """Hex session id (``jvpn terminate`` takes it, or a unique prefix)."""
    client: str
    """The client's name from ``[[clients]]``."""
    inner_address: str
    """The client's inner (tunnel) IPv4 address."""
    state: str
    """The gateway's state of the session (ATTACHED, RECOVERING, TERMINATED...)."""
    state_version: int
    """Monotonic version of that state."""
    binding_epoch: int
    """Bumped by every committed reattach or rebinding."""
    key_phase: int
    """Current key phase (bumped by every rekey)."""
    owner: str
    """Owner node in the session store (empty when the store holds no record)."""
    policy_version: str
    """Version of the policy the session runs under."""
    active_path: int | None
    """The client's path id of the binding; None while the session has no binding."""
    paths: tuple[GatewayPathStatus, ...]
    """Every validated address and the binding, the binding first."""
    rx_packets: int
    rx_bytes: int
    tx_packets: int
    tx_bytes: int
    last_seen_s: float
    """Seconds since the last authenticated datagram on the binding."""
    age_s: float
    """Seconds since the session was created."""
    total_switches: int
    """Committed transport switches (reattaches to another address)."""
    security_failures: int
    """Recent security failures (bad proofs, stale requests), reset after a quiet period."""
    queued: int
    """Inner packets waiting for a binding."""
    end_reason: str | None = None
    """Why it ended (TERMINATED sessions stay listed briefly, to answer late datagrams)."""
    inner_address6: str = ""
    """The client's inner IPv6 address; empty when the tunnel carries no IPv6 for it."""
    cipher: str = ""
    """The data cipher negotiated in the handshake (``aes-256-gcm``, ``chacha20-poly1305``)."""
    worker: int | None = None
    """The worker process that holds the session (a gateway with ``workers`` > 1: its
    supervisor's combined status); None from one gateway process."""


class GatewayTraffic(msgspec.Struct):
    """Gateway-wide datagram and inner packet counters since start."""

    datagrams_in: int = 0
    datagrams_out: int = 0
    send_failed: int = 0
    """Datagrams the kernel refused to send."""
    inner_to_clients: int = 0
    """Inner packets read from the inner side (TUN)."""
    inner_from_clients: int = 0
    """Inner packets written to the inner side."""


class GatewayWorkerStatus(msgspec.Struct):
    """One worker process of a gateway with ``workers`` > 1 (docs/gateway.md "Workers")."""

    index: int
    node_id: str
    """The worker's node id (``NODE-wK``)."""
    pid: int
    """0 while it is not running (it died and is being started again)."""
    ok: bool
    """It answered this status: its sessions are listed."""
    sessions: int = 0
    """Its live sessions."""
    problem: str = ""
    """Why it did not answer (``not running``, ``no answer in 2s``, ...): its sessions are
    missing from this status."""


class GatewayStatus(msgspec.Struct):
    """What a gateway says about itself."""

    node_id: str
    listen: tuple[str, ...]
    """Bound UDP listen addresses."""
    policy_version: str
    """The last valid policy's version (what running sessions use)."""
    uptime_s: float
    sessions: tuple[GatewaySessionStatus, ...]
    """Every session the gateway holds, ended ones included until they are forgotten."""
    policy_ok: bool = True
    """False after an invalid policy: new sessions are denied until a valid one."""
    policy_error: str | None = None
    sessions_created: int = 0
    sessions_denied: int = 0
    """Handshakes denied: no valid policy, or no data cipher in common."""
    handshakes_refused: int = 0
    """Handshakes dropped without an answer: unknown client key, or for another gateway
    key (``drops`` has them by reason)."""
    drops: tuple[tuple[str, int], ...] = ()
    """(drop reason, count) since start, by reason name (docs/gateway.md, metrics)."""
    traffic: GatewayTraffic = msgspec.field(default_factory=GatewayTraffic)
    events_dropped: int = 0
    """Events lost in the core's bounded event queue."""
    store_conflicts: int = 0
    """Ownership-store CAS failures (this node was not authoritative)."""
    observability_ok: bool = True
    """The event sinks' health flag (false while a sink fails or lost events)."""
    ciphers: tuple[str, ...] = ()
    """The data ciphers this gateway allows (``ciphers`` in its configuration)."""
    workers: tuple[GatewayWorkerStatus, ...] = ()
    """Its worker processes (``workers`` > 1; empty for one process): the counters above
    are their sums, ``sessions`` all of theirs."""


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
