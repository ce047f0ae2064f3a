"""Errors that explain (issue 13, item 6): a session that never starts says why.

docs/client.md ("When the session never starts") and docs/gateway.md ("Refused
handshakes on the console"): after the handshake deadline the client prints one stderr line
(headless) or shows it in the banner (UI) for what came back (``handshake_failure`` in
SESSION_TERMINATED and ENGINE_STOPPED: ``no_answer``, ``unverified_answer``,
``gateway_under_load``), naming its public key's fingerprint; the gateway prints a
rate-limited console line for an unknown client key (with that fingerprint) and for an INIT
made for another gateway key. Fingerprints are checked against the documented format
(``SHA256:`` + the first 16 characters of the base64 SHA-256 of the raw public key),
computed here with hashlib; exit codes come from the documented table (tests/exit_codes.py).

Levels: the core with a fake clock (what the client can tell apart), the console's rate
limit with a fake clock, the real programs over loopback (jvpn-gateway and the headless
client as processes), and the UI with a real engine.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import random
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from exit_codes import documented_exit_code
from realnet import LineLog, stop_process, wait_until

from tunnel.client.config import ClientConfig, PathConfig
from tunnel.client.engine import ClientEngine
from tunnel.core.client import ClientSession, PathSpec
from tunnel.core.constants import MSG_HANDSHAKE_INIT, MSG_HANDSHAKE_RESP
from tunnel.core.events import Reason, SecurityEvent, SessionTerminated
from tunnel.core.gateway import GatewaySessions
from tunnel.core.gateway_session import ClientEntry
from tunnel.core.handshake import RESPONSE_OVERHEAD, generate_keypair
from tunnel.core.policy import POLICY_DEFAULT, policy_to_toml
from tunnel.core.wire import pack_handshake, split_init
from tunnel.gateway.console import RefusalNotices
from tunnel.io.inner import MemoryInner
from tunnel.io.memory import MemoryLink, Simulation
from tunnel.keys import encode_key, write_private_key, write_public_key

ROOT = Path(__file__).resolve().parent.parent
NO_ANSWER = "no answer from the gateway on any path"
"""docs/client.md: the start of the line for a handshake nothing answered."""
FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{16}")

FAST = dataclasses.replace(POLICY_DEFAULT, handshake_timeout_ms=1500, handshake_attempts=3)
"""A short handshake deadline (the programs read it from a policy file)."""


def documented_fingerprint(public: bytes) -> str:
    """docs/gateway.md, "Key fingerprints"."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(public).digest()).decode()[:16]


# -- the core: what the client can tell apart -----------------------------------------------


@dataclasses.dataclass
class Pair:
    sim: Simulation
    client_public: bytes
    gateway_public: bytes

    def run_past_deadline(self) -> SessionTerminated:
        self.sim.run_until(POLICY_DEFAULT.handshake_timeout_ms / 1000 + 1.0)
        ends = [e for e in self.sim.client_events if isinstance(e, SessionTerminated)]
        assert len(ends) == 1, self.sim.client_events
        return ends[0]

    def security(self, reason: Reason) -> list[SecurityEvent]:
        return [
            e
            for e in self.sim.gateway_events
            if isinstance(e, SecurityEvent) and e.reason_code is reason
        ]


def pair(*, known: bool = True, right_gateway_key: bool = True, under_load: bool = False) -> Pair:
    """A client and a gateway over two memory links; the gateway may not know the client,
    the client may have another key for the gateway, the gateway may require cookies."""
    gw_private, gw_public = generate_keypair()
    cl_private, cl_public = generate_keypair()
    allowed = cl_public if known else generate_keypair()[1]
    configured = gw_public if right_gateway_key else generate_keypair()[1]
    client = ClientSession(
        static_private=cl_private, gateway_public=configured,
        paths=[PathSpec(1, "path1"), PathSpec(2, "path2")], policy=POLICY_DEFAULT, now=0.0,
        rng=random.Random(2),
    )  # fmt: skip
    gateway = GatewaySessions(
        static_private=gw_private, clients=[ClientEntry("alice", allowed, "10.66.0.2")],
        policy=POLICY_DEFAULT, now=0.0, urandom=random.Random(3).randbytes,
        rng=random.Random(4),
    )  # fmt: skip
    if under_load:
        gateway.admission.set_cookie_threshold(1.0)
    rng = random.Random(1)
    sim = Simulation(client, gateway, [MemoryLink(i, rng=rng) for i in (1, 2)])
    sim.start()
    return Pair(sim, cl_public, gw_public)


