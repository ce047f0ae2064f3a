"""Policy: defaults, bounds, non-disableable invariants, TOML parsing (AT-43, AT-45, AT-46)."""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunnel.core.policy import (
    CROSS_FIELD_RULES,
    MANDATORY_KEYS,
    MAX_POLICY_SIZE,
    POLICY_DEFAULT,
    POLICY_FIELDS,
    SECTIONS,
    Policy,
    PolicyError,
    PolicyField,
    load_policy,
    parse_policy,
    policy_summary,
    policy_to_toml,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "policy.toml"
DOC = ROOT / "docs" / "policy.md"

FIELD = {spec.name: spec for spec in POLICY_FIELDS}
BY_KEY = {spec.key: spec for spec in POLICY_FIELDS}
NUMERIC = [spec for spec in POLICY_FIELDS if spec.kind is not str]
TIMES = [spec for spec in POLICY_FIELDS if spec.name.endswith(("_ms", "_s"))]
ERROR_FIELDS = {*BY_KEY, *SECTIONS, "version", "<toml>", "<file>"}

D12 = {
    "version": "1.0",
    "max_lifetime_ms": 28_800_000,
    "transport_lost_ttl_ms": 15_000,
    "probe_interval_ms": 100,
    "standby_probe_interval_ms": 1_000,
    "idle_after_ms": 5_000,  # issue 11: docs/policy.md, "Idle sessions"
    "idle_probe_interval_ms": 10_000,
    "idle_standby_probe_interval_ms": 15_000,
    "dead_min_ms": 300,
    "dead_rtt_multiplier": 4.0,
    "dead_traffic_min_ms": 50,  # issue 10: docs/policy.md
    "loss_window_ms": 3_000,  # D12 2000, changed with measurements: docs/policy.md
    "loss_volatile_threshold": 0.20,
    "min_loss_samples": 8,
    "max_consecutive_drops": 5,  # D12 3, changed with measurements: docs/policy.md
    "latency_volatile_threshold_ms": None,
    "volatile_to_degraded_ms": 4_000,
    "stability_window_ms": 2_000,
    "max_switches_per_min": 8,
    "switch_cooldown_ms": 1_500,
    "switch_improvement_factor": 1.10,
    "switch_dwell_ms": 300,
    "failed_path_holddown_ms": 2_000,
    "recovery_window_ms": 8_000,
    "on_recovery_timeout": "terminate",
    "degraded_terminate_after_ms": None,
    "reattach_retry_ms": 250,
    "lost_state": "new_session",  # D15c (issue 9): docs/policy.md
    "max_candidate_count": 8,
    "reattach_proof_max_age_ms": 5_000,
    "replay_window_size": 8_192,  # D12 2048, changed for multipath (issue 14): docs/policy.md
    "duplicate_alarm_ratio": 0.10,  # issue 14: docs/policy.md
    "rekey_after_s": 120,
    "security_failures_to_degrade": 3,
    "security_failures_to_terminate": 10,
    "reattach_rate_per_s": 2.0,
    "reattach_burst": 5,
    "handshake_timeout_ms": 5_000,
    "handshake_attempts": 5,
    "outbound_queue_packets": 256,
    "outbound_queue_bytes": 524_288,
}
"""DESIGN D12 and the task's defaults, written out independently of policy.py."""


# -- helpers ------------------------------------------------------------------------------


def literal(value: object) -> str:
    """A Python value as a TOML literal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    return str(value)


def toml_text(
    overrides: Mapping[str, str | None] | None = None, version: str | None = '"1.0"'
) -> str:
    """Default policy as TOML, with some dotted keys replaced by raw literals (None: drop)."""
    overrides = overrides or {}
    sections: dict[str, list[str]] = {name: [] for name in SECTIONS}
    for spec in POLICY_FIELDS:
        default = getattr(POLICY_DEFAULT, spec.name)
        lit = None if default is None else literal(default)
        lit = overrides.get(spec.key, lit)
        if lit is not None:
            sections[spec.section].append(f"{spec.name} = {lit}")
    head = [] if version is None else [f"version = {version}"]
    body = [f"[{name}]\n" + "\n".join(lines) for name, lines in sections.items()]
    return "\n".join(head) + "\n" + "\n\n".join(body) + "\n"


def assert_within_bounds(policy: Policy) -> None:
    for spec in POLICY_FIELDS:
        value = getattr(policy, spec.name)
        if value is None:
            assert spec.optional, spec.key
        elif spec.kind is str:
            assert value in spec.choices, spec.key
        elif spec.kind is int:
            assert type(value) is int and spec.lo <= value <= spec.hi, spec.key
        else:
            assert type(value) is float and math.isfinite(value), spec.key
            assert spec.lo <= value <= spec.hi, spec.key
    for left, op, right, _ in CROSS_FIELD_RULES:
        a, b = getattr(policy, left), getattr(policy, right)
        assert a < b if op == "<" else a <= b, (left, right)
    assert policy.policy_version.startswith(policy.version + "+")


def with_values(**values: Any) -> Policy:
    """POLICY_DEFAULT with some attributes replaced (validated like any Policy)."""
    return dataclasses.replace(POLICY_DEFAULT, **values)


def reject(text: str) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, source="test.toml")
    return info.value


# -- defaults, table, files -----------------------------------------------------------------


def test_defaults_equal_design_d12() -> None:
    got = {f.name: getattr(POLICY_DEFAULT, f.name) for f in dataclasses.fields(Policy)}
    assert got.pop("policy_version") == POLICY_DEFAULT.policy_version
    assert got == D12
    assert POLICY_DEFAULT == Policy()


def test_bounds_table_covers_exactly_the_policy_fields() -> None:
    names = [spec.name for spec in POLICY_FIELDS]
    assert len(names) == len(set(names))
    assert set(names) == set(D12) - {"version"}
    assert {spec.section for spec in POLICY_FIELDS} == set(SECTIONS)
    for spec in POLICY_FIELDS:
        assert spec.reason.strip(), spec.key
        if spec.kind is not str:
            assert 0 < spec.lo <= spec.hi < math.inf, spec.key  # finite and positive
    for key in MANDATORY_KEYS:
        assert key in BY_KEY


def test_example_file_parses_to_the_defaults() -> None:
    policy = load_policy(EXAMPLE)
    assert policy == POLICY_DEFAULT
    assert policy.policy_version == POLICY_DEFAULT.policy_version
    text = EXAMPLE.read_text()
    for spec in POLICY_FIELDS:  # every key is shown, optional ones commented out
        assert f"{spec.name} = " in text, spec.key


def test_docs_key_table_matches_the_bounds_table() -> None:
    rows: dict[str, list[str]] = {}
    for line in DOC.read_text().splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            key = cells[0].strip("`")
            if key in BY_KEY:
                rows[key] = cells
    assert set(rows) == set(BY_KEY)
    for key, cells in rows.items():
        spec = BY_KEY[key]
        default = getattr(POLICY_DEFAULT, spec.name)
        assert cells[1] == ("off" if default is None else literal(default)), key
        assert cells[2] == spec.range_text(), key
        assert cells[3].startswith("**Mandatory.**") == (key in MANDATORY_KEYS), key
    doc = DOC.read_text()
    for left, op, right, _ in CROSS_FIELD_RULES:
        assert f"| `{left}` {op} `{right}` |" in doc


def test_policy_is_frozen_and_slotted() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        POLICY_DEFAULT.max_switches_per_min = 0  # type: ignore[misc]
    assert not hasattr(POLICY_DEFAULT, "__dict__")


def test_core_policy_imports_no_io_or_logging() -> None:
    code = (
        "import sys, tunnel.core.policy\n"
        "bad = {'socket', 'asyncio', 'threading', 'logging', 'textual', 'rich'}\n"
        "bad &= set(sys.modules)\n"
        "print(sorted(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


# -- AT-43 invalid policy -------------------------------------------------------------------


@pytest.mark.parametrize("key", MANDATORY_KEYS)
def test_at43_missing_mandatory_key_is_rejected(key: str) -> None:
    err = reject(toml_text({key: None}))
    assert err.field == key
    assert key in str(err) and "missing" in str(err) and "test.toml" in str(err)


@pytest.mark.parametrize("key", MANDATORY_KEYS)
def test_at43_missing_mandatory_key_in_example_is_rejected(key: str) -> None:
    _section, name = key.split(".")
    lines = [ln for ln in EXAMPLE.read_text().splitlines() if not ln.startswith(f"{name} =")]
    assert reject("\n".join(lines)).field == key


def test_at43_optional_keys_may_be_left_out() -> None:
    text = "\n".join(
        ["[session]", "max_lifetime_ms = 28800000", "transport_lost_ttl_ms = 15000",
         "[switching]", "max_switches_per_min = 8", "recovery_window_ms = 8000",
         "[volatility]", "loss_volatile_threshold = 0.2",
         "[security]", "reattach_proof_max_age_ms = 5000"]
    )  # fmt: skip
    assert parse_policy(text) == POLICY_DEFAULT


@pytest.mark.parametrize("raw", ["0", "0.0", "1.5", "-0.2", "1.0000001"])
def test_at43_loss_threshold_outside_0_1_is_rejected(raw: str) -> None:
    err = reject(toml_text({"volatility.loss_volatile_threshold": raw}))
    assert err.field == "volatility.loss_volatile_threshold"
    assert err.value == float(raw)
    assert f"volatility.loss_volatile_threshold = {raw}" in str(err)
    assert "[0.01, 1.0]" in str(err)


def test_at43_loss_threshold_of_exactly_one_is_allowed() -> None:
    policy = parse_policy(toml_text({"volatility.loss_volatile_threshold": "1.0"}))
    assert policy.loss_volatile_threshold == 1.0


@pytest.mark.parametrize("spec", TIMES, ids=lambda s: s.key)
def test_at43_negative_time_is_rejected(spec: PolicyField) -> None:
    err = reject(toml_text({spec.key: "-1"}))
    assert err.field == spec.key and err.value == -1
    assert f"{spec.key} = -1 is out of range {spec.range_text()}" in str(err)


def test_at43_bad_toml_names_source_line_and_column() -> None:
    err = reject('version = "1.0"\n[session\nmax_lifetime_ms = 1\n')
    assert err.field == "<toml>"
    assert "test.toml" in str(err) and "line 2" in str(err) and "column" in str(err)
    assert reject(toml_text() + "\n[switching]\n").field == "<toml>"  # table defined twice


@pytest.mark.parametrize(
    ("key", "raw"),
    [
        ("switching.max_switches_per_min", '"5"'),
        ("switching.max_switches_per_min", "5.5"),
        ("switching.max_switches_per_min", "5.0"),
        ("switching.max_switches_per_min", "true"),
        ("session.max_lifetime_ms", "[28800000]"),
        ("session.max_lifetime_ms", "1979-05-27T07:32:00Z"),
        ("volatility.dead_rtt_multiplier", '"4.0"'),
        ("volatility.dead_rtt_multiplier", "false"),
        ("switching.on_recovery_timeout", '"retry"'),
        ("switching.on_recovery_timeout", "1"),
    ],
)
def test_at43_wrong_type_is_rejected_naming_key_and_value(key: str, raw: str) -> None:
    err = reject(toml_text({key: raw}))
    assert err.field == key
    assert f"{key} = " in str(err)
    assert BY_KEY[key].range_text() in str(err)


def test_at43_unknown_key_is_rejected_with_a_suggestion() -> None:
    text = toml_text().replace("max_switches_per_min = 8", "max_switches_per_minn = 8")
    err = reject(text)
    assert err.field == "switching.max_switches_per_minn"
    assert "did you mean switching.max_switches_per_min" in str(err)


def test_at43_key_in_the_wrong_section_is_rejected() -> None:
    text = toml_text().replace("[session]\n", "[session]\nprobe_interval_ms = 100\n")
    err = reject(text)
    assert err.field == "session.probe_interval_ms"
    assert "volatility.probe_interval_ms" in str(err)


def test_at43_unknown_section_and_stray_top_level_key_are_rejected() -> None:
    err = reject(toml_text() + "\n[observability]\nemit_switch_metrics = true\n")
    assert err.field == "observability" and "unknown section [observability]" in str(err)
    err = reject("max_lifetime_ms = 28800000\n" + toml_text(version=None))
    assert err.field == "max_lifetime_ms" and "session.max_lifetime_ms" in str(err)
    err = reject("session = 5\n")
    assert err.field == "session"


def test_at43_spec_names_get_a_translation_hint() -> None:
    text = toml_text().replace("[volatility]\n", "[volatility]\nheartbeat_interval_ms = 500\n")
    err = reject(text)
    assert err.field == "volatility.heartbeat_interval_ms"
    assert "volatility.probe_interval_ms" in str(err)


@pytest.mark.parametrize("label", ['""', '"1.0+abc"', '"has space"', "1.0", '"' + "x" * 33 + '"'])
def test_at43_bad_version_label_is_rejected(label: str) -> None:
    assert reject(toml_text(version=label)).field == "version"


def test_at43_oversized_text_and_huge_integer_are_policy_errors() -> None:
    assert reject("#" * (MAX_POLICY_SIZE + 1)).field == "<toml>"
    err = reject(toml_text({"session.max_lifetime_ms": "1" * 5000}))  # tomllib: ValueError
    assert err.field == "<toml>"
    err = reject(toml_text({"session.max_lifetime_ms": "1" * 200}))
    assert err.field == "session.max_lifetime_ms" and "-bit integer>" in str(err)
    assert reject("a = " + "[" * 100_000).field == "<toml>"  # tomllib: RecursionError


def test_at43_load_policy_file_errors_are_policy_errors(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as info:
        load_policy(tmp_path / "missing.toml")
    assert info.value.field == "<file>" and "missing.toml" in str(info.value)
    with pytest.raises(PolicyError) as info:
        load_policy(tmp_path)  # a directory
    assert info.value.field == "<file>"
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(toml_text(version='"caf\xe9"').encode("latin-1"))
    with pytest.raises(PolicyError) as info:
        load_policy(latin1)
    assert info.value.field == "<file>" and "UTF-8" in str(info.value)
    bad = tmp_path / "bad.toml"
    bad.write_text(toml_text({"switching.max_switches_per_min": "0"}))
    with pytest.raises(PolicyError) as info:
        load_policy(str(bad))
    assert info.value.field == "switching.max_switches_per_min"
    assert str(bad) in str(info.value)


def test_load_policy_accepts_a_utf8_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + toml_text().encode())
    assert load_policy(path) == POLICY_DEFAULT


# -- AT-46 invariants that no policy can switch off ------------------------------------------


@pytest.mark.parametrize("raw", ["0", "-1", "1", "64", "2047"])
def test_at46_replay_window_zero_or_below_2048_is_rejected(raw: str) -> None:
    err = reject(toml_text({"security.replay_window_size": raw}))
    assert err.field == "security.replay_window_size" and err.value == int(raw)
    assert f"security.replay_window_size = {raw} is out of range [2048," in str(err)
    with pytest.raises(PolicyError):
        dataclasses.replace(POLICY_DEFAULT, replay_window_size=int(raw))


@pytest.mark.parametrize("raw", ["0", "-1", "121", "1000000", str(2**63), "inf", "nan"])
def test_at46_switch_limit_zero_or_unbounded_is_rejected(raw: str) -> None:
    err = reject(toml_text({"switching.max_switches_per_min": raw}))
    assert err.field == "switching.max_switches_per_min"
    assert "switching.max_switches_per_min = " in str(err) and "[1, 120]" in str(err)


def test_at46_switch_limit_error_message_is_exact() -> None:
    with pytest.raises(PolicyError) as info:
        dataclasses.replace(POLICY_DEFAULT, max_switches_per_min=0)
    assert str(info.value) == "policy: switching.max_switches_per_min = 0 is out of range [1, 120]"
    assert info.value.field == "switching.max_switches_per_min" and info.value.value == 0


@pytest.mark.parametrize("raw", ["inf", "+inf", "-inf", "nan", "1e999", "28800000.0"])
def test_at46_infinite_or_nan_lifetime_is_rejected(raw: str) -> None:
    err = reject(toml_text({"session.max_lifetime_ms": raw}))
    assert err.field == "session.max_lifetime_ms"
    assert "must be an integer in [60000, 604800000]" in str(err)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_at46_non_finite_values_are_rejected_in_code_too(value: float) -> None:
    with pytest.raises(PolicyError):
        dataclasses.replace(POLICY_DEFAULT, max_lifetime_ms=value)  # type: ignore[arg-type]
    with pytest.raises(PolicyError) as info:
        dataclasses.replace(POLICY_DEFAULT, dead_rtt_multiplier=value)
    assert "finite" in str(info.value)


@pytest.mark.parametrize("spec", TIMES, ids=lambda s: s.key)
def test_at46_zero_ttl_or_timer_is_rejected(spec: PolicyField) -> None:
    """No '0 means forever/off': every time value must be positive."""
    err = reject(toml_text({spec.key: "0"}))
    assert err.field == spec.key and err.value == 0
    with pytest.raises(PolicyError):
        with_values(**{spec.name: 0})


@pytest.mark.parametrize("spec", NUMERIC, ids=lambda s: s.key)
def test_at46_bool_is_never_a_number(spec: PolicyField) -> None:
    with pytest.raises(PolicyError) as info:
        with_values(**{spec.name: True})
    assert info.value.field == spec.key and "= true" in str(info.value)


@pytest.mark.parametrize("spec", NUMERIC, ids=lambda s: s.key)
def test_at46_every_bound_is_enforced_on_both_sides(spec: PolicyField) -> None:
    step = 1 if spec.kind is int else 1e-6
    low = spec.lo - step
    high = int(spec.hi) + 1 if spec.kind is int else spec.hi * 1.000001
    for bad in (low, high):
        with pytest.raises(PolicyError) as info:
            with_values(**{spec.name: bad})
        assert info.value.field == spec.key and info.value.value == bad


VIOLATIONS: dict[tuple[str, str], dict[str, int]] = {
    ("dead_min_ms", "transport_lost_ttl_ms"): {"dead_min_ms": 15_000},
    ("recovery_window_ms", "transport_lost_ttl_ms"): {"recovery_window_ms": 15_001},
    ("transport_lost_ttl_ms", "max_lifetime_ms"): {
        "transport_lost_ttl_ms": 600_000,
        "max_lifetime_ms": 600_000,
    },
    ("probe_interval_ms", "dead_min_ms"): {"probe_interval_ms": 300},
    ("probe_interval_ms", "standby_probe_interval_ms"): {"standby_probe_interval_ms": 99},
    ("probe_interval_ms", "idle_probe_interval_ms"): {"idle_probe_interval_ms": 99},
    ("standby_probe_interval_ms", "idle_standby_probe_interval_ms"): {
        "standby_probe_interval_ms": 15_001
    },
    ("idle_probe_interval_ms", "idle_standby_probe_interval_ms"): {
        "idle_probe_interval_ms": 15_001
    },
    ("reattach_retry_ms", "recovery_window_ms"): {"reattach_retry_ms": 8_000},
    ("security_failures_to_degrade", "security_failures_to_terminate"): {
        "security_failures_to_degrade": 11
    },
}
"""One minimal in-range violation per cross-field rule."""


@pytest.mark.parametrize("rule", CROSS_FIELD_RULES, ids=lambda r: f"{r[0]}{r[1]}{r[2]}")
def test_at46_cross_field_rules_are_enforced(rule: tuple[str, str, str, str]) -> None:
    left, op, right, _ = rule
    with pytest.raises(PolicyError) as info:
        with_values(**VIOLATIONS[(left, right)])
    assert info.value.field == FIELD[left].key
    assert f"must be {op} {FIELD[right].key}" in str(info.value)
    assert len(VIOLATIONS) == len(CROSS_FIELD_RULES)


def test_at46_security_failure_order_is_enforced() -> None:
    err = reject(toml_text({"security.security_failures_to_degrade": "11"}))
    assert err.field == "security.security_failures_to_degrade"
    assert "security.security_failures_to_terminate = 10" in str(err)


def test_float_fields_accept_integers_and_normalise_them() -> None:
    policy = parse_policy(toml_text({"volatility.dead_rtt_multiplier": "4"}))
    assert type(policy.dead_rtt_multiplier) is float
    assert policy == POLICY_DEFAULT
    assert policy.policy_version == POLICY_DEFAULT.policy_version


def test_optional_feature_in_range_is_accepted_and_recorded() -> None:
    text = toml_text(
        {"volatility.latency_volatile_threshold_ms": "300",
         "switching.degraded_terminate_after_ms": "600_000",
         "switching.on_recovery_timeout": '"degrade"'}
    )  # fmt: skip
    policy = parse_policy(text)
    assert policy.latency_volatile_threshold_ms == 300
    assert policy.degraded_terminate_after_ms == 600_000
    assert policy.on_recovery_timeout == "degrade"
    err = reject(toml_text({"volatility.latency_volatile_threshold_ms": "0"}))
    assert "omit the key to turn it off" in str(err)


def test_policy_error_is_a_value_error_and_pickles() -> None:
    err = reject(toml_text({"switching.max_switches_per_min": "0"}))
    assert isinstance(err, ValueError)
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.field, copy.value, str(copy)) == (err.field, err.value, str(err))


# -- AT-45 versions ---------------------------------------------------------------------------


def test_at45_changed_policy_gets_a_different_version() -> None:
    changed = parse_policy(toml_text({"switching.max_switches_per_min": "6"}))
    assert changed.version == POLICY_DEFAULT.version == "1.0"
    assert changed.policy_version != POLICY_DEFAULT.policy_version
    assert changed.policy_version.startswith("1.0+")
    versions = set()
    for spec in NUMERIC:  # change each field alone to a valid other value
        default = getattr(POLICY_DEFAULT, spec.name)
        other = spec.lo if default is None else default + 1 if spec.kind is int else default * 1.01
        versions.add(with_values(**{spec.name: other}).policy_version)
    versions.add(dataclasses.replace(POLICY_DEFAULT, on_recovery_timeout="degrade").policy_version)
    versions.add(dataclasses.replace(POLICY_DEFAULT, lost_state="terminate").policy_version)
    assert POLICY_DEFAULT.policy_version not in versions
    assert len(versions) == len(POLICY_FIELDS)  # every single-field change is told apart


def test_at45_identical_content_gets_the_same_version() -> None:
    a = parse_policy(toml_text())
    b = load_policy(EXAMPLE)  # other formatting, comments, underscores
    c = parse_policy(policy_to_toml(POLICY_DEFAULT))
    assert a.policy_version == b.policy_version == c.policy_version
    assert a.policy_version == Policy().policy_version


def test_at45_label_is_the_prefix_and_hash_covers_content_only() -> None:
    relabelled = parse_policy(toml_text(version='"2025-06.prod"'))
    assert relabelled.policy_version.startswith("2025-06.prod+")
    assert relabelled.policy_version.split("+")[1] == POLICY_DEFAULT.policy_version.split("+")[1]
    assert relabelled != POLICY_DEFAULT
    assert len(relabelled.policy_version.split("+")[1]) == 8


def test_at45_replace_recomputes_the_version() -> None:
    changed = dataclasses.replace(POLICY_DEFAULT, rekey_after_s=60)
    assert changed.policy_version != POLICY_DEFAULT.policy_version
    back = dataclasses.replace(changed, rekey_after_s=120)
    assert back.policy_version == POLICY_DEFAULT.policy_version and back == POLICY_DEFAULT


# -- summary and round trip -------------------------------------------------------------------


def test_policy_summary_is_flat_and_json_safe() -> None:
    summary = policy_summary(POLICY_DEFAULT)
    assert json.loads(json.dumps(summary, allow_nan=False)) == summary
    assert summary["policy_version"] == POLICY_DEFAULT.policy_version
    assert summary["version"] == "1.0"
    assert summary["switching.max_switches_per_min"] == 8
    assert summary["volatility.latency_volatile_threshold_ms"] is None
    assert set(summary) == {"policy_version", "version", *BY_KEY}
    assert all(not isinstance(v, dict | list) for v in summary.values())


def test_round_trip_of_the_defaults() -> None:
    text = policy_to_toml(POLICY_DEFAULT)
    assert parse_policy(text) == POLICY_DEFAULT
    assert POLICY_DEFAULT.policy_version in text


# -- property tests ---------------------------------------------------------------------------


def _in_range(
    spec: PolicyField, lo: float | None = None, hi: float | None = None
) -> st.SearchStrategy[Any]:
    lo = spec.lo if lo is None else max(spec.lo, lo)
    hi = spec.hi if hi is None else min(spec.hi, hi)
    if spec.kind is int:
        return st.integers(int(lo), int(hi))
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


@st.composite
def valid_policies(draw: st.DrawFn) -> Policy:
    """Any policy inside the bounds table that also satisfies the cross-field rules."""
    v: dict[str, Any] = {}
    for spec in POLICY_FIELDS:
        if spec.kind is str:
            v[spec.name] = draw(st.sampled_from(spec.choices))
        elif spec.optional:
            v[spec.name] = draw(st.none() | _in_range(spec))
        else:
            v[spec.name] = draw(_in_range(spec))

    # Redraw the dependent fields in dependency order so every CROSS_FIELD_RULE holds.
    def redraw(name: str, lo: float | None = None, hi: float | None = None) -> None:
        v[name] = draw(_in_range(FIELD[name], lo, hi))

    redraw("transport_lost_ttl_ms", hi=v["max_lifetime_ms"] - 1)
    redraw("dead_min_ms", hi=v["transport_lost_ttl_ms"] - 1)
    redraw("recovery_window_ms", hi=v["transport_lost_ttl_ms"])
    redraw("probe_interval_ms", hi=v["dead_min_ms"] - 1)
    redraw("standby_probe_interval_ms", lo=v["probe_interval_ms"])
    redraw("idle_probe_interval_ms", lo=v["probe_interval_ms"])
    redraw(
        "idle_standby_probe_interval_ms",
        lo=max(v["standby_probe_interval_ms"], v["idle_probe_interval_ms"]),
    )
    redraw("reattach_retry_ms", hi=v["recovery_window_ms"] - 1)
    redraw("security_failures_to_degrade", hi=v["security_failures_to_terminate"])
    label = draw(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}", fullmatch=True))
    return Policy(version=label, **v)


@settings(max_examples=150, deadline=None)
@given(valid_policies())
def test_round_trip_policy_to_toml_and_back(policy: Policy) -> None:
    again = parse_policy(policy_to_toml(policy))
    assert again == policy
    assert again.policy_version == policy.policy_version
    assert policy_summary(again) == policy_summary(policy)
    assert_within_bounds(policy)


def _junk_literal() -> st.SearchStrategy[str | None]:
    return st.one_of(
        st.none(),
        st.integers().map(str),
        st.integers(-10, 1_000_000).map(str),
        st.sampled_from(["0", "-1", "1", "2047", "2048", "120", "121", "9", "10"]),
        st.floats(allow_nan=True, allow_infinity=True).map(literal),
        st.floats(-2.0, 25.0).map(literal),
        st.booleans().map(literal),
        st.text(max_size=12).map(json.dumps),
        st.sampled_from(['"terminate"', '"degrade"', "[]", "[1, 2]", "{a = 1}",
                         "1979-05-27", "07:32:00", "0x10", "1_000", "+5", "1e3"]),
    )  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(st.sampled_from(sorted(BY_KEY)), _junk_literal(), max_size=6),
    st.one_of(st.none(), st.just('"1.0"'), st.text(max_size=40).map(json.dumps)),
)
def test_random_field_values_give_a_valid_policy_or_a_policy_error(
    overrides: dict[str, str | None], version: str | None
) -> None:
    try:
        policy = parse_policy(toml_text(overrides, version=version))
    except PolicyError as err:
        assert err.field in ERROR_FIELDS
        assert str(err).startswith("policy: ")
        return
    assert_within_bounds(policy)


_FRAGMENTS = [
    "[session]\n", "[volatility]\n", "[switching]\n", "[security]\n", "[queue]\n",
    "[transport]\n", "[[session]]\n", "[session.x]\n", "[bogus]\n", "version = \"1.0\"\n",
    "max_lifetime_ms", "transport_lost_ttl_ms", "max_switches_per_min",
    "loss_volatile_threshold", "replay_window_size", " = ", "=", "\n", "0", "8", "0.2",
    "inf", "nan", "true", '"x"', "[", "]", "{", "}", ",", "#", "'", '"', ".", "1e3", "\\",
]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(max_size=200),
        st.lists(st.sampled_from(_FRAGMENTS), max_size=40).map("".join),
        st.tuples(
            st.just(EXAMPLE.read_text().splitlines()),
            st.lists(st.integers(0, 200), max_size=8),
            st.lists(st.sampled_from(_FRAGMENTS), max_size=4).map("".join),
        ).map(lambda t: "\n".join(
            ln if i not in t[1] else t[2] for i, ln in enumerate(t[0])
        )),
    )
)  # fmt: skip
def test_random_toml_ish_text_gives_a_valid_policy_or_a_policy_error(text: str) -> None:
    try:
        policy = parse_policy(text)
    except PolicyError as err:
        assert isinstance(err.field, str) and str(err).startswith("policy: ")
        return
    assert_within_bounds(policy)
