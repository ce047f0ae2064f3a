"""``jvpn watch`` as text: one readable line per event (docs/control.md, docs/events.md).

Every :class:`~tunnel.api.EventType` has its renderer in :data:`RENDERERS` (a test checks
that, so a new event type cannot be forgotten). A line is::

    12:04:31.250  3fa2c1d0  TRANSPORT_SWITCH  path 1 -> 2 (lte): manual_switch, 12.3 ms, epoch 3

time (local), the first 8 hex digits of the session id (``-`` when none), the type, and
what happened. Renderers read the event's ``to_dict()`` mapping with defaults, so an event
from another version with a missing field still renders.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Final

from tunnel.api import EventType
from tunnel.cli.text import duration

Event = Mapping[str, Any]


def _ms(value: object) -> str:
    return f"{value:.1f} ms" if isinstance(value, int | float) else "-"


def _path(event: Event, key: str = "transport_id") -> str:
    """``path 2`` (client), or the address for the gateway's -1."""
    pid = event.get(key)
    label = event.get("path") or ""
    if pid is None or pid == -1:
        return label or "?"
    return f"path {pid}" + (f" ({label})" if label else "")


def _state_change(e: Event) -> str:
    text = f"{e.get('previous_state', '?')} -> {e.get('new_state', '?')} v{e.get('state_version')}"
    text += f": {e.get('reason_code', '?')}"
    if e.get("from_transport") is not None:
        text += f" (path {e['from_transport']} was active)"
    return text


def _created(e: Event) -> str:
    cipher = f", cipher {e['cipher']}" if e.get("cipher") else ""
    return f"session created: {e.get('peer', '?')}, inner {e.get('inner_address', '?')}{cipher}"


def _attached(e: Event) -> str:
    return f"attached to {_path(e)}, epoch {e.get('binding_epoch', '?')}"


def _switch(e: Event) -> str:
    prev = e.get("previous_transport")
    new = e.get("new_transport")
    where = f"path {'-' if prev is None else prev} -> {new}"
    if e.get("path"):
        where += f" ({e['path']})"
    return (
        f"{where}: {e.get('reason_code', '?')}, {_ms(e.get('switch_latency_ms'))}, "
        f"epoch {e.get('binding_epoch', '?')}"
    )


def _switch_denied(e: Event) -> str:
    target = e.get("requested_transport")
    text = f"switch to {'-' if target is None else f'path {target}'} denied: "
    text += str(e.get("reason_code", "?"))
    if e.get("retry_after_ms") is not None:
        text += f" (retry in {duration(float(e['retry_after_ms']) / 1000)})"
    return text + (" [operator]" if e.get("manual") else "")


def _dead(e: Event) -> str:
    reason = e.get("reason_code")
    if reason and reason != "transport_dead":  # the kernel's word (link_down), not silence
        return f"{_path(e)} dead: {reason}: {e.get('detail') or '-'}"
    return f"{_path(e)} dead after {_ms(e.get('silence_ms'))} of silence"


def _path_added(e: Event) -> str:
    where = " ".join(x for x in (e.get("interface"), e.get("address")) if x)
    return f"{_path(e)} added" + (f" ({where})" if where else "")


def _path_removed(e: Event) -> str:
    return f"{_path(e)} removed" + (f": {e['detail']}" if e.get("detail") else "")


def _reattach_attempt(e: Event) -> str:
    return (
        f"reattach ({e.get('kind', '?')}) on path {e.get('candidate_transport', '?')}, "
        f"nonce {e.get('nonce', '?')}, expects epoch {e.get('expected_epoch', '?')}"
    )


def _reattach_result(e: Event) -> str:
    where = _path(e, "candidate_transport")
    fatal = " (fatal)" if e.get("fatal") else ""
    return f"reattach {e.get('status', '?')} on {where}: {e.get('reason_code', '?')}{fatal}"


def _validated(e: Event) -> str:
    return f"{_path(e)} validated"


def _health(e: Event) -> str:
    alive = "alive" if e.get("alive") else "DEAD"
    loss = e.get("loss_ratio")
    loss_text = f"{loss * 100:.1f}%" if isinstance(loss, int | float) else "-"
    return (
        f"{_path(e)} {alive}, {e.get('classification', '?')}, rtt {_ms(e.get('rtt_ms'))}, "
        f"loss {loss_text}, score {e.get('score', 0):.2f}"
    )


def _peer(e: Event) -> str:
    return (
        f"peer reports {e.get('peer_state', '?')} v{e.get('peer_state_version', '?')}, "
        f"epoch {e.get('binding_epoch', '?')}"
    )


def _security(e: Event) -> str:
    text = f"{e.get('violation_type', '?')}: {e.get('reason_code', '?')}"
    if (e.get("count") or 1) > 1:
        text += f" x{e['count']}"
    if e.get("source"):
        text += f" from {e['source']}"
    if e.get("key_fingerprint"):
        text += f" key {e['key_fingerprint']}"
    return text


def _policy(e: Event) -> str:
    text = f"{e.get('policy_name', '?')}: {e.get('reason_code', '?')}"
    if e.get("detail"):
        text += f": {e['detail']}"
    return text + f" (policy {e.get('policy_version', '?')})"


def _diagnostic(e: Event) -> str:
    return f"{e.get('reason_code', '?')}: {e.get('detail', '')}"


def _rotated(e: Event) -> str:
    return f"keys rotated to phase {e.get('key_phase', '?')} ({e.get('initiator', '?')}, " + (
        f"{e.get('reason_code', '?')})"
    )


