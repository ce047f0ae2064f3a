"""The gateway's handshake side: who sent an admitted HANDSHAKE_INIT, and may it proceed.

``HandshakeResponder`` owns the gateway's Noise responder, the allow-list of clients and
the newest INIT timestamp per client. ``read`` runs the Noise DH on an INIT the admission
(admission.py) let through, then the client key, payload and timestamp checks (replay and
session fixation, AT-36). It returns an ``Initiation`` (a record) or None after counting
the drop; GatewaySessions (gateway.py) answers it and creates the session. An unknown
client key is reported with its fingerprint (never the key), so the gateway's console can
name it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tunnel.core.drops import Drop
from tunnel.core.endpoint import Reporter
from tunnel.core.events import EventBase, Reason
from tunnel.core.gateway_paths import Addr, addr_label
from tunnel.core.gateway_session import ClientEntry
from tunnel.core.handshake import HandshakeError, PendingHandshake, Responder, fingerprint
from tunnel.core.wire import InitPayload, split_init


@dataclass(frozen=True, slots=True)
class Initiation:
    """An INIT from an allowed client, authenticated and fresh: to be answered."""

    sender_index: int
    pending: PendingHandshake
    client: ClientEntry
    payload: InitPayload


class HandshakeResponder:
    """Noise responder, allowed clients and INIT timestamps (replay/fixation guard)."""

    __slots__ = ("_clients", "_last_init_ts", "_report", "_responder")

    def __init__(
        self, static_private: bytes, clients: Sequence[ClientEntry], report: Reporter
    ) -> None:
        self._responder = Responder(static_private)
        self._clients = {c.public_key: c for c in clients}
        self._last_init_ts: dict[bytes, int] = {}
        self._report = report

    @property
    def clients(self) -> int:
        """Allowed clients."""
        return len(self._clients)

    @property
    def remembered(self) -> int:
        """Client keys whose newest INIT timestamp is kept (each key allowed since the
        start, once it sent an INIT: a removed and re-added client's old INITs stay
        refused)."""
        return len(self._last_init_ts)

    def set_clients(self, clients: Sequence[ClientEntry]) -> None:
        """Replace the allow-list (a reload of the gateway's clients): INITs from keys no
        longer listed are refused as unknown from now on."""
        self._clients = {c.public_key: c for c in clients}

    def read(self, data: bytes, addr: Addr, now: float, base: EventBase) -> Initiation | None:
        """The admitted INIT ``data`` from ``addr``: an ``Initiation``, or None (counted;
        an unknown key or a replayed INIT is reported as a SECURITY_EVENT with ``base``)."""
        sender_index, noise, _, _ = split_init(data)
        try:
            pending = self._responder.read_init(noise)
        except HandshakeError:
            self._report.count_drop(Drop.HANDSHAKE_FAILED)
            return None
        client = self._clients.get(pending.client_static)
        if client is None:
            self._report.count_drop(Drop.UNKNOWN_CLIENT_KEY)
            self._report.security(
                now, base, "UNKNOWN_CLIENT", Reason.UNKNOWN_CLIENT_KEY, source=addr_label(addr),
                key_fingerprint=fingerprint(pending.client_static),
            )  # fmt: skip
            return None
        payload = InitPayload.parse(pending.payload)
        if isinstance(payload, Drop):
            self._report.count_drop(payload)
            return None
        last = self._last_init_ts.get(client.public_key)
        if last is not None and payload.ts_ms <= last:
            # A replayed initiation must not replace the live session (fixation, AT-36).
            self._report.count_drop(Drop.REPLAY)
            self._report.security(
                now, base, "FIXATION_ATTEMPT", Reason.SESSION_FIXATION_ATTEMPT,
                source=addr_label(addr),
            )  # fmt: skip
            return None
        self._last_init_ts[client.public_key] = payload.ts_ms
        return Initiation(sender_index, pending, client, payload)
