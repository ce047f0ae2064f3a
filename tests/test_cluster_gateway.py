"""A gateway cluster on etcd with real gateway programs (issue 9 item 2, docs/cluster.md).

Each node is a ``jvpn-gateway`` process (``python -m tunnel.gateway.main``) with
``[cluster]`` in its gateway.toml: the same identity key and state key, its own listen
port and node id, a JSONL event sink; etcd is three real members on loopback
(tests/etcd_cluster.py). The client is a real ``ClientSession`` driven in the test thread
(tests/test_resume.py's ``WireClient``: it records every (direction, key phase, counter)
on the wire); "moving" the client to another node is sending to that node's port from the
same socket, as a client whose path to one node died reaches another.

What is asserted, from the nodes' events (SESSION_OWNER_*) and what crosses the wire:
a move (live owner hands over; dead owner's lease expires) keeps the session id, bumps the
owner epoch and the state version, never lets two nodes forward at once, and never
repeats a (direction, key phase, counter); AT-48 (two nodes at once: one wins), AT-49 (no
quorum: denied, the owner fences; quorum back: it goes on), AT-50 (owner killed during
RECOVERING), AT-51 (an owner frozen past its lease sends nothing when it wakes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from etcd_cluster import EtcdCluster, etcd_cluster, etcd_cluster_fn, free_tcp_ports
from test_gateway_runtime import GATEWAY_INNER, echo_replies, icmp_echo
from test_resume import CLIENT_INNER, WireClient

from tunnel.core.constants import MSG_STANDBY_ACK
from tunnel.core.drops import Drop
from tunnel.core.handshake import generate_keypair
from tunnel.core.policy import POLICY_DEFAULT, Policy
from tunnel.core.session import State
from tunnel.core.standby import open_standby_ack, seal_standby_ack
from tunnel.core.wire import STANDBY_ACK_LEN, PathChallenge, ProbeAck, parse_header
from tunnel.gateway.config import ClusterConfig, ConfigError, GatewayConfig, load_gateway_config
from tunnel.keys import write_private_key, write_public_key
from tunnel.ownership.etcd import EtcdSessionStore

__all__ = ["etcd_cluster", "etcd_cluster_fn"]  # fixtures

REPO = Path(__file__).resolve().parents[1]
TTL = 2


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.02)
    assert predicate(), f"timed out waiting for {what}"


class Node:
    """One gateway program of the cluster."""

    def __init__(self, cluster: Cluster, name: str) -> None:
        self.name = name
        self.dir = cluster.tmp / name
        self.dir.mkdir()
        self.port = free_udp_port()
        self.metrics_port = free_tcp_ports(1)[0]
        self.events_path = self.dir / "events.jsonl"
        endpoints = ", ".join(f'"{e}"' for e in cluster.endpoints)
        (self.dir / "gateway.toml").write_text(
            f'node_id = "{name}"\nlisten = ["127.0.0.1:{self.port}"]\n'
            f'metrics = "127.0.0.1:{self.metrics_port}"\n'
            f'private_key = "{cluster.tmp / "gateway.key"}"\ninner_echo = true\n'
            '[control]\nsocket = "off"\n'
            f'[[clients]]\nname = "alice"\npublic_key = "{cluster.tmp / "alice.pub"}"\n'
            f'address = "{CLIENT_INNER}"\n'
            f'[[sinks]]\ntype = "jsonl"\npath = "{self.events_path}"\n'
            f"[cluster]\nendpoints = [{endpoints}]\n"
            f'state_key_file = "{cluster.tmp / "state.key"}"\n'
            f'prefix = "{cluster.prefix}"\nlease_ttl = {TTL}\n'
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def start(self) -> None:
        log = open(self.dir / "stderr.log", "ab")
        env = dict(os.environ, PYTHONPATH=str(REPO))
        config = str(self.dir / "gateway.toml")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tunnel.gateway.main", "--config", config],
            stdout=log, stderr=log, env=env,
        )  # fmt: skip
        log.close()
        wait_until(lambda: "listening on" in self.stderr() or self.proc.poll() is not None,
                   20.0, f"{self.name} to start")  # fmt: skip
        assert self.proc.poll() is None, self.stderr()

    def stderr(self) -> str:
        return (self.dir / "stderr.log").read_text(errors="replace")

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        if not self.events_path.exists():
            return []
        out = []
        for line in self.events_path.read_text().splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue  # a line being written
            if kind is None or e.get("event_type") == kind:
                out.append(e)
        return out

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(20)


class Cluster:
    """Gateway nodes sharing one identity, state key and etcd prefix."""

    def __init__(self, tmp: Path, etcd: EtcdCluster) -> None:
        self.tmp = tmp
        self.etcd = etcd
        self.endpoints = etcd.endpoints
        self.prefix = f"/jvpn/t{uuid.uuid4().hex[:10]}/"
        gw_priv, self.gw_pub = generate_keypair()
        self.cl_priv, cl_pub = generate_keypair()
        write_private_key(tmp / "gateway.key", gw_priv)
        write_public_key(tmp / "alice.pub", cl_pub)
        self.nodes: dict[str, Node] = {}
        self.clients: list[WireClient] = []

    def node(self, name: str) -> Node:
        self.nodes[name] = Node(self, name)
        return self.nodes[name]

    def client(self, node: Node, policy: Policy = POLICY_DEFAULT) -> WireClient:
        c = WireClient(node.address, self.gw_pub, self.cl_priv, policy=policy)
        self.clients.append(c)
        return c

    def entry(self, sid: str) -> Any:
        store = EtcdSessionStore(self.endpoints, self.prefix, timeout=5.0)
        try:
            return store.entry(sid)
        finally:
            store.close()

    def owner_key(self, sid: str) -> bytes:
        """The value of the session's ownership key in etcd (b"" when there is none)."""
        store = EtcdSessionStore(self.endpoints, self.prefix, timeout=5.0)
        try:
            kv = store.worker.call(lambda c: c.get(store.owner_key(sid)))
            return b"" if kv is None else bytes(kv.value)
        finally:
            store.close()

    def close(self) -> None:
        for c in self.clients:
            c.close()
        for n in self.nodes.values():
            n.kill()


