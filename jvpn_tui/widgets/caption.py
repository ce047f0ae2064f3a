"""The demo's caption bar: what the demo script is doing now and what to expect next.

The demo announces its steps and its status (playing, paused, finished) as DIAGNOSTIC
events (``tunnel.demo.commands``: :func:`~tunnel.demo.commands.caption_of`); this bar
shows the newest one, under the header, with what the play key does now. Hidden until
the engine says it is the demo (the app shows it then).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import ClassVar, Final

from textual.widgets import Static

from jvpn_tui.widgets.format import esc
from tunnel.api import EventType
from tunnel.demo.commands import Caption, ScriptStatus, caption_of

_MARK: Final = {
    ScriptStatus.PLAYING: "▶",
    ScriptStatus.PAUSED: "‖",
    ScriptStatus.FINISHED: "■",
}
"""Status -> its mark (text characters, one cell wide in every terminal)."""


class DemoCaption(Static):
    """One line (two when narrow): the demo script's current step or status."""

    DEFAULT_CLASSES = "event-view"
    DEFAULT_CSS: ClassVar[str] = """
    DemoCaption {
        height: auto;
        max-height: 3;
        padding: 0 1;
        background: $accent-muted;
        color: $text;
    }
    """

    def __init__(self, *, play_key: str = "g", id: str | None = None) -> None:
        super().__init__("", id=id, markup=True)
        self.display = False
        self.caption: Caption | None = None
        """The newest caption the demo sent (None: none yet)."""
        self._play_key = play_key

    def on_mount(self) -> None:
        self.update(self._markup())

    def add_events(self, events: Iterable[Mapping[str, object]]) -> None:
        newest = None
        for event in events:
            if event.get("event_type") == EventType.DIAGNOSTIC:
                newest = caption_of(event.get("detail")) or newest
        if newest is not None and newest != self.caption:
            self.caption = newest
            self.update(self._markup())

    def reset_events(self, history: Iterable[Mapping[str, object]], lost: int) -> None:
        """Events were lost: the history holds no DIAGNOSTIC, so keep the caption shown
        (the next step or status replaces it)."""
        self.add_events(history)

    def _markup(self) -> str:
        key = esc(self._play_key)
        caption = self.caption
        if caption is None:
            return f"[b]{_MARK[ScriptStatus.PLAYING]} demo[/] starting…"
        mark, text = _MARK[caption.status], esc(caption.text)
        if caption.status is ScriptStatus.FINISHED:
            return f"[b]{mark} demo finished — {key} to replay[/]  [$text-muted]{text}[/]"
        if caption.status is ScriptStatus.PAUSED:
            return f"[b]{mark} demo paused[/] {text}  [$text-muted]· {key} resumes[/]"
        return f"[b]{mark} demo[/] {text}  [$text-muted]· {key} pauses[/]"
