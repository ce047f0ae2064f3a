"""The gateway runtime on a thread of its own: :class:`GatewayThread`, ``start_in_thread``.

For the demo, the tests and embedding. The thread opens a
:class:`~tunnel.gateway.runtime.GatewayRuntime`, serves it on its own event loop until
``stop()`` and closes it; other threads reach the loop only through ``call()`` (and the
helpers built on it), which waits at most ``CALL_TIMEOUT_S``.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from tunnel.core.gateway import ClientEntry, SessionView
from tunnel.core.policy import POLICY_DEFAULT, Policy
from tunnel.gateway.metrics import GatewayHealth
from tunnel.gateway.runtime import CALL_TIMEOUT_S, GatewayRuntime
from tunnel.io.loop import new_event_loop

T = TypeVar("T")


class GatewayThread:
    """A GatewayRuntime on its own thread with its own loop (the demo, tests, embedding).

    ``start()`` returns once the sockets are bound (or raises what ``open()`` raised);
    ``stop()`` ends every session (TERMINATE to clients; with a persistent store it keeps
    them there instead) and joins the thread.
    """

    def __init__(self, runtime: GatewayRuntime) -> None:
        self.runtime = runtime
        self._thread = threading.Thread(target=self._main, name="jvpn-gateway", daemon=True)
        self._ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.error: BaseException | None = None
        """What ended the thread abnormally (an open() failure or an engine crash)."""

    def start(self, timeout: float = 10.0) -> GatewayThread:
        self._thread.start()
        self._ready.result(timeout)
        return self

    def _main(self) -> None:
        runtime = self.runtime
        try:
            runtime.open()
        except BaseException as exc:
            self.error = exc
            self._ready.set_exception(exc)
            return
        try:
            loop = new_event_loop()
            try:
                serving = loop.create_task(runtime.serve())
                loop.call_soon(self._ready.set_result, None)
                loop.run_until_complete(serving)
            finally:
                loop.close()
        except BaseException as exc:
            self.error = exc
        finally:
            if not self._ready.done():
                self._ready.set_exception(self.error or RuntimeError("gateway did not start"))
            try:
                runtime.close()
            except Exception as exc:  # report, the thread ends anyway
                self.error = self.error or exc
        if runtime.crash is not None and self.error is None:
            self.error = runtime.crash

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Bound listen addresses."""
        return self.runtime.addresses

    @property
    def address(self) -> tuple[str, int]:
        """The first bound listen address."""
        return self.runtime.addresses[0]

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def call(self, fn: Callable[[], T], timeout: float = CALL_TIMEOUT_S) -> T:
        """Run ``fn()`` on the gateway loop and return its result."""
        return self.runtime.call(fn, timeout)

    def reload_policy(self, timeout: float = CALL_TIMEOUT_S) -> bool:
        """Reload the policy file on the loop; True if valid and applied."""
        return self.call(self.runtime.reload_policy, timeout)

    def sessions(self) -> list[SessionView]:
        return self.call(self.runtime.session_views)

    def health(self) -> GatewayHealth:
        return self.call(self.runtime.health)

    def metrics_text(self) -> str:
        """The Prometheus exposition (what a scrape of ``/metrics`` returns)."""
        return self.runtime.metrics_text().decode()

    def stop(self, timeout: float = 5.0) -> None:
        """End every session, stop the loop, undo host changes, join. Idempotent."""
        self.runtime.request_stop()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def __enter__(self) -> GatewayThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_in_thread(
    *,
    static_private: bytes,
    clients: Sequence[ClientEntry],
    policy: Policy | None = POLICY_DEFAULT,
    listen: Sequence[tuple[str, int]] = (("127.0.0.1", 0),),
    inner_gateway: str = "10.66.0.1",
    **kwargs: Any,
) -> GatewayThread:
    """An embedded gateway on loopback with the echo inner side, started and bound.

    ``kwargs`` go to :class:`GatewayRuntime` (``pipeline``, ``store``, ``on_event``,
    ``policy_path``, ``metrics``, ``node_id``, ``inner``...).
    """
    runtime = GatewayRuntime(
        static_private=static_private, clients=clients, policy=policy, listen=listen,
        inner_gateway=inner_gateway, **kwargs,
    )  # fmt: skip
    return GatewayThread(runtime).start()
