"""The tunnels the benches run on a shared rig: jvpn and the anchors it is compared with.

Each runs on a :class:`netns.Topology` someone else owns (the same namespaces and veth
paths for every tool, one tool at a time) with the same inner addresses (gateway
10.66.0.1, client 10.66.0.2, inner MTU 1420), so the same inner traffic runs through each.
``start()`` brings the tunnel up and returns when inner traffic can flow; ``stop()``
removes everything it started (its processes, hence its TUNs) and waits until the inner
addresses are gone, so the next tool starts on a clean rig. ``pids()`` names the tunnel's
processes by role (gateway, client) for CPU accounting; ``data_cipher()`` says which data
cipher the running tunnel uses when it tells.

bench/failover.py (path kills):

* :class:`Jvpn`: ``jvpn-gateway`` and ``jvpn-tui --headless`` (bench/throughput.py's
  :class:`TunnelRig`, default policy unless one is given).
* :class:`WireguardWatchdog`: ``wireguard-go`` on both sides (persistent-keepalive 1 s)
  plus ``wg-watchdog.sh`` (beside this file) on the client: every second it moves the
  peer's endpoint to the other path when no byte arrived since its previous check.
* :class:`Openvpn`: OpenVPN 2.6 peer-to-peer over UDP with a static key, the client
  listing both paths as ``--remote`` (in order), ``--keepalive 1 3`` and no pause
  before trying the next remote; the gateway floats to the client's new address. After a
  connection has worked, OpenVPN's first restart retries the same remote (``no_advance``,
  set in init.c when the client initialised), so a dead path costs two ping-restarts.

bench/compare.py (throughput; :class:`Jvpn` as above):

* :class:`Wireguard`: ``wireguard-go`` on both sides, the client's endpoint on path 1,
  persistent-keepalive 25 s, nothing else.
* :class:`OpenvpnTls` (AES-256-GCM) and :class:`OpenvpnChacha` (ChaCha20-Poly1305):
  OpenVPN 2.6 peer-to-peer over UDP with TLS, self-signed certificates pinned with
  ``--peer-fingerprint`` (static-key mode has no AEAD ciphers), one ``--data-ciphers``
  entry, userspace (``--disable-dco``).
"""

from __future__ import annotations

import contextlib
import datetime
import re
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from netns import Topology, child_env
from throughput import INNER_CLIENT, INNER_GATEWAY, INNER_MTU, LineLog, TunnelRig

HERE = Path(__file__).resolve().parent
WATCHDOG = HERE / "wg-watchdog.sh"
ANCHOR_PORT = 51820
WG_RUN_DIR = Path("/var/run/wireguard")


class ToolError(RuntimeError):
    """The tool did not come up; the message says why (one line first)."""


def wait_until(ready: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.05)
    raise ToolError(f"no {what} within {timeout:.0f} s")


def inner_addresses(topo: Topology) -> set[str]:
    """The inner addresses (10.66.0.1/.2) present in either namespace."""
    found = set()
    for ns in topo.namespaces:
        for addr in topo.ipr(ns).addr("dump"):
            ip = addr.get_attr("IFA_ADDRESS")
            if ip in (INNER_GATEWAY, INNER_CLIENT):
                found.add(ip)
    return found


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=8)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _follow(proc: subprocess.Popen[bytes]) -> LineLog:
    log = LineLog()
    log.follow(proc.stdout)
    return log


def first_line(argv: list[str]) -> str:
    """First output line of a version command, or "?"."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0].strip() if lines else "?"


class Tool:
    """One tunnel implementation under test."""

    name = "?"
    requires: dict[str, str] = {}
    """command -> Debian package that provides it."""

    def __init__(self, topo: Topology, workdir: Path) -> None:
        self.topo = topo
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.role_pids: dict[str, int] = {}
        """The tunnel's own processes by role ("gateway", "client"): their CPU is measured."""

    def describe(self) -> str:
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        _stop(self.procs)
        wait_until(lambda: not inner_addresses(self.topo), 15.0, "inner addresses removed")

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def kill_note(self, t_down: float, t_end: float) -> str:
        """What the tool itself reported about the kill at ``t_down`` (one short cell)."""
        return ""

    def run_notes(self) -> list[str]:
        """Anything about the whole run worth a line (terminations, restarts)."""
        return []

    def diagnostics(self) -> str:
        return ""

    def pids(self) -> dict[str, int]:
        """The tunnel's processes by role ("gateway", "client"), for CPU accounting."""
        return dict(self.role_pids)

    def data_cipher(self) -> str | None:
        """The data-channel cipher the running tunnel uses, when it says so."""
        return None

    def _exec(
        self,
        ns: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        role: str | None = None,
    ) -> LineLog:
        proc = self.topo.exec(
            ns, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env(env)
        )
        self.procs.append(proc)
        if role is not None:
            self.role_pids[role] = proc.pid
        return _follow(proc)


