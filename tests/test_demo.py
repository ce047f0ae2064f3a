"""The demo's scripted timeline (issue 4; in the spirit of SPEC-DIGEST AT-22).

``jvpn-tui --demo --headless`` plays DEMO_SCRIPT from the start: within ~20 s a new user
sees a loss-driven switch, a recovery after a path death and a rejected replay, all on
one session. The core regression behind the switch (standby paths scored 0.0 between
their slow probes, so VOLATILE never found a better candidate) is checked at core level.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from simkit import build, of_type

from tunnel.core.events import EventType, Reason
from tunnel.demo.commands import Caption, ScriptStatus, caption_of
from tunnel.demo.scenario import DEMO_SCRIPT, SCRIPT_LENGTH_S
from tunnel.demo.script import STEP_RETRY_S, STEP_WAIT_LIMIT_S, ScriptPlayer, ScriptStep

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: float) -> tuple[int, list[dict[str, Any]]]:
    proc = subprocess.run(
        [sys.executable, "-m", "jvpn_tui", *args], cwd=ROOT, capture_output=True,
        text=True, timeout=timeout, check=False,
    )  # fmt: skip
    events = [json.loads(line) for line in proc.stdout.splitlines()]  # every line is JSON
    return proc.returncode, events


def test_at22_headless_demo_plays_switch_recovery_and_rejected_replay_on_one_session() -> None:
    duration = math.ceil(SCRIPT_LENGTH_S) + 1  # the script's end is said, then terminate
    code, events = run_cli("--demo", "--headless", "--duration", str(duration), timeout=90)
    assert code == 0
    last = events[-1]
    assert last["event_type"] == "ENGINE_STOPPED"
    assert (last["final_reason"], last["exit_code"]) == ("operator_terminated", 0)
    kinds = [e["event_type"] for e in events]

    # every step announced, in order, as a "demo:" DIAGNOSTIC
    diagnostics = [e["detail"] for e in events if e["event_type"] == "DIAGNOSTIC"]
    steps = [d for d in diagnostics if d.startswith("demo: step")]
    total = len(DEMO_SCRIPT.steps)
    assert [s.split(":")[1].strip() for s in steps] == [
        f"step {n}/{total} at {step.at_s:g} s" for n, step in enumerate(DEMO_SCRIPT.steps, 1)
    ]
    # each says what it does and what to expect; the script says when it started and ended
    for announced, step in zip(steps, DEMO_SCRIPT.steps, strict=True):
        assert announced.endswith(f"— expect {step.expect}"), announced
    assert diagnostics[0].startswith(f"demo: script playing: started: {total} steps")
    assert "demo: script finished: all 4 steps ran, the paths settled" in diagnostics

    # 1. loss on the active path -> VOLATILE -> an automatic switch away from it
    loss_at = kinds.index("DIAGNOSTIC", next(i for i, e in enumerate(events)
                                              if e.get("detail", "").startswith("demo: step 1")))
    volatile = next(i for i, e in enumerate(events) if i > loss_at
                    and e["event_type"] == "STATE_CHANGE" and e["new_state"] == "VOLATILE")
    switch = next(e for e in events[volatile:] if e["event_type"] == "TRANSPORT_SWITCH")
    assert switch["reason_code"] in ("loss_recovery", "latency_recovery")
    assert switch["previous_transport"] != switch["new_transport"]

    # 2. the active path dies -> TRANSPORT_DEAD -> recovery (REATTACH_RESULT SUCCESS)
    dead = kinds.index("TRANSPORT_DEAD")
    assert dead > volatile
    recovered = [e for e in events[dead:] if e["event_type"] == "REATTACH_RESULT"
                 and e["status"] == "SUCCESS"]  # fmt: skip
    assert recovered
    assert recovered[0]["candidate_transport"] != events[dead]["transport_id"]

    # 3. the replay is rejected by the gateway (its SECURITY_EVENT is forwarded)
    security = [e for e in events if e["event_type"] == "SECURITY_EVENT"]
    assert any(e["reason_code"] == "replay_detected" and e["node_id"] == "demo-gateway"
               for e in security)  # fmt: skip

    # 4. restored: every path says so; the session never changed and never ended early
    assert [d for d in diagnostics if "restored" in d] == [
        "demo: every path restored (no impairment left)"
    ]
    assert {e["session_id"] for e in events if e.get("session_id")} == {last["session_id"]}
    assert kinds.count("SESSION_TERMINATED") == 1
    terminated = events[kinds.index("SESSION_TERMINATED")]
    assert terminated["reason_code"] == "operator_terminated"
    assert last["traffic"]["rx_packets"] > 0


def test_duration_shorter_than_the_script_just_stops_early() -> None:
    code, events = run_cli("--demo", "--headless", "--duration", "2", timeout=60)
    assert code == 0
    details = [e.get("detail", "") for e in events if e["event_type"] == "DIAGNOSTIC"]
    assert any(d.startswith("demo: script playing: started") for d in details)
    assert not any(d.startswith("demo: step") for d in details)  # step 1 is at 3 s
    assert events[-1]["event_type"] == "ENGINE_STOPPED" and events[-1]["exit_code"] == 0


def test_standby_paths_are_live_and_scored_between_their_slow_probes() -> None:
    """Core regression (default policy): a standby path probed every second used to score
    0.0 and show alive=False most of the time, so a lossy active path never switched."""
    sim = build(n_paths=2)
    sim.advance(3.0)
    for _ in range(20):  # sample across several standby probe intervals
        sim.advance(0.07)
        standby = sim.client.snapshot(sim.now).paths[1]
        assert standby.role == "standby"
        assert standby.stats.alive and standby.stats.score > 0, standby.stats

    sim.links[1].imp.loss_up = sim.links[1].imp.loss_down = 0.3
    sim.advance(8.0)
    switches = of_type(sim.client_events, EventType.TRANSPORT_SWITCH)
    assert switches, "a lossy active path with a clean standby never switched"
    assert (switches[0].previous_transport, switches[0].new_transport) == (1, 2)
    assert switches[0].reason_code == Reason.LOSS_RECOVERY


# -- the script player: plays on start, pauses, resumes, replays ---------------------------


class Timer:
    """A timer of :class:`ManualLoop` (what ScriptPlayer keeps: it can be cancelled)."""

    def __init__(self, when: float, callback: Callable[..., object], args: tuple[Any, ...]):
        self.when, self.callback, self.args = when, callback, args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualLoop:
    """What ScriptPlayer uses of an event loop (``call_later``), on a hand-stepped clock."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[Timer] = []

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> Timer:
        timer = Timer(self.now + delay, callback, args)
        self.timers.append(timer)
        return timer

    def advance(self, seconds: float) -> None:
        """Run the timers due up to ``now + seconds``, in time order (then in the order
        they were set)."""
        end = self.now + seconds
        while due := [t for t in self.timers if t.when <= end and not t.cancelled]:
            first = min(due, key=lambda t: t.when)
            self.timers.remove(first)
            self.now = first.when
            first.callback(*first.args)
        self.now = end


