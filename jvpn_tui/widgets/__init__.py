"""Widgets: each renders one slice of an :class:`tunnel.api.EngineSnapshot`.

Snapshot views carry the CSS class ``snapshot-view`` and have ``show(snapshot)``; event
views carry ``event-view`` and have ``add_events(events)`` and ``reset_events(history,
lost)`` (the channel lost events: rebuild from the engine's history). None of them
touches the engine: the app hands them what it took from the channel. The text panels
are :class:`~jvpn_tui.widgets.panel.TextPanel` values, which repaint only changed lines.
"""

from jvpn_tui.widgets.banner import EngineBanner
from jvpn_tui.widgets.budget import BudgetPanel
from jvpn_tui.widgets.footer import KeyFooter
from jvpn_tui.widgets.health import HealthPanel
from jvpn_tui.widgets.security import SecurityPanel
from jvpn_tui.widgets.session import SessionPanel
from jvpn_tui.widgets.timeline import SwitchTimeline
from jvpn_tui.widgets.transports import TransportsTable
from jvpn_tui.widgets.trends import TrendsPanel

__all__ = [
    "BudgetPanel",
    "EngineBanner",
    "HealthPanel",
    "KeyFooter",
    "SecurityPanel",
    "SessionPanel",
    "SwitchTimeline",
    "TransportsTable",
    "TrendsPanel",
]
