"""Modal screens: the help screen and the confirmation dialog."""

from jvpn_tui.screens.confirm import ConfirmScreen
from jvpn_tui.screens.help import HelpScreen

__all__ = ["ConfirmScreen", "HelpScreen"]
