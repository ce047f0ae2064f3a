"""The ``jvpn`` command's exit status (``--help`` lists them; docs/events.md is generated
from these constants and their docstrings)."""

from __future__ import annotations

from typing import Final

EXIT_OK: Final = 0
"""Done: the status was printed, the command accepted, or the watch ended (Ctrl-C, or the
program stopped)."""
EXIT_REFUSED: Final = 1
"""The program refused the command (the reason is on stderr), e.g. ``switch`` on a gateway,
an unknown session, an invalid policy at ``reload``."""
EXIT_USAGE: Final = 2
"""Bad command line (an unknown or abbreviated option, a missing or bad argument)."""
EXIT_UNREACHABLE: Final = 3
"""The control socket cannot be used: no program listens there, permission denied (the
socket is for root, or the user that started the program), another protocol version, or
the program went away mid-conversation."""
