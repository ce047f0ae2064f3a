"""``jvpn-tui --headless``: the client engine without a UI, one JSON event per line.

:func:`run_headless` starts an engine, drains its UiChannel every 50 ms and prints each
event (``Event.to_dict()``) as one compact JSON line on ``out``. Snapshots are not
printed; when the engine has stopped, one last line of type ``ENGINE_STOPPED`` carries
``final_reason``, ``exit_code``, ``handshake_failure`` and the inner traffic counters. An
engine error, or the engine's explanation of the final reason (a session that never
started: what came back, the client's key fingerprint), is also one line on stderr.
SIGINT and SIGTERM end the session explicitly (TERMINATE sent, reason
``operator_terminated``; a kill switch is released then, and kept after any other end, with
one line on stderr saying how to release it), SIGHUP reloads the policy; ``duration``
seconds after the start the same explicit terminate happens.
The return value is :func:`tunnel.client.engine.exit_code_for` of the final reason.

Event sinks: EVENT_LOSS and SINK_HEALTH lines appear on stdout as they happen (the
engine's pipeline reports them to the channel); a SINK_HEALTH change is also one line on
stderr. A sink that cannot work at start is one ``warning:`` line on stderr, or refuses
the start (exit 2) when ``[events] required`` names it (:mod:`tunnel.client.sinks`).
The log file (``--log-file`` or ``[events] log_file``) gets every stdout and stderr line
too, in order, rotated by size like a JSONL sink (10 MiB, 5 old files).

``python -m tunnel.client.headless --config client.toml`` (or ``--demo``) runs it directly.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any, Final, TextIO

from tunnel.api import (
    EngineHandle,
    EngineSnapshot,
    ReloadPolicy,
    Terminate,
    UiChannel,
    ui_queue_size,
)
from tunnel.client.config import ClientConfig, ConfigError, load_client_config
from tunnel.client.control import CONTROL_OFF, control_socket_for
from tunnel.client.engine import ENGINE_ERROR, ClientEngine, exit_code_for
from tunnel.client.sinks import check_sinks
from tunnel.observability import SINK_HEALTH, JsonlFileSink, sink_health_text

DRAIN_INTERVAL_S: Final = 0.05
"""How often the channel is drained (the engine never waits for us)."""

STOP_TIMEOUT_S: Final = 5.0
"""How long an explicit terminate may take before the engine is stopped hard."""

EXIT_CONFIG_ERROR: Final = 2
"""Bad command line, configuration or keymap: one line on stderr, nothing started."""

ENGINE_STOPPED_FIELDS: Final = {
    "final_reason": "Why the engine ended: a reason code, ``engine_error: <cause>``, or null.",
    "exit_code": "The process's exit status (Exit codes, below).",
    "handshake_failure": "With ``handshake_failed``: what came back before the deadline, "
    "``no_answer``, ``unverified_answer`` or ``gateway_under_load`` (docs/client.md); "
    "else null.",
    "session_id": "Hex id of the session (empty if none was created).",
    "traffic": "Inner traffic: ``tx_packets``, ``rx_packets``, ``tx_bytes``, ``rx_bytes``.",
    "ui_dropped": "Events the UI channel lost (its oldest, when events alone overflowed it).",
    "observability": "Event sinks at the end: ``ok`` (false while a sink failed or lost "
    "events), ``ring_dropped``, ``sinks`` (``name``, ``state``, ``dropped`` each).",
}
"""The fields of the last headless line, ``ENGINE_STOPPED`` (docs/events.md lists them)."""


PROG: Final = "jvpn-tui"


def build_engine_from_args(
    config: str | None,
    demo: bool,
    *,
    demo_script: bool = False,
    control: str | None = None,
    default_control: bool = False,
    warnings: list[str] | None = None,
) -> EngineHandle:
    """The engine the command line asks for; ConfigError with a clear message otherwise.

    ``demo_script``: the demo plays its scripted timeline from the start (with or
    without the UI: ``--demo`` always plays it). An event sink that cannot work is a
    ConfigError when ``[events] required`` names it, else a line added to ``warnings``.
    The UI channel's size is :data:`tunnel.api.UI_QUEUE_SIZE` unless the test knob
    :data:`tunnel.api.UI_QUEUE_SIZE_ENV` says otherwise.
    ``control``: ``--control-socket`` (a path or ``off``); else the config's
    ``control_socket``; else, with ``default_control``, the default path (best effort).
    The demo serves a control socket only when ``control`` names one.
    """
    try:
        channel = UiChannel(ui_queue_size(os.environ))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if demo:
        if config is not None:
            raise ConfigError("--demo runs without a configuration: drop --config")
        from tunnel.demo.scenario import DemoEngine

        socket = control_socket_for(CONTROL_OFF, control)
        return DemoEngine(script=demo_script, channel=channel, control=socket)
    if config is None:
        raise ConfigError("no configuration: give --config PATH (or --demo)")
    cfg = load_client_config(config)
    for problem in check_sinks(cfg):
        if problem.required:
            raise ConfigError(problem.line())
        if warnings is not None:
            warnings.append(problem.line())
    socket = control_socket_for(cfg.control_socket, control)
    if socket is not None and not socket.required and not default_control:
        socket = None
    return ClientEngine(cfg, channel=channel, control=socket)


LOG_FILE_HELP: Final = (
    "headless: also write every stdout and stderr line to this file (rotated at 10 MiB, "
    "5 old files kept); overrides [events] log_file"
)


def _line(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), default=str)


class _Output:
    """Where headless writes: events on ``out``, console lines on ``err``, both to the log
    file (if any) in the order they happen. A log file that fails is dropped with one line."""

    def __init__(self, out: TextIO, err: TextIO, log: JsonlFileSink | None) -> None:
        self._out = out
        self._err = err
        self._log = log

    def event(self, line: str) -> None:
        self._out.write(line + "\n")
        self._to_log(line)

    def console(self, text: str) -> None:
        self._err.write(f"{PROG}: {text}\n")
        self._err.flush()
        self._to_log(f"{PROG}: {text}")

    def flush(self) -> None:
        self._out.flush()

    def close(self) -> None:
        log, self._log = self._log, None
        if log is not None:
            log.close()

    def _to_log(self, line: str) -> None:
        log = self._log
        if log is None:
            return
        try:
            log.write(line)
        except OSError as exc:
            self.close()
            self.console(f"log file {log.path}: {exc.strerror or exc}; no longer written")


class _Drain:
    """Drains the engine's channel: events printed as JSON lines, the last snapshot kept."""

    def __init__(self, engine: EngineHandle, out: _Output) -> None:
        self._engine = engine
        self._out = out
        self._notices = 0
        self.last: EngineSnapshot | None = None
        """The newest snapshot seen."""
        self.final: EngineSnapshot | None = None
        """The engine's last snapshot (``running`` False), once seen."""

    def once(self) -> None:
        for item in self._engine.channel.drain():
            if isinstance(item, EngineSnapshot):
                self.last = item
                if not item.running:
                    self.final = item
            else:
                event = dict(item)
                self._out.event(_line(event))
                if event.get("event_type") == SINK_HEALTH:
                    self._out.console(sink_health_text(event))
        self._out.flush()
        notices: list[str] = getattr(self._engine, "notices", [])
        for notice in notices[self._notices :]:
            self._out.console(notice)
            self._notices += 1

    def until_stopped(self, stop_at: float | None) -> EngineSnapshot | None:
        """Drain until the engine's final snapshot; at ``stop_at`` end the session."""
        engine = self._engine
        while self.final is None:
            ended = engine.join(DRAIN_INTERVAL_S)
            self.once()
            if ended and self.final is None:
                return getattr(engine, "final_snapshot", None) or self.last
            if stop_at is not None and time.monotonic() >= stop_at:
                stop_at = None
                _terminate(engine)
        return self.final


