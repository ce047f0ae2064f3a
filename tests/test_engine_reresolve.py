"""D7 as issue 10 item 4 asks: a gateway given by name is resolved again when every path
failed (the session found nothing to move to), not only on a reattach attempt.

One path, its gateway named ``localhost``: at start it means a relay on 127.0.0.2 in front
of the gateway. The relay then blackholes everything (the path dies; with one path there
is nothing to move to, so no reattach attempt is made) and the name now means 127.0.0.1,
the gateway itself. The engine looks the name up again because every path failed, follows
it, and the session recovers on the same path.
"""

from __future__ import annotations

from typing import Any

import pytest
from engine_watch import Watcher
from loopback_gateway import LoopbackGateway

import tunnel.client.engine as engine_module
from tunnel.client.config import ClientConfig, PathConfig
from tunnel.client.engine import ClientEngine
from tunnel.core.handshake import generate_keypair
from tunnel.impair.thread import run_relay_in_thread
from tunnel.io.inner import MemoryInner


def test_every_path_failed_looks_the_gateway_name_up_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    private, public = generate_keypair()
    with LoopbackGateway(public) as gw:
        port = gw.address[1]
        with run_relay_in_thread(("127.0.0.2", port), gw.address, name="old") as relay:
            start = {"localhost": ("127.0.0.2", port)}  # the name at start: the relay
            monkeypatch.setattr(engine_module, "_resolve", lambda host, p, family: start[host])
            path = PathConfig(1, "named", ("127.0.0.1", 0), None, ("localhost", port))
            cfg = ClientConfig(private_key=private, gateway_public_key=gw.public_key, paths=(path,))
            engine = ClientEngine(cfg, inner=MemoryInner(rate_pps=20))
            looked_up: list[str] = []

            async def now_direct(host: str, port_: int, family: int) -> tuple[str, int]:
                looked_up.append(host)
                return ("127.0.0.1", port_)  # the name now: the gateway itself

            engine._lookup = now_direct  # type: ignore[method-assign]
            w = Watcher(engine)
            engine.start()
            try:
                w.wait(lambda: w.of("SESSION_CREATED"))
                relay.set("both", blackhole=True)
                denied: Any = w.wait(lambda: [
                    d for d in w.of("TRANSPORT_SWITCH_DENIED")
                    if d["reason_code"] == "no_valid_candidate"
                    and d["requested_transport"] is None
                ])  # fmt: skip
                assert denied
                moved = w.wait(lambda: [d for d in w.of("DIAGNOSTIC")
                                        if "now resolves to 127.0.0.1" in d["detail"]])  # fmt: skip
                assert "'localhost' of path 1" in moved[0]["detail"]
                assert looked_up and looked_up[0] == "localhost"
                w.wait(lambda: w.snapshot and w.snapshot.session.state == "ATTACHED"
                       and w.of("STATE_CHANGE")[-1]["new_state"] == "ATTACHED")  # fmt: skip
                states = [e["new_state"] for e in w.of("STATE_CHANGE")]
                assert "RECOVERING" in states and states[-1] == "ATTACHED"
                assert len({e["session_id"] for e in w.events if e["session_id"]}) == 1
            finally:
                engine.stop()
    assert engine.final_reason == "operator_terminated"
