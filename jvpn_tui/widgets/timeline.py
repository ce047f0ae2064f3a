"""Switch timeline: switches, denials, deaths, reattaches, state changes; newest first."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Final

from jvpn_tui.widgets.format import NONE, clock, esc, ms, state_markup
from jvpn_tui.widgets.panel import TextPanel
from tunnel.api import EventType

TIMELINE_LINES: Final = 200
"""Lines kept (older ones fall off)."""

EventMap = Mapping[str, object]
"""One event as the channel carries it (its ``to_dict()`` mapping)."""


def _path(value: object) -> str:
    return NONE if value is None else esc(value)


def _switch(event: EventMap, reason: str) -> str:
    return (
        f"[b $text-success]SWITCH [/] {_path(event.get('previous_transport'))} → "
        f"{_path(event.get('new_transport'))}  {reason}  "
        f"[$text-primary]{ms(event.get('switch_latency_ms'))}[/]  "
        f"epoch {esc(event.get('binding_epoch', '?'))}"
    )


def _denied(event: EventMap, reason: str) -> str:
    who = "manual" if event.get("manual") else "auto"
    text = (
        f"[b $text-warning]DENIED [/] → {_path(event.get('requested_transport'))}  "
        f"[$text-warning]{reason}[/]  ({who})"
    )
    retry = event.get("retry_after_ms")
    if isinstance(retry, int | float):
        text += f"  retry in {ms(retry, 0)}"
    return text


def _dead(event: EventMap, reason: str) -> str:
    return (
        f"[b $text-error]DEAD   [/] path {_path(event.get('transport_id'))}  {reason}"
        f"  silent {ms(event.get('silence_ms'), 0)}"
    )


def _attached(event: EventMap, reason: str) -> str:
    return f"[b]ATTACH [/] path {_path(event.get('transport_id'))}  {esc(event.get('path', ''))}"


def _attempt(event: EventMap, reason: str) -> str:
    target, kind = _path(event.get("candidate_transport")), esc(event.get("kind", ""))
    return f"[b]REATT ?[/] → {target}  {kind}"


def _result(event: EventMap, reason: str) -> str:
    ok = event.get("status") == "SUCCESS"
    mark = "[b $text-success]REATT ✓[/]" if ok else "[b $text-error]REATT ✗[/]"
    text = f"{mark} → {_path(event.get('candidate_transport'))}  {reason}"
    if event.get("fatal"):
        text += "  [$text-error]fatal[/]"
    return text


def _state(event: EventMap, reason: str) -> str:
    return (
        f"[b]STATE  [/] {state_markup(str(event.get('previous_state', '?')))} → "
        f"{state_markup(str(event.get('new_state', '?')))}  {reason}"
    )


def _end(event: EventMap, reason: str) -> str:
    return f"[b $text-error]END    [/] {reason}  ({esc(event.get('initiator', ''))})"


def _policy(event: EventMap, reason: str) -> str:
    text = f"[b]POLICY [/] {esc(event.get('policy_name', ''))}  {reason}"
    detail = event.get("detail")
    if detail:
        text += f"  [$text-muted]{esc(detail)}[/]"
    return text


def _keys(event: EventMap, reason: str) -> str:
    return f"[b]KEYS   [/] phase {esc(event.get('key_phase', '?'))}  {reason}"


_LINES: Final[Mapping[str, Callable[[EventMap, str], str]]] = {
    EventType.TRANSPORT_SWITCH: _switch,
    EventType.TRANSPORT_SWITCH_DENIED: _denied,
    EventType.TRANSPORT_DEAD: _dead,
    EventType.TRANSPORT_ATTACHED: _attached,
    EventType.REATTACH_ATTEMPT: _attempt,
    EventType.REATTACH_RESULT: _result,
    EventType.STATE_CHANGE: _state,
    EventType.SESSION_TERMINATED: _end,
    EventType.POLICY_EVENT: _policy,
    EventType.KEY_ROTATED: _keys,
}
"""Event type -> its timeline line (markup), given the event and its escaped reason."""

TIMELINE_TYPES: Final = frozenset(_LINES)


def describe(event: EventMap) -> str | None:
    """One timeline line (markup) for ``event``, or None when it does not belong here."""
    line = _LINES.get(str(event.get("event_type")))
    if line is None:
        return None
    text = line(event, esc(event.get("reason_code", "")))
    return f"[$text-muted]{clock(event)}[/] {text}"


def lost_line(lost: int) -> str:
    """The line that marks where the UI lost events and re-read the engine's history."""
    return (
        f"[b $text-warning]LOST   [/] {lost} events lost while the screen was not kept up "
        "with; re-read from the engine"
    )


class SwitchTimeline(TextPanel):
    """Every transport decision with its reason and latency, newest first."""

    DEFAULT_CLASSES = "event-view panel"

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__("", id=id)
        self._lines: deque[str] = deque(maxlen=TIMELINE_LINES)
        self.count = 0

    def on_mount(self) -> None:
        self.border_title = "Switch timeline (UTC)"
        self.show_markup("[$text-muted]no events yet[/]")

    def add_events(self, events: Iterable[Mapping[str, object]]) -> None:
        if self._take(events):
            self._render_lines()

    def reset_events(self, history: Iterable[Mapping[str, object]], lost: int) -> None:
        """Events were lost: rebuild from the engine's history (oldest first), and say so."""
        self._lines.clear()
        self.count = 0
        self._take(history)
        self._lines.appendleft(lost_line(lost))
        self._render_lines()

    def _take(self, events: Iterable[Mapping[str, object]]) -> bool:
        added = False
        for event in events:
            line = describe(event)
            if line is not None:
                self._lines.appendleft(line)
                self.count += 1
                added = True
        return added

    def _render_lines(self) -> None:
        self.border_subtitle = f"{self.count} events"
        self.show_markup("\n".join(self._lines))

    @property
    def lines(self) -> list[str]:
        """The current lines (markup), newest first."""
        return list(self._lines)
