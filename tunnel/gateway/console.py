"""The gateway's console lines (docs/gateway.md): refused handshakes, sessions.

Refused handshakes:

A client the gateway does not know, or one that has another key for this gateway, gets no
answer at all (an answer would tell a stranger who is here), so without these lines the
operator sees nothing but a metric. :class:`RefusalNotices` turns the core's rate-limited
SECURITY_EVENTs of those two kinds into stderr lines, where the gateway's other console
lines go:

    jvpn-gateway: refused a handshake from 192.0.2.7:40112: unknown client key
    SHA256:q2Jk3nW0u7sT9xYb (not in this gateway's [[clients]])

(one line). At most one line per kind, source host and key per ``repeat_s`` seconds; the
core already reports each kind at most once a second, which bounds the lines overall. A
line also says how many refusals were not shown since the previous line of its kind
(folded into the core's reports, or suppressed here), so the lines add up to the metric.
The table of recent sources is bounded (the oldest entry goes first).

Sessions: :class:`SessionNotices` writes one line when a session starts (naming the data
cipher negotiated), switches to another address and ends, rate-limited per client the
same way; and one when a handshake is refused for want of a data cipher in common.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from tunnel.core.events import (
    Event,
    PolicyEvent,
    Reason,
    SecurityEvent,
    SessionCreated,
    SessionLinked,
    SessionTerminated,
    TransportAttached,
    TransportSwitch,
)  # fmt: skip

REPEAT_S: Final = 30.0
"""A source (host and key) gets at most one line of a kind this often."""

MAX_SOURCES: Final = 1024
"""Sources remembered for the rate limit; beyond, the oldest is forgotten (and may get a
line again sooner): a spoofed flood cannot grow the table."""

_KINDS: Final = (Reason.UNKNOWN_CLIENT_KEY, Reason.WRONG_GATEWAY_KEY)


def _host(source: str) -> str:
    """``192.0.2.7`` of ``192.0.2.7:40112``, ``2001:db8::1`` of ``[2001:db8::1]:40112``."""
    host = source.rpartition(":")[0] or source
    return host.removeprefix("[").removesuffix("]")


class RefusalNotices:
    """Rate-limited console lines for refused handshakes; feed it every event."""

    def __init__(
        self,
        write: Callable[[str], None],
        gateway_key: str,
        *,
        repeat_s: float = REPEAT_S,
        max_sources: int = MAX_SOURCES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``write`` takes one line (no newline); ``gateway_key`` is the fingerprint of
        this gateway's public key (named in the wrong-gateway-key line)."""
        self._write = write
        self._gateway_key = gateway_key
        self._repeat_s = repeat_s
        self._max_sources = max_sources
        self._clock = clock
        self._last: OrderedDict[tuple[Reason, str, str], float] = OrderedDict()
        self._unshown: dict[Reason, int] = {}
        self.lines = 0
        """Lines written."""

    def on_event(self, event: Event) -> None:
        if not isinstance(event, SecurityEvent) or event.reason_code not in _KINDS:
            return
        kind = event.reason_code
        key = (kind, _host(event.source), event.key_fingerprint)
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._repeat_s:
            self._unshown[kind] = self._unshown.get(kind, 0) + event.count
            return
        self._remember(key, now)
        unshown = self._unshown.pop(kind, 0) + event.count - 1
        self._write(self._line(event, unshown))
        self.lines += 1

    def _remember(self, key: tuple[Reason, str, str], now: float) -> None:
        self._last[key] = now
        self._last.move_to_end(key)
        while len(self._last) > self._max_sources:
            self._last.popitem(last=False)

    def _line(self, event: SecurityEvent, unshown: int) -> str:
        if event.reason_code is Reason.UNKNOWN_CLIENT_KEY:
            what = (
                f"unknown client key {event.key_fingerprint or '?'} "
                "(not in this gateway's [[clients]])"
            )
        else:
            what = (
                "it is for another gateway key (mac1 does not match this gateway's key "
                f"{self._gateway_key}: the client's gateway_public_key is wrong, or a scan)"
            )
        more = f"; {unshown} more not shown since the previous such line" if unshown else ""
        return f"jvpn-gateway: refused a handshake from {event.source}: {what}{more}"


SESSION_REPEAT_S: Final = 10.0
"""A client gets at most one line of a kind (start, switch, end) this often."""

MAX_SESSIONS: Final = 4096
"""Sessions remembered for their lines (client, address); beyond, the oldest is forgotten
(its later lines then say ``?`` for what was forgotten)."""


@dataclass(slots=True)
class _Seen:
    """What the lines of one session need to remember."""

    client: str
    inner: str
    address: str = "?"
    started: bool = False
    continues: str = ""
    """The session this one continues (SESSION_LINKED: the gateway had lost it)."""
    cipher: str = ""


