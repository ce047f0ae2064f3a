"""Path validation of one gateway session (DESIGN D4): which source addresses may carry it.

``PathValidator`` owns the addresses a session has validated, the outstanding
PATH_CHALLENGEs with their anti-amplification budget, and the bytes received per source
address (aioquic's ``QuicNetworkPath`` owns a path's validation and ``can_send`` budget the
same way). It never moves the binding: it says which address answered which challenge,
and the session decides (gateway_session.py).

One per gateway session, so its tables are plain dicts (insertion-ordered: the oldest
entry is the first; an OrderedDict costs about 160 bytes more each), and the table of
challenges exists only while there is one.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from enum import Enum

from tunnel.core.drops import Drop

Addr = Hashable
"""A source address as the driver gives it (e.g. ``(host, port)``)."""

AMPLIFICATION_FACTOR = 3
"""D4: bytes sent to an unvalidated address stay within 3x the bytes received from it."""

CHALLENGE_RESEND_S = 0.25
"""A challenge is repeated at most this often while packets keep coming from the address."""

MAX_VALIDATED = 8
"""Validated source addresses remembered per session (one per client path, with room)."""

MAX_CHALLENGES = 8
"""Outstanding path challenges per session; the oldest is forgotten beyond this."""


def addr_label(addr: Addr) -> str:
    """``addr`` as text for events and cookies: ``host:port``, ``[v6host]:port``."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr)


class ChallengePurpose(Enum):
    """Why an address is being challenged: what its PATH_RESPONSE leads to."""

    PROBE = "probe"
    """A PROBE from an unvalidated address: validating it only lets it carry data."""
    NAT = "nat"
    """A newest DATA packet or bound-path PROBE from a new address: a possible NAT
    rebinding; the response commits a versioned rebind there."""
    REATTACH = "reattach"
    """A held REATTACH_REQUEST from that address: the response lets it be answered."""


@dataclass(slots=True)
class _Challenge:
    token: bytes
    purpose: ChallengePurpose
    received: int
    sent: int
    last_sent: float


class PathValidator:
    """Validated addresses, outstanding challenges and their amplification budget."""

    __slots__ = ("_challenges", "_path_ids", "_received_from", "_urandom", "_validated")

    def __init__(
        self, addr: Addr, now: float, urandom: Callable[[int], bytes], path_id: int | None = None
    ) -> None:
        self._urandom = urandom
        self._validated: dict[Addr, float] = {addr: now}
        """Validated address -> when, the least recently validated first."""
        self._challenges: dict[Addr, _Challenge] | None = None
        """Outstanding challenges, the oldest first; None while there is none."""
        self._received_from: dict[Addr, int] | None = None
        """Authentic bytes from each source address not validated (the budget of a
        challenge there), the oldest source first; None while there is none."""
        self._path_ids: dict[Addr, int] = {}
        """The client's path id per source address, as its PROBEs name it (bounded), the
        least recently named first."""
        if path_id is not None:
            self._path_ids[addr] = path_id

    # -- reading -----------------------------------------------------------------------------
    @property
    def validated(self) -> dict[Addr, float]:
        """Validated address -> when (read-only view for tests and STATE_UPDATE targets)."""
        return self._validated

    @property
    def challenges(self) -> dict[Addr, _Challenge]:
        """Outstanding challenges (read-only view for tests)."""
        return self._challenges if self._challenges is not None else {}

    @property
    def received_from(self) -> dict[Addr, int]:
        """Bytes received per unvalidated source (read-only view for tests)."""
        return self._received_from if self._received_from is not None else {}

    def is_validated(self, addr: Addr) -> bool:
        return addr in self._validated

    def path_id_of(self, addr: Addr) -> int | None:
        """The client's id for the path that uses ``addr`` (from its PROBEs), if known."""
        return self._path_ids.get(addr)

    # -- inputs ------------------------------------------------------------------------------
    def received(self, addr: Addr, size: int) -> None:
        """``size`` authentic bytes came from ``addr``: counted while it is not validated,
        the bytes a challenge there may be sent against (D4; bounded: the oldest source
        goes). A validated address is never challenged: nothing to count."""
        if addr in self._validated:
            return
        received = self._received_from
        if received is None:
            received = self._received_from = {}
        received[addr] = received.get(addr, 0) + size
        if len(received) > 2 * MAX_VALIDATED:
            del received[next(iter(received))]

    def saw_path(self, addr: Addr, path_id: int) -> None:
        """An authentic PROBE from ``addr`` named the client's ``path_id`` (bounded: the
        oldest address goes)."""
        path_ids = self._path_ids
        if next(reversed(path_ids), None) != addr:
            path_ids.pop(addr, None)  # to the end: the most recently named
        path_ids[addr] = path_id
        while len(path_ids) > 2 * MAX_VALIDATED:
            del path_ids[next(iter(path_ids))]

    def challenge(
        self, addr: Addr, purpose: ChallengePurpose, now: float, seal: Callable[[bytes], bytes]
    ) -> bytes | Drop | None:
        """Challenge ``addr``: the datagram to send (``seal(token)``), None when a challenge
        was sent too recently, or ``Drop.AMPLIFICATION_LIMIT`` when it would exceed 3x the
        bytes received from ``addr``. A stronger purpose replaces a mere PROBE."""
        challenges = self._challenges
        if challenges is None:
            challenges = self._challenges = {}
        ch = challenges.get(addr)
        if ch is None:
            ch = _Challenge(self._urandom(8), purpose, 0, 0, -1.0)
            challenges[addr] = ch
            while len(challenges) > MAX_CHALLENGES:
                del challenges[next(iter(challenges))]
        elif purpose is not ChallengePurpose.PROBE:
            ch.purpose = purpose  # data or a reattach outranks a mere probe
        ch.received = self.received_from.get(addr, 0)
        if now - ch.last_sent < CHALLENGE_RESEND_S:
            return None
        dgram = seal(ch.token)
        if ch.sent + len(dgram) > AMPLIFICATION_FACTOR * ch.received:
            return Drop.AMPLIFICATION_LIMIT
        ch.sent += len(dgram)
        ch.last_sent = now
        return dgram

    def responded(
        self, addr: Addr, token: bytes, now: float, keep: Addr | None
    ) -> ChallengePurpose | None:
        """A PATH_RESPONSE with ``token`` from ``addr``: the purpose of the challenge it
        answers (``addr`` is now validated), or None if it answers none. ``keep`` (the
        binding) is never forgotten when the validated set is full."""
        challenges = self._challenges or {}  # an empty table is no table
        ch = challenges.get(addr)
        if ch is None or ch.token != token:
            return None
        del challenges[addr]
        if not challenges:
            self._challenges = None
        if self._received_from is not None:
            self._received_from.pop(addr, None)  # validated: no budget to count any more
        validated = self._validated
        validated.pop(addr, None)  # to the end: the most recently validated
        validated[addr] = now
        while len(validated) > MAX_VALIDATED:
            old = next(iter(validated))
            del validated[old]
            if old == keep:  # never forget the binding itself: it stays the oldest
                self._validated = {old: now, **validated}
                break
        return ch.purpose

    def forget(self, addr: Addr) -> None:
        """``addr`` is no longer accepted (the binding moved away from it by a NAT rebind)."""
        self._validated.pop(addr, None)
        self._path_ids.pop(addr, None)

    def clear_challenges(self) -> None:
        self._challenges = None
