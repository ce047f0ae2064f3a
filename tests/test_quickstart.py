"""The README's quick start, run as written: keys, gateway, client, a ping, a path taken down.

The commands come from the README itself: every ```` ```sh ```` block after a
``<!-- quickstart: HOST -->`` comment runs, unchanged, with ``sh -e`` on that host;
``<!-- quickstart: HOST, keeps running -->`` starts a program that runs until Ctrl-C;
``<!-- quickstart: copy HOST:FILE HOST:DIR -->`` is the one step the prose describes
instead of a command (handing a public key to the other machine), done by the test.

The two hosts are two network namespaces made to look like the example files: the
client has the links ``eth0`` and ``wwan0``, each with its own route to the gateway's
address 203.0.113.10 (a documentation address, real only inside the namespaces); each
host has its own ``$HOME`` and runs in a directory that holds the clone's ``docs/``, the
venv's ``bin`` first on ``PATH`` (the programs a user types: ``jvpn-keygen``,
``jvpn-gateway``, ``jvpn-tui``). Needs root (namespaces, TUN): CI runs it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from netns import Topology, child_env, require_tun
from realnet import (
    START_TIMEOUT_S,
    SUT_NICE,
    LineLog,
    host_leftovers,
    stop_process,
    wait_until,
)

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

GATEWAY_ADDRESS = "203.0.113.10"
"""docs/examples/client.toml: both paths go to 203.0.113.10:51820."""
CLIENT_LINKS = (("eth0", "192.168.1.20"), ("wwan0", "100.64.0.2"))
"""The client's links as the example names them (path 1 ``wired``, path 2 ``lte``), each
with an address of its own network (192.168.1.20 is the example's commented ``bind``)."""
GATEWAY_INNER = "10.66.0.1"
CLIENT_INNER = "10.66.0.2"
"""docs/examples/gateway.toml: the gateway is 10.66.0.1 in 10.66.0.0/24, alice 10.66.0.2."""
TUN = "jvpn0"
"""The client's TUN (its example names it)."""
TUN_RE = r"jvpn\d+"
"""The gateway's ``jvpn%d``: the kernel numbers it (a worker per core: one each)."""

_MARKER = re.compile(r"^<!-- quickstart: (.+?) -->$", re.M)
_BLOCK = re.compile(r"\s*```sh\n(.*?)^```$", re.S | re.M)

# -- the steps, from the README ------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One marked step of the quick start."""

    host: str
    """``gateway`` or ``client`` (for a copy: the source host)."""
    kind: str
    """``run`` (must exit 0), ``keeps running`` or ``copy``."""
    body: str = ""
    """The commands (run, keeps running) or ``HOST:FILE HOST:DIR`` (copy)."""


def quickstart_steps(text: str) -> list[Step]:
    """The marked steps of a Markdown text, in order."""
    steps = []
    for marker in _MARKER.finditer(text):
        spec = [part.strip() for part in marker.group(1).split(",")]
        if spec[0].startswith("copy "):
            source, dest = spec[0].removeprefix("copy ").split()
            steps.append(Step(source.split(":", 1)[0], "copy", f"{source} {dest}"))
            continue
        block = _BLOCK.match(text, marker.end())
        assert block, f"no ```sh block right after {marker.group(0)}"
        kind = "keeps running" if spec[1:] == ["keeps running"] else "run"
        assert spec[1:] in ([], ["keeps running"]) and spec[0] in ("gateway", "client"), spec
        steps.append(Step(spec[0], kind, block.group(1)))
    return steps


def commands(step: Step) -> list[str]:
    """The command lines of a step, comments and blank lines left out."""
    lines = (line.split("#", 1)[0].strip() for line in step.body.splitlines())
    return [line for line in lines if line]


def test_the_quick_start_is_what_a_user_types() -> None:
    """The marked blocks are there, in the order of a first setup, and use the installed
    programs by name (no ``python -m``, no ``.venv/bin/``, no ``sudo`` that would lose
    the venv's PATH)."""
    steps = quickstart_steps(README.read_text(encoding="utf-8"))
    assert [(s.host, s.kind) for s in steps] == [
        ("gateway", "run"),
        ("client", "run"),
        ("client", "copy"),
        ("gateway", "copy"),
        ("gateway", "keeps running"),
        ("client", "keeps running"),
        ("client", "run"),
        ("client", "run"),
        ("client", "run"),
    ]
    typed = [line for s in steps if s.kind != "copy" for line in commands(s)]
    programs = {line.split()[0] for line in typed}
    assert {"jvpn-keygen", "jvpn-gateway", "jvpn-tui"} <= programs
    assert not [line for line in typed if re.search(r"python|\.venv|sudo", line)], typed
    assert "jvpn-gateway --config ~/jvpn/gateway.toml" in typed
    assert "jvpn-tui --headless --config ~/jvpn/client.toml" in typed


def test_the_gateway_docs_quote_the_quick_start() -> None:
    """docs/gateway.md repeats the gateway's commands: they are the README's, verbatim."""
    readme = {
        line for s in quickstart_steps(README.read_text(encoding="utf-8")) for line in commands(s)
    }
    text = (REPO / "docs" / "gateway.md").read_text(encoding="utf-8")
    section = text[text.index("## Quick start") :]
    quoted = commands(Step("gateway", "run", _BLOCK.search(section).group(1)))  # type: ignore[union-attr]
    assert quoted and set(quoted) <= readme, quoted


# -- the two hosts -------------------------------------------------------------------------


class QuickstartHosts:
    """A gateway and a client namespace shaped like the example files (see module doc)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.topo = Topology(n_paths=len(CLIENT_LINKS))
        self.clone = tmp / "clone"
        self.home = {"gateway": tmp / "gateway-home", "client": tmp / "client-home"}
        self.running: dict[str, subprocess.Popen[bytes]] = {}
        self.stdout: dict[str, LineLog] = {}
        self.stderr: dict[str, LineLog] = {}

    def ns(self, host: str) -> str:
        return self.topo.gateway_ns if host == "gateway" else self.topo.client_ns

    def open(self) -> QuickstartHosts:
        self.topo.open()
        self.clone.mkdir()
        (self.clone / "docs").symlink_to(REPO / "docs", target_is_directory=True)
        for home in self.home.values():
            home.mkdir()
        self._shape_links()
        return self

    def _shape_links(self) -> None:
        """Client: the veths become eth0 and wwan0 with their own addresses and a route
        each to 203.0.113.10; gateway: 203.0.113.10 on lo, a route back to each."""
        client = self.topo.ipr(self.topo.client_ns)
        gateway = self.topo.ipr(self.topo.gateway_ns)
        lo = gateway.link_lookup(ifname="lo")[0]
        gateway.addr("add", index=lo, address=GATEWAY_ADDRESS, prefixlen=32)
        for metric, (link, (name, address)) in enumerate(
            zip(self.topo.paths, CLIENT_LINKS, strict=True), 1
        ):
            c = client.link_lookup(ifname=link.client_ifname)[0]
            client.link("set", index=c, state="down")
            client.addr("del", index=c, address=link.client_ip, prefixlen=24)
            client.link("set", index=c, ifname=name)
            client.addr("add", index=c, address=address, prefixlen=24)
            client.link("set", index=c, state="up")
            client.route(
                "add", dst=f"{GATEWAY_ADDRESS}/32", oif=c, scope=253, priority=100 * metric
            )
            g = gateway.link_lookup(ifname=link.gateway_ifname)[0]
            gateway.addr("del", index=g, address=link.gateway_ip, prefixlen=24)
            gateway.route("add", dst=f"{address}/32", oif=g, scope=253, prefsrc=GATEWAY_ADDRESS)

    def env(self, host: str) -> dict[str, str]:
        """What a root shell on that host has after the README's Install: the venv's bin
        first on PATH, its own HOME."""
        path = os.pathsep.join(
            [str(Path(sys.executable).parent), os.environ.get("PATH", ""), "/usr/sbin:/sbin"]
        )
        return child_env({"HOME": str(self.home[host]), "PATH": path})

    def path(self, spec: str) -> Path:
        """``HOST:~/x`` -> that host's file."""
        host, _, where = spec.partition(":")
        assert where.startswith("~/"), spec
        return self.home[host] / where.removeprefix("~/")

    # -- the three kinds of step ------------------------------------------------------

    def run(self, step: Step) -> str:
        proc = self.topo.run(
            self.ns(step.host), ["sh", "-ec", step.body], timeout=60.0, cwd=self.clone,
            env=self.env(step.host),
        )  # fmt: skip
        assert proc.returncode == 0, (
            f"{step.host}$ {step.body}\nexit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
        return proc.stdout

    def copy(self, step: Step) -> None:
        source, dest = step.body.split()
        shutil.copy(self.path(source), self.path(dest))

    def start(self, step: Step) -> None:
        """Start the block in the background, as in a terminal of its own (own session,
        so Ctrl-C is a SIGINT to its process group)."""
        assert step.host not in self.running, step
        proc = self.topo.exec(
            self.ns(step.host), ["sh", "-ec", step.body], cwd=self.clone, env=self.env(step.host),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
            preexec_fn=lambda: os.setpriority(os.PRIO_PROCESS, 0, SUT_NICE),
        )  # fmt: skip
        assert proc.stdout is not None and proc.stderr is not None
        self.running[step.host] = proc
        self.stdout[step.host] = LineLog(proc.stdout, f"{step.host}-stdout")
        self.stderr[step.host] = LineLog(proc.stderr, f"{step.host}-stderr")

    def ctrl_c(self, host: str) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.running[host].pid, signal.SIGINT)

    # -- observation ------------------------------------------------------------------

    def tun_addresses(self, host: str) -> list[str] | None:
        """IPv4 addresses of the host's jvpn0, or None while it does not exist."""
        ipr = self.topo.ipr(self.ns(host))
        index = ipr.link_lookup(ifname=TUN)
        if not index:
            return None
        return [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=index[0], family=2)]

    def close(self) -> None:
        for proc in self.running.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
            stop_process(proc)
        try:
            self.topo.close()
        finally:
            assert not host_leftovers(self.topo.tag)


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[QuickstartHosts]:
    require_tun()
    if shutil.which("ping") is None:
        pytest.skip("ping not found (apt-get install iputils-ping; `make test` does)")
    qs = QuickstartHosts(tmp_path)
    try:
        yield qs.open()
    finally:
        qs.close()