@pytest.fixture
def cluster(tmp_path: Path, etcd_cluster: EtcdCluster) -> Iterator[Cluster]:
    c = Cluster(tmp_path, etcd_cluster)
    try:
        yield c
    finally:
        c.close()
        etcd_cluster.heal()


def echo(c: WireClient, first: int, count: int, timeout: float = 10.0) -> bool:
    before = len(echo_replies(c))
    for seq in range(first, first + count):
        c.send_inner(icmp_echo(CLIENT_INNER, GATEWAY_INNER, seq))
    return c.run_until(lambda: len(echo_replies(c)) >= before + count, timeout=timeout)


def keep_echoing(c: WireClient, until: Callable[[], bool], timeout: float) -> bool:
    """One echo request every 50 ms until ``until()`` (a client whose traffic goes on)."""
    end = time.monotonic() + timeout
    seq = 1000
    while time.monotonic() < end:
        if until():
            return True
        c.send_inner(icmp_echo(CLIENT_INNER, GATEWAY_INNER, seq))
        seq += 1
        c.run_until(lambda: False, timeout=0.05)
    return until()


PATIENT_MS = 45_000
"""AT-49's client recovery window (ms)."""


def moved(c: WireClient, timeout: float = 15.0) -> bool:
    """The client's traffic goes on until echoes come back again (what arrived at the new
    node while it looked the session up was held, the newest datagram only)."""
    before = len(echo_replies(c))
    return keep_echoing(c, lambda: len(echo_replies(c)) >= before + 3, timeout)


def owner_events(n: Node, kind: str, sid: str) -> list[dict[str, Any]]:
    return [e for e in n.events(f"SESSION_OWNER_{kind}") if e["session_id"] == sid]


def attached(
    cluster: Cluster, node: Node, policy: Policy = POLICY_DEFAULT
) -> tuple[WireClient, str]:
    c = cluster.client(node, policy)
    assert c.run_until(lambda: c.state is State.ATTACHED, timeout=10.0)
    assert echo(c, 0, 5)
    sid = c.session.machine.session_id
    wait_until(lambda: bool(owner_events(node, "ACQUIRED", sid)), 10.0, "ACQUIRED")
    return c, sid


