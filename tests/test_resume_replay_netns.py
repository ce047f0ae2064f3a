"""After ``kill -9`` and a restart, nothing the old gateway process accepted is accepted
again (issue 9, DESIGN D15a; docs/gateway.md "[state]"): the real programs in namespaces.

``jvpn-gateway`` with ``[state] store = "sqlite"`` and ``jvpn-tui --headless`` on a real
tunnel (tests/realnet.py), a checksummed inner TCP download from a server behind the
gateway in progress. The client sends numbered inner UDP datagrams to a sink behind the
gateway while every datagram reaching the gateway is captured; the gateway is then killed
(``kill -9``), started again at once, and the captures are replayed into it. Asserted:
- the sink (the server side, behind the gateway's TUN) received each numbered datagram
  exactly once: none of the replayed captures was delivered to the inner side;
- the restarted gateway counted every replayed datagram as a drop of the retired key phase
  (or, once that phase is forgotten, of an unknown one) and reported a SECURITY_EVENT;
- the download completes intact, on the same session, which never ended.
Waits are on conditions; nothing is asserted about timing.
"""

from __future__ import annotations

import signal
import socket
from collections import Counter
from collections.abc import Callable

import pytest
from realnet import (
    CLIENT_INNER,
    GATEWAY_INNER,
    GATEWAY_PORT,
    START_TIMEOUT_S,
    Capture,
    RealTunnel,
    drop_counts,
    expected_sha256,
    ns_socket,
    realnet,  # noqa: F401  (the fixture)
    wait_until,
)
from test_resume_netns import restart_gateway

from tunnel.core.constants import MSG_CONTROL, MSG_DATA

pytestmark = pytest.mark.root

NBYTES = 6 << 20
RATE = 1_000_000
"""Bytes/s of the download: about six seconds, so the restart lands in the middle."""
SINK_PORT = 7171
NUMBERED = 50
"""Inner UDP datagrams the client sends to the sink while the capture runs."""


def drain(sink: socket.socket, got: Counter[bytes]) -> Counter[bytes]:
    """Everything the sink has received so far, added to ``got``."""
    while True:
        try:
            data = sink.recv(2048)
        except BlockingIOError:
            return got
        got[data] += 1


def retired(t: RealTunnel) -> int:
    drops = drop_counts(t.metrics())
    return drops.get("retired_key_phase", 0) + drops.get("unknown_key_phase", 0)


def test_captures_replayed_after_kill_9_are_not_delivered_again(
    realnet: Callable[..., RealTunnel],  # noqa: F811
) -> None:
    t = realnet(n_paths=1, store="sqlite")
    attached = t.events.wait_type("STATE_CHANGE", START_TIMEOUT_S, new_state="ATTACHED")
    sid = attached["session_id"]
    link = t.topo.paths[0]
    got: Counter[bytes] = Counter()
    with ns_socket(t.topo.gateway_ns) as sink, ns_socket(t.topo.client_ns) as sender:
        sink.bind(("0.0.0.0", SINK_PORT))
        sink.setblocking(False)
        sender.bind((CLIENT_INNER, 0))
        transfer = t.start_download(NBYTES, rate=RATE)
        transfer.wait_progress(1 << 20, 30.0)

        numbered = [b"numbered %d" % n for n in range(NUMBERED)]
        with Capture(t.topo.gateway_ns, link.gateway_ifname, GATEWAY_PORT) as cap:
            for payload in numbered:
                sender.sendto(payload, (GATEWAY_INNER, SINK_PORT))
            wait_until(
                lambda: set(drain(sink, got)) >= set(numbered), 10.0, "the sink got them all"
            )  # fmt: skip
        captured = [p.payload for p in cap.packets if p.payload[0] in (MSG_DATA, MSG_CONTROL)]
        assert len(captured) >= NUMBERED  # the numbered ones and the transfer's

        restart_gateway(t, signal.SIGKILL)
        assert t.gw_stderr is not None
        gw_stderr = t.gw_stderr
        wait_until(
            lambda: any("resumed 1 session(s)" in line for line in gw_stderr.lines),
            START_TIMEOUT_S, "the restarted gateway's resume line",
        )  # fmt: skip
        assert t.gw_events is not None  # the restarted process's events, from its start
        before = retired(t)
        with ns_socket(t.topo.client_ns) as attacker:
            attacker.bind((link.client_ip, 0))
            for payload in captured:
                attacker.sendto(payload, (link.gateway_ip, GATEWAY_PORT))
        wait_until(
            lambda: retired(t) >= before + len(captured), 15.0, "every replay counted"
        )  # fmt: skip
        # Rate-limited: the first one may stand for the client's own datagrams sent
        # before it followed the new phase (the gateway cannot tell them from a replay).
        event = t.gw_events.wait_type("SECURITY_EVENT", 10.0, violation_type="RETIRED_KEY_PHASE")
        assert event["session_id"] == sid and event["reason_code"] == "replay_detected"

        result = transfer.finish(120.0)
        drain(sink, got)
    # The server side saw each numbered datagram once: no replay reached the inner side.
    assert {p: got[p] for p in numbered} == dict.fromkeys(numbered, 1)
    assert set(got) == set(numbered)

    assert result.receiver["error"] is None and result.sender["error"] is None
    assert result.receiver["received"] == NBYTES == result.sender["sent"]
    assert result.receiver["sha256"] == expected_sha256(NBYTES) == result.sender["sha256"]
    assert t.client is not None and t.client.poll() is None  # the client never stopped
    assert t.session_ids() == {sid}
    assert t.events.of_type("SESSION_TERMINATED") == []
    print(
        f"\nreplay after kill -9: {len(captured)} captured datagrams replayed, "
        f"{NUMBERED} numbered inner datagrams delivered once each; transfer intact"
    )
