"""An ImpairRelay on its own event loop in a daemon thread, for synchronous callers.

Tests, benchmarks and ``jvpn-tui --demo`` use :func:`run_relay_in_thread`; every method
of the returned :class:`RelayThread` may be called from any other thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from tunnel.impair.model import Impairment
from tunnel.impair.net import Address
from tunnel.impair.relay import (
    DEFAULT_MAPPING_IDLE_S,
    DEFAULT_MAX_DELAYED,
    DEFAULT_MAX_MAPPINGS,
    ImpairRelay,
)

_T = TypeVar("_T")


class RelayThread:
    """An ImpairRelay on its own event loop in a daemon thread; every method thread-safe.

    Returned by :func:`run_relay_in_thread`. Use as a context manager or call stop().
    """

    def __init__(self, relay: ImpairRelay, name: str) -> None:
        self._relay = relay
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._stopped = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    def _start(self) -> None:
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            self._thread.join()
            raise self._start_error

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            try:
                loop.run_until_complete(self._relay.start())
            except Exception as exc:  # handed to the starting thread, which raises it
                self._start_error = exc
                return
            finally:
                self._ready.set()
            loop.run_forever()
        finally:
            self._relay.close()
            loop.close()

    def _call(self, fn: Callable[[], _T], timeout: float = 5.0) -> _T:
        if threading.current_thread() is self._thread:
            raise RuntimeError("RelayThread methods must not be called from its own loop")
        with self._lock:
            if self._stopped or self._loop is None:
                raise RuntimeError("impair relay is stopped")

            async def run() -> _T:
                return fn()

            future = asyncio.run_coroutine_threadsafe(run(), self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError as exc:
            future.cancel()
            raise TimeoutError("impair relay did not answer") from exc

    @property
    def bound_address(self) -> Address:
        """The listen socket's actual ``(host, port)``."""
        return self._relay.bound_address

    @property
    def control_address(self) -> Address | None:
        return self._relay.control_address

    @property
    def upstream_address(self) -> Address:
        return self._relay.upstream_address

    def set(self, direction: str, **fields: object) -> None:
        self._call(lambda: self._relay.set(direction, **fields))

    def impairments(self) -> dict[str, Impairment]:
        return self._call(self._relay.impairments)

    def reset(self, *, counters: bool = False) -> None:
        self._call(lambda: self._relay.reset(counters=counters))

    def rebind(self) -> int:
        return self._call(self._relay.rebind)

    def stats(self) -> dict[str, Any]:
        return self._call(self._relay.stats)

    def stop(self, timeout: float = 5.0) -> None:
        """Close the relay and end its thread. Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(loop.stop)
            except RuntimeError:
                pass  # the loop closed between the check and the call: already stopped
        self._thread.join(timeout)

    close = stop

    def __enter__(self) -> RelayThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_relay_in_thread(
    listen: Address = ("127.0.0.1", 0),
    upstream: Address = ("127.0.0.1", 51820),
    *,
    control: Address | None = None,
    up: Impairment | None = None,
    down: Impairment | None = None,
    seed: int | None = None,
    rng: random.Random | None = None,
    max_mappings: int = DEFAULT_MAX_MAPPINGS,
    mapping_idle_s: float = DEFAULT_MAPPING_IDLE_S,
    max_delayed: int = DEFAULT_MAX_DELAYED,
    name: str = "jvpn-impair",
) -> RelayThread:
    """Start an ImpairRelay in a daemon thread; returns once it is bound.

    Raises RelayStartError (an OSError) when an address cannot be resolved or bound.
    """
    relay = ImpairRelay(
        listen,
        upstream,
        control=control,
        up=up,
        down=down,
        rng=rng if rng is not None else random.Random(seed),
        max_mappings=max_mappings,
        mapping_idle_s=mapping_idle_s,
        max_delayed=max_delayed,
    )
    handle = RelayThread(relay, name)
    handle._start()
    return handle
