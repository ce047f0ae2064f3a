"""The data fast path (issue 11, item 1): DATA and CONTROL headers read with one unpack
must mean exactly what ``parse_header`` says, and the gateway's timer queue, which is not
touched for plain DATA from the binding, must still report every deadline exactly."""

from __future__ import annotations

import random
import struct
from typing import cast

from hypothesis import given, settings
from hypothesis import strategies as st
from simkit import CLIENT_INNER, GATEWAY_INNER, build, ipv4_packet, make_policy, of_type

from tunnel.core.client import ClientSession, PathSpec
from tunnel.core.constants import MAX_DATAGRAM, MSG_CONTROL, MSG_DATA, TRANSPORT_HEADER
from tunnel.core.events import EventType
from tunnel.core.gateway import GatewaySessions
from tunnel.core.gateway_outbox import STATE_UPDATE_RESEND_S
from tunnel.core.gateway_session import ClientEntry
from tunnel.core.handshake import generate_keypair
from tunnel.core.policy import POLICY_DEFAULT
from tunnel.core.wire import Header, ReattachKind, parse_header, transport_fields

_FIELDS = struct.Struct("<BBBBIQ")

# Bodies around every size limit: none, one byte short of a tag, a tag, a full packet, the
# largest datagram and one byte more.
_BODY_SIZES = (0, 1, 15, 16, 17, 1400, MAX_DATAGRAM - TRANSPORT_HEADER.size,
               MAX_DATAGRAM - TRANSPORT_HEADER.size + 1)  # fmt: skip

headers = st.builds(
    lambda t, phase, epoch, mark, index, counter, body: (
        _FIELDS.pack(t, phase, epoch, mark, index, counter) + bytes(body)
    ),
    st.integers(0, 7),
    st.integers(0, 255),
    st.sampled_from([0, 0, 1, 7, 255]),
    st.integers(0, 5),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**64 - 1),
    st.sampled_from(_BODY_SIZES),
)


@settings(max_examples=600, deadline=None)
@given(st.one_of(headers, st.binary(max_size=40)))
def test_transport_fields_read_exactly_what_parse_header_accepts_as_transport(
    data: bytes,
) -> None:
    fields = transport_fields(data)
    header = parse_header(data)
    if not isinstance(header, Header) or header.msg_type not in (MSG_DATA, MSG_CONTROL):
        assert fields is None
        return
    assert fields is not None
    msg_type, phase, epoch, mark, index, counter = fields
    assert (msg_type, phase, epoch, mark, index) == (
        header.msg_type, header.phase, header.epoch, header.mark, header.receiver_index,
    )  # fmt: skip
    assert counter == int.from_bytes(data[8:16], "little")


def _assert_deadlines_exact(gw: GatewaySessions, now: float) -> None:
    """The gateway's deadline is the earliest of its sessions' (a full scan) and its drop
    summary's, and no session has a deadline left at or before ``now``."""
    scan = [s.next_deadline() for s in gw.sessions.values()]
    for t in scan:
        assert t is None or t > now, (now, t)
    known = [t for t in (*scan, gw.report.drop_summary_due()) if t is not None]
    assert gw.next_deadline() == (min(known) if known else None)


def test_deadlines_stay_exact_while_data_flows_through_a_switch_and_rekeys() -> None:
    """DATA every 10 ms for 30 s; the active path dies at 5 s (the client moves to the
    standby path with a binding mark: a transition, and a STATE_UPDATE that half the time
    is lost on the way, to retransmit) and the client rekeys every 10 s. After every step
    the gateway's deadline is exact."""
    sim = build(n_paths=2, policy=make_policy(rekey_after_s=10))
    sim.links[2].imp.loss_down = 0.5
    sim.run_until(1.0)
    gw = sim.gateway
    sent = 0
    while sim.now < 30.0:
        if sent == 400:
            sim.links[1].imp.up = False
        sim.client_tun.inject(ipv4_packet(CLIENT_INNER, GATEWAY_INNER, ident=sent))
        sent += 1
        sim.advance(0.01)
        _assert_deadlines_exact(gw, sim.now)
    switches = of_type(sim.gateway_events, EventType.TRANSPORT_SWITCH)
    assert [e.new_transport for e in switches] == [2]
    assert len(of_type(sim.gateway_events, EventType.KEY_ROTATED)) >= 2
    delivered = sim.gateway_tun.from_tunnel
    assert len(delivered) > sent * 0.8 and delivered[-1] == ipv4_packet(
        CLIENT_INNER, GATEWAY_INNER, ident=sent - 1
    )