class Jvpn(Tool):
    """jvpn-gateway + jvpn-tui --headless (bench/throughput.py's rig, on a shared topology)."""

    name = "jvpn"

    def __init__(self, topo: Topology, workdir: Path, policy_toml: str | None = None) -> None:
        super().__init__(topo, workdir)
        self.rig = _SharedRig(topo, policy_toml)

    def describe(self) -> str:
        policy = "given policy" if self.rig.policy_toml else "default policy"
        return f"jvpn (this tree): jvpn-gateway + jvpn-tui --headless, {policy}"

    def start(self) -> None:
        self.rig.start()

    def stop(self) -> None:
        self.rig.close()
        wait_until(lambda: not inner_addresses(self.topo), 15.0, "inner addresses removed")

    def alive(self) -> bool:
        return self.rig.alive()

    def kill_note(self, t_down: float, t_end: float) -> str:
        switches = [e for t, e in self.rig.events("TRANSPORT_SWITCH", since=t_down) if t < t_end]
        denied = [
            e for t, e in self.rig.events("TRANSPORT_SWITCH_DENIED", since=t_down) if t < t_end
        ]
        if not switches:
            return f"no switch ({len(denied)} denied)"
        sw = switches[0]
        note = (
            f"-> {sw['new_transport']} {sw['reason_code']}, "
            f"switch_latency {float(sw['switch_latency_ms']):.0f} ms"
        )
        return note + (f", {len(denied)} denied first" if denied else "")

    def run_notes(self) -> list[str]:
        terminated = self.rig.events("SESSION_TERMINATED")
        latencies = [float(e["switch_latency_ms"]) for _, e in self.rig.events("TRANSPORT_SWITCH")]
        median = (
            f", switch_latency_ms median {statistics.median(latencies):.0f}" if latencies else ""
        )
        return [
            f"TRANSPORT_SWITCH events: {len(latencies)}{median}; session terminated: "
            f"{'yes' if terminated else 'no'}"
        ]

    def diagnostics(self) -> str:
        return self.rig.diagnostics()

    def pids(self) -> dict[str, int]:
        return self.rig.pids

    def data_cipher(self) -> str | None:
        """The cipher named by the client's latest event that names one (any field whose
        name contains "cipher"), or None when no event does."""
        found = None
        for _, event in self.rig.events():
            for key, value in event.items():
                if "cipher" in key and isinstance(value, str) and value:
                    found = value
        return found


class _SharedRig(TunnelRig):
    """:class:`TunnelRig` on a topology opened before it and closed after it."""

    def __init__(self, topo: Topology, policy_toml: str | None) -> None:
        super().__init__(topo.n_paths, policy_toml=policy_toml)
        self.topo = topo

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        _stop([p for p in (self.client, self.gateway) if p is not None])
        shutil.rmtree(self.workdir, ignore_errors=True)


