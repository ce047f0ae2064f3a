"""Seed §9 Cascading failure prevention: each domain fails locally.

Transport failure does not cause security failure; security denial does not cause
infinite recovery; observability failure does not alter core state (proved by
test_06_observability, which compares whole runs); cluster race does not create dual
identity (seed §7, cluster coordination, has its own issue and tests).
"""

from __future__ import annotations

import time

from .harness import Attacker, Lab, fast_policy, session_ids, transitions


def test_09_cascade_prevention_transport_failure_and_security_denial_stay_local() -> None:
    with Lab() as lab:
        gw = lab.gateway(policy=fast_policy())
        tap = Attacker(gw.address)  # path 1: client -> relay r1 -> tap -> gateway
        try:
            r1, r2 = lab.relay(tap.listen), lab.relay(gw.address)
            client = lab.client([r1.listen, r2.listen], policy=fast_policy())
            sid = client.wait_event("SESSION_CREATED")["session_id"]
            client.wait_event("PATH_VALIDATED", transport_id=2)
            client.wait_for(lambda: len(tap.captured) > 40, 20, "captured traffic")

            # (a) transport failure: path 1 dies, then path 2 is NAT-rebound
            r1.kill_path()
            client.wait_event("TRANSPORT_SWITCH", new_transport=2)
            r2.rebind()
            gw.wait_event("TRANSPORT_SWITCH", reason_code="nat_rebind")
            time.sleep(1.0)
            assert not gw.of("SECURITY_EVENT") and not client.of("SECURITY_EVENT")
            m = gw.metrics()
            assert not [k for k in m if k.startswith("jvpn_gateway_security_events_total{")]
            assert all(t[2] not in ("security_failure", "security_failures_repeated")
                       for t in transitions(gw.snapshot(), sid))  # fmt: skip

            # (b) security denial: replayed and forged datagrams of the dead path for 2 s
            client_before = transitions(client.snapshot(), sid)
            gw_before = transitions(gw.snapshot(), sid)
            attempts = len(client.of("REATTACH_ATTEMPT"))
            switches = len(gw.of("TRANSPORT_SWITCH"))
            end = time.monotonic() + 2.0
            while time.monotonic() < end:
                for data in tap.captured[1:40]:
                    tap.send(data)
                    tap.send(data[:-1] + bytes([data[-1] ^ 0x80]))
                time.sleep(0.05)
            gw.wait_for(
                lambda: {"REPLAY_DETECTED", "INVALID_PROOF"}
                <= {e["violation_type"] for e in gw.of("SECURITY_EVENT")},
                10, "security events for the attack",
            )  # fmt: skip
            time.sleep(1.0)
            # rejected locally: no recovery started, no switch, no state change anywhere
            assert transitions(client.snapshot(), sid) == client_before
            assert transitions(gw.snapshot(), sid) == gw_before
            assert len(client.of("REATTACH_ATTEMPT")) == attempts
            assert len(gw.of("TRANSPORT_SWITCH")) == switches
            # security events are rate-limited reports, never one per forged datagram
            reports = gw.of("SECURITY_EVENT")
            assert len(reports) <= 2 * 5, len(reports)
            assert sum(e["count"] for e in reports) >= 100
            assert session_ids(gw.snapshot()) == {sid}
            assert client.stop() == 0
        finally:
            tap.close()
