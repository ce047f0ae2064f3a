"""Client configuration (``client.toml``): parsed and validated into a frozen ClientConfig.

Every problem raises :class:`ConfigError` whose message names the file, the key and the
bad value (never a key's secret material), e.g.::

    client.toml: path[2].gateway = "10.0.0.1": expected host:port

docs/client.md documents every key; docs/examples/client.toml is a complete example.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from tunnel.core.policy import POLICY_DEFAULT, Policy, PolicyError, load_policy
from tunnel.keys import KeyFormatError, decode_key, load_private_key, load_public_key

MAX_CONFIG_SIZE: Final = 1 << 20
"""A client config is a few hundred bytes; anything near this is not one."""

MAX_PATHS: Final = 9
"""Candidate paths a client may list (the UI switches with keys 1-9)."""

_B64_KEY: Final = re.compile(r"[A-Za-z0-9+/]{42,44}={0,2}")
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")
_HOSTNAME_RE: Final = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9-]{1,63})*\.?")

TOP_KEYS: Final = (
    "private_key",
    "gateway_public_key",
    "policy",
    "node_id",
    "tun",
    "path",
    "events",
    "keymap",
    "inner",
)
TUN_KEYS: Final = ("name", "mtu", "address", "routes")
PATH_KEYS: Final = ("name", "bind", "device", "gateway")
EVENT_KEYS: Final = ("jsonl", "syslog")
INNER_KEYS: Final = ("kind", "rate_pps", "payload_size")
INNER_KINDS: Final = ("tun", "memory")


class ConfigError(ValueError):
    """A configuration file is missing, unreadable or invalid. The message says where."""


@dataclass(frozen=True, slots=True)
class PathConfig:
    """One candidate path: local side (address and/or device) and the gateway endpoint."""

    path_id: int
    """1-based position in the file: the UI's transport number."""
    name: str
    bind: tuple[str, int] | None
    """Local address and port to bind (port 0: any); None: the OS chooses."""
    device: str | None
    """Network device to pin the socket to (SO_BINDTODEVICE), or None."""
    gateway: tuple[str, int]
    """Gateway host (numeric or a name, resolved at start) and port."""

    @property
    def label(self) -> str:
        host, port = self.gateway
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        via = f" via {self.device}" if self.device else ""
        return f"{self.name} ({where}{via})"


@dataclass(frozen=True, slots=True)
class SyslogTarget:
    transport: str
    """``udp`` or ``tcp``."""
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """A validated client configuration. ``repr`` never shows the private key."""

    private_key: bytes = field(repr=False)
    gateway_public_key: bytes
    paths: tuple[PathConfig, ...]
    policy: Policy = POLICY_DEFAULT
    policy_file: Path | None = None
    """Re-read on ReloadPolicy; None: the built-in default policy."""
    node_id: str = "client"
    tun_name: str = "jvpn%d"
    mtu: int = 1420
    address: str | None = None
    """Inner ``address/prefix`` to configure; None: the gateway's assignment."""
    routes: tuple[str, ...] = ()
    jsonl: Path | None = None
    syslog: SyslogTarget | None = None
    keymap: Mapping[str, str] = field(default_factory=dict)
    """Binding id -> key, passed through to the UI unchanged."""
    inner_kind: str = "tun"
    """``tun`` (a kernel TUN, needs root) or ``memory`` (no device: a built-in ICMP echo
    source towards the gateway's inner address; for tests and trials without root)."""
    inner_rate_pps: float = 20.0
    """Echo requests per second of the ``memory`` traffic source."""
    inner_payload_size: int = 56
    """ICMP payload bytes of the ``memory`` traffic source."""
    source: str = "<config>"
    """The file it was read from (for messages)."""


def _fmt(value: object) -> str:
    text = repr(value) if not isinstance(value, str) else f'"{value}"'
    return text if len(text) <= 80 else text[:77] + "..."


class _Reader:
    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, key: str, value: object, why: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key} = {_fmt(value)}: {why}")

    def missing(self, key: str, why: str = "required key is missing") -> ConfigError:
        return ConfigError(f"{self.source}: {key}: {why}")

    def unknown(self, table: Mapping[str, Any], allowed: tuple[str, ...], prefix: str) -> None:
        for key in table:
            if key not in allowed:
                raise ConfigError(
                    f"{self.source}: {prefix}{key}: unknown key (known: {', '.join(allowed)})"
                )

    def string(self, table: Mapping[str, Any], key: str, prefix: str = "") -> str | None:
        if key not in table:
            return None
        value = table[key]
        if not isinstance(value, str) or not value.strip():
            raise self.error(prefix + key, value, "expected a non-empty string")
        return value

    def table(self, table: Mapping[str, Any], key: str) -> Mapping[str, Any]:
        value = table.get(key, {})
        if not isinstance(value, dict):
            raise self.error(key, value, f"expected a table ([{key}])")
        return value


def _relative(base: Path, value: str) -> Path:
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else base / path


