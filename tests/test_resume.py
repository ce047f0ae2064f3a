"""Sessions outlive their gateway process (DESIGN D15a, issue 9 "Stores"): loopback level.

An embedded gateway with the sqlite store and a state key serves a real ``ClientSession``
(tests/test_gateway_runtime.py's ``LoopbackClient``); the gateway is stopped, either
cleanly (what SIGTERM does: no session ends) or as by ``kill -9`` (its stop writes nothing:
the store holds what the last flush left), and a new gateway process-to-be (a new runtime,
a new store object on the same file, the same key file) starts on the same address. The
client goes on with the same session id; the gateway's state version and binding epoch
continue from the stored ones; every (direction, key phase, counter) seen on the wire is
unique across the restarts; the session keys are never in the store file in the clear.

The real programs, ``kill -9`` and SIGTERM in namespaces with an inner TCP transfer:
tests/test_resume_netns.py.
"""

from __future__ import annotations

import select
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from test_gateway_runtime import (
    GATEWAY_INNER,
    LoopbackClient,
    echo_replies,
    icmp_echo,
    wait_for,
)

from tunnel.core.aead import TrafficKeys, peek_header
from tunnel.core.ciphers import DataCipher
from tunnel.core.constants import MSG_CONTROL, MSG_DATA
from tunnel.core.events import Event, EventType
from tunnel.core.gateway_resume import ResumeState
from tunnel.core.gateway_session import ClientEntry
from tunnel.core.handshake import generate_keypair
from tunnel.core.session import State
from tunnel.gateway.resume import decode_state, encode_state
from tunnel.gateway.runtime import GatewayRuntime, PeerAddr
from tunnel.gateway.thread import GatewayThread, start_in_thread
from tunnel.ownership import StoreUnavailable
from tunnel.ownership.sqlite import SqliteSessionStore
from tunnel.ownership.statekey import StateSealer, load_state_key

CLIENT_INNER = "10.66.0.2"


class WireClient(LoopbackClient):
    """A LoopbackClient that records (direction, key phase, counter) of every sealed
    datagram it sends and receives: what crosses the wire."""

    wire: Counter[tuple[str, int, int]]

    def _pump(self) -> None:
        if not hasattr(self, "wire"):
            self.wire = Counter()
        out = self.session.datagrams_to_send()
        for pid, data in out:
            self._note("up", data)
            self.socks[pid].send(data, self.gateway)
        self.inner.extend(self.session.packets_for_tun())
        self.events.extend(self.session.events())

    def _note(self, direction: str, data: bytes) -> None:
        head = peek_header(data)
        if not isinstance(head, tuple) or head[0] not in (MSG_DATA, MSG_CONTROL):
            return
        self.wire[(direction, head[1], head[3])] += 1

    def step(self, max_wait: float = 0.02) -> None:
        deadline = self.session.next_deadline()
        wait = max_wait if deadline is None else min(max_wait, deadline - time.monotonic())
        ready, _, _ = select.select(list(self.socks.values()), [], [], max(0.0, wait))
        now = time.monotonic()
        for sock in ready:
            for data, _addr in sock.recv_batch():
                self._note("down", data)
                self.session.receive_datagram(data, sock.path_id, now)
        deadline = self.session.next_deadline()
        if deadline is not None and deadline <= now:
            self.session.handle_timer(now)
        self._pump()

    def repeats(self) -> list[tuple[str, int, int]]:
        return [k for k, n in self.wire.items() if n > 1]


class Restartable:
    """One gateway identity, one store file and state key; gateway runs one after another."""

    def __init__(self, tmp: Path, block: int | None = None) -> None:
        self.gw_priv, self.gw_pub = generate_keypair()
        self.cl_priv, self.cl_pub = generate_keypair()
        self.clients = [ClientEntry("alice", self.cl_pub, CLIENT_INNER)]
        self.db = tmp / "sessions.sqlite3"
        self.key_file = tmp / "state.key"
        self.block = block
        self.listen = ("127.0.0.1", 0)
        self.runs: list[tuple[GatewayThread, SqliteSessionStore, list[Event]]] = []

    def start(
        self, store_class: type[SqliteSessionStore] = SqliteSessionStore, **kwargs: Any
    ) -> GatewayThread:
        store = store_class(self.db)
        events: list[Event] = []
        thread = start_in_thread(
            static_private=self.gw_priv, clients=self.clients, listen=[self.listen],
            store=store, sealer=StateSealer(load_state_key(self.key_file)),
            node_id="gw-r", on_event=events.append, **kwargs,
        )  # fmt: skip
        self.listen = thread.address
        if self.block is not None:
            persistence = thread.runtime.persistence
            assert persistence is not None
            persistence.block = self.block
        self.runs.append((thread, store, events))
        return thread

    @property
    def runtime(self) -> GatewayRuntime:
        return self.runs[-1][0].runtime

    @property
    def store(self) -> SqliteSessionStore:
        return self.runs[-1][1]

    def stop(self, *, crash: bool = False) -> None:
        """Stop the running gateway: cleanly (its stop saves the sessions), or as a crash
        (nothing more is written: the store holds what its last flush wrote)."""
        thread, store, _ = self.runs[-1]
        persistence = thread.runtime.persistence
        assert persistence is not None
        if crash:
            object.__setattr__(persistence, "save_all", lambda now: 0)
        thread.stop()
        assert not thread.alive and thread.error is None
        store.close()

    def close(self) -> None:
        for thread, store, _ in self.runs:
            thread.stop()
            store.close()


