"""Session ownership of one cluster node on etcd: a lease, a fence, CAS transfers (D15b).

Each node holds ONE etcd lease (never one per session). Owning session ``S`` means
holding the key ``P o/S`` = ``{"node": <id>, "epoch": <owner epoch>}`` attached to that
lease; the session's entry (``P s/S``, :mod:`tunnel.ownership.etcd`) carries the same
``owner_epoch`` and has no lease, so it outlives every node.

- **Keeper**: a task on the store's worker thread sends a keep-alive every ``ttl / 3`` and
  feeds the :class:`~tunnel.ownership.fence.LeaseFence` with the *send* time of each
  acknowledged one. :meth:`NodeOwnership.may_forward` is true only while the session is
  held and the fence is open: the node stops forwarding before etcd could expire the
  lease, and, after any pause, checks the fence again with a fresh clock before sending.
- **Create** (a new session): one txn creates the entry (epoch 1) and the ownership key.
- **Writes** (the node's state changes): the CAS of the store plus a compare of the
  ownership key's exact value, so a node that lost the session (released, or its lease
  expired and another node took it) can never write again (AT-51).
- **Transfer** (:meth:`NodeOwnership.acquire`, a reattach arriving at this node): read the
  entry and the ownership key; if another node holds the key, write a hand-over request
  (``P h/S`` = requester, holder, the epoch seen; on the requester's lease) and wait,
  bounded, until the key is gone: the holder watches ``P h/`` (and scans it on every
  keeper tick), stops forwarding the session, then deletes its key (released); a dead
  owner's key vanishes with its lease. A holder that does not know it holds the key (a
  create or transfer whose answer was lost but which committed) gives it up when asked,
  or adopts it when the session reattaches there. Then one txn, granted only if the entry is
  still at the revision read AND no ownership key exists, writes the entry with
  ``owner_epoch + 1`` and the caller's new record (``state_version`` moves forward, so the
  old owner's view is stale twice over) and creates this node's ownership key. Two
  concurrent transfers: exactly one txn commits; the other gets CONFLICT (AT-48).

Never two owners: a node acquires only when no ownership key exists; the old owner either
deleted its key after it stopped forwarding, or its lease expired, which its fence
anticipated by ``margin`` seconds.

Calls block the caller for a bounded time (see :mod:`tunnel.ownership.etcd` for why a
worker thread); the hand-over callback runs on the worker thread and must not block.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

import aetcd.exceptions
import aetcd.transactions

from tunnel.ownership.etcd import EtcdSessionStore, StoredSession, first_kv
from tunnel.ownership.fence import LeaseFence
from tunnel.ownership.store import SessionRecord, StoreUnavailable, check_cas_arguments

DEFAULT_TTL: Final = 2
"""Lease seconds. etcd's minimum is 1.5 election timeouts (2 s with the defaults)."""
POLL: Final = 0.02
"""Seconds between reads of an ownership key a transfer waits for."""
HISTORY: Final = 4096
"""Ownership changes kept in :attr:`NodeOwnership.history` (oldest dropped)."""


class Outcome(enum.StrEnum):
    """What a transfer attempt did."""

    GRANTED = "granted"
    """This node owns the session now (new owner epoch)."""
    CONFLICT = "conflict"
    """The entry was not at the expected version, or another transfer won the race."""
    OWNED_ELSEWHERE = "owned_elsewhere"
    """A live owner did not hand over within the wait."""
    NOT_FOUND = "not_found"
    """No entry for that session."""


@dataclass(frozen=True, slots=True)
class Transfer:
    """The result of :meth:`NodeOwnership.acquire`."""

    outcome: Outcome
    owner_epoch: int
    """The epoch now in the entry (0 when there is none)."""
    previous_owner: str
    """Node that owned the session before ("" when nobody held it)."""
    record: SessionRecord | None


@dataclass(frozen=True, slots=True)
class OwnershipChange:
    """One line of a node's ownership history (monotonic clock, seconds)."""

    session_id: str
    change: str
    """``created``, ``acquired``, ``adopted``, ``released``, ``deleted`` or ``lost``."""
    owner_epoch: int
    at: float


