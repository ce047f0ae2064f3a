"""Operator policy: a frozen, validated ``Policy`` and its TOML form (DESIGN D12, D13, D14).

Every tunable number the protocol machines use lives here, with a finite range. The
ranges and the cross-field rules are data (``POLICY_FIELDS``, ``CROSS_FIELD_RULES``) and
``Policy.__post_init__`` checks all of them, so a ``Policy`` that exists is valid, also one
made by ``dataclasses.replace``. The invariants of DESIGN D14 cannot be switched off by
any value: the replay window is at least ``REPLAY_WINDOW_MIN``, the switch rate is finite
and at least 1 per minute, every TTL and lifetime is a finite positive integer (no
"0 means forever", no inf, no NaN, no ``true`` posing as 1).

``parse_policy`` is pure (text in, ``Policy`` out); ``load_policy`` is the one thin
wrapper that reads a file. What to do with an invalid policy (keep the last valid one for
running sessions, deny new ones) is the caller's business; see docs/policy.md.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from os import PathLike, fspath
from typing import Final, Literal

from tunnel.core.constants import MAX_INNER_PACKET, REPLAY_WINDOW_MIN

__all__ = [
    "CROSS_FIELD_RULES",
    "MANDATORY_KEYS",
    "MAX_POLICY_SIZE",
    "POLICY_DEFAULT",
    "POLICY_FIELDS",
    "SECTIONS",
    "Policy",
    "PolicyError",
    "PolicyField",
    "load_policy",
    "parse_policy",
    "policy_summary",
    "policy_to_toml",
]

MAX_POLICY_SIZE: Final = 1 << 20
"""Characters of text / bytes of file: a policy is a few kB; over 1 MiB is a mistake."""

VERSION_LABEL_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")
"""Operator label: short, printable, no '+' (``policy_version`` appends ``+hash``)."""

DEFAULT_VERSION_LABEL: Final = "1.0"
"""The spec's schema example label; used when the file has no ``version``."""

RECOVERY_TIMEOUT_ACTIONS: Final = ("terminate", "degrade")
LOST_STATE_ACTIONS: Final = ("new_session", "terminate")
"""What a client does when its gateway no longer knows the session (DESIGN D15c)."""
"""DESIGN D2: what recovery-window expiry does; "terminate" is the default."""

SECTIONS: Final = ("session", "volatility", "switching", "transport", "security", "queue")
"""TOML sections, in the order ``policy_to_toml`` writes them."""

_VALUE_REPR_MAX: Final = 60
"""Longest value text quoted in an error message (a pasted blob must not flood logs)."""

_HUGE_INT_BITS: Final = 128
"""Integers wider than this are described, not printed (printing 10**5000 raises)."""

_SPEC_NAMES: Final[Mapping[str, str]] = {
    "heartbeat_interval_ms": "volatility.probe_interval_ms",
    "session_ttl_ms": "session.max_lifetime_ms",
    "transport_loss_ttl_ms": "session.transport_lost_ttl_ms",
    "max_recovery_window_ms": "switching.recovery_window_ms",
    "max_switches_per_minute": "switching.max_switches_per_min",
    "cooldown_ms": "switching.switch_cooldown_ms",
}
"""Names other spec documents use for our keys: named in the error as a hint, never accepted."""


@dataclass(frozen=True, slots=True)
class PolicyField:
    """One row of the bounds table: where a key lives in TOML and which values it takes."""

    name: str
    """Attribute name on ``Policy`` (flat, unique)."""
    section: str
    """TOML section the key is written in."""
    kind: type
    """``int``, ``float`` (ints accepted) or ``str`` (one of ``choices``)."""
    lo: float
    """Smallest allowed value, inclusive (unused for ``str``)."""
    hi: float
    """Largest allowed value, inclusive (unused for ``str``)."""
    reason: str
    """Why the range is what it is (one line)."""
    optional: bool = False
    """``None`` allowed (written by omitting the key): the feature is off."""
    choices: tuple[str, ...] = ()
    """Allowed strings for a ``str`` field."""

    @property
    def key(self) -> str:
        """Dotted TOML key, e.g. ``"switching.max_switches_per_min"``."""
        return f"{self.section}.{self.name}"

    def range_text(self) -> str:
        """The allowed values as shown in error messages and docs."""
        if self.kind is str:
            return ", ".join(f'"{c}"' for c in self.choices)
        return f"[{_fmt_number(self.lo)}, {_fmt_number(self.hi)}]"