def _received(ping_output: str) -> int:
    m = re.search(r"(\d+) packets transmitted, (\d+) received", ping_output)
    assert m, ping_output
    return int(m.group(2))


def _wait_ready(hosts: QuickstartHosts, step: Step) -> None:
    """What the README tells the reader to wait for after starting a program."""
    if "jvpn-gateway" in step.body:
        line = hosts.stderr["gateway"]
        done = re.compile(r"node gw1 listening on|node gw1: \d+ workers ready")
        wait_until(
            lambda: any(done.search(x) for x in line.lines) or line.closed,
            START_TIMEOUT_S, "jvpn-gateway's listening line",
        )  # fmt: skip
        # as the README quotes it: one process, or worker 0 of one per core (the default)
        quoted = re.compile(
            rf"jvpn-gateway: node gw1(-w0)? listening on 0\.0\.0\.0:51820, inner {TUN_RE} "
            rf"{re.escape(GATEWAY_INNER)}/24"
        )
        ready = [x for x in line.lines if quoted.match(x)]
        assert ready, "jvpn-gateway did not start:\n" + "\n".join(line.lines)
    else:
        events = hosts.stdout["client"]
        events.wait_type("STATE_CHANGE", START_TIMEOUT_S, new_state="ATTACHED")
        wait_until(
            lambda: CLIENT_INNER in (hosts.tun_addresses("client") or []),
            START_TIMEOUT_S, "the client's TUN address",
        )  # fmt: skip


