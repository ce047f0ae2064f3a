"""The lease keeper's reading of a keep-alive (docs/cluster.md: the fence).

A keep-alive answered with TTL <= 0 means etcd dropped the lease, and with it every
ownership key the node held: the node gives them all up. A keep-alive that ends without any
answer (aetcd's ``refresh_lease`` returns None when the stream closes first, as when the
store worker moves to another endpoint and closes the old channel) says nothing about the
lease. The node must keep its sessions and let the fence close on its own deadline; a
clean-clone CI run saw a node drop a session it had just acquired, and never forward it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest

from tunnel.ownership.etcd_owner import NodeOwnership
from tunnel.ownership.store import StoreUnavailable


@dataclass
class Reply:
    TTL: int


class FakeClient:
    def __init__(self, reply: Reply | None) -> None:
        self.reply = reply

    async def refresh_lease(self, lease_id: int) -> Reply | None:
        return self.reply


class FakeWorker:
    def __init__(self, client: FakeClient) -> None:
        self.client = client

    async def guarded(self, fn: Any, timeout: float | None = None) -> Any:
        return await fn(self.client)


class FakeStore:
    def __init__(self, reply: Reply | None) -> None:
        self.worker = FakeWorker(FakeClient(reply))


def owner_of(reply: Reply | None, clock: list[float]) -> NodeOwnership:
    owner = NodeOwnership(FakeStore(reply), "n1", ttl=6, clock=lambda: clock[0])  # type: ignore[arg-type]
    owner.lease_id = 7
    owner.fence.acknowledged(0.0, 6.0)  # granted at t = 0 for 6 s
    owner._take("s1", 2, "acquired")
    return owner


def test_a_stream_ended_without_an_answer_keeps_the_sessions_and_the_lease() -> None:
    clock = [1.0]
    owner = owner_of(None, clock)
    with pytest.raises(StoreUnavailable):
        asyncio.run(owner._refresh_once())
    assert owner.owner_epoch("s1") == 2
    assert not owner.fence.expired
    assert owner.may_forward("s1", 1.0)
    # no keep-alive answered: the fence still closes at its own deadline (6 s - margin)
    assert not owner.may_forward("s1", 6.0)
    assert owner.leases_lost == 0


def test_an_answer_with_ttl_0_gives_up_every_session() -> None:
    clock = [1.0]
    owner = owner_of(Reply(TTL=0), clock)
    asyncio.run(owner._refresh_once())
    assert owner.fence.expired
    assert owner.owner_epoch("s1") is None
    assert owner.leases_lost == 1
    assert [c.change for c in owner.history] == ["acquired", "lost"]


def test_an_answer_with_a_ttl_moves_the_fence_on() -> None:
    clock = [4.0]
    owner = owner_of(Reply(TTL=6), clock)
    asyncio.run(owner._refresh_once())
    assert owner.owner_epoch("s1") == 2
    assert owner.may_forward("s1", 8.0)  # sent at 4 s, 6 s more, minus the margin
