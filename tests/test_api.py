"""The engine -> UI channel never blocks, keeps the newest items and counts what it drops."""

from __future__ import annotations

import threading

import pytest

from tunnel.api import CommandQueue, SwitchTo, Terminate, UiChannel


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
