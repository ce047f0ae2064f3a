"""Drivers on real links: veth paths, TUN and netlink config inside throwaway namespaces.

Every test builds its own namespaces through tests/netns.py (``Topology``) and removes
them, also on failure; nothing here touches the host's interfaces, addresses or routes.
Needs root, ``ip`` and /dev/net/tun; skips with the reason otherwise.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from netns import (
    PATH_PROBE,
    PREFIX,
    UDP_ECHO,
    Topology,
    cleanup_stale,
    list_namespaces,
    read_line,
    require_netns,
    require_tun,
)

from tunnel.io.netconf import HostConfig, NetConfError

pytestmark = pytest.mark.root

ECHO_PORT = 7070


@pytest.fixture
def topo():
    require_netns()
    with Topology(n_paths=2) as t:
        yield t


# -- the harness itself -----------------------------------------------------------------


def test_topology_builds_paths_and_always_tears_down() -> None:
    require_netns()
    with Topology(n_paths=3) as t:
        names = t.namespaces
        assert set(names) <= list_namespaces()
        ipr = t.ipr(t.client_ns)
        for i, link in enumerate(t.paths):
            assert (link.client_ip, link.gateway_ip) == (f"10.200.{i}.1", f"10.200.{i}.2")
            assert len(link.client_ifname) <= 15 and len(link.gateway_ifname) <= 15
            [index] = ipr.link_lookup(ifname=link.client_ifname)
            addrs = [a.get_attr("IFA_ADDRESS") for a in ipr.addr("dump", index=index)]
            assert link.client_ip in addrs
    assert not set(names) & list_namespaces()

    with pytest.raises(RuntimeError, match="boom"), Topology(n_paths=1) as t:
        names = t.namespaces
        raise RuntimeError("boom")
    assert not set(names) & list_namespaces()


def test_cleanup_removes_only_leftovers_of_dead_runs(topo: Topology) -> None:
    dead_pid = 4_000_000  # above any pid_max default: never a live process
    while True:
        try:
            os.kill(dead_pid, 0)
        except ProcessLookupError:
            break
        dead_pid += 1
    stale = f"{PREFIX}{dead_pid}-abcdef-c"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        removed = cleanup_stale()
        assert stale in removed
        assert stale not in list_namespaces()
        assert set(topo.namespaces) <= list_namespaces()  # our live run is untouched
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True)


# -- UDP across the paths ---------------------------------------------------------------


def probe_paths(t: Topology, timeout: float) -> dict[str, Any]:
    spec = {
        "paths": [link._asdict() for link in t.paths],
        "port": ECHO_PORT,
        "timeout": timeout,
    }
    proc = t.python(t.client_ns, PATH_PROBE, json.dumps(spec))
    result: dict[str, Any] = json.loads(read_line(proc, timeout + 10))
    proc.wait(timeout=5)
    return result


def test_udp_crosses_each_path_and_link_down_stops_only_that_path(topo: Topology) -> None:
    echo = topo.python(topo.gateway_ns, UDP_ECHO, str(ECHO_PORT))
    assert read_line(echo, 10) == "ready"

    both = probe_paths(topo, timeout=5)
    assert both["answered"] == {"0": "10.200.0.2", "1": "10.200.1.2"}

    topo.link_down(0)
    one = probe_paths(topo, timeout=0.5)
    assert one["answered"] == {"1": "10.200.1.2"}
    assert sum(one["send_errors"][0].values()) > 0  # counted (ENETUNREACH), not raised
    assert one["send_errors"][1] == {}

    topo.link_up(0)
    again = probe_paths(topo, timeout=5)
    assert again["answered"] == {"0": "10.200.0.2", "1": "10.200.1.2"}


# -- TUN inside a namespace -------------------------------------------------------------

TUN_CHILD = r"""
import fcntl, ipaddress, json, os, select, socket, struct, sys, time
from tunnel.io.tun import TunDevice, ip_version, ipv4_dst, ipv4_src

