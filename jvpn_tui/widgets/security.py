"""Security events (replays, bad proofs, fixation attempts...) and drop counters."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from typing import Final

from jvpn_tui.widgets.format import clock, esc
from jvpn_tui.widgets.panel import TextPanel
from tunnel.api import EngineSnapshot, EventType

SECURITY_LINES: Final = 100


def describe(event: Mapping[str, object]) -> str | None:
    """One line (markup) for a security-relevant event, or None."""
    kind = event.get("event_type")
    if kind == EventType.SECURITY_EVENT:
        count = event.get("count", 1)
        times = f" \N{MULTIPLICATION SIGN}{esc(count)}" if count != 1 else ""
        text = f"[b $text-error]{esc(event.get('violation_type', '?'))}[/]{times}"
        source = event.get("source")
        if source:
            text += f" from {esc(source)}"
        if event.get("transport_id") is not None:
            text += f" on path {esc(event.get('transport_id'))}"
    elif kind == EventType.REATTACH_RESULT and event.get("status") != "SUCCESS":
        text = f"[b $text-warning]reattach denied[/] {esc(event.get('reason_code', ''))}"
    else:
        return None
    return f"[$text-muted]{clock(event)}[/] {text}"


class SecurityPanel(TextPanel):
    """Security events as they arrive (newest first) above the session's drop counters."""

    DEFAULT_CLASSES = "snapshot-view event-view panel"

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__("", id=id)
        self._lines: deque[str] = deque(maxlen=SECURITY_LINES)
        self._drops = ""
        self.count = 0

    def on_mount(self) -> None:
        self.border_title = "Security"
        self._render_lines()

    def add_events(self, events: Iterable[Mapping[str, object]]) -> None:
        if self._take(events):
            self.border_subtitle = f"{self.count} events"
            self._render_lines()

    def reset_events(self, history: Iterable[Mapping[str, object]], lost: int) -> None:
        """Events were lost: rebuild from the engine's history (oldest first)."""
        del lost  # the timeline says it
        self._lines.clear()
        self.count = 0
        self._take(history)
        self.border_subtitle = f"{self.count} events" if self.count else ""
        self._render_lines()

    def _take(self, events: Iterable[Mapping[str, object]]) -> bool:
        before = self.count
        for event in events:
            line = describe(event)
            if line is not None:
                self._lines.appendleft(line)
                self.count += 1
        return self.count != before

    def show(self, snapshot: EngineSnapshot) -> None:
        drops = snapshot.session.drops
        text = ", ".join(f"{esc(name)} {n}" for name, n in drops if n) or "none"
        drops_line = f"[$text-muted]client drops[/] {text}"
        if drops_line != self._drops:
            self._drops = drops_line
            self._render_lines()

    def _render_lines(self) -> None:
        body = list(self._lines) or ["[$text-success]no security events[/]"]
        self.show_markup("\n".join([self._drops, *body] if self._drops else body))

    @property
    def lines(self) -> list[str]:
        return list(self._lines)
