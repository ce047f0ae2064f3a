"""The line that says the engine has stopped, and why (hidden while it runs).

When the engine explains its final reason (a session that never started: what came back
from the gateway and the client's key fingerprint), the explanation is a second line. An
attached UI whose client went away without a final word says that instead (``Detached``).
"""

from __future__ import annotations

from textual.widgets import Static

from jvpn_tui.widgets.format import esc, state_markup
from tunnel.api import EngineSnapshot


class EngineBanner(Static):
    """Shows ``final_reason``, the final session state and the engine's explanation once
    the engine stopped."""

    DEFAULT_CLASSES = "snapshot-view"

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__("", id=id)
        self.display = False
        self.final_reason: str | None = None
        self.final_state: str | None = None
        self.explanation: str | None = None
        """The engine's line about the final reason (from the final snapshot), if any."""

    def show(self, snapshot: EngineSnapshot) -> None:
        if not snapshot.running:
            self.explanation = snapshot.explanation
            self.stopped(snapshot.final_reason or "engine stopped", snapshot.session.state)

    def stopped(self, reason: str, state: str | None) -> None:
        """The engine is gone: say why, with the last state the session had (and the
        explanation the final snapshot brought, if any)."""
        self.final_reason = reason
        self.final_state = state
        where = f" — session {state_markup(state)}" if state else ""
        text = f"[b]Engine stopped:[/b] {esc(reason)}{where}"
        if self.explanation:
            text += f"\n{esc(self.explanation)}"
        self.update(text)
        self.display = True

    def detached(self, message: str, state: str | None) -> None:
        """Attached, and the client went away without its final snapshot (it was killed):
        say so, with the last state seen."""
        self.final_reason = message
        self.final_state = state
        seen = f" (last seen: session {state_markup(state)})" if state else ""
        self.update(f"[b]Detached:[/b] {esc(message)}{seen}")
        self.display = True
