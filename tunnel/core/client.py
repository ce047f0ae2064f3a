"""ClientSession: the client protocol machine (sans-I/O).

Inputs: ``connect(now)``, ``receive_datagram(data, path_id, now)``,
``receive_tun_packet(packet, now)``, ``handle_timer(now)`` and the operator commands
(``switch_to``, ``set_auto_switch``, ``force_reattach``, ``terminate``, ``apply_policy``).
Outputs are pulled: ``datagrams_to_send()`` -> [(path_id, bytes)], ``packets_for_tun()``,
``next_event()``, and one ``next_deadline()`` for the driver's single timer.

The client keeps every candidate path probed (PathHealth), carries data on exactly one
active path, and changes it only through a REATTACH_REQUEST the gateway acknowledges:
- hard death of the active path: ATTACHED/VOLATILE/DEGRADED -> RECOVERING, then reattach
  on the best live candidate -> ATTACHED (T04/T05/T08, T10);
- quality trouble: ATTACHED -> VOLATILE; with auto-switch, a candidate that beats the
  active path by the hysteresis factor for the dwell time gets a proactive switch, one
  versioned rebind VOLATILE -> ATTACHED (R2); otherwise DEGRADED after volatile_to_degraded,
  where switching goes on with stricter filters (the active path still judged bad, the
  candidate judged healthy): DEGRADED -> ATTACHED (R3);
- operator switch: a versioned rebind (R1-R3), exempt from cooldown, counted in the budget.

The session is composed of components that own their state (wireguard-go's peer grouped
per concern): ``report`` (events, drops), ``machine`` (the state table), ``clocks`` and
``quality`` (what the timed rows read), ``paths`` (``PathSet``: health, probes, the active
path), ``switching`` (``SwitchController``: recovery, switches, the request in flight),
``handshake`` (``HandshakeInitiator``), ``keys`` (``KeySchedule``: the cipher and its
rotation), ``duplicates`` (``DuplicateMeter``: whether stale datagrams are network copies
or a replay) and ``peer`` (the gateway's view). This class routes inputs to them and collects
their outputs. Its timer is data: ``CLIENT_ROWS`` (client_rows.py) plus the components' own
``next_deadline()``.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tunnel.core.aead import KeyExhausted, SessionCipher
from tunnel.core.ciphers import ALL_CIPHERS, DataCipher
from tunnel.core.client_rows import CLIENT_ROWS, WITH_ACTIVE, QualityClocks
from tunnel.core.constants import (
    MARK_BINDING,
    MARK_VALIDATED,
    MAX_INNER_PACKET,
    MAX_STATE_VERSION,
    MSG_CONTROL,
    MSG_COOKIE_REPLY,
    MSG_DATA,
    MSG_HANDSHAKE_RESP,
    MSG_STANDBY_ACK,
)
from tunnel.core.drops import Drop
from tunnel.core.endpoint import Reporter
from tunnel.core.events import (
    Diagnostic,
    Event,
    EventBase,
    KeyRotated,
    PathAdded,
    PathRemoved,
    PeerState,
    PolicyEvent,
    Reason,
    SessionCreated,
    SessionLinked,
    TransportAttached,
    reason_from_wire,
    reason_to_wire,
)
from tunnel.core.health import PathStats
from tunnel.core.initiator import Accepted, HandshakeInitiator
from tunnel.core.key_schedule import KeySchedule
from tunnel.core.path import Path, PathSet
from tunnel.core.policy import Policy
from tunnel.core.replay import DuplicateMeter, stale_drop
from tunnel.core.rescue import LostStateRescue
from tunnel.core.selection import Selector, SwitchLimiter
from tunnel.core.session import SessionMachine, State, Trigger
from tunnel.core.standby import open_standby_ack
from tunnel.core.switching import PeerView, SwitchController
from tunnel.core.timers import SessionClocks, TimedRow, due_rows, earliest, most_urgent_row
from tunnel.core.wire import (
    STATE_CODES,
    Control,
    NodeInfo,
    PathChallenge,
    PathResponse,
    Probe,
    ProbeAck,
    ReattachAck,
    ReattachReject,
    Rekey,
    StateAck,
    StateUpdate,
    Terminate,
    TransportFields,
    pack_control,
    parse_control,
    parse_header,
    transport_fields,
)

__all__ = ["ClientSession", "ClientSnapshot", "PathSpec", "PathView"]

TERMINATE_COPIES = 2
"""TERMINATE is sent this many times on each live path: best effort, it is not acked."""

MAX_TIMER_PASSES = 4
"""``handle_timer`` repeats its pass while something is still due at ``now``: an action late
in one pass can make an earlier step due (a reattach request given up at the end of the
pass frees the selector, whose dwell may have ended meanwhile). So no deadline at or before
``now`` is left for the driver; the bound only guards against a bug, which the timer
property test (tests/test_client_timers.py) reports."""

LOST_STATE_SILENCE_RETRIES = 2
"""Reattach retransmission intervals of silence (nothing authenticated from the gateway
since the recovery began) before the client asks whether the gateway still knows the
session (DESIGN D15c; rescue.py). Asking is harmless (a gateway that knows the session does
not answer the INIT), so this only saves the gateway a DH while a reattach may still land."""

RECOVERY_STATES = frozenset({State.RECOVERING, State.DEGRADED})
"""States in which a session may be without an active path and look for its gateway."""

_TERMINATED = State.TERMINATED

MAX_CHAINED_ROWS = 8
"""Rows fired in one pass at most. Each row is armed only in states where its trigger is
legal, and firing it changes the state or ends the session, so chains are short."""


@dataclass(frozen=True, slots=True)
class PathSpec:
    """A candidate transport as the core sees it: an id and a human label."""

    path_id: int
    label: str


@dataclass(frozen=True, slots=True)
class PathView:
    """One path in a :class:`ClientSnapshot`: its stats and its role for the session."""

    stats: PathStats
    label: str
    role: str
    validated: bool


@dataclass(frozen=True, slots=True)
class ClientSnapshot:
    """Immutable view for the UI and tests; no secrets."""

    session_id: str
    state: str
    state_version: int
    binding_epoch: int
    peer_state: str
    peer_state_version: int
    active: int | None
    pending: int | None
    paths: tuple[PathView, ...]
    auto_switch: bool
    switch_budget_left: int
    cooldown_remaining_ms: float
    key_phase: int
    key_age_s: float
    policy_version: str
    uptime_s: float
    queue_depth: int
    queue_dropped: int
    total_switches: int
    drops: tuple[tuple[str, int], ...]
    inner_address: str
    inner_address6: str = ""
    """The inner IPv6 address the gateway assigned (empty: no IPv6 in this session)."""
    cipher: str = ""
    """The data cipher negotiated in the handshake (empty before it)."""
    serving_node: str = ""
    """The gateway cluster node serving the session (empty: not a cluster)."""
    owner_epoch: int = 0
    """The session's owner epoch on that node (bumped by every takeover)."""


