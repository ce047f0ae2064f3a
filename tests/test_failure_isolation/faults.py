"""Fault injection into the real programs (test-only failpoints, never shipped).

    python faults.py FAULT gateway --config gw.toml     # runs tunnel.gateway.main.main
    python faults.py FAULT client --config alice.toml   # runs jvpn-tui --headless

The program runs unchanged; this wrapper only adds signal handlers that damage its
in-memory state on demand, so a test decides when the corruption happens:

* ``version-skew`` (gateway), SIGUSR1: every live session's ``state_version`` jumps by 5
  behind the machine's back (a corrupted record). The next transition's version no
  longer follows the ownership store's record, which must be detected.
* ``client-faults`` (client), SIGUSR1: ask the session machine for an illegal
  transition (ATTACHED --reattach_ok-->), which must be rejected without mutation;
  SIGUSR2: an internal invariant breaks inside the engine loop (an exception), which
  must end the session explicitly.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any


def _gateway(fault: str, argv: list[str]) -> int:
    from tunnel.gateway import main as gateway_main
    from tunnel.gateway.runtime import GatewayRuntime

    assert fault == "version-skew", fault
    original = GatewayRuntime.serve

    def corrupt(runtime: GatewayRuntime) -> None:
        for s in runtime.gateway.sessions.values():
            if not s.machine.terminated:
                s.machine.version += 5
        print("faults: state_version skewed by 5", file=sys.stderr, flush=True)

    async def serve(self: GatewayRuntime, **kwargs: Any) -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, corrupt, self)
        await original(self, **kwargs)

    GatewayRuntime.serve = serve  # type: ignore[method-assign]
    return gateway_main.main(argv)


def _client(fault: str, argv: list[str]) -> int:
    from tunnel.client import headless
    from tunnel.client.engine import ClientEngine
    from tunnel.core.events import Reason
    from tunnel.core.session import Trigger

    assert fault == "client-faults", fault
    engines: list[ClientEngine] = []
    build = headless.build_engine_from_args

    def capture(config: str | None, demo: bool, **kwargs: Any) -> Any:
        engine = build(config, demo, **kwargs)
        assert isinstance(engine, ClientEngine)
        engines.append(engine)
        return engine

    def illegal(now: float) -> None:
        session = engines[0].session
        assert session is not None
        session.machine.fire(Trigger.REATTACH_OK, Reason.REATTACH_SUCCESS, session.ts_ms(now))
        print("faults: illegal transition requested", file=sys.stderr, flush=True)

    def broken(now: float) -> None:
        raise RuntimeError("state corrupted: active transport missing while ATTACHED")

    def on_signal(signum: int, frame: object) -> None:
        runtime = engines[0].runtime if engines else None
        loop = engines[0]._loop if engines else None
        if runtime is None or loop is None:
            return
        fn = illegal if signum == signal.SIGUSR1 else broken
        loop.call_soon_threadsafe(runtime.run_command, fn)

    headless.build_engine_from_args = capture  # type: ignore[assignment]
    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGUSR2, on_signal)
    return headless.main(argv)


def main() -> int:
    fault, program, *argv = sys.argv[1:]
    if program == "gateway":
        return _gateway(fault, argv)
    return _client(fault, argv)


if __name__ == "__main__":
    raise SystemExit(main())
