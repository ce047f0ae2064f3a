"""tunnel.core.selection: switch cap, cooldown, hysteresis with dwell, tie-breaks."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel.core.events import Reason
from tunnel.core.selection import Selector, SwitchLimiter, best_candidate

# -- SwitchLimiter ------------------------------------------------------------------------


def test_at24_switch_cap() -> None:
    lim = SwitchLimiter(max_per_min=5, cooldown_ms=0)
    for i in range(5):
        assert lim.check(float(i)) is None
        lim.record(float(i))
    assert lim.budget_left(4.0) == 0
    assert lim.check(5.0) is Reason.SWITCH_RATE_LIMITED
    assert lim.check(59.999) is Reason.SWITCH_RATE_LIMITED
    assert lim.check(30.0, manual=True) is Reason.SWITCH_RATE_LIMITED  # the cap binds manual too
    assert lim.next_change(5.0) == pytest.approx(60.0)
    assert lim.check(60.0) is None  # the switch at t=0 aged out
    assert lim.budget_left(60.0) == 1
    lim.record(60.0)
    assert lim.check(60.5) is Reason.SWITCH_RATE_LIMITED
    assert lim.check(61.0) is None


def test_at25_cooldown() -> None:
    lim = SwitchLimiter(max_per_min=8, cooldown_ms=1500)
    assert lim.cooldown_remaining_ms(0.0) == 0.0
    lim.record(10.0)
    assert lim.check(11.0) is Reason.COOLDOWN_ACTIVE
    assert lim.cooldown_remaining_ms(11.0) == pytest.approx(500.0)
    assert lim.next_change(11.0) == pytest.approx(11.5)
    assert lim.check(11.0, manual=True) is None  # manual: exempt from the cooldown
    assert lim.check(11.5) is None
    lim.record(11.5)
    assert lim.budget_left(11.5) == 6  # every switch is counted


def test_at25_manual_exempt_from_cooldown_but_not_from_the_cap() -> None:
    lim = SwitchLimiter(max_per_min=2, cooldown_ms=1500)
    lim.record(0.0)
    assert lim.check(0.1) is Reason.COOLDOWN_ACTIVE
    assert lim.check(0.1, manual=True) is None
    lim.record(0.1)
    # both limits hold now: the cap is reported first
    assert lim.check(0.2) is Reason.SWITCH_RATE_LIMITED
    assert lim.check(0.2, manual=True) is Reason.SWITCH_RATE_LIMITED
    assert lim.check(60.0, manual=True) is None


def test_next_change_tracks_budget_and_cooldown_then_none() -> None:
    lim = SwitchLimiter(max_per_min=3, cooldown_ms=1000)
    assert lim.next_change(0.0) is None
    lim.record(0.0)
    lim.record(2.0)
    assert lim.next_change(2.0) == pytest.approx(3.0)  # cooldown ends
    assert lim.next_change(3.0) == pytest.approx(60.0)  # first switch ages out
    assert lim.next_change(60.0) == pytest.approx(62.0)
    assert lim.next_change(62.0) is None
    assert lim.budget_left(62.0) == 3


def test_reconfigure_keeps_history() -> None:
    lim = SwitchLimiter(max_per_min=8, cooldown_ms=0)
    for t in (0.0, 1.0, 2.0, 3.0):
        lim.record(t)
    lim.reconfigure(max_per_min=3, cooldown_ms=5000)
    assert lim.check(4.0, manual=True) is Reason.SWITCH_RATE_LIMITED
    assert lim.budget_left(61.5) == 1  # only the switch at 2.0 and 3.0 remain
    lim.reconfigure(max_per_min=8, cooldown_ms=5000)
    assert lim.check(4.0) is Reason.COOLDOWN_ACTIVE


def test_limiter_refuses_an_unbounded_cap() -> None:
    with pytest.raises(ValueError):
        SwitchLimiter(max_per_min=0, cooldown_ms=0)
    with pytest.raises(ValueError):
        SwitchLimiter(max_per_min=5, cooldown_ms=float("nan"))


@settings(max_examples=200, deadline=None)
@given(
    max_per_min=st.integers(min_value=1, max_value=10),
    cooldown_ms=st.sampled_from([0.0, 500.0, 1500.0, 10_000.0]),
    attempts=st.lists(
        st.tuples(st.floats(min_value=0.0, max_value=30.0, allow_nan=False), st.booleans()),
        max_size=80,
    ),
)
def test_switches_in_any_60s_window_never_exceed_the_cap(
    max_per_min: int, cooldown_ms: float, attempts: list[tuple[float, bool]]
) -> None:
    lim = SwitchLimiter(max_per_min, cooldown_ms)
    now = 0.0
    recorded: list[tuple[float, bool]] = []
    for gap, manual in attempts:
        now += gap
        if lim.check(now, manual=manual) is None:
            lim.record(now)
            recorded.append((now, manual))
    times = [t for t, _ in recorded]
    for t in times:
        assert sum(1 for u in times if t <= u < t + 60.0) <= max_per_min
    for (prev, _), (t, manual) in itertools.pairwise(recorded):
        if not manual:
            assert t - prev >= cooldown_ms / 1000.0 - 1e-9


# -- best_candidate -----------------------------------------------------------------------


def test_best_candidate_with_nothing_eligible_is_none() -> None:
    assert best_candidate({1: 10.0, 2: 20.0}, []) is None
    assert best_candidate({}, [1, 2]) is None  # no scores for them
    assert best_candidate({1: 0.0, 2: 0.0}, [1, 2]) is None  # dead paths score 0
    assert best_candidate({1: 10.0}, [1], exclude=1) is None
    assert best_candidate({1: float("nan"), 2: 1.0}, [1, 2]) == 2


def test_best_candidate_picks_highest_score_excluding_active() -> None:
    scores = {1: 10.0, 2: 30.0, 3: 20.0}
    assert best_candidate(scores, [1, 2, 3]) == 2
    assert best_candidate(scores, [1, 2, 3], exclude=2) == 3
    assert best_candidate(scores, [1, 3]) == 3  # 2 is not eligible


def test_at27_tie_break() -> None:
    scores = {3: 50.0, 1: 50.0, 2: 50.0, 4: 10.0}
    for order in itertools.permutations([1, 2, 3, 4]):
        assert best_candidate(scores, list(order)) == 1
        assert best_candidate(scores, set(order), exclude=1) == 2
        sel = Selector(improvement_factor=1.10, dwell_ms=300)
        assert sel.evaluate(0.0, None, scores, order) == 1
        # active 4 is far worse: the lowest id of the tied candidates wins after dwell
        assert sel.evaluate(1.0, 4, scores, order) is None
        assert sel.evaluate(1.3, 4, scores, order) == 1


# -- Selector -------------------------------------------------------------------------------


def test_at26a_hysteresis() -> None:
    sel = Selector(improvement_factor=1.10, dwell_ms=300)
    eligible = [1, 2]
    # 5 % better never switches, however long it lasts
    for i in range(100):
        assert sel.evaluate(i * 0.1, 1, {1: 10.0, 2: 10.5}, eligible) is None
    assert sel.next_deadline() is None
    # 20 % better: only after the dwell
    better = {1: 10.0, 2: 12.0}
    assert sel.evaluate(20.0, 1, better, eligible) is None
    assert sel.next_deadline() == pytest.approx(20.3)
    assert sel.evaluate(20.1, 1, better, eligible) is None
    assert sel.evaluate(20.299, 1, better, eligible) is None
    assert sel.evaluate(20.3, 1, better, eligible) == 2
    assert sel.next_deadline() is None  # proposed: no timer needed
    assert sel.evaluate(20.4, 1, better, eligible) == 2  # stands while it holds


def test_at26a_interruption_restarts_the_dwell() -> None:
    sel = Selector(improvement_factor=1.10, dwell_ms=300)
    better, marginal = {1: 10.0, 2: 12.0}, {1: 10.0, 2: 10.5}
    assert sel.evaluate(0.0, 1, better, [1, 2]) is None
    assert sel.evaluate(0.2, 1, marginal, [1, 2]) is None  # interruption
    assert sel.evaluate(0.25, 1, better, [1, 2]) is None  # dwell restarts at 0.25
    assert sel.evaluate(0.5, 1, better, [1, 2]) is None
    assert sel.evaluate(0.55, 1, better, [1, 2]) == 2
    # a different candidate taking the lead restarts the dwell too
    sel.reset()
    assert sel.evaluate(1.0, 1, better, [1, 2, 3]) is None
    overtaken = {1: 10.0, 2: 12.0, 3: 13.0}
    assert sel.evaluate(1.2, 1, overtaken, [1, 2, 3]) is None
    assert sel.evaluate(1.3, 1, overtaken, [1, 2, 3]) is None
    assert sel.evaluate(1.5, 1, overtaken, [1, 2, 3]) == 3
    # the candidate leaving the eligible set interrupts as well
    sel.reset()
    assert sel.evaluate(2.0, 1, better, [1, 2]) is None
    assert sel.evaluate(2.1, 1, better, [1]) is None
    assert sel.evaluate(2.3, 1, better, [1, 2]) is None
    assert sel.evaluate(2.6, 1, better, [1, 2]) == 2


def test_no_active_path_picks_the_best_at_once() -> None:
    sel = Selector(improvement_factor=1.10, dwell_ms=300)
    assert sel.evaluate(0.0, None, {1: 5.0, 2: 7.0}, [1, 2]) == 2
    assert sel.evaluate(0.0, None, {1: 0.0, 2: 0.0}, [1, 2]) is None
    assert sel.evaluate(0.0, None, {1: 5.0}, []) is None
    assert sel.next_deadline() is None


def test_selector_reconfigure_and_bad_parameters() -> None:
    sel = Selector(improvement_factor=1.10, dwell_ms=300)
    sel.reconfigure(improvement_factor=1.5, dwell_ms=0)
    assert sel.evaluate(0.0, 1, {1: 10.0, 2: 14.0}, [1, 2]) is None  # 1.4 < 1.5
    assert sel.evaluate(0.0, 1, {1: 10.0, 2: 16.0}, [1, 2]) == 2  # zero dwell: at once
    with pytest.raises(ValueError):
        Selector(improvement_factor=0.9)
    with pytest.raises(ValueError):
        Selector(dwell_ms=-1)