# The bounds table: the only place a policy range is written down. All bounds inclusive.
_F = PolicyField
# fmt: off
POLICY_FIELDS: Final[tuple[PolicyField, ...]] = (
    # -- session ------------------------------------------------------------------------
    _F("max_lifetime_ms", "session", int, 60_000, 604_800_000,
       "spec 8-24 h; 1 min for labs up to 7 days, never unbounded (AT-46, AT-58)"),
    _F("transport_lost_ttl_ms", "session", int, 1_000, 600_000,
       "spec 10-60 s; 1 s for labs up to 10 min for patient mobile users"),
    # -- volatility ---------------------------------------------------------------------
    _F("probe_interval_ms", "volatility", int, 10, 10_000,
       "below 10 ms probes become traffic; above 10 s death goes unseen too long"),
    _F("standby_probe_interval_ms", "volatility", int, 10, 60_000,
       "standby paths need fresh RTT/loss, at least once a minute"),
    _F("idle_after_ms", "volatility", int, 2_000, 3_600_000,
       "no inner data either way this long: idle; under 2 s a pause in typing is idleness"),
    _F("idle_probe_interval_ms", "volatility", int, 10, 60_000,
       "active path of an idle session, a NAT keepalive too (mappings: often 30 s)"),
    _F("idle_standby_probe_interval_ms", "volatility", int, 10, 60_000,
       "standby paths of an idle session; as standby_probe_interval, once a minute"),
    _F("dead_min_ms", "volatility", int, 20, 60_000,
       "floor of the dead timer; a few LAN RTTs at least, a minute at most"),
    _F("dead_rtt_multiplier", "volatility", float, 1.5, 20.0,
       "dead after k x smoothed RTT of silence; k < 1.5 calls a slow reply death"),
    _F("dead_traffic_min_ms", "volatility", int, 10, 60_000,
       "floor of the traffic death rule; below 10 ms a scheduling hiccup is a death"),
    _F("loss_window_ms", "volatility", int, 250, 60_000,
       "spec 1-5 s; loss over a window shorter than a few probes is noise"),
    _F("loss_volatile_threshold", "volatility", float, 0.01, 1.0,
       "spec (0, 1]: a ratio; 0 would make every path volatile"),
    _F("min_loss_samples", "volatility", int, 1, 1_000,
       "no loss verdict from fewer samples (never switch on one packet)"),
    _F("max_consecutive_drops", "volatility", int, 1, 100,
       "spec 3-7 consecutive missed probes mark a path volatile"),
    _F("latency_volatile_threshold_ms", "volatility", int, 10, 60_000,
       "optional p95 RTT limit; omit to turn latency-based volatility off",
       optional=True),
    _F("volatile_to_degraded_ms", "volatility", int, 100, 600_000,
       "spec 1.5-8 s of volatility with no better path before DEGRADED"),
    _F("stability_window_ms", "volatility", int, 100, 600_000,
       "a path must stay healthy this long before stability_restored"),
    # -- switching ----------------------------------------------------------------------
    _F("max_switches_per_min", "switching", int, 1, 120,
       "spec 3-12; never 0 or unlimited: switching is always possible and always bounded"),
    _F("switch_cooldown_ms", "switching", int, 100, 60_000,
       "spec 0.5-5 s between automatic switches; manual switches exempt"),
    _F("switch_improvement_factor", "switching", float, 1.01, 10.0,
       "hysteresis cannot be off: two equal paths must never flap (D9)"),
    _F("switch_dwell_ms", "switching", int, 10, 60_000,
       "a better candidate must stay better this long (no switch on one spike)"),
    _F("failed_path_holddown_ms", "switching", int, 100, 600_000,
       "anti-flap: a path that failed is live this long (doubling per repeat) before reuse"),
    _F("recovery_window_ms", "switching", int, 500, 600_000,
       "spec 2-15 s to find a new path after the active one died"),
    _F("on_recovery_timeout", "switching", str, 0, 0,
       "D2: recovery-window expiry terminates (default) or degrades",
       choices=RECOVERY_TIMEOUT_ACTIONS),
    _F("degraded_terminate_after_ms", "switching", int, 1_000, 86_400_000,
       "D13: optional cap on time in DEGRADED; omit to never terminate for it",
       optional=True),
    _F("reattach_retry_ms", "switching", int, 20, 10_000,
       "reattach request retransmit interval: faster floods, slower wastes the window"),
    _F("lost_state", "switching", str, 0, 0,
       "D15c: a gateway that lost the session gets a new one (default) or ends it",
       choices=LOST_STATE_ACTIONS),
    # -- transport ----------------------------------------------------------------------
    _F("max_candidate_count", "transport", int, 1, 9,
       "at least one path; at most 9 because the UI maps keys 1-9 to paths"),
    # -- security -----------------------------------------------------------------------
    _F("reattach_proof_max_age_ms", "security", int, 500, 60_000,
       "spec 1-10 s freshness of a reattach proof; never unbounded"),
    _F("replay_window_size", "security", int, REPLAY_WINDOW_MIN, 16_384,
       "D12: never below 2048 (replay protection cannot be off); 2 KiB bitmap max"),
    _F("duplicate_alarm_ratio", "security", float, 0.01, 0.5,
       "duplicates on a validated path above this share of a session's datagrams per"
       " second are a replay; above 0.5 a replay could hide among copies"),
    _F("rekey_after_s", "security", int, 10, 86_400,
       "D10 default 120 s; keys always rotate, at the latest daily"),
    _F("security_failures_to_degrade", "security", int, 1, 1_000,
       "authenticated-but-invalid events tolerated before DEGRADED"),
    _F("security_failures_to_terminate", "security", int, 1, 10_000,
       "security failures before TERMINATED; always finite"),
    _F("reattach_rate_per_s", "security", float, 0.1, 100.0,
       "token-bucket refill for reattach requests (spec 2/s); never unlimited"),
    _F("reattach_burst", "security", int, 1, 100,
       "token-bucket size for reattach requests (spec 5)"),
    _F("handshake_timeout_ms", "security", int, 100, 60_000,
       "the handshake's deadline: retries with backoff until then, then handshake_failed"),
    _F("handshake_attempts", "security", int, 1, 20,
       "handshake sends at most within handshake_timeout_ms; never retry forever"),
    # -- queue --------------------------------------------------------------------------
    _F("outbound_queue_packets", "queue", int, 1, 65_536,
       "D11: packets held while no transport is active; bounded"),
    _F("outbound_queue_bytes", "queue", int, MAX_INNER_PACKET, 67_108_864,
       "D11: bytes held while no transport is active; one full packet up to 64 MiB"),
)
# fmt: on

