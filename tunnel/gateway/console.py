"""Console lines for handshakes the gateway refuses without an answer (docs/gateway.md).

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
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

from tunnel.core.events import Event, Reason, SecurityEvent

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
