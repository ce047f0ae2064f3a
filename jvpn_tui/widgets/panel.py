"""TextPanel: a Static that repaints only the lines of its markup that changed.

A panel's whole content is one markup string, one line of markup per screen line. Most
snapshots change nothing, or one number ("12s" becomes "13s"): repainting (and writing
to the terminal) the whole panel for that is what made an idle screen busy. So
:meth:`TextPanel.show_markup` skips an unchanged string, repaints only the changed lines
when the line count and lengths stayed the same, and asks for a layout pass (which
repaints the neighbours too) only when they did not (the panels' widths are fixed by the
stylesheet; their heights follow their lines).
"""

from __future__ import annotations

from typing import Self

from textual.content import Content
from textual.geometry import Region
from textual.widgets import Static


class TextPanel(Static):
    """A Static whose content is set with :meth:`show_markup` (see the module)."""

    def __init__(self, content: str = "", *, id: str | None = None) -> None:
        super().__init__(content, id=id)
        self._markup: str | None = None
        self._lines_only: tuple[Region, ...] = ()
        """Set for the one refresh that ``update`` does: the changed lines."""

    def on_mount(self) -> None:
        self.app.theme_changed_signal.subscribe(self, self._theme_changed)

    def _theme_changed(self, _theme: object) -> None:
        """Colours are theme variables: the same markup is rendered anew."""
        if self._markup is not None:
            self.update(self._markup)

    def show_markup(self, markup: str) -> bool:
        """Show ``markup``; False (and nothing repainted) when it is already shown."""
        old = self._markup
        if markup == old:
            return False
        self._markup = markup
        if old is None or _shape(markup) != _shape(old):
            self.update(markup)
            return True
        new_lines = markup.split("\n")
        width = self.content_size.width
        if _fits(new_lines, width):  # no line wraps: markup lines are screen lines
            self._lines_only = tuple(
                Region(0, y, width, 1)
                for y, (a, b) in enumerate(zip(old.split("\n"), new_lines, strict=True))
                if a != b
            )
        self.update(markup, layout=False)
        return True

    def refresh(
        self, *regions: Region, repaint: bool = True, layout: bool = False,
        recompose: bool = False,
    ) -> Self:  # fmt: skip
        """As Static's, but the refresh that :meth:`show_markup` causes repaints only the
        changed lines."""
        lines, self._lines_only = self._lines_only, ()
        if lines and not regions and not layout and not recompose:
            regions = lines
        return super().refresh(*regions, repaint=repaint, layout=layout, recompose=recompose)


def _fits(lines: list[str], width: int) -> bool:
    return all(Content.from_markup(line).cell_length <= width for line in lines)


def _shape(markup: str) -> tuple[int, ...]:
    return tuple(len(line) for line in markup.split("\n"))
