"""The systemd units in dist/systemd (issue 12, item 7).

Their restart rules are keyed to the programs' own exit-code tables: a code that stops
meaning what the unit's comment says (a reason inserted, a constant renumbered) fails
here. ``systemd-analyze verify`` checks the syntax where it is installed.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from jvpn_tui.__main__ import _parser as client_parser
from tunnel.client import headless
from tunnel.client.engine import EXIT_UNKNOWN_REASON, exit_code_for, exit_code_table
from tunnel.gateway import main as gateway_main

UNITS = Path(__file__).resolve().parents[1] / "dist" / "systemd"
CLIENT = UNITS / "jvpn-client@.service"
GATEWAY = UNITS / "jvpn-gateway.service"

CLIENT_NO_RESTART = {
    "unknown_client_key", "protocol_version_mismatch", "wrong_gateway_key", "cipher_mismatch"
}
"""Session ends a restart cannot cure: the gateway will never take this client."""

GATEWAY_NO_RESTART = {
    gateway_main.EXIT_USAGE,
    gateway_main.EXIT_CONFIG,
    gateway_main.EXIT_KEY,
    gateway_main.EXIT_PRIVILEGE,
}
"""Start-up failures a restart cannot cure: the command line, configuration, key, host."""


def directives(unit: Path) -> dict[str, list[str]]:
    """``Section.Key`` -> every value (keys may repeat), comments skipped."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def one(unit: Path, key: str) -> str:
    values = directives(unit)[key]
    assert len(values) == 1, (key, values)
    return values[0]


def exit_groups(unit: Path) -> tuple[dict[int, str], dict[int, str]]:
    """The ``#   NN  meaning`` lines of the exit-code comment: (not restarted, restarted)."""
    text = unit.read_text()
    block = text[text.index("# Exit codes") : text.index("Restart=on-failure")]
    kept, _, restarted = block.partition("# Restarted")
    assert "# Not restarted" in kept

    def lines(part: str) -> dict[int, str]:
        found = re.findall(r"^#\s{3}(\d+)\s+(.+)$", part, re.M)
        return {int(code): meaning.strip() for code, meaning in found}

    return lines(kept), lines(restarted)


def prevented(unit: Path) -> set[int]:
    return {int(code) for code in one(unit, "Service.RestartPreventExitStatus").split()}


def test_client_unit_does_not_restart_exactly_what_a_restart_cannot_cure() -> None:
    by_reason = dict(exit_code_table())
    expected = {headless.EXIT_CONFIG_ERROR} | {by_reason[r] for r in CLIENT_NO_RESTART}
    assert prevented(CLIENT) == expected
    assert one(CLIENT, "Service.Restart") == "on-failure"  # exit 0, operator stop: no restart
    kept, restarted = exit_groups(CLIENT)
    assert set(kept) == expected
    assert "configuration" in kept.pop(headless.EXIT_CONFIG_ERROR)
    assert "not know" in restarted.pop(EXIT_UNKNOWN_REASON)
    assert len(restarted) >= 3
    for code, meaning in (kept | restarted).items():
        reason = "engine_error: x" if meaning == "engine_error" else meaning
        assert exit_code_for(reason) == code, (code, meaning)  # still means what it says
    assert not set(restarted) & expected


def test_gateway_unit_restart_rules_match_its_exit_status_table() -> None:
    assert prevented(GATEWAY) == GATEWAY_NO_RESTART
    assert one(GATEWAY, "Service.Restart") == "on-failure"
    kept, restarted = exit_groups(GATEWAY)
    assert set(kept) == GATEWAY_NO_RESTART
    meanings = dict(gateway_main.EXIT_STATUS)
    assert set(kept) | set(restarted) == set(meanings) - {gateway_main.EXIT_OK}
    for code, meaning in (kept | restarted).items():
        assert meanings[code] == meaning, (code, meaning)


@pytest.mark.parametrize(
    ("unit", "caps"),
    [(GATEWAY, {"CAP_NET_ADMIN"}), (CLIENT, {"CAP_NET_ADMIN", "CAP_NET_RAW"})],
)
def test_units_keep_only_the_capabilities_and_the_device_they_need(
    unit: Path, caps: set[str]
) -> None:
    d = directives(unit)
    assert set(one(unit, "Service.CapabilityBoundingSet").split()) == caps
    assert one(unit, "Service.NoNewPrivileges") == "yes"
    assert one(unit, "Service.DevicePolicy") == "closed"
    assert d["Service.DeviceAllow"] == ["/dev/net/tun rw"]
    assert "Service.PrivateDevices" not in d  # it would hide /dev/net/tun
    assert one(unit, "Service.ProtectSystem") == "strict"
    assert one(unit, "Service.LogsDirectory") == "jvpn"  # /var/log/jvpn, writable
    assert one(unit, "Service.ExecReload") == "/bin/kill -HUP $MAINPID"  # policy reload


def test_exec_start_lines_are_valid_command_lines_of_the_programs() -> None:
    client = shlex.split(one(CLIENT, "Service.ExecStart"))
    assert Path(client[0]).name == "jvpn-tui"
    args = client_parser().parse_args(client[1:])
    assert args.headless and args.config == "/etc/jvpn/%i.toml"
    assert args.log_file == "/var/log/jvpn/%i.log"
    assert args.control_socket == "/run/jvpn/%i.sock"  # one socket per instance
    gateway = shlex.split(one(GATEWAY, "Service.ExecStart"))
    assert Path(gateway[0]).name == "jvpn-gateway"
    assert gateway_main._parser().parse_args(gateway[1:]).config == "/etc/jvpn/gateway.toml"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify_finds_nothing(tmp_path: Path) -> None:
    """With the programs replaced by /bin/true (verify wants an existing executable)."""
    for unit, name in ((GATEWAY, GATEWAY.name), (CLIENT, "jvpn-client@office.service")):
        text = re.sub(r"/usr/local/bin/jvpn-\S+", "/bin/true", unit.read_text())
        (tmp_path / name).write_text(text)
        proc = subprocess.run(
            ["systemd-analyze", "verify", str(tmp_path / name)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert (proc.returncode, proc.stderr) == (0, ""), (name, proc.stderr)
