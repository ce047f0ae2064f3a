"""Trends: per-path RTT and loss, and the inner traffic, over the last minutes, as charts
with the switches marked.

The history is the UI's own: :class:`TrendHistory` keeps one sample per second of engine
time (the newest snapshot the UI took in that second; a second's loss is the worst seen
in it) in a ring of :data:`TREND_SECONDS`, and the switch and death events with their
times. No engine field is needed: a snapshot carries the current RTT, loss and rates.

The bars are Textual's own sparkline (``textual.renderables.sparkline``, what the
``Sparkline`` widget draws), one per row, all starting in the same column, so a column
is the same moment in each row and in the switch row. They are drawn as lines of one
:class:`~jvpn_tui.widgets.panel.TextPanel` rather than as one ``Sparkline`` widget a row:
the panel repaints only the lines that changed, and the switch row is text aligned with
the bars cell for cell. One colour (a theme variable) a row, not the widget's per-cell
gradient: a gradient writes a colour code for every cell to the terminal each time the
charts move, one colour a row writes one.

A column covers ``span`` seconds (2 s while the history fits the width, then 3, 5, 10...
as it grows; the span still filling is drawn once it is whole). Each row's bars scale
from 0 to its maximum, which the row's value states. A second the path did not answer
is drawn full height (as bad as the worst in view); a second the UI did not see repeats
the one before.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Final

from rich.console import Console
from textual.renderables.sparkline import Sparkline

from jvpn_tui.widgets.format import NONE, esc, rate
from jvpn_tui.widgets.panel import TextPanel
from tunnel.api import EngineSnapshot, EventType

TREND_SECONDS: Final = 600
"""Seconds of history kept (the charts show up to the last ten minutes)."""

MARKS_KEPT: Final = 200
"""Switch and death marks kept."""

SPANS: Final = (2, 3, 5, 10, 15, 20, 30, 60)
"""Seconds a chart column may cover: the smallest that fits the history is used. Not 1:
the charts move once a column, and each move rewrites the rows on the terminal up to
their newest column (a few KiB at 160 columns)."""

LABEL_WIDTH: Final = 8
VALUE_WIDTH: Final = 20
DEAD_MARK: Final = "✗"
MANY_MARK: Final = "*"
"""A switch to a path whose id has more than one digit, or several in one column."""


@dataclass(frozen=True, slots=True)
class PathSample:
    """One path in one second."""

    path_id: int
    rtt_ms: float | None
    """Smoothed RTT; None while the path does not answer."""
    loss: float
    """Probe loss ratio (0..1); the worst seen in the second."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One second of engine time."""

    second: int
    """``ts_ms // 1000`` of the snapshot."""
    paths: tuple[PathSample, ...]
    tx_bps: float
    rx_bps: float
    active: int | None


def sample_of(snapshot: EngineSnapshot) -> Sample:
    s = snapshot.session
    return Sample(
        second=snapshot.ts_ms // 1000,
        paths=tuple(
            PathSample(
                p.stats.path_id, p.stats.srtt_ms if p.stats.alive else None,
                p.stats.loss_ratio if p.stats.loss_known or not p.stats.alive else 0.0,
            )
            for p in s.paths
        ),
        tx_bps=snapshot.traffic.tx_rate_bps, rx_bps=snapshot.traffic.rx_rate_bps,
        active=s.active,
    )  # fmt: skip


def _merge(old: Sample, new: Sample) -> Sample:
    """Two snapshots of the same second: the newest values, the worst loss."""
    worst = {p.path_id: p.loss for p in old.paths}
    paths = tuple(
        PathSample(p.path_id, p.rtt_ms, max(p.loss, worst.get(p.path_id, 0.0)))
        for p in new.paths
    )
    return Sample(new.second, paths, new.tx_bps, new.rx_bps, new.active)


@dataclass(frozen=True, slots=True)
class Column:
    """One chart column: ``span`` seconds, aggregated."""

    rtt: Mapping[int, float | None]
    """Path id -> mean RTT of its answering seconds (None: it answered in none)."""
    loss: Mapping[int, float]
    """Path id -> worst loss."""
    tx_bps: float
    rx_bps: float
    mark: str
    """``✗`` a path died, a digit: the session switched to that path, else empty."""


@dataclass(frozen=True, slots=True)
class Chart:
    """What the panel draws: the columns, oldest first, and what they cover."""

    columns: tuple[Column, ...]
    paths: tuple[int, ...]
    active: int | None
    span: int
    """Seconds per column."""
    seconds: int
    """Seconds the columns cover."""
    switches: int
    deaths: int
    """Switches and path deaths in those seconds."""
    latest: Sample
    """The newest second (what the rows say "now" from)."""


