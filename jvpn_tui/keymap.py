"""Key bindings: ids, default keys, help texts; and the user's keymap file.

Every binding of the main screen has an id (``jvpn.<name>``). A keymap file remaps them
by id (Textual keymaps), e.g.::

    [keymap]
    "jvpn.terminate" = "T"
    "jvpn.switch-1" = "f1,1"

This module does not import Textual, so the command line can check a keymap file
before anything else starts.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Final


@dataclass(frozen=True, slots=True)
class KeySpec:
    """One binding of the main screen."""

    id: str
    key: str
    """Default key(s), Textual names, comma separated."""
    action: str
    """Textual action string."""
    label: str
    """Short footer label."""
    help: str
    """What it does (help screen, command palette)."""
    show: bool = True
    """Shown in the footer."""
    demo: bool = False
    """Only available when the engine is the embedded demo."""
    page: bool = False
    """Shows one page of the compact layout (only below the size that fits every panel)."""


KEYS: Final[tuple[KeySpec, ...]] = (
    *(
        KeySpec(f"jvpn.switch-{n}", str(n), f"switch({n})", f"Path {n}",
                f"Switch the session to path {n}", show=False)
        for n in range(1, 10)
    ),
    KeySpec("jvpn.auto-switch", "a", "toggle_auto", "Auto",
            "Turn automatic (health-driven) switching on or off"),
    KeySpec("jvpn.reattach", "r", "reattach", "Reattach",
            "Force a reattach on the active path"),
    KeySpec("jvpn.reload-policy", "p", "reload_policy", "Policy",
            "Reload the policy file (an invalid one keeps the current policy)"),
    KeySpec("jvpn.terminate", "t", "terminate", "Terminate",
            "Terminate the session (asks first)"),
    KeySpec("jvpn.help", "question_mark", "help", "Help", "Show this list of keys"),
    # before jvpn.quit: of the bindings of one key, the first one enabled takes it
    KeySpec("jvpn.detach", "q", "detach", "Detach",
            "Attached UI: detach (the client runs on and its tunnel stays up)"),
    KeySpec("jvpn.quit", "q", "quit", "Quit", "Stop the engine and quit"),
    KeySpec("jvpn.demo.play", "g", "demo('play_pause')", "Play/pause",
            "Demo: pause / resume the demo script (replay it once it finished)", demo=True),
    KeySpec("jvpn.demo.kill", "k", "demo('kill')", "Kill",
            "Demo: blackhole the active path", demo=True),
    KeySpec("jvpn.demo.restore", "u", "demo('restore')", "Restore",
            "Demo: restore every path (clear all impairments)", demo=True),
    KeySpec("jvpn.demo.loss", "l", "demo('loss')", "Loss",
            "Demo: inject 30% loss on the active path", demo=True),
    KeySpec("jvpn.demo.replay", "x", "demo('replay')", "Replay",
            "Demo: replay captured packets from another address", demo=True),
    KeySpec("jvpn.demo.rebind", "b", "demo('rebind')", "Rebind",
            "Demo: NAT rebinding of the active path (new source port)", demo=True),
    *(
        KeySpec(f"jvpn.page.{name}", key, f"page('{name}')", label,
                f"Show the {label} page ({what})", show=False, page=True)
        for name, key, label, what in (
            ("overview", "o", "Overview", "session, switching, transports"),
            ("trends", "c", "Trends", "RTT, loss and traffic charts"),
            ("timeline", "e", "Timeline", "switch timeline"),
            ("security", "s", "Security", "security events and drops"),
            ("observability", "h", "Observability", "event pipeline and traffic"),
        )
    ),
)  # fmt: skip

PAGES: Final = tuple(k.id.removeprefix("jvpn.page.") for k in KEYS if k.page)
"""The pages of the compact layout, in tab order."""

FOOTER_PRIORITY: Final = (
    "jvpn.help", "jvpn.quit", "jvpn.detach",
    "jvpn.demo.play", "jvpn.demo.kill", "jvpn.demo.loss", "jvpn.demo.restore",
    "jvpn.demo.replay", "jvpn.demo.rebind",
    "jvpn.auto-switch", "jvpn.terminate", "jvpn.reattach", "jvpn.reload-policy",
)  # fmt: skip
"""Footer keys, most important first: on a narrow terminal the footer keeps as many as fit,
whole, in this order (the help screen and the palette always list them all)."""

BINDING_IDS: Final = frozenset(k.id for k in KEYS)


class KeymapError(ValueError):
    """The keymap file cannot be read or names an unknown binding id."""


def check_keymap(keymap: dict[str, object]) -> dict[str, str]:
    """Validate ``binding id -> keys``; raise :class:`KeymapError` naming the bad entry."""
    out: dict[str, str] = {}
    for binding_id, keys in keymap.items():
        if binding_id not in BINDING_IDS:
            known = ", ".join(sorted(BINDING_IDS))
            raise KeymapError(f"unknown binding id {binding_id!r} (known: {known})")
        if not isinstance(keys, str) or not keys.strip():
            raise KeymapError(f"{binding_id}: keys must be a non-empty string like 'f1,1'")
        out[binding_id] = keys.replace(" ", "")
    return out


def load_keymap(path: str | Path) -> dict[str, str]:
    """Read the ``[keymap]`` table of a TOML file."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise KeymapError(f"cannot read keymap {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise KeymapError(f"keymap {path} is not valid TOML: {exc}") from exc
    table = data.get("keymap")
    if not isinstance(table, dict):
        raise KeymapError(f"keymap {path} has no [keymap] table")
    return check_keymap(table)