class Wireguard(Tool):
    """wireguard-go on both sides, the client's endpoint on path 1 (a throughput anchor)."""

    name = "wireguard-go"
    requires = {"wireguard-go": "wireguard-go", "wg": "wireguard-tools"}
    keepalive = "25"
    """persistent-keepalive, seconds: setting it also starts the handshake at once."""

    def __init__(self, topo: Topology, workdir: Path) -> None:
        super().__init__(topo, workdir)
        self.ifname = {topo.client_ns: f"wgc-{topo.tag}", topo.gateway_ns: f"wgg-{topo.tag}"}
        self.endpoints = [f"{p.gateway_ip}:{ANCHOR_PORT}" for p in topo.paths[:2]]
        self.logs: list[LineLog] = []
        self.gateway_public_key = ""

    def describe(self) -> str:
        version = first_line(["wireguard-go", "--version"])
        return (
            f"{version}, both ends userspace, inner MTU {INNER_MTU}, the client's endpoint "
            f"on path 1, persistent-keepalive {self.keepalive} s; no other tuning"
        )

    def data_cipher(self) -> str | None:
        return "ChaCha20-Poly1305"  # WireGuard has no other

    def _keys(self, who: str) -> tuple[Path, str]:
        key = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True)
        path = self.workdir / f"wg-{who}.key"
        path.write_text(key.stdout)
        path.chmod(0o600)
        pub = subprocess.run(
            ["wg", "pubkey"], input=key.stdout, capture_output=True, text=True, check=True
        )
        return path, pub.stdout.strip()

    def _device(self, ns: str, address: str) -> None:
        ifname = self.ifname[ns]
        role = "gateway" if ns == self.topo.gateway_ns else "client"
        self.logs.append(
            self._exec(ns, ["wireguard-go", "-f", ifname], {"LOG_LEVEL": "error"}, role=role)
        )
        sock = WG_RUN_DIR / f"{ifname}.sock"
        wait_until(lambda: sock.exists() or not self.alive(), 10.0, f"{sock}")
        if not self.alive():
            raise ToolError(f"wireguard-go exited: {self.logs[-1].text()[-300:]}")
        ipr = self.topo.ipr(ns)
        index = ipr.link_lookup(ifname=ifname)[0]
        ipr.addr("add", index=index, address=address, prefixlen=24)
        ipr.link("set", index=index, mtu=INNER_MTU, state="up")

    def _wg(self, ns: str, *args: str) -> None:
        out = self.topo.run(ns, ["wg", "set", self.ifname[ns], *args])
        if out.returncode != 0:
            raise ToolError(f"wg set failed: {(out.stderr or out.stdout).strip()}")

    def start(self) -> None:
        topo = self.topo
        gw_key, gw_pub = self._keys("gateway")
        cl_key, cl_pub = self._keys("client")
        self.gateway_public_key = gw_pub
        self._device(topo.gateway_ns, INNER_GATEWAY)
        self._device(topo.client_ns, INNER_CLIENT)
        self._wg(
            topo.gateway_ns,
            "private-key",
            str(gw_key),
            "listen-port",
            str(ANCHOR_PORT),
            "peer",
            cl_pub,
            "allowed-ips",
            f"{INNER_CLIENT}/32",
            "persistent-keepalive",
            self.keepalive,
        )
        self._wg(
            topo.client_ns,
            "private-key",
            str(cl_key),
            "peer",
            gw_pub,
            "allowed-ips",
            f"{INNER_GATEWAY}/32",
            "endpoint",
            self.endpoints[0],
            "persistent-keepalive",
            self.keepalive,
        )
        wait_until(lambda: self._handshake(gw_pub), 15.0, "WireGuard handshake")

    def _handshake(self, peer: str) -> bool:
        out = self.topo.run(
            self.topo.client_ns,
            ["wg", "show", self.ifname[self.topo.client_ns], "latest-handshakes"],
        )
        for line in out.stdout.splitlines():
            fields = line.split()
            if len(fields) == 2 and fields[0] == peer and fields[1] != "0":
                return True
        return False

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            for ifname in self.ifname.values():
                with contextlib.suppress(OSError):
                    (WG_RUN_DIR / f"{ifname}.sock").unlink()

    def diagnostics(self) -> str:
        return "\n".join(log.text()[-1500:] for log in self.logs)


class WireguardWatchdog(Wireguard):
    """wireguard-go on both sides, endpoint moved by wg-watchdog.sh (1 s checks)."""

    name = "wireguard-go+watchdog"
    keepalive = "1"

    def __init__(self, topo: Topology, workdir: Path) -> None:
        super().__init__(topo, workdir)
        self.watchdog: LineLog | None = None

    def describe(self) -> str:
        version = first_line(["wireguard-go", "--version"])
        return (
            f"{version}, both ends userspace, persistent-keepalive 1 s, the gateway learns the "
            "client's address by roaming; watchdog bench/failover_kit/wg-watchdog.sh on the "
            "client: "
            "every 1 s it reads the peer's received-bytes counter (wg show transfer) and, if it "
            "has not grown since the previous check, moves the peer's endpoint to the other "
            "path (wg set ... endpoint); no other tuning"
        )

    def start(self) -> None:
        super().start()
        self.watchdog = self._exec(
            self.topo.client_ns,
            [
                "sh",
                str(WATCHDOG),
                self.ifname[self.topo.client_ns],
                self.gateway_public_key,
                *self.endpoints,
            ],
        )
        wait_until(lambda: "ready" in self.watchdog_text(), 10.0, "watchdog ready")

    def watchdog_text(self) -> str:
        return self.watchdog.text() if self.watchdog else ""

    def kill_note(self, t_down: float, t_end: float) -> str:
        if self.watchdog is None:
            return ""
        moves = [
            (t, line)
            for t, line in self.watchdog.snapshot()
            if t_down <= t < t_end and " switch " in line
        ]
        if not moves:
            return "watchdog: no move"
        t, line = moves[0]
        return f"watchdog moved to {line.split()[-1]} at +{(t - t_down) * 1000:.0f} ms" + (
            f" ({len(moves)} moves)" if len(moves) > 1 else ""
        )

    def diagnostics(self) -> str:
        return "\n".join(log.text()[-1500:] for log in [*self.logs, *filter(None, [self.watchdog])])


