"""Observability health: pipeline flag, ring depth, drops, sinks, UI drops, traffic."""

from __future__ import annotations

from jvpn_tui.widgets.format import esc, rate
from jvpn_tui.widgets.panel import TextPanel
from tunnel.api import EngineSnapshot


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
            ok = sink.state == "ok"
            state = "[$text-success]ok[/]" if ok else f"[$text-error]{esc(sink.state)}[/]"
            line = f"[$text-muted]{'sink':<8}[/] {esc(sink.name)} {state} q{sink.queue_depth}"
            if sink.dropped:
                line += f" [$text-error]dropped {sink.dropped}[/]"
            if sink.last_error:
                line += f" [$text-muted]({esc(sink.last_error)})[/]"
            lines.append(line)
        self.show_markup("\n".join(lines))
