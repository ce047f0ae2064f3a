"""Seed §8 Resource exhaustion, issue 5's flood acceptance with a real inner TCP transfer.

A gateway under 10 s of garbage, replayed and unknown-session datagrams (and handshake
INITs) at the highest rate one core can send keeps an existing session's inner TCP
transfer alive, with bounded memory (measured) and every drop counted by reason.

Real programs, real TUN on both sides (tests/realnet.py): ``jvpn-gateway`` in the gateway
namespace, ``jvpn-tui --headless`` in the client namespace. A paced inner TCP download
(gateway inner address -> client inner address, deterministic bytes, sha256 checked) runs
for ~16 s; 2 s into it ``bench/flood.py`` floods the gateway's listen address on the
active path (10.200.0.2:51820) from the client namespace for 10 s, mixing garbage,
unknown-session DATA, INITs with a wrong mac1, and replays of the session's own
datagrams captured on the gateway's veth (its HANDSHAKE_INIT included). The gateway and
the client run at a higher priority than the flood and the rest of the machine
(``realnet.prioritize``): a gateway starved by unrelated load reads less of its socket,
and the kernel then drops the session's datagrams with the flood's -- that would measure
the machine's load, not the gateway.

Asserted: the transfer completes intact (sha256, byte count, no reset or error on either
end); the client and the gateway keep the one session id, nothing TERMINATED, no new
session; the gateway's VmRSS stays within RSS_BOUND_KB of its value before the flood
(before / peak / after printed); and every UDP datagram sent in the client namespace
during the window is accounted for: read by the gateway (its ``datagrams_total{in}``),
dropped by the kernel at the gateway's full socket buffer (``/proc/<pid>/net/udp`` drops
column, cross-checked with the namespace's ``Udp RcvbufErrors``) or dropped on the way by
a path's veth pair (``/proc/net/dev``: the client end's tx drops, the gateway end's rx
drops); every flood datagram the gateway read is counted under the drop reason it
deserves (per-reason bounds: what the sender's own parser expects, minus at most what the
kernel dropped indiscriminately); and the gateway kept reading through the whole flood
(its namespace's ``Udp InDatagrams`` grew between every two samples taken during it).
Nothing here is a rate: how much of the flood the gateway reads depends on how much CPU
it gets, which the test does not control.
Needs root, network namespaces and /dev/net/tun; skips with the reason otherwise.
"""

from __future__ import annotations

import itertools
import json
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from realnet import (
    GATEWAY_PORT,
    Capture,
    InnerResult,
    InnerTransfer,
    RealTunnel,
    datagrams_in,
    drop_counts,
    expected_sha256,
    link_drops,
    prioritize,
    realnet,  # noqa: F401  (the fixture)
    socket_drops,
    udp_snmp,
    wait_drained,
)

from tunnel.core.admission import HANDSHAKE_BURST_MAX, HANDSHAKE_RATE_MAX
from tunnel.core.constants import MSG_HANDSHAKE_INIT

pytestmark = pytest.mark.root

FLOOD = Path(__file__).resolve().parents[2] / "bench" / "flood.py"
MiB = 1 << 20

FLOOD_S = 10.0
PACE_BPS = 1 * MiB
"""The inner download is paced at 1 MiB/s (well below what the tunnel carries even under
the flood on this 2-core machine), so it spans the whole flood: ~2 s before, 10 s during,
~4 s after."""
SIZE = 16 * PACE_BPS
FLOOD_AFTER = 2 * MiB
"""The flood starts once this much of the transfer has arrived."""

RSS_BOUND_KB = 32 * 1024
"""Growth of the gateway's VmRSS allowed during and after the flood. The gateway keeps no
state per rejected datagram (bounded replay windows, a token-bucket handshake limiter and
a cookie secret; AT-55 / test_cookie.py prove those bounds in the core); its idle RSS is
~40-60 MB and the allocator's working set under load adds a few MB. One core sends ~2.7e6
datagrams in 10 s here and the gateway reads ~2.2e6 of them, so retaining as little as
~15 bytes per datagram read would exceed this bound (measured growth: ~160 KB)."""

