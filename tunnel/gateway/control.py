"""The gateway's side of the control socket (docs/control.md): status, history, commands.

:class:`GatewayControl` is the :class:`~tunnel.control.server.ControlTarget` of a
:class:`~tunnel.gateway.runtime.GatewayRuntime`; it runs on the runtime's loop, like the
server, and reads the runtime's components there (no lock, no copy of their state):

- ``status()``: a :class:`~tunnel.control.protocol.GatewayStatus` (node, listen
  addresses, policy, uptime, every session with its paths and counters, gateway-wide
  drops, refusals, traffic and the observability flag);
- ``history()``: the last :data:`HISTORY_SIZE` session-changing events (a bounded ring),
  which a new watcher gets first;
- ``command()``: ``reload_policy`` (the same reload as SIGHUP) and ``terminate`` with a
  ``session`` (its id or a unique prefix of it; the session ends with
  ``operator_terminated`` and the client is told). The client's commands (``switch``,
  ``auto``, ``reattach``) are refused with the reason: a gateway follows its clients.

Per-session inner traffic (IPv4 and IPv6) is counted by :class:`ClientTraffic` as the
runtime moves inner packets (bounded: one entry per configured client).
"""

from __future__ import annotations

import ipaddress
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

from tunnel.control.protocol import (
    Command,
    GatewayPathStatus,
    GatewaySessionStatus,
    GatewayStatus,
    GatewayTraffic,
    Result,
)  # fmt: skip
from tunnel.control.server import ControlServer
from tunnel.core.drops import Drop
from tunnel.core.events import Event, EventType, SessionCreated
from tunnel.core.gateway import ClientEntry, GatewaySession
from tunnel.core.gateway_paths import Addr, addr_label
from tunnel.ownership import StoreUnavailable

if TYPE_CHECKING:
    from tunnel.gateway.runtime import GatewayRuntime

__all__ = [
    "HISTORY_SIZE", "HISTORY_TYPES", "STATUS_INTERVAL_S", "ClientTraffic", "GatewayControl",
    "one_match",
]  # fmt: skip

HISTORY_SIZE: Final = 256
"""Session-changing events remembered for a new watcher (a ring: the oldest goes first)."""

HISTORY_TYPES: Final = frozenset({
    EventType.SESSION_CREATED, EventType.STATE_CHANGE, EventType.TRANSPORT_ATTACHED,
    EventType.TRANSPORT_SWITCH, EventType.TRANSPORT_SWITCH_DENIED, EventType.TRANSPORT_DEAD,
    EventType.REATTACH_ATTEMPT, EventType.REATTACH_RESULT, EventType.SECURITY_EVENT,
    EventType.POLICY_EVENT, EventType.KEY_ROTATED, EventType.SESSION_TERMINATED,
    EventType.SESSION_LINKED,
})  # fmt: skip
"""What the history keeps: session creation and what the client's history ring keeps
(``tunnel.api.SESSION_EVENT_TYPES``, which the gateway does not import)."""

STATUS_INTERVAL_S: Final = 1.0
"""How often a watcher that asked for statuses gets one."""

REFUSED_HANDSHAKES: Final = (Drop.UNKNOWN_CLIENT_KEY, Drop.BAD_MAC)
"""Drops that are handshakes refused without an answer (docs/gateway.md)."""

MIN_SESSION_PREFIX: Final = 4
"""Shortest session id prefix ``terminate`` accepts (hex digits)."""

CLIENT_ONLY: Final = ("switch", "auto", "reattach")


class ClientTraffic:
    """Inner packets and bytes per configured client (its IPv4 and IPv6 inner addresses).

    ``rx``: packets from the client (by inner source address; the gateway drops any other
    source) written to the inner side; ``tx``: packets read from the inner side for it
    (by destination address). Addresses of no configured client are not counted, so the
    table never grows.
    """

    __slots__ = ("_by_inner",)

    def __init__(self, clients: Iterable[ClientEntry]) -> None:
        self._by_inner: dict[bytes, list[int]] = {}
        self.add(clients)

    def add(self, clients: Iterable[ClientEntry]) -> None:
        """Count these clients too (a reload of the clients; known addresses keep theirs)."""
        for c in clients:
            if _packed(c.inner_address) in self._by_inner:
                continue
            row = [0, 0, 0, 0]
            for address in (c.inner_address, c.inner_address6):
                if address:
                    self._by_inner[_packed(address)] = row

    def from_clients(self, packets: Sequence[bytes]) -> None:
        """Packets the sessions delivered to the inner side."""
        table = self._by_inner
        for packet in packets:
            row = table.get(packet[12:16] if packet[0] >> 4 == 4 else packet[8:24])
            if row is not None:
                row[0] += 1
                row[1] += len(packet)

    def to_clients(self, packets: Sequence[bytes]) -> None:
        """Packets read from the inner side (routed to their client's session)."""
        table = self._by_inner
        for packet in packets:
            row = table.get(packet[16:20] if packet[0] >> 4 == 4 else packet[24:40])
            if row is not None:
                row[2] += 1
                row[3] += len(packet)

    def reset(self, inner_address: str) -> None:
        """A new session for this client: its counters start at zero."""
        row = self._by_inner.get(_packed(inner_address))
        if row is not None:
            row[:] = [0, 0, 0, 0]

    def counts(self, inner_address: str) -> tuple[int, int, int, int]:
        """(rx packets, rx bytes, tx packets, tx bytes) of one client (either address)."""
        row = self._by_inner.get(_packed(inner_address))
        return (row[0], row[1], row[2], row[3]) if row is not None else (0, 0, 0, 0)


