"""A UI that lost events rebuilds its timeline from the engine's history (issue 14).

Pilot against the scripted fake engine with a small channel: while the UI cannot take
anything (this coroutine does not yield), the engine publishes a path's death and a
switch and then more noise than the event queue holds, so the queue loses the death and
the switch. The UI must then say how many events were lost and still show both, with the
timeline it had before, re-read from the channel's history ring.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from textual.pilot import Pilot

from jvpn_tui.app import JvpnApp
from jvpn_tui.fake_engine import FakeEngine
from jvpn_tui.widgets import HealthPanel, SwitchTimeline
from tunnel.api import EventType, Reason, UiChannel

SIZE = (160, 48)
QUEUE = 16
NOISE = 30


async def wait_for(pilot: Pilot[Any], condition: Callable[[], bool], what: str) -> None:
    for _ in range(250):  # bounded: 250 pauses of 20 ms
        if condition():
            return
        await pilot.pause(0.02)
    raise AssertionError(f"timed out waiting for: {what}")


def text_of(widget: Any) -> str:
    visual = widget.visual
    return str(getattr(visual, "plain", visual))


class NotingApp(JvpnApp):
    def __init__(self, engine: Any) -> None:
        super().__init__(engine)
        self.titles: list[str] = []

    def notify(self, message: Any, **kwargs: Any) -> None:  # type: ignore[override]
        self.titles.append(str(kwargs.get("title", "")))
        super().notify(message, **kwargs)


async def scenario() -> None:
    channel = UiChannel(maxsize=QUEUE)
    engine = FakeEngine("healthy", channel=channel)
    app = NotingApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.snapshot is not None, "the first snapshot")
        timeline = app.query_one(SwitchTimeline)
        await wait_for(pilot, lambda: len(channel) == 0 and timeline.count > 0, "a taken queue")
        before = timeline.lines
        assert not any("LOST" in line for line in before)

        # -- the UI takes nothing until the next await
        engine.publish_event(EventType.TRANSPORT_DEAD, transport_id=1,
                             reason_code=Reason.TRANSPORT_DEAD, silence_ms=1500)  # fmt: skip
        engine.publish_event(EventType.TRANSPORT_SWITCH, previous_transport=1, new_transport=2,
                             reason_code=Reason.MANUAL_SWITCH, switch_latency_ms=12.5,
                             binding_epoch=9)  # fmt: skip
        for _ in range(NOISE):
            engine.publish_event(EventType.PATH_HEALTH, transport_id=2, alive=True)
        engine.pump()
        lost = NOISE + 2 - QUEUE
        assert channel.dropped == lost  # the death and the switch left the queue

        await wait_for(pilot, lambda: any("LOST" in line for line in timeline.lines),
                       "the loss on screen")  # fmt: skip
        lines = timeline.lines
        assert f"{lost} events lost" in lines[0]
        assert any("DEAD" in line and "path 1" in line for line in lines[1:3])
        assert any("SWITCH" in line and "1 → 2" in line for line in lines[1:3])
        assert lines[3:] == before  # the earlier timeline, re-read from the history
        assert "Events lost" in app.titles
        await wait_for(pilot, lambda: app.snapshot is not None
                       and app.snapshot.ui_dropped == lost, "the drop count")  # fmt: skip
        assert f"dropped {lost}" in text_of(app.query_one(HealthPanel))


def test_a_ui_that_lost_events_rebuilds_its_timeline_from_the_history() -> None:
    asyncio.run(scenario())
