"""The gateway's handshake side: HANDSHAKE_INIT in, HANDSHAKE_RESP (or COOKIE_REPLY) out.

``_HandshakeMixin`` gives ``GatewaySessions`` (gateway.py) the INIT handling in cheapest
first order: mac1, then under load mac2 or a rate-limited COOKIE_REPLY (cookie.py) and a
per-source-host token bucket, the handshake token bucket, the Noise DH, the client key
and timestamp checks (replay and session fixation), and finally the new session
(replacing the client's old one) with its RESP and SESSION_CREATED / TRANSPORT_ATTACHED
events.
"""

from __future__ import annotations

import ipaddress
import random
from collections import OrderedDict
from collections.abc import Hashable

from tunnel.core.aead import SessionCipher
from tunnel.core.constants import (
    MSG_HANDSHAKE_RESP,
    PROTOCOL_VERSION,
    SESSION_ID_LEN,
)
from tunnel.core.cookie import CookieChecker, address_bytes
from tunnel.core.drops import Drop
from tunnel.core.events import (
    PolicyEvent,
    Reason,
    SessionCreated,
    TransportAttached,
    reason_to_wire,
)
from tunnel.core.gateway_session import (
    Addr,
    ClientEntry,
    GatewaySession,
    TokenBucket,
    _GatewayBase,
    addr_label,
)
from tunnel.core.handshake import HandshakeError, Responder
from tunnel.core.session import SessionMachine, Trigger
from tunnel.core.wire import InitPayload, RespPayload, pack_handshake, split_init

HANDSHAKE_RATE = 200.0
"""Handshake initiations per second the gateway spends DH on (token bucket refill)."""

HANDSHAKE_BURST = 400.0
"""Handshake bucket size."""

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


