"""Observability: the bounded event pipeline, its sinks and RFC 5424 formatting (D16).

Observability failure never blocks or alters the engine: ``EventPipeline.emit`` never
waits and never raises; loss is counted, warned about (EVENT_LOSS) and flagged in
``EventPipeline.health()``.
"""

from tunnel.observability.pipeline import (
    EVENT_LOSS,
    SINK_HEALTH,
    EventLike,
    EventPipeline,
    LossReason,
    ObservabilityHealth,
    SinkHealth,
    SinkState,
    backoff_delay,
    encode_event,
    sink_health_text,
)
from tunnel.observability.sinks import (
    CallbackSink,
    JsonlFileSink,
    Sink,
    StdoutSink,
    SyslogSink,
    sink_problems,
)

__all__ = [
    "EVENT_LOSS",
    "SINK_HEALTH",
    "CallbackSink",
    "EventLike",
    "EventPipeline",
    "JsonlFileSink",
    "LossReason",
    "ObservabilityHealth",
    "Sink",
    "SinkHealth",
    "SinkState",
    "StdoutSink",
    "SyslogSink",
    "backoff_delay",
    "encode_event",
    "sink_health_text",
    "sink_problems",
]
