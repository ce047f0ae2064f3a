"""client.toml: a valid file loads completely; every bad value names the file and key."""

from __future__ import annotations

import base64
import json
import math
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jvpn_tui.keymap import check_keymap
from tunnel.client.config import ConfigError, load_client_config, parse_client_config
from tunnel.core.handshake import generate_keypair
from tunnel.core.policy import POLICY_DEFAULT, policy_to_toml
from tunnel.core.wire import RespPayload
from tunnel.gateway.config import ConfigError as GatewayConfigError
from tunnel.gateway.config import parse_gateway_config
from tunnel.keys import encode_key, write_private_key, write_public_key

EXAMPLE = Path(__file__).parent.parent / "docs" / "examples" / "client.toml"


@pytest.fixture
def keys(tmp_path: Path) -> tuple[bytes, bytes, str]:
    private, _ = generate_keypair()
    _, gw_public = generate_keypair()
    write_private_key(tmp_path / "client.key", private)
    write_private_key(tmp_path / "alice.key", private)  # the name the example uses
    write_public_key(tmp_path / "gateway.pub", gw_public)
    return private, gw_public, base64.b64encode(gw_public).decode()


def minimal(extra: str = "", path: str = 'gateway = "127.0.0.1:51820"') -> str:
    return (
        'private_key = "client.key"\ngateway_public_key = "gateway.pub"\n'
        f"{extra}\n[[path]]\n{path}\n"
    )


def write(tmp_path: Path, text: str) -> Path:
    cfg = tmp_path / "client.toml"
    cfg.write_text(text)
    return cfg


def test_documented_example_loads_as_copied(tmp_path: Path, keys: tuple[bytes, bytes, str]) -> None:
    private, gw_public, _ = keys
    (tmp_path / "policy.toml").write_text(policy_to_toml(POLICY_DEFAULT))
    cfg_path = tmp_path / "client.toml"
    shutil.copy(EXAMPLE, cfg_path)
    cfg = load_client_config(cfg_path)
    assert cfg.private_key == private and cfg.gateway_public_key == gw_public
    assert cfg.policy_file == tmp_path / "policy.toml"
    assert cfg.policy.policy_version == POLICY_DEFAULT.policy_version
    assert cfg.node_id == "alice"
    assert (cfg.tun_name, cfg.mtu, cfg.address, cfg.routes) == (
        "jvpn0", 1420, None, ("198.51.100.0/24",),
    )  # fmt: skip
    assert [(p.path_id, p.name, p.bind, p.device, p.gateway) for p in cfg.paths] == [
        (1, "wired", None, "eth0", ("203.0.113.10", 51820)),
        (2, "lte", None, "wwan0", ("203.0.113.10", 51820)),
    ]
    assert cfg.jsonl == tmp_path / "client-events.jsonl"  # next to the file, as it says
    assert cfg.syslog is None  # commented out: no receiver is assumed
    assert dict(cfg.keymap) == {"jvpn.terminate": "ctrl+t"}
    assert check_keymap(dict(cfg.keymap)) == {"jvpn.terminate": "ctrl+t"}  # the UI accepts it
    assert "private_key" not in repr(cfg)


def test_inline_keys_and_ipv6_paths(tmp_path: Path, keys: tuple[bytes, bytes, str]) -> None:
    private, gw_public, gw_b64 = keys
    text = (
        f'private_key = "{base64.b64encode(private).decode()}"\n'
        f'gateway_public_key = "{gw_b64}"\n'
        '[tun]\naddress = "10.66.0.9/24"\n'
        '[[path]]\nbind = "[::1]:0"\ngateway = "[::1]:51820"\n'
    )
    cfg = parse_client_config(text, source="inline.toml", base=tmp_path)
    assert cfg.private_key == private and cfg.gateway_public_key == gw_public
    assert cfg.paths[0].bind == ("::1", 0) and cfg.paths[0].gateway == ("::1", 51820)
    assert cfg.address == "10.66.0.9/24"