def _packed(address: str) -> bytes:
    try:
        return ipaddress.ip_address(address).packed
    except ValueError:
        return b""


class GatewayControl:
    """The control socket of one gateway runtime: its server and its target (see the
    module docstring). Lifecycle, driven by the runtime: :meth:`listen` in ``open()``
    (before the host changes), :meth:`start` on the loop, :meth:`close` when serving
    ends, :meth:`discard` in ``close()``."""

    role: Final = "gateway"

    def __init__(self, runtime: GatewayRuntime, path: Path, *, history: int = HISTORY_SIZE) -> None:
        self._runtime = runtime
        self._history: deque[Mapping[str, object]] = deque(maxlen=history)
        self._started = runtime.clock()
        self.traffic: ClientTraffic = ClientTraffic(runtime.clients)
        self.server: ControlServer = ControlServer(path, self)

    @property
    def path(self) -> Path:
        return self.server.path

    def listen(self) -> None:
        """Create the socket (ControlError naming the path if that fails)."""
        self.server.listen()

    async def start(self) -> None:
        await self.server.start()

    async def close(self, flush: float = 0.0) -> None:
        """Stop serving (watchers get up to ``flush`` seconds to read what is queued)."""
        await self.server.close(flush)

    def discard(self) -> None:
        self.server.discard()

    # -- ControlTarget -------------------------------------------------------------------

    def status(self) -> GatewayStatus:
        rt = self._runtime
        now = rt.clock()
        health = rt.health()
        drops = rt.gateway.drops
        tally = rt.metrics.tally
        t = rt.traffic
        return GatewayStatus(
            node_id=rt.node_id,
            listen=tuple(addr_label(a) for a in rt.addresses),
            policy_version=health.policy_version, uptime_s=now - self._started,
            sessions=tuple(self._session(s, now) for s in rt.gateway.sessions.values()),
            policy_ok=health.policy_ok, policy_error=health.policy_error,
            sessions_created=tally.sessions_created, sessions_denied=tally.sessions_denied,
            handshakes_refused=sum(drops.get(str(d), 0) for d in REFUSED_HANDSHAKES),
            drops=tuple(sorted(drops.items())),
            traffic=GatewayTraffic(
                datagrams_in=t.datagrams_in, datagrams_out=t.datagrams_out,
                send_failed=t.send_failed, inner_to_clients=t.inner_in,
                inner_from_clients=t.inner_out,
            ),
            events_dropped=rt.gateway.events_dropped, store_conflicts=rt.ownership.conflicts,
            observability_ok=health.observability_ok,
            ciphers=tuple(c.label for c in rt.gateway.ciphers),
        )  # fmt: skip

    def history(self) -> Sequence[Mapping[str, object]]:
        return tuple(self._history)

    def command(self, request: Command) -> Result:
        name = request.command
        if name == "reload_policy":
            return self._reload()
        if name == "terminate":
            return self._terminate(request.session)
        if name in CLIENT_ONLY:
            return Result(
                ok=False,
                detail=f"{name} is a client command: a gateway follows its clients' choice "
                "(run it against the client's control socket)",
            )
        return Result(ok=False, detail=f"unknown command {name!r} (a gateway takes "
                      "reload_policy and terminate with a session)")  # fmt: skip

    # -- the runtime's hooks (loop thread) -------------------------------------------------

    def on_event(self, event: Event) -> None:
        """Every event the runtime delivers: remembered when it changes a session,
        streamed to the watchers."""
        if isinstance(event, SessionCreated):
            self.traffic.reset(event.inner_address)
        keep = event.event_type in HISTORY_TYPES
        if not keep and not self.server.watchers:
            return
        mapping = event.to_dict()
        if keep:
            self._history.append(mapping)
        self.server.publish_event(mapping)

    def publish_status(self) -> None:
        """A status for the watchers that asked for them (none built for nobody)."""
        if self.server.status_watchers:
            self.server.publish_status(self.status())

    # -- parts ---------------------------------------------------------------------------

    def _session(self, s: GatewaySession, now: float) -> GatewaySessionStatus:
        machine = s.machine
        rx_p, rx_b, tx_p, tx_b = self.traffic.counts(s.client.inner_address)
        return GatewaySessionStatus(
            session_id=machine.session_id, client=s.client.name,
            inner_address=s.client.inner_address, inner_address6=s.client.inner_address6,
            state=str(machine.state),
            state_version=machine.version, binding_epoch=s.epoch, key_phase=s.cipher.phase,
            owner=self._owner(machine.session_id), policy_version=machine.policy_version,
            active_path=s.binding_path if s.binding is not None else None,
            paths=_paths(s.binding, s.validated, now),
            rx_packets=rx_p, rx_bytes=rx_b, tx_packets=tx_p, tx_bytes=tx_b,
            last_seen_s=max(0.0, now - s.last_inbound), age_s=max(0.0, now - s.born),
            total_switches=s.total_switches, security_failures=s.security_failures,
            queued=len(s.queue),
            end_reason=str(s.end_reason) if s.end_reason is not None else None,
            cipher=s.cipher.suite.label,
        )  # fmt: skip

    def _owner(self, session_id: str) -> str:
        try:
            record = self._runtime.ownership.store.get(session_id)
        except StoreUnavailable:
            return "?"
        return record.owner_node if record is not None else ""

    def _reload(self) -> Result:
        """As SIGHUP: the policy file, then the clients_dir files (their line follows)."""
        rt = self._runtime
        rt.reload_policy_guarded()
        clients = rt.clients_reload
        more = f"; {clients.status}" if clients.reloadable else ""
        if rt.policy.path is None:
            detail = "no policy file: the built-in defaults stay"
            return Result(ok=clients.ok, detail=detail + more)
        if rt.policy.ok:
            detail = f"policy {rt.policy.last_valid_version} applied"
            return Result(ok=clients.ok, detail=detail + more)
        return Result(
            ok=False,
            detail=f"invalid policy, new sessions are denied until it is fixed (running "
            f"sessions keep {rt.policy.last_valid_version}): {rt.policy.error}{more}",
        )

    def _terminate(self, session: str | None) -> Result:
        if not session:
            return Result(
                ok=False,
                detail="terminate on a gateway needs a session id (jvpn terminate SESSION; "
                "jvpn status lists them); stop the gateway itself with SIGTERM",
            )
        live = [
            s.machine.session_id
            for s in self._runtime.gateway.sessions.values()
            if not s.machine.terminated
        ]
        match = one_match(session.lower(), live)
        if isinstance(match, Result):
            return match
        if not self._runtime.terminate_session(match):
            return Result(ok=False, detail=f"session {match} ended meanwhile")
        return Result(ok=True, detail=f"session {match} terminated (operator_terminated)")


