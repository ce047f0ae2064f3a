"""The client's candidate paths: one ``Path`` per configured transport, one ``PathSet``.

A ``Path`` owns what the client knows of one transport (aioquic's ``QuicNetworkPath``
owns a path's validation the same way): its ``PathHealth`` estimators, its hold-down, its
probe clock and whether it was validated. ``reconfigure(policy)`` applies a reloaded
policy to all of them (dead_min_ms, loss window, ... take effect from that moment on).

The ``PathSet`` owns the order, which path is active (the one carrying data) and which
died last, and judges paths by the policy it was given: live, eligible, held down, score,
classification. It probes (``due_probes``), reports liveness changes and validations as
events, and exposes its own ``next_deadline()``: the earliest probe or health deadline.

An idle session (issue 11; ``set_idle``) probes its active path every
``idle_probe_interval_ms`` and its standby paths every ``idle_standby_probe_interval_ms``.
An idle probe that stays unanswered for ``SUSPECT_AFTER`` busy probe intervals makes the
path suspect as silence does in a busy session (probed ``SUSPECT_PROBE_SPEEDUP`` times
faster), and the path dies ``dead_after_ms`` after that probe left (``PathHealth``). When
the session stops being idle its active path is probed at once and the busy schedule
resumes: a path that died while the session was idle is found as fast as a busy one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

from tunnel.core.events import Event, EventBase, PathHealthChanged, PathValidated, Reason
from tunnel.core.health import PathHealth, PathStats, path_score
from tunnel.core.policy import Policy
from tunnel.core.selection import HoldDown

__all__ = ["Path", "PathSet"]

STANDBY_LIVENESS_INTERVALS = 2
"""A standby path stays live while answered within this many standby probe intervals."""

SUSPECT_AFTER = 1.5
"""The active path is suspect once silent for this many probe intervals ..."""

SUSPECT_PROBE_SPEEDUP = 8
"""... and is then probed this many times faster until it answers (robust death: 10 %
loss each way leaves ~3 lost round trips in a row common, ~8 practically never)."""

SUSPECT_PROBE_MIN_S = 0.01
"""Suspicion probing is never faster than this (the policy's probe_interval floor)."""

ONE_WAY_LOSS_MARGIN = 0.05
"""Loss in one direction (PROBE_ACK ``rx_probes``) is judged against the policy threshold
plus this margin: a 3 s window holds ~30 probes, whose estimate of 10 % loss has a standard
error of ~0.055. Measured in the simulator over 30 seeds at the default policy: 30 % loss
one way switches 29/30 within 6 s (17/30 judged by round trips alone), 10 % one way or
each way stays ATTACHED 29/30 (a margin of 0: 26/30 and 19/30)."""


class Path:
    """One candidate transport: its health, hold-down, probe clock and validation."""

    __slots__ = (
        "gateway_validated", "health", "holddown", "interval", "label", "last_probe",
        "next_probe", "path_id", "previous_interval", "validated", "was_alive",
    )  # fmt: skip

    def __init__(self, path_id: int, label: str, policy: Policy, now: float) -> None:
        self.path_id = path_id
        self.label = label
        self.health = PathHealth(
            path_id,
            loss_window_ms=policy.loss_window_ms,
            dead_min_ms=policy.dead_min_ms,
            dead_rtt_multiplier=policy.dead_rtt_multiplier,
            min_loss_samples=policy.min_loss_samples,
            dead_traffic_min_ms=policy.dead_traffic_min_ms,
            now=now,
        )
        self.holddown = HoldDown(policy.failed_path_holddown_ms)
        self.validated = False
        self.gateway_validated = False
        """The gateway's last PROBE_ACK on this path said the address is validated there
        (a switch to it may move by binding mark, without a request)."""
        self.next_probe = now
        self.last_probe: float | None = None
        self.interval = 0.0
        """The gap (s) to the next probe given when the last probe left ..."""
        self.previous_interval = 0.0
        """... and the one before: a standby's answers are judged by the slower of the two."""
        self.was_alive = False

    def reconfigure(self, policy: Policy) -> None:
        """A reloaded policy: every estimator parameter and the hold-down, from now on."""
        self.health.reconfigure(
            loss_window_ms=policy.loss_window_ms,
            dead_min_ms=policy.dead_min_ms,
            dead_rtt_multiplier=policy.dead_rtt_multiplier,
            min_loss_samples=policy.min_loss_samples,
            dead_traffic_min_ms=policy.dead_traffic_min_ms,
        )
        self.holddown.reconfigure(policy.failed_path_holddown_ms)

    def validate(self) -> bool:
        """An authenticated answer arrived on this path. True the first time."""
        if self.validated:
            return False
        self.validated = True
        return True

    def gateway_says(self, validated: bool) -> None:
        """A PROBE_ACK on this path: whether the gateway has validated its address."""
        self.gateway_validated = validated

    def probe_soon(self, now: float) -> None:
        """Probe at the next timer turn (after an attach or a switch onto this path)."""
        self.next_probe = now

    def probe_by(self, at: float) -> None:
        """Probe at ``at`` at the latest (an idle session's slow schedule ends)."""
        if at < self.next_probe:
            self.next_probe = at

    def probed(self, probe_id: int, now: float, interval: float) -> None:
        self.health.probe_sent(probe_id, now)
        self.last_probe = now
        self.next_probe = now + interval
        self.previous_interval, self.interval = self.interval, interval

    def idle_retry_at(self, after: float) -> float | None:
        """When an idle session's unanswered probe on this path is retried fast: ``after``
        seconds after it left, unless probed since. None: nothing unanswered."""
        asked = self.health.unanswered_since()
        if asked is None:
            return None
        at = asked + after
        return None if self.last_probe is not None and self.last_probe >= at else at

    def burst_at(self) -> float | None:
        """When this path (if active) needs a probe burst: its traffic went silent
        (``PathHealth.traffic_suspect_at``) and no probe left since. None: none needed."""
        t = self.health.traffic_suspect_at()
        if t is None or (self.last_probe is not None and self.last_probe >= t):
            return None
        return t

    def liveness_changed(self, alive: bool, now: float, *, real_failure: bool) -> bool:
        """Record ``alive``; True if it differs from the last judgement. Going live starts
        the hold-down of a path that failed; a real failure (not merely the stricter rule
        of "no active path") holds it down."""
        if alive == self.was_alive:
            return False
        self.was_alive = alive
        if alive:
            self.holddown.recovered(now)
        elif real_failure:
            self.holddown.failed(now)
        return True

    def next_deadline(self) -> float:
        """The next probe, or an earlier probe expiry / death of this path."""
        t = self.health.next_deadline()
        return self.next_probe if t is None else min(self.next_probe, t)


class PathSet:
    """The candidate paths in configured order, the active one and the judgement rules."""

    def __init__(
        self,
        specs: Sequence[tuple[int, str]],
        policy: Policy,
        now: float,
        *,
        emit: Callable[[Event], None],
        base: Callable[[float], EventBase],
    ) -> None:
        self._paths: dict[int, Path] = {pid: Path(pid, label, policy, now) for pid, label in specs}
        self.order: tuple[int, ...] = tuple(pid for pid, _ in specs)
        self.policy = policy
        self.active: int | None = None
        """The path carrying data and the binding, None while there is none."""
        self.previous_dead: int | None = None
        """The path that died last as the active one (recovery may resume it)."""
        self._died_at = 0.0
        """When :attr:`previous_dead` died: it is down until it answers after that."""
        self._probe_seq = 0
        self._emit = emit
        self._base = base
        self._link_down: set[int] = set()
        """Paths the kernel says cannot carry anything (``link_down``): never live."""
        self._link_up_at: dict[int, float] = {}
        """When the kernel said a path is back: it is live again once it answers after."""
        self._retired: set[int] = set()
        """Paths removed (their interface or address went away): down, not shown, their
        ids kept so that no other path takes them (:meth:`add` brings one back)."""
        self.idle = False
        """The session is idle (no inner data either way for ``idle_after_ms``): slow probes."""

    # -- membership ------------------------------------------------------------------------
    def __contains__(self, path_id: object) -> bool:
        return path_id in self._paths

    def __len__(self) -> int:
        return len(self._paths)

    def __iter__(self) -> Iterator[Path]:
        return (self._paths[pid] for pid in self.order)

    def get(self, path_id: int) -> Path:
        return self._paths[path_id]

    def reconfigure(self, policy: Policy) -> None:
        self.policy = policy
        for p in self._paths.values():
            p.reconfigure(policy)

    # -- the active path ---------------------------------------------------------------------
    def activate(self, path_id: int, now: float) -> None:
        """``path_id`` carries the binding from ``now``; probe it at once."""
        self.active = path_id
        self._paths[path_id].probe_soon(now)

    def lose_active(self, now: float) -> int:
        """The active path died at ``now``: no active path, remember which one it was."""
        dead = self.active
        assert dead is not None
        self.active = None
        self.previous_dead = dead
        self._died_at = now
        return dead

    def clear_active(self) -> None:
        self.active = None

    def renewed(self) -> None:
        """A new session replaced the old one: no probe in flight will be answered, and
        the gateway has validated none of the paths for it yet."""
        for p in self._paths.values():
            p.health.forget_probes()
            p.gateway_says(False)

    def set_idle(self, idle: bool, now: float, *, hunting: bool = False) -> None:
        """The session is idle from ``now`` (slow probes), or busy again: then the active
        path is probed at once (its silence counts from ``now``) and each standby path
        within its busy interval (``hunting``: the active path's, see :meth:`due_probes`)."""
        if idle == self.idle:
            return
        self.idle = idle
        for p in self._paths.values():
            p.health.set_idle(idle, now)
        if idle:
            return
        pol = self.policy
        standby = (pol.probe_interval_ms if hunting else pol.standby_probe_interval_ms) / 1000
        for p in self._paths.values():
            if p.path_id == self.active:
                p.probe_soon(now)
            else:
                p.probe_by(now + standby)

    def probe_all_soon(self, now: float) -> None:
        for p in self._paths.values():
            p.probe_soon(now)

    # -- judgement -------------------------------------------------------------------------
    def live(self, path_id: int, now: float) -> bool:
        """Validated and answering. The active path (and every path while none is active)
        is probed fast and dies by silence (D5); a standby path is probed slowly, so it is
        live while its last probes were answered within a few standby intervals. The path
        that died as the active one stays down until it answers again."""
        p = self._paths[path_id]
        if not self._may_answer(p):
            return False
        if path_id == self.active or self.active is None:
            return not p.health.is_dead(now)
        return self._standby_live(p, now)

    def answering(self, path_id: int, now: float) -> bool:
        """:meth:`live`, or, while no path is active, a path other than the one that died
        that was live by the standby rule and has not yet had the dead time to answer the
        fast probes it gets from the death on: its silence counts from then, not from its
        last slow probe (the death of the active path says nothing about the others).
        What the role ``standby`` shows; recovery waits for such a path before it says
        that no candidate is valid."""
        if self.live(path_id, now):
            return True
        p = self._paths[path_id]
        return (
            self.active is None and path_id != self.previous_dead and self._may_answer(p)
            and now < self._died_at + p.health.dead_after_ms() / 1000
            and self._standby_live(p, now)
        )  # fmt: skip

    def _may_answer(self, p: Path) -> bool:
        """Validated, and not the path that died unless it answered since; not a path the
        kernel took down, nor one it brought back that has not answered since."""
        if not p.validated or p.path_id in self._link_down:
            return False
        last = p.health.last_inbound
        up_at = self._link_up_at.get(p.path_id)
        if up_at is not None and (last is None or last <= up_at):
            return False
        return p.path_id != self.previous_dead or (last is not None and last > self._died_at)

    def _standby_live(self, p: Path, now: float) -> bool:
        last = p.health.last_inbound
        # The slower of its last two probe gaps: an idle session's standby stays live
        # between slow probes, and when the busy schedule resumes until it answered.
        interval = max(self.policy.standby_probe_interval_ms / 1000, p.interval,
                       p.previous_interval)  # fmt: skip
        window = STANDBY_LIVENESS_INTERVALS * interval
        return (
            last is not None
            and now - last <= window + p.health.dead_after_ms() / 1000
            and p.health.consecutive_misses < self.policy.max_consecutive_drops
        )

    def eligible(
        self, now: float, excluded: frozenset[int] | set[int], exclude: int | None = None
    ) -> list[int]:
        return [
            pid
            for pid in self.order
            if pid != exclude and pid not in excluded and self.live(pid, now)
        ]

    def targets(
        self, now: float, excluded: frozenset[int] | set[int], exclude: int | None = None
    ) -> list[int]:
        """Eligible paths that are not held down after a recent failure (anti-flap)."""
        return [
            pid
            for pid in self.eligible(now, excluded, exclude)
            if not self._paths[pid].holddown.held(now)
        ]

    def scores(self, now: float) -> dict[int, float]:
        return {pid: self.score(pid, now) for pid in self.order}

    def score(self, path_id: int, now: float) -> float:
        """The path's score, 0.0 unless :meth:`live`. A standby path is judged by the
        standby liveness rule: its fast-probe death timer (``PathHealth.score``) runs out
        between two slow standby probes, which would make every standby score 0.0."""
        h = self._paths[path_id].health
        if not self.live(path_id, now):
            return 0.0
        return path_score(h.loss_ratio(now), h.srtt_ms, h.jitter_ms)

    def stats(self, path_id: int, now: float) -> PathStats:
        """``PathHealth.stats`` with ``alive`` and ``score`` as the session judges them."""
        stats = self._paths[path_id].health.stats(now)
        return replace(stats, alive=self.live(path_id, now), score=self.score(path_id, now))

    def classify(self, path_id: int, now: float) -> Reason | None:
        pol = self.policy
        # Probes measure round trips: loss p each way loses 1 - (1 - p)^2 of them. The
        # policy threshold is per packet (SPEC 8.1), so compare like with like: 10 % each
        # way (19 % of round trips) stays below 0.20 (36 % of round trips). Loss in one
        # direction only is judged on its own, from the gateway's probe counts.
        round_trip_threshold = 1.0 - (1.0 - pol.loss_volatile_threshold) ** 2
        return self._paths[path_id].health.classify(
            now,
            loss_threshold=round_trip_threshold,
            max_consecutive_drops=pol.max_consecutive_drops,
            latency_threshold_ms=pol.latency_volatile_threshold_ms,
            one_way_threshold=pol.loss_volatile_threshold + ONE_WAY_LOSS_MARGIN,
        )

    def active_dead_at(self) -> float | None:
        """When the active path dies unless something arrives on it (None: no active): by
        the idle rule, or earlier by the traffic rule (``PathHealth.traffic_dead_at``)
        once another path has answered since the active one became suspect, i.e. the
        gateway is alive and only this path is silent (a busy gateway, or a stall here,
        silences every path: then only the idle rule, as before)."""
        if self.active is None:
            return None
        health = self._paths[self.active].health
        idle = health.dead_at()
        if idle == math.inf:  # an idle session between two answered probes
            return None
        traffic, suspect = health.traffic_dead_at(), health.traffic_suspect_at()
        if traffic is None or suspect is None or not self._answered_elsewhere(suspect):
            return idle
        return min(idle, traffic)

    def _answered_elsewhere(self, since: float) -> bool:
        for p in self._paths.values():
            last = p.health.last_inbound
            if p.path_id != self.active and p.validated and last is not None and last > since:
                return True
        return False

    # -- the kernel's view (netlink) -------------------------------------------------------
    def link_down(self, path_id: int) -> bool:
        """The kernel says ``path_id`` cannot carry anything. True unless it already said so."""
        if path_id in self._link_down:
            return False
        self._link_down.add(path_id)
        self._link_up_at.pop(path_id, None)
        return True

    def link_up(self, path_id: int, now: float) -> bool:
        """The kernel says ``path_id`` is usable again: probe it at once; it is live once it
        answers. True if it was down (and is not removed)."""
        if path_id not in self._link_down or path_id in self._retired:
            return False
        self._link_down.discard(path_id)
        self._link_up_at[path_id] = now
        self._paths[path_id].probe_soon(now)
        return True

    def is_link_down(self, path_id: int) -> bool:
        return path_id in self._link_down

    # -- paths that come and go (paths = "auto") ----------------------------------------------
    def add(self, path_id: int, label: str, now: float) -> None:
        """A new candidate, or a removed one back (under its old id): probed at once, live
        once it answers."""
        if path_id in self._retired:
            self._retired.discard(path_id)
            self.link_up(path_id, now)
            return
        if path_id in self._paths:
            raise ValueError(f"path id {path_id} is already a candidate")
        self._paths[path_id] = Path(path_id, label, self.policy, now)
        self.order = (*self.order, path_id)

    def retire(self, path_id: int) -> None:
        """``path_id`` is no candidate any more (it is down: :meth:`link_down` first)."""
        self.link_down(path_id)
        self._retired.add(path_id)

    def is_retired(self, path_id: int) -> bool:
        return path_id in self._retired

    def shown(self) -> list[Path]:
        """The candidates, in order, without the removed ones."""
        return [p for p in self if p.path_id not in self._retired]

    # -- inputs ----------------------------------------------------------------------------
    def validated(self, path_id: int, now: float) -> None:
        """An authenticated answer arrived on ``path_id`` (PATH_VALIDATED the first time)."""
        path = self._paths[path_id]
        if path.validate():
            self._emit(PathValidated(**self._base(now), path=path.label, transport_id=path_id))

    def expire(self, now: float) -> None:
        for p in self._paths.values():
            p.health.expire(now)

    def health_events(self, now: float) -> None:
        """PATH_HEALTH_CHANGED for every path whose liveness changed since the last turn."""
        for p in self:
            pid = p.path_id
            alive = self.live(pid, now)
            real = p.health.consecutive_misses > 0 or pid == self.previous_dead
            if not p.liveness_changed(alive, now, real_failure=real):
                continue
            stats = self.stats(pid, now)
            verdict = self.classify(pid, now)
            self._emit(
                PathHealthChanged(
                    **self._base(now),
                    transport_id=pid,
                    alive=alive,
                    classification=str(verdict) if verdict is not None else "healthy",
                    rtt_ms=stats.srtt_ms,
                    loss_ratio=stats.loss_ratio,
                    loss_up=round(stats.loss_up, 4),
                    loss_down=round(stats.loss_down, 4),
                    score=stats.score,
                )
            )

    def due_probes(self, now: float, *, hunting: bool = False) -> list[tuple[int, int]]:
        """(path id, probe id) of every probe due at ``now``, each recorded as sent.

        ``hunting``: the session is looking for a better path (VOLATILE or DEGRADED), so
        the standby paths are probed at the active rate too: the candidate is chosen on
        fresh RTT and loss, not on a sample a second or more old (one taken while the
        machine was busy would otherwise hold a good standby back for many seconds)."""
        pol = self.policy
        busy = pol.probe_interval_ms / 1000
        if self.idle:
            fast = pol.idle_probe_interval_ms / 1000
            slow = pol.idle_standby_probe_interval_ms / 1000
        else:
            fast = busy
            slow = fast if hunting else pol.standby_probe_interval_ms / 1000
        out = []
        self._burst_standbys(now)
        for p in self:
            if p.path_id in self._retired:
                continue
            burst = self._burst_or_retry(p)
            if now < p.next_probe and (burst is None or now < burst):
                continue
            self._probe_seq = (self._probe_seq + 1) & 0xFFFFFFFF
            # The active path is probed fast (loss and death detection, D5); while no path
            # is active every path is, so a live candidate is found quickly.
            active = p.path_id == self.active
            interval = fast if active or self.active is None else slow
            if active and self._suspect(p, now, busy):
                # Suspicion: the active path missed an answer. Probe faster so that only
                # real silence lasts until the dead timer (a few lost probes do not).
                interval = max(SUSPECT_PROBE_MIN_S, busy / SUSPECT_PROBE_SPEEDUP)
            p.probed(self._probe_seq, now, interval)
            out.append((p.path_id, self._probe_seq))
        return out

    def _burst_or_retry(self, p: Path) -> float | None:
        """An extra probe time of the active path: its probe burst when its traffic went
        silent, or (idle session) the fast retry of its unanswered slow probe."""
        if p.path_id != self.active:
            return None
        if self.idle:
            return p.idle_retry_at(SUSPECT_AFTER * self.policy.probe_interval_ms / 1000)
        return p.burst_at()

    def _suspect(self, p: Path, now: float, busy: float) -> bool:
        """The active path missed an answer: silent for ``SUSPECT_AFTER`` busy probe
        intervals, its traffic went silent, or (idle) its slow probe is unanswered that long."""
        health = p.health
        if self.idle:
            asked = health.unanswered_since()
            return asked is not None and now - asked >= SUSPECT_AFTER * busy
        last = health.last_inbound
        quiet = health.traffic_suspect_at()  # traffic went silent: probe fast too
        return last is not None and (now - last > SUSPECT_AFTER * busy or (
            quiet is not None and now >= quiet))  # fmt: skip

    def _burst_standbys(self, now: float) -> None:
        """The active path's probe burst is due: ask the standby paths too (once per
        suspicion: not if probed since it began), so that their answers show the gateway
        is alive and only the active path is silent (``active_dead_at``)."""
        if self.active is None:
            return
        burst = self._paths[self.active].burst_at()
        if burst is None or now < burst:
            return
        for p in self._paths.values():
            asked = p.last_probe is not None and p.last_probe >= burst
            if p.path_id != self.active and p.validated and not asked:
                p.probe_soon(now)

    # -- deadlines -------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        """The earliest probe, probe expiry or path death over every path, and the probe
        burst of an active path whose traffic went silent (removed paths are not probed:
        None when every path was removed)."""
        times = [p.next_deadline() for p in self._paths.values() if p.path_id not in self._retired]
        active = self.active
        if active is not None and active not in self._retired:
            burst = self._burst_or_retry(self._paths[active])
            if burst is not None:
                times.append(burst)
        return min(times, default=None)

    def holddown_change(self, after: float) -> float | None:
        """When the next running hold-down ends, if after ``after``."""
        times = [
            t for p in self._paths.values() if (t := p.holddown.next_change(after)) is not None
        ]
        return min(times) if times else None
