"""Command palette provider: every key action, plus one entry per path and per theme."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from textual.command import DiscoveryHit, Hit, Hits, Provider

if TYPE_CHECKING:
    from jvpn_tui.app import JvpnApp


class JvpnCommands(Provider):
    """The same actions as the keys (the app lists them in ``palette_commands``)."""

    def _commands(self) -> list[tuple[str, str, Callable[[], object]]]:
        return cast("JvpnApp", self.app).palette_commands()

    async def discover(self) -> Hits:
        for title, help_text, callback in self._commands():
            yield DiscoveryHit(title, callback, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for title, help_text, callback in self._commands():
            score = matcher.match(title)
            if score > 0:
                yield Hit(score, matcher.highlight(title), callback, help=help_text)
