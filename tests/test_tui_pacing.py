"""The UI draws a snapshot at once when its content changed, and one whose only news is
its ticking fields (seq, timestamp, uptime, key age) at most once a second (issue 14)."""

from __future__ import annotations

import dataclasses

from jvpn_tui.fake_engine import FakeEngine
from jvpn_tui.pacing import TICKING_PERIOD_S, SnapshotPacer
from tunnel.api import EngineSnapshot


def snapshots(n: int) -> list[EngineSnapshot]:
    """``n`` consecutive snapshots of the steady, healthy scripted session."""
    engine = FakeEngine("healthy")
    engine.start()
    out = []
    for _ in range(n):
        engine.pump()
        item = engine.channel.take().snapshot
        assert item is not None
        out.append(item)
    return out


def test_ticking_fields_alone_are_drawn_at_most_once_per_period() -> None:
    first, second, third = snapshots(3)
    assert second.session.uptime_s != first.session.uptime_s  # they do tick
    pacer = SnapshotPacer()
    assert pacer.due(first, now=100.0)
    assert not pacer.due(first, now=200.0)  # the same snapshot is never drawn twice
    assert not pacer.due(second, now=100.0 + TICKING_PERIOD_S / 2)
    assert pacer.due(second, now=100.0 + TICKING_PERIOD_S)
    assert not pacer.due(third, now=100.0 + TICKING_PERIOD_S * 1.5)


def test_any_other_change_is_drawn_at_once() -> None:
    first, second = snapshots(2)
    pacer = SnapshotPacer()
    assert pacer.due(first, now=100.0)
    switched = dataclasses.replace(
        second, session=dataclasses.replace(second.session, active=2, total_switches=9)
    )
    assert pacer.due(switched, now=100.01)
    lost = dataclasses.replace(switched, seq=switched.seq + 1, ui_dropped=5)
    assert pacer.due(lost, now=100.02)
