"""RouteHook (tunnel/gateway/routehook.py, docs/cluster.md "Inner routing follows the
owner"): the operator hook's arguments and order, its timeout and failures (counted and
reported, never raised), the loop never waiting for it, the [cluster] route keys, the
frames of the gratuitous ARP and the unsolicited NA, and a runtime that turns a failing
hook into a DIAGNOSTIC ``route_hook_failed`` event."""

from __future__ import annotations

import ipaddress
import os
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tunnel.core.events import Diagnostic, Reason, SessionCreated, SessionTerminated
from tunnel.core.gateway_session import ClientEntry
from tunnel.gateway.config import ConfigError, parse_gateway_config
from tunnel.gateway.routehook import (
    CommandHook,
    RouteConfig,
    RouteHook,
    RouteResult,
    SessionRoutes,
    garp_frame,
    unsolicited_na_frame,
)
from tunnel.keys import encode_key

SID = "ab" * 16


def script(tmp_path: Path, body: str, name: str = "hook") -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def recording_hook(tmp_path: Path) -> tuple[Path, Path]:
    log = tmp_path / "calls"
    return script(tmp_path, f'echo "$@" >> {log}\n'), log


def wait_for(pred: Callable[[], bool], timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


@pytest.fixture
def hooks() -> Iterator[list[RouteHook]]:
    made: list[RouteHook] = []
    yield made
    for hook in made:
        hook.close()


def started(hooks: list[RouteHook], hook: RouteHook) -> RouteHook:
    hooks.append(hook)
    hook.start()
    return hook


def test_hook_runs_with_action_session_and_addresses_in_order(
    tmp_path: Path, hooks: list[RouteHook]
) -> None:
    cmd, log = recording_hook(tmp_path)
    results: list[RouteResult] = []
    hook = started(hooks, RouteHook([CommandHook(cmd, 5.0)], on_result=results.append))
    hook.acquired(SID, ["10.66.0.2", "fd00:6a76::2"])
    hook.released(SID, ["10.66.0.2", "fd00:6a76::2"])
    hook.acquired("cd" * 16, ["10.66.0.3"])
    assert hook.wait_idle(10.0)
    assert log.read_text().splitlines() == [
        f"acquire {SID} 10.66.0.2 fd00:6a76::2",
        f"release {SID} 10.66.0.2 fd00:6a76::2",
        f"acquire {'cd' * 16} 10.66.0.3",
    ]
    assert (hook.done, hook.failed) == (3, 0)
    assert [(r.action, r.ok) for r in results] == [
        ("acquire", True), ("release", True), ("acquire", True)
    ]  # fmt: skip


def test_a_hook_past_its_timeout_is_killed_and_counted(
    tmp_path: Path, hooks: list[RouteHook]
) -> None:
    cmd = script(tmp_path, "exec sleep 30\n")
    results: list[RouteResult] = []
    hook = started(hooks, RouteHook([CommandHook(cmd, 0.3)], on_result=results.append))
    hook.acquired(SID, ["10.66.0.2"])
    assert hook.wait_idle(20.0)
    assert (hook.done, hook.failed) == (0, 1)
    assert not results[0].ok and "timed out after 0.3 s" in results[0].detail


def test_a_failing_hook_is_counted_with_its_status_and_stderr_and_the_next_runs(
    tmp_path: Path, hooks: list[RouteHook]
) -> None:
    cmd = script(tmp_path, 'if [ "$1" = acquire ]; then echo "no route table" >&2; exit 3; fi\n')
    missing = tmp_path / "not-there"
    results: list[RouteResult] = []
    hook = started(hooks, RouteHook([CommandHook(cmd, 5.0)], on_result=results.append))
    hook.acquired(SID, ["10.66.0.2"])
    hook.released(SID, ["10.66.0.2"])
    assert hook.wait_idle(10.0)
    broken = started(hooks, RouteHook([CommandHook(missing)], on_result=results.append))
    broken.acquired(SID, ["10.66.0.2"])
    assert broken.wait_idle(10.0)
    assert [(r.action, r.ok) for r in results] == [
        ("acquire", False), ("release", True), ("acquire", False)
    ]  # fmt: skip
    assert "exited 3" in results[0].detail and "no route table" in results[0].detail
    assert str(missing) in results[2].detail
    assert (hook.done, hook.failed, broken.failed) == (1, 1, 1)


def test_acquired_never_waits_for_the_hook_and_a_full_queue_is_counted(
    tmp_path: Path, hooks: list[RouteHook]
) -> None:
    gate = tmp_path / "gate"
    cmd = script(tmp_path, f"while [ ! -e {gate} ]; do sleep 0.02; done\n")
    results: list[RouteResult] = []
    hook = started(
        hooks, RouteHook([CommandHook(cmd, 30.0)], on_result=results.append, queue_size=2)
    )
    for i in range(5):  # the hook is blocked: these only queue (or overflow)
        hook.acquired(f"{i:032x}", [f"10.66.0.{i + 2}"])
    assert not gate.exists()  # every call above returned while the hook still waits
    assert wait_for(lambda: hook.failed >= 2)
    gate.touch()
    assert hook.wait_idle(20.0)
    assert hook.done + hook.failed == 5
    assert {r.detail for r in results if not r.ok} == {"queue full"}
    assert hook.done >= 2  # the first one (running) and what the queue held


def test_session_routes_follow_created_and_terminated_events() -> None:
    calls: list[tuple[str, str, list[str]]] = []

    class Recorder(RouteHook):
        def acquired(self, session_id: str, inner: list[str]) -> None:
            calls.append(("acquire", session_id, inner))

        def released(self, session_id: str, inner: list[str]) -> None:
            calls.append(("release", session_id, inner))

    clients = [ClientEntry("alice", b"k" * 32, "10.66.0.2", "fd00:6a76::2")]
    routes = SessionRoutes(Recorder([]), lambda: clients)
    base = {"ts_ms": 1, "session_id": SID, "node_id": "gw-a", "policy_version": "1",
            "state_version": 1}  # fmt: skip
    routes.on_event(SessionCreated(**base, peer="alice", inner_address="10.66.0.2"))
    routes.acquire(SID, ["10.66.0.2", "fd00:6a76::2"])  # the same again: nothing new
    routes.on_event(
        SessionTerminated(**base, reason_code=Reason.OPERATOR_TERMINATED, session_age_ms=5.0,
                          transportless_age_ms=0.0, total_switches=0)
    )  # fmt: skip
    routes.release(SID)  # already released: nothing
    assert calls == [
        ("acquire", SID, ["10.66.0.2", "fd00:6a76::2"]),
        ("release", SID, ["10.66.0.2", "fd00:6a76::2"]),
    ]
    assert routes.routed == {}


# -- configuration ---------------------------------------------------------------------------


def config(tmp_path: Path, cluster: dict[str, object] | None) -> dict[str, object]:
    key = tmp_path / "gw.key"
    if not key.exists():
        key.write_text(encode_key(os.urandom(32)) + "\n")
        key.chmod(0o600)
    data: dict[str, object] = {
        "private_key": str(key),
        "state": {"store": "memory"},
        "listen": ["127.0.0.1:0"],
        "clients": [{"name": "alice", "public_key": encode_key(os.urandom(32))}],
    }
    if cluster is not None:  # a cluster node (its store is etcd): no [state]
        del data["state"]
        data["cluster"] = {
            "endpoints": ["127.0.0.1:2379"],
            "state_key_file": str(tmp_path / "state.key"),
            **cluster,
        }
    return data


def test_cluster_route_keys_are_read_and_checked(tmp_path: Path) -> None:
    file = tmp_path / "gateway.toml"
    assert parse_gateway_config(config(tmp_path, None), file).route == RouteConfig()
    cfg = parse_gateway_config(
        config(tmp_path, {"route_hook": "hooks/route", "route_hook_timeout_s": 2,
                          "route_mode": "proxy_neighbour", "route_device": "lan0"}),
        file,
    ).route  # fmt: skip
    assert cfg == RouteConfig(tmp_path / "hooks/route", 2.0, "proxy_neighbour", "lan0")
    assert cfg.enabled
    bad: list[tuple[dict[str, object], str]] = [
        ({"route_mode": "bgp"}, "cluster.route_mode"),
        ({"route_mode": "proxy_neighbour"}, "cluster.route_device"),
        ({"route_hook": ""}, "cluster.route_hook"),
        ({"route_hook_timeout_s": 0}, "cluster.route_hook_timeout_s"),
        ({"route_hook_timeout_s": True}, "cluster.route_hook_timeout_s"),
        ({"route_hooks": "/x"}, "cluster.route_hooks"),
    ]
    for table, key in bad:
        with pytest.raises(ConfigError) as err:
            parse_gateway_config(config(tmp_path, table), file)
        assert err.value.key == key, table


# -- the announcement frames -----------------------------------------------------------------


MAC = bytes.fromhex("020000aabbcc")


def _sum16(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data + b"\0" * (len(data) % 2)))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def test_gratuitous_arp_names_the_address_as_sender_and_target_with_our_mac() -> None:
    ip = ipaddress.IPv4Address("10.66.0.2").packed
    frame = garp_frame(MAC, ip)
    assert frame[:6] == b"\xff" * 6 and frame[6:12] == MAC and frame[12:14] == b"\x08\x06"
    htype, ptype, hlen, plen, op, sha, spa, _tha, tpa = struct.unpack("!HHBBH6s4s6s4s", frame[14:])
    assert (htype, ptype, hlen, plen, op) == (1, 0x0800, 6, 4, 1)
    assert (sha, spa, tpa) == (MAC, ip, ip)