def no_forwarding_overlap(old: Node, new: Node, sid: str) -> None:
    """The old owner's last forward precedes the new owner's acquisition (one clock)."""
    released = owner_events(old, "RELEASED", sid)
    acquired = [e for e in owner_events(new, "ACQUIRED", sid) if e["owner_epoch"] > 1]
    assert released and acquired
    last = released[-1]["last_forward_mono"]
    assert last is not None and last < acquired[0]["mono"]


# -- tests -----------------------------------------------------------------------------------


def test_a_session_moves_to_the_node_the_client_reaches_and_the_live_owner_hands_it_over(
    cluster: Cluster,
) -> None:
    a, b = cluster.node("gw-a"), cluster.node("gw-b")
    c, sid = attached(cluster, a)
    acq = owner_events(a, "ACQUIRED", sid)[0]
    assert acq["owner_epoch"] == 1 and acq["node_id"] == "gw-a"
    entry = cluster.entry(sid)
    assert entry.owner_epoch == 1 and entry.record.owner_node == "gw-a"
    version_a = entry.record.state_version

    c.gateway = b.address  # the client now reaches gw-b
    assert moved(c)
    assert echo(c, 100, 5)
    assert c.session.machine.session_id == sid and c.state is State.ATTACHED
    wait_until(lambda: bool(owner_events(a, "RELEASED", sid)), 10.0, "gw-a's release")
    moved_b = owner_events(b, "TRANSFERRED", sid)
    moved_a = owner_events(a, "TRANSFERRED", sid)
    assert moved_b and moved_b[0]["owner_epoch"] == 2 and moved_b[0]["peer_node"] == "gw-a"
    assert moved_a and moved_a[0]["peer_node"] == "gw-b" and moved_a[0]["forwarded"] >= 5
    entry = cluster.entry(sid)
    assert (entry.owner_epoch, entry.record.owner_node) == (2, "gw-b")
    assert entry.record.state_version > version_a  # the move is a new version, never back
    no_forwarding_overlap(a, b, sid)

    # gw-a no longer forwards: what the client sends it now is not answered by gw-a, it
    # takes the session back instead (epoch 3), through the same hand-over
    c.gateway = a.address
    assert moved(c)
    assert echo(c, 200, 5)
    assert cluster.entry(sid).owner_epoch == 3
    no_forwarding_overlap(b, a, sid)
    assert c.repeats() == []  # no (direction, key phase, counter) twice across the moves
    assert [e for e in c.events if e.event_type == "SESSION_TERMINATED"] == []


class SourceClient(WireClient):
    """A WireClient that also records the source port of every datagram it receives."""

    sources: list[tuple[float, int]]
    received: list[tuple[int, bytes]]

    def step(self, max_wait: float = 0.02) -> None:
        if not hasattr(self, "sources"):
            self.sources, self.received = [], []
        for sock in self.socks.values():
            if not hasattr(sock, "_recording"):
                orig = sock.recv_batch

                def recv(max_n: int = 64, orig: Any = orig) -> Any:
                    out = orig(max_n)
                    self.sources.extend((time.monotonic(), addr[1]) for _, addr in out)
                    self.received.extend((addr[1], bytes(data)) for data, addr in out)
                    return out

                sock.recv_batch = recv  # type: ignore[method-assign]
                sock._recording = True  # type: ignore[attr-defined]
        super().step(max_wait)


