"""jvpn-gateway's event sinks seen from outside (issue 12, item 8 a and c).

docs/gateway.md "Event sinks": a sink that cannot work at start is one ``warning:`` line
on stderr, or exit 3 (a configuration error) when its table says ``required = true``;
its state changes are lines on stderr as they happen, and ``jvpn_event_sink_up`` is 0
while it does not drain.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from test_gateway_config import BASE, make_keys

from tunnel.gateway import main as gateway_main

REPO = Path(__file__).resolve().parents[1]


def config(tmp_path: Path, sinks: str) -> Path:
    make_keys(tmp_path, "gateway", "alice")
    path = tmp_path / "gateway.toml"
    path.write_text(BASE.replace("inner_echo = true", 'inner_echo = true\nmetrics = "127.0.0.1:0"')
                    + sinks)  # fmt: skip
    return path


def test_a_required_sink_that_cannot_work_refuses_the_start(tmp_path: Path) -> None:
    missing = tmp_path / "missing" / "events.jsonl"
    path = config(tmp_path, f'[[sinks]]\ntype = "jsonl"\npath = "{missing}"\nrequired = true\n')
    proc = subprocess.run(
        [sys.executable, "-m", "tunnel.gateway.main", "--config", str(path)],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == gateway_main.EXIT_CONFIG
    assert proc.stderr == (
        f"jvpn-gateway: error: event sink jsonl:events.jsonl cannot work: directory "
        f"{missing.parent} does not exist (sinks[0].required = true; not starting)\n"
    )


def test_a_sink_that_cannot_work_is_a_warning_a_live_line_and_a_zero_gauge(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "missing" / "events.jsonl"
    path = config(tmp_path, f'[[sinks]]\ntype = "jsonl"\npath = "{missing}"\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunnel.gateway.main", "--config", str(path)],
        stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        lines = [proc.stderr.readline() for _ in range(3)]
        assert lines[0].startswith(
            f"jvpn-gateway: warning: event sink jsonl:events.jsonl cannot work: directory "
            f"{missing.parent} does not exist; starting anyway"
        )
        ready = next(line for line in lines if "listening on" in line)
        health = next(line for line in lines if "event sink jsonl:events.jsonl failing" in line)
        assert "(was ok, 0 lost)" in health and str(missing.parent) in health
        url = re.search(r"metrics (http://\S+/metrics)", ready)
        assert url is not None
        with urllib.request.urlopen(url.group(1).rstrip(","), timeout=10) as reply:
            text = reply.read().decode()
        assert 'jvpn_event_sink_up{sink="jsonl:events.jsonl"} 0.0' in text.splitlines()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == gateway_main.EXIT_OK
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