def test_the_script_pauses_resumes_and_replays_in_script_time() -> None:
    loop = ManualLoop()
    said: list[str] = []
    player = ScriptPlayer(DEMO_SCRIPT, loop, lambda: loop.now,  # type: ignore[arg-type]
                          run_step=lambda n, step, last: not said.append(f"step {n}"),
                          say=said.append)  # fmt: skip
    player.toggle()  # never played: the play key plays it from the start
    assert said == ["demo: script playing: started: 4 steps in 18 s; next: step 1/4 at 3 s: "
                    "30% loss both ways on the active path"]  # fmt: skip
    loop.advance(5.0)
    assert said[1:] == ["step 1"]
    player.toggle()  # pause at 5 s: nothing runs while paused, however long
    assert said[-1] == ("demo: script paused: at 5.0 s; next: step 2/4 at 8 s: "
                        "blackhole the active path")  # fmt: skip
    loop.advance(60.0)
    assert said[2:] == [said[-1]]
    player.toggle()  # resume: step 2 is due 3 s of playing later
    assert said[-1].startswith("demo: script playing: resumed at 5.0 s; next: step 2/4")
    loop.advance(2.9)
    assert "step 2" not in said
    loop.advance(0.2)
    assert said[-1] == "step 2"
    loop.advance(10.0)  # script time 18.1 s: every step ran, then the end is said
    assert [s for s in said if s.startswith("step")] == ["step 1", "step 2", "step 3", "step 4"]
    assert said[-1] == "demo: script finished: all 4 steps ran, the paths settled"
    assert caption_of(said[-1]) == Caption(ScriptStatus.FINISHED,
                                           "all 4 steps ran, the paths settled")  # fmt: skip
    player.toggle()  # finished: the play key plays it again from the start
    assert said[-1].startswith("demo: script playing: again from the start")
    loop.advance(3.0)
    assert said[-1] == "step 1"


