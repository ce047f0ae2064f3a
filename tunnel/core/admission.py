"""Handshake admission: which HANDSHAKE_INITs the gateway spends a DH on.

``HandshakeAdmission`` is one component (wireguard-go keeps ``device/cookie.go`` and
``ratelimiter/ratelimiter.go`` as separate objects in the same way): it owns the cookie
checker (cookie.py), the global handshake token bucket, the cookie-reply bucket and the
per-source-host buckets, and decides "under load". It answers in cheapest-first order:
mac1 always; under load mac2 (else a rate-limited COOKIE_REPLY) and the source host's
bucket; then the handshake bucket. Only an admitted INIT reaches the Noise DH.

``TokenBucket`` is the deterministic limiter used here and for a session's reattaches.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

from tunnel.core.cookie import CookieChecker, address_bytes
from tunnel.core.drops import Drop
from tunnel.core.gateway_paths import Addr, addr_label
from tunnel.core.wire import split_init

HANDSHAKE_RATE = 200.0
"""Handshake initiations per second the gateway spends DH on (token bucket refill) until
it is told its own core's rate (:meth:`HandshakeAdmission.set_handshake_rate`; the gateway
program measures it at start: tunnel/gateway/handshake_budget.py). Also the least budget."""

HANDSHAKE_BURST = 400.0
"""Handshake bucket size at ``HANDSHAKE_RATE``; at a higher rate, one second of it."""

HANDSHAKE_RATE_MAX = 10_000.0
"""The most a budget may be: far above what a Python core does (about 1,000-2,000 DH
handshakes a second per core on current CPUs), so only a wrong measurement meets it."""

HANDSHAKE_BURST_MAX = HANDSHAKE_RATE_MAX
"""The bucket size at ``HANDSHAKE_RATE_MAX`` (one second of it)."""

COOKIE_LOAD_FRACTION = 0.25
"""Under load (cookies required) while the handshake bucket holds less than this share of
its burst: a quarter left means a flood is draining it faster than it refills."""

COOKIE_REPLY_RATE = 5000.0
"""Cookie replies per second at most (token bucket refill); beyond, INITs without a
cookie are dropped as rate_limited. Bounds the work a spoofed INIT flood can cause."""

COOKIE_REPLY_BURST = 5000.0
"""Cookie reply bucket size."""

SOURCE_INIT_RATE = 20.0
"""Under load, INITs with a valid cookie per second per source host (WireGuard's handshake
ratelimiter: 20/s per IP): a host that holds a cookie cannot spend the whole handshake
budget by itself."""

SOURCE_INIT_BURST = 5.0
"""Per-source bucket size (WireGuard: 5)."""

MAX_INIT_SOURCES = 4096
"""Source hosts whose bucket is remembered; the least recently seen is forgotten beyond."""


class TokenBucket:
    """Deterministic token bucket (SPEC-DIGEST 4.6); starts full; time is a parameter."""

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.tokens, self.last = rate, burst, burst, now

    def level(self, now: float) -> float:
        """Tokens available at ``now`` (refills; takes none)."""
        if now > self.last:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now
        return self.tokens

    def allow(self, now: float, cost: float = 1.0) -> bool:
        if self.level(now) >= cost:
            self.tokens -= cost
            return True
        return False

    def configure(self, rate: float, burst: float) -> None:
        """New refill rate and size (a policy reload); the tokens held stay."""
        self.rate, self.burst = rate, burst


class HandshakeAdmission:
    """Cookies and handshake rate limits: decides whether an INIT may cost a DH."""

    def __init__(
        self,
        gateway_public: bytes,
        urandom: Callable[[int], bytes],
        now: float,
        *,
        cookie_threshold: float = COOKIE_LOAD_FRACTION,
    ) -> None:
        """``cookie_threshold``: share of the handshake bucket below which the gateway is
        under load and answers INITs without a valid cookie with a COOKIE_REPLY (0: never,
        1: always)."""
        self._cookies = CookieChecker(gateway_public, urandom, now)
        self.cookie_threshold = cookie_threshold
        self._cookie_bucket = TokenBucket(COOKIE_REPLY_RATE, COOKIE_REPLY_BURST, now)
        self.handshakes = TokenBucket(HANDSHAKE_RATE, HANDSHAKE_BURST, now)
        """The global handshake budget (read by tests and metrics; spent only here)."""
        self._sources: OrderedDict[Hashable, TokenBucket] = OrderedDict()

    def set_handshake_rate(self, rate: float, now: float, share: int = 1) -> None:
        """Spend DH on at most ``rate`` INITs a second (what this core can do: the gateway
        measures it), within [``HANDSHAKE_RATE``, ``HANDSHAKE_RATE_MAX``]; the bucket holds
        one second of it (at least ``HANDSHAKE_BURST``) and starts full. ``share``: this
        is one of that many processes that split a gateway-wide ``rate`` (a configured
        rate over the workers): rate and bucket are divided by it."""
        rate = min(max(rate, HANDSHAKE_RATE), HANDSHAKE_RATE_MAX)
        share = max(1, share)
        self.handshakes = TokenBucket(rate / share, max(HANDSHAKE_BURST, rate) / share, now)

    def set_cookie_threshold(self, threshold: float) -> None:
        self.cookie_threshold = threshold

    @property
    def sources(self) -> int:
        """Source hosts with a remembered bucket (at most MAX_INIT_SOURCES)."""
        return len(self._sources)

    def knows_source(self, host: Hashable) -> bool:
        return host in self._sources

    def under_load(self, now: float) -> bool:
        """True while handshakes need a cookie (the handshake bucket is running low)."""
        if self.cookie_threshold >= 1.0:
            return True
        return self.handshakes.level(now) < self.cookie_threshold * self.handshakes.burst

    def source_allows(self, addr: Addr, now: float) -> bool:
        """Take a token from the bucket of ``addr``'s host (bounded LRU of buckets)."""
        host = addr[0] if isinstance(addr, tuple) else addr
        sources = self._sources
        bucket = sources.get(host)
        if bucket is None:
            bucket = sources[host] = TokenBucket(SOURCE_INIT_RATE, SOURCE_INIT_BURST, now)
            while len(sources) > MAX_INIT_SOURCES:
                sources.popitem(last=False)
        else:
            sources.move_to_end(host)
        return bucket.allow(now)

    def admit(self, init: bytes, addr: Addr, now: float) -> Drop | bytes | None:
        """None: spend the DH on ``init`` from ``addr``. Otherwise
        the INIT is dropped: the ``Drop`` to count, or the COOKIE_REPLY to send back to
        ``addr`` (counted as ``Drop.COOKIE_REQUIRED``)."""
        if not self._cookies.mac1_ok(init):
            return Drop.BAD_MAC
        if self.under_load(now):
            verdict = self._loaded(init, addr, now)
            if verdict is not None:
                return verdict
        if not self.handshakes.allow(now):
            return Drop.RATE_LIMITED
        return None

    def _loaded(self, init: bytes, addr: Addr, now: float) -> Drop | bytes | None:
        """Under load: a valid cookie and a token of the source host's bucket are needed."""
        source_id = address_bytes(addr_label(addr))
        if not self._cookies.mac2_ok(init, source_id, now):
            if not self._cookie_bucket.allow(now):
                return Drop.RATE_LIMITED
            sender_index = split_init(init)[0]
            return self._cookies.reply(init, sender_index, source_id, now)
        if not self.source_allows(addr, now):
            return Drop.RATE_LIMITED
        return None