@pytest.fixture
def restartable(tmp_path: Path) -> Iterator[Restartable]:
    r = Restartable(tmp_path)
    yield r
    r.close()


def echo_round(c: LoopbackClient, first: int, count: int) -> None:
    """``count`` echo requests (ids from ``first``), all answered."""
    before = len(echo_replies(c))
    for seq in range(first, first + count):
        c.send_inner(icmp_echo(CLIENT_INNER, GATEWAY_INNER, seq))
    assert c.run_until(lambda: len(echo_replies(c)) >= before + count, timeout=10.0)


def follow_new_phase(c: LoopbackClient, phase: int) -> None:
    """The restarted gateway resumed in ``phase`` (a phase its predecessor opened nothing
    in) and sent a REKEY in it: the client's keys follow before it sends more (what it
    sends in the retired phase is dropped, as after any loss)."""
    cipher = c.session.keys.cipher
    assert cipher is not None
    assert c.run_until(lambda: cipher.phase == phase, timeout=5.0)


def gateway_view(r: Restartable) -> tuple[str, str, int, int]:
    views = r.runs[-1][0].sessions()
    assert len(views) == 1
    v = views[0]
    return v.session_id, v.state, v.state_version, v.binding_epoch


def terminated_events(c: LoopbackClient) -> list[Event]:
    return [e for e in c.events if e.event_type == EventType.SESSION_TERMINATED]


def test_clean_stop_ends_no_session_and_the_restarted_gateway_resumes_it(
    restartable: Restartable,
) -> None:
    r = restartable
    r.start()
    c = WireClient(r.listen, r.gw_pub, r.cl_priv)
    assert c.run_until(lambda: c.state is State.ATTACHED)
    echo_round(c, 0, 5)
    sid, state, version, epoch = gateway_view(r)
    assert sid == c.session.machine.session_id and state == "ATTACHED"

    r.stop()  # SIGTERM's path: no TERMINATE, the record stays
    c.run_until(lambda: bool(terminated_events(c)), timeout=1.0)
    assert terminated_events(c) == [] and c.state is not State.TERMINATED
    record = SqliteSessionStore(r.db).get(sid)
    assert record is not None and record.state_version == version and record.resume

    r.start()
    assert gateway_view(r) == (sid, state, version, epoch)  # resumed as it was
    follow_new_phase(c, 1)
    echo_round(c, 100, 5)  # the same session carries traffic again
    assert c.session.machine.session_id == sid and terminated_events(c) == []
    assert r.runtime.resumed == (1, [])
    _, _, v2, e2 = gateway_view(r)
    assert v2 >= version and e2 >= epoch
    assert c.repeats() == []


def test_crash_restart_resumes_without_reusing_a_key_and_counter(tmp_path: Path) -> None:
    """A small counter block (16) so that reservations happen between transitions; the
    client also rotates its keys once, so the stored key phase moves. Two crashes."""
    r = Restartable(tmp_path, block=16)
    try:
        r.start()
        c = WireClient(r.listen, r.gw_pub, r.cl_priv)
        assert c.run_until(lambda: c.state is State.ATTACHED)
        sid = c.session.machine.session_id
        for i in range(5):  # rounds of 8: a reservation every other round
            echo_round(c, 8 * i, 8)
        writes_before = r.runtime.persistence.writes if r.runtime.persistence else 0
        assert writes_before >= 2
        r.stop(crash=True)

        r.start()
        follow_new_phase(c, 1)
        echo_round(c, 100, 40)
        cipher = c.session.keys.cipher
        assert cipher is not None
        c.command(lambda session, now: cipher.rekey(now))  # the client's next key phase
        echo_round(c, 200, 20)
        assert wait_for(lambda: r.store.get(sid) is not None)
        r.stop(crash=True)

        r.start()
        follow_new_phase(c, 3)
        echo_round(c, 300, 40)
        assert c.session.machine.session_id == sid and terminated_events(c) == []
        assert [run[0].runtime.resumed for run in r.runs[1:]] == [(1, []), (1, [])]
        metrics = r.runs[-1][0].metrics_text().splitlines()
        assert "jvpn_gateway_sessions_resumed_total 1.0" in metrics
        assert 'jvpn_gateway_counter_reservations_total{result="failed"} 0.0' in metrics
        down = sorted((p, n) for d, p, n in c.wire if d == "down")
        # phase 0, 1 (the first resume's), 2 (the client's rotation), 3 (the second resume's)
        assert {p for p, _ in down} == {0, 1, 2, 3}
        assert c.repeats() == []
    finally:
        r.close()


