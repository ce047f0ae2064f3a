"""Per-path health: RTT EWMA, jitter, loss over a sliding window, misses, death, score.

One :class:`PathHealth` per candidate transport (DESIGN D5). It is fed by the client
protocol machine and never reads a clock: every input carries ``now`` (seconds,
monotonic, chosen by the driver). Everything a peer can grow is bounded: outstanding
probes (:data:`MAX_OUTSTANDING_PROBES`), remembered expired probes
(:data:`MAX_LATE_PROBES`), loss outcomes (:data:`MAX_LOSS_SAMPLES`) and the RTT
history (``history``).

Inputs::

    probe_sent(id, now)     a PROBE left on this path
    probe_acked(id, now)    its PROBE_ACK arrived (authenticated) -> RTT sample
    inbound(now)            any authenticated packet arrived on this path
    data_inbound(now)       ... and it was DATA (after inbound): the traffic estimator
    expire(now)             probes unanswered for probe_timeout_ms() become misses

Estimators (RFC 6298 section 2, in milliseconds): the first sample sets
``srtt = R`` and ``rttvar = R / 2``; each later sample ``R`` does
``rttvar = 3/4 rttvar + 1/4 |srtt - R|`` and then ``srtt = 7/8 srtt + 1/8 R``.
``jitter_ms`` is ``rttvar``.

A probe is *lost* (a miss) when it stays unanswered for ``probe_timeout_ms()`` or is
evicted from the full outstanding map. An ack that comes after its probe was counted
lost (a *late ack*) is not an ack: ``probe_acked`` returns ``None``, the loss stands and
the miss count is not reset, but its RTT still feeds the estimators so the timeout
adapts when a path's RTT steps up beyond it (otherwise every probe would expire forever).

Death has two rules:
- idle (``dead_at``): no authenticated inbound for
  ``max(dead_min_ms, dead_rtt_multiplier * srtt)``;
- traffic (issue 10; ``traffic_dead_at``): while data flows (``TRAFFIC_MIN_RUN`` DATA
  arrivals in a row, each within ``TRAFFIC_GAP_CAP_MS`` of the one before, the last of
  them at most a few expected gaps before the last inbound), the path is *suspect* after
  ``TRAFFIC_SILENCE_GAPS`` expected inter-arrival times of silence
  (``traffic_suspect_at``; the session probes it at once and fast) and dead when that
  probe burst stays unanswered for ``TRAFFIC_CONFIRM_RTOS`` probe RTOs (srtt + 4 rttvar),
  never before ``dead_traffic_min_ms`` of silence (the policy's floor). The session
  applies it only while another path has answered since the suspicion (``PathSet``): a
  peer that is merely slow (a busy gateway) is silent on every path, a dead path alone.
  A path without traffic is judged by the idle rule alone.

An idle session (issue 11: no inner data either way for ``idle_after_ms``, decided by the
session, which calls :meth:`set_idle`) probes slowly, so silence between its probes says
nothing: while idle the path dies only when a probe stays unanswered, ``dead_after_ms``
after the first probe sent since the last inbound (:meth:`unanswered_since`). When the
session stops being idle, silence counts from that moment (not from the last slow answer),
so the path has the same ``dead_after_ms`` to answer the probe sent then.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Final

from tunnel.core.events import Reason

REASON_CONSECUTIVE_DROPS: Final = Reason.CONSECUTIVE_DROP_EXCEEDED
"""classify(): misses >= max_consecutive_drops (checked first: the sharpest signal)."""
REASON_LOSS: Final = Reason.LOSS_THRESHOLD_EXCEEDED
"""classify(): loss_ratio > loss_threshold (strict, SPEC 8.2)."""
REASON_LATENCY: Final = Reason.LATENCY_THRESHOLD_EXCEEDED
"""classify(): smoothed RTT > latency threshold (optional signal, checked last)."""

MAX_OUTSTANDING_PROBES: Final = 64
"""Probes in flight per path; the oldest is evicted as lost. 64 x 100 ms = 6.4 s of probing."""

MAX_LATE_PROBES: Final = 64
"""Expired probes remembered so a late ack can still teach the RTT estimators."""

LATE_ACK_HORIZON_MS: Final = 10_000.0
"""A late ack older than this is ignored: such an RTT is no use to a failover decision."""

MAX_LOSS_SAMPLES: Final = 1024
"""Loss outcomes kept, whatever the window: bounds memory if probes are sent very fast."""

MAX_PROBE_ORDINALS: Final = MAX_OUTSTANDING_PROBES + MAX_LATE_PROBES
"""Probe ids whose send ordinal is remembered (for the direction split of a late ack)."""

SCORE_SCALE: Final = 1000.0
"""Score numerator: a clean path with an effective RTT of 0 ms scores 100 (1000 / 10)."""

SCORE_RTT_OFFSET_MS: Final = 10.0
"""Added to the effective RTT so that a few ms between two fast paths is not 'better'."""

SCORE_JITTER_WEIGHT: Final = 2.0
"""Effective RTT = srtt + 2 * jitter: a jittery path delays packets beyond its mean."""

SCORE_MEASURED_FLOOR: Final = 0.01
"""Every live, measured path scores above this, even at 100 % loss in the window."""

SCORE_UNMEASURED: Final = 0.005
"""A live path without an RTT sample: above 0 (a last resort) but below any measured one."""

TRAFFIC_MIN_RUN: Final = 8
"""DATA arrivals in a row (each within TRAFFIC_GAP_CAP_MS) before traffic is 'flowing'."""

TRAFFIC_GAP_CAP_MS: Final = 250.0
"""A longer gap between two DATA arrivals ends the flow (the estimator starts again)."""

TRAFFIC_GAP_ALPHA: Final = 0.125
"""EWMA weight of one inter-arrival sample (RFC 6298's 1/8, as for srtt)."""

TRAFFIC_SILENCE_GAPS: Final = 4.0
"""Silence of this many expected inter-arrival times makes a path with traffic suspect
(10 % random loss leaves four losses in a row once in 10^4 packets; the probe burst, not
the silence, decides)."""

TRAFFIC_SUSPECT_MIN_MS: Final = 10.0
"""... but never less than this (batched arrivals read as gaps of zero)."""

TRAFFIC_CONFIRM_RTOS: Final = 2.0
"""A suspect path with traffic is dead when its probe burst stays unanswered this many
probe RTOs (srtt + 4 rttvar) after the suspicion: a probe and its ack cross the path."""

_MS: Final = 1000.0


def path_score(loss_ratio: float, srtt_ms: float | None, jitter_ms: float) -> float:
    """Score of a live path (DESIGN D9): higher is better, deterministic, pure.

    ``SCORE_MEASURED_FLOOR + 1000 * (1 - loss)^2 / (srtt + 2 * jitter + 10)``;
    ``SCORE_UNMEASURED`` when ``srtt_ms`` is None. Loss is clamped to 0..1, RTT and
    jitter to >= 0. Non-increasing in loss, RTT and jitter. A dead path scores 0.0;
    that is decided by :meth:`PathHealth.score`, not here.
    """
    if srtt_ms is None:
        return SCORE_UNMEASURED
    loss = min(1.0, max(0.0, loss_ratio))
    effective_ms = max(0.0, srtt_ms) + SCORE_JITTER_WEIGHT * max(0.0, jitter_ms)
    delivered = 1.0 - loss
    quality = delivered * delivered  # squared: loss hurts more than linearly (TCP backoff)
    return SCORE_MEASURED_FLOOR + SCORE_SCALE * quality / (effective_ms + SCORE_RTT_OFFSET_MS)


@dataclass(frozen=True, slots=True)
class PathStats:
    """Immutable snapshot of one path's health, for events, the trace and the UI."""

    path_id: int
    """Transport id this snapshot describes."""
    srtt_ms: float | None
    """Smoothed RTT in ms; None until the first RTT sample."""
    jitter_ms: float
    """RFC 6298 rttvar in ms (0.0 before the first sample)."""
    loss_ratio: float
    """0..1 over the loss window; 0.0 while fewer than min_loss_samples outcomes."""
    consecutive_misses: int
    """Probes lost in a row since the last timely ack."""
    score: float
    """Higher is better; 0.0 when dead (see path_score)."""
    alive: bool
    """False once no authenticated inbound arrived for dead_after_ms."""
    rtt_history: tuple[float, ...]
    """Last RTT samples in ms, oldest first (bounded), for a sparkline."""
    loss_up: float = 0.0
    """Client -> gateway loss over the window (see PathHealth.direction_loss)."""
    loss_down: float = 0.0
    """Gateway -> client loss over the window."""
    loss_known: bool = False
    """``loss_ratio`` rests on at least ``min_loss_samples`` probes (else it reads 0.0)."""
    direction_known: bool = False
    """``loss_up``/``loss_down`` rest on enough probes (a standby path's rarely do)."""


class PathHealth:
    """Health estimators of one path. Sans-I/O: time comes in as ``now`` (seconds)."""

    def __init__(
        self,
        path_id: int,
        *,
        loss_window_ms: float = 2000,
        dead_min_ms: float = 300,
        dead_rtt_multiplier: float = 4.0,
        min_loss_samples: int = 8,
        dead_traffic_min_ms: float = 50,
        history: int = 60,
        now: float = 0.0,
    ) -> None:
        if history < 1:
            raise ValueError(f"history must be >= 1, got {history}")
        self.path_id = path_id
        self._loss_window_ms = 0.0
        self._dead_min_ms = 0.0
        self._dead_rtt_multiplier = 0.0
        self._min_loss_samples = 0
        self._dead_traffic_min_ms = 0.0
        self.reconfigure(
            loss_window_ms=loss_window_ms,
            dead_min_ms=dead_min_ms,
            dead_rtt_multiplier=dead_rtt_multiplier,
            min_loss_samples=min_loss_samples,
            dead_traffic_min_ms=dead_traffic_min_ms,
        )
        self._created = now
        self._seen_now = now
        self.srtt_ms: float | None = None
        self.jitter_ms: float = 0.0
        self.consecutive_misses: int = 0
        self.last_inbound: float | None = None
        self.last_data: float | None = None
        """When the last authenticated DATA arrived (the traffic rule's estimator)."""
        self.data_gap_ms: float | None = None
        """EWMA of the gaps between DATA arrivals (None: no flow measured)."""
        self._data_run = 0
        self._asked: float | None = None
        """When the first probe since the last inbound left (stale once inbound is later)."""
        self._idle = False
        """The session is idle: silence between slow probes is no death (set_idle)."""
        self._floor: float | None = None
        """Silence counts from here at the earliest: when the session stopped being idle."""
        self._outstanding: OrderedDict[int, float] = OrderedDict()
        self._late: OrderedDict[int, float] = OrderedDict()
        self._outcomes: deque[tuple[float, bool]] = deque(maxlen=MAX_LOSS_SAMPLES)
        self._history: deque[float] = deque(maxlen=history)
        self._sent = 0
        self._acks = 0
        self._ordinal: OrderedDict[int, int] = OrderedDict()
        self._counts: deque[tuple[float, int, int, int]] = deque(maxlen=MAX_LOSS_SAMPLES)
        """Per PROBE_ACK with the gateway's count: (arrival, the probe's send ordinal, the
        gateway's ``rx_probes``, acks received so far)."""

    def reconfigure(
        self,
        *,
        loss_window_ms: float,
        dead_min_ms: float,
        dead_rtt_multiplier: float,
        min_loss_samples: int,
        dead_traffic_min_ms: float = 50,
    ) -> None:
        """Apply new policy numbers (policy reload); measurements are kept."""
        if not (math.isfinite(dead_traffic_min_ms) and dead_traffic_min_ms > 0):
            raise ValueError(
                f"dead_traffic_min_ms must be finite and > 0, got {dead_traffic_min_ms}"
            )
        if not (math.isfinite(loss_window_ms) and loss_window_ms > 0):
            raise ValueError(f"loss_window_ms must be finite and > 0, got {loss_window_ms}")
        if not (math.isfinite(dead_min_ms) and dead_min_ms > 0):
            raise ValueError(f"dead_min_ms must be finite and > 0, got {dead_min_ms}")
        if not (math.isfinite(dead_rtt_multiplier) and dead_rtt_multiplier > 0):
            raise ValueError(
                f"dead_rtt_multiplier must be finite and > 0, got {dead_rtt_multiplier}"
            )
        if min_loss_samples < 0:
            raise ValueError(f"min_loss_samples must be >= 0, got {min_loss_samples}")
        self._loss_window_ms = float(loss_window_ms)
        self._dead_min_ms = float(dead_min_ms)
        self._dead_rtt_multiplier = float(dead_rtt_multiplier)
        self._min_loss_samples = int(min_loss_samples)
        self._dead_traffic_min_ms = float(dead_traffic_min_ms)

    # -- inputs ----------------------------------------------------------------------

    def probe_sent(self, probe_id: int, now: float) -> None:
        """A PROBE with ``probe_id`` left on this path at ``now``.

        Raises ValueError if ``probe_id`` is still outstanding (a caller bug: ids must
        be unique among probes in flight). When the map is full the oldest probe is
        evicted and counted as lost.
        """
        self._see(now)
        if probe_id in self._outstanding:
            raise ValueError(f"probe id {probe_id} is already outstanding on path {self.path_id}")
        self._late.pop(probe_id, None)
        asked, last = self._asked, self.last_inbound
        if asked is None or (last is not None and asked <= last):
            self._asked = now
        self._sent += 1
        self._ordinal[probe_id] = self._sent
        self._ordinal.move_to_end(probe_id)
        while len(self._ordinal) > MAX_PROBE_ORDINALS:
            self._ordinal.popitem(last=False)
        while len(self._outstanding) >= MAX_OUTSTANDING_PROBES:
            old_id, old_sent = self._outstanding.popitem(last=False)
            self._remember_late(old_id, old_sent)
            self._record_outcome(now, lost=True)
        self._outstanding[probe_id] = now

    def awaits(self, probe_id: int) -> bool:
        """``probe_id`` was sent and neither acknowledged nor counted lost yet."""
        return probe_id in self._outstanding

    def probe_acked(self, probe_id: int, now: float, rx_probes: int | None = None) -> float | None:
        """The ack for ``probe_id`` arrived at ``now``; returns the RTT in ms.

        Returns None for an unknown or duplicate id, and for a probe already counted
        lost (a late ack still feeds the RTT estimators, see the module docstring).
        The ack is authenticated inbound traffic, so it also counts as :meth:`inbound`.
        ``rx_probes`` is the gateway's count of probes received on this path (PROBE_ACK):
        it feeds :meth:`direction_loss`.
        """
        self.inbound(now)
        ordinal = self._ordinal.pop(probe_id, None)
        if ordinal is not None:
            self._acks += 1
            if rx_probes is not None:
                self._counts.append((now, ordinal, rx_probes, self._acks))
        sent = self._outstanding.pop(probe_id, None)
        if sent is not None:
            rtt_ms = max(0.0, (now - sent) * _MS)
            self._rtt_sample(rtt_ms)
            self.consecutive_misses = 0
            self._record_outcome(now, lost=False)
            return rtt_ms
        late_sent = self._late.pop(probe_id, None)
        if late_sent is not None:
            rtt_ms = max(0.0, (now - late_sent) * _MS)
            if rtt_ms <= LATE_ACK_HORIZON_MS:
                self._rtt_sample(rtt_ms)
        return None

    def inbound(self, now: float) -> None:
        """An authenticated packet (any kind) arrived on this path at ``now``."""
        if now > self._seen_now:  # _see(now), inlined: this runs for every datagram
            self._seen_now = now
        last = self.last_inbound
        if last is None or now > last:
            self.last_inbound = now

    def data_inbound(self, now: float) -> None:
        """The authenticated packet that arrived at ``now`` (after :meth:`inbound`) was DATA:
        one inter-arrival sample for the traffic rule."""
        last = self.last_data
        self.last_data = now
        gap = TRAFFIC_GAP_CAP_MS + 1.0 if last is None else (now - last) * _MS
        if gap > TRAFFIC_GAP_CAP_MS:
            self._data_run, self.data_gap_ms = 1, None
            return
        if gap < 0.0:
            gap = 0.0
        self._data_run += 1
        average = self.data_gap_ms
        if average is None:
            self.data_gap_ms = gap
        else:
            self.data_gap_ms = average + TRAFFIC_GAP_ALPHA * (gap - average)

    def set_idle(self, idle: bool, now: float) -> None:
        """The session is idle (slow probes: only an unanswered probe counts as silence) or
        no longer (from ``now``: silence counts from ``now`` at the earliest)."""
        if idle == self._idle:
            return
        self._idle = idle
        if not idle:
            self._floor = now

    def unanswered_since(self) -> float | None:
        """When the first probe sent since the last authenticated inbound left; None when
        every probe sent was followed by inbound (or none was sent)."""
        asked, last = self._asked, self.last_inbound
        if asked is None or (last is not None and asked <= last):
            return None
        return asked

    def traffic_suspect_at(self) -> float | None:
        """When a path with flowing traffic becomes suspect (see the module docstring):
        ``TRAFFIC_SILENCE_GAPS`` expected gaps (at least ``TRAFFIC_SUSPECT_MIN_MS``) after
        the last inbound. None while no traffic flows, or once inbound other than data (a
        probe's answer) has come well after the last data: the traffic has stopped and the
        path is alive, the idle rule judges it."""
        gap, last_data, last = self.data_gap_ms, self.last_data, self.last_inbound
        if gap is None or last_data is None or last is None or self._data_run < TRAFFIC_MIN_RUN:
            return None
        silence_ms = max(TRAFFIC_SILENCE_GAPS * gap, TRAFFIC_SUSPECT_MIN_MS)
        if (last - last_data) * _MS >= silence_ms:
            return None
        return last + silence_ms / _MS

    def traffic_dead_at(self) -> float | None:
        """When a suspect path with traffic is dead (None: the traffic rule does not apply):
        ``TRAFFIC_CONFIRM_RTOS`` probe RTOs after the suspicion, at the earliest
        ``dead_traffic_min_ms`` after the last inbound."""
        suspect = self.traffic_suspect_at()
        if suspect is None or self.last_inbound is None:
            return None
        rto_ms = 0.0 if self.srtt_ms is None else self.srtt_ms + 4.0 * self.jitter_ms
        floor = self.last_inbound + self._dead_traffic_min_ms / _MS
        return max(floor, suspect + TRAFFIC_CONFIRM_RTOS * rto_ms / _MS)

    def expire(self, now: float) -> None:
        """Count every probe unanswered for ``probe_timeout_ms()`` as lost (a miss)."""
        self._see(now)
        expired = [pid for pid, sent in self._outstanding.items() if now >= self._expiry(sent)]
        for pid in expired:
            sent = self._outstanding.pop(pid)
            self._remember_late(pid, sent)
            self._record_outcome(self._expiry(sent), lost=True)

    def reset_loss(self) -> None:
        """Forget loss outcomes and consecutive misses (after a switch onto this path).

        Probes still in flight stay outstanding: their outcomes are new information.
        """
        self._outcomes.clear()
        self._counts.clear()
        self.consecutive_misses = 0

    def forget_probes(self) -> None:
        """A new session took the old one's place (DESIGN D15c): the probes in flight were
        sealed with keys the gateway no longer has and will never be answered, and the
        misses while it was gone say nothing about the path. Forget both."""
        self._outstanding.clear()
        self.reset_loss()

    # -- derived values ----------------------------------------------------------------

    def probe_timeout_ms(self) -> float:
        """``max(dead_min_ms, 3 * srtt + 4 * jitter)``; ``dead_min_ms`` before any sample."""
        if self.srtt_ms is None:
            return self._dead_min_ms
        return max(self._dead_min_ms, 3.0 * self.srtt_ms + 4.0 * self.jitter_ms)

    def loss_ratio(self, now: float) -> float:
        """lost / (acked + lost) over outcomes in ``(now - loss_window, now]``.

        0.0 while fewer than ``min_loss_samples`` outcomes lie in the window (or none).
        """
        loss = self._loss(now)
        return 0.0 if loss is None else loss

    def _loss(self, now: float) -> float | None:
        """:meth:`loss_ratio`, or None while it is not measured (too few outcomes)."""
        self._see(now)
        start = now - self._loss_window_ms / _MS
        while self._outcomes and self._outcomes[0][0] <= start:
            self._outcomes.popleft()
        total = 0
        lost = 0
        for t, was_lost in self._outcomes:
            if start < t <= now:
                total += 1
                lost += was_lost
        if total == 0 or total < self._min_loss_samples:
            return None
        return lost / total

    def direction_loss(self, now: float) -> tuple[float, float]:
        """(upstream, downstream) loss over the loss window, from the gateway's counts.

        Between the first and the last PROBE_ACK that arrived in the window: probes sent
        ``ds`` (send ordinals), probes the gateway received ``dr`` (its ``rx_probes``),
        acks that came back ``da``. Upstream loss ``1 - dr/ds``, downstream ``1 - da/dr``,
        each clamped to 0..1. (0.0, 0.0) while ``ds`` < ``min_loss_samples`` (or is 0).
        """
        split = self._direction_split(now)
        return (0.0, 0.0) if split is None else split

    def _direction_split(self, now: float) -> tuple[float, float] | None:
        """:meth:`direction_loss`, or None while it is not measured."""
        start = now - self._loss_window_ms / _MS
        counts = self._counts
        while counts and counts[0][0] <= start:
            counts.popleft()
        if len(counts) < 2:
            return None
        _, seq_a, rx_a, acks_a = counts[0]
        _, seq_b, rx_b, acks_b = counts[-1]
        sent = seq_b - seq_a
        if sent <= 0 or sent < self._min_loss_samples:
            return None
        received = min(sent, (rx_b - rx_a) & 0xFFFFFFFF)
        up = 1.0 - received / sent
        if received == 0:
            return up, 0.0
        down = 1.0 - min(received, max(0, acks_b - acks_a)) / received
        return up, down

    def dead_after_ms(self) -> float:
        """``max(dead_min_ms, dead_rtt_multiplier * srtt)``; ``dead_min_ms`` before any sample."""
        if self.srtt_ms is None:
            return self._dead_min_ms
        return max(self._dead_min_ms, self._dead_rtt_multiplier * self.srtt_ms)

    def dead_at(self) -> float:
        """The ``now`` from which the path is dead unless something arrives.

        The idle rule. Reference: the last authenticated inbound, or the creation time if
        nothing ever arrived. Always a number (a ``float | None`` caller can use it as is):
        ``math.inf`` while idle with no probe unanswered (no silence deadline).
        The traffic rule is :meth:`traffic_dead_at`; the session combines them.
        """
        ref = self.last_inbound if self.last_inbound is not None else self._created
        if self._idle:  # silence between slow probes says nothing; an unanswered one does
            asked = self._asked
            if asked is None or asked <= ref:
                return math.inf
            ref = asked
        elif self._floor is not None and self._floor > ref:
            ref = self._floor
        return ref + self.dead_after_ms() / _MS

    def is_dead(self, now: float) -> bool:
        """True once ``now >= dead_at()`` (inclusive, so a timer at the deadline sees it)."""
        self._see(now)
        return now >= self.dead_at()

    def next_deadline(self) -> float | None:
        """Earliest ``now`` at which :meth:`expire` or :meth:`is_dead` could change something.

        The earliest outstanding probe expiry, and ``dead_at()`` while it lies after the
        latest ``now`` this object was given (once the path is seen dead, only inbound
        can change that, so no timer is needed for it).
        """
        deadline: float | None = None
        if self._outstanding:
            deadline = self._expiry(min(self._outstanding.values()))
        dead = self.dead_at()
        if self._seen_now < dead < math.inf and (deadline is None or dead < deadline):
            deadline = dead
        return deadline

    def classify(
        self,
        now: float,
        *,
        loss_threshold: float,
        max_consecutive_drops: int,
        latency_threshold_ms: float | None = None,
        one_way_threshold: float | None = None,
    ) -> Reason | None:
        """None if healthy, else the :class:`Reason` (SPEC 8.2).

        Priority when several hold: ``consecutive_drop_exceeded`` (misses >= max),
        ``loss_threshold_exceeded`` (loss_ratio > threshold, strict),
        ``latency_threshold_exceeded`` (srtt > threshold, when a threshold is given).
        Latency uses the smoothed RTT, so a single spike does not trip it. Death is not
        a classification: ask :meth:`is_dead`. Call :meth:`expire` first so that
        overdue probes are counted.
        """
        if self.consecutive_misses >= max_consecutive_drops:
            return REASON_CONSECUTIVE_DROPS
        if self.loss_ratio(now) > loss_threshold:
            return REASON_LOSS
        if one_way_threshold is not None and max(self.direction_loss(now)) > one_way_threshold:
            return REASON_LOSS
        if (
            latency_threshold_ms is not None
            and self.srtt_ms is not None
            and self.srtt_ms > latency_threshold_ms
        ):
            return REASON_LATENCY
        return None

    def score(self, now: float) -> float:
        """0.0 when dead, else :func:`path_score` of loss, srtt and jitter."""
        if self.is_dead(now):
            return 0.0
        return path_score(self.loss_ratio(now), self.srtt_ms, self.jitter_ms)

    def stats(self, now: float) -> PathStats:
        """Immutable snapshot at ``now``."""
        loss = self._loss(now)
        split = self._direction_split(now)
        up, down = (0.0, 0.0) if split is None else split
        return PathStats(
            path_id=self.path_id,
            srtt_ms=self.srtt_ms,
            jitter_ms=self.jitter_ms,
            loss_ratio=0.0 if loss is None else loss,
            consecutive_misses=self.consecutive_misses,
            score=self.score(now),
            alive=not self.is_dead(now),
            rtt_history=tuple(self._history),
            loss_up=up,
            loss_down=down,
            loss_known=loss is not None,
            direction_known=split is not None,
        )

    @property
    def outstanding_probes(self) -> int:
        """Probes in flight (bounded by MAX_OUTSTANDING_PROBES)."""
        return len(self._outstanding)

    # -- internals ----------------------------------------------------------------------

    def _see(self, now: float) -> None:
        if now > self._seen_now:
            self._seen_now = now

    def _expiry(self, sent: float) -> float:
        return sent + self.probe_timeout_ms() / _MS

    def _rtt_sample(self, rtt_ms: float) -> None:
        if self.srtt_ms is None:
            self.srtt_ms = rtt_ms
            self.jitter_ms = rtt_ms / 2.0
        else:
            self.jitter_ms = 0.75 * self.jitter_ms + 0.25 * abs(self.srtt_ms - rtt_ms)
            self.srtt_ms = 0.875 * self.srtt_ms + 0.125 * rtt_ms
        self._history.append(rtt_ms)

    def _record_outcome(self, at: float, *, lost: bool) -> None:
        self._outcomes.append((at, lost))
        if lost:
            self.consecutive_misses += 1

    def _remember_late(self, probe_id: int, sent: float) -> None:
        self._late[probe_id] = sent
        while len(self._late) > MAX_LATE_PROBES:
            self._late.popitem(last=False)