def one_match(prefix: str, live: Sequence[str]) -> str | Result:
    """The one live session id ``prefix`` names, or the refusal saying why not."""
    if len(prefix) < MIN_SESSION_PREFIX:
        return Result(ok=False, detail=f"session id {prefix!r} is too short: give at least "
                      f"{MIN_SESSION_PREFIX} hex digits")  # fmt: skip
    found = [sid for sid in live if sid.startswith(prefix)]
    if not found:
        return Result(ok=False, detail=f"no live session {prefix!r} (jvpn status lists them)")
    if len(found) > 1:
        return Result(ok=False, detail=f"session id {prefix!r} is ambiguous: "
                      + ", ".join(sorted(found)))  # fmt: skip
    return found[0]


def _paths(
    binding: Addr | None, validated: Mapping[Addr, float], now: float
) -> tuple[GatewayPathStatus, ...]:
    """The binding first, then the other validated addresses, newest validation first."""
    out: list[GatewayPathStatus] = []
    if binding is not None:
        at = validated.get(binding)
        out.append(
            GatewayPathStatus(
                address=addr_label(binding), active=True, validated=at is not None,
                validated_s=max(0.0, now - at) if at is not None else None,
            )
        )  # fmt: skip
    others = sorted(((t, a) for a, t in validated.items() if a != binding), reverse=True,
                    key=lambda x: x[0])  # fmt: skip
    for at, addr in others:
        out.append(
            GatewayPathStatus(
                address=addr_label(addr), active=False, validated=True,
                validated_s=max(0.0, now - at),
            )
        )  # fmt: skip
    return tuple(out)
