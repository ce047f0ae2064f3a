"""jvpn-tui behaviour, driven with Textual's pilot against the scripted fake engine.

The fake engine (jvpn_tui/fake_engine.py) answers commands only when the test calls
``engine.pump()``, so each test decides exactly when "the engine" reacts; the UI's own
10 Hz drain then picks the answer up. Assertions read what the widgets show.
"""

from __future__ import annotations

import asyncio
import functools
import subprocess
import sys
import time
import types
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widget import Widget

from jvpn_tui.app import JvpnApp
from jvpn_tui.fake_engine import FakeEngine
from jvpn_tui.keymap import BINDING_IDS
from jvpn_tui.messages import EventsReady, SnapshotReady
from jvpn_tui.screens import ConfirmScreen, HelpScreen
from jvpn_tui.widgets import (
    EngineBanner,
    HealthPanel,
    SessionPanel,
    SwitchTimeline,
    TransportsTable,
)
from jvpn_tui.widgets.format import NONE
from tunnel.api import (
    EngineSnapshot,
    EventType,
    ForceReattach,
    Reason,
    ReloadPolicy,
    SetAutoSwitch,
    SwitchTo,
    Terminate,
    UiChannel,
)
from tunnel.demo.commands import DemoAction, DemoImpair

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZE = (160, 48)


class RecordingApp(JvpnApp):
    """JvpnApp that also records every notification it shows."""

    def __init__(self, engine: Any, **kwargs: Any) -> None:
        super().__init__(engine, **kwargs)
        self.notes: list[tuple[str, str]] = []
        self.drawn: list[int] = []

    def _draw(self, snapshot: EngineSnapshot) -> None:
        self.drawn.append(snapshot.seq)
        super()._draw(snapshot)

    def notify(self, message: Any, **kwargs: Any) -> None:  # type: ignore[override]
        self.notes.append((str(message), str(kwargs.get("severity", "information"))))
        super().notify(message, **kwargs)