def test_at48_two_nodes_take_the_session_at_once_exactly_one_wins(cluster: Cluster) -> None:
    """The client's next datagram reaches gw-b and gw-c at the same moment (the owner gw-a
    is alive and asked by both): one transfer commits (owner epoch 2), the other is the
    conflict event of the loser, which changes nothing."""
    a, b, cn = cluster.node("gw-a"), cluster.node("gw-b"), cluster.node("gw-c")
    c, sid = attached(cluster, a)
    version = cluster.entry(sid).record.state_version

    c.session.receive_tun_packet(icmp_echo(CLIENT_INNER, GATEWAY_INNER, 500), time.monotonic())
    out = c.session.datagrams_to_send()
    assert len(out) == 1
    pid, data = out[0]
    c._note("up", data)
    for node in (b, cn):  # the same datagram to both, back to back
        c.socks[pid].send(data, node.address)

    def settled() -> bool:
        return any(owner_events(n, "ACQUIRED", sid) for n in (b, cn)) and any(
            owner_events(n, "CONFLICT", sid) or owner_events(n, "REJECTED", sid) for n in (b, cn)
        )

    wait_until(settled, 15.0, "one winner and one loser")
    winners = [n for n in (b, cn) if owner_events(n, "ACQUIRED", sid)]
    assert len(winners) == 1
    loser = cn if winners[0] is b else b
    assert owner_events(loser, "CONFLICT", sid), "the loser says it lost the race"
    entry = cluster.entry(sid)
    assert (entry.owner_epoch, entry.record.owner_node) == (2, winners[0].name)
    assert entry.record.state_version == version + 1  # one move, not two
    c.gateway = winners[0].address
    assert moved(c)
    assert c.repeats() == []


def test_at50_owner_killed_while_the_client_recovers_the_other_node_takes_over(
    cluster: Cluster,
) -> None:
    a, b = cluster.node("gw-a"), cluster.node("gw-b")
    c, sid = attached(cluster, a)
    c.gateway = ("127.0.0.1", free_udp_port())  # nothing there: the path goes silent
    assert c.run_until(lambda: c.state is State.RECOVERING, timeout=30.0)
    before = cluster.entry(sid).record.state_version
    a.kill()  # kill -9: its lease expires after the TTL
    c.gateway = b.address  # the client's reattach reaches gw-b
    assert c.run_until(lambda: c.state is State.ATTACHED, timeout=20.0)
    assert echo(c, 600, 5)
    assert c.session.machine.session_id == sid
    entry = cluster.entry(sid)
    assert (entry.owner_epoch, entry.record.owner_node) == (2, "gw-b")
    assert entry.record.state_version > before  # version + 1 at the move, never back
    acquired = owner_events(b, "ACQUIRED", sid)
    assert acquired and acquired[0]["peer_node"] == "gw-a"
    assert owner_events(a, "RELEASED", sid) == []  # the dead owner handed nothing over
    assert c.repeats() == []


def test_at49_without_quorum_the_owner_fences_a_move_is_denied_then_it_goes_on(
    cluster: Cluster,
) -> None:
    a, b = cluster.node("gw-a"), cluster.node("gw-b")
    # the client waits for its gateway longer than the default 8 s: the window must cover
    # the outage below plus the time two etcd members take to restart and elect a leader
    # on a loaded machine (the mechanism, not the default window, is under test)
    patient = dataclasses.replace(
        POLICY_DEFAULT, recovery_window_ms=PATIENT_MS, transport_lost_ttl_ms=PATIENT_MS
    )
    c, sid = attached(cluster, a, patient)
    replies: list[float] = []

    def note_replies() -> bool:
        while len(replies) < len(echo_replies(c)):
            replies.append(time.monotonic())
        return any(e["reason_code"] == "owner_fenced" for e in a.events("DIAGNOSTIC"))

    cluster.etcd.stop_majority()
    stopped = time.monotonic()
    try:
        # the owner forwards only until its lease deadline (TTL - margin after its last
        # acknowledged keep-alive), then fences: the echoes stop, a DIAGNOSTIC says why
        assert keep_echoing(c, note_replies, 10.0)
        before = len(echo_replies(c))
        keep_echoing(c, note_replies, 1.0)
        assert len(echo_replies(c)) == before  # fenced: nothing forwarded
        assert replies and replies[-1] - stopped < TTL + 0.5
        # a move to another node is denied: fail closed
        c.gateway = b.address
        assert not moved(c, timeout=2.0)
        denied = b.events("SESSION_OWNER_REJECTED")
        assert denied and {e["reason_code"] for e in denied} == {"store_unavailable"}
        assert not owner_events(b, "ACQUIRED", sid)
    finally:
        cluster.etcd.heal()
    assert moved(c, timeout=30.0)  # quorum back: the session goes on, within its window
    assert c.session.machine.session_id == sid and c.state is State.ATTACHED
    assert [e for e in c.events if e.event_type == "SESSION_TERMINATED"] == []
    assert c.repeats() == []


