"""What a gateway session sends, and how it reaches its gateway.

``Outbox`` holds the gateway's outgoing datagrams in order and seals control messages into
them; ``SessionPorts`` is the record a ``GatewaySession`` (gateway_session.py) gets from
its gateway: the ``Reporter``, the outbox, the TUN outlet and the ``ended`` callback.
``StateUpdates`` keeps the STATE_UPDATE sequence and the unacknowledged update that is
retransmitted until acknowledged (a timed chore of the session).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tunnel.core.aead import KeyExhausted, SessionCipher
from tunnel.core.constants import MSG_CONTROL, MSG_HANDSHAKE_RESP
from tunnel.core.drops import Drop
from tunnel.core.endpoint import Reporter
from tunnel.core.events import Reason, reason_to_wire
from tunnel.core.gateway_paths import Addr
from tunnel.core.wire import PROBE_ACK_BODY, Control, CType, StateUpdate, pack_control

if TYPE_CHECKING:
    from tunnel.core.gateway_session import GatewaySession

_PROBE_ACK = int(CType.PROBE_ACK)

STATE_UPDATE_RESEND_S = 0.3
"""STATE_UPDATE retransmit interval until acknowledged."""

STATE_UPDATE_SENDS = 6
"""STATE_UPDATE sends at most (then the next transition or probe ack carries the news)."""


class Outbox:
    """The gateway's outgoing datagrams, in order, and the sealing of control messages.
    (No ``__slots__``: one per gateway, and tests wrap ``control`` to watch what is sent.)"""

    def __init__(self, report: Reporter) -> None:
        self._report = report
        self._out: list[tuple[Addr, bytes]] = []

    def push(self, addr: Addr, dgram: bytes) -> None:
        self._out.append((addr, dgram))

    def control(self, cipher: SessionCipher, peer_index: int, addr: Addr, msg: Control) -> int:
        """Seal ``msg`` for the peer and queue it to ``addr``: the bytes queued (0 when the
        keys are exhausted, counted as a drop)."""
        try:
            dgram = cipher.seal(MSG_CONTROL, peer_index, pack_control(msg))
        except KeyExhausted:
            self._report.count_drop(Drop.KEY_EXHAUSTED)
            return 0
        self._out.append((addr, dgram))
        return len(dgram)

    def probe_ack(
        self, cipher: SessionCipher, peer_index: int, addr: Addr,
        fields: tuple[int, int, int, int, int, int],
    ) -> None:  # fmt: skip
        """A PROBE_ACK with ``fields`` (``ProbeAck``'s, in order) to ``addr``, sealed from
        the fields without the record or an intermediate plaintext (issue 11: an idle
        gateway does little else)."""
        try:
            dgram = cipher.seal_packed(MSG_CONTROL, peer_index, PROBE_ACK_BODY, _PROBE_ACK, *fields)
        except KeyExhausted:
            self._report.count_drop(Drop.KEY_EXHAUSTED)
            return
        self._out.append((addr, dgram))

    def void_for(self, peer_index: int, *, handshake: bool = False) -> None:
        """Forget the transport messages queued for ``peer_index``; a queued HANDSHAKE_RESP
        stays (without it the peer could not read what follows) unless ``handshake``."""
        index = peer_index.to_bytes(4, "little")
        self._out[:] = [
            (a, d) for a, d in self._out
            if d[4:8] != index or (d[0] == MSG_HANDSHAKE_RESP and not handshake)
        ]  # fmt: skip

    def take(self) -> list[tuple[Addr, bytes]]:
        out, self._out = self._out, []
        return out


@dataclass(frozen=True, slots=True)
class SessionPorts:
    """What a session reaches of its gateway (a record; the gateway makes one)."""

    report: Reporter
    outbox: Outbox
    deliver: Callable[[bytes], None]
    """An inner packet for the TUN."""
    urandom: Callable[[int], bytes]
    ended: Callable[[GatewaySession], None]
    """Called once when the session terminates (the gateway forgets its routes)."""
    reserve: Callable[[GatewaySession], None] | None = None
    """With a persistent store: the session sealed past its counter reservation and needs a
    new one before its datagrams leave (gateway_resume.py); None: no reservations."""
    node: str = ""
    """A cluster node's id, told to its clients (NODE_INFO); empty: not a cluster node."""


class StateUpdates:
    """STATE_UPDATE sequence and the retransmission of the unacknowledged one."""

    __slots__ = ("_sends", "_sent_at", "_seq", "_unacked")

    def __init__(self) -> None:
        self._seq = 0
        self._unacked: StateUpdate | None = None
        self._sent_at = 0.0
        self._sends = 0

    @property
    def pending(self) -> StateUpdate | None:
        return self._unacked

    def new(self, state_code: int, version: int, epoch: int, reason: Reason) -> None:
        self._seq += 1
        self._unacked = StateUpdate(self._seq, state_code, version, epoch, reason_to_wire(reason))
        self._sends = 0

    def sent(self, now: float) -> None:
        """The pending update went out at ``now``; after STATE_UPDATE_SENDS it is given up."""
        self._sent_at = now
        self._sends += 1
        if self._sends >= STATE_UPDATE_SENDS:
            self._unacked = None

    def resend_at(self) -> float | None:
        return None if self._unacked is None else self._sent_at + STATE_UPDATE_RESEND_S

    def acked(self, seq: int) -> None:
        if self._unacked is not None and seq == self._unacked.seq:
            self._unacked = None

    def cancel(self) -> None:
        self._unacked = None