def run_async(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """Run an async test with asyncio.run (the suite has no async pytest plugin)."""

    @functools.wraps(test)
    def wrapper() -> None:
        asyncio.run(test())

    return wrapper


def text_of(widget: Widget) -> str:
    """What a Static-based panel shows, as plain text."""
    visual = widget.visual  # type: ignore[attr-defined]
    return str(getattr(visual, "plain", visual))


async def wait_for(pilot: Pilot[Any], condition: Callable[[], bool], what: str) -> None:
    """Let the app run until ``condition`` holds (bounded: 250 pauses of 20 ms)."""
    for _ in range(250):
        if condition():
            return
        await pilot.pause(0.02)
    raise AssertionError(f"timed out waiting for: {what}")


async def ready(pilot: Pilot[Any]) -> None:
    app = pilot.app
    assert isinstance(app, JvpnApp)
    await wait_for(pilot, lambda: app.snapshot is not None, "the first snapshot")


@run_async
async def test_pressing_2_switches_to_path_2_and_the_widgets_follow() -> None:
    engine = FakeEngine("healthy")
    app = RecordingApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        table = app.query_one(TransportsTable)
        assert table.role_of(1) == "active"
        assert table.role_of(2) == "standby"

        await pilot.press("2")
        assert engine.pump() == 1
        assert engine.received == [SwitchTo(2)]

        await wait_for(pilot, lambda: table.role_of(2) == "active", "path 2 active in table")
        assert table.role_of(1) == "standby"
        assert "path 2" in text_of(app.query_one(SessionPanel))
        newest = app.query_one(SwitchTimeline).lines[0]
        assert "SWITCH" in newest and "1 → 2" in newest and "manual_switch" in newest
        assert "38.5 ms" in newest
        assert app.sub_title == "ATTACHED · path 2"


@run_async
async def test_denied_switch_shows_its_reason_in_a_notification_and_the_timeline() -> None:
    engine = FakeEngine("degraded")  # path 3 never validated
    app = RecordingApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("3")
        engine.pump()
        assert engine.received == [SwitchTo(3)]
        await wait_for(pilot, lambda: any("path_not_validated" in m for m, _ in app.notes),
                       "a denial notification")  # fmt: skip
        note = next(n for n in app.notes if "path_not_validated" in n[0])
        assert note == ("Switch to path 3 denied: path_not_validated", "warning")
        newest = app.query_one(SwitchTimeline).lines[0]
        assert "DENIED" in newest and "→ 3" in newest and "path_not_validated" in newest
        assert app.query_one(TransportsTable).role_of(1) == "active"


@run_async
async def test_cooldown_denial_says_when_to_retry() -> None:
    engine = FakeEngine("healthy")
    app = RecordingApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("2")
        engine.pump()
        await pilot.press("3")
        engine.pump()  # 100 ms after the switch: 1900 ms of cooldown left
        await wait_for(pilot, lambda: any("cooldown_active" in m for m, _ in app.notes),
                       "a cooldown denial")  # fmt: skip
        assert ("Switch to path 3 denied: cooldown_active (retry in 1.9 s)", "warning") in (
            app.notes
        )


@run_async
async def test_switch_to_a_path_that_does_not_exist_is_refused_locally() -> None:
    engine = FakeEngine("healthy")
    app = RecordingApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("7")
        engine.pump()
        assert engine.received == []
        assert ("There is no path 7.", "warning") in app.notes


@run_async
async def test_terminate_asks_first_and_only_yes_sends_terminate() -> None:
    engine = FakeEngine("healthy")
    app = RecordingApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("t")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        assert not isinstance(app.screen, ConfirmScreen)
        engine.pump()
        assert engine.received == []

        await pilot.press("t")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        engine.pump()
        assert engine.received == [Terminate()]

        banner = app.query_one(EngineBanner)
        await wait_for(pilot, lambda: app.ended is not None, "the engine to end")
        assert app.ended == "operator_terminated"
        assert banner.display
        assert text_of(banner) == "Engine stopped: operator_terminated — session TERMINATED"
        assert "END" in app.query_one(SwitchTimeline).lines[0]
        # the engine is gone: its keys are disabled
        assert app.check_action("switch", (2,)) is None


@run_async
async def test_help_screen_lists_every_binding_with_its_id_and_keymap() -> None:
    engine = FakeEngine("healthy")
    app = RecordingApp(engine, keymap={"jvpn.terminate": "T", "jvpn.switch-1": "f1,1"})
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        rows = {binding_id: (key, text) for key, text, binding_id in app.screen.rows}
        assert len(BINDING_IDS) == 27  # 1-9, a r p t ? q, q (detach), g k u l x b, o c e s h
        # only the keys that apply: 3 paths, no demo, everything on one screen (no pages),
        # and q quits (it detaches only in a UI attached to a running client)
        applies = {i for i in BINDING_IDS if not i.startswith(("jvpn.demo.", "jvpn.page."))}
        applies -= {f"jvpn.switch-{n}" for n in range(4, 10)} | {"jvpn.detach"}
        assert set(rows) == applies | {"(textual)"}  # + the command palette
        assert rows["jvpn.terminate"][0] == "T"
        assert rows["jvpn.switch-1"][0] == "f1, 1"
        assert rows["jvpn.help"][0] == "?"
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)

        await pilot.press("t")  # remapped away: does nothing
        assert not isinstance(app.screen, ConfirmScreen)
        await pilot.press("T")
        assert isinstance(app.screen, ConfirmScreen)


