"""Short garbage-collector pauses for a gateway with many sessions (docs/gateway.md,
"Garbage collection").

CPython's full (generation 2) collection walks every tracked object. A gateway core keeps
about 15 tracked objects per session, so with 10,000 sessions one full collection takes
100-300 ms on the machine of docs/performance.md, and every datagram that arrives meanwhile
waits: a client's probe is retried, inner TCP sees a stall.

:class:`GcFreezer` keeps the objects that survived a full collection out of later ones:

- at :meth:`install` it freezes what exists (modules, configuration, clients), and after
  each full collection, at the next :meth:`tick`, what survived it (``gc.freeze``). The
  next full collection then walks only what was made since;
- frozen objects are still freed by reference counting. A session's objects form no
  reference cycle (``tests/test_gc_freeze.py`` checks an ended session frees everything
  without the collector), so an ended session is freed as before;
- a cycle that forms among frozen objects (a control connection's transport and protocol,
  say) would never be collected, so every ``reclaim_s`` (an hour by default) the frozen
  objects are thawed, collected once (one full pause) and frozen again.

It acts on the whole process, so only a gateway *program* installs it (tunnel/gateway/
main.py); a runtime embedded in another process (the tests) runs without it.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any, Final

from tunnel.observability.metrics import MetricFamily, labelled, single

__all__ = ["RECLAIM_S", "TICK_S", "GcFreezer", "gc_families"]

RECLAIM_S: Final = 3600.0
"""How often the frozen objects are thawed and collected once (cycles among them)."""

TICK_S: Final = 1.0
"""How often the runtime calls :meth:`GcFreezer.tick`."""


class GcFreezer:
    """Freeze what survives full collections; thaw and collect every ``reclaim_s``."""

    def __init__(
        self, *, reclaim_s: float = RECLAIM_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.reclaim_s = reclaim_s
        self._clock = clock
        self._full_seen = False
        self._installed = False
        self._last_reclaim = 0.0
        self._started = 0.0
        self.pauses = [0, 0, 0]
        """Collections by generation since :meth:`install`."""
        self.longest = [0.0, 0.0, 0.0]
        """The longest pause (s) by generation since :meth:`install`."""
        self.reclaims = 0
        """Thaw-and-collect rounds done."""

    def install(self) -> GcFreezer:
        """Freeze everything that exists now and watch the collector; returns self."""
        if not self._installed:
            gc.collect()
            gc.freeze()
            gc.callbacks.append(self._on_gc)
            self._installed = True
            self._last_reclaim = self._clock()
        return self

    def uninstall(self) -> None:
        """Stop watching and thaw everything (the process collects as before)."""
        if self._installed:
            gc.callbacks.remove(self._on_gc)
            gc.unfreeze()
            self._installed = False

    @property
    def frozen(self) -> int:
        """Objects in the permanent generation now."""
        return gc.get_freeze_count()

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        generation = info["generation"]
        took = time.perf_counter() - self._started
        self.pauses[generation] += 1
        if took > self.longest[generation]:
            self.longest[generation] = took
        if generation == 2:
            self._full_seen = True  # freeze at the next tick, not inside the collector

    def tick(self, now: float | None = None) -> None:
        """Freeze what survived a full collection since the last tick; thaw, collect and
        freeze again once ``reclaim_s`` has passed since the last time."""
        if not self._installed:
            return
        now = self._clock() if now is None else now
        if now - self._last_reclaim >= self.reclaim_s:
            self._last_reclaim = now
            self.reclaims += 1
            gc.unfreeze()
            gc.collect()  # sets _full_seen: frozen just below
        if self._full_seen:
            self._full_seen = False
            gc.freeze()


def gc_families(freezer: GcFreezer) -> list[MetricFamily]:
    """The freezer's metrics (docs/gateway.md, "Metrics")."""
    g = "jvpn_gateway_gc_"
    gens = ("0", "1", "2")
    return [
        single(g + "frozen_objects", "Objects kept out of garbage collections (gc.freeze).",
               "gauge", freezer.frozen),
        labelled(g + "collections_total", "Garbage collections by generation.", "counter",
                 "generation", dict(zip(gens, map(float, freezer.pauses), strict=True))),
        labelled(g + "longest_pause_seconds",
                 "The longest garbage-collection pause by generation (a worker's longest).",
                 "gauge", "generation", dict(zip(gens, freezer.longest, strict=True)),
                 merge="livemax"),
    ]  # fmt: skip
