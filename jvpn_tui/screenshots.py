"""Write the README screenshots: ``python -m jvpn_tui.screenshots [OUTDIR]``.

Renders the main screen against the scripted fake engine (no network, fixed
timestamps) at 160x48 for each scenario and writes ``screenshots/<scenario>.svg``. The
fake engine first plays the scenario's scripted four minutes of past
(``jvpn_tui/fake_trends.py``), one snapshot a second, so the trend charts are full.
``make screenshots`` runs it. The output is deterministic: re-running it on an
unchanged tree changes no file.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from textual.pilot import Pilot

from jvpn_tui.app import JvpnApp
from jvpn_tui.fake_engine import SCENARIOS, FakeEngine

SIZE: Final = (160, 48)
PAST_S: Final = 240
"""Seconds of scripted past played first: at 2 s a column, charts as wide as the panel."""
DEFAULT_DIR: Final = Path(__file__).resolve().parents[1] / "screenshots"


async def play_past(pilot: Pilot[int], engine: FakeEngine) -> None:
    """Wait for the first snapshot, then play ``engine``'s scripted past (``past_s``)
    into the app, one second at a time, each taken as the app's drain would take it,
    and let the app draw the last one."""
    app = pilot.app
    assert isinstance(app, JvpnApp)
    for _ in range(500):
        if app.snapshot is not None:
            break
        await pilot.pause(0.02)
    if app.snapshot is None:
        raise RuntimeError("the fake engine's snapshot never reached the UI")
    while engine.past_left:
        engine.pump()
        app.drain_channel()
    for _ in range(500):
        if app.snapshot.ts_ms == engine.now_ms:
            break
        await pilot.pause(0.02)
    for _ in range(3):
        await pilot.pause()
    await pilot.wait_for_scheduled_animations()


async def _render(scenario: str) -> str:
    engine = FakeEngine(scenario, past_s=PAST_S)
    app = JvpnApp(engine)
    async with app.run_test(size=SIZE) as pilot:
        await play_past(pilot, engine)
        return app.export_screenshot(title=f"jvpn-tui — {scenario}")


def render(scenario: str) -> str:
    """The SVG of the main screen in ``scenario``."""
    return asyncio.run(_render(scenario))


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    out = Path(args[0]) if args else DEFAULT_DIR
    out.mkdir(parents=True, exist_ok=True)
    for scenario in SCENARIOS:
        path = out / f"{scenario}.svg"
        path.write_text(render(scenario), encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
