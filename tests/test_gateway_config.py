"""The gateway configuration file and the jvpn-gateway program's start-up errors.

Every bad value names file, key and value; the private key has its own checks (missing,
invalid, readable by everyone) and its own exit code; the program exits with a distinct
code per failure class, each checked through a real subprocess, before the host changes.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tunnel.core.handshake import generate_keypair
from tunnel.gateway import main as gateway_main
from tunnel.gateway.config import (
    ConfigError,
    KeyFileError,
    load_gateway_config,
    parse_gateway_config,
)
from tunnel.keys import encode_key, write_private_key, write_public_key

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "docs" / "examples" / "gateway.toml"


def make_keys(directory: Path, *names: str) -> dict[str, bytes]:
    publics: dict[str, bytes] = {}
    for name in names:
        private, public = generate_keypair()
        write_private_key(directory / f"{name}.key", private)
        write_public_key(directory / f"{name}.pub", public)
        publics[name] = public
    return publics


BASE = """\
node_id = "gw-t"
listen = ["127.0.0.1:0"]
private_key = "gateway.key"
workers = 1
inner_echo = true
[control]
socket = "off"
[state]
store = "memory"
[tun]
subnet = "10.70.0.0/29"
[[clients]]
name = "alice"
public_key = "alice.pub"
"""
ECHO = "inner_echo = true"


@pytest.fixture
def confdir(tmp_path: Path) -> Path:
    make_keys(tmp_path, "gateway", "alice", "bob")
    return tmp_path


def write(confdir: Path, text: str) -> Path:
    path = confdir / "gateway.toml"
    path.write_text(text)
    return path


def test_the_documented_example_loads(confdir: Path) -> None:
    """As the quick start copies it: next to gateway.key, alice.pub and policy.toml."""
    (confdir / "bob.pub").unlink()  # the quick start makes no bob
    shutil.copy(EXAMPLE, confdir / "gateway.toml")
    (confdir / "policy.toml").write_text("")
    config = load_gateway_config(confdir / "gateway.toml")
    assert config.node_id == "gw1"
    assert config.listen == (("0.0.0.0", 51820),)
    assert [(c.name, c.inner_address) for c in config.clients] == [("alice", "10.66.0.2")]
    assert config.gateway_address == "10.66.0.1"
    assert config.subnet == ipaddress.IPv4Network("10.66.0.0/24")
    assert config.policy_path == confdir / "policy.toml"
    # sinks that need nothing else: a JSONL file next to the config (syslog commented out)
    assert [(s.kind, s.path) for s in config.sinks] == [("jsonl", confdir / "gateway-events.jsonl")]
    assert config.metrics == ("127.0.0.1", 9108)
    assert not config.inner_echo and config.tun_name == "jvpn%d" and config.mtu == 1420
    assert encode_key(config.private_key) not in repr(config)


def test_pool_skips_gateway_and_explicit_addresses_and_runs_out(confdir: Path) -> None:
    extra = "".join(
        f'[[clients]]\nname = "c{i}"\npublic_key = "{encode_key(generate_keypair()[1])}"\n'
        for i in range(4)
    )
    text = BASE.replace(
        'public_key = "alice.pub"', 'public_key = "alice.pub"\naddress = "10.70.0.3"'
    )
    config = load_gateway_config(write(confdir, text + extra))
    assert [c.inner_address for c in config.clients] == [
        "10.70.0.3", "10.70.0.2", "10.70.0.4", "10.70.0.5", "10.70.0.6",
    ]  # fmt: skip
    more = f'[[clients]]\nname = "c9"\npublic_key = "{encode_key(generate_keypair()[1])}"\n'
    with pytest.raises(ConfigError, match="no free address left in the pool for client 'c9'"):
        load_gateway_config(write(confdir, text + extra + more))


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('listen = ["127.0.0.1:0"]', 'listen = ["localhost:51820"]',
         "listen = 'localhost:51820': host must be a numeric IP address"),
        ('listen = ["127.0.0.1:0"]', 'listen = ["127.0.0.1:70000"]', "listen = '127.0.0.1:70000'"),
        ('listen = ["127.0.0.1:0"]', "listen = []", "listen = []"),
        ('node_id = "gw-t"', 'node_id = "gw t"', "node_id = 'gw t'"),
        ("inner_echo = true", 'inner_echo = "yes"', "inner_echo = 'yes': must be true or false"),
        (ECHO, ECHO + "\nmtu = 9000", "mtu = 9000: must be in [576, 1500]"),
        (ECHO, ECHO + "\nmtu = 1400.0", "mtu = 1400.0: must be an integer"),
        (ECHO, ECHO + '\nmetrics = "127.0.0.1"', "metrics = '127.0.0.1'"),
        (ECHO, ECHO + "\nlisten_port = 1", "listen_port = 1: unknown key"),
        ('subnet = "10.70.0.0/29"', 'subnet = "10.70.0.1/29"', "tun.subnet = '10.70.0.1/29'"),
        ('subnet = "10.70.0.0/29"', 'subnet = "fd00::/64"', "the inner subnet must be IPv4"),
        ('subnet = "10.70.0.0/29"', 'subnet = "10.70.0.0/29"\naddress = "10.71.0.1"',
         "tun.address = '10.71.0.1': not in the inner subnet"),
        ('public_key = "alice.pub"', 'public_key = "alice.pub"\naddress = "10.70.0.1"',
         "clients[0].address = '10.70.0.1': already used by the gateway"),
        ('public_key = "alice.pub"', 'public_key = "alice.pub"\naddress = "10.70.0.7"',
         "is the network or broadcast address"),
        ('public_key = "alice.pub"', 'public_key = "nope.pub"',
         "clients[0].public_key = 'nope.pub': public key of client 'alice' file nope.pub: no such"),
        ('public_key = "alice.pub"', 'public_key = "' + "A" * 43 + '="',
         "not a usable X25519 public key"),
        ('name = "alice"', 'name = "alice"\nrole = "admin"', "clients[0].role = 'admin': unknown"),
        ('[[clients]]\nname = "alice"\npublic_key = "alice.pub"\n', "", "clients: missing"),
        ("inner_echo = true", 'inner_echo = true\n[[sinks]]\ntype = "kafka"',
         "sinks[0].type = 'kafka': must be one of: jsonl, syslog, stdout"),
        ("inner_echo = true", 'inner_echo = true\n[[sinks]]\ntype = "syslog"\naddress = "h:0"',
         "sinks[0].address = 'h:0'"),
        ("inner_echo = true", 'inner_echo = true\n[[sinks]]\ntype = "jsonl"',
         "sinks[0].path: missing"),
        ('node_id = "gw-t"', "node_id = [", "(syntax): invalid TOML"),
    ],
)  # fmt: skip
def test_bad_values_name_file_key_and_value(
    confdir: Path, old: str, new: str, expected: str
) -> None:
    assert old in BASE
    path = write(confdir, BASE.replace(old, new))
    with pytest.raises(ConfigError) as info:
        load_gateway_config(path)
    assert not isinstance(info.value, KeyFileError)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert expected in message


def test_duplicate_clients_are_refused(confdir: Path) -> None:
    twice = BASE + '[[clients]]\nname = "alice"\npublic_key = "bob.pub"\n'
    with pytest.raises(ConfigError, match=r"clients\[1\].name = 'alice': another client"):
        load_gateway_config(write(confdir, twice))
    same_key = BASE + '[[clients]]\nname = "bob"\npublic_key = "alice.pub"\n'
    with pytest.raises(ConfigError, match="same key as client 'alice'"):
        load_gateway_config(write(confdir, same_key))


def test_private_key_problems_are_key_file_errors(confdir: Path) -> None:
    path = write(confdir, BASE)
    key = confdir / "gateway.key"
    os.chmod(key, 0o644)
    with pytest.raises(
        KeyFileError, match=r"accessible by every user \(mode 0644\); run: chmod 600"
    ):
        load_gateway_config(path)
    os.chmod(key, 0o640)  # group-readable is an operator's choice
    assert load_gateway_config(path).private_key_path == key
    key.write_text("not a key\n")
    with pytest.raises(KeyFileError, match=r"private_key = .*not valid base64"):
        load_gateway_config(path)
    key.unlink()
    with pytest.raises(KeyFileError, match="no such file"):
        load_gateway_config(path)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_gateway_config(tmp_path / "absent.toml")


# -- the program --------------------------------------------------------------------------


def run_program(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tunnel.gateway.main", *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )  # fmt: skip


def test_program_exit_codes_for_config_key_and_port_problems(confdir: Path) -> None:
    bad = write(confdir, BASE.replace("inner_echo = true", "inner_echo = true\nmtu = 5"))
    result = run_program("--config", str(bad))
    assert result.returncode == gateway_main.EXIT_CONFIG
    assert result.stderr.strip().splitlines() == [
        f"jvpn-gateway: error: {bad}: mtu = 5: must be in [576, 1500]"
    ]

    good = write(confdir, BASE)
    (confdir / "gateway.key").rename(confdir / "moved.key")
    result = run_program("--config", str(good))
    assert result.returncode == gateway_main.EXIT_KEY
    assert "private_key" in result.stderr and "no such file" in result.stderr
    assert "Traceback" not in result.stderr
    (confdir / "moved.key").rename(confdir / "gateway.key")

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        busy = write(confdir, BASE.replace("127.0.0.1:0", f"127.0.0.1:{port}"))
        result = run_program("--config", str(busy))
    assert result.returncode == gateway_main.EXIT_ADDRESS
    assert f"cannot bind UDP 127.0.0.1:{port}: address already in use" in result.stderr

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_program("--config", str(good), "--metrics", f"127.0.0.1:{port}")
    assert result.returncode == gateway_main.EXIT_ADDRESS
    assert f"cannot bind metrics endpoint 127.0.0.1:{port}" in result.stderr

    result = run_program("--config", str(good), "--metrics", "somewhere")
    assert result.returncode == gateway_main.EXIT_USAGE


def test_program_without_tun_privilege_fails_before_changing_anything(
    confdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(confdir, BASE.replace("inner_echo = true", "inner_echo = false"))
    monkeypatch.setattr(gateway_main, "_has_net_admin", lambda: False)
    opened: list[object] = []
    monkeypatch.setattr(gateway_main, "load_gateway_config", _spy(load_gateway_config, opened))
    assert gateway_main.main(["--config", str(path)]) == gateway_main.EXIT_PRIVILEGE
    err = capsys.readouterr().err
    assert "needs root or CAP_NET_ADMIN" in err and "inner_echo = true" in err
    assert len(opened) == 1  # the config was read; nothing was bound or created after it


def _spy(fn: object, calls: list[object]) -> object:
    def wrapper(*args: object) -> object:
        calls.append(args)
        return fn(*args)  # type: ignore[operator]

    return wrapper


def test_program_stops_cleanly_on_sigterm(confdir: Path) -> None:
    """With the default (sqlite) store a stop ends no session: they stay in the store."""
    path = write(confdir, BASE.replace('store = "memory"', 'state_dir = "state"'))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunnel.gateway.main", "--config", str(path)],
        stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "listening on 127.0.0.1:" in line
        proc.send_signal(signal.SIGHUP)  # reload (no policy file: defaults stay)
        time.sleep(0.2)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == gateway_main.EXIT_OK
        assert "stopped; sessions kept in the store, host restored" in proc.stderr.read()
        assert (confdir / "state" / "sessions.sqlite3").is_file()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- property: whatever a key holds, the result is a config or a ConfigError naming it ---

_TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=24)
_SCALARS = (
    st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | _TEXT
    | st.sampled_from(["127.0.0.1:0", "10.70.0.0/29", "10.70.0.3", "bob.pub", "stdout"])
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=6,
)
SINK_TYPES = ("jsonl", "syslog", "stdout")
"""docs/gateway.md: the [[sinks]] types."""
_TOP = ("node_id", "listen", "private_key", "policy", "mtu", "metrics", "inner_echo", "extra")
_LOCATIONS = [
    *[("", k) for k in (*_TOP, "tun", "clients", "sinks")],
    *[("tun", k) for k in ("name", "subnet", "address", "extra")],
    *[("clients", k) for k in ("name", "public_key", "address", "extra")],
    *[("sinks", k) for k in ("type", "path", "max_bytes", "backups", "address", "transport")],
]


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(location=st.sampled_from(_LOCATIONS), value=_VALUES, sink=st.sampled_from(SINK_TYPES))
@example(location=("", "private_key"), value="~0", sink=SINK_TYPES[0])  # ~user: no such user
def test_any_value_at_any_key_loads_or_names_file_and_key(
    confdir: Path, location: tuple[str, str], value: object, sink: str
) -> None:
    data: dict[str, Any] = {
        "node_id": "gw-t",
        "listen": ["127.0.0.1:0"],
        "private_key": "gateway.key",
        "inner_echo": True,
        "tun": {"subnet": "10.70.0.0/29"},
        "clients": [{"name": "alice", "public_key": "alice.pub"}],
    }
    section, key = location
    if not section:
        data[key] = value
        named = key
    elif section == "tun":
        data["tun"][key] = value
        named = f"tun.{key}"
    elif section == "clients":
        data["clients"] = [{"name": "alice", "public_key": "alice.pub", key: value}]
        named = f"clients[0].{key}"
    else:
        data["sinks"] = [{"type": sink, key: value}]
        named = "sinks[0]."
    file = confdir / "gateway.toml"
    try:
        parse_gateway_config(data, file)
    except ConfigError as exc:
        assert str(exc).startswith(f"{file}: {named}"), (str(exc), named)