_FIELD_BY_NAME: Final[Mapping[str, PolicyField]] = {f.name: f for f in POLICY_FIELDS}

# fmt: off
CROSS_FIELD_RULES: Final[tuple[tuple[str, Literal["<", "<="], str, str], ...]] = (
    ("dead_min_ms", "<", "transport_lost_ttl_ms",
     "a path must be declared dead before the session gives up on transport"),
    ("recovery_window_ms", "<=", "transport_lost_ttl_ms",
     "recovery never outlasts the transport-lost TTL (spec I4)"),
    ("transport_lost_ttl_ms", "<", "max_lifetime_ms",
     "losing transport must end a session before its lifetime does"),
    ("probe_interval_ms", "<", "dead_min_ms",
     "an idle healthy path is probed before it can look dead"),
    ("probe_interval_ms", "<=", "standby_probe_interval_ms",
     "standby paths are never probed faster than the active one"),
    ("probe_interval_ms", "<=", "idle_probe_interval_ms",
     "an idle session never probes faster than a busy one"),
    ("standby_probe_interval_ms", "<=", "idle_standby_probe_interval_ms",
     "an idle session never probes its standby paths faster than a busy one"),
    ("idle_probe_interval_ms", "<=", "idle_standby_probe_interval_ms",
     "standby paths are never probed faster than the active one, idle or not"),
    ("reattach_retry_ms", "<", "recovery_window_ms",
     "at least two reattach attempts fit into the recovery window"),
    ("security_failures_to_degrade", "<=", "security_failures_to_terminate",
     "DEGRADED comes before TERMINATED, never after"),
)
# fmt: on
"""(field, op, other field, reason): checked after every field is in range."""

