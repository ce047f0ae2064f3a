"""Observability health: pipeline flag, ring depth, drops, sinks, UI drops, traffic."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from jvpn_tui.widgets.format import esc, rate
from jvpn_tui.widgets.panel import TextPanel
from tunnel.api import EngineSnapshot, EventType

Severity = Literal["information", "warning", "error"]

SINK_STATE_STYLE = {"ok": "$text-success", "lagging": "$text-warning", "failing": "$text-error"}
"""How a sink's state is coloured: lagging (writing again, lost lines lately) is a warning."""


def sink_notice(event: Mapping[str, object]) -> tuple[str, str, Severity] | None:
    """(message, title, severity) of a notification for an EVENT_LOSS or SINK_HEALTH
    event, None for any other event."""
    kind = event.get("event_type")
    sink = event.get("sink")
    if kind == EventType.EVENT_LOSS:
        where = "the event ring" if sink == "*" else f"event sink {sink}"
        message = (
            f"{where} lost {event.get('dropped')} events ({event.get('reason')}; "
            f"{event.get('dropped_total')} in all)"
        )
        return message, "Events lost", "warning"
    if kind == EventType.SINK_HEALTH:
        state = event.get("state")
        error = event.get("last_error")
        why = f": {error}" if error and state != "ok" else ""
        severity: Severity = "error"
        if state == "ok":
            severity = "information"
        elif state == "lagging":
            severity = "warning"
        message = f"event sink {sink} is {state} (was {event.get('previous_state')}){why}"
        return message, "Event sink", severity
    return None


class HealthPanel(TextPanel):
    """The event pipeline (D16), the UI channel and the inner traffic counters."""

    DEFAULT_CLASSES = "snapshot-view panel"

    def on_mount(self) -> None:
        self.border_title = "Observability"

    def show(self, snapshot: EngineSnapshot) -> None:
        o = snapshot.observability
        s = snapshot.session
        t = snapshot.traffic
        flag = "[b $text-success]● healthy[/]" if o.ok else "[b $text-error]● DEGRADED[/]"
        ring_drop = f"[$text-error]{o.ring_dropped}[/]" if o.ring_dropped else "0"
        ui_drop = f"[$text-warning]{snapshot.ui_dropped}[/]" if snapshot.ui_dropped else "0"
        rows = [
            ("Events", flag),
            ("Ring", f"depth {o.ring_depth}, dropped {ring_drop}"),
            ("UI", f"dropped {ui_drop} (seq {snapshot.seq})"),
            ("Queue", f"depth {s.queue_depth}, dropped {s.queue_dropped}"),
            ("Traffic", f"↑ {rate(t.tx_rate_bps)}  ↓ {rate(t.rx_rate_bps)}"),
        ]
        lines = [f"[$text-muted]{k:<8}[/] {v}" for k, v in rows]
        for sink in o.sinks:
            style = SINK_STATE_STYLE.get(sink.state, "$text-error")
            state = f"[{style}]{esc(sink.state)}[/]"
            line = f"[$text-muted]{'sink':<8}[/] {esc(sink.name)} {state} q{sink.queue_depth}"
            if sink.dropped:
                line += f" [$text-error]dropped {sink.dropped}[/]"
            if sink.last_error:
                line += f" [$text-muted]({esc(sink.last_error)})[/]"
            lines.append(line)
        self.show_markup("\n".join(lines))
