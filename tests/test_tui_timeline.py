"""The switch timeline tells a person what happened, one line per happening (issue 13).

The events are the real ones: a client and a gateway of the protocol core run over
memory links with a fake clock (tests/simkit.py), and what the client emits goes, as its
``to_dict()`` mapping, to the timeline; in the app tests through a :class:`SimEngine`,
an :class:`~tunnel.api.EngineHandle` that publishes the events as they happen and a
snapshot when the test says so, as the real engine does (events at once, snapshots five
times a second), and takes the UI's commands as the real engine does.

What a person reads (docs/tui.md, "Switch timeline"): a path's death is one line with its
reason; a denial names a real target or none, and says ``auto`` only when automatic
switching asked; a reattach attempt ends with ✓ or ✗; a manual switch is one line; a
re-attach on the same path is not a switch; DIAGNOSTIC lines are there, quieter; the
header never lags the timeline.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable
from typing import Any

from simkit import build, make_policy
from textual.content import Content
from textual.pilot import Pilot

from jvpn_tui.app import JvpnApp
from jvpn_tui.fake_engine import FakeEngine
from jvpn_tui.widgets import SwitchTimeline
from jvpn_tui.widgets.timeline import Timeline
from tunnel.api import (
    CommandQueue,
    EngineSnapshot,
    ForceReattach,
    SetAutoSwitch,
    SwitchTo,
    UiChannel,
)
from tunnel.client.engine import session_view
from tunnel.core.client import PathSpec
from tunnel.core.events import Diagnostic, Event, EventBase, Reason, SessionLinked
from tunnel.demo.commands import DemoAction, DemoImpair
from tunnel.io.memory import Simulation

SIZE = (160, 48)


def plain(lines: Iterable[str]) -> list[str]:
    """The lines as a person reads them (markup removed)."""
    return [Content.from_markup(line).plain for line in lines]


def read(events: Iterable[Event], timeline: Timeline | None = None) -> list[str]:
    """The timeline's lines, newest first, after ``events`` (real core events)."""
    timeline = timeline if timeline is not None else Timeline()
    for event in events:
        timeline.add(event.to_dict())
    return plain(timeline.lines)


def starting(words: str, lines: list[str]) -> list[str]:
    """The lines whose text (after the time) starts with ``words``."""
    return [line for line in lines if line.split(" ", 1)[1].lstrip().startswith(words)]


def attached(n_paths: int = 2, **policy: Any) -> Simulation:
    sim = build(n_paths=n_paths, policy=make_policy(**policy) if policy else None)
    sim.advance(3.0)  # attached on path 1, every path validated and answering
    return sim


# -- the timeline over the core's events ---------------------------------------------------


def test_a_death_is_one_line_with_its_reason_and_the_recovery_one_switch_line() -> None:
    sim = attached(n_paths=3)
    sim.links[1].imp.up = False
    sim.advance(3.0)

    lines = read(sim.client_events)
    (dead,) = starting("DEAD", lines)
    assert "path 1" in dead and "transport_dead" in dead and "silent" in dead
    assert "→ RECOVERING" in dead  # the transition it caused, on the same line
    (switch,) = starting("SWITCH", lines)
    assert "1 → 2" in switch and "reattach_success" in switch
    assert "RECOVERING → ATTACHED" in switch
    # nothing else: no STATE line, no denial naming the dead path, no attempt left open
    assert not starting("STATE", lines) and not starting("DENIED", lines)
    assert not [line for line in lines if "REATT" in line]
    assert lines.index(switch) < lines.index(dead)  # newest first


def test_a_death_the_kernel_reported_shows_what_it_said() -> None:
    """issue 10 item 3: the link monitor's death line carries the kernel's message, and the
    recovery folds into it like a silent death's."""
    sim = attached(n_paths=3)
    sim.links[1].imp.up = False
    sim.client.path_down(1, "jvc0: link down (kernel: RTM_NEWLINK jvc0 down)", sim.now)
    sim.advance(1.0)

    lines = read(sim.client_events)
    (dead,) = starting("DEAD", lines)
    assert "path 1" in dead and "link_down: jvc0: link down" in dead
    assert "RTM_NEWLINK jvc0 down" in dead and "silent" not in dead
    assert "→ RECOVERING" in dead
    (switch,) = starting("SWITCH", lines)
    assert "1 → 2" in switch and "RECOVERING → ATTACHED" in switch


