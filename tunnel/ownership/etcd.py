"""The cluster session store on etcd (DESIGN D15, D15a): one key per session, CAS by txn.

Layout under a cluster prefix ``P`` (``/jvpn/<cluster>/``):

- ``P s/<session id>``: the session's entry, JSON: the :class:`SessionRecord` fields, the
  ``owner_epoch`` and ``wrapped_keys`` (the session keys AEAD-wrapped under the cluster's
  state key by the caller; opaque bytes here, base64 in the JSON, never plaintext). The
  entry has no lease: it outlives any node.
- ``P o/<session id>`` and ``P h/<session id>``: the ownership key and a hand-over request
  (see :mod:`tunnel.ownership.etcd_owner`), attached to a node's lease.

Every write is one etcd transaction that compares the entry's ``mod_revision`` with the
one read together with the expected ``state_version``, so a write commits only against
exactly the entry it was computed from (a delete and re-create at the same version has
another revision). The store keeps the last ``(state_version, mod_revision)`` it saw per
session, so a CAS from the version this node last wrote costs one round trip; a failed
compare carries the current entry back in the same transaction (the failure branch reads
it), and a CAS whose cache was merely stale is retried once against the entry read.

**Threads, not the gateway's loop.** aetcd is asyncio-only, and the gateway mirrors a
state change into the store synchronously before any reply leaves (the
:class:`~tunnel.ownership.SessionStore` protocol is synchronous; sqlite and memory are
too). The store therefore runs its own event loop on a worker thread (:class:`EtcdWorker`)
holding the gRPC channel, the lease keeper and the watches. Callers use either

- the synchronous facade (the ``SessionStore`` methods): the calling thread waits for the
  answer at most ``timeout`` seconds, then :class:`StoreUnavailable` (fail closed). A write
  happens only on a state transition (never per packet), and costs one etcd round trip
  (about 1-3 ms with fsync on a local disk), which the gateway loop can afford; or
- the futures (:meth:`EtcdWorker.submit`, ``await asyncio.wrap_future(...)``), for a caller
  that must not wait at all.

Keeping the lease keeper off the gateway's loop matters more than the call style: a
gateway busy forwarding cannot delay a keep-alive, and a keeper that is late anyway
only closes the fence earlier (:mod:`tunnel.ownership.fence`), never later.

Failure mapping: no answer within ``timeout`` (no quorum: etcd holds the request until a
leader commits it), a refused connection or any gRPC error -> :class:`StoreUnavailable`.
It means **outcome unknown**, not "not written": a write that timed out without quorum
can still commit when quorum returns (the surviving member keeps the proposal). Callers
fail closed (treat themselves as not authoritative for the session) and read again;
the CAS makes a late commit visible, never a double one. A corrupt value under the
prefix raises :class:`CorruptEntry` (a StoreUnavailable: fail closed too).
After a timeout the worker reconnects with the endpoint list rotated by one, so a frozen
member (SIGSTOP keeps its sockets open) is left for the next member on the next call.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Final

from tunnel.ownership.etcd_worker import DEFAULT_TIMEOUT, EtcdWorker
from tunnel.ownership.store import (
    SESSION_ID_HEX,
    SessionRecord,
    StoreUnavailable,
    check_cas_arguments,
)

ENTRY_FORMAT: Final = 1
"""Version of the entry JSON (``"f"``); an entry of another format is refused."""


class CorruptEntry(StoreUnavailable):
    """A value under the session prefix is not an entry this code can read (fail closed)."""


@dataclass(frozen=True, slots=True)
class StoredSession:
    """One session's entry as etcd holds it."""

    record: SessionRecord
    owner_epoch: int
    """Incremented by every ownership transfer (never goes back)."""
    wrapped_keys: bytes
    """The session keys wrapped by the caller's state key; opaque here."""
    mod_revision: int
    """etcd's revision of the last write of this entry (what a CAS compares)."""

    def encode(self) -> bytes:
        return encode_entry(self.record, self.owner_epoch, self.wrapped_keys)