@pytest.mark.root
def test_the_quick_start_runs_as_written(hosts: QuickstartHosts) -> None:
    steps = quickstart_steps(README.read_text(encoding="utf-8"))
    pings: list[str] = []
    for step in steps:
        if step.kind == "copy":
            hosts.copy(step)
        elif step.kind == "keeps running":
            hosts.start(step)
            _wait_ready(hosts, step)
        elif "ping" in step.body:
            pings.append(hosts.run(step))
        else:
            hosts.run(step)
            if re.search(r"\bip link set eth0 down\b", step.body):
                hosts.stdout["client"].wait_type("TRANSPORT_SWITCH", 15.0, new_transport=2)

    # the ping went through the tunnel, before and after the path was taken down
    assert [_received(out) for out in pings] == [3, 3], pings
    events = hosts.stdout["client"]
    _the_session_survived(events)
    assert hosts.tun_addresses("client") == [CLIENT_INNER]
    # the sinks the examples configure wrote next to the configuration files
    # (worker K of a gateway with several writes gateway-events.jsonl.K)
    gateway_log = "".join(
        p.read_text() for p in (hosts.home["gateway"] / "jvpn").glob("gateway-events.jsonl*")
    )
    assert '"event_type":"SESSION_CREATED"' in gateway_log.replace(" ", "")
    assert '"peer":"alice"' in gateway_log.replace(" ", "")
    assert (hosts.home["client"] / "jvpn" / "client-events.jsonl").stat().st_size > 0

    # "Ctrl-C in the client's terminal ends the session explicitly ... removes the TUN"
    hosts.ctrl_c("client")
    stopped = events.wait_type("ENGINE_STOPPED", 20.0)
    assert (stopped["final_reason"], stopped["exit_code"]) == ("operator_terminated", 0)
    wait_until(lambda: hosts.tun_addresses("client") is None, 10.0, "the client's TUN gone")
    gateway_err = hosts.stderr["gateway"]
    hosts.ctrl_c("gateway")
    wait_until(lambda: gateway_err.closed, 20.0, "jvpn-gateway to stop")
    # the example's sqlite store keeps the sessions (README, docs/gateway.md "[state]")
    assert any("stopped; sessions kept in the store, host restored" in x for x in gateway_err.lines)
    assert hosts.tun_addresses("gateway") is None


def _the_session_survived(events: LineLog) -> None:
    """One session from start to end: created once, path 1 declared dead, a switch to
    path 2 (lte), no termination, every event with the same session id."""
    created = events.of_type("SESSION_CREATED")
    assert len(created) == 1 and created[0]["inner_address"] == CLIENT_INNER, created
    ids = {e["session_id"] for e in events.events if e.get("session_id")}
    assert ids == {created[0]["session_id"]}, ids
    types = [e.get("event_type") for e in events.events]
    dead = [e for e in events.of_type("TRANSPORT_DEAD") if e["transport_id"] == 1]
    switch = events.of_type("TRANSPORT_SWITCH", new_transport=2)
    assert dead and switch, types
    assert events.events.index(dead[0]) < events.events.index(switch[0])
    assert "SESSION_TERMINATED" not in types