def test_unknown_client_key_is_no_answer_and_the_gateway_names_the_key() -> None:
    p = pair(known=False)
    end = p.run_past_deadline()
    assert end.reason_code is Reason.HANDSHAKE_FAILED
    assert end.to_dict()["handshake_failure"] == "no_answer"
    refused = p.security(Reason.UNKNOWN_CLIENT_KEY)
    assert refused, p.sim.gateway_events
    assert {e.key_fingerprint for e in refused} == {documented_fingerprint(p.client_public)}
    assert all(e.source for e in refused)
    assert not p.security(Reason.WRONG_GATEWAY_KEY)


def test_wrong_gateway_key_is_no_answer_for_the_client_and_reported_by_the_gateway() -> None:
    """mac1 is keyed with the gateway's public key: a gateway stays silent to an INIT made
    for another key, so the client cannot tell it from silence; the gateway can."""
    p = pair(right_gateway_key=False)
    end = p.run_past_deadline()
    assert end.to_dict()["handshake_failure"] == "no_answer"
    wrong = p.security(Reason.WRONG_GATEWAY_KEY)
    assert wrong and all(e.source for e in wrong)
    assert not p.security(Reason.UNKNOWN_CLIENT_KEY)


def test_a_gateway_under_load_that_sends_only_cookies_is_its_own_case() -> None:
    p = pair(known=False, under_load=True)
    end = p.run_past_deadline()
    assert end.to_dict()["handshake_failure"] == "gateway_under_load"
    assert p.sim.gateway.drops.get("cookie_required", 0) >= 1  # it did answer with cookies


def test_an_answer_that_does_not_verify_is_its_own_case() -> None:
    """Something answers each INIT with a HANDSHAKE_RESP that is not from the configured
    gateway key (forged here); the real gateway does not know the client."""
    p = pair(known=False)
    forged: list[bytes] = []

    def forge(delivery: Any) -> None:
        if delivery.to_gateway and delivery.data[0] == MSG_HANDSHAKE_INIT and not forged:
            sender_index = split_init(delivery.data)[0]
            noise = random.Random(5).randbytes(RESPONSE_OVERHEAD + 64)
            forged.append(pack_handshake(MSG_HANDSHAKE_RESP, sender_index, 77, noise))
            p.sim.inject_to_client(forged[-1], delivery.path_id, delay=0.01)

    p.sim.taps.append(forge)
    end = p.run_past_deadline()
    assert forged
    assert p.sim.client.drops.get("handshake_failed", 0) >= 1  # it did arrive, and failed
    assert end.to_dict()["handshake_failure"] == "unverified_answer"


def test_a_session_that_starts_carries_no_handshake_failure() -> None:
    p = pair()
    p.sim.run_until(1.0)
    assert any(str(e.event_type) == "SESSION_CREATED" for e in p.sim.client_events)
    p.sim.client.terminate(p.sim.now)
    p.sim.run_until(1.5)
    ends = [e for e in p.sim.client_events if isinstance(e, SessionTerminated)]
    assert ends[0].to_dict()["handshake_failure"] is None


# -- jvpn-keygen prints the same fingerprints -------------------------------------------------


