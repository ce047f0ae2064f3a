"""The demo's scripted timeline and the clock that plays it.

:data:`DEMO_SCRIPT` is the golden timeline in the spirit of SPEC-DIGEST AT-22: loss on the
active path (VOLATILE, then a switch), death of the active path (TRANSPORT_DEAD, then
recovery on another path), a replay (rejected by the gateway: SECURITY_EVENT), then every
path restored, then a few seconds for the paths to settle. :class:`ScriptPlayer` plays a
script on the engine loop's timers and pauses, resumes and replays it (the play key). It
decides *when*; what a step does is its owner's (``tunnel.demo.scenario.DemoPlugin``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from tunnel.demo.commands import DemoAction, ScriptStatus, script_detail


@dataclass(frozen=True, slots=True)
class ScriptStep:
    """One step of the scripted demo timeline."""

    at_s: float
    """Seconds of script time (paused time does not count) after the script started."""
    action: DemoAction
    """``restore`` acts on every path, the others on the path active when the step runs."""
    value: float
    """The action's value (loss ratio for ``loss``)."""
    expect: str
    """What the viewer should see next (announced in the step's DIAGNOSTIC)."""


@dataclass(frozen=True, slots=True)
class DemoScript:
    """A scripted timeline: its steps, in order, and when it is over."""

    steps: tuple[ScriptStep, ...]
    """Ordered by ``at_s``."""
    end_s: float
    """Script time at which it has finished (the last step's effects have settled)."""

    def __post_init__(self) -> None:
        times = [s.at_s for s in self.steps]
        if not self.steps or times != sorted(times) or times[0] < 0 or self.end_s < times[-1]:
            raise ValueError("a demo script needs steps in time order, ending by end_s")


DEMO_SCRIPT: Final = DemoScript(
    steps=(
        ScriptStep(3.0, DemoAction.LOSS, 0.3,
                   "VOLATILE, then a switch (loss_recovery) to a clean path"),
        ScriptStep(8.0, DemoAction.KILL, 0.0,
                   "TRANSPORT_DEAD for that path, then recovery on another path"),
        ScriptStep(12.0, DemoAction.REPLAY, 0.0,
                   "a rejected replay (SECURITY_EVENT replay_detected from the gateway)"),
        ScriptStep(15.0, DemoAction.RESTORE, 0.0, "every path answering again"),
    ),
    end_s=18.0,
)  # fmt: skip
"""The golden demo timeline: a switch, a recovery and a rejected replay within 20 s."""

SCRIPT_LENGTH_S: Final = DEMO_SCRIPT.end_s
"""Script start to a settled end (the restored paths answer their probes again)."""

_VERB: Final = {
    DemoAction.LOSS: "{value:.0%} loss both ways on",
    DemoAction.KILL: "blackhole",
    DemoAction.REPLAY: "replay captured datagrams of",
}
"""How a step names its action on a path (format with the step's ``value``)."""

STEP_RETRY_S: Final = 0.25
"""A step that found no active path (the previous step's recovery is still under way)
looks again this often; script time stands still meanwhile."""
STEP_WAIT_LIMIT_S: Final = 10.0
"""How long a step waits for an active path at most; then it runs its last try (the
owner skips it, saying so)."""


def step_summary(step: ScriptStep, path: int | None = None) -> str:
    """What a step does, in words: on ``path`` when given, else on "the active path"."""
    if step.action == DemoAction.RESTORE:
        return "restore every path"
    target = "the active path" if path is None else f"the active path {path}"
    verb = _VERB.get(step.action, str(step.action)).format(value=step.value)
    return f"{verb} {target}"


