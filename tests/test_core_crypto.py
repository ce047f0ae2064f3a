"""Explicit-counter AEAD with key phases, and the Noise IK handshake."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunnel.core import constants
from tunnel.core.aead import (
    PREVIOUS_KEYS_GRACE_S,
    KeyExhausted,
    SessionCipher,
    TrafficKeys,
    next_generation,
    peek_header,
)
from tunnel.core.drops import Drop
from tunnel.core.handshake import (
    INIT_OVERHEAD,
    RESPONSE_OVERHEAD,
    HandshakeError,
    HandshakeUsageError,
    Initiator,
    Responder,
    generate_keypair,
    public_key,
)

DATA = constants.MSG_DATA
PEER_INDEX = 0x11223344

KEYS_A = TrafficKeys(send=bytes(range(32)), recv=bytes(range(32, 64)))
KEYS_B = TrafficKeys(send=KEYS_A.recv, recv=KEYS_A.send)


def _pair() -> tuple[SessionCipher, SessionCipher]:
    return SessionCipher(KEYS_A, now=0.0), SessionCipher(KEYS_B, now=0.0)


# -- seal / open ---------------------------------------------------------------------------


def test_round_trip_and_layout() -> None:
    a, b = _pair()
    datagram = a.seal(DATA, PEER_INDEX, b"inner packet")
    assert len(datagram) == 16 + len(b"inner packet") + 16
    assert constants.TRANSPORT_HEADER.unpack_from(datagram) == (DATA, 0, PEER_INDEX, 0)
    assert peek_header(datagram) == (DATA, 0, PEER_INDEX, 0)
    assert b.open(datagram, 1.0) == b"inner packet"
    assert a.send_counter == 1
    assert a.seal(DATA, PEER_INDEX, b"")[8:16] == (1).to_bytes(8, "little")


def test_both_directions() -> None:
    a, b = _pair()
    assert b.open(a.seal(DATA, 1, b"ping"), 0.0) == b"ping"
    assert a.open(b.seal(DATA, 2, b"pong"), 0.0) == b"pong"


def test_wrong_direction_key_fails() -> None:
    a, _b = _pair()
    assert a.open(a.seal(DATA, 1, b"to myself"), 0.0) is Drop.BAD_TAG


@settings(max_examples=60, deadline=None)
@given(plaintext=st.binary(max_size=64), data=st.data())
def test_tamper_any_byte_is_rejected(plaintext: bytes, data: st.DataObject) -> None:
    a, b = _pair()
    datagram = bytearray(a.seal(DATA, PEER_INDEX, plaintext))
    position = data.draw(st.integers(0, len(datagram) - 1))
    datagram[position] ^= data.draw(st.integers(1, 255))
    result = b.open(bytes(datagram), 0.0)
    if position == 1:  # the phase byte: unknown phase, or a next-phase key that fails
        assert result in (Drop.UNKNOWN_KEY_PHASE, Drop.BAD_TAG)
    else:
        assert result is Drop.BAD_TAG
    assert b.phase == 0
    assert b.open(a.seal(DATA, PEER_INDEX, b"ok"), 0.0) == b"ok"  # nothing was recorded


def test_replay_is_dropped_after_authentication() -> None:
    a, b = _pair()
    datagram = a.seal(DATA, PEER_INDEX, b"once")
    assert b.open(datagram, 0.0) == b"once"
    assert b.open(datagram, 0.1) is Drop.DUPLICATE  # the receive side judges the source


def test_reordered_within_window_accepted() -> None:
    a, b = _pair()
    datagrams = [a.seal(DATA, PEER_INDEX, i.to_bytes(2, "big")) for i in range(300)]
    for i in [*range(299, 149, -1), *range(0, 150)]:
        assert b.open(datagrams[i], 0.0) == i.to_bytes(2, "big")
    assert all(b.open(d, 0.0) is Drop.DUPLICATE for d in datagrams)


def test_older_than_window_is_too_old() -> None:
    a, b = SessionCipher(KEYS_A), SessionCipher(KEYS_B, replay_window=64)
    first = a.seal(DATA, PEER_INDEX, b"old")
    a.send_counter = 1000
    assert b.open(a.seal(DATA, PEER_INDEX, b"new"), 0.0) == b"new"
    assert b.open(first, 0.0) is Drop.TOO_OLD


def test_size_limits() -> None:
    a, b = _pair()
    assert b.open(b"", 0.0) is Drop.TRUNCATED
    assert b.open(bytes(31), 0.0) is Drop.TRUNCATED
    assert b.open(bytes(constants.MAX_DATAGRAM + 1), 0.0) is Drop.OVERSIZED
    assert peek_header(bytes(5)) is Drop.TRUNCATED
    big = a.seal(DATA, PEER_INDEX, bytes(constants.MAX_INNER_PACKET))
    assert len(big) == constants.MAX_DATAGRAM
    assert b.open(big, 0.0) == bytes(constants.MAX_INNER_PACKET)
    with pytest.raises(ValueError):
        a.seal(DATA, PEER_INDEX, bytes(constants.MAX_INNER_PACKET + 1))


def test_counter_beyond_reject_limit_is_malformed() -> None:
    _a, b = _pair()
    header = constants.TRANSPORT_HEADER.pack(DATA, 0, PEER_INDEX, 2**64 - 1)
    assert b.open(header + bytes(16), 0.0) is Drop.MALFORMED


def test_key_exhausted_near_counter_limit() -> None:
    a, b = _pair()
    a.send_counter = constants.REJECT_AFTER_MESSAGES - 1
    assert b.open(a.seal(DATA, PEER_INDEX, b"last"), 0.0) == b"last"
    with pytest.raises(KeyExhausted):
        a.seal(DATA, PEER_INDEX, b"one too many")
    assert a.send_counter == constants.REJECT_AFTER_MESSAGES
    assert a.rekey(1.0)
    assert b.open(a.seal(DATA, PEER_INDEX, b"fresh keys"), 1.0) == b"fresh keys"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(junk=st.binary(max_size=constants.MAX_DATAGRAM + 40), phase=st.integers(0, 255))
def test_open_never_raises_on_random_bytes(junk: bytes, phase: int) -> None:
    _a, b = _pair()
    if len(junk) > 1:
        junk = junk[:1] + bytes([phase]) + junk[2:]
    result = b.open(junk, 0.0)
    assert isinstance(result, Drop)
    assert b.phase == 0


@settings(max_examples=100, deadline=None)
@given(
    plaintext=st.binary(max_size=100),
    edits=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.integers(0, 200),
)
def test_open_never_raises_on_mutated_datagrams(
    plaintext: bytes, edits: list[tuple[int, int]], cut: int
) -> None:
    a, b = _pair()
    datagram = bytearray(a.seal(DATA, PEER_INDEX, plaintext))
    for position, value in edits:
        if position < len(datagram):
            datagram[position] = value
    mutated = bytes(datagram[: max(cut, 0)])
    result = b.open(mutated, 0.0)
    assert isinstance(result, (bytes, Drop))
    if isinstance(result, bytes):  # only if the mutations left it intact
        assert mutated == a_seal_again(plaintext)


def a_seal_again(plaintext: bytes) -> bytes:
    return SessionCipher(KEYS_A).seal(DATA, PEER_INDEX, plaintext)


# -- key phases ----------------------------------------------------------------------------


def test_next_generation_matches_on_both_ends() -> None:
    na, nb = next_generation(KEYS_A), next_generation(KEYS_B)
    assert na.send == nb.recv and na.recv == nb.send
    assert na.send not in (KEYS_A.send, KEYS_A.recv)
    assert next_generation(na) != na


def test_rekey_receiver_follows_and_grace_applies() -> None:
    a, b = _pair()
    old_in_flight = [a.seal(DATA, PEER_INDEX, b"old %d" % i) for i in range(3)]
    assert a.rekey(100.0)
    assert (a.phase, a.send_counter, a.key_age(101.0)) == (1, 0, 1.0)
    assert a.rekey_pending

    new = a.seal(DATA, PEER_INDEX, b"new")
    assert new[1] == 1
    assert b.phase == 0
    assert b.open(new, 100.5) == b"new"
    assert (b.phase, b.send_counter, b.key_age(100.5)) == (1, 0, 0.0)

    # Late datagrams of the old phase still open during the grace period ...
    assert b.open(old_in_flight[0], 100.5 + PREVIOUS_KEYS_GRACE_S - 0.1) == b"old 0"
    # ... and b now answers in the new phase, which confirms the rekey to a.
    assert a.open(b.seal(DATA, 1, b"reply"), 101.0) == b"reply"
    assert not a.rekey_pending
    # ... but not after it.
    assert b.open(old_in_flight[1], 100.5 + PREVIOUS_KEYS_GRACE_S) is Drop.UNKNOWN_KEY_PHASE
    assert b.next_deadline() is None


def test_rekeying_side_keeps_old_keys_until_peer_moves() -> None:
    a, b = _pair()
    a.rekey(0.0)
    late = b.seal(DATA, 1, b"old phase from b")  # b has not seen phase 1 yet
    assert a.next_deadline() is None
    assert a.open(late, 1000.0) == b"old phase from b"  # no grace timer runs yet
    assert not a.rekey(1000.0)  # a second rekey before the peer followed is refused
    assert a.phase == 1


def test_forged_next_phase_packet_does_not_promote() -> None:
    a, b = _pair()
    forged = bytearray(a.seal(DATA, PEER_INDEX, b"x"))
    forged[1] = 1  # claims the next phase, sealed with the current keys
    assert b.open(bytes(forged), 0.0) is Drop.BAD_TAG
    assert b.phase == 0
    assert b.open(a.seal(DATA, PEER_INDEX, b"still phase 0"), 0.0) == b"still phase 0"


def test_unknown_phase_dropped() -> None:
    a, b = _pair()
    datagram = bytearray(a.seal(DATA, PEER_INDEX, b"x"))
    for phase in (2, 128, 255):
        datagram[1] = phase
        assert b.open(bytes(datagram), 0.0) is Drop.UNKNOWN_KEY_PHASE


def test_simultaneous_rekey_converges() -> None:
    a, b = _pair()
    a.rekey(1.0)
    b.rekey(1.0)
    assert b.open(a.seal(DATA, PEER_INDEX, b"a1"), 1.0) == b"a1"
    assert a.open(b.seal(DATA, 1, b"b1"), 1.0) == b"b1"
    assert (a.phase, b.phase) == (1, 1)


def test_replay_of_new_phase_after_promotion() -> None:
    a, b = _pair()
    a.rekey(0.0)
    new = a.seal(DATA, PEER_INDEX, b"n")
    assert b.open(new, 0.0) == b"n"
    assert b.open(new, 0.0) is Drop.DUPLICATE
    assert b.phase == 1


def test_phase_wraps_after_256_rekeys() -> None:
    a, b = _pair()
    for step in range(300):
        assert a.rekey(float(step))
        assert b.open(a.seal(DATA, PEER_INDEX, b"k"), float(step)) == b"k"
        assert a.open(b.seal(DATA, 1, b"ack"), float(step)) == b"ack"
    assert a.phase == b.phase == 300 % 256


# -- secrets stay out of text --------------------------------------------------------------


def test_keys_never_in_repr() -> None:
    a, _b = _pair()
    private, _public = generate_keypair()
    texts = [repr(KEYS_A), str(KEYS_A), repr(a), repr(a._current), repr(Responder(private))]
    for text in texts:
        for key in (KEYS_A.send, KEYS_A.recv, private):
            assert key.hex() not in text
            assert repr(key) not in text
    assert repr(KEYS_A) == "TrafficKeys(<redacted>)"


def test_traffic_keys_length_error_has_no_material() -> None:
    with pytest.raises(ValueError) as info:
        TrafficKeys(send=b"\x07" * 31, recv=b"\x07" * 32)
    assert "\\x07" not in str(info.value) and "0707" not in str(info.value)


# -- handshake -----------------------------------------------------------------------------

CLIENT_PRIVATE, CLIENT_PUBLIC = generate_keypair()
GATEWAY_PRIVATE, GATEWAY_PUBLIC = generate_keypair()


def _handshake() -> tuple[bytes, bytes, TrafficKeys, TrafficKeys, bytes]:
    initiator = Initiator(CLIENT_PRIVATE, GATEWAY_PUBLIC)
    message1 = initiator.write_init(b"client hello")
    pending = Responder(GATEWAY_PRIVATE).read_init(message1)
    assert pending.client_static == CLIENT_PUBLIC
    assert pending.payload == b"client hello"
    message2, gateway_keys = pending.write_response(b"gateway hello")
    payload, client_keys = initiator.read_response(message2)
    return message1, payload, client_keys, gateway_keys, message2


def test_keypair_and_public_key() -> None:
    assert public_key(CLIENT_PRIVATE) == CLIENT_PUBLIC
    assert len(CLIENT_PRIVATE) == len(CLIENT_PUBLIC) == 32
    assert generate_keypair() != generate_keypair()
    with pytest.raises(ValueError):
        public_key(b"short")


def test_handshake_happy_path_and_key_agreement() -> None:
    message1, payload, client_keys, gateway_keys, message2 = _handshake()
    assert payload == b"gateway hello"
    assert len(message1) == INIT_OVERHEAD + len(b"client hello")
    assert len(message2) == RESPONSE_OVERHEAD + len(b"gateway hello")
    assert client_keys.send == gateway_keys.recv
    assert client_keys.recv == gateway_keys.send
    assert client_keys.send != client_keys.recv
    client, gateway = SessionCipher(client_keys), SessionCipher(gateway_keys)
    assert gateway.open(client.seal(DATA, 1, b"up"), 0.0) == b"up"
    assert client.open(gateway.seal(DATA, 2, b"down"), 0.0) == b"down"


def test_each_handshake_yields_new_keys() -> None:
    assert _handshake()[2] != _handshake()[2]


def test_wrong_responder_key_fails() -> None:
    _other_private, other_public = generate_keypair()
    message1 = Initiator(CLIENT_PRIVATE, other_public).write_init(b"hi")
    with pytest.raises(HandshakeError):
        Responder(GATEWAY_PRIVATE).read_init(message1)


def test_response_from_wrong_responder_fails() -> None:
    initiator = Initiator(CLIENT_PRIVATE, GATEWAY_PUBLIC)
    message1 = initiator.write_init(b"")
    other_private, other_public = generate_keypair()
    # An impostor cannot read message 1, so it answers a message 1 made for itself.
    impostor_init = Initiator(CLIENT_PRIVATE, other_public).write_init(b"")
    forged, _ = Responder(other_private).read_init(impostor_init).write_response(b"")
    assert len(message1) == len(impostor_init)
    with pytest.raises(HandshakeError):
        initiator.read_response(forged)


def test_bad_response_leaves_initiator_usable() -> None:
    initiator = Initiator(CLIENT_PRIVATE, GATEWAY_PUBLIC)
    pending = Responder(GATEWAY_PRIVATE).read_init(initiator.write_init(b""))
    message2, gateway_keys = pending.write_response(b"ok")
    for bad in (bytes(len(message2)), message2[:-1] + bytes([message2[-1] ^ 1]), b"\x01" * 90):
        with pytest.raises(HandshakeError):
            initiator.read_response(bad)
    payload, client_keys = initiator.read_response(message2)
    assert payload == b"ok" and client_keys.send == gateway_keys.recv


def test_replayed_init_verifies_again_at_this_layer() -> None:
    """Noise IK message 1 is replayable; the gateway must reject replays (payload nonce)."""
    message1 = Initiator(CLIENT_PRIVATE, GATEWAY_PUBLIC).write_init(b"t=1")
    first = Responder(GATEWAY_PRIVATE).read_init(message1)
    again = Responder(GATEWAY_PRIVATE).read_init(message1)
    assert first.client_static == again.client_static == CLIENT_PUBLIC
    # ... but the replayer cannot use the keys: they differ (fresh responder ephemeral).
    assert first.write_response(b"")[1] != again.write_response(b"")[1]


def test_low_order_ephemeral_is_handshake_error() -> None:
    message1 = Initiator(CLIENT_PRIVATE, GATEWAY_PUBLIC).write_init(b"")
    with pytest.raises(HandshakeError):
        Responder(GATEWAY_PRIVATE).read_init(bytes(32) + message1[32:])


@settings(max_examples=60, deadline=None)
@given(junk=st.binary(max_size=300))
def test_random_init_is_handshake_error(junk: bytes) -> None:
    with pytest.raises(HandshakeError):
        Responder(GATEWAY_PRIVATE).read_init(junk)


@settings(max_examples=40, deadline=None)
@given(cut=st.integers(0, INIT_OVERHEAD + 3), flip=st.integers(0, INIT_OVERHEAD + 3))
def test_truncated_or_flipped_init_is_handshake_error(cut: int, flip: int) -> None:
    message1 = bytearray(Initiator(CLIENT_PRIVATE, GATEWAY_PUBLIC).write_init(b"abcd"))
    message1[flip] ^= 0x80
    with pytest.raises(HandshakeError):
        Responder(GATEWAY_PRIVATE).read_init(bytes(message1))
    with pytest.raises(HandshakeError):
        Responder(GATEWAY_PRIVATE).read_init(bytes(message1[:cut]))


@settings(max_examples=40, deadline=None)
@given(junk=st.binary(max_size=200))
def test_random_response_is_handshake_error(junk: bytes) -> None:
    initiator = Initiator(CLIENT_PRIVATE, GATEWAY_PUBLIC)
    initiator.write_init(b"")
    with pytest.raises(HandshakeError):
        initiator.read_response(junk)


def test_oversized_handshake_message_is_handshake_error() -> None:
    with pytest.raises(HandshakeError):
        Responder(GATEWAY_PRIVATE).read_init(bytes(70_000))


def test_handshake_misuse_raises_usage_error() -> None:
    initiator = Initiator(CLIENT_PRIVATE, GATEWAY_PUBLIC)
    with pytest.raises(HandshakeUsageError):
        initiator.read_response(bytes(48))
    message1 = initiator.write_init(b"")
    with pytest.raises(HandshakeUsageError):
        initiator.write_init(b"")
    pending = Responder(GATEWAY_PRIVATE).read_init(message1)
    pending.write_response(b"")
    with pytest.raises(HandshakeUsageError):
        pending.write_response(b"")
    with pytest.raises(ValueError):
        Initiator(CLIENT_PRIVATE[:31], GATEWAY_PUBLIC)
