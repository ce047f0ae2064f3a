"""Client configuration (``client.toml``): parsed and validated into a frozen ClientConfig.

Every problem raises :class:`ConfigError` whose message names the file, the key and the
bad value (never a key's secret material), e.g.::

    client.toml: path[2].gateway = "10.0.0.1": expected host:port

The keys are data: each table is a tuple of ``_Field`` specs (name, type, bounds, default,
extra check, doc) that one reader applies, so unknown keys, wrong types and out-of-range
values are refused the same way in every table. Only what is not a plain table (the list of
paths, the free-form keymap, cross-key rules) is code.

docs/client.md documents every key; docs/examples/client.toml is a complete example.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from tunnel.core.ciphers import CipherNameError, DataCipher, parse_cipher_names
from tunnel.core.constants import MAX_INNER_PACKET, MIN_MTU
from tunnel.core.policy import POLICY_DEFAULT, Policy, PolicyError, load_policy
from tunnel.keys import KeyFormatError, decode_key, load_private_key, load_public_key

MAX_CONFIG_SIZE: Final = 1 << 20
MAX_UNIX_PATH: Final = 107
"""Longest unix socket path (sun_path is 108 bytes with the terminating NUL)."""
"""A client config is a few hundred bytes; anything near this is not one."""

MAX_PATHS: Final = 9
"""Candidate paths a client may list (the UI switches with keys 1-9)."""

_B64_KEY: Final = re.compile(r"[A-Za-z0-9+/]{42,44}={0,2}")
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")
_HOSTNAME_RE: Final = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9-]{1,63})*\.?")

INNER_KINDS: Final = ("tun", "memory")

IPV6_MIN_MTU: Final = 1280
"""IPv6 needs links of at least this MTU (RFC 8200)."""


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
class AutoPaths:
    """``paths = "auto"``: a candidate path per usable interface address to each gateway
    endpoint, made and removed as the machine's interfaces come and go
    (:mod:`tunnel.client.autopaths`; docs/client.md "Automatic paths")."""

    gateways: tuple[tuple[str, int], ...]
    """Gateway endpoints (host, port): numeric or names, resolved at start (D7 after)."""
    include: tuple[str, ...] = ("*",)
    """Interface name patterns (fnmatch) that may carry paths."""
    exclude: tuple[str, ...] = ()
    """Interface name patterns that never do (checked after ``include``)."""
    prefer: tuple[str, ...] = ()
    """Interface name patterns in order of preference: paths are numbered (and tried) in
    this order at start; interfaces no pattern names come after, by name."""

    def includes_loopback(self) -> bool:
        """Loopback carries paths only when an include pattern other than ``*`` names it."""
        return self.include != ("*",)


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
    address6: str | None = None
    """Inner IPv6 ``address/prefix``; None: the gateway's assignment, if it makes one."""
    routes: tuple[str, ...] = ()
    kill_switch: bool = False
    """Keep the routes' traffic off the plain network while the session is not ATTACHED
    and after an abnormal end (tunnel.io.killswitch); the file's default: on when
    ``routes`` holds a default route."""
    jsonl: Path | None = None
    syslog: SyslogTarget | None = None
    events_required: tuple[str, ...] = ()
    """``[events] required``: sinks (``jsonl``, ``syslog``) that must work at start."""
    log_file: Path | None = None
    """``[events] log_file``: headless writes its stdout and stderr lines here too."""
    keymap: Mapping[str, str] = field(default_factory=dict)
    """Binding id -> key, passed through to the UI unchanged."""
    control_socket: str | None = None
    """Control socket path (absolute), ``"off"``, or None: the default path
    (:func:`tunnel.client.control.control_socket_for`)."""
    inner_kind: str = "tun"
    """``tun`` (a kernel TUN, needs root) or ``memory`` (no device: a built-in ICMP echo
    source towards the gateway's inner address; for tests and trials without root)."""
    inner_rate_pps: float = 20.0
    """Echo requests per second of the ``memory`` traffic source."""
    inner_payload_size: int = 56
    """ICMP payload bytes of the ``memory`` traffic source."""
    source: str = "<config>"
    """The file it was read from (for messages)."""
    auto: AutoPaths | None = None
    """``paths = "auto"``: the rules for the paths (``paths`` is empty until the engine
    starts and finds them); None: the ``[[path]]`` tables."""
    ciphers: tuple[DataCipher, ...] | None = None
    """The data ciphers the handshake offers, preferred first; None: AES-256-GCM first
    when the CPU has AES instructions, else ChaCha20-Poly1305 first (docs/client.md)."""