def test_keygen_prints_the_documented_fingerprint(tmp_path: Path) -> None:
    wrote = subprocess.run(
        [sys.executable, "-m", "tunnel.keygen", "--out", str(tmp_path / "alice")],
        capture_output=True, text=True, cwd=ROOT, check=True,
    ).stdout  # fmt: skip
    public = base64.b64decode((tmp_path / "alice.pub").read_text())
    assert f"fingerprint {documented_fingerprint(public)}" in wrote
    printed = subprocess.run(
        [sys.executable, "-m", "tunnel.keygen", "fingerprint"],
        input=(tmp_path / "alice.pub").read_text(), capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert (printed.returncode, printed.stdout) == (0, documented_fingerprint(public) + "\n")
    bad = subprocess.run(
        [sys.executable, "-m", "tunnel.keygen", "fingerprint"],
        input="not a key", capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert bad.returncode == 2 and bad.stdout == "" and len(bad.stderr.splitlines()) == 1


# -- the gateway's console lines: rate limit and accounting --------------------------------


def refused(source: str, key: str, count: int = 1, reason: Reason = Reason.UNKNOWN_CLIENT_KEY
            ) -> SecurityEvent:  # fmt: skip
    base = {"ts_ms": 0, "session_id": "", "node_id": "gw", "policy_version": "1",
            "state_version": 0}  # fmt: skip
    return SecurityEvent(
        **base, violation_type="UNKNOWN_CLIENT", reason_code=reason, count=count,
        source=source, key_fingerprint=key,
    )  # fmt: skip


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_console_one_line_per_source_and_key_per_interval_and_the_lines_add_up() -> None:
    lines: list[str] = []
    clock = Clock()
    notices = RefusalNotices(lines.append, "SHA256:gatewaygatewayga", repeat_s=30.0, clock=clock)
    events = [
        refused("192.0.2.7:4000", "SHA256:aaaaaaaaaaaaaaaa", count=1),
        refused("192.0.2.7:4001", "SHA256:aaaaaaaaaaaaaaaa", count=3),  # same host and key
        refused("192.0.2.8:4000", "SHA256:aaaaaaaaaaaaaaaa", count=2),  # another host
    ]
    for event in events:
        notices.on_event(event)
        clock.now += 1.0
    assert len(lines) == 2
    assert "192.0.2.7:4000" in lines[0] and "SHA256:aaaaaaaaaaaaaaaa" in lines[0]
    assert "not shown" not in lines[0]
    # the second line names its source; 3 suppressed + 1 folded into its own report
    assert "192.0.2.8:4000" in lines[1] and "4 more not shown" in lines[1]
    clock.now += 30.0
    notices.on_event(refused("192.0.2.7:4002", "SHA256:aaaaaaaaaaaaaaaa"))
    assert len(lines) == 3 and "not shown" not in lines[2]
    # accounting: every refusal is named by a line or counted in one
    shown = len(lines) + sum(int(m) for m in re.findall(r"(\d+) more not shown", "".join(lines)))
    assert shown == sum(e.count for e in events) + 1


def test_console_names_the_gateway_key_for_an_init_made_for_another_key() -> None:
    lines: list[str] = []
    notices = RefusalNotices(lines.append, "SHA256:gatewaygatewayga", clock=Clock())
    notices.on_event(refused("[2001:db8::1]:5", "", reason=Reason.WRONG_GATEWAY_KEY))
    assert len(lines) == 1
    assert "[2001:db8::1]:5" in lines[0] and "SHA256:gatewaygatewayga" in lines[0]
    assert "another gateway key" in lines[0]


def test_console_source_table_is_bounded() -> None:
    lines: list[str] = []
    clock = Clock()
    notices = RefusalNotices(lines.append, "k", max_sources=4, clock=clock)
    for i in range(10):
        notices.on_event(refused(f"192.0.2.{i}:1", "SHA256:aaaaaaaaaaaaaaaa"))
    assert len(lines) == 10  # distinct sources each get their line
    notices.on_event(refused("192.0.2.0:1", "SHA256:aaaaaaaaaaaaaaaa"))
    assert len(lines) == 11  # forgotten (the table holds 4): a line again, not a leak
    notices.on_event(refused("192.0.2.9:1", "SHA256:aaaaaaaaaaaaaaaa"))
    assert len(lines) == 11  # still remembered


# -- the real programs over loopback --------------------------------------------------------


def free_udp_port() -> int:
    """A loopback UDP port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def policy_file(directory: Path) -> Path:
    path = directory / "policy.toml"
    path.write_text(policy_to_toml(FAST))
    return path


@dataclasses.dataclass
class Keys:
    client: bytes
    gateway: bytes
    other: bytes
    """A public key nobody uses (a wrong gateway key, an allow-list entry for a stranger)."""


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    publics = {}
    for name in ("client", "gateway", "other"):
        private, public = generate_keypair()
        write_private_key(tmp_path / f"{name}.key", private)
        write_public_key(tmp_path / f"{name}.pub", public)
        publics[name] = public
    return Keys(publics["client"], publics["gateway"], publics["other"])


class Gateway:
    """jvpn-gateway as a process (inner_echo: no TUN, no root), its stderr read line by line."""

    def __init__(self, directory: Path, allowed: str) -> None:
        config = directory / "gateway.toml"
        config.write_text(
            'node_id = "gw-e"\nlisten = ["127.0.0.1:0"]\nprivate_key = "gateway.key"\n'
            'inner_echo = true\nworkers = 1\n[control]\nsocket = "off"\n[state]\nstore = "memory"\n'
            '[tun]\nsubnet = "10.70.0.0/29"\n'
            f'[[clients]]\nname = "alice"\npublic_key = "{allowed}"\n'
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tunnel.gateway.main", "--config", str(config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT,
        )  # fmt: skip
        assert self.proc.stderr is not None
        self.err = LineLog(self.proc.stderr, "gateway stderr")
        wait_until(
            lambda: any("listening on" in line for line in self.err.lines) or self.err.closed,
            30, "the gateway's ready line",
        )  # fmt: skip
        ready = next(line for line in self.err.lines if "listening on" in line)
        host_port = ready.split("listening on ", 1)[1].split(",", 1)[0]
        self.port = int(host_port.rsplit(":", 1)[1])
        self.ready = ready

    def stop(self) -> None:
        stop_process(self.proc)
        self.err.join(5)


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[list[Gateway]]:
    started: list[Gateway] = []
    yield started
    for gw in started:
        gw.stop()


def run_client(
    directory: Path, port: int, gateway_key: str
) -> tuple[int, list[dict[str, Any]], str]:
    """The headless client (``jvpn-tui --headless``) to 127.0.0.1:``port`` over two paths,
    memory inner side; returns (exit status, JSON lines, stderr)."""
    config = directory / "client.toml"
    config.write_text(
        f'private_key = "client.key"\ngateway_public_key = "{gateway_key}"\n'
        f'policy = "{policy_file(directory).name}"\ncontrol_socket = "off"\n'
        '[inner]\nkind = "memory"\n'
        f'[[path]]\nname = "one"\ngateway = "127.0.0.1:{port}"\n'
        f'[[path]]\nname = "two"\ngateway = "127.0.0.1:{port}"\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "jvpn_tui", "--headless", "--config", str(config)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert events, proc.stderr
    return proc.returncode, events, proc.stderr


def stopped(events: list[dict[str, Any]]) -> dict[str, Any]:
    assert events and events[-1]["event_type"] == "ENGINE_STOPPED", events[-3:]
    return events[-1]


def the_line(stderr: str) -> str:
    """The client's one stderr line (nothing else is written there)."""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def test_program_unknown_key_both_sides_name_the_same_fingerprint(
    tmp_path: Path, keys: Keys, gateways: list[Gateway]
) -> None:
    gw = Gateway(tmp_path, "other.pub")  # the gateway allows someone else
    gateways.append(gw)
    code, events, stderr = run_client(tmp_path, gw.port, "gateway.pub")
    end = stopped(events)
    assert end["final_reason"] == "handshake_failed"
    assert code == end["exit_code"] == documented_exit_code("handshake_failed")
    assert end["handshake_failure"] == "no_answer"
    line = the_line(stderr)
    fp = documented_fingerprint(keys.client)
    assert NO_ANSWER in line and fp in line
    assert encode_key(keys.client) not in line  # a fingerprint, not the key
    wait_until(lambda: any("unknown client key" in x for x in gw.err.lines), 30,
               "the gateway's console line")  # fmt: skip
    console = [x for x in gw.err.lines if "unknown client key" in x]
    assert len(console) == 1  # rate-limited: the client sent 3 INITs on each of 2 paths
    assert fp in console[0] and "127.0.0.1:" in console[0]


def test_program_wrong_port_is_no_answer_and_says_what_the_network_said(
    tmp_path: Path, keys: Keys
) -> None:
    code, events, stderr = run_client(tmp_path, free_udp_port(), "gateway.pub")
    end = stopped(events)
    assert code == end["exit_code"] == documented_exit_code("handshake_failed")
    assert end["handshake_failure"] == "no_answer"
    line = the_line(stderr)
    assert NO_ANSWER in line and documented_fingerprint(keys.client) in line
    assert "port unreachable" in line  # loopback answers a closed port with ICMP


def test_program_wrong_gateway_key_each_side_says_what_it_can_know(
    tmp_path: Path, keys: Keys, gateways: list[Gateway]
) -> None:
    gw = Gateway(tmp_path, "client.pub")
    gateways.append(gw)
    gateway_fp = documented_fingerprint(keys.gateway)
    configured_fp = documented_fingerprint(keys.other)
    assert f"key {gateway_fp}" in gw.ready  # the gateway names its own key at start
    code, events, stderr = run_client(tmp_path, gw.port, "other.pub")
    end = stopped(events)
    assert code == end["exit_code"] == documented_exit_code("handshake_failed")
    assert end["handshake_failure"] == "no_answer"
    line = the_line(stderr)
    assert NO_ANSWER in line and configured_fp in line  # the key it used, to compare
    wait_until(lambda: any("another gateway key" in x for x in gw.err.lines), 30,
               "the gateway's console line")  # fmt: skip
    console = [x for x in gw.err.lines if "another gateway key" in x]
    assert len(console) == 1 and gateway_fp in console[0] and "127.0.0.1:" in console[0]
    assert not any("unknown client key" in x for x in gw.err.lines)


def test_program_a_session_that_starts_writes_nothing_on_stderr(
    tmp_path: Path, keys: Keys, gateways: list[Gateway]
) -> None:
    gw = Gateway(tmp_path, "client.pub")
    gateways.append(gw)
    config = tmp_path / "client.toml"
    config.write_text(
        'private_key = "client.key"\ngateway_public_key = "gateway.pub"\n'
        'control_socket = "off"\n[inner]\n'
        f'kind = "memory"\n[[path]]\nname = "one"\ngateway = "127.0.0.1:{gw.port}"\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "jvpn_tui", "--headless", "--config", str(config),
         "--duration", "1"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    end = stopped([json.loads(line) for line in proc.stdout.splitlines()])
    assert proc.returncode == documented_exit_code("operator_terminated")
    assert end["handshake_failure"] is None and proc.stderr == ""
    assert not any("refused a handshake" in x for x in gw.err.lines)


# -- the UI: the banner, with a real engine -------------------------------------------------


def test_ui_banner_explains_a_handshake_nothing_answered(tmp_path: Path) -> None:
    from test_tui_pilot import SIZE, text_of, wait_for

    from jvpn_tui.app import JvpnApp
    from jvpn_tui.widgets import EngineBanner

    private, public = generate_keypair()
    _, gateway_public = generate_keypair()
    port = free_udp_port()
    paths = tuple(
        PathConfig(i, f"lo{i}", ("127.0.0.1", 0), None, ("127.0.0.1", port)) for i in (1, 2)
    )
    config = ClientConfig(
        private_key=private, gateway_public_key=gateway_public, paths=paths, policy=FAST
    )
    engine = ClientEngine(config, inner=MemoryInner())

    async def run() -> str:
        app = JvpnApp(engine)
        async with app.run_test(size=SIZE) as pilot:
            banner = app.query_one(EngineBanner)
            for _ in range(3000):  # the handshake deadline is the engine's: wait, bounded
                if engine.join(0) and banner.display:
                    break
                await pilot.pause(0.02)
            await wait_for(pilot, lambda: NO_ANSWER in text_of(banner), "the explanation")
            return text_of(banner)

    text = asyncio.run(run())
    engine.stop()
    assert "handshake_failed" in text
    assert NO_ANSWER in text and documented_fingerprint(public) in text
    assert documented_fingerprint(gateway_public) in text
    assert encode_key(private) not in text and encode_key(public) not in text
    assert FINGERPRINT.search(text)


def test_events_doc_lists_the_handshake_failure_values() -> None:
    """docs/events.md (generated) documents the field and its values for a reader."""
    doc = (ROOT / "docs" / "events.md").read_text()
    assert "`handshake_failure`" in doc
    client_doc = (ROOT / "docs" / "client.md").read_text()
    for value in ("no_answer", "unverified_answer", "gateway_under_load"):
        assert f"`{value}`" in client_doc
