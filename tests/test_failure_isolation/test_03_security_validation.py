"""Seed §3 Security validation failure: invalid proof, replay, stale request.

MUST: reject the operation, not mutate the active transport, not modify session identity,
not escalate into uncontrolled recovery. Allowed: emit a security event; DEGRADED after
repeated (authenticated) failures, then TERMINATED at the policy's count.
"""

from __future__ import annotations

import time

from .harness import Attacker, Lab, fast_policy, final_line, session_ids, transitions


def test_03_security_validation_replay_forged_proof_and_replayed_handshake_are_rejected() -> None:
    with Lab() as lab:
        gw = lab.gateway(policy=fast_policy())
        tap = Attacker(gw.address)
        try:
            client = lab.client([tap.listen], policy=fast_policy())
            created = client.wait_event("SESSION_CREATED")
            sid = created["session_id"]
            client.wait_for(lambda: len(tap.captured) > 40, 20, "captured traffic")
            time.sleep(0.5)
            gw_trans = transitions(gw.snapshot(), sid)
            cl_trans = transitions(client.snapshot(), sid)
            init, *rest = tap.captured[:40]
            for _ in range(3):
                for data in rest:  # replays (data, probes, control) from another address
                    tap.send(data)
                for data in rest:  # forged proof: one flipped bit in the AEAD tag
                    tap.send(data[:-1] + bytes([data[-1] ^ 1]))
                tap.send(init)  # the session's own handshake initiation, replayed
                time.sleep(0.3)
            kinds = {"REPLAY_DETECTED", "INVALID_PROOF", "FIXATION_ATTEMPT"}
            gw.wait_for(
                lambda: kinds <= {e["violation_type"] for e in gw.of("SECURITY_EVENT")},
                10, f"SECURITY_EVENTs {kinds}",
            )  # fmt: skip
            for e in gw.of("SECURITY_EVENT"):
                assert e["reason_code"] in (
                    "replay_detected",
                    "bad_proof",
                    "session_fixation_attempt",
                )

            def counted() -> dict[str, float] | None:
                x = gw.metrics()
                return (
                    x
                    if x['jvpn_gateway_drops_total{reason="bad_proof"}'] >= 3 * len(rest)
                    else None
                )

            m = gw.wait_for(counted, 10, "drops counted")
            assert m['jvpn_gateway_drops_total{reason="replay_detected"}'] >= 3 * len(rest)
            assert m['jvpn_gateway_sessions{state="ATTACHED"}'] == 1
            time.sleep(1.0)
            # rejected: no transition, no binding change, same identity, no recovery
            assert transitions(gw.snapshot(), sid) == gw_trans
            assert transitions(client.snapshot(), sid) == cl_trans
            assert not gw.of("TRANSPORT_SWITCH") and not client.of("TRANSPORT_SWITCH")
            assert not client.of("REATTACH_ATTEMPT") and not gw.of("REATTACH_RESULT")
            assert session_ids(gw.snapshot()) == {sid}
            # unauthenticated noise is never pinned on the session: no escalation
            views = [e for e in gw.snapshot() if e.get("new_state") == "DEGRADED"]
            assert not views
            assert client.stop() == 0
            assert final_line(client)["session_id"] == sid
        finally:
            tap.close()


def test_03_security_validation_stale_requests_degrade_then_terminate_at_policy_count() -> None:
    degrade, terminate = 2, 4
    policy = fast_policy(
        security__reattach_proof_max_age_ms=500,
        security__security_failures_to_degrade=degrade,
        security__security_failures_to_terminate=terminate,
    )
    with Lab() as lab:
        gw = lab.gateway(policy=policy)
        r1 = lab.relay(gw.address)
        # path 2 delivers client->gateway datagrams 1.5 s late: every reattach proof is stale
        r2 = lab.relay(gw.address, extra=["--dir", "up", "--delay-ms", "1500"])
        client = lab.client([r1.listen, r2.listen], policy=policy)
        sid = client.wait_event("SESSION_CREATED")["session_id"]
        client.wait_event("PATH_VALIDATED", transport_id=2, timeout=20)
        r1.kill_path()
        ended = gw.wait_event("SESSION_TERMINATED", session_id=sid, timeout=30)
        assert ended["reason_code"] == "security_failure"

        stale = gw.of("SECURITY_EVENT", violation_type="STALE_REQUEST")
        assert stale and all(e["reason_code"] == "stale_request" for e in stale)
        denied = [e for e in gw.of("REATTACH_RESULT") if e["status"] == "DENIED"]
        assert {e["reason_code"] for e in denied} == {"stale_request"}
        # exactly the policy's count of failures: DEGRADED at `degrade`, TERMINATED at `terminate`
        assert len(denied) == terminate
        trans = transitions(gw.snapshot(), sid)
        to_degraded = [t for t in trans if t[1] == "DEGRADED"]
        assert to_degraded and to_degraded[0][2] == "security_failures_repeated"
        assert trans[-1][1] == "TERMINATED" and trans[-1][2] == "security_failure"
        assert trans.index(to_degraded[0]) < len(trans) - 1
        # rejected requests never moved the binding nor changed the identity
        assert not gw.of("TRANSPORT_SWITCH")
        assert not [e for e in gw.of("REATTACH_RESULT") if e["status"] == "SUCCESS"]
        assert session_ids(gw.snapshot()) == {sid}

        # the client ends explicitly and its attempts stay bounded (no recovery loop)
        assert client.wait_exit(30) != 0
        end = final_line(client)
        assert end["final_reason"] in (
            "security_failure", "recovery_window_exceeded", "transport_ttl_exceeded",
            "reattach_validation_failed",
        ), end  # fmt: skip
        attempts = client.of("REATTACH_ATTEMPT")
        assert len(attempts) <= 10, len(attempts)
        assert session_ids(
            [e for e in client.snapshot() if e["event_type"] != "ENGINE_STOPPED"]
        ) == {sid}
        print(
            f"\nstale: {len(denied)} denials, gateway {[t[1] for t in trans]}, "
            f"client attempts {len(attempts)}, client end {end['final_reason']}"
        )
