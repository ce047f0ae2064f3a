"""Issue 11 item 6: ``clients_dir``, one small TOML file per client (docs/gateway.md
"Many clients: clients_dir").

Parsing (names from the file or a ``name`` key, the [[clients]] keys and checks),
duplicates across inline tables and files, bad files skipped with their name, 10,000
clients, and the reload (SIGHUP): clients added, removed (their sessions end with
operator_terminated), changed, bad files reported, pool addresses stable for clients that
stay. Sessions are real: ClientSessions against a real GatewaySessions (tests/crowd.py).
"""

from __future__ import annotations

import ipaddress
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.crowd import Crowd, Member
from tunnel.core.drops import Drop
from tunnel.core.events import EventType, PolicyEvent, Reason
from tunnel.core.gateway import GatewaySessions
from tunnel.core.handshake import generate_keypair
from tunnel.core.policy import POLICY_DEFAULT
from tunnel.core.session import State
from tunnel.gateway.clients_reload import (
    CLIENT_FILE_INVALID,
    CLIENTS_RELOADED,
    ClientsReloader,
)
from tunnel.gateway.config import (
    MAX_CONFIG_SIZE,
    ConfigError,
    GatewayConfig,
    load_gateway_config,
)
from tunnel.keys import encode_key, write_private_key

REPO = Path(__file__).resolve().parents[1]

HEAD = """\
node_id = "gw-d"
listen = ["127.0.0.1:0"]
private_key = "gateway.key"
inner_echo = true
workers = 1
clients_dir = "clients.d"
[control]
socket = "off"
[state]
store = "memory"
[tun]
subnet = "10.71.0.0/24"
"""

KEYS: dict[str, tuple[bytes, bytes]] = {}


def keypair(name: str) -> tuple[bytes, bytes]:
    """A fixed keypair per client name (within one test run)."""
    if name not in KEYS:
        KEYS[name] = generate_keypair()
    return KEYS[name]


def inline(name: str, address: str | None = None) -> str:
    extra = f'address = "{address}"\n' if address else ""
    return f'[[clients]]\nname = "{name}"\npublic_key = "{encode_key(keypair(name)[1])}"\n{extra}'


def client_file(d: Path, stem: str, body: str | None = None, **keys: str) -> Path:
    """``d/stem.toml``: ``body`` as is, else ``public_key`` of ``stem`` plus ``keys``."""
    path = d / f"{stem}.toml"
    if body is None:
        keys.setdefault("public_key", encode_key(keypair(keys.get("name", stem))[1]))
        body = "".join(f'{k} = "{v}"\n' for k, v in keys.items())
    path.write_text(body)
    return path


@pytest.fixture
def confdir(tmp_path: Path) -> Path:
    write_private_key(tmp_path / "gateway.key", generate_keypair()[0])
    (tmp_path / "clients.d").mkdir()
    return tmp_path


def load(confdir: Path, extra: str = "") -> GatewayConfig:
    path = confdir / "gateway.toml"
    path.write_text(HEAD + extra)
    return load_gateway_config(path)


def addresses(config_or_clients: GatewayConfig | tuple) -> dict[str, str]:
    clients = getattr(config_or_clients, "clients", config_or_clients)
    return {c.name: c.inner_address for c in clients}


# -- parsing -------------------------------------------------------------------------------


def test_files_load_after_the_inline_clients_in_name_order(confdir: Path) -> None:
    d = confdir / "clients.d"
    client_file(d, "bob")
    client_file(d, "zed", name="carol", address="10.71.0.50")
    client_file(d, "anna")
    (d / "notes.txt").write_text("not a client")
    (d / ".hidden.toml").write_text("garbage")
    (d / "bob.toml~").write_text("garbage")
    config = load(confdir, inline("alice"))
    assert addresses(config) == {
        "alice": "10.71.0.2", "anna": "10.71.0.3", "bob": "10.71.0.4", "carol": "10.71.0.50",
    }  # fmt: skip
    assert {c.name: c.public_key for c in config.clients}["carol"] == keypair("carol")[1]
    assert config.client_file_errors == ()
    assert config.clients_dir == confdir / "clients.d"


