"""What an operator reads from a running gateway: health flags, session views, metrics.

``_MetricsMixin`` gives :class:`~tunnel.gateway.runtime.GatewayRuntime` its views:
``health()`` (:class:`GatewayHealth`, what an operator checks first), ``session_views()``
and ``metric_families()``, the Prometheus families that the metrics listener serves
through ``collect_metrics()`` (gathered on the loop thread). :class:`RuntimeCounters` are
the loop-level counters behind those families; the runtime increments them as datagrams
and packets pass, and as the ownership store and the policy file answer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from tunnel.core.gateway import GatewaySessions, SessionView
from tunnel.core.session import State
from tunnel.observability.metrics import MetricFamily, labelled, observability_families, single
from tunnel.observability.pipeline import EventPipeline

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class GatewayHealth:
    """What an operator checks first."""

    policy_ok: bool
    """False after an invalid policy (new sessions are denied until a valid one)."""
    policy_error: str | None
    policy_version: str
    """The last valid policy's version (what running sessions use)."""
    observability_ok: bool
    """The event pipeline's health flag (True when there is no pipeline)."""
    sessions: int
    """Live (not terminated) sessions."""
    crashed: str | None
    """The engine failure that stopped the runtime, if any."""


@dataclass(slots=True)
class RuntimeCounters:
    """Loop-level counters (the core keeps its own drop counters)."""

    datagrams_in: int = 0
    datagrams_out: int = 0
    send_failed: int = 0
    inner_in: int = 0
    """Packets from the inner side towards clients."""
    inner_out: int = 0
    """Packets from clients written to the inner side."""
    store_conflicts: int = 0
    store_errors: int = 0
    policy_reloads_ok: int = 0
    policy_reloads_invalid: int = 0


class _MetricsMixin:
    """Health, session views and Prometheus families of a GatewayRuntime (module docstring)."""

    # Set in GatewayRuntime.__init__; declared here for the methods below.
    clock: Callable[[], float]
    gateway: GatewaySessions
    pipeline: EventPipeline | None
    counters: RuntimeCounters
    policy_ok: bool
    policy_error: str | None
    _last_valid_version: str
    crash: BaseException | None
    switches: Counter[str]
    terminations: Counter[str]
    reattach_rejects: Counter[str]
    security: Counter[str]
    sessions_created: int
    sessions_denied: int

    if TYPE_CHECKING:  # provided by GatewayRuntime

        def call(self, fn: Callable[[], T], timeout: float = ...) -> T: ...

    # -- views ---------------------------------------------------------------------------

    def health(self) -> GatewayHealth:
        """The health flags (loop thread, or via :meth:`call`)."""
        live = sum(1 for s in self.gateway.sessions.values() if not s.machine.terminated)
        obs_ok = self.pipeline.health().ok if self.pipeline is not None else True
        return GatewayHealth(
            policy_ok=self.policy_ok, policy_error=self.policy_error,
            policy_version=self._last_valid_version, observability_ok=obs_ok,
            sessions=live, crashed=repr(self.crash) if self.crash is not None else None,
        )  # fmt: skip

    def session_views(self) -> list[SessionView]:
        """Every session the core still holds (loop thread, or via :meth:`call`)."""
        return self.gateway.session_views(self.clock())

    def metric_families(self) -> list[MetricFamily]:
        """Every gateway metric (loop thread; :meth:`collect_metrics` from elsewhere)."""
        by_state = {str(st): 0.0 for st in State if st is not State.TERMINATED}
        for s in self.gateway.sessions.values():
            if not s.machine.terminated:
                by_state[str(s.machine.state)] += 1
        drops = dict(self.gateway.drops)
        c = self.counters
        g = "jvpn_gateway_"
        families = [
            labelled(g + "sessions", "Live sessions by state.", "gauge", "state", by_state),
            single(g + "sessions_created_total", "Sessions established.", "counter",
                   self.sessions_created),
            single(g + "sessions_denied_total", "Handshakes denied for lack of a valid policy.",
                   "counter", self.sessions_denied),
            labelled(g + "switches_total", "Committed transport switches by reason.",
                     "counter", "reason", self.switches),
            labelled(g + "terminations_total", "Terminated sessions by reason.", "counter",
                     "reason", self.terminations),
            labelled(g + "reattach_rejects_total", "Denied reattach requests by reason.",
                     "counter", "reason", self.reattach_rejects),
            labelled(g + "drops_total", "Dropped datagrams and packets by reason.", "counter",
                     "reason", drops),
            single(g + "replay_drops_total", "Datagrams dropped by the anti-replay window.",
                   "counter", drops.get("replay_detected", 0)),
            labelled(g + "security_events_total", "Security violations by type.", "counter",
                     "violation", self.security),
            single(g + "policy_valid", "1 while the last policy load was valid.", "gauge",
                   float(self.policy_ok)),
            labelled(g + "policy_reloads_total", "Policy reloads by result.", "counter",
                     "result", {"ok": c.policy_reloads_ok, "invalid": c.policy_reloads_invalid}),
            single(g + "store_conflicts_total", "Ownership CAS failures (not authoritative).",
                   "counter", c.store_conflicts),
            single(g + "engine_events_dropped_total", "Events dropped in the core's queue.",
                   "counter", self.gateway.events_dropped),
            labelled(g + "datagrams_total", "UDP datagrams.", "counter", "direction",
                     {"in": c.datagrams_in, "out": c.datagrams_out,
                      "send_failed": c.send_failed}),
            labelled(g + "inner_packets_total", "Inner packets.", "counter", "direction",
                     {"to_clients": c.inner_in, "from_clients": c.inner_out}),
        ]  # fmt: skip
        if self.pipeline is not None:
            families += observability_families(self.pipeline.health())
        return families

    def collect_metrics(self) -> list[MetricFamily]:
        """:meth:`metric_families`, gathered on the loop thread (safe from any thread)."""
        return self.call(self.metric_families)
