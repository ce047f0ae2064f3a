"""TextPanel: a Static that repaints only the lines of its markup that changed.

A panel's whole content is one markup string, one line of markup per screen line. Most
snapshots change nothing, or one number ("12s" becomes "13s"): repainting (and writing
to the terminal) the whole panel for that is what made an idle screen busy. So
:meth:`TextPanel.show_markup` skips an unchanged string, repaints only the changed lines
when the line count and lengths stayed the same (only the cells from the first to the
last that changed, in each), and asks for a layout pass (which
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
                _changed(a, b, y, width)
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


def _changed(old: str, new: str, y: int, width: int) -> Region:
    """The cells of line ``y`` that differ between two markup lines: from the first cell
    whose character or style differs to the last (the whole line when a character is
    wider than one cell)."""
    a, b = _cells(old), _cells(new)
    if a is None or b is None:
        return Region(0, y, width, 1)
    start = 0
    while start < min(len(a), len(b)) and a[start] == b[start]:
        start += 1
    end_a, end_b = len(a), len(b)
    while end_a > start and end_b > start and a[end_a - 1] == b[end_b - 1]:
        end_a -= 1
        end_b -= 1
    end = min(width, max(end_a, end_b))
    return Region(start, y, max(1, end - start), 1)


def _cells(markup: str) -> list[tuple[str, str]] | None:
    """(character, style) of each cell of a markup line; None when a character is not
    one cell wide."""
    content = Content.from_markup(markup)
    plain = content.plain
    if content.cell_length != len(plain):
        return None
    styles = [""] * len(plain)
    for span in content.spans:
        for i in range(span.start, min(span.end, len(plain))):
            styles[i] += f"|{span.style}"
    return list(zip(plain, styles, strict=True))


def _fits(lines: list[str], width: int) -> bool:
    return all(Content.from_markup(line).cell_length <= width for line in lines)


def _shape(markup: str) -> tuple[int, ...]:
    return tuple(len(line) for line in markup.split("\n"))