def test_session_keys_are_never_in_the_store_file_in_the_clear(restartable: Restartable) -> None:
    r = restartable
    r.start()
    c = WireClient(r.listen, r.gw_pub, r.cl_priv)
    assert c.run_until(lambda: c.state is State.ATTACHED)
    echo_round(c, 0, 3)
    cipher = c.session.keys.cipher
    assert cipher is not None
    _phase, keys = cipher.current_keys()
    r.stop()
    stored = b"".join(p.read_bytes() for p in r.db.parent.iterdir() if p.name.startswith(r.db.name))
    assert len(stored) > 0
    for secret in (keys.send, keys.recv):
        assert secret not in stored and secret.hex().encode() not in stored
    assert r.key_file.stat().st_mode & 0o777 == 0o600
    assert r.db.stat().st_mode & 0o077 == 0  # the store file is not for other users either


def test_a_record_sealed_under_another_state_key_is_not_resumed(
    restartable: Restartable,
) -> None:
    r = restartable
    r.start()
    c = WireClient(r.listen, r.gw_pub, r.cl_priv)
    assert c.run_until(lambda: c.state is State.ATTACHED)
    sid = c.session.machine.session_id
    r.stop()
    r.key_file.unlink()  # a new key is created at the next start
    r.start()
    resumed, problems = r.runtime.resumed
    assert resumed == 0
    why = "no resume state sealed with this state key"
    assert problems == [f"session {sid[:8]} not resumed: {why}"]
    assert r.runs[-1][0].sessions() == [] and len(r.store) == 0


class FlakyStore(SqliteSessionStore):
    """A sqlite store whose batches stop committing when told (a disk that fails)."""

    fail_commits = False

    @contextmanager
    def batch(self) -> Iterator[None]:
        with super().batch():
            yield
            if self.fail_commits:
                raise StoreUnavailable("commit failed (test)")


def test_a_turn_whose_writes_are_not_committed_sends_nothing_unreserved(tmp_path: Path) -> None:
    """The store stops committing: the first turn that needed a reservation is voided and
    its session ends without a sealed TERMINATE (that too would need a counter; the client
    may still learn the end from a refused re-handshake, which the session keys do not
    seal); the process then dies. Every counter the gateway sent is below the reservation
    the store holds, so the restarted gateway, which resumes the session from it, can never
    repeat one."""
    r = Restartable(tmp_path, block=16)
    try:
        r.start(FlakyStore)
        c = WireClient(r.listen, r.gw_pub, r.cl_priv)
        assert c.run_until(lambda: c.state is State.ATTACHED)
        sid = c.session.machine.session_id
        echo_round(c, 0, 8)
        store = r.store
        assert isinstance(store, FlakyStore)
        store.fail_commits = True
        for seq in range(100, 140):  # well past the block: a reservation is needed
            c.send_inner(icmp_echo(CLIENT_INNER, GATEWAY_INNER, seq))
            c.run_until(lambda: False, timeout=0.02)
        events = r.runs[-1][2]
        assert wait_for(lambda: any(e.event_type == EventType.SESSION_TERMINATED for e in events))
        ended = [e.to_dict() for e in events if e.event_type == EventType.SESSION_TERMINATED]
        assert ended[0]["reason_code"] == "ownership_conflict"
        persistence = r.runtime.persistence
        assert persistence is not None and persistence.failures >= 1
        c.run_until(lambda: False, timeout=1.0)
        r.stop(crash=True)

        record = SqliteSessionStore(r.db).get(sid)
        assert record is not None  # the end was never committed
        plain = StateSealer(load_state_key(r.key_file)).open(sid, record.resume)
        assert plain is not None
        stored = decode_state(sid, plain, PeerAddr)
        assert stored is not None
        sent = [n for d, p, n in c.wire if d == "down" and p == stored.key_phase]
        assert sent and max(sent) < stored.send_from  # nothing unreserved left
        r.start()
        assert r.runtime.resumed == (1, [])
        assert c.repeats() == []
    finally:
        r.close()


