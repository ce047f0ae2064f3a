"""What a gateway session needs to continue in another process (DESIGN D15a), as data.

A gateway with a persistent session store writes, with every committed transition of a
session, a :class:`ResumeState` (sealed under its state key, tunnel/gateway/resume.py); a
restarted gateway rebuilds each live session from it (``GatewaySessions.resume``): the same
session id, receiver index, client and inner addresses, state, state version and binding
epoch, and the current key generation.

Nonces (no (key, counter) pair is used twice, across any number of restarts): the gateway
seals only with counters it has *reserved* in the store. A record carries ``send_from``, a
counter above everything this process has sealed so far plus a block
(:data:`COUNTER_BLOCK`); a session that reaches its reservation, or follows the client
into a new key phase, asks for a new one (``SessionPorts.reserve``) and the driver writes
it before any datagram of that input leaves the host.

Replays (nothing the process before accepted is accepted again): a restarted process opens
only a key phase that process opened nothing in. The record names the phase whose
datagrams that process may have opened (``key_phase``, its current one): the restarted
process rotates to the next phase (sealing from counter 0: nobody sealed in it) and
*retires* ``key_phase`` (its datagrams authenticate but are dropped); the client follows
the new phase when it opens the first datagram sealed in it (a REKEY sent at resume).
While that rotation is unconfirmed (no client datagram in the new phase opened yet), the
record holds the retired keys too (``retired``): a process restarted then stays in the
phase (from ``send_from``: its predecessor sealed in it) and retires the same one. The
client's first datagram in the new phase is written (the rotation confirmed) before it
takes effect (the driver writes before it delivers to the TUN). A clean stop is resumed
the same way: one rule, and nothing a later crash could leave stale.

Times travel as wall-clock milliseconds (monotonic clocks do not survive a restart).
Nothing here touches the keys beyond holding them; this record is never printed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from tunnel.core.aead import TrafficKeys
from tunnel.core.ciphers import DataCipher
from tunnel.core.gateway_paths import Addr

if TYPE_CHECKING:
    from tunnel.core.gateway_session import ClientEntry

COUNTER_BLOCK: Final = 1 << 20
"""Send counters reserved per store write: one write per ~1M datagrams a session sends
(10 s at 100k datagrams/s); a restart skips at most this many counters of 2**64."""


@dataclass(frozen=True, slots=True, repr=False)
class ResumeState:
    """One gateway session as a restarted process needs it. Never printed (keys)."""

    session_id: bytes
    index: int
    """Our receiver index (the client addresses its datagrams with it)."""
    peer_index: int
    client: ClientEntry
    """The client as the session runs it (its key, name and inner addresses)."""
    state: str
    state_version: int
    binding_epoch: int
    keys: TrafficKeys
    """The current key generation."""
    suite: DataCipher
    """The data cipher the handshake negotiated."""
    key_phase: int
    """The phase of ``keys``: the current one."""
    send_from: int
    """The first send counter of ``key_phase`` a restarted process may use (reserved,
    never reached)."""
    retired: TrafficKeys | None
    """The previous phase's keys while our rotation to ``key_phase`` is unconfirmed (the
    process opened nothing in ``key_phase``), else None (it may have)."""
    binding: Addr | None
    binding_path: int | None
    last_binding: Addr
    skew_ms: int
    born_ms: int
    """Wall-clock ms of the session's birth (its lifetime counts from there)."""
    transportless_ms: int | None
    """Wall-clock ms since which the session has had no transport, if so."""
    recovery_ms: int | None
    """Wall-clock ms when its recovery began, if it is recovering."""
    total_switches: int

    def __repr__(self) -> str:
        return f"ResumeState(session={self.session_id.hex()}, v{self.state_version})"
