"""Transports table: one row per candidate path, with an RTT sparkline."""

from __future__ import annotations

from typing import Final, Self

from rich.text import Text
from textual.geometry import Region
from textual.message import Message
from textual.widgets import DataTable

from jvpn_tui.widgets.format import NONE, ROLE_COLOUR, sparkline
from tunnel.api import EngineSnapshot, PathView

SPARK_WIDTH: Final = 18
"""RTT samples drawn in the sparkline column (at most)."""

ROLES: Final = ("active", "switching", "standby", "down", "unvalidated")
"""Every role the engine reports; the Role column is as wide as the longest (no cut word)."""

COLUMNS: Final = (
    ("id", "#", 3), ("path", "Path", 18), ("role", "Role", max(map(len, ROLES))),
    ("rtt", "RTT", 9), ("loss", "Loss", 4), ("dir", "↑ / ↓", 9), ("jitter", "Jitter", 8),
    ("score", "Score", 6), ("spark", "RTT history", SPARK_WIDTH),
)  # fmt: skip
"""(key, label, width) in display order, each as wide as its widest value (``1234.5 ms``,
``100 / 100``, ``100.00``), so no value is cut; the path's width is its minimum (a longer
label wraps at spaces onto a second line), the sparkline's its maximum."""

KEEP_ORDER: Final = ("rtt", "loss", "dir", "path", "score", "jitter", "spark")
"""Beyond id, path (at its minimum) and role, which are always shown: what the columns'
room is given to, in this order. A narrow table drops the sparkline first, then jitter,
then the score, and wraps a path label that no longer fits on one line."""

CELL_PADDING: Final = 1
"""Cells added on each side of every column (DataTable's ``cell_padding``)."""


def plan_columns(room: int, label_width: int) -> tuple[tuple[str, str, int], ...]:
    """The columns (key, label, width) that fit ``room`` cells, by :data:`KEEP_ORDER`,
    the path column as wide as ``label_width`` (the longest label) when it has room."""
    widths = {key: width for key, _, width in COLUMNS}
    pad = 2 * CELL_PADDING
    shown = {"id": widths["id"], "path": widths["path"], "role": widths["role"]}
    left = room - sum(w + pad for w in shown.values())
    for key in KEEP_ORDER:
        if key == "path":
            grow = max(0, min(label_width - shown["path"], left))
            shown["path"] += grow
            left -= grow
        elif key == "spark":
            if left - pad >= len("RTT history"):
                shown["spark"] = min(widths["spark"], left - pad)
        elif widths[key] + pad <= left:
            shown[key] = widths[key]
            left -= widths[key] + pad
    return tuple((key, label, shown[key]) for key, label, _ in COLUMNS if key in shown)


