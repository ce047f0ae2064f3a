"""Every panel's content is reachable by keys at 80x24, 100x30 and 160x48 (issue 13).

Pilot tests against the scripted fake engine (its scenario plays two minutes of past
first, so the trend charts are full). Each assertion reads what the terminal would show
(the screen's rendered lines), never only widget state: after the documented keys
(docs/tui.md: ``o c e s h`` show one page of the compact layout; ``End`` scrolls a
page), the panel's content must be on screen. No word is ever cut (no ``…``, a role
written whole, every word of a path label whole), the help screen lists the keys that
apply with their whole binding ids and says how to close it, and the footer drops whole
keys, the least important first.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from textual.pilot import Pilot

from jvpn_tui.app import JvpnApp
from jvpn_tui.fake_engine import FakeEngine
from jvpn_tui.fake_trends import PAST_S
from jvpn_tui.keymap import KEYS
from jvpn_tui.screens import HelpScreen
from jvpn_tui.screenshots import play_past
from jvpn_tui.widgets import TransportsTable

SIZES = [(80, 24), (100, 30), (160, 48)]
SIZE_IDS = [f"{w}x{h}" for w, h in SIZES]

PANELS: dict[str, tuple[str, list[str]]] = {
    # panel: (page key, what it shows in the degraded scenario)
    "Session": ("o", ["3f2a9c1e5b7d4a60a1c2e3f405162738", "DEGRADED v12", "2024-06-01.1"]),
    "Switching": ("o", ["0 left this minute", "5 total"]),
    "Transports": ("o", ["unvalidated", "198.51.100.7:51821", "212.0 ms", "18 / 0"]),
    "Trends": ("c", ["RTT ▶1", "Loss  2", "Switch", "Inner ↑", "2 switches, 1 death"]),
    "Switch timeline": ("e", ["switch_rate_limited", "volatile_persisted"]),
    "Security": ("s", ["REPLAY_DETECTED", "INVALID_PROOF", "auth_failed 9"]),
    "Observability": ("h", ["DEGRADED", "connection refused", "depth 37, dropped 112"]),
}
"""Each panel, the key that shows its page in the compact layout, and text it shows."""

OLDEST_TIMELINE_LINE = "12:00:00.040 ATTACH"
"""The oldest line of the scenario's timeline: the bottom of a long page."""


