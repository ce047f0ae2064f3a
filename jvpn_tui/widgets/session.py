"""Session panel: identity, state, versions, the gateway's view (with a gateway cluster:
the node serving the session and its owner epoch), inner addresses, ages, policy; the
data cipher in its bottom border."""

from __future__ import annotations

from jvpn_tui.widgets.format import NONE, duration, esc, state_markup
from jvpn_tui.widgets.panel import TextPanel
from tunnel.api import EngineSnapshot


class SessionPanel(TextPanel):
    """One session's identity and state (the ``session`` slice of a snapshot)."""

    DEFAULT_CLASSES = "snapshot-view panel"

    def on_mount(self) -> None:
        self.border_title = "Session"
        self.show_markup("[$text-muted]waiting for the engine…[/]")

    def show(self, snapshot: EngineSnapshot) -> None:
        s = snapshot.session
        sid = s.session_id or "(not assigned yet)"
        if s.active is None:
            active = "[$text-error]none[/]"
        else:
            active = f"path {s.active}"
        if s.pending is not None:
            active += f" [$text-warning]→ {s.pending}[/]"
        peer = f"{state_markup(s.peer_state)} v{s.peer_state_version}" if s.peer_state else NONE
        inner = "  ".join(esc(a) for a in (s.inner_address, s.inner_address6) if a) or NONE
        rows = [
            ("Session", f"[b]{esc(sid)}[/]"),
            ("State", f"{state_markup(s.state)} v{s.state_version}"),
            ("Gateway", peer),
            *node_row(s.serving_node, s.owner_epoch),
            ("Epoch", str(s.binding_epoch)),
            ("Active", active),
            ("Inner", inner),  # IPv4, then IPv6 when the session carries it
            ("Uptime", duration(s.uptime_s)),
            ("Key", f"phase {s.key_phase}, age {duration(s.key_age_s)}"),
            ("Policy", esc(s.policy_version)),
        ]
        self.show_markup("\n".join(f"[$text-muted]{k:<8}[/] {v}" for k, v in rows))
        # the data cipher negotiated in the handshake, in the border: no extra line
        subtitle = f"cipher {s.cipher}" if s.cipher else ""
        if self.border_subtitle != subtitle:
            self.border_subtitle = subtitle


def node_row(node: str, owner_epoch: int) -> list[tuple[str, str]]:
    """The cluster node serving the session: ``node gw-b · owner epoch 2``; no row when
    the gateway is not a cluster node (docs/cluster.md)."""
    if not node:
        return []
    return [("Node", f"node [b]{esc(node)}[/] · owner epoch {owner_epoch}")]