SYNTHETIC = ("truncated", "oversized", "malformed", "unknown_session", "bad_mac", "wrong_state")
REPLAY_REASONS = ("replay_detected", "cookie_required", "rate_limited")
INNER_SIDE = ("ipv6_not_routed",)
"""Drops on the gateway's TUN side in the same window (the kernel's IPv6 router
solicitations and MLD reports on the fresh TUN device): not flood datagrams."""
SETTLE_SLACK = 20
READ_SAMPLE_S = 1.0
"""Spacing of the samples of the gateway's reads during the flood."""
"""Datagrams the client may send between the reads of the client namespace's counters and
the gateway's (only keepalives/probes flow then: the transfer has ended)."""

# -- kernel counters ----------------------------------------------------------------------------


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


class Counters:
    """One reading of every counter the accounting needs."""

    def __init__(self, t: RealTunnel, client_pid: int) -> None:
        gw = t.gateway
        assert gw is not None
        links = t.topo.paths
        # client side first: whatever it sent before this is visible at the gateway below
        self.client_udp = udp_snmp(client_pid)
        self.veth_tx = sum(link_drops(client_pid, p.client_ifname)[1] for p in links)
        self.metrics = t.metrics()
        self.gw_udp = udp_snmp(gw.pid)
        self.veth_rx = sum(link_drops(gw.pid, p.gateway_ifname)[0] for p in links)
        self.tun_tx = link_drops(gw.pid, t.gateway_tun)[1]
        self.sock_drops = socket_drops(gw.pid, GATEWAY_PORT)
        self.drops = drop_counts(self.metrics)
        self.received = datagrams_in(self.metrics)


def _terminal(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        e
        for e in events
        if e.get("event_type") == "SESSION_TERMINATED"
        or (e.get("event_type") == "STATE_CHANGE" and e.get("new_state") == "TERMINATED")
    ]


