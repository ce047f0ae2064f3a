"""Anti-replay window (against a set-based model) and reattach nonces (AT-33)."""

from __future__ import annotations

import itertools
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel.core.replay import NonceGuard, NonceVerdict, ReplayVerdict, ReplayWindow

FRESH, TOO_OLD, DUPLICATE = ReplayVerdict.FRESH, ReplayVerdict.TOO_OLD, ReplayVerdict.DUPLICATE


class ModelWindow:
    """Obvious reference: remember every accepted counter forever."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.seen: set[int] = set()
        self.highest = -1

    def check(self, counter: int) -> bool:
        return (
            0 <= counter < 2**64 and counter not in self.seen and counter > self.highest - self.size
        )

    def update(self, counter: int) -> ReplayVerdict:
        """FRESH (recorded), TOO_OLD (outside the counter space or the window) or
        DUPLICATE (inside the window, already seen)."""
        if not 0 <= counter < 2**64 or counter <= self.highest - self.size:
            return TOO_OLD
        if counter in self.seen:
            return DUPLICATE
        self.seen.add(counter)
        self.highest = max(self.highest, counter)
        return FRESH


def _counter_steps(size: int) -> st.SearchStrategy[list[int]]:
    """Sequences mixing in-window reordering, duplicates, old counters and far jumps."""
    step = st.one_of(
        st.integers(-size - 70, 70),  # around the top: reorder, duplicate, just-outside
        st.integers(-3 * size, 3 * size),  # medium moves either way
        st.integers(0, 2**40),  # far jump ahead
        st.just(0),  # exact duplicate of the last one fed
    )
    return st.lists(step, min_size=1, max_size=300)


@settings(max_examples=150, deadline=None)
@given(size=st.sampled_from([64, 65, 100, 128, 2048]), steps=st.data())
def test_window_matches_reference_model(size: int, steps: st.DataObject) -> None:
    window, model = ReplayWindow(size), ModelWindow(size)
    position = steps.draw(st.integers(0, 2**20))
    for delta in steps.draw(_counter_steps(size)):
        counter = position + delta
        assert window.check(counter) == model.check(counter)
        assert window.update(counter) == model.update(counter), counter
        assert window.highest == model.highest
        if counter >= 0:
            position = counter


@settings(max_examples=60, deadline=None)
@given(counters=st.lists(st.integers(0, 2**64 - 1), max_size=100))
def test_window_matches_model_on_arbitrary_u64(counters: list[int]) -> None:
    window, model = ReplayWindow(2048), ModelWindow(2048)
    for counter in counters:
        assert window.update(counter) == model.update(counter)


def test_fresh_counters_in_window_accepted_once_in_any_order() -> None:
    window = ReplayWindow(2048)
    order = list(range(1000, 3048))[::-1]  # newest first: all within the window
    assert all(window.update(c) is FRESH for c in order)
    assert all(window.update(c) is DUPLICATE for c in order)
    assert window.highest == 3047


def test_window_edges() -> None:
    window = ReplayWindow(2048)
    assert window.update(5000) is FRESH
    assert window.check(5000 - 2047)  # oldest counter still inside
    assert not window.check(5000 - 2048)  # just outside
    assert window.update(5000 - 2048) is TOO_OLD
    assert window.update(5000 - 2047) is FRESH
    assert window.update(-1) is TOO_OLD
    assert window.update(2**64) is TOO_OLD
    assert window.update(2**64 - 1) is FRESH


def test_check_does_not_mutate() -> None:
    window = ReplayWindow(64)
    window.update(10)
    before = (window.highest, list(window._ring))
    for counter in (0, 9, 10, 11, 10_000):
        window.check(counter)
    assert (window.highest, list(window._ring)) == before


def test_memory_is_bounded_by_size_not_traffic() -> None:
    window = ReplayWindow(2048)
    full = 2048 // 64 + 1  # blocks: the whole window, plus one
    window.update(0)
    for counter in range(0, 200_000, 3):  # two of every three counters never arrive
        window.update(counter)
        if counter % 999 == 0:
            assert len(window._ring) <= full
    assert len(window._ring) == full  # the missing counters keep the whole window open
    window.update(2**63)  # huge jump: everything below it inside the window is open
    assert len(window._ring) == full
    assert sys.getsizeof(window._bits) <= sys.getsizeof(bytearray(full * 8))
    assert all(0 <= block < 2**64 for block in window._ring)


def test_in_order_counters_keep_the_ring_at_two_blocks() -> None:
    """An idle session's probes (and any in-order stream) are all recorded below the newest
    bytes: the ring stays at its smallest, 16 bytes, whatever the window's size."""
    window = ReplayWindow(8192)
    for counter in range(100_000):
        assert window.update(counter) is FRESH
    assert len(window._bits) == 16
    assert window.update(99_999 - 8191) is DUPLICATE  # inside the window, below the ring
    assert window.update(99_999 - 8192) is TOO_OLD
    assert not window.check(50_000)


def test_a_gap_grows_the_ring_until_it_is_filled_or_leaves_the_window() -> None:
    window = ReplayWindow(8192)
    for counter in range(1000):
        window.update(counter)
    for counter in range(1001, 6000):  # 1000 is late
        window.update(counter)
    assert len(window._bits) >= (5999 - 1000) // 8  # the ring reaches back to counter 1000
    assert window.check(1000) and window.update(1000) is FRESH
    for counter in range(6000, 7000):
        window.update(counter)
    assert len(window._bits) == 16  # the gap was filled: shrunk at a 512-counter boundary
    for counter in range(7001, 20_000):  # 7000 never arrives
        window.update(counter)
    assert len(window._bits) == 16  # it left the window 8192 counters later
    assert window.update(7000) is TOO_OLD


