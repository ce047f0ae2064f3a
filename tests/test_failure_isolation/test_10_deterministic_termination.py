"""Seed §10 Deterministic termination: explicit termination over undefined continuation.

When isolation cannot be preserved (no path left, the gateway lost the session, the
gateway is shut down) both programs end the session explicitly, with a reason code and
an exit status, instead of continuing in an undefined state.
"""

from __future__ import annotations

import signal

from exit_codes import EXIT_CODES, documented_exit_code

from .harness import Lab, assert_versions_contiguous, fast_policy, final_line, transitions

EXPLICIT = ("recovery_window_exceeded", "transport_ttl_exceeded", "degraded_timeout")


def test_10_deterministic_termination_when_every_path_dies() -> None:
    with Lab() as lab:
        gw = lab.gateway(policy=fast_policy())
        r1, r2 = lab.relay(gw.address), lab.relay(gw.address)
        client = lab.client([r1.listen, r2.listen], policy=fast_policy())
        sid = client.wait_event("SESSION_CREATED")["session_id"]
        r1.kill_path()
        r2.kill_path()
        code = client.wait_exit(30)  # the process ends on its own: no undefined limbo
        end = final_line(client)
        assert end["final_reason"] in EXPLICIT, end
        assert code == documented_exit_code(end["final_reason"])
        trans = transitions(client.snapshot(), sid)
        assert_versions_contiguous(trans)
        assert trans[-1][1:3] == ("TERMINATED", end["final_reason"])
        gw_end = gw.wait_event("SESSION_TERMINATED", session_id=sid, timeout=30)
        assert gw_end["reason_code"] in EXPLICIT
        key = f'jvpn_gateway_terminations_total{{reason="{gw_end["reason_code"]}"}}'
        assert gw.wait_for(lambda: gw.metrics().get(key), 10, key) == 1
        gw_trans = transitions(gw.session_events(sid), sid)
        assert_versions_contiguous(gw_trans)
        assert gw_trans[-1][1] == "TERMINATED" and [t[1] for t in gw_trans].count("TERMINATED") == 1


def test_10_deterministic_termination_gateway_lost_the_session() -> None:
    with Lab() as lab:
        gw = lab.gateway(policy=fast_policy())
        relay = lab.relay(gw.address)
        client = lab.client([relay.listen], policy=fast_policy())
        sid = client.wait_event("SESSION_CREATED")["session_id"]
        gw.popen.kill()  # the gateway dies without a word: its session state is gone
        gw.wait_exit(10)
        fresh = lab.gateway(policy=fast_policy(), listen="{}:{}".format(*gw.address))
        code = client.wait_exit(30)
        end = final_line(client)
        # the client never continues on a session nobody holds: it ends explicitly
        assert end["final_reason"] in EXPLICIT, end
        assert code == documented_exit_code(end["final_reason"])
        m = fresh.metrics()
        assert m['jvpn_gateway_drops_total{reason="unknown_session"}'] > 0
        assert not fresh.of("SESSION_CREATED") and not fresh.session_events(sid)
        assert m["jvpn_gateway_sessions_created_total"] == 0


def test_10_deterministic_termination_gateway_shutdown_tells_every_client() -> None:
    with Lab() as lab:
        gw = lab.gateway(policy=fast_policy())
        alice = lab.client([gw.address], policy=fast_policy())
        bob = lab.client([gw.address], name="bob")
        sids = {p.wait_event("SESSION_CREATED")["session_id"] for p in (alice, bob)}
        gw.signal(signal.SIGTERM)
        assert gw.wait_exit(20) == 0
        ended = {e["session_id"]: e["reason_code"] for e in gw.of("SESSION_TERMINATED")}
        assert ended == {sid: "operator_terminated" for sid in sids}
        for proc in (alice, bob):
            assert proc.wait_exit(20) == EXIT_CODES["operator_terminated"] == 0
            assert final_line(proc)["final_reason"] == "operator_terminated"
            term = proc.of("SESSION_TERMINATED")
            assert len(term) == 1 and term[0]["initiator"] == "peer"
