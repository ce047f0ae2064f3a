"""Prometheus text exposition (format 0.0.4) and a small scrape server (DESIGN D16).

The gateway serves its metrics on a loopback address by default (``--metrics
127.0.0.1:9108``). :class:`MetricsServer` runs the stdlib ``http.server`` on its own
thread; every scrape calls ``collect()``, which returns the metric families (the gateway
gathers them on its loop thread and hands them over). A scrape never touches the engine
from the HTTP thread directly, and a failing ``collect`` answers 503 instead of raising.

Only ``GET /metrics`` (and ``/``) is served; everything else is 404.
"""

from __future__ import annotations

import ipaddress
import math
import socket
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Final, Literal

from tunnel.observability.pipeline import ObservabilityHealth

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
"""The Prometheus text format's content type."""

DEFAULT_METRICS_PORT: Final = 9108
DEFAULT_METRICS_HOST: Final = "127.0.0.1"
"""Loopback by default: metrics name sessions and reasons; exposing them is a choice."""

MetricKind = Literal["counter", "gauge"]


@dataclass(frozen=True, slots=True)
class MetricFamily:
    """One metric name with its help text, type and samples (label set -> value)."""

    name: str
    """Metric name; counters end in ``_total``."""
    help: str
    """One line of help."""
    kind: MetricKind
    """``counter`` or ``gauge``."""
    samples: Sequence[tuple[Mapping[str, str], float]] = field(default_factory=tuple)
    """(labels, value) pairs; an empty label mapping is the unlabelled sample."""


def escape_label_value(value: str) -> str:
    """Escape ``\\``, ``"`` and newline as the text format requires."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """Integers without a decimal point; NaN and infinities in Prometheus spelling."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**63:
        return str(int(value))
    return repr(float(value))


def render(families: Iterable[MetricFamily]) -> str:
    """The text exposition of ``families`` (ends with a newline)."""
    lines: list[str] = []
    for family in families:
        lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for labels, value in family.samples:
            if labels:
                text = ",".join(
                    f'{k}="{escape_label_value(str(v))}"' for k, v in sorted(labels.items())
                )
                lines.append(f"{family.name}{{{text}}} {format_value(value)}")
            else:
                lines.append(f"{family.name} {format_value(value)}")
    return "\n".join(lines) + "\n"


def labelled(
    name: str, help: str, kind: MetricKind, label: str, values: Mapping[str, float]
) -> MetricFamily:
    """A family with one label, one sample per key of ``values`` (sorted)."""
    return MetricFamily(
        name, help, kind, tuple(({label: k}, float(values[k])) for k in sorted(values))
    )


def single(name: str, help: str, kind: MetricKind, value: float) -> MetricFamily:
    """A family with one unlabelled sample."""
    return MetricFamily(name, help, kind, (({}, float(value)),))


def observability_families(health: ObservabilityHealth) -> list[MetricFamily]:
    """The event pipeline's health as metrics: sinks up, queue depths, counted losses."""
    sinks = health.sinks
    prefix = "jvpn_event_"
    return [
        single(
            "jvpn_observability_ok",
            "1 when no sink is failing and no event was lost recently.",
            "gauge",
            float(health.ok),
        ),
        single(prefix + "ring_depth", "Events waiting for the dispatcher.", "gauge",
               health.ring_depth),
        single(prefix + "ring_size", "Capacity of the event ring.", "gauge", health.ring_size),
        single(prefix + "ring_dropped_total", "Events lost before any sink.", "counter",
               health.ring_dropped),
        single(prefix + "invalid_total", "Events that could not be encoded, dropped.",
               "counter", health.invalid_events),
        labelled(prefix + "sink_up",
                 "1 while the sink drains: no failed write, blocked write or lost line "
                 "within the drain window (10 s); else 0.",
                 "gauge", "sink", {s.name: float(s.state == "ok") for s in sinks}),
        labelled(prefix + "sink_queue_depth", "Lines waiting in the sink's queue.", "gauge",
                 "sink", {s.name: s.queue_depth for s in sinks}),
        labelled(prefix + "sink_dropped_total", "Lines the sink lost.", "counter", "sink",
                 {s.name: s.dropped for s in sinks}),
        labelled(prefix + "sink_written_total", "Lines the sink wrote.", "counter", "sink",
                 {s.name: s.written for s in sinks}),
    ]  # fmt: skip


def parse_host_port(text: str, *, default_host: str = DEFAULT_METRICS_HOST) -> tuple[str, int]:
    """``127.0.0.1:9108``, ``[::1]:9108`` or ``:9108`` -> (host, port); ValueError if not.

    Hosts must be numeric (a metrics listener is never bound by a DNS lookup).
    """
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"not HOST:PORT: {text!r}")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"not HOST:PORT: {text!r}")
        if ":" in host:
            raise ValueError(f"IPv6 addresses need brackets: [{host}]:{port_text}")
    host = host or default_host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"host must be a numeric IP address, not {host!r}") from None
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"port must be 0..65535, not {port_text!r}")
    return host, int(port_text)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], collect: Callable[[], Iterable[MetricFamily]]
    ) -> None:
        self.collect = collect
        """What a scrape renders (called on the server's request thread)."""
        super().__init__(address, _Handler)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "jvpn-metrics"
    sys_version = ""

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] not in ("/metrics", "/"):
            self._reply(404, b"not found\n", "text/plain; charset=utf-8")
            return
        try:
            body = render(self.server.collect()).encode("utf-8")
        except Exception as exc:  # the engine did not answer: tell the scraper, never crash
            message = f"metrics unavailable: {type(exc).__name__}\n".encode()
            self._reply(503, message, "text/plain; charset=utf-8")
            return
        self._reply(200, body, CONTENT_TYPE)

    def _reply(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return None  # scrapes are not events; keep stderr quiet


class MetricsServer:
    """``GET /metrics`` on ``(host, port)`` from a daemon thread. Binds in ``__init__``.

    Raises OSError (e.g. ``EADDRINUSE``) when the address cannot be bound.
    """

    def __init__(self, host: str, port: int, collect: Callable[[], Iterable[MetricFamily]]) -> None:
        server_class = _Server6 if ":" in host else _Server
        self._server = server_class((host, port), collect)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
            name="jvpn-metrics", daemon=True,
        )  # fmt: skip
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port): the kernel's port when 0 was asked."""
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def close(self) -> None:
        """Stop serving and release the port; idempotent."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(2.0)
        self._server.server_close()