def checksum(header):
    total = sum(struct.unpack("!%dH" % (len(header) // 2), header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF

def ipv4_udp(src, dst, sport, dport, payload):
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                         ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + udp

tun = TunDevice("jvt%d", mtu=1400).open()
print(json.dumps({"name": tun.name}), flush=True)
cfg = json.loads(sys.stdin.readline())            # the parent configured the device

nonblocking = bool(fcntl.fcntl(tun.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK)
out = {"name": tun.name, "fd_nonblocking": nonblocking}
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.sendto(b"hello-tun", (cfg["remote"], 9999))      # routed via the TUN
deadline = time.monotonic() + 3
while time.monotonic() < deadline and "read" not in out:
    select.select([tun], [], [], 0.1)
    for pkt in tun.read_batch():  # the kernel also sends IPv6 RS/MLD: skip those
        if ip_version(pkt) == 4 and pkt.endswith(b"hello-tun"):
            out["read"] = {"version": ip_version(pkt),
                           "src": str(ipaddress.IPv4Address(ipv4_src(pkt))),
                           "dst": str(ipaddress.IPv4Address(ipv4_dst(pkt)))}

# the other direction: a reply injected into the TUN reaches the socket
port = s.getsockname()[1]
out["write_ok"] = tun.write(ipv4_udp(cfg["remote"], cfg["local"], 9999, port, b"reply"))
data, addr = s.recvfrom(100)
out["reply"] = [data.decode(), addr[0], addr[1]]
out["garbage_ok"] = tun.write(b"\x00" * 20)       # not an IP packet: refused, counted
out["write_errors"] = dict(tun.write_errors)
out["written"] = tun.written
print(json.dumps(out), flush=True)
sys.stdin.readline()
tun.close()
"""


def test_tun_in_namespace_reads_and_writes_ipv4(topo: Topology) -> None:
    require_tun()
    child = topo.python(topo.client_ns, TUN_CHILD)
    name = json.loads(read_line(child, 15))["name"]
    assert name.startswith("jvt")

    with HostConfig(netns=topo.client_ns) as host:
        host.add_address(name, "10.201.0.1/24")
        host.link_up(name)
        host.add_route("10.202.0.0/24", ifname=name)
        assert child.stdin is not None
        child.stdin.write(json.dumps({"local": "10.201.0.1", "remote": "10.202.0.7"}).encode())
        child.stdin.write(b"\n")
        child.stdin.flush()
        result = json.loads(read_line(child, 15))
        child.stdin.write(b"done\n")
        child.stdin.flush()
    assert child.wait(timeout=10) == 0

    assert result["name"] == name and result["fd_nonblocking"]
    assert result["read"] == {"version": 4, "src": "10.201.0.1", "dst": "10.202.0.7"}
    assert result["write_ok"] is True
    assert result["reply"] == ["reply", "10.202.0.7", 9999]
    assert result["garbage_ok"] is False
    assert result["write_errors"] == {"EINVAL": 1}
    assert result["written"] == 1


PRIVILEGE_FIX = "— run as root or grant CAP_NET_ADMIN"
"""The actionable end of every "no privilege for the TUN" message."""


@pytest.mark.parametrize("mode", [0o600, 0o666], ids=["clone-device-0600", "clone-device-0666"])
def test_tun_open_without_privilege_says_how_to_fix_it(
    topo: Topology, tmp_path: Path, mode: int
) -> None:
    """An unprivileged open fails at open(2) where /dev/net/tun is 0600 and at TUNSETIFF
    where it is 0666 (the Debian default); either way the message names what was refused
    and says how to fix it. Both modes run on every machine: a private mount namespace
    binds a clone-device node of that mode over /dev/net/tun (the host's stays untouched)."""
    require_tun()
    setpriv, unshare = shutil.which("setpriv"), shutil.which("unshare")
    if setpriv is None or unshare is None:
        pytest.skip("setpriv/unshare (util-linux) not available to drop privileges")
    node = tmp_path / "tun"
    os.mknod(node, stat.S_IFCHR | mode, os.makedev(10, 200))  # the misc device net/tun
    os.chmod(node, mode)  # mknod applies the umask
    code = (
        "from tunnel.io.tun import TunDevice, TunError\n"
        "try:\n"
        "    TunDevice().open()\n"
        "except TunError as e:\n"
        "    print(e)\n"
        "else:\n"
        "    print('opened')\n"
    )
    argv = [unshare, "--mount", "sh", "-c", 'mount --bind "$0" /dev/net/tun && exec "$@"',
            str(node), setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
            "--inh-caps=-all", sys.executable, "-c", code]  # fmt: skip
    proc = topo.run(topo.client_ns, argv)
    if proc.returncode != 0 and "Traceback" not in proc.stderr:  # the sandbox, not the code
        pytest.skip(f"cannot run Python as an unprivileged user here: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr  # a TunError, not any other exception
    message = proc.stdout.strip()
    assert message.endswith(PRIVILEGE_FIX), message
    if mode == 0o600:  # the device itself is refused: name it
        assert message.startswith("cannot open /dev/net/tun: permission denied"), message
    else:  # the device opens; creating the interface is refused
        assert message.startswith("cannot create TUN device "), message
        assert "operation not permitted" in message, message


# -- HostConfig -------------------------------------------------------------------------


def snapshot(ipr: Any) -> dict[str, list[tuple[str, ...]]]:
    """Links (name, up, mtu), addresses and routes of every table, as comparable tuples."""
    links = [
        (str(m.get_attr("IFLA_IFNAME")), str(m["flags"] & 1), str(m.get_attr("IFLA_MTU")))
        for m in ipr.link("dump")
    ]
    addrs = [
        (str(m["index"]), str(m.get_attr("IFA_ADDRESS")), str(m["prefixlen"]))
        for m in ipr.addr("dump")
    ]
    routes = [
        tuple(
            str(x)
            for x in (
                m.get_attr("RTA_TABLE"),
                m["family"],
                m.get_attr("RTA_DST"),
                m["dst_len"],
                m.get_attr("RTA_OIF"),
                m.get_attr("RTA_GATEWAY"),
            )
        )
        for family in (socket.AF_INET, socket.AF_INET6)
        for m in ipr.route("dump", family=family)
    ]
    return {"links": sorted(links), "addrs": sorted(addrs), "routes": sorted(routes)}


def _seven_changes(host: HostConfig, veth: str) -> None:
    """Addresses, MTU, link state and routes: seven changes of ours, three that were not."""
    assert host.add_address(veth, "10.200.0.1/24") is False  # already there: not ours
    assert host.add_address(veth, "10.210.0.1/24") is True
    assert host.add_address(veth, "fd00:6a76::1/64") is True
    assert host.set_mtu(veth, 1400) is True
    assert host.link_up("jvx0") is True
    assert host.link_up(veth) is False  # already up
    assert host.add_route("10.211.0.0/16", gateway="10.200.0.2") is True
    assert host.add_route("10.212.0.0/16", ifname=veth, table=100) is True
    assert host.add_route("0.0.0.0/0", ifname=veth, gateway="10.200.0.2", table=101)
    assert host.add_route("10.211.0.0/16", gateway="10.200.0.2") is False  # identical
    assert len(host.changes) == 7


def test_host_config_undo_restores_exactly_what_it_changed(topo: Topology) -> None:
    ipr = topo.ipr(topo.client_ns)
    # a link that is down, with IPv6 off so no link-local address appears asynchronously
    ipr.link("add", ifname="jvx0", kind="veth", peer={"ifname": "jvx1"})
    topo.run(topo.client_ns, ["sysctl", "-qw", "net.ipv6.conf.jvx0.disable_ipv6=1"])
    veth = topo.paths[0].client_ifname
    before = snapshot(ipr)

    with pytest.raises(RuntimeError, match="engine crashed"), HostConfig(topo.client_ns) as host:
        _seven_changes(host, veth)
        during = snapshot(ipr)
        assert during != before
        assert ("100", "2", "10.212.0.0", "16") in {r[:4] for r in during["routes"]}
        raise RuntimeError("engine crashed")

    assert snapshot(ipr) == before
    assert host.changes == ()
    host.undo()  # idempotent: nothing left to undo, nothing raised


def test_host_config_explicit_undo_is_idempotent_and_tolerates_vanished_links(
    topo: Topology,
) -> None:
    ipr = topo.ipr(topo.client_ns)
    ipr.link("add", ifname="jvy0", kind="veth", peer={"ifname": "jvy1"})
    # IPv6 off so no link-local address or route appears asynchronously once it is up
    topo.run(topo.client_ns, ["sysctl", "-qw", "net.ipv6.conf.jvy0.disable_ipv6=1"])
    before = snapshot(ipr)
    with HostConfig(topo.client_ns) as host:
        host.add_address("jvy0", "10.220.0.1/24")
        host.link_up("jvy0")  # the kernel refuses routes through a link that is down
        host.add_route("10.221.0.0/16", ifname="jvy0")
        host.undo()
        assert snapshot(ipr) == before
        host.undo()
        host.add_address("jvy0", "10.220.0.1/24")
        ipr.link("del", index=ipr.link_lookup(ifname="jvy0")[0])  # gone under our feet
    # exit undid the address of a link that no longer exists: no error
    assert not ipr.link_lookup(ifname="jvy0")


def test_host_config_errors_are_clear(topo: Topology) -> None:
    veth = topo.paths[0].client_ifname
    with HostConfig(topo.client_ns) as host:
        with pytest.raises(NetConfError, match=r"no such interface 'jvnope0' in network namespace"):
            host.add_address("jvnope0", "10.1.1.1/24")
        with pytest.raises(NetConfError, match=r"different route for 10\.200\.0\.0/24") as info:
            host.add_route("10.200.0.0/24", gateway="10.200.1.2")  # the connected route exists
        assert info.value.errno == errno.EEXIST
        with pytest.raises(ValueError, match="invalid interface address"):
            host.add_address(veth, "10.1.1.300/24")
        assert host.changes == ()

    with pytest.raises(NetConfError, match="network namespace 'jvt-no-such-ns' does not exist"):
        HostConfig(netns="jvt-no-such-ns").open()
    assert "jvt-no-such-ns" not in list_namespaces()  # not created as a side effect
