"""A gateway cluster in network namespaces (tests/cluster_net.py; issue 9 item 2).

- Inner routing follows the owner: the node serving a session holds a proxy neighbour
  entry for the client's inner address on the LAN behind the cluster, the server on that
  LAN reaches the client through it (a checksummed inner TCP transfer), another node's
  announcement moves the server's neighbour entry to that node's MAC at once (gratuitous
  ARP), and a session that ends withdraws the entry. The client shows the node serving it.
- Takeover: ``kill -9`` of the owner during a checksummed inner TCP transfer from the
  server to the client; the transfer completes intact, the session id stays, and the
  client shows the new node and owner epoch + 1. This needs the gateway's cluster runtime
  (s8-cluster: ``[cluster]`` etcd endpoints, takeover by CAS): without it the test skips
  and says so.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cluster_net import CLIENT_INNER, LAN_ETCD, ClusterNet
from realnet import wait_until

from tunnel.gateway.config import ConfigError, parse_gateway_config
from tunnel.keys import encode_key

TRANSFER = 4 * 1024 * 1024


@pytest.fixture
def cluster_net(tmp_path: Path) -> Iterator[Callable[..., ClusterNet]]:
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
    wait_until(lambda: "node gw-a · owner epoch 0" in net.client_status(), 20, "status")

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


def _cluster_runtime_missing(tmp_path: Path) -> str | None:
    """Why the gateway cannot run as an etcd cluster node on this branch, or None."""
    key = tmp_path / "probe.key"
    key.write_text(encode_key(os.urandom(32)) + "\n")
    key.chmod(0o600)
    data = {
        "private_key": str(key), "listen": ["127.0.0.1:0"], "state": {"store": "memory"},
        "clients": [{"name": "c", "public_key": encode_key(os.urandom(32))}],
        "cluster": {"endpoints": [f"{LAN_ETCD}:2379"]},
    }  # fmt: skip
    try:
        parse_gateway_config(data, tmp_path / "gateway.toml")
    except ConfigError as exc:
        return (
            "needs s8-cluster's gateway cluster runtime (etcd ownership, takeover by CAS, "
            f"SESSION_OWNER_* events), not on this branch: {exc.message}"
        )
    return None


def test_takeover_kill_9_of_the_owner_during_a_transfer_from_behind_the_cluster(
    cluster_net: Callable[..., ClusterNet], tmp_path: Path
) -> None:
    missing = _cluster_runtime_missing(tmp_path)
    if missing is not None:
        pytest.skip(missing)
    net = cluster_net(etcd=True, cluster="")
    assert net.etcd is not None
    endpoints = json.dumps(net.etcd.endpoints)
    for name in ("a", "b"):
        config = net.tmp / f"gateway-{name}.toml"
        text = config.read_text().replace(
            "[cluster]\n", f"[cluster]\nendpoints = {endpoints}\nlease_ttl_s = 2\n"
        )
        config.write_text(text)
    net.start_gateway("a")
    net.start_client()  # path A first: the session is created on node A
    net.start_gateway("b")
    wait_until(lambda: net.proxy_entries("a") == [CLIENT_INNER], 20, "A's proxy entry")
    status = net.client_status()
    assert "node gw-a · owner epoch" in status, status
    epoch = int(status.split("node gw-a · owner epoch")[1].split()[0])
    sid = next(e["session_id"] for e in net.client_events.of_type("SESSION_CREATED"))  # type: ignore[union-attr]

    transfer = net.start_download(16 * 1024 * 1024, rate=1_000_000)
    transfer.wait_progress(2 * 1024 * 1024, 60)
    net.kill_gateway("a", signal.SIGKILL)
    result = transfer.finish(120)

    assert result.receiver["error"] is None and result.sender["error"] is None
    assert result.receiver["received"] == result.sender["sent"]
    assert result.receiver["sha256"] == result.sender["sha256"]
    sessions = {e["session_id"] for e in net.client_events.events if e.get("session_id")}  # type: ignore[union-attr]
    assert sessions == {sid}
    wait_until(
        lambda: f"node gw-b · owner epoch {epoch + 1}" in net.client_status(), 20,
        "the client shows node B and owner epoch + 1",
    )  # fmt: skip
    assert net.proxy_entries("b") == [CLIENT_INNER]
    assert net.server_neighbour() == net.mac(net.nodes["b"].ns)
