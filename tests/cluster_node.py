"""One cluster node for the fault checker, in a process of its own (layer 1: no tunnel).

``python tests/cluster_node.py --endpoints A,B,C --prefix P --node ID --journal FILE
--wire HOST:PORT [--ttl 2]`` runs a real :class:`NodeOwnership` against etcd (through
the endpoints it is given: the fault driver's per-node relays) and "forwards" the
sessions it owns: every ``TICK`` seconds, for each one, it reads the monotonic clock
(``CLOCK_MONOTONIC``, system-wide on Linux: comparable between processes), asks
``may_forward(sid, now)`` and only then sends one datagram to the wire collector
(``--wire``, UDP) carrying ``(node, pid, session, owner epoch, key id, counter, now)``.
The check and the send happen under one lock that a hand-over also takes, so a session
given up is never sent for afterwards by this process.

**Counters** are reserved in durable blocks (DESIGN D15a): a session's record carries in
its ``resume`` field ``{"key": key id, "next": first counter not yet reserved}``; a node
uses counters only inside a block it committed to the store itself (a create, a
transfer, or a CAS that moves ``next`` on by ``BLOCK`` while it owns the session). A
write whose outcome is unknown (``StoreUnavailable``) never hands out its block: the node
re-reads the entry and uses only what the store shows it committed.

**Commands** on stdin, one a line: ``create SID``, ``acquire SID`` (a reattach arriving
here: read the entry, move the session here by CAS with a new block), ``quit``. A
hand-over request from another node (through etcd) stops forwarding the session, then
releases it (what a gateway does: never from the callback itself).

**Journal** (``--journal``, JSONL, appended, one flushed line per event; a restarted node
appends to the same file): ``start``; before every store write an ``attempt`` (op, sid,
the version it writes, the block it reserves), after it a ``result`` (``ok`` with the
owner epoch, ``conflict``, ``unknown`` (StoreUnavailable: outcome unknown),
``owned_elsewhere``, ``not_found``; ``unavailable`` when the read before a transfer
failed, nothing attempted); ``forwarding``
when the node starts using a block; ``handover`` / ``released``. ``tests/cluster_check.py``
merges the journals with the wire log and the store's history.

``--unsafe fence`` (forward whenever a block is held, without asking the fence, and keep
the block when asked to hand over: a node frozen past its lease finds the request waiting
when it wakes, and would otherwise drop the block before it sent anything) and
``--unsafe counters`` (start each new block two blocks early) break the node on purpose:
the checker's own tests run them to show that it catches what it claims to.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tunnel.ownership import SessionRecord, StoreUnavailable  # noqa: E402
from tunnel.ownership.etcd import EtcdSessionStore, StoredSession  # noqa: E402
from tunnel.ownership.etcd_owner import NodeOwnership, Outcome  # noqa: E402

BLOCK = 64
"""Counters reserved per store write (at 1/TICK datagrams/s: one CAS every ~1.3 s)."""
TICK = 0.02
"""Seconds between two datagrams of one owned session."""
ACQUIRE_WAIT = 1.0
"""Seconds a transfer waits for a live owner to hand over (a dead one's lease: longer)."""


@dataclass
class Block:
    """What this node forwards one session with: counters [next, hi) of key ``key``."""

    epoch: int
    key: str
    next: int
    hi: int
    version: int
    record: SessionRecord
    held_back: bool = False
    """Journalled once that the node holds it but may not use it (``_held_back``)."""


def reservation(record: SessionRecord) -> tuple[str, int]:
    """(key id, first counter not yet reserved) of a record written by this module."""
    doc = json.loads(record.resume)
    return str(doc["key"]), int(doc["next"])


def with_reservation(key: str, nxt: int) -> bytes:
    """The ``resume`` bytes of a record reserving counters up to ``nxt`` of key ``key``."""
    return json.dumps({"key": key, "next": nxt}, sort_keys=True).encode()


class Journal:
    """Appends one JSON line per event, flushed at once (a kill -9 loses nothing written)."""

    def __init__(self, path: str, node: str) -> None:
        self._file = open(path, "a", buffering=1)  # lives as long as the node
        self._node = node
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def write(self, event: str, **fields: Any) -> None:
        doc = {"e": event, "node": self._node, "pid": self._pid, "mono": time.monotonic()}
        doc.update(fields)
        with self._lock:
            self._file.write(json.dumps(doc, sort_keys=True) + "\n")


class Node:
    """The node: a forwarding loop (main thread) and a control thread for store calls."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.node_id: str = args.node
        self.journal = Journal(args.journal, args.node)
        host, _, port = args.wire.rpartition(":")
        self.wire = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.wire.connect((host, int(port)))
        self.commands: queue.Queue[tuple[str, str, str]] = queue.Queue()
        self.lock = threading.Lock()
        self.blocks: dict[str, Block] = {}
        self.reserving: set[str] = set()
        self.seq = 0
        self.pid = os.getpid()
        self.unsafe: str = args.unsafe
        store = EtcdSessionStore(args.endpoints.split(","), args.prefix, timeout=1.0)
        self.owner = NodeOwnership(store, args.node, ttl=args.ttl, on_handover=self._asked)

    # -- callbacks and input ------------------------------------------------------------------

    def _asked(self, sid: str, requester: str) -> bool:
        """Hand-over request (etcd worker thread): never block; the control thread acts."""
        self.commands.put(("handover", sid, requester))
        return False

    def read_stdin(self) -> None:
        for line in sys.stdin:
            parts = line.split()
            if parts:
                self.commands.put((parts[0], parts[1] if len(parts) > 1 else "", ""))
        self.commands.put(("quit", "", ""))

    # -- forwarding (main thread) -------------------------------------------------------------

    def forward_all(self) -> None:
        for sid in list(self.blocks):
            self.forward(sid)

    def forward(self, sid: str) -> None:
        with self.lock:
            b = self.blocks.get(sid)
            if b is None:
                return
            now = time.monotonic()
            if self.unsafe != "fence" and not self.may_send(sid, b, now):
                self._held_back(sid, b, now)
                return
            if b.next < b.hi:
                self.seq += 1
                doc = {"n": self.node_id, "p": self.pid, "q": self.seq, "s": sid, "e": b.epoch,
                       "k": b.key, "c": b.next, "t": now}  # fmt: skip
                self.wire.send(json.dumps(doc, separators=(",", ":")).encode())
                b.next += 1
            low = b.hi - b.next < BLOCK // 2 and sid not in self.reserving
            if low:
                self.reserving.add(sid)
        if low:  # (also when the block ran out while a reservation failed)
            self.commands.put(("reserve", sid, ""))

    def _held_back(self, sid: str, b: Block, now: float) -> None:
        """Journal, once per block, why a block the node holds is not used (a diagnosis
        for a test that waits for forwarding: the fence, or the ownership gone)."""
        if b.held_back:
            return
        b.held_back = True
        fence = self.owner.fence
        history = [(c.change, c.owner_epoch) for c in self.owner.history][-4:]
        self.journal.write("held_back", sid=sid, epoch=b.epoch,
                           owned=self.owner.owner_epoch(sid), lease_expired=fence.expired,
                           fence_left=round(fence.remaining(now), 3),
                           history=history)  # fmt: skip

    def may_send(self, sid: str, b: Block, now: float) -> bool:
        """The fence is open AND the node holds the session at the block's epoch: a block
        of an ownership it lost must not be revived by a later grant of the same session
        (that grant's block comes with it; found by this checker: without the epoch
        compare, one datagram left under the old epoch between the grant and its block)."""
        return self.owner.owner_epoch(sid) == b.epoch and self.owner.may_forward(sid, now)

    # -- store calls (control thread) ---------------------------------------------------------

    def control(self) -> None:
        while True:
            op, sid, extra = self.commands.get()
            if op == "quit":
                self.commands.put(("quit", "", ""))
                return
            if op == "handover":
                self.handover(sid, extra)
                continue
            handler = {"create": self.create, "acquire": self.acquire, "reserve": self.reserve}
            if op in handler:
                handler[op](sid)

    def _call(self, op: str, sid: str, fn: Any, **attempt: Any) -> Any:
        self.journal.write("attempt", op=op, sid=sid, **attempt)
        try:
            return fn()
        except StoreUnavailable as exc:
            self.journal.write("result", op=op, sid=sid, outcome="unknown", error=str(exc)[:80],
                               **attempt)  # fmt: skip
            return None

    def _use(self, sid: str, epoch: int, record: SessionRecord, lo: int) -> None:
        key, hi = reservation(record)
        if self.unsafe == "counters":
            lo = max(0, lo - 2 * BLOCK)
        with self.lock:
            self.blocks[sid] = Block(epoch, key, lo, hi, record.state_version, record)
        self.journal.write("forwarding", sid=sid, epoch=epoch, key=key, lo=lo, hi=hi,
                           ver=record.state_version)  # fmt: skip

    def create(self, sid: str) -> None:
        resume = with_reservation(f"k-{sid[:12]}", BLOCK)
        record = SessionRecord(sid, "ATTACHED", 1, 1, self.node_id, "faults", 0, resume)
        ok = self._call("create", sid, lambda: self.owner.create(record, b"wrapped"),
                        ver=1, lo=0, hi=BLOCK)  # fmt: skip
        if ok is None:
            return
        self.journal.write("result", op="create", sid=sid, ver=1, lo=0, hi=BLOCK,
                           outcome="ok" if ok else "conflict", epoch=1)  # fmt: skip
        if ok:
            self._use(sid, 1, record, 0)

    def _entry(self, sid: str) -> StoredSession | None:
        try:
            return self.owner.store.entry(sid)
        except StoreUnavailable:
            return None

    def acquire(self, sid: str) -> None:
        try:
            entry = self.owner.store.entry(sid)
        except StoreUnavailable:
            self.journal.write("result", op="acquire", sid=sid, outcome="unavailable")
            return
        if entry is None:
            return
        held = self.owner.owner_epoch(sid)
        if held is not None and held == entry.owner_epoch and sid in self.blocks:
            return  # already forwarding it here
        key, lo = reservation(entry.record)
        version = entry.record.state_version
        new = entry.record.evolve(
            state="ATTACHED", state_version=version + 1, owner_node=self.node_id,
            resume=with_reservation(key, lo + BLOCK),
        )  # fmt: skip
        transfer = self._call(
            "acquire", sid, lambda: self.owner.acquire(sid, version, new, wait=ACQUIRE_WAIT),
            ver=version + 1, lo=lo, hi=lo + BLOCK, expected=version,
        )  # fmt: skip
        if transfer is None:
            return
        ok = transfer.outcome == Outcome.GRANTED
        self.journal.write("result", op="acquire", sid=sid, ver=version + 1, lo=lo,
                           hi=lo + BLOCK, outcome="ok" if ok else str(transfer.outcome),
                           epoch=transfer.owner_epoch,
                           previous=transfer.previous_owner)  # fmt: skip
        if ok:
            self._use(sid, transfer.owner_epoch, new, lo)

    def reserve(self, sid: str) -> None:
        """Reserve the next counter block of an owned session (a fenced CAS)."""
        try:
            with self.lock:
                b = self.blocks.get(sid)
            if b is None:
                return
            key, hi = reservation(b.record)
            new = b.record.evolve(state_version=b.version + 1,
                                  resume=with_reservation(key, hi + BLOCK))  # fmt: skip
            ok = self._call("reserve", sid, lambda: self.owner.cas(sid, b.version, new),
                            ver=b.version + 1, lo=hi, hi=hi + BLOCK, epoch=b.epoch)  # fmt: skip
            if ok:
                self.journal.write("result", op="reserve", sid=sid, ver=b.version + 1, lo=hi,
                                   hi=hi + BLOCK, outcome="ok", epoch=b.epoch)  # fmt: skip
                self._extend(sid, b, new)
                return
            if ok is not None:
                self.journal.write("result", op="reserve", sid=sid, ver=b.version + 1, lo=hi,
                                   hi=hi + BLOCK, outcome="conflict", epoch=b.epoch)  # fmt: skip
            self._reread(sid, b)
        finally:
            with self.lock:
                self.reserving.discard(sid)

    def _extend(self, sid: str, b: Block, record: SessionRecord) -> None:
        with self.lock:
            if self.blocks.get(sid) is not b:
                return
            b.record, b.version = record, record.state_version
            b.hi = reservation(record)[1]

    def _reread(self, sid: str, b: Block) -> None:
        """After an unknown or failed write: use only what the store shows committed."""
        entry = self._entry(sid)
        if entry is None:
            return
        mine = entry.record.owner_node == self.node_id and entry.owner_epoch == b.epoch
        if mine and entry.record.state_version >= b.version:
            self._extend(sid, b, entry.record)
            self.journal.write("reread", sid=sid, ver=entry.record.state_version,
                               hi=reservation(entry.record)[1], epoch=b.epoch)  # fmt: skip
        elif not mine:
            with self.lock:
                if self.blocks.get(sid) is b:
                    del self.blocks[sid]

    def handover(self, sid: str, requester: str) -> None:
        if self.unsafe == "fence":
            self.journal.write("handover_ignored", sid=sid, to=requester)
            return
        with self.lock:  # after this no datagram of the session leaves this process
            self.blocks.pop(sid, None)
        if self.owner.owner_epoch(sid) is None:
            return
        self.journal.write("handover", sid=sid, to=requester)
        try:
            ok = self.owner.release(sid)
        except StoreUnavailable:
            ok = None
        self.journal.write("released", sid=sid, ok=ok)

    # -- main ---------------------------------------------------------------------------------

    def run(self) -> None:
        self.owner.start()
        self.journal.write("start", lease=self.owner.lease_id)
        print("ready", flush=True)
        threading.Thread(target=self.read_stdin, daemon=True).start()
        control = threading.Thread(target=self.control, daemon=True)
        control.start()
        while control.is_alive():
            self.forward_all()
            time.sleep(TICK)
        with self.lock:
            self.blocks.clear()
        self.owner.close()
        self.owner.store.close()
        self.journal.write("stop")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--endpoints", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--node", required=True)
    p.add_argument("--journal", required=True)
    p.add_argument("--wire", required=True)
    p.add_argument("--ttl", type=int, default=2)
    p.add_argument("--unsafe", choices=["", "fence", "counters"], default="")
    args = p.parse_args(argv)
    node = Node(args)
    try:
        node.run()
    except StoreUnavailable as exc:  # etcd unreachable at start: the driver restarts it
        print(f"start failed: {exc}", flush=True)
        sys.exit(3)


if __name__ == "__main__":
    main()
