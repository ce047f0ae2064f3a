"""A cluster node in a process of its own, for freezing it (SIGSTOP) past its lease.

``python tests/etcd_owner_proc.py <endpoints,comma> <prefix> <node> <session id> <ttl>``
creates the session (owning it), prints ``ready <version>``, then loops: every 5 ms it
reads the monotonic clock (system-wide on Linux, comparable with the test's) and, iff
:meth:`NodeOwnership.may_forward` says so, prints ``F <now>`` (a datagram it would send).
The first time the fence refuses it prints ``fenced <now>`` and tries one more state
write, printing ``cas <True|False>``. It never hands a session over when asked (an
unresponsive owner), so only the lease can end its ownership.
"""

from __future__ import annotations

import sys
import time

from tunnel.ownership import SessionRecord
from tunnel.ownership.etcd import EtcdSessionStore
from tunnel.ownership.etcd_owner import NodeOwnership


def main() -> None:
    endpoints, prefix, node, sid, ttl = sys.argv[1:6]
    store = EtcdSessionStore(endpoints.split(","), prefix, timeout=1.0)
    owner = NodeOwnership(store, node, ttl=int(ttl), on_handover=lambda _sid, _req: False)
    owner.start()
    record = SessionRecord(sid, "ATTACHED", 1, 1, node, "test", 0)
    if not owner.create(record, b"wrapped"):
        print("create failed", flush=True)
        return
    print("ready 1", flush=True)
    fenced = False
    while True:
        now = time.monotonic()
        if owner.may_forward(sid, now):
            print(f"F {now:.6f}", flush=True)
        elif not fenced:
            fenced = True
            print(f"fenced {now:.6f}", flush=True)
            ok = owner.cas(sid, 1, record.evolve(state_version=2))
            print(f"cas {ok}", flush=True)
        time.sleep(0.005)


if __name__ == "__main__":
    main()
