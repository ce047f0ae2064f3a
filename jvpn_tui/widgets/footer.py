"""KeyFooter: Textual's Footer that keeps the keys that matter, whole, when space is short.

Textual's footer lays its keys out in one row and cuts the row where the terminal ends, in
the middle of a word. This footer instead drops whole keys, the least important first
(``keymap.FOOTER_PRIORITY``), until the rest fit next to the command palette key; the
help screen and the palette still list every key.
"""

from __future__ import annotations

from collections.abc import Sequence

from textual import events
from textual.app import ComposeResult
from textual.widget import Widget
from textual.widgets import Footer
from textual.widgets._footer import FooterKey


def key_width(key: FooterKey) -> int:
    """Cells a (non-compact) footer key takes: `` k `` then ``label ``."""
    text = f" {key.key_display} "
    if key.description:
        text += f"{key.description} "
    return len(text)


class KeyFooter(Footer):
    """A :class:`~textual.widgets.Footer` that drops whole keys, by ``priority``."""

    def __init__(self, priority: Sequence[str], *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._rank = {action: n for n, action in enumerate(priority)}
        """Action -> rank (0: most important); keys of other actions come last."""
        self._width = 0

    def compose(self) -> ComposeResult:
        widgets: list[Widget] = list(super().compose())
        keys = [w for w in widgets if isinstance(w, FooterKey)]
        palette = [k for k in keys if k.has_class("-command-palette")]
        room = self.app.size.width - sum(key_width(k) + 1 for k in palette)
        kept: set[FooterKey] = set(palette)
        ranked = sorted(
            (k for k in keys if k not in kept), key=lambda k: self._rank.get(k.action, 999)
        )
        for key in ranked:
            width = key_width(key)
            if width <= room:
                kept.add(key)
                room -= width
        yield from (w for w in widgets if not isinstance(w, FooterKey) or w in kept)

    def on_resize(self, event: events.Resize) -> None:
        if event.size.width != self._width:
            self._width = event.size.width
            self.call_after_refresh(self.recompose)