MANDATORY_KEYS: Final[tuple[str, ...]] = (
    "session.max_lifetime_ms",
    "session.transport_lost_ttl_ms",
    "switching.max_switches_per_min",
    "switching.recovery_window_ms",
    "volatility.loss_volatile_threshold",
    "security.reattach_proof_max_age_ms",
)
"""SPEC 6.1: a policy file without any of these is invalid (no silent default)."""


class PolicyError(ValueError):
    """A policy is invalid. ``field`` is the dotted key (or ``<toml>``/``<file>``)."""

    field: str
    """Dotted key such as ``"switching.max_switches_per_min"``, ``"version"``,
    ``"<toml>"`` (not TOML at all) or ``"<file>"`` (could not be read)."""
    value: object
    """The offending value as given (``None`` when missing or not applicable)."""

    def __init__(self, field: str, value: object, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.value = value

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.field, self.value, str(self)))


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """Every tunable of a session, validated on construction. Times in ms unless ``_s``."""

    version: str = DEFAULT_VERSION_LABEL
    """Operator's label for this policy (``version`` at the top of the file)."""

    # [session]
    max_lifetime_ms: int = 28_800_000
    """Hard session lifetime (8 h); then TERMINATED ``session_lifetime_exceeded``."""
    transport_lost_ttl_ms: int = 15_000
    """Longest time a session may have no active transport before it terminates."""

    # [volatility]
    probe_interval_ms: int = 100
    """Probe the active path when it has been silent this long."""
    standby_probe_interval_ms: int = 1_000
    """Probe every standby path this often."""
    idle_after_ms: int = 5_000
    """No inner data either way for this long: the session is idle and probes slowly
    (issue 11; docs/policy.md, "Idle sessions")."""
    idle_probe_interval_ms: int = 10_000
    """Probe the active path of an idle session this often (a NAT keepalive too)."""
    idle_standby_probe_interval_ms: int = 15_000
    """Probe every standby path of an idle session this often."""
    dead_min_ms: int = 300
    """A path is dead after max(dead_min_ms, dead_rtt_multiplier x SRTT) of silence."""
    dead_rtt_multiplier: float = 4.0
    """RTT multiple in the dead rule above."""
    dead_traffic_min_ms: int = 50
    """While data flows on a path, silence of a few expected inter-arrival times makes it
    suspect (probed at once, the standby paths once too); it is dead when the probes stay
    unanswered two probe RTOs while a standby answered, but never before this much
    silence (issue 10; docs/policy.md)."""
    loss_window_ms: int = 3_000
    """Window over which loss is measured (spec starter 2 s; 3 s so 10 % loss each way
    stays below the threshold, see docs/policy.md)."""
    loss_volatile_threshold: float = 0.20
    """Loss ratio in the window at or above which a path is VOLATILE."""
    min_loss_samples: int = 8
    """Probes/packets the window must hold before loss counts."""
    max_consecutive_drops: int = 5
    """Consecutive unanswered probes that make a path VOLATILE (spec starter 3; 5, see
    docs/policy.md)."""
    latency_volatile_threshold_ms: int | None = None
    """Smoothed RTT at or above which a path is VOLATILE; ``None``: off."""
    volatile_to_degraded_ms: int = 4_000
    """VOLATILE with no better candidate for this long -> DEGRADED."""
    stability_window_ms: int = 2_000
    """A VOLATILE/DEGRADED path healthy this long again -> ``stability_restored``."""

    # [switching]
    max_switches_per_min: int = 8
    """Switches allowed in any sliding 60 s window (manual ones count too)."""
    switch_cooldown_ms: int = 1_500
    """Minimum gap between automatic switches."""
    switch_improvement_factor: float = 1.10
    """A candidate's score must exceed active x factor to be switched to."""
    switch_dwell_ms: int = 300
    """... and keep doing so for this long."""
    failed_path_holddown_ms: int = 2_000
    """A path that failed must be live again this long (2x standby probe interval; doubled
    for each further failure in 60 s, at most 16x) before it is a proactive switch target;
    recovery prefers other paths but may still use it (SPEC 4.6 anti-flap)."""
    recovery_window_ms: int = 8_000
    """Time in RECOVERING to reattach on some path."""
    on_recovery_timeout: str = "terminate"
    """What recovery-window expiry does: ``"terminate"`` or ``"degrade"``."""
    degraded_terminate_after_ms: int | None = None
    """Terminate after this long in DEGRADED; ``None``: never for that reason."""
    reattach_retry_ms: int = 250
    """Retransmit interval of an unanswered reattach request."""
    lost_state: str = "new_session"
    """Client: when the gateway no longer knows the session (it restarted without its
    state, or said it is shutting down): ``"new_session"`` (a new handshake, the same inner
    addresses, linked to the old session) or ``"terminate"``."""

    # [transport]
    max_candidate_count: int = 8
    """Most candidate paths kept (1-9: keys 1-9 in the UI)."""

    # [security]
    reattach_proof_max_age_ms: int = 5_000
    """Oldest reattach request timestamp the gateway accepts."""
    replay_window_size: int = 8_192
    """Anti-replay window in counters (never below 2048; 8192 covers multipath reordering)."""
    duplicate_alarm_ratio: float = 0.10
    """Share of duplicates (on validated paths, per second) above which they are replays."""
    rekey_after_s: int = 120
    """Rotate traffic keys this often (seconds)."""
    security_failures_to_degrade: int = 3
    """Security failures on a session before DEGRADED."""
    security_failures_to_terminate: int = 10
    """Security failures on a session before TERMINATED ``security_failure``."""
    reattach_rate_per_s: float = 2.0
    """Reattach token-bucket refill rate."""
    reattach_burst: int = 5
    """Reattach token-bucket size."""
    handshake_timeout_ms: int = 5_000
    """The handshake's deadline: retries with jittered backoff until then (docs/client.md)."""
    handshake_attempts: int = 5
    """Handshake tries before the client gives up."""

    # [queue]
    outbound_queue_packets: int = 256
    """Packets queued while no transport is active (overflow is dropped and counted)."""
    outbound_queue_bytes: int = 524_288
    """Bytes queued while no transport is active."""

    policy_version: str = field(init=False, compare=False)
    """``"<version>+<8 hex>"``: the label plus a hash of every other value."""

    def __post_init__(self) -> None:
        _check_label(self.version)
        for spec in POLICY_FIELDS:
            value = getattr(self, spec.name)
            checked = _check_value(spec, value)
            if checked is not value:
                object.__setattr__(self, spec.name, checked)
        for left, op, right, reason in CROSS_FIELD_RULES:
            a, b = getattr(self, left), getattr(self, right)
            if not (a < b if op == "<" else a <= b):
                lspec, rspec = _FIELD_BY_NAME[left], _FIELD_BY_NAME[right]
                raise PolicyError(
                    lspec.key,
                    a,
                    f"policy: {lspec.key} = {_fmt_value(a)} must be {op} "
                    f"{rspec.key} = {_fmt_value(b)} ({reason})",
                )
        object.__setattr__(self, "policy_version", f"{self.version}+{_content_hash(self)}")


