"""The help screen: the keys that apply now (after the keymap), what each does, its id.

Binding ids are shown whole (a keymap needs them exactly); the descriptions wrap at word
boundaries instead. The screen says how to close it, and scrolls when the terminal is
short.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

CLOSE_HINT = "Esc, q or ? closes this list; ↑ ↓ PgUp PgDn scroll it."


def key_table(rows: Sequence[tuple[str, str, str]]) -> Table:
    """``(keys, what it does, binding id)`` rows as a table whose ids are never cut."""
    table = Table(box=None, expand=True, padding=(0, 1), show_edge=False, header_style="bold")
    table.add_column("Key", no_wrap=True)
    table.add_column("Action", ratio=1, overflow="fold")
    table.add_column("Binding id", no_wrap=True)
    for key, description, binding_id in rows:
        table.add_row(Text(key, style="bold"), Text(description), Text(binding_id))
    return table


class HelpScreen(ModalScreen[None]):
    """Lists ``(key, action description, binding id)`` rows; any of q/escape/? closes."""

    BINDINGS = [Binding("escape,q,question_mark", "close", "Close", id="jvpn.help.close")]

    def __init__(self, rows: Sequence[tuple[str, str, str]]) -> None:
        super().__init__()
        self.rows = list(rows)

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help"):
            yield Static(
                "[b]jvpn-tui keys[/b] (the ones that apply now)\n"
                "[$text-muted]Remap with --keymap FILE or the \\[keymap] table of the client "
                "config: binding id = keys. ctrl+p opens the command palette.[/]\n"
                f"[$text-accent]{CLOSE_HINT}[/]",
                id="help-title",
            )
            yield Static(key_table(self.rows), id="help-table")

    def on_mount(self) -> None:
        self.query_one("#help", VerticalScroll).focus()

    def action_close(self) -> None:
        self.dismiss(None)
