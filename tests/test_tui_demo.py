"""The demo UI tells its story (issue 13), driven with Textual's pilot against the real
demo engine (a ClientEngine with Noise + AEAD over loopback UDP to the embedded gateway,
one impairment relay per path), built as ``jvpn-tui --demo`` builds it.

* Without a key, the demo script plays: the caption bar under the header says so, then
  shows each step with what to expect, then "demo finished — g to replay"; what each
  step did is confirmed in a notification; the switch timeline lists the step
  announcements (DIAGNOSTIC events).
* Every demo key confirms on screen: the play key in the caption (paused / playing), the
  impairment keys in a notification that says what was done to which path.

Assertions read what is rendered (the caption bar, the toasts, the timeline); waits are
bounded polls of the running app, never sleeps. The script tests play a shortened copy
of the script (the same steps, 1.5 s apart) so that they end in seconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import re
from collections.abc import Callable, Coroutine
from typing import Any

from textual.pilot import Pilot
from textual.widget import Widget
from textual.widgets._toast import Toast

from jvpn_tui.app import JvpnApp
from jvpn_tui.widgets import SwitchTimeline
from jvpn_tui.widgets.caption import DemoCaption
from tunnel.demo.scenario import DEMO_SCRIPT, DemoEngine, DemoScript

SIZE = (160, 48)
STEP_GAP_S = 1.5
"""The shortened script's steps are this far apart (the UI drains 4 times a second)."""
SHORT = DemoScript(
    steps=tuple(
        dataclasses.replace(step, at_s=STEP_GAP_S * n)
        for n, step in enumerate(DEMO_SCRIPT.steps, 1)
    ),
    end_s=STEP_GAP_S * (len(DEMO_SCRIPT.steps) + 1),
)
N_STEPS = len(DEMO_SCRIPT.steps)


