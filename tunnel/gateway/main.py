"""``jvpn-gateway --config gateway.toml [--metrics HOST:PORT]``: the gateway program.

Start-up checks everything before the host changes: the configuration (values, then the
private key), the privilege and ``/dev/net/tun`` for the TUN, then binds the UDP
listeners and the metrics endpoint, and only then creates and configures the TUN. Every
failure is one line on stderr and its own exit code (``EXIT_*`` below, also in
``--help``). The session store (``[state]``) opens before the host changes; with the
sqlite store (the default) the sessions it holds resume at start and SIGINT/SIGTERM end
none of them (clients resume when the gateway is back); with the memory store
SIGINT/SIGTERM end every session (TERMINATE sent to the clients). Either way the host is
restored and the exit status is 0; SIGHUP reloads the policy file and the ``clients_dir`` files (a
skipped client file is one line on stderr). The ready line names the gateway's
key fingerprint; handshakes refused without an answer (unknown client key, another
gateway key) get rate-limited lines on stderr (:mod:`tunnel.gateway.console`).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

from tunnel.control.protocol import ControlError
from tunnel.core.events import Event, PolicyEvent
from tunnel.core.handshake import fingerprint, public_key
from tunnel.gateway.clients_reload import CLIENT_FILE_INVALID
from tunnel.gateway.config import (
    CONTROL_OFF,
    ConfigError,
    GatewayConfig,
    KeyFileError,
    load_gateway_config,
)  # fmt: skip
from tunnel.gateway.console import RefusalNotices, SessionNotices
from tunnel.gateway.gcfreeze import GcFreezer
from tunnel.gateway.resume import StateError
from tunnel.gateway.sinks import check_sinks
from tunnel.io.netconf import NetConfError
from tunnel.io.tun import TUN_CLONE_DEVICE, TunError
from tunnel.io.udp import PathError
from tunnel.observability.metrics import parse_host_port
from tunnel.observability.pipeline import SINK_HEALTH, sink_health_text
from tunnel.version import package_version

if TYPE_CHECKING:
    from tunnel.gateway.runtime import GatewayRuntime  # imported in main(), after --help
    from tunnel.gateway.workers import WorkerSlot

EXIT_OK: Final = 0
EXIT_ENGINE_FAILURE: Final = 1
EXIT_USAGE: Final = 2
EXIT_CONFIG: Final = 3
EXIT_KEY: Final = 4
EXIT_ADDRESS: Final = 5
EXIT_PRIVILEGE: Final = 6
EXIT_HOST_CONFIG: Final = 7

CAP_NET_ADMIN: Final = 12
"""Bit of CAP_NET_ADMIN in /proc/self/status CapEff."""

EXIT_STATUS: Final = (
    (
        EXIT_OK,
        "stopped by SIGINT/SIGTERM (host restored; sessions kept in the sqlite store, or "
        "terminated with the memory store)",
    ),
    (EXIT_ENGINE_FAILURE, "engine failure (sessions terminated with invariant_violation)"),
    (EXIT_USAGE, "bad command line"),
    (EXIT_CONFIG, "bad configuration value (file, key and value on stderr)"),
    (EXIT_KEY, "private key missing, unreadable, invalid or readable by every user"),
    (
        EXIT_ADDRESS,
        "a listen or metrics address cannot be bound (e.g. port in use), or the "
        "control socket cannot be created",
    ),
    (EXIT_PRIVILEGE, f"no privilege for the TUN (root or CAP_NET_ADMIN) or no {TUN_CLONE_DEVICE}"),
    (EXIT_HOST_CONFIG, "creating or configuring the TUN failed otherwise"),
)
"""(exit status, meaning): ``--help`` prints it, docs/events.md is generated from it."""

EPILOG = (
    "exit status:\n"
    + "".join(f"  {code}  {meaning}\n" for code, meaning in EXIT_STATUS)
    + "\nsignals: SIGHUP reloads the policy file (also reloaded when it changes on disk)"
    + "\nand the clients_dir files."
)


def _metrics_arg(text: str) -> tuple[str, int]:
    try:
        return parse_host_port(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jvpn-gateway",
        description="jvpn gateway: UDP listeners, TUN, session table, policy, event sinks.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    parser.add_argument(
        "--config", metavar="PATH", required=True, help="gateway configuration file (TOML)"
    )
    parser.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        type=_metrics_arg,
        help="serve Prometheus metrics here (loopback by default, e.g. 127.0.0.1:9108); "
        "overrides the file's metrics key",
    )
    parser.add_argument(
        "--control-socket",
        metavar="PATH",
        help="the control socket for jvpn status/watch/reload/terminate (docs/control.md); "
        'overrides [control] socket; "off" for none',
    )
    return parser


def _fail(code: int, message: str) -> int:
    print(f"jvpn-gateway: error: {message}", file=sys.stderr)
    return code


def _console(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _sink_report(event: Mapping[str, object]) -> None:
    """A sink's state changed (pipeline thread): one console line."""
    if event.get("event_type") == SINK_HEALTH:
        _console(f"jvpn-gateway: {sink_health_text(event)}")


