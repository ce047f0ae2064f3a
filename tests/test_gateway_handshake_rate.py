"""``handshake_rate`` in gateway.toml (docs/gateway.md, "Arrivals in bursts").

By default ("auto") each gateway process measures its core's handshake budget at start;
a number fixes the rate for the whole gateway, split evenly over its workers, and the
rate in force is the ``jvpn_gateway_handshake_rate`` gauge.
"""

from __future__ import annotations

import base64
import dataclasses
from pathlib import Path

import pytest

from tunnel.core.handshake import generate_keypair
from tunnel.gateway.config import ConfigError, load_gateway_config
from tunnel.gateway.runtime import GatewayRuntime
from tunnel.keys import write_private_key


def _config(tmp_path: Path, extra: str) -> Path:
    if not (tmp_path / "gateway.key").exists():
        write_private_key(tmp_path / "gateway.key", generate_keypair()[0])
    client = base64.b64encode(generate_keypair()[1]).decode()
    path = tmp_path / "gateway.toml"
    path.write_text(
        'listen = "127.0.0.1:0"\nprivate_key = "gateway.key"\ninner_echo = true\n'
        f'{extra}\n[control]\nsocket = "off"\n[state]\nstore = "memory"\n'
        f'[[clients]]\nname = "a"\npublic_key = "{client}"\n'
    )
    return path


def test_handshake_rate_is_auto_by_default_or_a_number_in_range(tmp_path: Path) -> None:
    assert load_gateway_config(_config(tmp_path, "")).handshake_rate is None
    assert load_gateway_config(_config(tmp_path, 'handshake_rate = "auto"')).handshake_rate is None
    for rate in (200, 750, 10_000):
        config = load_gateway_config(_config(tmp_path, f"handshake_rate = {rate}"))
        assert config.handshake_rate == rate


@pytest.mark.parametrize(
    "value", ["199", "10001", "0", "-5", '"fast"', '""', "1.5", "true", "[300]"]
)
def test_a_bad_handshake_rate_is_refused_naming_the_key_and_the_range(
    tmp_path: Path, value: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_gateway_config(_config(tmp_path, f"handshake_rate = {value}"))
    message = str(caught.value)
    assert "handshake_rate" in message and "gateway.toml" in message
    assert "10000" in message or "integer" in message, message


def _rate_in_force(runtime: GatewayRuntime) -> float:
    families = {f.name: f for f in runtime.metrics.metric_families()}
    ((labels, value),) = families["jvpn_gateway_handshake_rate"].samples
    assert labels == {}
    return value


def test_a_configured_rate_is_what_the_gateway_admits_and_workers_split_it(
    tmp_path: Path,
) -> None:
    config = load_gateway_config(_config(tmp_path, "handshake_rate = 600"))
    one = GatewayRuntime.from_config(config)
    try:
        assert _rate_in_force(one) == 600
        assert one.gateway.admission.handshakes.burst == 600  # one second of it
    finally:
        one.close()
    # worker k of 3: a third each, so the gateway as a whole admits what was configured
    shares = []
    for k in range(3):
        worker = GatewayRuntime.from_config(
            dataclasses.replace(config, workers=3), index_stripe=(k, 3)
        )
        try:
            shares.append(_rate_in_force(worker))
            # the bucket is a third of the gateway's (at least 400 in all)
            assert worker.gateway.admission.handshakes.burst == pytest.approx(600 / 3)
        finally:
            worker.close()
    assert shares == [pytest.approx(200)] * 3


def test_auto_measures_a_budget_within_the_documented_bounds(tmp_path: Path) -> None:
    """docs/gateway.md: half a core's worth of handshakes, within [200, 10,000] a second."""
    runtime = GatewayRuntime.from_config(load_gateway_config(_config(tmp_path, "")))
    try:
        assert 200 <= _rate_in_force(runtime) <= 10_000
    finally:
        runtime.close()
