"""Explicit-counter AEAD (AES-256-GCM or ChaCha20-Poly1305) for DATA and CONTROL datagrams,
with key phases.

DESIGN D10: the Noise handshake only yields two 32-byte keys (``TrafficKeys``); every
datagram after it carries its own 64-bit counter, so loss and reordering across paths
cost nothing. Datagram layout (``constants.TRANSPORT_HEADER``)::

    type:u8 | phase:u8 | epoch:u8 | mark:u8 | receiver_index:u32 | counter:u64 | ciphertext+tag

The 16 header bytes are the associated data; the nonce is 4 zero bytes + counter (LE).
The AEAD is the session's ``DataCipher`` (tunnel/core/ciphers.py), negotiated in the
handshake; both have the same key, nonce and tag sizes, so nothing else depends on it.
A rekey derives the next keys for the same cipher: a session never changes its cipher.
``epoch``/``mark`` are the binding mark (docs/wire-format.md), zero when unmarked: set per
datagram or as a default (``set_mark``). Being associated data, they are as authentic as
the rest of the header.

Key phases (rekey without a round trip): generation ``g+1`` is ``next_generation(g)``,
a one-way HKDF step of each direction's key. The side that rekeys starts sealing with
phase ``p+1``; the peer tries ``next_generation`` on the first datagram of phase ``p+1``
and switches over only if it authenticates. The previous generation keeps opening
late (reordered) datagrams for ``PREVIOUS_KEYS_GRACE_S`` after the peer is known to use
the new one, then it is forgotten.

Every input to ``SessionCipher.open`` yields plaintext or a ``Drop``: it never raises.

A generation builds its two AEAD objects when it first seals or opens. Each one holds
OpenSSL contexts of about 1.1 KB outside the Python heap (``bench/memory.py --aead``),
more than everything else of an idle gateway session; so a gateway passes an
``AeadCache``: at most ``capacity`` generations keep theirs built, the oldest built one
drops them (built again, about 3 us, at its next datagram). Without a cache (the
client) a generation keeps its AEAD objects while it lives.
"""

from __future__ import annotations

import struct
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tunnel.core import constants
from tunnel.core.ciphers import DataCipher
from tunnel.core.drops import Drop
from tunnel.core.replay import DEFAULT_WINDOW, FRESH, ReplayVerdict, ReplayWindow

PREVIOUS_KEYS_GRACE_S: Final = 10.0
"""How long the previous generation still opens datagrams once the peer uses the new one:
covers reordering across paths and in-flight datagrams, yet keeps old keys short-lived."""

REKEY_INFO: Final = b"jvpn rekey"
"""HKDF info label of the key ratchet; both directions use it, their keys differ."""

PHASES: Final = 256
"""The key phase is a u8 and wraps."""

AES_GCM_MAX_DATAGRAMS: Final = 2**27
"""Datagrams one AES-256-GCM key generation may seal, or open, before it is rotated: TLS
1.3's usage bound (RFC 8446 section 5.5: 2^24.5 records of 2^14 bytes, margin 2^-60)
counted in datagrams of at most MAX_DATAGRAM bytes (fewer than 2^7 AES blocks)."""

USAGE_LIMIT: Final = {
    DataCipher.AES_256_GCM: AES_GCM_MAX_DATAGRAMS,
    DataCipher.CHACHA20_POLY1305: constants.REKEY_AFTER_MESSAGES,
}
"""Per data cipher: datagrams per key generation after which ``worn_out`` asks for a rekey."""

