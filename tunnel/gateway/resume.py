"""Sessions that outlive the gateway process (DESIGN D15a): sealing, counter blocks, resume.

:class:`SessionPersistence` is a component the :class:`~tunnel.gateway.runtime.GatewayRuntime`
owns when its store is persistent (``[state] store = "sqlite"``). It
- seals each session's :class:`~tunnel.core.gateway_resume.ResumeState` (JSON, then AEAD
  under the state key: tunnel/ownership/statekey.py) into the record the
  :class:`~tunnel.gateway.ownership.OwnershipMirror` writes at every committed transition
  (never per packet), with a fresh counter reservation (``send_from``);
- writes a new reservation (``refresh``: same version, new resume state) for every session
  that sealed past its reservation, followed the client into a new key phase or saw the
  client follow its own (the first datagram of a resumed session's new phase), before the
  datagrams of that input leave and its inner packets reach the TUN (:meth:`reserve`). A
  session whose reservation cannot be written sends nothing more: its queued datagrams are
  voided and it ends
  (``ownership_conflict``, no TERMINATE: that too would need a counter), unless its record
  is gone (then nothing could ever resume from it and what is queued may leave);
- at start (:meth:`restore`) rebuilds every live session of this node from the store, in a
  key phase the process before opened nothing in (so nothing it accepted, also after a
  ``kill -9``, is accepted again: gateway_resume.py), and at a clean stop
  (:meth:`save_all`) writes each one's state as it is.

Send side: counter blocks (the client and the wire need nothing new; the same record lets
another node continue a session, the etcd store, with the same rule), one store write per
:data:`~tunnel.core.gateway_resume.COUNTER_BLOCK` datagrams a session sends, none per
packet. Receive side: a new key phase at every resume, which the client follows as it
follows any rekey (one REKEY from the gateway; no new message, no per-packet write). The
keys never appear outside the sealed blob: not in a record field, an event or a log line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Final

from tunnel.core.aead import TrafficKeys
from tunnel.core.ciphers import DataCipher
from tunnel.core.events import Reason
from tunnel.core.gateway import GatewaySessions
from tunnel.core.gateway_paths import Addr
from tunnel.core.gateway_resume import COUNTER_BLOCK, ResumeState
from tunnel.core.gateway_session import ClientEntry, GatewaySession
from tunnel.core.timers import LIVE_STATES
from tunnel.ownership import ResumableStore, SessionRecord, StoreUnavailable
from tunnel.ownership.sqlite import STORE_FILE, SqliteSessionStore
from tunnel.ownership.statekey import StateKeyError, StateSealer, load_state_key

if TYPE_CHECKING:
    from tunnel.gateway.config import StateConfig

RESUMABLE: Final = frozenset(str(s) for s in LIVE_STATES)
"""States a stored session can be resumed in."""

FORMAT_VERSION: Final = 2
"""The ``v`` of the sealed JSON; version 1 (before ``retired``) is read too, any other
value is not resumed."""

READABLE: Final = frozenset({1, FORMAT_VERSION})


def encode_state(state: ResumeState) -> bytes:
    """The JSON of ``state`` (bytes as hex, addresses as lists of their fields)."""
    c = state.client
    data: dict[str, Any] = {
        "v": FORMAT_VERSION, "index": state.index, "peer_index": state.peer_index,
        "client": [c.name, c.public_key.hex(), c.inner_address, c.inner_address6],
        "state": state.state, "state_version": state.state_version,
        "epoch": state.binding_epoch,
        "keys": [state.keys.send.hex(), state.keys.recv.hex()], "suite": int(state.suite),
        "phase": state.key_phase,
        "send_from": state.send_from, "retired": _keys_out(state.retired),
        "binding": _addr_out(state.binding), "binding_path": state.binding_path,
        "last_binding": _addr_out(state.last_binding), "skew_ms": state.skew_ms,
        "born_ms": state.born_ms, "transportless_ms": state.transportless_ms,
        "recovery_ms": state.recovery_ms, "switches": state.total_switches,
    }  # fmt: skip
    return json.dumps(data, separators=(",", ":")).encode()


def decode_state(
    session_id: str, data: bytes, make_addr: Callable[..., Addr]
) -> ResumeState | None:
    """The state ``encode_state`` wrote, or None when it is not one (another format) or
    ``make_addr`` refuses an address in it (ValueError)."""
    try:
        d = json.loads(data)
        if d.get("v") not in READABLE:
            return None
        name, key, inner, inner6 = d["client"]
        binding = d["binding"]
        return ResumeState(
            session_id=bytes.fromhex(session_id), index=int(d["index"]),
            peer_index=int(d["peer_index"]),
            client=ClientEntry(name, bytes.fromhex(key), inner, inner6), state=d["state"],
            state_version=int(d["state_version"]), binding_epoch=int(d["epoch"]),
            keys=TrafficKeys(bytes.fromhex(d["keys"][0]), bytes.fromhex(d["keys"][1])),
            suite=DataCipher(int(d["suite"])),
            key_phase=int(d["phase"]), send_from=int(d["send_from"]),
            retired=_keys_in(d.get("retired")),
            binding=None if binding is None else make_addr(*binding),
            binding_path=d["binding_path"], last_binding=make_addr(*d["last_binding"]),
            skew_ms=int(d["skew_ms"]), born_ms=int(d["born_ms"]),
            transportless_ms=d["transportless_ms"], recovery_ms=d["recovery_ms"],
            total_switches=int(d["switches"]),
        )  # fmt: skip
    except (ValueError, KeyError, TypeError, IndexError):
        return None


def _keys_out(keys: TrafficKeys | None) -> list[str] | None:
    return None if keys is None else [keys.send.hex(), keys.recv.hex()]


def _keys_in(keys: list[str] | None) -> TrafficKeys | None:
    return None if keys is None else TrafficKeys(bytes.fromhex(keys[0]), bytes.fromhex(keys[1]))


def _addr_out(addr: Addr | None) -> list[Any] | None:
    if addr is None:
        return None
    if not isinstance(addr, tuple):
        raise TypeError(f"cannot store the address {addr!r}")
    return list(addr)


class SessionPersistence:
    """The resume side of a persistent store for one gateway node (module docstring)."""

    def __init__(
        self,
        gateway: GatewaySessions,
        store: ResumableStore,
        sealer: StateSealer,
        node_id: str,
        make_addr: Callable[..., Addr],
        *,
        block: int = COUNTER_BLOCK,
        on_refused: Callable[[str, float], bool] | None = None,
    ) -> None:
        self._gateway: GatewaySessions = gateway
        self.store: ResumableStore = store
        self._sealer = sealer
        self.node_id = node_id
        self._make_addr = make_addr
        self.block = block
        self.writes = 0
        """Reservation writes (refresh) that succeeded."""
        self.failures = 0
        """Reservation writes that failed (each ended its session)."""
        self.resumed = 0
        """Sessions resumed from the store at start."""
        self._pending: dict[int, tuple[int, int, bool]] = {}
        """index -> (phase, counter, rotating) of the sealed state a write is carrying."""
        self.uncommitted = False
        """The last :meth:`batch` was not committed (the driver delivers none of that
        turn's inner packets: they may be what a resumed process accepts again)."""
        self.on_refused: Callable[[str, float], bool] | None = on_refused
        """A cluster node's handler of a refused reservation (the session is taken away
        without a word to the client: True), instead of ending it."""
        self._batch: list[tuple[GatewaySession, tuple[int, int, bool]]] = []
        """Reservations made in the current store batch, with what they replaced."""

    # -- what the mirror writes --------------------------------------------------------------

    def sealed(self, s: GatewaySession) -> bytes:
        """The sealed resume state of ``s`` with a new reservation (made once written:
        :meth:`written`)."""
        counter = s.cipher.send_counter + self.block
        state = s.resume_state(counter)
        self._pending[s.index] = (state.key_phase, counter, state.retired is not None)
        return self._sealer.seal(s.machine.session_id, encode_state(state))

    def written(self, s: GatewaySession) -> None:
        """The record carrying :meth:`sealed`'s state is in the store: its reservation holds
        (once the batch it belongs to is committed: :meth:`batch`)."""
        made = self._pending.pop(s.index, None)
        if made is not None:
            self._batch.append((s, s.reserved))
            s.reservation_made(*made)

    @contextmanager
    def batch(self, now: float) -> Iterator[None]:
        """One store transaction around a turn's writes (one sync to disk). If it is not
        committed (``uncommitted``), the reservations it made are taken back and their
        sessions send nothing more (voided, ended without TERMINATE; their events come next
        turn); an exception from the block (an engine failure) takes them back and propagates."""
        self._batch.clear()
        self.uncommitted = False
        try:
            with self.store.batch():
                yield
        except StoreUnavailable:
            self.uncommitted = True
            for s in self._take_back():
                self._fail(s, now)
        except BaseException:
            self._take_back()
            raise
        finally:
            self._batch.clear()

    def _take_back(self) -> list[GatewaySession]:
        sessions = []
        for s, previous in reversed(self._batch):
            s.reservation_made(*previous)
            sessions.append(s)
        self._batch.clear()
        return sessions

    def _fail(self, s: GatewaySession, now: float) -> None:
        """``s`` has no reservation for what it sealed: nothing more of it leaves."""
        self.failures += 1
        s.reservation_failed()
        self._gateway.outbox.void_for(s.peer_index)
        sid = s.machine.session_id
        if self.on_refused is None or not self.on_refused(sid, now):
            self._gateway.terminate(sid, now, Reason.OWNERSHIP_CONFLICT, notify=False)

    # -- reservations between transitions ---------------------------------------------------

    def reserve(self, due: Sequence[GatewaySession], now: float) -> bool:
        """Write a reservation for each session of ``due`` (before its datagrams leave);
        False if one failed (that session is ended, see the module docstring)."""
        all_ok = True
        for s in due:
            if not s.reservation_due():
                continue  # a transition's record reserved meanwhile
            if not self._refresh(s, now):
                all_ok = False
        return all_ok

    def _refresh(self, s: GatewaySession, now: float) -> bool:
        sid = s.machine.session_id
        record = SessionRecord(
            session_id=sid, state=str(s.machine.state), state_version=s.machine.version,
            binding_epoch=s.epoch, owner_node=self.node_id,
            policy_version=s.machine.policy_version, updated_ms=self._gateway.ts_ms(now),
            resume=self.sealed(s),
        )  # fmt: skip
        try:
            ok = self.store.refresh(record) or (
                s.machine.terminated and self.store.get(sid) is None
            )
        except StoreUnavailable:
            ok = False
        if ok:
            self.writes += 1
            self.written(s)
            return True
        self._pending.pop(s.index, None)
        self._fail(s, now)
        return False

    def save_all(self, now: float) -> int:
        """At a clean stop: write every live session's state as it is now, in one batch;
        how many were written."""
        saved = 0
        with self.batch(now):
            for s in list(self._gateway.sessions.values()):
                if not s.machine.terminated and self._refresh(s, now):
                    saved += 1
        return saved

    # -- start ------------------------------------------------------------------------------

    def restore(self, clients: Sequence[ClientEntry], now: float) -> tuple[int, list[str]]:
        """Rebuild every session this node's records hold: (how many resumed, a line per
        record that could not be, which is then removed). StoreUnavailable propagates."""
        if not self._gateway.accepting:
            return 0, ["stored sessions not resumed: no valid policy (they stay in the store)"]
        configured = {c.public_key: c for c in clients}
        resumed, problems = 0, []
        for record in self.store.records():
            if record.owner_node != self.node_id:
                continue
            why = self._restore_one(record, configured, now)
            if why is None:
                resumed += 1
                self.resumed += 1
                continue
            problems.append(f"session {record.session_id[:8]} not resumed: {why}")
            self.store.delete(record.session_id)
        return resumed, problems

    def _restore_one(
        self, record: SessionRecord, configured: dict[bytes, ClientEntry], now: float
    ) -> str | None:
        plain = self._sealer.open(record.session_id, record.resume) if record.resume else None
        if plain is None:
            return "no resume state sealed with this state key"
        state = decode_state(record.session_id, plain, self._make_addr)
        if state is None:
            return "its resume state cannot be read here (another format, or a listen address gone)"
        if state.state not in RESUMABLE:
            return f"it was {state.state}"
        client = configured.get(state.client.public_key)
        if client is None or not _same_client(client, state.client):
            return f"client {state.client.name} is no longer configured as it was"
        if state.state_version != record.state_version and not self.store.cas(
            record.session_id, record.state_version,
            record.evolve(state=state.state, state_version=state.state_version,
                          binding_epoch=state.binding_epoch),
        ):  # fmt: skip
            return "its record changed meanwhile"
        outcome = self._gateway.resume(state, now)
        return outcome if isinstance(outcome, str) else None


def _same_client(configured: ClientEntry, stored: ClientEntry) -> bool:
    """The session's client is still configured with its addresses (an IPv6 address the
    session did not carry may be configured: it was not routed then)."""
    return (
        configured.name == stored.name
        and configured.inner_address == stored.inner_address
        and (not stored.inner_address6 or configured.inner_address6 == stored.inner_address6)
    )


class StateError(Exception):
    """The ``[state]`` store or its key cannot be used (the message says why)."""

    def __init__(self, message: str, *, key: bool = False) -> None:
        super().__init__(message)
        self.key = key
        """The state key file is the problem (the program's key exit code)."""


def open_state(
    config: StateConfig, urandom: Callable[[int], bytes] = os.urandom
) -> tuple[SqliteSessionStore, StateSealer]:
    """The persistent store of ``[state]`` and the sealer of its state key: ``state_dir``
    created (0700) if missing, the key file created (0600) if missing, the store file
    opened and locked for this process. StateError says what is wrong."""
    try:
        config.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(f"state_dir {config.state_dir}: cannot create: {exc.strerror}") from None
    try:
        sealer = StateSealer(load_state_key(config.state_key_file, urandom=urandom))
    except StateKeyError as exc:
        raise StateError(f"state_key_file {exc}", key=True) from None
    try:
        store = SqliteSessionStore(config.state_dir / STORE_FILE, exclusive=True)
    except StoreUnavailable as exc:
        raise StateError(f"session store {exc}") from None
    return store, sealer
