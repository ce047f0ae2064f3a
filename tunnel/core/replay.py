"""Anti-replay: a sliding bitmap window over 64-bit counters, and strictly monotonic nonces.

``ReplayWindow`` is the RFC 6479 bitmap as in wireguard-go ``replay/replay.go``: a ring of
64-bit blocks that slides forward with the highest counter seen. Counters may arrive out
of order (several paths reorder), so any counter within ``size`` of the highest one is
accepted once. Memory is one ``bytearray`` of ``size / 8 + 8`` bytes whatever the traffic,
updated a byte at a time (no per-packet object beyond the counter's own integers). A rejected
counter is either TOO_OLD (below the window: a late datagram, or an old replay) or a
DUPLICATE (inside the window, already seen: a network copy, or a replay); the receive side
decides which of those is alarming (``DuplicateMeter``, ``stale_drop``).

``DuplicateMeter`` is the per-session rate of duplicates: an honest network duplicates a
few percent of the datagrams at most, a replay flood does not stop there.

``NonceGuard`` is the stricter rule for REATTACH_REQUEST nonces (SPEC-DIGEST 4.5, AT-33):
every accepted nonce must be larger than the last, by at most ``max_gap``.

Both are per-packet code: no allocation beyond integers, no logging, no locks.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import Final

from tunnel.core.drops import Drop

_BLOCK_BITS = 64
"""The window is a ring of 64-bit blocks (RFC 6479); ``ReplayWindow._ring`` shows them."""
_BYTE_SHIFT = 3
_BYTE_MASK = 7
_BITS: Final = (1, 2, 4, 8, 16, 32, 64, 128)
"""The bit of a counter in its byte: ``_BITS[counter & 7]`` (no shift per packet)."""
_COUNTER_LIMIT = 2**64
"""Counters are u64 on the wire; anything outside [0, 2**64) is never fresh."""


DEFAULT_WINDOW: Final = 8192
"""Counters remembered by default: WireGuard's 8,128-bit bitmap, rounded to whole blocks.
At 60k datagrams/s that is about 135 ms of reordering between two paths."""


class ReplayVerdict(IntEnum):
    """What ``ReplayWindow.update`` found; members are preallocated (no per-packet object)."""

    FRESH = 0
    """Never seen and inside (or above) the window: recorded."""
    TOO_OLD = 1
    """Below the window (``counter <= highest - size``), or outside the u64 counter space."""
    DUPLICATE = 2
    """Inside the window and already recorded."""


FRESH: Final = ReplayVerdict.FRESH
TOO_OLD: Final = ReplayVerdict.TOO_OLD
DUPLICATE: Final = ReplayVerdict.DUPLICATE


class ReplayWindow:
    """Sliding-window anti-replay over 64-bit counters (RFC 6479 / wireguard-go style bitmap).

    A counter is *fresh* when it is in ``[0, 2**64)``, has not been recorded, and is
    larger than ``highest - size`` (the window holds ``highest`` and the ``size - 1``
    counters below it). Counters above ``highest`` are always fresh and slide the window.

    The bitmap is one ``bytearray`` (``size / 8 + 8`` bytes: 1 KiB for the default window,
    where a list of 64-bit ints took about 5 KiB), addressed a byte at a time, so the
    per-packet work handles only small cached integers: counter ``c`` is bit ``c & 7`` of
    byte ``(c >> 3) % len``. Read as native 64-bit words (``_ring``) it is the ring of
    ``size / 64 + 1`` blocks of RFC 6479.
    """

    __slots__ = ("_bits", "_nbytes", "highest", "size")

    size: int
    """How many counters, ending at ``highest``, are remembered."""
    highest: int
    """Largest counter recorded so far; -1 before the first one."""

    def __init__(self, size: int = DEFAULT_WINDOW) -> None:
        if size < _BLOCK_BITS:
            raise ValueError(f"replay window must hold at least {_BLOCK_BITS} counters")
        self.size = size
        self.highest = -1
        # One block more than the window needs, so that sliding never clears a byte
        # that still holds a counter inside the window.
        blocks = -(-size // _BLOCK_BITS) + 1
        self._nbytes = blocks * (_BLOCK_BITS >> _BYTE_SHIFT)
        self._bits = bytearray(self._nbytes)

    def __repr__(self) -> str:
        return f"ReplayWindow(size={self.size}, highest={self.highest})"

    @property
    def _ring(self) -> memoryview:
        """The bitmap as its ring of 64-bit blocks (a read-only view, for tests)."""
        return memoryview(self._bits).toreadonly().cast("Q")

    def check(self, counter: int) -> bool:
        """True if ``counter`` would be accepted now. Changes nothing."""
        if counter < 0 or counter >= _COUNTER_LIMIT:
            return False
        if counter > self.highest:
            return True
        if self.highest - counter >= self.size:
            return False
        byte = self._bits[(counter >> _BYTE_SHIFT) % self._nbytes]
        return not byte & _BITS[counter & _BYTE_MASK]

    def update(self, counter: int) -> ReplayVerdict:
        """Record ``counter`` if it is fresh (FRESH); else say why not, recording nothing."""
        bits = self._bits
        highest = self.highest
        if counter > highest:
            if counter >= _COUNTER_LIMIT:
                return TOO_OLD
            index = counter >> _BYTE_SHIFT
            current = highest >> _BYTE_SHIFT  # -1 >> 3 == -1: nothing recorded yet
            if index != current:
                self._slide(current, index)
            self.highest = counter
            slot = index % self._nbytes
            bits[slot] |= _BITS[counter & _BYTE_MASK]  # above highest: never recorded
            return FRESH
        if counter < 0 or highest - counter >= self.size:
            return TOO_OLD
        slot = (counter >> _BYTE_SHIFT) % self._nbytes
        bit = _BITS[counter & _BYTE_MASK]
        old = bits[slot]
        if old & bit:
            return DUPLICATE
        bits[slot] = old | bit
        return FRESH

    def _slide(self, current: int, index: int) -> None:
        """Clear the bytes after ``current`` up to ``index`` (ring positions), all of them
        when the jump is longer than the ring."""
        bits, nbytes = self._bits, self._nbytes
        steps = index - current
        if steps == 1:
            bits[index % nbytes] = 0
            return
        if steps >= nbytes:
            bits[:] = bytes(nbytes)
            return
        start = (current + 1) % nbytes
        end = start + steps
        if end <= nbytes:
            bits[start:end] = bytes(steps)
        else:
            bits[start:] = bytes(nbytes - start)
            bits[: end - nbytes] = bytes(end - nbytes)


DUPLICATE_WINDOW_S: Final = 1.0
"""Length of one duplicate-rate window (seconds)."""

DUPLICATE_ALARM_SLACK: Final = 8
"""Duplicates a window may hold beyond ``ratio`` of its datagrams before they alarm. For a
link that copies a share ``p`` below the ratio, ``duplicates - ratio * received`` is a
random walk drifting down, and the slack is how far chance must carry it up: at 5 %
copies and the default 0.10 that happens with a probability of about 1e-10 (the
random-walk bound ``exp(-2 * slack * drift / variance)``), also in the first second of a
session, when no earlier window is carried over. A replay flood crosses it after about
``slack / (1 - ratio)`` copies."""


class DuplicateMeter:
    """The share of duplicates among a session's authentic datagrams, over about a second.

    Two counters and a window start, O(1) per datagram: ``fresh`` counts a recorded
    datagram, ``duplicate`` counts a duplicate and says whether the duplicates are now
    more than ``ratio`` of the received datagrams plus ``DUPLICATE_ALARM_SLACK``. When a
    window of ``DUPLICATE_WINDOW_S`` ends, both counters are halved (after two silent
    windows they restart at zero), so a busy session's share does not restart from nothing
    every second: a duplicate early in a window is weighed against the window before too.
    """

    __slots__ = ("_duplicates", "_received", "_start", "ratio")

    ratio: float
    """Duplicates above this share of the received datagrams (plus the slack) alarm."""

    def __init__(self, ratio: float, now: float) -> None:
        self.ratio = ratio
        self._received = 0
        self._duplicates = 0
        self._start = now

    def __repr__(self) -> str:
        return f"DuplicateMeter(ratio={self.ratio}, {self._duplicates}/{self._received})"

    def configure(self, ratio: float) -> None:
        """A reloaded policy's ratio applies from the next datagram on."""
        self.ratio = ratio

    def fresh(self, now: float) -> None:
        """One authentic, recorded datagram."""
        if now - self._start >= DUPLICATE_WINDOW_S:
            self._roll(now)
        self._received += 1

    def duplicate(self, now: float) -> bool:
        """One authentic duplicate; True if duplicates are now above the alarm line."""
        if now - self._start >= DUPLICATE_WINDOW_S:
            self._roll(now)
        self._received += 1
        self._duplicates += 1
        return self._duplicates > self.ratio * self._received + DUPLICATE_ALARM_SLACK

    def _roll(self, now: float) -> None:
        if now - self._start >= 2 * DUPLICATE_WINDOW_S:
            self._received = self._duplicates = 0
        else:
            self._received >>= 1
            self._duplicates >>= 1
        self._start = now


def stale_drop(verdict: Drop, validated: bool, meter: DuplicateMeter, now: float) -> Drop:
    """The drop a stale datagram (``Drop.TOO_OLD`` or ``Drop.DUPLICATE`` from
    ``SessionCipher.open``) is counted as on the receive side, from a source that is
    (``validated``) or is not a validated path of the session.

    From a validated path: TOO_OLD stays TOO_OLD (a late datagram of a slower path), and a
    DUPLICATE stays DUPLICATE while the session's duplicates stay below the meter's line.
    Anything else (an unvalidated source, or duplicates above the ratio) is
    ``Drop.REPLAY``, which the caller reports as a SECURITY_EVENT.
    """
    if not validated:
        return Drop.REPLAY
    if verdict is Drop.DUPLICATE and meter.duplicate(now):
        return Drop.REPLAY
    return verdict


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
