"""The kernel's word on a path (issue 10 item 3), in the core: ``ClientSession.path_down``
and ``path_up`` with a fake clock, a real client and gateway over memory links.

The policy's ``dead_min_ms`` is 5 s, so a silent death cannot be declared within the
windows these tests use: a death inside them can only come from ``path_down``. The
control test shows that the same kill, unreported, is not seen inside the window.
"""

from __future__ import annotations

import pytest
from simkit import build, make_policy, of_type, state_changes

from tunnel.core.client import PathSpec
from tunnel.core.events import EventType, Reason
from tunnel.io.memory import Simulation

SLOW_DEATH = make_policy(dead_min_ms=5_000)
"""Silence must last 5 s before a path is declared dead."""

WINDOW_S = 1.0
"""Far shorter than dead_min_ms: a death inside it is the kernel's word, not silence."""

DETAIL = "jvc0: link down (RTM_NEWLINK jvc0 down, no carrier)"


def _attached_with_standby() -> Simulation:
    sim = build(policy=SLOW_DEATH)
    sim.advance(2.0)  # attached on 1; 2 answered its probes: a validated standby
    snap = sim.client.snapshot(sim.now)
    assert (snap.state, snap.active) == ("ATTACHED", 1)
    assert [p.role for p in snap.paths] == ["active", "standby"]
    return sim


def _roles(sim: Simulation) -> list[str]:
    return [p.role for p in sim.client.snapshot(sim.now).paths]


def test_a_silent_kill_is_not_seen_inside_the_window() -> None:
    """Control: without the kernel's word, the death waits for dead_min_ms."""
    sim = _attached_with_standby()
    mark = len(sim.client_events)
    sim.links[1].imp.up = False
    sim.advance(WINDOW_S)
    assert of_type(sim.client_events[mark:], EventType.TRANSPORT_DEAD) == []
    assert sim.client.snapshot(sim.now).active == 1


def test_link_down_of_the_active_path_recovers_at_once_with_its_reason() -> None:
    sim = _attached_with_standby()
    sid = sim.client.machine.session_id
    budget = sim.client.snapshot(sim.now).switch_budget_left
    mark = len(sim.client_events)
    sim.links[1].imp.up = False
    sim.client.path_down(1, DETAIL, sim.now)
    sim.advance(WINDOW_S)

    ev = sim.client_events[mark:]
    (dead,) = of_type(ev, EventType.TRANSPORT_DEAD)
    assert (dead.transport_id, dead.reason_code, dead.detail) == (1, Reason.LINK_DOWN, DETAIL)
    assert [(a, b, r) for a, b, r, _ in state_changes(ev)] == [
        ("ATTACHED", "RECOVERING", "link_down"),
        ("RECOVERING", "ATTACHED", "reattach_success"),
    ]
    into = of_type(ev, EventType.STATE_CHANGE)[0]
    assert into.from_transport == 1 and into.candidate_set_size == 1
    (attempt,) = of_type(ev, EventType.REATTACH_ATTEMPT)
    assert (attempt.candidate_transport, attempt.kind) == (2, "recovery")
    (switch,) = of_type(ev, EventType.TRANSPORT_SWITCH)
    assert (switch.previous_transport, switch.new_transport) == (1, 2)
    snap = sim.client.snapshot(sim.now)
    assert (snap.session_id, snap.state, snap.active, snap.total_switches) == (
        sid, "ATTACHED", 2, 1,
    )  # fmt: skip
    assert snap.switch_budget_left == budget - 1  # the limiter counted it like any switch
    assert _roles(sim) == ["down", "active"]
    assert of_type(sim.client_events, EventType.SESSION_TERMINATED) == []


def test_link_down_goes_through_the_same_death_handling_as_silence() -> None:
    """Same transitions (edges, triggers, versions, from/candidates), same attempt, result
    and switch as a silent death (here with the default dead_min_ms, so that silence is
    declared before the path looks merely lossy): only the reason, the detail and the
    times differ."""
    keep = (
        EventType.STATE_CHANGE, EventType.TRANSPORT_DEAD, EventType.REATTACH_ATTEMPT,
        EventType.REATTACH_RESULT, EventType.TRANSPORT_SWITCH,
    )  # fmt: skip
    varying = (
        "ts_ms", "session_id", "policy_version", "reason_code", "silence_ms", "detail",
        "switch_latency_ms", "loss_ratio", "latency_estimate_ms", "recovery_deadline_ms",
    )  # fmt: skip

    def run(kernel: bool) -> list[dict[str, object]]:
        sim = build(policy=SLOW_DEATH if kernel else make_policy())
        sim.advance(2.0)
        mark = len(sim.client_events)
        sim.links[1].imp.up = False
        if kernel:
            sim.client.path_down(1, DETAIL, sim.now)
        sim.advance(3.0)
        out = []
        for e in sim.client_events[mark:]:
            if e.event_type in keep:
                out.append({k: v for k, v in e.to_dict().items() if k not in varying})
        return out

    kernel, silent = run(kernel=True), run(kernel=False)
    assert [e["event_type"] for e in silent] == [
        "TRANSPORT_DEAD", "STATE_CHANGE", "REATTACH_ATTEMPT", "STATE_CHANGE",
        "TRANSPORT_SWITCH", "REATTACH_RESULT",
    ]  # fmt: skip
    assert kernel == silent


