"""The IPv6 keys of both configuration files (docs/gateway.md and docs/client.md, "IPv6
inside the tunnel"): what they accept, what they assign, and how a bad value is named."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from tunnel.client.config import ClientConfig, ConfigError, parse_client_config
from tunnel.core.handshake import generate_keypair
from tunnel.gateway.config import ConfigError as GatewayConfigError
from tunnel.gateway.config import GatewayConfig, load_gateway_config
from tunnel.keys import write_private_key, write_public_key

# -- gateway -------------------------------------------------------------------------------------

GATEWAY = """\
listen = ["127.0.0.1:0"]
private_key = "gateway.key"
inner_echo = true
{top}
[tun]
subnet = "10.70.0.0/24"
{tun}
[[clients]]
name = "alice"
public_key = "alice.pub"
{alice}
[[clients]]
name = "bob"
public_key = "bob.pub"
{bob}
[[clients]]
name = "carol"
public_key = "carol.pub"
"""


@pytest.fixture
def gwdir(tmp_path: Path) -> Path:
    for name in ("gateway", "alice", "bob", "carol"):
        private, public = generate_keypair()
        write_private_key(tmp_path / f"{name}.key", private)
        write_public_key(tmp_path / f"{name}.pub", public)
    return tmp_path


def gateway(
    gwdir: Path, *, top: str = "", tun: str = "", alice: str = "", bob: str = ""
) -> GatewayConfig:
    path = gwdir / "gateway.toml"
    path.write_text(GATEWAY.format(top=top, tun=tun, alice=alice, bob=bob))
    return load_gateway_config(path)


def addresses6(config: GatewayConfig) -> dict[str, str]:
    return {c.name: c.inner_address6 for c in config.clients}


def test_without_subnet6_nobody_has_an_ipv6_address(gwdir: Path) -> None:
    config = gateway(gwdir)
    assert config.subnet6 is None and config.gateway_address6 == ""
    assert addresses6(config) == {"alice": "", "bob": "", "carol": ""}


def test_subnet6_gives_the_gateway_the_first_host_and_clients_the_pool(gwdir: Path) -> None:
    config = gateway(gwdir, tun='subnet6 = "fd00:6a76::/64"', bob='address6 = "fd00:6a76::3"')
    assert config.subnet6 == ipaddress.IPv6Network("fd00:6a76::/64")
    assert config.gateway_address6 == "fd00:6a76::1"
    # file order; the gateway's and every explicit address are skipped
    assert addresses6(config) == {
        "alice": "fd00:6a76::2", "bob": "fd00:6a76::3", "carol": "fd00:6a76::4",
    }  # fmt: skip
    assert [c.inner_address for c in config.clients] == ["10.70.0.2", "10.70.0.3", "10.70.0.4"]


def test_explicit_ipv6_addresses_are_normalised(gwdir: Path) -> None:
    config = gateway(
        gwdir, tun='subnet6 = "fd00:6a76::/64"\naddress6 = "FD00:6A76:0::00AA"',
        alice='address6 = "fd00:6a76:0:0:0:0:0:1"',
    )  # fmt: skip
    assert config.gateway_address6 == "fd00:6a76::aa"
    assert addresses6(config)["alice"] == "fd00:6a76::1"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tun": 'subnet6 = "10.1.0.0/16"'}, "tun.subnet6 = '10.1.0.0/16': must be an IPv6"),
        ({"tun": 'subnet6 = "fd00::1/64"'}, "tun.subnet6 = 'fd00::1/64': not a network"),
        ({"tun": 'subnet6 = "fd00::/127"'}, "tun.subnet6 = 'fd00::/127': too small"),
        ({"tun": 'address6 = "fd00::1"'}, "tun.address6 = 'fd00::1': needs tun.subnet6"),
        (
            {"tun": 'subnet6 = "fd00::/64"\naddress6 = "fd01::1"'},
            "tun.address6 = 'fd01::1': not in the inner subnet fd00::/64",
        ),
        (
            {"tun": 'subnet6 = "fd00::/64"\naddress6 = "fd00::"'},
            "tun.address6 = 'fd00::': is the network",
        ),
        ({"alice": 'address6 = "fd00::5"'}, "clients[0].address6 = 'fd00::5': needs tun.subnet6"),
        (
            {"tun": 'subnet6 = "fd00::/64"', "alice": 'address6 = "10.70.0.9"'},
            "clients[0].address6 = '10.70.0.9': not in the inner subnet fd00::/64",
        ),
        (
            {"tun": 'subnet6 = "fd00::/64"', "alice": 'address6 = "fd00::1"'},
            "clients[0].address6 = 'fd00::1': already used by the gateway (tun.address6)",
        ),
        (
            {
                "tun": 'subnet6 = "fd00::/64"',
                "alice": 'address6 = "fd00::7"',
                "bob": 'address6 = "fd00:0::7"',
            },
            "clients[1].address6 = 'fd00::7': already used by client 'alice'",
        ),
        (
            {"top": "mtu = 1200", "tun": 'subnet6 = "fd00::/64"'},
            "mtu = 1200: IPv6 (tun.subnet6) needs at least 1280",
        ),
    ],
)
def test_bad_ipv6_keys_name_file_key_and_value(
    gwdir: Path, kwargs: dict[str, str], message: str
) -> None:
    with pytest.raises(GatewayConfigError) as info:
        gateway(gwdir, **kwargs)
    assert str(info.value).startswith(f"{gwdir / 'gateway.toml'}: {message}"), str(info.value)


def test_a_small_ipv6_pool_runs_out_with_a_clear_error(gwdir: Path) -> None:
    with pytest.raises(GatewayConfigError) as info:
        gateway(gwdir, tun='subnet6 = "fd00::/126"')  # ::1 gateway, ::2 ::3 alice bob
    assert "tun.subnet6 = 'fd00::/126': no free address left in the pool for client 'carol'" in (
        str(info.value)
    )


# -- client --------------------------------------------------------------------------------------


@pytest.fixture
def cldir(tmp_path: Path) -> Path:
    private, _ = generate_keypair()
    _, gw_public = generate_keypair()
    write_private_key(tmp_path / "client.key", private)
    write_public_key(tmp_path / "gateway.pub", gw_public)
    return tmp_path


def client(cldir: Path, tun: str) -> ClientConfig:
    text = (
        'private_key = "client.key"\ngateway_public_key = "gateway.pub"\n'
        f'[tun]\n{tun}\n[[path]]\ngateway = "127.0.0.1:51820"\n'
    )
    return parse_client_config(text, source="client.toml", base=cldir)


def test_client_ipv6_address_and_routes_are_accepted(cldir: Path) -> None:
    cfg = client(
        cldir,
        'address6 = "FD00:6A76::2/64"\n'
        'routes = ["10.0.0.0/8", "fd00:1::/48", "::/0", "2001:db8::/32"]',
    )
    assert cfg.address6 == "fd00:6a76::2/64"
    assert cfg.routes == ("10.0.0.0/8", "fd00:1::/48", "::/0", "2001:db8::/32")


def test_client_without_address6_takes_the_gateways(cldir: Path) -> None:
    assert client(cldir, "").address6 is None


@pytest.mark.parametrize(
    ("tun", "message"),
    [
        ('address6 = "10.66.0.2/24"', 'tun.address6 = "10.66.0.2/24": expected an IPv6'),
        ('address6 = "fd00::2"', 'tun.address6 = "fd00::2": expected an IPv6 address/prefix'),
        ('address6 = "fd00::2/129"', 'tun.address6 = "fd00::2/129": expected address/prefix'),
        ('address6 = "fd00::2/64"\nmtu = 1200', "tun.mtu = 1200: IPv6 (tun.address6) needs"),
        ('routes = ["fd00::1/64"]', 'tun.routes[0] = "fd00::1/64": expected an IPv4 or IPv6'),
    ],
)
def test_bad_client_ipv6_values_name_the_key(cldir: Path, tun: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        client(cldir, tun)
    assert str(info.value).startswith(f"client.toml: {message}"), str(info.value)
