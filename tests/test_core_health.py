"""tunnel.core.health: per-path RTT/loss/jitter estimators with a fake clock (seconds)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel.core.events import Reason
from tunnel.core.health import (
    MAX_LATE_PROBES,
    MAX_LOSS_SAMPLES,
    MAX_OUTSTANDING_PROBES,
    SCORE_UNMEASURED,
    PathHealth,
    PathStats,
    path_score,
)


def ack_after(h: PathHealth, probe_id: int, sent: float, rtt_ms: float) -> float | None:
    """Send probe ``probe_id`` at ``sent`` and ack it ``rtt_ms`` later."""
    h.probe_sent(probe_id, sent)
    return h.probe_acked(probe_id, sent + rtt_ms / 1000.0)


def lose(h: PathHealth, probe_id: int, sent: float) -> float:
    """Send probe ``probe_id`` at ``sent`` and let it expire; returns the expiry time."""
    h.probe_sent(probe_id, sent)
    expiry = sent + h.probe_timeout_ms() / 1000.0
    h.expire(expiry)
    return expiry


# -- RTT estimators ---------------------------------------------------------------------


def test_rtt_ewma_and_jitter_match_rfc6298_hand_computed() -> None:
    h = PathHealth(1)
    assert h.srtt_ms is None and h.jitter_ms == 0.0

    assert ack_after(h, 1, 0.0, 100.0) == pytest.approx(100.0)
    # first sample: srtt = R, rttvar = R / 2
    assert h.srtt_ms == pytest.approx(100.0)
    assert h.jitter_ms == pytest.approx(50.0)

    assert ack_after(h, 2, 1.0, 200.0) == pytest.approx(200.0)
    # rttvar = 3/4 * 50 + 1/4 * |100 - 200| = 62.5 ; srtt = 7/8 * 100 + 1/8 * 200 = 112.5
    assert h.jitter_ms == pytest.approx(62.5)
    assert h.srtt_ms == pytest.approx(112.5)

    ack_after(h, 3, 2.0, 100.0)
    # rttvar = 3/4 * 62.5 + 1/4 * 12.5 = 50.0 ; srtt = 7/8 * 112.5 + 1/8 * 100 = 110.9375
    assert h.jitter_ms == pytest.approx(50.0)
    assert h.srtt_ms == pytest.approx(110.9375)
    assert h.stats(2.2).rtt_history == pytest.approx((100.0, 200.0, 100.0))


def test_probe_timeout_is_max_of_dead_min_and_3srtt_plus_4jitter() -> None:
    h = PathHealth(1, dead_min_ms=300)
    assert h.probe_timeout_ms() == 300.0  # no sample yet
    ack_after(h, 1, 0.0, 20.0)  # srtt 20, rttvar 10 -> 100 ms < floor
    assert h.probe_timeout_ms() == 300.0
    ack_after(h, 2, 1.0, 200.0)  # rttvar 7.5 + 45 = 52.5, srtt 42.5 -> 127.5 + 210
    assert h.probe_timeout_ms() == pytest.approx(337.5)


def test_unknown_and_duplicate_acks_return_none_and_leave_estimators_alone() -> None:
    h = PathHealth(1)
    assert h.probe_acked(99, 0.5) is None
    assert h.srtt_ms is None
    ack_after(h, 1, 1.0, 40.0)
    assert h.probe_acked(1, 1.5) is None  # duplicate
    assert h.srtt_ms == pytest.approx(40.0)
    assert h.stats(1.5).rtt_history == pytest.approx((40.0,))


def test_reusing_an_outstanding_probe_id_is_a_caller_bug() -> None:
    h = PathHealth(1)
    h.probe_sent(7, 0.0)
    with pytest.raises(ValueError):
        h.probe_sent(7, 0.1)


def test_late_ack_returns_none_keeps_the_loss_but_teaches_the_rtt() -> None:
    h = PathHealth(1, dead_min_ms=300, min_loss_samples=1)
    for i in range(4):
        ack_after(h, i, i * 0.1, 20.0)
    # the path's RTT steps up to 500 ms, beyond the 300 ms probe timeout
    h.probe_sent(10, 1.0)
    h.expire(1.3)
    assert h.consecutive_misses == 1
    assert h.probe_acked(10, 1.5) is None
    assert h.consecutive_misses == 1  # a late ack is no ack
    assert h.loss_ratio(1.5) == pytest.approx(1 / 5)
    assert h.srtt_ms is not None and h.srtt_ms > 60.0  # but the estimators learnt the RTT
    assert h.probe_timeout_ms() > 500.0  # so the next 500 ms probe is answered in time
    assert ack_after(h, 11, 2.0, 500.0) == pytest.approx(500.0)
    assert h.consecutive_misses == 0


# -- loss and misses --------------------------------------------------------------------


def test_loss_ratio_over_sliding_window_samples_age_out() -> None:
    h = PathHealth(1, loss_window_ms=2000, min_loss_samples=4, dead_min_ms=300)
    for i in range(8):  # acked at 0.02, 0.12, ..., 0.72
        ack_after(h, i, i * 0.1, 20.0)
    h.probe_sent(8, 0.8)  # expires at 1.1
    h.probe_sent(9, 0.9)  # expires at 1.2
    h.expire(1.5)
    assert h.loss_ratio(1.5) == pytest.approx(2 / 10)
    # window (0.5, 2.5]: acks at 0.52, 0.62, 0.72 and the two losses remain
    assert h.loss_ratio(2.5) == pytest.approx(2 / 5)
    # window (1.15, 3.15]: one loss left, below min_loss_samples
    assert h.loss_ratio(3.15) == 0.0
    assert h.loss_ratio(10.0) == 0.0


def test_loss_ratio_is_zero_below_min_loss_samples() -> None:
    h = PathHealth(1, min_loss_samples=8)
    t = 0.0
    for i in range(7):
        t = lose(h, i, i * 0.01)
    assert h.loss_ratio(t) == 0.0
    t = lose(h, 7, 0.07)
    assert h.loss_ratio(t) == 1.0


def test_consecutive_misses_count_up_and_reset_on_an_ack() -> None:
    h = PathHealth(1)
    for i in range(3):
        lose(h, i, i * 0.5)
    assert h.consecutive_misses == 3
    ack_after(h, 3, 2.0, 30.0)
    assert h.consecutive_misses == 0


def test_expire_only_counts_probes_past_their_timeout() -> None:
    h = PathHealth(1, dead_min_ms=300)
    h.probe_sent(1, 0.0)
    h.probe_sent(2, 0.2)
    h.expire(0.299)
    assert h.consecutive_misses == 0
    h.expire(0.3)
    assert h.consecutive_misses == 1 and h.outstanding_probes == 1
    assert h.probe_acked(2, 0.45) == pytest.approx(250.0)


def test_reset_loss_forgets_outcomes_and_misses() -> None:
    h = PathHealth(1, min_loss_samples=1)
    t = 0.0
    for i in range(3):
        t = lose(h, i, i * 0.1)
    assert h.loss_ratio(t) == 1.0 and h.consecutive_misses == 3
    h.reset_loss()
    assert h.loss_ratio(t) == 0.0
    assert h.consecutive_misses == 0


def test_flood_of_unacked_probes_stays_bounded() -> None:
    h = PathHealth(1, min_loss_samples=1)
    n = 5000
    for i in range(n):
        h.probe_sent(i, i * 1e-4)  # all within the loss window, none acked
    assert h.outstanding_probes == MAX_OUTSTANDING_PROBES
    assert h.consecutive_misses == n - MAX_OUTSTANDING_PROBES  # evicted = lost
    assert h.loss_ratio(n * 1e-4) == 1.0
    assert len(h._late) <= MAX_LATE_PROBES  # internal bounds, asserted on purpose
    assert len(h._outcomes) <= MAX_LOSS_SAMPLES
    # a flood of acks for unknown ids changes nothing
    for i in range(n, 2 * n):
        assert h.probe_acked(i, 1.0) is None
    assert h.srtt_ms is None


def test_rtt_history_is_bounded() -> None:
    h = PathHealth(1, history=5)
    for i in range(12):
        ack_after(h, i, float(i), 10.0 + i)
    assert h.stats(12.0).rtt_history == pytest.approx((17.0, 18.0, 19.0, 20.0, 21.0))


# -- death and deadlines ----------------------------------------------------------------


def test_dead_uses_dead_min_before_any_sample_from_creation() -> None:
    h = PathHealth(1, dead_min_ms=300, now=10.0)
    assert h.dead_at() == pytest.approx(10.3)
    assert not h.is_dead(10.299)
    assert h.is_dead(10.3)


def test_dead_after_max_of_dead_min_and_k_times_srtt_from_last_inbound() -> None:
    h = PathHealth(1, dead_min_ms=300, dead_rtt_multiplier=4.0)
    ack_after(h, 1, 0.0, 20.0)  # 4 * 20 = 80 ms < 300 ms floor
    assert h.dead_after_ms() == 300.0
    h = PathHealth(1, dead_min_ms=300, dead_rtt_multiplier=4.0)
    ack_after(h, 1, 0.0, 200.0)  # 4 * 200 = 800 ms
    assert h.dead_after_ms() == pytest.approx(800.0)
    h.inbound(5.0)
    assert h.dead_at() == pytest.approx(5.8)
    assert not h.is_dead(5.799)
    assert h.is_dead(5.8)
    h.inbound(5.9)  # anything authenticated revives it
    assert not h.is_dead(5.9)
    assert h.stats(5.9).alive


def test_next_deadline_is_the_dead_time_or_the_probe_expiry() -> None:
    h = PathHealth(1, dead_min_ms=300)
    h.inbound(1.0)
    assert h.next_deadline() == pytest.approx(1.3)  # dead time, nothing outstanding
    h.probe_sent(1, 1.1)  # expires at 1.4, later than the dead time
    assert h.next_deadline() == pytest.approx(1.3)
    h.inbound(1.2)  # dead time moves to 1.5: the probe expiry comes first
    assert h.next_deadline() == pytest.approx(1.4)
    h.expire(h.next_deadline() or 0.0)  # the driver fires its one timer at the deadline
    assert h.consecutive_misses == 1
    assert h.next_deadline() == pytest.approx(1.5)
    assert h.is_dead(1.5)
    assert h.next_deadline() is None  # seen dead, nothing in flight: no timer needed
    h.inbound(2.0)
    assert h.next_deadline() == pytest.approx(2.3)


# -- classification -----------------------------------------------------------------------


def classify(h: PathHealth, now: float, latency: float | None = None) -> Reason | None:
    return h.classify(
        now, loss_threshold=0.20, max_consecutive_drops=3, latency_threshold_ms=latency
    )


def test_classify_priority_misses_then_loss_then_latency() -> None:
    h = PathHealth(1, min_loss_samples=4, dead_min_ms=300)
    for i in range(4):  # srtt 200 ms
        ack_after(h, i, i * 0.3, 200.0)
    t = 1.0
    for i in range(4, 7):  # three losses in a row
        t = lose(h, i, t)
    # misses 3 >= 3, loss 3/7 > 0.2 and srtt > 100: misses win
    assert classify(h, t, latency=100.0) is Reason.CONSECUTIVE_DROP_EXCEEDED
    ack_after(h, 7, t, 200.0)  # misses reset, loss 3/8 still > 0.2
    t += 0.2
    assert classify(h, t, latency=100.0) is Reason.LOSS_THRESHOLD_EXCEEDED
    assert classify(h, 10.0, latency=100.0) is Reason.LATENCY_THRESHOLD_EXCEEDED  # loss aged out
    assert classify(h, 10.0, latency=None) is None
    assert classify(h, 10.0, latency=300.0) is None


def test_classify_loss_is_strict_and_misses_inclusive() -> None:
    h = PathHealth(1, min_loss_samples=5)
    for i in range(4):
        ack_after(h, i, i * 0.05, 10.0)
    t = lose(h, 4, 0.2)
    assert h.loss_ratio(t) == pytest.approx(0.2)
    assert classify(h, t) is None  # 0.2 is not > 0.2
    h2 = PathHealth(2)
    t = 0.0
    for i in range(2):
        t = lose(h2, i, t)
    assert classify(h2, t) is None
    t = lose(h2, 2, t)
    assert classify(h2, t) is Reason.CONSECUTIVE_DROP_EXCEEDED  # 3 >= 3


def test_at26b_single_spike_does_not_report_latency() -> None:
    h = PathHealth(1, dead_min_ms=300)
    t = 0.0
    for i in range(20):
        ack_after(h, i, t, 50.0)
        t += 0.1
    ack_after(h, 20, t, 290.0)  # one spike, still answered within the timeout
    t += 0.3
    assert h.srtt_ms is not None and h.srtt_ms < 150.0
    assert classify(h, t, latency=150.0) is None
    # a sustained rise does trip it
    for i in range(21, 30):
        ack_after(h, i, t, 290.0)
        t += 0.3
    assert classify(h, t, latency=150.0) is Reason.LATENCY_THRESHOLD_EXCEEDED


# -- score --------------------------------------------------------------------------------

finite_ms = st.floats(min_value=0.0, max_value=60_000.0, allow_nan=False)
ratio = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


@given(
    loss=ratio,
    more_loss=ratio,
    rtt=finite_ms,
    more_rtt=finite_ms,
    jit=finite_ms,
    more_jit=finite_ms,
)
def test_score_formula_is_monotone(
    loss: float, more_loss: float, rtt: float, more_rtt: float, jit: float, more_jit: float
) -> None:
    worse_loss = max(loss, more_loss)
    worse_rtt = max(rtt, more_rtt)
    worse_jit = max(jit, more_jit)
    base = path_score(loss, rtt, jit)
    assert path_score(worse_loss, rtt, jit) <= base
    assert path_score(loss, worse_rtt, jit) <= base
    assert path_score(loss, rtt, worse_jit) <= base
    assert path_score(worse_loss, worse_rtt, worse_jit) <= base
    assert path_score(worse_loss, worse_rtt, worse_jit) > SCORE_UNMEASURED
    assert path_score(loss, rtt, jit) == base  # deterministic


def build_path(rtt_ms: float, acked: int, lost: int) -> tuple[PathHealth, float]:
    """A path with ``acked`` timely acks at ``rtt_ms`` then ``lost`` losses, 10 ms apart."""
    h = PathHealth(1, min_loss_samples=8, dead_min_ms=300)
    t = 0.0
    for i in range(acked):
        ack_after(h, i, t, rtt_ms)
        t += 0.01
    for i in range(acked, acked + lost):
        h.probe_sent(i, t)
        t += 0.01
    t += h.probe_timeout_ms() / 1000.0  # every probe has an outcome, all inside the window
    h.expire(t)
    assert h.outstanding_probes == 0
    h.inbound(t)
    return h, t


@settings(max_examples=60, deadline=None)
@given(
    rtt=st.floats(min_value=1.0, max_value=250.0),
    more_rtt=st.floats(min_value=1.0, max_value=250.0),
    acked=st.integers(min_value=1, max_value=20),
    lost=st.integers(min_value=0, max_value=20),
)
def test_path_score_never_rises_with_more_loss_or_more_rtt(
    rtt: float, more_rtt: float, acked: int, lost: int
) -> None:
    base, t = build_path(rtt, acked, lost)
    if acked > 1:  # the same probes, one more of them lost
        lossier, t2 = build_path(rtt, acked - 1, lost + 1)
        assert lossier.score(t2) <= base.score(t)
    slower, t3 = build_path(max(rtt, more_rtt), acked, lost)
    assert slower.score(t3) <= base.score(t)


def test_score_zero_when_dead_and_unmeasured_below_any_measured() -> None:
    fresh = PathHealth(1)
    assert fresh.score(0.1) == SCORE_UNMEASURED > 0.0
    awful, t = build_path(250.0, 1, 20)  # 95 % loss, 250 ms
    assert awful.score(t) > fresh.score(0.1)
    assert fresh.score(0.3) == 0.0  # dead: nothing arrived for dead_min_ms
    good, t = build_path(20.0, 20, 0)
    assert good.score(t) > awful.score(t)
    assert good.score(t + 10.0) == 0.0


# -- snapshot -----------------------------------------------------------------------------


def test_stats_is_an_immutable_snapshot() -> None:
    h = PathHealth(4, min_loss_samples=1)
    ack_after(h, 1, 0.0, 30.0)
    s = h.stats(0.05)
    assert isinstance(s, PathStats)
    assert s.path_id == 4 and s.alive and s.consecutive_misses == 0
    assert s.srtt_ms == pytest.approx(30.0) and s.jitter_ms == pytest.approx(15.0)
    assert s.score == pytest.approx(h.score(0.05))
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.srtt_ms = 1.0  # type: ignore[misc]
    ack_after(h, 2, 0.1, 60.0)
    assert s.rtt_history == pytest.approx((30.0,))  # later samples do not leak in
    assert isinstance(s.rtt_history, tuple)


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        PathHealth(1, history=0)
    with pytest.raises(ValueError):
        PathHealth(1, loss_window_ms=0)
    with pytest.raises(ValueError):
        PathHealth(1, dead_min_ms=float("inf"))
    with pytest.raises(ValueError):
        PathHealth(1, min_loss_samples=-1)


# -- loss by direction (PROBE_ACK rx_probes) -----------------------------------------------


def drive(
    h: PathHealth,
    delivery: list[tuple[bool, bool]],
    *,
    rx_start: int = 0,
    first: int = 0,
    step: float = 0.1,
) -> float:
    """Probe ``first + 1``, ``first + 2``, ... one per ``step`` seconds; ``(up, down)``
    says whether the probe reached the gateway and whether its ack came back. The gateway
    counts what reached it, from ``rx_start``. Returns the time of the last ack (or send)."""
    rx = rx_start
    t = 0.0
    for i, (up, down) in enumerate(delivery, start=first + 1):
        t = i * step
        h.probe_sent(i, t)
        if up:
            rx = (rx + 1) & 0xFFFFFFFF
            if down:
                h.probe_acked(i, t + 0.02, rx)
    return t + 0.02


def test_direction_loss_separates_upstream_from_downstream() -> None:
    # 40 probes; every third one lost on the way up, nothing lost on the way down
    up_only = [(i % 3 != 0, True) for i in range(40)]
    h = PathHealth(1, loss_window_ms=10_000)
    now = drive(h, up_only)
    up, down = h.direction_loss(now)
    assert down == 0.0
    assert up == pytest.approx(1 / 3, abs=0.04)
    assert h.stats(now).loss_up == pytest.approx(up) and h.stats(now).loss_down == 0.0

    down_only = [(True, i % 4 != 0) for i in range(40)]
    h = PathHealth(1, loss_window_ms=10_000)
    now = drive(h, down_only)
    up, down = h.direction_loss(now)
    assert up == 0.0
    assert down == pytest.approx(0.25, abs=0.04)


def test_direction_loss_survives_the_gateway_counter_wrapping() -> None:
    h = PathHealth(1, loss_window_ms=10_000)
    now = drive(h, [(i % 2 == 0, True) for i in range(40)], rx_start=0xFFFFFFF0)
    up, down = h.direction_loss(now)
    assert up == pytest.approx(0.5, abs=0.05) and down == 0.0


def test_direction_loss_needs_min_samples_and_forgets_on_reset_and_with_the_window() -> None:
    h = PathHealth(1, loss_window_ms=1_000, min_loss_samples=8)
    now = drive(h, [(i % 2 == 0, True) for i in range(6)])  # 6 probes: too few
    assert h.direction_loss(now) == (0.0, 0.0)
    now = drive(h, [(i % 2 == 0, True) for i in range(6)], rx_start=3, first=6)
    assert h.direction_loss(now)[0] > 0.3
    h.reset_loss()
    assert h.direction_loss(now) == (0.0, 0.0)
    h2 = PathHealth(1, loss_window_ms=1_000)
    now = drive(h2, [(i % 2 == 0, True) for i in range(20)])
    assert h2.direction_loss(now + 1.0) == (0.0, 0.0)  # every ack is out of the window


def test_classify_judges_one_way_loss_only_when_asked() -> None:
    h = PathHealth(1, loss_window_ms=10_000)
    now = drive(h, [(i % 3 != 0, True) for i in range(40)])  # ~33 % up, ~33 % round trip
    kwargs = {"loss_threshold": 0.36, "max_consecutive_drops": 100}
    assert h.classify(now, **kwargs) is None
    assert h.classify(now, **kwargs, one_way_threshold=0.25) is Reason.LOSS_THRESHOLD_EXCEEDED
    assert h.classify(now, **kwargs, one_way_threshold=0.40) is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=2, max_size=120))
def test_direction_loss_matches_a_direct_count(delivery: list[tuple[bool, bool]]) -> None:
    """Against the reference: between the first and the last probe whose ack came back,
    sent = ordinal difference, received = probes that reached the gateway after the first
    and up to the last, acked = acks of those."""
    h = PathHealth(1, loss_window_ms=60_000, min_loss_samples=1)
    now = drive(h, delivery)
    acked = [i for i, (up, down) in enumerate(delivery) if up and down]
    if len(acked) < 2:
        assert h.direction_loss(now) == (0.0, 0.0)
        return
    a, b = acked[0], acked[-1]
    between = delivery[a + 1 : b + 1]
    sent = b - a
    received = sum(up for up, _ in between)
    came_back = sum(up and down for up, down in between)
    up, down = h.direction_loss(now)
    assert up == pytest.approx(1 - received / sent)
    assert down == pytest.approx(1 - came_back / received)
    assert 0.0 <= up <= 1.0 and 0.0 <= down <= 1.0


def test_stats_say_whether_the_loss_is_measured() -> None:
    h = PathHealth(1, loss_window_ms=10_000, min_loss_samples=8)
    now = drive(h, [(True, True)] * 5)  # 5 probes: too few for either estimate
    st = h.stats(now)
    assert (st.loss_ratio, st.loss_known, st.direction_known) == (0.0, False, False)
    now = drive(h, [(i % 4 != 0, True) for i in range(20)], rx_start=5, first=5)
    st = h.stats(now)
    assert st.loss_known and st.direction_known
    assert st.loss_up == pytest.approx(0.25, abs=0.06) and st.loss_down == 0.0