def _fmt(value: object) -> str:
    text = repr(value) if not isinstance(value, str) else f'"{value}"'
    return text if len(text) <= 80 else text[:77] + "..."


# -- the field table ---------------------------------------------------------------------

Check = Callable[["_Reader", str, Any], Any]
"""Validates (and converts) a value whose type is already right: ``(reader, key, value)``."""


@dataclass(frozen=True, slots=True)
class _Field:
    """One key of a table: its type, bounds, default and extra check. The parser reads these."""

    name: str
    kind: type
    """``str`` (non-empty), ``int``, ``float`` (ints accepted), ``bool`` or ``list``."""
    default: Any = None
    """The value when the key is absent (``None``: off, or see ``required``)."""
    lo: int = 0
    hi: int = 0
    """Inclusive bounds of an ``int`` or ``float``."""
    check: Check | None = None
    required: str | None = None
    """Set: the key must be present, this is the message when it is not."""
    expected: str = ""
    """What a value of the wrong type is told it should be (derived from ``kind`` if empty)."""
    doc: str = ""

    def expectation(self) -> str:
        if self.expected:
            return self.expected
        if self.kind is int:
            return f"expected an integer {self.lo}..{self.hi}"
        if self.kind is float:
            return f"expected a number {self.lo}..{self.hi}"
        if self.kind is bool:
            return "expected true or false"
        return "expected a non-empty string"

    def accepts(self, value: object) -> bool:
        """Is the value of this field's type (and within its bounds)? ``true`` is no number."""
        if self.kind is str:
            return isinstance(value, str) and bool(value.strip())
        if self.kind is list:
            return isinstance(value, list)
        if self.kind is bool:
            return isinstance(value, bool)
        numeric = int | float if self.kind is float else int
        if isinstance(value, bool) or not isinstance(value, numeric):
            return False
        return self.lo <= value <= self.hi


class _Reader:
    """Reads tables by their field specs; errors name the file, the key and the value."""

    def __init__(self, source: str, base: Path) -> None:
        self.source = source
        self.base = base
        """Relative file names are resolved against this directory."""

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

    def table(self, table: Mapping[str, Any], key: str) -> Mapping[str, Any]:
        value = table.get(key, {})
        if not isinstance(value, dict):
            raise self.error(key, value, f"expected a table ([{key}])")
        return value

    def value(self, table: Mapping[str, Any], prefix: str, spec: _Field) -> Any:
        key = prefix + spec.name
        if spec.name not in table:
            if spec.required is not None:
                raise self.missing(key, spec.required)
            return spec.default
        value = table[spec.name]
        if not spec.accepts(value):
            raise self.error(key, value, spec.expectation())
        if spec.kind is float:
            value = float(value)
        return spec.check(self, key, value) if spec.check else value

    def fields(
        self, table: Mapping[str, Any], prefix: str, specs: tuple[_Field, ...]
    ) -> dict[str, Any]:
        """Every spec'd key of ``table``, checked, in table order (keys are not checked)."""
        return {spec.name: self.value(table, prefix, spec) for spec in specs}

    def section(
        self, doc: Mapping[str, Any], name: str, specs: tuple[_Field, ...]
    ) -> dict[str, Any]:
        """An optional ``[name]`` table: unknown keys refused, then every field read."""
        table = self.table(doc, name)
        self.unknown(table, tuple(spec.name for spec in specs), f"{name}.")
        return self.fields(table, f"{name}.", specs)


