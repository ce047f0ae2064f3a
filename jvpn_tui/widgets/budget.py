"""Switch budget: auto-switch, switches left this minute, cooldown remaining."""

from __future__ import annotations

from jvpn_tui.widgets.format import duration
from jvpn_tui.widgets.panel import TextPanel
from tunnel.api import EngineSnapshot


class BudgetPanel(TextPanel):
    """How many switches the rate limiter still allows, and when the next one may go."""

    DEFAULT_CLASSES = "snapshot-view panel"

    def on_mount(self) -> None:
        self.border_title = "Switching"

    def show(self, snapshot: EngineSnapshot) -> None:
        s = snapshot.session
        auto = "[$text-success]on[/]" if s.auto_switch else "[$text-warning]off[/]"
        left = s.switch_budget_left
        budget = f"[$text-error]{left}[/]" if left <= 0 else str(left)
        if s.cooldown_remaining_ms > 0:
            cooldown = f"[$text-warning]{duration(s.cooldown_remaining_ms / 1000)}[/]"
        else:
            cooldown = "[$text-success]ready[/]"
        rows = [
            ("Auto", auto),
            ("Budget", f"{budget} left this minute"),
            ("Cooldown", cooldown),
            ("Switches", f"{s.total_switches} total"),
        ]
        self.show_markup("\n".join(f"[$text-muted]{k:<8}[/] {v}" for k, v in rows))
