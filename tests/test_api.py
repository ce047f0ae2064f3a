"""The engine -> UI channel never blocks, keeps the newest items and counts what it drops;
the contract stands between the UI and the engine (DESIGN §2, §4)."""

from __future__ import annotations

import ast
import threading
from pathlib import Path

import pytest

from tunnel.api import CommandQueue, SwitchTo, Terminate, UiChannel

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