class TrendHistory:
    """A bounded ring of per-second samples and of switch/death marks (see the module)."""

    def __init__(self, seconds: int = TREND_SECONDS) -> None:
        self._samples: deque[Sample] = deque(maxlen=seconds)
        self._marks: deque[tuple[int, str]] = deque(maxlen=MARKS_KEPT)
        """(second, mark), in arrival order."""

    def __len__(self) -> int:
        return len(self._samples)

    def record(self, snapshot: EngineSnapshot) -> None:
        """Add a snapshot; one older than the newest second kept is ignored."""
        new = sample_of(snapshot)
        if self._samples and new.second < self._samples[-1].second:
            return
        if self._samples and new.second == self._samples[-1].second:
            new = _merge(self._samples.pop(), new)
        self._samples.append(new)

    def mark(self, events: Iterable[Mapping[str, object]]) -> bool:
        """Take the switches and deaths among ``events``; True when there was one."""
        added = False
        for event in events:
            mark = _mark_of(event)
            ts = event.get("ts_ms")
            if mark is not None and isinstance(ts, int | float):
                self._marks.append((int(ts) // 1000, mark))
                added = True
        return added

    def clear_marks(self) -> None:
        self._marks.clear()

    def chart(self, width: int) -> Chart | None:
        """The history in at most ``width`` columns, each a whole span (the span still
        filling is not drawn yet), or None while there is no whole one."""
        if not self._samples or width <= 0:
            return None
        first, last = self._samples[0].second, self._samples[-1].second
        span = next((s for s in SPANS if last // s - first // s < width), SPANS[-1])
        top = last // span - (0 if last % span == span - 1 else 1)
        bottom = max(first // span, top - width + 1)
        if top < bottom:
            return None
        buckets: dict[int, list[Sample]] = {}
        for sample in self._samples:
            if sample.second // span >= bottom:
                buckets.setdefault(sample.second // span, []).append(sample)
        marks: dict[int, str] = {}
        switches = deaths = 0
        for second, mark in self._marks:
            b = second // span
            if bottom <= b <= top:
                marks[b] = _combine(marks.get(b, ""), mark)
                deaths += mark == DEAD_MARK
                switches += mark != DEAD_MARK
        newest = self._samples[-1]
        paths = tuple(p.path_id for p in newest.paths)
        columns: list[Column] = []
        previous: list[Sample] = [self._samples[0]]
        for b in range(bottom, top + 1):
            samples = buckets.get(b) or previous
            previous = samples
            columns.append(_column(samples, paths, marks.get(b, "")))
        return Chart(tuple(columns), paths, newest.active, span, (top - bottom + 1) * span,
                     switches, deaths, newest)  # fmt: skip


def _mark_of(event: Mapping[str, object]) -> str | None:
    kind = event.get("event_type")
    if kind == EventType.TRANSPORT_DEAD:
        return DEAD_MARK
    if kind == EventType.TRANSPORT_SWITCH:
        target = event.get("new_transport")
        return str(target) if isinstance(target, int) and 0 <= target <= 9 else MANY_MARK
    return None


def _combine(old: str, new: str) -> str:
    """Marks in one column: a switch wins over a death; two switches show ``*``."""
    if not old or old == DEAD_MARK:
        return new
    if new == DEAD_MARK:
        return old
    return old if old == new else MANY_MARK


def _column(samples: Sequence[Sample], paths: tuple[int, ...], mark: str) -> Column:
    rtt: dict[int, float | None] = {}
    loss: dict[int, float] = {}
    for pid in paths:
        seen = [p for s in samples for p in s.paths if p.path_id == pid]
        answered = [p.rtt_ms for p in seen if p.rtt_ms is not None]
        rtt[pid] = sum(answered) / len(answered) if answered else None
        loss[pid] = max((p.loss for p in seen), default=0.0)
    n = len(samples)
    return Column(
        rtt=rtt, loss=loss, tx_bps=sum(s.tx_bps for s in samples) / n,
        rx_bps=sum(s.rx_bps for s in samples) / n, mark=mark,
    )  # fmt: skip


# -- drawing ------------------------------------------------------------------------------

_CONSOLE: Final = Console(width=1000, color_system=None, force_terminal=False)
"""Renders Textual's sparkline to plain bars (the panel colours them by theme variable)."""


def bars(values: Sequence[float], width: int) -> str:
    """``values`` (at least 0; one a cell when there are ``width``) as Textual's sparkline
    draws them, without colour, scaled from 0 to their maximum: a constant 100% loss is a
    row of full bars, not of empty ones."""
    spark = Sparkline([*values, 0.0], width=width + 1)  # the extra cell pins the floor at 0
    text = "".join(seg.text for seg in _CONSOLE.render(spark) if not seg.control)
    return text.rstrip("\n")[:width]


@dataclass(frozen=True, slots=True)
class Row:
    """One chart row: label, values (one per column), what its right-hand side says."""

    label: str
    values: tuple[float, ...]
    value: str
    colour: str
    """Theme variable of its bars."""


def _marker(chart: Chart, pid: int) -> str:
    return "▶" if pid == chart.active else " "


def _now(chart: Chart, pid: int) -> PathSample | None:
    return next((p for p in chart.latest.paths if p.path_id == pid), None)


def _rtt_row(chart: Chart, pid: int) -> Row:
    raw = [c.rtt[pid] for c in chart.columns]
    known = [v for v in raw if v is not None]
    label = f"RTT {_marker(chart, pid)}{pid}"
    if not known:
        return Row(label, (), "no answer", "$text-muted")
    worst = max(known)
    values = tuple(worst if v is None else v for v in raw)
    now = _now(chart, pid)
    shown = "no answer" if now is None or now.rtt_ms is None else f"{now.rtt_ms:.0f} ms"
    return Row(label, values, f"{shown}, max {worst:.0f}", "$primary")


def _loss_row(chart: Chart, pid: int) -> Row:
    values = tuple(c.loss[pid] for c in chart.columns)
    now = _now(chart, pid)
    loss, top = (now.loss if now is not None else 0.0), max(values)
    colour = "$warning" if top > 0 else "$text-muted"
    return Row(f"Loss {_marker(chart, pid)}{pid}", values, f"{loss:.0%}, max {top:.0%}", colour)


def _traffic_row(chart: Chart, up: bool) -> Row:
    values = tuple(c.tx_bps if up else c.rx_bps for c in chart.columns)
    now = chart.latest.tx_bps if up else chart.latest.rx_bps
    return Row("Inner ↑" if up else "Inner ↓", values, rate(now), "$secondary")


def rows_of(chart: Chart) -> list[Row]:
    """The chart rows, top to bottom (the switch row goes between loss and traffic)."""
    rows = [_rtt_row(chart, pid) for pid in chart.paths]
    rows += [_loss_row(chart, pid) for pid in chart.paths]
    rows += [_traffic_row(chart, True), _traffic_row(chart, False)]
    return rows


def marks_markup(chart: Chart) -> str:
    """The switch row's cells: ``·`` nothing, a digit (switch to that path), ``✗``."""
    out = []
    for mark, run in groupby(c.mark for c in chart.columns):
        n = len(list(run))
        if mark == DEAD_MARK:
            out.append(f"[b $text-error]{DEAD_MARK * n}[/]")
        elif mark:
            out.append(f"[b reverse $text-accent]{mark * n}[/]")
        else:
            out.append(f"[$text-muted]{'·' * n}[/]")
    return "".join(out)


def _mark_summary(chart: Chart) -> str:
    parts = [f"{chart.switches} switch" + ("es" if chart.switches != 1 else "")]
    if chart.deaths:
        parts.append(f"{chart.deaths} {'death' if chart.deaths == 1 else 'deaths'}")
    return ", ".join(parts)


def chart_markup(chart: Chart, width: int) -> str:
    """The panel's lines (markup): label, value, then the bars from the left edge of
    ``width`` cells (the oldest column first, the same for every row). The value comes
    first because a terminal line is rewritten from its start up to its last change: a
    new "now" rewrites a few cells, a new column the row up to it."""
    pad = " " * max(0, width - len(chart.columns))
    rows = rows_of(chart)
    lines = []
    for i, row in enumerate(rows):
        if i == 2 * len(chart.paths):
            lines.append(f"[$text-muted]{'Switch':<{LABEL_WIDTH}}[/] "
                         f"{_mark_summary(chart):<{VALUE_WIDTH}} {marks_markup(chart)}{pad}")
        if row.values:
            drawn = f"[{row.colour}]{bars(row.values, len(chart.columns))}[/]"
        else:
            drawn = f"[$text-muted]{NONE.ljust(len(chart.columns))}[/]"
        lines.append(f"[$text-muted]{row.label:<{LABEL_WIDTH}}[/] "
                     f"{esc(row.value):<{VALUE_WIDTH}} {drawn}{pad}")
    return "\n".join(lines)


class TrendsPanel(TextPanel):
    """The trend charts (see the module). A snapshot view that also reads events."""

    DEFAULT_CLASSES = "snapshot-view event-view panel"

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__("", id=id)
        self.history = TrendHistory()
        self._chart: tuple[Chart, int] | None = None
        """The chart shown, and its width."""

    def on_mount(self) -> None:
        super().on_mount()
        self.border_title = "Trends"
        self.show_markup("[$text-muted]waiting for the first seconds of history…[/]")

    def record(self, snapshot: EngineSnapshot) -> None:
        """A snapshot the UI took (drawn or not): one more sample."""
        self.history.record(snapshot)

    def show(self, snapshot: EngineSnapshot) -> None:
        self.history.record(snapshot)
        self._draw()

    def add_events(self, events: list[Mapping[str, object]]) -> None:
        if self.history.mark(events):
            self._draw()

    def reset_events(self, history: list[Mapping[str, object]], lost: int) -> None:
        del lost  # the timeline says it
        self.history.clear_marks()
        self.history.mark(history)
        self._draw()

    def on_resize(self) -> None:
        self._draw()

    def chart_width(self) -> int:
        """Columns the charts get: the panel's width less the label and value columns."""
        return self.content_region.width - LABEL_WIDTH - VALUE_WIDTH - 2

    def _draw(self) -> None:
        width = self.chart_width()
        chart = self.history.chart(width)
        if chart is None or (chart, width) == self._chart:
            return
        self._chart = (chart, width)
        subtitle = f"{chart.span} s a column"  # not the time shown: it would tick
        if self.border_subtitle != subtitle:
            self.border_subtitle = subtitle
        self.show_markup(chart_markup(chart, width))