# -- checks (one per kind of value) ------------------------------------------------------


def _relative(base: Path, value: str) -> Path:
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else base / path


def _file(r: _Reader, key: str, value: str) -> Path:
    return _relative(r.base, value)


def _name(r: _Reader, key: str, value: str) -> str:
    if not _NAME_RE.fullmatch(value):
        raise r.error(key, value, "use 1-32 letters, digits, '.', '_' or '-'")
    return value


def _ifname(r: _Reader, key: str, value: str) -> str:
    raw = value.encode()
    if len(raw) > 15 or b"/" in raw or b" " in raw:
        raise r.error(key, value, "not a valid interface name (1-15 bytes)")
    return value


def _choice(choices: tuple[str, ...]) -> Check:
    def check(r: _Reader, key: str, value: str) -> str:
        if value not in choices:
            raise r.error(key, value, f"expected one of {', '.join(choices)}")
        return value

    return check


def _inner_address(r: _Reader, key: str, value: str) -> str:
    try:
        iface = ipaddress.ip_interface(value)
    except ValueError:
        raise r.error(key, value, "expected address/prefix") from None
    if iface.version != 4 or "/" not in value:
        raise r.error(key, value, "expected an IPv4 address/prefix")
    return value


def _inner_address6(r: _Reader, key: str, value: str) -> str:
    try:
        iface = ipaddress.ip_interface(value)
    except ValueError:
        raise r.error(key, value, "expected address/prefix") from None
    if iface.version != 6 or "/" not in value:
        raise r.error(key, value, "expected an IPv6 address/prefix like fd00:6a76::2/64")
    return str(iface)


def _routes(r: _Reader, key: str, value: list[object]) -> tuple[str, ...]:
    routes = []
    for i, route in enumerate(value):
        try:
            net = ipaddress.ip_network(route) if isinstance(route, str) else None
        except ValueError:
            net = None
        if net is None:
            raise r.error(f"{key}[{i}]", route, "expected an IPv4 or IPv6 CIDR like 10.66.0.0/16")
        routes.append(str(net))
    return tuple(routes)


def _split_host_port(r: _Reader, key: str, value: str) -> tuple[str, str | None]:
    """``host[:port]`` or ``[v6][:port]`` -> (host, port text or None)."""
    text = value.strip()
    m = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?", text)
    if m:
        if _is_ip(m.group(1)) != 6:
            raise r.error(key, value, "brackets are for IPv6 addresses")
        return m.group(1), m.group(2)
    if text.count(":") > 1:
        raise r.error(key, value, "write IPv6 addresses in brackets: [addr]:port")
    host, _, port_text = text.partition(":")
    return host, port_text if ":" in text else None


def _host_port(r: _Reader, key: str, value: str, *, port_required: bool) -> tuple[str, int]:
    host, port_text = _split_host_port(r, key, value)
    if port_text is None:
        if port_required:
            raise r.error(key, value, "expected host:port")
        port_text = "0"
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise r.error(key, value, "port must be 0..65535")
    if port_required and int(port_text) == 0:
        raise r.error(key, value, "port must be 1..65535")
    if not host:
        raise r.error(key, value, "empty host")
    return host, int(port_text)


def _is_ip(host: str) -> int | None:
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None


def _gateway(r: _Reader, key: str, value: str) -> tuple[str, int]:
    gateway = _host_port(r, key, value, port_required=True)
    if _is_ip(gateway[0]) is None and not _HOSTNAME_RE.fullmatch(gateway[0]):
        raise r.error(key, value, "not an IP address or host name")
    return gateway


def _bind(r: _Reader, key: str, value: str) -> tuple[str, int]:
    bind = _host_port(r, key, value, port_required=False)
    if _is_ip(bind[0]) is None:
        raise r.error(key, value, "must be a numeric IP address")
    return bind


def _gateways(r: _Reader, key: str, value: list[object]) -> tuple[tuple[str, int], ...]:
    if not value or len(value) > MAX_PATHS:
        raise r.error(key, value, f"expected 1..{MAX_PATHS} gateway endpoints")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise r.error(f"{key}[{i}]", item, 'expected "host:port"')
        out.append(_gateway(r, f"{key}[{i}]", item))
    return tuple(out)