def test_a_clients_dir_alone_may_start_empty_but_no_clients_at_all_is_refused(
    confdir: Path,
) -> None:
    assert load(confdir).clients == ()
    path = confdir / "gateway.toml"
    path.write_text(HEAD.replace('clients_dir = "clients.d"\n', ""))
    with pytest.raises(ConfigError, match=r"clients: missing: .*\[\[clients\]\].*clients_dir"):
        load_gateway_config(path)
    path.write_text(HEAD.replace('"clients.d"', '"nowhere"'))
    with pytest.raises(ConfigError, match=r"clients_dir: .*/nowhere is not a directory"):
        load_gateway_config(path)


@pytest.mark.parametrize(
    ("stem", "body", "message"),
    [
        ("broken", "public_key = ", "(syntax): invalid TOML"),
        ("extra", None, "colour = 'blue': unknown key"),
        ("nokey", 'address = "10.71.0.9"\n', "public_key: missing (required)"),
        ("badkey", 'public_key = "bm90IGEga2V5"\n', "public_key = 'bm90IGEga2V5'"),
        ("outside", None, "address = '10.99.0.1': not in the inner subnet"),
        ("-dash", None, "name = '-dash': 1-64 characters"),
        ("six", None, "address6 = '2001:db8::1': needs tun.subnet6"),
    ],
)
def test_a_bad_file_is_skipped_with_its_name_and_the_others_load(
    confdir: Path, stem: str, body: str | None, message: str
) -> None:
    d = confdir / "clients.d"
    client_file(d, "good")
    extra = {"extra": {"colour": "blue"}, "outside": {"address": "10.99.0.1"},
             "six": {"address6": "2001:db8::1"}}.get(stem, {})  # fmt: skip
    bad = client_file(d, stem, body, **extra)
    client_file(d, "zz-good")
    config = load(confdir, inline("alice"))
    assert sorted(addresses(config)) == ["alice", "good", "zz-good"]
    [error] = config.client_file_errors
    assert error.file == str(bad)
    assert str(error).startswith(f"{bad}: ") and message in str(error), str(error)


def test_duplicates_across_inline_clients_and_files_name_both_places(confdir: Path) -> None:
    d = confdir / "clients.d"
    same_name = client_file(d, "alice", public_key=encode_key(keypair("other")[1]))
    same_key = client_file(d, "mallory", public_key=encode_key(keypair("alice")[1]))
    same_address = client_file(d, "dave", address="10.71.0.9")
    # dave's file failed half-way (name and key were fine): it must claim nothing
    eve = client_file(d, "eve", public_key=encode_key(keypair("dave")[1]))
    config = load(confdir, inline("alice", "10.71.0.9"))
    assert sorted(addresses(config)) == ["alice", "eve"]
    errors = {e.file: str(e) for e in config.client_file_errors}
    assert set(errors) == {str(same_name), str(same_key), str(same_address)}
    assert "another client has this name (clients[0] in gateway.toml)" in errors[str(same_name)]
    assert "same key as client 'alice' (clients[0] in gateway.toml)" in errors[str(same_key)]
    assert "already used by client 'alice'" in errors[str(same_address)]
    assert {c.name: c.public_key for c in config.clients}["eve"] == keypair("dave")[1]
    assert str(eve) not in errors
    # two files for one name: the first in name order wins, the second is named
    client_file(d, "x1", name="twin")
    second = client_file(d, "x2", name="twin", public_key=encode_key(keypair("t2")[1]))
    config = load(confdir, inline("alice", "10.71.0.9"))
    assert (
        f"another client has this name ({d / 'x1.toml'})"
        in {e.file: str(e) for e in config.client_file_errors}[str(second)]
    )


