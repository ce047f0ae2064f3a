"""Switch timeline: what happened to the session, one line per happening; newest first.

The engine reports a happening as several events; the timeline tells it as one line:

* a path's death: ``TRANSPORT_DEAD`` and the ``STATE_CHANGE`` into RECOVERING it causes
  are one ``DEAD`` line (the path, the reason, how long it was silent, the new state);
* a switch: the ``REATTACH_ATTEMPT``, the ``STATE_CHANGE`` of the same ``state_version``
  (``ATTACHED → ATTACHED`` for a manual switch), the ``TRANSPORT_SWITCH`` and its
  ``REATTACH_RESULT`` are one ``SWITCH a → b`` line;
* a reattach that does not move the binding (the operator's ``r``, a recovery on the
  path that died) is one ``REATT`` line: ``REATT …`` while it waits for the gateway,
  then ``REATT ✓`` or ``REATT ✗`` (matched to its ``REATTACH_RESULT``; a newer attempt
  or the path's death ends it too, as unanswered);
* a denied switch names the path it would have moved to, or none, and says who asked:
  ``manual`` (the operator), ``auto`` (automatic switching) or ``recovery`` (after a
  death, whether or not automatic switching is on);
* ``DIAGNOSTIC`` events (the demo's steps, a gateway name resolved anew) are quiet lines.

:class:`Timeline` does this over event mappings (no Textual); :class:`SwitchTimeline`
shows it. The client has at most one reattach request in flight, so the open attempt is
the one an outcome belongs to.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from jvpn_tui.widgets.format import NONE, clock, esc, ms, state_markup
from jvpn_tui.widgets.panel import TextPanel
from tunnel.api import EventType, Reason

TIMELINE_LINES: Final = 200
"""Lines kept (older ones fall off)."""

EventMap = Mapping[str, object]
"""One event as the channel carries it (its ``to_dict()`` mapping)."""

KIND_WORDS: Final = {"proactive": "auto"}
"""How an attempt's ``kind`` reads on screen (``proactive`` attempts come from automatic
switching); the other kinds (``manual``, ``recovery``, ``resume``) read as they are."""

SWITCHED: Final = "switched"
"""An attempt that a TRANSPORT_SWITCH (or a same-path re-attach) ended."""
OK: Final = "ok"
"""An attempt that its REATTACH_RESULT ended with SUCCESS."""

RECOVERING: Final = "RECOVERING"
TERMINATED: Final = "TERMINATED"


@dataclass(slots=True, eq=False)
class Entry:
    """One line of the timeline: when, and what (markup). Compared by identity: two
    lines may read the same."""

    clock: str
    text: str
    quiet: bool = False
    """Shown muted (diagnostics)."""


def _markup(entry: Entry) -> str:
    if not entry.clock:
        return entry.text
    if entry.quiet:
        return f"[$text-muted]{entry.clock} {entry.text}[/]"
    return f"[$text-muted]{entry.clock}[/] {entry.text}"


@dataclass(slots=True)
class Attempt:
    """The last reattach attempt: its line (while open), its path and kind."""

    entry: Entry
    candidate: object
    kind: str
    ts_ms: object
    open: bool = True
    outcome: str = ""
    """How it ended (empty while open): :data:`SWITCHED`, :data:`OK` (its result), or
    why it failed."""


@dataclass(slots=True)
class StateLine:
    """The newest STATE_CHANGE line, which the event it explains may fold in."""

    entry: Entry
    version: object
    previous: str
    new: str


def _path(value: object) -> str:
    return NONE if value is None else esc(value)


def _kind(value: object) -> str:
    kind = str(value or "")
    return esc(KIND_WORDS.get(kind, kind))


def _since(event: EventMap, start: object) -> str:
    ts = event.get("ts_ms")
    if isinstance(ts, int | float) and isinstance(start, int | float):
        return f"  in {ms(ts - start, 0)}"
    return ""


def _retry(value: object) -> str:
    if not isinstance(value, int | float):
        return ""
    if value >= 10_000:
        return f"  retry in {value / 1000:.0f} s"
    return f"  retry in {ms(value, 0)}"


def _reason(event: EventMap) -> str:
    return esc(event.get("reason_code", ""))


def _candidates(event: EventMap) -> str:
    n = event.get("candidate_set_size")
    if not isinstance(n, int):
        return ""
    if n == 0:
        return ", no candidate"
    return f", {n} candidate{'' if n == 1 else 's'}"


def _states(previous: str, new: str) -> str:
    return f"{state_markup(previous)} → {state_markup(new)}"


class Timeline:
    """The timeline's lines from the engine's events (see the module docstring)."""

    def __init__(self, size: int = TIMELINE_LINES) -> None:
        self.entries: deque[Entry] = deque(maxlen=size)
        """Newest first."""
        self.count = 0
        """Events taken into the timeline (several may make one line)."""
        self._attempt: Attempt | None = None
        self._state_line: StateLine | None = None
        self._dead: Entry | None = None
        """The newest DEAD line, until the STATE_CHANGE it caused is folded in."""
        self._dead_id: object = None
        self._state = ""
        """The session's state as the events told it."""

    def add(self, event: EventMap) -> bool:
        """Take ``event``; False when it does not belong in the timeline."""
        handler = self._handlers().get(str(event.get("event_type")))
        if handler is None:
            return False
        self.count += 1
        handler(event)
        return True

    def _handlers(self) -> Mapping[str, Callable[[EventMap], None]]:
        return {
            EventType.TRANSPORT_SWITCH: self._switch,
            EventType.TRANSPORT_SWITCH_DENIED: self._denied,
            EventType.TRANSPORT_DEAD: self._dead_path,
            EventType.TRANSPORT_ATTACHED: self._attached,
            EventType.REATTACH_ATTEMPT: self._attempt_started,
            EventType.REATTACH_RESULT: self._result,
            EventType.STATE_CHANGE: self._state_change,
            EventType.SESSION_TERMINATED: self._end,
            EventType.POLICY_EVENT: self._policy,
            EventType.KEY_ROTATED: self._keys,
            EventType.DIAGNOSTIC: self._diagnostic,
            EventType.PATH_ADDED: self._path_added,
            EventType.PATH_REMOVED: self._path_removed,
            EventType.SESSION_LINKED: self._linked,
        }

    @property
    def lines(self) -> list[str]:
        """The lines (markup), newest first."""
        return [_markup(entry) for entry in self.entries]

    def mark(self, text: str) -> None:
        """A line of the UI's own (markup, no time), e.g. where events were lost."""
        self.entries.appendleft(Entry("", text))

    # -- bookkeeping ----------------------------------------------------------------------

    def _push(self, event: EventMap, text: str, *, quiet: bool = False) -> Entry:
        entry = Entry(clock(event), text, quiet)
        self.entries.appendleft(entry)
        return entry

    def _drop(self, entry: Entry) -> None:
        if entry in self.entries:
            self.entries.remove(entry)

    def _fold_state(self, event: EventMap) -> str:
        """The STATE_CHANGE of ``event``'s state_version, taken off its own line, as a
        suffix for ``event``'s line (nothing for a same-state rebind)."""
        line = self._state_line
        if line is None or line.version != event.get("state_version"):
            return ""
        self._state_line = None
        self._drop(line.entry)
        if line.previous == line.new:
            return ""
        return f"  {_states(line.previous, line.new)}"

    def _open_attempt(self, candidate: object) -> Attempt | None:
        attempt = self._attempt
        if attempt is not None and attempt.open and attempt.candidate == candidate:
            return attempt
        return None

    def _close(self, attempt: Attempt, event: EventMap, text: str, outcome: str) -> None:
        """``attempt`` ended with ``event``: its line gives way to ``text`` at the top."""
        attempt.open = False
        attempt.outcome = outcome
        self._drop(attempt.entry)
        attempt.entry = self._push(event, text)

    def _unanswered(self, event: EventMap, why: str) -> None:
        """The open attempt ends without an answer (a newer one, a death, the end)."""
        attempt = self._attempt
        if attempt is None or not attempt.open:
            return
        attempt.open = False
        attempt.outcome = why
        entry: Entry = attempt.entry
        entry.text = (
            f"[b $text-error]REATT ✗[/] → {_path(attempt.candidate)} {_kind(attempt.kind)}"
            f"  [$text-muted]{why}[/]"
        )

    # -- the events ------------------------------------------------------------------------

    def _switch(self, event: EventMap) -> None:
        previous, new = event.get("previous_transport"), event.get("new_transport")
        states = self._fold_state(event)
        attempt = self._attempt
        if attempt is None or attempt.candidate != new or attempt.outcome not in ("", OK):
            attempt = None  # (OK: its REATTACH_RESULT came first; the switch line says it)
        took = _since(event, attempt.ts_ms) if attempt is not None else ""
        epoch = f"epoch {esc(event.get('binding_epoch', '?'))}"
        if previous == new:  # the path that died, re-attached: not a switch
            kind = f" {_kind(attempt.kind)}" if attempt is not None else ""
            text = (
                f"[b $text-success]REATT ✓[/] → {_path(new)}{kind}  (same path)  "
                f"{_reason(event)}{took}  {epoch}{states}"
            )
        else:
            text = (
                f"[b $text-success]SWITCH [/] {_path(previous)} → {_path(new)}  "
                f"{_reason(event)}  "
                f"[$text-primary]{ms(event.get('switch_latency_ms'))}[/]  {epoch}{states}"
            )
        if attempt is not None:
            self._close(attempt, event, text, SWITCHED)
        else:
            self._push(event, text)

    def _denied(self, event: EventMap) -> None:
        target, reason = event.get("requested_transport"), _reason(event)
        attempt = self._attempt
        if attempt is not None and attempt.candidate == target:
            if not attempt.open and attempt.outcome == reason:
                return  # the ✗ line of the rejected attempt already says it
            if attempt.open:  # no answer to the request: given up
                text = (
                    f"[b $text-error]REATT ✗[/] → {_path(target)} {_kind(attempt.kind)}"
                    f"  [$text-warning]{reason}[/]  (no answer)"
                    f"{_retry(event.get('retry_after_ms'))}"
                )
                self._close(attempt, event, text, reason)
                return
        if event.get("manual"):
            who = "manual"
        else:
            who = "recovery" if self._state == RECOVERING else "auto"
        where = "none" if target is None else _path(target)
        self._push(
            event,
            f"[b $text-warning]DENIED [/] → {where}  [$text-warning]{reason}[/]  ({who})"
            f"{_retry(event.get('retry_after_ms'))}",
        )

    def _dead_path(self, event: EventMap) -> None:
        path = event.get("transport_id")
        if self._open_attempt(path) is not None:
            self._unanswered(event, "path died")
        detail = event.get("detail")  # link_down: what the kernel said
        why = esc(detail) if detail else f"silent {ms(event.get('silence_ms'), 0)}"
        entry = self._push(
            event, f"[b $text-error]DEAD   [/] path {_path(path)}  {_reason(event)}: {why}"
        )
        self._dead, self._dead_id = entry, path

    def _attached(self, event: EventMap) -> None:
        states = self._fold_state(event)
        self._push(
            event,
            f"[b]ATTACH [/] path {_path(event.get('transport_id'))}  "
            f"{esc(event.get('path', ''))}{states}",
        )

    def _attempt_started(self, event: EventMap) -> None:
        self._unanswered(event, "no answer")
        target = event.get("candidate_transport")
        kind = str(event.get("kind", ""))
        entry = self._push(event, f"[b]REATT …[/] → {_path(target)} {_kind(kind)}")
        self._attempt = Attempt(entry, target, kind, event.get("ts_ms"))

    def _result(self, event: EventMap) -> None:
        target, reason = event.get("candidate_transport"), _reason(event)
        ok = event.get("status") == "SUCCESS"
        attempt = self._attempt
        if ok and attempt is not None and attempt.candidate == target:
            if attempt.outcome == SWITCHED:
                return  # the SWITCH line already says it
        mark = "[b $text-success]REATT ✓[/]" if ok else "[b $text-error]REATT ✗[/]"
        fatal = "  [$text-error]fatal[/]" if event.get("fatal") else ""
        attempt = self._open_attempt(target)
        if attempt is None:
            self._push(event, f"{mark} → {_path(target)}  {reason}{fatal}")
            return
        text = (
            f"{mark} → {_path(target)} {_kind(attempt.kind)}  {reason}"
            f"{_since(event, attempt.ts_ms)}{fatal}"
        )
        self._close(attempt, event, text, OK if ok else reason)

    def _state_change(self, event: EventMap) -> None:
        previous = str(event.get("previous_state", "?"))
        new = str(event.get("new_state", "?"))
        self._state = new
        if new == TERMINATED:
            self._unanswered(event, "session ended")
        dead, self._dead = self._dead, None
        caused = new == RECOVERING and event.get("from_transport") == self._dead_id
        if dead is not None and caused:
            dead.text += f"  → {state_markup(new)}{_candidates(event)}"
            return
        entry = self._push(event, f"[b]STATE  [/] {_states(previous, new)}  {_reason(event)}")
        self._state_line = StateLine(entry, event.get("state_version"), previous, new)

    def _end(self, event: EventMap) -> None:
        states = self._fold_state(event)
        self._push(
            event,
            f"[b $text-error]END    [/] {_reason(event)}  ({esc(event.get('initiator', ''))})"
            f"{states}",
        )

    def _linked(self, event: EventMap) -> None:
        """A new session took the place of one the gateway lost (DESIGN D15c)."""
        old = esc(str(event.get("previous_session_id") or "?")[:8])
        self._push(
            event,
            f"[b $text-warning]NEW    [/] session {esc(str(event.get('session_id', ''))[:8])}"
            f" (was {old})  {_reason(event)}  [$text-muted]inner address kept[/]",
        )

    def _policy(self, event: EventMap) -> None:
        text = f"[b]POLICY [/] {esc(event.get('policy_name', ''))}  {_reason(event)}"
        detail = event.get("detail")
        if detail:
            text += f"  [$text-muted]{esc(detail)}[/]"
        self._push(event, text)

    def _keys(self, event: EventMap) -> None:
        phase = esc(event.get("key_phase", "?"))
        self._push(event, f"[b]KEYS   [/] phase {phase}  {_reason(event)}")

    def _path_added(self, event: EventMap) -> None:
        self._push(event, f"[b]PATH + [/] path {_path(event.get('transport_id'))}  "
                   f"{esc(event.get('path', ''))}")  # fmt: skip

    def _path_removed(self, event: EventMap) -> None:
        self._push(event, f"[b]PATH - [/] path {_path(event.get('transport_id'))}  "
                   f"{esc(event.get('detail', ''))}")  # fmt: skip

    def _diagnostic(self, event: EventMap) -> None:
        reason = event.get("reason_code")
        why = "" if reason == Reason.DEMO_ACTION else f"  ({esc(reason)})"
        self._push(event, f"NOTE    {esc(event.get('detail', ''))}{why}", quiet=True)


