"""The engine -> UI channel never blocks, keeps the newest items and counts what it drops;
the newest snapshot is one replaced slot, so snapshots never push an event out, and after
an event loss the UI gets the session-changing events back from the history ring (issue
14); the contract stands between the UI and the engine (DESIGN §2, §4)."""

from __future__ import annotations

import ast
import threading
from pathlib import Path

import pytest

from tunnel.api import (
    NO_SESSION,
    UI_QUEUE_SIZE,
    UI_QUEUE_SIZE_ENV,
    CommandQueue,
    EngineSnapshot,
    EventType,
    SwitchTo,
    Terminate,
    UiChannel,
    ui_queue_size,
)

ROOT = Path(__file__).resolve().parents[1]


def test_full_channel_drops_oldest_and_counts() -> None:
    channel = UiChannel(maxsize=3)
    for i in range(10):
        channel.publish({"n": i})
    assert channel.dropped == 7
    assert [item["n"] for item in channel.drain()] == [7, 8, 9]  # type: ignore[index]
    assert channel.drain() == []


def test_publish_does_not_block_while_nobody_drains() -> None:
    channel = UiChannel(maxsize=8)
    done = threading.Event()

    def engine() -> None:
        for i in range(50_000):
            channel.publish({"n": i})
        done.set()

    thread = threading.Thread(target=engine)
    thread.start()
    assert done.wait(10), "publisher blocked behind an undrained channel"
    thread.join()
    assert len(channel) == 8 and channel.dropped == 50_000 - 8


def test_drain_respects_max_items() -> None:
    channel = UiChannel(maxsize=10)
    for i in range(5):
        channel.publish({"n": i})
    assert len(channel.drain(2)) == 2
    assert len(channel) == 3


def test_channel_rejects_zero_size() -> None:
    with pytest.raises(ValueError, match="at least one"):
        UiChannel(maxsize=0)


def snapshot(seq: int) -> EngineSnapshot:
    return EngineSnapshot(seq=seq, ts_ms=seq, session=NO_SESSION)


def event(kind: EventType, n: int) -> dict[str, object]:
    return {"event_type": str(kind), "n": n}


def test_the_newest_snapshot_replaces_the_waiting_one_and_is_never_queued() -> None:
    channel = UiChannel(maxsize=4)
    for seq in range(1, 101):
        channel.publish(snapshot(seq))
    assert len(channel) == 0 and channel.has_snapshot
    batch = channel.take()
    assert batch.snapshot is not None and batch.snapshot.seq == 100
    assert batch.events == () and batch.lost == 0
    assert channel.superseded == 99 and channel.dropped == 0
    assert channel.take().snapshot is None  # taken once
    counters = channel.counters()
    assert counters.published == 100 and counters.waiting == 0


def test_snapshots_never_push_an_event_out() -> None:
    """The old shared queue lost a switch behind snapshots nobody draws (issue 14)."""
    channel = UiChannel(maxsize=4)
    channel.publish(event(EventType.TRANSPORT_DEAD, 1))
    channel.publish(event(EventType.TRANSPORT_SWITCH, 2))
    for seq in range(1, 10_001):  # 10,000 snapshots: a long stall at 5 Hz
        channel.publish(snapshot(seq))
    batch = channel.take()
    assert [e["n"] for e in batch.events] == [1, 2]
    assert batch.lost == 0 and channel.dropped == 0
    assert batch.snapshot is not None and batch.snapshot.seq == 10_000


def test_after_an_event_loss_the_take_carries_the_session_events_history() -> None:
    channel = UiChannel(maxsize=3, history=5)
    channel.publish(event(EventType.TRANSPORT_ATTACHED, 0))
    assert channel.take().lost == 0  # the UI took it: a normal batch, no history
    channel.publish(event(EventType.TRANSPORT_DEAD, 1))
    channel.publish(event(EventType.PATH_HEALTH, 2))  # noise: not kept in the history
    channel.publish(event(EventType.TRANSPORT_SWITCH, 3))
    channel.publish(event(EventType.DIAGNOSTIC, 4))
    channel.publish(event(EventType.PATH_HEALTH, 5))
    channel.publish(snapshot(1))
    batch = channel.take()
    assert batch.lost == 2 and channel.dropped == 2  # DEAD and the first PATH_HEALTH
    assert [e["n"] for e in batch.events] == [3, 4, 5]
    # the history: every session-changing event still remembered, oldest first
    assert [e["n"] for e in batch.history] == [0, 1, 3]
    nxt = channel.take()
    assert nxt.lost == 0 and nxt.history == () and nxt.events == ()


def test_the_history_is_a_bounded_ring() -> None:
    channel = UiChannel(maxsize=1, history=3)
    for n in range(10):
        channel.publish(event(EventType.STATE_CHANGE, n))
    batch = channel.take()
    assert batch.lost == 9
    assert [e["n"] for e in batch.history] == [7, 8, 9]
    assert [e["n"] for e in batch.events] == [9]


def test_the_queue_size_knob() -> None:
    assert ui_queue_size({}) == UI_QUEUE_SIZE
    assert ui_queue_size({UI_QUEUE_SIZE_ENV: "4"}) == 4
    for bad in ("0", "-3", "many"):
        with pytest.raises(ValueError):
            ui_queue_size({UI_QUEUE_SIZE_ENV: bad})


def test_command_queue_is_bounded_and_ordered() -> None:
    commands = CommandQueue(maxsize=2)
    assert commands.send(SwitchTo(2))
    assert commands.send(Terminate())
    assert not commands.send(SwitchTo(3))
    assert commands.rejected == 1
    assert commands.take_all() == [SwitchTo(2), Terminate()]
    assert commands.take_all() == []


# -- who may import whom -----------------------------------------------------------------


def imported(path: Path) -> set[str]:
    """Every module an import statement of ``path`` names (``from a.b import c``: a.b)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
    return out


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_ui_imports_nothing_of_the_protocol_core_or_the_drivers() -> None:
    found = {
        f"{p.relative_to(ROOT)}: {m}"
        for p in sorted((ROOT / "jvpn_tui").rglob("*.py"))
        for m in imported(p)
        if within(m, "tunnel.core") or within(m, "tunnel.io")
    }
    assert not found, sorted(found)


def test_the_contract_owns_its_types_and_the_engine_knows_no_demo() -> None:
    api = {m for m in imported(ROOT / "tunnel" / "api.py") if within(m, "tunnel")}
    assert api == {"tunnel.core.events"}  # the events' vocabulary, nothing else
    engine = imported(ROOT / "tunnel" / "client" / "engine.py")
    assert not any(within(m, "tunnel.demo") for m in engine)


def test_checker_sees_imports(tmp_path: Path) -> None:
    p = tmp_path / "m.py"
    p.write_text("import tunnel.io.udp\nfrom tunnel.core import client\nfrom . import x\n")
    assert imported(p) == {"tunnel.io.udp", "tunnel.core"}
    assert within("tunnel.core.client", "tunnel.core") and not within("tunnel.corex", "tunnel.core")
