"""TextPanel: a Static that repaints only when its markup changed."""

from __future__ import annotations

from textual.widgets import Static


class TextPanel(Static):
    """A panel whose whole content is one markup string: :meth:`show_markup` compares the
    new string with the shown one and skips the update (and the repaint) when equal."""

    def __init__(self, content: str = "", *, id: str | None = None) -> None:
        super().__init__(content, id=id)
        self._markup: str | None = None

    def on_mount(self) -> None:
        self.app.theme_changed_signal.subscribe(self, self._theme_changed)

    def _theme_changed(self, _theme: object) -> None:
        """Colours are theme variables: the same markup is rendered anew."""
        if self._markup is not None:
            self.update(self._markup)

    def show_markup(self, markup: str) -> bool:
        """Show ``markup``; False (and nothing repainted) when it is already shown."""
        if markup == self._markup:
            return False
        self._markup = markup
        self.update(markup)
        return True
