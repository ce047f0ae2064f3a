"""What the client's loop drops before the session sees it is in the engine's snapshot, and
the snapshot names the inner IPv6 address (issue 12; docs/client.md "What the engine
does": "These counts appear in the snapshot's drops and in DROP_SUMMARY events"; the UI
contract tunnel/api.py ``SessionView.drops`` and ``SessionView.inner_address6``).

Rootless: ClientEngine with the memory inner side over loopback UDP against an embedded
gateway (tests/test_ipv6_engine.py's rig).
"""

from __future__ import annotations

import socket

import msgspec
from engine_watch import Watcher
from test_ipv6_engine import CLIENT6, ECHOES, SixInner, engine_for, gateway

from tunnel.api import SessionView
from tunnel.core.handshake import generate_keypair

FOREIGN = 5


def _drops(w: Watcher) -> dict[str, int]:
    return dict(w.snapshot.session.drops) if w.snapshot is not None else {}


def _summed(w: Watcher, reason: str) -> int:
    """The count of ``reason`` over every DROP_SUMMARY so far."""
    return sum(dict(e["counts"]).get(reason, 0) for e in w.of("DROP_SUMMARY"))


def test_a_foreign_source_datagram_shows_in_the_snapshot_drops_and_the_summary() -> None:
    private, public = generate_keypair()
    gw_private, gw_public = generate_keypair()
    with gateway(public, gw_private, ipv6=True) as gw:
        engine = engine_for(gw, private, gw_public, SixInner(()))
        w = Watcher(engine)
        engine.start()
        try:
            w.wait(lambda: w.snapshot is not None and w.snapshot.session.state == "ATTACHED")
            assert engine.runtime is not None
            path = engine.runtime.paths[1].sock.local_address
            assert "foreign_source" not in _drops(w)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
                stranger.bind(("127.0.0.1", 0))  # not the path's gateway address
                for n in range(FOREIGN):
                    stranger.sendto(b"not from the gateway %d" % n, path)
            w.wait(lambda: _drops(w).get("foreign_source") == FOREIGN)
            w.wait(lambda: _summed(w, "foreign_source") == FOREIGN)
            assert w.snapshot is not None and w.snapshot.session.state == "ATTACHED"
            assert w.snapshot.session.inner_address6 == CLIENT6
        finally:
            engine.stop()


def test_ipv6_the_session_cannot_carry_shows_in_the_drops_and_no_inner_address6() -> None:
    private, public = generate_keypair()
    gw_private, gw_public = generate_keypair()
    inner = SixInner((CLIENT6,))
    with gateway(public, gw_private, ipv6=False) as gw:
        engine = engine_for(gw, private, gw_public, inner)
        w = Watcher(engine)
        engine.start()
        try:
            w.wait(lambda: _drops(w).get("inner_ipv6_dropped") == ECHOES)
            assert inner.assigned6 == ""  # the gateway has no inner IPv6 subnet
            assert w.snapshot is not None
            assert w.snapshot.session.inner_address6 == ""
            assert w.snapshot.session.inner_address != ""
            # the host sends something that is neither IPv4 nor IPv6
            inner.loop.call_soon_threadsafe(inner.inject, b"\x00" * 40)
            w.wait(lambda: _drops(w).get("inner_malformed") == 1)
            w.wait(lambda: _summed(w, "inner_ipv6_dropped") == ECHOES)
        finally:
            engine.stop()


def test_an_older_peer_decodes_a_session_view_without_inner_address6() -> None:
    """The field is additive: a view encoded without it (an engine of the previous
    version, over the control socket) still decodes, with the default."""
    older = {
        "session_id": "ab", "state": "ATTACHED", "state_version": 1, "binding_epoch": 1,
        "peer_state": "ATTACHED", "peer_state_version": 1, "active": 1, "pending": None,
        "paths": [], "auto_switch": True, "switch_budget_left": 3,
        "cooldown_remaining_ms": 0.0, "key_phase": 0, "key_age_s": 1.0,
        "policy_version": "v", "uptime_s": 2.0, "queue_depth": 0, "queue_dropped": 0,
        "total_switches": 0, "drops": [], "inner_address": "10.77.0.2",
    }  # fmt: skip
    view = msgspec.json.decode(msgspec.json.encode(older), type=SessionView)
    assert (view.inner_address, view.inner_address6) == ("10.77.0.2", "")
