"""The thread that runs the etcd client (aetcd, asyncio-only) for the synchronous store.

One event loop on one daemon thread holds the gRPC channel; :meth:`EtcdWorker.call` runs
a coroutine there and waits a bounded time, :meth:`EtcdWorker.submit` returns a future
instead (``await asyncio.wrap_future(...)`` from another loop). Every failure to answer
in time, a refused connection or a gRPC error becomes
:class:`~tunnel.ownership.store.StoreUnavailable`. Why a thread and not the gateway's
loop: see :mod:`tunnel.ownership.etcd`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar

import aetcd
import aetcd.exceptions

from tunnel.ownership.store import StoreUnavailable

T = TypeVar("T")

DEFAULT_TIMEOUT: Final = 1.0
"""Seconds a store call may take before it fails closed. Two heartbeats of a loaded
cluster fit; a leader election (1 s by default) does not, and is reported as unavailable."""


def endpoint_target(endpoints: Sequence[str], start: int = 0) -> tuple[str, int]:
    """aetcd's (host, port) for a gRPC target naming every endpoint, from ``start`` on.

    gRPC's ``ipv4:a:p,b:q`` target with its default ``pick_first`` policy connects to the
    first member that accepts and moves to the next when that connection breaks.
    """
    if not endpoints:
        raise ValueError("at least one etcd endpoint is needed")
    order = [endpoints[(start + i) % len(endpoints)] for i in range(len(endpoints))]
    for ep in order:
        host, sep, port = ep.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"etcd endpoint must be host:port, not {ep!r}")
    *head, last = order
    host, _, port = last.rpartition(":")
    scheme = "ipv6:" if ":" in host else "ipv4:"
    return scheme + ",".join([*head, host]), int(port)


class EtcdWorker:
    """The thread that runs aetcd: one event loop, one client (see the module docstring)."""

    def __init__(self, endpoints: Sequence[str], timeout: float = DEFAULT_TIMEOUT) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        endpoint_target(endpoints)  # validates
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self.errors = 0
        """Calls that ended in StoreUnavailable."""
        self._start = 0
        self._loop = asyncio.new_event_loop()
        self._client: Any = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="etcd-store", daemon=True)
        ready = threading.Event()
        self._loop.call_soon(ready.set)
        self._thread.start()
        ready.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def in_worker(self) -> bool:
        return threading.current_thread() is self._thread

    def _new_client(self) -> Any:
        host, port = endpoint_target(self.endpoints, self._start)
        return aetcd.Client(host=host, port=port, timeout=self.timeout)

    def client(self) -> Any:
        """The current aetcd client (worker thread only)."""
        if self._client is None:
            self._client = self._new_client()
        return self._client

    def _rotate(self, failed: Any) -> None:
        """Reconnect from the next endpoint (once per failed client)."""
        if failed is not self._client or len(self.endpoints) < 2:
            return
        self._start = (self._start + 1) % len(self.endpoints)
        self._client = self._new_client()
        # Calls still in flight on the old channel end on their own bound first.
        self._loop.call_later(2 * self.timeout, self._close_later, failed)

    def _close_later(self, client: Any) -> None:
        if not self._closed:
            self._loop.create_task(_close_quietly(client))

    async def guarded(self, fn: Callable[[Any], Awaitable[T]], timeout: float | None = None) -> T:
        """Run ``fn(client)`` on the worker loop; StoreUnavailable on timeout or error."""
        limit = self.timeout if timeout is None else timeout
        client = self.client()
        try:
            return await _bounded(fn(client), limit)
        except (TimeoutError, aetcd.exceptions.ConnectionTimeoutError) as exc:
            self.errors += 1
            self._rotate(client)
            raise StoreUnavailable(f"etcd did not answer within {limit:g} s") from exc
        except aetcd.exceptions.ConnectionFailedError as exc:
            self.errors += 1
            self._rotate(client)
            raise StoreUnavailable(f"etcd unreachable: {exc}") from exc
        except aetcd.exceptions.ClientError as exc:
            self.errors += 1
            raise StoreUnavailable(f"etcd error: {exc}") from exc
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this call itself was cancelled
            self.errors += 1  # gRPC cancelled the RPC: its channel was closed under it
            raise StoreUnavailable("etcd call cancelled (the channel closed)") from exc

    def submit(
        self, fn: Callable[[Any], Awaitable[T]], timeout: float | None = None
    ) -> concurrent.futures.Future[T]:
        """Schedule ``fn(client)``; the future ends with its result or StoreUnavailable."""
        if self._closed:
            raise StoreUnavailable("the etcd store is closed")
        return asyncio.run_coroutine_threadsafe(self.guarded(fn, timeout), self._loop)

    def call(self, fn: Callable[[Any], Awaitable[T]], timeout: float | None = None) -> T:
        """``submit`` and wait (never from the worker thread itself: that would deadlock)."""
        if self.in_worker():
            raise RuntimeError("a blocking etcd call from the etcd worker thread")
        limit = self.timeout if timeout is None else timeout
        future = self.submit(fn, limit)
        try:
            return future.result(limit + 1.0)
        except concurrent.futures.TimeoutError as exc:  # the loop itself is stuck
            future.cancel()
            raise StoreUnavailable(f"etcd worker did not answer within {limit:g} s") from exc

    def close(self) -> None:
        """Close the client and stop the thread (idempotent)."""
        if self._closed:
            return
        self._closed = True

        async def shutdown() -> None:
            if self._client is not None:
                await _close_quietly(self._client)
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        fut = asyncio.run_coroutine_threadsafe(shutdown(), self._loop)
        try:
            fut.result(5.0)
        except (concurrent.futures.TimeoutError, asyncio.CancelledError):
            fut.cancel()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
        if not self._thread.is_alive():
            self._loop.close()


async def _close_quietly(client: Any) -> None:
    try:
        await asyncio.wait_for(client.close(), 2.0)
    except (TimeoutError, aetcd.exceptions.ClientError, RuntimeError):
        pass


async def _bounded(call: Awaitable[T], limit: float) -> T:
    """``call``'s result within ``limit`` seconds, else TimeoutError at once.

    Unlike ``asyncio.wait_for``, which cancels the call and then waits until it has ended,
    a call that outlives its bound is cancelled and left to end on its own: a gRPC stream on
    a channel that went bad may not end promptly, and the caller (the lease keeper among
    them) must go on.
    """
    task = asyncio.ensure_future(call)
    try:
        done, _ = await asyncio.wait({task}, timeout=limit)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        task.add_done_callback(_consume)
        raise TimeoutError
    return task.result()


def _consume(task: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned call's outcome (no "exception was never retrieved")."""
    if not task.cancelled():
        task.exception()
