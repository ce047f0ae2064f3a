"""Issue 11 item 5: handshake retries with jittered exponential backoff until the
client's own deadline, and a gateway over its admission rate that answers with cookies
and still admits every client of a burst (docs/client.md "Handshake retries",
docs/gateway.md "Arrivals in bursts").

Everything runs sans-I/O on a fake clock: real ClientSessions against a real
GatewaySessions (tests/crowd.py).
"""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest

from tests.crowd import Crowd
from tunnel.core.admission import HANDSHAKE_BURST, HANDSHAKE_RATE
from tunnel.core.drops import Drop
from tunnel.core.events import EventType, HandshakeFailure, Reason
from tunnel.core.gateway import GatewaySessions
from tunnel.core.gateway_session import ClientEntry
from tunnel.core.handshake import generate_keypair
from tunnel.core.initiator import RETRY_MAX_S, RETRY_MIN_S, retry_interval, retry_window
from tunnel.core.policy import POLICY_DEFAULT, Policy


def policy(timeout_ms: int, attempts: int) -> Policy:
    return dataclasses.replace(
        POLICY_DEFAULT, handshake_timeout_ms=timeout_ms, handshake_attempts=attempts
    )


def window(k: int) -> tuple[float, float]:
    """The documented bounds of the wait after INIT k (docs/client.md): full jitter above
    the floor, [RETRY_MIN_S, RETRY_MIN_S + min(4 s, 0.25 s * 2^k)]."""
    return RETRY_MIN_S, RETRY_MIN_S + min(RETRY_MAX_S, 0.25 * 2**k)


def lonely_crowd(p: Policy, n: int = 1, seed: int = 7) -> Crowd:
    """``n`` clients of a gateway that never answers (another gateway key: bad mac1)."""
    gw_priv, _ = generate_keypair()
    _, unknown_gateway = generate_keypair()
    gateway = GatewaySessions(
        static_private=gw_priv, clients=[], policy=POLICY_DEFAULT, now=0.0,
        urandom=random.Random(seed).randbytes, rng=random.Random(seed),
    )  # fmt: skip
    crowd = Crowd(gateway)
    for i in range(n):
        priv, _ = generate_keypair()
        crowd.connect(crowd.add(f"c{i}", priv, unknown_gateway, p, seed=seed * 1000 + i))
    return crowd


@pytest.mark.parametrize(("timeout_ms", "attempts"), [(5_000, 5), (60_000, 20), (600, 2)])
def test_retries_are_spaced_by_the_jittered_backoff_and_stop_at_the_deadline(
    timeout_ms: int, attempts: int
) -> None:
    p = policy(timeout_ms, attempts)
    crowd = lonely_crowd(p, n=20)
    crowd.run_until(timeout_ms / 1000 + 30.0, stop_when_attached=False)
    deadline = timeout_ms / 1000
    for m in crowd.members:
        sends = m.inits
        assert sends[0] == 0.0 and 1 <= len(sends) <= attempts
        assert all(t < deadline for t in sends), "no INIT at or after the deadline"
        for k, (a, b) in enumerate(itertools.pairwise(sends), start=1):
            low, high = window(k)
            assert low - 1e-9 <= b - a <= high + 1e-9, (k, b - a, low, high)
        # it stopped early only because of the attempts or because the next wait could
        # cross the deadline
        if len(sends) < attempts:
            assert sends[-1] + window(len(sends))[1] >= deadline - 1e-9
        ended = [e for e in m.session.events() if e.event_type is EventType.SESSION_TERMINATED]
        assert [e.reason_code for e in ended] == [Reason.HANDSHAKE_FAILED]
        assert ended[0].ts_ms == pytest.approx(deadline * 1000, abs=1)
        assert m.session.handshake.failure() is HandshakeFailure.NO_ANSWER