def _stream(size: int) -> st.SearchStrategy[list[tuple[str, int, int]]]:
    """Runs of in-order counters (long enough to slide the ring many times), runs with one
    counter missing, late counters from up to twice the window back (each twice: the second
    a duplicate or too old), and jumps."""
    op = st.one_of(
        st.tuples(st.just("run"), st.integers(1, 1500), st.just(0)),
        st.tuples(st.just("holed"), st.integers(2, 1500), st.integers(0, 1499)),
        st.tuples(st.just("late"), st.integers(0, 2 * size), st.just(0)),
        st.tuples(st.just("jump"), st.integers(1, 4 * size), st.just(0)),
    )
    return st.lists(op, min_size=1, max_size=25)


def _counters(kind: str, top: int, n: int, k: int) -> list[int]:
    if kind == "run":
        return list(range(top + 1, top + 1 + n))
    if kind == "holed":
        return [c for c in range(top + 1, top + 1 + n) if c != top + 1 + k % n]
    if kind == "late":
        return [top - n, top - n]
    return [top + n]


@settings(max_examples=100, deadline=None)
@given(size=st.sampled_from([64, 100, 256, 2048]), ops=st.data())
def test_growing_and_shrinking_ring_matches_reference_model(size: int, ops: st.DataObject) -> None:
    """The ring's size changes with the traffic; what is fresh never does (the set model
    remembers every counter forever: after each step every counter of the window and
    around it is compared), and the ring never exceeds the whole window."""
    window, model = ReplayWindow(size), ModelWindow(size)
    top = -1  # counters start at 0, as a key generation's do ("jump" goes far)
    for kind, n, k in ops.draw(_stream(size)):
        for counter in _counters(kind, top, n, k):
            assert window.update(counter) == model.update(counter), counter
        top = model.highest
        assert window.highest == top
        assert 16 <= len(window._bits) <= window.max_ring_bytes
        for counter in range(top - size - 9, top + 2):
            assert window.check(counter) == model.check(counter), (kind, counter)


def test_window_rejects_too_small_size() -> None:
    with pytest.raises(ValueError):
        ReplayWindow(63)


# -- AT-33: reattach nonces ---------------------------------------------------------------


def _guard_at(last: int, max_gap: int = 8) -> NonceGuard:
    guard = NonceGuard(max_gap=max_gap)
    assert guard.check(last) is NonceVerdict.ACCEPTED
    guard.commit(last)
    return guard


def test_at33_gap_beyond_max_gap_is_window_exceeded() -> None:
    guard = _guard_at(10, max_gap=8)
    assert guard.check(19) is NonceVerdict.WINDOW_EXCEEDED
    assert guard.check(18) is NonceVerdict.ACCEPTED  # exactly max_gap is fine
    assert guard.last == 10


def test_at33_first_nonce_may_be_large() -> None:
    guard = NonceGuard(max_gap=8)
    assert guard.check(10_000) is NonceVerdict.ACCEPTED


def test_at33_missing_nonce() -> None:
    assert NonceGuard().check(0) is NonceVerdict.MISSING
    assert _guard_at(5).check(0) is NonceVerdict.MISSING


def test_at33_lower_unseen_nonce_is_stale() -> None:
    guard = _guard_at(5)
    guard.commit(9)
    assert guard.check(7) is NonceVerdict.STALE  # never seen, but lower
    assert guard.check(5) is NonceVerdict.STALE
    assert guard.check(-1) is NonceVerdict.STALE


def test_at33_duplicate_nonce() -> None:
    assert _guard_at(5).check(5) is NonceVerdict.DUPLICATE


def test_at33_no_mutation_on_any_reject() -> None:
    guard = _guard_at(100, max_gap=8)
    for nonce in (0, 100, 99, 1, 109, 10**9):
        verdict = guard.check(nonce)
        assert verdict is not NonceVerdict.ACCEPTED
        with pytest.raises(ValueError):
            guard.commit(nonce)
        assert guard.last == 100
    assert guard.check(101) is NonceVerdict.ACCEPTED


def test_at33_verdict_values_are_reason_codes() -> None:
    assert [v.value for v in NonceVerdict] == [
        "nonce_accepted",
        "nonce_missing",
        "nonce_stale",
        "nonce_duplicate",
        "nonce_window_exceeded",
    ]


@settings(max_examples=100, deadline=None)
@given(nonces=st.lists(st.integers(0, 400), max_size=60), max_gap=st.integers(1, 64))
def test_at33_accepted_nonces_strictly_increase_within_gap(nonces: list[int], max_gap: int) -> None:
    guard = NonceGuard(max_gap=max_gap)
    accepted: list[int] = []
    for nonce in nonces:
        if guard.check(nonce) is NonceVerdict.ACCEPTED:
            guard.commit(nonce)
            accepted.append(nonce)
    assert all(0 < b - a <= max_gap for a, b in itertools.pairwise(accepted))
    assert guard.last == (accepted[-1] if accepted else 0)