_HEADER = constants.TRANSPORT_HEADER
_MARKED = constants.MARKED_TRANSPORT_HEADER
_HEADER_LEN: Final = constants.TRANSPORT_HEADER.size
_MIN_DATAGRAM: Final = _HEADER_LEN + constants.AEAD_TAG_LEN
_MAX_PLAINTEXT: Final = constants.MAX_DATAGRAM - _MIN_DATAGRAM
_STALE: Final = {ReplayVerdict.TOO_OLD: Drop.TOO_OLD, ReplayVerdict.DUPLICATE: Drop.DUPLICATE}
"""The drop of an authentic datagram the replay window did not record."""
_NONCE = struct.Struct("<4xQ")
"""AEAD nonce (12 bytes): 4 zero bytes, then the counter as u64 little-endian."""
_Aead = ChaCha20Poly1305 | AESGCM
_AEADS: Final[dict[DataCipher, type[_Aead]]] = {
    DataCipher.CHACHA20_POLY1305: ChaCha20Poly1305,
    DataCipher.AES_256_GCM: AESGCM,
}
"""The ``cryptography`` class of each data cipher (same key, nonce and tag sizes)."""


_SCRATCH_LIMIT: Final = 256
"""Largest body ``SessionCipher.seal_packed`` takes (control messages are tens of bytes)."""
_SCRATCH_PLAIN = bytearray(_SCRATCH_LIMIT)
_SCRATCH_NONCE = bytearray(_NONCE.size)
_SCRATCH_OUT = bytearray(_HEADER_LEN + _SCRATCH_LIMIT + constants.AEAD_TAG_LEN)
_SCRATCH_AD = memoryview(_SCRATCH_OUT)[:_HEADER_LEN]
_SCRATCH_VIEWS: dict[int, tuple[memoryview, memoryview, memoryview]] = {}
"""Per body size: (plaintext, ciphertext + tag, whole datagram) views of the buffers."""


def _scratch_views(size: int) -> tuple[memoryview, memoryview, memoryview]:
    if size > _SCRATCH_LIMIT:
        raise ValueError(f"body of {size} bytes exceeds {_SCRATCH_LIMIT}")
    out = memoryview(_SCRATCH_OUT)
    end = _HEADER_LEN + size + constants.AEAD_TAG_LEN
    views = (memoryview(_SCRATCH_PLAIN)[:size], out[_HEADER_LEN:end], out[:end])
    _SCRATCH_VIEWS[size] = views
    return views


def _binding_mark(epoch: int, mark: int) -> tuple[int, int]:
    if not 0 <= mark <= constants.MAX_MARK:
        raise ValueError(f"mark must be 0..{constants.MAX_MARK}, got {mark}")
    return (epoch & 0xFF if mark else 0), mark


class KeyExhausted(Exception):
    """The send counter reached REJECT_AFTER_MESSAGES: rekey or start a new session."""


@dataclass(frozen=True, slots=True, repr=False)
class TrafficKeys:
    """The two directional keys of one key generation. Never printed."""

    send: bytes
    """Key sealing what this side sends (32 bytes)."""
    recv: bytes
    """Key opening what this side receives (32 bytes)."""

    def __post_init__(self) -> None:
        if len(self.send) != constants.KEY_LEN or len(self.recv) != constants.KEY_LEN:
            raise ValueError(f"traffic keys must be {constants.KEY_LEN} bytes each")

    def __repr__(self) -> str:
        return "TrafficKeys(<redacted>)"

    __str__ = __repr__


def next_generation(keys: TrafficKeys) -> TrafficKeys:
    """One-way ratchet: each direction's key becomes HKDF-SHA256(key, info=REKEY_INFO).

    Both ends hold the same two keys (send and recv swapped), so they derive matching
    next keys without talking to each other.
    """
    return TrafficKeys(send=_ratchet(keys.send), recv=_ratchet(keys.recv))


def _ratchet(key: bytes) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=constants.KEY_LEN, salt=None, info=REKEY_INFO)
    return hkdf.derive(key)


