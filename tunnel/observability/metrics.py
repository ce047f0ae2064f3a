"""Prometheus metrics with prometheus_client, and a small scrape server (DESIGN D16).

A program describes its metrics as :class:`MetricFamily` values read from their owners
(the gateway's in :meth:`tunnel.gateway.metrics.GatewayMetrics.metric_families`, the one
place where they are declared); the loop counts in plain integers and a
:class:`PrometheusPublisher` publishes the families into prometheus_client's metrics now
and then (a timer, or the scrape), never per packet: counters by their increase since the
last publish, gauges set. prometheus_client renders the text exposition; in its
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, :func:`use_multiprocess_dir`) the
published values go to files of that directory, and one
:class:`~prometheus_client.multiprocess.MultiProcessCollector` serves every worker's, summed
(a gateway with ``workers`` > 1, tunnel/gateway/workers.py).

The gateway serves its metrics on a loopback address by default (``--metrics
127.0.0.1:9108``). :class:`MetricsServer` runs the stdlib ``http.server`` on its own
thread; every scrape calls ``collect()``, which returns the exposition (the gateway
publishes on its loop thread first). A scrape never touches the engine from the HTTP
thread directly, and a failing ``collect`` answers 503 instead of raising.

Only ``GET /metrics`` (and ``/``) is served; everything else is 404.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

from tunnel.observability.pipeline import ObservabilityHealth

if TYPE_CHECKING:  # imported where used: see use_multiprocess_dir
    from prometheus_client import CollectorRegistry, Counter, Gauge

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
"""The Prometheus text format's content type (what ``generate_latest`` writes)."""

DEFAULT_METRICS_PORT: Final = 9108
DEFAULT_METRICS_HOST: Final = "127.0.0.1"
"""Loopback by default: metrics name sessions and reasons; exposing them is a choice."""

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"

MetricKind = Literal["counter", "gauge"]

Merge = Literal["livesum", "livemin", "livemax"]
"""How the multiprocess collector combines a gauge of several live workers (a dead
worker's gauges leave; its counters stay in the sums)."""


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
    labels: tuple[str, ...] = ()
    """The label names (every sample has them all)."""
    merge: Merge = "livesum"
    """A gauge's merge across workers (counters are summed)."""


def labelled(
    name: str, help: str, kind: MetricKind, label: str, values: Mapping[str, float],
    merge: Merge = "livesum",
) -> MetricFamily:  # fmt: skip
    """A family with one label, one sample per key of ``values`` (sorted)."""
    return MetricFamily(
        name, help, kind, tuple(({label: k}, float(values[k])) for k in sorted(values)),
        (label,), merge,
    )  # fmt: skip


def single(
    name: str, help: str, kind: MetricKind, value: float, merge: Merge = "livesum"
) -> MetricFamily:
    """A family with one unlabelled sample."""
    return MetricFamily(name, help, kind, (({}, float(value)),), (), merge)


class PrometheusPublisher:
    """prometheus_client metrics for :class:`MetricFamily` values, in a registry of its own.

    :meth:`publish` (from one thread: the gateway's loop) creates each metric the first
    time its family appears and brings it to the family's values; :meth:`exposition`
    (any thread) renders the registry.
    """

    def __init__(self) -> None:
        import prometheus_client

        # a counter is its ``_total`` sample alone (no ``_created`` series: the names and
        # the families stay what docs/gateway.md lists)
        prometheus_client.disable_created_metrics()
        self.registry: CollectorRegistry = prometheus_client.CollectorRegistry(auto_describe=True)
        self._counters: dict[str, Counter] = {}
        self._gauges: dict[str, Gauge] = {}
        self._published: dict[tuple[str, tuple[str, ...]], float] = {}
        """(name, label values) -> the counter value published last."""

    def publish(self, families: Iterable[MetricFamily]) -> None:
        for family in families:
            if family.kind == "gauge":
                self._set(family)
            else:
                self._increase(family)

    def _set(self, family: MetricFamily) -> None:
        gauge = self._gauges.get(family.name)
        if gauge is None:
            from prometheus_client import Gauge

            gauge = Gauge(
                family.name, family.help, family.labels, registry=self.registry,
                multiprocess_mode=family.merge,
            )  # fmt: skip
            self._gauges[family.name] = gauge
        for labels, value in family.samples:
            child = gauge.labels(*(labels[n] for n in family.labels)) if family.labels else gauge
            child.set(value)

    def _increase(self, family: MetricFamily) -> None:
        """A counter goes up by what its source counted since the last publish."""
        counter = self._counters.get(family.name)
        if counter is None:
            from prometheus_client import Counter

            counter = Counter(family.name, family.help, family.labels, registry=self.registry)
            self._counters[family.name] = counter
        for labels, value in family.samples:
            key = tuple(labels[n] for n in family.labels)
            child = counter.labels(*key) if key else counter  # a series, also at 0
            last = self._published.get((family.name, key), 0.0)
            if value > last:
                child.inc(value - last)
            self._published[(family.name, key)] = value

    def exposition(self) -> bytes:
        """The text exposition of everything published."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def use_multiprocess_dir(path: Path) -> None:
    """From now on this process and its children publish into files in ``path`` (a
    private directory; prometheus_client's multiprocess mode). prometheus_client reads
    the variable when it is first imported, so this module imports it only where it is
    used, and this must come first (the gateway's supervisor, before it forks its
    workers); RuntimeError otherwise."""
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before its multiprocess directory")
    os.environ[MULTIPROC_ENV] = str(path)


def multiprocess_exposition(path: Path) -> Callable[[], bytes]:
    """What a scrape of every process publishing into ``path`` returns (summed)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(path))
    return lambda: generate_latest(registry)


def process_ended(path: Path, pid: int) -> None:
    """Process ``pid`` (a worker) ended: its gauges leave the merge, its counters stay."""
    from prometheus_client.multiprocess import mark_process_dead

    mark_process_dead(pid, str(path))


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
            merge="livemin",
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
                 "gauge", "sink", {s.name: float(s.state == "ok") for s in sinks}, "livemin"),
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

    def __init__(self, address: tuple[str, int], collect: Callable[[], bytes]) -> None:
        self.collect = collect
        """What a scrape returns (called on the server's request thread)."""
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
            body = self.server.collect()
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

    def __init__(self, host: str, port: int, collect: Callable[[], bytes]) -> None:
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
