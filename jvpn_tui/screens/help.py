"""The help screen: every key binding (after the keymap), what it does and its id."""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Static


class HelpScreen(ModalScreen[None]):
    """Lists ``(key, action description, binding id)`` rows; any of q/escape/? closes."""

    BINDINGS = [Binding("escape,q,question_mark", "close", "Close", id="jvpn.help.close")]

    def __init__(self, rows: Sequence[tuple[str, str, str]]) -> None:
        super().__init__()
        self.rows = list(rows)

    def compose(self) -> ComposeResult:
        with Vertical(id="help"):
            yield Static(
                "[b]jvpn-tui keys[/b]  [$text-muted]remap with --keymap FILE "
                "(\\[keymap] table: binding id = keys); ctrl+p opens the command palette[/]",
                id="help-title",
            )
            table: DataTable[Text] = DataTable(id="help-table", cursor_type="none")
            table.add_columns("Key", "Action", "Binding id")
            for key, description, binding_id in self.rows:
                table.add_row(Text(key, style="bold"), Text(description), Text(binding_id))
            yield table

    def action_close(self) -> None:
        self.dismiss(None)
