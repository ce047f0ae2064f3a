"""Textual ``Theme`` objects built from the palettes in ``themes/`` (one per palette)."""

from __future__ import annotations

from typing import Final

from textual.theme import Theme

from themes import PALETTES, PaletteError, load_palette

THEME_PREFIX: Final = "jvpn-"
"""Registered theme name = prefix + palette name (``jvpn-dark``...)."""

_COLOUR_KEYS: Final = (
    "primary", "secondary", "warning", "error", "success", "accent",
    "foreground", "background", "surface", "panel",
)  # fmt: skip


def theme_name(palette: str) -> str:
    """``dark`` -> ``jvpn-dark`` (the name the app registers it under)."""
    return THEME_PREFIX + palette


def build_theme(palette: str) -> Theme:
    """The Textual theme of one palette file. Raises :class:`PaletteError`."""
    decls = load_palette(palette)
    if "primary" not in decls:
        raise PaletteError(f"{palette}.tcss declares no $primary")
    dark = decls.get("dark", "true").lower()
    if dark not in ("true", "false"):
        raise PaletteError(f"{palette}.tcss: $dark must be true or false, got {dark!r}")
    extra = {k: v for k, v in decls.items() if k not in _COLOUR_KEYS and k != "dark"}
    return Theme(
        name=theme_name(palette), primary=decls["primary"], secondary=decls.get("secondary"),
        warning=decls.get("warning"), error=decls.get("error"), success=decls.get("success"),
        accent=decls.get("accent"), foreground=decls.get("foreground"),
        background=decls.get("background"), surface=decls.get("surface"),
        panel=decls.get("panel"), dark=dark == "true", variables=extra,
    )  # fmt: skip


def all_themes() -> list[Theme]:
    """Every jvpn theme, in :data:`themes.PALETTES` order."""
    return [build_theme(p) for p in PALETTES]
