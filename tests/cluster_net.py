"""A gateway cluster in throwaway network namespaces: two nodes, a LAN behind them with a
server on it, a client with a path to each node, and (optionally) etcd.

Layout (``tag`` is random per run; every namespace is ``jvt<pid>-<hex6>-c|g`` so that
:func:`netns.cleanup_stale` removes what a crashed run left)::

    client ns                     node A ns (gw-a)            LAN ns          server ns
    jvpn-tui                      jvpn-gateway                bridge br0      10.88.0.10
    path 0: 10.200.0.1 -- veth -- 10.200.0.2:51820            10.88.0.250     route 10.66.0.0/24
    path 1: 10.200.1.1 -- veth -+ TUN 10.66.0.1/24            (etcd: three      dev lan0: on-link,
    TUN 10.66.0.2               | lan0 10.88.0.1 -- veth --- br0  members)    ARP decides
    route 10.88.0.0/24 via TUN  |                             br0 -- veth --- lan0
                                | node B ns (gw-b)
                                +- 10.200.1.2:51820, TUN 10.66.0.1/24,
                                   lan0 10.88.0.2 -- veth --- br0

Both nodes run the same gateway identity (one static key), the same inner subnet, forward
IPv4 and answer proxied ARP at once (``proxy_delay`` 0). The server reaches the client's
inner address only through ARP on the LAN: whichever node answers (a proxy neighbour entry,
tunnel/gateway/routehook.py) or announced itself last (gratuitous ARP) gets the traffic.
etcd, when asked for, runs its three members inside the LAN namespace on 10.88.0.250,
reachable from both nodes; a node's process can be killed (``kill -9``) without touching
its namespace. Teardown always runs: processes stopped, etcd removed, namespaces deleted,
and a check that nothing of the run is left in the host's namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from etcd_cluster import EtcdCluster, Member
from netns import IP, PREFIX, cleanup_stale, delete_namespace, list_namespaces, require_tun
from pyroute2 import IPRoute
from realnet import (
    TCP_RECV_CLIENT,
    TCP_SEND_SERVER,
    InnerTransfer,
    LineLog,
    host_leftovers,
    prioritize,
    program,
    read_line,
    stop_process,
    wait_until,
)

from tunnel.keys import write_private_key, write_public_key

INNER_SUBNET = "10.66.0.0/24"
GATEWAY_INNER = "10.66.0.1"
CLIENT_INNER = "10.66.0.2"
LAN_SUBNET = "10.88.0.0/24"
LAN_PREFIX = 24
LAN_ETCD = "10.88.0.250"
SERVER_LAN = "10.88.0.10"
NODE_LAN = {"a": "10.88.0.1", "b": "10.88.0.2"}
NODE_PATH = {"a": 0, "b": 1}
"""The client's path i leads to the node of that index."""
GATEWAY_PORT = 51820
START_TIMEOUT_S = 30.0


def _name(role: str) -> str:
    return f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:6]}-{role}"


