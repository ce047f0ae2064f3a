"""SIGTERM with many sessions (issue 11 item 7): a real gateway process with 2,000 real
sessions over loopback (the driver of bench/scale.py: one process, one socket and one
ClientSession per client, each from its own 127.x.y.z address). On SIGTERM every client
must receive its TERMINATE (reason gateway_shutdown: the memory store keeps nothing,
DESIGN D15c) and the gateway must exit 0.
Accounting only: the time is bench/scale.py's to measure, not a test's.
"""

from __future__ import annotations

import importlib.util
import resource
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

from tunnel.core.session import State

N = 2000
PROBE_MS = 1000
BENCH = Path(__file__).resolve().parent.parent / "bench"


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_scale", BENCH / "scale.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_scale"] = module
    spec.loader.exec_module(module)
    return module


def test_sigterm_sends_terminate_to_every_session_and_exits_0() -> None:
    scale = _bench()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < N + 100:
        raise AssertionError(f"needs {N + 100} file descriptors, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, N + 100), hard))
    seed = b"scale-test"
    # A large handshake budget and idle probes once a second: neither the setup nor
    # idle probing (10/s per session at the default policy) is what this test is about.
    proc, port = scale.start_gateway(N, seed, 100_000.0, str(BENCH.parent), PROBE_MS)
    gw_pub = scale.public_key(scale.key_of(seed, 1 << 31))
    sw = scale.Swarm(("127.0.0.1", port), gw_pub, seed, scale.policy_for(PROBE_MS))
    try:
        res = scale.Results()
        # bounded by progress, not by the clock: a loaded machine attaches them slower
        attached = scale.attach_in_waves(sw, N, 0.0, stall=60.0)
        assert attached == N, res.rows
        code, got = scale.measure_shutdown(sw, proc, res)
        assert code == 0, res.rows
        ends = Counter((str(p.core.state), str(p.terminated_by)) for p in sw.peers.values())
        assert got == N, (res.rows, ends)
        assert set(ends) == {("TERMINATED", "gateway_shutdown")}, ends
        assert sw.count(State.TERMINATED) == N
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        sw.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
