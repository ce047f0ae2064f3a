"""Reloading the gateway's clients from its ``clients_dir`` (docs/gateway.md).

:class:`ClientsReloader` is the component the :class:`~tunnel.gateway.runtime.GatewayRuntime`
owns for it. At start it reports the files the configuration load skipped; on SIGHUP (and
the control socket's ``reload``) it reads the directory again
(:func:`tunnel.gateway.config.load_clients`) and installs the result in the core:

- a bad file is skipped and reported with its name: a POLICY_EVENT ``CLIENT_FILE_INVALID``
  (``policy_invalid``, the problem in ``detail``), which the gateway's console prints as
  one line; the other files load;
- clients that stay keep their inner addresses (pool addresses included): a reload never
  moves a client, so it never hands a live session's address to another one;
- a client removed from the directory, or whose key or address changed, loses its
  session at the reload: ended with ``operator_terminated`` (TERMINATE sent), as if the
  operator had terminated it; a changed client reconnects with its new entry;
- a summary POLICY_EVENT ``CLIENTS_RELOADED`` (``policy_applied``) says how many clients
  are allowed, added, removed and changed, and how many files were skipped.

A directory that cannot be read keeps the current clients (``CLIENT_FILE_INVALID`` names
it). Without ``clients_dir`` a reload changes nothing here (inline [[clients]] are read
at start only).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from tunnel.core.events import EventBase, PolicyEvent, Reason
from tunnel.core.gateway import ClientEntry, GatewaySessions
from tunnel.gateway.config import ClientFileCache, ConfigError, GatewayConfig, load_clients

CLIENT_FILE_INVALID: Final = "CLIENT_FILE_INVALID"
"""``policy_name`` of the POLICY_EVENT for a skipped client file (or unreadable dir)."""
CLIENTS_RELOADED: Final = "CLIENTS_RELOADED"
"""``policy_name`` of the POLICY_EVENT that sums up a reload of the clients."""
REMOVED_CLIENT_REASON: Final = Reason.OPERATOR_TERMINATED
"""How the session of a client removed (or changed) by a reload ends."""


def _same(session_client: ClientEntry, entry: ClientEntry | None) -> bool:
    """``entry`` still allows the session made for ``session_client`` unchanged (the
    session's IPv6 address is empty when the gateway does not route IPv6)."""
    if entry is None:
        return False
    six = not session_client.inner_address6 or session_client.inner_address6 == entry.inner_address6
    return (
        session_client.name == entry.name
        and session_client.public_key == entry.public_key
        and session_client.inner_address == entry.inner_address
        and six
    )


class ClientsReloader:
    """The allowed clients of one gateway and their reloads (module docstring)."""

    def __init__(
        self,
        gateway: GatewaySessions,
        config: GatewayConfig | None,
        clients: Sequence[ClientEntry],
    ) -> None:
        """``config``: the gateway's configuration (None: clients given directly, never
        reloaded); ``clients``: the clients the core started with."""
        self._gateway: GatewaySessions = gateway
        self._config = config
        self._cache: ClientFileCache = dict(config.client_file_cache) if config else {}
        """The files read so far: a reload reads only the changed ones."""
        self.clients: tuple[ClientEntry, ...] = tuple(clients)
        self.reloads = 0
        self.skipped_files = 0
        """Files skipped by the last load."""
        self.ok = True
        """False after a reload that could not read the directory."""
        self.status = ""
        """What the last reload did, one line (empty: never reloaded, or no directory)."""

    @property
    def reloadable(self) -> bool:
        return self._config is not None and self._config.clients_dir is not None

    def _base(self, now: float) -> EventBase:
        gw = self._gateway
        return {
            "ts_ms": gw.ts_ms(now),
            "session_id": "",
            "node_id": gw.node_id,
            "policy_version": gw.policy.policy_version if gw.policy else "invalid",
            "state_version": 0,
        }

    def _report(self, errors: Sequence[ConfigError], now: float) -> None:
        for error in errors:
            self._gateway.emit(
                PolicyEvent(
                    **self._base(now), policy_name=CLIENT_FILE_INVALID,
                    reason_code=Reason.POLICY_INVALID, detail=str(error),
                )
            )  # fmt: skip

    def announce_start(self, now: float) -> None:
        """Report the files the start-up load skipped."""
        if self._config is not None:
            self.skipped_files = len(self._config.client_file_errors)
            self._report(self._config.client_file_errors, now)

    def reload(self, now: float) -> bool:
        """Read ``clients_dir`` again and install the clients; False if the directory
        could not be read (the current clients stay). True without a directory."""
        if self._config is None or self._config.clients_dir is None:
            return True
        try:
            load = load_clients(self._config, self.clients, self._cache)
        except ConfigError as exc:
            self._report([exc], now)
            self.ok = False
            self.status = f"clients_dir not read, the clients stay: {exc}"
            return False
        before = {c.public_key: c for c in self.clients}
        after = {c.public_key: c for c in load.clients}
        self._gateway.handshakes.set_clients(load.clients)
        ended = self._end_sessions(after, now)
        self.clients = load.clients
        self.reloads += 1
        self.skipped_files = len(load.errors)
        self._report(load.errors, now)
        added = sum(1 for k in after if k not in before)
        removed = sum(1 for k in before if k not in after)
        changed = sum(1 for k, c in after.items() if k in before and before[k] != c)
        detail = (
            f"{len(after)} clients (+{added} -{removed} ~{changed}), "
            f"{len(load.errors)} files skipped, {ended} sessions ended"
        )
        self.ok = True
        self.status = f"clients_dir: {detail}"
        self._gateway.emit(
            PolicyEvent(
                **self._base(now), policy_name=CLIENTS_RELOADED,
                reason_code=Reason.POLICY_APPLIED, detail=detail,
            )
        )  # fmt: skip
        return True

    def _end_sessions(self, allowed: dict[bytes, ClientEntry], now: float) -> int:
        """End every live session whose client is gone or changed; how many."""
        ended = 0
        for s in list(self._gateway.sessions.values()):
            if s.machine.terminated or _same(s.client, allowed.get(s.client.public_key)):
                continue
            s.terminate(REMOVED_CLIENT_REASON, now)
            ended += 1
        return ended