class NsEtcd(EtcdCluster):
    """Three etcd members inside a namespace, on ``host`` (the LAN bridge's address)."""

    ns: str = ""
    host: str = LAN_ETCD

    def __init__(self, ns: str, host: str) -> None:
        self.ns, self.host = ns, host
        super().__init__()

    def __post_init__(self) -> None:
        super().__post_init__()
        self.members = [NsMember(**vars(m), host=self.host) for m in self.members]

    def command(self, m: Member) -> list[str]:
        return [IP, "netns", "exec", self.ns, *super().command(m)]

    def healthy(self, m: Member) -> bool:
        if not m.running or m.frozen:
            return False
        proc = subprocess.run(
            [IP, "netns", "exec", self.ns, "curl", "-s", "-m", "1", f"{m.client_url}/health"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        return '"health":"true"' in proc.stdout.replace(" ", "")


@dataclass
class NsMember(Member):
    host: str = "127.0.0.1"

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"


@dataclass
class Node:
    """One gateway node: its namespace, config and (while running) its process."""

    name: str
    ns: str
    lan_ip: str
    proc: subprocess.Popen[bytes] | None = None
    events: LineLog | None = None
    stderr: LineLog | None = None
    control: Path = field(default_factory=Path)

    @property
    def node_id(self) -> str:
        return f"gw-{self.name}"


class ClusterNet:
    """See the module docstring. ``client_paths``: the nodes the client has a path to,
    in path order; ``etcd``: three etcd members in the LAN namespace, and both nodes are
    nodes of one cluster on it (``[cluster]`` endpoints, state key, prefix, lease TTL 2 s);
    without, each node is a gateway of its own with only the route keys."""

    def __init__(
        self,
        tmp: Path,
        *,
        client_paths: tuple[str, ...] = ("a", "b"),
        route_mode: str = "proxy_neighbour",
        etcd: bool = True,
        store: str = "memory",
    ) -> None:
        self.tmp = tmp
        self.tag = uuid.uuid4().hex[:6]
        self.client_ns = _name("c")
        self.lan_ns = _name("g")
        self.server_ns = _name("g")
        self.nodes = {n: Node(n, _name("g"), NODE_LAN[n]) for n in ("a", "b")}
        self.client_paths = client_paths
        self.route_mode = route_mode
        self.store = store
        self.want_etcd = etcd
        self.etcd: NsEtcd | None = None
        self.client: subprocess.Popen[bytes] | None = None
        self.client_events: LineLog | None = None
        self.client_stderr: LineLog | None = None
        self.control_dir = Path(tempfile.mkdtemp(prefix="jvpn-cn-"))
        self.client_socket = self.control_dir / "client.sock"
        self._created: list[str] = []
        self._helpers: list[subprocess.Popen[bytes]] = []
        self._open = False

    @property
    def namespaces(self) -> list[str]:
        return [self.client_ns, self.lan_ns, self.server_ns, *(n.ns for n in self.nodes.values())]

    # -- lifetime ------------------------------------------------------------------------

    def open(self) -> ClusterNet:
        require_tun()
        cleanup_stale()
        self._open = True
        try:
            self._build()
            if self.want_etcd:
                self.etcd = NsEtcd(self.lan_ns, LAN_ETCD)
                self.etcd.start_all()
            self._write_files()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if not self._open:
            return
        self._open = False
        procs = [self.client, *self._helpers, *(n.proc for n in self.nodes.values())]
        for proc in procs:
            if proc is not None:
                stop_process(proc)
        try:
            if self.etcd is not None:
                self.etcd.close()
        finally:
            for ns in self._created:
                delete_namespace(ns)
            left = set(self._created) & list_namespaces()
            self._created.clear()
            import shutil

            shutil.rmtree(self.control_dir, ignore_errors=True)
            assert not left, f"namespaces left behind: {sorted(left)}"
            leftovers = host_leftovers(self.tag)
            assert not leftovers, f"left in the host namespace: {leftovers}"

    def __enter__(self) -> ClusterNet:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- building ----------------------------------------------------------------------------

    def _build(self) -> None:
        for ns in self.namespaces:
            subprocess.run([IP, "netns", "add", ns], check=True, capture_output=True, text=True)
            self._created.append(ns)
            self.sh(ns, "link", "set", "lo", "up")
        for i, node in enumerate(self.client_paths):
            self._veth(
                self.client_ns, f"jcp{i}-{self.tag}", f"10.200.{i}.1/24",
                self.nodes[node].ns, f"jnp{i}-{self.tag}", f"10.200.{i}.2/24",
            )  # fmt: skip
        self.sh(self.lan_ns, "link", "add", "br0", "type", "bridge")
        self.sh(self.lan_ns, "addr", "add", f"{LAN_ETCD}/{LAN_PREFIX}", "dev", "br0")
        self.sh(self.lan_ns, "link", "set", "br0", "up")
        members = [(n.ns, n.lan_ip, n.name) for n in self.nodes.values()]
        for ns, address, short in [*members, (self.server_ns, SERVER_LAN, "s")]:
            port = f"jl{short}-{self.tag}"
            self._veth(self.lan_ns, port, "", ns, "lan0", f"{address}/{LAN_PREFIX}")
            self.sh(self.lan_ns, "link", "set", port, "master", "br0")
        for node in self.nodes.values():
            for key, value in (
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv4.neigh.lan0.proxy_delay", "0"),
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.lan0.rp_filter", "0"),
            ):
                self.sysctl(node.ns, key, value)
        # the server reaches the inner subnet on-link: only ARP says which node has it
        self.sh(self.server_ns, "route", "add", INNER_SUBNET, "dev", "lan0", "scope", "link")

    def _veth(self, ns1: str, if1: str, addr1: str, ns2: str, if2: str, addr2: str) -> None:
        self.sh(ns1, "link", "add", if1, "type", "veth", "peer", "name", if2, "netns", ns2)
        for ns, ifname, address in ((ns1, if1, addr1), (ns2, if2, addr2)):
            if address:
                self.sh(ns, "addr", "add", address, "dev", ifname)
            self.sh(ns, "link", "set", ifname, "up")

    def sh(self, ns: str, *args: str) -> str:
        """``ip -n ns args...`` (test plumbing, not the code under test); raises on failure."""
        proc = subprocess.run([IP, "-n", ns, *args], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"ip -n {ns} {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def sysctl(self, ns: str, key: str, value: str) -> None:
        path = "/proc/sys/" + key.replace(".", "/")
        subprocess.run(
            [IP, "netns", "exec", ns, "sh", "-c", f"echo {value} > {path}"], check=True,
            capture_output=True,
        )  # fmt: skip

    def _write_files(self) -> None:
        from cryptography.hazmat.primitives.asymmetric import x25519
        from cryptography.hazmat.primitives.serialization import (
            Encoding,
            NoEncryption,
            PrivateFormat,
            PublicFormat,
        )

        for who in ("gateway", "client"):
            key = x25519.X25519PrivateKey.generate()
            raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
            pub = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            write_private_key(self.tmp / f"{who}.key", raw)
            write_public_key(self.tmp / f"{who}.pub", pub)
        state = f'[state]\nstore = "{self.store}"\nstate_dir = "state"\n'
        cluster = ""  # without etcd: gateways of their own, no routing
        if self.etcd is not None:  # one cluster: the store is etcd, the state key shared
            state = ""
            cluster = (
                f'[cluster]\nroute_mode = "{self.route_mode}"\nroute_device = "lan0"\n'
                f"endpoints = {json.dumps(self.etcd.endpoints)}\n"
                f'state_key_file = "state.key"\nprefix = "/jvpn/t{self.tag}/"\nlease_ttl = 2\n'
            )
        for node in self.nodes.values():
            node.control = self.control_dir / f"{node.name}.sock"
            (self.tmp / f"gateway-{node.name}.toml").write_text(
                f'node_id = "{node.node_id}"\n'
                f'listen = ["0.0.0.0:{GATEWAY_PORT}"]\n'
                'private_key = "gateway.key"\n'
                f"[control]\nsocket = {json.dumps(str(node.control))}\n"
                f"{state}"
                f'[tun]\nname = "jtn{node.name}-{self.tag}"\nsubnet = "{INNER_SUBNET}"\n'
                f'address = "{GATEWAY_INNER}"\n'
                f"{cluster}"
                "[[clients]]\n"
                'name = "client"\n'
                'public_key = "client.pub"\n'
                f'address = "{CLIENT_INNER}"\n'
                '[[sinks]]\ntype = "stdout"\n'
            )
        paths = [
            f'[[path]]\nname = "{node.upper()}"\nbind = "10.200.{i}.1"\n'
            f'device = "jcp{i}-{self.tag}"\ngateway = "10.200.{i}.2:{GATEWAY_PORT}"\n'
            for i, node in enumerate(self.client_paths)
        ]
        (self.tmp / "client.toml").write_text(
            'private_key = "client.key"\n'
            'gateway_public_key = "gateway.pub"\n'
            'node_id = "client"\n'
            f"control_socket = {json.dumps(str(self.client_socket))}\n"
            f'[tun]\nname = "jtc-{self.tag}"\nroutes = ["{LAN_SUBNET}"]\n' + "".join(paths)
        )

    # -- programs ----------------------------------------------------------------------------

    def exec(self, ns: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        from netns import child_env

        kwargs.setdefault("env", child_env())
        return subprocess.Popen([IP, "netns", "exec", ns, *argv], **kwargs)

    def start_gateway(self, name: str) -> Node:
        node = self.nodes[name]
        argv = [
            *program("jvpn-gateway", "tunnel.gateway.main"), "--config", f"gateway-{name}.toml"
        ]  # fmt: skip
        proc = self.exec(
            node.ns, argv, cwd=self.tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        prioritize(proc.pid)
        node.proc = proc
        assert proc.stdout is not None and proc.stderr is not None
        node.events = LineLog(proc.stdout, f"gateway-{name}-events")
        node.stderr = stderr = LineLog(proc.stderr, f"gateway-{name}-stderr")
        wait_until(
            lambda: any("listening on" in line for line in stderr.lines) or proc.poll() is not None,
            START_TIMEOUT_S, f"jvpn-gateway {name} ready",
        )  # fmt: skip
        if proc.poll() is not None:
            raise AssertionError(
                f"jvpn-gateway {name} exited with {proc.returncode}:\n" + "\n".join(stderr.lines)
            )
        return node

    def kill_gateway(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.nodes[name].proc
        assert proc is not None
        proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(15)

    def start_client(self, wait_attached: bool = True) -> None:
        argv = [*program("jvpn-tui", "jvpn_tui"), "--headless", "--config", "client.toml"]
        proc = self.exec(
            self.client_ns, argv, cwd=self.tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        prioritize(proc.pid)
        self.client = proc
        assert proc.stdout is not None and proc.stderr is not None
        self.client_events = events = LineLog(proc.stdout, "client-events")
        self.client_stderr = LineLog(proc.stderr, "client-stderr")
        if wait_attached:
            events.wait_type("STATE_CHANGE", START_TIMEOUT_S, new_state="ATTACHED")
            wait_until(self.client_routes_ready, START_TIMEOUT_S, "client TUN and routes")

    def client_routes_ready(self) -> bool:
        with IPRoute(netns=self.client_ns, flags=0) as ipr:
            routes = ipr.get_routes(dst=LAN_SUBNET.split("/")[0], dst_len=LAN_PREFIX)
            return bool(routes)

    def stop_client(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        assert self.client is not None
        if self.client.poll() is None:
            self.client.send_signal(sig)
        return self.client.wait(timeout)

    def set_path(self, i: int, up: bool) -> None:
        """The client's path ``i`` up or down (its veth in the client namespace)."""
        self.sh(self.client_ns, "link", "set", f"jcp{i}-{self.tag}", "up" if up else "down")

    def client_status(self) -> str:
        """``jvpn status`` of the client, as a person reads it."""
        argv = [*program("jvpn", "tunnel.cli"), "status", "--socket", str(self.client_socket)]
        proc = subprocess.run(
            [IP, "netns", "exec", self.client_ns, *argv], capture_output=True, text=True,
            timeout=30, check=False,
        )  # fmt: skip
        return proc.stdout + proc.stderr

    # -- observation ---------------------------------------------------------------------------

    def proxy_entries(self, name: str) -> list[str]:
        """Addresses with a proxy neighbour entry on the node's lan0."""
        out = self.sh(self.nodes[name].ns, "neigh", "show", "proxy", "dev", "lan0")
        return [line.split()[0] for line in out.splitlines() if line.strip()]

    def mac(self, ns: str, ifname: str = "lan0") -> str:
        out = self.sh(ns, "-j", "link", "show", ifname)
        return str(json.loads(out)[0]["address"])

    def server_neighbour(self, address: str = CLIENT_INNER) -> str | None:
        """The MAC the server's neighbour table holds for ``address`` (None: no entry)."""
        out = self.sh(self.server_ns, "-j", "neigh", "show", address, "dev", "lan0")
        entries = json.loads(out or "[]")
        return str(entries[0]["lladdr"]) if entries and "lladdr" in entries[0] else None

    # -- inner traffic -------------------------------------------------------------------------

    def helper(self, ns: str, code: str, *args: str) -> subprocess.Popen[bytes]:
        import sys

        proc = self.exec(
            ns, [sys.executable, "-c", code, *args], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        self._helpers.append(proc)
        return proc

    def start_download(self, nbytes: int, port: int = 5001, rate: float = 0) -> InnerTransfer:
        """The server behind the cluster sends ``nbytes`` (checksummed) to the client over an
        inner TCP connection the client opened (paced at ``rate`` bytes/s; 0: unpaced)."""
        server = self.helper(
            self.server_ns, TCP_SEND_SERVER, SERVER_LAN, str(port), str(nbytes), str(rate)
        )
        assert json.loads(read_line(server, START_TIMEOUT_S)) == {"ready": True}
        receiver = self.helper(self.client_ns, TCP_RECV_CLIENT, SERVER_LAN, str(port))
        return InnerTransfer(server, receiver)

    def announce(self, name: str, action: str, session_id: str, inner: list[str]) -> str:
        """Run tunnel/gateway/routehook.py's proxy_neighbour mechanism in node ``name``'s
        namespace, as its gateway does on acquire/release; the result line (JSON)."""
        code = (
            "import json, sys\n"
            "from tunnel.gateway.routehook import ProxyNeighbour, RouteHook\n"
            "results = []\n"
            "hook = RouteHook([ProxyNeighbour('lan0')], on_result=results.append)\n"
            "hook.start()\n"
            "getattr(hook, sys.argv[1])(sys.argv[2], sys.argv[3:])\n"
            "assert hook.wait_idle(20)\n"
            "hook.close()\n"
            "print(json.dumps({'ok': results[0].ok, 'detail': results[0].detail}))\n"
        )
        proc = self.helper(self.nodes[name].ns, code, action, session_id, *inner)
        return read_line(proc, START_TIMEOUT_S)