def test_paths_that_come_and_go_have_their_lines() -> None:
    """issue 10 item 4 (paths = "auto"): a path added and a path removed, one line each."""
    sim = attached(n_paths=2)
    sim.client.remove_path(2, "wlan0: address 192.0.2.7 no longer usable", sim.now)
    sim.advance(0.5)
    sim.client.add_path(PathSpec(2, "wlan0 192.0.2.7"), sim.now, interface="wlan0")
    sim.advance(0.5)
    lines = read(sim.client_events)
    (added,) = starting("PATH +", lines)
    (removed,) = starting("PATH -", lines)
    assert "path 2" in added and "wlan0 192.0.2.7" in added
    assert "path 2" in removed and "no longer usable" in removed
    assert lines.index(added) < lines.index(removed)  # newest first


def test_a_denial_with_nothing_to_move_to_names_no_path_and_says_recovery() -> None:
    """Every path down, auto-switching off: the recovery (which runs whether or not
    automatic switching is on) finds no candidate. The denial names no path (the one that
    died is not a target) and is not labelled ``auto``."""
    sim = attached()
    sim.client.set_auto_switch(False)
    for link in sim.links.values():
        link.imp.up = False
    sim.advance(2.0)

    lines = read(sim.client_events)
    (denied,) = starting("DENIED", lines)
    assert "→ none" in denied and "no_valid_candidate" in denied
    assert "(recovery)" in denied and "(auto)" not in denied
    assert "→ 1" not in denied and "→ 2" not in denied


def test_auto_shows_only_on_a_denial_that_automatic_switching_asked_for() -> None:
    """AT-25's cooldown: a manual switch, then the new path turns bad while the cooldown
    runs; automatic switching wants path 1 back and is refused (auto), later it switches."""
    sim = attached(dead_min_ms=1_000, switch_cooldown_ms=5_000, volatile_to_degraded_ms=10_000)
    assert sim.client.switch_to(2, sim.now) is None
    sim.advance(0.2)
    sim.links[2].imp.loss_up = 0.35
    sim.advance(8.0)

    lines = read(sim.client_events)
    (denied,) = starting("DENIED", lines)
    assert "→ 1" in denied and "cooldown_active" in denied and "(auto)" in denied
    assert "retry in" in denied
    switches = starting("SWITCH", lines)
    assert ["manual_switch" in s for s in switches] == [False, True]  # newest first


def test_a_manual_switch_is_one_line() -> None:
    sim = attached()
    before = read(sim.client_events)
    timeline = Timeline()
    read(sim.client_events, timeline)
    mark = len(sim.client_events)
    assert sim.client.switch_to(2, sim.now) is None
    sim.advance(1.0)

    lines = read(sim.client_events[mark:], timeline)
    assert lines[1:] == before
    assert "SWITCH" in lines[0] and "1 → 2" in lines[0] and "manual_switch" in lines[0]
    assert "ATTACHED → ATTACHED" not in lines[0]


def test_an_operator_reattach_waits_then_ends_with_a_tick() -> None:
    sim = attached()
    timeline = Timeline()
    read(sim.client_events, timeline)
    mark = len(sim.client_events)
    sim.client.force_reattach(sim.now)
    sim.advance(0.001)  # sent, not answered yet (10 ms links)
    waiting = read(sim.client_events[mark:], timeline)
    assert "REATT …" in waiting[0] and "→ 1 resume" in waiting[0]

    mark = len(sim.client_events)
    sim.advance(1.0)
    lines = read(sim.client_events[mark:], timeline)
    assert lines[1:] == waiting[1:]  # the attempt's line became its outcome
    assert "REATT ✓" in lines[0] and "→ 1 resume" in lines[0] and "reattach_success" in lines[0]


def test_a_re_attach_on_the_path_that_died_is_not_a_switch() -> None:
    sim = attached(n_paths=1)
    sim.links[1].imp.up = False
    sim.advance(1.0)
    sim.links[1].imp.up = True
    sim.advance(3.0)

    lines = read(sim.client_events)
    assert not starting("SWITCH", lines)
    (back,) = [line for line in lines if "REATT ✓" in line]
    assert "→ 1 recovery" in back and "same path" in back and "reattach_success" in back
    assert "RECOVERING → ATTACHED" in back
    assert not [line for line in lines if "REATT …" in line]


def test_an_attempt_without_an_answer_ends_with_a_cross() -> None:
    """A manual switch to a path that dies before it answers: the request is given up
    (the client's TRANSPORT_SWITCH_DENIED names the path); the attempt ends ✗."""
    sim = attached()
    timeline = Timeline()
    read(sim.client_events, timeline)
    mark = len(sim.client_events)
    sim.links[2].imp.up = False
    assert sim.client.switch_to(2, sim.now) is None
    sim.advance(5.0)

    lines = read(sim.client_events[mark:], timeline)
    (gave_up,) = [line for line in lines if "REATT" in line]
    assert "REATT ✗" in gave_up and "→ 2 manual" in gave_up and "no answer" in gave_up
    assert not starting("DENIED", lines)  # the ✗ line says it


