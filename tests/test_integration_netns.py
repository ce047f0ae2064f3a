"""Integration acceptance of the real tunnel (issue 3): both programs, real TUN, real UDP.

Every test builds a client and a gateway namespace joined by veth paths, starts
``jvpn-gateway`` and ``jvpn-tui --headless`` in them (tests/realnet.py), drives faults
(link down, the ``jvpn-impair`` relay, replays from a packet capture) and asserts on the
programs' events, the gateway's metrics and the inner traffic. Nothing here asserts a
duration; measured numbers (stall, switch latency) are printed (``pytest -s``).
Needs root, network namespaces and /dev/net/tun; skips with the reason otherwise.

Transport ids: the client's path i (0-based in the topology) is transport i + 1.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import pytest
from exit_codes import EXIT_CODES
from realnet import (
    CLIENT_INNER,
    GATEWAY_PORT,
    RELAY_PORT_BASE,
    Capture,
    RealTunnel,
    expected_sha256,
    ns_socket,
    policy_toml,
    realnet,  # noqa: F401  (the fixture)
    seeded_loss,
    stop_stream,
    wait_until,
)

from tunnel.core.constants import MSG_CONTROL, MSG_DATA

pytestmark = pytest.mark.root

A, B = 1, 2
"""Transport ids of the first two paths."""

MiB = 1 << 20


def _session_id(t: RealTunnel) -> str:
    return t.events.wait_type("SESSION_CREATED", 10)["session_id"]


def _terminal(t: RealTunnel, since: int = 0) -> list[dict[str, Any]]:
    return t.events.where(
        lambda e: (
            e.get("event_type") == "SESSION_TERMINATED"
            or (e.get("event_type") == "STATE_CHANGE" and e.get("new_state") == "TERMINATED")
        ),
        since,
    )


def _metric(m: dict[str, float], key: str) -> float:
    return m.get(key, 0.0)


DATAGRAMS_IN = 'jvpn_gateway_datagrams_total{direction="in"}'


def _observe(t: RealTunnel, datagrams: int) -> None:
    """An observation window for "nothing else happens", counted in the client's activity:
    until the gateway has read ``datagrams`` more datagrams (probes come every 100 ms on
    the active path), however long a loaded machine takes for them."""
    start = _metric(t.metrics(), DATAGRAMS_IN)
    wait_until(
        lambda: _metric(t.metrics(), DATAGRAMS_IN) >= start + datagrams,
        60,
        f"{datagrams} more datagrams at the gateway",
        step=0.2,
    )


# -- traffic -------------------------------------------------------------------------------


def test_tcp_and_udp_flow_between_the_inner_addresses(realnet) -> None:  # noqa: F811
    t: RealTunnel = realnet()
    sid = _session_id(t)

    sources = t.udp_echo(count=50)
    assert sources == [CLIENT_INNER] * 50  # every echo came back; the gateway saw the inner source

    size = 4 * MiB
    result = t.start_download(size).finish(60)
    assert result.sender["error"] is None and result.receiver["error"] is None
    assert result.sender["peer"] == CLIENT_INNER
    assert result.receiver["received"] == size
    assert result.receiver["sha256"] == result.sender["sha256"] == expected_sha256(size)

    m = t.metrics()
    assert _metric(m, 'jvpn_gateway_inner_packets_total{direction="from_clients"}') > 50
    assert _metric(m, 'jvpn_gateway_inner_packets_total{direction="to_clients"}') > 50
    assert _metric(m, 'jvpn_gateway_sessions{state="ATTACHED"}') == 1

    assert t.stop_client() == 0
    final = t.final()
    assert final["final_reason"] == "operator_terminated" and final["exit_code"] == 0
    assert final["session_id"] == sid and final["traffic"]["rx_bytes"] >= size
    assert not t.client_tun_exists()  # the client restored its namespace
    t.gw_events.wait_type("SESSION_TERMINATED", 10, reason_code="operator_terminated")


# -- AT-10: path death under load -------------------------------------------------------------


def test_at10_path_death_under_load_keeps_the_tcp_transfer_and_the_session(
    realnet,  # noqa: F811
) -> None:
    t: RealTunnel = realnet()
    sid = _session_id(t)
    size = 40 * MiB
    transfer = t.start_download(size)
    transfer.wait_progress(6 * MiB, 60)

    mark = t.events.mark()
    t.topo.link_down(0)
    killed_at = transfer.progress[-1]
    result = transfer.finish(120)

    # the inner TCP connection survived: every byte, in order, no reset on either side
    assert result.sender["error"] is None, result.sender
    assert result.receiver["error"] is None, result.receiver
    assert result.receiver["received"] == size
    assert result.receiver["sha256"] == expected_sha256(size)

    dead = t.events.wait_type("TRANSPORT_DEAD", 5, since=mark, transport_id=A)
    switch = t.events.wait_type("TRANSPORT_SWITCH", 5, since=mark)
    assert (switch["previous_transport"], switch["new_transport"]) == (A, B)
    # a death is recovered by a reattach: the switch's reason is its success (the death and
    # the recovery reason are on the RECOVERING transition and the REATTACH_ATTEMPT)
    assert switch["reason_code"] == "reattach_success"
    recovering = t.events.of_type("STATE_CHANGE", mark, new_state="RECOVERING")
    # the link went down: the link monitor says so at once (docs/client.md "Link monitor")
    assert recovering and recovering[0]["reason_code"] == "link_down"
    assert dead["reason_code"] == "link_down"
    assert isinstance(switch["switch_latency_ms"], float) and switch["switch_latency_ms"] >= 0
    assert switch["explicit"] is True and switch["auditable"] is True
    assert t.states(mark)[:2] == ["RECOVERING", "ATTACHED"]
    assert not _terminal(t)
    assert t.session_ids() == {sid}
    # one death, one switch: every switch answers its own death of the path it leaves. The
    # saturating transfer may starve B's probes past dead_min on a loaded machine; such a
    # death is then recovered on B by its own reattach, never by a second answer to A's.
    deaths: set[Any] = set()
    for e in t.events.where(
        lambda e: e.get("event_type") in ("TRANSPORT_DEAD", "TRANSPORT_SWITCH"), mark
    ):
        if e["event_type"] == "TRANSPORT_DEAD":
            deaths.add(e["transport_id"])
            continue
        assert e["previous_transport"] in deaths, (e, t.switches(mark))
        deaths.discard(e["previous_transport"])

    gw_switch = t.gw_events.wait_type("TRANSPORT_SWITCH", 5)
    assert gw_switch["session_id"] == sid

    r = result.receiver
    print(
        f"\nAT-10 path death under load: {size / MiB:.0f} MiB in {r['duration_s']:.2f}s "
        f"({size * 8 / r['duration_s'] / 1e6:.0f} Mbit/s incl. the failover); link down after "
        f"{killed_at / MiB:.0f} MiB; silence at death {dead['silence_ms']:.0f} ms; "
        f"switch_latency_ms {switch['switch_latency_ms']:.1f} (gateway switch reason "
        f"{gw_switch['reason_code']}); stall (longest receive gap) {r['max_gap_ms']:.0f} ms "
        f"at {r['gap_at'] / MiB:.1f} MiB"
    )


# -- AT-14 / AT-15: loss through the relay ------------------------------------------------------
#
# "x % loss on A" is applied by the relay to the client->gateway direction only, so the
# probe round trip (the loss the client measures) loses x %. Applied to both directions
# the round trip would lose 1 - (1 - x)^2: 19 % for x = 10 %, right at the 20 % threshold,
# where no estimator can promise "no switch".
#
# The relay's loss pattern is fixed by its seed (realnet.seeded_loss): each test checks that
# the pattern it gets is a fair one for its claim, so the outcome rests on the pattern the
# test names, not on a lucky draw. Windows are counted in datagrams through the relay, not
# in seconds, so a slow machine sees the same probes, only later.

LOSS_WINDOW_DATAGRAMS = 30
"""Probes on the active path in the default 3 s loss window (one per 100 ms)."""


def _wait_standby_alive(t: RealTunnel) -> None:
    """Standby path B answered its probes: the client reports it alive, a candidate."""
    t.events.wait_type("PATH_HEALTH", 20, transport_id=B, alive=True)


def _relay_up(relay: Any, counter: str) -> int:
    return int(relay.stats()["up"][counter])


NEVER_IDLE = {"idle_after_ms": 3_600_000}
"""The default policy, but the session is never idle (issue 11). These tests judge a path by
its probes (loss, death, the datagrams through a relay) in a session that carries no inner
data: at the default policy it would be idle after 5 s and probe every 10 s."""


def test_at14_loss_spike_on_a_makes_it_volatile_and_switches_to_b(realnet) -> None:  # noqa: F811
    t: RealTunnel = realnet(relays=(0,), policy=policy_toml(volatility=NEVER_IDLE))
    sid = _session_id(t)
    _wait_standby_alive(t)
    relay = t.relays[0]
    pattern = seeded_loss(0, 0.30, 2 * LOSS_WINDOW_DATAGRAMS)
    # a fair 30 %: over the first two loss windows it loses more than the per-direction
    # threshold (0.20 + 0.05), so one of them does, and a VOLATILE judgement is due
    assert sum(pattern) / len(pattern) > 0.25

    mark = t.events.mark()
    relay.set("up", loss=0.30)
    started = time.monotonic()
    volatile = t.events.wait_type("STATE_CHANGE", 20, since=mark, new_state="VOLATILE")
    noticed = time.monotonic() - started
    assert volatile["reason_code"] in ("loss_threshold_exceeded", "consecutive_drop_exceeded")
    switch = t.events.wait_type("TRANSPORT_SWITCH", 15, since=mark)
    assert (switch["previous_transport"], switch["new_transport"]) == (A, B)
    assert switch["reason_code"] == "loss_recovery"
    back = t.events.of_type("STATE_CHANGE", mark, new_state="ATTACHED")
    assert back and back[0]["reason_code"] == "loss_recovery"  # VOLATILE -> ATTACHED on B
    assert not _terminal(t) and t.session_ids() == {sid}
    stats = relay.stats()["up"]
    assert stats["dropped_loss"] > 0
    print(
        f"\nAT-14 30% loss: VOLATILE ({volatile['reason_code']}) {noticed:.2f}s after the loss "
        f"started; switch_latency_ms {switch['switch_latency_ms']:.1f}; relay up: "
        f"{stats['dropped_loss']}/{stats['received']} dropped"
    )


def test_at15_ten_percent_loss_on_a_does_not_switch(realnet) -> None:  # noqa: F811
    """Default policy. Loss is judged per direction (docs/policy.md): round-trip probe loss
    is compared with 1-(1-threshold)^2, so 10 % on A (here: client->gateway) stays below it
    while 30 % (AT-14) crosses it. The seeded pattern is a fair 10 %: about 10 % over the
    test, no loss window above 20 %, no two drops in a row (max_consecutive_drops is 5)."""
    t: RealTunnel = realnet(relays=(0,), policy=policy_toml(volatility=NEVER_IDLE))
    sid = _session_id(t)
    relay = t.relays[0]
    loss_for = 4 * LOSS_WINDOW_DATAGRAMS
    pattern = seeded_loss(0, 0.10, loss_for + LOSS_WINDOW_DATAGRAMS)
    assert 0.05 <= sum(pattern[:loss_for]) / loss_for <= 0.15
    windows = [pattern[i : i + LOSS_WINDOW_DATAGRAMS] for i in range(len(pattern))]
    assert max(sum(w) for w in windows) <= 0.2 * LOSS_WINDOW_DATAGRAMS
    assert not any(a and b for a, b in itertools.pairwise(pattern))

    # fill the default 3 s loss window with clean outcomes first
    relay.command({"cmd": "reset", "counters": True})
    wait_until(
        lambda: _relay_up(relay, "forwarded") >= LOSS_WINDOW_DATAGRAMS + 10,
        30,
        "a clean loss window on A",
    )
    relay.command({"cmd": "reset", "counters": True})
    mark = t.events.mark()
    relay.set("up", loss=0.10)
    wait_until(lambda: _relay_up(relay, "received") >= loss_for, 60, "datagrams through the loss")
    stats = relay.stats()["up"]
    relay.reset()

    ratio = stats["dropped_loss"] / max(1, stats["received"])
    print(
        f"\nAT-15 10% loss over {stats['received']} datagrams: relay up dropped "
        f"{stats['dropped_loss']}"
    )
    assert 0.03 <= ratio <= 0.2  # the loss really applied
    assert t.states(mark) == []  # no state change at all
    assert t.switches(mark) == [] and t.events.of_type("TRANSPORT_SWITCH_DENIED", mark) == []
    assert not _terminal(t) and t.session_ids() == {sid}


# -- AT-18: NAT rebinding ---------------------------------------------------------------------


UNVALIDATED = 'jvpn_gateway_drops_total{reason="unvalidated_path"}'


def _old_address_is_only_challenged(
    t: RealTunnel, relay: Any, old_host: str, old_port: str
) -> tuple[list[bytes], float]:
    """The old address is no longer accepted: authentic, never-seen client datagrams sent
    from the old address are dropped as coming from an unvalidated path (and only
    challenged), the binding does not move back. Returns the fresh datagrams and the
    unvalidated_path drops before them.

    The datagrams must be the newest the gateway has seen from the client (D4: only the
    newest authentic datagram from a new address is challenged), so *every* upstream is
    held (both relays blackhole) from before the capture until the challenge came back:
    nothing the client sends meanwhile (its stream, its probes of the standby path, the
    probe burst a silent path triggers) reaches the gateway ahead of them."""
    before = _metric(t.metrics(), UNVALIDATED)
    gw_mark2 = t.gw_events.mark()
    link = t.topo.paths[0]
    for r in t.relays.values():
        r.set("up", blackhole=True)
    try:
        with Capture(t.topo.gateway_ns, link.gateway_ifname, RELAY_PORT_BASE) as cap:
            wait_until(lambda: sum(p.payload[0] == MSG_DATA for p in cap.packets) >= 3, 10, "data")
        fresh = [p.payload for p in cap.packets if p.payload[0] == MSG_DATA]
        with ns_socket(t.topo.gateway_ns) as old:
            old.bind((old_host, int(old_port)))  # the relay closed this port at the rebind
            old.settimeout(10.0)  # generous: the machine may be loaded
            for payload in fresh:
                old.sendto(payload, ("127.0.0.1", GATEWAY_PORT))
            challenge, _ = old.recvfrom(2048)  # the gateway only challenges the old address
    finally:
        for r in t.relays.values():
            r.reset()
    assert challenge[0] == MSG_CONTROL
    wait_until(
        lambda: _metric(t.metrics(), UNVALIDATED) >= before + 1,
        5,
        "unvalidated_path drops",
    )
    _observe(t, 5)
    assert t.gw_events.of_type("TRANSPORT_SWITCH", gw_mark2) == []
    assert t.gw_events.of_type("PATH_VALIDATED", gw_mark2) == []
    return fresh, before


def test_at18_nat_rebinding_rebinds_with_a_path_challenge_and_drops_the_old_address(
    realnet,  # noqa: F811
) -> None:
    # The old address is tested with datagrams taken off path A while both relays briefly
    # blackhole the upstream (the stream's echoes stop too): that silence alone would end
    # path A by either death rule (docs/policy.md, dead_min_ms and dead_traffic_min_ms)
    # within the capture on a loaded machine. Both floors set high keep the capture
    # an instrument, not a death; the rebinding itself is what is tested. Path B is relayed
    # only to be held too.
    floors = {"dead_min_ms": 10_000, "dead_traffic_min_ms": 60_000}  # (< transport_lost_ttl)
    floors |= NEVER_IDLE
    t: RealTunnel = realnet(relays=(0, 1), policy=policy_toml(volatility=floors))
    sid = _session_id(t)
    relay = t.relays[0]
    attached = t.gw_events.wait_type("TRANSPORT_ATTACHED", 5)
    old_label = attached["path"]
    old_host, old_port = old_label.rsplit(":", 1)
    forwarded = _relay_up(relay, "forwarded")
    stream = t.start_udp_stream()
    wait_until(lambda: _relay_up(relay, "forwarded") >= forwarded + 50, 20, "the stream on A")

    gw_mark, mark = t.gw_events.mark(), t.events.mark()
    assert relay.rebind() == 1
    rebind = t.gw_events.wait_type("TRANSPORT_SWITCH", 10, since=gw_mark, reason_code="nat_rebind")
    new_label = rebind["path"]
    assert new_label != old_label and new_label.startswith("127.0.0.1:")
    validated = t.gw_events.of_type("PATH_VALIDATED", gw_mark, path=new_label)
    assert validated, "the new address was validated by a path challenge first"
    assert t.gw_events.events.index(validated[0]) < t.gw_events.events.index(rebind)
    change = t.gw_events.wait_type("STATE_CHANGE", 5, since=gw_mark, reason_code="nat_rebind")
    assert (change["previous_state"], change["new_state"]) == ("ATTACHED", "ATTACHED")
    t.events.wait_for(
        lambda e: (
            e.get("event_type") == "PEER_STATE"
            and e.get("binding_epoch", 0) > attached["binding_epoch"]
        ),
        5,
        since=mark,
        what="client sees the new binding epoch",
    )
    metrics = t.metrics()
    assert _metric(metrics, 'jvpn_gateway_switches_total{reason="nat_rebind"}') == 1

    fresh, before = _old_address_is_only_challenged(t, relay, old_host, old_port)

    # traffic continued through the rebinding, on the same session, with no client switch
    out = stop_stream(stream)
    assert out["replies_last_s"] > 0 and out["received"] > out["sent"] * 0.8, out
    assert t.switches(mark) == [] and not _terminal(t) and t.session_ids() == {sid}
    drops = _metric(t.metrics(), UNVALIDATED)
    print(
        f"\nAT-18 rebind {old_label} -> {new_label}; UDP stream {out['received']}/{out['sent']} "
        f"echoed, longest echo gap {out['max_reply_gap_ms']:.0f} ms; {len(fresh)} datagrams from "
        f"the old address -> unvalidated_path drops {before:.0f} -> {drops:.0f}"
    )


# -- AT-23: flapping -----------------------------------------------------------------------------

FLAP_POLICY = policy_toml(switching={"max_switches_per_min": 4})
"""Default policy except a cap of 4 switches per minute (default 8): each flap cycle takes
~1.5 s (death detection + standby re-probe), so the default cap would double the runtime
without exercising anything else."""


def _flap_until_denied(t: RealTunnel, cap: int) -> tuple[dict[str, Any], int, int, int]:
    """Kill the active path, revive it once the client switched away, and again, until a
    switch is denied: (the denial, the event mark of its cycle, active, other path)."""
    active, other = 0, 1
    for cycle in range(cap + 2):
        mark = t.events.mark()
        t.topo.link_down(active)
        # (a NO_VALID_CANDIDATE denial may come first: see test_at10's note on standby
        # probing; what ends a cycle is the switch or the rate-limit denial)
        outcome = t.events.wait_for(
            lambda e: (
                e.get("event_type") == "TRANSPORT_SWITCH"
                or e.get("reason_code") == "switch_rate_limited"
            ),
            15,
            since=mark,
            what=f"switch or rate-limit denial in cycle {cycle}",
        )
        if outcome["event_type"] != "TRANSPORT_SWITCH":
            return outcome, mark, active, other
        assert outcome["new_transport"] == other + 1
        # bring the dead path back and wait until the client sees it alive as a standby
        t.topo.link_up(active)
        t.events.wait_type("PATH_HEALTH", 15, since=mark, transport_id=active + 1, alive=True)
        active, other = other, active
    raise AssertionError("the switch cap never applied")


def test_at23_flapping_paths_are_capped_and_degrade_without_a_storm(realnet) -> None:  # noqa: F811
    t: RealTunnel = realnet(policy=FLAP_POLICY)
    sid = _session_id(t)
    _wait_standby_alive(t)
    cap = 4
    denied, mark, active, other = _flap_until_denied(t, cap)
    assert denied["event_type"] == "TRANSPORT_SWITCH_DENIED"
    assert denied["requested_transport"] == other + 1 and denied["manual"] is False
    assert len(t.switches()) == cap
    t.events.wait_type("STATE_CHANGE", 5, since=mark, new_state="DEGRADED")
    storm_mark = t.events.mark()
    _observe(t, 10)  # both ends of the flap sit still: no further switch or denial storm
    assert t.switches(storm_mark) == []
    assert len(t.events.of_type("TRANSPORT_SWITCH_DENIED", mark)) <= 3
    assert len(t.events.of_type("REATTACH_ATTEMPT", mark)) <= 8
    assert not _terminal(t) and t.session_ids() == {sid}

    # not stuck: when the path that died comes back the session resumes on it
    t.topo.link_up(active)
    t.events.wait_type("STATE_CHANGE", 15, since=mark, new_state="ATTACHED")
    moves = [e for e in t.switches() if e["previous_transport"] != e["new_transport"]]
    assert len(moves) == cap  # re-attaching the path that died is not a switch
    assert t.udp_echo(count=10) == [CLIENT_INNER] * 10
    print(
        f"\nAT-23 flapping: {cap} switches then {denied['reason_code']} "
        f"(retry_after_ms {denied['retry_after_ms']}); states after the cap: {t.states(mark)}"
    )


# -- AT-17 / AT-11: every path dead ---------------------------------------------------------------

TTL_POLICY = policy_toml(
    session={"transport_lost_ttl_ms": 3_000},
    switching={"recovery_window_ms": 1_500, "on_recovery_timeout": "degrade"},
)
"""Short timers (3 s TTL instead of 15 s) so the TTL case costs seconds, not a quarter
minute; the recovery window then degrades instead of terminating, so the TTL decides."""


@pytest.mark.parametrize(
    ("policy", "reason", "bound_s"),
    [
        (None, "recovery_window_exceeded", 8.0),  # default policy: window 8 s, "terminate"
        (TTL_POLICY, "transport_ttl_exceeded", 3.0),
    ],
    ids=["default-recovery-window", "transport-ttl"],
)
def test_at17_all_paths_dead_terminates_after_the_bound_and_restores_the_host(
    realnet,  # noqa: F811
    policy: str | None,
    reason: str,
    bound_s: float,
) -> None:
    t: RealTunnel = realnet(policy=policy)
    sid = _session_id(t)
    mark = t.events.mark()
    # standbys first, the active path (A) last: the link monitor reports each link at once,
    # so killing A first could let the session move to B before B's link goes too
    for i in reversed(range(t.n_paths)):
        t.topo.link_down(i)
    killed = time.monotonic()

    code = t.client.wait(bound_s + 20)
    elapsed = time.monotonic() - killed
    t.events.join(5)
    assert code == EXIT_CODES[reason]
    final = t.final(5)
    assert final["final_reason"] == reason and final["exit_code"] == code
    assert final["session_id"] == sid

    dead = t.events.of_type("TRANSPORT_DEAD", mark)
    assert [e["transport_id"] for e in dead] == [A]
    assert t.states(mark)[0] == "RECOVERING"
    terminated = t.events.of_type("STATE_CHANGE", mark, new_state="TERMINATED")
    assert len(terminated) == 1 and terminated[0]["reason_code"] == reason
    attempts = t.events.of_type("REATTACH_ATTEMPT", mark)
    assert len(attempts) <= t.n_paths * 4  # bounded, not a retry storm
    denials = t.events.of_type("TRANSPORT_SWITCH_DENIED", mark)
    assert 1 <= len(denials) <= 3  # "no valid candidate" said, not repeated every tick
    # the session lived at least the bound after the death (its clock, not ours)
    assert terminated[0]["ts_ms"] - dead[0]["ts_ms"] >= bound_s * 1000 - 50
    assert not t.client_tun_exists()  # host restored: the TUN is gone
    print(
        f"\nAT-17 all paths dead ({reason}): {len(attempts)} reattach attempts, "
        f"denials {[d['reason_code'] for d in denials]}, states "
        f"{t.states(mark)}, exit {code} after {elapsed:.1f}s"
    )


# -- AT-30: replay from elsewhere --------------------------------------------------------------


def _assert_binding_and_state_unmoved(
    t: RealTunnel, sid: str, metrics: tuple[dict[str, float], dict[str, float]],
    marks: tuple[int, int],
) -> None:  # fmt: skip
    """Between the two metric readings and since the (gateway, client) event marks: no
    switch, no new session, no state change or binding change on either side."""
    m0, m1 = metrics
    gw_mark, mark = marks
    for name in ("jvpn_gateway_switches_total", "jvpn_gateway_sessions_created_total"):
        before = {k: v for k, v in m0.items() if k.startswith(name)}
        assert {k: v for k, v in m1.items() if k.startswith(name)} == before
    assert _metric(m1, 'jvpn_gateway_sessions{state="ATTACHED"}') == 1
    assert t.gw_events is not None
    for kind in ("STATE_CHANGE", "TRANSPORT_SWITCH", "PATH_VALIDATED", "TRANSPORT_ATTACHED"):
        assert t.gw_events.of_type(kind, gw_mark) == [], kind
    assert t.states(mark) == []
    assert t.switches(mark) == []
    assert not _terminal(t)
    assert t.session_ids() == {sid}


def test_at30_datagrams_replayed_from_another_address_are_rejected_and_counted(
    realnet,  # noqa: F811
) -> None:
    t: RealTunnel = realnet()
    sid = _session_id(t)
    stream = t.start_udp_stream()
    link_a, link_b = t.topo.paths[0], t.topo.paths[1]
    with Capture(t.topo.gateway_ns, link_a.gateway_ifname, GATEWAY_PORT) as cap:
        wait_until(lambda: len(cap.packets) >= 40, 10, "captured datagrams on path A")
    captured = [p for p in cap.packets if p.payload[0] in (MSG_DATA, MSG_CONTROL)]
    assert sum(p.payload[0] == MSG_DATA for p in captured) >= 10

    m0 = t.metrics()
    gw_mark, mark = t.gw_events.mark(), t.events.mark()
    with ns_socket(t.topo.client_ns) as sock:  # another address: path B's client side
        sock.bind((link_b.client_ip, 0))
        source = sock.getsockname()
        for p in captured:
            sock.sendto(p.payload, (link_b.gateway_ip, GATEWAY_PORT))
    key = "jvpn_gateway_replay_drops_total"
    wait_until(
        lambda: _metric(t.metrics(), key) >= _metric(m0, key) + len(captured), 5, "replay drops"
    )
    event = t.gw_events.wait_type(
        "SECURITY_EVENT", 5, since=gw_mark, violation_type="REPLAY_DETECTED"
    )
    assert event["reason_code"] == "replay_detected" and event["session_id"] == sid
    assert event["source"] == f"{source[0]}:{source[1]}"
    _observe(t, 5)
    m1 = t.metrics()

    # rejected and counted; nothing about the binding or the state moved
    assert _metric(m1, key) - _metric(m0, key) == len(captured)
    _assert_binding_and_state_unmoved(t, sid, (m0, m1), (gw_mark, mark))
    out = stop_stream(stream)
    assert out["replies_last_s"] > 0, out  # the real traffic never noticed
    print(
        f"\nAT-30 replay: {len(captured)} captured datagrams re-sent from "
        f"{source[0]}:{source[1]} -> replay drops +{_metric(m1, key) - _metric(m0, key):.0f}; "
        f"stream {out['received']}/{out['sent']} echoed"
    )