def owner_token(node_id: str, epoch: int) -> bytes:
    return json.dumps({"epoch": epoch, "node": node_id}, sort_keys=True).encode()


def request_value(requester: str, holder: str, epoch: int) -> bytes:
    """A hand-over request: who asks, whom it asks, and the owner epoch it saw."""
    doc = {"epoch": epoch, "holder": holder, "node": requester}
    return json.dumps(doc, sort_keys=True).encode()


def decode_request(value: bytes) -> tuple[str, str, int]:
    doc = json.loads(value)
    return str(doc["node"]), str(doc["holder"]), int(doc["epoch"])


def decode_owner(value: bytes) -> tuple[str, int]:
    doc = json.loads(value)
    return str(doc["node"]), int(doc["epoch"])


class NodeOwnership:
    """One node's lease, fence and owned sessions; also its fenced :class:`SessionStore`.

    ``on_handover(session_id, requester)`` runs on the worker thread when another node asks
    for a session this node holds; True means "hand it over now" (the node has stopped
    forwarding it), False that the caller calls :meth:`release` itself later. It may be
    called again for the same request (the watch and the keeper's scan both deliver it)
    until the session is released. Without a callback a live owner hands over at once.
    """

    def __init__(
        self,
        store: EtcdSessionStore,
        node_id: str,
        ttl: int = DEFAULT_TTL,
        margin: float | None = None,
        on_handover: Callable[[str, str], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not node_id:
            raise ValueError("node_id must not be empty")
        if ttl < 1:
            raise ValueError("ttl must be at least 1 s")
        self.store = store
        self.node_id = node_id
        self.ttl = ttl
        self.margin = margin if margin is not None else max(0.25, ttl / 4)
        self._on_handover = on_handover
        self._clock = clock
        self.fence = LeaseFence(self.margin)
        self.lease_id = 0
        self.refresh_latency = 0.0
        """Seconds the last acknowledged keep-alive took."""
        self.leases_lost = 0
        self.history: deque[OwnershipChange] = deque(maxlen=HISTORY)
        self._owned: dict[str, int] = {}  # sid -> owner epoch
        self._lock = threading.Lock()
        self._keeper_paused = threading.Event()
        self._pending: set[str] = set()
        """Sessions with a create or transfer in flight (worker loop only)."""
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Grant the lease, then run the keeper and the hand-over watch (bounded)."""
        self.store.worker.call(self._grant)
        worker = self.store.worker

        async def spawn() -> None:
            self._tasks = [
                asyncio.create_task(self._keep()),
                asyncio.create_task(self._watch_requests()),
            ]

        asyncio.run_coroutine_threadsafe(spawn(), worker.loop).result(5.0)

    async def _grant(self, client: Any) -> None:
        sent = self._clock()
        lease = await client.lease(self.ttl)
        self.lease_id = lease.id
        self.fence = LeaseFence(self.margin)
        self.fence.acknowledged(sent, float(lease.ttl))

    def close(self, revoke: bool = True) -> None:
        """Stop the keeper and the watch; ``revoke`` drops the lease (releasing all at once)."""
        if self._closed:
            return
        self._closed = True

        async def stop() -> None:
            for t in self._tasks:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
            asyncio.run_coroutine_threadsafe(stop(), self.store.worker.loop).result(5.0)
        with self._lock:
            owned = list(self._owned.items())
            self._owned.clear()
        self.fence.lost()
        if revoke and self.lease_id:
            with contextlib.suppress(StoreUnavailable):
                self.store.worker.call(lambda c: c.revoke_lease(self.lease_id))
        for sid, epoch in owned:
            self._note(sid, "released", epoch)

    def pause_keeper(self, paused: bool = True) -> None:
        """Fault injection: stop (or resume) sending keep-alives."""
        if paused:
            self._keeper_paused.set()
        else:
            self._keeper_paused.clear()

    # -- the keeper ---------------------------------------------------------------------------

    async def _keep(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            if self._keeper_paused.is_set():
                continue
            with contextlib.suppress(StoreUnavailable):
                if self.fence.expired:
                    await self.store.worker.guarded(self._grant)
                else:
                    await self._refresh_once()
                await self.store.worker.guarded(self._scan_requests)

    async def _refresh_once(self) -> None:
        sent = self._clock()
        reply = await self.store.worker.guarded(lambda c: c.refresh_lease(self.lease_id))
        if reply is None:
            # The keep-alive stream ended without an answer (its channel closed under it,
            # as when the worker moved to another endpoint): no news of the lease, which
            # is not news that it is gone. The fence closes on its own deadline; only an
            # answer with TTL <= 0 says that etcd dropped the lease (and what it held).
            raise StoreUnavailable("the keep-alive stream ended without an answer")
        ttl = float(reply.TTL)
        self.refresh_latency = self._clock() - sent
        self.fence.acknowledged(sent, ttl)
        if self.fence.expired:
            self._lease_lost()

    def _lease_lost(self) -> None:
        self.leases_lost += 1
        with self._lock:
            owned = list(self._owned.items())
            self._owned.clear()
        for sid, epoch in owned:
            self._note(sid, "lost", epoch)

    # -- hand-over requests (owner side) -------------------------------------------------------

    async def _watch_requests(self) -> None:
        prefix = self.store.prefix + b"h/"
        while True:
            try:
                client = self.store.worker.client()
                found = await client.get_prefix(prefix)
                for kv in found:
                    self._on_request(kv.key, kv.value)
                watch = await client.watch_prefix(prefix, start_revision=found.header.revision + 1)
                async for event in watch:
                    if event.kind == "PUT":
                        self._on_request(event.kv.key, event.kv.value)
            except (aetcd.exceptions.ClientError, StoreUnavailable, ValueError, KeyError):
                pass
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # close()
                # else gRPC cancelled the stream (its channel was closed): watch again
            await asyncio.sleep(0.2)  # then watch again (the keeper also scans)

    async def _scan_requests(self, client: Any) -> None:
        for kv in await client.get_prefix(self.store.prefix + b"h/"):
            self._on_request(kv.key, kv.value)

    def _on_request(self, key: bytes, value: bytes) -> None:
        sid = key.rsplit(b"/", 1)[-1].decode()
        try:
            requester, holder, epoch = decode_request(value)
        except (ValueError, KeyError, TypeError):
            return
        if holder != self.node_id or requester == self.node_id:
            return
        with self._lock:  # a request names the epoch it saw: a stale one is ignored
            mine = self._owned.get(sid)
        if mine is None and sid not in self._pending:
            # etcd says this node holds it, the node does not know: a create or transfer
            # whose answer was lost (StoreUnavailable) committed after all. Not forwarded
            # here, so give the key up (only if it is still that very key). One whose
            # answer is still on its way is left alone (the keeper's scan asks again).
            task = self._release_token(sid, owner_token(self.node_id, epoch))
            self.store.worker.loop.create_task(task)
        elif mine == epoch and (self._on_handover is None or self._on_handover(sid, requester)):
            self._drop(sid, "released")  # at once: no more forwarding, no second callback
            task = self._release_token(sid, owner_token(self.node_id, epoch))
            self.store.worker.loop.create_task(task)

    async def _release_token(self, sid: str, token: bytes) -> None:
        async def run(client: Any) -> None:
            okey = self.store.owner_key(sid)
            tx = client.transactions
            await client.transaction(
                compare=[tx.value(okey) == token], success=[tx.delete(okey)], failure=[]
            )

        with contextlib.suppress(StoreUnavailable):
            await self.store.worker.guarded(run)

    @contextlib.contextmanager
    def _pending_on(self, sid: str) -> Iterator[None]:
        self._pending.add(sid)
        try:
            yield
        finally:
            self._pending.discard(sid)

    # -- ownership queries ------------------------------------------------------------------

    def owner_epoch(self, session_id: str) -> int | None:
        """The epoch this node holds the session at, or None if it does not hold it."""
        with self._lock:
            return self._owned.get(session_id)

    def owned(self) -> list[str]:
        with self._lock:
            return sorted(self._owned)

    def may_forward(self, session_id: str, now: float | None = None) -> bool:
        """True iff this node holds the session and its lease certainly still holds."""
        with self._lock:
            held = session_id in self._owned
        return held and self.fence.may_forward(self._clock() if now is None else now)

    def _take(self, sid: str, epoch: int, change: str) -> None:
        with self._lock:
            self._owned[sid] = epoch
        self._note(sid, change, epoch)

    def _drop(self, sid: str, change: str) -> int | None:
        with self._lock:
            epoch = self._owned.pop(sid, None)
        if epoch is not None:
            self._note(sid, change, epoch)
        return epoch

    def _note(self, sid: str, change: str, epoch: int) -> None:
        self.history.append(OwnershipChange(sid, change, epoch, self._clock()))

    def _require_lease(self) -> None:
        if not self.fence.may_forward(self._clock()):
            raise StoreUnavailable(f"node {self.node_id}: lease fence closed")

    # -- the SessionStore protocol, fenced ------------------------------------------------------

    def get(self, session_id: str) -> SessionRecord | None:
        return self.store.get(session_id)

    def __len__(self) -> int:
        return len(self.store)

    def create(
        self, record: SessionRecord, wrapped_keys: bytes = b"", index: int | None = None
    ) -> bool:
        """Create the entry and take ownership of it in one txn (owner epoch 1); with
        ``index``, also the receiver-index key (which must not exist yet)."""
        self._require_lease()
        sid = record.session_id
        okey = self.store.owner_key(sid)
        take = [aetcd.transactions.Put(okey, owner_token(self.node_id, 1), lease=self.lease_id)]
        ikey = self.store.index_key(index) if index is not None else None
        if ikey is not None:
            take.append(aetcd.transactions.Put(ikey, sid.encode()))

        async def run(client: Any) -> bool:
            guard = [client.transactions.version(okey) == 0]
            if ikey is not None:
                guard.append(client.transactions.version(ikey) == 0)
            with self._pending_on(sid):
                ok = await self.store.acreate(client, record, wrapped_keys, take, guard)
                if ok:  # on the worker loop, before any hand-over request is looked at
                    self._take(sid, 1, "created")
            return ok

        return self.store.worker.call(run)

    def cas(
        self,
        session_id: str,
        expected_version: int,
        new_record: SessionRecord,
        wrapped_keys: bytes | None = None,
    ) -> bool:
        """The store's CAS, granted only while this node's ownership key is in place."""
        check_cas_arguments(session_id, expected_version, new_record)
        epoch = self.owner_epoch(session_id)
        if epoch is None:
            return self.store.note_conflict()
        token = owner_token(self.node_id, epoch)

        async def run(client: Any) -> bool:
            guard = [client.transactions.value(self.store.owner_key(session_id)) == token]
            return await self.store.acas(
                client, session_id, expected_version, new_record, wrapped_keys, guard
            )

        return self.store.worker.call(run)

    def refresh(self, record: SessionRecord) -> bool:
        """A new ``resume`` at the same version (a counter reservation), fenced like
        :meth:`cas`: only while this node's ownership key is in place."""
        sid = record.session_id
        epoch = self.owner_epoch(sid)
        if epoch is None:
            return self.store.note_conflict()
        token = owner_token(self.node_id, epoch)

        async def run(client: Any) -> bool:
            guard = [client.transactions.value(self.store.owner_key(sid)) == token]
            return await self.store.acas(
                client, sid, record.state_version, record, None, guard, refresh=True
            )

        return self.store.worker.call(run)

    def delete(
        self, session_id: str, expected_version: int | None = None, index: int | None = None
    ) -> bool:
        """Remove the entry and this node's ownership key (the session ended); with
        ``index``, also its receiver-index key."""
        epoch = self.owner_epoch(session_id)
        if epoch is None:
            return self.store.note_conflict()
        token = owner_token(self.node_id, epoch)
        okey = self.store.owner_key(session_id)

        async def run(client: Any) -> bool:
            tx = client.transactions
            ops = [tx.delete(okey)]
            if index is not None:
                ops.append(tx.delete(self.store.index_key(index)))
            return await self.store.adelete(
                client, session_id, expected_version, ops, [tx.value(okey) == token]
            )

        ok = self.store.worker.call(run)
        if ok:
            self._drop(session_id, "deleted")
        return ok

    # -- transfer -------------------------------------------------------------------------------

    def release(self, session_id: str) -> bool:
        """Give the session up (call after this node stopped forwarding it)."""
        return self.store.worker.call(lambda c: self.arelease(c, session_id))

    async def arelease(self, client: Any, session_id: str) -> bool:
        epoch = self._drop(session_id, "released")  # local fence first: no more forwarding
        if epoch is None:
            return False
        okey = self.store.owner_key(session_id)
        tx = client.transactions
        ok, _ = await client.transaction(
            compare=[tx.value(okey) == owner_token(self.node_id, epoch)],
            success=[tx.delete(okey)],
            failure=[],
        )
        return bool(ok)

    def acquire(
        self, session_id: str, expected_version: int, new_record: SessionRecord, wait: float
    ) -> Transfer:
        """Move the session to this node by CAS (see the module docstring); blocks.

        ``new_record`` is the record after the move (owner_node = this node, a newer
        state_version); ``wait`` bounds how long a live owner may take to hand over.
        StoreUnavailable when etcd does not answer in time (fail closed).
        """
        timeout = self._check_acquire(session_id, expected_version, new_record, wait)
        return self.store.worker.call(
            lambda c: self._aacquire(c, session_id, expected_version, new_record, wait), timeout
        )

    def submit_acquire(
        self, session_id: str, expected_version: int, new_record: SessionRecord, wait: float
    ) -> concurrent.futures.Future[Transfer]:
        """:meth:`acquire` without waiting: a future an asyncio caller awaits through
        ``asyncio.wrap_future`` (its loop keeps running meanwhile)."""
        timeout = self._check_acquire(session_id, expected_version, new_record, wait)
        return self.store.worker.submit(
            lambda c: self._aacquire(c, session_id, expected_version, new_record, wait), timeout
        )

    def _check_acquire(
        self, session_id: str, expected_version: int, new_record: SessionRecord, wait: float
    ) -> float:
        """Misuse checks (ValueError), the lease (StoreUnavailable); the call's bound."""
        check_cas_arguments(session_id, expected_version, new_record)
        if new_record.owner_node != self.node_id:
            raise ValueError(f"acquire by {self.node_id} with a record owned by "
                             f"{new_record.owner_node}")  # fmt: skip
        self._require_lease()
        return wait + 2 * self.store.worker.timeout

    async def _read_both(self, client: Any, sid: str) -> tuple[StoredSession | None, Any]:
        tx = client.transactions
        skey, okey = self.store.session_key(sid), self.store.owner_key(sid)
        _, responses = await client.transaction(
            compare=[], success=[tx.get(skey), tx.get(okey)], failure=[]
        )
        return self.store.decode_kv(sid, first_kv(responses, 0)), first_kv(responses, 1)

    async def _aacquire(
        self, client: Any, sid: str, expected: int, record: SessionRecord, wait: float
    ) -> Transfer:
        deadline = self._clock() + wait
        request: bytes | None = None
        previous = ""
        while True:
            entry, owner_kv = await self._read_both(client, sid)
            if entry is not None and entry.record.state_version == expected and owner_kv is None:
                break
            if entry is None or entry.record.state_version != expected:
                await self._withdraw(client, sid, request)
                return self._lost_race(entry, previous)
            previous, held_epoch = decode_owner(owner_kv.value)
            if self._adopt(sid, previous, held_epoch, owner_kv.lease, entry):
                return await self._update_own(client, sid, entry, record)
            if self._clock() >= deadline:
                await self._withdraw(client, sid, request)
                return Transfer(Outcome.OWNED_ELSEWHERE, entry.owner_epoch, previous, entry.record)
            if request is None:
                request = request_value(self.node_id, previous, entry.owner_epoch)
                await client.put(self.store.handover_key(sid), request, lease=self.lease_id)
            await asyncio.sleep(POLL)
        # the previous owner: the holder seen, or the entry's last writer when its lease
        # had already expired (a dead owner's key is gone, its record still names it)
        previous = previous or entry.record.owner_node
        with self._pending_on(sid):
            transfer = await self._commit_transfer(client, sid, entry, record, previous)
        if transfer.outcome != Outcome.GRANTED:
            await self._withdraw(client, sid, request)
        return transfer

    async def _withdraw(self, client: Any, sid: str, request: bytes | None) -> None:
        """Delete this node's hand-over request (only its own, still unchanged)."""
        if request is None:
            return
        hkey = self.store.handover_key(sid)
        tx = client.transactions
        await client.transaction(
            compare=[tx.value(hkey) == request], success=[tx.delete(hkey)], failure=[]
        )

    async def _commit_transfer(
        self, client: Any, sid: str, entry: StoredSession, record: SessionRecord, previous: str
    ) -> Transfer:
        epoch = entry.owner_epoch + 1
        skey, okey = self.store.session_key(sid), self.store.owner_key(sid)
        hkey = self.store.handover_key(sid)
        written = StoredSession(record, epoch, entry.wrapped_keys, 0)
        tx = client.transactions
        ok, responses = await client.transaction(
            compare=[tx.mod(skey) == entry.mod_revision, tx.version(okey) == 0],
            success=[
                tx.put(skey, written.encode()),
                tx.put(okey, owner_token(self.node_id, epoch), lease=self.lease_id),
                tx.delete(hkey),
            ],
            failure=[tx.get(skey)],
        )
        if not ok:
            fresh = self.store.decode_kv(sid, first_kv(responses, 0))
            return self._lost_race(fresh, previous)
        revision = responses[0].response_put.header.revision
        self.store.remember(sid, StoredSession(record, epoch, entry.wrapped_keys, revision))
        self._take(sid, epoch, "acquired")
        return Transfer(Outcome.GRANTED, epoch, previous, record)

    def _adopt(self, sid: str, holder: str, epoch: int, lease: int, entry: StoredSession) -> bool:
        """True when this node holds the session; a key on its live lease that it did not
        know of (a lost answer that committed) is taken back into its table."""
        if holder != self.node_id or epoch != entry.owner_epoch:
            return False
        if self.owner_epoch(sid) == epoch:
            return True
        if lease != self.lease_id:
            return False
        self._take(sid, epoch, "adopted")
        return True

    async def _update_own(
        self, client: Any, sid: str, entry: StoredSession, record: SessionRecord
    ) -> Transfer:
        """A reattach on the node that owns the session: a plain fenced CAS, same epoch."""
        token = owner_token(self.node_id, entry.owner_epoch)
        guard = [client.transactions.value(self.store.owner_key(sid)) == token]
        version = entry.record.state_version
        if await self.store.acas(client, sid, version, record, None, guard):
            return Transfer(Outcome.GRANTED, entry.owner_epoch, self.node_id, record)
        fresh = await self.store.aentry(client, sid)  # acas counted the conflict
        if fresh is None:
            return Transfer(Outcome.NOT_FOUND, 0, self.node_id, None)
        return Transfer(Outcome.CONFLICT, fresh.owner_epoch, self.node_id, fresh.record)

    def _lost_race(self, entry: StoredSession | None, previous: str) -> Transfer:
        self.store.note_conflict()
        if entry is None:
            return Transfer(Outcome.NOT_FOUND, 0, previous, None)
        return Transfer(Outcome.CONFLICT, entry.owner_epoch, previous, entry.record)