def test_ten_thousand_clients_inline_are_too_large_but_load_from_clients_dir(
    confdir: Path,
) -> None:
    n = 10_000
    publics = [encode_key(generate_keypair()[1]) for _ in range(n)]
    head = HEAD.replace("10.71.0.0/24", "10.72.0.0/18")
    text = head.replace('clients_dir = "clients.d"\n', "") + "".join(
        f'[[clients]]\nname = "client-{i:05d}"\npublic_key = "{k}"\n'
        f'address = "{ipaddress.ip_address("10.72.0.2") + i}"\n'
        for i, k in enumerate(publics)
    )
    assert len(text.encode()) > MAX_CONFIG_SIZE  # about 1.1 MB, as in issue 11
    (confdir / "gateway.toml").write_text(text)
    with pytest.raises(ConfigError, match="too large"):
        load_gateway_config(confdir / "gateway.toml")
    d = confdir / "clients.d"
    for i, k in enumerate(publics):
        (d / f"client-{i:05d}.toml").write_text(f'public_key = "{k}"\n')
    (confdir / "gateway.toml").write_text(head)
    config = load_gateway_config(confdir / "gateway.toml")
    assert len(config.clients) == n and config.client_file_errors == ()
    assert len({c.inner_address for c in config.clients}) == n
    assert len({c.public_key for c in config.clients}) == n
    assert all(ipaddress.ip_address(c.inner_address) in config.subnet for c in config.clients)


# -- reload --------------------------------------------------------------------------------


class Rig:
    """A loaded config, a real GatewaySessions, its ClientsReloader and real clients."""

    def __init__(self, confdir: Path, extra: str = "") -> None:
        self.confdir = confdir
        self.config = load(confdir, extra)
        self.gateway = GatewaySessions(
            static_private=self.config.private_key, clients=self.config.clients,
            policy=POLICY_DEFAULT, now=0.0, urandom=random.Random(1).randbytes,
            rng=random.Random(2), inner_gateway=self.config.gateway_address,
        )  # fmt: skip
        self.reloader = ClientsReloader(self.gateway, self.config, self.config.clients)
        self.crowd = Crowd(self.gateway, gateway_tick_s=3600.0)
        self.members: dict[str, Member] = {}
        self.gateway_public = _public(self.config.private_key)

    def attach(self, name: str, key_name: str | None = None) -> Member:
        private = keypair(key_name or name)[0]
        m = self.crowd.add(
            name, private, self.gateway_public, POLICY_DEFAULT, seed=len(self.members)
        )
        self.members[name] = m
        self.crowd.connect(m)
        return m

    def reload(self) -> tuple[bool, list[PolicyEvent]]:
        self.gateway.events()
        ok = self.reloader.reload(self.crowd.now)
        self.crowd.settle()
        events = [e for e in self.gateway.events() if isinstance(e, PolicyEvent)]
        return ok, events

    def live(self) -> dict[str, str]:
        """Live gateway sessions: client name -> inner address."""
        return {
            s.client.name: s.client.inner_address
            for s in self.gateway.sessions.values() if not s.machine.terminated
        }  # fmt: skip

    def route(self, address: str) -> tuple[str, int] | None:
        """Where the gateway sends an inner packet for ``address`` (the session's source)."""
        packet = _ipv4(self.config.gateway_address, address)
        self.gateway.receive_tun_packet(packet, self.crowd.now)
        out = self.gateway.datagrams_to_send()
        return out[0][0] if out else None  # type: ignore[return-value]


def _public(private: bytes) -> bytes:
    from tunnel.core.handshake import public_key

    return public_key(private)


def _ipv4(src: str, dst: str) -> bytes:
    from tests.simkit import ipv4_packet

    return ipv4_packet(src, dst)