def _patterns(r: _Reader, key: str, value: list[object]) -> tuple[str, ...]:
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item or len(item) > 64:
            raise r.error(f"{key}[{i}]", item, "expected an interface name pattern")
    return tuple(str(item) for item in value)


def _syslog(r: _Reader, key: str, value: str) -> SyslogTarget:
    m = re.fullmatch(r"(udp|tcp)://(.+)", value.strip())
    if not m:
        raise r.error(key, value, "expected udp://host:port or tcp://host:port")
    host, port = _host_port(r, key, m.group(2), port_required=False)
    return SyslogTarget(m.group(1), host, port or 514)


def _required_sinks(r: _Reader, key: str, value: list[object]) -> tuple[str, ...]:
    for i, name in enumerate(value):
        if name not in ("jsonl", "syslog"):
            raise r.error(f"{key}[{i}]", name, "expected jsonl or syslog")
    return tuple(str(name) for name in value)


def _policy(r: _Reader, key: str, value: str) -> tuple[Path, Policy]:
    path = _relative(r.base, value)
    try:
        return path, load_policy(path)
    except PolicyError as exc:
        raise r.error(key, value, str(exc)) from None


def _private_key(r: _Reader, key: str, value: str) -> bytes:
    return _key_from(r, key, value, private=True)


def _public_key(r: _Reader, key: str, value: str) -> bytes:
    return _key_from(r, key, value, private=False)


def _key_from(r: _Reader, key: str, value: str, *, private: bool) -> bytes:
    what = "private key" if private else "gateway public key"
    path = _relative(r.base, value)
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


def _ciphers(r: _Reader, key: str, value: list[object]) -> tuple[DataCipher, ...]:
    if not all(isinstance(name, str) for name in value):
        raise r.error(key, value, "expected a list of cipher names")
    try:
        return parse_cipher_names(str(name) for name in value)
    except CipherNameError as exc:
        raise r.error(key, value, str(exc)) from None


def _control_socket(r: _Reader, key: str, value: str) -> str:
    """``off``, or a socket path (relative: against the config's directory)."""
    if value == "off":
        return value
    path = _relative(r.base, value)
    if len(os.fsencode(path)) > MAX_UNIX_PATH:
        raise r.error(
            key, value, f"is longer than a unix socket path may be ({MAX_UNIX_PATH} bytes)"
        )
    return str(path)


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


# -- the tables (docs/client.md documents every key) -------------------------------------