def lost_line(lost: int) -> str:
    """The line that marks where the UI lost events and re-read the engine's history."""
    return (
        f"[b $text-warning]LOST   [/] {lost} events lost while the screen was not kept up "
        "with; re-read from the engine"
    )


class SwitchTimeline(TextPanel):
    """Every transport decision with its reason and latency, newest first."""

    DEFAULT_CLASSES = "event-view panel"

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__("", id=id)
        self._timeline = Timeline()

    @property
    def count(self) -> int:
        """Events shown (several may make one line)."""
        return self._timeline.count

    def on_mount(self) -> None:
        self.border_title = "Switch timeline (UTC)"
        self.show_markup("[$text-muted]no events yet[/]")

    def add_events(self, events: Iterable[Mapping[str, object]]) -> None:
        if self._take(events):
            self._render_lines()

    def reset_events(self, history: Iterable[Mapping[str, object]], lost: int) -> None:
        """Events were lost: rebuild from the engine's history (oldest first), and say so."""
        self._timeline = Timeline()
        self._take(history)
        self._timeline.mark(lost_line(lost))
        self._render_lines()

    def _take(self, events: Iterable[Mapping[str, object]]) -> bool:
        added = False
        for event in events:
            added = self._timeline.add(event) or added
        return added

    def _render_lines(self) -> None:
        self.border_subtitle = f"{self.count} events"
        self.show_markup("\n".join(self.lines))

    @property
    def lines(self) -> list[str]:
        """The current lines (markup), newest first."""
        return self._timeline.lines
