"""Seed §4 Policy engine failure: misconfiguration or invalid update.

If the policy is invalid: deny new session creation, maintain existing sessions under the
previous valid policy, log the configuration failure; never terminate active sessions
automatically. (And, issue 5: POLICY_EVENT, a health flag, a later valid policy restores.)
"""

from __future__ import annotations

import signal

from exit_codes import EXIT_CODES

from .harness import Gateway, Lab, Proc, fast_policy, final_line

INVALID = {
    "bad_toml": 'version = "broken"\n[session\nmax_lifetime_ms = 600000\n',
    "out_of_range": fast_policy("v-bad", switching__max_switches_per_min=0),
    "disabled_invariant": fast_policy("v-bad", security__replay_window_size=0),
}


def _policy_valid(gw: Gateway) -> float:
    return gw.metrics()["jvpn_gateway_policy_valid"]


def _denied_client(lab: Lab, gw: Gateway) -> Proc:
    bob = lab.client([gw.address], name="bob")
    assert bob.wait_exit(20) == EXIT_CODES["policy_denied"]
    assert final_line(bob)["final_reason"] == "policy_denied"
    return bob


def _invalid_policy_keeps_the_session_denies_new(
    lab: Lab, gw: Gateway, session: tuple[Proc, str, str], n: int, kind: str, text: str
) -> None:
    """The n-th invalid policy (``kind``) is reported, flags the health, denies a new
    client, and leaves the running session (alice, its id, its policy version) alone."""
    alice, sid, v1 = session
    lab.write("gw-policy.toml", text)
    if kind != "out_of_range":
        gw.signal(signal.SIGHUP)  # the other one is found by the file-change poll
    event = gw.wait_for(
        lambda n=n: len(gw.of("POLICY_EVENT", policy_name="POLICY_INVALID")) >= n and
        gw.of("POLICY_EVENT", policy_name="POLICY_INVALID")[n - 1],
        15, f"POLICY_INVALID for {kind}",
    )  # fmt: skip
    assert event["reason_code"] == "policy_invalid" and event["detail"], event
    assert _policy_valid(gw) == 0.0  # the health flag
    denials_before = len(gw.of("POLICY_EVENT", policy_name="SESSION_DENIED"))
    _denied_client(lab, gw)
    denial = gw.wait_for(
        lambda b=denials_before: gw.of("POLICY_EVENT", policy_name="SESSION_DENIED")[b:],
        10, "SESSION_DENIED",
    )[0]  # fmt: skip
    assert denial["reason_code"] == "policy_denied" and denial["detail"]
    # the running session is untouched and still runs the last valid policy
    assert alice.popen.poll() is None
    view = [e for e in gw.snapshot() if e.get("session_id") == sid][-1]
    assert view["policy_version"] == v1


def _valid_policy_restores_service(lab: Lab, gw: Gateway, alice: Proc, sid: str) -> None:
    # a later valid policy restores service and reaches the running session
    lab.write("gw-policy.toml", fast_policy("v2"))
    gw.signal(signal.SIGHUP)
    applied = gw.wait_event("POLICY_EVENT", policy_name="POLICY_APPLIED")
    assert applied["policy_version"].startswith("v2+")
    assert _policy_valid(gw) == 1.0
    bob = lab.client([gw.address], name="bob")
    bob_sid = bob.wait_event("SESSION_CREATED")["session_id"]
    bob_created = gw.wait_event("SESSION_CREATED", session_id=bob_sid)
    assert bob_created["policy_version"].startswith("v2+")
    assert bob.stop() == 0 and alice.stop() == 0
    alice_end = gw.wait_event("SESSION_TERMINATED", session_id=sid)
    assert alice_end["reason_code"] == "operator_terminated"
    assert alice_end["policy_version"].startswith("v2+")
    assert final_line(alice)["final_reason"] == "operator_terminated"


def test_04_policy_engine_invalid_policy_keeps_sessions_denies_new_then_recovers() -> None:
    with Lab() as lab:
        gw = lab.gateway(policy=fast_policy("v1"))
        alice = lab.client([gw.address], policy=fast_policy("v1"))
        created = alice.wait_event("SESSION_CREATED")
        sid = created["session_id"]
        v1 = created["policy_version"]
        assert v1.startswith("v1+")

        for n, (kind, text) in enumerate(INVALID.items(), start=1):
            _invalid_policy_keeps_the_session_denies_new(lab, gw, (alice, sid, v1), n, kind, text)
        m = gw.metrics()
        assert m['jvpn_gateway_policy_reloads_total{result="invalid"}'] >= 3
        assert m["jvpn_gateway_sessions_denied_total"] == 3
        assert m['jvpn_gateway_sessions{state="ATTACHED"}'] == 1
        assert not gw.of("SESSION_TERMINATED", session_id=sid)
        assert not alice.of("SESSION_TERMINATED")
        key = 'jvpn_gateway_inner_packets_total{direction="to_clients"}'
        before = m[key]
        # the running session goes on carrying traffic
        gw.wait_for(lambda: gw.metrics()[key] > before, 20, "traffic of the running session")

        # the client side: an invalid reload keeps the running policy, session continues
        lab.write("alice-policy.toml", INVALID["disabled_invariant"])
        alice.signal(signal.SIGHUP)
        bad = alice.wait_event("POLICY_EVENT", policy_name="POLICY_INVALID")
        assert v1 in bad["detail"] and bad["policy_version"] == v1

        _valid_policy_restores_service(lab, gw, alice, sid)
