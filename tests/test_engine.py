"""ClientEngine over real UDP on loopback against a real GatewaySessions (no root).

The inner side is MemoryInner (ICMP echo source); the gateway (tests/loopback_gateway.py)
answers echoes itself. Every test drives the engine only through its EngineHandle
surface (channel + commands), like the UI does.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest
from engine_watch import Watcher
from loopback_gateway import CLIENT_INNER, LoopbackGateway

from tunnel.api import (
    EngineSnapshot,
    ExtensionCommand,
    ForceReattach,
    ReloadPolicy,
    SetAutoSwitch,
    SwitchTo,
    Terminate,
    UiChannel,
)
from tunnel.client.config import ClientConfig, PathConfig
from tunnel.client.engine import ClientEngine, PluginHost, exit_code_for, exit_code_table
from tunnel.core.events import Reason, SessionTerminated
from tunnel.core.handshake import generate_keypair
from tunnel.core.policy import POLICY_DEFAULT, policy_to_toml
from tunnel.demo.commands import DemoImpair
from tunnel.io.inner import MemoryInner


def make_config(
    gw: LoopbackGateway, private: bytes, n_paths: int = 2, **changes: Any
) -> ClientConfig:
    paths = tuple(
        PathConfig(i, f"lo{i}", ("127.0.0.1", 0), None, gw.address) for i in range(1, n_paths + 1)
    )
    cfg = ClientConfig(private_key=private, gateway_public_key=gw.public_key, paths=paths)
    return dataclasses.replace(cfg, **changes) if changes else cfg


@pytest.fixture
def keys() -> tuple[bytes, bytes]:
    return generate_keypair()


def test_engine_handshake_traffic_switch_denial_and_terminate(keys: tuple[bytes, bytes]) -> None:
    private, public = keys
    with LoopbackGateway(public) as gw:
        inner = MemoryInner(rate_pps=50)
        engine = ClientEngine(make_config(gw, private), inner=inner)
        w = Watcher(engine)
        engine.start()
        try:
            created = w.wait(lambda: w.of("SESSION_CREATED"))[0]
            assert created["inner_address"] == CLIENT_INNER
            # inner traffic both ways: echo requests out, replies back in
            w.wait(lambda: inner.replies >= 10)
            snap = w.wait(
                lambda: w.snapshot if w.snapshot and w.snapshot.traffic.rx_packets else None
            )
            assert snap.running and snap.session.state == "ATTACHED"
            assert snap.traffic.tx_packets >= snap.traffic.rx_packets > 0
            assert snap.session.active == 1

            # a manual switch to path 2 (validated by its probes) is one TRANSPORT_SWITCH
            w.wait(lambda: w.snapshot and w.snapshot.session.paths[1].validated)
            engine.commands.send(SwitchTo(2))
            switch = w.wait(lambda: w.of("TRANSPORT_SWITCH"))[0]
            assert (switch["previous_transport"], switch["new_transport"]) == (1, 2)
            assert switch["reason_code"] == "manual_switch"
            before = inner.replies
            w.wait(lambda: inner.replies >= before + 10)  # traffic continues on path 2

            # switching to the active path, or to a path that does not exist, is denied
            engine.commands.send(SwitchTo(2))
            engine.commands.send(SwitchTo(7))
            denied = w.wait(
                lambda: (
                    len(w.of("TRANSPORT_SWITCH_DENIED")) >= 2 and w.of("TRANSPORT_SWITCH_DENIED")
                )
            )
            assert [(d["requested_transport"], d["reason_code"], d["manual"]) for d in denied] == [
                (2, "no_valid_candidate", True),
                (7, "invalid_transport_candidate", True),
            ]
            engine.commands.send(SetAutoSwitch(False))
            w.wait(lambda: w.snapshot and not w.snapshot.session.auto_switch)
            engine.commands.send(DemoImpair(1, "kill"))  # not a demo: ignored, said so
            w.wait(lambda: any("not running --demo" in d["detail"] for d in w.of("DIAGNOSTIC")))

            engine.commands.send(Terminate())
            assert engine.join(10)
        finally:
            engine.stop()
        w.drain()
        assert w.snapshot is not None and w.snapshot is engine.final_snapshot
        assert not w.snapshot.running
        assert w.snapshot.final_reason == "operator_terminated"
        assert exit_code_for(w.snapshot.final_reason) == 0
        assert w.of("SESSION_TERMINATED")[-1]["reason_code"] == "operator_terminated"
        # the gateway was told: its session ended with the client's reason, initiated by it
        ends = w.wait(
            lambda: [
                e for e in gw.call(lambda s: list(gw.events)) if isinstance(e, SessionTerminated)
            ]
        )
        assert str(ends[0].reason_code) == "operator_terminated" and ends[0].initiator == "peer"


def test_ui_channel_stays_bounded_and_traffic_flows_while_nobody_drains(
    keys: tuple[bytes, bytes],
) -> None:
    private, public = keys
    with LoopbackGateway(public) as gw:
        inner = MemoryInner(rate_pps=100)
        channel = UiChannel(maxsize=16)
        engine = ClientEngine(make_config(gw, private), inner=inner, channel=channel)
        engine.start()
        try:
            deadline = time.monotonic() + 10
            while inner.replies < 20 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert inner.replies >= 20
            replies_before, generated_before = inner.replies, inner.generated
            time.sleep(3.0)  # the "UI" is frozen: nobody drains
            assert len(channel) <= 16
            # the tunnel did not wait for the UI: traffic kept flowing (at 100/s: ~300)
            assert inner.generated - generated_before >= 100
            assert inner.replies - replies_before >= 100
            assert inner.overflow == 0
            items = channel.drain()
            snaps = [i for i in items if isinstance(i, EngineSnapshot)]
            # one slot: only the newest snapshot waited; every older one was replaced
            assert len(snaps) == 1 and snaps[-1].seq > 10  # published at 5 Hz all along
            assert channel.superseded >= snaps[-1].seq - 1
            assert snaps[-1].ui_dropped == channel.dropped == 0  # no event was lost
        finally:
            engine.stop()
        assert engine.final_reason == "operator_terminated"


class CrashingInner(MemoryInner):
    """A MemoryInner whose writes fail after a while (an engine bug on the inner side)."""

    def __init__(self) -> None:
        super().__init__(rate_pps=50)
        self.calls: list[str] = []

    def setup(self) -> None:
        self.calls.append("setup")

    def teardown(self) -> None:
        self.calls.append("teardown")

    def write_batch(self, packets: Any) -> int:
        if self.received >= 5:
            raise RuntimeError("inner side exploded\nsecond line")
        return super().write_batch(packets)


def test_engine_crash_ends_with_engine_error_restores_host_and_tells_gateway(
    keys: tuple[bytes, bytes],
) -> None:
    private, public = keys
    with LoopbackGateway(public) as gw:
        inner = CrashingInner()
        engine = ClientEngine(make_config(gw, private), inner=inner)
        w = Watcher(engine)
        engine.start()
        assert engine.join(15), "the engine must end by itself, never hang"
        w.drain()
        assert engine.final_reason == "engine_error: inner side exploded second line"
        assert w.snapshot is not None and not w.snapshot.running
        assert w.snapshot.final_reason == engine.final_reason
        assert exit_code_for(engine.final_reason) == 3
        assert inner.calls == ["setup", "teardown"]
        assert w.of("SESSION_TERMINATED")[-1]["reason_code"] == "invariant_violation"
        ends = w.wait(
            lambda: [
                e for e in gw.call(lambda s: list(gw.events)) if isinstance(e, SessionTerminated)
            ]
        )
        assert str(ends[0].reason_code) == "invariant_violation"


def test_startup_failure_is_an_engine_error_not_a_hang(keys: tuple[bytes, bytes]) -> None:
    private, public = keys
    with LoopbackGateway(public) as gw:
        cfg = make_config(gw, private)
        bad = dataclasses.replace(
            cfg, paths=(dataclasses.replace(cfg.paths[0], bind=("192.0.2.77", 0)),)
        )  # an address this host does not have
        inner = CrashingInner()
        engine = ClientEngine(bad, inner=inner)
        engine.start()
        assert engine.join(10)
        assert engine.final_reason is not None
        assert engine.final_reason.startswith("engine_error: cannot bind UDP 192.0.2.77:0")
        assert inner.calls == []  # failed before the host was touched: nothing to undo
        assert engine.final_snapshot is not None and not engine.final_snapshot.running


def test_handshake_failure_ends_with_its_own_exit_code(keys: tuple[bytes, bytes]) -> None:
    private, _ = keys
    _, stranger = generate_keypair()
    with LoopbackGateway(stranger) as gw:  # the gateway does not know our key
        policy = dataclasses.replace(POLICY_DEFAULT, handshake_timeout_ms=600, handshake_attempts=2)
        engine = ClientEngine(make_config(gw, private, policy=policy), inner=MemoryInner())
        engine.start()
        assert engine.join(10)
    assert engine.final_reason == "handshake_failed"
    code = exit_code_for("handshake_failed")
    assert code not in (0, 1, 3) and code == dict(exit_code_table())["handshake_failed"]


def test_reload_policy_keeps_old_on_invalid_and_applies_valid(
    keys: tuple[bytes, bytes], tmp_path: Path
) -> None:
    private, public = keys
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(policy_to_toml(POLICY_DEFAULT))
    with LoopbackGateway(public) as gw:
        engine = ClientEngine(
            make_config(gw, private, policy_file=policy_file), inner=MemoryInner()
        )
        w = Watcher(engine)
        engine.start()
        try:
            w.wait(lambda: w.of("SESSION_CREATED"))
            version = w.wait(lambda: w.snapshot).session.policy_version
            good = policy_to_toml(POLICY_DEFAULT)
            policy_file.write_text(
                good.replace("max_switches_per_min = 8", "max_switches_per_min = 0")
            )
            engine.commands.send(ReloadPolicy())
            invalid = w.wait(lambda: w.of("POLICY_EVENT"))[0]
            assert invalid["policy_name"] == "POLICY_INVALID"
            assert "switching.max_switches_per_min" in invalid["detail"]
            policy_file.write_text(
                policy_to_toml(dataclasses.replace(POLICY_DEFAULT, max_switches_per_min=5))
            )
            engine.commands.send(ReloadPolicy())
            applied = w.wait(lambda: w.of("POLICY_EVENT")[1:])[0]
            assert applied["policy_name"] == "POLICY_APPLIED"
            w.wait(lambda: w.snapshot.session.policy_version != version)
            assert w.snapshot.session.switch_budget_left <= 5
        finally:
            engine.stop()


def test_exit_codes_are_distinct_per_reason_and_documented() -> None:
    table = exit_code_table()
    codes = [code for _, code in table]
    assert len(set(codes)) == len(codes)
    assert all(0 <= c <= 255 for c in codes)
    assert dict(table)["operator_terminated"] == 0
    assert exit_code_for(None) == 0
    assert exit_code_for("no_such_reason") == 1
    doc = (Path(__file__).parent.parent / "docs" / "events.md").read_text()  # generated
    for reason, code in table:
        assert f"| {code} | `{reason}` |" in doc, (reason, code)


def test_demo_engine_kill_switches_and_replay_is_rejected() -> None:
    from tunnel.demo.scenario import DemoEngine

    engine = DemoEngine(seed=7)
    w = Watcher(engine)
    engine.start()
    try:
        w.wait(lambda: w.of("SESSION_CREATED"))
        w.wait(lambda: engine.memory.replies >= 5)
        w.wait(lambda: w.snapshot and w.snapshot.demo and w.snapshot.session.active == 1)
        w.wait(lambda: all(p.validated for p in w.snapshot.session.paths))
        engine.commands.send(DemoImpair(1, "kill"))
        switch = w.wait(lambda: w.of("TRANSPORT_SWITCH"), timeout=15)[0]
        assert switch["previous_transport"] == 1 and switch["new_transport"] in (2, 3)
        assert "demo: path 1: blackholed both ways" in [d["detail"] for d in w.of("DIAGNOSTIC")]
        before = engine.memory.replies
        w.wait(lambda: engine.memory.replies >= before + 5)  # traffic continues
        engine.commands.send(DemoImpair(switch["new_transport"], "replay"))
        security = w.wait(lambda: w.of("SECURITY_EVENT"))
        assert security[0]["node_id"] == "demo-gateway"
        assert w.snapshot.session.session_id == switch["session_id"]  # same session
    finally:
        engine.stop()
    assert engine.final_reason == "operator_terminated"
    assert all(r._thread.is_alive() is False for r in engine.relays.values())


# -- D7: gateway host names are re-resolved on every reattach attempt ---------------------


def test_d7_gateway_name_is_re_resolved_on_every_reattach_attempt_numeric_never(
    keys: tuple[bytes, bytes],
) -> None:
    private, public = keys
    with LoopbackGateway(public) as gw:
        port = gw.address[1]
        cfg = make_config(gw, private)
        named = PathConfig(1, "named", ("127.0.0.1", 0), None, ("localhost", port))
        cfg = dataclasses.replace(cfg, paths=(named, cfg.paths[1]))
        inner = MemoryInner(rate_pps=50)
        engine = ClientEngine(cfg, inner=inner)
        w = Watcher(engine)
        engine.start()
        try:
            w.wait(lambda: w.of("SESSION_CREATED"))
            assert engine.resolutions == 0  # the start-up look-up is not a re-resolution
            for n in (1, 2):
                engine.commands.send(ForceReattach())
                engine.notify()
                # a resume on the active path: REATTACH_ATTEMPT, then the gateway's PEER_STATE
                w.wait(lambda n=n: len(w.of("PEER_STATE")) >= n)
                w.wait(lambda n=n: engine.resolutions >= n)
            attempts = [a for a in w.of("REATTACH_ATTEMPT") if a["candidate_transport"] == 1]
            assert engine.resolutions == len(attempts) == 2
            # "localhost" still means 127.0.0.1: same target, nothing reported
            assert engine.runtime is not None
            assert engine.runtime.paths[1].remote[:2] == ("127.0.0.1", port)
            assert not [d for d in w.of("DIAGNOSTIC") if "resolve" in d["detail"]]

            # a reattach on the numeric path 2 looks nothing up
            w.wait(lambda: w.snapshot and w.snapshot.session.paths[1].validated)
            engine.commands.send(SwitchTo(2))
            w.wait(lambda: any(s["new_transport"] == 2 for s in w.of("TRANSPORT_SWITCH")))
            time.sleep(0.3)
            assert engine.resolutions == 2
            before = inner.replies
            w.wait(lambda: inner.replies >= before + 5)
        finally:
            engine.stop()
    assert engine.final_reason == "operator_terminated"


def test_d7_a_gateway_name_that_moves_is_followed_after_a_reattach(
    keys: tuple[bytes, bytes],
) -> None:
    """The name first means 127.0.0.1, then 127.0.0.2 (a relay to the same gateway)."""
    from tunnel.impair.thread import run_relay_in_thread

    private, public = keys
    with LoopbackGateway(public) as gw:
        port = gw.address[1]
        with run_relay_in_thread(("127.0.0.2", port), gw.address, name="moved") as relay:
            path = PathConfig(1, "named", ("127.0.0.1", 0), None, ("localhost", port))
            cfg = dataclasses.replace(make_config(gw, private), paths=(path,))
            inner = MemoryInner(rate_pps=50)
            engine = ClientEngine(cfg, inner=inner)
            looked_up: list[str] = []

            async def moved(host: str, port_: int, family: int) -> tuple[str, int]:
                looked_up.append(host)
                return ("127.0.0.2", port_)

            engine._lookup = moved  # type: ignore[method-assign]
            w = Watcher(engine)
            engine.start()
            try:
                w.wait(lambda: w.of("SESSION_CREATED"))
                assert relay.stats()["up"]["forwarded"] == 0
                engine.commands.send(ForceReattach())
                engine.notify()
                moved_to = w.wait(lambda: [d for d in w.of("DIAGNOSTIC")
                                           if "now resolves to 127.0.0.2" in d["detail"]])
                assert "'localhost' of path 1" in moved_to[0]["detail"]
                assert looked_up == ["localhost"]
                assert engine.runtime is not None
                assert engine.runtime.paths[1].remote[:2] == ("127.0.0.2", port)
                before = inner.replies
                w.wait(lambda: inner.replies >= before + 10)  # traffic now via the relay
                stats = relay.stats()
                assert stats["up"]["forwarded"] > 0 and stats["down"]["forwarded"] > 0
                assert w.snapshot is not None and w.snapshot.session.state != "TERMINATED"
                assert {e["session_id"] for e in w.events} == {moved_to[0]["session_id"]}
            finally:
                engine.stop()
    assert engine.final_reason == "operator_terminated"


# -- the UI contract's own view of the session ------------------------------------------


def test_session_view_carries_the_core_snapshot_field_for_field() -> None:
    """The UI's SessionView/PathView/PathStatsView keep the core's field names and
    meanings (tunnel/api.py): the conversion loses and swaps nothing."""
    from simkit import build

    from tunnel.api import PathStatsView, SessionView
    from tunnel.api import PathView as UiPathView
    from tunnel.client.engine import session_view
    from tunnel.core.client import ClientSnapshot
    from tunnel.core.health import PathStats

    def names(cls: type) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    sim = build(n_paths=2)
    sim.advance(3.0)
    live = sim.client.snapshot(sim.now)
    CorePathView = type(live.paths[0])  # the core's path view class

    assert names(SessionView) == names(ClientSnapshot)
    assert names(UiPathView) == names(CorePathView)
    assert names(PathStatsView) == names(PathStats)

    # every field a value of its own, so a swapped or dropped field shows
    stats = PathStats(
        path_id=3, srtt_ms=41.5, jitter_ms=4.25, loss_ratio=0.125, consecutive_misses=2,
        score=0.625, alive=True, rtt_history=(40.0, 43.0), loss_up=0.25, loss_down=0.0625,
        loss_known=True, direction_known=False,
    )  # fmt: skip
    core = ClientSnapshot(
        session_id="ab" * 16, state="VOLATILE", state_version=9, binding_epoch=4,
        peer_state="ATTACHED", peer_state_version=8, active=3, pending=5,
        paths=(CorePathView(stats, "10.0.0.2 -> gw", "active", True),), auto_switch=False,
        switch_budget_left=6, cooldown_remaining_ms=750.5, key_phase=7, key_age_s=95.25,
        policy_version="2026-12.1", uptime_s=3723.75, queue_depth=11, queue_dropped=12,
        total_switches=13, drops=(("replay", 14),), inner_address="10.77.0.2",
    )  # fmt: skip
    view = session_view(core)
    assert isinstance(view, SessionView)
    for name in names(SessionView) - {"paths"}:
        assert getattr(view, name) == getattr(core, name), name
    (ui,) = view.paths
    assert isinstance(ui, UiPathView) and isinstance(ui.stats, PathStatsView)
    assert (ui.label, ui.role, ui.validated) == ("10.0.0.2 -> gw", "active", True)
    for name in names(PathStatsView):
        assert getattr(ui.stats, name) == getattr(stats, name), name

    # and a live session's snapshot converts, path for path
    assert session_view(live).paths[1].stats.rtt_history == live.paths[1].stats.rtt_history
    assert [p.role for p in session_view(live).paths] == [p.role for p in live.paths]
    with pytest.raises(dataclasses.FrozenInstanceError):
        view.active = 2  # type: ignore[misc]


# -- plug-ins: behaviour added from outside the engine ---------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Ping(ExtensionCommand):
    """A plug-in's command (the test's own)."""

    n: int


@dataclasses.dataclass(frozen=True, slots=True)
class Stray(ExtensionCommand):
    """A command no plug-in takes."""


class RecordingPlugin:
    """An EnginePlugin that records what the engine asks of it, in order."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.tapped: dict[int, int] = {}
        self.host: PluginHost | None = None

    def prepare(self, config: ClientConfig) -> ClientConfig:
        self.calls.append("prepare")
        # only path 2 survives: the engine must run the configuration returned here
        return dataclasses.replace(config, paths=config.paths[1:])

    def attach(self, host: PluginHost) -> None:
        self.calls.append("attach")
        self.host = host

    def tap(self, path_id: int, data: bytes) -> None:
        self.tapped[path_id] = self.tapped.get(path_id, 0) + 1

    def handle(self, command: ExtensionCommand) -> bool:
        if not isinstance(command, Ping):
            return False
        assert self.host is not None
        self.calls.append(f"ping {command.n}")
        self.host.report(Reason.DEMO_ACTION, f"pong {command.n} on {self.host.session().active}")
        return True

    def annotate(self, snapshot: EngineSnapshot) -> EngineSnapshot:
        return dataclasses.replace(snapshot, demo=True)

    def close(self) -> None:
        self.calls.append("close")


