"""Anti-replay: a sliding bitmap window over 64-bit counters, and strictly monotonic nonces.

``ReplayWindow`` is the RFC 6479 bitmap as in wireguard-go ``replay/replay.go``: a ring of
64-bit blocks that slides forward with the highest counter seen. Counters may arrive out
of order (several paths reorder), so any counter within ``size`` of the highest one is
accepted once. Memory is one ``bytearray``, updated a byte at a time (no per-packet object
beyond the counter's own integers), of 16 bytes while every counter below its span is
recorded (in-order traffic: an idle session's probes), growing as far as ``size / 8 + 8``
bytes when counters go missing or arrive out of order, shrinking again when the gaps have
been filled or have left the window. A rejected
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


_MIN_RING: Final = 16
"""Bytes of the smallest ring (two blocks, 128 counters): what a window of in-order
counters holds, whatever its ``size``."""
_SHRINK_EVERY: Final = 63
"""A ring larger than ``_MIN_RING`` checks whether it can shrink each time the highest
counter enters a new 64-byte stretch (``byte index & _SHRINK_EVERY == 0``: every 512
counters)."""
_DONE: Final = 0xFF
"""A byte whose eight counters are all recorded."""
_ALL_DONE: Final = b"\xff"


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

    The bitmap is one ``bytearray`` ring addressed a byte at a time, so the per-packet work
    handles only small cached integers: counter ``c`` is bit ``c & 7`` of byte
    ``(c >> 3) % len``. The ring holds the bytes of the ``len`` newest byte indexes, up to
    the one of ``highest``; every counter of the window below them is recorded (the
    invariant). A ring of ``size / 8 + 8`` bytes holds the whole window; most of the time
    a much smaller one does: when the byte a slide would overwrite still has an
    unrecorded counter inside the window, the ring grows first (doubling, from 16 bytes
    up to the whole window), and every 512 counters a grown ring shrinks to what its
    oldest unrecorded counter needs. Read as native 64-bit words (``_ring``) it is a ring
    of 64-bit blocks as in RFC 6479.
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
        self._nbytes = _MIN_RING
        self._bits = bytearray(_MIN_RING)

    def __repr__(self) -> str:
        return f"ReplayWindow(size={self.size}, highest={self.highest})"

    @property
    def _ring(self) -> memoryview:
        """The bitmap as its ring of 64-bit blocks (a read-only view, for tests)."""
        return memoryview(self._bits).toreadonly().cast("Q")

    @property
    def max_ring_bytes(self) -> int:
        """The largest the ring gets: one block more than the window needs, so that sliding
        never clears a byte that still holds a counter inside the window."""
        return (-(-self.size // _BLOCK_BITS) + 1) * (_BLOCK_BITS >> _BYTE_SHIFT)

    def check(self, counter: int) -> bool:
        """True if ``counter`` would be accepted now. Changes nothing."""
        if counter < 0 or counter >= _COUNTER_LIMIT:
            return False
        if counter > self.highest:
            return True
        if self.highest - counter >= self.size:
            return False
        index = counter >> _BYTE_SHIFT
        if index <= (self.highest >> _BYTE_SHIFT) - self._nbytes:
            return False  # below the ring, inside the window: recorded (the invariant)
        byte = self._bits[index % self._nbytes]
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
            nbytes = self._nbytes
            slot = index % nbytes
            if index == current:
                pass
            elif (
                index - current == 1
                and (index & _SHRINK_EVERY or nbytes == _MIN_RING)
                and (
                    bits[slot] == _DONE
                    or index < nbytes
                    or ((index - nbytes) << _BYTE_SHIFT) + _BYTE_MASK <= counter - self.size
                )
            ):
                # The common slide: one byte on, and the byte it overwrites is done (all
                # recorded, before counter 0, or below the window).
                bits[slot] = 0
            else:
                self._slide(current, index, counter)
                bits, slot = self._bits, index % self._nbytes
            self.highest = counter
            bits[slot] |= _BITS[counter & _BYTE_MASK]  # above highest: never recorded
            return FRESH
        if counter < 0 or highest - counter >= self.size:
            return TOO_OLD
        index = counter >> _BYTE_SHIFT
        nbytes = self._nbytes
        if index <= (highest >> _BYTE_SHIFT) - nbytes:
            return DUPLICATE  # below the ring, inside the window: recorded (the invariant)
        slot = index % nbytes
        bit = _BITS[counter & _BYTE_MASK]
        old = bits[slot]
        if old & bit:
            return DUPLICATE
        bits[slot] = old | bit
        return FRESH

    def _slide(self, current: int, index: int, counter: int) -> None:
        """Move the ring from byte index ``current`` to ``index`` (``counter`` becomes the
        highest): first resize it to what the oldest byte still open needs (grow, or
        shrink to half or less), then clear the bytes after ``current`` up to ``index``
        (ring positions), all of them when the jump is longer than the ring."""
        need = index - self._lowest_open(current, index, counter) + 1
        size = _MIN_RING
        while size < need:
            size <<= 1
        size = min(size, self.max_ring_bytes)
        if size > self._nbytes or size <= self._nbytes >> 1:
            self._resize(current, size)
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

    def _lowest_open(self, current: int, index: int, counter: int) -> int:
        """The lowest byte index that must stay in the ring once ``counter`` (in byte
        ``index``) is the highest: the first byte from the window's lowest counter on
        that may hold an unrecorded counter (a stored byte not all recorded, or a byte
        the slide skips), else ``index``. Conservative at the window's lower edge: a byte
        there counts as open if any of its counters is unrecorded."""
        low = max(0, (counter - self.size + 1) >> _BYTE_SHIFT)
        first = max(low, current - self._nbytes + 1)
        stored = self._stored(first, current)
        done = len(stored) - len(stored.lstrip(_ALL_DONE))
        if done < len(stored):
            return first + done
        skipped = max(current + 1, low)
        return skipped if skipped < index else index

    def _stored(self, first: int, last: int) -> bytes:
        """The ring's bytes of byte indexes ``first`` to ``last`` (all in the ring), in order."""
        length = last - first + 1
        if length <= 0:
            return b""
        bits, nbytes = self._bits, self._nbytes
        start = first % nbytes
        end = start + length
        if end <= nbytes:
            return bytes(bits[start:end])
        return bytes(bits[start:]) + bytes(bits[: end - nbytes])

    def _resize(self, current: int, size: int) -> None:
        """A ring of ``size`` bytes holding the newest stored bytes (up to ``current``); a
        larger ring's older bytes were below the ring, so all recorded (or outside the
        window, where nothing is fresh): all ones."""
        keep = min(size, self._nbytes)
        stored = self._stored(current - keep + 1, current)
        ring = bytearray(_ALL_DONE * size)
        start = (current - keep + 1) % size
        end = start + keep
        if end <= size:
            ring[start:end] = stored
        else:
            ring[start:] = stored[: size - start]
            ring[: end - size] = stored[size - start :]
        self._bits, self._nbytes = ring, size


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