def _terminate(engine: EngineHandle) -> None:
    """End the session explicitly (TERMINATE sent), waking the engine if it can be woken."""
    engine.commands.send(Terminate())
    notify = getattr(engine, "notify", None)
    if notify is not None:
        notify()


def _install_signals(engine: EngineHandle) -> dict[signal.Signals, Any]:
    """SIGINT/SIGTERM terminate, SIGHUP reloads the policy (main thread only); returns the
    handlers they replace."""

    def on_signal(signum: int, frame: FrameType | None) -> None:
        del frame
        if signum == signal.SIGHUP:
            engine.commands.send(ReloadPolicy())
        else:
            _terminate(engine)

    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, on_signal)
    return previous


def _summary(reason: str | None, code: int, final: EngineSnapshot | None) -> dict[str, Any]:
    """The ENGINE_STOPPED line."""
    summary: dict[str, Any] = {"event_type": "ENGINE_STOPPED", "final_reason": reason}
    summary["exit_code"] = code
    if final is None:
        return summary
    summary["handshake_failure"] = final.handshake_failure
    t = final.traffic
    summary["session_id"] = final.session.session_id
    summary["traffic"] = {
        "tx_packets": t.tx_packets, "rx_packets": t.rx_packets,
        "tx_bytes": t.tx_bytes, "rx_bytes": t.rx_bytes,
    }  # fmt: skip
    summary["ui_dropped"] = final.ui_dropped
    obs = final.observability
    summary["observability"] = {
        "ok": obs.ok, "ring_dropped": obs.ring_dropped,
        "sinks": [{"name": s.name, "state": s.state, "dropped": s.dropped} for s in obs.sinks],
    }  # fmt: skip
    return summary