def test_link_down_under_an_exhausted_switch_budget_is_limited_like_a_silent_death() -> None:
    sim = build(policy=make_policy(dead_min_ms=5_000, max_switches_per_min=1))
    sim.advance(2.0)
    assert sim.client.switch_to(2, sim.now) is None  # spends the one switch of the minute
    sim.advance(1.0)
    assert sim.client.snapshot(sim.now).active == 2
    mark = len(sim.client_events)
    sim.links[2].imp.up = False
    sim.client.path_down(2, "jvc1: link down", sim.now)
    sim.advance(WINDOW_S)
    ev = sim.client_events[mark:]
    denied = of_type(ev, EventType.TRANSPORT_SWITCH_DENIED)
    assert [d.reason_code for d in denied] == [Reason.SWITCH_RATE_LIMITED]
    assert [(a, b, r) for a, b, r, _ in state_changes(ev)] == [
        ("ATTACHED", "RECOVERING", "link_down"),
        ("RECOVERING", "DEGRADED", "switch_rate_limited"),
    ]
    assert of_type(ev, EventType.TRANSPORT_SWITCH) == []


def test_link_up_probes_at_once_and_the_path_is_standby_once_it_answers() -> None:
    sim = _attached_with_standby()
    sim.links[1].imp.up = False
    sim.client.path_down(1, DETAIL, sim.now)
    sim.advance(WINDOW_S)
    assert _roles(sim) == ["down", "active"]

    sim.links[1].imp.up = True
    sim.advance(3.0)  # the link works again, but the kernel has not said so: still down
    assert _roles(sim) == ["down", "active"]

    mark = len(sim.client_events)
    sim.client.path_up(1, "jvc0: link up", sim.now)
    deadline = sim.client.next_deadline()
    assert deadline is not None and deadline <= sim.now  # the probe is due at once
    sim.advance(0.2)  # well inside the standby probe interval (1 s): the at-once probe
    ev = sim.client_events[mark:]
    (note,) = of_type(ev, EventType.DIAGNOSTIC)
    assert (note.reason_code, note.detail) == (Reason.LINK_UP, "path 1: jvc0: link up")
    assert _roles(sim) == ["standby", "active"]
    health = [e for e in of_type(ev, EventType.PATH_HEALTH) if e.transport_id == 1]
    assert [h.alive for h in health] == [True]
    assert of_type(ev, EventType.STATE_CHANGE) == []  # the session stays where it is


def test_a_path_brought_back_is_no_candidate_until_it_answers_again() -> None:
    """Its answers from before the link went down do not count after it came back."""
    sim = _attached_with_standby()
    sim.links[2].imp.up = False  # the standby's link is really gone ...
    sim.client.path_down(2, "jvc1: link down", sim.now)
    sim.client.path_up(2, "jvc1: link up", sim.now + 0.01)  # ... the kernel says it is back
    sim.advance(0.5)
    assert _roles(sim) == ["active", "down"]
    assert sim.client.switch_to(2, sim.now) is Reason.NO_VALID_CANDIDATE
    sim.links[2].imp.up = True
    sim.advance(1.5)
    assert _roles(sim) == ["active", "standby"]


def test_link_down_of_a_standby_path_makes_it_no_candidate() -> None:
    sim = _attached_with_standby()
    mark = len(sim.client_events)
    sim.client.path_down(2, "jvc1: carrier lost", sim.now)  # its link (memory) still works
    sim.advance(WINDOW_S)
    ev = sim.client_events[mark:]
    (note,) = of_type(ev, EventType.DIAGNOSTIC)  # not a TRANSPORT_DEAD: that is the active's
    assert (note.reason_code, note.detail) == (Reason.LINK_DOWN, "path 2: jvc1: carrier lost")
    assert of_type(ev, EventType.TRANSPORT_DEAD) == []
    health = [e for e in of_type(ev, EventType.PATH_HEALTH) if e.transport_id == 2]
    assert [h.alive for h in health] == [False]
    assert of_type(ev, EventType.STATE_CHANGE) == []  # the active path is untouched
    assert _roles(sim) == ["active", "down"]
    assert sim.client.switch_to(2, sim.now) is Reason.NO_VALID_CANDIDATE

    # the active path dies too: nothing to move to (the standby's answers do not count)
    sim.links[1].imp.up = False
    sim.client.path_down(1, DETAIL, sim.now)
    sim.advance(WINDOW_S)
    denied = of_type(sim.client_events[mark:], EventType.TRANSPORT_SWITCH_DENIED)
    assert [(d.reason_code, d.requested_transport) for d in denied][-1] == (
        Reason.NO_VALID_CANDIDATE, None,
    )  # fmt: skip
    assert of_type(sim.client_events[mark:], EventType.TRANSPORT_SWITCH) == []


