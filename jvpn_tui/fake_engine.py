"""A scripted engine for the UI tests, the snapshot tests and the screenshot script.

:class:`FakeEngine` implements :class:`tunnel.api.EngineHandle` without a network: it
publishes deterministic :class:`EngineSnapshot` values and event dicts (the same
``to_dict()`` shape the real events have) and answers commands the way the client
session does (a switch is committed or denied with a reason, terminate ends it).

Nothing reads a clock: timestamps start at :data:`T0_MS` and advance by
:data:`TICK_MS` per :meth:`FakeEngine.pump`. By default nothing runs by itself
(``period=None``): ``start()`` publishes the scenario and each ``pump()`` answers the
waiting commands and publishes one snapshot, so a test decides exactly what the UI sees.
With ``period`` set, a thread pumps every ``period`` seconds (``publish_events`` adds a
path-health event per tick, to flood the channel in the isolation test).
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Mapping
from typing import Any, Final

from jvpn_tui.fake_trends import frame, past_events
from tunnel.api import (
    Command,
    CommandQueue,
    EngineSnapshot,
    ForceReattach,
    ObservabilityView,
    PathStatsView,
    PathView,
    ReloadPolicy,
    SessionView,
    SetAutoSwitch,
    SinkView,
    SwitchTo,
    Terminate,
    TrafficStats,
    UiChannel,
)
from tunnel.demo.commands import (
    ALL_PATHS,
    DemoAction,
    DemoImpair,
    ScriptStatus,
    script_detail,
    step_detail,
)
from tunnel.demo.script import DEMO_SCRIPT, step_summary

T0_MS: Final = 1_717_243_200_000
"""2024-06-01 12:00:00 UTC: when the scripted session was born (uptime 0)."""

TICK_MS: Final = 100
"""Logical time one pump() advances."""

SESSION_ID: Final = "3f2a9c1e5b7d4a60a1c2e3f405162738"
POLICY_VERSION: Final = "2024-06-01.1"
SWITCH_COOLDOWN_MS: Final = 2000.0
"""Cooldown the fake starts after a committed switch (the default policy's value)."""

SCENARIOS: Final = ("healthy", "mid-switch", "degraded")

_LABELS: Final = {
    1: "10.0.0.2:40001 -> 198.51.100.7:51820",
    2: "10.0.1.2:40002 -> 198.51.100.7:51820",
    3: "100.64.3.9:40003 -> 198.51.100.7:51821",
}


def _history(base: float, spread: float, phase: int, n: int = 40) -> tuple[float, ...]:
    """A deterministic wavy RTT history (no randomness)."""
    return tuple(
        round(base + spread * (0.5 + 0.3 * math.sin(i / 2.5 + phase)
                               + 0.2 * math.sin(i * 1.7 + phase)), 1)
        for i in range(n)
    )  # fmt: skip


def _stats(
    pid: int,
    rtt: float | None,
    jitter: float,
    loss: float,
    score: float,
    *,
    alive: bool = True,
    history: tuple[float, ...] = (),
    misses: int = 0,
) -> PathStatsView:
    return PathStatsView(
        path_id=pid, srtt_ms=rtt, jitter_ms=jitter, loss_ratio=loss,
        consecutive_misses=misses, score=score, alive=alive, rtt_history=history,
        loss_up=loss,  # the scripted loss is all upstream
        loss_known=rtt is not None, direction_known=rtt is not None,
    )  # fmt: skip


class FakeEngine:
    """Scripted :class:`~tunnel.api.EngineHandle`; see the module docstring."""

    def __init__(
        self,
        scenario: str = "healthy",
        *,
        channel: UiChannel | None = None,
        demo: bool = False,
        period: float | None = None,
        publish_events: bool = False,
        fail_on_start: str | None = None,
        past_s: int = 0,
    ) -> None:
        if scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {scenario!r} (known: {', '.join(SCENARIOS)})")
        self.scenario = scenario
        self.channel = channel if channel is not None else UiChannel()
        self.commands = CommandQueue()
        self.demo = demo
        self.received: list[Command] = []
        """Every command taken from the queue, in order (for tests)."""
        self.stop_calls = 0
        self.ticks = 0
        self._period = period
        self._publish_events = publish_events
        self._fail_on_start = fail_on_start
        self._seq = 0
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._running = True
        self._final_reason: str | None = None
        self._script: ScriptStatus | None = None
        self._session, self._obs, self._traffic, self._history = _scenario(scenario)
        self._moment = (self._session, self._traffic)
        self.past_left = past_s
        """Seconds of the scripted past still to play: with ``past_s``, the engine starts
        that long before the scenario's moment and each pump() moves one second forward
        (``fake_trends``), so the UI's trend charts fill."""
        if past_s:
            self._history = _with_past(scenario, self._history, self._session)
            self._session, self._traffic = frame(scenario, *self._moment, past_s)
        self._now_ms = T0_MS + round(self._session.uptime_s * 1000)

    # -- EngineHandle ----------------------------------------------------------------

    def start(self) -> None:
        if self._fail_on_start is not None:
            self._stopped.set()
            raise RuntimeError(self._fail_on_start)
        with self._lock:
            for event in self._history:
                self.channel.publish(event)
            if self.demo:  # the demo plays its script from the start: announce its first step
                self._announce_first_step()
            self._publish_snapshot()
        if self._period is not None:
            self._thread = threading.Thread(target=self._loop, name="fake-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.stop_calls += 1
        self._halt.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._stopped.set()

    def join(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    # -- scripting ---------------------------------------------------------------------

    def pump(self) -> int:
        """Answer every waiting command, advance time one tick, publish a snapshot."""
        with self._lock:
            if not self._running:
                return 0
            if self.past_left:
                self._step_past()
                return 0
            commands = self.commands.take_all()
            self._now_ms += TICK_MS
            self.ticks += 1
            self._cool_down()
            for command in commands:
                self.received.append(command)
                self._apply(command)
                if not self._running:
                    break
            if self._publish_events:
                self._emit("PATH_HEALTH", transport_id=self._session.active or 1,
                           alive=True, classification="healthy", rtt_ms=24.0,
                           loss_ratio=0.0, score=0.9)  # fmt: skip
            self._publish_snapshot()
            return len(commands)

    def fail(self, reason: str, state: str = "TERMINATED") -> None:
        """The engine dies: a last snapshot with ``running=False`` and ``final_reason``."""
        with self._lock:
            self._session = dataclasses.replace(self._session, state=state, active=None)
            self._finish(reason)

    def publish_event(self, event_type: str, **fields: Any) -> None:
        """Publish one extra event (tests)."""
        with self._lock:
            self._emit(event_type, **fields)

    @property
    def now_ms(self) -> int:
        """Engine time of the newest snapshot (``ts_ms``)."""
        return self._now_ms

    # -- internals ---------------------------------------------------------------------

    def _step_past(self) -> None:
        """One second of the scripted past (``past_s``), then its snapshot."""
        self.past_left -= 1
        self._now_ms += 1000
        self._session, self._traffic = frame(self.scenario, *self._moment, self.past_left)
        self._publish_snapshot()

    def _loop(self) -> None:
        assert self._period is not None
        while not self._halt.wait(self._period):
            self.pump()
            if not self._running:
                break
        self._stopped.set()

    def _finish(self, reason: str) -> None:
        self._running = False
        self._final_reason = reason
        self._publish_snapshot()
        self._halt.set()
        self._stopped.set()

    def _publish_snapshot(self) -> None:
        self._seq += 1
        self.channel.publish(
            EngineSnapshot(
                seq=self._seq, ts_ms=self._now_ms, session=self._session,
                traffic=self._traffic, observability=self._obs,
                ui_dropped=self.channel.dropped, running=self._running,
                final_reason=self._final_reason, demo=self.demo,
            )
        )  # fmt: skip

    def _emit(self, event_type: str, **fields: Any) -> None:
        s = self._session
        event: dict[str, Any] = {
            "event_type": event_type, "ts_ms": self._now_ms, "session_id": s.session_id,
            "node_id": "client", "policy_version": s.policy_version,
            "state_version": s.state_version,
        }  # fmt: skip
        event.update(fields)
        self.channel.publish(event)

    def _cool_down(self) -> None:
        s = self._session
        self._session = dataclasses.replace(
            s, cooldown_remaining_ms=max(0.0, s.cooldown_remaining_ms - TICK_MS),
            uptime_s=round(s.uptime_s + TICK_MS / 1000, 3),
            key_age_s=round(s.key_age_s + TICK_MS / 1000, 3),
        )  # fmt: skip

    def _path(self, pid: int) -> PathView | None:
        return next((p for p in self._session.paths if p.stats.path_id == pid), None)

    def _set_path(self, pid: int, **changes: Any) -> None:
        if "misses" in changes:
            changes["consecutive_misses"] = changes.pop("misses")
        stats_changes = {k: v for k, v in changes.items() if k in _STATS_FIELDS}
        view_changes = {k: v for k, v in changes.items() if k not in _STATS_FIELDS}
        paths = []
        for p in self._session.paths:
            if p.stats.path_id == pid:
                p = dataclasses.replace(
                    p, stats=dataclasses.replace(p.stats, **stats_changes), **view_changes
                )
            paths.append(p)
        self._session = dataclasses.replace(self._session, paths=tuple(paths))

    def _apply(self, command: Command) -> None:
        if isinstance(command, SwitchTo):
            self._switch(command.path_id, "manual_switch", manual=True)
        elif isinstance(command, SetAutoSwitch):
            self._session = dataclasses.replace(self._session, auto_switch=command.enabled)
        elif isinstance(command, ForceReattach):
            self._reattach()
        elif isinstance(command, ReloadPolicy):
            self._emit("POLICY_EVENT", policy_name="POLICY_LOADED", reason_code="policy_applied",
                       detail=f"policy {self._session.policy_version} reloaded")  # fmt: skip
        elif isinstance(command, Terminate):
            self._terminate("operator_terminated")
        elif isinstance(command, DemoImpair):
            self._impair(command)

    def _deny(self, pid: int, reason: str, *, manual: bool, retry: float | None = None) -> None:
        self._emit("TRANSPORT_SWITCH_DENIED", reason_code=reason, requested_transport=pid,
                   manual=manual, retry_after_ms=retry)  # fmt: skip

    def _switch(self, pid: int, reason: str, *, manual: bool) -> None:
        s = self._session
        target = self._path(pid)
        if s.state == "TERMINATED":
            self._deny(pid, "invalid_state_for_reattach", manual=manual)
        elif target is None or pid == s.active:
            self._deny(pid, "no_valid_candidate", manual=manual)
        elif not target.validated:
            self._deny(pid, "path_not_validated", manual=manual)
        elif not target.stats.alive:
            self._deny(pid, "no_valid_candidate", manual=manual)
        elif s.switch_budget_left <= 0:
            self._deny(pid, "switch_rate_limited", manual=manual, retry=41_300.0)
        elif s.cooldown_remaining_ms > 0:
            self._deny(pid, "cooldown_active", manual=manual, retry=s.cooldown_remaining_ms)
        else:
            previous = s.active
            self._emit("REATTACH_ATTEMPT", candidate_transport=pid, nonce=s.state_version + 1,
                       expected_epoch=s.binding_epoch,
                       kind="manual" if manual else "recovery")  # fmt: skip
            if previous is not None:
                self._set_path(previous, role="standby" if self._alive(previous) else "down")
            self._set_path(pid, role="active")
            s = self._session
            self._session = dataclasses.replace(
                s, active=pid, pending=None, state_version=s.state_version + 1,
                binding_epoch=s.binding_epoch + 1, peer_state_version=s.state_version + 1,
                switch_budget_left=s.switch_budget_left - 1,
                cooldown_remaining_ms=SWITCH_COOLDOWN_MS, total_switches=s.total_switches + 1,
            )  # fmt: skip
            self._emit("REATTACH_RESULT", status="SUCCESS", reason_code="reattach_success",
                       candidate_transport=pid, path=target.label)  # fmt: skip
            self._emit("TRANSPORT_SWITCH", previous_transport=previous, new_transport=pid,
                       reason_code=reason, switch_latency_ms=38.5 if manual else 212.0,
                       binding_epoch=self._session.binding_epoch,
                       candidate_count=len(s.paths), loss_ratio=target.stats.loss_ratio,
                       latency_estimate_ms=target.stats.srtt_ms, path=target.label,
                       explicit=True, auditable=True)  # fmt: skip

    def _alive(self, pid: int) -> bool:
        p = self._path(pid)
        return p is not None and p.stats.alive

    def _reattach(self) -> None:
        s = self._session
        if s.active is None or s.state == "TERMINATED":
            return
        self._emit("REATTACH_ATTEMPT", candidate_transport=s.active, nonce=s.state_version + 1,
                   expected_epoch=s.binding_epoch, kind="resume")  # fmt: skip
        self._session = dataclasses.replace(s, binding_epoch=s.binding_epoch + 1)
        self._emit("REATTACH_RESULT", status="SUCCESS", reason_code="reattach_success",
                   candidate_transport=s.active, path=_LABELS.get(s.active, ""))  # fmt: skip

    def _terminate(self, reason: str) -> None:
        s = self._session
        self._session = dataclasses.replace(
            s, state="TERMINATED", state_version=s.state_version + 1, active=None, pending=None
        )
        self._emit("STATE_CHANGE", previous_state=s.state, new_state="TERMINATED",
                   reason_code=reason, trigger="terminate", edge="T20")  # fmt: skip
        self._emit("SESSION_TERMINATED", reason_code=reason,
                   session_age_ms=round(s.uptime_s * 1000, 3), transportless_age_ms=0.0,
                   total_switches=s.total_switches, initiator="local")  # fmt: skip
        self._finish(reason)

    def _impair(self, command: DemoImpair) -> None:
        pid, action = command.path_id, command.action
        if action in (DemoAction.SCRIPT, DemoAction.PLAY_PAUSE):
            pause = action == DemoAction.PLAY_PAUSE and self._script == ScriptStatus.PLAYING
            self._script = ScriptStatus.PAUSED if pause else ScriptStatus.PLAYING
            self._emit(
                "DIAGNOSTIC",
                reason_code="demo_action",
                state="",
                detail=script_detail(self._script, "fake engine: announced only"),
            )
            return
        where = "every path" if pid == ALL_PATHS else f"path {pid}"
        self._emit("DIAGNOSTIC", reason_code="demo_action", state="",
                   detail=f"demo: {where}: {action} (fake engine)")  # fmt: skip
        if action == DemoAction.KILL:
            self._kill(pid)
        elif action == DemoAction.RESTORE:
            for p in self._session.paths:
                if not p.stats.alive:
                    self._set_path(p.stats.path_id, alive=True, misses=0, loss_ratio=0.0,
                                   loss_up=0.0, score=0.7, role="standby")  # fmt: skip
        elif action == DemoAction.LOSS:
            self._set_path(pid, loss_ratio=command.value, loss_up=command.value)
        elif action == DemoAction.REPLAY:
            self._emit("SECURITY_EVENT", violation_type="REPLAY_DETECTED",
                       reason_code="replay_detected", count=1,
                       source="127.0.0.1:40999", transport_id=pid)  # fmt: skip

    def _announce_first_step(self) -> None:
        self._script = ScriptStatus.PLAYING
        first = DEMO_SCRIPT.steps[0]
        what = step_summary(first, self._session.active)
        detail = step_detail(1, len(DEMO_SCRIPT.steps), first.at_s, what, first.expect)
        self._emit("DIAGNOSTIC", reason_code="demo_action", state="", detail=detail)

    def _kill(self, pid: int) -> None:
        """The path dies; when it was the active one, the session recovers on a standby."""
        self._set_path(pid, alive=False, score=0.0, misses=12, role="down")
        self._emit("TRANSPORT_DEAD", transport_id=pid, silence_ms=900.0,
                   reason_code="transport_dead")  # fmt: skip
        if pid != self._session.active:
            return
        standby = [
            p.stats.path_id for p in self._session.paths
            if p.stats.alive and p.validated and p.stats.path_id != pid
        ]  # fmt: skip
        self._session = dataclasses.replace(self._session, cooldown_remaining_ms=0.0)
        if standby:
            self._switch(standby[0], "dead_transport_recovery", manual=False)


_STATS_FIELDS: Final = frozenset(f.name for f in dataclasses.fields(PathStatsView))


def _with_past(
    scenario: str, history: tuple[Mapping[str, Any], ...], moment: SessionView
) -> tuple[Mapping[str, Any], ...]:
    """The scenario's events and those of its scripted past, in time order."""
    at_ms = round(moment.uptime_s * 1000)
    extra = tuple(
        _event(kind, at_ms - round(before * 1000), moment.state_version, **fields)
        for before, kind, fields in past_events(scenario)
    )
    return tuple(sorted((*history, *extra), key=lambda e: int(e["ts_ms"])))


def _event(event_type: str, ts: int, version: int, **fields: Any) -> Mapping[str, Any]:
    base: dict[str, Any] = {
        "event_type": event_type, "ts_ms": T0_MS + ts, "session_id": SESSION_ID,
        "node_id": "client", "policy_version": POLICY_VERSION, "state_version": version,
    }  # fmt: skip
    base.update(fields)
    return base


def _session(**overrides: Any) -> SessionView:
    fields: dict[str, Any] = {
        "session_id": SESSION_ID, "state": "ATTACHED", "state_version": 7,
        "binding_epoch": 4, "peer_state": "ATTACHED", "peer_state_version": 7,
        "active": 1, "pending": None, "paths": (), "auto_switch": True,
        "switch_budget_left": 5, "cooldown_remaining_ms": 0.0, "key_phase": 2,
        "key_age_s": 95.0, "policy_version": POLICY_VERSION, "uptime_s": 3723.0,
        "queue_depth": 0, "queue_dropped": 0, "total_switches": 2, "drops": (),
        "inner_address": "10.77.0.2", "inner_address6": "fd00:77::2",
        "cipher": "aes-256-gcm",
    }  # fmt: skip
    fields.update(overrides)
    return SessionView(**fields)


_OPENING: Final = (
    _event("SESSION_CREATED", 0, 1, peer="gw-1", inner_address="10.77.0.2",
           cipher="aes-256-gcm"),
    _event("STATE_CHANGE", 40, 2, previous_state="BIRTH", new_state="ATTACHED",
           reason_code="attached_to_transport", trigger="handshake_ok", edge="T01"),
    _event("TRANSPORT_ATTACHED", 40, 2, transport_id=1, path=_LABELS[1], binding_epoch=1),
    _event("TRANSPORT_SWITCH", 61_200, 4, previous_transport=1, new_transport=2,
           reason_code="loss_recovery", switch_latency_ms=184.2, binding_epoch=2,
           candidate_count=3, loss_ratio=0.0, latency_estimate_ms=41.0, path=_LABELS[2]),
    _event("TRANSPORT_SWITCH", 242_900, 6, previous_transport=2, new_transport=1,
           reason_code="manual_switch", switch_latency_ms=36.7, binding_epoch=3,
           candidate_count=3, loss_ratio=0.0, latency_estimate_ms=24.0, path=_LABELS[1]),
    _event("KEY_ROTATED", 3_600_000, 7, key_phase=2, reason_code="time_elapsed",
           initiator="local"),
)  # fmt: skip


def _scenario(
    name: str,
) -> tuple[SessionView, ObservabilityView, TrafficStats, tuple[Mapping[str, Any], ...]]:
    sinks_ok = (
        SinkView("jsonl", "ok", 0, 0),
        SinkView("syslog", "ok", 1, 0),
    )
    traffic = TrafficStats(tx_packets=48_211, rx_packets=47_903, tx_bytes=31_880_412,
                           rx_bytes=40_117_020, tx_rate_bps=1_240_000.0,
                           rx_rate_bps=1_610_000.0)  # fmt: skip
    if name == "healthy":
        paths = (
            PathView(_stats(1, 24.1, 2.3, 0.0, 0.94, history=_history(21, 6, 0)),
                     _LABELS[1], "active", True),
            PathView(_stats(2, 41.3, 4.8, 0.0, 0.81, history=_history(37, 9, 3)),
                     _LABELS[2], "standby", True),
            PathView(_stats(3, 87.6, 11.2, 0.01, 0.55, history=_history(78, 20, 5)),
                     _LABELS[3], "standby", True),
        )  # fmt: skip
        session = _session(paths=paths)
        obs = ObservabilityView(ok=True, ring_depth=2, ring_dropped=0, sinks=sinks_ok)
        return session, obs, traffic, _OPENING
    if name == "mid-switch":
        paths = (
            PathView(_stats(1, 148.0, 39.0, 0.22, 0.31, misses=3,
                            history=_history(24, 6, 0, 28) + _history(120, 60, 2, 12)),
                     _LABELS[1], "active", True),
            PathView(_stats(2, 40.8, 4.1, 0.0, 0.83, history=_history(37, 9, 3)),
                     _LABELS[2], "switching", True),
            PathView(_stats(3, 86.9, 10.7, 0.0, 0.56, history=_history(78, 20, 5)),
                     _LABELS[3], "standby", True),
        )  # fmt: skip
        session = _session(paths=paths, state="VOLATILE", state_version=8, pending=2,
                           peer_state="ATTACHED", peer_state_version=7,
                           uptime_s=3741.5, key_age_s=113.5)  # fmt: skip
        events: tuple[Mapping[str, Any], ...] = (*_OPENING,
            _event("STATE_CHANGE", 3_741_200, 8, previous_state="ATTACHED",
                   new_state="VOLATILE", reason_code="loss_threshold_exceeded",
                   trigger="instability", edge="T02"),
            _event("REATTACH_ATTEMPT", 3_741_400, 8, candidate_transport=2, nonce=9,
                   expected_epoch=4, kind="proactive"),
        )  # fmt: skip
        obs = ObservabilityView(ok=True, ring_depth=5, ring_dropped=0, sinks=sinks_ok)
        return session, obs, traffic, events
    # degraded
    paths = (
        PathView(_stats(1, 212.0, 58.0, 0.18, 0.22, misses=2,
                        history=_history(150, 90, 1)), _LABELS[1], "active", True),
        PathView(_stats(2, None, 0.0, 1.0, 0.0, alive=False, misses=14,
                        history=_history(37, 9, 3, 18)), _LABELS[2], "down", True),
        PathView(_stats(3, None, 0.0, 0.0, 0.0, alive=False), _LABELS[3], "unvalidated",
                 False),
    )  # fmt: skip
    session = _session(
        paths=paths, state="DEGRADED", state_version=12, binding_epoch=6,
        peer_state="ATTACHED", peer_state_version=11, switch_budget_left=0,
        cooldown_remaining_ms=1500.0, total_switches=5, uptime_s=3902.0, key_age_s=274.0,
        queue_depth=37, queue_dropped=112,
        drops=(("auth_failed", 9), ("replay", 4), ("unknown_session", 2)),
    )  # fmt: skip
    events = (*_OPENING,
        _event("STATE_CHANGE", 3_880_000, 9, previous_state="ATTACHED", new_state="VOLATILE",
               reason_code="loss_threshold_exceeded", trigger="instability", edge="T02"),
        _event("TRANSPORT_DEAD", 3_884_300, 10, transport_id=2, silence_ms=912.0,
               reason_code="transport_dead"),
        _event("SECURITY_EVENT", 3_890_050, 10, violation_type="REPLAY_DETECTED",
               reason_code="replay_detected", count=4, source="203.0.113.66:40002",
               transport_id=2),
        _event("TRANSPORT_SWITCH_DENIED", 3_895_000, 11, reason_code="switch_rate_limited",
               requested_transport=2, manual=False, retry_after_ms=41_300.0),
        _event("SECURITY_EVENT", 3_897_700, 11, violation_type="INVALID_PROOF",
               reason_code="bad_proof", count=1, source="203.0.113.66:40777"),
        _event("STATE_CHANGE", 3_901_000, 12, previous_state="VOLATILE", new_state="DEGRADED",
               reason_code="volatile_persisted", trigger="degrade", edge="T05"),
    )  # fmt: skip
    obs = ObservabilityView(
        ok=False, ring_depth=212, ring_dropped=38,
        sinks=(SinkView("jsonl", "ok", 3, 0),
               SinkView("syslog", "failing", 256, 38, "connection refused")),
    )  # fmt: skip
    traffic = TrafficStats(tx_packets=51_004, rx_packets=49_310, tx_bytes=33_120_880,
                           rx_bytes=41_002_310, tx_rate_bps=310_000.0,
                           rx_rate_bps=255_000.0)  # fmt: skip
    return session, obs, traffic, events
