"""A gateway cluster in network namespaces (tests/cluster_net.py; issue 9 item 2).

- Inner routing follows the owner: the node serving a session holds a proxy neighbour
  entry for the client's inner address on the LAN behind the cluster, the server on that
  LAN reaches the client through it (a checksummed inner TCP transfer), another node's
  announcement moves the server's neighbour entry to that node's MAC at once (gratuitous
  ARP), and a session that ends withdraws the entry. The client shows the node serving it.
- Takeover: ``kill -9`` of the owner during a checksummed inner TCP transfer from the
  server to the client; the transfer completes intact, the session id stays, and the
  client shows the new node and owner epoch + 1 (the gateway's cluster runtime:
  tunnel/gateway/cluster.py).

Both run three etcd members in the LAN namespace (skipped without an ``etcd`` binary).
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cluster_net import CLIENT_INNER, ClusterNet
from etcd_cluster import require_etcd
from realnet import wait_until

TRANSFER = 4 * 1024 * 1024
TAKEOVER_BYTES = 8 * 1024 * 1024
TAKEOVER_RATE = 1_000_000
"""Bytes/s: the transfer is still running when the owner is killed and after the takeover."""


@pytest.fixture
def cluster_net(tmp_path: Path) -> Iterator[Callable[..., ClusterNet]]:
    require_etcd()
    built: list[ClusterNet] = []

    def make(**kwargs: object) -> ClusterNet:
        sub = tmp_path / f"c{len(built)}"
        sub.mkdir()
        net = ClusterNet(sub, **kwargs)  # type: ignore[arg-type]
        built.append(net)
        return net.open()

    yield make
    for net in built:
        net.close()


def test_the_owner_answers_for_the_inner_address_and_an_announcement_moves_it(
    cluster_net: Callable[..., ClusterNet],
) -> None:
    net = cluster_net(client_paths=("a",))
    net.start_gateway("a")
    net.start_gateway("b")
    net.start_client()
    mac_a, mac_b = net.mac(net.nodes["a"].ns), net.mac(net.nodes["b"].ns)
    assert mac_a != mac_b

    # the session was created on node A: A proxies the client's inner address on the LAN
    wait_until(lambda: net.proxy_entries("a") == [CLIENT_INNER], 20, "A's proxy entry")
    assert net.proxy_entries("b") == []
    wait_until(lambda: "node gw-a · owner epoch 1" in net.client_status(), 20, "status")

    # the server reaches the client only by ARP on the LAN: through A, intact
    result = net.start_download(TRANSFER).finish(120)
    assert result.receiver["error"] is None and result.sender["error"] is None
    assert result.receiver["received"] == result.sender["sent"] == TRANSFER
    assert result.receiver["sha256"] == result.sender["sha256"]
    assert net.server_neighbour() == mac_a

    # node B acquires (what its gateway does on a takeover): the server learns B's MAC
    # from the gratuitous ARP, without asking
    sid = next(e["session_id"] for e in net.client_events.of_type("SESSION_CREATED"))  # type: ignore[union-attr]
    answer = json.loads(net.announce("b", "acquired", sid, [CLIENT_INNER]))
    assert answer == {"ok": True, "detail": ""}
    assert net.proxy_entries("b") == [CLIENT_INNER]
    wait_until(lambda: net.server_neighbour() == mac_b, 10, "the server's entry at B's MAC")
    assert json.loads(net.announce("b", "released", sid, [CLIENT_INNER]))["ok"]
    assert net.proxy_entries("b") == []

    # the session ends on A: A withdraws its entry
    assert net.stop_client() == 0
    wait_until(lambda: net.proxy_entries("a") == [], 20, "A's proxy entry removed")


def test_takeover_kill_9_of_the_owner_during_a_transfer_from_behind_the_cluster(
    cluster_net: Callable[..., ClusterNet],
) -> None:
    """The client has a path to each node; A serves the session (path A is first), B sees
    only the client's standby probes (they move nothing). ``kill -9`` of A: the client
    recovers through B, B takes the session over once A's lease expired (owner epoch 2) and
    announces the inner address on the LAN, and the server's transfer goes on."""
    net = cluster_net()
    net.start_gateway("a")
    net.start_client()
    net.start_gateway("b")
    wait_until(lambda: net.proxy_entries("a") == [CLIENT_INNER], 20, "A's proxy entry")
    wait_until(lambda: "node gw-a · owner epoch 1" in net.client_status(), 20, "status")
    events = net.client_events
    assert events is not None
    sid = next(e["session_id"] for e in events.of_type("SESSION_CREATED"))

    transfer = net.start_download(TAKEOVER_BYTES, rate=TAKEOVER_RATE)
    transfer.wait_progress(1024 * 1024, 60)
    assert "node gw-a · owner epoch 1" in net.client_status()  # B's probes moved nothing
    net.kill_gateway("a", signal.SIGKILL)
    result = transfer.finish(180)

    assert result.receiver["error"] is None and result.sender["error"] is None
    assert result.receiver["received"] == result.sender["sent"] == TAKEOVER_BYTES
    assert result.receiver["sha256"] == result.sender["sha256"]
    assert {e["session_id"] for e in events.events if e.get("session_id")} == {sid}
    wait_until(
        lambda: "node gw-b · owner epoch 2" in net.client_status(), 20,
        "the client shows node B and owner epoch + 1",
    )  # fmt: skip
    assert net.proxy_entries("b") == [CLIENT_INNER]
    assert net.server_neighbour() == net.mac(net.nodes["b"].ns)
