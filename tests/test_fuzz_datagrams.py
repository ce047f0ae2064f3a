"""Property tests: hostile datagrams against established endpoints, and the wire parsers.

Real datagrams are captured from a Simulation (handshake, probes, data, a reattach, state
updates, in both directions) and then mutated: bit flips, truncation, extension, spliced
random bytes, rewritten header fields, or replayed as they are. Fed to the gateway
(``GatewaySessions.receive_datagram``) and to the client (``ClientSession.receive_datagram``)
of an established session, every one must be dropped: no exception, exactly one counted
drop whose reason is a ``Drop`` member, and no change to the session's id, state,
state_version, binding epoch or active binding. The parsers in ``tunnel.core.wire`` must
return a value or a ``Drop`` for any input, never raise, and round-trip what they accept.
"""

from __future__ import annotations

import functools
import random
import struct
from dataclasses import dataclass, fields
from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from simkit import CLIENT_INNER, GATEWAY_INNER, build, ipv4_packet

from tunnel.core.aead import peek_header
from tunnel.core.constants import (
    HEADER,
    MAX_DATAGRAM,
    MSG_CONTROL,
    MSG_COOKIE_REPLY,
    MSG_DATA,
    MSG_HANDSHAKE_INIT,
    MSG_HANDSHAKE_RESP,
    MSG_STANDBY_ACK,
    TRANSPORT_HEADER,
)
from tunnel.core.drops import Drop
from tunnel.core.session import State
from tunnel.core.wire import (
    _CONTROL_TYPES,
    STATE_CODES,
    Header,
    InitPayload,
    NodeInfo,
    ReattachKind,
    ReattachReject,
    RespPayload,
    pack_control,
    parse_control,
    parse_header,
    split_handshake,
)
from tunnel.io.memory import Simulation