def _has_net_admin() -> bool:
    if os.geteuid() == 0:
        return True
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        return False
    return False


def tun_precheck(config: GatewayConfig) -> str | None:
    """Why the TUN cannot be created (before anything changes), or None."""
    if config.inner_echo:
        return None
    if not os.path.exists(TUN_CLONE_DEVICE):
        return (
            f"{TUN_CLONE_DEVICE} does not exist — load the tun module (modprobe tun) or, in a "
            "container, pass the device in; or set inner_echo = true for a test gateway"
        )
    if not _has_net_admin():
        return (
            f"creating TUN {config.tun_name!r} needs root or CAP_NET_ADMIN — run as root, "
            "or set inner_echo = true for a test gateway without TUN"
        )
    return None


def _privilege_error(exc: TunError | NetConfError) -> bool:
    return exc.errno in (errno.EPERM, errno.EACCES, errno.ENOENT, errno.ENXIO, errno.ENODEV)


def _open(runtime: GatewayRuntime) -> int | None:
    """Open the runtime; the exit code (after the message) if that failed."""
    try:
        runtime.open()
    except PathError as exc:
        return _fail(EXIT_ADDRESS, str(exc))
    except ControlError as exc:
        return _fail(EXIT_ADDRESS, f"control socket: {exc}")
    except OSError as exc:  # the metrics listener
        return _fail(EXIT_ADDRESS, _metrics_error(runtime.metrics_address, exc))
    except (TunError, NetConfError) as exc:
        code = EXIT_PRIVILEGE if _privilege_error(exc) else EXIT_HOST_CONFIG
        return _fail(code, str(exc))
    return None


def _metrics_error(address: tuple[str, int] | None, exc: OSError) -> str:
    where = "{}:{}".format(*address) if address else "?"
    cause = os.strerror(exc.errno).lower() if exc.errno else str(exc)
    return f"cannot bind metrics endpoint {where}: {cause}"


def _control_warning(warning: str) -> None:
    print(
        f"jvpn-gateway: warning: no control socket: {warning} (set [control] socket or "
        "--control-socket to choose one)",
        file=sys.stderr,
    )


def _ready_line(runtime: GatewayRuntime, config: GatewayConfig) -> str:
    listening = ", ".join(f"{h}:{p}" for h, p in runtime.addresses)
    inner = f"inner {runtime.inner.name} {config.gateway_address}/{config.subnet.prefixlen}"
    if config.subnet6 is not None:
        inner += f" {config.gateway_address6}/{config.subnet6.prefixlen}"
    metrics = runtime.metrics_bound
    extra = f", metrics http://{metrics[0]}:{metrics[1]}/metrics" if metrics else ""
    if config.control_socket is not None:
        extra += f", control {config.control_socket}"
    key = f", key {fingerprint(public_key(config.private_key))}"
    return f"jvpn-gateway: node {config.node_id} listening on {listening}, {inner}{extra}{key}"


