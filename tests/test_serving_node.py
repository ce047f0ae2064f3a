"""The client learns which cluster node serves it (issue 9 item 2, docs/wire-format.md:
EXT_NODE in handshake message 2, NODE_INFO): strict decoders (bad input is a counted
``malformed`` drop), a cluster node tells its node id and owner epoch at the handshake,
with every REATTACH_ACK and STATE_UPDATE and when the epoch changes, an older epoch never
overwrites a newer one, a gateway that is not a cluster node sends none of it, and the
engine's snapshot carries it to the UI contract."""

from __future__ import annotations

import asyncio
import dataclasses
import random

import pytest

from tests.simkit import CLIENT_INNER
from tunnel.api import NO_SESSION, EngineSnapshot, SessionView
from tunnel.cli.status import client_text
from tunnel.cli.text import Style
from tunnel.client.engine import session_view
from tunnel.core.client import ClientSession, PathSpec
from tunnel.core.drops import Drop
from tunnel.core.gateway import GatewaySessions
from tunnel.core.gateway_session import ClientEntry
from tunnel.core.handshake import generate_keypair
from tunnel.core.policy import POLICY_DEFAULT
from tunnel.core.wire import CType, NodeInfo, RespPayload, pack_control, parse_control
from tunnel.io.memory import MemoryLink, Simulation


def resp(**fields: object) -> RespPayload:
    base: dict[str, object] = {
        "version": 2, "status": 0, "session_id": bytes(range(16)), "gw_ts_ms": 5,
        "state_version": 1, "epoch": 1, "inner_address": "10.66.0.2", "inner_prefix": 24,
        "inner_gateway": "10.66.0.1", "mtu": 1420,
    }  # fmt: skip
    base.update(fields)
    return RespPayload(**base)  # type: ignore[arg-type]


# -- the wire ---------------------------------------------------------------------------------


def test_message_2_carries_node_and_owner_epoch_only_for_a_cluster_node() -> None:
    plain = resp().pack()
    assert RespPayload.parse(plain) == resp()  # no extension: not a cluster node
    with_node = resp(node_id="gw-b.eu_1", owner_epoch=7).pack()
    assert with_node[: len(plain)] == plain  # an extension after the fixed part
    parsed = RespPayload.parse(with_node)
    assert isinstance(parsed, RespPayload)
    assert (parsed.node_id, parsed.owner_epoch) == ("gw-b.eu_1", 7)


@pytest.mark.parametrize(
    "value",
    [b"\x01\0\0\0", b"\x01\0\0", b"\x01\0\0\0-gw", b"\x01\0\0\0gw b", b"\x01\0\0\0gw\0",
     b"\x01\0\0\0" + b"g" * 65, b"\x01\0\0\0gw\xc3\xa9"],
)  # fmt: skip
def test_a_bad_node_extension_is_malformed(value: bytes) -> None:
    data = resp().pack() + bytes((RespPayload.EXT_NODE, len(value))) + value
    assert RespPayload.parse(data) is Drop.MALFORMED


def test_node_info_round_trip_and_strict_decoding() -> None:
    msg = NodeInfo.of("gw-a", 3)
    packed = pack_control(msg)
    assert packed[0] == CType.NODE_INFO and len(packed) == 1 + 4 + 1 + 64
    parsed = parse_control(packed)
    assert parsed == msg and isinstance(parsed, NodeInfo)
    assert (parsed.node, parsed.owner_epoch) == ("gw-a", 3)
    assert parse_control(packed[:-1]) is Drop.TRUNCATED
    assert parse_control(packed + b"\0") is Drop.OVERSIZED
    bad = [
        NodeInfo(1, 0, bytes(64)),  # empty
        NodeInfo(1, 65, b"g" * 64),  # longer than the field
        NodeInfo(1, 4, b"gw a".ljust(64, b"\0")),  # a space
        NodeInfo(1, 2, b"gwX".ljust(64, b"\0")),  # junk after the id
        NodeInfo(1, 3, b".gw".ljust(64, b"\0")),  # must start with a letter or digit
    ]
    for item in bad:
        assert parse_control(pack_control(item)) is Drop.MALFORMED, item


# -- two engines over memory links ------------------------------------------------------------


def build(*, announce: bool, n_paths: int = 2) -> Simulation:
    rng = random.Random(5)
    gw_priv, gw_pub = generate_keypair()
    cl_priv, cl_pub = generate_keypair()
    client = ClientSession(
        static_private=cl_priv, gateway_public=gw_pub,
        paths=[PathSpec(i, f"path{i}") for i in range(1, n_paths + 1)],
        policy=POLICY_DEFAULT, now=0.0, rng=random.Random(6),
    )  # fmt: skip
    gateway = GatewaySessions(
        static_private=gw_priv, clients=[ClientEntry("alice", cl_pub, CLIENT_INNER)],
        policy=POLICY_DEFAULT, now=0.0, urandom=random.Random(7).randbytes,
        rng=random.Random(8), node_id="gw-a", announce_node=announce,
    )  # fmt: skip
    links = [MemoryLink(i, rng=rng, delay_s=0.01) for i in range(1, n_paths + 1)]
    sim = Simulation(client, gateway, links)
    sim.start()
    return sim


