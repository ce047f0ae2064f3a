"""``jvpn``: its command line and its readable event lines (docs/control.md).

The command line: ``--help`` with examples and exit codes, ``--version``, usage errors
(exit 2, one usage line and the error), abbreviations refused, ``--socket``/``--gateway``
before or after the command. The event lines: every event type has its own line (a new
EventType without one fails here), and lines for real events read as documented.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, get_type_hints

import pytest

from tunnel.api import EventType
from tunnel.cli import parser
from tunnel.cli.events import RENDERERS, event_line
from tunnel.cli.text import Style, size, table
from tunnel.control.protocol import default_socket
from tunnel.core import events as core_events
from tunnel.core.events import Event, Reason

REPO = Path(__file__).resolve().parents[1]


def jvpn(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tunnel.cli", *args], cwd=REPO, capture_output=True, text=True,
        timeout=30, check=False, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip


def test_help_has_examples_commands_and_exit_codes() -> None:
    proc = jvpn("--help")
    assert proc.returncode == 0
    out = proc.stdout
    assert out.startswith("usage: jvpn ")
    for command in ("status", "watch", "switch", "auto", "reattach", "reload", "terminate"):
        assert f"\n    {command}" in out, command
    assert "examples:\n  jvpn status " in out
    assert "jvpn --gateway terminate 3fa2" in out
    assert "exit status:\n  0  done\n  1  the program refused" in out
    sub = jvpn("terminate", "--help")
    assert sub.returncode == 0 and "SESSION" in sub.stdout and "--gateway" in sub.stdout


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["switch"], "the following arguments are required: N"),
        (["switch", "0"], "path 0 does not exist: paths are 1-9"),
        (["switch", "two"], "'two' is not a path number (1-9)"),
        (["auto", "maybe"], "invalid choice: 'maybe'"),
        (["--sock=/x", "status"], "unrecognized arguments: --sock=/x"),
        (["status", "--js"], "unrecognized arguments: --js"),
        (["--socket", "/x", "--gateway", "status"], "not allowed with argument"),
        (["status", "--socket", "/x", "--gateway"], "not allowed with argument"),
        (["--socket", "/x", "status", "--gateway"], "not allowed with argument"),
        (["reload", "now"], "unrecognized arguments: now"),
    ],
)
def test_usage_errors_exit_2_naming_the_problem(argv: list[str], says: str) -> None:
    proc = jvpn(*argv)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.startswith("usage: jvpn")
    assert says in proc.stderr, proc.stderr


def test_version() -> None:
    proc = jvpn("--version")
    assert proc.returncode == 0
    assert proc.stdout.startswith("jvpn ") and len(proc.stdout.split()) == 2


def test_socket_and_gateway_are_taken_before_or_after_the_command() -> None:
    p = parser()
    for argv in (["--gateway", "status"], ["status", "--gateway"]):
        args = p.parse_args(argv)
        assert args.gateway is True and args.socket is None
    for argv in (["--socket", "/s", "watch"], ["watch", "--socket", "/s"]):
        args = p.parse_args(argv)
        assert args.socket == Path("/s") and args.gateway is False
    args = p.parse_args(["status"])
    assert args.socket is None and args.gateway is False
    assert default_socket("client").name == "client.sock"


def test_nothing_there_is_exit_3_and_names_the_default_socket(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_RUNTIME_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "tunnel.cli", "--gateway", "status"], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode == 3
    where = "/run/jvpn/gateway.sock" if os.geteuid() == 0 else f"{tmp_path}/jvpn/gateway.sock"
    assert (
        proc.stderr
        == (
            f"jvpn: no control socket at {where}: is the client or gateway running? "
            "(--socket names another path)\n"
        )
        or "another program" in proc.stderr
    )  # a real gateway on this host answers


# -- event lines -------------------------------------------------------------------------------


def event_classes() -> dict[EventType, type[Event]]:
    found: dict[EventType, type[Event]] = {}
    for obj in vars(core_events).values():
        if isinstance(obj, type) and issubclass(obj, Event) and obj is not Event:
            found[obj.event_type] = obj
    return found


def sample(cls: type[Event]) -> dict[str, Any]:
    """A real event of ``cls`` with a plausible value for every field, as its dict."""
    values: dict[str, Any] = {}
    for f in fields(cls):
        kind = str(get_type_hints(cls)[f.name])
        if "Reason" in kind:
            values[f.name] = Reason.MANUAL_SWITCH
        elif "bool" in kind:
            values[f.name] = True
        elif "tuple" in kind:
            values[f.name] = (("replay_detected", 3),)
        elif "float" in kind:
            values[f.name] = 12.5
        elif "int" in kind:
            values[f.name] = 2
        else:
            values[f.name] = "1234abcd5678" if f.name == "session_id" else f"<{f.name}>"
    values["ts_ms"] = 1_700_000_000_250
    return cls(**values).to_dict()


def test_every_event_type_has_its_own_line() -> None:
    """A new EventType without a renderer fails here, so `jvpn watch` shows every event
    docs/events.md lists (EVENT_LOSS comes from the pipeline, not from a core class)."""
    assert set(RENDERERS) == set(EventType)
    classes = event_classes()
    for event_type in EventType:
        if event_type is EventType.EVENT_LOSS:
            event = {"event_type": "EVENT_LOSS", "ts_ms": 1_700_000_000_250, "sink": "syslog",
                     "dropped": 12, "dropped_total": 40, "reason": "sink_slow"}  # fmt: skip
        elif event_type is EventType.SINK_HEALTH:  # from the pipeline too
            event = {"event_type": "SINK_HEALTH", "ts_ms": 1_700_000_000_250, "sink": "syslog",
                     "state": "lagging", "previous_state": "ok", "dropped_total": 40,
                     "last_error": "TimeoutError: timed out"}  # fmt: skip
        else:
            event = sample(classes[event_type])
        line = event_line(event)
        pipeline = (EventType.EVENT_LOSS, EventType.SINK_HEALTH)
        sid = "1234abcd" if event_type not in pipeline else "-"
        assert line.split()[1:3] == [sid, str(event_type)], line
        what = line.split(str(event_type), 1)[1].strip()
        assert what and "=" not in what, (event_type, line)  # not the generic key=value form


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (
            {"event_type": "TRANSPORT_SWITCH", "ts_ms": 0, "session_id": "3fa2c1d0ffff",
             "previous_transport": 1, "new_transport": 2, "reason_code": "manual_switch",
             "switch_latency_ms": 12.34, "binding_epoch": 3, "path": "lte"},
            "path 1 -> 2 (lte): manual_switch, 12.3 ms, epoch 3",
        ),
        (
            {"event_type": "TRANSPORT_SWITCH_DENIED", "ts_ms": 0, "session_id": "ab",
             "reason_code": "cooldown_active", "requested_transport": 2, "manual": True,
             "retry_after_ms": 1500.0},
            "switch to path 2 denied: cooldown_active (retry in 1s) [operator]",
        ),
        (
            {"event_type": "SESSION_TERMINATED", "ts_ms": 0, "session_id": "ab",
             "reason_code": "operator_terminated", "session_age_ms": 312_000.0,
             "total_switches": 2, "initiator": "peer"},
            "session ended: operator_terminated after 5m12s, 2 switches, by peer",
        ),
        (
            {"event_type": "STATE_CHANGE", "ts_ms": 0, "session_id": "ab", "state_version": 4,
             "previous_state": "ATTACHED", "new_state": "RECOVERING",
             "reason_code": "transport_dead", "from_transport": 1},
            "ATTACHED -> RECOVERING v4: transport_dead (path 1 was active)",
        ),
        (
            {"event_type": "NEW_KIND", "ts_ms": 0, "session_id": "", "answer": 42},
            "answer=42",
        ),
    ],
)  # fmt: skip
def test_event_lines_read_as_documented(event: dict[str, Any], expected: str) -> None:
    line = event_line(event)
    assert line.endswith(expected), line
    assert line.split()[1] == (str(event["session_id"])[:8] or "-")


def test_tables_align_and_colour_only_on_a_terminal() -> None:
    lines = table(("A", "LONGER"), [["xx", "1"], ["y", "22"]])
    assert lines == ["  A   LONGER", "  xx  1", "  y   22"]
    assert size(512) == "512 B" and size(1536) == "1.5 KiB" and size(3 * 1024**3) == "3.0 GiB"

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert Style.for_stream(io.StringIO(), {}).enabled is False  # a pipe or a file
    assert Style.for_stream(Tty(), {"TERM": "xterm"}).enabled is True
    assert Style.for_stream(Tty(), {"NO_COLOR": "1", "TERM": "xterm"}).enabled is False
    assert Style(False)("ATTACHED", "green") == "ATTACHED"


def test_a_death_the_kernel_reported_and_paths_that_come_and_go_read_as_such() -> None:
    """docs/client.md (Link monitor, paths = "auto"): a link_down death quotes the kernel;
    an auto path's arrival names its interface and address."""
    base = {"ts_ms": 0, "session_id": "3fa2c1d0aa", "transport_id": 2, "path": "wlan0"}
    dead = event_line({
        **base, "event_type": "TRANSPORT_DEAD", "silence_ms": 3.2, "reason_code": "link_down",
        "detail": "wlan0: carrier lost (kernel: RTM_NEWLINK wlan0 up, no carrier)",
    })  # fmt: skip
    assert "path 2 (wlan0) dead: link_down: wlan0: carrier lost" in dead
    silent = event_line({**base, "event_type": "TRANSPORT_DEAD", "silence_ms": 900.0})
    assert "dead after 900.0 ms of silence" in silent
    added = event_line({
        **base, "event_type": "PATH_ADDED", "interface": "wlan0", "address": "192.0.2.7",
    })  # fmt: skip
    assert "path 2 (wlan0) added (wlan0 192.0.2.7)" in added
    removed = event_line({**base, "event_type": "PATH_REMOVED", "detail": "wlan0 gone"})
    assert "path 2 (wlan0) removed: wlan0 gone" in removed