def encode_entry(record: SessionRecord, owner_epoch: int, wrapped_keys: bytes) -> bytes:
    fields = asdict(record)
    fields["resume"] = base64.b64encode(record.resume).decode("ascii")  # sealed, opaque
    doc = {
        "f": ENTRY_FORMAT, "record": fields, "owner_epoch": owner_epoch,
        "wrapped_keys": base64.b64encode(wrapped_keys).decode("ascii"),
    }  # fmt: skip
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def decode_entry(value: bytes, mod_revision: int) -> StoredSession:
    """The entry in ``value``; :class:`CorruptEntry` when it is not one this code wrote."""
    try:
        doc = json.loads(value)
        if doc.get("f") != ENTRY_FORMAT:
            raise CorruptEntry(f"entry format {doc.get('f')!r} is not {ENTRY_FORMAT}")
        fields = dict(doc["record"])
        fields["resume"] = base64.b64decode(fields.get("resume", ""), validate=True)
        return StoredSession(
            record=SessionRecord(**fields), owner_epoch=int(doc["owner_epoch"]),
            wrapped_keys=base64.b64decode(doc["wrapped_keys"], validate=True),
            mod_revision=mod_revision,
        )  # fmt: skip
    except (KeyError, TypeError, AttributeError, ValueError) as exc:  # JSON, base64, record
        raise CorruptEntry(f"not a session entry: {exc}") from exc


def check_prefix(prefix: str) -> bytes:
    if not prefix.startswith("/") or not prefix.endswith("/") or len(prefix) < 3:
        raise ValueError(f"cluster prefix must look like /jvpn/<cluster>/, not {prefix!r}")
    return prefix.encode()


def first_kv(responses: list[Any], index: int) -> Any:
    """The key-value a txn's ``get`` at ``index`` returned, or None (no such key)."""
    found = responses[index]
    return found[0][1] if found else None


