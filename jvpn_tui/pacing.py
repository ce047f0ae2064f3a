"""SnapshotPacer: which taken snapshot is worth drawing now.

Every snapshot differs from the previous one in its ticking fields (seq, timestamp,
uptime, key age), so drawing each one keeps an idle screen busy. The pacer lets a
snapshot through at once when anything else changed, and otherwise at most once per
``period`` (uptime then moves once a second, as it is shown).
"""

from __future__ import annotations

import dataclasses
from typing import Final

from tunnel.api import EngineSnapshot

TICKING_PERIOD_S: Final = 1.0
"""A snapshot whose only news is its ticking fields is drawn at most this often."""


def steady_part(snapshot: EngineSnapshot) -> EngineSnapshot:
    """``snapshot`` without the fields that change on every publication by themselves
    (seq, timestamp, uptime, key age): equal steady parts mean nothing else changed."""
    session = dataclasses.replace(snapshot.session, uptime_s=0.0, key_age_s=0.0)
    return dataclasses.replace(snapshot, seq=0, ts_ms=0, session=session)


class SnapshotPacer:
    """Remembers the last snapshot let through, its steady part and when."""

    def __init__(self, period: float = TICKING_PERIOD_S) -> None:
        self._period = period
        self._passed: EngineSnapshot | None = None
        """The last snapshot let through."""
        self._passed_steady: EngineSnapshot | None = None
        self._passed_at = 0.0

    def due(self, latest: EngineSnapshot, now: float) -> bool:
        """True when ``latest`` should be drawn now (then it counts as let through).

        False for the snapshot already let through, and for one whose only news is its
        ticking fields less than ``period`` after the last one; the caller asks again on
        its next tick, with the same or a newer snapshot."""
        if latest is self._passed:
            return False
        steady = steady_part(latest)
        if steady == self._passed_steady and now - self._passed_at < self._period:
            return False
        self._passed, self._passed_steady, self._passed_at = latest, steady, now
        return True
