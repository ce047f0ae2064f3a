"""RFC 5424 syslog formatting and RFC 6587 octet-counting framing (pure, no I/O).

One event becomes one message::

    <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [jvpn@32473 k="v" ...] {json event}

* PRI = facility * 8 + severity; the severity comes from the event type
  (:func:`severity_for`), so a SIEM can tell security outcomes from telemetry.
* TIMESTAMP is RFC 3339 UTC with milliseconds, taken from the event's ``ts_ms`` when it is
  a Unix-epoch millisecond value, otherwise from the caller's wall clock.
* MSGID is the event type; the structured data carries the fields a SIEM indexes on
  (session id, reason code, state version, node id) with ``"``, ``\\`` and ``]`` escaped;
  MSG is the compact JSON event itself (ASCII, so no BOM is needed: RFC 5424 MSG-ANY).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Final

# -- facilities (RFC 5424 §6.2.1) ------------------------------------------------------
FACILITY_USER: Final = 1
FACILITY_DAEMON: Final = 3
FACILITY_AUTH: Final = 4
FACILITY_AUTHPRIV: Final = 10
FACILITY_LOCAL0: Final = 16
"""Default: local0 is the facility sites conventionally route to a SIEM collector."""
FACILITY_LOCAL7: Final = 23

# -- severities (RFC 5424 §6.2.1) ------------------------------------------------------
SEVERITY_EMERGENCY: Final = 0
SEVERITY_ALERT: Final = 1
SEVERITY_CRITICAL: Final = 2
SEVERITY_ERROR: Final = 3
SEVERITY_WARNING: Final = 4
SEVERITY_NOTICE: Final = 5
SEVERITY_INFO: Final = 6
SEVERITY_DEBUG: Final = 7

SEVERITY_BY_EVENT_TYPE: Final[Mapping[str, int]] = {
    "SECURITY_EVENT": SEVERITY_WARNING,
    "SESSION_TERMINATED": SEVERITY_NOTICE,
    "SESSION_LINKED": SEVERITY_NOTICE,
    "EVENT_LOSS": SEVERITY_WARNING,
    "DIAGNOSTIC": SEVERITY_ERROR,
}
"""Event types that are not telemetry; every other type is informational."""

DEFAULT_SD_ID: Final = "jvpn@32473"
"""SD-ID with the private enterprise number 32473 that RFC 5612 reserves for examples;
a site with its own PEN passes its own SD-ID."""

SD_PARAMS: Final = ("session_id", "reason_code", "state_version", "node_id")
"""Event fields copied into the structured data, in this order, when present."""

NILVALUE: Final = "-"

MAX_HOSTNAME: Final = 255
MAX_APP_NAME: Final = 48
MAX_PROCID: Final = 128
MAX_MSGID: Final = 32
MAX_SD_NAME: Final = 32
"""Header field lengths from the RFC 5424 ABNF."""

MIN_UNIX_MS: Final = 946_684_800_000
"""2000-01-01T00:00:00Z: a smaller ts_ms is a monotonic reading, not a date."""


def severity_for(event_type: str) -> int:
    """RFC 5424 severity of an event type."""
    return SEVERITY_BY_EVENT_TYPE.get(event_type, SEVERITY_INFO)


def pri(facility: int, severity: int) -> int:
    """PRIVAL = facility * 8 + severity; raises ValueError on an out-of-range input."""
    if not 0 <= facility <= 23:
        raise ValueError(f"syslog facility out of range: {facility}")
    if not 0 <= severity <= 7:
        raise ValueError(f"syslog severity out of range: {severity}")
    return facility * 8 + severity


def header_field(value: str | None, max_len: int) -> str:
    """A header field as RFC 5424 PRINTUSASCII (33..126), truncated; empty -> NILVALUE."""
    if not value:
        return NILVALUE
    cleaned = "".join(ch if 33 <= ord(ch) <= 126 else "_" for ch in value[:max_len])
    return cleaned or NILVALUE


def sd_name(value: str) -> str:
    """An SD-NAME: PRINTUSASCII except ``=``, space, ``]`` and ``"``, at most 32 chars."""
    cleaned = "".join(
        "_" if ch in '= ]"' or not 33 <= ord(ch) <= 126 else ch for ch in value[:MAX_SD_NAME]
    )
    return cleaned or "_"


def escape_param_value(value: str) -> str:
    """Escape a PARAM-VALUE: ``\\`` -> ``\\\\``, ``"`` -> ``\\"``, ``]`` -> ``\\]``."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def format_timestamp(unix_ms: int) -> str:
    """RFC 3339 UTC timestamp with millisecond precision, e.g. 2024-05-01T12:00:00.123Z."""
    dt = datetime.datetime.fromtimestamp(unix_ms / 1000.0, tz=datetime.UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{unix_ms % 1000:03d}Z"


def structured_data(event: Mapping[str, object], sd_id: str = DEFAULT_SD_ID) -> str:
    """The SD element for an event, or NILVALUE when it carries none of SD_PARAMS."""
    params = []
    for key in SD_PARAMS:
        value = event.get(key)
        if value is None:
            continue
        text = value if isinstance(value, str) else str(value)
        params.append(f'{sd_name(key)}="{escape_param_value(text)}"')
    if not params:
        return NILVALUE
    return "[" + sd_name(sd_id) + " " + " ".join(params) + "]"


def format_message(
    event: Mapping[str, object],
    msg: str,
    *,
    now_ms: int,
    hostname: str,
    app_name: str = "jvpn",
    procid: str | None = None,
    facility: int = FACILITY_LOCAL0,
    sd_id: str = DEFAULT_SD_ID,
) -> str:
    """One RFC 5424 message for ``event`` whose MSG part is ``msg`` (the JSON line).

    ``now_ms`` (Unix ms) is used for TIMESTAMP when the event's own ``ts_ms`` is not a
    Unix-epoch value.
    """
    event_type = event.get("event_type")
    event_type_text = event_type if isinstance(event_type, str) else ""
    ts = event.get("ts_ms")
    unix_ms = ts if isinstance(ts, int) and not isinstance(ts, bool) else 0
    if unix_ms < MIN_UNIX_MS:
        unix_ms = now_ms
    prival = pri(facility, severity_for(event_type_text))
    return " ".join(
        (
            f"<{prival}>1",
            format_timestamp(unix_ms),
            header_field(hostname, MAX_HOSTNAME),
            header_field(app_name, MAX_APP_NAME),
            header_field(procid, MAX_PROCID),
            header_field(event_type_text, MAX_MSGID),
            structured_data(event, sd_id),
            msg,
        )
    )


def octet_frame(message: bytes) -> bytes:
    """RFC 6587 §3.4.1 octet-counting frame: ``MSG-LEN SP SYSLOG-MSG``."""
    return str(len(message)).encode("ascii") + b" " + message


def truncate_utf8(data: bytes, limit: int) -> bytes:
    """At most ``limit`` bytes of ``data`` without splitting a UTF-8 sequence."""
    if len(data) <= limit:
        return data
    return data[:limit].decode("utf-8", "ignore").encode("utf-8")