@run_async
async def test_engine_failure_at_start_shows_the_reason_not_a_traceback() -> None:
    engine = FakeEngine("healthy", fail_on_start="TUN device vanished")
    app = RecordingApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.ended is not None, "the failure to be handled")
        assert app.ended == "engine_error: RuntimeError: TUN device vanished"
        banner = app.query_one(EngineBanner)
        assert banner.display
        assert "engine_error: RuntimeError: TUN device vanished" in text_of(banner)
        assert "Traceback" not in text_of(banner)
        assert (app.ended, "error") in app.notes
        assert app.is_running and app.return_code is None  # the UI survives
        await pilot.press("2")
        assert engine.commands.take_all() == []  # engine keys are disabled


@run_async
async def test_engine_dying_mid_session_shows_final_reason_and_final_state() -> None:
    engine = FakeEngine("mid-switch")
    app = RecordingApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        engine.fail("recovery_window_exceeded")
        await wait_for(pilot, lambda: app.ended is not None, "the engine to end")
        assert app.ended == "recovery_window_exceeded"
        assert text_of(app.query_one(EngineBanner)) == (
            "Engine stopped: recovery_window_exceeded — session TERMINATED"
        )
        assert "TERMINATED" in text_of(app.query_one(SessionPanel))


@run_async
async def test_auto_reattach_policy_keys_send_their_commands() -> None:
    engine = FakeEngine("healthy")
    app = RecordingApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("a", "r", "p")
        engine.pump()
        assert engine.received == [SetAutoSwitch(False), ForceReattach(), ReloadPolicy()]
        await wait_for(pilot, lambda: any("POLICY_LOADED" in m for m, _ in app.notes),
                       "the policy reload result")  # fmt: skip


@run_async
async def test_demo_keys_only_work_with_a_demo_engine() -> None:
    plain = FakeEngine("healthy")
    app = RecordingApp(plain)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("g", "k", "u", "l", "x", "b")
        plain.pump()
        assert plain.received == []

    demo = FakeEngine("healthy", demo=True)
    app = RecordingApp(demo)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("g", "l", "x", "b", "k")
        demo.pump()
        assert demo.received == [
            DemoImpair(0, "play_pause"), DemoImpair(1, "loss", 0.3), DemoImpair(1, "replay"),
            DemoImpair(1, "rebind"), DemoImpair(1, "kill"),
        ]  # fmt: skip
        table = app.query_one(TransportsTable)
        await wait_for(pilot, lambda: table.role_of(1) == "down", "path 1 down")
        assert table.role_of(2) == "active"
        lines = app.query_one(SwitchTimeline).lines
        assert "dead_transport_recovery" in lines[0]
        assert any("DEAD" in line and "path 1" in line for line in lines)
        await pilot.press("u")
        demo.pump()
        assert demo.received[-1] == DemoImpair(0, "restore")  # 0: every path
        await wait_for(pilot, lambda: table.role_of(1) == "standby", "path 1 restored")


@run_async
async def test_loss_is_shown_as_round_trip_and_by_direction() -> None:
    demo = FakeEngine("healthy", demo=True)
    app = RecordingApp(demo)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        table = app.query_one(TransportsTable)
        assert str(table.get_cell("1", "dir")) == "0 / 0"
        await pilot.press("l")  # demo: 30 % loss on the active path (the fake: upstream)
        demo.pump()
        await wait_for(pilot, lambda: str(table.get_cell("1", "dir")) == "30 / 0", "↑ 30 %")
        assert str(table.get_cell("1", "loss")) == "30%"
        assert str(table.get_cell("2", "dir")) == "0 / 0"

    degraded = FakeEngine("degraded")
    app = RecordingApp(degraded)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        table = app.query_one(TransportsTable)
        # path 2 is down: no measurement, so no number (not a reassuring "0%")
        assert str(table.get_cell("2", "loss")) == str(table.get_cell("2", "dir")) == NONE
        assert str(table.get_cell("1", "dir")) == "18 / 0"


