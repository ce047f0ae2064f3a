"""Policy acceptance tests at engine level (SPEC-DIGEST §6.2, §10.5: AT-43..AT-46).

Parsing and bounds are covered field by field in test_core_policy.py; here the protocol
machines are run with what a policy load or reload produces: no valid policy at startup,
an invalid reload (``set_policy(None, error=...)``), a valid reload (strict mode), and
files that try to switch an invariant off.
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Any

import pytest
from simkit import CLIENT_INNER, make_policy

from tunnel.core.client import ClientSession, PathSpec
from tunnel.core.constants import MSG_CONTROL
from tunnel.core.events import EventType, Reason
from tunnel.core.gateway import GatewaySessions
from tunnel.core.gateway_session import ClientEntry, GatewaySession
from tunnel.core.handshake import generate_keypair
from tunnel.core.policy import POLICY_DEFAULT, Policy, PolicyError, parse_policy, policy_to_toml
from tunnel.core.session import State
from tunnel.core.wire import ReattachKind, ReattachRequest, pack_control
from tunnel.io.memory import MemoryLink, Simulation

BOB = ("198.51.100.200", 47000)


class Net:
    """A gateway with two allowed clients: alice on a Simulation, bob driven by hand."""

    def __init__(self, policy: Policy | None) -> None:
        self.gw_priv, self.gw_pub = generate_keypair()
        alice_priv, alice_pub = generate_keypair()
        self.bob_priv, bob_pub = generate_keypair()
        self.gateway = GatewaySessions(
            static_private=self.gw_priv,
            clients=[
                ClientEntry("alice", alice_pub, CLIENT_INNER),
                ClientEntry("bob", bob_pub, "10.66.0.3"),
            ],
            policy=policy,
            now=0.0,
            urandom=random.Random(7).randbytes,
            rng=random.Random(8),
        )
        self.alice = self._client(alice_priv, 2, 0.0)
        rng = random.Random(9)
        self.sim = Simulation(self.alice, self.gateway, [MemoryLink(i, rng=rng) for i in (1, 2)])

    def _client(self, private: bytes, n_paths: int, now: float) -> ClientSession:
        return ClientSession(
            static_private=private,
            gateway_public=self.gw_pub,
            paths=[PathSpec(i, f"path{i}") for i in range(1, n_paths + 1)],
            policy=POLICY_DEFAULT,
            now=now,
            rng=random.Random(int.from_bytes(private[:4], "little")),
        )

    def bob_connects(self) -> ClientSession:
        """A fresh bob handshake at the current time; returns bob's client afterwards."""
        now = self.sim.now
        bob = self._client(self.bob_priv, 1, now)
        bob.connect(now)
        for _ in range(2):
            for _pid, data in bob.datagrams_to_send():
                self.gateway.receive_datagram(data, BOB, now)
            for dst, data in self.gateway.datagrams_to_send():
                if dst == BOB:
                    bob.receive_datagram(data, 1, now)
                else:
                    link = next(lk for lk in self.sim.links.values() if lk.client_addr == dst)
                    self.sim.inject_to_client(data, link.path_id, delay=0.01)
        self.sim.advance(0.0)  # collect the gateway's events into sim.gateway_events
        return bob

    def session(self, name: str) -> GatewaySession | None:
        live = [
            s
            for s in self.gateway.sessions.values()
            if s.client.name == name and not s.machine.terminated
        ]
        assert len(live) <= 1
        return live[0] if live else None


def of_type(events: list[Any], mark: int, kind: EventType) -> list[Any]:
    return [e for e in events[mark:] if e.event_type == kind]


def policy_events(events: list[Any], mark: int, name: str) -> list[Any]:
    return [e for e in of_type(events, mark, EventType.POLICY_EVENT) if e.policy_name == name]