BAD = [
    # (extra top-level text, [[path]] body, expected message fragment)
    ("", "", "path[1].gateway: required key is missing"),
    ("", 'gateway = "10.0.0.1"', 'path[1].gateway = "10.0.0.1": expected host:port'),
    ("", 'gateway = "10.0.0.1:99999"', 'path[1].gateway = "10.0.0.1:99999": port must be'),
    ("", 'gateway = "::1:5"', 'path[1].gateway = "::1:5": write IPv6 addresses in brackets'),
    ("", 'gateway = "bad host!:5"', 'path[1].gateway = "bad host!:5": not an IP address'),
    ("", 'gateway = "1.2.3.4:5"\nbind = "eth0"', 'path[1].bind = "eth0": must be a numeric'),
    ("", 'gateway = "1.2.3.4:5"\nbind = "[::1]:0"', 'path[1].bind = "[::1]:0": an IPv6'),
    ("", 'gateway = "1.2.3.4:5"\ndevice = "a/b"', 'path[1].device = "a/b": not a valid'),
    ("", 'gateway = "1.2.3.4:5"\nport = 5', "path[1].port: unknown key"),
    ("", 'gateway = "1.2.3.4:5"\nname = "has space"', 'path[1].name = "has space"'),
    ("[tun]\nmtu = 100", 'gateway = "1.2.3.4:5"', "tun.mtu = 100: expected an integer 576..1500"),
    ("[tun]\nmtu = 1501", 'gateway = "1.2.3.4:5"', "tun.mtu = 1501: expected an integer 576..1500"),
    ("[tun]\nmtu = true", 'gateway = "1.2.3.4:5"', "tun.mtu = True: expected an integer"),
    ('[tun]\naddress = "10.1.1.1"', 'gateway = "1.2.3.4:5"', 'tun.address = "10.1.1.1"'),
    ('[tun]\naddress = "fd00::1/64"', 'gateway = "1.2.3.4:5"', 'tun.address = "fd00::1/64"'),
    ('[tun]\nroutes = ["10.0.0.0/33"]', 'gateway = "1.2.3.4:5"', 'tun.routes[0] = "10.0.0.0/33"'),
    ('[tun]\nname = "a/b"', 'gateway = "1.2.3.4:5"', 'tun.name = "a/b"'),
    ("[tun]\ncolour = 1", 'gateway = "1.2.3.4:5"', "tun.colour: unknown key"),
    ('[events]\nsyslog = "http://x"', 'gateway = "1.2.3.4:5"', 'events.syslog = "http://x"'),
    ("[events]\njsonl = 5", 'gateway = "1.2.3.4:5"', "events.jsonl = 5: expected a non-empty"),
    ("[keymap]\nquit = 3", 'gateway = "1.2.3.4:5"', "keymap.quit = 3: expected a key name"),
    ('node_id = "a b"', 'gateway = "1.2.3.4:5"', 'node_id = "a b"'),
    ('policy = "nope.toml"', 'gateway = "1.2.3.4:5"', 'policy = "nope.toml": policy: cannot read'),
    ("tunnel = 1", 'gateway = "1.2.3.4:5"', "tunnel: unknown key"),
    # docs/client.md [inner]: kind tun|memory, rate_pps a number 0..10000, payload 0..1400
    ('[inner]\nkind = "kernel"', 'gateway = "1.2.3.4:5"', 'inner.kind = "kernel": expected one'),
    ("[inner]\nrate_pps = true", 'gateway = "1.2.3.4:5"', "inner.rate_pps = True: expected a"),
    ("[inner]\nrate_pps = 10001", 'gateway = "1.2.3.4:5"', "inner.rate_pps = 10001: expected"),
    ("[inner]\npayload_size = 1401", 'gateway = "1.2.3.4:5"', "inner.payload_size = 1401"),
    ('[inner]\npayload_size = "56"', 'gateway = "1.2.3.4:5"', 'inner.payload_size = "56"'),
    ("[inner]\nrate = 1", 'gateway = "1.2.3.4:5"', "inner.rate: unknown key"),
    ('[events]\nfile = "x"', 'gateway = "1.2.3.4:5"', "events.file: unknown key"),
    ('[tun]\nroutes = "10.0.0.0/8"', 'gateway = "1.2.3.4:5"', "tun.routes = "),
]