def _drops(e: Event) -> str:
    pairs = e.get("counts") or []
    shown = ", ".join(f"{name} {n}" for name, n in pairs) or "none"
    return f"dropped {shown} (total {e.get('total', '?')})"


def _terminated(e: Event) -> str:
    age = e.get("session_age_ms")
    text = f"session ended: {e.get('reason_code', '?')}"
    if isinstance(age, int | float):
        text += f" after {duration(age / 1000)}"
    text += f", {e.get('total_switches', 0)} switches, by {e.get('initiator', '?')}"
    if e.get("handshake_failure"):
        text += f" ({e['handshake_failure']})"
    return text


def _linked(e: Event) -> str:
    inner = e.get("inner_address", "?")
    if e.get("inner_address6"):
        inner = f"{inner} and {e['inner_address6']}"
    return (
        f"new session, continues {str(e.get('previous_session_id') or '?')[:8]} "
        f"({e.get('reason_code', '?')}), inner address {inner} kept"
    )


def _loss(e: Event) -> str:
    return (
        f"sink {e.get('sink', '?')} lost {e.get('dropped', '?')} events "
        f"(total {e.get('dropped_total', '?')}): {e.get('reason', '?')}"
    )


def _sink_health(e: Event) -> str:
    error = e.get("last_error")
    why = f": {error}" if error and e.get("state") != "ok" else ""
    return (
        f"sink {e.get('sink', '?')} {e.get('state', '?')} (was {e.get('previous_state', '?')}, "
        f"{e.get('dropped_total', '?')} lost){why}"
    )


_OWNER_VERBS: Final = {
    "SESSION_OWNER_ACQUIRED": ("owns the session", "from"),
    "SESSION_OWNER_TRANSFERRED": ("session moved", "peer"),
    "SESSION_OWNER_REJECTED": ("move refused", "held by"),
    "SESSION_OWNER_CONFLICT": ("move lost the race", "to"),
    "SESSION_OWNER_RELEASED": ("no longer owns the session", "to"),
}


def _owner(e: Event) -> str:
    """A cluster node's ownership change (docs/cluster.md)."""
    verb, peer_word = _OWNER_VERBS.get(str(e.get("event_type")), ("ownership", "peer"))
    text = f"node {e.get('node_id', '?')} {verb}, owner epoch {e.get('owner_epoch', '?')}"
    if e.get("peer_node"):
        text += f", {peer_word} {e['peer_node']}"
    if e.get("reason_code"):
        text += f": {e['reason_code']}"
    if e.get("forwarded"):
        text += f" ({e['forwarded']} packets forwarded)"
    return text


RENDERERS: Final[dict[EventType, Callable[[Event], str]]] = {
    EventType.STATE_CHANGE: _state_change,
    EventType.SESSION_CREATED: _created,
    EventType.TRANSPORT_ATTACHED: _attached,
    EventType.TRANSPORT_SWITCH: _switch,
    EventType.TRANSPORT_SWITCH_DENIED: _switch_denied,
    EventType.TRANSPORT_DEAD: _dead,
    EventType.REATTACH_ATTEMPT: _reattach_attempt,
    EventType.REATTACH_RESULT: _reattach_result,
    EventType.PATH_VALIDATED: _validated,
    EventType.PATH_HEALTH: _health,
    EventType.PEER_STATE: _peer,
    EventType.SECURITY_EVENT: _security,
    EventType.POLICY_EVENT: _policy,
    EventType.DIAGNOSTIC: _diagnostic,
    EventType.KEY_ROTATED: _rotated,
    EventType.DROP_SUMMARY: _drops,
    EventType.SESSION_TERMINATED: _terminated,
    EventType.EVENT_LOSS: _loss,
    EventType.PATH_ADDED: _path_added,
    EventType.PATH_REMOVED: _path_removed,
    EventType.SINK_HEALTH: _sink_health,
    EventType.SESSION_LINKED: _linked,
    EventType.SESSION_OWNER_ACQUIRED: _owner,
    EventType.SESSION_OWNER_TRANSFERRED: _owner,
    EventType.SESSION_OWNER_REJECTED: _owner,
    EventType.SESSION_OWNER_CONFLICT: _owner,
    EventType.SESSION_OWNER_RELEASED: _owner,
}
"""How each event type reads; every EventType has one."""


def _generic(e: Event) -> str:
    skip = {"event_type", "ts_ms", "session_id", "node_id", "policy_version", "state_version"}
    return " ".join(f"{k}={v}" for k, v in e.items() if k not in skip)


def event_line(event: Event) -> str:
    """One event as one line (an unknown type: its fields as ``key=value``)."""
    kind = str(event.get("event_type", "?"))
    try:
        render = RENDERERS[EventType(kind)]
    except ValueError:
        render = _generic
    try:
        what = render(event)
    except (TypeError, ValueError, KeyError):  # a field of an unexpected type: show it raw
        what = _generic(event)
    ts = event.get("ts_ms")
    clock = "--:--:--.---"
    if isinstance(ts, int | float):
        clock = time.strftime("%H:%M:%S", time.localtime(ts / 1000)) + f".{int(ts) % 1000:03d}"
    sid = str(event.get("session_id") or "")[:8] or "-"
    return f"{clock}  {sid:<8}  {kind:<23}  {what}"


def loss_line(lost: int) -> str:
    """What a watcher prints when it read too slowly and lost messages."""
    return f"-- {lost} messages lost: this watch read too slowly (jvpn status shows the state)"