class _OpenvpnPair(Tool):
    """Two openvpn processes, gateway and client, each on its own TUN; up once both log
    'Initialization Sequence Completed'."""

    requires = {"openvpn": "openvpn"}

    def __init__(self, topo: Topology, workdir: Path) -> None:
        super().__init__(topo, workdir)
        self.client_log: LineLog | None = None
        self.gateway_log: LineLog | None = None

    def _launch(self, gateway_args: list[str], client_args: list[str]) -> None:
        topo = self.topo
        self.gateway_log = self._exec(
            topo.gateway_ns, ["openvpn", "--dev", f"ovg-{topo.tag}", *gateway_args], role="gateway"
        )
        self.client_log = self._exec(
            topo.client_ns, ["openvpn", "--dev", f"ovc-{topo.tag}", *client_args], role="client"
        )
        for log in (self.gateway_log, self.client_log):
            wait_until(
                partial(self._completed, log), 20.0, "openvpn 'Initialization Sequence Completed'"
            )

    def _completed(self, log: LineLog) -> bool:
        if not self.alive():
            raise ToolError(f"openvpn exited: {self.diagnostics()[-400:]}")
        return "Initialization Sequence Completed" in log.text()

    def diagnostics(self) -> str:
        return "\n".join(
            log.text()[-1500:] for log in (self.gateway_log, self.client_log) if log is not None
        )


class Openvpn(_OpenvpnPair):
    """OpenVPN p2p over UDP with a static key; the client lists both paths as --remote."""

    name = "openvpn"

    CLIENT_TUNING = (
        "--keepalive",
        "1",
        "3",
        "--connect-retry",
        "0",
        "--persist-tun",
        "--persist-key",
        "--nobind",
    )
    GATEWAY_TUNING = ("--ping", "1", "--float", "--persist-tun", "--persist-key")
    COMMON = (
        "--proto",
        "udp",
        "--dev-type",
        "tun",
        "--cipher",
        "AES-256-CBC",
        "--auth",
        "SHA256",
        "--disable-dco",
        "--verb",
        "3",
        "--tun-mtu",
        str(INNER_MTU),
    )

    def describe(self) -> str:
        version = " ".join(first_line(["openvpn", "--version"]).split()[:2])
        return (
            f"{version} peer-to-peer, UDP, static key (AES-256-CBC + HMAC-SHA256: no TLS "
            "handshake to redo after a restart, so --tls-timeout does not apply), no DCO; "
            "client: --remote <path 1> --remote <path 2> (tried in order, no --remote-random), "
            "--keepalive 1 3 (ping every 1 s, restart after 3 s without a packet), "
            "--connect-retry 0 (no pause before the next remote), --persist-tun --persist-key "
            "--nobind; gateway: --ping 1 --float (follows the client's new address on the "
            "first authenticated packet), no ping-restart. Once a connection has worked, the "
            "client's first restart retries the same remote (OpenVPN sets no_advance at "
            "'Initialization Sequence Completed'; no option turns that off), so a dead path "
            "costs two ping-restarts"
        )

    def start(self) -> None:
        key = self.workdir / "ovpn.key"
        gen = subprocess.run(
            ["openvpn", "--genkey", "secret", str(key)], capture_output=True, text=True
        )
        if gen.returncode != 0:
            raise ToolError(f"openvpn --genkey failed: {gen.stderr.strip()[:200]}")
        remotes = [
            a for p in self.topo.paths[:2] for a in ("--remote", p.gateway_ip, str(ANCHOR_PORT))
        ]
        self._launch(
            [
                *self.COMMON,
                "--secret",
                str(key),
                "0",
                "--lport",
                str(ANCHOR_PORT),
                "--ifconfig",
                INNER_GATEWAY,
                INNER_CLIENT,
                *self.GATEWAY_TUNING,
            ],
            [
                *self.COMMON,
                "--secret",
                str(key),
                "1",
                *remotes,
                "--ifconfig",
                INNER_CLIENT,
                INNER_GATEWAY,
                *self.CLIENT_TUNING,
            ],
        )

    def data_cipher(self) -> str | None:
        return "AES-256-CBC + HMAC-SHA256"

    def kill_note(self, t_down: float, t_end: float) -> str:
        if self.client_log is None:
            return ""
        lines = [(t, ln) for t, ln in self.client_log.snapshot() if t_down <= t < t_end]
        restarts = []
        for t, line in lines:
            if "Inactivity timeout (--ping-restart)" in line:
                restarts.append(f"+{(t - t_down) * 1000:.0f}")
            elif "link remote:" in line and restarts:
                restarts[-1] += f" -> {line.rsplit(']', 1)[-1].split(':')[0]}"
        return "ping-restart " + ", ".join(restarts) if restarts else "no ping-restart"