DROP_REASONS = frozenset(d.value for d in Drop)
SETTINGS = settings(
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass
class World:
    sim: Simulation
    to_gateway: list[bytes]
    to_client: list[bytes]

    @property
    def samples(self) -> list[bytes]:
        return self.to_gateway + self.to_client


@functools.cache
def world() -> World:
    """One established session whose traffic was recorded while it was built and used."""
    sim = build(start=False)
    up: list[bytes] = []
    down: list[bytes] = []
    sim.taps.append(lambda d: (up if d.to_gateway else down).append(d.data))
    sim.start()
    sim.run_until(1.5)
    for i in range(3):
        sim.client_tun.inject(ipv4_packet(CLIENT_INNER, GATEWAY_INNER, ident=i))
        sim.gateway_tun.inject(ipv4_packet(GATEWAY_INNER, CLIENT_INNER, ident=i))
    assert sim.client.switch_to(2, sim.now) is None
    sim.run_until(3.0)
    sim.taps.clear()
    assert sim.client.state is State.ATTACHED and sim.client.active == 2
    assert {d[0] for d in up} >= {MSG_HANDSHAKE_INIT, MSG_DATA, MSG_CONTROL}
    assert {d[0] for d in down} >= {MSG_HANDSHAKE_RESP, MSG_DATA, MSG_CONTROL}
    return World(sim, up, down)


def gateway_view(sim: Simulation) -> tuple[Any, ...]:
    (s,) = sim.gateway.sessions.values()
    return (s.session_id, s.index, s.machine.state, s.machine.version, s.epoch, s.binding)


def client_view(sim: Simulation) -> tuple[Any, ...]:
    c = sim.client
    return (c.machine.session_id, c.state, c.machine.version, c.epoch, c.active, c.index)


# -- mutations ------------------------------------------------------------------------------


def _flip(data: bytes, bits: list[int]) -> bytes:
    out = bytearray(data)
    for bit in bits:
        out[(bit // 8) % len(out)] ^= 1 << (bit % 8)
    return bytes(out)


@st.composite
def mutated(draw: st.DrawFn, samples: list[bytes]) -> bytes:
    by_type: dict[int, list[bytes]] = {}
    for sample in samples:
        by_type.setdefault(sample[0], []).append(sample)
    data = draw(st.sampled_from(by_type[draw(st.sampled_from(sorted(by_type)))]))
    kind = draw(st.sampled_from(["flip", "truncate", "extend", "splice", "header", "replay"]))
    if kind == "flip":
        return _flip(
            data, draw(st.lists(st.integers(0, 8 * len(data) - 1), min_size=1, max_size=8))
        )
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "extend":
        return data + draw(st.binary(min_size=1, max_size=80))
    if kind == "splice":
        start = draw(st.integers(0, len(data) - 1))
        end = draw(st.integers(start, len(data)))
        return data[:start] + draw(st.binary(max_size=40)) + data[end:]
    if kind == "header":
        if len(data) < TRANSPORT_HEADER.size:
            return data
        msg_type, phase, index, counter = TRANSPORT_HEADER.unpack_from(data)
        which = draw(st.sampled_from(["type", "phase", "reserved", "index", "counter"]))
        if which == "type":
            msg_type = draw(st.integers(0, 255))
        elif which == "phase":
            phase = draw(st.integers(0, 255))
        elif which == "index":
            index = draw(st.integers(0, 2**32 - 1))
        elif which == "counter":
            counter = draw(st.integers(0, 2**64 - 1))
        head = bytearray(TRANSPORT_HEADER.pack(msg_type, phase, index, counter))
        if which == "reserved":
            head[2:4] = draw(st.binary(min_size=2, max_size=2))
        return bytes(head) + data[TRANSPORT_HEADER.size :]
    return data  # replay as is


def addressed_junk(index: int) -> st.SearchStrategy[bytes]:
    """Random bodies behind a plausible header naming the live session (reaches the AEAD)."""
    return st.builds(
        lambda t, p, c, body: TRANSPORT_HEADER.pack(t, p, index, c) + body,
        st.sampled_from([MSG_DATA, MSG_CONTROL]),
        st.integers(0, 3),
        st.integers(0, 2**64 - 1),
        st.binary(max_size=200),
    )


def hostile(w: World, index: int) -> st.SearchStrategy[bytes]:
    return st.one_of(
        mutated(w.samples),
        st.binary(max_size=MAX_DATAGRAM + 20),
        addressed_junk(index),
    )


def assert_one_typed_drop(before: dict[str, int], after: dict[str, int]) -> None:
    grown = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    assert sum(grown.values()) == 1, grown
    assert set(grown) <= DROP_REASONS, grown


# -- endpoints ------------------------------------------------------------------------------


@SETTINGS
@given(data=st.data(), src=st.sampled_from(["path1", "path2", "attacker"]))
def test_gateway_drops_every_hostile_datagram_and_keeps_the_session(
    data: st.DataObject, src: str
) -> None:
    w = world()
    sim = w.sim
    (s,) = sim.gateway.sessions.values()
    dgram = data.draw(hostile(w, s.index))
    where = {
        "path1": sim.links[1].client_addr,
        "path2": sim.links[2].client_addr,
        "attacker": ("203.0.113.9", 9999),
    }[src]
    before_view, before = gateway_view(sim), dict(sim.gateway.drops)
    sim.gateway.receive_datagram(dgram, where, sim.now)
    sim.gateway.datagrams_to_send()
    assert_one_typed_drop(before, sim.gateway.drops)
    assert gateway_view(sim) == before_view
    assert s.security_failures == 0


@SETTINGS
@given(data=st.data(), path_id=st.sampled_from([1, 2]))
def test_client_drops_every_hostile_datagram_and_keeps_the_session(
    data: st.DataObject, path_id: int
) -> None:
    w = world()
    sim = w.sim
    dgram = data.draw(hostile(w, sim.client.index))
    before_view, before = client_view(sim), dict(sim.client.drops)
    sim.client.receive_datagram(dgram, path_id, sim.now)
    sim.client.datagrams_to_send()
    assert_one_typed_drop(before, sim.client.drops)
    assert client_view(sim) == before_view


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plaintext=st.binary(max_size=64))
def test_authenticated_garbage_control_is_a_typed_drop_or_a_known_message(
    plaintext: bytes,
) -> None:
    """Sealed with the client's real keys: whatever parse_control refuses is one counted
    drop of exactly that reason; the gateway never raises on any of it."""
    w = world()
    sim = w.sim
    parsed = parse_control(plaintext)
    if not isinstance(parsed, Drop):
        return  # well-formed messages are the protocol's business, not the parser's
    cipher = sim.client.cipher
    assert cipher is not None
    before_view, before = gateway_view(sim), dict(sim.gateway.drops)
    dgram = cipher.seal(MSG_CONTROL, sim.client.peer_index, plaintext)
    sim.gateway.receive_datagram(dgram, sim.links[2].client_addr, sim.now)
    sim.gateway.datagrams_to_send()
    assert_one_typed_drop(before, sim.gateway.drops)
    assert sim.gateway.drops[str(parsed)] == before.get(str(parsed), 0) + 1
    assert gateway_view(sim) == before_view


@functools.cache
def birth_world() -> tuple[Simulation, bytes]:
    """A client in BIRTH whose genuine HANDSHAKE_RESP is held back (not yet delivered)."""
    sim = build(start=False)
    sim.client.connect(sim.now)
    ((_pid, init),) = sim.client.datagrams_to_send()
    sim.gateway.receive_datagram(init, sim.links[1].client_addr, sim.now)
    ((_addr, resp),) = sim.gateway.datagrams_to_send()
    assert resp[0] == MSG_HANDSHAKE_RESP
    return sim, resp


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_client_in_birth_drops_every_forged_handshake_response(data: st.DataObject) -> None:
    sim, resp = birth_world()
    dgram = data.draw(st.one_of(mutated([resp]), st.binary(max_size=300)))
    # The sender index travels in clear (as in WireGuard minus mac1): a copy that differs
    # only there still completes the handshake, so it is not a forgery this test can ask
    # the client to refuse. Everything else must be refused.
    assume(not (dgram[:8] == resp[:8] and dgram[12:] == resp[12:]))
    before = dict(sim.client.drops)
    sim.client.receive_datagram(dgram, 1, sim.now)
    assert_one_typed_drop(before, sim.client.drops)
    assert sim.client.state is State.BIRTH and sim.client.cipher is None
    assert not sim.client.datagrams_to_send()


def test_genuine_handshake_response_still_works_after_forgeries() -> None:
    """The forgeries above leave the initiator usable: the held-back real response, once
    it arrives, completes the handshake (so 'stays in BIRTH' was not a broken client)."""
    birth_world.cache_clear()
    sim, resp = birth_world()
    rng = random.Random(5)
    for i in range(200):
        forged = _flip(resp, [rng.randrange(12 * 8, 8 * len(resp))]) if i % 2 else resp[:-1]
        sim.client.receive_datagram(forged, 1, sim.now)
    assert sim.client.state is State.BIRTH
    sim.client.receive_datagram(resp, 1, sim.now)
    assert sim.client.state is State.ATTACHED
    birth_world.cache_clear()


# -- parsers --------------------------------------------------------------------------------


@settings(max_examples=1000, deadline=None)
@given(data=st.one_of(st.binary(max_size=MAX_DATAGRAM + 40), st.binary(max_size=64)))
def test_parsers_never_raise_on_arbitrary_bytes(data: bytes) -> None:
    header = parse_header(data)
    assert isinstance(header, (Header, Drop))
    if isinstance(header, Header):
        assert len(data) <= MAX_DATAGRAM
        # docs/wire-format.md: bytes 2-3 are zero, or a DATA/CONTROL binding mark 1..3
        # with its epoch (a mark of 0 names no epoch).
        assert (header.epoch, header.mark) == (data[2], data[3])
        assert data[2:4] == b"\0\0" or (
            header.msg_type in (MSG_DATA, MSG_CONTROL) and 1 <= data[3] <= 3
        )
        if header.msg_type in (MSG_HANDSHAKE_INIT, MSG_HANDSHAKE_RESP):
            sender, noise = split_handshake(data)
            assert 0 <= sender < 2**32 and len(noise) == len(data) - 12
    assert isinstance(peek_header(data), (tuple, Drop))
    control = parse_control(data)
    assert isinstance(control, Drop) or type(control) in _CONTROL_TYPES.values()
    assert isinstance(InitPayload.parse(data), (InitPayload, Drop))
    resp = RespPayload.parse(data)
    assert isinstance(resp, (RespPayload, Drop))
    if isinstance(resp, RespPayload):
        assert RespPayload.parse(resp.pack()) == resp


@st.composite
def control_messages(draw: st.DrawFn) -> Any:
    """Any well-formed control message, field values drawn within their wire ranges."""
    cls = draw(st.sampled_from(list(_CONTROL_TYPES.values())))
    if cls is NodeInfo:  # a node id: 1-64 characters of NODE_ID_RE, zero padding
        node = draw(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True))
        return NodeInfo.of(node, draw(st.integers(0, 2**32 - 1)))
    codes = cls.STRUCT.format.lstrip("<").replace("x", "")
    values: list[Any] = []
    for f, code in zip(fields(cls), [c for c in _expand(codes)], strict=True):
        if f.name in ("gw_state",):
            values.append(draw(st.integers(0, len(STATE_CODES) - 1)))
        elif f.name == "kind":
            values.append(draw(st.sampled_from([int(k) for k in ReattachKind])))
        elif f.name == "fatal" and cls is ReattachReject:
            values.append(draw(st.integers(0, 1)))
        elif code.endswith("s"):
            values.append(draw(st.binary(min_size=int(code[:-1]), max_size=int(code[:-1]))))
        else:
            size = struct.calcsize("<" + code)
            values.append(draw(st.integers(0, 2 ** (8 * size) - 1)))
    return cls(*values)


def _expand(codes: str) -> list[str]:
    """'QQIBBQ' -> ['Q','Q','I','B','B','Q']; '8s' stays one item; padding removed."""
    out: list[str] = []
    number = ""
    for ch in codes:
        if ch.isdigit():
            number += ch
        elif ch == "s":
            out.append(number + "s")
            number = ""
        else:
            out.extend([ch] * int(number or "1"))
            number = ""
    return out


@settings(max_examples=500, deadline=None)
@given(msg=control_messages(), cut=st.integers(1, 40), extra=st.binary(min_size=1, max_size=8))
def test_control_messages_round_trip_and_reject_wrong_lengths(
    msg: Any, cut: int, extra: bytes
) -> None:
    raw = pack_control(msg)
    assert parse_control(raw) == msg
    assert parse_control(raw[: max(1, len(raw) - cut)]) is Drop.TRUNCATED
    assert parse_control(raw + extra) is Drop.OVERSIZED


@settings(max_examples=300, deadline=None)
@given(
    msg_type=st.integers(0, 255),
    phase=st.integers(0, 255),
    index=st.integers(0, 2**32 - 1),
    tail=st.binary(max_size=120),
)
def test_header_verdicts_are_consistent(msg_type: int, phase: int, index: int, tail: bytes) -> None:
    data = HEADER.pack(msg_type, phase, index) + tail
    verdict = parse_header(data)
    known = (
        MSG_HANDSHAKE_INIT, MSG_HANDSHAKE_RESP, MSG_DATA, MSG_CONTROL, MSG_COOKIE_REPLY,
        MSG_STANDBY_ACK,
    )  # fmt: skip
    if msg_type not in known:
        assert verdict is Drop.UNKNOWN_TYPE
    elif isinstance(verdict, Header):
        assert (verdict.msg_type, verdict.phase, verdict.receiver_index) == (msg_type, phase, index)
    else:
        assert verdict in (Drop.TRUNCATED, Drop.MALFORMED, Drop.OVERSIZED)
