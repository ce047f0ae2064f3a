"""``paths = "auto"`` in client.toml (issue 10 item 4; docs/client.md "Automatic paths")."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunnel.client.config import AutoPaths, ConfigError, load_client_config
from tunnel.core.handshake import generate_keypair
from tunnel.keys import write_private_key, write_public_key

HEAD = 'private_key = "client.key"\ngateway_public_key = "gateway.pub"\npaths = "auto"\n'


@pytest.fixture
def cfg_dir(tmp_path: Path) -> Path:
    private, _ = generate_keypair()
    _, gw_public = generate_keypair()
    write_private_key(tmp_path / "client.key", private)
    write_public_key(tmp_path / "gateway.pub", gw_public)
    return tmp_path


def load(where: Path, text: str) -> AutoPaths | None:
    cfg = where / "client.toml"
    cfg.write_text(text)
    return load_client_config(cfg).auto


def test_auto_paths_with_one_gateway_and_the_defaults(cfg_dir: Path) -> None:
    auto = load(cfg_dir, HEAD + '[auto]\ngateway = "vpn.example.net:51820"\n')
    assert auto == AutoPaths((("vpn.example.net", 51820),), ("*",), (), ())
    assert not auto.includes_loopback()


def test_auto_paths_with_every_key(cfg_dir: Path) -> None:
    auto = load(
        cfg_dir,
        HEAD + "[auto]\n"
        'gateway = ["198.51.100.1:51820", "[2001:db8::1]:51820"]\n'
        'include = ["eth*", "wl*", "lo"]\nexclude = ["docker*"]\nprefer = ["eth*", "wl*"]\n',
    )
    assert auto is not None
    assert auto.gateways == (("198.51.100.1", 51820), ("2001:db8::1", 51820))
    assert (auto.include, auto.exclude, auto.prefer) == (
        ("eth*", "wl*", "lo"), ("docker*",), ("eth*", "wl*"),
    )  # fmt: skip
    assert auto.includes_loopback()


def test_path_tables_without_paths_auto_have_no_auto(cfg_dir: Path) -> None:
    text = 'private_key = "client.key"\ngateway_public_key = "gateway.pub"\n'
    assert load(cfg_dir, text + '[[path]]\ngateway = "127.0.0.1:1"\n') is None


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (HEAD, 'auto: paths = "auto" needs an [auto] table'),
        (HEAD + "[auto]\n", "auto.gateway: required key is missing"),
        (HEAD + '[auto]\ngateway = "1.2.3.4"\n', 'auto.gateway[0] = "1.2.3.4": expected host:port'),
        (HEAD + "[auto]\ngateway = []\n", "auto.gateway = []: expected 1..9 gateway endpoints"),
        (HEAD + '[auto]\ngateway = "1.2.3.4:5"\ninclude = "eth*"\n', "auto.include"),
        (HEAD + '[auto]\ngateway = "1.2.3.4:5"\nprefer = [""]\n', "auto.prefer[0]"),
        (HEAD + '[auto]\ngateway = "1.2.3.4:5"\nbind = "x"\n', "auto.bind: unknown key"),
        (
            HEAD + '[auto]\ngateway = "1.2.3.4:5"\n[[path]]\ngateway = "1.2.3.4:5"\n',
            "exclude each other",
        ),
        (HEAD.replace('"auto"', '"all"') + '[auto]\ngateway = "1.2.3.4:5"\n', 'paths = "all"'),
        (
            'private_key = "client.key"\ngateway_public_key = "gateway.pub"\n'
            '[auto]\ngateway = "1.2.3.4:5"\n[[path]]\ngateway = "1.2.3.4:5"\n',
            'paths: [auto] is only read with paths = "auto"',
        ),
    ],
)
def test_bad_auto_configs_name_the_key(cfg_dir: Path, text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(cfg_dir, text)
    assert fragment in str(info.value), str(info.value)