class TransportsTable(DataTable[Text]):
    """The ``session.paths`` slice. Enter on a row asks for a switch to that path."""

    DEFAULT_CLASSES = "snapshot-view panel"

    _row_update: bool = False
    """True while :meth:`_update_row` updates cells (see :meth:`refresh`); a class default
    because DataTable's own ``__init__`` already refreshes."""

    class SwitchRequested(Message):
        """The user picked a row: switch to ``path_id``."""

        def __init__(self, path_id: int) -> None:
            super().__init__()
            self.path_id = path_id

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(
            id=id, cursor_type="row", zebra_stripes=True, cell_padding=CELL_PADDING
        )
        self._ids: tuple[int, ...] = ()
        self._columns: tuple[tuple[str, str, int], ...] = ()
        """The columns shown (:func:`plan_columns`), set by :meth:`_rebuild`."""
        self._shown: dict[int, tuple[PathView, bool, str]] = {}
        """path id -> what its row was last drawn from (view, is active, theme)."""
        self.last: EngineSnapshot | None = None

    def on_mount(self) -> None:
        self.border_title = "Transports"

    def on_resize(self) -> None:
        if self.last is not None and self._plan(self.last.session.paths) != self._columns:
            self._rebuild(self.last.session.paths, self.last.session.active)

    def _plan(self, paths: tuple[PathView, ...]) -> tuple[tuple[str, str, int], ...]:
        label_width = max((len(p.label) for p in paths), default=0)
        return plan_columns(self.scrollable_content_region.width, label_width)

    @property
    def column_keys(self) -> tuple[str, ...]:
        """The keys of the columns shown (by width: see :func:`plan_columns`)."""
        return tuple(key for key, _, _ in self._columns)

    def _colour(self, variable: str) -> str:
        """A theme variable (``$text-success``) as a Rich colour for this theme."""
        value = self.app.theme_variables.get(variable.lstrip("$"), "")
        return value.split(" ")[0] if value.startswith("#") else ""

    def _cells(self, view: PathView, active: int | None) -> dict[str, Text]:
        st = view.stats
        role_style = self._colour(ROLE_COLOUR.get(view.role, "$foreground"))
        if view.role == "active":
            role_style += " bold"
        bad = self._colour("$text-error")
        warn = self._colour("$text-warning")
        loss_style = bad if st.loss_ratio >= 0.1 else warn if st.loss_ratio > 0 else ""
        one_way = max(st.loss_up, st.loss_down)
        dir_style = bad if one_way >= 0.1 else warn if one_way > 0 else ""
        marker = "▶" if st.path_id == active else " "
        rtt = NONE if st.srtt_ms is None else f"{st.srtt_ms:.1f} ms"
        jitter = NONE if st.srtt_ms is None else f"{st.jitter_ms:.1f} ms"
        spark_style = self._colour("$text-primary") if st.alive else self._colour("$text-muted")
        return {
            "id": Text(f"{marker}{st.path_id}", style="bold" if marker != " " else ""),
            "path": Text(view.label, overflow="fold"),
            "role": Text(view.role, style=role_style.strip()),
            "rtt": Text(rtt, justify="right"),
            # NONE while too few probes lie in the loss window (a standby path's usually)
            "loss": Text(
                f"{st.loss_ratio * 100:.0f}%" if st.loss_known else NONE,
                style=loss_style, justify="right",
            ),
            "dir": Text(
                f"{st.loss_up * 100:.0f} / {st.loss_down * 100:.0f}"
                if st.direction_known else NONE,
                style=dir_style, justify="right",
            ),
            "jitter": Text(jitter, justify="right"),
            "score": Text(f"{st.score:.2f}", justify="right"),
            "spark": Text(sparkline(st.rtt_history, self._spark_width()), style=spark_style),
        }

    def show(self, snapshot: EngineSnapshot) -> None:
        self.last = snapshot
        s = snapshot.session
        ids = tuple(p.stats.path_id for p in s.paths)
        if ids != self._ids or self._plan(s.paths) != self._columns:
            self._rebuild(s.paths, s.active)
        else:
            for view in s.paths:
                self._update_row(view, s.active)
        up = sum(1 for p in s.paths if p.stats.alive)
        subtitle = f"{up}/{len(ids)} answering"
        if self.border_subtitle != subtitle:  # setting it repaints the table, even if equal
            self.border_subtitle = subtitle

    def _rebuild(self, paths: tuple[PathView, ...], active: int | None) -> None:
        """The set of paths changed: every row anew, the cursor kept where it can be."""
        cursor = self.cursor_row
        self.clear(columns=True)
        self._shown.clear()
        self._columns = self._plan(paths)
        for key, label, width in self._columns:
            self.add_column(label, key=key, width=width)
        for view in paths:
            cells = self._cells(view, active)
            self.add_row(
                *(cells[k] for k in self.column_keys), key=str(view.stats.path_id), height=None
            )
            self._shown[view.stats.path_id] = self._row_input(view, active)
        self._ids = tuple(p.stats.path_id for p in paths)
        if paths:
            self.move_cursor(row=min(cursor, len(paths) - 1), animate=False)

    def _row_input(self, view: PathView, active: int | None) -> tuple[PathView, bool, str]:
        return (view, view.stats.path_id == active, self.app.theme)

    def _update_row(self, view: PathView, active: int | None) -> None:
        """Only a row whose input changed is redrawn, and only its changed cells."""
        pid = view.stats.path_id
        shown = self._row_input(view, active)
        if self._shown.get(pid) == shown:
            return
        self._shown[pid] = shown
        row = str(pid)
        changed = False
        self._row_update = True  # each update_cell would repaint the whole table
        try:
            cells = self._cells(view, active)
            for key in self.column_keys:
                cell, old = cells[key], self.get_cell(row, key)
                if old.plain != cell.plain or old.style != cell.style or old.spans != cell.spans:
                    self.update_cell(row, key, cell)
                    changed = True
        finally:
            self._row_update = False
        if changed:
            self.refresh_row(self.get_row_index(row))

    def refresh(
        self, *regions: Region, repaint: bool = True, layout: bool = False,
        recompose: bool = False,
    ) -> Self:  # fmt: skip
        """As DataTable's, except that the whole-table refresh of ``update_cell`` is skipped
        while :meth:`_update_row` changes one row's cells (it repaints that row after)."""
        if self._row_update and not regions and not layout and not recompose:
            return self
        return super().refresh(*regions, repaint=repaint, layout=layout, recompose=recompose)

    def _spark_width(self) -> int:
        return next((w for key, _, w in self._columns if key == "spark"), 0)

    def role_of(self, path_id: int) -> str | None:
        """The role the table currently shows for ``path_id``, read from the cell."""
        if str(path_id) not in self.rows:
            return None
        return self.get_cell(str(path_id), "role").plain

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        if event.row_key.value is not None:
            self.post_message(self.SwitchRequested(int(event.row_key.value)))