def _open_log(engine: EngineHandle, log_file: str | None) -> JsonlFileSink | None:
    """The log file (``log_file`` or the config's ``[events] log_file``), checked; a
    ConfigError when it cannot be written."""
    config = getattr(engine, "config", None)
    path = log_file or (config.log_file if isinstance(config, ClientConfig) else None)
    if path is None:
        return None
    log = JsonlFileSink(path, name="log")
    problem = log.check()
    if problem is not None:
        raise ConfigError(f"log file {path}: {problem}")
    return log


def run_headless(
    engine: EngineHandle,
    *,
    duration: float | None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    log_file: str | None = None,
    notes: Sequence[str] = (),
) -> int:
    """Run ``engine`` to its end, printing events; return the exit code.

    ``notes`` are console lines to print first (start-up warnings); ``log_file`` overrides
    the configuration's ``[events] log_file``. A log file that cannot be written is exit 2.
    """
    try:
        output = _Output(out, err, _open_log(engine, log_file))
    except ConfigError as exc:
        err.write(f"{PROG}: {exc}\n")
        return EXIT_CONFIG_ERROR
    try:
        return _run(engine, duration, output, notes)
    finally:
        output.close()


def _run(
    engine: EngineHandle, duration: float | None, output: _Output, notes: Sequence[str]
) -> int:
    for note in notes:
        output.console(note)
    stop_at = None if duration is None else time.monotonic() + max(0.0, duration)
    previous = _install_signals(engine)
    try:
        engine.start()
        final = _Drain(engine, output).until_stopped(stop_at)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        engine.stop(STOP_TIMEOUT_S)
    reason = final.final_reason if final is not None else getattr(engine, "final_reason", None)
    code = exit_code_for(reason)
    output.event(_line(_summary(reason, code, final)))
    output.flush()
    if reason is not None and reason.startswith(ENGINE_ERROR):
        output.console(reason.removeprefix(ENGINE_ERROR + ": "))
    elif final is not None and final.explanation:
        output.console(f"{reason}: {final.explanation}")
    notice = getattr(engine, "kill_switch_notice", None)
    if notice:  # the session ended abnormally and its kill switch stays: say how to release
        output.console(notice)
    return code


def release_kill_switch(out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """``jvpn-tui --release-kill-switch``: remove a kill switch left in place (this network
    namespace; no configuration needed); one line per route removed. 0, or 1 on failure."""
    from tunnel.io.killswitch import KillSwitchError, release

    try:
        removed = release()
    except KillSwitchError as exc:
        err.write(f"jvpn-tui: cannot release the kill switch: {exc}\n")
        return 1
    for route in removed:
        out.write(f"removed {route}\n")
    if not removed:
        out.write("no kill switch installed\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tunnel.client.headless",
        description="jvpn client engine without a UI",
        allow_abbrev=False,
    )
    parser.add_argument("--config", metavar="PATH", help="client configuration file (TOML)")
    parser.add_argument("--demo", action="store_true", help="embedded loopback demo")
    parser.add_argument("--duration", type=float, metavar="SECONDS", help="stop after this")
    parser.add_argument("--control-socket", metavar="PATH", help='control socket, or "off"')
    parser.add_argument("--log-file", metavar="PATH", help=LOG_FILE_HELP)
    args = parser.parse_args(argv)
    warnings: list[str] = []
    try:
        engine = build_engine_from_args(
            args.config, args.demo, demo_script=True, control=args.control_socket,
            default_control=True, warnings=warnings,
        )  # fmt: skip
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    return run_headless(engine, duration=args.duration, log_file=args.log_file, notes=warnings)


if __name__ == "__main__":
    raise SystemExit(main())