def test_the_windows_double_up_to_the_cap_and_the_jitter_spreads_clients() -> None:
    assert [retry_window(k) for k in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    p = policy(60_000, 20)
    crowd = lonely_crowd(p, n=40)
    crowd.run_until(70.0, stop_when_attached=False)
    firsts = [m.inits[1] - m.inits[0] for m in crowd.members]
    # jittered: 40 clients started at the same instant do not retry at the same instant
    assert len({round(w, 6) for w in firsts}) == len(firsts)
    # full jitter: the waits fill their window, not only its middle
    low, high = window(1)
    assert min(firsts) < low + 0.25 * (high - low) and max(firsts) > low + 0.75 * (high - low)
    late = [b - a for m in crowd.members for a, b in itertools.pairwise(m.inits[5:])]
    assert max(late) <= RETRY_MIN_S + RETRY_MAX_S + 1e-9
    assert max(late) > RETRY_MIN_S + 0.75 * RETRY_MAX_S  # the cap's window is used
    for m in crowd.members:
        assert len(m.inits) == 20 or m.inits[-1] + window(len(m.inits))[1] >= 60.0
        assert len(m.inits) >= 15, "keeps asking until the deadline"


@pytest.mark.parametrize("seed", range(10))
def test_retry_interval_bounds_over_seeds(seed: int) -> None:
    rng = random.Random(seed)
    for k in range(1, 21):
        wait = retry_interval(k, rng)
        low, high = window(k)
        assert low <= wait <= high


def test_a_burst_over_the_admission_rate_is_answered_with_cookies_and_all_attach() -> None:
    """1,000 clients at once against a gateway that spends DH on HANDSHAKE_RATE INITs/s:
    beyond its burst it answers with cookies, keeps admitting at its full rate, and
    every client attaches before its own deadline."""
    n = 1000
    p = policy(20_000, 12)
    gw_priv, gw_pub = generate_keypair()
    keys = [generate_keypair() for _ in range(n)]
    gateway = GatewaySessions(
        static_private=gw_priv,
        clients=[ClientEntry(f"c{i}", pub, f"10.80.{i // 250}.{i % 250 + 2}")
                 for i, (_, pub) in enumerate(keys)],
        policy=p, now=0.0, urandom=random.Random(3).randbytes, rng=random.Random(4),
        inner_prefix=16, inner_gateway="10.80.255.254",
    )  # fmt: skip
    crowd = Crowd(gateway)
    members = [crowd.add(f"c{i}", priv, gw_pub, p, seed=i) for i, (priv, _) in enumerate(keys)]
    for m in members:  # all at t = 0
        crowd.connect(m)
    crowd.run_until(p.handshake_timeout_ms / 1000)
    attached = sorted(m.attached_at for m in members if m.attached_at is not None)
    assert len(attached) == n, f"{n - len(attached)} clients did not attach"
    # over the rate, the gateway asked for cookies and the clients answered with them
    assert gateway.drops.get(Drop.COOKIE_REQUIRED.value, 0) > 0
    assert sum(m.session.handshake.cookies_accepted for m in members) > 0
    # admission at the full DH rate: never more than the bucket allows...
    for t in (0.5, 1.0, 1.5):
        assert sum(1 for a in attached if a <= t) <= HANDSHAKE_BURST + HANDSHAKE_RATE * t + 1
    # ...and while many clients are left it admits nearly its full rate, half-second by
    # half-second (the retries of clients started together are spread by the jitter)
    ideal_end = (n - HANDSHAKE_BURST) / HANDSHAKE_RATE
    for k in range(1, int(ideal_end)):  # the slots [0.5, 1), [1, 1.5), ... up to ideal_end/2
        t = k * 0.5
        admitted = sum(1 for a in attached if t <= a < t + 0.5)
        assert admitted >= 0.8 * HANDSHAKE_RATE * 0.5, (t, admitted)
    # the last ones within one full retry window of when the rate could have admitted them
    assert attached[-1] <= ideal_end + RETRY_MIN_S + RETRY_MAX_S
    retried = [m for m in members if len(m.inits) > 1]
    assert retried, "the clients over the rate retried"