class EtcdSessionStore:
    """A :class:`~tunnel.ownership.SessionStore` on etcd (see the module docstring).

    ``worker`` may be shared (a node's ownership uses the same one); otherwise the store
    makes its own from ``endpoints`` and closes it in :meth:`close`.
    """

    def __init__(
        self,
        endpoints: Sequence[str] = (),
        prefix: str = "/jvpn/default/",
        timeout: float = DEFAULT_TIMEOUT,
        *,
        worker: EtcdWorker | None = None,
    ) -> None:
        self.prefix = check_prefix(prefix)
        self._own_worker = worker is None
        self.worker: EtcdWorker = worker if worker is not None else EtcdWorker(endpoints, timeout)
        self.conflicts = 0
        """CAS, create and delete calls that failed on a version or existence check."""
        self._seen: dict[str, StoredSession] = {}
        self._lock = threading.Lock()

    # -- keys -------------------------------------------------------------------------------

    def session_key(self, session_id: str) -> bytes:
        return self.prefix + b"s/" + session_id.encode()

    def owner_key(self, session_id: str) -> bytes:
        return self.prefix + b"o/" + session_id.encode()

    def handover_key(self, session_id: str) -> bytes:
        return self.prefix + b"h/" + session_id.encode()

    def index_key(self, index: int) -> bytes:
        """``P i/<receiver index, 8 hex digits>`` -> the session id (a node that does not
        hold the session finds it from a datagram's receiver index; no lease)."""
        return self.prefix + b"i/" + f"{index:08x}".encode()

    async def alookup(self, client: Any, index: int) -> StoredSession | None:
        """The entry of the session whose receiver index is ``index`` (worker loop)."""
        kv = await client.get(self.index_key(index))
        if kv is None:
            return None
        sid = kv.value.decode("ascii", "replace")
        return await self.aentry(client, sid) if SESSION_ID_HEX.fullmatch(sid) else None

    # -- bookkeeping --------------------------------------------------------------------------

    def remember(self, session_id: str, entry: StoredSession | None) -> StoredSession | None:
        """Keep the newest entry seen or written (the next CAS compares against it)."""
        with self._lock:
            if entry is None:
                self._seen.pop(session_id, None)
            else:
                self._seen[session_id] = entry
        return entry

    def cached(self, session_id: str, state_version: int) -> StoredSession | None:
        with self._lock:
            seen = self._seen.get(session_id)
        return seen if seen is not None and seen.record.state_version == state_version else None

    def note_conflict(self) -> bool:
        """Count a failed version or existence check; returns False (the answer)."""
        with self._lock:
            self.conflicts += 1
        return False

    def decode_kv(self, session_id: str, kv: Any) -> StoredSession | None:
        """The entry of a key-value (None for no key); remembered for the next CAS."""
        entry = None if kv is None else decode_entry(kv.value, kv.mod_revision)
        return self.remember(session_id, entry)

    # -- reads --------------------------------------------------------------------------------

    async def aentry(self, client: Any, session_id: str) -> StoredSession | None:
        """The session's entry (worker loop; linearizable read)."""
        kv = await client.get(self.session_key(session_id))
        return self.decode_kv(session_id, kv)

    def entry(self, session_id: str) -> StoredSession | None:
        return self.worker.call(lambda c: self.aentry(c, session_id))

    def get(self, session_id: str) -> SessionRecord | None:
        found = self.entry(session_id)
        return None if found is None else found.record

    def records(self) -> list[SessionRecord]:
        """Every record under the prefix, in session-id order."""

        async def scan(client: Any) -> list[SessionRecord]:
            found = await client.get_prefix(self.prefix + b"s/", sort_order="ascend")
            return [decode_entry(kv.value, kv.mod_revision).record for kv in found]

        return self.worker.call(scan)

    def __len__(self) -> int:
        async def count(client: Any) -> int:
            found = await client.get_prefix(self.prefix + b"s/", keys_only=True)
            return len(found)

        return self.worker.call(count)

    # -- writes -------------------------------------------------------------------------------

    async def acreate(
        self,
        client: Any,
        record: SessionRecord,
        wrapped_keys: bytes = b"",
        extra: Any = (),
        guard: Any = (),
    ) -> bool:
        """Create the entry iff none exists and ``guard`` holds (plus ``extra`` ops)."""
        key = self.session_key(record.session_id)
        tx = client.transactions
        value = encode_entry(record, 1, wrapped_keys)
        ok, responses = await client.transaction(
            compare=[tx.version(key) == 0, *guard],
            success=[tx.put(key, value), *extra],
            failure=[],
        )
        if not ok:
            return self.note_conflict()
        revision = responses[0].response_put.header.revision
        self.remember(record.session_id, StoredSession(record, 1, wrapped_keys, revision))
        return True

    def create(self, record: SessionRecord, wrapped_keys: bytes = b"") -> bool:
        return self.worker.call(lambda c: self.acreate(c, record, wrapped_keys))

    async def acas(
        self,
        client: Any,
        session_id: str,
        expected_version: int,
        new_record: SessionRecord,
        wrapped_keys: bytes | None = None,
        guard: Any = (),
        *,
        refresh: bool = False,
    ) -> bool:
        """CAS on ``state_version`` (see the module docstring). ``guard``: more compares
        that must hold too (a node's fenced write compares its ownership key).
        ``refresh``: the same version with a new ``resume`` (a counter reservation)."""
        if not refresh:
            check_cas_arguments(session_id, expected_version, new_record)
        current = self.cached(session_id, expected_version)
        if current is None:
            current = await self.aentry(client, session_id)
        for _ in range(2):  # a stale cache costs one more round trip, never a false answer
            if current is None or current.record.state_version != expected_version:
                return self.note_conflict()
            written = StoredSession(
                new_record, current.owner_epoch,
                current.wrapped_keys if wrapped_keys is None else wrapped_keys, 0,
            )  # fmt: skip
            key = self.session_key(session_id)
            tx = client.transactions
            ok, responses = await client.transaction(
                compare=[tx.mod(key) == current.mod_revision, *guard],
                success=[tx.put(key, written.encode())],
                failure=[tx.get(key)],
            )
            if ok:
                revision = responses[0].response_put.header.revision
                self.remember(session_id, replace(written, mod_revision=revision))
                return True
            fresh = self.decode_kv(session_id, first_kv(responses, 0))
            if fresh is not None and fresh.mod_revision == current.mod_revision:
                return self.note_conflict()  # the entry was as expected: a guard failed
            current = fresh
        return self.note_conflict()

    def cas(
        self,
        session_id: str,
        expected_version: int,
        new_record: SessionRecord,
        wrapped_keys: bytes | None = None,
    ) -> bool:
        check_cas_arguments(session_id, expected_version, new_record)
        return self.worker.call(
            lambda c: self.acas(c, session_id, expected_version, new_record, wrapped_keys)
        )

    async def adelete(
        self,
        client: Any,
        session_id: str,
        expected_version: int | None = None,
        extra: Any = (),
        guard: Any = (),
    ) -> bool:
        """Remove the entry (iff at ``expected_version`` when given and ``guard`` holds),
        plus ``extra`` ops."""
        current = await self.aentry(client, session_id)
        if current is None or (
            expected_version is not None and current.record.state_version != expected_version
        ):
            return self.note_conflict()
        key = self.session_key(session_id)
        tx = client.transactions
        ok, _ = await client.transaction(
            compare=[tx.mod(key) == current.mod_revision, *guard],
            success=[tx.delete(key), *extra],
            failure=[],
        )
        if not ok:
            return self.note_conflict()
        self.remember(session_id, None)
        return True

    def delete(self, session_id: str, expected_version: int | None = None) -> bool:
        return self.worker.call(lambda c: self.adelete(c, session_id, expected_version))

    def close(self) -> None:
        if self._own_worker:
            self.worker.close()
