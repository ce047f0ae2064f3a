"""What an operator reads from a running gateway: health flags, session views, metrics.

:class:`GatewayMetrics` is the runtime's metrics/health component. It owns the event
tallies (:class:`EventTally`: switches, terminations, reattach rejects, security events,
sessions created and denied; the runtime hands it every event it delivers) and reads the
rest from their owners: the loop's traffic counters (:class:`TrafficCounters`, a plain
record the runtime increments as datagrams and packets pass), the policy reloader's
status, the ownership mirror's conflict count, the core's drops and the event pipeline's
health. It answers ``health()`` (:class:`GatewayHealth`, what an operator checks first),
``session_views()`` and ``metric_families()``, the Prometheus families the metrics
listener serves (gathered on the loop thread).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from tunnel.core.events import (
    Event,
    EventType,
    PolicyEvent,
    ReattachResult,
    SecurityEvent,
    SessionTerminated,
    TransportSwitch,
)
from tunnel.core.gateway import GatewaySessions, SessionView
from tunnel.core.session import State
from tunnel.gateway.ownership import OwnershipMirror
from tunnel.gateway.policy_reload import PolicyReloader
from tunnel.observability.metrics import MetricFamily, labelled, observability_families, single
from tunnel.observability.pipeline import EventPipeline


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
class TrafficCounters:
    """Loop-level traffic counters (the core keeps its own drop counters)."""

    datagrams_in: int = 0
    datagrams_out: int = 0
    send_failed: int = 0
    inner_in: int = 0
    """Packets from the inner side towards clients."""
    inner_out: int = 0
    """Packets from clients written to the inner side."""


class EventTally:
    """Counts of the events the gateway delivered, by reason (the metrics' own state)."""

    def __init__(self) -> None:
        self.switches: Counter[str] = Counter()
        self.terminations: Counter[str] = Counter()
        self.reattach_rejects: Counter[str] = Counter()
        self.security: Counter[str] = Counter()
        self.sessions_created = 0
        self.sessions_denied = 0
        self._by_type: dict[EventType, Callable[[Event], None]] = {
            EventType.TRANSPORT_SWITCH: self._switch,
            EventType.SESSION_TERMINATED: self._terminated,
            EventType.SESSION_CREATED: self._created,
            EventType.REATTACH_RESULT: self._reattach,
            EventType.SECURITY_EVENT: self._security,
            EventType.POLICY_EVENT: self._policy,
        }

    def count(self, event: Event) -> None:
        """Tally one delivered event (events of other types are not counted)."""
        tally = self._by_type.get(event.event_type)
        if tally is not None:
            tally(event)

    def _switch(self, event: Event) -> None:
        if isinstance(event, TransportSwitch):
            self.switches[str(event.reason_code)] += 1

    def _terminated(self, event: Event) -> None:
        if isinstance(event, SessionTerminated):
            self.terminations[str(event.reason_code)] += 1

    def _created(self, event: Event) -> None:
        self.sessions_created += 1

    def _reattach(self, event: Event) -> None:
        if isinstance(event, ReattachResult) and event.status != "SUCCESS":
            self.reattach_rejects[str(event.reason_code)] += 1

    def _security(self, event: Event) -> None:
        if isinstance(event, SecurityEvent):
            self.security[event.violation_type] += event.count

    def _policy(self, event: Event) -> None:
        if isinstance(event, PolicyEvent) and event.policy_name == "SESSION_DENIED":
            self.sessions_denied += 1


class GatewayMetrics:
    """Health, session views and Prometheus families of a gateway (module docstring).

    Reads its sources on the loop thread; the runtime gathers through its loop for other
    threads.
    """

    def __init__(
        self,
        gateway: GatewaySessions,
        *,
        traffic: TrafficCounters,
        policy: PolicyReloader,
        ownership: OwnershipMirror,
        pipeline: EventPipeline | None,
    ) -> None:
        self._gateway: GatewaySessions = gateway
        self._traffic = traffic
        self._policy = policy
        self._ownership = ownership
        self._pipeline = pipeline
        self.tally: EventTally = EventTally()

    def count(self, event: Event) -> None:
        """Tally one event the runtime delivered."""
        self.tally.count(event)

    # -- views ---------------------------------------------------------------------------

    def health(self, crash: BaseException | None) -> GatewayHealth:
        """The health flags; ``crash`` is the engine failure that stopped the runtime."""
        live = sum(1 for s in self._gateway.sessions.values() if not s.machine.terminated)
        pipeline = self._pipeline
        policy = self._policy
        return GatewayHealth(
            policy_ok=policy.ok, policy_error=policy.error,
            policy_version=policy.last_valid_version,
            observability_ok=pipeline.health().ok if pipeline is not None else True,
            sessions=live, crashed=repr(crash) if crash is not None else None,
        )  # fmt: skip

    def session_views(self, now: float) -> list[SessionView]:
        """Every session the core still holds."""
        return self._gateway.session_views(now)

    def metric_families(self) -> list[MetricFamily]:
        """Every gateway metric."""
        gateway = self._gateway
        by_state = {str(st): 0.0 for st in State if st is not State.TERMINATED}
        for s in gateway.sessions.values():
            if not s.machine.terminated:
                by_state[str(s.machine.state)] += 1
        drops = dict(gateway.drops)
        t = self.tally
        c = self._traffic
        p = self._policy
        g = "jvpn_gateway_"
        families = [
            labelled(g + "sessions", "Live sessions by state.", "gauge", "state", by_state),
            single(g + "sessions_created_total", "Sessions established.", "counter",
                   t.sessions_created),
            single(g + "sessions_denied_total",
                   "Handshakes denied: no valid policy, or no data cipher in common.",
                   "counter", t.sessions_denied),
            labelled(g + "switches_total", "Committed transport switches by reason.",
                     "counter", "reason", t.switches),
            labelled(g + "terminations_total", "Terminated sessions by reason.", "counter",
                     "reason", t.terminations),
            labelled(g + "reattach_rejects_total", "Denied reattach requests by reason.",
                     "counter", "reason", t.reattach_rejects),
            labelled(g + "drops_total", "Dropped datagrams and packets by reason.", "counter",
                     "reason", drops),
            single(g + "replay_drops_total",
                   "Replays: datagrams the anti-replay window rejected that were not late or"
                   " network copies on a validated path (drops_total too_old, duplicate).",
                   "counter", drops.get("replay_detected", 0)),
            labelled(g + "security_events_total", "Security violations by type.", "counter",
                     "violation", t.security),
            single(g + "handshake_rate",
                   "Handshakes a second the gateway spends Diffie-Hellman on (its budget:"
                   " measured at start, or handshake_rate in the config).", "gauge",
                   gateway.admission.handshakes.rate),
            single(g + "policy_valid", "1 while the last policy load was valid.", "gauge",
                   float(p.ok), merge="livemin"),
            labelled(g + "policy_reloads_total", "Policy reloads by result.", "counter",
                     "result", {"ok": p.reloads_ok, "invalid": p.reloads_invalid}),
            single(g + "store_conflicts_total", "Ownership CAS failures (not authoritative).",
                   "counter", self._ownership.conflicts),
            single(g + "engine_events_dropped_total", "Events dropped in the core's queue.",
                   "counter", gateway.events_dropped),
            labelled(g + "datagrams_total", "UDP datagrams.", "counter", "direction",
                     {"in": c.datagrams_in, "out": c.datagrams_out,
                      "send_failed": c.send_failed}),
            labelled(g + "inner_packets_total", "Inner packets.", "counter", "direction",
                     {"to_clients": c.inner_in, "from_clients": c.inner_out}),
        ]  # fmt: skip
        persistence = self._ownership.persistence
        if persistence is not None:  # a persistent store (docs/gateway.md "[state]")
            families += [
                labelled(g + "counter_reservations_total",
                         "Send-counter blocks reserved in the session store, by result.",
                         "counter", "result",
                         {"ok": persistence.writes, "failed": persistence.failures}),
                single(g + "sessions_resumed_total", "Stored sessions resumed at start.",
                       "counter", persistence.resumed),
            ]  # fmt: skip
        if self._pipeline is not None:
            families += observability_families(self._pipeline.health())
        return families