class ScriptPlayer:
    """Plays a :class:`DemoScript` on the engine loop: each step on a timer; pause, resume
    and replay. Every change of status is said through ``say`` (a DIAGNOSTIC detail).

    All methods run on the engine loop thread.
    """

    def __init__(
        self,
        script: DemoScript,
        loop: asyncio.AbstractEventLoop,
        clock: Callable[[], float],
        *,
        run_step: Callable[[int, ScriptStep, bool], bool],
        say: Callable[[str], None],
    ) -> None:
        self.script = script
        self.status: ScriptStatus | None = None
        """None until it first plays."""
        self._loop = loop
        self._clock = clock
        self._run_step = run_step
        self._say = say
        self._position_s = 0.0
        """Script time reached at ``_since`` (the last play, pause or resume)."""
        self._since = 0.0
        """Engine time of the last play, pause or resume."""
        self._next = 0
        """Index of the next step to run."""
        self._timers: list[asyncio.TimerHandle] = []
        self._waited_s = 0.0
        """How long the next step has waited for an active path so far."""

    def position(self) -> float:
        """Script time now (it stands still while paused)."""
        if self.status is ScriptStatus.PLAYING:
            return self._position_s + (self._clock() - self._since)
        return self._position_s

    def toggle(self) -> None:
        """The play key: pause when playing, resume when paused, else play from the start."""
        if self.status is ScriptStatus.PLAYING:
            self.pause()
        elif self.status is ScriptStatus.PAUSED:
            self.resume()
        else:
            self.play()

    def play(self) -> None:
        """(Re)start from the beginning."""
        again = self.status is not None
        self._position_s, self._next, self._waited_s = 0.0, 0, 0.0
        self._start()
        n = len(self.script.steps)
        self._say(script_detail(
            ScriptStatus.PLAYING,
            f"{'again from the start' if again else 'started'}: {n} steps in "
            f"{self.script.end_s:g} s; next: {self._ahead()}",
        ))  # fmt: skip

    def pause(self) -> None:
        if self.status is not ScriptStatus.PLAYING:
            return
        self._position_s = self.position()
        self._cancel()
        self.status = ScriptStatus.PAUSED
        at, ahead = self._position_s, self._ahead()
        self._say(script_detail(ScriptStatus.PAUSED, f"at {at:.1f} s; next: {ahead}"))

    def resume(self) -> None:
        if self.status is not ScriptStatus.PAUSED:
            return
        self._start()
        at = self._position_s
        ahead = self._ahead()
        self._say(script_detail(ScriptStatus.PLAYING, f"resumed at {at:.1f} s; next: {ahead}"))

    def stop(self) -> None:
        """Cancel what is scheduled (the engine is closing)."""
        self._cancel()

    def _ahead(self) -> str:
        """What comes next: the next step, or the end."""
        steps = self.script.steps
        if self._next >= len(steps):
            return f"the end at {self.script.end_s:g} s"
        step = steps[self._next]
        return f"step {self._next + 1}/{len(steps)} at {step.at_s:g} s: {step_summary(step)}"

    def _start(self) -> None:
        """Schedule what is left from ``_position_s`` on: the remaining steps, the end."""
        self._cancel()
        self.status = ScriptStatus.PLAYING
        self._since = self._clock()
        later = self._loop.call_later
        for i in range(self._next, len(self.script.steps)):
            delay = max(0.0, self.script.steps[i].at_s - self._position_s)
            self._timers.append(later(delay, self._fire, i))
        self._timers.append(later(max(0.0, self.script.end_s - self._position_s), self._end))

    def _cancel(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers = []

    def _fire(self, index: int) -> None:
        """Run step ``index``. ``run_step(n, step, last_try)`` returns False when the step
        cannot run yet (no active path); it then waits, script time standing still, and
        is tried again every :data:`STEP_RETRY_S` until :data:`STEP_WAIT_LIMIT_S`, when
        its last try runs (the owner skips it then, saying so)."""
        step = self.script.steps[index]
        last_try = self._waited_s >= STEP_WAIT_LIMIT_S
        if self._run_step(index + 1, step, last_try) or last_try:
            self._next, self._waited_s = index + 1, 0.0
            return
        if self._waited_s == 0.0:
            n = len(self.script.steps)
            self._say(script_detail(
                ScriptStatus.PLAYING,
                f"waiting: step {index + 1}/{n} needs an active path; the last step's "
                f"recovery is still under way (up to {STEP_WAIT_LIMIT_S:g} s)",
            ))  # fmt: skip
        self._cancel()
        self._position_s, self._next, self._since = step.at_s, index, self._clock()
        self._waited_s += STEP_RETRY_S
        self._timers.append(self._loop.call_later(STEP_RETRY_S, self._start))

    def _end(self) -> None:
        self._timers = []
        self._position_s = self.script.end_s
        self.status = ScriptStatus.FINISHED
        n = len(self.script.steps)
        self._say(script_detail(ScriptStatus.FINISHED, f"all {n} steps ran, the paths settled"))
