"""The lease fence: may this node still act as an owner? (DESIGN D15b; sans-I/O)

A node owns its sessions through one etcd lease. etcd expires the lease at
``t_recv + TTL`` on the *leader's* clock, where ``t_recv`` is when the leader handled the
grant or the last keep-alive. That request left this node at ``sent_at`` <= ``t_recv``, so
the lease cannot expire before ``sent_at + TTL`` (clocks measure durations, not absolute
times; ``margin`` covers their rate difference and the time between the check and the
datagram leaving). The fence therefore allows forwarding only while::

    now < sent_at(last acknowledged refresh) + granted TTL - margin

It never uses the time the answer *arrived* (that would stretch the deadline by the
round trip), and an answer only ever moves the deadline forward: an old keep-alive
answered late cannot shorten or extend anything beyond what its own send time allows.

A node that was paused (SIGSTOP, a long GC, a VM freeze) must call :meth:`may_forward`
with a fresh ``now`` *after* waking and before it sends anything: the deadline passed
while it slept, so the answer is False until a keep-alive sent after the wake-up is
acknowledged. A keep-alive answered with TTL <= 0 means etcd already dropped the lease
(and every ownership key on it): :meth:`lost` makes the fence refuse for good; the node
needs a new lease and must reacquire each session by CAS.

Time is a parameter (``now``: the monotonic clock, seconds); nothing here reads a clock.
"""

from __future__ import annotations

import math


class LeaseFence:
    """Local deadline of one lease (see the module docstring)."""

    def __init__(self, margin: float) -> None:
        if not (math.isfinite(margin) and margin >= 0):
            raise ValueError(f"margin must be a finite non-negative number, not {margin!r}")
        self.margin = margin
        """Seconds the fence closes before the earliest possible expiry."""
        self.deadline = -math.inf
        """Monotonic time from which :meth:`may_forward` is False."""
        self.expired = False
        """etcd reported the lease gone (or the node revoked it): refuse for good."""
        self.acked_sent_at = -math.inf
        """Send time of the newest acknowledged grant or keep-alive."""

    def acknowledged(self, sent_at: float, ttl: float) -> None:
        """A grant or keep-alive sent at ``sent_at`` was answered with ``ttl`` seconds.

        ``ttl <= 0`` means the lease no longer exists (the fence closes for good).
        """
        if not math.isfinite(sent_at):
            raise ValueError(f"sent_at must be finite, not {sent_at!r}")
        if ttl <= 0:
            self.lost()
            return
        if self.expired or sent_at <= self.acked_sent_at:
            return
        self.acked_sent_at = sent_at
        self.deadline = max(self.deadline, sent_at + ttl - self.margin)

    def lost(self) -> None:
        """The lease is gone: nothing may be forwarded under it again."""
        self.expired = True
        self.deadline = -math.inf

    def may_forward(self, now: float) -> bool:
        """True iff the lease certainly still holds at ``now`` (monotonic seconds)."""
        return not self.expired and now < self.deadline

    def remaining(self, now: float) -> float:
        """Seconds left before the fence closes (<= 0 when closed)."""
        if self.expired:
            return -math.inf
        return self.deadline - now
