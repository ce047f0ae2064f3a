"""A gateway node of a cluster on etcd (DESIGN D15b, docs/cluster.md).

With ``[cluster]`` in ``gateway.toml`` the gateway's store is etcd and sessions move
between the nodes that share one gateway identity. Three components, owned by the
:class:`~tunnel.gateway.runtime.GatewayRuntime`:

- :class:`ClusterStore`: the runtime's :class:`~tunnel.ownership.ResumableStore`, driven
  through :class:`~tunnel.ownership.etcd_owner.NodeOwnership`: a node creates the sessions
  it handshakes (owner epoch 1, with a receiver-index key ``P i/<index>`` so that another
  node finds the session from a datagram), and writes only what it owns (every write a
  txn comparing the entry's revision and this node's ownership key: AT-51). The sealed
  resume state (keys, counters: tunnel/gateway/resume.py) is the record's ``resume``.
- :class:`ClusterNode`: the ownership side of the loop.
  * **Takeover**: a datagram whose receiver index no session here has is held (the newest
    per index) while a task looks the index up and moves the session here on the store's
    worker thread (never on the loop): a live owner is asked and hands over, a dead one's
    lease expires; the transfer writes ``owner_epoch + 1`` and ``state_version + 1`` by CAS.
    The session is then resumed from its sealed record: it seals only from the record's
    ``send_from`` on, above every counter any node reserved, and reserves its own block
    before its first datagram leaves (D15a's rule, unchanged: no (key, nonce) reuse across
    a move). Then the held datagram is fed to it: a reattach is validated as usual.
  * **Hand-over** (another node asks): the session is forgotten here on the loop
    (:meth:`GatewaySessions.release`: no TERMINATE, what is queued for it is voided), and
    only then is the ownership key deleted.
  * **Fence**: before anything leaves (every flush), the node's lease fence is checked with
    a fresh clock; closed, nothing is sent (counted ``owner_fenced``, one DIAGNOSTIC per
    closing). A lost lease (etcd expired it: a node frozen past its TTL, cut from etcd)
    forgets every session here before the fence could open again under a new lease.
  * **Events** SESSION_OWNER_ACQUIRED / TRANSFERRED / REJECTED / CONFLICT / RELEASED
    (tunnel/core/events.py ``SessionOwner``), with the node's CLOCK_MONOTONIC ``mono``;
    RELEASED ends each ownership interval with what was forwarded in it.
- :class:`RouteHook`: inner routing follows the owner (s8-clusternet's
  ``tunnel/gateway/routehook.py`` when present; a no-op otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from tunnel.core.admission import TokenBucket
from tunnel.core.aead import SessionCipher
from tunnel.core.constants import MSG_CONTROL, MSG_DATA
from tunnel.core.drops import Drop
from tunnel.core.events import (
    Diagnostic,
    EventBase,
    Reason,
    SessionOwner,
    SessionOwnerConflict,
    SessionOwnerRejected,
    SessionOwnerReleased,
    SessionOwnerTransferred,
)
from tunnel.core.gateway import GatewaySessions
from tunnel.core.gateway_paths import Addr
from tunnel.core.gateway_resume import ResumeState
from tunnel.core.gateway_session import GatewaySession
from tunnel.core.standby import NONCE_LEN, seal_standby_ack
from tunnel.core.wire import STATE_CODES, Probe, ProbeAck, ReattachRequest, parse_control
from tunnel.gateway.resume import RESUMABLE, decode_state
from tunnel.observability.metrics import MetricFamily, labelled, single
from tunnel.ownership import SessionRecord, StoreUnavailable
from tunnel.ownership.etcd import EtcdSessionStore, StoredSession
from tunnel.ownership.etcd_owner import NodeOwnership, Outcome, Transfer
from tunnel.ownership.statekey import StateSealer

if TYPE_CHECKING:
    from tunnel.gateway.config import GatewayConfig

HANDOVER_WAIT_S: Final = 1.5
"""How long a takeover waits for a live owner to hand over."""
MAX_PENDING: Final = 256
"""Takeovers in flight at once (each holds one datagram); more are counted and dropped."""
NOT_FOUND_S: Final = 1.0
"""A receiver index etcd does not know is not looked up again for this long."""
LOOKUP_RATE: Final = 500.0
LOOKUP_BURST: Final = 100.0
"""Lookups a node starts per second (and at once): datagrams with unknown receiver indexes
(random ones, a flood) cost etcd at most this many reads."""
LOST_S: Final = 30.0
"""A session id etcd does not know (the client asks whether it was lost): the client's
next INIT naming it gets a new session for this long."""


class RouteHook:
    """Inner routing follows the owner: called when this node begins and ends owning a
    session (non-blocking). This one does nothing; s8-clusternet's
    ``tunnel.gateway.routehook.RouteHook`` replaces it when present."""

    @classmethod
    def from_config(cls, cfg: GatewayConfig | None) -> RouteHook:
        return cls()

    def acquired(self, session_id: str, inner: list[str]) -> None:
        """This node serves ``session_id`` (inner addresses ``inner``) from now on."""

    def released(self, session_id: str, inner: list[str]) -> None:
        """This node no longer serves ``session_id``."""


def route_hook(cfg: GatewayConfig | None) -> Any:
    """The configured route hook (tunnel/gateway/routehook.py if it exists)."""
    try:
        from tunnel.gateway import routehook  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        return RouteHook.from_config(cfg)
    hook = routehook.RouteHook.from_config(cfg.route) if cfg is not None else None
    return hook if hook is not None else RouteHook.from_config(cfg)


def open_cluster(
    cfg: GatewayConfig, gateway: GatewaySessions, make_addr: Callable[..., Addr]
) -> ClusterNode:
    """:meth:`ClusterNode.open`; StateError (the program's exit) when the state key cannot
    be used or etcd does not grant the lease."""
    from tunnel.gateway.resume import StateError
    from tunnel.ownership.statekey import StateKeyError

    try:
        return ClusterNode.open(cfg, gateway, make_addr)
    except StateKeyError as exc:
        raise StateError(f"state_key_file {exc}", key=True) from None
    except StoreUnavailable as exc:
        raise StateError(f"cluster: etcd did not grant this node a lease: {exc}") from None


class ClusterStore:
    """The gateway's ResumableStore on etcd, fenced through NodeOwnership (module docs)."""

    def __init__(self, node: NodeOwnership, index_of: Callable[[str], int | None]) -> None:
        self.node = node
        self._index_of = index_of
        self.created: list[str] = []
        """Sessions created since the cluster node last looked (their ownership began)."""
        self.deleted: list[str] = []

    @property
    def persistent(self) -> bool:
        return True

    def get(self, session_id: str) -> SessionRecord | None:
        return self.node.get(session_id)

    def create(self, record: SessionRecord) -> bool:
        ok = self.node.create(record, index=self._index_of(record.session_id))
        if ok:
            self.created.append(record.session_id)
        return ok

    def cas(self, session_id: str, expected_version: int, new_record: SessionRecord) -> bool:
        return self.node.cas(session_id, expected_version, new_record)

    def delete(self, session_id: str, expected_version: int | None = None) -> bool:
        ok = self.node.delete(session_id, expected_version, self._index_of(session_id))
        if ok:
            self.deleted.append(session_id)
        return ok

    def refresh(self, record: SessionRecord) -> bool:
        return self.node.refresh(record)

    def take_changes(self) -> tuple[list[str], list[str]]:
        """The sessions created and deleted since the last call."""
        created, self.created = self.created, []
        deleted, self.deleted = self.deleted, []
        return created, deleted

    def records(self) -> list[SessionRecord]:
        """None to resume at start: a node takes sessions over when clients reach it."""
        return []

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        yield  # every write is its own etcd transaction

    def __len__(self) -> int:
        return len(self.node)


@dataclass(slots=True)
class Interval:
    """One ownership interval of one session on this node."""

    index: int
    peer_index: int
    owner_epoch: int
    inner: list[str]
    packed: list[bytes]
    version: int = 0
    """The session's state version when it was taken away from this node."""
    forwarded: int = 0
    first: float | None = None
    last: float | None = None


@dataclass(slots=True)
class Pending:
    """A takeover in flight: the newest datagram that asked for it."""

    data: bytes
    addr: Addr | None


class ClusterNode:
    """The ownership side of one gateway node's loop (module docstring)."""

    def __init__(
        self,
        gateway: GatewaySessions,
        node: NodeOwnership,
        sealer: StateSealer,
        make_addr: Callable[..., Addr],
        hook: Any = None,
        clock: Callable[[], float] = time.monotonic,
        urandom: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._gateway: GatewaySessions = gateway
        self._urandom = urandom
        self.standby_acks = 0
        """Probes of sessions this node does not own answered with a standby ack."""
        self.node = node
        self.node_id = node.node_id
        self._sealer = sealer
        self._make_addr = make_addr
        self.hook: Any = hook if hook is not None else RouteHook()
        self._clock = clock
        self.store: ClusterStore = ClusterStore(node, self._index_of)
        self.intervals: dict[str, Interval] = {}
        """Sessions this node serves, with their ownership interval."""
        self._by_peer: dict[int, Interval] = {}
        self._pending: dict[int | str, Pending] = {}
        """Takeovers in flight, by receiver index (with the datagram held) or session id."""
        self._not_found: dict[int | str, float] = {}
        self._lookups = TokenBucket(LOOKUP_RATE, LOOKUP_BURST, clock())
        """Lookups started (etcd reads for datagrams of sessions not held here)."""
        self._moving: set[str] = set()
        """Sessions whose transfer to this node is in flight."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._input: Callable[..., None] | None = None
        self._run_input: Callable[..., None] = lambda *a: None
        self._tasks: set[asyncio.Task[None]] = set()
        self._lost_seen = 0
        self._deadline = -1.0
        self._fenced = False
        self.fencing_events = 0
        """Times the fence closed while this node served sessions."""
        self.takeovers: dict[str, int] = {}
        """Takeover outcomes: granted, conflict, owned_elsewhere, not_found, unavailable."""
        self.store_latency = 0.0
        """Seconds the last takeover's store calls took."""

    # -- lifecycle -----------------------------------------------------------------------

    @classmethod
    def open(
        cls, cfg: GatewayConfig, gateway: GatewaySessions, make_addr: Callable[..., Addr]
    ) -> ClusterNode:
        """The node of ``cfg.cluster`` (its lease not granted yet: :meth:`start`)."""
        from tunnel.ownership.statekey import load_state_key

        cluster = cfg.cluster
        assert cluster is not None
        sealer = StateSealer(load_state_key(cluster.state_key_file))
        store = EtcdSessionStore(cluster.endpoints, cluster.prefix)
        holder: list[ClusterNode] = []
        node = NodeOwnership(
            store, cluster.node_id, ttl=cluster.lease_ttl,
            on_handover=lambda sid, requester: holder[0].on_handover(sid, requester),
        )  # fmt: skip
        self = cls(gateway, node, sealer, make_addr, route_hook(cfg))
        holder.append(self)
        try:
            node.start()  # the lease: bounded, StoreUnavailable when etcd does not answer
        except BaseException:
            self.close()
            raise
        return self

    @property
    def sealer(self) -> StateSealer:
        return self._sealer

    def store_and_sealer(self) -> tuple[ClusterStore, StateSealer]:
        return self.store, self._sealer

    def attach(self, loop: asyncio.AbstractEventLoop, run_input: Callable[..., None]) -> None:
        """Serve on ``loop``: take datagrams for unknown sessions from now on.
        ``run_input(fn, *args)``: the driver's guarded input (``fn(now, *args)``, pump)."""
        self._loop = loop
        self._run_input = run_input
        self._input = lambda *a: self._soon(loop, run_input, *a)
        self._lost_seen = self.node.leases_lost
        self._gateway.set_cluster_hooks(self.on_unknown, self.on_unknown_named)

    @staticmethod
    def _soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
        loop.call_soon(fn, *args)

    def shutdown(self, now: float) -> None:
        """A clean stop (after the sessions were saved): forget every session here, then
        revoke the lease (their keys go with it; another node takes each over at once)."""
        self._gateway.set_cluster_hooks(None, None)
        for task in list(self._tasks):
            task.cancel()
        for sid in list(self.intervals):
            self._release(sid)
            self._end(sid, now, Reason.GATEWAY_SHUTDOWN)

    def close(self) -> None:
        self.node.close(revoke=True)
        self.node.store.close()

    # -- the interval bookkeeping ----------------------------------------------------------

    def _index_of(self, session_id: str) -> int | None:
        for index, s in self._gateway.sessions.items():
            if s.machine.session_id == session_id:
                return index
        return None

    def _base(self, sid: str, now: float, version: int) -> EventBase:
        policy = self._gateway.policy
        return {
            "ts_ms": self._gateway.ts_ms(now), "session_id": sid, "node_id": self.node_id,
            "policy_version": policy.policy_version if policy else "invalid",
            "state_version": version,
        }  # fmt: skip

    def _begin(self, s: GatewaySession, epoch: int, previous: str, now: float) -> None:
        sid = s.machine.session_id
        inner = [a for a in (s.client.inner_address, s.client.inner_address6) if a]
        packed = [ipaddress.ip_address(a).packed for a in inner]
        iv = Interval(s.index, s.peer_index, epoch, inner, packed)
        self.intervals[sid] = iv
        self._by_peer[s.peer_index] = iv
        s.announce_owner(epoch)  # the client is told at once (NODE_INFO)
        base = self._base(sid, now, s.machine.version)
        mono = self._clock()
        self._gateway.emit(SessionOwner(**base, owner_epoch=epoch, mono=mono, peer_node=previous))
        if previous and previous != self.node_id:
            self._gateway.emit(
                SessionOwnerTransferred(**base, owner_epoch=epoch, mono=mono, peer_node=previous)
            )
        self.hook.acquired(sid, inner)

    def _release(self, sid: str) -> None:
        """Forget ``sid`` here (no word to the client); its interval keeps its version."""
        s = self._gateway.release(sid)
        iv = self.intervals.get(sid)
        if s is not None and iv is not None:
            iv.version = s.machine.version

    def _end(
        self, sid: str, now: float, reason: Reason, peer: str = "", mono: float | None = None
    ) -> None:
        iv = self.intervals.pop(sid, None)
        if iv is None:
            return
        self._by_peer.pop(iv.peer_index, None)
        s = self._gateway.sessions.get(iv.index)
        version = s.machine.version if s is not None else iv.version
        base = self._base(sid, now, version)
        at = self._clock() if mono is None else mono
        fields = {
            "owner_epoch": iv.owner_epoch, "mono": at, "peer_node": peer,
            "reason_code": reason, "forwarded": iv.forwarded,
            "first_forward_mono": iv.first, "last_forward_mono": iv.last,
        }  # fmt: skip
        if reason is Reason.OWNERSHIP_MOVED:
            self._gateway.emit(SessionOwnerTransferred(**base, **fields))  # type: ignore[arg-type]
        self._gateway.emit(SessionOwnerReleased(**base, **fields))  # type: ignore[arg-type]
        self.hook.released(sid, iv.inner)

    def after_mirror(self, now: float) -> None:
        """Sessions whose record was created (ownership began, epoch 1) or deleted (the
        session ended) in this flush."""
        created, deleted = self.store.take_changes()
        for sid in created:
            index = self._index_of(sid)
            s = self._gateway.sessions.get(index) if index is not None else None
            if s is not None:
                self._begin(s, 1, "", now)
        for sid in deleted:
            self._end(sid, now, self._end_reason(sid))

    def _end_reason(self, sid: str) -> Reason:
        iv = self.intervals.get(sid)
        s = self._gateway.sessions.get(iv.index) if iv is not None else None
        reason = s.end_reason if s is not None else None
        return reason if reason is not None else Reason.PEER_TERMINATED

    def not_authoritative(self, sid: str, now: float) -> bool:
        """The store refused a write of ``sid`` (another node owns it, or the store is
        unavailable): forget it here without a word to the client (the owner serves it).
        True: handled (the caller does not terminate it)."""
        self._release(sid)
        if self.node.fence.may_forward(self._clock()):
            self._end(sid, now, Reason.OWNERSHIP_CONFLICT)
        else:  # its lease lapsed (a node frozen or cut off): it ended at the fence
            self._end(sid, now, Reason.OWNER_FENCED, mono=self._fence_end())
        return True

    # -- what leaves ---------------------------------------------------------------------

    def may_send(self, now: float) -> bool:
        """Before anything leaves: the fence, with a fresh clock (module docstring)."""
        fresh = self._clock()
        node = self.node
        open_ = node.fence.may_forward(fresh)
        if node.leases_lost != self._lost_seen:
            self._lost_seen = node.leases_lost
            self._lose_all(now)
            open_ = False
        if open_:
            self._deadline = node.fence.deadline
            self._fenced = False
            return True
        if not self._fenced and self.intervals:
            self._fenced = True
            self.fencing_events += 1
            self._gateway.emit(
                Diagnostic(
                    **self._base("", now, 0), reason_code=Reason.OWNER_FENCED,
                    detail=f"lease fence closed: {len(self.intervals)} session(s) not "
                    "forwarded until the lease is refreshed", state="",
                )
            )  # fmt: skip
        return False

    def _lose_all(self, now: float) -> None:
        """etcd expired this node's lease: every session here may be another node's now.
        Its interval ended when its fence closed."""
        end = self._fence_end()
        for sid in list(self.intervals):
            self._release(sid)
            self._end(sid, now, Reason.OWNER_FENCED, mono=end)

    def _fence_end(self) -> float:
        """When this node's ownership effectively ended: its fence's last deadline seen
        open (or now, if earlier)."""
        now = self._clock()
        return min(now, self._deadline) if self._deadline > 0 else now

    def fenced(self, datagrams: int, packets: int) -> None:
        for _ in range(datagrams + packets):
            self._gateway.report.count_drop(Drop.OWNER_FENCED)

    def forwarded(
        self,
        out: Sequence[tuple[Addr, bytes]],
        packets: Sequence[bytes],
        before: float,
        after: float,
    ) -> None:
        """Count what left per ownership interval (transport datagrams by their receiver
        index, inner packets by their source address), sent between ``before`` and
        ``after`` (monotonic: the interval's forwarding bounds hold every send)."""
        if not self.intervals:
            return
        by_peer = self._by_peer
        for _, data in out:
            iv = by_peer.get(int.from_bytes(data[4:8], "little")) if data[0] >= MSG_DATA else None
            if iv is not None:
                _note(iv, before, after)
        if packets:
            by_inner = {a: iv for iv in self.intervals.values() for a in iv.packed}
            for packet in packets:
                iv = by_inner.get(_source(packet))
                if iv is not None:
                    _note(iv, before, after)

    # -- hand-over (another node asks) -----------------------------------------------------

    def on_handover(self, sid: str, requester: str) -> bool:
        """The store's worker thread: stop forwarding on the loop, then release there."""
        loop, run = self._loop, self._input
        if loop is None or run is None:
            return True  # not serving yet: nothing forwarded here
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing forwards
            loop.call_soon_threadsafe(self._run_input, self._hand_over, sid, requester)
        return False

    def _hand_over(self, now: float, sid: str, requester: str) -> None:
        self._release(sid)  # nothing more of it leaves from here
        if self.node.fence.may_forward(self._clock()):
            self._end(sid, now, Reason.OWNERSHIP_MOVED, peer=requester)
        else:  # a request seen late (the node was frozen): its ownership ended at the fence
            self._end(sid, now, Reason.OWNER_FENCED, peer=requester, mono=self._fence_end())
        node = self.node
        with contextlib.suppress(StoreUnavailable):
            node.store.worker.submit(lambda c: node.arelease(c, sid))

    # -- takeover (a datagram for a session held elsewhere) --------------------------------

    def on_unknown(self, index: int, data: bytes, addr: Addr, now: float) -> bool:
        """The core's hook (module docstring): True when the datagram is held for a lookup."""
        pending = self._pending.get(index)
        if pending is not None:
            pending.data, pending.addr = data, addr
            return True
        if self._not_found.get(index, 0.0) > now or self._loop is None:
            return False
        if not self._lease_open(index, now):
            return False
        return self._start(index, Pending(data, addr))

    def on_unknown_named(self, previous: bytes, now: float) -> bool:
        """The core's hook for a HANDSHAKE_INIT naming a session not held here (the client
        asks whether it was lost, D15c): True (the INIT is not answered) unless etcd has
        no such session either; meanwhile the node takes it over if it can."""
        sid = previous.hex()
        if self._not_found.get(sid, 0.0) > now or self._loop is None:
            return False  # lost for the whole cluster: a new session, linked to it
        if sid in self._pending or sid in self.intervals or self._pending:
            return True  # one takeover at a time answers the question
        if not self._lease_open(sid, now):
            return True
        return self._start(sid, Pending(b"", None))

    def _lease_open(self, key: int | str, now: float) -> bool:
        """A takeover needs this node's lease: without it (no quorum, cut from etcd) the
        move is denied, once a while per key (fail closed)."""
        if self.node.fence.may_forward(self._clock()):
            return True
        if isinstance(key, int):  # (a session id there means "lost": never set here)
            self._not_found[key] = now + NOT_FOUND_S
        self._gateway.emit(
            SessionOwnerRejected(
                **self._base(key if isinstance(key, str) else "", now, 0), owner_epoch=0,
                mono=self._clock(), reason_code=Reason.STORE_UNAVAILABLE,
            )
        )  # fmt: skip
        return False

    def _start(self, key: int | str, pending: Pending) -> bool:
        if len(self._pending) >= MAX_PENDING or self._loop is None:
            return False
        if not self._lookups.allow(self._clock()):  # etcd reads are bounded, whatever comes
            self._count("rate_limited")
            return False
        self._pending[key] = pending
        task = self._loop.create_task(self._take_over(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _take_over(self, key: int | str) -> None:
        started = self._clock()
        try:
            entry, transfer = await self._acquire(key)
        except StoreUnavailable as exc:
            self._count("unavailable")
            self._report(key, None, Reason.STORE_UNAVAILABLE, str(exc))
            return
        except ValueError as exc:  # a record that cannot move (its version at the maximum)
            self._count("error")
            self._report(key, None, Reason.INVARIANT_VIOLATION, str(exc))
            return
        finally:
            self.store_latency = self._clock() - started
        if transfer is None:
            self._pending.pop(key, None)
            return
        outcome = transfer.outcome
        self._count(str(outcome))
        if outcome is Outcome.GRANTED:
            assert self._input is not None and entry is not None
            self._input(self._install, key, entry, transfer)
        elif outcome is Outcome.CONFLICT:
            self._report(key, transfer, Reason.OWNERSHIP_CONFLICT, "another node won the move")
        elif outcome is Outcome.OWNED_ELSEWHERE:
            self._report(key, transfer, Reason.OWNED_ELSEWHERE, "the owner did not hand over")
        else:
            self._pending.pop(key, None)

    async def _lookup(self, key: int | str) -> StoredSession | None:
        store = self.node.store
        if isinstance(key, int):
            future = store.worker.submit(lambda c: store.alookup(c, key))
        else:
            future = store.worker.submit(lambda c: store.aentry(c, key))
        return await asyncio.wrap_future(future)

    async def _acquire(self, key: int | str) -> tuple[StoredSession | None, Transfer | None]:
        """Look ``key`` (a receiver index or a session id) up and move its session here
        (worker thread); (entry, None) when there is nothing to move."""
        entry = await self._lookup(key)
        if entry is None or entry.record.state not in RESUMABLE:
            self._not_found[key] = self._clock() + (NOT_FOUND_S if isinstance(key, int) else LOST_S)
            if len(self._not_found) > 4 * MAX_PENDING:
                self._not_found.clear()
            self._count("not_found")
            return entry, None
        record = entry.record
        if record.session_id in self.intervals or record.session_id in self._moving:
            return entry, None  # here already, or on its way
        held = self._pending.get(key)
        if held is not None and held.data and not self._asks_to_move(key, record, held.data):
            self._count("standby")
            return entry, None
        new = record.evolve(
            state_version=record.state_version + 1, owner_node=self.node_id,
            updated_ms=int(time.time() * 1000),
        )  # fmt: skip
        self._moving.add(record.session_id)
        try:
            future = self.node.submit_acquire(
                record.session_id, record.state_version, new, HANDOVER_WAIT_S
            )
            transfer = await asyncio.wrap_future(future)
        except BaseException:
            self._moving.discard(record.session_id)
            raise
        if transfer.outcome is not Outcome.GRANTED:
            self._moving.discard(record.session_id)
        return entry, transfer

    def _asks_to_move(self, key: int | str, record: SessionRecord, data: bytes) -> bool:
        """Does the client move its session here? DATA: yes (it sends DATA only on its
        binding). CONTROL: only a REATTACH_REQUEST; a probe of a standby path is answered
        with a standby ack (tunnel/core/standby.py), any other control message ignored.
        The datagram is opened with a throwaway cipher from the sealed record: no replay
        window of the session is touched (docs/cluster.md, "Standby paths")."""
        if data[0] != MSG_CONTROL:
            return True
        sid = record.session_id
        plain = self._sealer.open(sid, record.resume) if record.resume else None
        state = decode_state(sid, plain, self._make_addr) if plain is not None else None
        if state is None:
            return True  # cannot tell: the move is tried, and fails where it is installed
        opened = _read(state, data, self._clock())
        msg = parse_control(opened) if not isinstance(opened, Drop) else opened
        if isinstance(msg, Probe) and self._input is not None:
            held = self._pending.get(key)
            if held is not None and held.addr is not None:
                self._input(self._answer_probe, state, msg, held.addr)
        return isinstance(msg, ReattachRequest)

    def _answer_probe(self, now: float, state: ResumeState, probe: Probe, addr: Addr) -> None:
        """A standby ack: sealed under the standby key with a random nonce, never with a
        counter of the session (the owner's)."""
        code = STATE_CODES.index(state.state) if state.state in STATE_CODES else 0
        ack = ProbeAck(
            probe.probe_id, probe.path_id, self._gateway.ts_ms(now), code, state.binding_epoch, 0
        )
        dgram = seal_standby_ack(
            state.keys.send, state.key_phase, state.peer_index, ack, self._urandom(NONCE_LEN)
        )
        self._gateway.outbox.push(addr, dgram)
        self.standby_acks += 1

    def _install(
        self, now: float, key: int | str, entry: StoredSession, transfer: Transfer
    ) -> None:
        """Loop: the move committed; resume the session here, then feed the held datagram."""
        held = self._pending.pop(key, None)
        record = entry.record
        sid = record.session_id
        self._moving.discard(sid)
        plain = self._sealer.open(sid, record.resume) if record.resume else None
        state = decode_state(sid, plain, self._make_addr) if plain is not None else None
        version = transfer.record.state_version if transfer.record is not None else 0
        s: GatewaySession | str = "its sealed state cannot be opened with this state key"
        if state is not None:
            state = dataclasses.replace(state, state_version=version)
            s = self._gateway.resume(state, now)
        if isinstance(s, str):
            self._give_back(sid, now, version, s)
            return
        self._begin(s, transfer.owner_epoch, transfer.previous_owner, now)
        if held is not None and held.addr is not None:
            self._gateway.receive_datagram(held.data, held.addr, now)

    def _give_back(self, sid: str, now: float, version: int, why: str) -> None:
        """Owned but not servable here: release it at once and say why."""
        node = self.node
        base = self._base(sid, now, version)
        epoch = node.owner_epoch(sid) or 0
        self._gateway.emit(
            SessionOwnerRejected(
                **base, owner_epoch=epoch, mono=self._clock(),
                reason_code=Reason.INVARIANT_VIOLATION, peer_node=why,
            )
        )  # fmt: skip
        with contextlib.suppress(StoreUnavailable):
            node.store.worker.submit(lambda c: node.arelease(c, sid))

    def _report(self, key: int | str, transfer: Transfer | None, reason: Reason, why: str) -> None:
        """A takeover that did not happen: REJECTED or CONFLICT (the datagram is dropped)."""
        self._pending.pop(key, None)
        if self._input is not None:
            self._input(self._emit_refusal, transfer, reason, why)

    def _emit_refusal(
        self, now: float, transfer: Transfer | None, reason: Reason, why: str
    ) -> None:
        record = transfer.record if transfer is not None else None
        sid = record.session_id if record is not None else ""
        base = self._base(sid, now, record.state_version if record is not None else 0)
        cls = SessionOwnerConflict if reason is Reason.OWNERSHIP_CONFLICT else SessionOwnerRejected
        epoch = transfer.owner_epoch if transfer is not None else 0
        peer = transfer.previous_owner if transfer is not None else ""
        self._gateway.emit(
            cls(**base, owner_epoch=epoch, mono=self._clock(), reason_code=reason, peer_node=peer)
        )
        del why

    def _count(self, outcome: str) -> None:
        self.takeovers[outcome] = self.takeovers.get(outcome, 0) + 1

    # -- metrics -------------------------------------------------------------------------

    def metric_families(self) -> list[MetricFamily]:
        """Lease refresh latency, fencing events, store errors and latency, owned sessions,
        takeovers: the gateway's /metrics (one function, whatever renders them)."""
        node = self.node
        c = "jvpn_cluster_"
        return [
            single(c + "lease_refresh_seconds", "Seconds the last acknowledged lease "
                   "keep-alive took.", "gauge", node.refresh_latency),
            single(c + "fencing_events_total", "Times the lease fence closed while this node "
                   "served sessions.", "counter", self.fencing_events),
            single(c + "leases_lost_total", "Leases etcd expired under this node.", "counter",
                   node.leases_lost),
            single(c + "store_errors_total", "etcd calls that failed (store unavailable).",
                   "counter", node.store.worker.errors),
            single(c + "store_latency_seconds", "Seconds the last takeover's etcd calls took.",
                   "gauge", self.store_latency),
            single(c + "owned_sessions", "Sessions this node owns and serves.", "gauge",
                   len(self.intervals)),
            single(c + "standby_acks_total", "Probes of sessions this node does not own "
                   "answered with a standby ack.", "counter", self.standby_acks),
            labelled(c + "takeovers_total", "Takeover attempts by outcome.", "counter",
                     "outcome", self.takeovers),
        ]  # fmt: skip


def _read(state: ResumeState, data: bytes, now: float) -> bytes | Drop:
    """Open a datagram of a stored session with throwaway ciphers (no replay window of the
    session is touched): in the stored key phase, or in the phase before it while the
    client has not yet followed a rotation the owner made when it resumed (``retired``)."""
    opened: bytes | Drop = Drop.MALFORMED
    readers = [(state.keys, state.key_phase)]
    if state.retired is not None:
        readers.append((state.retired, state.key_phase - 1))
    for keys, phase in readers:
        opened = SessionCipher(keys, suite=state.suite, phase=phase).open(data, now)
        if not isinstance(opened, Drop):
            break
    return opened


def _note(iv: Interval, before: float, after: float) -> None:
    iv.forwarded += 1
    if iv.first is None:
        iv.first = before
    iv.last = after


def _source(packet: bytes) -> bytes:
    """The packed inner source address of a packet from a client (IPv4 or IPv6)."""
    return packet[8:24] if packet[0] >> 4 == 6 else packet[12:16]