def assert_denied(net: Net, bob: ClientSession, mark: int, detail: str) -> None:
    """Bob's new session was refused with a clear reason and nothing was allocated."""
    assert bob.state is State.TERMINATED
    (term,) = [e for e in bob.events() if e.event_type == EventType.SESSION_TERMINATED]
    assert term.reason_code is Reason.POLICY_DENIED and term.initiator == "peer"
    assert net.session("bob") is None
    (denied,) = policy_events(net.sim.gateway_events, mark, "SESSION_DENIED")
    assert denied.reason_code is Reason.POLICY_DENIED and detail in denied.detail
    assert not [
        e
        for e in of_type(net.sim.gateway_events, mark, EventType.SESSION_CREATED)
        if e.peer == "bob"
    ]


def toml_with(key: str, raw: str | None) -> str:
    """The default policy as TOML with ``key = raw`` (``None``: the line removed)."""
    lines = policy_to_toml(POLICY_DEFAULT).splitlines()
    pattern = re.compile(rf"^{re.escape(key)} = ")
    hits = [i for i, line in enumerate(lines) if pattern.match(line)]
    assert len(hits) == 1, key
    if raw is None:
        del lines[hits[0]]
    else:
        lines[hits[0]] = f"{key} = {raw}"
    return "\n".join(lines) + "\n"


# -- AT-43 ---------------------------------------------------------------------------------


def test_at43_gateway_started_without_a_valid_policy_denies_new_sessions() -> None:
    net = Net(policy=None)
    assert not net.gateway.accepting
    net.sim.start()
    net.sim.run_until(1.0)
    assert net.alice.state is State.TERMINATED
    (term,) = of_type(net.sim.client_events, 0, EventType.SESSION_TERMINATED)
    assert term.reason_code is Reason.POLICY_DENIED and term.session_id == ""
    assert not net.gateway.sessions
    (denied,) = policy_events(net.sim.gateway_events, 0, "SESSION_DENIED")
    assert denied.reason_code is Reason.POLICY_DENIED
    assert denied.detail == "no valid policy loaded" and denied.policy_version == "invalid"
    assert not of_type(net.sim.gateway_events, 0, EventType.STATE_CHANGE)


@pytest.mark.parametrize(
    ("key", "raw", "field"),
    [
        ("reattach_proof_max_age_ms", None, "security.reattach_proof_max_age_ms"),
        ("max_lifetime_ms", None, "session.max_lifetime_ms"),
        ("loss_volatile_threshold", "0", "volatility.loss_volatile_threshold"),
        ("loss_volatile_threshold", "1.5", "volatility.loss_volatile_threshold"),
        ("transport_lost_ttl_ms", "-15000", "session.transport_lost_ttl_ms"),
    ],
)
def test_at43_invalid_policy_file_denies_new_sessions_naming_the_field(
    key: str, raw: str | None, field: str
) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(toml_with(key, raw), source="jvpn.toml")
    assert info.value.field == field and field in str(info.value)
    net = Net(policy=None)
    mark = len(net.sim.gateway_events)
    net.gateway.set_policy(None, 0.0, error=str(info.value))
    net.sim.advance(0.0)
    (invalid,) = policy_events(net.sim.gateway_events, mark, "POLICY_INVALID")
    assert invalid.reason_code is Reason.POLICY_INVALID and field in invalid.detail
    bob = net.bob_connects()
    assert_denied(net, bob, mark, field)


# -- AT-44 ---------------------------------------------------------------------------------