def test_a_plugin_plugs_in_from_outside(keys: tuple[bytes, bytes]) -> None:
    private, public = keys
    with LoopbackGateway(public) as gw:
        plugin = RecordingPlugin()
        engine = ClientEngine(make_config(gw, private), inner=MemoryInner(rate_pps=50),
                              plugin=plugin)  # fmt: skip
        w = Watcher(engine)
        engine.start()
        try:
            w.wait(lambda: w.snapshot and w.snapshot.session.active == 2)
            assert [p.stats.path_id for p in w.snapshot.session.paths] == [2]
            assert w.snapshot.demo  # annotated by the plug-in
            engine.commands.send(Ping(7))
            engine.commands.send(Stray())
            pong = w.wait(lambda: [d for d in w.of("DIAGNOSTIC") if "pong" in d["detail"]])
            assert pong[0]["detail"] == "pong 7 on 2"
            assert pong[0]["reason_code"] == "demo_action"
            stray = w.wait(lambda: [d for d in w.of("DIAGNOSTIC") if "Stray" in d["detail"]])
            assert stray[0]["detail"] == Stray().ignored()
            assert stray[0]["reason_code"] == "invalid_transport_candidate"
            assert set(plugin.tapped) == {2} and plugin.tapped[2] > 0
        finally:
            engine.stop()
    assert engine.final_reason == "operator_terminated"
    assert plugin.calls == ["prepare", "attach", "ping 7", "close"]
    assert engine.final_snapshot is not None and engine.final_snapshot.demo
    assert private.hex() not in repr(engine.final_snapshot)  # no secrets in the contract
