"""``[state]`` in gateway.toml (docs/gateway.md "[state]"): the session store, its directory
and the state key file; what the program says and its exit status when they are unusable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunnel.core.handshake import generate_keypair
from tunnel.gateway import main as gateway_main
from tunnel.gateway.config import (
    ConfigError,
    StateConfig,
    default_state_dir,
    load_gateway_config,
)
from tunnel.gateway.resume import StateError, open_state
from tunnel.keys import write_private_key, write_public_key
from tunnel.ownership.sqlite import SqliteSessionStore

REPO = Path(__file__).resolve().parents[1]

HEAD = """\
node_id = "gw-s"
listen = ["127.0.0.1:0"]
private_key = "gateway.key"
inner_echo = true
workers = 1
[control]
socket = "off"
[[clients]]
name = "alice"
public_key = "alice.pub"
"""


@pytest.fixture
def confdir(tmp_path: Path) -> Path:
    write_private_key(tmp_path / "gateway.key", generate_keypair()[0])
    write_public_key(tmp_path / "alice.pub", generate_keypair()[1])
    return tmp_path


def load(confdir: Path, state: str) -> StateConfig:
    path = confdir / "gateway.toml"
    path.write_text(HEAD + state)
    return load_gateway_config(path).state


def test_defaults_are_the_sqlite_store_in_var_lib_jvpn(confdir: Path) -> None:
    state = load(confdir, "")
    assert state == StateConfig("sqlite", Path("/var/lib/jvpn"), Path("/var/lib/jvpn/state.key"))
    assert state.persistent
    assert not (confdir / "state").exists()  # loading creates nothing


def test_relative_paths_are_relative_to_the_file(confdir: Path) -> None:
    state = load(confdir, '[state]\nstate_dir = "st"\n')
    assert state == StateConfig("sqlite", confdir / "st", confdir / "st" / "state.key")
    state = load(confdir, '[state]\nstore = "memory"\nstate_key_file = "keys/state.key"\n')
    assert state.store == "memory" and not state.persistent
    assert state.state_key_file == confdir / "keys" / "state.key"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('store = "etcd"', "state.store = 'etcd': the etcd store needs a [cluster] section"),
        ('store = "disk"', "state.store = 'disk': must be one of: sqlite, memory, etcd"),
        ("store = 1", "state.store = 1: must be a non-empty string"),
        ("state_dir = 5", "state.state_dir = 5: must be a non-empty string"),
        ('path = "x"', "state.path = 'x': unknown key (known: state_dir, state_key_file, store)"),
        (
            'state_key_file = "gateway.key"',
            "is the gateway's private key; the state key must be a file of its own",
        ),
        ('state_dir = "alice.pub"', "exists and is not a directory"),
    ],
)
def test_bad_values_are_named(confdir: Path, table: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(confdir, f"[state]\n{table}\n")
    assert message in str(info.value) and "gateway.toml" in str(info.value)


def test_state_must_be_a_table(confdir: Path) -> None:
    path = confdir / "gateway.toml"
    path.write_text('state = "sqlite"\n' + HEAD)
    with pytest.raises(ConfigError, match=r"state = 'sqlite': must be a table \(\[state\]\)"):
        load_gateway_config(path)


def test_open_state_creates_the_directory_and_a_private_key(tmp_path: Path) -> None:
    config = StateConfig("sqlite", tmp_path / "lib" / "jvpn", tmp_path / "lib" / "jvpn" / "k")
    store, _sealer = open_state(config)
    try:
        assert (tmp_path / "lib" / "jvpn").stat().st_mode & 0o777 == 0o700
        key = config.state_key_file
        assert key.stat().st_mode & 0o777 == 0o600
        assert len(bytes.fromhex(key.read_text().strip())) == 32
        assert isinstance(store, SqliteSessionStore) and store.persistent
        # one gateway per store: a second one is refused while this one holds it
        with pytest.raises(StateError, match="in use by another process"):
            open_state(config)
    finally:
        store.close()
    again, _ = open_state(config)  # released with the first
    again.close()


@pytest.mark.parametrize(
    ("mode", "text", "message"),
    [
        (0o644, "ab" * 32, "accessible by other users (mode 0644); run: chmod 600"),
        (0o640, "ab" * 32, "accessible by other users (mode 0640)"),
        (0o600, "not a key", "not a state key (64 hex digits expected)"),
        (0o600, "ab" * 16, "not a state key"),
    ],
)
def test_an_unusable_state_key_file_is_refused(
    tmp_path: Path, mode: int, text: str, message: str
) -> None:
    key = tmp_path / "state.key"
    key.write_text(text + "\n")
    key.chmod(mode)
    with pytest.raises(StateError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        open_state(StateConfig("sqlite", tmp_path, key))
    assert info.value.key
    assert key.read_text() == text + "\n"  # never rewritten


def run_gateway(confdir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tunnel.gateway.main", "--config", str(confdir / "gateway.toml")],
        capture_output=True, text=True, timeout=30, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip


def test_program_refuses_a_state_key_others_can_read(confdir: Path) -> None:
    (confdir / "gateway.toml").write_text(HEAD + '[state]\nstate_dir = "st"\n')
    (confdir / "st").mkdir(mode=0o700)
    key = confdir / "st" / "state.key"
    key.write_text("cd" * 32 + "\n")
    key.chmod(0o644)
    result = run_gateway(confdir)
    assert result.returncode == gateway_main.EXIT_KEY
    assert result.stderr.startswith("jvpn-gateway: error: ")
    assert "[state] state_key_file" in result.stderr and f"chmod 600 {key}" in result.stderr


def test_program_refuses_a_state_dir_another_gateway_holds(confdir: Path) -> None:
    (confdir / "gateway.toml").write_text(HEAD + '[state]\nstate_dir = "st"\n')
    held, _ = open_state(StateConfig("sqlite", confdir / "st", confdir / "st" / "state.key"))
    try:
        result = run_gateway(confdir)
    finally:
        held.close()
    assert result.returncode == gateway_main.EXIT_CONFIG
    assert "[state] session store" in result.stderr and "in use by another process" in result.stderr


def test_the_default_state_dir_follows_the_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_state_dir({"XDG_STATE_HOME": "/x"}) == Path("/var/lib/jvpn")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert default_state_dir({"XDG_STATE_HOME": "/x"}) == Path("/x/jvpn")
    monkeypatch.setenv("HOME", "/home/u")
    assert default_state_dir({}) == Path("/home/u/.local/state/jvpn")
