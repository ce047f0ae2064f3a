"""Seed §10 Deterministic termination: explicit termination over undefined continuation.

When isolation cannot be preserved (no path left, the gateway lost the session, the
gateway is shut down) both programs end the session explicitly, with a reason code and
an exit status, instead of continuing in an undefined state.
"""

from __future__ import annotations

import signal

from exit_codes import EXIT_CODES, documented_exit_code

from .harness import Attacker, Lab, assert_versions_contiguous, fast_policy, final_line, transitions

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
    """DESIGN D15c: the client never continues on a session nobody holds. The old session
    ends explicitly (``gateway_lost_state``) and a new one, linked to it, takes its place
    once the gateway answers a new handshake. The new gateway knows nothing of the old
    session: its datagrams are dropped there as ``unknown_session``."""
    with Lab() as lab:
        gw = lab.gateway(policy=fast_policy())
        tap = Attacker(gw.address)  # records the old session's datagrams on the way
        try:
            # a window that outlasts the gateway's restart on a loaded machine
            patient = fast_policy(
                session__transport_lost_ttl_ms=30_000, switching__recovery_window_ms=20_000
            )
            client = lab.client([tap.listen], policy=patient)
            sid = client.wait_event("SESSION_CREATED")["session_id"]
            client.wait_for(lambda: _old_session_datagrams(tap.captured), 20, "old datagrams")
            gw.popen.kill()  # the gateway dies without a word: its session state is gone
            gw.wait_exit(10)
            old = _old_session_datagrams(tap.captured)
            fresh = lab.gateway(policy=fast_policy(), listen="{}:{}".format(*gw.address))
            linked = client.wait_event("SESSION_LINKED", timeout=30)
            assert linked["previous_session_id"] == sid and linked["session_id"] != sid
            (ended,) = client.of("SESSION_TERMINATED")
            assert (ended["session_id"], ended["reason_code"]) == (sid, "gateway_lost_state")
            trans = transitions(client.snapshot(), sid)
            assert_versions_contiguous(trans)
            assert trans[-1][1:3] == ("TERMINATED", "gateway_lost_state")
            assert fresh.wait_for(
                lambda: fresh.metrics().get("jvpn_gateway_sessions_created_total") == 1,
                10, "created",
            )  # fmt: skip
            # Whether the client's own reattaches reached the new gateway before its new
            # handshake did depends on timing; a datagram of the old session sent now
            # must be dropped as unknown, whatever the order was.
            key = 'jvpn_gateway_drops_total{reason="unknown_session"}'
            before = fresh.metrics().get(key, 0)
            tap.send(old[-1])
            assert fresh.wait_for(lambda: fresh.metrics().get(key, 0) > before, 10, key)
            assert fresh.metrics().get("jvpn_gateway_sessions_created_total") == 1
            assert not fresh.session_events(sid)  # the old session is nowhere on the new gateway
        finally:
            tap.close()


def _old_session_datagrams(captured: list[bytes]) -> list[bytes]:
    """The client's DATA and CONTROL datagrams (docs/wire-format.md: type in byte 0)."""
    return [d for d in list(captured) if d[:1] in (b"\x03", b"\x04")]


def test_10_deterministic_termination_gateway_lost_the_session_policy_terminate() -> None:
    """``lost_state = "terminate"``: the client ends, with ``gateway_lost_state``."""
    with Lab() as lab:
        policy = fast_policy(
            session__transport_lost_ttl_ms=30_000, switching__recovery_window_ms=20_000,
            switching__lost_state="terminate",
        )  # fmt: skip
        gw = lab.gateway(policy=fast_policy())
        relay = lab.relay(gw.address)
        client = lab.client([relay.listen], policy=policy)
        sid = client.wait_event("SESSION_CREATED")["session_id"]
        gw.popen.kill()
        gw.wait_exit(10)
        lab.gateway(policy=fast_policy(), listen="{}:{}".format(*gw.address))
        code = client.wait_exit(30)
        end = final_line(client)
        assert end["final_reason"] == "gateway_lost_state", end
        assert code == documented_exit_code("gateway_lost_state") != 0
        trans = transitions(client.snapshot(), sid)
        assert trans[-1][1:3] == ("TERMINATED", "gateway_lost_state")
        assert not client.of("SESSION_LINKED")


def test_10_deterministic_termination_gateway_shutdown_tells_every_client() -> None:
    """A stop with the memory store ends every session with ``gateway_shutdown`` (D15c):
    a client ends at once (``lost_state = "terminate"``) or after its recovery window
    without the gateway back (the default), with that reason's exit code, never 0."""
    with Lab() as lab:
        gw = lab.gateway(policy=fast_policy())
        alice = lab.client([gw.address], policy=fast_policy(switching__lost_state="terminate"))
        bob = lab.client([gw.address], name="bob", policy=fast_policy())
        sids = {p.wait_event("SESSION_CREATED")["session_id"] for p in (alice, bob)}
        gw.signal(signal.SIGTERM)
        assert gw.wait_exit(20) == 0
        ended = {e["session_id"]: e["reason_code"] for e in gw.of("SESSION_TERMINATED")}
        assert ended == {sid: "gateway_shutdown" for sid in sids}
        for proc in (alice, bob):
            assert proc.wait_exit(20) == EXIT_CODES["gateway_shutdown"] != 0
            assert final_line(proc)["final_reason"] == "gateway_shutdown"
            term = proc.of("SESSION_TERMINATED")
            assert len(term) == 1 and term[0]["initiator"] == "peer"