def test_at44_invalid_runtime_update_keeps_running_sessions_on_v1() -> None:
    v1 = POLICY_DEFAULT
    net = Net(policy=v1)
    net.sim.start()
    net.sim.run_until(2.0)
    alice = net.session("alice")
    assert alice is not None and alice.machine.state is State.ATTACHED
    with pytest.raises(PolicyError) as info:
        parse_policy(toml_with("replay_window_size", "0"))
    mark = len(net.sim.gateway_events)

    net.gateway.set_policy(None, net.sim.now, error=str(info.value))
    net.sim.advance(0.0)
    (invalid,) = policy_events(net.sim.gateway_events, mark, "POLICY_INVALID")
    assert "security.replay_window_size" in invalid.detail
    assert not net.gateway.accepting

    # New sessions are denied until a valid policy exists ...
    assert_denied(net, net.bob_connects(), mark, "security.replay_window_size")
    # ... while alice keeps running under v1: not terminated, her events still say v1.
    assert net.alice.switch_to(2, net.sim.now) is None
    net.sim.run_until(net.sim.now + 20.0)
    assert alice.machine.state is State.ATTACHED and net.alice.active == 2
    assert alice.policy is v1 and alice.machine.policy_version == v1.policy_version
    changes = [
        e
        for e in of_type(net.sim.gateway_events, mark, EventType.STATE_CHANGE)
        if e.session_id == alice.machine.session_id
    ]
    assert changes and {e.policy_version for e in changes} == {v1.policy_version}
    assert not of_type(net.sim.gateway_events, mark, EventType.SESSION_TERMINATED)

    # A valid policy re-opens the door (a later handshake of bob is accepted).
    v2 = dataclasses.replace(v1, version="2.0")
    net.gateway.set_policy(v2, net.sim.now)
    net.sim.advance(0.5)
    bob = net.bob_connects()
    assert bob.state is State.ATTACHED
    bob_s = net.session("bob")
    assert bob_s is not None and bob_s.machine.policy_version == v2.policy_version


def test_at44_client_refuses_an_update_it_cannot_honour_and_keeps_v1() -> None:
    net = Net(policy=POLICY_DEFAULT)
    net.sim.start()
    net.sim.run_until(2.0)
    c = net.alice
    mark = len(net.sim.client_events)
    narrow = make_policy(max_candidate_count=1)  # valid in itself, but alice has 2 paths
    c.apply_policy(narrow, net.sim.now)
    net.sim.advance(0.0)
    (rejected,) = policy_events(net.sim.client_events, mark, "POLICY_REJECTED")
    assert rejected.reason_code is Reason.POLICY_INVALID
    assert "max_candidate_count" in rejected.detail
    assert c.policy is POLICY_DEFAULT
    assert c.machine.policy_version == POLICY_DEFAULT.policy_version
    assert c.state is State.ATTACHED


# -- AT-45 ---------------------------------------------------------------------------------


def test_at45_valid_runtime_update_applies_strictly_without_rewriting_history() -> None:
    v1 = POLICY_DEFAULT
    net = Net(policy=v1)
    net.sim.start()
    net.sim.run_until(4.0)
    alice = net.session("alice")
    assert alice is not None
    history = list(net.sim.gateway_events)
    assert history and {e.policy_version for e in history if e.session_id} == {v1.policy_version}

    v2 = dataclasses.replace(v1, version="2.0", reattach_proof_max_age_ms=1_000)
    assert v2.policy_version != v1.policy_version
    mark = len(net.sim.gateway_events)
    net.gateway.set_policy(v2, net.sim.now)
    net.alice.apply_policy(v2, net.sim.now)
    net.sim.advance(0.0)
    assert policy_events(net.sim.gateway_events, mark, "POLICY_APPLIED")
    assert policy_events(net.sim.client_events, 0, "POLICY_APPLIED")
    assert alice.policy is v2 and alice.machine.policy_version == v2.policy_version

    # Strict: the new freshness bound applies at once to the running session. A request
    # 2 s old was fresh under v1 (5 s) and is stale under v2 (1 s).
    cipher = net.alice.cipher
    assert cipher is not None
    req = ReattachRequest(
        nonce=alice.nonces.last + 100, ts_ms=net.alice.ts_ms(net.sim.now) - 2_000,
        expected_epoch=alice.epoch, path_id=2, kind=int(ReattachKind.MANUAL),
        client_version=net.alice.machine.version,
    )  # fmt: skip
    net.sim.inject_to_gateway(
        cipher.seal(MSG_CONTROL, net.alice.peer_index, pack_control(req)),
        net.sim.links[2].client_addr,
    )
    net.sim.advance(0.1)
    (result,) = of_type(net.sim.gateway_events, mark, EventType.REATTACH_RESULT)
    assert result.status == "DENIED" and result.reason_code is Reason.STALE_REQUEST
    assert result.policy_version == v2.policy_version

    # The next transition runs (and is logged) under v2; the past is not rewritten.
    assert net.alice.switch_to(2, net.sim.now) is None
    net.sim.advance(0.5)
    changes = of_type(net.sim.gateway_events, mark, EventType.STATE_CHANGE)
    assert changes and {e.policy_version for e in changes} == {v2.policy_version}
    client_changes = of_type(net.sim.client_events, 0, EventType.STATE_CHANGE)
    assert [e.policy_version for e in client_changes] == [v1.policy_version, v2.policy_version]
    assert net.sim.gateway_events[: len(history)] == history
    assert {e.policy_version for e in history if e.session_id} == {v1.policy_version}