def test_at51_an_owner_frozen_past_its_lease_sends_nothing_when_it_wakes(
    cluster: Cluster,
) -> None:
    a, b = cluster.node("gw-a"), cluster.node("gw-b")
    c = SourceClient(a.address, cluster.gw_pub, cluster.cl_priv)
    cluster.clients.append(c)
    assert c.run_until(lambda: c.state is State.ATTACHED, timeout=10.0)
    assert echo(c, 0, 5)
    sid = c.session.machine.session_id
    a.signal(signal.SIGSTOP)
    for seq in range(700, 705):  # queued in gw-a's socket while it is frozen
        c.send_inner(icmp_echo(CLIENT_INNER, GATEWAY_INNER, seq))
    c.gateway = b.address
    assert moved(c, timeout=20.0)  # gw-a's lease expired: gw-b took the session
    assert cluster.entry(sid).record.owner_node == "gw-b"
    woke = time.monotonic()
    a.signal(signal.SIGCONT)
    wait_until(lambda: bool(owner_events(a, "RELEASED", sid)), 10.0, "gw-a's end of ownership")
    keep_echoing(c, lambda: False, 1.0)
    assert [t for t, port in c.sources if port == a.port and t >= woke] == []
    released = owner_events(a, "RELEASED", sid)[-1]
    assert released["reason_code"] == "owner_fenced"
    acquired = [e for e in owner_events(b, "ACQUIRED", sid) if e["owner_epoch"] == 2]
    assert released["last_forward_mono"] < acquired[0]["mono"]


def test_a_node_that_fenced_itself_serves_the_session_again_when_it_comes_back(
    cluster: Cluster,
) -> None:
    """docs/cluster.md "The fault checker", layer 2's liveness finding: gw-a is frozen past
    its lease; when it wakes, its session's silence timer fires and the write of that
    transition is refused (gw-b owns the session now): gw-a ends its ownership at the
    fence. When the client comes back to gw-a, the move (owner epoch 3) must bring the
    session back to life there for good: its transitions are written under the ownership
    it holds now, not skipped or refused because of the one it lost, and it is neither
    released again nor re-acquired in a loop."""
    a, b = cluster.node("gw-a"), cluster.node("gw-b")
    c, sid = attached(cluster, a)
    a.signal(signal.SIGSTOP)
    # gw-b is reached only once gw-a's lease expired (no hand-over request for gw-a to
    # see when it wakes): when gw-a wakes, its session's silence timer fires first
    wait_until(lambda: not cluster.owner_key(sid), 20.0, "gw-a's lease to expire")
    c.gateway = b.address
    assert moved(c, timeout=20.0)  # gw-b took the session (epoch 2)
    a.signal(signal.SIGCONT)
    wait_until(lambda: bool(owner_events(a, "RELEASED", sid)), 10.0, "gw-a's end of ownership")
    assert owner_events(a, "RELEASED", sid)[-1]["reason_code"] == "owner_fenced"
    refused = [e for e in a.events("SECURITY_EVENT") if e["session_id"] == sid]
    assert [e["reason_code"] for e in refused] == ["ownership_conflict"]  # the write at wake

    c.gateway = a.address  # back to gw-a: it takes the session over (epoch 3)
    assert moved(c, timeout=20.0)
    # then the client's path goes silent for longer than gw-a waits (its binding dies:
    # RECOVERING) and comes back (ATTACHED): transitions gw-a writes under epoch 3
    acquired = owner_events(a, "ACQUIRED", sid)[-1]["state_version"]
    c.gateway = ("127.0.0.1", free_udp_port())

    def recovering_on_a() -> bool:
        changes = [e for e in a.events("STATE_CHANGE") if e["session_id"] == sid]
        return any(
            e["new_state"] == "RECOVERING" and e["state_version"] > acquired for e in changes
        )

    assert c.run_until(recovering_on_a, timeout=30.0)
    c.gateway = a.address
    assert c.run_until(lambda: c.state is State.ATTACHED, timeout=20.0)
    assert echo(c, 900, 5)
    keep_echoing(c, lambda: False, 1.0)
    assert echo(c, 950, 5)
    entry = cluster.entry(sid)
    assert (entry.owner_epoch, entry.record.owner_node) == (3, "gw-a")
    changes = [e for e in a.events("STATE_CHANGE") if e["session_id"] == sid]
    last = changes[-1]  # gw-a's latest transition is the one in the store
    stored = (entry.record.state_version, entry.record.state)
    assert stored == (last["state_version"], last["new_state"])
    assert last["new_state"] == "ATTACHED"
    assert [e["owner_epoch"] for e in owner_events(a, "ACQUIRED", sid)] == [1, 3]
    assert [e["reason_code"] for e in owner_events(a, "RELEASED", sid)] == ["owner_fenced"]
    assert [e for e in c.events if e.event_type == "SESSION_TERMINATED"] == []
    assert c.repeats() == []