def test_reload_adds_removes_and_changes_clients_and_ends_removed_sessions(
    confdir: Path,
) -> None:
    d = confdir / "clients.d"
    for name in ("anna", "bob", "carl"):
        client_file(d, name)
    rig = Rig(confdir)
    for name in ("anna", "bob", "carl"):
        assert rig.attach(name).session.state is State.ATTACHED
    before = rig.live()
    # remove bob, change carl's key, add dora
    (d / "bob.toml").unlink()
    client_file(d, "carl", public_key=encode_key(keypair("carl-2")[1]))
    client_file(d, "dora")
    ok, events = rig.reload()
    assert ok
    [summary] = [e for e in events if e.policy_name == CLIENTS_RELOADED]
    assert summary.reason_code is Reason.POLICY_APPLIED
    assert summary.detail.startswith("3 clients (+2 -2 ~0), 0 files skipped, 2 sessions ended")
    # bob's and carl's sessions ended with the documented reason, TERMINATE sent to them
    for name in ("bob", "carl"):
        m = rig.members[name]
        assert m.session.state is State.TERMINATED
        ended = [e for e in m.session.events() if e.event_type is EventType.SESSION_TERMINATED]
        assert [e.reason_code for e in ended] == [Reason.OPERATOR_TERMINATED], name
    # anna is untouched, same address, still routed
    assert rig.members["anna"].session.state is State.ATTACHED
    assert rig.live() == {"anna": before["anna"]}
    assert rig.route(before["anna"]) == rig.members["anna"].addr
    # bob is refused now; carl attaches with the new key at his old address; dora is new
    refused = rig.gateway.drops.get(Drop.UNKNOWN_CLIENT_KEY.value, 0)
    rig.attach("bob-again", key_name="bob")
    assert rig.gateway.drops.get(Drop.UNKNOWN_CLIENT_KEY.value, 0) == refused + 1
    assert rig.members["bob-again"].session.state is State.BIRTH
    assert rig.attach("carl2", key_name="carl-2").session.state is State.ATTACHED
    assert rig.attach("dora").session.state is State.ATTACHED
    live = rig.live()
    assert live["carl"] == before["carl"]
    assert live["dora"] not in {before["anna"], before["carl"]}


def test_reload_keeps_pool_addresses_and_never_hands_a_live_address_to_another_client(
    confdir: Path,
) -> None:
    d = confdir / "clients.d"
    for name in ("a", "c", "e"):
        client_file(d, name)
    rig = Rig(confdir, inline("inl"))
    for name in ("inl", "a", "c", "e"):
        rig.attach(name)
    first = rig.live()
    assert first == addresses(rig.config)
    # a new file sorting in the middle must not shift anyone; a removed one frees its address
    client_file(d, "b")
    client_file(d, "d")
    (d / "a.toml").unlink()
    rig.reload()
    now = addresses(rig.reloader.clients)
    for name in ("inl", "c", "e"):
        assert now[name] == first[name], name
    live = rig.live()
    assert set(live) == {"inl", "c", "e"}
    for name in ("b", "d"):
        assert now[name] not in live.values(), "a live session's address went to another client"
    for name in ("b", "d"):
        rig.attach(name)
    for name, m in rig.members.items():
        if name in rig.live():
            assert rig.route(rig.live()[name]) == m.addr, name
    # many reloads in a row change nothing for clients that stay
    for _ in range(3):
        rig.reload()
        assert addresses(rig.reloader.clients) == now


def test_reload_reports_bad_files_by_name_and_an_unreadable_dir_keeps_the_clients(
    confdir: Path,
) -> None:
    d = confdir / "clients.d"
    client_file(d, "anna")
    rig = Rig(confdir)
    rig.attach("anna")
    bad = client_file(d, "broken", "public_key = [")
    client_file(d, "bob")
    ok, events = rig.reload()
    assert ok
    [invalid] = [e for e in events if e.policy_name == CLIENT_FILE_INVALID]
    assert invalid.reason_code is Reason.POLICY_INVALID
    assert invalid.detail.startswith(f"{bad}: (syntax): invalid TOML")
    assert sorted(addresses(rig.reloader.clients)) == ["anna", "bob"]
    assert rig.reloader.skipped_files == 1
    shutil.move(d, confdir / "elsewhere")
    ok, events = rig.reload()
    assert not ok
    assert [(e.policy_name, str(d) in e.detail) for e in events] == [(CLIENT_FILE_INVALID, True)]
    assert sorted(addresses(rig.reloader.clients)) == ["anna", "bob"]
    assert rig.live() == {"anna": "10.71.0.2"}