# -- validation helpers ------------------------------------------------------------------


def _fmt_number(x: float) -> str:
    return str(int(x)) if isinstance(x, int) else repr(x)


def _fmt_value(value: object) -> str:
    """A value as an operator would write it in TOML, shortened."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=True)
    elif isinstance(value, int) and value.bit_length() > _HUGE_INT_BITS:
        text = f"<{value.bit_length()}-bit integer>"
    elif isinstance(value, float) and math.isnan(value):
        text = "nan"
    elif isinstance(value, float) and math.isinf(value):
        text = "inf" if value > 0 else "-inf"
    else:
        text = repr(value)
    if len(text) > _VALUE_REPR_MAX:
        text = text[: _VALUE_REPR_MAX - 3] + "..."
    return text


def _check_label(value: object) -> None:
    if not isinstance(value, str) or not VERSION_LABEL_RE.fullmatch(value):
        raise PolicyError(
            "version",
            value,
            f"policy: version = {_fmt_value(value)} must be a string of 1-32 characters "
            "from A-Z a-z 0-9 . _ - starting with a letter or digit",
        )


def _check_value(spec: PolicyField, value: object) -> object:
    """Return the value (floats normalised from int) or raise PolicyError."""
    if value is None and spec.optional:
        return None
    if spec.kind is str:
        if not isinstance(value, str) or value not in spec.choices:
            raise PolicyError(
                spec.key,
                value,
                f"policy: {spec.key} = {_fmt_value(value)} is not one of {spec.range_text()}",
            )
        return value
    number = _as_number(spec, value)
    # int vs float comparison is exact in Python, so a huge int cannot overflow here.
    if not spec.lo <= number <= spec.hi:
        raise PolicyError(
            spec.key,
            value,
            f"policy: {spec.key} = {_fmt_value(value)} is out of range "
            f"{spec.range_text()}{_off_hint(spec)}",
        )
    if spec.kind is float and type(number) is not float:
        return float(number)
    return number


def _off_hint(spec: PolicyField) -> str:
    return " (omit the key to turn it off)" if spec.optional else ""


def _as_number(spec: PolicyField, value: object) -> int | float:
    """The value as the field's numeric kind (``true`` is not 1), or PolicyError."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if spec.kind is float and isinstance(value, float) and math.isfinite(value):
        return value
    if spec.kind is int:
        wanted = "an integer"
    elif isinstance(value, float):
        wanted = "a finite number"
    else:
        wanted = "a number"
    raise PolicyError(
        spec.key,
        value,
        f"policy: {spec.key} = {_fmt_value(value)} must be {wanted} "
        f"in {spec.range_text()}{_off_hint(spec)}",
    )