def test_a_probe_reaching_a_node_that_does_not_own_the_session_moves_nothing(
    cluster: Cluster,
) -> None:
    """A standby path's probe (PATH_CHALLENGE) to a non-owner: the node looks the session
    up, opens the probe with a throwaway cipher, sees it is no reattach, and moves nothing
    (the owner keeps serving; the probe is not answered: docs/cluster.md "Standby paths")."""
    a, b = cluster.node("gw-a"), cluster.node("gw-b")
    c, sid = attached(cluster, a)
    for i in range(1, 4):  # one at a time (a second one while the first is looked up
        c.session.send_control(1, PathChallenge(bytes([i]) * 8))  # would replace it)
        out = c.session.datagrams_to_send()
        assert len(out) == 1
        c._note("up", out[0][1])
        c.socks[out[0][0]].send(out[0][1], b.address)
        assert wait_metric(b, f'jvpn_cluster_takeovers_total{{outcome="standby"}} {i}')
    entry = cluster.entry(sid)
    assert (entry.owner_epoch, entry.record.owner_node) == (1, "gw-a")
    assert owner_events(b, "ACQUIRED", sid) == [] and owner_events(a, "RELEASED", sid) == []
    assert echo(c, 800, 5)  # gw-a still serves it
    assert c.repeats() == []


def wait_metric(n: Node, line: str, timeout: float = 10.0) -> bool:
    import urllib.request

    def seen() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{n.metrics_port}/metrics", timeout=2) as r:
            return line in r.read().decode()

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if seen():
            return True
        time.sleep(0.05)
    return seen()


def test_a_clean_stop_keeps_the_session_and_another_node_takes_it_at_once(
    cluster: Cluster,
) -> None:
    """SIGTERM on the owner: no TERMINATE to the client, the session stays in etcd, the
    lease is revoked (its ownership key with it): the next node the client reaches takes
    the session over without waiting for a lease to expire."""
    a, b = cluster.node("gw-a"), cluster.node("gw-b")
    c, sid = attached(cluster, a)
    assert a.stop() == 0
    assert "sessions kept in the store" in a.stderr()
    released = owner_events(a, "RELEASED", sid)
    assert released and released[-1]["reason_code"] == "gateway_shutdown"
    entry = cluster.entry(sid)
    assert entry is not None and entry.record.owner_node == "gw-a"
    c.gateway = b.address
    assert moved(c, timeout=15.0)
    acquired = owner_events(b, "ACQUIRED", sid)
    assert acquired and acquired[0]["owner_epoch"] == 2
    assert [e for e in c.events if e.event_type == "SESSION_TERMINATED"] == []
    assert c.repeats() == []


CONFIG_HEAD = """\
node_id = "gw-x"
listen = ["127.0.0.1:0"]
private_key = "gateway.key"
inner_echo = true
[[clients]]
name = "alice"
public_key = "alice.pub"
"""