class Sampler:
    """In a thread: the gateway's VmRSS every 0.2 s and its namespace's ``Udp InDatagrams``
    (what it has read) every READ_SAMPLE_S."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.rss: list[int] = []
        self.reads: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.rss.append(rss_kb(self.pid))
            if not self.reads or time.monotonic() - self.reads[-1][0] >= READ_SAMPLE_S:
                self.reads.append((time.monotonic(), udp_snmp(self.pid)["InDatagrams"]))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def reads_between(self, start: float, end: float) -> list[int]:
        return [n for when, n in self.reads if start < when < end]


def _session_with_replay_set(t: RealTunnel) -> tuple[str, InnerTransfer, Path]:
    """Start the client under a capture (so the replay set holds the session's INIT) and
    the paced download; the session id, the transfer and the file of captured datagrams."""
    link = t.topo.paths[0]  # the active path (transport 1)
    cap = Capture(t.topo.gateway_ns, link.gateway_ifname, GATEWAY_PORT)
    try:
        t.start_client()
        sid = t.events.wait_type("SESSION_CREATED", 10)["session_id"]
        transfer = t.start_download(SIZE, rate=PACE_BPS)
        transfer.wait_progress(FLOOD_AFTER, 30)
    finally:
        captured = cap.stop()
    replay = [p.payload for p in captured if p.src[0] == link.client_ip][:300]
    assert any(d[0] == MSG_HANDSHAKE_INIT for d in replay), "the INIT was not captured"
    assert len(replay) >= 20, len(replay)
    replay_file = t.tmp / "captured.bin"
    replay_file.write_bytes(b"".join(struct.pack("<H", len(d)) + d for d in replay))
    return sid, transfer, replay_file


def _flood(t: RealTunnel, replay_file: Path) -> tuple[dict[str, Any], float, float]:
    """Run bench/flood.py from the client namespace at the active path's gateway address;
    its report and the monotonic start and end."""
    link = t.topo.paths[0]
    t_start = time.monotonic()
    flood = t.topo.exec(
        t.topo.client_ns,
        [sys.executable, str(FLOOD), "--target", f"{link.gateway_ip}:{GATEWAY_PORT}",
         "--duration", str(FLOOD_S), "--replay", str(replay_file)],
        stdout=-1, stderr=-1, text=True,
    )  # fmt: skip
    try:
        out, err = flood.communicate(timeout=FLOOD_S + 30)
    finally:
        if flood.poll() is None:
            flood.kill()
    assert flood.returncode == 0, err
    report: dict[str, Any] = json.loads(out)
    return report, t_start, time.monotonic()


def _assert_survived(
    t: RealTunnel, sid: str, result: InnerResult, c0: Counters, c1: Counters, gw_mark: int
) -> None:
    """The transfer survived, intact, on the same session; nothing terminated or new."""
    assert result.sender["error"] is None, result.sender
    assert result.receiver["error"] is None, result.receiver
    assert result.sender["sent"] == result.receiver["received"] == SIZE
    assert result.receiver["sha256"] == result.sender["sha256"] == expected_sha256(SIZE)
    assert t.session_ids() == {sid}
    assert not _terminal(t.events.events), _terminal(t.events.events)
    assert t.gw_events is not None and t.client is not None and t.gateway is not None
    gw_events = t.gw_events.events
    assert not _terminal(gw_events), _terminal(gw_events)
    assert {e["session_id"] for e in gw_events if e.get("session_id")} == {sid}
    assert t.gw_events.of_type("SESSION_CREATED", gw_mark) == []
    created = "jvpn_gateway_sessions_created_total"
    assert c1.metrics.get(created) == c0.metrics.get(created) == 1
    assert c1.metrics.get('jvpn_gateway_sessions{state="TERMINATED"}', 0) == 0
    assert t.client.poll() is None and t.gateway.poll() is None


def _deltas(c0: Counters, c1: Counters, report: dict[str, Any]) -> dict[str, Any]:
    """What the counters moved by over the flood (see the accounting below)."""
    delta = {k: v - c0.drops.get(k, 0) for k, v in c1.drops.items() if v != c0.drops.get(k, 0)}
    inner = {k: delta.pop(k) for k in INNER_SIDE if k in delta}
    d_cl = {k: c1.client_udp[k] - c0.client_udp[k] for k in ("OutDatagrams", "SndbufErrors")}
    return {
        "client_ns_udp": d_cl,
        "client_tunnel_skbs": d_cl["OutDatagrams"] - report["total"],
        "gateway_ns_udp": {
            k: c1.gw_udp[k] - c0.gw_udp[k] for k in ("InDatagrams", "RcvbufErrors", "InErrors")
        },
        "gateway_socket_kernel_drops": c1.sock_drops - c0.sock_drops,
        "path_veth_drops": {
            "client_tx": c1.veth_tx - c0.veth_tx,
            "gateway_rx": c1.veth_rx - c0.veth_rx,
        },
        "gateway_tun_tx_drops": c1.tun_tx - c0.tun_tx,
        "gateway_datagrams_in": c1.received - c0.received,
        "drops_by_reason": delta,
        "drops_total": sum(delta.values()),
        "inner_side_drops": inner,
    }


def _assert_skbs_accounted(d: dict[str, Any]) -> None:
    # the flood's count is what the kernel sent (no ENOBUFS swallowed by a UDP send)
    assert d["client_ns_udp"]["SndbufErrors"] == 0 and d["client_tunnel_skbs"] >= 0, d
    # the kernel's socket-buffer drops in the gateway namespace are all its listen socket's
    gw_udp = d["gateway_ns_udp"]
    assert d["gateway_socket_kernel_drops"] == gw_udp["RcvbufErrors"], d
    # skbs: sent in the client namespace = read by the gateway + dropped at its full socket
    # buffer + lost between the namespaces (up to a few in flight while the counters are
    # read). A veth pair may count one lost skb at both ends (the sender's tx drop, the
    # receiver's backlog rx drop), so the loss on the way is between the larger and the sum.
    # (The gateway TUN's tx drops are inner packets the gateway read too late, not UDP.)
    arrived = gw_udp["InDatagrams"] + gw_udp["RcvbufErrors"]
    on_the_way = d["client_ns_udp"]["OutDatagrams"] - arrived
    veth = d["path_veth_drops"]
    low, high = max(veth.values()), sum(veth.values())
    assert low - SETTLE_SLACK <= on_the_way <= high + SETTLE_SLACK, d


def _assert_drops_counted(d: dict[str, Any], report: dict[str, Any], flood_s: float) -> None:
    # datagrams: every flood datagram the gateway read is a drop counted by its reason; the
    # kernel's drops are indiscriminate (any category, the client's own datagrams too)
    delta = d["drops_by_reason"]
    lost = d["gateway_socket_kernel_drops"] + sum(d["path_veth_drops"].values())
    assert set(delta) <= {*SYNTHETIC, *REPLAY_REASONS}, d
    total = report["total"]
    assert total - lost <= d["drops_total"] <= min(total, d["gateway_datagrams_in"]), d
    expected = report["expected"]
    for reason in SYNTHETIC:
        assert expected.get(reason, 0) - lost <= delta.get(reason, 0), (reason, d)
        assert delta.get(reason, 0) <= expected.get(reason, 0), (reason, d)
    replay_sent = report["sent"]["replay"] + report["sent"]["replay_init"]
    replays = sum(delta.get(r, 0) for r in REPLAY_REASONS)
    assert replay_sent - lost <= replays <= replay_sent, d
    assert delta.get("cookie_required", 0) > 0, d  # the INIT flood met cookies
    dh_bound = HANDSHAKE_RATE_MAX * (flood_s + 2) + HANDSHAKE_BURST_MAX
    assert delta.get("replay_detected", 0) <= report["sent"]["replay"] + dh_bound, d


def test_08_flood_keeps_the_inner_tcp_transfer_with_bounded_memory_and_counted_drops(
    realnet,  # noqa: F811
) -> None:
    t: RealTunnel = realnet(client=False)
    sid, transfer, replay_file = _session_with_replay_set(t)
    assert t.client is not None and t.gateway is not None and t.gw_events is not None
    client_pid, gw_pid = t.client.pid, t.gateway.pid
    wait_drained(gw_pid, GATEWAY_PORT)  # every captured datagram has been read

    c0 = Counters(t, client_pid)
    assert c0.sock_drops == 0, "the kernel dropped datagrams before the flood"
    gw_mark, mark = t.gw_events.mark(), t.events.mark()
    rss = {"before": rss_kb(gw_pid)}
    sampler = Sampler(gw_pid)
    for pid in (gw_pid, client_pid):  # the programs under test before the machine's load
        prioritize(pid)
    report, t_start, t_end = _flood(t, replay_file)
    result = transfer.finish(60)
    sampler.stop()
    wait_drained(gw_pid, GATEWAY_PORT)  # only keepalives/probes flow now
    rss["peak"] = max([rss["before"], *sampler.rss])
    rss["after"] = rss_kb(gw_pid)
    c1 = Counters(t, client_pid)

    _assert_survived(t, sid, result, c0, c1, gw_mark)

    # -- every datagram accounted for ----------------------------------------------------------
    # Two units. The kernel counts socket buffers (skbs): the client sends runs of datagrams
    # as one UDP GSO skb (one OutDatagrams), the gateway reads it as one GRO read (one
    # InDatagrams) and splits it; each flood datagram is an skb of its own. The gateway's
    # ``datagrams_total{in}`` counts datagrams after the split.
    during = sampler.reads_between(t_start, t_end)
    numbers = {
        "flood": report, "flood_wall_s": round(t_end - t_start, 2),
        "rss_kb": rss, "rss_growth_kb": {"peak": rss["peak"] - rss["before"],
                                         "after": rss["after"] - rss["before"]},
        **_deltas(c0, c1, report), "gateway_ns_reads_during_flood": during,
        "transfer": {"bytes": SIZE, "flood_started_at_bytes": FLOOD_AFTER,
                     **{k: result.receiver[k] for k in ("duration_s", "max_gap_ms")}},
        "client_states": [
            (e["new_state"], e["reason_code"]) for e in t.events.of_type("STATE_CHANGE", mark)
        ],
    }  # fmt: skip
    print("\nflood vs inner TCP:", json.dumps(numbers, indent=1))
    _assert_skbs_accounted(numbers)
    _assert_drops_counted(numbers, report, t_end - t_start)
    # degrade before collapse: the gateway read (and rejected) throughout the flood, never
    # stalled; how much it read depends on its share of the CPU, so no rate is asserted
    assert len(during) >= 3, numbers
    assert all(b > a for a, b in itertools.pairwise(during)), numbers
    assert numbers["drops_total"] > 0, numbers

    # -- bounded memory -------------------------------------------------------------------------
    assert rss["peak"] - rss["before"] < RSS_BOUND_KB, numbers
    assert rss["after"] - rss["before"] < RSS_BOUND_KB, numbers