def test_at45_new_switch_budget_applies_immediately_on_the_client() -> None:
    net = Net(policy=POLICY_DEFAULT)
    net.sim.start()
    net.sim.run_until(2.0)
    c = net.alice
    assert c.snapshot(net.sim.now).switch_budget_left == POLICY_DEFAULT.max_switches_per_min
    c.apply_policy(make_policy(version="2.0", max_switches_per_min=1), net.sim.now)
    assert c.snapshot(net.sim.now).switch_budget_left == 1
    assert c.switch_to(2, net.sim.now) is None
    net.sim.advance(0.5)
    assert c.active == 2
    assert c.switch_to(1, net.sim.now) is Reason.SWITCH_RATE_LIMITED  # the v2 cap holds
    net.sim.advance(0.0)
    denied = of_type(net.sim.client_events, 0, EventType.TRANSPORT_SWITCH_DENIED)
    assert denied[-1].reason_code is Reason.SWITCH_RATE_LIMITED and denied[-1].manual


# -- AT-46 ---------------------------------------------------------------------------------

DISABLING: list[tuple[str, str, Any]] = [
    # (TOML key, TOML value, same value in code): each would switch an invariant off.
    ("replay_window_size", "0", 0),
    ("replay_window_size", "64", 64),
    ("max_switches_per_min", "0", 0),
    ("max_switches_per_min", "1000000", 1_000_000),
    ("max_lifetime_ms", "0", 0),
    ("max_lifetime_ms", "inf", float("inf")),
    ("max_lifetime_ms", "99999999999999", 99_999_999_999_999),
    ("transport_lost_ttl_ms", "0", 0),
    ("recovery_window_ms", "0", 0),
    ("reattach_proof_max_age_ms", "0", 0),
    ("reattach_proof_max_age_ms", "86400000", 86_400_000),
    ("security_failures_to_terminate", "0", 0),
    ("reattach_rate_per_s", "inf", float("inf")),
    ("reattach_rate_per_s", "nan", float("nan")),
    ("switch_improvement_factor", "1.0", 1.0),
    ("handshake_attempts", "0", 0),
    ("max_consecutive_drops", "false", False),
]


@pytest.mark.parametrize(("key", "raw", "value"), DISABLING)
def test_at46_invariants_cannot_be_disabled_and_the_error_names_the_field(
    key: str, raw: str, value: Any
) -> None:
    with pytest.raises(PolicyError) as from_file:
        parse_policy(toml_with(key, raw))
    with pytest.raises(PolicyError) as in_code:
        dataclasses.replace(POLICY_DEFAULT, **{key: value})
    for err in (from_file.value, in_code.value):
        assert err.field.endswith("." + key) and err.field in str(err)


def test_at46_a_disabling_reload_changes_nothing_for_a_running_session() -> None:
    net = Net(policy=POLICY_DEFAULT)
    net.sim.start()
    net.sim.run_until(2.0)
    alice = net.session("alice")
    assert alice is not None
    window = alice.policy.replay_window_size
    for key, raw, _ in DISABLING:
        try:
            parse_policy(toml_with(key, raw))
        except PolicyError as exc:
            net.gateway.set_policy(None, net.sim.now, error=str(exc))
    net.sim.run_until(10.0)
    assert alice.machine.state is State.ATTACHED and alice.policy is POLICY_DEFAULT
    assert alice.policy.replay_window_size == window
    invalid = policy_events(net.sim.gateway_events, 0, "POLICY_INVALID")
    assert len(invalid) == len(DISABLING)
