"""The jvpn-tui application: wiring only.

The engine (anything implementing :class:`tunnel.api.EngineHandle`) runs in its own
thread; a Textual thread worker starts it and waits for it to end. A 4 Hz timer takes
what waits in the engine's :class:`~tunnel.api.UiChannel` without blocking and posts the
events and the newest snapshot; the widgets in ``widgets/`` render them, each only when
its own content changed. A snapshot that differs from the drawn one only in its ticking
fields (seq, timestamp, uptime, key age) is drawn at most once a second
(:class:`~jvpn_tui.pacing.SnapshotPacer`), so an idle screen stays nearly silent. When
the channel lost events (the UI stalled), the event views are rebuilt from the channel's
history of session-changing events and the loss is said on screen. Commands go back
through ``engine.commands``. :meth:`JvpnApp.on_worker_state_changed` is the one
place that handles the engine ending or failing: the banner shows the reason and the
session's last state, never a traceback.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, ClassVar, Final, Protocol, cast

from textual import events, work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widget import Widget
from textual.widgets import Header, Tab, Tabs
from textual.worker import Worker, WorkerState, get_current_worker

from jvpn_tui.commands import JvpnCommands
from jvpn_tui.keymap import FOOTER_PRIORITY, KEYS, PAGES, KeySpec, check_keymap
from jvpn_tui.messages import EventsLost, EventsReady, SnapshotReady
from jvpn_tui.pacing import SnapshotPacer
from jvpn_tui.screens import ConfirmScreen, HelpScreen
from jvpn_tui.theming import all_themes, theme_name
from jvpn_tui.widgets import (
    BudgetPanel,
    EngineBanner,
    HealthPanel,
    KeyFooter,
    SecurityPanel,
    SessionPanel,
    SwitchTimeline,
    TransportsTable,
    TrendsPanel,
)
from jvpn_tui.widgets.caption import DemoCaption
from jvpn_tui.widgets.health import sink_notice
from themes import PALETTES, STYLESHEET
from tunnel.api import (
    Command,
    EngineHandle,
    EngineSnapshot,
    EventType,
    ForceReattach,
    Reason,
    ReloadPolicy,
    SetAutoSwitch,
    SwitchTo,
    Terminate,
)
from tunnel.control.remote import ATTACH_NODE, RemoteEngine
from tunnel.demo.commands import ALL_PATHS, DemoAction, DemoImpair, outcome_of

DRAIN_HZ: Final = 4.0
"""How often the UI takes what the engine published (and at most how often it redraws)."""

ENGINE_WORKER: Final = "engine"
WIDE_COLUMNS: Final = 150
"""From this width on, the two-column layout (the transports table needs ~110)."""
TALL_ROWS: Final = 40
"""From this height on (and :data:`WIDE_COLUMNS` wide), every panel on one screen; below,
the compact layout: one page at a time (:data:`keymap.PAGES`), chosen by key or tab."""
DEMO_LOSS: Final = 0.3
"""Loss ratio the demo ``l`` key injects."""

_ENGINE_ACTIONS: Final = frozenset({"switch", "toggle_auto", "reattach", "reload_policy",
                                    "terminate", "demo"})  # fmt: skip


class _SnapshotView(Protocol):
    def show(self, snapshot: EngineSnapshot) -> None: ...


class _EventView(Protocol):
    def add_events(self, events: list[Mapping[str, object]]) -> None: ...

    def reset_events(self, history: list[Mapping[str, object]], lost: int) -> None: ...


class JvpnApp(App[int]):
    """Live view of one client session; keys and the palette send engine commands."""

    TITLE = "jvpn"
    CSS_PATH = STYLESHEET
    COMMANDS = App.COMMANDS | {JvpnCommands}
    HORIZONTAL_BREAKPOINTS = [
        (0, "-narrow"),
        (WIDE_COLUMNS, "-wide"),
    ]
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding(k.key, k.action, k.label, show=k.show, id=k.id, tooltip=k.help,
                key_display="?" if k.key == "question_mark" else None)
        for k in KEYS
    ]  # fmt: skip

    def __init__(
        self,
        engine: EngineHandle,
        *,
        theme: str = "dark",
        keymap: Mapping[str, str] | None = None,
        duration: float | None = None,
        drain_hz: float = DRAIN_HZ,
    ) -> None:
        super().__init__()
        if theme not in PALETTES:
            raise ValueError(f"unknown theme {theme!r} (known: {', '.join(PALETTES)})")
        self.engine = engine
        self._remote = engine if isinstance(engine, RemoteEngine) else None
        """The client this UI is attached to (``--attach``); None: the engine is its own."""
        if self._remote is not None:
            self.title = f"jvpn · attached to {self._remote.path} (pid {self._remote.hello.pid})"
        self.snapshot: EngineSnapshot | None = None
        """The newest snapshot drawn."""
        self._latest: EngineSnapshot | None = None
        """The newest snapshot taken (its message may still be queued, or not posted yet)."""
        self._pacer: SnapshotPacer = SnapshotPacer()
        self.ended: str | None = None
        """Why the engine ended (set once, by on_worker_state_changed)."""
        self._keymap_in = check_keymap(dict(keymap or {}))
        self._duration = duration
        self._drain_period = 1.0 / drain_hz
        self._stopping = False
        self._demo = False
        self._held: list[Mapping[str, object]] = []
        """Events taken before the snapshot that shows them (see :meth:`drain_channel`)."""
        self._home: Screen[Any] | None = None
        """The screen the panels live on (set at mount): queries go there, never to a help
        or confirm screen pushed on top of it."""
        self._trends: TrendsPanel | None = None
        """The trends panel, kept from mount: it records every snapshot (plain data), even
        while the app is tearing its screen down (a query then would find nothing)."""
        self.compact: bool | None = None
        """One page at a time (the terminal is smaller than the full layout needs)."""
        self.page = PAGES[0]
        """The page the compact layout shows."""
        self._snapshot_views: list[_SnapshotView] = []
        self._event_views: list[_EventView] = []
        for t in all_themes():
            self.register_theme(t)
        self.theme = theme_name(theme)

    # -- layout -----------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header(icon="⇄")
        yield DemoCaption(id="caption", play_key=self._key_display("jvpn.demo.play"))
        yield EngineBanner(id="banner")
        yield Tabs(*self._page_tabs(), id="pages")
        with VerticalScroll(id="main"):
            with Horizontal(id="top"):
                with Vertical(id="left"):
                    yield SessionPanel(id="session")
                    yield BudgetPanel(id="budget")
                with Vertical(id="right"):
                    yield TransportsTable(id="transports")
                    yield HealthPanel(id="health")
            yield TrendsPanel(id="trends")
            with Horizontal(id="bottom"):
                yield SwitchTimeline(id="timeline")
                yield SecurityPanel(id="security")
        yield KeyFooter([k.action for i in FOOTER_PRIORITY for k in KEYS if k.id == i])

    def _page_tabs(self) -> list[Tab]:
        """One tab per page of the compact layout, labelled with its key (after the keymap)."""
        tabs = []
        for spec in KEYS:
            if spec.page:
                key = self._keymap_in.get(spec.id, spec.key).split(",")[0]
                shown = self.get_key_display(Binding(key, spec.action))
                tabs.append(Tab(f"[b]{shown}[/b] {spec.label}", id=spec.id.replace(".", "-")))
        return tabs

    def on_mount(self) -> None:
        if self._keymap_in:
            self.set_keymap(self._keymap_in)
        self._snapshot_views = [
            cast(_SnapshotView, w) for w in self.query(".snapshot-view").results(Widget)
        ]
        self._event_views = [
            cast(_EventView, w) for w in self.query(".event-view").results(Widget)
        ]
        self.theme_changed_signal.subscribe(self, self._redraw)
        self._home = self.screen
        self._trends = self.query_one(TrendsPanel)
        self._layout(self.size.width, self.size.height)
        self.query_one(TransportsTable).focus()
        self.run_engine()
        self.set_interval(self._drain_period, self.drain_channel, name="drain")
        if self._duration is not None:
            self.set_timer(self._duration, self.action_quit, name="duration")

    # -- engine -> UI -------------------------------------------------------------------

    @work(thread=True, exit_on_error=False, name=ENGINE_WORKER, group=ENGINE_WORKER)
    def run_engine(self) -> None:
        """Start the engine (its own thread) and wait for it to stop."""
        worker = get_current_worker()
        self.engine.start()
        while not self.engine.join(timeout=0.25):
            if worker.is_cancelled:
                return

    def drain_channel(self) -> None:
        """Take what the engine published (never blocks) and post it as messages.

        The engine publishes an event when it happens and a snapshot five times a second,
        so a batch's snapshot may be older than its events. Events that a snapshot shows
        (a transition: the header's state and path) wait until a snapshot as new as their
        transition arrives (one more drain at most), so the header never lags the timeline.
        """
        batch = self.engine.channel.take()
        if batch.snapshot is not None:
            self._latest = batch.snapshot
            self._record(batch.snapshot)
        self._post_snapshot()  # first: the events' lines come with (or after) their state
        held, self._held = self._held, []
        events = held + list(batch.events)
        if batch.lost:
            self.post_message(EventsLost(batch.lost, batch.history, events))
        elif events and (held or not self._ahead(events)):
            self.post_message(EventsReady(events))
        elif events:
            self._held = events  # once: the next drain posts them, whatever it takes

    def _ahead(self, events: list[Mapping[str, object]]) -> bool:
        """One of ``events`` is a transition the newest snapshot does not show yet."""
        shown = self._latest.session.state_version if self._latest is not None else -1
        versions = [
            e.get("state_version") for e in events if e.get("event_type") == EventType.STATE_CHANGE
        ]
        return max((v for v in versions if isinstance(v, int)), default=-1) > shown

    @property
    def _panels(self) -> Screen[Any]:
        """The screen the panels live on (the current one before mount)."""
        return self._home if self._home is not None else self.screen

    def _record(self, snapshot: EngineSnapshot) -> None:
        """Every snapshot taken is a trend sample, drawn or not."""
        if self._trends is not None:
            self._trends.record(snapshot)

    def _post_snapshot(self) -> None:
        """Post the newest snapshot, unless only its ticking fields moved lately."""
        latest = self._latest
        if latest is not None and self._pacer.due(latest, time.monotonic()):
            self.post_message(SnapshotReady(latest))

    def on_snapshot_ready(self, message: SnapshotReady) -> None:
        if self.snapshot is not None and message.snapshot.seq < self.snapshot.seq:
            return  # already drew a newer one (drained directly when the engine ended)
        self._draw(message.snapshot)

    def on_events_ready(self, message: EventsReady) -> None:
        self._add_events(list(message.events))

    def on_events_lost(self, message: EventsLost) -> None:
        history = list(message.history)
        for view in self._event_views:
            view.reset_events(history, message.lost)
        self._notify_events(list(message.events))
        self.notify(
            f"{message.lost} events were lost while the screen was not kept up with; "
            "the timeline was re-read from the engine.",
            title="Events lost", severity="warning",
        )  # fmt: skip

    def _draw(self, snapshot: EngineSnapshot) -> None:
        self.snapshot = snapshot
        for view in self._snapshot_views:
            view.show(snapshot)
        s = snapshot.session
        where = "no active path" if s.active is None else f"path {s.active}"
        self.sub_title = f"{s.state} · {where}"
        if snapshot.demo != self._demo:
            self._demo = snapshot.demo
            self._panels.query_one(DemoCaption).display = snapshot.demo
            self.refresh_bindings()

    def _redraw(self, _theme: object = None) -> None:
        if self.snapshot is not None:
            self._draw(self.snapshot)

    def _add_events(self, events: list[Mapping[str, object]]) -> None:
        for view in self._event_views:
            view.add_events(events)
        self._notify_events(events)

    def _notify_events(self, events: list[Mapping[str, object]]) -> None:
        for event in events:
            if self._remote is not None and self._remote.before_attach(event):
                continue  # the attached client's history: in the views, not news
            kind = event.get("event_type")
            if kind == EventType.TRANSPORT_SWITCH_DENIED and event.get("manual"):
                retry = event.get("retry_after_ms")
                more = (
                    f" (retry in {retry / 1000:.1f} s)" if isinstance(retry, int | float) else ""
                )
                self.notify(
                    f"Switch to path {event.get('requested_transport')} denied: "
                    f"{event.get('reason_code')}{more}",
                    title="Switch denied", severity="warning", markup=False,
                )  # fmt: skip
            elif kind == EventType.POLICY_EVENT:
                bad = event.get("reason_code") == Reason.POLICY_INVALID
                detail = event.get("detail") or event.get("reason_code")
                self.notify(
                    f"{event.get('policy_name')}: {detail}",
                    title="Policy", severity="error" if bad else "information", markup=False,
                )  # fmt: skip
            elif kind == EventType.DIAGNOSTIC and event.get("node_id") == ATTACH_NODE:
                self.notify(str(event.get("detail")), title="Command refused",
                            severity="warning", markup=False)  # fmt: skip
            elif kind == EventType.DIAGNOSTIC:
                self._notify_demo(event)
            elif (notice := sink_notice(event)) is not None:  # EVENT_LOSS, SINK_HEALTH
                message, title, severity = notice
                self.notify(message, title=title, severity=severity, markup=False)

    def _notify_demo(self, event: Mapping[str, object]) -> None:
        """A demo action's outcome (a key's or a script step's) confirmed on screen."""
        outcome = outcome_of(event.get("detail"))
        if outcome is not None:
            ok = event.get("reason_code") == Reason.DEMO_ACTION
            self.notify(outcome, title="Demo", severity="information" if ok else "warning",
                        markup=False)  # fmt: skip

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """The one place where the engine's end or failure is handled."""
        if event.worker.name != ENGINE_WORKER or self.ended is not None:
            return
        if event.state is WorkerState.ERROR:
            error = event.worker.error
            reason = f"engine_error: {type(error).__name__}: {error}"
        elif event.state is WorkerState.SUCCESS and not self._stopping:
            self._take_last_items()
            last = self._latest
            reason = (last.final_reason if last is not None else None) or "engine stopped"
        else:
            return
        state = self._latest.session.state if self._latest is not None else None
        gone = self._remote.went_away if self._remote is not None else None
        if gone is not None:  # attached, and the client ended without a word (killed)
            reason = f"detached: {gone}"
            self._panels.query_one(EngineBanner).detached(gone, state)
        else:
            self._panels.query_one(EngineBanner).stopped(reason, state)
        self.ended = reason
        self.sub_title = f"stopped · {reason}"
        title = "Detached" if gone is not None else "Engine stopped"
        self.notify(reason, title=title, severity="error", markup=False, timeout=8)
        self.refresh_bindings()

    def _take_last_items(self) -> None:
        """Drain synchronously: the engine's last snapshot says why it stopped."""
        batch = self.engine.channel.take()
        held, self._held = self._held, []
        if batch.lost:
            self.on_events_lost(EventsLost(batch.lost, batch.history, batch.events))
        elif held or batch.events:
            self._add_events(held + list(batch.events))
        if batch.snapshot is not None:
            self._latest = batch.snapshot
            self._record(batch.snapshot)
            self._draw(batch.snapshot)

    # -- layout -----------------------------------------------------------------------------

    def on_resize(self, event: events.Resize) -> None:
        self._layout(event.size.width, event.size.height)

    def _layout(self, width: int, height: int) -> None:
        """Full layout from WIDE_COLUMNS x TALL_ROWS on; below, one page at a time."""
        compact = width < WIDE_COLUMNS or height < TALL_ROWS
        if self._home is None or compact == self.compact:
            return
        self.compact = compact
        self._home.query_one("#main").set_class(compact, "-compact")
        self._home.query_one("#pages", Tabs).set_class(compact, "-compact")
        self._show_page(self.page)
        self.refresh_bindings()

    def action_page(self, name: str) -> None:
        """Show page ``name`` of the compact layout (the tabs follow)."""
        if self._home is not None:
            self._home.query_one("#pages", Tabs).active = f"jvpn-page-{name}"
            self._show_page(name)

    def on_tabs_tab_activated(self, event: Tabs.TabActivated) -> None:
        if event.tab.id is not None and event.tab.id.startswith("jvpn-page-"):
            self._show_page(event.tab.id.removeprefix("jvpn-page-"))

    def _show_page(self, name: str) -> None:
        if self._home is None:
            return
        main = self._home.query_one("#main", VerticalScroll)
        for page in PAGES:
            main.set_class(page == name, f"-page-{page}")
        if name != self.page:
            self.page = name
            main.scroll_home(animate=False)
        if self.compact:
            target: Widget = (
                self._home.query_one(TransportsTable) if name == "overview" else main
            )
            target.focus()

    # -- UI -> engine -------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "page":
            return bool(self.compact)
        if action == "demo":
            if not self._demo_keys:
                return False
        if action == "detach":
            return self._remote is not None
        if action in _ENGINE_ACTIONS and self.ended is not None:
            return None
        return True

    def send(self, command: Command) -> bool:
        """Queue ``command`` for the engine; a full queue is reported, never waited on."""
        if self.engine.commands.send(command):
            return True
        self.notify("The engine is not taking commands (queue full); try again.",
                    title="Command dropped", severity="error")  # fmt: skip
        return False

    def action_switch(self, path_id: int) -> None:
        snap = self.snapshot
        if snap is not None and all(p.stats.path_id != path_id for p in snap.session.paths):
            self.notify(f"There is no path {path_id}.", title="Switch", severity="warning")
            return
        self.send(SwitchTo(path_id))

    def action_toggle_auto(self) -> None:
        enabled = self.snapshot.session.auto_switch if self.snapshot is not None else True
        self.send(SetAutoSwitch(not enabled))

    def action_reattach(self) -> None:
        self.send(ForceReattach())

    def action_reload_policy(self) -> None:
        self.send(ReloadPolicy())

    def action_terminate(self) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                self.send(Terminate())

        where = f" The client at {self._remote.path} ends too." if self._remote else ""
        self.push_screen(
            ConfirmScreen(
                "End the session? The gateway is told (TERMINATE) and the tunnel closes." + where,
                confirm_label="Terminate",
            ),
            answered,
        )

    def action_demo(self, action: str) -> None:
        snap = self.snapshot
        if snap is None:
            return
        s = snap.session
        demo = DemoAction(action)
        if demo in (DemoAction.SCRIPT, DemoAction.PLAY_PAUSE, DemoAction.RESTORE):
            self.send(DemoImpair(ALL_PATHS, demo))  # the script, or every path
            return
        target = s.active if s.active is not None else s.pending
        if target is None:
            self.notify("No active path to impair.", title="Demo", severity="warning")
            return
        self.send(DemoImpair(target, demo, DEMO_LOSS if demo is DemoAction.LOSS else 0.0))

    def action_help(self) -> None:
        self.push_screen(HelpScreen(self.binding_rows()))

    async def action_quit(self) -> None:
        self._stopping = True
        await asyncio.to_thread(self.engine.stop)  # attached: detach (the client runs on)
        self.exit(0)

    async def action_detach(self) -> None:
        """Attached: close the UI; the client and its tunnel stay up."""
        await self.action_quit()

    @property
    def _demo_keys(self) -> bool:
        """The demo keys apply: the engine is the demo, and its own (the control socket
        of an attached client does not carry the demo's commands)."""
        return self._demo and self._remote is None

    def on_transports_table_switch_requested(
        self, message: TransportsTable.SwitchRequested
    ) -> None:
        self.action_switch(message.path_id)

    def on_unmount(self) -> None:
        self._stopping = True
        self.engine.stop()

    # -- help and palette ---------------------------------------------------------------

    def _key_display(self, binding_id: str) -> str:
        """The first key of a binding (after the keymap), as the footer names it."""
        keys = self._keymap_in.get(binding_id) or next(k.key for k in KEYS if k.id == binding_id)
        return self.get_key_display(Binding(keys.split(",")[0], ""))

    def binding_rows(self) -> list[tuple[str, str, str]]:
        """``(keys, what it does, binding id)`` for every binding that applies now (demo
        keys with the demo, page keys in the compact layout, a switch key per path), after
        the keymap."""
        rows = []
        for spec in KEYS:
            if not self._applies(spec):
                continue
            keys = self._keymap_in.get(spec.id, spec.key)
            shown = ", ".join(
                self.get_key_display(Binding(k.strip(), spec.action)) for k in keys.split(",")
            )
            rows.append((shown, spec.help, spec.id))
        palette = self.get_key_display(Binding(self.COMMAND_PALETTE_BINDING, "command_palette"))
        rows.append((palette, "Command palette: every action by name", "(textual)"))
        return rows

    def _applies(self, spec: KeySpec) -> bool:
        if spec.demo and not self._demo_keys:
            return False
        if spec.id in ("jvpn.quit", "jvpn.detach"):
            return (spec.id == "jvpn.detach") == (self._remote is not None)
        if spec.page and not self.compact:
            return False
        if spec.id.startswith("jvpn.switch-") and self.snapshot is not None:
            n = int(spec.id.removeprefix("jvpn.switch-"))
            return any(p.stats.path_id == n for p in self.snapshot.session.paths)
        return True

    def palette_commands(self) -> list[tuple[str, str, Callable[[], Any]]]:
        """What the command palette offers: the key actions, per path and per theme."""
        out: list[tuple[str, str, Callable[[], Any]]] = []
        snap = self.snapshot
        if snap is not None and self.ended is None:
            for view in snap.session.paths:
                pid = view.stats.path_id
                out.append((f"Switch to path {pid}", f"{view.label} ({view.role})",
                            partial(self.action_switch, pid)))  # fmt: skip
            auto = snap.session.auto_switch
            out.append((f"Auto-switch: turn {'off' if auto else 'on'}",
                        "Automatic, health-driven switching", self.action_toggle_auto))
        if self.ended is None:
            out += [
                ("Force reattach", "Re-run the reattach exchange on the active path",
                 self.action_reattach),
                ("Reload policy", "Re-read the policy file", self.action_reload_policy),
                ("Terminate session", "End the session (asks first)", self.action_terminate),
            ]  # fmt: skip
            if self._demo_keys:
                for spec in KEYS:
                    if spec.demo:
                        action = spec.action.split("'")[1]
                        out.append((spec.help, f"key {spec.key}",
                                    partial(self.action_demo, action)))  # fmt: skip
        if self.compact:
            for spec in KEYS:
                if spec.page:
                    page = spec.action.split("'")[1]
                    out.append((f"Page: {spec.label}", spec.help, partial(self.action_page, page)))
        for palette in PALETTES:
            name = theme_name(palette)
            out.append((f"Theme: {palette}", f"Switch to the {name} theme",
                        partial(setattr, self, "theme", name)))  # fmt: skip
        out.append(("Help: keys", "List every key binding", self.action_help))
        return out
