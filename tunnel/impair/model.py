"""The impairment model of the jvpn-impair relay: settings, validation, per-direction plan.

:class:`Impairment` is one direction's settings (validated when built);
``_Link`` applies them to each datagram with the injected ``random.Random`` and keeps that
direction's counters and rate-limiter clock. No sockets, no event loop.
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any, Final, Literal

Direction = Literal["up", "down", "both"]

DIRECTIONS: Final = ("up", "down")
"""'up' = downstream client -> upstream (gateway); 'down' = upstream -> client."""

REORDER_EXTRA_MS: Final = 20.0
"""Minimum extra hold of a reordered datagram; long enough for later ones to overtake."""

MAX_DELAY_MS: Final = 60_000.0
"""Upper bound for delay_ms and jitter_ms: a longer 'delay' is a blackhole."""

RATE_BACKLOG_MAX_S: Final = 0.5
"""Rate limiter queue: a datagram that would wait longer than this is dropped (overflow)."""

_RATIOS: Final = ("loss", "duplicate", "reorder")
_TIMES: Final = ("delay_ms", "jitter_ms")
_COUNTERS: Final = (
    "received",
    "forwarded",
    "dropped_loss",
    "dropped_blackhole",
    "dropped_overflow",
    "dropped_error",
    "duplicated",
    "reordered",
)


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return number


@dataclasses.dataclass(frozen=True, slots=True)
class Impairment:
    """What one direction of the relay does to each datagram. All zero = pass-through.

    Applied in this order: blackhole, loss, duplicate, then per copy: rate limit, delay
    with jitter, reorder hold.
    """

    loss: float = 0.0
    """Probability in [0, 1] that a datagram is dropped."""
    delay_ms: float = 0.0
    """Fixed one-way delay added to every datagram, in milliseconds."""
    jitter_ms: float = 0.0
    """Uniform random +/- variation of the delay (clamped at 0); may reorder by itself."""
    duplicate: float = 0.0
    """Probability in [0, 1] that a datagram is sent twice."""
    reorder: float = 0.0
    """Probability in [0, 1] that a datagram is held back an extra max(20 ms, delay_ms)."""
    blackhole: bool = False
    """Drop everything (the path is dead) while True."""
    rate_kbit: float | None = None
    """Bottleneck rate in kbit/s (serialisation delay, 0.5 s queue); None = unlimited."""

    def __post_init__(self) -> None:
        for name in _RATIOS:
            value = _number(name, getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value!r}")
            object.__setattr__(self, name, value)
        for name in _TIMES:
            value = _number(name, getattr(self, name))
            if not 0.0 <= value <= MAX_DELAY_MS:
                raise ValueError(f"{name} must be within [0, {MAX_DELAY_MS:g}] ms, got {value!r}")
            object.__setattr__(self, name, value)
        if not isinstance(self.blackhole, bool):
            raise ValueError(f"blackhole must be true or false, got {self.blackhole!r}")
        if self.rate_kbit is not None:
            rate = _number("rate_kbit", self.rate_kbit)
            if rate <= 0.0:
                raise ValueError(f"rate_kbit must be > 0 (null/None = unlimited), got {rate!r}")
            object.__setattr__(self, "rate_kbit", rate)

    @property
    def clean(self) -> bool:
        """True when this impairment changes nothing (the fast path)."""
        return self == _CLEAN

    def replace(self, **fields: object) -> Impairment:
        """A copy with ``fields`` changed; ValueError names an unknown or invalid field."""
        for name in fields:
            if name not in _FIELDS:
                raise ValueError(f"unknown impairment field {name!r} (known: {', '.join(_FIELDS)})")
        return dataclasses.replace(self, **fields)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of the fields."""
        return dataclasses.asdict(self)


_CLEAN: Final = Impairment()
_FIELDS: Final = tuple(f.name for f in dataclasses.fields(Impairment))


class _Link:
    """One direction: its impairment, its counters, its rate-limiter clock."""

    __slots__ = ("busy_until", "clean", "imp", *_COUNTERS)

    def __init__(self, imp: Impairment) -> None:
        self.imp = imp
        self.clean = imp.clean
        self.busy_until = 0.0
        self.reset_counters()

    def set(self, imp: Impairment) -> None:
        self.imp = imp
        self.clean = imp.clean
        if imp.rate_kbit is None:
            self.busy_until = 0.0

    def reset_counters(self) -> None:
        self.received = 0
        self.forwarded = 0
        self.dropped_loss = 0
        self.dropped_blackhole = 0
        self.dropped_overflow = 0
        self.dropped_error = 0
        self.duplicated = 0
        self.reordered = 0

    def counters(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in _COUNTERS}

    def count_received(self) -> None:
        """A datagram arrived in this direction (before any impairment)."""
        self.received += 1

    def count_forwarded(self) -> None:
        """A copy left the relay."""
        self.forwarded += 1

    def count_error(self) -> None:
        """A copy could not be sent (no mapping, socket error)."""
        self.dropped_error += 1

    def count_overflow(self) -> None:
        """A copy was dropped because a queue (rate limiter or delayed set) was full."""
        self.dropped_overflow += 1

    def plan(self, size: int, now: float, rng: random.Random) -> list[float]:
        """Departure times (loop clock) of the copies of one datagram; [] = dropped."""
        imp = self.imp
        if imp.blackhole:
            self.dropped_blackhole += 1
            return []
        if imp.loss and rng.random() < imp.loss:
            self.dropped_loss += 1
            return []
        copies = 1
        if imp.duplicate and rng.random() < imp.duplicate:
            copies = 2
            self.duplicated += 1
        out: list[float] = []
        for _ in range(copies):
            depart = self._depart(size, now)
            if depart is None:
                self.dropped_overflow += 1
                continue
            out.append(depart + self._delay_ms(rng) / 1000.0)
        return out

    def _depart(self, size: int, now: float) -> float | None:
        """When the rate limiter lets a copy go: ``now`` if unlimited; None: backlog full."""
        rate_kbit = self.imp.rate_kbit
        if rate_kbit is None:
            return now
        start = max(now, self.busy_until)
        if start - now > RATE_BACKLOG_MAX_S:
            return None
        self.busy_until = start + size * 8 / (rate_kbit * 1000.0)
        return self.busy_until

    def _delay_ms(self, rng: random.Random) -> float:
        """One copy's delay: base, +/- jitter, plus the reorder hold when it is picked."""
        imp = self.imp
        delay_ms = imp.delay_ms
        if imp.jitter_ms:
            delay_ms = max(0.0, delay_ms + rng.uniform(-imp.jitter_ms, imp.jitter_ms))
        if imp.reorder and rng.random() < imp.reorder:
            delay_ms += max(REORDER_EXTRA_MS, imp.delay_ms)
            self.reordered += 1
        return delay_ms
