"""``jvpn-tui --attach`` on a real tunnel in network namespaces (issue 12, acceptance).

``jvpn-gateway`` and ``jvpn-tui --headless`` run for real (tests/realnet.py: a TUN on
both sides, two veth paths); the client serves its control socket in the test's
directory, and the UI, driven by Textual's pilot in this process, attaches to it (a unix
socket is reached through the file system, whatever the namespace). Switching from the
attached UI moves the tunnel: the client's own events and status say the session is on
the other path, and inner traffic still flows. Quitting the UI leaves it up: the client
process runs on, ATTACHED on that path, its TUN and inner address in place, traffic
flowing, the same session. Needs root (skipped otherwise).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

from realnet import RealTunnel, realnet  # noqa: F401  (the fixture)
from test_tui_attach import asyncio_run, attached, until
from test_tui_pilot import RecordingApp

from tunnel.api import EngineSnapshot
from tunnel.control.client import ControlConnection
from tunnel.control.protocol import client_status
from tunnel.control.remote import RemoteEngine

ECHOES = 20


def status(t: RealTunnel) -> EngineSnapshot:
    with ControlConnection(t.client_socket) as conn:
        return client_status(conn.status().status)


def wait(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for: {what}")


def test_attached_ui_switch_moves_the_tunnel_and_detaching_leaves_it_up(realnet) -> None:  # noqa: F811
    t: RealTunnel = realnet(client=False)
    t.start_client()
    ready = wait(
        lambda: (s := status(t)).session.state == "ATTACHED"
        and all(p.validated for p in s.session.paths) and s,
        30.0, "both paths validated",
    )  # fmt: skip
    assert len(ready.session.paths) == 2
    target = 2 if ready.session.active == 1 else 1
    mark = t.events.mark()

    async def scenario() -> None:
        app = RecordingApp(RemoteEngine(t.client_socket))
        async with app.run_test(size=(160, 48)) as pilot:
            await attached(pilot)
            assert "attached" in app.title
            await pilot.press(str(target))
            await until(pilot, lambda: t.events.of_type("TRANSPORT_SWITCH", mark,
                                                         new_transport=target),
                        "the client's TRANSPORT_SWITCH")  # fmt: skip
            await pilot.press("q")
            await until(pilot, lambda: not app.is_running, "the UI to close")
        assert app.ended is None

    asyncio_run(scenario)
    assert t.client is not None and t.client.poll() is None  # the client runs on
    after = status(t)
    assert (after.session.state, after.session.active) == ("ATTACHED", target)
    assert after.session.session_id == ready.session.session_id
    assert t.client_inner_ready()  # TUN and inner address in place
    assert len(t.udp_echo(count=ECHOES)) == ECHOES  # and the tunnel carries traffic
    assert t.events.of_type("SESSION_TERMINATED", mark) == []
    assert t.stop_client(signal.SIGTERM) == 0