def _runtime(
    config: GatewayConfig,
    metrics: tuple[str, int] | None,
    console: Callable[[Event], None],
    slot: WorkerSlot | None,
) -> GatewayRuntime | int:
    """The runtime of ``config`` (its session store opened), or the exit code after the
    message when the store or its key cannot be used."""
    from tunnel.gateway.runtime import GatewayRuntime

    try:
        return GatewayRuntime.from_config(
            config, metrics=metrics, on_event=console, on_sink_report=_sink_report,
            **(slot.runtime_kwargs() if slot is not None else {}),
        )  # fmt: skip
    except StateError as exc:
        return _fail(EXIT_KEY if exc.key else EXIT_CONFIG, f"{config.source}: [state] {exc}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_gateway_config(args.config)
    except KeyFileError as exc:
        return _fail(EXIT_KEY, str(exc))
    except ConfigError as exc:
        return _fail(EXIT_CONFIG, str(exc))
    problem = tun_precheck(config)
    if problem is not None:
        return _fail(EXIT_PRIVILEGE, problem)
    for sink_problem in check_sinks(config):  # one line each; a required one stops here
        if sink_problem.required:
            return _fail(EXIT_CONFIG, sink_problem.line())
        _console(f"jvpn-gateway: {sink_problem.line()}")

    if args.control_socket is not None:
        off = args.control_socket.strip() in CONTROL_OFF
        control = None if off else Path(args.control_socket)
        config = dataclasses.replace(config, control_socket=control, control_required=not off)
    if config.workers > 1:
        return _supervise(config, args.metrics)
    return serve(config, args.metrics)


def _supervise(config: GatewayConfig, metrics: tuple[str, int] | None) -> int:
    """``workers`` > 1: bind the reuseport groups, then fork and watch the workers."""
    from tunnel.gateway.workers import supervise
    from tunnel.io.reuseport import ReuseportError

    try:
        supervisor = supervise(config, metrics, lambda c, slot: serve(c, None, slot))
    except ReuseportError as exc:
        return _fail(EXIT_HOST_CONFIG, str(exc))
    except PathError as exc:
        return _fail(EXIT_ADDRESS, str(exc))
    try:
        supervisor.open()
    except ControlError as exc:
        return _fail(EXIT_ADDRESS, f"control socket: {exc}")
    except OSError as exc:
        return _fail(EXIT_ADDRESS, _metrics_error(supervisor.metrics, exc))
    if supervisor.control_warning is not None:
        _control_warning(supervisor.control_warning)
    code = supervisor.run()
    if code == EXIT_OK:
        print(f"jvpn-gateway: stopped; {_kept(config)}, host restored", file=sys.stderr)
    return code


def _kept(config: GatewayConfig) -> str:
    """What a clean stop did to the sessions (docs/gateway.md, [state])."""
    return "sessions kept in the store" if config.state.persistent else "sessions terminated"


def serve(
    config: GatewayConfig, metrics: tuple[str, int] | None, slot: WorkerSlot | None = None
) -> int:
    """Run one gateway process (or worker ``slot``) until it stops: its exit status."""

    refusals = RefusalNotices(_console, fingerprint(public_key(config.private_key)))
    sessions = SessionNotices(_console)

    def console(event: Event) -> None:
        refusals.on_event(event)
        sessions.on_event(event)
        if isinstance(event, PolicyEvent) and event.policy_name == CLIENT_FILE_INVALID:
            _console(f"jvpn-gateway: skipped a client file: {event.detail}")
        if slot is not None:
            slot.on_event(event)

    runtime = _runtime(config, metrics, console, slot)
    if isinstance(runtime, int):
        return runtime
    if slot is not None:
        slot.attach(runtime)
    if not runtime.policy.ok:
        print(
            f"jvpn-gateway: warning: invalid policy, new sessions are denied until it is "
            f"fixed (then send SIGHUP or save the file): {runtime.policy.error}",
            file=sys.stderr,
        )
    failed = _open(runtime)
    if failed is not None:
        return failed
    if runtime.control_warning is not None:
        _control_warning(runtime.control_warning)
    ready = _ready_line(
        runtime,
        config if runtime.control is not None else dataclasses.replace(config, control_socket=None),
    )
    # short collector pauses with many sessions; undone when the gateway stops, so a
    # process that runs it in-line (tests) collects as before afterwards
    freezer = GcFreezer().install()
    runtime.set_gc_freezer(freezer)
    try:
        return _serve(runtime, config, ready, slot)
    finally:
        freezer.uninstall()


def _serve(
    runtime: GatewayRuntime, config: GatewayConfig, ready: str, slot: WorkerSlot | None
) -> int:
    """Run until a signal stops the gateway (or the engine fails); the exit code."""

    def on_ready() -> None:
        print(ready, file=sys.stderr, flush=True)
        _resume_lines(runtime, config)
        if slot is not None:
            slot.ready()

    try:
        runtime.run(install_signals=True, on_ready=on_ready)
    except (TunError, NetConfError) as exc:
        return _fail(EXIT_HOST_CONFIG, f"restoring the host failed: {exc}")
    if runtime.crash is not None:
        return _fail(EXIT_ENGINE_FAILURE, f"engine failure: {runtime.crash!r}")
    if slot is None:  # a worker's supervisor says it once for all
        print(f"jvpn-gateway: stopped; {_kept(config)}, host restored", file=sys.stderr)
    return EXIT_OK


def _resume_lines(runtime: GatewayRuntime, config: GatewayConfig) -> None:
    """After the ready line: what the start took over from the session store."""
    if runtime.persistence is None:
        return
    if config.cluster is not None:
        _console(
            f"jvpn-gateway: cluster node {config.cluster.node_id} on etcd "
            f"{','.join(config.cluster.endpoints)} (prefix {config.cluster.prefix}): "
            "sessions are taken over as their clients arrive"
        )
        return
    resumed, problems = runtime.resumed
    for line in problems:
        _console(f"jvpn-gateway: {line}")
    where = config.state.state_dir
    _console(f"jvpn-gateway: resumed {resumed} session(s) from the sqlite store in {where}")


if __name__ == "__main__":
    raise SystemExit(main())