@pytest.mark.parametrize(("extra", "path", "fragment"), BAD)
def test_every_bad_value_names_file_and_key(
    tmp_path: Path, keys: tuple[bytes, bytes, str], extra: str, path: str, fragment: str
) -> None:
    cfg = write(tmp_path, minimal(extra, path))
    with pytest.raises(ConfigError) as info:
        load_client_config(cfg)
    assert str(info.value).startswith(f"{cfg}: "), str(info.value)
    assert fragment in str(info.value)


def test_key_problems_name_the_key_and_never_echo_material(
    tmp_path: Path, keys: tuple[bytes, bytes, str]
) -> None:
    cfg = write(tmp_path, minimal().replace('"client.key"', '"missing.key"'))
    with pytest.raises(ConfigError, match=r'private_key = "missing.key": .*no such file'):
        load_client_config(cfg)
    zero = base64.b64encode(bytes(32)).decode()
    cfg = write(tmp_path, minimal().replace('"gateway.pub"', f'"{zero}"'))
    with pytest.raises(ConfigError) as info:
        load_client_config(cfg)
    assert 'gateway_public_key = "<inline key>": ' in str(info.value)
    assert "not a usable X25519 public key" in str(info.value) and zero not in str(info.value)
    cfg = write(tmp_path, 'gateway_public_key = "gateway.pub"\n[[path]]\ngateway = "1.2.3.4:5"\n')
    with pytest.raises(ConfigError, match=r"private_key: required key is missing"):
        load_client_config(cfg)


def test_file_level_problems(tmp_path: Path, keys: tuple[bytes, bytes, str]) -> None:
    with pytest.raises(ConfigError, match=r"nothere\.toml: no such file"):
        load_client_config(tmp_path / "nothere.toml")
    cfg = write(tmp_path, "private_key = [")
    with pytest.raises(ConfigError, match=r"client\.toml: not valid TOML"):
        load_client_config(cfg)
    cfg = write(tmp_path, minimal().split("[[path]]")[0])
    with pytest.raises(ConfigError, match=r"path: at least one \[\[path\]\] is required"):
        load_client_config(cfg)
    many = minimal() + "".join(f'[[path]]\ngateway = "1.2.3.4:{i}"\n' for i in range(1, 10))
    with pytest.raises(ConfigError, match='path = "10 paths": at most 9 paths'):
        load_client_config(write(tmp_path, many))
    dup = (
        minimal(path='name = "a"\ngateway = "1.2.3.4:5"')
        + '[[path]]\nname = "a"\ngateway = "1.2.3.4:6"\n'
    )
    with pytest.raises(ConfigError, match=r'path\[2\]\.name = "a": duplicate path name'):
        load_client_config(write(tmp_path, dup))


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o606, 0o777])
def test_private_key_file_readable_by_others_is_refused(
    tmp_path: Path, keys: tuple[bytes, bytes, str], mode: int
) -> None:
    (tmp_path / "client.key").chmod(mode)
    cfg = write(tmp_path, minimal())
    with pytest.raises(ConfigError) as info:
        load_client_config(cfg)
    message = str(info.value)
    assert message.startswith(f'{cfg}: private_key = "client.key": is accessible by every user')
    assert f"(mode {mode:04o})" in message
    assert message.endswith(f"run: chmod 600 {tmp_path / 'client.key'}")
    private = keys[0]
    assert base64.b64encode(private).decode() not in message


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o640])
def test_private_key_file_private_to_owner_or_group_loads(
    tmp_path: Path, keys: tuple[bytes, bytes, str], mode: int
) -> None:
    (tmp_path / "client.key").chmod(mode)
    assert load_client_config(write(tmp_path, minimal())).private_key == keys[0]


