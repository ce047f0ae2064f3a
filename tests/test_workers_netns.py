"""``workers = 2`` with real TUNs in throwaway namespaces (issue 11, item 3; root).

jvpn-gateway runs in the gateway namespace of a :class:`netns.Topology` with two workers,
each with its own TUN; the clients are real ClientSessions in the test process with their
sockets in the client namespace (tests/test_workers.py's Crowd). The clients ping the
gateway's inner address: the gateway's *kernel* answers, so every reply must be routed
back to the TUN of the worker that owns the client's session (docs/gateway.md "Workers":
a host route per session's inner address). A worker killed: its TUN and routes go with
it, the other worker's clients keep their sessions and their replies; the worker comes
back on its slot with a new TUN, and its clients come back to it by themselves (the
lost-state re-handshake) with their routes.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from netns import NETNS_DIR, Topology, require_tun
from realnet import program
from test_workers import Crowd, Stderr, add_balanced, attached, status

from tunnel.core.handshake import generate_keypair
from tunnel.core.session import State
from tunnel.io.udp import PathSocket
from tunnel.keys import write_private_key

T = TypeVar("T")
_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNET = 0x40000000
N_CLIENTS = 6
PORT = 51820


def in_namespace(ns: str, make: Callable[[], T]) -> T:
    """``make()`` run on a thread that joined namespace ``ns`` (sockets stay in it)."""
    out: list[Any] = []

    def run() -> None:
        try:
            fd = os.open(NETNS_DIR / ns, os.O_RDONLY)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {ns}")
            finally:
                os.close(fd)
            out.append(make())
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if isinstance(out[0], BaseException):
        raise out[0]
    result: T = out[0]
    return result


class Rig:
    def __init__(self, topo: Topology, tmp: Path, ctl: Path) -> None:
        self.topo = topo
        self.tun = f"jtg-{topo.tag}"
        self.socket = ctl / "gw.sock"
        """The gateway's control socket (the supervisor's, for every worker)."""
        gw_private, gw_public = generate_keypair()
        write_private_key(tmp / "gateway.key", gw_private)
        link = topo.paths[0]
        self.crowd = Crowd(
            (link.gateway_ip, PORT), gw_public,
            lambda: in_namespace(topo.client_ns, lambda: PathSocket(1, (link.client_ip, 0))),
            gateway_inner="10.77.0.1",
        )  # fmt: skip
        clients = add_balanced(self.crowd, N_CLIENTS, "10.77.0")
        (tmp / "gateway.toml").write_text(
            f'node_id = "gw"\nlisten = "0.0.0.0:{PORT}"\nprivate_key = "gateway.key"\n'
            f'workers = 2\n[state]\nstore = "memory"\n[control]\nsocket = "{self.socket}"\n'
            f'[tun]\nname = "{self.tun}"\nsubnet = "10.77.0.0/24"\naddress = "10.77.0.1"\n'
            'subnet6 = "fd00:77::/64"\n' + clients
        )
        argv = [*program("jvpn-gateway", "tunnel.gateway.main"), "--config", "gateway.toml"]
        self.proc: subprocess.Popen[str] = topo.exec(
            topo.gateway_ns, argv, cwd=tmp, stderr=subprocess.PIPE, text=True
        )
        self.err = Stderr(self.proc)
        ready = self.err.wait(r"node gw: 2 workers ready \(pids (\d+), (\d+)\)")
        self.pids = [int(ready.group(1)), int(ready.group(2))]

    def status(self, k: int) -> dict[str, Any]:
        """The gateway's status with worker ``k``'s sessions alone."""
        out: list[dict[str, Any]] = []
        thread = threading.Thread(target=lambda: out.append(status(self.socket)))
        thread.start()
        while thread.is_alive():
            self.crowd.step()
        sessions = [s for s in out[0]["sessions"] if s["worker"] == k]
        return {**out[0], "sessions": sessions}

    def routes(self) -> dict[str, str]:
        """Host routes in the gateway namespace: inner address (v4 and v6) -> device."""
        ipr = self.topo.ipr(self.topo.gateway_ns)
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        return {
            r.get_attr("RTA_DST"): names.get(r.get_attr("RTA_OIF"), "?")
            for family, host in ((2, 32), (10, 128))
            for r in ipr.get_routes(family=family, table=254)
            if r["dst_len"] == host
            and (r.get_attr("RTA_DST") or "").startswith(("10.77.", "fd00:77:"))
            and r.get_attr("RTA_DST") != "fd00:77::1"  # worker 1's own address, /128
        }

    def ifindex(self, name: str) -> int | None:
        found = self.topo.ipr(self.topo.gateway_ns).link_lookup(ifname=name)
        return found[0] if found else None

    def tuns(self) -> set[str]:
        ipr = self.topo.ipr(self.topo.gateway_ns)
        names = {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        return {n for n in names if n.startswith(self.tun)}


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    require_tun()
    ctl = Path(tempfile.mkdtemp(prefix="jvpn-wk-"))
    with Topology(1) as topo:
        r: Rig | None = None
        try:
            r = Rig(topo, tmp_path, ctl)
            yield r
        finally:
            if r is not None:
                if r.proc.poll() is None:
                    r.proc.send_signal(signal.SIGTERM)
                    try:
                        r.proc.wait(30)
                    except subprocess.TimeoutExpired:
                        r.proc.kill()
                r.crowd.close()
            for sock in ctl.iterdir():
                sock.unlink()
            ctl.rmdir()


def test_return_traffic_reaches_the_owning_worker_and_a_kill_spares_the_other(rig: Rig) -> None:
    crowd = rig.crowd
    assert rig.tuns() == {rig.tun, f"{rig.tun}-1"}
    crowd.connect_all()
    crowd.run_until(attached(crowd.clients), 30, "every client attached")
    tun_of = {0: rig.tun, 1: f"{rig.tun}-1"}
    v6 = {c.name: c.session.inner_address6 for c in crowd.clients}
    assert all(v6.values())  # the pool gave every client an inner IPv6 address too
    want = {a: tun_of[c.worker] for c in crowd.clients for a in (c.address, v6[c.name])}
    # routes follow a session's start by a few milliseconds (docs/gateway.md "Workers")
    crowd.run_until(lambda: rig.routes() == want, 10, "a route per session to its worker")
    crowd.ping(crowd.clients)  # the kernel answers: replies routed to the owner's TUN
    for k in (0, 1):
        names = {s["client"] for s in rig.status(k)["sessions"]}
        assert names == {c.name for c in crowd.clients if c.worker == k}

    survivors = [c for c in crowd.clients if c.worker == 0]
    lost = [c for c in crowd.clients if c.worker == 1]
    ids = {c.name: c.session.snapshot(time.monotonic()).session_id for c in crowd.clients}
    old_tun = rig.ifindex(f"{rig.tun}-1")
    os.kill(rig.pids[1], signal.SIGKILL)
    rig.err.wait(r"worker 1 died \(killed by SIGKILL\)")
    rig.err.wait(r"worker 1 restarted \(pid \d+\)")
    # worker 1 has a new TUN; its clients come back by themselves in new sessions on it
    # (the lost-state re-handshake, steered to the slot of their old sessions)
    assert rig.ifindex(f"{rig.tun}-1") not in (None, old_tun)
    crowd.run_until(
        lambda: all(
            c.session.state is State.ATTACHED
            and c.session.snapshot(time.monotonic()).session_id != ids[c.name]
            for c in lost
        ),
        90, "worker 1's clients in new sessions",
    )  # fmt: skip
    crowd.run_until(lambda: rig.routes() == want, 10, "the routes of the new sessions")
    crowd.ping(crowd.clients)
    for c in survivors:  # untouched
        assert c.session.state is State.ATTACHED
        assert c.session.snapshot(time.monotonic()).session_id == ids[c.name]
    assert {s["client"] for s in rig.status(1)["sessions"]} == {c.name for c in lost}

    rig.proc.send_signal(signal.SIGTERM)
    assert rig.proc.wait(30) == 0
    assert rig.tuns() == set() and rig.routes() == {}
