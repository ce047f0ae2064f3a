"""``jvpn status`` as text: a client's snapshot or a gateway's status (docs/control.md).

Plain, aligned text in the manner of ``wg show``: a block of ``key: value`` lines, then a
table (the client's paths; the gateway's sessions, each followed by its other validated
addresses). Colour only on a terminal (:class:`~tunnel.cli.text.Style`).
"""

from __future__ import annotations

from tunnel.api import EngineSnapshot, ObservabilityView, PathView, SessionView
from tunnel.cli.text import Style, counts, duration, fields, plural, rate, size, table
from tunnel.control.protocol import GatewaySessionStatus, GatewayStatus

_GOOD = frozenset({"ATTACHED"})
_BAD = frozenset({"TERMINATED", "DEGRADED"})


def _state(style: Style, state: str) -> str:
    colour = "green" if state in _GOOD else "red" if state in _BAD else "yellow"
    return style(state, colour)


def _observability(obs: ObservabilityView) -> str:
    text = "ok" if obs.ok else "DEGRADED (a sink failed or lost events)"
    extra = [f"ring dropped {obs.ring_dropped}"] if obs.ring_dropped else []
    for sink in obs.sinks:
        line = f"{sink.name} {sink.state}"
        if sink.dropped:
            line += f", {sink.dropped} dropped"
        if sink.state != "ok" and sink.last_error:
            line += f" ({sink.last_error})"
        extra.append(line)
    return f"{text}; " + "; ".join(extra) if extra else text


# -- client ------------------------------------------------------------------------------


def client_text(snap: EngineSnapshot, style: Style) -> list[str]:
    """The client's status: session block, traffic and health, then the paths table."""
    s = snap.session
    head = style("client", "bold") + (f" {s.inner_address}" if s.inner_address else "")
    lines = [head, *fields(_client_fields(snap, style))]
    if s.paths:
        lines += ["", *table(
            ("PATH", "LABEL", "ROLE", "VALIDATED", "SRTT", "LOSS", "SCORE"),
            [_path_row(p, s) for p in s.paths],
        )]  # fmt: skip
    return lines


def _client_fields(snap: EngineSnapshot, style: Style) -> list[tuple[str, str]]:
    s = snap.session
    t = snap.traffic
    out = [
        ("session", s.session_id or "(none yet)"),
        ("state", f"{_state(style, s.state)} v{s.state_version}"
                  + (f" (gateway: {s.peer_state} v{s.peer_state_version})" if s.peer_state
                     else "")),
        *([("node", f"node {s.serving_node} · owner epoch {s.owner_epoch}")]
          if s.serving_node else []),
        ("binding epoch", str(s.binding_epoch)),
        ("key phase", f"{s.key_phase} (keys {duration(s.key_age_s)} old)"),
        ("cipher", s.cipher or "-"),
        ("policy", s.policy_version or "-"),
        ("uptime", duration(s.uptime_s)),
        ("switching", _switching(s)),
        ("traffic", f"tx {plural(t.tx_packets, 'packet')} / {size(t.tx_bytes)}, "
                    f"rx {plural(t.rx_packets, 'packet')} / {size(t.rx_bytes)} "
                    f"(up {rate(t.tx_rate_bps)}, down {rate(t.rx_rate_bps)})"),
        ("queue", f"{s.queue_depth} waiting, {s.queue_dropped} dropped"),
        ("drops", counts(s.drops)),
        ("observability", _observability(snap.observability)),
    ]  # fmt: skip
    if snap.ui_dropped:
        out.append(("events lost", f"{snap.ui_dropped} (the engine's UI channel overflowed)"))
    if not snap.running:
        ended = f"stopped: {snap.final_reason or 'unknown'}"
        out.append(("engine", style(ended, "red")))
        if snap.explanation:
            out.append(("why", snap.explanation))
    return out


def _switching(s: SessionView) -> str:
    switches = plural(s.total_switches, "switch", "switches")
    text = f"auto {'on' if s.auto_switch else 'off'}, {switches}"
    text += f", {s.switch_budget_left} more allowed now"
    if s.cooldown_remaining_ms > 0:
        text += f", cooldown {duration(s.cooldown_remaining_ms / 1000)}"
    if s.pending is not None:
        text += f", switching to path {s.pending}"
    return text


