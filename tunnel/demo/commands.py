"""The demo's command, and the words of its answers: what the demo keys of jvpn-tui send
to the engine, and how the UI tells a script caption from an action's outcome.

:class:`DemoImpair` is an :class:`tunnel.api.ExtensionCommand`: the client engine only
routes it to its plug-in (``tunnel.demo.scenario.DemoPlugin``). An engine without the demo
plug-in answers it with a DIAGNOSTIC saying it is not running ``--demo``.

The demo answers through the ordinary event stream: every answer is a DIAGNOSTIC whose
``detail`` starts with ``demo:``. The script's progress reads ``demo: step n/N at t s:
what — expect …`` or ``demo: script <status>: …`` (:func:`step_detail`,
:func:`script_detail`); :func:`caption_of` turns either into a :class:`Caption` (the UI's
caption bar). Anything else that starts ``demo:`` is the outcome of one action (a key or a
step): :func:`outcome_of` gives its text (the UI confirms it on screen). The format lives
here only, used by both sides. This module is light on purpose: the UI imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from tunnel.api import ExtensionCommand

DETAIL_PREFIX: Final = "demo: "
"""Every DIAGNOSTIC ``detail`` of the demo starts with this."""
ALL_PATHS: Final = 0
"""``path_id`` of a :class:`DemoImpair` that acts on every path (``restore``) or on none
(``script``, ``play_pause``)."""


class DemoAction(StrEnum):
    """What a :class:`DemoImpair` does to a path's impairment relay, or to the script."""

    KILL = "kill"
    """Blackhole the path both ways."""
    RESTORE = "restore"
    """Clear every impairment of the path (of every path: ``path_id`` :data:`ALL_PATHS`)."""
    LOSS = "loss"
    """Loss ratio ``value`` (0..1) both ways."""
    REBIND = "rebind"
    """A NAT rebinding: the relay sends from a new source port."""
    REPLAY = "replay"
    """Re-send the datagrams captured on the path from another address."""
    SCRIPT = "script"
    """Play the demo's scripted timeline from its start (``path_id`` ignored)."""
    PLAY_PAUSE = "play_pause"
    """The play key: pause a playing script, resume a paused one, play a finished (or never
    played) one from its start (``path_id`` ignored)."""


@dataclass(frozen=True, slots=True)
class DemoImpair(ExtensionCommand):
    """Demo only: impair a path in the embedded relay (see :class:`DemoAction`)."""

    path_id: int
    """The path whose relay is impaired."""
    action: DemoAction
    """What to do to it."""
    value: float = 0.0
    """The action's value (the loss ratio for ``loss``)."""

    def ignored(self) -> str:
        return f"demo impairment {str(self.action)!r} ignored: not running --demo"


class ScriptStatus(StrEnum):
    """Where the demo script is."""

    PLAYING = "playing"
    """Its steps run on their timers."""
    PAUSED = "paused"
    """Stopped between two steps (the play key resumes it)."""
    FINISHED = "finished"
    """Every step ran and the paths settled (the play key plays it again)."""


@dataclass(frozen=True, slots=True)
class Caption:
    """What the script is doing, as the UI's caption bar shows it."""

    status: ScriptStatus
    """Playing, paused or finished."""
    text: str
    """``step n/N at t s: what happens — expect …``, or what the script status line says."""


_STEP: Final = DETAIL_PREFIX + "step "
_SCRIPT: Final = DETAIL_PREFIX + "script "
_STATUSES: Final = frozenset(s.value for s in ScriptStatus)


def step_detail(n: int, total: int, at_s: float, what: str, expect: str) -> str:
    """The DIAGNOSTIC detail announcing step ``n`` of ``total``."""
    return f"{_STEP}{n}/{total} at {at_s:g} s: {what} — expect {expect}"


def script_detail(status: ScriptStatus, text: str) -> str:
    """The DIAGNOSTIC detail saying the script is now ``status``."""
    return f"{_SCRIPT}{status}: {text}"


def caption_of(detail: object) -> Caption | None:
    """The caption a demo DIAGNOSTIC ``detail`` carries (None: it is not one)."""
    if not isinstance(detail, str):
        return None
    if detail.startswith(_STEP):
        return Caption(ScriptStatus.PLAYING, detail.removeprefix(DETAIL_PREFIX))
    if detail.startswith(_SCRIPT):
        status, sep, text = detail.removeprefix(_SCRIPT).partition(": ")
        if sep and status in _STATUSES:
            return Caption(ScriptStatus(status), text)
    return None


def outcome_of(detail: object) -> str | None:
    """The text of a demo action's outcome (None: not a demo detail, or a caption)."""
    if not isinstance(detail, str) or not detail.startswith(DETAIL_PREFIX):
        return None
    if caption_of(detail) is not None:
        return None
    return detail.removeprefix(DETAIL_PREFIX)