# fmt: off
TOP_FIELDS: Final = (
    _Field("private_key", str, check=_private_key,
           required="required key is missing (a key file or inline base64)",
           doc="key file (mode 600) from jvpn-keygen, or inline base64"),
    _Field("gateway_public_key", str, check=_public_key, required="required key is missing",
           doc="key file or inline base64"),
    _Field("policy", str, check=_policy, doc="policy file; absent: the built-in policy"),
    _Field("node_id", str, "client", check=_name, doc="names this client in events"),
    _Field("control_socket", str, check=_control_socket,
           doc='control socket path; "off": none; absent: the default (docs/control.md)'),
    _Field("paths", str, check=_choice(("auto",)),
           doc='"auto": paths follow the interfaces ([auto]); absent: the [[path]] tables'),
    _Field("ciphers", list, check=_ciphers, expected="expected a list of cipher names",
           doc='data ciphers, preferred first: "aes-256-gcm", "chacha20-poly1305"'),
)
TABLE_KEYS: Final = ("tun", "path", "events", "keymap", "inner", "auto")
AUTO_FIELDS: Final = (
    _Field("gateway", list, check=_gateways, required="required key is missing",
           expected='expected "host:port" or a list of them',
           doc='gateway endpoint(s): "host:port" or ["host:port", ...]'),
    _Field("include", list, ("*",), check=_patterns, expected="expected a list of patterns",
           doc="interface name patterns (fnmatch) that may carry paths"),
    _Field("exclude", list, (), check=_patterns, expected="expected a list of patterns",
           doc="interface name patterns that never do"),
    _Field("prefer", list, (), check=_patterns, expected="expected a list of patterns",
           doc="interface name patterns in order of preference"),
)
TUN_FIELDS: Final = (
    _Field("name", str, "jvpn%d", check=_ifname, doc="TUN device name (%d: kernel numbers)"),
    _Field("mtu", int, 1420, MIN_MTU, MAX_INNER_PACKET, doc="inner MTU (the gateway's)"),
    _Field("address", str, check=_inner_address, doc="inner address/prefix; absent: assigned"),
    _Field("address6", str, check=_inner_address6, doc="inner IPv6 address/prefix"),
    _Field("routes", list, (), check=_routes, expected="expected a list of CIDRs",
           doc="extra IPv4/IPv6 routes through the tunnel"),
    _Field("kill_switch", bool, doc="true/false; absent: true when routes has a default route"),
)
PATH_FIELDS: Final = (
    _Field("name", str, check=_name, doc="shown in the UI; absent: path<N>"),
    _Field("gateway", str, check=_gateway, required="required key is missing",
           doc="gateway host:port"),
    _Field("bind", str, check=_bind, doc="local numeric address[:port]"),
    _Field("device", str, check=_ifname, doc="SO_BINDTODEVICE"),
)
EVENT_FIELDS: Final = (
    _Field("jsonl", str, check=_file, doc="JSON lines file"),
    _Field("syslog", str, check=_syslog, doc="udp://host[:port] or tcp://host[:port]"),
    _Field("required", list, (), check=_required_sinks, expected="expected a list of sink keys",
           doc="sinks that must work at start, e.g. [\"jsonl\"]; else exit 2"),
    _Field("log_file", str, check=_file, doc="headless: its stdout and stderr lines, rotated"),
)
INNER_FIELDS: Final = (
    _Field("kind", str, "tun", check=_choice(INNER_KINDS), doc="tun or memory"),
    _Field("rate_pps", float, 20.0, 0, 10_000, doc="memory source: echo requests per second"),
    _Field("payload_size", int, 56, 0, 1400, doc="memory source: ICMP payload bytes"),
)
# fmt: on


# -- the parts that are not a plain table ------------------------------------------------


def _parse_path(r: _Reader, index: int, entry: object) -> PathConfig:
    prefix = f"path[{index}]."
    if not isinstance(entry, dict):
        raise r.error(f"path[{index}]", entry, "expected a table ([[path]])")
    r.unknown(entry, tuple(spec.name for spec in PATH_FIELDS), prefix)
    f = r.fields(entry, prefix, PATH_FIELDS)
    bind, gateway = f["bind"], f["gateway"]
    gw_version = _is_ip(gateway[0])
    if bind is not None and gw_version not in (None, _is_ip(bind[0])):
        raise r.error(
            prefix + "bind",
            entry["bind"],
            f"an IPv{_is_ip(bind[0])} address cannot reach the IPv{gw_version} gateway",
        )
    return PathConfig(index, f["name"] or f"path{index}", bind, f["device"], gateway)


def _parse_paths(r: _Reader, path_list: object, policy: Policy) -> tuple[PathConfig, ...]:
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
    return paths


def _parse_auto(r: _Reader, doc: Mapping[str, Any], paths: str | None) -> AutoPaths | None:
    """``paths = "auto"`` with its ``[auto]`` table (and no ``[[path]]``), or None."""
    if paths is None:
        if "auto" in doc:
            raise r.missing("paths", '[auto] is only read with paths = "auto"')
        return None
    if "path" in doc:
        raise r.error("paths", paths, '[[path]] tables and paths = "auto" exclude each other')
    if "auto" not in doc:
        raise r.missing("auto", 'paths = "auto" needs an [auto] table with gateway = [...]')
    table = dict(r.table(doc, "auto"))
    if isinstance(table.get("gateway"), str):
        table["gateway"] = [table["gateway"]]  # one endpoint: a string will do
    r.unknown(table, tuple(spec.name for spec in AUTO_FIELDS), "auto.")
    f = r.fields(table, "auto.", AUTO_FIELDS)
    return AutoPaths(f["gateway"], tuple(f["include"]), tuple(f["exclude"]), tuple(f["prefer"]))


