"""Pictures of jvpn-tui (pytest-textual-snapshot) against the scripted fake engine.

Fixed terminal sizes, fixed timestamps (the fake engine has no clock), no clock in the
header and no blinking cursor: the SVGs are byte-for-byte reproducible. The fake engine
first plays its scenario's two minutes of scripted past (``past_s``), so the trend charts
are in the pictures: at 160x48 on the one screen, at 80x24 and 100x30 on their page
(``c``) next to a picture of the first page. Baselines live
in tests/__snapshots__/; after an intended UI change, regenerate them with
``pytest tests/test_tui_snapshots.py --snapshot-update`` and look at the diff.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from textual.pilot import Pilot

from jvpn_tui.app import JvpnApp
from jvpn_tui.fake_engine import SCENARIOS, FakeEngine
from jvpn_tui.fake_trends import PAST_S
from jvpn_tui.screenshots import play_past
from themes import PALETTES

WIDE = (160, 48)
SMALL = (80, 24)
SIZES = {"80x24": SMALL, "100x30": (100, 30), "160x48": WIDE}


def _with_past(engine: FakeEngine) -> Callable[[Pilot[Any]], Awaitable[None]]:
    """run_before: the first snapshot, the engine's scripted past, the compositor settled."""

    async def run_before(pilot: Pilot[Any]) -> None:
        await play_past(pilot, engine)

    return run_before


async def _first_snapshot(pilot: Pilot[Any]) -> None:
    app = pilot.app
    assert isinstance(app, JvpnApp)
    for _ in range(250):
        if app.snapshot is not None:
            break
        await pilot.pause(0.02)
    assert app.snapshot is not None, "the fake engine's snapshot never arrived"
    # Let every widget apply it and the compositor settle, however loaded the machine is.
    for _ in range(3):
        await pilot.pause()
    await pilot.wait_for_scheduled_animations()


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_layout(snap_compare: Any, scenario: str, size: str) -> None:
    engine = FakeEngine(scenario, past_s=PAST_S)
    app = JvpnApp(engine)
    assert snap_compare(app, terminal_size=SIZES[size], run_before=_with_past(engine))


@pytest.mark.parametrize("size", ["80x24", "100x30"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_trends_page(snap_compare: Any, scenario: str, size: str) -> None:
    engine = FakeEngine(scenario, past_s=PAST_S)
    app = JvpnApp(engine)
    assert snap_compare(
        app, terminal_size=SIZES[size], run_before=_with_past(engine), press=["c"]
    )


@pytest.mark.parametrize("palette", PALETTES)
def test_theme(snap_compare: Any, palette: str) -> None:
    engine = FakeEngine("degraded", past_s=PAST_S)
    app = JvpnApp(engine, theme=palette)
    assert snap_compare(app, terminal_size=WIDE, run_before=_with_past(engine))


def test_no_color(snap_compare: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    engine = FakeEngine("degraded", past_s=PAST_S)
    app = JvpnApp(engine)
    assert app.no_color
    assert snap_compare(app, terminal_size=WIDE, run_before=_with_past(engine))


@pytest.mark.parametrize("size", ["80x24", "160x48"])
def test_help_screen(snap_compare: Any, size: str) -> None:
    app = JvpnApp(FakeEngine("healthy", demo=True))
    assert snap_compare(
        app, terminal_size=SIZES[size], run_before=_first_snapshot, press=["question_mark"]
    )


def test_demo_footer_after_switch(snap_compare: Any) -> None:
    engine = FakeEngine("healthy", demo=True)

    async def switch(pilot: Pilot[Any]) -> None:
        await _first_snapshot(pilot)
        await pilot.press("2")
        engine.pump()
        app = pilot.app
        assert isinstance(app, JvpnApp)
        for _ in range(250):
            if app.snapshot is not None and app.snapshot.session.active == 2:
                break
            await pilot.pause(0.02)

    assert snap_compare(JvpnApp(engine), terminal_size=WIDE, run_before=switch)