def run_async(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """Run an async test with asyncio.run (the suite has no async pytest plugin)."""

    @functools.wraps(test)
    def wrapper() -> None:
        asyncio.run(test())

    return wrapper


def plain(widget: Widget) -> str:
    """What a Static-based widget shows, as plain text."""
    visual = widget.visual  # type: ignore[attr-defined]
    return str(getattr(visual, "plain", visual))


class OnScreen:
    """What the running app shows, read as text: the caption, the toasts, the timeline.
    Remembers every caption and toast it saw (a toast times out)."""

    def __init__(self, app: JvpnApp) -> None:
        self.app = app
        self.captions: list[str] = []
        self.toasts: list[str] = []

    def read(self) -> None:
        caption = self.app.query_one(DemoCaption)
        text = plain(caption) if caption.display else ""
        if text and (not self.captions or self.captions[-1] != text):
            self.captions.append(text)
        for toast in self.app.screen.query(Toast):
            shown = str(toast.render()).replace("\n", ": ", 1)
            if shown not in self.toasts:
                self.toasts.append(shown)

    @property
    def caption(self) -> str:
        return self.captions[-1] if self.captions else ""

    def timeline(self) -> str:
        return "\n".join(self.app.query_one(SwitchTimeline).lines)

    async def until(self, pilot: Pilot[Any], condition: Callable[[], bool], what: str) -> None:
        """Let the app run until ``condition`` holds (bounded: 2000 pauses of 20 ms)."""
        for _ in range(2000):
            self.read()
            if condition():
                return
            await pilot.pause(0.02)
        raise AssertionError(
            f"timed out waiting for: {what}\ncaptions: {self.captions}\ntoasts: {self.toasts}"
        )


def demo_app(**engine_args: Any) -> JvpnApp:
    """The app on the demo engine, as ``jvpn-tui --demo`` starts it (script=True)."""
    return JvpnApp(DemoEngine(script=True, seed=5, **engine_args))


@run_async
async def test_the_script_plays_without_a_key_and_the_caption_follows_its_steps() -> None:
    app = demo_app(timeline=SHORT)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        screen = OnScreen(app)
        # no key pressed: the caption bar appears under the header and says it plays
        await screen.until(pilot, lambda: "started" in screen.caption, "the script to start")
        caption = app.query_one(DemoCaption)
        # right under the header, once laid out (it was hidden until the engine said demo)
        await screen.until(pilot, lambda: caption.region.height > 0, "the caption's layout")
        assert caption.region.y == 1
        assert f"{N_STEPS} steps" in screen.caption and "g pauses" in screen.caption
        await screen.until(pilot, lambda: "demo finished" in screen.caption, "the script's end")

        # every step had its caption, in order: what happens, then what to expect
        steps = [c for c in screen.captions if c.startswith("▶ demo step ")]
        for n, step in enumerate(SHORT.steps, 1):
            shown = [c for c in steps if f"step {n}/{N_STEPS} at {step.at_s:g} s" in c]
            assert shown, (n, screen.captions)
            assert f"expect {step.expect}" in shown[0]
        numbers = [int(c.split("step ")[1].split("/")[0]) for c in steps]
        assert numbers == sorted(numbers) == list(range(1, N_STEPS + 1))
        assert "blackhole the active path" in next(c for c in steps if "step 2/" in c)
        assert screen.caption.startswith("■ demo finished — g to replay")

        # what the steps did was confirmed too (the engine's own account of each action)
        await screen.until(pilot, lambda: any("every path restored" in t for t in screen.toasts),
                           "the restore step's confirmation")  # fmt: skip
        assert any("loss both ways" in t for t in screen.toasts), screen.toasts
        assert any("blackholed both ways" in t for t in screen.toasts), screen.toasts


@run_async
async def test_the_timeline_lists_the_step_announcements() -> None:
    """The step announcements are DIAGNOSTIC events; docs/tui.md says the timeline shows
    DIAGNOSTIC lines: every step's line is there, newest first."""
    app = demo_app(timeline=SHORT)
    async with app.run_test(size=SIZE) as pilot:
        screen = OnScreen(app)
        await screen.until(pilot, lambda: "demo finished" in screen.caption, "the script's end")
        lines = app.query_one(SwitchTimeline).lines
        announced = [
            next((i for i, line in enumerate(lines) if f"step {n}/{N_STEPS} at" in line), None)
            for n in range(1, N_STEPS + 1)
        ]
        assert None not in announced, "\n".join(lines)
        assert announced == sorted(announced, reverse=True)  # newest first


@run_async
async def test_every_demo_key_confirms_on_screen() -> None:
    app = demo_app()
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        screen = OnScreen(app)

        def active() -> int | None:
            snap = app.snapshot
            return None if snap is None else snap.session.active

        await screen.until(pilot, lambda: active() is not None and "started" in screen.caption,
                           "the session to attach and the script to start")  # fmt: skip

        # the play key: the caption says paused, and then playing again
        await pilot.press("g")
        await screen.until(pilot, lambda: "demo paused" in screen.caption, "g: paused")
        assert "g resumes" in screen.caption and "next: step" in screen.caption

        def confirmed(text: str) -> Callable[[], bool]:
            return lambda: any(text in t for t in screen.toasts)

        refused = "No active path to impair"

        def refusals() -> int:
            return sum(refused in t for t in screen.toasts)

        async def on_active(key: str, text: str) -> None:
            """Press a key that acts on the active path once there is one, until its toast
            confirms it: between two keys the session may be between paths for a moment
            (after the loss and the rebinding, the switch limiter decides when it moves),
            and the engine may have lost its path after the snapshot the UI showed; then
            the demo says so (a toast of its own) and the key is pressed again."""
            for _ in range(20):
                await screen.until(pilot, lambda: active() is not None, f"an active path for {key}")
                before = refusals()
                await pilot.press(key)
                await screen.until(
                    pilot, lambda n=before: confirmed(text)() or refusals() > n,
                    f"{key} confirmed or refused",
                )  # fmt: skip
                if confirmed(text)():
                    return
            raise AssertionError(f"{key}: refused 20 times\ntoasts: {screen.toasts}")

        await on_active("l", "30% loss both ways")
        await on_active("x", "replayed from another address")
        await on_active("b", "NAT rebinding #1")
        await on_active("k", "blackholed both ways")
        await pilot.press("u")
        await screen.until(pilot, confirmed("every path restored"), "u confirmed")
        # each names what was done to which path, e.g. "Demo: path 2: blackholed both ways"
        done = [t for t in screen.toasts if refused not in t]
        assert all(re.match(r"Demo: (path \d|every path)", t) for t in done), screen.toasts

        await pilot.press("g")
        await screen.until(pilot, lambda: "resumed at" in screen.caption, "g: playing again")
        assert "g pauses" in screen.caption