def run_async(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return wrapper


def screen_text(app: JvpnApp) -> str:
    """The terminal's lines as the app last composed them (plain text)."""
    return "\n".join(strip.text for strip in app.screen._compositor.render_strips())


async def settle(pilot: Pilot[Any]) -> None:
    for _ in range(3):
        await pilot.pause()
    await pilot.wait_for_scheduled_animations()


async def started(pilot: Pilot[Any], engine: FakeEngine) -> JvpnApp:
    app = pilot.app
    assert isinstance(app, JvpnApp)
    await play_past(pilot, engine)
    return app


def assert_nothing_cut(text: str) -> None:
    # "REATT …" is the timeline's mark for an attempt still waiting (docs/tui.md), not a cut
    assert "…" not in text.replace("REATT …", "REATT"), text
    for cut in ("unvalida ", "switchin ", "jvpn.auto-swit "):
        assert cut not in text + " ", text


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
@run_async
async def test_every_panel_is_reachable_by_its_documented_key(size: tuple[int, int]) -> None:
    engine = FakeEngine("degraded", past_s=PAST_S)
    app = JvpnApp(engine)
    async with app.run_test(size=size) as pilot:
        await started(pilot, engine)
        compact = size != (160, 48)
        assert app.compact is compact
        for panel, (key, shows) in PANELS.items():
            if compact:
                await pilot.press(key)
                await settle(pilot)
            text = screen_text(app)
            assert panel in text, f"{panel} not on screen at {size} after {key!r}:\n{text}"
            for expected in shows:
                assert expected in text, f"{panel}: {expected!r} not on screen at {size}"
            assert_nothing_cut(text)


@pytest.mark.parametrize("size", SIZES[:2], ids=SIZE_IDS[:2])
@run_async
async def test_a_long_page_scrolls_with_end_and_home(size: tuple[int, int]) -> None:
    engine = FakeEngine("degraded", past_s=PAST_S)
    app = JvpnApp(engine)
    async with app.run_test(size=size) as pilot:
        await started(pilot, engine)
        for n in range(20):  # a timeline longer than the terminal
            engine.publish_event("POLICY_EVENT", policy_name="POLICY_LOADED",
                                 reason_code="policy_applied", detail=f"reload {n}")  # fmt: skip
        app.drain_channel()
        await pilot.press("e")
        await settle(pilot)
        assert "reload 19" in screen_text(app)
        assert OLDEST_TIMELINE_LINE not in screen_text(app)  # below the fold at this size
        await pilot.press("end")
        await settle(pilot)
        assert OLDEST_TIMELINE_LINE in screen_text(app)
        await pilot.press("home")
        await settle(pilot)
        assert "reload 19" in screen_text(app)  # the newest line again


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize("scenario", ["mid-switch", "degraded"])
@run_async
async def test_roles_and_path_labels_are_whole_words(size: tuple[int, int], scenario: str) -> None:
    engine = FakeEngine(scenario, past_s=PAST_S)
    app = JvpnApp(engine)
    async with app.run_test(size=size) as pilot:
        await started(pilot, engine)
        text = screen_text(app)
        assert_nothing_cut(text)
        words = set(re.split(r"[\s│╭╮╰╯─▶]+", text))
        assert app.snapshot is not None
        for view in app.snapshot.session.paths:
            assert view.role in words, (view.role, text)
            for word in view.label.split():
                assert word in words, (word, text)
        columns = app.query_one(TransportsTable).column_keys
        assert {"id", "path", "role", "rtt", "loss"} <= set(columns)
        if size == (80, 24):  # the first to go, in this order
            assert not {"spark", "jitter", "score"} & set(columns)


@pytest.mark.parametrize("size", [(80, 24), (160, 48)], ids=["80x24", "160x48"])
@run_async
async def test_help_lists_the_keys_that_apply_with_whole_ids_and_how_to_close(
    size: tuple[int, int],
) -> None:
    engine = FakeEngine("healthy", demo=True)  # 3 paths
    app = JvpnApp(engine)
    async with app.run_test(size=size) as pilot:
        await started(pilot, engine)
        await pilot.press("question_mark")
        await settle(pilot)
        assert isinstance(app.screen, HelpScreen)
        first = screen_text(app)
        assert "Esc, q or ? closes this list" in first
        seen = first
        for _ in range(6):  # a short terminal scrolls the list
            await pilot.press("pagedown")
            await settle(pilot)
            seen += screen_text(app)
        compact = size == (80, 24)
        for spec in KEYS:
            n = spec.id.removeprefix("jvpn.switch-")
            applies = (not spec.page or compact) and (not n.isdigit() or int(n) <= 3)
            applies = applies and spec.id != "jvpn.detach"  # only when attached
            assert (spec.id in seen) is applies, (spec.id, applies)
        assert_nothing_cut(seen)
        await pilot.resize_terminal(100, 30)  # the layout below adapts, the help stays
        await settle(pilot)
        assert isinstance(app.screen, HelpScreen) and app.compact
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)


@run_async
async def test_footer_keeps_whole_keys_most_important_first() -> None:
    engine = FakeEngine("healthy", demo=True)
    app = JvpnApp(engine)
    async with app.run_test(size=(80, 24)) as pilot:
        await started(pilot, engine)
        footer = screen_text(app).splitlines()[-1]
        for kept in ("? Help", "q Quit", "g Play/pause", "k Kill", "l Loss", "u Restore"):
            assert kept in footer, footer
        labels = {k.label for k in KEYS} | {"palette"}
        for word in re.findall(r"[A-Za-z/]{2,}", footer):
            assert word in labels, (word, footer)  # no key cut in the middle
    plain = FakeEngine("healthy")
    app = JvpnApp(plain)
    async with app.run_test(size=(80, 24)) as pilot:
        await started(pilot, plain)
        footer = screen_text(app).splitlines()[-1]
        for kept in ("a Auto", "r Reattach", "p Policy", "t Terminate", "? Help", "q Quit"):
            assert kept in footer, footer
        assert "Play/pause" not in footer


