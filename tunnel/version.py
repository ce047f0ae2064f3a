"""The installed jvpn version, for every program's ``--version``."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    """The version of the installed ``jvpn`` distribution (pyproject.toml's), or a note
    that it is not installed (run from a source tree, as ``make demo`` does)."""
    try:
        return version("jvpn")
    except PackageNotFoundError:
        return "unknown (not installed: running from a source tree)"
