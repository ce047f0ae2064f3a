"""Formatting shared by the widgets: durations, rates, timestamps, state colours.

Everything returns Textual content markup; colours are theme variables only
(``$success``...), so every theme and ``NO_COLOR`` apply. Timestamps are shown in UTC
so that a picture of the UI does not depend on the machine's time zone.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping
from typing import Final

from textual.markup import escape

STATE_COLOUR: Final = {
    "BIRTH": "$text-secondary",
    "ATTACHED": "$text-success",
    "VOLATILE": "$text-warning",
    "RECOVERING": "$text-accent",
    "DEGRADED": "$text-error",
    "TERMINATED": "$text-error",
}
"""Session state -> theme variable."""

ROLE_COLOUR: Final = {
    "active": "$text-success",
    "switching": "$text-warning",
    "standby": "$foreground",
    "down": "$text-error",
    "unvalidated": "$text-muted",
}

SPARK_BLOCKS: Final = "▁▂▃▄▅▆▇█"

NONE: Final = "\N{EN DASH}"
"""Shown for a value that is not known (yet)."""


def esc(value: object) -> str:
    """``value`` as text that is never read as markup."""
    return escape(str(value))


def state_markup(state: str) -> str:
    colour = STATE_COLOUR.get(state, "$foreground")
    return f"[b {colour}]{esc(state)}[/]"


def duration(seconds: float) -> str:
    """``3723.0`` -> ``1h 02m 03s``; ``95`` -> ``1m 35s``; ``4.2`` -> ``4.2s``."""
    if seconds < 0:
        seconds = 0.0
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = int(seconds)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{h}h {m:02d}m {sec:02d}s"
    if m:
        return f"{m}m {sec:02d}s"
    return f"{sec}s"


def ms(value: object, digits: int = 1) -> str:
    """Milliseconds, or an en dash when unknown."""
    if isinstance(value, int | float):
        return f"{value:.{digits}f} ms"
    return NONE


def rate(bps: float) -> str:
    """Bits per second in the nearest unit."""
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bps >= scale:
            return f"{bps / scale:.1f} {unit}"
    return f"{bps:.0f} bit/s"


def clock(event: Mapping[str, object]) -> str:
    """``ts_ms`` of an event as ``HH:MM:SS.mmm`` (UTC)."""
    ts = event.get("ts_ms")
    if not isinstance(ts, int | float):
        return "--:--:--.---"
    t = _dt.datetime.fromtimestamp(ts / 1000, tz=_dt.UTC)
    return t.strftime("%H:%M:%S.") + f"{t.microsecond // 1000:03d}"


def sparkline(values: tuple[float, ...] | list[float], width: int) -> str:
    """The last ``width`` values as block characters, scaled min..max."""
    data = list(values)[-width:]
    if not data:
        return ""
    lo, hi = min(data), max(data)
    span = hi - lo
    top = len(SPARK_BLOCKS) - 1
    return "".join(
        SPARK_BLOCKS[0 if span <= 0 else round((v - lo) / span * top)] for v in data
    )