def _kill_switch(tun: Mapping[str, Any]) -> bool:
    """The ``kill_switch`` key, or its default: on for a full tunnel (a default route)."""
    if tun["kill_switch"] is not None:
        return bool(tun["kill_switch"])
    return any(ipaddress.ip_network(r).prefixlen == 0 for r in tun["routes"])


def _check_capture(r: _Reader, routes: tuple[str, ...], paths: tuple[PathConfig, ...]) -> None:
    """A host route for a numeric gateway endpoint would send the path into the tunnel,
    and leaves no room for the exception that keeps it out (docs/client.md, "Full
    tunnel"); a wider route is fine. Names are checked when they resolve."""
    for i, route in enumerate(routes):
        net = ipaddress.ip_network(route)
        for p in paths:
            host = p.gateway[0]
            if (
                _is_ip(host)
                and net.prefixlen == net.max_prefixlen
                and ipaddress.ip_address(host) in net
            ):
                raise r.error(
                    f"tun.routes[{i}]", route,
                    f"would send path[{p.path_id}]'s gateway {host} into the tunnel itself "
                    "(a host route leaves no room for the exception that keeps it on its "
                    "uplink): remove it",
                )  # fmt: skip


def _parse_keymap(r: _Reader, table: Mapping[str, Any]) -> dict[str, str]:
    """Binding id -> key name, passed through to the UI (which checks the ids)."""
    for key, value in table.items():
        if not isinstance(value, str) or not value:
            raise r.error(f"keymap.{key}", value, "expected a key name string")
    return dict(table)


def parse_client_config(
    text: str, *, source: str = "<config>", base: Path | None = None
) -> ClientConfig:
    """Parse TOML text; relative file names are resolved against ``base``."""
    r = _Reader(source, base or Path.cwd())
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    r.unknown(doc, (*(spec.name for spec in TOP_FIELDS), *TABLE_KEYS), "")
    top = r.fields(doc, "", TOP_FIELDS)
    policy_file, policy = top["policy"] or (None, POLICY_DEFAULT)
    tun = r.section(doc, "tun", TUN_FIELDS)
    if tun["address6"] is not None and tun["mtu"] < IPV6_MIN_MTU:
        raise r.error("tun.mtu", tun["mtu"], f"IPv6 (tun.address6) needs at least {IPV6_MIN_MTU}")
    auto = _parse_auto(r, doc, top["paths"])
    paths = () if auto is not None else _parse_paths(r, doc.get("path"), policy)
    _check_capture(r, tun["routes"], paths)
    events = r.section(doc, "events", EVENT_FIELDS)
    for name in events["required"]:
        if events[name] is None:
            raise r.error("events.required", name, f"no sink configured: set events.{name}")
    keymap = _parse_keymap(r, r.table(doc, "keymap"))
    inner = r.section(doc, "inner", INNER_FIELDS)
    return ClientConfig(
        private_key=top["private_key"],
        gateway_public_key=top["gateway_public_key"],
        paths=paths,
        policy=policy,
        policy_file=policy_file,
        node_id=top["node_id"],
        control_socket=top["control_socket"],
        tun_name=tun["name"],
        mtu=tun["mtu"],
        address=tun["address"],
        address6=tun["address6"],
        routes=tun["routes"],
        kill_switch=_kill_switch(tun),
        jsonl=events["jsonl"],
        syslog=events["syslog"],
        events_required=events["required"],
        log_file=events["log_file"],
        keymap=keymap,
        inner_kind=inner["kind"],
        inner_rate_pps=inner["rate_pps"],
        inner_payload_size=inner["payload_size"],
        source=source,
        auto=auto,
        ciphers=top["ciphers"],
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