def peek_header(datagram: bytes) -> tuple[int, int, int, int] | Drop:
    """``(msg_type, phase, receiver_index, counter)`` of a transport datagram, unauthenticated.

    For routing (which session?) before ``SessionCipher.open``; nothing here is trusted.
    """
    length = len(datagram)
    if length < _MIN_DATAGRAM:
        return Drop.TRUNCATED
    if length > constants.MAX_DATAGRAM:
        return Drop.OVERSIZED
    msg_type, phase, receiver_index, counter = _HEADER.unpack_from(datagram)
    return msg_type, phase, receiver_index, counter


AEAD_CACHE_SIZE: Final = 512
"""Key generations whose AEAD objects a gateway keeps built (``AeadCache``): about 1.2 MB
of OpenSSL contexts, enough for the sessions that carry traffic at any one moment;
idle sessions' keys are built again for their next probe."""


class _Generation:
    """One key generation: both AEAD instances and the receive replay window.

    The AEAD objects (``tx`` seals, ``rx`` opens) are made when first read, and the
    ``AeadCache`` given, if any, learns it; ``release`` drops them again."""

    __slots__ = ("__weakref__", "_cache", "_cipher", "_rx", "_tx", "keys", "phase", "replay")

    def __init__(
        self, keys: TrafficKeys, phase: int, replay_window: int, cipher: DataCipher,
        cache: AeadCache | None = None,
    ) -> None:  # fmt: skip
        self.keys = keys
        self.phase = phase
        self._cipher = cipher
        self._cache = cache
        self._tx: _Aead | None = None
        self._rx: _Aead | None = None
        self.replay = ReplayWindow(replay_window)

    def __repr__(self) -> str:
        return f"_Generation(phase={self.phase})"

    @property
    def tx(self) -> _Aead:
        """The AEAD object that seals (made now if it is not built)."""
        tx = self._tx
        return tx if tx is not None else self._build()[0]

    @property
    def rx(self) -> _Aead:
        """The AEAD object that opens (made now if it is not built)."""
        rx = self._rx
        return rx if rx is not None else self._build()[1]

    @property
    def built(self) -> bool:
        return self._tx is not None

    def _build(self) -> tuple[_Aead, _Aead]:
        aead = _AEADS[self._cipher]
        tx, rx = self._tx, self._rx = aead(self.keys.send), aead(self.keys.recv)
        if self._cache is not None:
            self._cache.admit(self)
        return tx, rx

    def release(self) -> None:
        """Drop both AEAD objects (the ``AeadCache`` is full); made again when next read."""
        self._tx = self._rx = None


class AeadCache:
    """At most ``capacity`` key generations, of all sessions together, hold built AEAD
    objects; building one more releases the oldest built (first in, first out: a
    generation in use is built again at once, which costs less than keeping the order of
    use on every datagram). Holds weak references: a discarded generation's keys are not
    kept alive here."""

    __slots__ = ("_built", "capacity")

    def __init__(self, capacity: int = AEAD_CACHE_SIZE) -> None:
        if capacity < 1:
            raise ValueError("an AEAD cache holds at least one generation")
        self.capacity = capacity
        self._built: deque[weakref.ref[_Generation]] = deque()

    def __repr__(self) -> str:
        return f"AeadCache({self.built()}/{self.capacity})"

    def built(self) -> int:
        """Generations alive whose AEAD objects are built (at most ``capacity``)."""
        return sum(1 for ref in self._built if (g := ref()) is not None and g.built)

    def admit(self, generation: _Generation) -> None:
        """``generation`` has just built its AEAD objects: the oldest one beyond
        ``capacity`` releases its own."""
        built = self._built
        built.append(weakref.ref(generation))
        while len(built) > self.capacity:
            oldest = built.popleft()()
            if oldest is not None:
                oldest.release()