@run_async
async def test_command_palette_offers_and_runs_the_actions() -> None:
    engine = FakeEngine("healthy")
    app = RecordingApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        titles = [title for title, _, _ in app.palette_commands()]
        for expected in ("Switch to path 1", "Switch to path 3", "Auto-switch: turn off",
                         "Force reattach", "Reload policy", "Terminate session",
                         "Theme: light", "Theme: high-contrast", "Help: keys"):  # fmt: skip
            assert expected in titles

        await pilot.press("ctrl+p")
        await pilot.press(*"force reattach")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await wait_for(pilot, lambda: engine.commands.take_all() == [ForceReattach()]
                       or ForceReattach() in engine.received, "ForceReattach from the palette")

        commands = dict((t, cb) for t, _, cb in app.palette_commands())
        commands["Theme: high-contrast"]()
        assert app.theme == "jvpn-high-contrast"


@run_async
async def test_snapshot_messages_coalesce_to_the_newest() -> None:
    engine = FakeEngine("healthy")
    app = RecordingApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        snaps = []
        for _ in range(3):  # one slot holds the newest snapshot: take each as it comes
            engine.pump()
            snaps += [i for i in engine.channel.drain() if isinstance(i, EngineSnapshot)]
        assert [s.seq for s in snaps] == [2, 3, 4]
        app.drawn.clear()
        for snap in snaps:  # posted back to back: each replaces the one still queued
            app.post_message(SnapshotReady(snap))
        await pilot.pause()
        assert app.drawn == [4]
        assert not EventsReady([]).can_replace(EventsReady([]))


@run_async
async def test_after_a_freeze_the_ui_draws_the_newest_snapshot_and_shows_the_drops() -> None:
    """The UI side of a freeze, with the scripted engine publishing at full speed: the
    channel stays bounded and counts what it drops, and the UI resumes on the newest
    snapshot with the drop count on screen. (That a frozen UI does not slow the tunnel
    is proven against the real engine below.)"""
    channel = UiChannel(maxsize=32)
    engine = FakeEngine("healthy", channel=channel, period=0.0005, publish_events=True)
    app = RecordingApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        ticks_before = engine.ticks
        published_before = channel.published
        # Freeze the UI: block its event loop (no drain can run) until the engine has
        # published ten channels' worth. Bounded so that a broken engine fails the test.
        deadline = time.monotonic() + 20.0
        depth_seen = 0
        while channel.published < published_before + 10 * channel.maxsize:
            assert time.monotonic() < deadline, "engine made no progress while UI frozen"
            depth_seen = max(depth_seen, len(channel))
            time.sleep(0.005)
        assert depth_seen <= channel.maxsize
        assert len(channel) <= channel.maxsize
        assert engine.ticks - ticks_before >= 5 * channel.maxsize // 2
        assert channel.dropped > 0

        engine.stop()  # stop publishing so the newest snapshot is known
        last_seq = engine.ticks + 1
        health = app.query_one(HealthPanel)
        await wait_for(pilot, lambda: app.snapshot is not None and app.snapshot.seq == last_seq,
                       "the newest snapshot after the freeze")  # fmt: skip
        shown = app.snapshot.ui_dropped
        assert shown > 0
        assert f"dropped {shown}" in text_of(health)


FREEZE_CHANNELS = 4
"""The frozen UI leaves the engine this many channels' worth of items undrained."""

FREEZE_REPLIES = 20
"""Echo round trips the tunnel must carry after the undrained snapshot slot is full."""


def block_until_the_engine_moved_on(channel: UiChannel, inner: Any) -> None:
    """Block the calling thread (the UI's event loop, when called from a test coroutine)
    until the engine has published FREEZE_CHANNELS channels' worth of items and carried
    FREEZE_REPLIES echo round trips after its snapshot slot was first replaced; the
    channel must stay bounded meanwhile. Bounded: a stuck engine fails the test."""
    start = channel.counters()
    replies0 = inner.replies
    deadline = time.monotonic() + 60.0
    replies_when_full: int | None = None
    while True:
        assert time.monotonic() < deadline, (
            f"engine stalled behind a frozen UI: published {channel.published - start.published}"
            f" items, {inner.replies - replies0} echo replies"
        )
        assert len(channel) <= channel.maxsize
        if replies_when_full is None and channel.superseded > start.superseded:
            replies_when_full = inner.replies  # the slot was full: a snapshot replaced
        if (
            replies_when_full is not None
            and inner.replies >= replies_when_full + FREEZE_REPLIES
            and channel.published >= start.published + FREEZE_CHANNELS * channel.maxsize
        ):
            return
        time.sleep(0.01)