def _content_hash(policy: Policy) -> str:
    """8 hex chars of SHA-256 over every value except the label, in table order."""
    canonical = json.dumps(
        [[spec.key, getattr(policy, spec.name)] for spec in POLICY_FIELDS],
        separators=(",", ":"),
        allow_nan=False,
    )
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()[:8]


POLICY_DEFAULT: Final = Policy()
"""DESIGN D12 defaults, label "1.0"."""


# -- TOML --------------------------------------------------------------------------------


def _known_keys() -> list[str]:
    return [spec.key for spec in POLICY_FIELDS]


def _unknown_key_error(key: str, value: object, source: str) -> PolicyError:
    leaf = key.rsplit(".", 1)[-1]
    hint = ""
    if leaf in _SPEC_NAMES:
        hint = f"; jvpn calls it {_SPEC_NAMES[leaf]}"
    else:
        by_leaf = [k for k in _known_keys() if k.endswith("." + leaf)]
        close = by_leaf or difflib.get_close_matches(key, _known_keys(), n=1, cutoff=0.75)
        if close:
            hint = f"; did you mean {close[0]}?"
    return PolicyError(key, value, f"policy: unknown key {key}{hint} (in {source})")


def parse_policy(text: str, *, source: str = "<policy>") -> Policy:
    """Parse TOML text into a validated Policy; raise PolicyError on anything wrong.

    Unknown sections and keys are errors (a typo must not silently fall back to a
    default); so is a missing MANDATORY_KEYS entry. ``source`` only labels messages.
    """
    values = _collect_values(_decode_toml(text, source), source)
    _require_mandatory(values, source)
    try:
        return Policy(**values)  # type: ignore[arg-type]  # types are checked in __post_init__
    except PolicyError as exc:
        raise PolicyError(exc.field, exc.value, f"{exc} (in {source})") from None


