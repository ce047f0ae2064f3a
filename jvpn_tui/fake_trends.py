"""The fake engine's scripted past: how each scenario got to its moment, second by second.

``FakeEngine(scenario, past_s=N)`` starts ``N`` seconds before the scenario's moment; each
``pump()`` then moves one second forward, with the path measurements and traffic rates
:func:`frame` gives, so the UI's trend charts (``widgets/trends.py``) fill as they would
live. :func:`past_events` are the session events of that past (switches, a death), which
the engine publishes with the scenario's own at start. Deterministic: no clock, no
randomness.

- healthy: the three paths wobble around their RTTs; no switch.
- mid-switch: path 1's RTT and loss climb over the last 30 s (the switch to 2 is pending).
- degraded: path 1 loses more and more; at -50 s the session moved to path 2, which died
  at -17.7 s (3 s later, back to path 1, the only one left).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Final

from tunnel.api import PathView, SessionView, TrafficStats

PAST_S: Final = 120
"""The past the tests' pictures play (two minutes: 2 s a chart column at 160x48, 3 s at
80x24; ``make screenshots`` plays four)."""

DEGRADED_SWITCH_S: Final = 50.0
"""Degraded: seconds before the moment when path 1's loss moved the session to path 2."""
DEGRADED_DEATH_S: Final = 17.7
"""Degraded: seconds before the moment when path 2 died (its TRANSPORT_DEAD event)."""
MID_SWITCH_RAMP_S: Final = 30.0
"""Mid-switch: how long path 1 has been getting worse."""


def _wave(seconds_before: float, phase: float) -> float:
    """A deterministic wobble in [-1, 1] that fades out over the last 5 s (into the
    moment's own values)."""
    t = -seconds_before
    fade = min(1.0, seconds_before / 5.0)
    return fade * (0.6 * math.sin(t / 7.0 + phase) + 0.4 * math.sin(t / 2.3 + 2 * phase))


def _ramp(seconds_before: float, length: float) -> float:
    """0 before the last ``length`` seconds, rising to 1 at the moment."""
    return max(0.0, 1.0 - seconds_before / length)


def _path(view: PathView, b: float, *, rtt: float | None, loss: float, role: str) -> PathView:
    stats = dataclasses.replace(
        view.stats, srtt_ms=None if rtt is None else round(rtt, 1), alive=rtt is not None,
        loss_ratio=round(loss, 3), loss_up=round(loss, 3), loss_known=rtt is not None,
        direction_known=rtt is not None,
    )  # fmt: skip
    return dataclasses.replace(view, stats=stats, role=role)


def _healthy(view: PathView, b: float, active: int | None) -> PathView:
    st = view.stats
    rtt = None if st.srtt_ms is None else st.srtt_ms + 0.15 * st.srtt_ms * _wave(b, st.path_id)
    return _path(view, b, rtt=rtt, loss=st.loss_ratio, role=view.role)


def _mid_switch(view: PathView, b: float, active: int | None) -> PathView:
    st = view.stats
    if st.path_id != 1:
        return _healthy(dataclasses.replace(view, role="standby"), b, active)
    x = _ramp(b, MID_SWITCH_RAMP_S)
    rtt = 24.0 + (148.0 - 24.0) * x**2 + 3.0 * _wave(b, 1) * (1 + 4 * x)
    return _path(view, b, rtt=rtt, loss=st.loss_ratio * x, role="active")


def _degraded(view: PathView, b: float, active: int | None) -> PathView:
    st = view.stats
    role = "active" if st.path_id == active else "standby"
    if st.path_id == 1:
        x = _ramp(b, 100.0)
        rtt = 40.0 + (212.0 - 40.0) * x**2 + 8.0 * _wave(b, 1) * (1 + 3 * x)
        return _path(view, b, rtt=rtt, loss=st.loss_ratio * x, role=role)
    if st.path_id == 2:
        if b < DEGRADED_DEATH_S:
            return _path(view, b, rtt=None, loss=1.0, role="down")
        return _path(view, b, rtt=41.0 + 5.0 * _wave(b, 3), loss=0.0, role=role)
    return view  # never validated


def _active(scenario: str, session: SessionView, b: float) -> int | None:
    if scenario == "degraded" and DEGRADED_DEATH_S <= b < DEGRADED_SWITCH_S:
        return 2
    return session.active


def frame(
    scenario: str, session: SessionView, traffic: TrafficStats, seconds_before: int
) -> tuple[SessionView, TrafficStats]:
    """The scenario ``seconds_before`` seconds before its moment (``session`` and
    ``traffic`` are the moment's; 0 returns them unchanged)."""
    if seconds_before <= 0:
        return session, traffic
    b = float(seconds_before)
    active = _active(scenario, session, b)
    draw = {"healthy": _healthy, "mid-switch": _mid_switch, "degraded": _degraded}[scenario]
    paths = tuple(draw(view, b, active) for view in session.paths)
    pending = session.pending if scenario != "mid-switch" else None
    past = dataclasses.replace(
        session, paths=paths, active=active, pending=pending,
        uptime_s=round(session.uptime_s - b, 3), key_age_s=round(session.key_age_s - b, 3),
    )  # fmt: skip
    better = 0.0  # how much more traffic the path carried before it got worse
    if scenario == "mid-switch":
        better = 0.6 * (1.0 - _ramp(b, MID_SWITCH_RAMP_S))
    elif scenario == "degraded":
        better = 1.5 * (1.0 - _ramp(b, 100.0))
    scale = (1.0 + better) * (1.0 + 0.1 * _wave(b, 5))
    rates = dataclasses.replace(
        traffic, tx_rate_bps=round(traffic.tx_rate_bps * scale),
        rx_rate_bps=round(traffic.rx_rate_bps * (scale + 0.05 * _wave(b, 2))),
    )  # fmt: skip
    return past, rates


def past_events(scenario: str) -> tuple[tuple[float, str, Mapping[str, Any]], ...]:
    """``(seconds before the moment, event type, fields)`` of the scripted past."""
    if scenario != "degraded":
        return ()
    return (
        (DEGRADED_SWITCH_S, "TRANSPORT_SWITCH", {
            "previous_transport": 1, "new_transport": 2, "reason_code": "loss_recovery",
            "switch_latency_ms": 201.4, "binding_epoch": 4, "candidate_count": 3,
            "loss_ratio": 0.0, "latency_estimate_ms": 41.0}),
        (DEGRADED_DEATH_S - 3.0, "TRANSPORT_SWITCH", {
            "previous_transport": 2, "new_transport": 1,
            "reason_code": "dead_transport_recovery", "switch_latency_ms": 233.0,
            "binding_epoch": 5, "candidate_count": 3, "loss_ratio": 0.12,
            "latency_estimate_ms": 180.0}),
    )  # fmt: skip