@run_async
async def test_frozen_ui_does_not_slow_the_real_engine_and_catches_up() -> None:
    """DESIGN §4: a frozen UI does not slow the tunnel. The engine is the real one (the
    demo: a ClientEngine with Noise + AEAD over loopback UDP to an embedded gateway); the
    UI's event loop is blocked, so nobody drains the channel, until the engine has
    published several channels' worth of snapshots and events AND carried more inner
    round trips after the undrained snapshot slot was first replaced. Asserted: accounting
    (every item published during the freeze is still waiting, or was replaced (a
    snapshot) or counted as dropped (an event); inner traffic kept flowing; the inner
    source never backed up) and ordering (the UI resumes on a snapshot
    from after the freeze and never draws an older one after a newer one). No rates, no
    timed freeze: the freeze lasts until those conditions hold (bounded, so that a stuck
    engine fails the test instead of hanging it)."""
    from tunnel.demo.scenario import DemoEngine

    channel = UiChannel(maxsize=8)
    engine = DemoEngine(channel=channel, rate_pps=50.0, seed=3)
    inner = engine.memory
    app = RecordingApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await wait_for(pilot, lambda: inner.replies > 0, "first echo replies")
        await wait_for(pilot, lambda: len(channel) == 0, "a drained channel")
        await wait_for(pilot, lambda: app.snapshot is not None
                       and app.snapshot.session.session_id != "", "the session id")  # fmt: skip
        assert app.snapshot is not None
        session_id = app.snapshot.session.session_id

        # -- freeze: this coroutine runs on the UI's event loop; blocking it blocks the UI
        drawn_before = list(app.drawn)
        start = channel.counters()
        published0, dropped0, superseded0 = start.published, start.dropped, start.superseded
        generated0, replies0, overflow0 = inner.generated, inner.replies, inner.overflow
        block_until_the_engine_moved_on(channel, inner)
        end = channel.counters()  # one consistent reading (the engine keeps publishing)
        published = end.published - published0
        dropped = end.dropped - dropped0
        superseded = end.superseded - superseded0
        replies_end = inner.replies
        # accounting: nothing was taken, so every item waits or was replaced or dropped
        assert app.drawn == drawn_before  # the UI really was frozen
        assert channel.has_snapshot  # the newest snapshot waits in its slot
        assert superseded + dropped == published - (end.waiting - start.waiting)
        assert superseded + dropped >= (FREEZE_CHANNELS - 1) * channel.maxsize
        # the tunnel kept carrying inner traffic, and the engine kept up with its source
        assert inner.generated > generated0 and replies_end > replies0
        assert inner.overflow == overflow0

        # -- thaw: the UI catches up on a snapshot taken after the freeze (it counts every
        # drop and every round trip of the freeze); the drops are on screen
        health = app.query_one(HealthPanel)
        await wait_for(pilot, lambda: app.snapshot is not None
                       and app.snapshot.ui_dropped >= dropped0 + dropped
                       and app.snapshot.traffic.rx_packets >= replies_end,
                       "a snapshot from after the freeze")  # fmt: skip
        snap = app.snapshot
        assert f"dropped {snap.ui_dropped}" in text_of(health)
        # the session lived through the freeze (its id unchanged, never ended). On a loaded
        # machine the demo's 300 ms death judgement may see a path die and recover in it (the
        # engine, its embedded gateway and the UI share one process): ATTACHED again soon
        assert snap.running and snap.session.session_id == session_id
        assert snap.session.state != "TERMINATED"
        await wait_for(pilot, lambda: app.snapshot is not None
                       and app.snapshot.session.state == "ATTACHED", "ATTACHED")  # fmt: skip
        assert app.drawn == sorted(set(app.drawn))  # strictly increasing: never older
        assert snap.seq - drawn_before[-1] > 1  # snapshots published while frozen were skipped