class SessionCipher:
    """Seal and open transport datagrams of one session; follows and starts rekeys.

    State: the *current* generation (used to seal, and to open its phase), optionally
    the *previous* one (opens only, until its grace period ends), and a cached candidate
    for the *next* one (tried only on datagrams of phase current+1).
    """

    __slots__ = (
        "_born",
        "_cache",
        "_confirmed",
        "_current",
        "_mark",
        "_next",
        "_previous",
        "_previous_until",
        "_replay_size",
        "_retired",
        "_suite",
        "send_counter",
    )

    send_counter: int
    """Counter of the next datagram sealed with the current generation."""

    def __init__(
        self,
        keys: TrafficKeys,
        *,
        replay_window: int = DEFAULT_WINDOW,
        now: float = 0.0,
        suite: DataCipher = DataCipher.CHACHA20_POLY1305,
        phase: int = 0,
        cache: AeadCache | None = None,
    ) -> None:
        """``suite``: the data cipher the handshake negotiated; every generation uses it.
        ``phase``: the key phase of ``keys`` (0 after a handshake; another for a throwaway
        cipher that only reads a datagram of a stored session, e.g. a cluster node's).
        ``cache``: the gateway's ``AeadCache`` (None: every generation keeps its AEAD
        objects while it lives)."""
        self._replay_size = replay_window
        self._suite = suite
        self._cache = cache
        self._current = _Generation(keys, phase % PHASES, replay_window, suite, cache)
        self._previous: _Generation | None = None
        self._previous_until: float | None = None
        """Grace deadline of the previous generation; None while the peer has not yet
        shown that it uses the current one (so the previous one must stay)."""
        self._next: _Generation | None = None
        self._confirmed = True
        """The peer has authenticated a datagram in the current phase (the handshake
        confirms generation 0)."""
        self._born = now
        self._mark = (0, 0)
        self._retired = False
        """The previous generation only authenticates (a resumed session: ``resume_at``)."""
        self.send_counter = 0

    def __repr__(self) -> str:
        return (
            f"SessionCipher({self._suite.label}, phase={self.phase}, "
            f"send_counter={self.send_counter})"
        )

    @property
    def suite(self) -> DataCipher:
        """The data cipher of this session (negotiated in the handshake; never changes)."""
        return self._suite

    @property
    def phase(self) -> int:
        """Current key phase, 0..255 (wraps)."""
        return self._current.phase

    @property
    def rekey_pending(self) -> bool:
        """True after our own ``rekey`` until the peer has sent in the new phase."""
        return not self._confirmed

    def worn_out(self) -> bool:
        """The current generation has sealed, or opened up to, ``USAGE_LIMIT`` datagrams of
        its cipher in either direction: rotate it now, whatever its age."""
        current = self._current
        used = max(self.send_counter, current.replay.highest + 1)
        return used >= USAGE_LIMIT[self._suite]

    def key_age(self, now: float) -> float:
        """Seconds since the current generation became current."""
        return now - self._born

    def next_deadline(self) -> float | None:
        """When the previous generation's grace ends (``discard_expired`` then), else None."""
        return self._previous_until if self._previous is not None else None

    def discard_expired(self, now: float) -> None:
        """Forget the previous generation if its grace period is over (open() also does)."""
        if self._previous_until is not None and now >= self._previous_until:
            self._previous = None
            self._previous_until = None

    # -- send --------------------------------------------------------------------------

    def set_mark(self, epoch: int, mark: int) -> None:
        """The binding mark of every header sealed from now on that names none: ``mark``
        (0..MAX_MARK) with the low 8 bits of ``epoch`` (0 when ``mark`` is 0)."""
        self._mark = _binding_mark(epoch, mark)

    def seal(
        self,
        msg_type: int,
        receiver_index: int,
        plaintext: bytes,
        *,
        mark: tuple[int, int] | None = None,
    ) -> bytes:
        """The whole datagram for ``plaintext``, addressed to the peer's ``receiver_index``,
        with the binding mark ``(epoch, mark)`` (default: :meth:`set_mark`) in its
        authenticated header."""
        epoch8, mark8 = self._mark if mark is None else _binding_mark(*mark)
        counter = self.send_counter
        if counter >= constants.REJECT_AFTER_MESSAGES:
            raise KeyExhausted("send counter exhausted for this key generation; rekey first")
        if len(plaintext) > _MAX_PLAINTEXT:
            raise ValueError(f"plaintext of {len(plaintext)} bytes exceeds {_MAX_PLAINTEXT}")
        current = self._current
        header = _MARKED.pack(msg_type, current.phase, epoch8, mark8, receiver_index, counter)
        self.send_counter = counter + 1
        return header + current.tx.encrypt(_NONCE.pack(counter), plaintext, header)

    def seal_packed(
        self, msg_type: int, receiver_index: int, body: struct.Struct, *values: int
    ) -> bytes:
        """:meth:`seal` of ``body.pack(*values)`` (the current binding mark) without the
        intermediate objects: plaintext, nonce and datagram are packed and encrypted in
        reusable buffers (``encrypt_into``); the datagram's ``bytes`` is the one object
        made. For small answers a peer asks for often (PROBE_ACK: issue 11)."""
        counter = self.send_counter
        if counter >= constants.REJECT_AFTER_MESSAGES:
            raise KeyExhausted("send counter exhausted for this key generation; rekey first")
        views = _SCRATCH_VIEWS.get(body.size)
        if views is None:
            views = _scratch_views(body.size)
        plain, sealed, whole = views
        current = self._current
        epoch8, mark8 = self._mark
        body.pack_into(_SCRATCH_PLAIN, 0, *values)
        _NONCE.pack_into(_SCRATCH_NONCE, 0, counter)
        _MARKED.pack_into(
            _SCRATCH_OUT, 0, msg_type, current.phase, epoch8, mark8, receiver_index, counter
        )
        current.tx.encrypt_into(_SCRATCH_NONCE, plain, _SCRATCH_AD, sealed)
        self.send_counter = counter + 1
        return bytes(whole)

    def rekey(self, now: float) -> bool:
        """Start sealing with the next generation (phase+1, counter 0).

        The peer follows when it opens the first datagram of the new phase; the current
        generation stays as *previous* for late datagrams. Returns False and changes
        nothing while an earlier rekey is still unconfirmed by the peer: moving two
        phases ahead would leave the peer unable to follow.
        """
        if not self._confirmed:
            return False
        self._promote(self._derive_next(), now)
        self._confirmed = False
        self._previous_until = None  # kept until the peer shows it has moved
        return True

    # -- receive -----------------------------------------------------------------------

    def open(self, datagram: bytes, now: float) -> bytes | Drop:
        """Plaintext of an authentic, fresh ``datagram``, else the reason it was dropped.

        An authentic datagram whose counter is not fresh is ``Drop.TOO_OLD`` (below the
        replay window) or ``Drop.DUPLICATE`` (seen inside it); whether that is a replay
        depends on where it came from, which only the receive side knows
        (``replay.stale_drop``)."""
        length = len(datagram)
        if length < _MIN_DATAGRAM:
            return Drop.TRUNCATED
        if length > constants.MAX_DATAGRAM:
            return Drop.OVERSIZED
        _msg_type, phase, _receiver_index, counter = _HEADER.unpack_from(datagram)
        if counter >= constants.REJECT_AFTER_MESSAGES:
            return Drop.MALFORMED  # no honest peer seals with such a counter
        current = self._current
        if phase == current.phase:
            generation = current
        elif phase == (current.phase - 1) % PHASES:
            self.discard_expired(now)
            if self._previous is None:
                return Drop.UNKNOWN_KEY_PHASE
            generation = self._previous
        elif phase == (current.phase + 1) % PHASES:
            generation = self._derive_next()
        else:
            return Drop.UNKNOWN_KEY_PHASE

        view = memoryview(datagram)
        try:
            plaintext = generation.rx.decrypt(
                _NONCE.pack(counter), view[_HEADER_LEN:], view[:_HEADER_LEN]
            )
        except InvalidTag:
            return Drop.BAD_TAG
        verdict = generation.replay.update(counter)
        if verdict is not FRESH:
            return _STALE[verdict]
        if self._retired and generation is self._previous:
            return Drop.RETIRED_KEY_PHASE  # authentic, never opened by this process
        if generation is not current or not self._confirmed:
            self._follow(generation, now)
        return plaintext

    def _follow(self, generation: _Generation, now: float) -> None:
        """An authentic datagram opened with ``generation``, not the confirmed current one:
        the first of our own rekey's phase confirms it; one of phase current+1 means the
        peer rekeyed, and this cipher follows (the previous generation's: nothing)."""
        if generation is self._current:
            self._confirmed = True
            self._previous_until = now + PREVIOUS_KEYS_GRACE_S
        elif generation is not self._previous:
            self._promote(generation, now)
            self._confirmed = True
            self._previous_until = now + PREVIOUS_KEYS_GRACE_S

    # -- resume (a restarted gateway, DESIGN D15a) -------------------------------------

    def current_keys(self) -> tuple[int, TrafficKeys]:
        """The current phase and its keys."""
        return self._current.phase, self._current.keys

    def resume_keys(self) -> tuple[int, TrafficKeys, TrafficKeys | None]:
        """What a session store keeps, sealed, so that another process can continue this
        session (tunnel/gateway/resume.py): the current phase, its keys, and the keys of
        the previous phase while our own rotation is unconfirmed (no datagram of the
        current phase opened yet), else None."""
        previous = self._previous
        retired = previous.keys if previous is not None and not self._confirmed else None
        return self._current.phase, self._current.keys, retired

    def resume_at(self, phase: int, send_counter: int, retired: TrafficKeys | None) -> None:
        """Continue as the cipher of another process, in a key phase that process opened
        nothing in (DESIGN D15a): the keys given at construction are its phase ``phase``.

        ``retired`` None: that process may have opened datagrams in ``phase``; this cipher
        rotates to ``phase + 1`` (sealing from counter 0: that process never sealed in it)
        and ``phase`` is retired. Else that process had rotated to ``phase`` itself and
        opened nothing in it yet: this cipher stays in ``phase``, seals from
        ``send_counter`` (a counter it reserved and never reached) and ``phase - 1``
        (``retired``) is retired. A retired phase only authenticates: what opens there
        is ``Drop.RETIRED_KEY_PHASE`` (once per counter), never plaintext. The rotation
        is unconfirmed until the peer's first datagram of the new phase: the peer follows
        when it opens one of ours (``rekey``'s mechanism). Only on a fresh cipher."""
        if self.send_counter or self._previous is not None or self._current.phase:
            raise ValueError("only a fresh cipher can resume another process's session")
        if not 0 <= send_counter < constants.REJECT_AFTER_MESSAGES:
            raise ValueError(f"send counter {send_counter} out of range")
        own = _Generation(
            self._current.keys, phase % PHASES, self._replay_size, self._suite, self._cache
        )
        if retired is None:
            self._current = own
            old, current, counter = own, self._derive_next(), 0
        else:
            old = _Generation(
                retired, (phase - 1) % PHASES, self._replay_size, self._suite, self._cache
            )
            current, counter = own, send_counter
        self._previous, self._current, self._next = old, current, None
        self._retired = True
        self._confirmed = False
        self._previous_until = None
        self.send_counter = counter

    # -- internals ---------------------------------------------------------------------

    def _derive_next(self) -> _Generation:
        candidate = self._next
        if candidate is None:
            current = self._current
            candidate = _Generation(
                next_generation(current.keys), (current.phase + 1) % PHASES, self._replay_size,
                self._suite, self._cache,
            )  # fmt: skip
            self._next = candidate
        return candidate

    def _promote(self, generation: _Generation, now: float) -> None:
        self._retired = False  # the generation that becomes previous was ours to open
        self._previous = self._current
        self._current = generation
        self._next = None
        self._born = now
        self.send_counter = 0
