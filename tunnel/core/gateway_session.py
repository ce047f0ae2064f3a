"""One gateway session: a component that owns its state and moves its own binding.

The gateway record is authoritative for the *binding* (DESIGN D3): which source address
carries the session's data, under a ``binding_epoch`` incremented on every committed
binding change. The binding moves only here, by
- a validated REATTACH_REQUEST naming the current epoch (recovery, proactive, manual), or
- a binding mark (docs/wire-format.md): an authenticated DATA/CONTROL datagram, the newest
  seen, whose header moves to ``epoch + 1``, from an address validated for this session
  (a pre-validated standby path: no round trip before the move), or
- NAT rebinding (D4): an authenticated, newest DATA packet (or PROBE of the bound path: an
  idle session) from an unknown address starts a PATH_CHALLENGE there (at most 3x the
  bytes received from it until validated), and only the PATH_RESPONSE commits a versioned
  rebind with reason ``nat_rebind``.
An authenticated packet from an unknown address never moves the binding by itself.

``GatewaySession`` composes its parts (wireguard-go groups a peer's state per concern the
same way): ``SessionClocks`` (timers.py), ``PathValidator`` (gateway_paths.py),
``ReattachGuard`` (gateway_reattach.py), ``StateUpdates`` (gateway_outbox.py) and
``DuplicateMeter`` (replay.py: a duplicate from a validated path is a network copy until
the session's duplicates pass ``duplicate_alarm_ratio``). Its timed triggers are rows
(``GATEWAY_ROWS``, with the shared ``SESSION_ROWS``) and chores (``GATEWAY_CHORES``);
``handle_timer`` and ``next_deadline`` both read them. It reaches the
rest of the gateway only through ``SessionPorts`` (gateway_outbox.py): the ``Reporter``,
the ``Outbox``, the TUN outlet and the ``ended`` callback.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tunnel.core.aead import PHASES, KeyExhausted, SessionCipher
from tunnel.core.constants import (
    MARK_BINDING,
    MARK_UNVALIDATED,
    MARK_VALIDATED,
    MSG_CONTROL,
    MSG_DATA,
    REJECT_AFTER_MESSAGES,
)
from tunnel.core.drops import Drop
from tunnel.core.events import (
    EventBase,
    KeyRotated,
    PathValidated,
    Reason,
    ReattachResult,
    TransportDead,
    TransportSwitch,
    reason_from_wire,
    reason_to_wire,
)
from tunnel.core.gateway_outbox import SessionPorts, StateUpdates
from tunnel.core.gateway_paths import Addr, ChallengePurpose, PathValidator, addr_label
from tunnel.core.gateway_reattach import ReattachAction, ReattachGuard, ReattachVerdict
from tunnel.core.gateway_resume import ResumeState
from tunnel.core.policy import Policy
from tunnel.core.replay import DuplicateMeter, NonceGuard, stale_drop
from tunnel.core.session import SessionMachine, State, Trigger
from tunnel.core.timers import (
    LIVE_STATES,
    SESSION_ROWS,
    SessionClocks,
    TimedChore,
    TimedRow,
    chore_deadline,
    due_rows,
    earliest,
    most_urgent_row,
    run_due_chores,
)
from tunnel.core.wire import (
    PROBE_BODY,
    STATE_CODES,
    Control,
    CType,
    NodeInfo,
    PathChallenge,
    PathResponse,
    Probe,
    ReattachAck,
    ReattachKind,
    ReattachReject,
    ReattachRequest,
    Rekey,
    StateAck,
    Terminate,
    pack_control,
    parse_control,
)

INITIAL_EPOCH = 1
"""The binding epoch of a new session (the handshake's path is the first binding)."""

_TERMINATED = State.TERMINATED

_REQUEST = ReattachRequest.STRUCT
_REQUEST_LEN = 1 + _REQUEST.size
"""A REATTACH_REQUEST plaintext: its type byte and its fields (the fast path's one unpack)."""
_KINDS = frozenset(int(k) for k in ReattachKind)

_STATE_CODE = {state: STATE_CODES.index(str(state)) for state in State}
"""Wire code of each state (``STATE_CODES``), looked up once per PROBE_ACK."""

_PROBE_LEN = 1 + PROBE_BODY.size
"""A PROBE plaintext: its CType byte and the fields."""

TOMBSTONE_S = 10.0
"""A terminated session's index stays known this long: late packets are counted, and an
authentic one is answered with TERMINATE (a client whose TERMINATE was lost learns it)."""

TOMBSTONE_ANSWER_S = 1.0
"""At most one TERMINATE answer per tombstone per this many seconds (<= 10 per session)."""

KIND_REASON = {
    ReattachKind.RECOVERY: Reason.DEAD_TRANSPORT_RECOVERY,
    ReattachKind.PROACTIVE: Reason.LOSS_RECOVERY,
    ReattachKind.MANUAL: Reason.MANUAL_SWITCH,
    ReattachKind.RESUME: Reason.TRANSPORT_RESUMED,
}
"""The reason a committed reattach of each kind carries (a rebind from a live state)."""

REATTACH_LIMITS = {
    Reason.SESSION_LIFETIME_EXCEEDED: Reason.SESSION_EXPIRED,
    Reason.TRANSPORT_TTL_EXCEEDED: Reason.TRANSPORT_TTL_EXCEEDED,
}
"""Session rows whose deadline also ends a reattach (fatally), with the reject reason: at
the very instant the timer would end the session, a reattach must not revive it."""

OPEN_VIOLATIONS = {
    Drop.BAD_TAG: ("INVALID_PROOF", Reason.BAD_PROOF),
    Drop.REPLAY: ("REPLAY_DETECTED", Reason.REPLAY_DETECTED),
    Drop.RETIRED_KEY_PHASE: ("RETIRED_KEY_PHASE", Reason.REPLAY_DETECTED),
}
"""Datagrams that failed to open and are reported as a SECURITY_EVENT too."""

REKEY_ANSWER_S = 0.1
"""A resumed session whose client has not followed its new key phase answers a datagram of
the retired phase with a REKEY at most this often (the client follows on it; a flood of
replayed captures gets no more)."""


@dataclass(frozen=True, slots=True)
class ClientEntry:
    """An allowed client: its static public key and the inner addresses it gets."""

    name: str
    public_key: bytes
    inner_address: str
    inner_address6: str = ""
    """Its inner IPv6 address; empty: the client's session carries no IPv6."""

    def __repr__(self) -> str:
        six = f", inner_address6={self.inner_address6!r}" if self.inner_address6 else ""
        return f"ClientEntry(name={self.name!r}, inner_address={self.inner_address!r}{six})"


class InnerSources:
    """The inner source addresses one client may send from (anti-spoofing): its IPv4
    address and, when it has one, its IPv6 address, as packed bytes."""

    __slots__ = ("ipv4", "ipv6")

    def __init__(self, client: ClientEntry) -> None:
        self.ipv4 = ipaddress.IPv4Address(client.inner_address).packed
        self.ipv6 = (
            ipaddress.IPv6Address(client.inner_address6).packed if client.inner_address6 else None
        )

    def check(self, packet: bytes) -> Drop | None:
        """Why the inner ``packet`` from this client may not be delivered, or None."""
        version = packet[0] >> 4 if packet else 0
        if version == 4:
            if len(packet) < 20:
                return Drop.MALFORMED
            return None if packet[12:16] == self.ipv4 else Drop.INNER_SOURCE_SPOOFED
        if version != 6 or len(packet) < 40:
            return Drop.MALFORMED
        if self.ipv6 is None:
            return Drop.IPV6_NOT_ROUTED
        return None if packet[8:24] == self.ipv6 else Drop.INNER_SOURCE_SPOOFED


class ProbeCounts:
    """PROBEs received per client path id, as ``GatewaySession.probes_rx`` reads and writes
    them (``get``, item assignment): the first path's count in two slots, a dict only once
    a second path probes (a dict of one entry cost about 200 bytes per session)."""

    __slots__ = ("_count", "_first", "_more")

    def __init__(self) -> None:
        self._first = -1
        self._count = 0
        self._more: dict[int, int] | None = None

    def __repr__(self) -> str:
        return f"ProbeCounts({dict(self.items())})"

    def get(self, path_id: int, default: int = 0) -> int:
        if path_id == self._first:
            return self._count
        return default if self._more is None else self._more.get(path_id, default)

    def __setitem__(self, path_id: int, count: int) -> None:
        if self._first < 0 or path_id == self._first:
            self._first, self._count = path_id, count
        elif self._more is None:
            self._more = {path_id: count}
        else:
            self._more[path_id] = count

    def items(self) -> list[tuple[int, int]]:
        """(path id, PROBEs received) of every path that probed."""
        first = [(self._first, self._count)] if self._first >= 0 else []
        return first + list((self._more or {}).items())


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
    cipher: str = ""
    """The data cipher negotiated in the handshake."""


class GatewaySession:
    """The gateway's record of one session (its keys never leave this object).

    Slotted: a gateway holds thousands of these, and an instance ``__dict__`` of this many
    attributes cost about 1.6 KB per session (docs/performance.md, "Gateway memory per
    session"). A new attribute belongs in ``__slots__`` too; until it is listed it lands
    in the ``__dict__`` slot, made on its first write (tests/test_gateway_memory.py fails
    while a session has one)."""

    __slots__ = (
        "__dict__",
        "_busy_for",
        "_deliver",
        "_ports",
        "_report",
        "_reserve_asked",
        "binding",
        "binding_path",
        "cipher",
        "client",
        "clocks",
        "data_in_at",
        "duplicates",
        "end_reason",
        "epoch",
        "index",
        "last_binding",
        "last_failure",
        "last_inbound",
        "machine",
        "moved_by_mark",
        "owner_epoch",
        "paths",
        "peer_index",
        "policy",
        "probes_rx",
        "queue",
        "queue_bytes",
        "reattach",
        "rekey_answered",
        "reserved",
        "rx_high",
        "rx_phase",
        "security_failures",
        "session_id",
        "skew_ms",
        "sources",
        "terminate_answered",
        "tombstone_until",
        "total_switches",
        "updates",
    )

    def __init__(
        self,
        *,
        machine: SessionMachine,
        client: ClientEntry,
        index: int,
        peer_index: int,
        session_id: bytes,
        cipher: SessionCipher,
        addr: Addr,
        path_id: int,
        skew_ms: int,
        policy: Policy,
        now: float,
        ports: SessionPorts,
    ) -> None:
        self.machine = machine
        self.client = client
        self.sources = InnerSources(client)
        self.index = index
        self.peer_index = peer_index
        self.session_id = session_id
        self.cipher = cipher
        self.policy = policy
        self._ports = ports
        self._report = ports.report
        self._deliver = ports.deliver
        self.clocks = SessionClocks(now, transportless=False)
        self.paths = PathValidator(addr, now, ports.urandom, path_id)
        self.reattach = ReattachGuard(policy.reattach_rate_per_s, policy.reattach_burst, now)
        self.duplicates = DuplicateMeter(policy.duplicate_alarm_ratio, now)
        self.updates = StateUpdates()
        self.binding: Addr | None = addr
        self.binding_path: int | None = path_id
        self.last_binding: Addr | None = addr
        self.epoch = INITIAL_EPOCH
        self.moved_by_mark: tuple[int, Addr] | None = None
        """(epoch, address) of the last move a binding mark committed: the late request of
        that move is answered, not refused as stale (ReattachGuard.check)."""
        self.last_inbound = now
        self.data_in_at = now
        """When the client's last DATA arrived (the session's start counts): the client may
        be idle, probing slowly, once it has sent none for a while (``dead_after_s``)."""
        self._busy_for = 0.0
        """DATA this much later than the last (s) may move the silence deadline earlier."""
        self._set_busy_for(policy)
        self.probes_rx = ProbeCounts()
        """PROBEs received per path_id (a u8: at most 256 keys), echoed in PROBE_ACK."""
        self.skew_ms = skew_ms
        self.security_failures = 0
        self.last_failure: float | None = None
        self.queue: deque[bytes] | None = None
        """Inner packets held while there is no binding (made at the first one)."""
        self.queue_bytes = 0
        self.rx_high = -1
        self.rx_phase = 0
        self.total_switches = 0
        self.tombstone_until: float | None = None
        self.end_reason: Reason | None = None
        self.terminate_answered: float | None = None
        self.owner_epoch = 0
        """The cluster's owner epoch of this session on this node (set on acquire and
        transfer, docs/cluster.md); told to the client with the node id (NODE_INFO)."""
        self.reserved = (0, 0 if ports.reserve is not None else REJECT_AFTER_MESSAGES, False)
        """(key phase, counter, rotating): the store holds a reservation of every send
        counter below ``counter`` in that phase (gateway_resume.py; without a persistent
        store, all of them), and whether its record says our key rotation is unconfirmed
        (what a restarted process resumes in depends on it: ``resume_state``)."""
        self._reserve_asked = False
        self.rekey_answered: float | None = None
        """When a datagram of a retired key phase was last answered with a REKEY."""

    # == reading ===========================================================================
    @property
    def born(self) -> float:
        return self.clocks.born

    @property
    def transportless_since(self) -> float | None:
        return self.clocks.transportless_since

    @property
    def validated(self) -> dict[Addr, float]:
        return self.paths.validated

    @property
    def challenges(self) -> dict[Addr, Any]:
        return self.paths.challenges

    @property
    def received_from(self) -> dict[Addr, int]:
        return self.paths.received_from

    @property
    def heard(self) -> bool:
        """An authentic datagram of this session came from the client (it has the keys)."""
        return self.rx_high >= 0 or self.rx_phase != 0

    @property
    def nonces(self) -> NonceGuard:
        return self.reattach.nonces

    @property
    def last_ack(self) -> tuple[int, ReattachAck] | None:
        return self.reattach.last_ack

    def dead_after_s(self) -> float:
        """Inbound silence on the binding that declares it dead: longer than the client's
        own detection (which probes every probe_interval), so the client normally acts
        first. An idle client (no inner data either way for ``idle_after_ms``) probes every
        ``idle_probe_interval_ms``: unless its last DATA was recent enough that it cannot be
        idle yet (half of ``idle_after_ms``: slack for a slow path), that interval is added.
        Read from the session's current policy (a reload applies at once)."""
        pol = self.policy
        busy = max(1.0, 3 * pol.dead_min_ms / 1000)
        if self.last_inbound + busy <= self.data_in_at + pol.idle_after_ms / 2000:
            return busy
        return busy + pol.idle_probe_interval_ms / 1000

    def _set_busy_for(self, policy: Policy) -> None:
        busy = max(1.0, 3 * policy.dead_min_ms / 1000)
        self._busy_for = policy.idle_after_ms / 2000 - busy

    def view(self, now: float) -> SessionView:
        return SessionView(
            session_id=self.machine.session_id, client=self.client.name,
            state=str(self.machine.state), state_version=self.machine.version,
            binding_epoch=self.epoch,
            binding=addr_label(self.binding) if self.binding is not None else "-",
            policy_version=self.machine.policy_version, age_s=now - self.clocks.born,
            security_failures=self.security_failures, total_switches=self.total_switches,
            cipher=self.cipher.suite.label,
        )  # fmt: skip

    def _base(self, now: float) -> EventBase:
        return self.machine.base(self._report.ts_ms(now))

    def _state_code(self) -> int:
        return STATE_CODES.index(str(self.machine.state))

    def _targets(self) -> list[Addr]:
        """Where news goes: the binding, or without one every validated address."""
        return [self.binding] if self.binding is not None else list(self.paths.validated)

    # == commands ==========================================================================
    def apply_policy(self, policy: Policy) -> None:
        """A reloaded policy applies strictly to this running session from now on."""
        self.policy = policy
        self._set_busy_for(policy)
        self.machine.policy_reloaded(policy.policy_version)
        self.reattach.configure(policy.reattach_rate_per_s, policy.reattach_burst)
        self.duplicates.configure(policy.duplicate_alarm_ratio)

    # == inputs ============================================================================
    def receive(
        self, data: bytes, msg_type: int, phase: int, epoch: int, mark: int, counter: int,
        addr: Addr, now: float,
    ) -> bool:  # fmt: skip
        """A transport datagram (DATA or CONTROL) addressed to this session, with the
        header fields the gateway unpacked (``wire.transport_fields``). Returns whether
        the session's deadlines may have changed: False only for authentic, fresh DATA
        from the binding in the current key phase, which moves no deadline but the
        binding's silence deadline, and that one later (the gateway's timer queue keeps
        the earlier one as a lower bound: ``timers.DeadlineQueue``)."""
        if self.machine.state is _TERMINATED:
            self._report.count_drop(Drop.WRONG_STATE)
            self._answer_tombstone(data, addr, now)
            return True
        cipher = self.cipher
        rekeyed = phase != cipher.phase  # only a datagram of another phase can rotate keys
        plaintext = cipher.open(data, now)
        if isinstance(plaintext, Drop):
            self._on_bad_packet(plaintext, addr, now)
            return True
        self.duplicates.fresh(now)
        if rekeyed and cipher.phase == phase:
            self._ask_reserve()  # the new phase's keys: stored before anything sealed leaves
            self._report.emit(KeyRotated(**self._base(now), key_phase=phase, initiator="peer"))
        if addr == self.binding and msg_type == MSG_DATA and phase == self.rx_phase:
            # The common case, _note_inbound's work inlined: from the binding nothing
            # moves (no move by mark, no resume); the packet goes out if its inner source
            # is the client's.
            if counter > self.rx_high:
                self.rx_high = counter
            self.paths.received(addr, len(data))
            self.last_inbound = now
            # after a pause the client may have been idle: the silence deadline (the long
            # one of dead_after_s) may come earlier now
            woke = now - self.data_in_at > self._busy_for
            self.data_in_at = now
            drop = self.sources.check(plaintext)
            if drop is None:
                self._deliver(plaintext)
            else:
                self._report.count_drop(drop)
            return rekeyed or woke
        at_binding = addr == self.binding
        same_phase = phase == self.rx_phase
        newest = self._note_inbound(len(data), phase, epoch, mark, counter, addr, at_binding, now)
        if self.machine.state is _TERMINATED:
            return True  # the datagram ended the session (a move past its TTL): nothing more
        if msg_type == MSG_DATA:
            self.data_in_at = now
            self._on_data(plaintext, addr, newest, now)
            return True
        if at_binding and self._control_at_binding(plaintext, addr, newest, same_phase, now):
            return rekeyed  # as for DATA: only the binding's silence deadline moved, later
        self._on_control_plain(plaintext, addr, newest, now)
        return True

    def _control_at_binding(
        self, plaintext: bytes, addr: Addr, newest: bool, same_phase: bool, now: float
    ) -> bool:
        """The two common CONTROL plaintexts from the binding, answered at once: a
        REATTACH_REQUEST that passes every check, and (in the phase already confirmed, on
        a validated binding) an idle session's PROBE. Both move no deadline but the
        binding's silence deadline, later, so the timer queue keeps its lower bound
        instead of re-reading every row (issue 11). False: nothing done; the general path
        decides."""
        if self._reattach_at_binding(plaintext, addr, now):
            return True
        if (
            same_phase
            and len(plaintext) == _PROBE_LEN
            and plaintext[0] == CType.PROBE
            and self.paths.is_validated(addr)
        ):
            probe_id, path_id, _ts = PROBE_BODY.unpack_from(plaintext, 1)
            self._on_probe(probe_id, path_id, addr, newest, now)
            return True
        return False

    def _on_control_plain(self, plaintext: bytes, addr: Addr, newest: bool, now: float) -> None:
        """An authentic CONTROL plaintext. A PROBE (the most frequent: idle sessions send
        nothing else) is answered without building its record (issue 11)."""
        if len(plaintext) == _PROBE_LEN and plaintext[0] == CType.PROBE:
            probe_id, path_id, _ts = PROBE_BODY.unpack_from(plaintext, 1)
            self._on_probe(probe_id, path_id, addr, newest, now)
            return
        msg = parse_control(plaintext)
        if isinstance(msg, Drop):
            self._report.count_drop(msg)
        else:
            self._on_control(msg, addr, newest, now)

    def _on_bad_packet(self, drop: Drop, addr: Addr, now: float) -> None:
        """Count a datagram that did not open; a late or duplicated one from a validated
        path is a transport effect, the rest of the violations are reported."""
        if drop is Drop.TOO_OLD or drop is Drop.DUPLICATE:
            drop = stale_drop(drop, self.paths.is_validated(addr), self.duplicates, now)
        self._report.count_drop(drop)
        violation = OPEN_VIOLATIONS.get(drop)
        if violation is not None:
            self._report.security(
                now, self._base(now), violation[0], violation[1], source=addr_label(addr)
            )
        if drop is Drop.RETIRED_KEY_PHASE:
            self._answer_retired(addr, now)

    def _answer_retired(self, addr: Addr, now: float) -> None:
        """An authentic datagram of the phase retired at resume, seen for the first time:
        while the client has not followed our new phase, tell it (a REKEY sealed in it; the
        client's cipher follows on opening it), at most once per REKEY_ANSWER_S."""
        answered = self.rekey_answered
        if not self.cipher.rekey_pending or (
            answered is not None and now < answered + REKEY_ANSWER_S
        ):
            return
        self.rekey_answered = now
        self._send(addr, Rekey(self.cipher.phase))

    def _note_inbound(
        self, size: int, phase: int, epoch: int, mark: int, counter: int, addr: Addr,
        at_binding: bool, now: float,
    ) -> bool:  # fmt: skip
        """Record an authentic datagram of ``size`` bytes from ``addr`` (header fields
        ``phase``, ``epoch``, ``mark``, ``counter``; ``at_binding``: ``addr`` is the
        binding); True if it is the newest seen."""
        if phase != self.rx_phase:
            self.rx_phase, self.rx_high = phase, -1
            self._ask_reserve()  # a confirmed rotation: stored before this datagram acts
        newest = counter > self.rx_high
        if newest:
            self.rx_high = counter
        self.paths.received(addr, size)
        if at_binding:
            self.last_inbound = now  # a mark from the binding moves nothing
        elif newest and mark and self._move_by_mark(epoch, mark, addr, now):
            return newest
        elif (
            self.binding is None
            and addr == self.last_binding
            and self.paths.is_validated(addr)
            and newest
        ):
            self._resume(addr, now)
        return newest

    def _on_data(self, packet: bytes, addr: Addr, newest: bool, now: float) -> None:
        if addr == self.binding or self.paths.is_validated(addr):
            drop = self.sources.check(packet)
            if drop is not None:
                self._report.count_drop(drop)
                return
            self._deliver(packet)
            return
        # Authentic data from an unknown address: a possible NAT rebinding (D4).
        self._report.count_drop(Drop.UNVALIDATED_PATH)
        if newest and self.binding is not None:
            self._challenge(addr, ChallengePurpose.NAT, now)

    def _on_control(self, msg: Control, addr: Addr, newest: bool, now: float) -> None:
        if isinstance(msg, Probe):
            self._on_probe(msg.probe_id, msg.path_id, addr, newest, now)
        elif isinstance(msg, PathResponse):
            self._on_path_response(msg, addr, now)
        elif isinstance(msg, ReattachRequest):
            self._on_reattach(msg, addr, now)
        elif isinstance(msg, StateAck):
            self.updates.acked(msg.seq)
        elif isinstance(msg, Terminate):
            reason = reason_from_wire(msg.reason) or Reason.PEER_TERMINATED
            self.terminate(reason, now, notify=False, initiator="peer")
        elif isinstance(msg, Rekey):
            pass  # the phase change itself was handled by SessionCipher.open
        else:
            self._report.count_drop(Drop.UNKNOWN_TYPE)

    def _on_probe(self, probe_id: int, path_id: int, addr: Addr, newest: bool, now: float) -> None:
        """PROBE_ACK (sealed straight from its fields: ``Outbox.probe_ack``)."""
        rx = (self.probes_rx.get(path_id, 0) + 1) & 0xFFFFFFFF
        self.probes_rx[path_id] = rx
        self.paths.saw_path(addr, path_id)
        self._mark_to(addr)
        self._ports.outbox.probe_ack(
            self.cipher, self.peer_index, addr,
            (probe_id, path_id, self._report.ts_ms(now), _STATE_CODE[self.machine.state],
             self.epoch, rx),
        )  # fmt: skip
        self._ask_reserve()
        if not self.paths.is_validated(addr):
            # A fresh probe of the bound path from a new address is a NAT rebinding of an
            # idle session (no data to show it): validate, then rebind like data.
            nat = newest and self.binding is not None and path_id == self.binding_path
            self._challenge(addr, ChallengePurpose.NAT if nat else ChallengePurpose.PROBE, now)

    def send_inner(self, packet: bytes) -> None:
        """An inner packet from the TUN for this client: sealed to the binding, or queued
        (within the policy's limits) while there is none. Moves no deadline (the gateway
        does not touch the session's timer entry for it)."""
        binding = self.binding
        if binding is not None:
            try:
                mark = (self.epoch, MARK_BINDING)
                dgram = self.cipher.seal(MSG_DATA, self.peer_index, packet, mark=mark)
            except KeyExhausted:
                self._report.count_drop(Drop.KEY_EXHAUSTED)
                return
            self._ports.outbox.push(binding, dgram)
            if self.cipher.send_counter > self.reserved[1]:
                self._ask_reserve()
            return
        pol = self.policy
        queue = self.queue
        if queue is None:
            queue = self.queue = deque()
        if (
            len(queue) >= pol.outbound_queue_packets
            or self.queue_bytes + len(packet) > pol.outbound_queue_bytes
        ):
            self._report.count_drop(Drop.QUEUE_OVERFLOW)
            return
        queue.append(packet)
        self.queue_bytes += len(packet)

    def _flush(self) -> None:
        queue, self.queue, self.queue_bytes = self.queue, None, 0
        for packet in queue or ():
            self.send_inner(packet)

    def _send(self, addr: Addr, msg: Control) -> int:
        self._mark_to(addr)
        sent = self._ports.outbox.control(self.cipher, self.peer_index, addr, msg)
        self._ask_reserve()
        return sent

    def reservation_due(self) -> bool:
        """Sealed past the reservation, in a phase it does not name, or the client has
        confirmed a rotation the store still holds as unconfirmed: a write is due."""
        c = self.cipher
        phase, counter, rotating = self.reserved
        return c.send_counter > counter or c.phase != phase or rotating != c.rekey_pending

    def _ask_reserve(self) -> None:
        """A write is due (:meth:`reservation_due`): ask the driver for it (once until it
        answers with :meth:`reservation_made`)."""
        if self._reserve_asked or not self.reservation_due():
            return
        if self._ports.reserve is not None:
            self._reserve_asked = True
            self._ports.reserve(self)

    def reservation_made(self, phase: int, counter: int, rotating: bool) -> None:
        """The store now holds a reservation of every counter below ``counter`` in
        ``phase``, and ``rotating``: whether our rotation to it was unconfirmed."""
        self.reserved = (phase, counter, rotating)
        self._reserve_asked = False
        self._ask_reserve()

    def reservation_failed(self) -> None:
        """The driver could not reserve (it voided what was sealed): ask again at the next
        seal, so that nothing sealed past the reservation ever leaves unchecked."""
        self._reserve_asked = False

    def _mark_to(self, addr: Addr) -> None:
        """What is sealed next goes to ``addr``: its binding mark says what this session
        knows of ``addr`` (the binding at ``epoch``, validated or not): the client learns
        from it that a standby path is ready and that a switch by mark has landed."""
        if addr == self.binding:
            mark = MARK_BINDING
        else:
            mark = MARK_VALIDATED if self.paths.is_validated(addr) else MARK_UNVALIDATED
        self.cipher.set_mark(self.epoch, mark)

    # == path validation and NAT rebinding (D4) ==========================================
    def _seal_challenge(self, token: bytes) -> bytes:
        dgram = self.cipher.seal(MSG_CONTROL, self.peer_index, pack_control(PathChallenge(token)))
        self._ask_reserve()
        return dgram

    def _challenge(self, addr: Addr, purpose: ChallengePurpose, now: float) -> None:
        self._mark_to(addr)
        result = self.paths.challenge(addr, purpose, now, self._seal_challenge)
        if isinstance(result, Drop):
            self._report.count_drop(result)
        elif result is not None:
            self._ports.outbox.push(addr, result)

    def _on_path_response(self, msg: PathResponse, addr: Addr, now: float) -> None:
        purpose = self.paths.responded(addr, msg.token, now, keep=self.binding)
        if purpose is None:
            self._report.count_drop(Drop.UNEXPECTED_PATH_RESPONSE)
            return
        self._report.emit(PathValidated(**self._base(now), path=addr_label(addr)))
        held = self.reattach.release(addr)
        if held is not None:
            self._on_reattach(held, addr, now)
        elif purpose is ChallengePurpose.NAT and self.binding is not None and addr != self.binding:
            self._nat_rebind(addr, now)

    def _nat_rebind(self, addr: Addr, now: float) -> None:
        old = self.binding
        if not self._fire(Trigger.REBIND, Reason.NAT_REBIND, now):
            return
        self._next_epoch()
        self.binding, self.last_binding, self.last_inbound = addr, addr, now
        self.paths.forget(old)  # the old address is no longer accepted
        self.total_switches += 1
        self._report.emit(
            TransportSwitch(
                **self._base(now), previous_transport=self.binding_path,
                new_transport=self.binding_path if self.binding_path is not None else -1,
                reason_code=Reason.NAT_REBIND, switch_latency_ms=0.0,
                binding_epoch=self.epoch, path=addr_label(addr),
            )
        )  # fmt: skip
        self._state_update(Reason.NAT_REBIND, now)

    def _resume(self, addr: Addr, now: float) -> None:
        """RECOVERING, and the last binding speaks again with a newest packet: re-bind it."""
        if self.machine.state is State.RECOVERING and self._fire(
            Trigger.REATTACH_OK, Reason.TRANSPORT_RESUMED, now
        ):
            self._next_epoch()
            self.binding, self.last_inbound = addr, now
            self.clocks.transport_regained()
            self._state_update(Reason.TRANSPORT_RESUMED, now)
            self._flush()

    # == reattach (spec/security-binding order, digest §4.4) ==============================
    def _expired_for_reattach(self, now: float) -> Reason | None:
        """The reject reason if a session row that ends the session is due at ``now``."""
        for row in SESSION_ROWS:
            answer = REATTACH_LIMITS.get(row.reason)
            deadline = row.deadline(self) if answer is not None else None
            if deadline is not None and now >= deadline:
                return answer
        return None

    def _on_reattach(self, req: ReattachRequest, addr: Addr, now: float) -> None:
        expired = self._expired_for_reattach(now)
        if expired is not None:
            self._reject(req, addr, expired, now, fatal=True)
            return
        verdict = self.reattach.check(
            req, now, epoch=self.epoch, at_binding=addr == self.binding,
            validated=self.paths.is_validated(addr),
            age_ms=abs(self._report.ts_ms(now) - (req.ts_ms + self.skew_ms)),
            max_age_ms=self.policy.reattach_proof_max_age_ms,
            moved_here=self.moved_by_mark == (self.epoch, addr),
        )  # fmt: skip
        self._carry_out(verdict, req, addr, now)

    def _reattach_at_binding(self, plaintext: bytes, addr: Addr, now: float) -> bool:
        """The common CONTROL datagram from the binding, a REATTACH_REQUEST, answered with
        one unpack and no request object (the way of the DATA fast path): from the binding
        (the caller checked), a validated address, of a session
        that is not RECOVERING, passing every check of :meth:`_on_reattach` (same checks,
        same order). True: committed and acknowledged. False: nothing changed; the general
        path decides (and refuses, holds or moves exactly as it would have)."""
        if (
            len(plaintext) != _REQUEST_LEN
            or plaintext[0] != CType.REATTACH_REQUEST
            or self.machine.state is State.RECOVERING
            or not self.paths.is_validated(addr)
            or self._expired_for_reattach(now) is not None
        ):
            return False
        nonce, ts_ms, expected_epoch, _path, kind, _version = _REQUEST.unpack_from(plaintext, 1)
        if kind not in _KINDS:
            return False
        epoch = self.epoch
        age_ms = abs(self._report.ts_ms(now) - (ts_ms + self.skew_ms))
        max_age_ms = self.policy.reattach_proof_max_age_ms
        if not self.reattach.commit_valid(nonce, expected_epoch, epoch, age_ms, max_age_ms, now):
            return False
        ack = ReattachAck(nonce, epoch, self.machine.version, self._state_code())
        self.reattach.acked(nonce, ack)
        self._send_node_info(addr)
        self._send(addr, ack)
        if self.queue:
            self._flush()
        return True

    def _carry_out(
        self, verdict: ReattachVerdict, req: ReattachRequest, addr: Addr, now: float
    ) -> None:
        action = verdict.action
        if action is ReattachAction.COMMIT:
            self._commit_reattach(req, addr, now)
        elif action is ReattachAction.HOLD:
            self.reattach.hold(req, addr)  # answered once the address proves it is the client's
            self._challenge(addr, ChallengePurpose.REATTACH, now)
        elif action is ReattachAction.REPEAT_ACK:
            last = self.reattach.last_ack
            if last is not None:
                self._send(addr, last[1])  # retransmitted request: same answer
        elif action is ReattachAction.REPLAY:
            self._report.count_drop(Drop.REPLAY)  # not answered, but never silently
        else:
            assert verdict.reason is not None
            if verdict.violation is not None:
                self._report.security(
                    now, self._base(now), verdict.violation, verdict.reason,
                    source=addr_label(addr),
                )  # fmt: skip
            self._reject(
                req, addr, verdict.reason, now, fatal=verdict.fatal, escalate=verdict.escalate
            )

    def _reject(
        self, req: ReattachRequest, addr: Addr, reason: Reason, now: float,
        *, fatal: bool = False, escalate: bool = False,
    ) -> None:  # fmt: skip
        self._send(addr, ReattachReject(req.nonce, reason_to_wire(reason), int(fatal), self.epoch))
        self._report.emit(
            ReattachResult(
                **self._base(now), status="DENIED", reason_code=reason,
                candidate_transport=req.path_id, path=addr_label(addr), fatal=fatal,
            )
        )  # fmt: skip
        if fatal:
            self.terminate(reason, now, notify=False)
        elif escalate:
            self._escalate(now)

    def _escalate(self, now: float) -> None:
        """Seed §3: repeated authenticated validation failures -> DEGRADED, then TERMINATED."""
        self.security_failures += 1
        self.last_failure = now
        pol = self.policy
        if self.security_failures >= pol.security_failures_to_terminate:
            self.terminate(Reason.SECURITY_FAILURE, now)
        elif self.security_failures >= pol.security_failures_to_degrade and self.machine.can(
            Trigger.SECURITY_ESCALATION
        ):
            self._fire(Trigger.SECURITY_ESCALATION, Reason.SECURITY_FAILURES_REPEATED, now)

    def _commit_reattach(self, req: ReattachRequest, addr: Addr, now: float) -> None:
        self.reattach.commit(req)
        st = self.machine.state
        ack: ReattachAck | None
        if addr == self.binding and st is not State.RECOVERING:
            ack = ReattachAck(req.nonce, self.epoch, self.machine.version, self._state_code())
        else:
            ack = self._move_binding(req, addr, now)
        if ack is None:
            return
        self.reattach.acked(req.nonce, ack)
        self._send_node_info(addr)
        self._send(addr, ack)
        self._flush()

    def _move_binding(self, req: ReattachRequest, addr: Addr, now: float) -> ReattachAck | None:
        """The committed reattach moves the binding to ``addr``: the ACK, or None when the
        state machine refused (then rejected, or terminated by the version ceiling)."""
        if not self._commit_move(addr, req.path_id, ReattachKind(req.kind), now):
            if self.machine.terminated:
                self._on_terminated(now)
            else:
                self._reject(req, addr, Reason.INVALID_STATE_FOR_REATTACH, now)
            return None
        self.updates.cancel()  # the ACK carries the new state
        return ReattachAck(req.nonce, self.epoch, self.machine.version, self._state_code())

    def _move_by_mark(self, epoch: int, mark: int, addr: Addr, now: float) -> bool:
        """A binding mark on an authentic, newest datagram: move the binding to ``addr`` if
        the mark names ``epoch + 1`` (mod 256), ``addr`` is validated for this session and
        is not the binding, the session may still reattach (lifetime, TTL, state) and the
        reattach bucket has a token. True if it moved. Anything else moves nothing and the
        datagram is handled as any other (docs/wire-format.md, "Binding mark"); a move
        past the session's lifetime or transport TTL ends the session, as a request would."""
        if (
            epoch != (self.epoch + 1) & 0xFF
            or addr == self.binding
            or not self.paths.is_validated(addr)
        ):
            return False
        path_id = self.paths.path_id_of(addr)
        expired = self._expired_for_reattach(now)
        if expired is not None:
            self._report.emit(
                ReattachResult(
                    **self._base(now), status="DENIED", reason_code=expired,
                    candidate_transport=-1 if path_id is None else path_id,
                    path=addr_label(addr), fatal=True,
                )
            )  # fmt: skip
            self.terminate(expired, now)
            return True
        recovering = self.machine.state is State.RECOVERING
        if not self.machine.can(Trigger.REATTACH_OK if recovering else Trigger.REBIND):
            return False
        if not self.reattach.allow_move(now):
            return False
        kind = ReattachKind(mark - 1)
        if not self._commit_move(addr, -1 if path_id is None else path_id, kind, now):
            if self.machine.terminated:
                self._on_terminated(now)
            return False
        self.moved_by_mark = (self.epoch, addr)
        # The client learns the move from this (retransmitted until acknowledged) and from
        # every datagram that carries the new epoch in its header.
        self._state_update(Reason.REATTACH_SUCCESS if recovering else KIND_REASON[kind], now)
        self._flush()
        return True

    def _commit_move(self, addr: Addr, path_id: int, kind: ReattachKind, now: float) -> bool:
        """Move the binding to ``addr`` (the client's ``path_id``): one versioned transition
        (REATTACH_OK from RECOVERING, else REBIND with the kind's reason), the next epoch,
        TRANSPORT_SWITCH and REATTACH_RESULT. False when the state machine refused."""
        previous = self.binding_path
        recovering = self.machine.state is State.RECOVERING
        reason = KIND_REASON[kind]
        ts = self._report.ts_ms(now)
        if recovering:
            ok = self.machine.fire(Trigger.REATTACH_OK, Reason.REATTACH_SUCCESS, ts)
        else:
            ok = self.machine.fire(Trigger.REBIND, reason, ts)
        if not ok:
            return False
        self._next_epoch()
        self.binding, self.binding_path, self.last_binding = addr, path_id, addr
        self.last_inbound = now
        started = self.clocks.recovery_started
        latency = 0.0 if started is None else (now - started) * 1000
        self.clocks.transport_regained()
        self.total_switches += 1
        self._report.emit(
            TransportSwitch(
                **self._base(now), previous_transport=previous, new_transport=path_id,
                reason_code=Reason.REATTACH_SUCCESS if recovering else reason,
                switch_latency_ms=round(latency, 3), binding_epoch=self.epoch,
                path=addr_label(addr),
            )
        )  # fmt: skip
        self._report.emit(
            ReattachResult(
                **self._base(now), status="SUCCESS", reason_code=Reason.REATTACH_SUCCESS,
                candidate_transport=path_id, path=addr_label(addr),
            )
        )  # fmt: skip
        return True

    def _next_epoch(self) -> None:
        """A committed binding change: the next epoch."""
        self.epoch += 1

    # == transitions, STATE_UPDATE, termination ===========================================
    def _fire(self, trigger: Trigger, reason: Reason, now: float, **fields: Any) -> bool:
        if trigger is Trigger.TERMINATE:
            self.end_reason = reason
            fields.setdefault("session_age_ms", self.clocks.age_ms(now))
            fields.setdefault("transportless_age_ms", self.clocks.transportless_ms(now))
            fields.setdefault("total_switches", self.total_switches)
        ok = self.machine.fire(trigger, reason, self._report.ts_ms(now), **fields)
        if not ok and not self.machine.terminated:
            return False
        if self.machine.terminated:
            self._on_terminated(now)
        else:
            self._state_update(reason, now)
        return ok

    def _state_update(self, reason: Reason, now: float) -> None:
        self.updates.new(self._state_code(), self.machine.version, self.epoch, reason)
        self._send_state_update(now)

    def _send_state_update(self, now: float) -> None:
        msg = self.updates.pending
        if msg is None:
            return
        for addr in self._targets():
            self._send_node_info(addr)
            self._send(addr, msg)
        self.updates.sent(now)

    def _send_node_info(self, addr: Addr) -> None:
        """A cluster node says who serves the session (before a REATTACH_ACK or a
        STATE_UPDATE: a takeover always ends in one of them)."""
        if self._ports.node:
            self._send(addr, NodeInfo.of(self._ports.node, self.owner_epoch))

    def announce_owner(self, owner_epoch: int) -> None:
        """The session's owner epoch on this node changed (acquire, transfer): record it
        and tell the client at once (NODE_INFO to the binding or its validated paths)."""
        self.owner_epoch = owner_epoch
        if not self.machine.terminated:
            for addr in self._targets():
                self._send_node_info(addr)

    def terminate(
        self, reason: Reason, now: float, *, notify: bool = True, initiator: str = "local"
    ) -> None:
        """End the session (TERMINATE to the client unless ``notify`` is False)."""
        if self.machine.terminated:
            return
        if notify:
            # Transport messages still queued for this client (e.g. the REATTACH_ACK whose
            # transition the session store refused) are void: TERMINATE is the last word.
            self._ports.outbox.void_for(self.peer_index)
            for addr in self._targets():
                self._send(addr, Terminate(reason_to_wire(reason)))
        self._fire(Trigger.TERMINATE, reason, now, initiator=initiator)

    def _on_terminated(self, now: float) -> None:
        self.binding = None
        self.queue = None
        self.queue_bytes = 0
        self.reattach.forget_held()
        self.updates.cancel()
        self.paths.clear_challenges()
        self.tombstone_until = now + TOMBSTONE_S
        self._ports.ended(self)

    def _answer_tombstone(self, data: bytes, addr: Addr, now: float) -> None:
        """A datagram for a terminated session: if it is authentic and fresh, tell the sender
        (again) that the session ended, at most once per TOMBSTONE_ANSWER_S. Forged and
        replayed datagrams fail to open and get nothing; a TERMINATE is not answered."""
        if self.tombstone_until is None or now >= self.tombstone_until:
            return
        plaintext = self.cipher.open(data, now)  # always: the replay window must see it
        if isinstance(plaintext, Drop):
            return
        answered = self.terminate_answered
        if answered is not None and now < answered + TOMBSTONE_ANSWER_S:
            return
        if data[0] == MSG_CONTROL and isinstance(parse_control(plaintext), Terminate):
            return
        self.terminate_answered = now
        self._send(addr, Terminate(reason_to_wire(self.end_reason or Reason.PEER_TERMINATED)))

    # == resume after a restart (DESIGN D15a; gateway_resume.py) ===========================
    def resume_state(self, send_from: int) -> ResumeState:
        """This session as another process needs it, with ``send_from`` reserved."""
        phase, keys, retired = self.cipher.resume_keys()
        clocks, wall = self.clocks, self._report.ts_ms
        return ResumeState(
            session_id=self.session_id, index=self.index, peer_index=self.peer_index,
            client=self.client, state=str(self.machine.state),
            state_version=self.machine.version, binding_epoch=self.epoch, keys=keys,
            suite=self.cipher.suite, key_phase=phase, send_from=send_from, retired=retired,
            binding=self.binding, binding_path=self.binding_path,
            last_binding=self.last_binding if self.last_binding is not None else self.binding,
            skew_ms=self.skew_ms, born_ms=wall(clocks.born),
            transportless_ms=_wall_or_none(wall, clocks.transportless_since),
            recovery_ms=_wall_or_none(wall, clocks.recovery_started),
            total_switches=self.total_switches,
        )  # fmt: skip

    def resume_from(self, state: ResumeState, now: float) -> None:
        """Take over ``state`` (a new session object built from it; no events): the
        binding, epoch, counters and clocks of the process that wrote it, in a key phase
        that process opened nothing in (``SessionCipher.resume_at``: what it had accepted
        cannot be accepted again). A REKEY in that phase goes to the binding (else the
        last one) at once: the client follows it, and its datagrams of the retired phase
        are answered with one too (:meth:`_answer_retired`)."""
        self.machine.resume_at(State(state.state), state.state_version)
        cipher = self.cipher
        cipher.resume_at(state.key_phase, state.send_from, state.retired)
        stored = state.send_from if state.retired is not None else 0
        self.reserved = (cipher.phase, stored, state.retired is not None)
        self.rx_phase = (cipher.phase - 1) % PHASES  # the client's datagrams: a new rx phase
        self.epoch = state.binding_epoch
        self.binding, self.binding_path = state.binding, state.binding_path
        self.last_binding = state.last_binding
        self.total_switches = state.total_switches
        self.clocks.resumed(
            now, self._report.ts_ms(now), state.born_ms, state.transportless_ms, state.recovery_ms
        )
        self.rekey_answered = now
        target = state.binding if state.binding is not None else state.last_binding
        self._send(target, Rekey(cipher.phase))

    # == timers ============================================================================
    def handle_timer(self, now: float) -> None:
        """Apply the most urgent due row, then the due chores (a terminated session: none)."""
        if self.machine.terminated:
            return
        due = due_rows(GATEWAY_ROWS, self, self.machine.state, now)
        row = most_urgent_row(due, self)
        if row is not None:
            self._apply_row(row, now)
        run_due_chores(GATEWAY_CHORES, self, now)

    def next_deadline(self) -> float | None:
        """The earliest deadline of the same rows and chores (a tombstone: its expiry)."""
        if self.machine.terminated:
            return self.tombstone_until
        rows = earliest(GATEWAY_ROWS, self, self.machine.state)
        chores = chore_deadline(GATEWAY_CHORES, self)
        if rows is None or chores is None:
            return chores if rows is None else rows
        return min(rows, chores)

    def tombstone_expired(self, now: float) -> bool:
        return self.tombstone_until is not None and now >= self.tombstone_until

    def _apply_row(self, row: TimedRow[Any], now: float) -> None:
        trigger = row.fires(self)
        if trigger is Trigger.TERMINATE:
            self.terminate(row.reason, now)
        elif trigger is Trigger.TRANSPORT_DEAD:
            self._binding_dead(now)
        elif trigger is Trigger.STABILITY_RESTORED:
            if self._fire(trigger, row.reason, now):
                self.security_failures = 0
                self.last_failure = None
        else:
            self._fire(trigger, row.reason, now)

    def _binding_dead(self, now: float) -> None:
        """Inbound silence on the binding: RECOVERING without a binding (the client
        reattaches; a datagram from the last binding resumes it)."""
        dead = self.binding
        self._report.emit(
            TransportDead(
                **self._base(now),
                transport_id=-1 if self.binding_path is None else self.binding_path,
                silence_ms=round((now - self.last_inbound) * 1000, 3),
            )
        )
        self.binding = None
        self.clocks.transport_lost(now)
        self.clocks.recovery_begun(now)
        ok = self._fire(
            Trigger.TRANSPORT_DEAD, Reason.TRANSPORT_DEAD, now, from_transport=self.binding_path
        )
        if not ok and not self.machine.terminated:
            self.binding = dead
            self.clocks.transport_regained()

    def _resend_state_update(self, now: float) -> None:
        self._send_state_update(now)

    def _discard_old_keys(self, now: float) -> None:
        self.cipher.discard_expired(now)


def _wall_or_none(wall: Callable[[float], int], t: float | None) -> int | None:
    return None if t is None else wall(t)


def _binding_dead_at(s: GatewaySession) -> float | None:
    return None if s.binding is None else s.last_inbound + s.dead_after_s()


def _stability_at(s: GatewaySession) -> float | None:
    if s.binding is None or s.last_failure is None:
        return None
    return s.last_failure + s.policy.stability_window_ms / 1000


GATEWAY_ROWS: tuple[TimedRow[Any], ...] = (
    *SESSION_ROWS,
    TimedRow(
        "binding_dead", LIVE_STATES, _binding_dead_at,
        Trigger.TRANSPORT_DEAD, Reason.TRANSPORT_DEAD,
    ),
    TimedRow(
        "stability_restored", frozenset({State.DEGRADED}), _stability_at,
        Trigger.STABILITY_RESTORED, Reason.STABILITY_RESTORED,
    ),
)  # fmt: skip
"""A gateway session's timed triggers: the shared rows, then death of the binding from
inbound silence (``dead_after_s``) and, in DEGRADED with a binding, the end of the
stability window after the last security failure."""

GATEWAY_CHORES: tuple[TimedChore[GatewaySession], ...] = (
    TimedChore(
        "state_update_resend", lambda s: s.updates.resend_at(), GatewaySession._resend_state_update
    ),
    TimedChore(
        "previous_keys", lambda s: s.cipher.next_deadline(), GatewaySession._discard_old_keys
    ),
)
"""Timed work that is no transition: the STATE_UPDATE retransmission (every
STATE_UPDATE_RESEND_S until acknowledged) and the end of the previous keys' grace."""