def test_the_fake_engine_speaks_the_projects_vocabulary() -> None:
    """What the UI is tested against must be what a real engine can say: every event type
    and reason code the scripted engine publishes is a member of EventType / Reason."""
    from jvpn_tui.fake_engine import SCENARIOS

    sweep = (
        SwitchTo(2), SwitchTo(3), SwitchTo(3), SetAutoSwitch(False), ForceReattach(),
        ReloadPolicy(), DemoImpair(1, DemoAction.LOSS, 0.3), DemoImpair(1, DemoAction.REPLAY),
        DemoImpair(1, DemoAction.REBIND), DemoImpair(0, DemoAction.SCRIPT),
        DemoImpair(1, DemoAction.KILL), DemoImpair(2, DemoAction.KILL),
        DemoImpair(1, DemoAction.RESTORE), Terminate(), SwitchTo(1),
    )  # fmt: skip
    events: list[Any] = []
    for scenario in SCENARIOS:
        engine = FakeEngine(scenario, demo=True, channel=UiChannel(maxsize=100_000))
        engine.start()
        for command in sweep:
            engine.commands.send(command)
            engine.pump()
        events += [i for i in engine.channel.drain() if not isinstance(i, EngineSnapshot)]
    types = {e["event_type"] for e in events}
    reasons = {e["reason_code"] for e in events if "reason_code" in e}
    assert types <= {t.value for t in EventType}, types - {t.value for t in EventType}
    assert reasons <= {r.value for r in Reason}, reasons - {r.value for r in Reason}
    assert len(types) >= 10 and len(reasons) >= 15  # the sweep reached most answers


@run_async
async def test_quit_stops_the_engine() -> None:
    engine = FakeEngine("healthy")
    app = RecordingApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("q")
        await wait_for(pilot, lambda: not app.is_running, "the app to exit")
    assert engine.stop_calls >= 1
    assert engine.join(0)


def test_no_color_is_respected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    assert RecordingApp(FakeEngine()).no_color
    monkeypatch.delenv("NO_COLOR")
    assert not RecordingApp(FakeEngine()).no_color


def test_unknown_theme_and_keymap_ids_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown theme"):
        JvpnApp(FakeEngine(), theme="neon")
    with pytest.raises(ValueError, match=r"unknown binding id 'jvpn\.nope'"):
        JvpnApp(FakeEngine(), keymap={"jvpn.nope": "z"})


# -- the command line ------------------------------------------------------------------


def _stub_headless(monkeypatch: pytest.MonkeyPatch, build: Callable[..., Any]) -> list[Any]:
    calls: list[Any] = []
    stub = types.ModuleType("tunnel.client.headless")

    def build_engine_from_args(
        config: str | None,
        demo: bool,
        demo_script: bool = False,
        control: str | None = None,
        default_control: bool = False,
        warnings: Any = None,
    ) -> Any:
        calls.append(("build", config, demo, demo_script))
        return build(config, demo)

    def run_headless(engine: Any, *, duration: float | None, **options: Any) -> int:
        calls.append(("run", engine, duration))
        return 7

    stub.build_engine_from_args = build_engine_from_args  # type: ignore[attr-defined]
    stub.run_headless = run_headless  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tunnel.client.headless", stub)
    return calls