def _path_row(p: PathView, s: SessionView) -> list[str]:
    st = p.stats
    marker = "*" if st.path_id == s.active else " "
    return [
        f"{marker}{st.path_id}", p.label, p.role, "yes" if p.validated else "no",
        f"{st.srtt_ms:.1f} ms" if st.srtt_ms is not None else "-",
        f"{st.loss_ratio * 100:.1f}%" if st.loss_known else "-",
        f"{st.score:.2f}",
    ]  # fmt: skip


# -- gateway -----------------------------------------------------------------------------


def gateway_text(status: GatewayStatus, style: Style) -> list[str]:
    """The gateway's status: its block, then one row per session (and its addresses)."""
    lines = [style("gateway", "bold") + f" {status.node_id}", *fields(_gateway_fields(status))]
    if not status.sessions:
        return [*lines, "", "  no sessions"]
    rows: list[list[str]] = []
    subrows: dict[int, list[str]] = {}
    for i, s in enumerate(status.sessions):
        rows.append(_session_row(s))
        subrows[i] = _other_paths(s)
    header = ("SESSION", "CLIENT", "INNER", "STATE", "EPOCH", "KEY", "CIPHER", "OWNER", "PATH",
              "ADDRESS", "RX", "TX", "SEEN", "AGE")  # fmt: skip
    rendered = table(header, rows)
    out = [*lines, "", rendered[0]]
    for i, line in enumerate(rendered[1:]):
        out.append(line)
        out += subrows[i]
    return out


def _gateway_fields(g: GatewayStatus) -> list[tuple[str, str]]:
    live = sum(1 for s in g.sessions if s.state != "TERMINATED")
    t = g.traffic
    policy = g.policy_version if g.policy_ok else (
        f"INVALID, new sessions are denied (running ones keep {g.policy_version}): "
        f"{g.policy_error}"
    )  # fmt: skip
    return [
        ("listening", ", ".join(g.listen)),
        ("policy", policy),
        ("ciphers", ", ".join(g.ciphers) or "-"),
        ("uptime", duration(g.uptime_s)),
        ("sessions", f"{live} live, {g.sessions_created} created, {g.sessions_denied} denied"),
        ("refused handshakes", str(g.handshakes_refused)),
        ("datagrams", f"in {g.traffic.datagrams_in}, out {t.datagrams_out}, "
                      f"send failed {t.send_failed}"),
        ("inner packets", f"to clients {t.inner_to_clients}, "
                          f"from clients {t.inner_from_clients}"),
        ("drops", counts(g.drops)),
        ("events dropped", str(g.events_dropped)),
        ("store conflicts", str(g.store_conflicts)),
        ("observability", "ok" if g.observability_ok else "DEGRADED (a sink failed or lost "
                          "events)"),
        *([("workers", _workers(g))] if g.workers else []),
    ]  # fmt: skip


def _workers(g: GatewayStatus) -> str:
    """``0 pid 4711 (3 sessions), 1 NOT ANSWERING: no answer in 2s (pid 4712)``."""
    return ", ".join(
        f"{w.index} pid {w.pid} ({plural(w.sessions, 'session')})" if w.ok
        else f"{w.index} NOT ANSWERING: {w.problem}"
        for w in g.workers
    )  # fmt: skip


def _session_row(s: GatewaySessionStatus) -> list[str]:
    """One table row (no colour inside tables: escape codes would break the columns)."""
    active = next((p for p in s.paths if p.active), None)
    return [
        s.session_id[:8], s.client, s.inner_address, f"{s.state} v{s.state_version}",
        str(s.binding_epoch), str(s.key_phase), s.cipher or "-", s.owner or "-",
        str(s.active_path) if s.active_path is not None else "-",
        active.address if active is not None else "-",
        size(s.rx_bytes), size(s.tx_bytes), duration(s.last_seen_s), duration(s.age_s),
    ]  # fmt: skip


def _other_paths(s: GatewaySessionStatus) -> list[str]:
    """Lines under a session's row: how it ended, or its inner IPv6 address, its other
    validated addresses, a queue."""
    if s.end_reason:
        return [f"    ended: {s.end_reason}"]
    out = [f"    inner IPv6: {s.inner_address6}"] if s.inner_address6 else []
    for p in s.paths:
        if p.active:
            continue
        when = f" {duration(p.validated_s)} ago" if p.validated_s is not None else ""
        out.append(f"    also validated: {p.address}{when}")
    if s.queued:
        out.append(f"    {plural(s.queued, 'packet')} waiting for a binding")
    return out
