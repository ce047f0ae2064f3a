"""Event sinks seen from outside a headless client (issue 12, item 8 b-c; item 7 log file).

docs/client.md "Event sinks": a sink that cannot work at start is one ``warning:`` line on
stderr (and a SINK_HEALTH event), or exit 2 when ``[events] required`` names it; while
the client runs, SINK_HEALTH and EVENT_LOSS lines appear on stdout as they happen (not
only in the final ENGINE_STOPPED line); the log file gets every stdout and stderr line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from loopback_gateway import LoopbackGateway

from tunnel.client.config import load_client_config
from tunnel.client.sinks import check_sinks
from tunnel.core.handshake import generate_keypair
from tunnel.keys import encode_key

ROOT = Path(__file__).parent.parent


def write_config(
    tmp_path: Path, private: bytes, gateway_public: bytes, gateway: str, events: str
) -> Path:
    config = tmp_path / "client.toml"
    config.write_text(
        f'private_key = "{encode_key(private)}"\n'
        f'gateway_public_key = "{encode_key(gateway_public)}"\n'
        f'[[path]]\nname = "lo1"\ngateway = "{gateway}"\nbind = "127.0.0.1"\n'
        f'[inner]\nkind = "memory"\nrate_pps = 20\n'
        f"[events]\n{events}\n"
    )
    return config


def run(args: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


@pytest.mark.parametrize(
    ("events", "problem"),
    [
        ('jsonl = "{tmp}/missing/events.jsonl"\nrequired = ["jsonl"]',
         "directory {tmp}/missing does not exist"),
        ('syslog = "udp://no-such-host.invalid:514"\nrequired = ["syslog"]',
         "cannot resolve syslog host 'no-such-host.invalid'"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("program", [["-m", "tunnel.client.headless"], ["-m", "jvpn_tui"]])
def test_a_required_sink_that_cannot_work_refuses_the_start_in_one_line(
    tmp_path: Path, events: str, problem: str, program: list[str]
) -> None:
    private, _ = generate_keypair()
    _, gateway_public = generate_keypair()
    config = write_config(
        tmp_path, private, gateway_public, "127.0.0.1:9", events.format(tmp=tmp_path)
    )
    args = [*program, "--config", str(config)]
    if program[-1] == "jvpn_tui":
        args.append("--headless")
    proc = run(args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("jvpn-tui: event sink ")
    assert problem.format(tmp=tmp_path) in lines[0]
    assert "required" in lines[0] and "not starting" in lines[0]


def test_required_must_name_a_configured_sink(tmp_path: Path) -> None:
    private, gateway_public = generate_keypair()
    config = write_config(tmp_path, private, gateway_public, "127.0.0.1:9", 'required = ["jsonl"]')
    proc = run(["-m", "tunnel.client.headless", "--config", str(config)])
    assert proc.returncode == 2
    assert "events.required" in proc.stderr and "set events.jsonl" in proc.stderr


def test_a_sink_that_cannot_work_is_one_warning_then_live_health_and_loss_on_stdout(
    tmp_path: Path,
) -> None:
    """Not required: the client starts, says so once on stderr; its JSONL sink fails, gives
    lines up after their retries and loses them: SINK_HEALTH and EVENT_LOSS are on stdout
    while the session runs (before SESSION_TERMINATED), and the log file has it all."""
    private, public = generate_keypair()
    missing = tmp_path / "missing" / "events.jsonl"
    log = tmp_path / "client.log"
    with LoopbackGateway(public) as gw:
        host, port = gw.address
        config = write_config(
            tmp_path, private, gw.public_key, f"{host}:{port}",
            f'jsonl = "{missing}"\nlog_file = "{log}"',
        )  # fmt: skip
        assert [p.key for p in check_sinks(load_client_config(config))] == ["jsonl"]
        proc = run(["-m", "tunnel.client.headless", "--config", str(config), "--duration", "5"])
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr.splitlines()
    assert err[0] == (
        f"jvpn-tui: warning: event sink jsonl:events.jsonl cannot work: directory "
        f"{missing.parent} does not exist; starting anyway (its events are retried and "
        "counted as lost meanwhile)"
    )
    assert any(line.startswith("jvpn-tui: event sink jsonl:events.jsonl failing") for line in err)
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    types = [e["event_type"] for e in events]
    end = types.index("SESSION_TERMINATED")
    health = [e for e in events[:end] if e["event_type"] == "SINK_HEALTH"]
    assert health and health[0]["sink"] == "jsonl:events.jsonl"
    assert (health[0]["previous_state"], health[0]["state"]) == ("ok", "failing")
    assert str(missing.parent) in health[0]["last_error"]
    loss = [e for e in events[:end] if e["event_type"] == "EVENT_LOSS"]
    assert loss and loss[0]["sink"] == "jsonl:events.jsonl" and loss[0]["dropped"] >= 1
    assert loss[0]["reason"] == "sink_failing"
    last = events[-1]
    assert last["event_type"] == "ENGINE_STOPPED"
    assert last["observability"]["sinks"][0]["state"] == "failing"
    # The log file: every stdout and stderr line, stderr's with the program's prefix.
    logged = log.read_text().splitlines()
    assert logged[0] == err[0]
    assert sorted(logged) == sorted(proc.stdout.splitlines() + err)


def test_a_log_file_that_cannot_be_written_is_exit_2(tmp_path: Path) -> None:
    private, gateway_public = generate_keypair()
    config = write_config(tmp_path, private, gateway_public, "127.0.0.1:9", "")
    where = tmp_path / "nodir" / "client.log"
    proc = run(["-m", "tunnel.client.headless", "--config", str(config), "--log-file", str(where)])
    assert proc.returncode == 2
    assert proc.stderr == f"jvpn-tui: log file {where}: directory {where.parent} does not exist\n"
    assert proc.stdout == ""
