"""A session outlives its gateway process: the real programs in namespaces (issue 9, "Stores").

``jvpn-gateway`` with ``[state] store = "sqlite"`` and ``jvpn-tui --headless`` on a real
tunnel (tests/realnet.py). A checksummed inner TCP download runs from a server behind the
gateway to the client; in the middle of it the gateway is killed (``kill -9``) or stopped
(SIGTERM) and started again at once (well within 2 s). Asserted:
- the download completes intact (byte count and sha256);
- the client never ends its session: one session id throughout, no SESSION_TERMINATED,
  the client is still running; after SIGTERM the gateway said it kept the sessions;
- the restarted gateway resumed it (its console line) and its events carry the same
  session id with state versions that never go below the stored one (no rollback);
- captures on both ends of the link see no (direction, receiver index, key phase, counter)
  twice over the whole run: no nonce is used twice across the restart.
Waits are on conditions; nothing is asserted about timing.
"""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Callable

import pytest
from realnet import (
    GATEWAY_PORT,
    START_TIMEOUT_S,
    Capture,
    RealTunnel,
    expected_sha256,
    realnet,  # noqa: F401  (the fixture)
    wait_until,
)

from tunnel.core.aead import peek_header
from tunnel.core.constants import MSG_CONTROL, MSG_DATA

NBYTES = 6 << 20
RATE = 1_500_000
"""Bytes/s of the download: about four seconds, so the restart lands in the middle."""


def restart_gateway(t: RealTunnel, sig: int) -> list[str]:
    """Signal the gateway, wait for its exit, start it again at once; the old process's
    console lines."""
    assert t.gateway is not None and t.gw_stderr is not None
    old = t.gw_stderr
    t.gateway.send_signal(sig)
    t.gateway.wait(20)
    old.join(5.0)
    t._start_gateway()
    return list(old.lines)


def sealed_keys(packets: list[tuple[str, bytes]]) -> Counter[tuple[str, int, int, int]]:
    """(direction, receiver index, key phase, counter) of every sealed datagram."""
    seen: Counter[tuple[str, int, int, int]] = Counter()
    for direction, payload in packets:
        head = peek_header(payload)
        if isinstance(head, tuple) and head[0] in (MSG_DATA, MSG_CONTROL):
            seen[(direction, head[2], head[1], head[3])] += 1
    return seen


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_gateway_restart_resumes_the_session_and_an_inner_tcp_transfer(
    realnet: Callable[..., RealTunnel],  # noqa: F811
    sig: int,
) -> None:
    t = realnet(n_paths=1, store="sqlite")
    attached = t.events.wait_type("STATE_CHANGE", START_TIMEOUT_S, new_state="ATTACHED")
    sid = attached["session_id"]
    link = t.topo.paths[0]
    # Each direction captured where it arrives (a capture sees what its link receives).
    up = Capture(t.topo.gateway_ns, link.gateway_ifname, GATEWAY_PORT)
    down = Capture(t.topo.client_ns, link.client_ifname)
    try:
        transfer = t.start_download(NBYTES, rate=RATE)
        transfer.wait_progress(1 << 20, 30.0)
        assert t.gw_events is not None
        before = [e for e in t.gw_events.events if e.get("session_id") == sid]
        stored_version = max(e["state_version"] for e in before)

        old_lines = restart_gateway(t, sig)
        assert t.gw_stderr is not None
        gw_stderr = t.gw_stderr
        wait_until(
            lambda: any("resumed 1 session(s)" in line for line in gw_stderr.lines),
            START_TIMEOUT_S, "the restarted gateway's resume line",
        )  # fmt: skip
        if sig == signal.SIGTERM:
            assert any("stopped; sessions kept in the store" in x for x in old_lines), old_lines

        result = transfer.finish(120.0)
    finally:
        captured = [("up", p.payload) for p in up.stop()]
        captured += [("down", p.payload) for p in down.stop() if p.src[1] == GATEWAY_PORT]

    assert result.receiver["error"] is None and result.sender["error"] is None
    assert result.receiver["received"] == NBYTES == result.sender["sent"]
    assert result.receiver["sha256"] == expected_sha256(NBYTES) == result.sender["sha256"]

    assert t.client is not None and t.client.poll() is None  # the client never stopped
    assert t.session_ids() == {sid}
    assert t.events.of_type("SESSION_TERMINATED") == []
    assert t.gw_events is not None
    after = [e for e in t.gw_events.events if e.get("session_id")]
    assert {e["session_id"] for e in after} <= {sid}
    assert all(e["state_version"] >= stored_version for e in after)

    seen = sealed_keys(captured)
    assert {d for d, *_ in seen} == {"up", "down"}
    assert len(seen) > 1000  # the capture saw the transfer
    assert [k for k, n in seen.items() if n > 1] == []