def self_signed(workdir: Path, who: str) -> tuple[Path, Path, str]:
    """A self-signed EC P-256 certificate and key for ``who``: (cert, key, SHA-256
    fingerprint as OpenVPN's --peer-fingerprint writes it, AA:BB:...)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"jvpn-bench-{who}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = workdir / f"{who}.crt", workdir / f"{who}.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path, cert.fingerprint(hashes.SHA256()).hex(":").upper()


class OpenvpnTls(_OpenvpnPair):
    """OpenVPN 2.6 p2p over UDP with TLS and one AEAD data cipher (a throughput anchor).

    Static-key mode has no AEAD ciphers, so this one runs TLS: each end has a self-signed
    certificate, pinned by the other with ``--peer-fingerprint`` (no CA), and both list
    only ``cipher`` in ``--data-ciphers``; userspace (``--disable-dco``).
    """

    name = "openvpn-aes"
    cipher = "AES-256-GCM"
    COMMON = (
        "--proto",
        "udp",
        "--dev-type",
        "tun",
        "--disable-dco",
        "--verb",
        "3",
        "--tun-mtu",
        str(INNER_MTU),
    )
    CIPHER_LINE = re.compile(r"Data Channel: [Cc]ipher '([^']+)'")

    def describe(self) -> str:
        version = " ".join(first_line(["openvpn", "--version"]).split()[:2])
        return (
            f"{version} peer-to-peer, UDP, TLS (self-signed EC certificates pinned with "
            f"--peer-fingerprint), --data-ciphers {self.cipher}, userspace (--disable-dco), "
            f"inner MTU {INNER_MTU}, the client's remote on path 1; no other tuning"
        )

    def start(self) -> None:
        gw_cert, gw_key, gw_fp = self_signed(self.workdir, "gateway")
        cl_cert, cl_key, cl_fp = self_signed(self.workdir, "client")
        common = [*self.COMMON, "--data-ciphers", self.cipher]
        self._launch(
            [
                *common,
                "--tls-server",
                "--dh",
                "none",
                "--cert",
                str(gw_cert),
                "--key",
                str(gw_key),
                "--peer-fingerprint",
                cl_fp,
                "--lport",
                str(ANCHOR_PORT),
                "--ifconfig",
                INNER_GATEWAY,
                INNER_CLIENT,
            ],
            [
                *common,
                "--tls-client",
                "--cert",
                str(cl_cert),
                "--key",
                str(cl_key),
                "--peer-fingerprint",
                gw_fp,
                "--remote",
                self.topo.paths[0].gateway_ip,
                str(ANCHOR_PORT),
                "--nobind",
                "--ifconfig",
                INNER_CLIENT,
                INNER_GATEWAY,
            ],
        )
        used = self.data_cipher()
        if used is not None and used.upper() != self.cipher:
            raise ToolError(f"openvpn negotiated {used}, not {self.cipher}")

    def data_cipher(self) -> str | None:
        """The cipher the client's log says its data channel was initialised with."""
        text = self.client_log.text() if self.client_log is not None else ""
        found = self.CIPHER_LINE.findall(text)
        return found[-1] if found else None


class OpenvpnChacha(OpenvpnTls):
    """:class:`OpenvpnTls` with ChaCha20-Poly1305."""

    name = "openvpn-chacha"
    cipher = "CHACHA20-POLY1305"


ANCHORS: tuple[type[Tool], ...] = (WireguardWatchdog, Openvpn)
"""The tools failover.py --compare runs after jvpn, in this order."""

THROUGHPUT_ANCHORS: tuple[type[Tool], ...] = (Wireguard, OpenvpnTls, OpenvpnChacha)
"""The tools compare.py measures beside jvpn, in this order."""
