"""Headless mode: JSON lines out, explicit terminate on signals, documented exit codes."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from loopback_gateway import LoopbackGateway

from tunnel.client.config import ClientConfig, ConfigError, PathConfig
from tunnel.client.engine import ClientEngine, exit_code_for
from tunnel.client.headless import build_engine_from_args, run_headless
from tunnel.core.events import SessionTerminated
from tunnel.core.handshake import generate_keypair
from tunnel.core.policy import POLICY_DEFAULT
from tunnel.io.inner import MemoryInner

ROOT = Path(__file__).parent.parent


def engine_for(gw: LoopbackGateway, private: bytes, **changes: object) -> ClientEngine:
    paths = tuple(PathConfig(i, f"lo{i}", ("127.0.0.1", 0), None, gw.address) for i in (1, 2))
    cfg = ClientConfig(private_key=private, gateway_public_key=gw.public_key, paths=paths)
    if changes:
        cfg = dataclasses.replace(cfg, **changes)  # type: ignore[arg-type]
    return ClientEngine(cfg, inner=MemoryInner(rate_pps=50))


def parse(out: str) -> list[dict[str, object]]:
    lines = out.splitlines()
    assert lines, "nothing printed"
    return [json.loads(line) for line in lines]  # every line is one JSON object


def test_duration_prints_json_events_and_exits_0() -> None:
    private, public = generate_keypair()
    with LoopbackGateway(public) as gw:
        out = io.StringIO()
        code = run_headless(engine_for(gw, private), duration=1.0, out=out)
    assert code == 0
    events = parse(out.getvalue())
    types = [e["event_type"] for e in events]
    assert "SESSION_CREATED" in types and "TRANSPORT_ATTACHED" in types
    assert "SNAPSHOT" not in types
    last = events[-1]
    assert last["event_type"] == "ENGINE_STOPPED"
    assert (last["final_reason"], last["exit_code"]) == ("operator_terminated", 0)
    traffic = last["traffic"]
    assert isinstance(traffic, dict) and traffic["rx_packets"] > 0
    assert events[-2]["event_type"] == "SESSION_TERMINATED"


def test_sigterm_terminates_explicitly_and_exits_0() -> None:
    assert threading.current_thread() is threading.main_thread()
    private, public = generate_keypair()
    before = signal.getsignal(signal.SIGTERM)
    with LoopbackGateway(public) as gw:
        out = io.StringIO()
        timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
        timer.start()
        try:
            code = run_headless(engine_for(gw, private), duration=None, out=out)
        finally:
            timer.cancel()
        ends = [e for e in gw.call(lambda s: list(gw.events)) if isinstance(e, SessionTerminated)]
        for _ in range(100):  # the TERMINATE datagram may still be in flight
            if ends:
                break
            threading.Event().wait(0.02)
            ends = [
                e for e in gw.call(lambda s: list(gw.events)) if isinstance(e, SessionTerminated)
            ]
    assert code == 0
    assert signal.getsignal(signal.SIGTERM) is before  # handler restored
    assert parse(out.getvalue())[-1]["final_reason"] == "operator_terminated"
    assert ends and str(ends[0].reason_code) == "operator_terminated"  # gateway was told


def test_termination_reason_gives_its_exit_code() -> None:
    private, _ = generate_keypair()
    _, stranger = generate_keypair()
    with LoopbackGateway(stranger) as gw:  # refuses our key: the handshake fails
        policy = dataclasses.replace(POLICY_DEFAULT, handshake_timeout_ms=500, handshake_attempts=2)
        out = io.StringIO()
        code = run_headless(engine_for(gw, private, policy=policy), duration=None, out=out)
    assert code == exit_code_for("handshake_failed") and code >= 10
    assert parse(out.getvalue())[-1]["final_reason"] == "handshake_failed"


def test_engine_error_exit_code_and_stderr() -> None:
    private, public = generate_keypair()
    with LoopbackGateway(public) as gw:
        engine = engine_for(gw, private)
        bad_path = dataclasses.replace(engine.config.paths[0], bind=("192.0.2.77", 0))
        engine.config = dataclasses.replace(engine.config, paths=(bad_path,))
        out, err = io.StringIO(), io.StringIO()
        code = run_headless(engine, duration=None, out=out, err=err)
    assert code == 3
    assert err.getvalue().startswith("jvpn-tui: cannot bind UDP 192.0.2.77:0")


def test_build_engine_from_args_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no configuration: give --config PATH \(or --demo\)"):
        build_engine_from_args(None, False)
    with pytest.raises(ConfigError, match=r"nothere\.toml: no such file"):
        build_engine_from_args(str(tmp_path / "nothere.toml"), False)
    with pytest.raises(ConfigError, match=r"--demo runs without a configuration"):
        build_engine_from_args("x.toml", True)


def test_module_entry_point_reports_config_error_with_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tunnel.client.headless", "--config", str(tmp_path / "none.toml")],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"jvpn-tui: {tmp_path / 'none.toml'}: no such file"
    assert proc.stdout == ""
