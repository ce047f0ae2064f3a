"""jvpn-tui --demo in a real terminal (tmux): a path kill changes the state line.

Starts the real demo (embedded gateway, relay, loopback UDP paths) under a tmux session
with a unique name, reads the screen with ``capture-pane``, pauses the demo script
(``g``), presses ``k`` (kill the active path) and waits until the session panel shows
another active path, then ``q``.
Skips when tmux or the demo engine is missing. Waits are bounded polls, not timings.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
ACTIVE = re.compile(r"Active\s+path (\d)")


@pytest.fixture
def tmux_session() -> Iterator[str]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (make sysdeps installs it)")
    try:
        import tunnel.demo.scenario  # noqa: F401
    except ImportError:
        pytest.skip("the demo engine (tunnel/demo/scenario.py) is not available")
    name = f"jvpn-tui-test-{uuid.uuid4().hex[:8]}"
    command = f"{sys.executable} -m jvpn_tui --demo --duration 60"
    # a private server (its own socket, no user config) in a terminal of its own size:
    # without COLUMNS and LINES, which Python prefers to the terminal's size (a pytest-xdist
    # worker has COLUMNS=80 and LINES=24 set)
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env["TERM"] = "xterm-256color"
    subprocess.run(
        ["tmux", "-L", name, "-f", "/dev/null", "new-session", "-d", "-s", name,
         "-x", "160", "-y", "48", "-c", str(REPO_ROOT), command],
        check=True, env=env, timeout=30,
    )  # fmt: skip
    try:
        yield name
    finally:
        subprocess.run(["tmux", "-L", name, "kill-server"], check=False, timeout=30,
                       capture_output=True)  # fmt: skip


def capture(name: str) -> str:
    proc = subprocess.run(
        ["tmux", "-L", name, "capture-pane", "-p", "-t", name], capture_output=True, text=True,
        timeout=30, check=False,
    )  # fmt: skip
    return proc.stdout


def keys(name: str, key: str) -> None:
    subprocess.run(["tmux", "-L", name, "send-keys", "-t", name, key], check=True, timeout=30)


def wait_screen(name: str, condition: Callable[[str], bool], what: str) -> str:
    screen = ""
    for _ in range(300):  # bounded: 300 polls of 0.1 s
        screen = capture(name)
        if condition(screen):
            return screen
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; screen:\n{screen}")


def test_demo_under_tmux_path_kill_changes_the_state_line(tmux_session: str) -> None:
    wait_screen(
        tmux_session,
        lambda s: ACTIVE.search(s) is not None and "ATTACHED" in s,
        "the demo session to attach",
    )
    # the demo script plays from the start: pause it (g), so that only k acts on the paths
    keys(tmux_session, "g")
    screen = wait_screen(tmux_session, lambda s: "demo paused" in s, "the script to pause")
    match = ACTIVE.search(screen)
    assert match is not None
    before = match.group(1)
    state_before = re.search(r"State\s+(\w+ v\d+)", screen)
    assert state_before is not None

    keys(tmux_session, "k")
    # the header may show the new path a drain before the timeline's DEAD line: wait for both
    screen = wait_screen(
        tmux_session,
        lambda s: (m := ACTIVE.search(s)) is not None and m.group(1) != before and "DEAD" in s,
        "another active path and the dead one's line after the kill",
    )
    state_after = re.search(r"State\s+(\w+ v\d+)", screen)
    assert state_after is not None and state_after.group(1) != state_before.group(1)
    assert f"path {before}" in screen

    keys(tmux_session, "q")
    wait_screen(tmux_session, lambda s: "Session" not in s, "the UI to quit")