def _host_port(r: _Reader, key: str, value: str, *, port_required: bool) -> tuple[str, int]:
    text = value.strip()
    m = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?", text)
    if m:
        host, port_text = m.group(1), m.group(2)
        try:
            if ipaddress.ip_address(host).version != 6:
                raise ValueError
        except ValueError:
            raise r.error(key, value, "brackets are for IPv6 addresses") from None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:
        raise r.error(key, value, "write IPv6 addresses in brackets: [addr]:port")
    else:
        host, port_text = text, None
    if port_text is None:
        if port_required:
            raise r.error(key, value, "expected host:port")
        port = 0
    else:
        if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise r.error(key, value, "port must be 0..65535")
        port = int(port_text)
    if port_required and port == 0:
        raise r.error(key, value, "port must be 1..65535")
    if not host:
        raise r.error(key, value, "empty host")
    return host, port


def _is_ip(host: str) -> int | None:
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None


def _key_from(r: _Reader, base: Path, key: str, value: str, *, private: bool) -> bytes:
    what = "private key" if private else "gateway public key"
    path = _relative(base, value)
    inline = not path.exists() and _B64_KEY.fullmatch(value.strip()) is not None
    if private and not inline:
        _check_private_mode(r, key, value, path)
    try:
        if private:
            return decode_key(value, what) if inline else load_private_key(path, what)
        return load_public_key(value.strip() if inline else path, what)
    except KeyFormatError as exc:
        shown = "<inline key>" if inline else value  # never echo key material
        raise r.error(key, shown, str(exc)) from None