def test_a_new_session_after_a_lost_one_is_one_line_naming_both() -> None:
    base: EventBase = {
        "ts_ms": 5000, "session_id": "b" * 32, "node_id": "client",
        "policy_version": "1.0", "state_version": 0,
    }  # fmt: skip
    linked = SessionLinked(
        **base, previous_session_id="a" * 32, reason_code=Reason.GATEWAY_LOST_STATE,
        inner_address="10.66.0.2",
    )  # fmt: skip
    (line,) = read([linked])
    assert "NEW" in line and "bbbbbbbb" in line and "(was aaaaaaaa)" in line
    assert "gateway_lost_state" in line and "inner address kept" in line


def test_diagnostic_lines_are_shown_quieter_than_state_lines() -> None:
    sim = attached()
    base: EventBase = {
        "ts_ms": 1_000, "session_id": sim.client.machine.session_id, "node_id": "demo-client",
        "policy_version": "1", "state_version": sim.client.machine.version,
    }  # fmt: skip
    step = "demo: step 1/4 at 3 s: 30% loss on the active path 1; expect VOLATILE"
    events = [
        Diagnostic(**base, reason_code=Reason.DEMO_ACTION, detail=step),  # as the demo's
        Diagnostic(**base, reason_code=Reason.NAT_REBIND, detail="gateway host moved"),
    ]
    timeline = Timeline()
    for event in (*sim.client_events, *events):
        timeline.add(event.to_dict())
    resolved, demo = timeline.lines[:2]
    assert plain([demo])[0].endswith(f"NOTE    {step}")  # the demo's own words, no code
    assert "(nat_rebind)" in plain([resolved])[0]  # any other reason is named
    for line in (demo, resolved):  # muted as a whole: time and text in one muted span
        assert line.startswith("[$text-muted]") and line.endswith("[/]")
        assert line.count("[/]") == 1
    attach = timeline.lines[2]  # a state line: only its time is muted
    assert attach.startswith("[$text-muted]") and attach.index("[/]") < attach.index("ATTACH")


# -- the timeline in the app ---------------------------------------------------------------


class SimEngine:
    """An EngineHandle over a core simulation: events as they happen, a snapshot when the
    test publishes one, commands applied the way ``tunnel.client.engine`` applies them."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.channel = UiChannel()
        self.commands = CommandQueue()
        self.applied: list[object] = []
        """Every command taken from the UI, in order."""
        self._published = 0
        self._seq = 0
        self._stopped = threading.Event()

    def start(self) -> None:
        self.publish_events()
        self.publish_snapshot()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopped.set()

    def join(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def advance(self, seconds: float, *, snapshot: bool = True) -> None:
        """Take the UI's commands, run the core for ``seconds``, publish what happened."""
        c, now = self.sim.client, self.sim.now
        for command in self.commands.take_all():
            self.applied.append(command)
            if isinstance(command, SwitchTo):
                c.switch_to(command.path_id, now)
            elif isinstance(command, SetAutoSwitch):
                c.set_auto_switch(command.enabled)
            elif isinstance(command, ForceReattach):
                c.force_reattach(now)
        self.sim.advance(seconds)
        self.publish_events()
        if snapshot:
            self.publish_snapshot()

    def publish_events(self) -> None:
        for event in self.sim.client_events[self._published :]:
            self.channel.publish_event(event.to_dict())
        self._published = len(self.sim.client_events)

    def publish_snapshot(self) -> None:
        self._seq += 1
        session = session_view(self.sim.client.snapshot(self.sim.now))
        ts = 1_717_243_200_000 + round(self.sim.now * 1000)
        self.channel.publish_snapshot(EngineSnapshot(seq=self._seq, ts_ms=ts, session=session))


class WatchedApp(JvpnApp):
    """Notes the header's subtitle each time the timeline took events; drains only when
    the test says (``drain_hz`` tiny), so what each drain takes is the test's choice."""

    def __init__(self, engine: Any) -> None:
        super().__init__(engine, drain_hz=0.001)
        self.seen: list[tuple[str, list[str]]] = []

    def on_events_ready(self, message: Any) -> None:
        message.prevent_default()  # the base handler runs here, not after this one
        super().on_events_ready(message)
        self.seen.append((str(self.sub_title), self.query_one(SwitchTimeline).lines))


async def wait_for(pilot: Pilot[Any], condition: Callable[[], bool], what: str) -> None:
    for _ in range(250):  # bounded: 250 pauses of 20 ms
        if condition():
            return
        await pilot.pause(0.02)
    raise AssertionError(f"timed out waiting for: {what}")