def test_repeated_reports_change_nothing_and_unknown_paths_are_refused() -> None:
    sim = _attached_with_standby()
    mark = len(sim.client_events)
    sim.client.path_up(2, "lo: up", sim.now)  # not down: nothing to say
    sim.client.path_down(2, "jvc1: link down", sim.now)
    sim.client.path_down(2, "jvc1: link down", sim.now)
    sim.advance(0.1)
    ev = sim.client_events[mark:]
    notes = of_type(ev, EventType.DIAGNOSTIC)
    assert [n.reason_code for n in notes] == [Reason.LINK_DOWN]  # once; the up said nothing
    with pytest.raises(ValueError):
        sim.client.path_down(7, "x", sim.now)
    with pytest.raises(ValueError):
        sim.client.path_up(7, "x", sim.now)


def test_reports_after_the_end_change_nothing() -> None:
    sim = _attached_with_standby()
    sim.client.terminate(sim.now)
    sim.advance(0.1)
    mark = len(sim.client_events)
    sim.client.path_down(1, DETAIL, sim.now)
    sim.client.path_up(1, "jvc0: link up", sim.now)
    sim.advance(0.1)
    assert sim.client_events[mark:] == []


# -- paths that come and go (issue 10 item 4) ------------------------------------------------


def test_an_added_path_is_probed_at_once_and_becomes_a_validated_standby() -> None:
    sim = build(n_paths=3, policy=SLOW_DEATH, start=False)
    sim.client.remove_path(3, "wlan0: address 192.0.2.7 gone", sim.now)  # not there at start
    sim.start()
    sim.advance(2.0)
    assert [p.stats.path_id for p in sim.client.snapshot(sim.now).paths] == [1, 2]

    mark = len(sim.client_events)
    sim.client.add_path(PathSpec(3, "wlan0"), sim.now, interface="wlan0", address="192.0.2.7")
    sim.advance(0.3)  # inside the standby probe interval: the at-once probe
    ev = sim.client_events[mark:]
    (added,) = of_type(ev, EventType.PATH_ADDED)
    assert (added.transport_id, added.path, added.interface, added.address) == (
        3, "wlan0", "wlan0", "192.0.2.7",
    )  # fmt: skip
    assert [v.transport_id for v in of_type(ev, EventType.PATH_VALIDATED)] == [3]
    assert _roles(sim) == ["active", "standby", "standby"]
    assert sim.client.switch_to(3, sim.now) is None  # a candidate like any other


def test_removing_the_active_path_moves_the_session_and_hides_the_path() -> None:
    sim = _attached_with_standby()
    mark = len(sim.client_events)
    sim.links[1].imp.up = False
    sim.client.remove_path(1, "address 10.200.0.1 gone", sim.now)
    sim.advance(WINDOW_S)
    ev = sim.client_events[mark:]
    kinds = [e.event_type for e in ev]
    assert kinds.index(EventType.TRANSPORT_DEAD) < kinds.index(EventType.PATH_REMOVED)
    (removed,) = of_type(ev, EventType.PATH_REMOVED)
    assert (removed.transport_id, removed.detail) == (1, "address 10.200.0.1 gone")
    (switch,) = of_type(ev, EventType.TRANSPORT_SWITCH)
    assert (switch.previous_transport, switch.new_transport) == (1, 2)
    snap = sim.client.snapshot(sim.now)
    assert [p.stats.path_id for p in snap.paths] == [2]
    assert sim.client.switch_to(1, sim.now) is Reason.NO_VALID_CANDIDATE
    sim.client.path_up(1, "eth0: usable again", sim.now)  # a removed path stays removed
    sim.advance(0.5)
    assert [p.stats.path_id for p in sim.client.snapshot(sim.now).paths] == [2]

    # it comes back under its own number, and is a standby once it answers
    sim.links[1].imp.up = True
    sim.client.add_path(PathSpec(1, "path1"), sim.now, interface="eth0", address="10.200.0.1")
    sim.advance(0.5)
    assert _roles(sim) == ["standby", "active"]
    with pytest.raises(ValueError):
        sim.client.add_path(PathSpec(1, "path1"), sim.now)  # already a candidate


def test_no_more_candidates_than_the_policy_allows() -> None:
    sim = build(n_paths=2, policy=make_policy(dead_min_ms=5_000, max_candidate_count=2))
    sim.advance(1.0)
    with pytest.raises(ValueError):
        sim.client.add_path(PathSpec(3, "path3"), sim.now)
    sim.client.remove_path(2, "gone", sim.now)
    sim.links[3] = sim.links[2]  # path 3 travels the link path 2 had
    sim.client.add_path(PathSpec(3, "path3"), sim.now)
    sim.advance(0.5)
    assert [p.stats.path_id for p in sim.client.snapshot(sim.now).paths] == [1, 3]
