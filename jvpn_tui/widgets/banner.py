"""The line that says the engine has stopped, and why (hidden while it runs)."""

from __future__ import annotations

from textual.widgets import Static

from jvpn_tui.widgets.format import esc, state_markup
from tunnel.api import EngineSnapshot


class EngineBanner(Static):
    """Shows ``final_reason`` and the final session state once the engine stopped."""

    DEFAULT_CLASSES = "snapshot-view"

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__("", id=id)
        self.display = False
        self.final_reason: str | None = None
        self.final_state: str | None = None

    def show(self, snapshot: EngineSnapshot) -> None:
        if not snapshot.running:
            self.stopped(snapshot.final_reason or "engine stopped", snapshot.session.state)

    def stopped(self, reason: str, state: str | None) -> None:
        """The engine is gone: say why, with the last state the session had."""
        self.final_reason = reason
        self.final_state = state
        where = f" — session {state_markup(state)}" if state else ""
        self.update(f"[b]Engine stopped:[/b] {esc(reason)}{where}")
        self.display = True
