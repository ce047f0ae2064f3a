"""Seed §2 Transport failure: loss, NAT rebinding, link drop, flapping on the real programs.

MUST NOT: corrupt session identity, mutate the cryptographic context, reset the session
silently, bypass policy limits. Allowed: ATTACHED -> VOLATILE (or RECOVERING), explicit
recovery attempt, bounded switching.
"""

from __future__ import annotations

from .harness import (
    Lab,
    Proc,
    assert_versions_contiguous,
    fast_policy,
    final_line,
    session_ids,
    transitions,
)

ALLOWED_REASONS = {
    "attached_to_transport", "loss_threshold_exceeded", "consecutive_drop_exceeded",
    "latency_threshold_exceeded", "transport_dead", "reattach_success", "loss_recovery",
    "dead_transport_recovery", "nat_rebind", "stability_restored", "transport_resumed",
    "volatile_persisted", "switch_rate_limited", "reattach_validation_failed",
    "recovery_retry", "no_valid_candidate", "no_candidate_transports",
    "operator_terminated", "peer_terminated",
}  # fmt: skip
"""Every reason a transport failure may legitimately cause (no security, no reset)."""


def _assert_identity_and_crypto_untouched(client_events: list, gw_events: list) -> str:
    """One session id on both sides, no security event, no rekey, no silent reset."""
    ids = session_ids(client_events)
    assert len(ids) == 1, f"session identity changed: {ids}"
    (sid,) = ids
    assert session_ids(gw_events) == {sid}
    for events in (client_events, gw_events):
        kinds = {e["event_type"] for e in events}
        assert "SECURITY_EVENT" not in kinds, [
            e for e in events if e["event_type"] == "SECURITY_EVENT"
        ]
        # rekey_after_s is 120 s: inside this test any KEY_ROTATED would be unscheduled.
        assert "KEY_ROTATED" not in kinds
        assert len([e for e in events if e["event_type"] == "SESSION_CREATED"]) == 1
        trans = transitions(events, sid)
        assert_versions_contiguous(trans)
        assert {t[2] for t in trans} <= ALLOWED_REASONS, trans
    return sid


def test_02_transport_link_drop_loss_and_nat_rebind_keep_identity_and_keys() -> None:
    with Lab() as lab:
        gw = lab.gateway(policy=fast_policy())
        r1, r2 = lab.relay(gw.address), lab.relay(gw.address)
        client = lab.client([r1.listen, r2.listen], policy=fast_policy())
        created = client.wait_event("SESSION_CREATED")
        client.wait_event("PATH_VALIDATED", transport_id=2)

        # link drop on the active path: explicit recovery onto path 2
        r1.kill_path()
        client.wait_event("TRANSPORT_SWITCH", new_transport=2)
        gw.wait_event("TRANSPORT_SWITCH", new_transport=2)

        # NAT rebinding of path 2: versioned nat_rebind on the gateway, same identity
        r2.rebind()
        gw.wait_event("TRANSPORT_SWITCH", reason_code="nat_rebind")

        # heavy loss on the new path (path 1 is back): bounded adaptation, no reset
        r1.revive()
        r2.set("both", loss=0.5)

        def unstable() -> list:
            trans = transitions(client.snapshot())
            return [t for t in trans if t[1] in ("VOLATILE", "RECOVERING")][1:]

        client.wait_for(unstable, 20, "a second ATTACHED -> VOLATILE/RECOVERING")
        r2.set("both", loss=0.0)
        client.wait_for(lambda: transitions(client.snapshot())[-1][1] == "ATTACHED", 20, "ATTACHED")
        key = 'jvpn_gateway_inner_packets_total{direction="to_clients"}'
        before = gw.metrics()[key]
        # inner traffic goes on after the transport failures
        gw.wait_for(lambda: gw.metrics()[key] > before, 20, "inner traffic after the failures")

        assert client.stop() == 0
        end = final_line(client)
        assert end["final_reason"] == "operator_terminated"
        assert end["traffic"]["rx_packets"] > 0
        sid = _assert_identity_and_crypto_untouched(client.snapshot()[:-1], gw.snapshot())
        assert sid == created["session_id"] == end["session_id"]
        # the only termination is the explicit operator stop: never a silent reset
        assert [e["reason_code"] for e in client.of("SESSION_TERMINATED")] == [
            "operator_terminated"
        ]
        assert [e["reason_code"] for e in gw.of("SESSION_TERMINATED")] == ["operator_terminated"]


def _alive(client: Proc, transport_id: int) -> bool:
    """The client's last word on the path: validated and, if it ever said, alive."""
    health = client.of("PATH_HEALTH", transport_id=transport_id)
    if health:
        return bool(health[-1]["alive"])
    return bool(client.of("PATH_VALIDATED", transport_id=transport_id))


def test_02_transport_flapping_never_bypasses_the_switch_cap() -> None:
    cap = 3
    policy = fast_policy(switching__max_switches_per_min=cap, switching__switch_cooldown_ms=100)
    with Lab() as lab:
        gw = lab.gateway(policy=policy)
        r1, r2 = lab.relay(gw.address), lab.relay(gw.address)
        client = lab.client([r1.listen, r2.listen], policy=policy)
        client.wait_event("SESSION_CREATED")
        client.wait_event("PATH_VALIDATED", transport_id=2)
        relays = {1: r1, 2: r2}
        for _ in range(2 * cap):  # flap: kill whichever path is active, revive the other
            switches = client.of("TRANSPORT_SWITCH")
            active = switches[-1]["new_transport"] if switches else 1
            relays[3 - active].revive()
            client.wait_for(lambda a=3 - active: _alive(client, a), 20, f"path {3 - active} alive")
            relays[active].kill_path()
            n = len(switches)

            def moved(n: int = n) -> bool:
                return bool(
                    len(client.of("TRANSPORT_SWITCH")) > n
                    or client.of("TRANSPORT_SWITCH_DENIED", reason_code="switch_rate_limited")
                    or client.popen.poll() is not None
                )

            try:
                client.wait_for(moved, 6, "a switch or its denial")
            except AssertionError:
                break
            if client.of("TRANSPORT_SWITCH_DENIED", reason_code="switch_rate_limited"):
                break
        denied = client.wait_event("TRANSPORT_SWITCH_DENIED", reason_code="switch_rate_limited")
        assert denied["session_id"]
        # the cap holds on both sides: no switch beyond max_switches_per_min in the window
        assert len(client.of("TRANSPORT_SWITCH")) <= cap
        assert (
            len([e for e in gw.of("TRANSPORT_SWITCH") if e["reason_code"] != "nat_rebind"]) <= cap
        )
        # the denial is explicit and the session protects itself (DEGRADED), never silent
        assert any(
            t[1] == "DEGRADED" and t[2] == "switch_rate_limited"
            for t in transitions(client.snapshot())
        )
        client.stop()
        _assert_identity_and_crypto_untouched(
            [e for e in client.snapshot() if e["event_type"] != "ENGINE_STOPPED"], gw.snapshot()
        )