def test_a_cluster_node_tells_the_client_at_the_handshake_and_on_every_change() -> None:
    sim = build(announce=True)
    sim.run_until(1.0)
    snap = sim.client.snapshot(sim.now)
    assert snap.state == "ATTACHED"
    assert (snap.serving_node, snap.owner_epoch) == ("gw-a", 0)

    session = next(iter(sim.gateway.sessions.values()))
    session.announce_owner(2)  # s8-cluster: acquired with owner epoch 2
    sim.run_until(sim.now + 0.5)
    assert (sim.client.serving_node, sim.client.owner_epoch) == ("gw-a", 2)

    session.owner_epoch = 1  # a stale owner epoch (a late message of an earlier owner)
    assert sim.client.switch_to(2, sim.now) is None  # REATTACH_ACK, NODE_INFO before it
    sim.run_until(sim.now + 1.0)
    assert sim.client.snapshot(sim.now).active == 2
    assert (sim.client.serving_node, sim.client.owner_epoch) == ("gw-a", 2)  # kept
    assert sim.client.report.drops.get("malformed", 0) == 0

    session.owner_epoch = 3  # set by a transfer; the next reattach says so
    sim.run_until(sim.now + 10.0)  # past the switch cooldown
    assert sim.client.switch_to(1, sim.now) is None
    sim.run_until(sim.now + 1.0)
    assert sim.client.snapshot(sim.now).active == 1
    assert (sim.client.serving_node, sim.client.owner_epoch) == ("gw-a", 3)

    view = session_view(sim.client.snapshot(sim.now))
    assert isinstance(view, SessionView)
    assert (view.serving_node, view.owner_epoch) == ("gw-a", 3)


def test_a_gateway_that_is_not_a_cluster_node_says_nothing_of_nodes() -> None:
    sim = build(announce=False)
    sim.run_until(1.0)
    session = next(iter(sim.gateway.sessions.values()))
    session.announce_owner(4)  # nothing to tell: not a cluster node
    assert sim.client.switch_to(2, sim.now) is None
    sim.run_until(sim.now + 1.0)
    snap = sim.client.snapshot(sim.now)
    assert snap.active == 2 and (snap.serving_node, snap.owner_epoch) == ("", 0)
    assert sim.client.report.drops.get("unknown_type", 0) == 0  # no NODE_INFO was sent


def test_a_malformed_node_info_is_a_counted_drop_and_changes_nothing() -> None:
    sim = build(announce=True)
    sim.run_until(1.0)
    session = next(iter(sim.gateway.sessions.values()))
    binding = session.binding
    assert binding is not None
    before = sim.client.report.drops.get("malformed", 0)
    # authentic (sealed with the session's keys) but not a valid node id
    session._send(binding, NodeInfo(9, 4, b"gw a".ljust(64, b"\0")))
    sim.run_until(sim.now + 0.5)
    assert sim.client.report.drops.get("malformed", 0) == before + 1
    assert (sim.client.serving_node, sim.client.owner_epoch) == ("gw-a", 0)


# -- what the user sees -----------------------------------------------------------------------


def _snapshot(node: str, owner_epoch: int) -> EngineSnapshot:
    view = dataclasses.replace(
        NO_SESSION, session_id="ab" * 16, state="ATTACHED", state_version=3,
        inner_address="10.66.0.2", serving_node=node, owner_epoch=owner_epoch,
    )  # fmt: skip
    return EngineSnapshot(seq=1, ts_ms=0, session=view)


def test_jvpn_status_shows_the_node_and_owner_epoch_only_in_a_cluster() -> None:
    clustered = "\n".join(client_text(_snapshot("gw-b", 2), Style(False)))
    assert "node gw-b · owner epoch 2" in clustered
    plain = "\n".join(client_text(_snapshot("", 0), Style(False)))
    assert "owner epoch" not in plain and "node " not in plain


def test_the_session_panel_shows_the_node_and_owner_epoch_only_in_a_cluster() -> None:
    from textual.app import App, ComposeResult

    from jvpn_tui.widgets import SessionPanel

    class PanelApp(App[None]):
        """The panel alone: no engine publishes over what the test shows."""

        def compose(self) -> ComposeResult:
            yield SessionPanel()

    async def run() -> tuple[str, str]:
        app = PanelApp()
        async with app.run_test(size=(120, 30)) as pilot:
            panel = app.query_one(SessionPanel)
            panel.show(_snapshot("gw-b", 2))
            await pilot.pause()
            shown = _text(panel)
            panel.show(_snapshot("", 0))
            await pilot.pause()
            return shown, _text(panel)

    shown, hidden = asyncio.run(run())
    assert "node gw-b · owner epoch 2" in shown
    assert "owner epoch" not in hidden and "Node" not in hidden


def _text(widget: object) -> str:
    visual = widget.visual  # type: ignore[attr-defined]
    return str(getattr(visual, "plain", visual))