def test_a_step_with_no_active_path_waits_for_one_and_the_script_time_stands_still() -> None:
    """A step that acts on the active path finds none while the previous step's recovery
    is still under way (a loaded machine): it waits, saying so once, and runs when a path
    is active; the later steps keep their distance to it. A step that waits past the
    limit gets its last try (its owner skips it, saying so) and the script goes on."""
    loop = ManualLoop()
    said: list[str] = []
    ready_at = 4.0  # engine time at which step 1 finds an active path
    tries: list[tuple[int, float, bool]] = []

    def run_step(n: int, step: ScriptStep, last: bool) -> bool:
        tries.append((n, loop.now, last))
        if n == 1 and loop.now < ready_at:
            return False
        said.append(f"step {n}")
        return True

    player = ScriptPlayer(DEMO_SCRIPT, loop, lambda: loop.now,  # type: ignore[arg-type]
                          run_step=run_step, say=said.append)  # fmt: skip
    player.play()
    loop.advance(3.5)  # step 1 is due at 3 s: no active path yet
    waiting = [s for s in said if "waiting: step 1/4 needs an active path" in s]
    assert len(waiting) == 1 and "step 1" not in said
    assert caption_of(waiting[0]) is not None
    loop.advance(0.6)  # a path is active from 4 s: step 1 runs at its next try
    assert said[-1] == "step 1" and len(waiting) == 1
    ran_at = [t for n, t, _ in tries if n == 1][-1]
    assert ready_at <= ran_at <= ready_at + STEP_RETRY_S
    gap = DEMO_SCRIPT.steps[1].at_s - DEMO_SCRIPT.steps[0].at_s
    loop.advance(ran_at + gap - 0.1 - loop.now)
    assert "step 2" not in said  # step 2 keeps its 5 s distance to step 1
    loop.advance(0.2)
    assert said[-1] == "step 2"
    assert all(not last for _, _, last in tries)

    # a step that never finds a path: its last try comes after the limit, then the rest
    tries.clear()
    ready_at = float("inf")
    player.play()
    loop.advance(3.0 + STEP_WAIT_LIMIT_S + 1.0)
    ones = [(t, last) for n, t, last in tries if n == 1]
    assert [last for _, last in ones].count(True) == 1 and ones[-1][1] is True
    assert ones[-1][0] - ones[0][0] >= STEP_WAIT_LIMIT_S - 1e-6
    loop.advance(DEMO_SCRIPT.end_s)
    assert [n for n, _, _ in tries if n > 1] == [2, 3, 4]
    assert said[-1] == "demo: script finished: all 4 steps ran, the paths settled"


# -- demo step 2: only the path that died shows down ---------------------------------------


def test_when_the_active_path_dies_only_that_path_shows_down() -> None:
    """Issue 13: in demo step 2 (the active path blackholed) every path showed ``down``.
    The standby paths, probed once a second, were judged by the active path's rule (dead
    after 300 ms of silence) as soon as no path was active, so the death of one path made
    all of them look dead, and recovery first said no_valid_candidate. Now the death of
    the active path says nothing about the others, and the one that died stays down until
    it answers again."""
    for seed in range(1, 6):
        sim = build(n_paths=3, seed=seed)
        sim.advance(3.0)
        dead = sim.client.snapshot(sim.now).active
        assert dead is not None
        sim.links[dead].imp.up = False
        seen: list[dict[int, str]] = []
        for _ in range(300):  # 3 s, every 10 ms
            sim.advance(0.01)
            roles = {p.stats.path_id: p.role for p in sim.client.snapshot(sim.now).paths}
            seen.append(roles)
            assert all(r in ("active", "standby", "switching") for p, r in roles.items()
                       if p != dead), (seed, roles)  # fmt: skip
        assert seen[-1][dead] == "down"
        after = seen[[r[dead] for r in seen].index("down"):]
        assert all(r[dead] == "down" for r in after), (seed, [r[dead] for r in after])
        events = sim.client_events
        assert of_type(events, EventType.TRANSPORT_DEAD)
        assert not of_type(events, EventType.TRANSPORT_SWITCH_DENIED)
        assert sim.client.snapshot(sim.now).active not in (None, dead)