def test_reload_reads_a_changed_key_file_and_a_rewritten_client_file(confdir: Path) -> None:
    d = confdir / "clients.d"
    (d / "anna.pub").write_text(encode_key(keypair("anna")[1]) + "\n")
    client_file(d, "anna", public_key="anna.pub")
    client_file(d, "bob")
    rig = Rig(confdir)
    (d / "anna.pub").write_text(encode_key(keypair("anna-2")[1]) + "\n")
    client_file(d, "bob", public_key=encode_key(keypair("bob-2")[1]))
    rig.reload()
    keys = {c.name: c.public_key for c in rig.reloader.clients}
    assert keys == {"anna": keypair("anna-2")[1], "bob": keypair("bob-2")[1]}


def test_start_reports_the_skipped_files_as_events(confdir: Path) -> None:
    bad = client_file(confdir / "clients.d", "bad", "?")
    rig = Rig(confdir, inline("alice"))
    rig.reloader.announce_start(0.0)
    events = [e for e in rig.gateway.events() if isinstance(e, PolicyEvent)]
    assert [(e.policy_name, e.detail.split(":")[0]) for e in events] == [
        (CLIENT_FILE_INVALID, str(bad))
    ]


# -- the program: SIGHUP, one console line per bad file ----------------------------------


def _wait_line(proc: subprocess.Popen[str], lines: list[str], needle: str) -> str:
    deadline = time.monotonic() + 30.0
    assert proc.stderr is not None
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if needle in line:
            return line
    raise AssertionError(f"no {needle!r} in {lines!r}")


def test_the_program_reloads_clients_dir_on_sighup_and_names_a_bad_file(
    confdir: Path,
) -> None:
    d = confdir / "clients.d"
    client_file(d, "anna")
    first_bad = client_file(d, "first", "?")
    (confdir / "gateway.toml").write_text(HEAD)
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunnel.gateway.main", "--config", str(confdir / "gateway.toml")],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
    )  # fmt: skip
    lines: list[str] = []
    try:
        line = _wait_line(proc, lines, "skipped a client file")
        assert f"skipped a client file: {first_bad}: (syntax)" in line
        _wait_line(proc, lines, "listening on")
        second_bad = client_file(d, "second", 'public_key = "x"\nfoo = 1\n')
        proc.send_signal(signal.SIGHUP)
        line = _wait_line(proc, lines, f"skipped a client file: {second_bad}")
        assert "foo = 1: unknown key" in line
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0


def test_jvpn_reload_reloads_clients_dir_and_says_what_it_did(confdir: Path) -> None:
    """The control socket's ``reload`` takes the SIGHUP path: the policy, then the files."""
    from tunnel.gateway.runtime import GatewayRuntime
    from tunnel.gateway.thread import GatewayThread

    d = confdir / "clients.d"
    client_file(d, "anna")
    sock = confdir / "run" / "gateway.sock"
    path = confdir / "gateway.toml"
    path.write_text(HEAD.replace('socket = "off"', f'socket = "{sock}"'))
    config = load_gateway_config(path)
    gw = GatewayThread(GatewayRuntime.from_config(config)).start()
    jvpn = [sys.executable, "-m", "tunnel.cli", "--socket", str(sock), "reload"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    try:
        client_file(d, "bob")
        bad = client_file(d, "broken", "?")
        proc = subprocess.run(jvpn, capture_output=True, text=True, env=env, timeout=30)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == (
            "no policy file: the built-in defaults stay; clients_dir: 2 clients (+1 -0 ~0), "
            "1 files skipped, 0 sessions ended"
        )
        assert sorted(c.name for c in gw.runtime.clients) == ["anna", "bob"]
        shutil.move(d, confdir / "gone")
        proc = subprocess.run(jvpn, capture_output=True, text=True, env=env, timeout=30)
        assert proc.returncode == 1
        assert f"clients_dir not read, the clients stay: {d}" in proc.stderr
        assert str(bad) not in proc.stderr
    finally:
        gw.stop()
