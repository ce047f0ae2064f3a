"""jvpn-tui colour themes and stylesheet (package data: ``*.tcss``).

``jvpn.tcss`` is the stylesheet of the app; it names colours only through theme
variables (``$primary``, ``$success``, ...). Each palette file (``dark.tcss``,
``light.tcss``, ``high-contrast.tcss``) is a list of TCSS variable declarations,
``$name: value;``, that :func:`load_palette` reads; ``jvpn_tui.theming`` turns them into
Textual ``Theme`` objects. This module imports nothing from Textual.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

THEME_DIR: Final = Path(__file__).resolve().parent
"""Where the .tcss files live (inside the installed package)."""

STYLESHEET: Final = THEME_DIR / "jvpn.tcss"
"""The app's stylesheet: layout and colours through theme variables only."""

PALETTES: Final = ("dark", "light", "high-contrast")
"""Palette names, each a ``<name>.tcss`` file in :data:`THEME_DIR`."""

_DECL = re.compile(r"^\s*\$([a-z][a-z0-9-]*)\s*:\s*([^;]+?)\s*;\s*(?:/\*.*\*/)?\s*$")
_COMMENT = re.compile(r"/\*.*?\*/", re.DOTALL)


class PaletteError(ValueError):
    """A palette file is missing or has a line that is not ``$name: value;``."""


def load_palette(name: str) -> dict[str, str]:
    """The ``$name: value`` declarations of palette ``name``, in file order."""
    if name not in PALETTES:
        raise PaletteError(f"unknown theme {name!r} (known: {', '.join(PALETTES)})")
    path = THEME_DIR / f"{name}.tcss"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PaletteError(f"cannot read {path}: {exc.strerror}") from exc
    out: dict[str, str] = {}
    for lineno, line in enumerate(_COMMENT.sub("", text).splitlines(), 1):
        if not line.strip():
            continue
        m = _DECL.match(line)
        if m is None:
            raise PaletteError(f"{path.name}:{lineno}: expected '$name: value;', got {line!r}")
        out[m.group(1)] = m.group(2)
    return out