@run_async
async def test_the_tabs_follow_the_keys_and_a_click_shows_its_page() -> None:
    engine = FakeEngine("degraded", past_s=PAST_S)
    app = JvpnApp(engine)
    async with app.run_test(size=(100, 30)) as pilot:
        await started(pilot, engine)
        assert app.page == "overview"
        await pilot.press("s")
        await settle(pilot)
        assert app.page == "security" and "REPLAY_DETECTED" in screen_text(app)
        assert "3f2a9c1e5b7d4a60a1c2e3f405162738" not in screen_text(app)
        await pilot.click("#jvpn-page-trends")
        await settle(pilot)
        assert app.page == "trends" and "Inner ↓" in screen_text(app)
        await pilot.resize_terminal(160, 48)
        await settle(pilot)
        text = screen_text(app)
        assert not app.compact
        for panel in PANELS:
            assert panel in text
        await pilot.press("s")  # no pages when everything is on screen: nothing happens
        await settle(pilot)
        assert screen_text(app) == text


def trends_rows(app: JvpnApp) -> dict[str, str]:
    """The Trends panel's rows on screen: label -> the rest of the line."""
    rows: dict[str, str] = {}
    for line in screen_text(app).splitlines():
        m = re.search(r"│ (RTT [▶ ]\d|Loss [▶ ]\d|Switch|Inner [↑↓]) +(.*?) *│", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


def chart_span(app: JvpnApp) -> int:
    """Seconds a chart column covers, as the Trends panel's subtitle says."""
    m = re.search(r"(\d+) s a column", screen_text(app))
    assert m, screen_text(app)
    return int(m.group(1))


def expected_marks(first: int, last: int, span: int, marks: dict[int, str]) -> str:
    """The switch row docs/tui.md describes: one cell per whole span from ``first`` to
    ``last`` (seconds; the span still filling is not drawn yet), ``marks`` (second ->
    mark) in the cell of their second, ``·`` elsewhere."""
    top = last // span - (0 if last % span == span - 1 else 1)
    cells = {second // span: mark for second, mark in marks.items()}
    return "".join(cells.get(b, "·") for b in range(first // span, top + 1))


@run_async
async def test_trends_mark_the_switches_in_the_column_of_their_second() -> None:
    engine = FakeEngine("degraded", past_s=PAST_S)
    app = JvpnApp(engine)
    async with app.run_test(size=(160, 48)) as pilot:
        await started(pilot, engine)
        rows = trends_rows(app)
        moment = engine.now_ms // 1000
        # fake_trends: 1 -> 2 at -50 s, path 2 dead at -17.7 s, back to 1 at -14.7 s
        marks = {moment - 50: "2", moment - 18: "✗", moment - 15: "1"}
        span = chart_span(app)
        assert span == 2  # two minutes fit the width at 2 s a column
        shown = rows["Switch"].split()[-1]
        assert shown == expected_marks(moment - PAST_S, moment, span, marks)
        assert rows["Switch"].startswith("2 switches, 1 death")
        assert rows["RTT ▶1"].startswith("212 ms")
        assert rows["RTT  2"].startswith("no answer")
        assert rows["Loss  2"].startswith("100%, max 100%")


@run_async
async def test_trends_follow_the_snapshots_the_ui_takes() -> None:
    engine = FakeEngine("healthy")
    app = JvpnApp(engine)
    async with app.run_test(size=(160, 48)) as pilot:
        await started(pilot, engine)
        first = engine.now_ms // 1000
        for _ in range(25):  # 2.5 s of engine time (the fake: 100 ms a pump)
            engine.pump()
            app.drain_channel()
        await pilot.press("2")  # a manual switch, answered by the next pump
        engine.pump()
        app.drain_channel()
        switched = engine.now_ms // 1000
        for _ in range(40):
            engine.pump()
            app.drain_channel()
        await settle(pilot)
        rows = trends_rows(app)
        shown = rows["Switch"].split()[-1]
        expected = expected_marks(first, engine.now_ms // 1000, chart_span(app), {switched: "2"})
        assert shown == expected and "2" in shown
        assert rows["Switch"].startswith("1 switch ")