class _HandshakeMixin(_GatewayBase):
    """INIT handling, cookies and handshake rate limiting; creates sessions."""

    # Set in GatewaySessions.__init__; declared here for the methods below.
    _responder: Responder
    _cookies: CookieChecker
    cookie_threshold: float
    _cookie_bucket: TokenBucket
    _hs_bucket: TokenBucket
    _init_sources: OrderedDict[Hashable, TokenBucket]
    _clients: dict[bytes, ClientEntry]
    _last_init_ts: dict[bytes, int]
    _rng: random.Random
    policy_error: str | None
    inner_gateway: str
    inner_prefix: int
    mtu: int
    endpoints: tuple[tuple[str, int], ...]
    max_version: int

    def under_load(self, now: float) -> bool:
        """True while handshakes need a cookie (the handshake bucket is running low)."""
        if self.cookie_threshold >= 1.0:
            return True
        return self._hs_bucket.level(now) < self.cookie_threshold * self._hs_bucket.burst

    def _source_allows(self, addr: Addr, now: float) -> bool:
        """Take a token from the bucket of ``addr``'s host (bounded LRU of buckets)."""
        host = addr[0] if isinstance(addr, tuple) else addr
        sources = self._init_sources
        bucket = sources.get(host)
        if bucket is None:
            bucket = sources[host] = TokenBucket(SOURCE_INIT_RATE, SOURCE_INIT_BURST, now)
            while len(sources) > MAX_INIT_SOURCES:
                sources.popitem(last=False)
        else:
            sources.move_to_end(host)
        return bucket.allow(now)

    def _on_init(self, data: bytes, addr: Addr, now: float) -> None:
        # Cheap checks first (cookie.py): mac1 always, mac2 under load; DH only after both.
        if not self._cookies.mac1_ok(data):
            self.count_drop(Drop.BAD_MAC)
            return
        sender_index, noise, _, _ = split_init(data)
        if self.under_load(now):
            source = address_bytes(addr_label(addr))
            if not self._cookies.mac2_ok(data, source, now):
                if self._cookie_bucket.allow(now):
                    self._out.append((addr, self._cookies.reply(data, sender_index, source, now)))
                    self.count_drop(Drop.COOKIE_REQUIRED)
                else:
                    self.count_drop(Drop.RATE_LIMITED)
                return
            if not self._source_allows(addr, now):
                self.count_drop(Drop.RATE_LIMITED)
                return
        if not self._hs_bucket.allow(now):
            self.count_drop(Drop.RATE_LIMITED)
            return
        try:
            pending = self._responder.read_init(noise)
        except HandshakeError:
            self.count_drop(Drop.HANDSHAKE_FAILED)
            return
        client = self._clients.get(pending.client_static)
        if client is None:
            self.count_drop(Drop.UNKNOWN_CLIENT_KEY)
            self._security(
                now,
                self._base(None, now),
                "UNKNOWN_CLIENT",
                Reason.UNKNOWN_CLIENT_KEY,
                source=addr_label(addr),
            )
            return
        payload = InitPayload.parse(pending.payload)
        if isinstance(payload, Drop):
            self.count_drop(payload)
            return
        last = self._last_init_ts.get(client.public_key)
        if last is not None and payload.ts_ms <= last:
            # A replayed initiation must not replace the live session (fixation, AT-36).
            self.count_drop(Drop.REPLAY)
            self._security(
                now,
                self._base(None, now),
                "FIXATION_ATTEMPT",
                Reason.SESSION_FIXATION_ATTEMPT,
                source=addr_label(addr),
            )
            return
        self._last_init_ts[client.public_key] = payload.ts_ms
        status: Reason | None = None
        if payload.version != PROTOCOL_VERSION:
            status = Reason.PROTOCOL_VERSION_MISMATCH
        elif self.policy is None:
            status = Reason.POLICY_DENIED
            self.emit(
                PolicyEvent(
                    **self._base(None, now), policy_name="SESSION_DENIED",
                    reason_code=Reason.POLICY_DENIED, detail=self.policy_error or "",
                )
            )  # fmt: skip
        if status is not None:
            resp = RespPayload(
                PROTOCOL_VERSION, reason_to_wire(status), bytes(SESSION_ID_LEN), self.ts_ms(now),
                0, 0, "0.0.0.0", 0, "0.0.0.0", self.mtu,
            )  # fmt: skip
            noise_resp, _ = pending.write_response(resp.pack())
            self._out.append(
                (addr, pack_handshake(MSG_HANDSHAKE_RESP, sender_index, 0, noise_resp))
            )
            return
        policy = self.policy
        assert policy is not None
        old = self._by_key.get(client.public_key)
        if old is not None:
            self._terminate(old, Reason.SESSION_REPLACED, now, notify=False)
        index = self._new_index()
        session_id = self._urandom(SESSION_ID_LEN)
        machine = SessionMachine(
            node_id=self.node_id, policy_version=policy.policy_version, emit=self.emit,
            max_version=self.max_version,
        )  # fmt: skip
        machine.session_id = session_id.hex()
        s = GatewaySession(
            machine=machine, client=client, index=index, peer_index=sender_index,
            session_id=session_id, addr=addr, path_id=payload.path_id,
            skew_ms=self.ts_ms(now) - payload.ts_ms, policy=policy, now=now,
        )  # fmt: skip
        machine.fire(Trigger.HANDSHAKE_OK, Reason.ATTACHED_TO_TRANSPORT, self.ts_ms(now))
        resp = RespPayload(
            PROTOCOL_VERSION, 0, session_id, self.ts_ms(now), machine.version, s.epoch,
            client.inner_address, self.inner_prefix, self.inner_gateway, self.mtu, self.endpoints,
        )  # fmt: skip
        noise_resp, keys = pending.write_response(resp.pack())
        s.cipher = SessionCipher(keys, replay_window=policy.replay_window_size, now=now)
        self.sessions[index] = s
        self._by_key[client.public_key] = s
        self._by_inner[ipaddress.IPv4Address(client.inner_address).packed] = s
        self._out.append(
            (addr, pack_handshake(MSG_HANDSHAKE_RESP, sender_index, index, noise_resp))
        )
        base = self._base(s, now)
        self.emit(SessionCreated(**base, peer=client.name, inner_address=client.inner_address))
        self.emit(
            TransportAttached(
                **base, transport_id=payload.path_id, path=addr_label(addr), binding_epoch=s.epoch
            )
        )

    def _new_index(self) -> int:
        while True:
            index = self._rng.getrandbits(32)
            if index and index not in self.sessions:
                return index
