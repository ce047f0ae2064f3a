"""The lease fence (DESIGN D15b): a node stops forwarding before its lease can expire.

The model etcd implements: a grant or keep-alive that leaves the node at ``s`` reaches the
leader at some ``r >= s`` and is answered at ``a >= r``; the lease then lives until
``max(r) + ttl`` over everything the leader handled. Whatever the receive times and
whatever order the answers arrive in, the fence must never allow forwarding at a time
from which the lease could already be gone (minus the margin), and must allow it right
after a fresh acknowledgement.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel.ownership.fence import LeaseFence

refresh = st.tuples(
    st.floats(min_value=0, max_value=100, allow_nan=False),  # sent at
    st.floats(min_value=0, max_value=5, allow_nan=False),  # in flight until the leader
    st.floats(min_value=0, max_value=5, allow_nan=False),  # then until the answer
)


@settings(max_examples=300, deadline=None)
@given(
    refreshes=st.lists(refresh, min_size=1, max_size=12),
    ttl=st.integers(min_value=1, max_value=30),
    margin=st.floats(min_value=0, max_value=2, allow_nan=False),
    answer_order=st.randoms(use_true_random=False),
    probes=st.lists(st.floats(min_value=0, max_value=150, allow_nan=False), max_size=20),
)
def test_fence_never_outlives_the_lease(
    refreshes: list[tuple[float, float, float]],
    ttl: int,
    margin: float,
    answer_order: object,
    probes: list[float],
) -> None:
    fence = LeaseFence(margin)
    answers = sorted(refreshes, key=lambda r: r[0] + r[1] + r[2])
    answer_order.shuffle(answers)  # type: ignore[attr-defined]
    handled: list[float] = []
    for sent, to_leader, back in answers:
        handled.append(sent + to_leader)
        fence.acknowledged(sent, ttl)
        answered_at = sent + to_leader + back
        # The earliest the lease can expire given what the leader has handled so far
        # (the server may have seen the newest refresh at the very moment it was sent).
        earliest_expiry = max(s for s, _, _ in answers[: len(handled)]) + ttl
        for now in [*probes, answered_at]:
            if fence.may_forward(now):
                assert now < earliest_expiry - margin
                assert now < max(handled) + ttl - margin  # the lease certainly holds


@settings(max_examples=200, deadline=None)
@given(
    sent=st.floats(min_value=0, max_value=1e6, allow_nan=False),
    ttl=st.integers(min_value=1, max_value=60),
    rtt=st.floats(min_value=0, max_value=0.5, allow_nan=False),
)
def test_fresh_acknowledgement_opens_the_fence(sent: float, ttl: int, rtt: float) -> None:
    margin = ttl / 4
    fence = LeaseFence(margin)
    assert not fence.may_forward(sent)  # nothing acknowledged yet
    fence.acknowledged(sent, ttl)
    assert fence.may_forward(sent + rtt) == (sent + rtt < sent + ttl - margin)
    assert not fence.may_forward(sent + ttl - margin)  # closed from the deadline on
    assert fence.remaining(sent) == pytest.approx(ttl - margin)


@settings(max_examples=200, deadline=None)
@given(
    first=st.floats(min_value=0, max_value=100, allow_nan=False),
    pause=st.floats(min_value=0, max_value=100, allow_nan=False),
    ttl=st.integers(min_value=1, max_value=30),
)
def test_after_a_pause_the_clock_is_checked_before_sending(
    first: float, pause: float, ttl: int
) -> None:
    """A node frozen right after a refresh wakes at ``first + pause``: it may send only if
    the lease it had cannot have expired while it slept."""
    margin = 0.5
    fence = LeaseFence(margin)
    fence.acknowledged(first, ttl)
    woke = first + pause
    assert fence.may_forward(woke) == (pause < ttl - margin)


def test_late_answer_of_an_old_refresh_does_not_move_the_deadline_back_or_forward() -> None:
    fence = LeaseFence(0.5)
    fence.acknowledged(10.0, 2)
    fence.acknowledged(5.0, 2)  # older request, answered late
    assert fence.deadline == 11.5
    fence.acknowledged(10.0, 30)  # the same send time cannot stretch the deadline
    assert fence.deadline == 11.5


def test_a_lease_reported_gone_closes_the_fence_for_good() -> None:
    fence = LeaseFence(0.5)
    fence.acknowledged(1.0, 10)
    assert fence.may_forward(2.0)
    fence.acknowledged(2.0, 0)  # keep-alive answered with TTL 0: etcd dropped the lease
    assert fence.expired and not fence.may_forward(2.0)
    fence.acknowledged(3.0, 10)
    assert not fence.may_forward(3.1)
    assert fence.remaining(3.1) == -math.inf


@pytest.mark.parametrize("margin", [-1.0, math.nan, math.inf])
def test_margin_is_validated(margin: float) -> None:
    with pytest.raises(ValueError):
        LeaseFence(margin)