class ClientSession:
    """The client protocol machine; see the module docstring for its inputs and outputs."""

    def __init__(
        self,
        *,
        static_private: bytes,
        gateway_public: bytes,
        paths: Sequence[PathSpec],
        policy: Policy,
        now: float,
        rng: random.Random | None = None,
        node_id: str = "client",
        wall_offset: float = 0.0,
        max_version: int = MAX_STATE_VERSION,
        ciphers: Sequence[DataCipher] = ALL_CIPHERS,
    ) -> None:
        """``ciphers``: the data ciphers this client accepts, preferred first (the
        handshake offers them; tunnel/core/ciphers.py)."""
        if not paths:
            raise ValueError("a client needs at least one path")
        if len({p.path_id for p in paths}) != len(paths):
            raise ValueError("path ids must be unique")
        if len(paths) > policy.max_candidate_count:
            raise ValueError(
                f"{len(paths)} paths configured, policy allows {policy.max_candidate_count}"
            )
        self.node_id = node_id
        self.wall_offset = wall_offset
        self.policy = policy
        self.report = Reporter(node_id=node_id, wall_offset=wall_offset, now=now)
        self.machine = SessionMachine(
            node_id=node_id,
            policy_version=policy.policy_version,
            emit=self.report.emit,
            max_version=max_version,
        )
        self.clocks = SessionClocks(now, transportless=True)
        self.quality = QualityClocks()
        self.peer = PeerView()
        self.paths = PathSet(
            [(p.path_id, p.label) for p in paths], policy, now, emit=self.report.emit,
            base=self.base,
        )  # fmt: skip
        self.switching = SwitchController(self, policy)
        self._rng = rng or random.Random()
        self._max_version = max_version
        self.index = self._rng.getrandbits(32) or 1
        self.handshake = HandshakeInitiator(
            static_private, gateway_public, self.index, self.paths.order, offer=ciphers
        )
        self.rescue = LostStateRescue(
            static_private, gateway_public, self.paths.order, self._rng, offer=ciphers
        )
        """The explicit re-handshake when the gateway lost the session (DESIGN D15c)."""
        self.heard_at: float | None = None
        """When the last authenticated datagram of this session arrived (None: never)."""
        self.data_at = now
        """When inner data last went either way (sent or received; the session's start
        counts): ``idle_after_ms`` later the session is idle and probes slowly."""
        self.previous_session_id = ""
        """The session this one continues (SESSION_LINKED); empty for a first session."""
        self.peer_index = 0
        self.keys = KeySchedule()
        self.duplicates = DuplicateMeter(policy.duplicate_alarm_ratio, now)
        self.inner_address = ""
        self.inner_prefix = 0
        self.inner_gateway = ""
        self.inner_address6 = ""
        """The inner IPv6 address the gateway assigned; empty: no IPv6 in this session."""
        self.inner_prefix6 = 0
        self.inner_gateway6 = ""
        self.serving_node = ""
        """The cluster node serving the session (EXT_NODE, NODE_INFO); empty: none said."""
        self.owner_epoch = 0
        self.mtu = 1420
        self.advertised: tuple[tuple[str, int], ...] = ()
        self._out: list[tuple[int, bytes]] = []
        self._tun: list[bytes] = []
        self._queue: deque[bytes] = deque()
        self._queue_bytes = 0
        self.queue_dropped = 0
        self._timer_now = now
        self._row_handlers: dict[Trigger, Callable[[Reason, float], None]] = {
            Trigger.TERMINATE: self._terminate_by_row,
            Trigger.TRANSPORT_DEAD: lambda _reason, now: self.switching.on_transport_dead(now),
            Trigger.INSTABILITY: self.switching.on_instability,
            Trigger.DEGRADE: self.switching.enter_degraded,
            Trigger.STABILITY_RESTORED: lambda _reason, now: self.switching.on_stability(now),
        }

    # == read-only views =====================================================================
    @property
    def state(self) -> State:
        return self.machine.state

    @property
    def cipher(self) -> SessionCipher | None:
        """The session keys (None before the handshake)."""
        return self.keys.cipher

    @property
    def state_version(self) -> int:
        return self.machine.version

    @property
    def active(self) -> int | None:
        return self.paths.active

    @property
    def epoch(self) -> int:
        return self.peer.epoch

    @property
    def peer_state(self) -> str:
        return self.peer.state

    @property
    def peer_version(self) -> int:
        return self.peer.version

    @property
    def total_switches(self) -> int:
        return self.switching.total_switches

    @property
    def auto_switch(self) -> bool:
        return self.switching.auto_switch

    @property
    def limiter(self) -> SwitchLimiter:
        return self.switching.limiter

    @property
    def selector(self) -> Selector:
        return self.switching.selector

    @property
    def drops(self) -> dict[str, int]:
        return self.report.drops

    def count_drop(self, reason: Drop) -> None:
        """An input the driver discarded before it reached the session (a datagram from
        an address that is not the path's gateway, a host packet the session cannot
        carry): counted with the session's own drops (snapshot ``drops``, DROP_SUMMARY)."""
        self.report.count_drop(reason)

    @property
    def events_dropped(self) -> int:
        return self.report.events_dropped

    def ts_ms(self, now: float) -> int:
        return self.report.ts_ms(now)

    # == what the components call ==========================================================
    def base(self, now: float) -> EventBase:
        return self.machine.base(self.report.ts_ms(now))

    def fire(self, trigger: Trigger, reason: Reason, now: float, **fields: Any) -> bool:
        if trigger is Trigger.TERMINATE:
            fields.setdefault("session_age_ms", self.clocks.age_ms(now))
            fields.setdefault("transportless_age_ms", self.clocks.transportless_ms(now))
            fields.setdefault("total_switches", self.total_switches)
        ok = self.machine.fire(trigger, reason, self.report.ts_ms(now), **fields)
        if self.machine.terminated:
            self._on_terminated()
        return ok

    def send_control(self, path_id: int, msg: Control) -> None:
        if self.cipher is not None:
            self._seal(self.cipher, MSG_CONTROL, path_id, pack_control(msg))

    def _seal(self, cipher: SessionCipher, msg_type: int, path_id: int, plaintext: bytes) -> None:
        """Seal for ``path_id`` with the binding mark the switch controller gives it."""
        try:
            dgram = cipher.seal(
                msg_type, self.peer_index, plaintext, mark=self.switching.mark_for(path_id)
            )
        except KeyExhausted:
            self.report.count_drop(Drop.KEY_EXHAUSTED)
            return
        self._out.append((path_id, dgram))

    def switched(self, path_id: int, now: float) -> None:
        """The binding moved to ``path_id`` (the gateway acknowledged): send what waited."""
        self._flush_queue()

    def moving(self, path_id: int, now: float) -> None:
        """A switch by binding mark to ``path_id`` starts: data goes there from now on (what
        waited too), and a marked probe goes at once, so the gateway moves even with no
        data to send (its answers confirm the move)."""
        self.paths.get(path_id).probe_soon(now)
        self._flush_queue()

    # == inputs ============================================================================
    def receive_datagram(self, data: bytes, path_id: int, now: float) -> None:
        """A datagram on ``path_id``. DATA and CONTROL take the fast path: one unpack of
        the transport header (``wire.transport_fields``), no per-datagram object; anything
        else is parsed by ``wire.parse_header``, which counts the same drops."""
        try:
            path = self.paths.get(path_id)
        except KeyError:
            raise ValueError(f"unknown path id {path_id}") from None
        if self.machine.state is _TERMINATED:
            self.report.count_drop(Drop.WRONG_STATE)
            return
        fields = transport_fields(data)
        if fields is None:
            self._receive_other(data, path_id, now)
            return
        cipher = self.keys.cipher
        if cipher is None:
            self.report.count_drop(Drop.WRONG_STATE)
        elif fields[4] != self.index:
            self.report.count_drop(Drop.UNKNOWN_SESSION)
        else:
            self._on_sealed(data, fields, cipher, path, now)

    def _receive_other(self, data: bytes, path_id: int, now: float) -> None:
        """A datagram that is not a well-formed DATA or CONTROL one."""
        header = parse_header(data)
        if isinstance(header, Drop):
            self.report.count_drop(header)
        elif header.msg_type == MSG_HANDSHAKE_RESP and self.rescue.initiator is not None:
            self._on_rescue_response(data, header.receiver_index, path_id, now)
        elif header.msg_type == MSG_HANDSHAKE_RESP:
            self._on_handshake_response(data, header.receiver_index, path_id, now)
        elif header.msg_type == MSG_COOKIE_REPLY:
            self._on_cookie_reply(data, header.receiver_index, path_id, now)
        elif header.msg_type == MSG_STANDBY_ACK:
            self._on_standby_ack(data, header.receiver_index, path_id, now)
        else:  # HANDSHAKE_INIT: only a gateway takes those
            self.report.count_drop(Drop.WRONG_STATE)

    def _on_sealed(
        self, data: bytes, fields: TransportFields, cipher: SessionCipher, path: Path,
        now: float,
    ) -> None:  # fmt: skip
        msg_type, phase, epoch8, mark = fields[0], fields[1], fields[2], fields[3]
        path_id = path.path_id
        rekeyed = phase != cipher.phase  # only a datagram of another phase can rotate keys
        plaintext = cipher.open(data, now)
        if isinstance(plaintext, Drop):
            self._on_bad_packet(plaintext, path_id, now)
            return
        self.duplicates.fresh(now)
        self.heard_at = now
        if self.rescue.cause is Reason.GATEWAY_LOST_STATE:
            self.rescue.disarm()  # the gateway knows the session: the reattach will land
        if rekeyed and cipher.phase == phase:
            self.report.emit(KeyRotated(**self.base(now), key_phase=phase, initiator="peer"))
        health = path.health
        health.inbound(now)
        if mark == MARK_BINDING and self.switching.pending is not None:
            # The gateway's binding is this path at epoch8: a switch by mark has landed
            # (the gateway marks every datagram to its binding: no call while none waits).
            self.switching.confirm(path_id, epoch8, now)
        if msg_type == MSG_DATA:
            version = plaintext[0] >> 4 if plaintext else 0
            if version != 4 and version != 6:
                self.report.count_drop(Drop.MALFORMED)
                return
            health.data_inbound(now)
            self._tun.append(plaintext)
            if now > self.data_at:
                self.data_at = now
            if self.paths.idle:
                self.paths.set_idle(False, now)
            return
        msg = parse_control(plaintext)
        if isinstance(msg, Drop):
            self.report.count_drop(msg)
            return
        if isinstance(msg, ProbeAck):
            path.gateway_says(mark >= MARK_VALIDATED)
        self._on_control(msg, path_id, now)

    def _on_standby_ack(self, data: bytes, index: int, path_id: int, now: float) -> None:
        """A cluster node that does not own the session answered a probe on ``path_id``
        (tunnel/core/standby.py): the path is validated if the ack is authentic and names a
        probe still awaited; nothing else of the session changes."""
        cipher = self.keys.cipher
        if cipher is None or index != self.index:
            self.report.count_drop(Drop.WRONG_STATE if cipher is None else Drop.UNKNOWN_SESSION)
            return
        ack = open_standby_ack(cipher.current_keys()[1].recv, data)
        if isinstance(ack, Drop):
            self.report.count_drop(ack)
            return
        health = self.paths.get(path_id).health
        if not health.awaits(ack.probe_id):
            self.report.count_drop(Drop.DUPLICATE)  # a replay, or an ack already counted
            return
        health.probe_acked(ack.probe_id, now)
        self.paths.validated(path_id, now)

    def _on_bad_packet(self, drop: Drop, path_id: int, now: float) -> None:
        if drop is Drop.TOO_OLD or drop is Drop.DUPLICATE:
            validated = self.paths.get(path_id).validated
            drop = stale_drop(drop, validated, self.duplicates, now)
        self.report.count_drop(drop)
        if drop is Drop.BAD_TAG:
            self.report.security(
                now, self.base(now), "INVALID_PROOF", Reason.BAD_PROOF, transport_id=path_id
            )
        elif drop is Drop.REPLAY:
            self.report.security(
                now, self.base(now), "REPLAY_DETECTED", Reason.REPLAY_DETECTED,
                transport_id=path_id,
            )  # fmt: skip

    # -- the handshake -------------------------------------------------------------------------
    def connect(self, now: float) -> None:
        """Start the handshake (BIRTH). Idempotent."""
        if self.state is not State.BIRTH or self.handshake.started:
            return
        self.clocks = SessionClocks(now, transportless=True)
        self._out.append(self.handshake.start(now, self.policy, self.report.ts_ms(now)))

    def _handshake_timer(self, now: float) -> None:
        if self.handshake.expired(now):
            failure = self.handshake.failure()
            self.fire(Trigger.TERMINATE, Reason.HANDSHAKE_FAILED, now, handshake_failure=failure)
        elif (out := self.handshake.on_timer(now, self.policy, self.report.ts_ms(now))) is not None:
            self._out.append(out)

    def _on_cookie_reply(self, data: bytes, receiver_index: int, path_id: int, now: float) -> None:
        """The gateway is under load: keep its cookie, resend the INIT with mac2 once."""
        if self.rescue.initiator is not None:
            result = self.rescue.on_cookie_reply(data, receiver_index, now)
        else:
            result = self.handshake.on_cookie_reply(data, receiver_index, now)
        if isinstance(result, Drop):
            self.report.count_drop(result)
        elif result is not None:
            self._out.append((path_id, result))

    def _on_handshake_response(
        self, data: bytes, receiver_index: int, path_id: int, now: float
    ) -> None:
        result = self.handshake.on_response(data, receiver_index)
        if isinstance(result, Drop):
            self.report.count_drop(result)
        elif isinstance(result, Reason):
            self.fire(Trigger.TERMINATE, result, now, initiator="peer")
        else:
            self._created(result, path_id, now)

    def _created(
        self, accepted: Accepted, path_id: int, now: float, link: Reason | None = None
    ) -> None:
        """The gateway created the session: take its keys and parameters, attach. ``link``:
        this session continues ``previous_session_id``, which ended for that reason."""
        payload = accepted.payload
        self.keys.install(accepted.keys, self.policy.replay_window_size, now, accepted.cipher)
        self.peer_index = accepted.sender_index
        self.machine.assign_id(payload.session_id.hex())
        self.peer.epoch = payload.epoch
        self.peer.state, self.peer.version = "ATTACHED", payload.state_version
        self.inner_address, self.inner_prefix = payload.inner_address, payload.inner_prefix
        self.inner_gateway, self.mtu = payload.inner_gateway, payload.mtu
        self.inner_address6, self.inner_prefix6 = payload.inner_address6, payload.inner_prefix6
        self.inner_gateway6 = payload.inner_gateway6
        self.serving_node, self.owner_epoch = payload.node_id, payload.owner_epoch
        self.advertised = payload.endpoints
        self.heard_at = now
        self.data_at = max(self.data_at, now)
        if link is not None:
            self.report.emit(
                SessionLinked(
                    **self.base(now), previous_session_id=self.previous_session_id,
                    reason_code=link, inner_address=self.inner_address,
                    inner_address6=self.inner_address6,
                )
            )  # fmt: skip
        self._attach_first(path_id, now)

    def _attach_first(self, path_id: int, now: float) -> None:
        """The response came on ``path_id``: it is validated and carries the session."""
        path = self.paths.get(path_id)
        path.health.inbound(now)
        self.paths.validated(path_id, now)
        self.clocks = SessionClocks(now, transportless=False)
        self.paths.activate(path_id, now)
        self.fire(Trigger.HANDSHAKE_OK, Reason.ATTACHED_TO_TRANSPORT, now)
        base = self.base(now)
        peer = f"gateway via {path.label}"
        cipher = self.cipher.suite.label if self.cipher else ""
        self.report.emit(
            SessionCreated(**base, peer=peer, inner_address=self.inner_address, cipher=cipher)
        )
        self.report.emit(
            TransportAttached(
                **base, transport_id=path_id, path=path.label, binding_epoch=self.peer.epoch
            )
        )
        self.paths.probe_all_soon(now)
        self._flush_queue()

    # -- the gateway lost the session (DESIGN D15c; rescue.py) -------------------------------
    def _on_terminate(self, reason: Reason, now: float) -> None:
        """The gateway's TERMINATE. ``gateway_shutdown`` with ``lost_state = "new_session"``
        is no end: the gateway is going away with the session (a memory store), so the
        session recovers, and asks for a new session at once (a restarted gateway gets
        its clients back within the recovery window; after it, ``gateway_shutdown``)."""
        if reason is not Reason.GATEWAY_SHUTDOWN or self.policy.lost_state != "new_session":
            self.fire(Trigger.TERMINATE, reason, now, initiator="peer")
            return
        first = self.policy.reattach_retry_ms / 1000  # not to the gateway that is stopping
        self.rescue.arm(
            Reason.GATEWAY_SHUTDOWN, self._session_id_bytes(), now + first, self.peer_index
        )
        if self.paths.active is not None and self.state in WITH_ACTIVE:
            self.switching.on_transport_dead(
                now, Reason.GATEWAY_SHUTDOWN, "the gateway said it is shutting down"
            )

    def _session_id_bytes(self) -> bytes:
        return bytes.fromhex(self.machine.session_id)

    def lost_state_at(self) -> float | None:
        """When the silence of the gateway makes it worth asking whether it still knows the
        session: RECOVERING (or DEGRADED) without an active path and nothing authenticated
        for LOST_STATE_SILENCE_RETRIES reattach intervals since the recovery began. None
        while that does not apply (or the rescue already runs)."""
        started = self.clocks.recovery_started
        if (
            self.rescue.armed
            or started is None
            or self.paths.active is not None
            or self.state not in RECOVERY_STATES
        ):
            return None
        since = started if self.heard_at is None else max(started, self.heard_at)
        return since + LOST_STATE_SILENCE_RETRIES * self.policy.reattach_retry_ms / 1000

    def _rescue_timer(self, now: float) -> None:
        at = self.lost_state_at()
        if at is not None and now >= at:
            self.rescue.arm(
                Reason.GATEWAY_LOST_STATE, self._session_id_bytes(), now, self.peer_index
            )
        out = self.rescue.on_timer(now, self.policy, self.report.ts_ms(now))
        if out is not None:
            self._out.append(out)

    def _on_rescue_response(
        self, data: bytes, receiver_index: int, path_id: int, now: float
    ) -> None:
        """The gateway answered the re-handshake: it is alive and did not know the session
        (it does not answer an INIT naming a session it holds). Policy decides."""
        result = self.rescue.on_response(data, receiver_index)
        if isinstance(result, Drop):
            self.report.count_drop(result)
            return
        cause = self.rescue.cause or Reason.GATEWAY_LOST_STATE
        self.rescue.disarm()
        if isinstance(result, Reason):  # the gateway refused a new session
            self.fire(Trigger.TERMINATE, result, now, initiator="peer")
        elif self.policy.lost_state != "new_session":
            self._decline(result, path_id, now)
            self.fire(Trigger.TERMINATE, cause, now, initiator="peer")
        else:
            self._renew(result, path_id, cause, now)

    def _decline(self, accepted: Accepted, path_id: int, now: float) -> None:
        """``lost_state = "terminate"``: end the session the gateway just created for us at
        once (TERMINATE under its keys), so it does not wait for a client that left."""
        cipher = SessionCipher(
            accepted.keys, replay_window=self.policy.replay_window_size, now=now,
            suite=accepted.cipher,
        )  # fmt: skip
        body = pack_control(Terminate(reason_to_wire(Reason.GATEWAY_LOST_STATE)))
        for _ in range(TERMINATE_COPIES):
            self._out.append((path_id, cipher.seal(MSG_CONTROL, accepted.sender_index, body)))

    def _renew(self, accepted: Accepted, path_id: int, cause: Reason, now: float) -> None:
        """The old session ends (``cause``) and the new one takes its place in this object:
        the paths, the queue of inner packets and the driver's TUN and routes stay; the
        machine, keys, peer view, switch controller and receiver index are the new
        session's. Events: SESSION_TERMINATED (old id), SESSION_LINKED, the new session's
        STATE_CHANGE, SESSION_CREATED and TRANSPORT_ATTACHED."""
        previous = self.machine.session_id
        held, held_bytes = self._queue, self._queue_bytes
        self._queue, self._queue_bytes = deque(), 0
        self.fire(Trigger.TERMINATE, cause, now, initiator="peer")
        auto = self.switching.auto_switch
        self.machine = SessionMachine(
            node_id=self.node_id, policy_version=self.policy.policy_version,
            emit=self.report.emit, max_version=self._max_version,
        )  # fmt: skip
        self.quality = QualityClocks()
        self.peer = PeerView()
        self.switching = SwitchController(self, self.policy)
        self.switching.set_auto(auto)
        self.keys = KeySchedule()
        self.paths.renewed()
        self.index = self.rescue.index
        self.previous_session_id = previous
        self._queue, self._queue_bytes = held, held_bytes
        inner = (self.inner_address, self.inner_address6)
        self._created(accepted, path_id, now, link=cause)
        if (self.inner_address, self.inner_address6) != inner:
            self.report.emit(
                Diagnostic(
                    **self.base(now), reason_code=cause, state=str(self.state),
                    detail=(
                        f"the new session's inner address {self.inner_address}"
                        f" {self.inner_address6} is not the old one's ({inner[0]} {inner[1]}):"
                        " the gateway's configuration changed; inner connections do not survive"
                    ),
                )
            )  # fmt: skip

    # -- control messages ------------------------------------------------------------------
    def _on_control(self, msg: Control, path_id: int, now: float) -> None:
        if isinstance(msg, ProbeAck):
            self.paths.get(path_id).health.probe_acked(msg.probe_id, now, msg.rx_probes)
            self.paths.validated(path_id, now)
            self._peer_view(STATE_CODES[msg.gw_state], self.peer.version, msg.epoch, now)
        elif isinstance(msg, PathChallenge):
            self.send_control(path_id, PathResponse(msg.token))
        elif isinstance(msg, ReattachAck):
            self.switching.on_ack(msg, path_id, now)
        elif isinstance(msg, ReattachReject):
            self.switching.on_reject(msg, now)
        elif isinstance(msg, StateUpdate):
            self._on_state_update(msg, path_id, now)
        elif isinstance(msg, Terminate):
            self._on_terminate(reason_from_wire(msg.reason) or Reason.PEER_TERMINATED, now)
        elif isinstance(msg, Rekey):
            pass  # the key phase change itself was handled by SessionCipher.open
        elif isinstance(msg, NodeInfo):
            self._on_node_info(msg)
        else:
            self.report.count_drop(Drop.UNKNOWN_TYPE)

    def _on_node_info(self, msg: NodeInfo) -> None:
        """The node serving the session. Authentic (it was sealed with the session's keys);
        one from an earlier owner epoch, late or reordered, changes nothing."""
        if msg.owner_epoch >= self.owner_epoch:
            self.serving_node, self.owner_epoch = msg.node, msg.owner_epoch

    def _on_state_update(self, msg: StateUpdate, path_id: int, now: float) -> None:
        self.send_control(path_id, StateAck(msg.seq))
        if msg.seq <= self.peer.update_seq:
            return
        self.peer.update_seq = msg.seq
        if msg.gw_version < self.peer.version:
            self.report.emit(
                Diagnostic(
                    **self.base(now),
                    reason_code=Reason.STALE_STATE_VERSION,
                    detail=f"gateway state update v{msg.gw_version} < known v{self.peer.version}",
                    state=str(self.state),
                )
            )
            return
        self._peer_view(STATE_CODES[msg.gw_state], msg.gw_version, msg.epoch, now)

    def _peer_view(self, state: str, version: int, epoch: int, now: float) -> None:
        peer = self.peer
        changed = state != peer.state or version != peer.version
        if epoch > peer.epoch:
            peer.epoch = epoch
            changed = True
        peer.state, peer.version = state, max(version, peer.version)
        if changed:
            self.report.emit(
                PeerState(
                    **self.base(now), peer_state=state, peer_state_version=peer.version,
                    binding_epoch=peer.epoch,
                )
            )  # fmt: skip
        if state == "TERMINATED":
            self.fire(Trigger.TERMINATE, Reason.PEER_TERMINATED, now, initiator="peer")
        elif state == "RECOVERING":
            self.switching.peer_recovering(now)

    # -- data ------------------------------------------------------------------------------
    def receive_tun_packet(self, packet: bytes, now: float) -> None:
        """An inner IP packet to carry. Waits in a bounded queue while no path is active."""
        if not packet or len(packet) > MAX_INNER_PACKET:
            self.report.count_drop(Drop.OVERSIZED if packet else Drop.TRUNCATED)
            return
        if self.machine.state is _TERMINATED:
            self.report.count_drop(Drop.WRONG_STATE)
            return
        if now > self.data_at:
            self.data_at = now
        if self.paths.idle:  # data leaves after idleness: probe the active path at once
            self.paths.set_idle(False, now)
        target = self.switching.data_path()
        cipher = self.keys.cipher
        if target is not None and cipher is not None:
            self._seal(cipher, MSG_DATA, target, packet)  # a switch by mark: marked
            return
        target = self.paths.active
        if target is not None and cipher is not None:
            try:
                # Unmarked (mark_for says so when no switch by mark is pending), which is
                # the cipher's default: the client never sets another.
                dgram = cipher.seal(MSG_DATA, self.peer_index, packet)
            except KeyExhausted:
                self.report.count_drop(Drop.KEY_EXHAUSTED)
                return
            self._out.append((target, dgram))
            return
        if (
            len(self._queue) >= self.policy.outbound_queue_packets
            or self._queue_bytes + len(packet) > self.policy.outbound_queue_bytes
        ):
            self.queue_dropped += 1
            return
        self._queue.append(packet)
        self._queue_bytes += len(packet)

    def _flush_queue(self) -> None:
        queue, self._queue, self._queue_bytes = self._queue, deque(), 0
        for packet in queue:
            self.receive_tun_packet(packet, 0.0)

    # == the timer =========================================================================
    def handle_timer(self, now: float) -> None:
        """Everything due at ``now``: timed rows, then the components' own clocks."""
        self._timer_now = max(self._timer_now, now)
        if self.machine.terminated:
            return
        if self.state is State.BIRTH:
            self._handshake_timer(now)
            return
        for _ in range(MAX_TIMER_PASSES):
            self._timer_pass(now)
            deadline = self.next_deadline()
            if deadline is None or deadline > now:
                break

    def observe(self, now: float) -> None:
        """Take the sample of path health the timed rows read at ``now``: overdue probes
        count as lost, the active path is judged (healthy, or the reason it is not).
        ``handle_timer`` does this first; doing it again at the same ``now`` changes
        nothing (so a test can see the rows exactly as the timer will)."""
        self.paths.expire(now)
        self._judge_active(now)

    def _timer_pass(self, now: float) -> None:
        self.observe(now)
        self._fire_rows(now)
        if self.machine.terminated:
            return
        self.paths.health_events(now)
        self.switching.on_timer(now)
        hunting = self.state is State.VOLATILE or self.state is State.DEGRADED
        self.paths.set_idle(self.idle(now), now, hunting=hunting)
        for path_id, probe_id in self.paths.due_probes(now, hunting=hunting):
            self.send_control(path_id, Probe(probe_id, path_id, self.report.ts_ms(now)))
        self._rekey_timer(now)
        self._rescue_timer(now)
        self.report.maybe_drop_summary(now, self.base(now))

    def idle(self, now: float) -> bool:
        """Idle (issue 11): ATTACHED on an active path with no switch under way, and no
        inner data either way for ``idle_after_ms``. An idle session probes slowly."""
        return (
            self.machine.state is State.ATTACHED
            and self.paths.active is not None
            and self.switching.pending is None
            and now - self.data_at >= self.policy.idle_after_ms / 1000
        )

    def _fire_rows(self, now: float) -> None:
        """Fire the most urgent due row until none is due (AT-08 priorities)."""
        for _ in range(MAX_CHAINED_ROWS):
            if self.machine.terminated:
                return
            self._judge_active(now)  # a fired row may have changed the active path
            row = most_urgent_row(due_rows(CLIENT_ROWS, self, self.state, now), self)
            if row is None:
                return
            self._row_handlers[row.fires(self)](row.reason, now)

    def _judge_active(self, now: float) -> None:
        """Sample the active path's classification for the quality rows."""
        active = self.paths.active
        if active is None or self.paths.get(active).health.is_dead(now):
            self.quality.unjudged()
        else:
            self.quality.observe(self.paths.classify(active, now), now)

    def _terminate_by_row(self, reason: Reason, now: float) -> None:
        if self.rescue.cause is Reason.GATEWAY_SHUTDOWN:
            # the window ran out without the gateway back: the end it announced
            self.fire(Trigger.TERMINATE, Reason.GATEWAY_SHUTDOWN, now, initiator="peer")
            return
        self.fire(Trigger.TERMINATE, reason, now)

    def _rekey_timer(self, now: float) -> None:
        phase = self.keys.on_timer(now, self.policy.rekey_after_s)
        if phase is None:
            return
        active = self.paths.active
        self.send_control(active if active is not None else self.paths.order[0], Rekey(phase))
        self.report.emit(KeyRotated(**self.base(now), key_phase=phase, initiator="local"))

    def next_deadline(self) -> float | None:
        """The earliest ``now`` at which handle_timer has work: ``earliest`` over the
        client rows and the components' own deadlines. One timer for everything."""
        if self.machine.terminated:
            return None
        if self.state is State.BIRTH:
            return self.handshake.next_deadline()
        rows: Sequence[TimedRow[Any]] = CLIENT_ROWS
        times = [
            earliest(rows, self, self.state),
            self.paths.next_deadline(),
            self.switching.next_deadline(self._timer_now),
            self.keys.next_deadline(self.policy.rekey_after_s),
            self.report.drop_summary_due(),
            self.lost_state_at(),
            self.rescue.next_deadline(),
        ]
        return min((t for t in times if t is not None), default=None)

    # == commands ==========================================================================
    def switch_to(self, path_id: int, now: float) -> Reason | None:
        """Operator switch to ``path_id``. Returns the denial reason, or None if requested."""
        if path_id not in self.paths:
            raise ValueError(f"unknown path id {path_id}")
        return self.switching.manual(path_id, now)

    def set_auto_switch(self, enabled: bool) -> None:
        self.switching.set_auto(enabled)

    def force_reattach(self, now: float) -> None:
        """Re-assert the binding now (RECOVERING: retry immediately)."""
        if self.machine.terminated or self.state is State.BIRTH:
            return
        self.switching.force(now)

    def terminate(self, now: float, reason: Reason = Reason.OPERATOR_TERMINATED) -> None:
        """Explicit end: TERMINATE to the gateway on every live path, then TERMINATED."""
        if self.machine.terminated:
            return
        if self.cipher is not None:
            targets = [p.path_id for p in self.paths.shown() if p.validated]
            for _ in range(TERMINATE_COPIES):
                for pid in targets:
                    self.send_control(pid, Terminate(reason_to_wire(reason)))
        self.fire(Trigger.TERMINATE, reason, now)

    def apply_policy(self, policy: Policy, now: float) -> None:
        """Strict mode (D14): new bounds apply from now on; history is not rewritten. Every
        component takes the new numbers: each path's health estimators and hold-down, the
        selector, the limiter; the timed rows read ``self.policy``."""
        if len(self.paths.shown()) > policy.max_candidate_count:
            self.report.emit(
                PolicyEvent(
                    **self.base(now), policy_name="POLICY_REJECTED",
                    reason_code=Reason.POLICY_INVALID,
                    detail=(
                        f"max_candidate_count {policy.max_candidate_count}"
                        f" < {len(self.paths.shown())} configured paths"
                    ),
                )
            )  # fmt: skip
            return
        self.policy = policy
        self.machine.policy_reloaded(policy.policy_version)
        self.paths.reconfigure(policy)
        self.switching.reconfigure(policy)
        self.duplicates.configure(policy.duplicate_alarm_ratio)
        self.report.emit(
            PolicyEvent(
                **self.base(now), policy_name="POLICY_APPLIED", reason_code=Reason.POLICY_APPLIED
            )
        )

    # == the kernel's view of the paths (netlink; tunnel/client/netmon.py) ==================
    def path_down(self, path_id: int, detail: str, now: float) -> None:
        """The kernel says ``path_id`` cannot carry anything (link down, carrier lost, its
        address or its route to the gateway gone; ``detail`` is its message). The path is
        dead at once: the active one goes through the same death handling as a silent
        death (TRANSPORT_DEAD, RECOVERING, recovery under the limiter), with the reason
        ``link_down``; any other is no candidate (DIAGNOSTIC ``link_down`` with ``detail``,
        then its PATH_HEALTH). It stays so until :meth:`path_up`. Repeating it changes
        nothing."""
        if path_id not in self.paths:
            raise ValueError(f"unknown path id {path_id}")
        if not self.paths.link_down(path_id) or self.machine.terminated:
            return
        if path_id == self.paths.active and self.state in WITH_ACTIVE:
            self.switching.on_transport_dead(now, Reason.LINK_DOWN, detail)
            return
        self.report.emit(
            Diagnostic(
                **self.base(now), reason_code=Reason.LINK_DOWN, detail=f"path {path_id}: {detail}",
                state=str(self.state),
            )
        )  # fmt: skip

    def path_up(self, path_id: int, detail: str, now: float) -> None:
        """The kernel says ``path_id`` is usable again: it is probed at once and becomes a
        candidate (standby) as soon as it answers (DIAGNOSTIC ``link_up`` with ``detail``)."""
        if path_id not in self.paths:
            raise ValueError(f"unknown path id {path_id}")
        if not self.paths.link_up(path_id, now) or self.machine.terminated:
            return
        self.report.emit(
            Diagnostic(
                **self.base(now), reason_code=Reason.LINK_UP, detail=f"path {path_id}: {detail}",
                state=str(self.state),
            )
        )  # fmt: skip

    # == paths that come and go (paths = "auto"; tunnel/client/autopaths.py) =============
    def add_path(
        self, spec: PathSpec, now: float, *, interface: str = "", address: str = ""
    ) -> None:
        """A candidate path appeared (PATH_ADDED): probed at once, a standby once it answers.
        A removed path comes back under its id. ValueError: the id is a candidate already, or
        the policy's ``max_candidate_count`` is reached."""
        if self.machine.terminated:
            return
        shown = len(self.paths.shown())
        if spec.path_id in self.paths and not self.paths.is_retired(spec.path_id):
            raise ValueError(f"path id {spec.path_id} is already a candidate")
        if shown >= self.policy.max_candidate_count:
            raise ValueError(f"the policy allows {self.policy.max_candidate_count} candidates")
        self.paths.add(spec.path_id, spec.label, now)
        self.report.emit(
            PathAdded(
                **self.base(now), transport_id=spec.path_id, path=spec.label,
                interface=interface, address=address,
            )
        )  # fmt: skip

    def remove_path(self, path_id: int, detail: str, now: float) -> None:
        """A candidate path left (PATH_REMOVED): it is down first (:meth:`path_down`, the
        active one dies and the session recovers elsewhere), then no candidate. Its id is
        not given to another path; :meth:`add_path` may bring it back."""
        if path_id not in self.paths:
            raise ValueError(f"unknown path id {path_id}")
        if self.paths.is_retired(path_id) or self.machine.terminated:
            return
        self.path_down(path_id, detail, now)
        self.paths.retire(path_id)
        label = self.paths.get(path_id).label
        self.report.emit(
            PathRemoved(**self.base(now), transport_id=path_id, path=label, detail=detail)
        )

    def _on_terminated(self) -> None:
        self.paths.clear_active()
        self.switching.stop()
        self.handshake.stop()
        self.rescue.disarm()
        self.queue_dropped += len(self._queue)
        self._queue.clear()
        self._queue_bytes = 0

    # == outputs ===========================================================================
    def datagrams_to_send(self) -> list[tuple[int, bytes]]:
        out, self._out = self._out, []
        return out

    def packets_for_tun(self) -> list[bytes]:
        out, self._tun = self._tun, []
        return out

    def next_event(self) -> Event | None:
        return self.report.next_event()

    def events(self) -> list[Event]:
        """All pending events at once (convenience for drivers and tests)."""
        out = []
        while (ev := self.report.next_event()) is not None:
            out.append(ev)
        return out

    def _role(self, path_id: int, now: float) -> str:
        if path_id == self.paths.active:
            return "active"
        if path_id == self.switching.pending_path:
            return "switching"
        if self.paths.answering(path_id, now):
            return "standby"
        return "down" if self.paths.get(path_id).validated else "unvalidated"

    def snapshot(self, now: float) -> ClientSnapshot:
        views = tuple(
            PathView(self.paths.stats(p.path_id, now), p.label, self._role(p.path_id, now),
                     p.validated)
            for p in self.paths.shown()
        )  # fmt: skip
        cipher = self.cipher
        limiter = self.switching.limiter
        return ClientSnapshot(
            session_id=self.machine.session_id,
            state=str(self.state),
            state_version=self.machine.version,
            binding_epoch=self.peer.epoch,
            peer_state=self.peer.state,
            peer_state_version=self.peer.version,
            active=self.paths.active,
            pending=self.switching.pending_path,
            paths=views,
            auto_switch=self.switching.auto_switch,
            switch_budget_left=limiter.budget_left(now),
            cooldown_remaining_ms=limiter.cooldown_remaining_ms(now),
            key_phase=cipher.phase if cipher else 0,
            key_age_s=cipher.key_age(now) if cipher else 0.0,
            policy_version=self.machine.policy_version,
            uptime_s=now - self.clocks.born,
            queue_depth=len(self._queue),
            queue_dropped=self.queue_dropped,
            total_switches=self.switching.total_switches,
            drops=tuple(sorted(self.report.drops.items())),
            inner_address=self.inner_address,
            inner_address6=self.inner_address6,
            cipher=cipher.suite.label if cipher else "",
            serving_node=self.serving_node,
            owner_epoch=self.owner_epoch,
        )
