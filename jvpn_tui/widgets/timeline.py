"""Switch timeline: switches, denials, deaths, reattaches, state changes; newest first."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from typing import Final

from textual.widgets import Static

from jvpn_tui.widgets.format import NONE, clock, esc, ms, state_markup

TIMELINE_LINES: Final = 200
"""Lines kept (older ones fall off)."""

TIMELINE_TYPES: Final = frozenset({
    "TRANSPORT_SWITCH", "TRANSPORT_SWITCH_DENIED", "TRANSPORT_DEAD", "TRANSPORT_ATTACHED",
    "REATTACH_ATTEMPT", "REATTACH_RESULT", "STATE_CHANGE", "SESSION_TERMINATED",
    "POLICY_EVENT", "KEY_ROTATED",
})  # fmt: skip


def _path(value: object) -> str:
    return NONE if value is None else esc(value)


def describe(event: Mapping[str, object]) -> str | None:
    """One timeline line (markup) for ``event``, or None when it does not belong here."""
    kind = event.get("event_type")
    reason = esc(event.get("reason_code", ""))
    if kind == "TRANSPORT_SWITCH":
        text = (
            f"[b $text-success]SWITCH [/] {_path(event.get('previous_transport'))} → "
            f"{_path(event.get('new_transport'))}  {reason}  "
            f"[$text-primary]{ms(event.get('switch_latency_ms'))}[/]  "
            f"epoch {esc(event.get('binding_epoch', '?'))}"
        )
    elif kind == "TRANSPORT_SWITCH_DENIED":
        who = "manual" if event.get("manual") else "auto"
        text = (
            f"[b $text-warning]DENIED [/] → {_path(event.get('requested_transport'))}  "
            f"[$text-warning]{reason}[/]  ({who})"
        )
        retry = event.get("retry_after_ms")
        if isinstance(retry, int | float):
            text += f"  retry in {ms(retry, 0)}"
    elif kind == "TRANSPORT_DEAD":
        text = (
            f"[b $text-error]DEAD   [/] path {_path(event.get('transport_id'))}  {reason}"
            f"  silent {ms(event.get('silence_ms'), 0)}"
        )
    elif kind == "TRANSPORT_ATTACHED":
        text = (
            f"[b]ATTACH [/] path {_path(event.get('transport_id'))}  "
            f"{esc(event.get('path', ''))}"
        )
    elif kind == "REATTACH_ATTEMPT":
        text = (
            f"[b]REATT ?[/] → {_path(event.get('candidate_transport'))}  "
            f"{esc(event.get('kind', ''))}"
        )
    elif kind == "REATTACH_RESULT":
        ok = event.get("status") == "SUCCESS"
        mark = "[b $text-success]REATT ✓[/]" if ok else "[b $text-error]REATT ✗[/]"
        text = f"{mark} → {_path(event.get('candidate_transport'))}  {reason}"
        if event.get("fatal"):
            text += "  [$text-error]fatal[/]"
    elif kind == "STATE_CHANGE":
        text = (
            f"[b]STATE  [/] {state_markup(str(event.get('previous_state', '?')))} → "
            f"{state_markup(str(event.get('new_state', '?')))}  {reason}"
        )
    elif kind == "SESSION_TERMINATED":
        text = f"[b $text-error]END    [/] {reason}  ({esc(event.get('initiator', ''))})"
    elif kind == "POLICY_EVENT":
        text = f"[b]POLICY [/] {esc(event.get('policy_name', ''))}  {reason}"
        detail = event.get("detail")
        if detail:
            text += f"  [$text-muted]{esc(detail)}[/]"
    elif kind == "KEY_ROTATED":
        text = f"[b]KEYS   [/] phase {esc(event.get('key_phase', '?'))}  {reason}"
    else:
        return None
    return f"[$text-muted]{clock(event)}[/] {text}"


class SwitchTimeline(Static):
    """Every transport decision with its reason and latency, newest first."""

    DEFAULT_CLASSES = "event-view panel"

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__("", id=id)
        self._lines: deque[str] = deque(maxlen=TIMELINE_LINES)
        self.count = 0

    def on_mount(self) -> None:
        self.border_title = "Switch timeline (UTC)"
        self.update("[$text-muted]no events yet[/]")

    def add_events(self, events: Iterable[Mapping[str, object]]) -> None:
        added = False
        for event in events:
            line = describe(event)
            if line is not None:
                self._lines.appendleft(line)
                self.count += 1
                added = True
        if added:
            self.border_subtitle = f"{self.count} events"
            self.update("\n".join(self._lines))

    @property
    def lines(self) -> list[str]:
        """The current lines (markup), newest first."""
        return list(self._lines)
