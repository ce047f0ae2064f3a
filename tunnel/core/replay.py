"""Anti-replay: a sliding bitmap window over 64-bit counters, and strictly monotonic nonces.

``ReplayWindow`` is the RFC 6479 bitmap as in wireguard-go ``replay/replay.go``: a ring of
64-bit blocks that slides forward with the highest counter seen. Counters may arrive out
of order (several paths reorder), so any counter within ``size`` of the highest one is
accepted once. Memory is ``size / 64 + 1`` small integers whatever the traffic.

``NonceGuard`` is the stricter rule for REATTACH_REQUEST nonces (SPEC-DIGEST 4.5, AT-33):
every accepted nonce must be larger than the last, by at most ``max_gap``.

Both are per-packet code: no allocation beyond integers, no logging, no locks.
"""

from __future__ import annotations

from enum import StrEnum

_BLOCK_BITS = 64
_BLOCK_SHIFT = 6
_BIT_MASK = _BLOCK_BITS - 1
_COUNTER_LIMIT = 2**64
"""Counters are u64 on the wire; anything outside [0, 2**64) is never fresh."""


class ReplayWindow:
    """Sliding-window anti-replay over 64-bit counters (RFC 6479 / wireguard-go style bitmap).

    A counter is *fresh* when it is in ``[0, 2**64)``, has not been recorded, and is
    larger than ``highest - size`` (the window holds ``highest`` and the ``size - 1``
    counters below it). Counters above ``highest`` are always fresh and slide the window.
    """

    __slots__ = ("_blocks", "_ring", "highest", "size")

    size: int
    """How many counters, ending at ``highest``, are remembered."""
    highest: int
    """Largest counter recorded so far; -1 before the first one."""

    def __init__(self, size: int = 2048) -> None:
        if size < _BLOCK_BITS:
            raise ValueError(f"replay window must hold at least {_BLOCK_BITS} counters")
        self.size = size
        self.highest = -1
        # One block more than the window needs, so that sliding never clears a block
        # that still holds a counter inside the window.
        self._blocks = -(-size // _BLOCK_BITS) + 1
        self._ring = [0] * self._blocks

    def __repr__(self) -> str:
        return f"ReplayWindow(size={self.size}, highest={self.highest})"

    def check(self, counter: int) -> bool:
        """True if ``counter`` would be accepted now. Changes nothing."""
        if counter < 0 or counter >= _COUNTER_LIMIT:
            return False
        if counter > self.highest:
            return True
        if self.highest - counter >= self.size:
            return False
        block = (counter >> _BLOCK_SHIFT) % self._blocks
        return not (self._ring[block] >> (counter & _BIT_MASK)) & 1

    def update(self, counter: int) -> bool:
        """Record ``counter`` if it is fresh and return True; else return False, record nothing."""
        if counter < 0 or counter >= _COUNTER_LIMIT:
            return False
        ring = self._ring
        nblocks = self._blocks
        index = counter >> _BLOCK_SHIFT
        if counter > self.highest:
            current = self.highest >> _BLOCK_SHIFT  # -1 >> 6 == -1: nothing recorded yet
            steps = min(index - current, nblocks)
            for i in range(current + 1, current + 1 + steps):
                ring[i % nblocks] = 0
            self.highest = counter
        elif self.highest - counter >= self.size:
            return False
        slot = index % nblocks
        bit = 1 << (counter & _BIT_MASK)
        old = ring[slot]
        if old & bit:
            return False
        ring[slot] = old | bit
        return True


class NonceVerdict(StrEnum):
    """Outcome of checking a reattach nonce; the values are the reason codes of AT-33."""

    ACCEPTED = "nonce_accepted"
    MISSING = "nonce_missing"
    STALE = "nonce_stale"
    DUPLICATE = "nonce_duplicate"
    WINDOW_EXCEEDED = "nonce_window_exceeded"


class NonceGuard:
    """Strictly monotonic reattach nonces (SPEC-DIGEST 4.5 reference algorithm).

    0 means missing; ``nonce == last`` is DUPLICATE; ``nonce < last`` is STALE;
    ``nonce - last > max_gap`` is WINDOW_EXCEEDED once something was accepted (the first
    nonce of a session may be any positive value). ``check`` never mutates, so a rejected
    request changes nothing; ``commit`` records an accepted nonce.
    """

    __slots__ = ("last", "max_gap")

    last: int
    """Last accepted nonce; 0 when none accepted yet."""
    max_gap: int
    """Largest allowed step from ``last`` to the next nonce."""

    def __init__(self, max_gap: int = 256) -> None:
        if max_gap < 1:
            raise ValueError("max_gap must be at least 1")
        self.max_gap = max_gap
        self.last = 0

    def __repr__(self) -> str:
        return f"NonceGuard(last={self.last}, max_gap={self.max_gap})"

    def check(self, nonce: int) -> NonceVerdict:
        """Classify ``nonce`` against the last accepted one. Changes nothing."""
        if nonce == 0:
            return NonceVerdict.MISSING
        last = self.last
        if nonce == last:
            return NonceVerdict.DUPLICATE
        if nonce < last:
            return NonceVerdict.STALE
        if last > 0 and nonce - last > self.max_gap:
            return NonceVerdict.WINDOW_EXCEEDED
        return NonceVerdict.ACCEPTED

    def commit(self, nonce: int) -> None:
        """Record ``nonce``; only valid right after ``check(nonce)`` returned ACCEPTED."""
        verdict = self.check(nonce)
        if verdict is not NonceVerdict.ACCEPTED:
            raise ValueError(f"commit() of a nonce that was not accepted ({verdict.value})")
        self.last = nonce