# -- property: whatever a key holds, the result is a config or a ConfigError naming it ---

_TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=24)
_SCALARS = (
    st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | _TEXT
    | st.sampled_from(["1.2.3.4:5", "[::1]:5", "10.0.0.0/8", "eth0", "udp://h", "memory"])
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=6,
)
_LOCATIONS = [
    *[("", k) for k in ("private_key", "gateway_public_key", "policy", "node_id", "extra")],
    *[("", k) for k in ("tun", "path", "events", "keymap", "inner")],
    *[("tun", k) for k in ("name", "mtu", "address", "routes", "extra")],
    *[("path", k) for k in ("name", "bind", "device", "gateway", "extra")],
    *[("events", k) for k in ("jsonl", "syslog", "extra")],
    *[("keymap", "jvpn.quit")],
    *[("inner", k) for k in ("kind", "rate_pps", "payload_size", "extra")],
]


def _toml(value: object) -> str:
    """Inline TOML for a value hypothesis drew (the venv has no TOML writer)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    return str(value)


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(location=st.sampled_from(_LOCATIONS), value=_VALUES)
def test_any_value_at_any_key_loads_or_names_file_and_key(
    tmp_path: Path, keys: tuple[bytes, bytes, str], location: tuple[str, str], value: object
) -> None:
    doc: dict[str, object] = {
        "private_key": "client.key",
        "gateway_public_key": "gateway.pub",
        "path": [{"gateway": "127.0.0.1:51820"}],
    }
    section, key = location
    if not section:
        doc[key] = value
        named = key
    elif section == "path":
        doc["path"] = [{"gateway": "127.0.0.1:51820", key: value}]
        named = f"path[1].{key}"
    else:
        doc[section] = {key: value}
        named = f"{section}.{key}"
    text = "".join(f"{json.dumps(k)} = {_toml(v)}\n" for k, v in doc.items())
    try:
        parse_client_config(text, source="prop.toml", base=tmp_path)
    except ConfigError as exc:
        assert str(exc).startswith(f"prop.toml: {named}"), (str(exc), named)


MTU_RANGE = (576, 1500)
"""docs/client.md and docs/gateway.md: the inner MTU is 576..1500 on both sides (576: the
IPv4 datagram every host accepts; 1500: the largest inner packet the tunnel carries)."""


@pytest.mark.parametrize("mtu", [MTU_RANGE[0] - 1, *MTU_RANGE, MTU_RANGE[1] + 1])
def test_client_gateway_and_handshake_agree_on_the_mtu_range(
    tmp_path: Path, keys: tuple[bytes, bytes, str], mtu: int
) -> None:
    """The same MTU is valid, or refused, in client.toml, in gateway.toml and in the MTU a
    gateway announces in its handshake response."""
    inside = MTU_RANGE[0] <= mtu <= MTU_RANGE[1]
    outcomes = []
    try:
        parse_client_config(minimal(f"[tun]\nmtu = {mtu}"), base=tmp_path)
        outcomes.append(True)
    except ConfigError:
        outcomes.append(False)
    write_private_key(tmp_path / "gateway.key", generate_keypair()[0])
    gateway = {
        "listen": "127.0.0.1:0", "private_key": "gateway.key", "mtu": mtu,
        "clients": [{"name": "alice", "public_key": encode_key(generate_keypair()[1])}],
    }  # fmt: skip
    try:
        parse_gateway_config(gateway, tmp_path / "gateway.toml")
        outcomes.append(True)
    except GatewayConfigError:
        outcomes.append(False)
    resp = RespPayload(1, 0, bytes(16), 0, 1, 0, "10.66.0.2", 24, "10.66.0.1", mtu)
    outcomes.append(isinstance(RespPayload.parse(resp.pack()), RespPayload))
    assert outcomes == [inside] * 3, f"mtu {mtu}: client, gateway, handshake = {outcomes}"