def test_headless_calls_the_engine_api_and_returns_its_code(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from jvpn_tui.__main__ import main

    calls = _stub_headless(monkeypatch, lambda config, demo: "ENGINE")
    assert main(["--demo", "--headless", "--duration", "20"]) == 7
    # headless, the demo plays its script from the start
    assert calls == [("build", None, True, True), ("run", "ENGINE", 20.0)]


def test_config_error_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from jvpn_tui.__main__ import main
    from tunnel.client.config import ConfigError

    def bad(config: str | None, demo: bool) -> Any:
        raise ConfigError("client.toml: [[path]] 2: remote is missing")

    _stub_headless(monkeypatch, bad)
    assert main(["--config", "client.toml", "--headless"]) == 2
    assert capsys.readouterr().err == "jvpn-tui: client.toml: [[path]] 2: remote is missing\n"


def test_missing_engine_modules_say_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from jvpn_tui.__main__ import main

    monkeypatch.setitem(sys.modules, "tunnel.client.headless", None)
    assert main(["--demo"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jvpn-tui: the client engine is not available yet")


def test_bad_keymap_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from jvpn_tui.__main__ import main

    keymap = tmp_path / "keys.toml"
    keymap.write_text('[keymap]\n"jvpn.warp" = "w"\n')
    assert main(["--demo", "--keymap", str(keymap)]) == 2
    assert "unknown binding id 'jvpn.warp'" in capsys.readouterr().err


def test_client_config_keymap_is_applied_and_keymap_file_overrides_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from jvpn_tui import __main__ as cli

    config = types.SimpleNamespace(
        keymap={"jvpn.terminate": "T", "jvpn.quit": "Q"}, source="client.toml"
    )
    engine = types.SimpleNamespace(config=config)
    _stub_headless(monkeypatch, lambda config, demo: engine)
    seen: list[dict[str, str]] = []
    monkeypatch.setattr(cli, "_run_ui", lambda engine, args, keymap: seen.append(keymap) or 0)
    assert cli.main(["--config", "client.toml"]) == 0
    assert seen[-1] == {"jvpn.terminate": "T", "jvpn.quit": "Q"}

    keymap = tmp_path / "keys.toml"
    keymap.write_text('[keymap]\n"jvpn.terminate" = "ctrl+t"\n')
    assert cli.main(["--config", "client.toml", "--keymap", str(keymap)]) == 0
    assert seen[-1] == {"jvpn.terminate": "ctrl+t", "jvpn.quit": "Q"}


def test_bad_keymap_in_the_client_config_is_refused_naming_the_file(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from jvpn_tui import __main__ as cli

    config = types.SimpleNamespace(keymap={"terminate": "T"}, source="client.toml")
    _stub_headless(monkeypatch, lambda config_, demo: types.SimpleNamespace(config=config))
    monkeypatch.setattr(cli, "_run_ui", lambda *a: pytest.fail("UI started"))
    assert cli.main(["--config", "client.toml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jvpn-tui: client.toml: keymap: unknown binding id 'terminate'")


@run_async
async def test_config_keymap_reaches_the_running_app() -> None:
    """What main() hands over is honoured by the app: T terminates, t no longer does."""
    from jvpn_tui.__main__ import config_keymap

    engine = FakeEngine("healthy")
    engine.config = types.SimpleNamespace(keymap={"jvpn.terminate": "T"}, source="c.toml")  # type: ignore[attr-defined]
    app = RecordingApp(engine, keymap=config_keymap(engine))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("t")
        assert not isinstance(app.screen, ConfirmScreen)
        await pilot.press("T")
        assert isinstance(app.screen, ConfirmScreen)


def test_headless_never_imports_textual() -> None:
    code = """
import sys, types
stub = types.ModuleType("tunnel.client.headless")
stub.build_engine_from_args = lambda config, demo, demo_script=False, **_: object()
stub.run_headless = lambda engine, duration, **options: 0
sys.modules["tunnel.client.headless"] = stub
from jvpn_tui.__main__ import main
assert main(["--demo", "--headless"]) == 0
loaded = sorted({m.split(".")[0] for m in sys.modules} & {"textual", "rich"})
print(",".join(loaded) or "none")
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "none"