@pytest.fixture
def confdir(tmp_path: Path) -> Path:
    write_private_key(tmp_path / "gateway.key", generate_keypair()[0])
    write_public_key(tmp_path / "alice.pub", generate_keypair()[1])
    return tmp_path


def load(confdir: Path, text: str) -> GatewayConfig:
    path = confdir / "gateway.toml"
    path.write_text(CONFIG_HEAD + text)
    return load_gateway_config(path)


def test_cluster_section_makes_the_store_etcd(confdir: Path) -> None:
    cfg = load(
        confdir,
        '[cluster]\nendpoints = ["10.0.0.1:2379", "[fd00::1]:2379"]\n'
        'state_key_file = "cluster.key"\nlease_ttl = 5\nprefix = "/jvpn/prod/"\n',
    )
    assert cfg.cluster == ClusterConfig(
        ("10.0.0.1:2379", "[fd00::1]:2379"), "gw-x", confdir / "cluster.key", 5, "/jvpn/prod/"
    )
    assert cfg.state.store == "etcd" and cfg.state.state_key_file == confdir / "cluster.key"
    assert cfg.node_id == "gw-x"
    cfg = load(confdir, '[cluster]\nendpoints = ["e:2379"]\nstate_key_file = "k"\n')
    assert cfg.cluster is not None and (cfg.cluster.lease_ttl, cfg.cluster.prefix) == (
        2, "/jvpn/default/",
    )  # fmt: skip
    assert load(confdir, "").cluster is None


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('state_key_file = "k"', "cluster.endpoints: missing (required)"),
        ('endpoints = "e:1"\nstate_key_file = "k"', 'must be a list of 1-9 "host:port" strings'),
        ('endpoints = []\nstate_key_file = "k"', 'must be a list of 1-9 "host:port" strings'),
        ('endpoints = ["e"]\nstate_key_file = "k"', "cluster.endpoints = 'e': each endpoint"),
        ('endpoints = ["e:0"]\nstate_key_file = "k"', "each endpoint must be"),
        ('endpoints = ["e:1"]', "cluster.state_key_file: missing (required)"),
        ('endpoints = ["e:1"]\nstate_key_file = "k"\nlease_ttl = 1', "must be in [2, 60]"),
        ('endpoints = ["e:1"]\nstate_key_file = "k"\nprefix = "jvpn"', "/jvpn/<cluster>/"),
        ('endpoints = ["e:1"]\nstate_key_file = "k"\nnode_id = "gw y"', "1-64 characters"),
        ('endpoints = ["e:1"]\nstate_key_file = "k"\nnode_id = "gw-y"', "contradicts"),
        ('endpoints = ["e:1"]\nstate_key_file = "gateway.key"', "the gateway's private key"),
        ('endpoints = ["e:1"]\nstate_key_file = "k"\nttl = 3', "unknown key"),
        (
            'endpoints = ["e:1"]\nstate_key_file = "k"\n[state]\nstore = "sqlite"',
            "contradicts [cluster]",
        ),
    ],
)
def test_bad_cluster_values_are_named(confdir: Path, table: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(confdir, f"[cluster]\n{table}\n")
    assert message in str(info.value) and "gateway.toml" in str(info.value)


def test_the_etcd_store_needs_a_cluster_and_a_cluster_its_node_id(confdir: Path) -> None:
    with pytest.raises(ConfigError, match=r"the etcd store needs a \[cluster\] section"):
        load(confdir, '[state]\nstore = "etcd"\n')
    cfg = load(
        confdir, '[state]\nstore = "etcd"\n[cluster]\nendpoints = ["e:1"]\nstate_key_file = "k"\n'
    )
    assert cfg.state.store == "etcd"
    path = confdir / "gateway.toml"  # no top-level node_id: [cluster] names the node
    path.write_text(
        CONFIG_HEAD.replace('node_id = "gw-x"\n', "")
        + '[cluster]\nendpoints = ["e:1"]\nstate_key_file = "k"\nnode_id = "gw-z"\n'
    )
    cfg = load_gateway_config(path)
    assert cfg.node_id == "gw-z" and cfg.cluster is not None and cfg.cluster.node_id == "gw-z"


def test_a_cluster_node_runs_one_worker(confdir: Path) -> None:
    path = confdir / "gateway.toml"
    path.write_text(
        "workers = 2\n" + CONFIG_HEAD + '[cluster]\nendpoints = ["e:1"]\nstate_key_file = "k"\n'
    )
    with pytest.raises(ConfigError, match=r"workers = 2: must be 1 with \[cluster\]"):
        load_gateway_config(path)


class TwoPathClient(SourceClient):
    """A client with two paths, each to its own node (``targets``: path id -> address)."""

    targets: dict[int, tuple[str, int]]

    def _pump(self) -> None:
        if not hasattr(self, "wire"):
            self.wire = Counter()
        for pid, data in self.session.datagrams_to_send():
            self._note("up", data)
            self.socks[pid].send(data, self.targets.get(pid, self.gateway))
        self.inner.extend(self.session.packets_for_tun())
        self.events.extend(self.session.events())


def test_a_standby_path_to_a_node_that_does_not_own_the_session_is_validated_in_place(
    cluster: Cluster,
) -> None:
    """Path 1 to the owner gw-a, path 2 to gw-b: gw-b answers path 2's probes with standby
    acks (random nonces under the derived key, no counter of the session): path 2 becomes
    validated, the session stays gw-a's (epoch 1), nothing moves, no counter repeats."""
    a, b = cluster.node("gw-a"), cluster.node("gw-b")
    nowhere = ("127.0.0.1", free_udp_port())
    c = TwoPathClient.__new__(TwoPathClient)
    c.targets = {2: nowhere}
    WireClient.__init__(c, a.address, cluster.gw_pub, cluster.cl_priv, n_paths=2)
    cluster.clients.append(c)
    assert c.run_until(lambda: c.state is State.ATTACHED, timeout=10.0)
    sid = c.session.machine.session_id
    assert not c.session.paths.get(2).validated
    c.targets[2] = b.address
    assert c.run_until(lambda: c.session.paths.get(2).validated, timeout=15.0)
    assert metric_value(b, "jvpn_cluster_standby_acks_total") >= 1
    entry = cluster.entry(sid)
    assert (entry.owner_epoch, entry.record.owner_node) == (1, "gw-a")
    assert owner_events(b, "ACQUIRED", sid) == [] and owner_events(a, "RELEASED", sid) == []
    assert echo(c, 900, 5)
    acks = [d for port, d in c.received if port == b.port and d[0] == MSG_STANDBY_ACK]
    assert acks  # a replayed ack matches no outstanding probe: dropped, nothing changes
    before = c.session.drops.get("duplicate", 0)
    c.session.receive_datagram(acks[0], 2, time.monotonic())
    assert c.session.drops.get("duplicate", 0) == before + 1
    assert c.repeats() == []


def metric_value(n: Node, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{n.metrics_port}/metrics", timeout=2) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def test_a_standby_ack_opens_only_with_the_session_keys_and_names_its_probe() -> None:
    send, other = bytes(range(32)), bytes(32)
    ack = ProbeAck(7, 2, 123, 1, 3, 0)
    dgram = seal_standby_ack(send, 1, 0xABCD, ack, b"n" * 12)
    assert len(dgram) == STANDBY_ACK_LEN and dgram[0] == MSG_STANDBY_ACK
    assert parse_header(dgram).receiver_index == 0xABCD  # type: ignore[union-attr]
    assert open_standby_ack(send, dgram) == ack  # the client's recv key is this send key
    assert open_standby_ack(other, dgram) is Drop.BAD_TAG
    tampered = dgram[:9] + bytes([dgram[9] ^ 1]) + dgram[10:]  # the nonce is authenticated
    assert open_standby_ack(send, tampered) is Drop.BAD_TAG
    assert open_standby_ack(send, dgram[:-1]) is Drop.TRUNCATED
    # two acks of one probe never share a nonce by construction of the caller (urandom);
    # the same ack under two nonces is two different datagrams
    assert seal_standby_ack(send, 1, 0xABCD, ack, b"m" * 12) != dgram
