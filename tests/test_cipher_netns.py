"""The data cipher negotiation on the real programs (issue 11, item 2; docs/client.md and
docs/gateway.md, ``ciphers``).

``jvpn-gateway`` and ``jvpn-tui --headless`` run in namespaces with real TUNs
(tests/realnet.py); only the ``ciphers`` keys of their configuration files differ from the
usual rig. Asserted: both suites carry a short inner TCP transfer (intact, by SHA-256) and
UDP echoes, and both programs name the cipher in SESSION_CREATED and in ``jvpn status
--json``; a client that forbids AES and a gateway that forbids it get ChaCha20-Poly1305; with
no cipher in common the client exits with ``cipher_mismatch`` and a line naming both
sides' ciphers, and the gateway says why it refused (event and console line).
Needs root, namespaces and /dev/net/tun; skips otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from exit_codes import EXIT_CODES
from netns import require_tun
from realnet import CLIENT_INNER, RealTunnel, expected_sha256, wait_until

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
AES, CHACHA = "aes-256-gcm", "chacha20-poly1305"
MiB = 1 << 20


class CipherTunnel(RealTunnel):
    """The usual rig with ``ciphers`` set in the client's and/or the gateway's file."""

    def __init__(
        self, tmp: Path, client_ciphers: list[str] | None, gateway_ciphers: list[str] | None
    ) -> None:
        super().__init__(tmp, n_paths=1)
        self.client_ciphers = client_ciphers
        self.gateway_ciphers = gateway_ciphers

    def _write_files(self) -> None:
        super()._write_files()
        for name, ciphers in (
            ("client.toml", self.client_ciphers),
            ("gateway.toml", self.gateway_ciphers),
        ):
            if ciphers is not None:  # a top-level key: before the first table
                path = self.tmp / name
                path.write_text(f"ciphers = {json.dumps(ciphers)}\n" + path.read_text())


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Callable[..., CipherTunnel]]:
    require_tun()
    built: list[CipherTunnel] = []

    def make(
        client: list[str] | None = None, gateway: list[str] | None = None, attach: bool = True
    ) -> CipherTunnel:
        sub = tmp_path / f"t{len(built)}"
        sub.mkdir()
        t = CipherTunnel(sub, client, gateway)
        built.append(t)
        t.open()
        t.start_client(wait_attached=attach)
        return t

    try:
        yield make
    finally:
        for t in reversed(built):
            t.close()


def status(sock: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "tunnel.cli", "--socket", str(sock), "status", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=30, check=False, env=ENV,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc["status"]  # type: ignore[no-any-return]


def assert_carries_traffic(t: RealTunnel) -> None:
    assert t.udp_echo(count=20) == [CLIENT_INNER] * 20
    result = t.start_download(MiB).finish(60)
    assert result.receiver["received"] == MiB
    assert result.receiver["sha256"] == result.sender["sha256"] == expected_sha256(MiB)


@pytest.mark.parametrize(
    ("client", "gateway", "expected"),
    [
        pytest.param([AES, CHACHA], None, AES, id="aes-256-gcm"),
        pytest.param([CHACHA], None, CHACHA, id="client-forbids-aes"),
        pytest.param([AES, CHACHA], [CHACHA], CHACHA, id="gateway-forbids-aes"),
    ],
)
def test_both_programs_agree_on_the_cipher_and_carry_traffic(
    rig: Callable[..., CipherTunnel],
    client: list[str],
    gateway: list[str] | None,
    expected: str,
) -> None:
    t = rig(client, gateway)
    assert t.events.wait_type("SESSION_CREATED", 10)["cipher"] == expected
    assert t.gw_events is not None
    assert t.gw_events.wait_type("SESSION_CREATED", 10)["cipher"] == expected
    assert_carries_traffic(t)
    assert status(t.client_socket)["session"]["cipher"] == expected
    gw = status(t.gateway_socket)
    assert gw["ciphers"] == (gateway or [AES, CHACHA])
    assert [s["cipher"] for s in gw["sessions"]] == [expected]
    assert t.gw_stderr is not None
    wait_until(
        lambda: any(" started: " in x and x.endswith(f", {expected}") for x in t.gw_stderr.lines),
        10, "the gateway's session line names the cipher",
    )  # fmt: skip
    assert t.stop_client() == 0


def test_no_common_cipher_ends_the_client_with_a_clear_reason(
    rig: Callable[..., CipherTunnel],
) -> None:
    t = rig([AES], [CHACHA], attach=False)
    assert t.client is not None
    assert t.client.wait(30) == EXIT_CODES["cipher_mismatch"]
    t.events.join(5.0)
    final = t.final()
    assert final["final_reason"] == "cipher_mismatch"
    assert not t.client_tun_exists()  # the client restored its namespace
    assert t.client_stderr is not None
    t.client_stderr.join(5.0)
    assert (
        "jvpn-tui: cipher_mismatch: no data cipher in common with the gateway: this client "
        f"accepts {AES} (ciphers in its configuration), the gateway allows {CHACHA}"
    ) in "\n".join(t.client_stderr.lines), t.client_stderr.lines
    # the gateway: no session, the refusal as an event and as a console line
    assert t.gw_events is not None and t.gw_stderr is not None
    denied = t.gw_events.wait_type("POLICY_EVENT", 10, policy_name="SESSION_DENIED")
    assert denied["reason_code"] == "cipher_mismatch"
    assert f"the client accepts {AES}; this gateway allows {CHACHA}" in denied["detail"]
    wait_until(
        lambda: any("refused a handshake: client from " in x for x in t.gw_stderr.lines),
        10, "the gateway's console line",
    )  # fmt: skip
    gw = status(t.gateway_socket)
    assert gw["sessions"] == [] and gw["sessions_created"] == 0