def test_stored_sessions_wait_for_a_valid_policy_and_go_with_their_client(
    restartable: Restartable,
) -> None:
    """No valid policy at start: nothing is resumed and the records stay. A client no
    longer configured as it was: its session is not resumed and its record is removed."""
    r = restartable
    r.start()
    c = WireClient(r.listen, r.gw_pub, r.cl_priv)
    assert c.run_until(lambda: c.state is State.ATTACHED)
    sid = c.session.machine.session_id
    r.stop()

    r.start(policy=None, policy_error="policy.toml: broken")
    assert r.runtime.resumed == (
        0, ["stored sessions not resumed: no valid policy (they stay in the store)"],
    )  # fmt: skip
    assert r.runs[-1][0].sessions() == [] and len(r.store) == 1
    r.stop()

    r.clients = [ClientEntry("alice", r.cl_pub, "10.66.0.9")]  # another inner address
    r.start()
    why = "client alice is no longer configured as it was"
    assert r.runtime.resumed == (0, [f"session {sid[:8]} not resumed: {why}"])
    assert r.runs[-1][0].sessions() == [] and len(r.store) == 0


def test_a_client_that_went_recovering_reattaches_to_the_restarted_gateway(
    restartable: Restartable,
) -> None:
    """The gateway stays down until the client has declared its path dead: the client
    reattaches when the gateway is back and the session carries on (same id, the gateway's
    version moves on from the stored one, never back)."""
    r = restartable
    r.start()
    c = WireClient(r.listen, r.gw_pub, r.cl_priv)
    assert c.run_until(lambda: c.state is State.ATTACHED)
    sid, _, version, epoch = gateway_view(r)
    r.stop()
    assert c.run_until(lambda: c.state is State.RECOVERING, timeout=20.0)

    r.start()
    assert c.run_until(lambda: c.state is State.ATTACHED, timeout=20.0)
    echo_round(c, 0, 5)
    got_sid, state, v2, e2 = gateway_view(r)
    assert (got_sid, state) == (sid, "ATTACHED") and c.session.machine.session_id == sid
    assert v2 >= version and e2 >= epoch
    assert terminated_events(c) == [] and c.repeats() == []


def _state(binding: object) -> ResumeState:
    return ResumeState(
        session_id=bytes(range(16)), index=7, peer_index=9,
        client=ClientEntry("alice", bytes(32), CLIENT_INNER, "fd00::2"), state="RECOVERING",
        state_version=5, binding_epoch=3, keys=TrafficKeys(b"s" * 32, b"r" * 32),
        suite=DataCipher.AES_256_GCM,
        key_phase=2, send_from=1 << 40, retired=TrafficKeys(b"t" * 32, b"u" * 32), binding=binding,
        binding_path=None, last_binding=PeerAddr("fd00::9", 4000, 1, 3), skew_ms=-12,
        born_ms=1_700_000_000_000, transportless_ms=1_700_000_000_500, recovery_ms=None,
        total_switches=4,
    )  # fmt: skip


@pytest.mark.parametrize("binding", [None, PeerAddr("10.0.0.1", 51820, 0)])
def test_resume_state_round_trips_through_its_sealed_form(binding: object) -> None:
    state = _state(binding)
    sealer = StateSealer(bytes(range(32)))
    sid = state.session_id.hex()
    blob = sealer.seal(sid, encode_state(state))
    assert state.keys.send not in blob and b"alice" not in blob  # nothing readable
    plain = sealer.open(sid, blob)
    assert plain is not None
    back = decode_state(sid, plain, PeerAddr)
    assert back is not None and back == state  # every field, the keys too
    assert "keys" not in repr(back) and b"s" * 32 not in repr(back).encode()


def test_a_sealed_state_opens_only_for_its_session_and_key() -> None:
    sealer = StateSealer(bytes(range(32)))
    blob = sealer.seal("ab" * 16, b'{"v":1}')
    assert sealer.open("ab" * 16, blob) == b'{"v":1}'
    assert sealer.open("cd" * 16, blob) is None  # moved to another session
    assert StateSealer(bytes(32)).open("ab" * 16, blob) is None  # another state key
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    assert sealer.open("ab" * 16, tampered) is None
    assert sealer.open("ab" * 16, b"short") is None
    assert sealer.seal("ab" * 16, b"x") != sealer.seal("ab" * 16, b"x")  # fresh salt each time
    assert decode_state("ab" * 16, b'{"v":3}', PeerAddr) is None  # another format
