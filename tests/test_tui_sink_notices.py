"""The TUI tells the user about event sinks as it happens (issue 12, item 8 b).

Pilot against the scripted fake engine: a SINK_HEALTH change and an EVENT_LOSS published
on the channel become notifications (the message names the sink, its state or how many
events it lost); the Observability panel colours a ``lagging`` sink as a warning.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

from textual.pilot import Pilot

from jvpn_tui.app import JvpnApp
from jvpn_tui.fake_engine import FakeEngine
from jvpn_tui.widgets import HealthPanel
from jvpn_tui.widgets.health import sink_notice
from tunnel.api import EngineSnapshot, ObservabilityView, SinkView

SIZE = (160, 48)


async def wait_for(pilot: Pilot[Any], condition: Callable[[], bool], what: str) -> None:
    for _ in range(250):  # bounded: 250 pauses of 20 ms
        if condition():
            return
        await pilot.pause(0.02)
    raise AssertionError(f"timed out waiting for: {what}")


class NotingApp(JvpnApp):
    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        self.notes: list[tuple[str, str, str]] = []

    def notify(self, message: Any, **kwargs: Any) -> None:  # type: ignore[override]
        self.notes.append((str(kwargs.get("title", "")), str(message), str(kwargs["severity"])))
        super().notify(message, **kwargs)


async def scenario() -> None:
    engine = FakeEngine("healthy")
    app = NotingApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.snapshot is not None, "the first snapshot")
        engine.publish_event("SINK_HEALTH", sink="syslog-tcp:siem:6514", state="lagging",
                             previous_state="failing", dropped_total=1732,
                             last_error="TimeoutError: timed out")  # fmt: skip
        engine.publish_event("EVENT_LOSS", sink="syslog-tcp:siem:6514", dropped=40,
                             dropped_total=1772, reason="sink_failing")  # fmt: skip
        await wait_for(pilot, lambda: len(app.notes) >= 2, "two notifications")
        assert app.notes[-2:] == [
            ("Event sink",
             "event sink syslog-tcp:siem:6514 is lagging (was failing): TimeoutError: timed out",
             "warning"),
            ("Events lost",
             "event sink syslog-tcp:siem:6514 lost 40 events (sink_failing; 1772 in all)",
             "warning"),
        ]  # fmt: skip
        panel = app.query_one(HealthPanel)
        snap = app.snapshot
        assert isinstance(snap, EngineSnapshot)
        sinks = (SinkView("syslog-tcp:siem:6514", "lagging", 12, 1772, "TimeoutError"),)
        panel.show(
            dataclasses.replace(snap, observability=ObservabilityView(ok=False, sinks=sinks))
        )
        visual = panel.visual
        text = str(getattr(visual, "plain", visual))
        assert "syslog-tcp:siem:6514 lagging" in text and "dropped 1772" in text


def test_sink_health_and_event_loss_are_notified_as_they_happen() -> None:
    asyncio.run(scenario())


def test_sink_notice_covers_recovery_failure_and_the_ring() -> None:
    ok = sink_notice({"event_type": "SINK_HEALTH", "sink": "jsonl", "state": "ok",
                      "previous_state": "lagging", "last_error": "old"})  # fmt: skip
    assert ok == ("event sink jsonl is ok (was lagging)", "Event sink", "information")
    failing = sink_notice(
        {"event_type": "SINK_HEALTH", "sink": "jsonl", "state": "failing",
         "previous_state": "ok", "last_error": "directory /x does not exist"}
    )  # fmt: skip
    assert failing is not None and failing[2] == "error" and "/x does not exist" in failing[0]
    ring = sink_notice({"event_type": "EVENT_LOSS", "sink": "*", "dropped": 3,
                        "dropped_total": 3, "reason": "ring_overflow"})  # fmt: skip
    assert ring is not None and ring[0].startswith("the event ring lost 3 events")
    assert sink_notice({"event_type": "STATE_CHANGE"}) is None