def _decode_toml(text: str, source: str) -> dict[str, object]:
    if len(text) > MAX_POLICY_SIZE:
        raise PolicyError(
            "<toml>",
            None,
            f"policy: {source} is {len(text)} characters, more than {MAX_POLICY_SIZE}",
        )
    try:
        return tomllib.loads(text)
    except ValueError as exc:  # TOMLDecodeError, or an integer too long to convert
        raise PolicyError("<toml>", None, f"policy: {source} is not valid TOML: {exc}") from None
    except RecursionError:
        raise PolicyError(
            "<toml>", None, f"policy: {source} is not valid TOML: nested too deeply"
        ) from None


def _collect_values(doc: Mapping[str, object], source: str) -> dict[str, object]:
    """Flat ``{field name: raw value}`` of the document; unknown keys/sections raise."""
    values: dict[str, object] = {}
    for top, body in doc.items():
        if top == "version":
            values["version"] = body
            continue
        section = _section_table(top, body, source)
        for name, value in section.items():
            spec = _FIELD_BY_NAME.get(name)
            if spec is None or spec.section != top:
                raise _unknown_key_error(f"{top}.{name}", value, source)
            values[name] = value
    return values


def _section_table(top: str, body: object, source: str) -> Mapping[str, object]:
    """The body of a known ``[section]``, or the PolicyError saying what ``top`` is not."""
    if top in SECTIONS and isinstance(body, dict):
        return body
    if top in SECTIONS:
        raise PolicyError(
            top,
            body,
            f"policy: {top} = {_fmt_value(body)} must be a [{top}] table (in {source})",
        )
    if not isinstance(body, dict):
        raise _unknown_key_error(top, body, source)
    close = difflib.get_close_matches(top, SECTIONS, n=1, cutoff=0.6)
    hint = f"; did you mean [{close[0]}]?" if close else ""
    raise PolicyError(
        top,
        None,
        f"policy: unknown section [{top}]{hint} (sections: {', '.join(SECTIONS)}) (in {source})",
    )


def _require_mandatory(values: Mapping[str, object], source: str) -> None:
    for key in MANDATORY_KEYS:
        spec = _FIELD_BY_NAME[key.split(".", 1)[1]]
        if spec.name not in values:
            raise PolicyError(
                key,
                None,
                f"policy: {key} is missing; it is mandatory, range {spec.range_text()} "
                f"(in {source})",
            )


def load_policy(path: str | PathLike[str]) -> Policy:
    """Read a UTF-8 TOML policy file and parse it; every failure is a PolicyError."""
    name = fspath(path)
    try:
        with open(name, "rb") as fh:
            raw = fh.read(MAX_POLICY_SIZE + 1)
    except OSError as exc:
        raise PolicyError(
            "<file>", name, f"policy: cannot read {name}: {exc.strerror or exc}"
        ) from None
    if len(raw) > MAX_POLICY_SIZE:
        raise PolicyError("<file>", name, f"policy: {name} is larger than any sane policy")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PolicyError(
            "<file>", name, f"policy: {name} is not UTF-8 (byte {exc.start})"
        ) from None
    return parse_policy(text, source=name)


def _toml_value(value: object) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=True)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def policy_to_toml(policy: Policy) -> str:
    """The policy as TOML that ``parse_policy`` turns back into an equal Policy.

    Optional keys that are off (``None``) are written as comments.
    """
    lines = [
        f"# jvpn policy {policy.policy_version}",
        f"version = {_toml_value(policy.version)}",
    ]
    for section in SECTIONS:
        lines += ["", f"[{section}]"]
        for spec in POLICY_FIELDS:
            if spec.section != section:
                continue
            value = getattr(policy, spec.name)
            if value is None:
                lines.append(f"# {spec.name} = (off; range {spec.range_text()})")
            else:
                lines.append(f"{spec.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def policy_summary(policy: Policy) -> dict[str, object]:
    """Flat, JSON-safe view for events and the UI: ``policy_version``, ``version`` and
    every value under its dotted key (``None`` for an optional feature that is off)."""
    out: dict[str, object] = {
        "policy_version": policy.policy_version,
        "version": policy.version,
    }
    for spec in POLICY_FIELDS:
        out[spec.key] = getattr(policy, spec.name)
    return out
