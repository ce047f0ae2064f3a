"""Prometheus metrics (DESIGN D16): the text format, and a real scrape of a running gateway."""

from __future__ import annotations

import dataclasses
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from test_gateway_runtime import GATEWAY_INNER, Setup, attached, echo_replies, icmp_echo

from tunnel.core.policy import POLICY_DEFAULT
from tunnel.core.session import State
from tunnel.io.udp import PathSocket
from tunnel.observability import CallbackSink, EventPipeline
from tunnel.observability.metrics import (
    CONTENT_TYPE,
    MetricFamily,
    MetricsServer,
    PrometheusPublisher,
    parse_host_port,
)

SAMPLE = re.compile(r"^([a-z_]+)(?:\{(.*)\})? (\S+)$")


def parse_exposition(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples of a text exposition; checks every family has HELP and TYPE first."""
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    typed: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            assert kind in ("counter", "gauge")
            assert not name.endswith("_total") or kind == "counter"
            typed.add(name)
            continue
        if line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        assert match, line
        name, labels, value = match.groups()
        assert name in typed, f"{name} has no TYPE line"
        pairs = tuple(re.findall(r'([a-z_]+)="((?:[^"\\]|\\.)*)"', labels or ""))
        samples[(name, pairs)] = float(value)
    return samples


def test_exposition_escapes_labels_and_names_counters_with_their_total() -> None:
    """prometheus_client renders the families: HELP and TYPE under the documented name, a
    counter's value is its increase over the publishes (no ``_created`` series), label
    values escaped as the text format requires."""
    publisher = PrometheusPublisher()
    family = MetricFamily(
        "jvpn_x_total", "Help with a \\ backslash\nand newline.", "counter",
        (({"reason": 'a"b\\c\nd'}, 3.0),), ("reason",),
    )  # fmt: skip
    publisher.publish([family, MetricFamily("jvpn_g", "A gauge.", "gauge", (({}, 0.5),))])
    publisher.publish([dataclasses.replace(family, samples=(({"reason": 'a"b\\c\nd'}, 5.0),))])
    text = publisher.exposition().decode()
    assert text.splitlines() == [
        "# HELP jvpn_x_total Help with a \\\\ backslash\\nand newline.",
        "# TYPE jvpn_x_total counter",
        'jvpn_x_total{reason="a\\"b\\\\c\\nd"} 5.0',
        "# HELP jvpn_g A gauge.",
        "# TYPE jvpn_g gauge",
        "jvpn_g 0.5",
    ]
    samples = parse_exposition(text)
    assert samples[("jvpn_x_total", (("reason", 'a\\"b\\\\c\\nd'),))] == 5


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:9108", ("127.0.0.1", 9108)), (":9108", ("127.0.0.1", 9108)),
     ("[::1]:0", ("::1", 0))],
)  # fmt: skip
def test_parse_host_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text) == expected


@pytest.mark.parametrize("text", ["9108", "localhost:9108", "::1:9108", "1.2.3.4:99999", "[::1]"])
def test_parse_host_port_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_host_port(text)


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def test_server_answers_404_elsewhere_and_503_when_collection_fails() -> None:
    def broken() -> bytes:
        raise RuntimeError("the gateway loop is not running")

    server = MetricsServer("127.0.0.1", 0, broken)
    try:
        host, port = server.address
        assert get(f"http://{host}:{port}/nothing")[0] == 404
        status, _, body = get(f"http://{host}:{port}/metrics")
        assert (status, body) == (503, "metrics unavailable: RuntimeError\n")
    finally:
        server.close()


@pytest.fixture
def gateway_with_metrics() -> Iterator[tuple[Setup, list[str]]]:
    lines: list[str] = []
    pipeline = EventPipeline([CallbackSink(lines.append, name="tap")])
    s = Setup(metrics=("127.0.0.1", 0), pipeline=pipeline, own_pipeline=True)
    yield s, lines
    s.close()


def test_scrape_of_a_running_gateway_counts_sessions_drops_and_sink_health(
    gateway_with_metrics: tuple[Setup, list[str]],
) -> None:
    s, lines = gateway_with_metrics
    bound = s.gateway.runtime.metrics_bound
    assert bound is not None and bound[0] == "127.0.0.1" and bound[1] > 0
    url = f"http://127.0.0.1:{bound[1]}/metrics"

    status, content_type, body = get(url)
    assert (status, content_type) == (200, CONTENT_TYPE)
    before = parse_exposition(body)
    assert before[("jvpn_gateway_sessions", (("state", "ATTACHED"),))] == 0
    assert before[("jvpn_gateway_policy_valid", ())] == 1

    # lost_state = "terminate": the client ends at the gateway's stop (gateway_shutdown)
    c = s.client(policy=dataclasses.replace(POLICY_DEFAULT, lost_state="terminate"))
    assert c.run_until(attached(c))
    c.send_inner(icmp_echo("10.66.0.2", GATEWAY_INNER, 1))
    assert c.run_until(lambda: len(echo_replies(c)) == 1)
    # A datagram for no session and a replayed one are counted drops. The copy comes from
    # an address that is no path of the session: a replay (from the session's own path a
    # single copy would be a counted network duplicate, issue 14).
    sock = c.socks[1]
    sock.send(b"\x03" + bytes(40), s.gateway.address)
    c.session.receive_tun_packet(icmp_echo("10.66.0.2", GATEWAY_INNER, 2), time.monotonic())
    with PathSocket(99, ("127.0.0.1", 0)) as stranger:
        for _path, data in c.session.datagrams_to_send():
            sock.send(data, s.gateway.address)
            stranger.send(data, s.gateway.address)  # the copy is a replay

    def scraped() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return parse_exposition(get(url)[2])

    def settled() -> bool:
        now = scraped()
        return (
            now.get(("jvpn_gateway_drops_total", (("reason", "unknown_session"),))) == 1
            and now.get(("jvpn_gateway_replay_drops_total", ())) == 1
            and len(echo_replies(c)) == 2
        )

    assert c.run_until(settled)
    after = scraped()
    assert after[("jvpn_gateway_sessions", (("state", "ATTACHED"),))] == 1
    assert after[("jvpn_gateway_sessions_created_total", ())] == 1
    assert after[("jvpn_gateway_inner_packets_total", (("direction", "to_clients"),))] == 2
    assert after[("jvpn_gateway_replay_drops_total", ())] == 1
    assert after[("jvpn_gateway_drops_total", (("reason", "replay_detected"),))] == 1
    assert after[("jvpn_event_sink_up", (("sink", "tap"),))] == 1
    assert after[("jvpn_event_ring_dropped_total", ())] == 0
    assert ("jvpn_event_sink_queue_depth", (("sink", "tap"),)) in after
    assert after[("jvpn_observability_ok", ())] == 1

    s.gateway.stop()
    assert c.run_until(lambda: c.state is State.TERMINATED)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=2)  # the endpoint closed with the gateway
    assert any('"SESSION_CREATED"' in line for line in lines)