def test_unsolicited_na_is_a_valid_override_advertisement() -> None:
    target = ipaddress.IPv6Address("fd00:6a76::2").packed
    source = ipaddress.IPv6Address("fe80::1").packed
    frame = unsolicited_na_frame(MAC, target, source)
    assert frame[:6] == bytes.fromhex("333300000001") and frame[12:14] == b"\x86\xdd"
    ip6, icmp = frame[14:54], frame[54:]
    assert ip6[6] == 58 and ip6[7] == 255  # ICMPv6, hop limit 255 (RFC 4861)
    assert ip6[8:24] == source and ip6[24:40] == ipaddress.IPv6Address("ff02::1").packed
    assert icmp[0] == 136 and icmp[1] == 0
    flags = struct.unpack("!I", icmp[4:8])[0]
    assert flags & 0x20000000 and not flags & 0x40000000  # override, not solicited
    assert icmp[8:24] == target and icmp[24:26] == b"\x02\x01" and icmp[26:32] == MAC
    pseudo = ip6[8:40] + struct.pack("!I3xB", len(icmp), 58)
    assert _sum16(pseudo + icmp) == 0xFFFF  # the checksum verifies


# -- the runtime: a failing hook becomes an event, the session goes on ------------------------


def test_runtime_reports_a_failing_hook_as_a_diagnostic_and_keeps_serving(
    tmp_path: Path,
) -> None:
    from tests.test_gateway_runtime import Setup, attached, echo_replies, icmp_echo

    cmd = script(tmp_path, f'echo "$@" >> {tmp_path / "calls"}\nexit 7\n')
    s = Setup(route=RouteConfig(hook=cmd, hook_timeout_s=5.0))
    try:
        c = s.client()
        assert c.run_until(attached(c))
        sid = c.session.machine.session_id
        assert wait_for(lambda: any(isinstance(e, Diagnostic) for e in list(s.events)))
        diag = next(e for e in list(s.events) if isinstance(e, Diagnostic))
        assert diag.reason_code is Reason.ROUTE_HOOK_FAILED and diag.session_id == sid
        assert "acquire 10.66.0.2" in diag.detail and "exited 7" in diag.detail
        c.send_inner(icmp_echo("10.66.0.2", "10.66.0.1", 1))
        assert c.run_until(lambda: len(echo_replies(c)) == 1)  # the node goes on
        assert (tmp_path / "calls").read_text().split() == ["acquire", sid, "10.66.0.2"]
        text = s.gateway.metrics_text()
        assert 'jvpn_route_hook_changes_total{outcome="failed"} 1' in text
        assert 'jvpn_route_hook_changes_total{outcome="ok"} 0' in text
    finally:
        s.close()
    assert threading.active_count() < 50
