"""Pictures of jvpn-tui (pytest-textual-snapshot) against the scripted fake engine.

Fixed terminal sizes, fixed timestamps (the fake engine has no clock), no clock in the
header and no blinking cursor: the SVGs are byte-for-byte reproducible. Baselines live
in tests/__snapshots__/; after an intended UI change, regenerate them with
``pytest tests/test_tui_snapshots.py --snapshot-update`` and look at the diff.
"""

from __future__ import annotations

from typing import Any

import pytest
from textual.pilot import Pilot

from jvpn_tui.app import JvpnApp
from jvpn_tui.fake_engine import SCENARIOS, FakeEngine
from themes import PALETTES

WIDE = (160, 48)
SMALL = (80, 24)


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


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_main_screen(snap_compare: Any, scenario: str) -> None:
    app = JvpnApp(FakeEngine(scenario))
    assert snap_compare(app, terminal_size=WIDE, run_before=_first_snapshot)


@pytest.mark.parametrize("palette", PALETTES)
def test_theme(snap_compare: Any, palette: str) -> None:
    app = JvpnApp(FakeEngine("degraded"), theme=palette)
    assert snap_compare(app, terminal_size=WIDE, run_before=_first_snapshot)


def test_80x24(snap_compare: Any) -> None:
    app = JvpnApp(FakeEngine("mid-switch"))
    assert snap_compare(app, terminal_size=SMALL, run_before=_first_snapshot)


def test_no_color(snap_compare: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    app = JvpnApp(FakeEngine("degraded"))
    assert app.no_color
    assert snap_compare(app, terminal_size=WIDE, run_before=_first_snapshot)


def test_help_screen(snap_compare: Any) -> None:
    app = JvpnApp(FakeEngine("healthy", demo=True))
    assert snap_compare(
        app, terminal_size=WIDE, run_before=_first_snapshot, press=["question_mark"]
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
