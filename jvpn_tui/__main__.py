"""``jvpn-tui``: the jvpn client, as a Textual terminal UI or headless.

``jvpn-tui --demo`` runs a complete setup on loopback (no root, no config);
``jvpn-tui --config client.toml`` runs the real client; ``--headless`` runs either
without a UI and prints one JSON event per line; ``--attach [SOCKET]`` shows and drives a
client that already runs, through its control socket (quitting detaches: the client runs
on). The engine modules are imported only when they are needed, and ``--headless`` never
imports Textual.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from jvpn_tui.keymap import KeymapError, check_keymap, load_keymap
from tunnel.version import package_version

PROG = "jvpn-tui"
THEMES = ("dark", "light", "high-contrast")
"""Palette names (``themes/<name>.tcss``); kept here so --help needs no Textual."""
FAKE_SCENARIOS = ("healthy", "mid-switch", "degraded")
FAKE_PERIOD_S = 0.1
"""--fake-engine answers commands and publishes every 100 ms (a 10 Hz engine)."""
EXIT_ATTACH_FAILED: Final = 3
"""--attach: no client could be reached at the socket (none there, permission denied, not
a client's, another protocol), or it went away without a final word while attached."""
ATTACH_ALONE: Final = ("demo", "headless", "config", "control_socket", "fake_engine")
"""Options that start an engine, so they make no sense with --attach."""

EPILOG = """\
keys (remappable by binding id, see --keymap; ? in the UI lists them all):
  1-9 switch to path N    a auto-switch on/off   r force reattach   p reload policy
  t terminate (asks)      ? help                 q quit (attached: detach)  ctrl+p palette
  below 150x40 one page at a time: o overview, c trends, e timeline, s security,
  h observability (PgUp/PgDn/Home/End scroll a long page)
  demo only: the demo script (loss, path death, replay, restore) plays from the start;
  g pauses and resumes it (replays it once finished), k kill the active path, u restore
  all paths, l 30% loss on the active path, x inject a replay, b NAT rebind

examples:
  jvpn-tui --demo                          the zero-setup demo; its script plays at once
  jvpn-tui --demo --headless --duration 20 the same without UI, JSON events on stdout;
                                           plays the demo script (a switch, a recovery
                                           and a rejected replay within 20 s)
  jvpn-tui --config client.toml --theme light
  jvpn-tui --attach                        show and drive the client that runs as a service
                                           (its default control socket); q detaches
  NO_COLOR=1 jvpn-tui --demo               no colours
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="jvpn client: a session that outlives any one UDP path.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    parser.add_argument(
        "--demo",
        action="store_true",
        help="run a complete local setup on loopback (embedded gateway, impairment relay, "
        "loopback paths, inner traffic): no root, no config",
    )
    parser.add_argument(
        "--headless",
        action="store_true",
        help="run the engine without a UI; print one JSON event per line on stdout",
    )
    parser.add_argument("--config", metavar="PATH", help="client configuration file (TOML)")
    parser.add_argument(
        "--attach",
        metavar="SOCKET",
        nargs="?",
        const="",
        help="show and drive a client that already runs (jvpn-tui --headless, a service) "
        "through its control socket (default: /run/jvpn/client.sock as root, else "
        "$XDG_RUNTIME_DIR/jvpn/client.sock); quitting detaches, the tunnel stays up",
    )
    parser.add_argument(
        "--control-socket",
        metavar="PATH",
        help="serve the control socket (jvpn status, jvpn-tui --attach) at PATH, or 'off'; "
        "default: control_socket of the config, else /run/jvpn/client.sock as root "
        "($XDG_RUNTIME_DIR/jvpn/client.sock otherwise); --demo serves one only at PATH",
    )
    parser.add_argument(
        "--log-file",
        metavar="PATH",
        help="with --headless: also write every stdout and stderr line to this file "
        "(rotated at 10 MiB, 5 old files kept); overrides [events] log_file",
    )
    parser.add_argument(
        "--duration",
        metavar="SECONDS",
        type=float,
        help="stop after this many seconds (UI and headless)",
    )
    parser.add_argument(
        "--theme",
        choices=THEMES,
        default="dark",
        help="colour theme of the UI (default: dark; also in the command palette). "
        "NO_COLOR in the environment turns colours off",
    )
    parser.add_argument(
        "--keymap",
        metavar="PATH",
        help="TOML file whose [keymap] table remaps keys by binding id, "
        'e.g. "jvpn.terminate" = "T"; overrides the [keymap] of the client config '
        "for the binding ids it names",
    )
    parser.add_argument(
        "--release-kill-switch",
        action="store_true",
        help="remove a kill switch an abnormal end left in place (routes of protocol 106 "
        "in this network namespace; docs/client.md, Kill switch), then exit; needs root",
    )
    parser.add_argument(
        "--fake-engine",
        metavar="SCENARIO",
        choices=FAKE_SCENARIOS,
        help="UI development: drive the UI with the scripted fake engine "
        f"({', '.join(FAKE_SCENARIOS)}); no network",
    )
    return parser


def _fail(message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.release_kill_switch:
        from tunnel.client.headless import release_kill_switch

        released: int = release_kill_switch()
        return released
    if args.duration is not None and args.duration <= 0:
        return _fail("--duration must be a positive number of seconds")
    keymap: dict[str, str] = {}
    if args.keymap is not None:
        try:
            keymap = load_keymap(args.keymap)
        except KeymapError as exc:
            return _fail(str(exc))

    if args.attach is not None:
        return _attach(args, keymap)
    if args.fake_engine is not None:
        if args.headless:
            return _fail("--fake-engine drives the UI only; it cannot run --headless")
        from jvpn_tui.fake_engine import FakeEngine

        fake = FakeEngine(args.fake_engine, demo=args.demo, period=FAKE_PERIOD_S)
        return _run_ui(fake, args, keymap)

    try:
        from tunnel.client.config import ConfigError
        from tunnel.client.headless import build_engine_from_args, run_headless
    except ImportError as exc:
        return _not_available(exc)
    warnings: list[str] = []  # event sinks that cannot work at start: one line each
    try:
        engine = build_engine_from_args(
            args.config, demo=args.demo, demo_script=args.demo, control=args.control_socket,
            default_control=True, warnings=warnings,
        )  # fmt: skip
    except ConfigError as exc:
        return _fail(str(exc))
    except ImportError as exc:  # e.g. the demo engine is not written yet
        return _not_available(exc)
    if args.headless:
        code: int = run_headless(
            engine, duration=args.duration, log_file=args.log_file, notes=warnings
        )
        return code
    for line in warnings:
        print(f"{PROG}: {line}", file=sys.stderr)
    try:
        keymap = {**config_keymap(engine), **keymap}
    except KeymapError as exc:
        return _fail(str(exc))
    return _run_ui(engine, args, keymap)


def _attach(args: argparse.Namespace, keymap: dict[str, str]) -> int:
    """``--attach [SOCKET]``: the UI on a running client; exit 3 when none answers."""
    clash = [f"--{name.replace('_', '-')}" for name in ATTACH_ALONE if getattr(args, name)]
    if clash:
        return _fail(f"--attach shows a client that already runs; it takes no {clash[0]}")
    from tunnel.control.protocol import ControlError, default_socket
    from tunnel.control.remote import RemoteEngine

    path = Path(args.attach) if args.attach else default_socket("client")
    try:
        remote = RemoteEngine(path)
    except ControlError as exc:
        print(f"{PROG}: cannot attach: {exc}", file=sys.stderr)
        return EXIT_ATTACH_FAILED
    try:
        ended = _ui(remote, args, keymap)
    finally:
        remote.stop()
    if isinstance(ended, int):
        return ended
    if remote.went_away is not None:
        print(f"{PROG}: detached: {remote.went_away}", file=sys.stderr)
        return EXIT_ATTACH_FAILED
    if ended is None:
        print(f"{PROG}: detached from {path}; the client runs on, its tunnel up", file=sys.stderr)
    return _ended(ended)


def config_keymap(engine: Any) -> dict[str, str]:
    """The ``[keymap]`` of the engine's client config, validated like ``--keymap``."""
    config = getattr(engine, "config", None)
    table = getattr(config, "keymap", None)
    if not table:
        return {}
    try:
        return check_keymap(dict(table))
    except KeymapError as exc:
        raise KeymapError(f"{getattr(config, 'source', '<config>')}: keymap: {exc}") from None


def _not_available(exc: ImportError) -> int:
    return _fail(
        f"the client engine is not available yet (missing module {exc.name or exc}); "
        "try --fake-engine healthy to see the UI"
    )


def _run_ui(engine: Any, args: argparse.Namespace, keymap: dict[str, str]) -> int:
    ended = _ui(engine, args, keymap)
    return ended if isinstance(ended, int) else _ended(ended)


def _ui(engine: Any, args: argparse.Namespace, keymap: dict[str, str]) -> int | str | None:
    """Run the UI: why its engine ended (None: the UI was quit), or an exit code when
    there is no terminal to run it on."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        # Without a terminal the UI would draw escape codes into a file or a pipe forever.
        return _fail(
            "the UI needs a terminal on stdin and stdout; without one (a service, nohup, "
            "cron, a pipe) run --headless, which prints JSON events on stdout, and see or "
            "drive it later from a terminal with --attach"
        )
    from jvpn_tui.app import JvpnApp

    app = JvpnApp(engine, theme=args.theme, keymap=keymap, duration=args.duration)
    app.run()
    notice = getattr(engine, "kill_switch_notice", None)
    if notice:
        print(f"{PROG}: {notice}", file=sys.stderr)
    return app.ended


def _ended(ended: str | None) -> int:
    """The exit status after the UI: 0 when it was quit, else the engine's final reason's."""
    if ended is None:
        return 0
    print(f"{PROG}: session ended: {ended}", file=sys.stderr)
    try:
        from tunnel.client.engine import exit_code_for
    except ImportError:
        return 0 if ended == "operator_terminated" else 1
    return exit_code_for(ended)


if __name__ == "__main__":
    raise SystemExit(main())
