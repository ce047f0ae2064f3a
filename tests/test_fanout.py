"""The gateway's one control socket over its workers' (tunnel/gateway/fanout.py).

docs/gateway.md "Workers": the supervisor's socket answers for every worker; a worker
that is not running is named in the answer and does not hold it up; a reload reaches
every worker and says per worker what happened; the counters are the workers' sums.
The workers here are embedded gateway runtimes serving their private sockets (the
program-level tests are in tests/test_workers.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tunnel.control.client import ControlConnection
from tunnel.control.protocol import (
    Command,
    GatewaySessionStatus,
    GatewayStatus,
    GatewayTraffic,
    gateway_status,
)  # fmt: skip
from tunnel.core.gateway_session import ClientEntry
from tunnel.core.handshake import generate_keypair
from tunnel.gateway.fanout import CombinedControl, WorkerState, merge_status, worker_socket
from tunnel.gateway.thread import GatewayThread, start_in_thread


def _session(sid: str, client: str, state: str = "ATTACHED") -> GatewaySessionStatus:
    return GatewaySessionStatus(
        session_id=sid, client=client, inner_address="10.66.0.2", state=state,
        state_version=1, binding_epoch=1, key_phase=0, owner="", policy_version="v1",
        active_path=1, paths=(), rx_packets=0, rx_bytes=0, tx_packets=0, tx_bytes=0,
        last_seen_s=0.0, age_s=1.0, total_switches=0, security_failures=0, queued=0,
    )  # fmt: skip


def _status(node: str, sessions: tuple[GatewaySessionStatus, ...], n: int) -> GatewayStatus:
    return GatewayStatus(
        node_id=node, listen=("127.0.0.1:51820",), policy_version="v1", uptime_s=5.0,
        sessions=sessions, sessions_created=n, handshakes_refused=n,
        drops=(("bad_mac", n), (f"only_w{n}", 1)),
        traffic=GatewayTraffic(datagrams_in=10 * n, datagrams_out=n, inner_to_clients=n),
        ciphers=("aes-256-gcm",),
    )  # fmt: skip


def test_merged_status_lists_every_workers_sessions_sums_counters_and_names_the_silent() -> None:
    w0 = _status("gw-w0", (_session("aa01", "alice"),), 1)
    w1 = _status("gw-w1", (_session("bb02", "bob"), _session("bb03", "carol", "TERMINATED")), 2)
    merged = merge_status(
        "gw", 7.0,
        [(WorkerState(0, 100, True), w0), (WorkerState(1, 101, True), w1),
         (WorkerState(2, 0, False), "not running (it is being started again)")],
    )  # fmt: skip
    assert merged.node_id == "gw" and merged.listen == ("127.0.0.1:51820",)
    assert [(s.session_id, s.worker) for s in merged.sessions] == [
        ("aa01", 0), ("bb02", 1), ("bb03", 1),
    ]  # fmt: skip
    assert (merged.sessions_created, merged.handshakes_refused) == (3, 3)
    assert merged.drops == (("bad_mac", 3), ("only_w1", 1), ("only_w2", 1))
    assert (merged.traffic.datagrams_in, merged.traffic.datagrams_out) == (30, 3)
    assert [(w.index, w.node_id, w.pid, w.ok, w.sessions, w.problem) for w in merged.workers] == [
        (0, "gw-w0", 100, True, 1, ""),
        (1, "gw-w1", 101, True, 1, ""),
        (2, "gw-w2", 0, False, 0, "not running (it is being started again)"),
    ]  # fmt: skip


@pytest.fixture
def combined(tmp_path: Path) -> Iterator[tuple[CombinedControl, GatewayThread, list[WorkerState]]]:
    """Worker 0 an embedded gateway on its private socket; worker 1 not running."""
    _, alice_public = generate_keypair()
    rundir = tmp_path / "run"
    rundir.mkdir(mode=0o700)
    gw = start_in_thread(
        static_private=generate_keypair()[0],
        clients=[ClientEntry("alice", alice_public, "10.66.0.2")],
        control=worker_socket(rundir, 0), node_id="gw-w0",
    )  # fmt: skip
    states = [WorkerState(0, 4242, True), WorkerState(1, 0, False)]
    control = CombinedControl(tmp_path / "gw.sock", "gw", rundir, lambda: states)
    control.listen()
    control.start()
    try:
        yield control, gw, states
    finally:
        control.stop()
        gw.stop()


def test_a_worker_that_is_not_running_is_named_and_does_not_hold_the_answer(
    combined: tuple[CombinedControl, GatewayThread, list[WorkerState]],
) -> None:
    control, _, _ = combined
    with ControlConnection(control.path, timeout=10) as conn:
        start = time.monotonic()
        reply = conn.status()
        status = gateway_status(reply.status)
        assert time.monotonic() - start < 5  # bounded: no wait for the dead worker
        assert reply.role == "gateway" and status.node_id == "gw"
        assert [(w.index, w.ok, w.problem) for w in status.workers] == [
            (0, True, ""), (1, False, "not running (it is being started again)"),
        ]  # fmt: skip
        reload = conn.command(Command(command="reload_policy"))
        assert not reload.ok  # not every worker reloaded
        lines = reload.detail.splitlines()
        assert lines[0].startswith("worker 0: no policy file: the built-in defaults stay")
        assert lines[1] == "worker 1: not running (it is being started again)"
        refused = conn.command(Command(command="terminate", session="abcd1234"))
        assert not refused.ok
        assert refused.detail == (
            "no live session 'abcd1234' (jvpn status lists them); not asked: worker 1 "
            "(not running (it is being started again))"
        )
        client_only = conn.command(Command(command="switch", path=2))
        assert not client_only.ok and "is a client command" in client_only.detail


def test_a_worker_that_comes_back_answers_again_and_a_stuck_socket_is_bounded(
    combined: tuple[CombinedControl, GatewayThread, list[WorkerState]], tmp_path: Path
) -> None:
    """Worker 1 "ready" but its socket accepts and never answers: named after the bound."""
    import socket

    control, _, states = combined
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(str(worker_socket(tmp_path / "run", 1)))
    silent.listen(4)
    try:
        states[1] = WorkerState(1, 4343, True)
        with ControlConnection(control.path, timeout=10) as conn:
            start = time.monotonic()
            status = gateway_status(conn.status().status)
            assert time.monotonic() - start < 5
        assert [(w.index, w.ok, w.problem) for w in status.workers] == [
            (0, True, ""), (1, False, "no answer in 2s (pid 4343)"),
        ]  # fmt: skip
    finally:
        silent.close()
