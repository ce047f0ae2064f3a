"""A late answer is still an answer (issue 11 item 5; docs/client.md "Handshake retries",
docs/gateway.md "Arrivals in bursts").

A gateway working through a burst answers an INIT after its client has retried. The
client keeps the state of every INIT of its attempt and reads the answer to any of them;
the gateway answers a retry of an attempt whose session it opened and has not heard from
with the same HANDSHAKE_RESP (``handshake_repeated``), so client and gateway end up on one
session, whichever answer arrives first. Sans-I/O, fake clock, datagrams held and
delivered by hand.
"""

from __future__ import annotations

import dataclasses
import random

from tunnel.core.client import ClientSession, PathSpec
from tunnel.core.constants import MSG_COOKIE_REPLY, MSG_HANDSHAKE_INIT, MSG_HANDSHAKE_RESP
from tunnel.core.drops import Drop
from tunnel.core.gateway import ANSWER_TTL_S, GatewaySessions
from tunnel.core.gateway_session import ClientEntry
from tunnel.core.handshake import generate_keypair
from tunnel.core.policy import POLICY_DEFAULT, Policy
from tunnel.core.session import State

ADDR = ("192.0.2.7", 5555)
POLICY = dataclasses.replace(POLICY_DEFAULT, handshake_timeout_ms=60_000, handshake_attempts=20)


def pair(
    policy: Policy = POLICY, *, cookies: bool = False
) -> tuple[ClientSession, GatewaySessions]:
    gw_priv, gw_pub = generate_keypair()
    priv, pub = generate_keypair()
    gateway = GatewaySessions(
        static_private=gw_priv, clients=[ClientEntry("c", pub, "10.77.0.2")], policy=policy,
        now=0.0, urandom=random.Random(1).randbytes, rng=random.Random(2),
        inner_gateway="10.77.0.1", cookie_threshold=1.0 if cookies else 0.0,
    )  # fmt: skip
    client = ClientSession(
        static_private=priv, gateway_public=gw_pub, paths=[PathSpec(1, "p")], policy=policy,
        now=0.0, rng=random.Random(3),
    )  # fmt: skip
    return client, gateway


def inits_until(client: ClientSession, count: int) -> list[tuple[float, bytes]]:
    """Drive the client's retries (nothing delivered) until it has sent ``count`` INITs."""
    out: list[tuple[float, bytes]] = []
    now = 0.0
    client.connect(now)
    while True:
        out += [(now, d) for _p, d in client.datagrams_to_send() if d[0] == MSG_HANDSHAKE_INIT]
        if len(out) >= count:
            return out
        deadline = client.next_deadline()
        assert deadline is not None
        now = deadline
        client.handle_timer(now)


def talk(client: ClientSession, gateway: GatewaySessions, now: float) -> float:
    """Run the client for one second of its timers (its first probes), delivering what it
    sends to the gateway and the gateway's answers back; the time reached."""
    end = now + 1.0
    while True:
        for _p, d in client.datagrams_to_send():
            gateway.receive_datagram(d, ADDR, now)
        for _a, d in gateway.datagrams_to_send():
            client.receive_datagram(d, 1, now)
        deadline = client.next_deadline()
        if deadline is None or deadline > end:
            return now
        now = max(now, deadline)
        client.handle_timer(now)


def gateway_answers(gateway: GatewaySessions, init: bytes, now: float) -> list[bytes]:
    gateway.receive_datagram(init, ADDR, now)
    return [d for _a, d in gateway.datagrams_to_send()]


def test_the_answer_to_the_first_init_attaches_after_many_retries() -> None:
    client, gateway = pair()
    inits = inits_until(client, 12)
    now = inits[-1][0]
    (resp1,) = gateway_answers(gateway, inits[0][1], now)  # the gateway was slow
    assert resp1[0] == MSG_HANDSHAKE_RESP
    # the retries of the same attempt get the same answer, and no second session
    for _t, init in inits[1:]:
        assert gateway_answers(gateway, init, now) == [resp1]
    assert gateway.drops[Drop.HANDSHAKE_REPEATED.value] == len(inits) - 1
    assert len(gateway.sessions) == 1
    # the client reads the answer to its first INIT, eleven INITs later
    client.receive_datagram(resp1, 1, now)
    assert client.state is State.ATTACHED
    (session,) = gateway.sessions.values()
    assert client.peer_index == session.index
    # and the session carries traffic: the client's probes open at the gateway
    talk(client, gateway, now)
    assert session.heard and not session.machine.terminated
    assert client.machine.session_id == session.session_id.hex()


def test_a_later_answer_arriving_first_wins_and_the_earlier_one_is_the_same() -> None:
    client, gateway = pair()
    (_t1, init1), (t2, init2) = inits_until(client, 2)
    (resp1,) = gateway_answers(gateway, init1, t2)
    (resp2,) = gateway_answers(gateway, init2, t2)
    assert resp2 == resp1  # one session, one answer
    client.receive_datagram(resp2, 1, t2)
    client.receive_datagram(resp1, 1, t2)  # the copy: not for a session that exists
    assert client.state is State.ATTACHED
    assert len(gateway.sessions) == 1


def test_once_the_client_was_heard_a_new_attempt_opens_a_new_session() -> None:
    client, gateway = pair()
    (_t, init1), (t2, init2) = inits_until(client, 2)
    (resp1,) = gateway_answers(gateway, init1, t2)
    client.receive_datagram(resp1, 1, t2)
    now = talk(client, gateway, t2)
    gateway.datagrams_to_send()
    (first,) = gateway.sessions.values()
    assert first.heard
    # the retry still in flight arrives now: the session is in use, it is not answered
    # again; the gateway treats it as any fresh INIT of that client (a new session)
    out = gateway_answers(gateway, init2, now)
    assert [d for d in out if d[0] == MSG_HANDSHAKE_RESP] not in ([], [resp1])
    assert Drop.HANDSHAKE_REPEATED.value not in gateway.drops


def test_answers_are_repeated_for_a_bounded_time() -> None:
    client, gateway = pair()
    (_t, init1), *_, (_t3, init3) = inits_until(client, 3)
    (resp1,) = gateway_answers(gateway, init1, 0.0)
    gateway.handle_timer(ANSWER_TTL_S + 0.5)  # forgets the answers older than the TTL
    out = gateway_answers(gateway, init3, ANSWER_TTL_S + 0.5)
    (resp3,) = [d for d in out if d[0] == MSG_HANDSHAKE_RESP]
    assert resp3 != resp1  # a new session, whose answer the client can read
    client.receive_datagram(resp3, 1, ANSWER_TTL_S + 0.5)
    assert client.state is State.ATTACHED


def test_a_cookie_reply_to_an_older_init_is_read() -> None:
    client, gateway = pair(cookies=True)  # under load: every INIT needs a cookie
    (_t, init1), _second, (t3, _init3) = inits_until(client, 3)
    (reply,) = gateway_answers(gateway, init1, t3)
    assert reply[0] == MSG_COOKIE_REPLY
    client.receive_datagram(reply, 1, t3)  # answers INIT 1; INIT 3 is the latest
    (again,) = [d for _p, d in client.datagrams_to_send()]
    assert again[0] == MSG_HANDSHAKE_INIT  # resent at once with the cookie (mac2)
    assert client.handshake.cookies_accepted == 1
    (resp,) = gateway_answers(gateway, again, t3)
    assert resp[0] == MSG_HANDSHAKE_RESP
    client.receive_datagram(resp, 1, t3)
    assert client.state is State.ATTACHED
