"""How bench/failover.py kills a path, and how it finds the path to kill.

``--mode silent``: the path stops carrying packets while every link stays up, the way a
path dies behind a router: both ends of the path's veth drop every packet on arrival
(an nftables ``netdev`` ingress chain with one ``drop`` rule, or, without nftables, a
``tc`` ``blackhole`` qdisc that drops them as they are sent). Nothing on either host is
told.

``--mode linkdown``: the client-side veth goes down (``ip link set down`` through
pyroute2); the kernel removes its route and the gateway side loses carrier.

The path to kill is the one the tunnel is using: the client-side veth whose packet
counters grew the most over the last 0.3 s (any tool, no log parsing).

For every kill mechanism, each end's neighbour (ARP) entry for the other end of each path
is pinned (permanent) while the killer is in use: the rig stands for a routed network,
where a host's next hop does not vanish when a far link dies. Without it, a link-down
kill also takes the carrier from the gateway's veth; the gateway's datagrams to the
client's old address then wait about 3 s for ARP to give up, and while they wait they
fill a default-size socket send buffer (208 KiB), so a tool with default buffers sends
nothing at all for those 3 s (measured: wireguard-go recovered at +3.05 s whenever its
watchdog moved, and at +1.14 s with a small neighbour queue).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence

from netns import Topology
from pyroute2.netlink.rtnl.ndmsg import states as nud_states

TABLE = "jvpnbench"
"""The nftables table (family netdev) the silent kill puts its chains in, per namespace."""
SAMPLE_S = 0.3
"""How long the packet counters are watched to find the active path."""


class PathKiller:
    """Kills and restores path ``i`` of a topology; a context manager (setup/teardown)."""

    mode = "?"
    how = "?"
    requires: tuple[str, ...] = ()

    def __init__(self, topo: Topology) -> None:
        self.topo = topo

    def __enter__(self) -> PathKiller:
        for i in range(len(self.topo.paths)):
            pin_neighbours(self.topo, i)
        self.setup()
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def setup(self) -> None:
        pass

    def teardown(self) -> None:
        pass

    def kill(self, i: int) -> None:
        raise NotImplementedError

    def restore(self, i: int) -> None:
        raise NotImplementedError

    def _both_ends(self, argv_for: Sequence[tuple[str, list[str], str | None]]) -> None:
        """Run one command per (namespace, argv, stdin) at once; raise if any failed."""
        procs = [
            (
                self.topo.exec(
                    ns, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
                ),
                stdin,
            )
            for ns, argv, stdin in argv_for
        ]
        errors = []
        for proc, stdin in procs:
            _, err = proc.communicate(stdin.encode() if stdin else None, timeout=10)
            if proc.returncode != 0:
                errors.append(err.decode(errors="replace").strip())
        if errors:
            raise RuntimeError(f"{self.mode} kill command failed: {'; '.join(errors)}")

    def _ends(self, i: int) -> list[tuple[str, str]]:
        p = self.topo.paths[i]
        return [(self.topo.client_ns, p.client_ifname), (self.topo.gateway_ns, p.gateway_ifname)]


class LinkDown(PathKiller):
    mode = "linkdown"
    how = "the path's client-side veth set down (ip link set down, via pyroute2)"

    def kill(self, i: int) -> None:
        self.topo.link_down(i)

    def restore(self, i: int) -> None:
        self.topo.link_up(i)
        pin_neighbours(self.topo, i)  # a link set down loses its permanent entries


class NftDrop(PathKiller):
    mode = "silent"
    how = (
        "every packet dropped on arrival at both ends of the path, links up "
        "(nftables netdev ingress chain, rule 'drop')"
    )
    requires = ("nft",)

    def _chains(self, ns: str) -> str:
        lines = [f"table netdev {TABLE} {{"]
        for i in range(len(self.topo.paths)):
            ifname = dict(self._ends(i))[ns]
            lines.append(
                f'  chain p{i} {{ type filter hook ingress device "{ifname}" '
                "priority -500; policy accept; }"
            )
        return "\n".join([*lines, "}", ""])

    def setup(self) -> None:
        self._both_ends([(ns, ["nft", "-f", "-"], self._chains(ns)) for ns in self.topo.namespaces])

    def teardown(self) -> None:
        self._both_ends(
            [(ns, ["nft", "delete", "table", "netdev", TABLE], None) for ns in self.topo.namespaces]
        )

    def kill(self, i: int) -> None:
        self._both_ends(
            [
                (ns, ["nft", "add", "rule", "netdev", TABLE, f"p{i}", "drop"], None)
                for ns in self.topo.namespaces
            ]
        )

    def restore(self, i: int) -> None:
        self._both_ends(
            [
                (ns, ["nft", "flush", "chain", "netdev", TABLE, f"p{i}"], None)
                for ns in self.topo.namespaces
            ]
        )


class TcDrop(PathKiller):
    """Without nftables: a ``blackhole`` root qdisc on both ends of the path.

    It drops every packet as it leaves rather than as it arrives (same effect: the path
    carries nothing either way, links up, senders told nothing). An ingress ``tc`` filter
    would need the ``gact`` drop action, which not every kernel has (this machine's lacks
    it); ``sch_blackhole`` is built into every kernel with traffic control.
    """

    mode = "silent"
    how = (
        "every packet dropped at both ends of the path as it is sent, links up "
        "(tc blackhole root qdisc; nftables was missing)"
    )
    requires = ("tc",)

    def kill(self, i: int) -> None:
        self._both_ends([(ns, ["tc", "qdisc", "replace", "dev", ifname, "root", "blackhole"], None)
                         for ns, ifname in self._ends(i)])  # fmt: skip

    def restore(self, i: int) -> None:
        self._both_ends([(ns, ["tc", "qdisc", "del", "dev", ifname, "root"], None)
                         for ns, ifname in self._ends(i)])  # fmt: skip


def pin_neighbours(topo: Topology, i: int) -> None:
    """Permanent neighbour entries for path ``i``: each end knows the other's MAC address."""
    p = topo.paths[i]
    ends = [(topo.client_ns, p.client_ifname, p.client_ip),
            (topo.gateway_ns, p.gateway_ifname, p.gateway_ip)]  # fmt: skip
    links = []
    for ns, ifname, ip in ends:
        ipr = topo.ipr(ns)
        index = ipr.link_lookup(ifname=ifname)[0]
        links.append((ipr, index, ip, ipr.get_links(index)[0].get_attr("IFLA_ADDRESS")))
    for (ipr, index, _, _), (_, _, peer_ip, peer_mac) in zip(links, links[::-1], strict=True):
        ipr.neigh("replace", dst=peer_ip, lladdr=peer_mac, ifindex=index,
                  state=nud_states["permanent"])  # fmt: skip


def path_counters(topo: Topology) -> list[int]:
    """rx + tx packets of each path's client-side veth."""
    ipr = topo.ipr(topo.client_ns)
    counts = []
    for p in topo.paths:
        link = ipr.get_links(ipr.link_lookup(ifname=p.client_ifname)[0])[0]
        stats = link.get_attr("IFLA_STATS64")
        counts.append(int(stats["rx_packets"]) + int(stats["tx_packets"]))
    return counts


def busiest(before: Sequence[int], after: Sequence[int], default: int = 0) -> int:
    """Index of the path whose counter grew the most (``default`` when none grew)."""
    growth = [b - a for a, b in zip(before, after, strict=True)]
    if not growth or max(growth) <= 0:
        return default
    return growth.index(max(growth))


def active_path(topo: Topology, default: int = 0) -> int:
    """The path carrying the tunnel now (watched for :data:`SAMPLE_S`)."""
    before = path_counters(topo)
    time.sleep(SAMPLE_S)
    return busiest(before, path_counters(topo), default)
