"""The gateway's record of one session, and the operations every part of the gateway shares.

``GatewaySession`` holds one session's keys, binding, validated addresses, outstanding
path challenges, reattach state and queued TUN packets; ``SessionView`` is its row in a
snapshot; ``ClientEntry`` an allowed client; ``TokenBucket`` the deterministic limiter the
gateway uses for handshakes, cookie replies and reattaches. ``_GatewayBase`` gives
``GatewaySessions`` (gateway.py) and its mixins the per-session plumbing they all use:
sealing a control message, firing a state-machine trigger, STATE_UPDATE and its
retransmission, termination and the tombstone that answers late packets.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from tunnel.core.aead import KeyExhausted, SessionCipher
from tunnel.core.constants import MSG_CONTROL, MSG_HANDSHAKE_RESP
from tunnel.core.drops import Drop
from tunnel.core.endpoint import EndpointBase
from tunnel.core.events import EventBase, Reason, reason_to_wire
from tunnel.core.policy import Policy
from tunnel.core.replay import NonceGuard
from tunnel.core.session import SessionMachine, Trigger
from tunnel.core.wire import (
    STATE_CODES,
    Control,
    ReattachAck,
    ReattachRequest,
    StateUpdate,
    Terminate,
    pack_control,
    parse_control,
)

Addr = Hashable

MAX_VALIDATED = 8
"""Validated source addresses remembered per session (one per client path, with room)."""

MAX_CHALLENGES = 8
"""Outstanding path challenges per session; the oldest is forgotten beyond this."""

STATE_UPDATE_RESEND_S = 0.3
"""STATE_UPDATE retransmit interval until acknowledged."""

STATE_UPDATE_SENDS = 6
"""STATE_UPDATE sends at most (then the next transition or probe ack carries the news)."""

TOMBSTONE_S = 10.0
"""A terminated session's index stays known this long: late packets are counted, and an
authentic one is answered with TERMINATE (a client whose TERMINATE was lost learns it)."""

TOMBSTONE_ANSWER_S = 1.0
"""At most one TERMINATE answer per tombstone per this many seconds (<= 10 per session)."""


def addr_label(addr: Addr) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr)


@dataclass(frozen=True, slots=True)
class ClientEntry:
    """An allowed client: its static public key and the inner address it gets."""

    name: str
    public_key: bytes
    inner_address: str

    def __repr__(self) -> str:
        return f"ClientEntry(name={self.name!r}, inner_address={self.inner_address!r})"


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


@dataclass(slots=True)
class _Challenge:
    token: bytes
    purpose: str  # "probe", "nat" or "reattach"
    received: int
    sent: int
    last_sent: float


class GatewaySession:
    """The gateway's record of one session (its keys never leave this object)."""

    def __init__(
        self,
        *,
        machine: SessionMachine,
        client: ClientEntry,
        index: int,
        peer_index: int,
        session_id: bytes,
        addr: Addr,
        path_id: int,
        skew_ms: int,
        policy: Policy,
        now: float,
    ) -> None:
        self.machine = machine
        self.client = client
        self.index = index
        self.peer_index = peer_index
        self.session_id = session_id
        self.cipher: SessionCipher | None = None
        self.binding: Addr | None = addr
        self.binding_path: int | None = path_id
        self.last_binding: Addr | None = addr
        self.epoch = 1
        self.validated: OrderedDict[Addr, float] = OrderedDict({addr: now})
        self.challenges: OrderedDict[Addr, _Challenge] = OrderedDict()
        self.received_from: dict[Addr, int] = {}
        self.probes_rx: dict[int, int] = {}
        """PROBEs received per path_id (a u8: at most 256 keys), echoed in PROBE_ACK."""
        self.last_inbound = now
        self.born = now
        self.transportless_since: float | None = None
        self.recovery_started: float | None = None
        self.dead_until: float | None = None
        self.nonces = NonceGuard()
        self.skew_ms = skew_ms
        self.policy = policy
        self.security_failures = 0
        self.last_failure: float | None = None
        self.state_seq = 0
        self.unacked: StateUpdate | None = None
        self.unacked_sent = 0.0
        self.unacked_sends = 0
        self.held: tuple[ReattachRequest, Addr] | None = None
        self.last_ack: tuple[int, ReattachAck] | None = None
        self.bucket = TokenBucket(policy.reattach_rate_per_s, policy.reattach_burst, now)
        self.queue: deque[bytes] = deque()
        self.queue_bytes = 0
        self.rx_high = -1
        self.rx_phase = 0
        self.total_switches = 0
        self.tombstone_until: float | None = None
        self.end_reason: Reason | None = None
        self.terminate_answered: float | None = None


@dataclass(frozen=True, slots=True)
class SessionView:
    session_id: str
    client: str
    state: str
    state_version: int
    binding_epoch: int
    binding: str
    policy_version: str
    age_s: float
    security_failures: int
    total_switches: int


