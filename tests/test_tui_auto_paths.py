"""The transports table follows paths that come and go (issue 10 item 4, ``paths =
"auto"``): a row appears with its path number, a removed path's row disappears, the other
rows keep their numbers, and the number keys act on the numbers shown."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from textual.pilot import Pilot

from jvpn_tui.app import JvpnApp
from jvpn_tui.fake_engine import FakeEngine
from jvpn_tui.widgets import TransportsTable
from tunnel.api import PathView, SwitchTo

SIZE = (160, 48)


async def _until(pilot: Pilot[Any], condition: Any, what: str) -> None:
    for _ in range(250):
        if condition():
            return
        await pilot.pause(0.02)
    raise AssertionError(f"timed out waiting for: {what}")


def _renumbered(view: PathView, path_id: int, label: str) -> PathView:
    stats = dataclasses.replace(view.stats, path_id=path_id)
    return dataclasses.replace(view, stats=stats, label=label, role="standby")


def test_rows_appear_and_disappear_and_numbers_stay() -> None:
    async def run() -> None:
        engine = FakeEngine("healthy")
        app = JvpnApp(engine)
        async with app.run_test(size=SIZE) as pilot:
            await _until(pilot, lambda: app.snapshot is not None, "the first snapshot")
            assert app.snapshot is not None
            base = app.snapshot
            table = app.query_one(TransportsTable)
            first = [p.stats.path_id for p in base.session.paths]
            assert first[:2] == [1, 2]

            def publish(seq: int, paths: tuple[PathView, ...]) -> None:
                session = dataclasses.replace(base.session, paths=paths)
                engine.channel.publish(dataclasses.replace(base, seq=seq, session=session))

            # a path appears (an interface came up): number 7, after the others
            added = _renumbered(base.session.paths[1], 7, "wlan0 192.0.2.7 (gw:51820)")
            publish(1000, (*base.session.paths, added))
            await _until(pilot, lambda: table.role_of(7) == "standby", "row 7")
            assert [table.role_of(pid) for pid in first] == [p.role for p in base.session.paths]
            assert "wlan0 192.0.2.7" in str(table.get_row("7"))

            # path 2 leaves: its row goes, 1 and 7 keep their numbers and rows
            rest = tuple(p for p in base.session.paths if p.stats.path_id != 2)
            publish(1001, (*rest, added))
            await _until(pilot, lambda: table.role_of(2) is None, "row 2 gone")
            assert table.role_of(1) == "active" and table.role_of(7) == "standby"

            # the number key acts on the number shown
            await pilot.press("7")
            engine.pump()
            assert SwitchTo(7) in engine.received

    asyncio.run(run())
