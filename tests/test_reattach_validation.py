"""REATTACH_REQUEST validation at the gateway, request by request (issue 11: the reattach
validation rate; docs/gateway.md and SPEC-DIGEST §4.4 give the checks and their order).

The common request (from the binding, naming the current epoch, fresh nonce and proof,
a token in the session's bucket) is answered by a REATTACH_ACK; every other outcome keeps
its answer: a retransmission gets the same ACK, an older nonce is refused as stale, a
wrong epoch as stale_binding_epoch, an old proof as stale_request (a security failure),
a request over the session's reattach burst as rate_limited, and the same datagram again
is a replay, never answered. Clients are lean (``HandshakeInitiator`` and a
``SessionCipher`` with the client's keys), as in bench/reattach.py.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from tunnel.core.aead import SessionCipher
from tunnel.core.constants import MSG_CONTROL, MSG_HANDSHAKE_RESP
from tunnel.core.events import Reason, reason_from_wire
from tunnel.core.gateway import GatewaySessions
from tunnel.core.gateway_session import INITIAL_EPOCH, ClientEntry
from tunnel.core.handshake import generate_keypair
from tunnel.core.initiator import Accepted, HandshakeInitiator
from tunnel.core.policy import POLICY_DEFAULT
from tunnel.core.wire import (
    ReattachAck,
    ReattachKind,
    ReattachReject,
    ReattachRequest,
    pack_control,
    parse_control,
)

T0 = 100.0
CLIENT_TS = 5_000_000


@dataclass
class Lean:
    """One client: its session's receiver index at the gateway, its keys, its address."""

    index: int
    cipher: SessionCipher
    addr: tuple[str, int]

    def request(self, nonce: int, *, epoch: int = INITIAL_EPOCH, ts_ms: int = CLIENT_TS) -> bytes:
        req = ReattachRequest(nonce, ts_ms, epoch, 0, int(ReattachKind.MANUAL), 1)
        return self.cipher.seal(MSG_CONTROL, self.index, pack_control(req))


def gateway_with(n: int) -> tuple[GatewaySessions, list[Lean]]:
    gw_priv, gw_pub = generate_keypair()
    keys = [generate_keypair() for _ in range(n)]
    gw = GatewaySessions(
        static_private=gw_priv, policy=POLICY_DEFAULT, now=T0,
        clients=[ClientEntry(f"c{i}", pub, f"10.70.0.{i + 2}") for i, (_, pub) in enumerate(keys)],
        urandom=random.Random(1).randbytes, rng=random.Random(2), inner_gateway="10.70.0.1",
    )  # fmt: skip
    lean: list[Lean] = []
    for i, (priv, _) in enumerate(keys):
        hi = HandshakeInitiator(priv, gw_pub, 1000 + i, [0], rng=random.Random(i))
        addr = (f"192.0.2.{i + 1}", 4000)
        _path, init = hi.start(T0, POLICY_DEFAULT, ts_ms=CLIENT_TS)
        gw.receive_datagram(init, addr, T0)
        resp = next(d for _a, d in gw.datagrams_to_send() if d[0] == MSG_HANDSHAKE_RESP)
        accepted = hi.on_response(resp, 1000 + i)
        assert isinstance(accepted, Accepted)
        lean.append(
            Lean(
                accepted.sender_index,
                SessionCipher(accepted.keys, now=T0, suite=accepted.cipher),
                addr,
            )
        )
    gw.events()
    return gw, lean


def answers(gw: GatewaySessions, c: Lean, now: float) -> list[object]:
    out = []
    for addr, dgram in gw.datagrams_to_send():
        assert addr == c.addr
        plain = c.cipher.open(dgram, now)
        assert isinstance(plain, bytes)
        out.append(parse_control(plain))
    return out


def test_every_valid_request_of_many_sessions_is_acknowledged() -> None:
    gw, clients = gateway_with(40)
    now = T0 + 1.0
    for c in clients:
        gw.receive_datagram(c.request(7), c.addr, now)
    out = gw.datagrams_to_send()
    assert len(out) == len(clients)
    for c, (addr, dgram) in zip(clients, out, strict=True):
        assert addr == c.addr
        plain = c.cipher.open(dgram, now)
        assert isinstance(plain, bytes)
        ack = parse_control(plain)
        assert isinstance(ack, ReattachAck)
        assert (ack.nonce, ack.epoch) == (7, INITIAL_EPOCH)
    assert all(s.nonces.last == 7 for s in gw.sessions.values())
    assert not gw.drops


def test_outcomes_other_than_the_common_one_keep_their_answers() -> None:
    gw, (c,) = gateway_with(1)
    now = T0 + 1.0
    gw.receive_datagram(c.request(10), c.addr, now)
    (first,) = answers(gw, c, now)
    assert isinstance(first, ReattachAck) and first.nonce == 10
    # a retransmission (sealed again, same nonce): the same ACK
    gw.receive_datagram(c.request(10), c.addr, now)
    assert answers(gw, c, now) == [first]
    # an older nonce: stale, not a security failure
    gw.receive_datagram(c.request(9), c.addr, now)
    (old,) = answers(gw, c, now)
    assert isinstance(old, ReattachReject) and reason_from_wire(old.reason) is Reason.STALE_REQUEST
    # another epoch
    gw.receive_datagram(c.request(11, epoch=INITIAL_EPOCH + 5), c.addr, now)
    (epoch,) = answers(gw, c, now)
    assert isinstance(epoch, ReattachReject)
    assert reason_from_wire(epoch.reason) is Reason.STALE_BINDING_EPOCH
    # a proof older than reattach_proof_max_age_ms: stale and a security failure
    old_ts = CLIENT_TS - POLICY_DEFAULT.reattach_proof_max_age_ms - 2_000
    gw.receive_datagram(c.request(12, ts_ms=old_ts), c.addr, now)
    (aged,) = answers(gw, c, now)
    assert (
        isinstance(aged, ReattachReject) and reason_from_wire(aged.reason) is Reason.STALE_REQUEST
    )
    (session,) = gw.sessions.values()
    assert session.security_failures == 1
    # the same datagram twice: the second is a replay, not answered
    dgram = c.request(13)
    gw.receive_datagram(dgram, c.addr, now)
    (ack13,) = answers(gw, c, now)
    assert isinstance(ack13, ReattachAck) and ack13.nonce == 13
    gw.receive_datagram(dgram, c.addr, now)
    assert answers(gw, c, now) == []
    assert sum(gw.drops.values()) == 1


@pytest.mark.parametrize("extra", [1, 3])
def test_requests_over_the_burst_are_rate_limited(extra: int) -> None:
    gw, (c,) = gateway_with(1)
    now = T0 + 60.0  # the bucket is full
    burst = POLICY_DEFAULT.reattach_burst
    for nonce in range(1, burst + extra + 1):
        gw.receive_datagram(c.request(nonce, ts_ms=CLIENT_TS + 60_000), c.addr, now)
    got = answers(gw, c, now)
    assert [type(m) for m in got] == [ReattachAck] * burst + [ReattachReject] * extra
    assert all(
        reason_from_wire(m.reason) is Reason.RATE_LIMITED
        for m in got[burst:]
        if isinstance(m, ReattachReject)
    )
    # a token later, the next request is acknowledged again
    later = now + 1 / POLICY_DEFAULT.reattach_rate_per_s
    gw.receive_datagram(c.request(100, ts_ms=CLIENT_TS + 60_500), c.addr, later)
    (ack,) = answers(gw, c, later)
    assert isinstance(ack, ReattachAck) and ack.nonce == 100
