"""Small text helpers of the ``jvpn`` command: sizes, durations, aligned tables, colour.

Colour is used only when the output is a terminal and ``NO_COLOR`` is not set; piped
output is plain text.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import IO, Final

_UNITS: Final = ("B", "KiB", "MiB", "GiB", "TiB")

_CODES: Final = {"bold": "1", "green": "32", "yellow": "33", "red": "31", "dim": "2"}


def size(n: float) -> str:
    """``512 B``, ``1.2 KiB``, ``3.4 MiB``."""
    value = float(n)
    for unit in _UNITS:
        if value < 1024 or unit == _UNITS[-1]:
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} {_UNITS[-1]}"  # pragma: no cover - the loop always returns


def duration(seconds: float) -> str:
    """``850ms``, ``42s``, ``12m03s``, ``3h07m``, ``2d04h``."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def rate(bits_per_s: float) -> str:
    """``0 bit/s``, ``12.3 kbit/s``, ``4.5 Mbit/s``."""
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits_per_s >= scale:
            return f"{bits_per_s / scale:.1f} {unit}"
    return f"{int(bits_per_s)} bit/s"


def plural(n: int, word: str, many: str | None = None) -> str:
    return f"{n} {word if n == 1 else many or word + 's'}"


def counts(pairs: Sequence[tuple[str, int]]) -> str:
    """``replay_detected 3, too_old 1``, or ``none``."""
    shown = [f"{name} {n}" for name, n in pairs if n]
    return ", ".join(shown) if shown else "none"


class Style:
    """ANSI styling, or none (not a terminal, or NO_COLOR set)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    @classmethod
    def for_stream(cls, stream: IO[str], environ: Mapping[str, str] | None = None) -> Style:
        env = os.environ if environ is None else environ
        isatty = getattr(stream, "isatty", None)
        tty = bool(isatty()) if callable(isatty) else False
        return cls(tty and not env.get("NO_COLOR") and env.get("TERM") != "dumb")

    def __call__(self, text: str, *styles: str) -> str:
        if not self.enabled or not styles:
            return text
        codes = ";".join(_CODES[s] for s in styles)
        return f"\x1b[{codes}m{text}\x1b[0m"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    """Left-aligned columns two spaces apart (no trailing blanks)."""
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    out = []
    for row in (header, *rows):
        cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=True)]
        out.append((indent + "  ".join(cells)).rstrip())
    return out


def fields(pairs: Sequence[tuple[str, str]], indent: str = "  ") -> list[str]:
    """``key: value`` lines, values aligned (as ``wg show`` prints them)."""
    width = max((len(k) for k, _ in pairs), default=0) + 1
    return [f"{indent}{(k + ':').ljust(width)} {v}" for k, v in pairs]
