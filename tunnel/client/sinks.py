"""The client's event sinks, built from ``[events]``, and their start-up check.

``[events] jsonl`` and ``[events] syslog`` each become one sink of the engine's
EventPipeline. :func:`check_sinks` asks every sink whether it can work now (a JSONL
directory that does not exist, a syslog host name that does not resolve): the programs
print one line per problem at start, and refuse to start (exit 2) when ``[events]
required`` names the sink. A sink that is not required starts anyway: the pipeline shows
it ``failing`` (SINK_HEALTH event, metrics, the TUI), retries it and counts what it loses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from tunnel.client.config import ClientConfig
from tunnel.observability import JsonlFileSink, Sink, SyslogSink

SINK_KEYS: Final = ("jsonl", "syslog")
"""The ``[events]`` keys that name a sink, as ``[events] required`` names them."""


@dataclass(frozen=True, slots=True)
class SinkProblem:
    """A configured sink that cannot work at start."""

    key: str
    """``jsonl`` or ``syslog`` (the ``[events]`` key)."""
    sink: str
    """The sink's name (as in SINK_HEALTH events and the UI)."""
    problem: str
    """What is wrong, e.g. ``directory /var/log/jvpn does not exist``."""
    required: bool
    """``[events] required`` names it: the client does not start."""

    def line(self) -> str:
        """The one line for stderr (without the program's prefix)."""
        if self.required:
            return (
                f"event sink {self.sink} cannot work: {self.problem} "
                f"(required by [events] required = [..., {self.key!r}]; not starting)"
            )
        return (
            f"warning: event sink {self.sink} cannot work: {self.problem}; starting anyway "
            "(its events are retried and counted as lost meanwhile)"
        )


def client_sinks(config: ClientConfig) -> list[tuple[str, Sink]]:
    """(``[events]`` key, sink) for every configured sink, in key order."""
    sinks: list[tuple[str, Sink]] = []
    if config.jsonl is not None:
        sinks.append(("jsonl", JsonlFileSink(config.jsonl)))
    target = config.syslog
    if target is not None:
        if target.transport == "tcp":
            syslog = SyslogSink(target.host, target.port, transport="tcp")
        else:
            syslog = SyslogSink(target.host, target.port, transport="udp")
        sinks.append(("syslog", syslog))
    return sinks


def check_sinks(config: ClientConfig) -> list[SinkProblem]:
    """Every configured sink that cannot work now (calls each sink's ``check()``)."""
    problems = []
    for key, sink in client_sinks(config):
        problem = sink.check() if isinstance(sink, JsonlFileSink | SyslogSink) else None
        if problem:
            problems.append(SinkProblem(key, sink.name, problem, key in config.events_required))
    return problems