class SessionNotices:
    """Rate-limited console lines when a session starts, switches and ends (docs/gateway.md).

    ::

        jvpn-gateway: session 3fa2c1d0 started: alice 10.66.0.2 from 192.0.2.7:40112
            (path 1)
        jvpn-gateway: session 3fa2c1d0 (alice) switched 192.0.2.7:40112 ->
            198.51.100.4:5555 (path 1 -> 2): manual_switch
        jvpn-gateway: session 3fa2c1d0 (alice) ended: operator_terminated after 12m03s,
            1 switch

    (one line each; the first 8 hex digits of the session id). At most one line per kind
    and client every ``repeat_s`` seconds; the next line of that kind for that client says
    how many were not shown. Feed it every event.
    """

    def __init__(
        self,
        write: Callable[[str], None],
        *,
        repeat_s: float = SESSION_REPEAT_S,
        max_sessions: int = MAX_SESSIONS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._write = write
        self._repeat_s = repeat_s
        self._max_sessions = max_sessions
        self._clock = clock
        self._sessions: OrderedDict[str, _Seen] = OrderedDict()
        self._last: dict[tuple[str, str], float] = {}
        self._unshown: dict[tuple[str, str], int] = {}
        self.lines = 0
        """Lines written."""

    def on_event(self, event: Event) -> None:
        if isinstance(event, SessionCreated):
            self._remember(
                event.session_id, _Seen(event.peer, event.inner_address, cipher=event.cipher)
            )
        elif isinstance(event, SessionLinked):
            seen: _Seen = self._seen(event.session_id)
            seen.continues = event.previous_session_id
        elif isinstance(event, TransportAttached):
            self._attached(event)
        elif isinstance(event, TransportSwitch):
            self._switched(event)
        elif isinstance(event, SessionTerminated):
            self._ended(event)
        elif isinstance(event, PolicyEvent) and event.reason_code is Reason.CIPHER_MISMATCH:
            self._refused(event.detail)

    def _remember(self, sid: str, seen: _Seen) -> None:
        self._sessions[sid] = seen
        self._sessions.move_to_end(sid)
        while len(self._sessions) > self._max_sessions:
            self._sessions.popitem(last=False)

    def _seen(self, sid: str) -> _Seen:
        seen = self._sessions.get(sid)
        return seen if seen is not None else _Seen("?", "?")

    def _attached(self, event: TransportAttached) -> None:
        seen: _Seen | None = self._sessions.get(event.session_id)
        if seen is None:
            return
        seen.address = event.path
        if seen.started:
            return
        seen.started = True
        path = f" (path {event.transport_id})" if event.transport_id >= 0 else ""
        cipher = f", {seen.cipher}" if seen.cipher else ""
        what = f"started: {seen.client} {seen.inner} from {event.path}{path}{cipher}"
        if seen.continues:
            what += f", continues {seen.continues[:8]} (this gateway had lost it)"
        self._line("start", event.session_id, seen, what)

    def _switched(self, event: TransportSwitch) -> None:
        seen: _Seen = self._seen(event.session_id)
        old, seen.address = seen.address, event.path
        before = "?" if event.previous_transport is None else str(event.previous_transport)
        what = (
            f"({seen.client}) switched {old} -> {event.path} "
            f"(path {before} -> {event.new_transport}): {event.reason_code}"
        )
        self._line("switch", event.session_id, seen, what)

    def _ended(self, event: SessionTerminated) -> None:
        seen = self._seen(event.session_id)
        self._sessions.pop(event.session_id, None)
        n = event.total_switches
        what = (
            f"({seen.client}) ended: {event.reason_code} after "
            f"{duration(event.session_age_ms / 1000)}, {n} switch{'' if n == 1 else 'es'}"
        )
        self._line("end", event.session_id, seen, what)

    def _refused(self, detail: str) -> None:
        """``jvpn-gateway: refused a handshake: alice from 192.0.2.7:40112: no data cipher
        in common: ...`` (the PolicyEvent's detail), at most one every ``repeat_s``."""
        self._line("refused", "", _Seen("", ""), detail, head="refused a handshake:")

    def _line(self, kind: str, sid: str, seen: _Seen, what: str, head: str | None = None) -> None:
        key = (kind, seen.client)
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._repeat_s:
            self._unshown[key] = self._unshown.get(key, 0) + 1
            return
        self._last[key] = now
        unshown = self._unshown.pop(key, 0)
        more = f"; {unshown} more not shown since the previous such line" if unshown else ""
        head = f"session {sid[:8] or '?'}" if head is None else head
        self._write(f"jvpn-gateway: {head} {what}{more}")
        self.lines += 1


def duration(seconds: float) -> str:
    """``42s``, ``12m03s``, ``3h07m``, ``2d04h``: short and sortable by eye."""
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