class TwoClients:
    """A gateway core and two client cores (two paths each) exchanging datagrams
    instantly, in fake time; each client's datagrams come from its own addresses."""

    def __init__(self) -> None:
        gw_private, gw_public = generate_keypair()
        keys = [generate_keypair() for _ in range(2)]
        self.clients = [
            ClientSession(
                static_private=private,
                gateway_public=gw_public,
                paths=[PathSpec(1, "one"), PathSpec(2, "two")],
                policy=POLICY_DEFAULT,
                now=0.0,
                rng=random.Random(i),
            )
            for i, (private, _) in enumerate(keys)
        ]
        entries = [ClientEntry(f"c{i}", pub, f"10.66.0.{i + 2}") for i, (_, pub) in enumerate(keys)]
        self.gw = GatewaySessions(
            static_private=gw_private, clients=entries, policy=POLICY_DEFAULT, now=0.0,
            urandom=random.Random(7).randbytes, rng=random.Random(8),
        )  # fmt: skip
        self.now = 0.0
        for c in self.clients:
            c.connect(self.now)

    @staticmethod
    def addr(client: int, path_id: int) -> tuple[str, int]:
        return (f"192.0.2.{client + 1}", 40000 + path_id)

    def run(self, seconds: float, active: tuple[int, ...] = (0, 1)) -> None:
        """Step 10 ms at a time for ``seconds``; only the ``active`` clients run."""
        end = self.now + seconds
        while self.now < end:
            self.now += 0.01
            for i in active:
                self.clients[i].handle_timer(self.now)
            self.gw.handle_timer(self.now)
            self._exchange(active)

    def _exchange(self, active: tuple[int, ...]) -> None:
        for _ in range(8):
            moved = 0
            for i in active:
                for path_id, data in self.clients[i].datagrams_to_send():
                    self.gw.receive_datagram(data, self.addr(i, path_id), self.now)
                    moved += 1
            for where, data in self.gw.datagrams_to_send():
                host, port = cast(tuple[str, int], where)
                i = int(host.rsplit(".", 1)[1]) - 1
                if i in active:
                    self.clients[i].receive_datagram(data, port - 40000, self.now)
                    moved += 1
            if not moved:
                return


def test_data_that_moves_the_binding_brings_its_earlier_deadline_into_the_queue() -> None:
    """A marked DATA datagram from a validated standby path moves the binding: its
    STATE_UPDATE is due again in STATE_UPDATE_RESEND_S, before the binding's silence
    deadline and before the other session's. The gateway's deadline must say so, with
    nothing else arriving."""
    rig = TwoClients()
    rig.run(3.0)
    rig.run(0.5, active=(0,))  # the other session's silence deadline is now the earlier
    gw, client = rig.gw, rig.clients[0]
    s = next(x for x in gw.sessions.values() if x.client.name == "c0")
    other = next(x for x in gw.sessions.values() if x.client.name == "c1")
    standby = rig.addr(0, 2)
    assert s.binding == rig.addr(0, 1) and standby in s.validated
    _assert_deadlines_exact(gw, rig.now)
    assert gw.next_deadline() == other.next_deadline()
    cipher = client.cipher
    assert cipher is not None
    packet = ipv4_packet("10.66.0.2", GATEWAY_INNER, ident=1)
    mark = (s.epoch + 1, 1 + ReattachKind.RECOVERY)
    dgram = cipher.seal(MSG_DATA, client.peer_index, packet, mark=mark)
    gw.receive_datagram(dgram, standby, rig.now)
    assert s.binding == standby and gw.packets_for_tun() == [packet]
    assert s.updates.resend_at() == rig.now + STATE_UPDATE_RESEND_S
    _assert_deadlines_exact(gw, rig.now)
    assert gw.next_deadline() == rig.now + STATE_UPDATE_RESEND_S
