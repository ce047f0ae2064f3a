"""jvpn-tui on a real terminal: what it writes when idle, and what a stalled one keeps.

Issue 14. Two outsider's tests of the real program (``python -m jvpn_tui``):

* idle: the UI on a pty (160x48) against the scripted fake engine in a steady, healthy
  state; after the first full screen, the bytes it writes to the terminal in 10 s are
  counted (printed) and must stay under 5 KiB/s. A byte count: a loaded machine only
  makes the UI write less.
* stall: the demo UI under tmux, whose output stops being read (the tmux server is
  stopped and the pane's terminal buffer filled, so the UI's writes block, then its
  event loop) while the demo script kills the active path; the engine's UI queue is made
  tiny with the ``JVPN_UI_QUEUE_SIZE`` test knob so that the stall loses events. After
  reading resumes, the screen must say that events were lost and still show the path's
  death and the move to another path in the switch timeline (re-read from the engine).
  tmux is the terminal emulator that turns the byte stream back into a screen.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tunnel.api import UI_QUEUE_SIZE_ENV

REPO_ROOT = Path(__file__).resolve().parents[1]
ROWS, COLUMNS = 48, 160
IDLE_WINDOW_S = 10.0
IDLE_BUDGET_BYTES_PER_S = 5 * 1024
ANSI = re.compile(rb"\x1b\[[0-9;?<>=]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>78]")
ACTIVE = re.compile(r"Active\s+path (\d)")


def terminal_env(**extra: str) -> dict[str, str]:
    """The environment of a UI in a terminal of a given size: without COLUMNS and LINES,
    which Python (``shutil.get_terminal_size``) prefers to the terminal's own size (a
    pytest-xdist worker has COLUMNS=80 and LINES=24 set)."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR")}
    return {**env, "TERM": "xterm-256color", "PYTHONPATH": str(REPO_ROOT), **extra}


# -- idle: bytes written to a pty ----------------------------------------------------------


def plain(data: bytes) -> str:
    """The text of a terminal byte stream, escape sequences removed."""
    return ANSI.sub(b"", data.replace(b"\0", b"")).decode("utf-8", "replace")


def read_for(fd: int, until: float, sink: bytearray) -> int:
    """Read ``fd`` into ``sink`` until the monotonic time ``until``; bytes read."""
    n = 0
    while (left := until - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], min(left, 0.1))
        if not ready:
            continue
        try:
            data = os.read(fd, 65536)
        except OSError as exc:  # EIO: the child closed the terminal
            if exc.errno == errno.EIO:
                break
            raise
        n += len(data)
        sink.extend(data)
    return n


@pytest.fixture
def idle_ui() -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
    env = terminal_env()
    proc = subprocess.Popen(
        [sys.executable, "-m", "jvpn_tui", "--fake-engine", "healthy", "--duration", "120"],
        stdin=slave, stdout=slave, stderr=slave, env=env, cwd=REPO_ROOT,
        start_new_session=True, close_fds=True,
    )  # fmt: skip
    os.close(slave)
    try:
        yield master, proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                os.write(master, b"q")
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        os.close(master)


def test_an_idle_ui_writes_well_under_5_kib_per_second(
    idle_ui: tuple[int, subprocess.Popen[bytes]],
) -> None:
    master, proc = idle_ui
    seen = bytearray()
    # the first full screen: every panel drawn from a snapshot (bounded wait)
    deadline = time.monotonic() + 60.0
    while not all(
        word in plain(bytes(seen))
        for word in ("Switch timeline", "Observability", "Uptime", "3/3 answering", "(seq")
    ):
        assert time.monotonic() < deadline, f"no full screen: {plain(bytes(seen))[-2000:]}"
        assert proc.poll() is None, f"jvpn-tui exited: {plain(bytes(seen))[-2000:]}"
        read_for(master, time.monotonic() + 0.2, seen)
    read_for(master, time.monotonic() + 1.0, seen)  # what the first screen still had queued

    window = bytearray()
    written = read_for(master, time.monotonic() + IDLE_WINDOW_S, window)
    rate = written / IDLE_WINDOW_S
    print(f"idle jvpn-tui at {COLUMNS}x{ROWS}: {written} bytes in {IDLE_WINDOW_S:g} s "
          f"= {rate / 1024:.2f} KiB/s")  # fmt: skip
    assert proc.poll() is None
    assert rate < IDLE_BUDGET_BYTES_PER_S, plain(bytes(window))[-3000:]
    # it is alive, not frozen: the uptime ticks on screen at 1 Hz
    assert "Uptime" in plain(bytes(window))


# -- stall: the real demo UI under tmux, its output not read -------------------------------


