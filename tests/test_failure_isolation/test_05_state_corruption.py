"""Seed §5 Session state corruption detection: version mismatch or invalid transition.

If invalid state is detected: reject the transition, emit a diagnostic event, prefer
deterministic termination over undefined continuation. Undefined state is forbidden.

The corruption is injected into the running programs by tests/.../faults.py (signal
triggered failpoints); the programs themselves are unchanged.
"""

from __future__ import annotations

import signal

from exit_codes import EXIT_CODES

from .harness import Lab, assert_versions_contiguous, fast_policy, final_line, transitions


def test_05_state_corruption_gateway_version_mismatch_is_diagnosed_and_terminated() -> None:
    with Lab() as lab:
        gw = lab.gateway(policy=fast_policy(), fault="version-skew")
        r1, r2 = lab.relay(gw.address), lab.relay(gw.address)
        client = lab.client([r1.listen, r2.listen], policy=fast_policy())
        sid = client.wait_event("SESSION_CREATED")["session_id"]
        client.wait_event("PATH_VALIDATED", transport_id=2)
        gw.signal(signal.SIGUSR1)  # the session's state_version jumps by 5 in memory
        gw.wait_stderr("state_version skewed")
        r1.kill_path()  # the next transition exposes the mismatch

        diag = gw.wait_event("DIAGNOSTIC", session_id=sid)
        assert diag["reason_code"] == "stale_state_version"
        assert "rejected by the session store" in diag["detail"]
        ended = gw.wait_event("SESSION_TERMINATED", session_id=sid)
        assert ended["reason_code"] == "ownership_conflict"
        conflict = gw.of("SECURITY_EVENT", violation_type="OWNERSHIP_CONFLICT")
        assert conflict and conflict[0]["session_id"] == sid
        m = gw.metrics()
        assert m["jvpn_gateway_store_conflicts_total"] == 1
        assert sum(v for k, v in m.items() if k.startswith("jvpn_gateway_sessions{")) == 0
        # deterministic: the client is told and ends with that reason, never continues
        assert client.wait_exit(20) == EXIT_CODES["ownership_conflict"]
        assert final_line(client)["final_reason"] == "ownership_conflict"
        # the mismatching transition is the last one before the explicit end: the session
        # never continues in an undefined state (diagnostic first, then TERMINATED)
        events = gw.session_events(sid)
        kinds = [e["event_type"] for e in events]
        assert kinds.index("DIAGNOSTIC") < kinds.index("SESSION_TERMINATED")
        trans = transitions(events, sid)
        assert trans[-1][1:3] == ("TERMINATED", "ownership_conflict")
        assert [t[1] for t in trans].count("TERMINATED") == 1


def test_05_state_corruption_client_invalid_transition_rejected_then_fault_terminates() -> None:
    with Lab() as lab:
        gw = lab.gateway(policy=fast_policy())
        client = lab.client([gw.address], policy=fast_policy(), fault="client-faults")
        sid = client.wait_event("SESSION_CREATED")["session_id"]
        before = transitions(client.snapshot(), sid)

        client.signal(signal.SIGUSR1)  # illegal: ATTACHED --reattach_ok--> ATTACHED
        diag = client.wait_event("DIAGNOSTIC", reason_code="invalid_state_transition")
        assert diag["state"] == "ATTACHED" and "rejected" in diag["detail"]
        assert diag["state_version"] == before[-1][3]  # no mutation: version unchanged
        assert transitions(client.snapshot(), sid) == before
        assert client.popen.poll() is None  # rejected, and the session is still defined

        client.signal(signal.SIGUSR2)  # an invariant breaks inside the engine
        assert client.wait_exit(20) == EXIT_CODES["engine_error"]
        end = final_line(client)
        assert end["final_reason"].startswith("engine_error: state corrupted")
        diag2 = client.wait_event("DIAGNOSTIC", reason_code="invariant_violation")
        assert "state corrupted" in diag2["detail"]
        ended = client.wait_event("SESSION_TERMINATED")
        assert ended["reason_code"] == "invariant_violation"
        trans = transitions(client.snapshot(), sid)
        assert_versions_contiguous(trans)
        assert trans[-1][1:3] == ("TERMINATED", "invariant_violation")
        # explicit on the wire too: the gateway is told and ends the session
        gw_end = gw.wait_event("SESSION_TERMINATED", session_id=sid)
        assert gw_end["reason_code"] == "invariant_violation"
        assert gw_end["initiator"] == "peer"