def _check_private_mode(r: _Reader, key: str, value: str, path: Path) -> None:
    """Refuse a private key file other users can read (the gateway has the same rule)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # missing or unreadable: load_private_key says which
    if stat.S_ISREG(mode) and mode & stat.S_IRWXO:
        raise r.error(
            key, value,
            f"is accessible by every user (mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}",
        )  # fmt: skip


def _parse_path(r: _Reader, index: int, entry: object) -> PathConfig:
    prefix = f"path[{index}]."
    if not isinstance(entry, dict):
        raise r.error(f"path[{index}]", entry, "expected a table ([[path]])")
    r.unknown(entry, PATH_KEYS, prefix)
    name = r.string(entry, "name", prefix) or f"path{index}"
    if not _NAME_RE.fullmatch(name):
        raise r.error(prefix + "name", name, "use 1-32 letters, digits, '.', '_' or '-'")
    gateway_text = r.string(entry, "gateway", prefix)
    if gateway_text is None:
        raise r.missing(prefix + "gateway")
    gateway = _host_port(r, prefix + "gateway", gateway_text, port_required=True)
    if _is_ip(gateway[0]) is None and not _HOSTNAME_RE.fullmatch(gateway[0]):
        raise r.error(prefix + "gateway", gateway_text, "not an IP address or host name")
    bind = None
    bind_text = r.string(entry, "bind", prefix)
    if bind_text is not None:
        bind = _host_port(r, prefix + "bind", bind_text, port_required=False)
        bind_version = _is_ip(bind[0])
        if bind_version is None:
            raise r.error(prefix + "bind", bind_text, "must be a numeric IP address")
        gw_version = _is_ip(gateway[0])
        if gw_version is not None and gw_version != bind_version:
            raise r.error(
                prefix + "bind",
                bind_text,
                f"an IPv{bind_version} address cannot reach the IPv{gw_version} gateway",
            )
    device = r.string(entry, "device", prefix)
    if device is not None:
        raw = device.encode()
        if len(raw) > 15 or b"/" in raw or b" " in raw:
            raise r.error(prefix + "device", device, "not a valid interface name (1-15 bytes)")
    return PathConfig(index, name, bind, device, gateway)


def _parse_syslog(r: _Reader, value: str) -> SyslogTarget:
    m = re.fullmatch(r"(udp|tcp)://(.+)", value.strip())
    if not m:
        raise r.error("events.syslog", value, "expected udp://host:port or tcp://host:port")
    host, port = _host_port(r, "events.syslog", m.group(2), port_required=False)
    return SyslogTarget(m.group(1), host, port or 514)


def parse_client_config(
    text: str, *, source: str = "<config>", base: Path | None = None
) -> ClientConfig:
    """Parse TOML text; relative file names are resolved against ``base``."""
    r = _Reader(source)
    base = base or Path.cwd()
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    r.unknown(doc, TOP_KEYS, "")

    priv_text = r.string(doc, "private_key")
    if priv_text is None:
        raise r.missing("private_key", "required key is missing (a key file or inline base64)")
    private_key = _key_from(r, base, "private_key", priv_text, private=True)
    pub_text = r.string(doc, "gateway_public_key")
    if pub_text is None:
        raise r.missing("gateway_public_key")
    gateway_public_key = _key_from(r, base, "gateway_public_key", pub_text, private=False)

    policy, policy_file = POLICY_DEFAULT, None
    policy_text = r.string(doc, "policy")
    if policy_text is not None:
        policy_file = _relative(base, policy_text)
        try:
            policy = load_policy(policy_file)
        except PolicyError as exc:
            raise r.error("policy", policy_text, str(exc)) from None

    node_id = r.string(doc, "node_id") or "client"
    if not _NAME_RE.fullmatch(node_id):
        raise r.error("node_id", node_id, "use 1-32 letters, digits, '.', '_' or '-'")

    tun = r.table(doc, "tun")
    r.unknown(tun, TUN_KEYS, "tun.")
    tun_name = r.string(tun, "name", "tun.") or "jvpn%d"
    raw = tun_name.encode()
    if len(raw) > 15 or b"/" in raw or b" " in raw:
        raise r.error("tun.name", tun_name, "not a valid interface name (1-15 bytes)")
    mtu = tun.get("mtu", 1420)
    if isinstance(mtu, bool) or not isinstance(mtu, int) or not 576 <= mtu <= 9000:
        raise r.error("tun.mtu", mtu, "expected an integer 576..9000")
    address = r.string(tun, "address", "tun.")
    if address is not None:
        try:
            iface = ipaddress.ip_interface(address)
        except ValueError:
            raise r.error("tun.address", address, "expected address/prefix") from None
        if iface.version != 4 or "/" not in address:
            raise r.error("tun.address", address, "expected an IPv4 address/prefix")
    routes_value = tun.get("routes", [])
    if not isinstance(routes_value, list):
        raise r.error("tun.routes", routes_value, "expected a list of CIDRs")
    routes = []
    for i, route in enumerate(routes_value):
        try:
            net = ipaddress.ip_network(route) if isinstance(route, str) else None
        except ValueError:
            net = None
        if net is None or net.version != 4:
            raise r.error(f"tun.routes[{i}]", route, "expected an IPv4 CIDR like 10.66.0.0/16")
        routes.append(str(net))

    path_list = doc.get("path")
    if path_list is None:
        raise r.missing("path", "at least one [[path]] is required")
    if not isinstance(path_list, list) or not path_list:
        raise r.error("path", path_list, "expected one or more [[path]] tables")
    if len(path_list) > MAX_PATHS:
        raise r.error("path", f"{len(path_list)} paths", f"at most {MAX_PATHS} paths")
    paths = tuple(_parse_path(r, i, e) for i, e in enumerate(path_list, start=1))
    names = [p.name for p in paths]
    for i, name in enumerate(names, start=1):
        if names.index(name) != i - 1:
            raise r.error(f"path[{i}].name", name, "duplicate path name")
    if len(paths) > policy.max_candidate_count:
        raise r.error(
            "path",
            f"{len(paths)} paths",
            f"the policy allows {policy.max_candidate_count} candidates",
        )

    events = r.table(doc, "events")
    r.unknown(events, EVENT_KEYS, "events.")
    jsonl_text = r.string(events, "jsonl", "events.")
    jsonl = _relative(base, jsonl_text) if jsonl_text is not None else None
    syslog_text = r.string(events, "syslog", "events.")
    syslog = _parse_syslog(r, syslog_text) if syslog_text is not None else None

    keymap_table = r.table(doc, "keymap")
    keymap: dict[str, str] = {}
    for key, value in keymap_table.items():
        if not isinstance(value, str) or not value:
            raise r.error(f"keymap.{key}", value, "expected a key name string")
        keymap[key] = value

    inner = r.table(doc, "inner")
    r.unknown(inner, INNER_KEYS, "inner.")
    inner_kind = r.string(inner, "kind", "inner.") or "tun"
    if inner_kind not in INNER_KINDS:
        raise r.error("inner.kind", inner_kind, f"expected one of {', '.join(INNER_KINDS)}")
    rate = inner.get("rate_pps", 20.0)
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate <= 10_000:
        raise r.error("inner.rate_pps", rate, "expected a number 0..10000")
    payload_size = inner.get("payload_size", 56)
    if (
        isinstance(payload_size, bool)
        or not isinstance(payload_size, int)
        or not 0 <= payload_size <= 1400
    ):
        raise r.error("inner.payload_size", payload_size, "expected an integer 0..1400")

    return ClientConfig(
        private_key=private_key,
        gateway_public_key=gateway_public_key,
        paths=paths,
        policy=policy,
        policy_file=policy_file,
        node_id=node_id,
        tun_name=tun_name,
        mtu=mtu,
        address=address,
        routes=tuple(routes),
        jsonl=jsonl,
        syslog=syslog,
        keymap=keymap,
        inner_kind=inner_kind,
        inner_rate_pps=float(rate),
        inner_payload_size=payload_size,
        source=source,
    )


def load_client_config(path: str | os.PathLike[str]) -> ClientConfig:
    """Read and validate a client config file; every problem is a ConfigError."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as fh:
            raw = fh.read(MAX_CONFIG_SIZE + 1)
    except FileNotFoundError:
        raise ConfigError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{name}: is a directory") from None
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read ({exc.strerror or exc})") from None
    if len(raw) > MAX_CONFIG_SIZE:
        raise ConfigError(f"{name}: too large to be a client config")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: not UTF-8 (byte {exc.start})") from None
    return parse_client_config(text, source=name, base=Path(name).resolve().parent)