class Tmux:
    """A private tmux server (its own socket) running one session."""

    def __init__(self, socket_name: str, session: str) -> None:
        self.socket_name = socket_name
        self.session = session

    def run(self, *args: str) -> str:
        proc = subprocess.run(
            ["tmux", "-L", self.socket_name, *args], capture_output=True, text=True,
            timeout=30, check=True,
        )  # fmt: skip
        return proc.stdout

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", self.session)

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", self.session, *keys)

    def server_pid(self) -> int:
        return int(self.run("display-message", "-p", "-t", self.session, "#{pid}").strip())

    def pane_tty(self) -> str:
        return self.run("display-message", "-p", "-t", self.session, "#{pane_tty}").strip()

    def wait(self, condition: Callable[[str], bool], what: str, polls: int = 300) -> str:
        screen = ""
        for _ in range(polls):  # bounded: polls of 0.1 s
            screen = self.screen()
            if condition(screen):
                return screen
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; screen:\n{screen}")


@pytest.fixture
def demo_in_tmux() -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (make sysdeps installs it)")
    tag = uuid.uuid4().hex[:8]
    tmux = Tmux(f"jvpn-stall-{tag}", f"stall-{tag}")
    env = terminal_env(**{UI_QUEUE_SIZE_ENV: "4"})
    command = f"{sys.executable} -m jvpn_tui --demo --duration 120"
    subprocess.run(
        ["tmux", "-L", tmux.socket_name, "-f", "/dev/null", "new-session", "-d", "-s",
         tmux.session, "-x", str(COLUMNS), "-y", str(ROWS), "-c", str(REPO_ROOT), command],
        check=True, env=env, timeout=30,
    )  # fmt: skip
    pid = tmux.server_pid()
    try:
        yield tmux
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        subprocess.run(["tmux", "-L", tmux.socket_name, "kill-server"], check=False,
                       timeout=30, capture_output=True)  # fmt: skip


def fill_terminal(tty: str) -> int:
    """Write NULs (which a terminal ignores) into the pane's terminal until the kernel's
    buffer is full; from then on every write of the UI blocks. Returns only then, with the
    bytes it wrote: 0 when the UI's own redraws filled the buffer first (the test process
    ran late on a loaded machine)."""
    fd = os.open(tty, os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY)
    written = 0
    try:
        while True:
            try:
                written += os.write(fd, b"\0" * 4096)
            except BlockingIOError:
                return written
    finally:
        os.close(fd)


STALL_AFTER_SCRIPT_S = 20.0
"""The stall lasts until this long after the session attached, which is after the demo
script started (it ends at 18 s: the path's death at 8 s, a replay at 12 s, every path
restored at 15 s)."""


def test_a_stalled_ui_loses_events_but_not_the_switch(demo_in_tmux: Tmux) -> None:
    tmux = demo_in_tmux
    screen = tmux.wait(lambda s: ACTIVE.search(s) is not None and "ATTACHED" in s,
                       "the demo session to attach")  # fmt: skip
    server, tty = tmux.server_pid(), tmux.pane_tty()
    # The demo script plays from the start, on the engine's own timers: loss on the active
    # path at 3 s, its death at 8 s, a replay at 12 s, every path restored at 15 s (it
    # started before the session attached). Now the terminal stops reading.
    started = time.monotonic()
    os.kill(server, signal.SIGSTOP)
    try:
        fill_terminal(tty)  # returns once the terminal's buffer is full
        # The stall. The UI's writes block at once; its event loop blocks as soon as its
        # writer's queue is full (a few seconds of redraws). The engine goes on: about 80
        # snapshots and, from the death of the path on, 25-odd events (a queue of 4 holds
        # a fraction of them). A deliberate wait: its length is the test's input.
        time.sleep(max(0.0, started + STALL_AFTER_SCRIPT_S - time.monotonic()))
    finally:
        os.kill(server, signal.SIGCONT)

    def recovered(s: str) -> bool:
        return "LOST" in s and "DEAD" in s and ACTIVE.search(s) is not None

    screen = tmux.wait(recovered, "the screen after the stall")
    # the UI says it lost events, and re-read the timeline: the death of a path and the
    # move to the path now active are in it
    lost = re.search(r"LOST\s+(\d+) events lost", screen)
    assert lost is not None and int(lost.group(1)) > 0, screen
    dead = re.search(r"DEAD\s+path (\d)", screen)
    assert dead is not None, screen
    active = ACTIVE.search(screen)
    assert active is not None and active.group(1) != dead.group(1), screen
    to = active.group(1)
    assert re.search(rf"SWITCH\s+\d → {to}|REATT ✓ → {to}", screen), screen
    tmux.keys("q")
    tmux.wait(lambda s: "Session" not in s, "the UI to quit")