class _GatewayBase(EndpointBase):
    """Per-session plumbing shared by GatewaySessions and its mixins (no inputs here)."""

    # Set in GatewaySessions.__init__; declared here for the methods below and the mixins.
    policy: Policy | None
    sessions: dict[int, GatewaySession]
    _by_key: dict[bytes, GatewaySession]
    _by_inner: dict[bytes, GatewaySession]
    _out: list[tuple[Addr, bytes]]
    _urandom: Callable[[int], bytes]

    # == helpers ===========================================================================
    def _base(self, s: GatewaySession | None, now: float) -> EventBase:
        if s is not None:
            return s.machine.base(self.ts_ms(now))
        return {
            "ts_ms": self.ts_ms(now),
            "session_id": "",
            "node_id": self.node_id,
            "policy_version": self.policy.policy_version if self.policy else "invalid",
            "state_version": 0,
        }

    def _send(self, s: GatewaySession, addr: Addr, msg: Control) -> int:
        if s.cipher is None:
            return 0
        try:
            dgram = s.cipher.seal(MSG_CONTROL, s.peer_index, pack_control(msg))
        except KeyExhausted:
            self.count_drop(Drop.KEY_EXHAUSTED)
            return 0
        self._out.append((addr, dgram))
        return len(dgram)

    def _fire(
        self, s: GatewaySession, trigger: Trigger, reason: Reason, now: float, **fields: Any
    ) -> bool:
        if trigger is Trigger.TERMINATE:
            s.end_reason = reason
            fields.setdefault("session_age_ms", (now - s.born) * 1000)
            tl = 0.0 if s.transportless_since is None else (now - s.transportless_since) * 1000
            fields.setdefault("transportless_age_ms", tl)
            fields.setdefault("total_switches", s.total_switches)
        ok = s.machine.fire(trigger, reason, self.ts_ms(now), **fields)
        if not ok and not s.machine.terminated:
            return False
        if s.machine.terminated:
            self._on_terminated(s, now)
        else:
            self._state_update(s, reason, now)
        return ok

    def _state_update(self, s: GatewaySession, reason: Reason, now: float) -> None:
        s.state_seq += 1
        s.unacked = StateUpdate(
            s.state_seq,
            STATE_CODES.index(str(s.machine.state)),
            s.machine.version,
            s.epoch,
            reason_to_wire(reason),
        )
        s.unacked_sends = 0
        self._send_state_update(s, now)

    def _send_state_update(self, s: GatewaySession, now: float) -> None:
        if s.unacked is None:
            return
        targets = [s.binding] if s.binding is not None else list(s.validated)
        for addr in targets:
            self._send(s, addr, s.unacked)
        s.unacked_sent = now
        s.unacked_sends += 1
        if s.unacked_sends >= STATE_UPDATE_SENDS:
            s.unacked = None

    def _terminate(
        self,
        s: GatewaySession,
        reason: Reason,
        now: float,
        *,
        notify: bool = True,
        initiator: str = "local",
    ) -> None:
        if s.machine.terminated:
            return
        if notify and s.cipher is not None:
            # Transport messages still queued for this client (e.g. the REATTACH_ACK whose
            # transition the session store refused) are void: TERMINATE is the last word.
            # A queued HANDSHAKE_RESP stays: without it the client cannot read TERMINATE.
            index = s.peer_index.to_bytes(4, "little")
            self._out = [
                (a, d) for a, d in self._out if d[4:8] != index or d[0] == MSG_HANDSHAKE_RESP
            ]
            targets = [s.binding] if s.binding is not None else list(s.validated)
            for addr in targets:
                self._send(s, addr, Terminate(reason_to_wire(reason)))
        self._fire(s, Trigger.TERMINATE, reason, now, initiator=initiator)

    def _on_terminated(self, s: GatewaySession, now: float) -> None:
        s.binding = None
        s.queue.clear()
        s.queue_bytes = 0
        s.held = None
        s.unacked = None
        s.challenges.clear()
        s.tombstone_until = now + TOMBSTONE_S
        if self._by_key.get(s.client.public_key) is s:
            del self._by_key[s.client.public_key]
        inner = ipaddress.IPv4Address(s.client.inner_address).packed
        if self._by_inner.get(inner) is s:
            del self._by_inner[inner]

    def _answer_tombstone(self, s: GatewaySession, data: bytes, addr: Addr, now: float) -> None:
        """A datagram for a terminated session: if it is authentic and fresh, tell the sender
        (again) that the session ended, at most once per TOMBSTONE_ANSWER_S. Forged and
        replayed datagrams fail to open and get nothing; a TERMINATE is not answered."""
        if s.cipher is None or s.tombstone_until is None or now >= s.tombstone_until:
            return
        plaintext = s.cipher.open(data, now)  # always: the replay window must see it
        if isinstance(plaintext, Drop):
            return
        if s.terminate_answered is not None and now < s.terminate_answered + TOMBSTONE_ANSWER_S:
            return
        if data[0] == MSG_CONTROL and isinstance(parse_control(plaintext), Terminate):
            return
        s.terminate_answered = now
        self._send(s, addr, Terminate(reason_to_wire(s.end_reason or Reason.PEER_TERMINATED)))
