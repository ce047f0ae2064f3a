"""``[tun] kill_switch`` and full-tunnel routes in client.toml, and the route arithmetic the
kill switch and the endpoint exceptions rest on (docs/client.md, "Kill switch", "Full
tunnel"). The routes themselves, in a namespace: tests/test_killswitch_netns.py."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from tunnel.client.config import ClientConfig, ConfigError, parse_client_config
from tunnel.core.handshake import generate_keypair
from tunnel.io.killswitch import capture_problem, covering, tunnel_routes
from tunnel.keys import write_private_key, write_public_key


@pytest.fixture
def base(tmp_path: Path) -> Path:
    private, _ = generate_keypair()
    _, gw_public = generate_keypair()
    write_private_key(tmp_path / "client.key", private)
    write_public_key(tmp_path / "gateway.pub", gw_public)
    return tmp_path


def config(base: Path, tun: str = "", gateways: tuple[str, ...] = ("192.0.2.7:51820",)) -> str:
    paths = "".join(f'[[path]]\ngateway = "{g}"\n' for g in gateways)
    return f'private_key = "client.key"\ngateway_public_key = "gateway.pub"\n[tun]\n{tun}\n{paths}'


def parse(base: Path, text: str) -> ClientConfig:
    return parse_client_config(text, source="client.toml", base=base)


@pytest.mark.parametrize(
    ("tun", "expected"),
    [
        ("", False),  # no routes: nothing to protect
        ('routes = ["198.51.100.0/24"]', False),  # split tunnel: off unless asked
        ('routes = ["0.0.0.0/0"]', True),  # full tunnel: on by default
        ('routes = ["10.0.0.0/8", "0.0.0.0/0"]', True),
        ('routes = ["198.51.100.0/24"]\nkill_switch = true', True),
        ('routes = ["0.0.0.0/0"]\nkill_switch = false', False),  # the operator's choice wins
    ],
)
def test_kill_switch_default_follows_a_default_route(base: Path, tun: str, expected: bool) -> None:
    assert parse(base, config(base, tun)).kill_switch is expected


@pytest.mark.parametrize("value", ['"yes"', "1", "0", '"true"', "[]"])
def test_kill_switch_must_be_a_boolean(base: Path, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse(base, config(base, f"kill_switch = {value}"))
    assert str(err.value) == f"client.toml: tun.kill_switch = {value}: expected true or false"


def test_a_host_route_for_a_gateway_endpoint_is_refused(base: Path) -> None:
    text = config(
        base, 'routes = ["10.0.0.0/8", "192.0.2.7/32"]', ("198.51.100.1:1", "192.0.2.7:51820")
    )
    with pytest.raises(ConfigError) as err:
        parse(base, text)
    message = str(err.value)
    assert message.startswith('client.toml: tun.routes[1] = "192.0.2.7/32": would send path[2]')
    assert "192.0.2.7 into the tunnel itself" in message and "remove it" in message


@pytest.mark.parametrize("route", ["0.0.0.0/0", "192.0.2.0/24", "192.0.2.6/31"])
def test_a_wider_route_over_an_endpoint_is_accepted(base: Path, route: str) -> None:
    cfg = parse(base, config(base, f'routes = ["{route}"]'))
    assert cfg.routes == (route,)  # the endpoint gets its exception when the engine starts


def test_a_host_route_next_to_the_endpoint_or_for_a_name_is_accepted(base: Path) -> None:
    cfg = parse(base, config(base, 'routes = ["192.0.2.8/32"]', ("192.0.2.7:1", "vpn.example:1")))
    assert cfg.routes == ("192.0.2.8/32",)  # a name is checked when it resolves


# -- the arithmetic ---------------------------------------------------------------------------


def test_a_default_route_is_put_on_the_tun_as_its_two_halves() -> None:
    assert tunnel_routes(["0.0.0.0/0"]) == ("0.0.0.0/1", "128.0.0.0/1")
    assert tunnel_routes(["::/0"]) == ("::/1", "8000::/1")
    assert tunnel_routes(["10.0.0.0/8", "0.0.0.0/0", "10.0.0.0/8"]) == (
        "10.0.0.0/8", "0.0.0.0/1", "128.0.0.0/1",
    )  # fmt: skip
    halves = [ipaddress.ip_network(r) for r in tunnel_routes(["0.0.0.0/0"])]
    for probe in ("0.0.0.1", "127.255.255.255", "128.0.0.0", "255.255.255.254"):
        assert sum(ipaddress.ip_address(probe) in h for h in halves) == 1  # every address, once


def test_covering_and_the_one_capture_an_exception_cannot_fix() -> None:
    routes = ["0.0.0.0/0", "192.0.2.0/24", "2001:db8::/32"]
    assert covering(routes, "192.0.2.7") == ["0.0.0.0/0", "192.0.2.0/24"]
    assert covering(routes, "2001:db8::1") == ["2001:db8::/32"]
    assert covering(routes, "::1") == []
    assert capture_problem(routes, "192.0.2.7", "path 1's gateway") is None
    problem = capture_problem([*routes, "192.0.2.7/32"], "192.0.2.7", "path 1's gateway")
    assert problem is not None and problem.startswith("route 192.0.2.7/32 would send path 1's")
    assert capture_problem(["2001:db8::7/128"], "2001:db8::7", "x") is not None
