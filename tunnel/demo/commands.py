"""The demo's command: what the demo keys of jvpn-tui send to the engine.

:class:`DemoImpair` is an :class:`tunnel.api.ExtensionCommand`: the client engine only
routes it to its plug-in (``tunnel.demo.scenario.DemoPlugin``). An engine without the demo
plug-in answers it with a DIAGNOSTIC saying it is not running ``--demo``. This module is
light on purpose: the UI imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from tunnel.api import ExtensionCommand


class DemoAction(StrEnum):
    """What a :class:`DemoImpair` does to a path's impairment relay."""

    KILL = "kill"
    """Blackhole the path both ways."""
    RESTORE = "restore"
    """Clear every impairment of the path."""
    LOSS = "loss"
    """Loss ratio ``value`` (0..1) both ways."""
    REBIND = "rebind"
    """A NAT rebinding: the relay sends from a new source port."""
    REPLAY = "replay"
    """Re-send the datagrams captured on the path from another address."""
    SCRIPT = "script"
    """Play the demo's scripted timeline (``path_id`` ignored, 0 by convention)."""


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