async def drained(app: WatchedApp, pilot: Pilot[Any]) -> None:
    """One drain, and every message it posted handled."""
    app.drain_channel()
    await pilot.pause()
    await pilot.pause()


def run(scenario: Callable[[WatchedApp, SimEngine, Pilot[Any]], Any], n_paths: int = 2) -> None:
    async def main() -> None:
        engine = SimEngine(attached(n_paths))
        app = WatchedApp(engine)
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: engine.channel.counters().published > 0, "start")
            await drained(app, pilot)
            await scenario(app, engine, pilot)

    asyncio.run(main())


def test_keys_each_give_one_line_in_the_app() -> None:
    async def scenario(app: WatchedApp, engine: SimEngine, pilot: Pilot[Any]) -> None:
        timeline = app.query_one(SwitchTimeline)
        before = plain(timeline.lines)
        await pilot.press("2")  # manual switch
        engine.advance(1.0)
        await drained(app, pilot)
        assert engine.applied == [SwitchTo(2)]
        await wait_for(pilot, lambda: len(timeline.lines) > len(before), "the switch")
        lines = plain(timeline.lines)
        assert lines[1:] == before and "SWITCH" in lines[0] and "1 → 2" in lines[0]

        await pilot.press("r")  # reattach on the active path
        engine.advance(1.0)
        await drained(app, pilot)
        assert engine.applied == [SwitchTo(2), ForceReattach()]
        await wait_for(pilot, lambda: len(timeline.lines) > len(lines), "the reattach")
        again = plain(timeline.lines)
        assert again[1:] == lines
        assert "REATT ✓" in again[0] and "→ 2 resume" in again[0]

    run(scenario)


def test_the_header_never_lags_the_timeline() -> None:
    """The engine publishes a path's death at once and the snapshot that shows it up to
    200 ms later: a drain in between takes the events with the older snapshot. The
    timeline must not show the death while the header still shows the path alive."""

    async def scenario(app: WatchedApp, engine: SimEngine, pilot: Pilot[Any]) -> None:
        assert "ATTACHED" in str(app.sub_title) and "path 1" in str(app.sub_title)
        sim = engine.sim
        sim.links[1].imp.up = False
        sim.links[2].imp.up = False  # nothing to recover to: RECOVERING stays
        engine.advance(1.0, snapshot=False)  # the death's events, no new snapshot yet
        await drained(app, pilot)
        engine.publish_snapshot()  # the snapshot of the same moment, a little later
        await drained(app, pilot)

        shown = app.query_one(SwitchTimeline)
        await wait_for(pilot, lambda: bool(starting("DEAD", plain(shown.lines))), "the death")
        assert "RECOVERING" in str(app.sub_title) and "path 1" not in str(app.sub_title)
        for subtitle, lines in app.seen:  # each time the timeline took events
            if any("DEAD" in line for line in plain(lines)):
                assert "RECOVERING" in subtitle, (subtitle, plain(lines)[:3])

    run(scenario)


def test_events_wait_for_their_snapshot_one_drain_at_most() -> None:
    """A snapshot that does not come (an engine stalled) holds nothing back for long."""

    async def scenario(app: WatchedApp, engine: SimEngine, pilot: Pilot[Any]) -> None:
        engine.sim.links[1].imp.up = False
        engine.advance(1.0, snapshot=False)
        await drained(app, pilot)
        await drained(app, pilot)  # no snapshot came: the events are shown anyway
        shown = app.query_one(SwitchTimeline)
        await wait_for(pilot, lambda: bool(starting("DEAD", plain(shown.lines))), "the death")

    run(scenario)


def test_the_demo_script_diagnostics_appear_in_the_timeline() -> None:
    """The demo plays on start (docs/tui.md): its step announcement is a NOTE line without
    a key; the play key (g) pauses it and the script's new status is a NOTE line too."""

    async def main() -> None:
        engine = FakeEngine("healthy", demo=True)
        app = JvpnApp(engine)
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.snapshot is not None, "the first snapshot")
            timeline = app.query_one(SwitchTimeline)

            def notes() -> list[str]:
                engine.pump()  # the fake engine answers commands when pumped
                return [line for line in plain(timeline.lines) if "NOTE" in line]

            await wait_for(pilot, lambda: any("step 1/" in n for n in notes()), "step 1")
            assert engine.received == []
            await pilot.press("g")
            await wait_for(pilot, lambda: any("paused" in n for n in notes()), "the pause")
            assert engine.received == [DemoImpair(0, DemoAction.PLAY_PAUSE)]

    asyncio.run(main())
