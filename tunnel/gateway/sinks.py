"""The gateway's event sinks, built from ``[[sinks]]``, and their start-up check.

:func:`check_sinks` asks every sink whether it can work now (a JSONL directory that does
not exist, a syslog host name that does not resolve). ``jvpn-gateway`` prints one
``warning:`` line per problem, or refuses to start (exit 3, a configuration error) when
the sink's table says ``required = true``. A sink that is not required starts anyway: the
pipeline shows it ``failing`` (SINK_HEALTH, ``jvpn_event_sink_up`` 0), retries it and
counts what it loses.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunnel.gateway.config import GatewayConfig, SinkConfig
from tunnel.observability.sinks import JsonlFileSink, Sink, StdoutSink, SyslogSink


@dataclass(frozen=True, slots=True)
class SinkProblem:
    """A configured sink that cannot work at start."""

    index: int
    """Its position in ``[[sinks]]`` (0-based, as ``sinks[i]`` in config errors)."""
    sink: str
    """The sink's name (as in SINK_HEALTH events and the metrics' ``sink`` label)."""
    problem: str
    """What is wrong, e.g. ``directory /var/log/jvpn does not exist``."""
    required: bool
    """``required = true``: the gateway does not start."""

    def line(self) -> str:
        """The one line for stderr (without the program's prefix)."""
        if self.required:
            return (
                f"event sink {self.sink} cannot work: {self.problem} "
                f"(sinks[{self.index}].required = true; not starting)"
            )
        return (
            f"warning: event sink {self.sink} cannot work: {self.problem}; starting anyway "
            "(its events are retried and counted as lost meanwhile)"
        )


def build_sink(sc: SinkConfig) -> Sink | None:
    """The sink of one ``[[sinks]]`` table."""
    if sc.kind == "jsonl" and sc.path is not None:
        return JsonlFileSink(sc.path, max_bytes=sc.max_bytes, backups=sc.backups)
    if sc.kind == "syslog" and sc.host is not None:
        return SyslogSink(sc.host, sc.port, transport=sc.transport, app_name="jvpn-gateway")
    if sc.kind == "stdout":
        return StdoutSink()
    return None


def gateway_sinks(config: GatewayConfig) -> list[Sink]:
    """Every configured sink, in file order."""
    return [sink for sink in map(build_sink, config.sinks) if sink is not None]


def check_sinks(config: GatewayConfig) -> list[SinkProblem]:
    """Every configured sink that cannot work now (each sink's ``check()``)."""
    problems = []
    for index, sc in enumerate(config.sinks):
        sink = build_sink(sc)
        problem = sink.check() if isinstance(sink, JsonlFileSink | SyslogSink) else None
        if sink is not None and problem:
            problems.append(SinkProblem(index, sink.name, problem, sc.required))
    return problems
