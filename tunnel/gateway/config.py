"""The gateway's configuration file (TOML): ``GatewayConfig`` and ``load_gateway_config``.

Everything the gateway needs to start, validated before anything on the host changes.
Every problem raises :class:`ConfigError` naming the file, the key and the offending
value; a missing, unreadable, invalid or world-readable private key raises its subclass
:class:`KeyFileError` (the program gives it its own exit code). Relative paths are
relative to the directory of the configuration file. docs/gateway.md documents every key;
docs/examples/gateway.toml is a complete example.

Clients either name their inner address or take one from the pool: the free hosts of
``tun.subnet`` in order (the gateway's own address, the network and broadcast addresses
and every address given explicitly are skipped). The allocation is deterministic, so a
client keeps its address across restarts as long as the list is not reordered. With an
inner IPv6 subnet (``tun.subnet6``) every client also gets an IPv6 address the same way
(``address6``, else the next free host of ``tun.subnet6``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import stat
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from tunnel.control.protocol import default_socket
from tunnel.core.admission import HANDSHAKE_RATE, HANDSHAKE_RATE_MAX
from tunnel.core.ciphers import ALL_CIPHERS, CipherNameError, DataCipher, parse_cipher_names
from tunnel.core.constants import MAX_INNER_PACKET, MIN_MTU
from tunnel.core.gateway import ClientEntry
from tunnel.gateway.routehook import ROUTE_KEYS, RouteConfig, parse_route_config
from tunnel.keys import KeyFormatError, encode_key, load_private_key, load_public_key
from tunnel.observability.metrics import parse_host_port

MAX_CONFIG_SIZE: Final = 1 << 20
"""A gateway config is a few kB; a larger file is a mistake."""

NODE_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""Node ids appear in events, records and syslog structured data: short and printable."""

CLIENT_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")

DEFAULT_SUBNET: Final = "10.66.0.0/24"
DEFAULT_TUN_NAME: Final = "jvpn%d"
DEFAULT_MTU: Final = 1420
DEFAULT_SYSLOG_PORT: Final = 514
DEFAULT_JSONL_MAX_BYTES: Final = 10 * 1024 * 1024
DEFAULT_JSONL_BACKUPS: Final = 5

TOP_KEYS: Final = frozenset(
    {"node_id", "listen", "private_key", "policy", "mtu", "metrics", "inner_echo", "clients_dir",
     "ciphers"}
).union({"workers", "handshake_rate"})  # fmt: skip
TABLES: Final = frozenset({"tun", "clients", "sinks", "control", "state", "cluster"})
CONTROL_KEYS: Final = frozenset({"socket"})
STATE_KEYS: Final = frozenset({"store", "state_dir", "state_key_file"})
STATE_STORES: Final = ("sqlite", "memory", "etcd")
CLUSTER_KEYS: Final = frozenset({"endpoints", "node_id", "state_key_file", "lease_ttl", "prefix"})
DEFAULT_CLUSTER_PREFIX: Final = "/jvpn/default/"
DEFAULT_LEASE_TTL: Final = 2
"""``[cluster] lease_ttl`` (s): etcd's minimum with its default election timeout."""
"""``[state] store``: the embedded persistent default (sessions survive a restart), or
memory (they end with the process; for tests and throwaway gateways)."""
DEFAULT_STATE_DIR: Final = Path("/var/lib/jvpn")
"""``[state] state_dir`` for root (the service's StateDirectory)."""
STATE_KEY_NAME: Final = "state.key"
"""The state key file's default name in ``state_dir``."""


def default_state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """root: ``/var/lib/jvpn``; anyone else: ``$XDG_STATE_HOME/jvpn`` (by default
    ``~/.local/state/jvpn``), as the control socket's default follows the user too."""
    if os.geteuid() == 0:
        return DEFAULT_STATE_DIR
    env = os.environ if environ is None else environ
    base = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "jvpn"


TUN_KEYS: Final = frozenset({"name", "subnet", "address", "subnet6", "address6"})
CLIENT_KEYS: Final = frozenset({"name", "public_key", "address", "address6"})
MAX_CLIENT_FILE_SIZE: Final = 64 * 1024
"""A ``clients_dir`` file holds one client (a few hundred bytes); a larger one is skipped."""
IPV6_MIN_MTU: Final = 1280
"""IPv6 needs links of at least this MTU (RFC 8200); the kernel turns IPv6 off below it."""


class ConfigError(ValueError):
    """The configuration is unusable; the message names file, key and value."""

    def __init__(self, file: str | os.PathLike[str], key: str, value: object, message: str):
        self.file = os.fspath(file)
        self.key = key
        self.value = value
        self.message = message
        shown = "" if value is _NO_VALUE else f" = {_show(value)}"
        super().__init__(f"{self.file}: {key}{shown}: {message}")


class KeyFileError(ConfigError):
    """The gateway's private key file is missing, unreadable, invalid or too open."""


_NO_VALUE: Final[Any] = object()
"""Marks an error about a missing key (there is no value to show)."""


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True, slots=True)
class SinkConfig:
    """One event sink."""

    kind: Literal["jsonl", "syslog", "stdout"]
    path: Path | None = None
    """jsonl: the file (rotated by size)."""
    max_bytes: int = DEFAULT_JSONL_MAX_BYTES
    backups: int = DEFAULT_JSONL_BACKUPS
    host: str | None = None
    """syslog: receiver host (name or address)."""
    port: int = DEFAULT_SYSLOG_PORT
    transport: Literal["udp", "tcp"] = "udp"
    required: bool = False
    """The gateway does not start when this sink cannot work (missing directory,
    unresolvable host); otherwise that is one warning line and the sink is retried."""


@dataclass(frozen=True, slots=True)
class StateConfig:
    """``[state]``: where the gateway keeps its sessions (docs/gateway.md "[state]")."""

    store: Literal["sqlite", "memory", "etcd"] = "sqlite"
    state_dir: Path = DEFAULT_STATE_DIR
    """The store's directory (created 0700 on the first start); sqlite: one file in it."""
    state_key_file: Path = DEFAULT_STATE_DIR / STATE_KEY_NAME
    """The key that seals the stored session keys (own file, 0600; created if missing)."""

    @property
    def persistent(self) -> bool:
        return self.store != "memory"


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """``[cluster]``: this node of a gateway cluster on etcd (docs/cluster.md)."""

    endpoints: tuple[str, ...]
    """etcd client endpoints, ``host:port``."""
    node_id: str
    """This node's id (the file's ``node_id`` unless ``[cluster] node_id`` names it)."""
    state_key_file: Path
    """The cluster's shared state key (the same file on every node; the statekey rules)."""
    lease_ttl: int = DEFAULT_LEASE_TTL
    prefix: str = DEFAULT_CLUSTER_PREFIX
    """Key prefix of this cluster in etcd (``/jvpn/<cluster>/``)."""


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """A validated gateway configuration. The private key is never in ``repr``."""

    source: Path
    """The configuration file."""
    node_id: str
    listen: tuple[tuple[str, int], ...]
    """UDP listen addresses (numeric host, port)."""
    private_key_path: Path
    private_key: bytes = field(repr=False)
    """The raw X25519 private key (loaded and checked)."""
    clients: tuple[ClientEntry, ...]
    """Allowed clients with their inner addresses (pool addresses already assigned)."""
    policy_path: Path | None
    """Policy file (reloaded on SIGHUP and on change); None: the built-in defaults."""
    sinks: tuple[SinkConfig, ...]
    tun_name: str
    subnet: ipaddress.IPv4Network
    gateway_address: str
    """The gateway's own inner address (on the TUN; answers echo in inner_echo mode)."""
    mtu: int
    metrics: tuple[str, int] | None
    """Prometheus endpoint, or None for none (``--metrics`` overrides)."""
    inner_echo: bool
    """No TUN: answer inner packets addressed to the gateway (demo, tests; no root)."""
    subnet6: ipaddress.IPv6Network | None = None
    """Inner IPv6 subnet; None: the tunnel carries IPv4 only."""
    gateway_address6: str = ""
    """The gateway's own inner IPv6 address (on the TUN); empty without ``subnet6``."""
    control_socket: Path | None = None
    """The control socket (docs/control.md); None: none. The file's default is
    ``default_socket("gateway")``; ``--control-socket`` overrides."""
    control_required: bool = True
    """The socket was named (file or option): failing to create it stops the start. The
    default path is best effort (another gateway may hold it: then none, with a warning)."""
    clients_dir: Path | None = None
    """One TOML file per client (``clients_dir``), re-read on SIGHUP; None: none."""
    client_specs: tuple[ClientSpec, ...] = ()
    """The inline [[clients]] as written (pool addresses not assigned): a reload of
    ``clients_dir`` checks the files against them."""
    client_file_errors: tuple[ConfigError, ...] = ()
    """Files of ``clients_dir`` that were skipped at load, each with its problem."""
    client_file_cache: ClientFileCache = field(default_factory=dict, repr=False, compare=False)
    """The good files as read at load: the first reload reads only the changed ones."""
    state: StateConfig = StateConfig(store="memory")
    """``[state]``: the session store and its state key. The file's default is the sqlite
    store in ``/var/lib/jvpn`` (a configuration built in code has the memory store)."""
    ciphers: tuple[DataCipher, ...] = ALL_CIPHERS
    """The data ciphers this gateway allows (``ciphers``); a client gets the first of its
    own list that is one of them (tunnel/core/ciphers.py)."""
    workers: int = 1
    """Worker processes sharing the listen ports (``workers``; the file's default "auto" is
    one per core this process may run on; a configuration built in code has 1)."""
    handshake_rate: int | None = None
    """Handshakes a second the whole gateway spends DH on (``handshake_rate``; each worker
    admits its share); None (the file's ``"auto"``): each process measures its core's
    budget at start (tunnel/gateway/handshake_budget.py)."""
    route: RouteConfig = field(default_factory=RouteConfig)
    """``[cluster]`` route keys: inner routing follows the owner (docs/cluster.md)."""
    cluster: ClusterConfig | None = None
    """``[cluster]``: sessions live in etcd and move between nodes (docs/cluster.md)."""


class _Reader:
    """Typed access to one TOML table with errors that name file and key."""

    def __init__(self, file: Path, table: Mapping[str, Any], prefix: str) -> None:
        self.file, self.table, self.prefix = file, table, prefix

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def error(self, name: str, value: object, message: str) -> ConfigError:
        return ConfigError(self.file, self.key(name), value, message)

    def unknown(self, allowed: frozenset[str]) -> None:
        for name in self.table:
            if name not in allowed:
                known = ", ".join(sorted(allowed))
                raise self.error(name, self.table[name], f"unknown key (known: {known})")

    def string(self, name: str, default: str | None = None, *, required: bool = False) -> str:
        if name not in self.table:
            if required or default is None:
                raise ConfigError(self.file, self.key(name), _NO_VALUE, "missing (required)")
            return default
        value = self.table[name]
        if not isinstance(value, str) or not value.strip():
            raise self.error(name, value, "must be a non-empty string")
        return value.strip()

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        value = self.table.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, value, "must be an integer")
        if not low <= value <= high:
            raise self.error(name, value, f"must be in [{low}, {high}]")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.table.get(name, default)
        if not isinstance(value, bool):
            raise self.error(name, value, "must be true or false")
        return value

    def path(self, name: str, *, required: bool = False) -> Path | None:
        if name not in self.table and not required:
            return None
        text = self.string(name, required=True)
        path = Path(os.path.expanduser(text))  # ~user that does not exist: kept as written
        return path if path.is_absolute() else self.file.parent / path


def _parse_listen(r: _Reader) -> tuple[tuple[str, int], ...]:
    raw = r.table.get("listen")
    if raw is None:
        raise ConfigError(r.file, "listen", _NO_VALUE, 'missing (e.g. listen = ["0.0.0.0:51820"])')
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not items:
        raise r.error("listen", raw, "must be a HOST:PORT string or a non-empty list of them")
    out: list[tuple[str, int]] = []
    for item in items:
        if not isinstance(item, str):
            raise r.error("listen", item, "must be a HOST:PORT string")
        try:
            address = parse_host_port(item, default_host="0.0.0.0")
        except ValueError as exc:
            raise r.error("listen", item, str(exc)) from None
        if address in out:
            raise r.error("listen", item, "listed twice")
        out.append(address)
    return tuple(out)


def _load_key(r: _Reader) -> tuple[Path, bytes]:
    path = r.path("private_key", required=True)
    assert path is not None
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise KeyFileError(
            r.file, "private_key", str(path), "no such file (create one with jvpn-keygen)"
        ) from None
    except OSError as exc:
        raise KeyFileError(
            r.file, "private_key", str(path), f"cannot read: {exc.strerror}"
        ) from None
    if stat.S_ISREG(mode) and mode & stat.S_IRWXO:
        raise KeyFileError(
            r.file, "private_key", str(path),
            f"is accessible by every user (mode {stat.S_IMODE(mode):04o}); "
            f"run: chmod 600 {path}",
        )  # fmt: skip
    try:
        return path, load_private_key(path, "gateway private key")
    except KeyFormatError as exc:
        raise KeyFileError(r.file, "private_key", str(path), str(exc)) from None


def _parse_tun(file: Path, raw: object) -> tuple[str, ipaddress.IPv4Network, str]:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(file, "tun", raw, "must be a table ([tun])")
    r = _Reader(file, raw, "tun.")
    r.unknown(TUN_KEYS)
    name = r.string("name", DEFAULT_TUN_NAME)
    encoded = name.encode()
    if len(encoded) >= 16 or "/" in name or " " in name:
        raise r.error("name", name, "an interface name is 1-15 bytes without '/' or spaces")
    subnet_text = r.string("subnet", DEFAULT_SUBNET)
    try:
        subnet = ipaddress.ip_network(subnet_text, strict=True)
    except ValueError as exc:
        raise r.error("subnet", subnet_text, f"not a network in CIDR form: {exc}") from None
    if not isinstance(subnet, ipaddress.IPv4Network):
        raise r.error("subnet", subnet_text, "the inner subnet must be IPv4")
    if subnet.prefixlen > 30:
        raise r.error("subnet", subnet_text, "too small: at most /30")
    hosts = subnet.hosts()
    first = str(next(hosts))
    address = r.string("address", first)
    _check_host(r, "address", address, subnet)
    return name, subnet, address


def _parse_tun6(file: Path, raw: object, mtu: int) -> tuple[ipaddress.IPv6Network | None, str]:
    """``tun.subnet6`` and ``tun.address6`` (the tun table is already checked)."""
    r = _Reader(file, raw if isinstance(raw, dict) else {}, "tun.")
    if "subnet6" not in r.table:
        if "address6" in r.table:
            raise r.error("address6", r.table["address6"], "needs tun.subnet6")
        return None, ""
    text = r.string("subnet6")
    try:
        subnet = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise r.error("subnet6", text, f"not a network in CIDR form: {exc}") from None
    if not isinstance(subnet, ipaddress.IPv6Network):
        raise r.error("subnet6", text, "must be an IPv6 network (e.g. fd00:6a76::/64)")
    if subnet.prefixlen > 126:
        raise r.error("subnet6", text, "too small: at most /126")
    if mtu < IPV6_MIN_MTU:
        raise ConfigError(file, "mtu", mtu, f"IPv6 (tun.subnet6) needs at least {IPV6_MIN_MTU}")
    address = r.string("address6", str(subnet.network_address + 1))
    _check_host(r, "address6", address, subnet)
    return subnet, str(ipaddress.ip_address(address))


Subnet = ipaddress.IPv4Network | ipaddress.IPv6Network


def _check_host(r: _Reader, key: str, text: str, subnet: Subnet) -> None:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise r.error(key, text, "not an IP address") from None
    if ip not in subnet:
        raise r.error(key, text, f"not in the inner subnet {subnet}")
    if ip.version == 4 and ip in (subnet.network_address, subnet.broadcast_address):
        raise r.error(key, text, f"is the network or broadcast address of {subnet}")
    if ip == subnet.network_address:
        raise r.error(key, text, f"is the network (subnet-router anycast) address of {subnet}")


class _Claims:
    """What the clients already hold: names, public keys and inner addresses, each once.

    Every claim is journaled, so a client file that fails half-way is undone
    (:meth:`rollback`) and claims nothing."""

    def __init__(self, gateway_address: str, gateway_address6: str) -> None:
        self.names: dict[str, str] = {}
        """Client name -> where it is configured (for the message)."""
        self.keys: dict[bytes, str] = {}
        """Public key -> client name."""
        self.addresses: dict[str, str] = {gateway_address: "the gateway (tun.address)"}
        """Inner address (IPv4 or IPv6) -> who has it (for the message)."""
        if gateway_address6:
            self.addresses[gateway_address6] = "the gateway (tun.address6)"
        self.journal: list[tuple[dict[Any, str], object]] = []

    def _claim(self, table: dict[Any, str], item: object, holder: str) -> None:
        table[item] = holder
        self.journal.append((table, item))

    def rollback(self, mark: int) -> None:
        """Undo every claim made since the journal had ``mark`` entries."""
        while len(self.journal) > mark:
            table, item = self.journal.pop()
            del table[item]

    def name(self, r: _Reader, name: str, source: str) -> None:
        if name in self.names:
            raise r.error("name", name, f"another client has this name ({self.names[name]})")
        self._claim(self.names, name, source)

    def key(self, r: _Reader, key_text: str, public: bytes, name: str) -> None:
        if public in self.keys:
            other = self.keys[public]
            raise r.error(
                "public_key", key_text, f"same key as client {other!r} ({self.names.get(other)})"
            )
        self._claim(self.keys, public, name)

    def address(self, r: _Reader, address: str, name: str, key: str = "address") -> None:
        if address in self.addresses:
            raise r.error(key, address, f"already used by {self.addresses[address]}")
        self._claim(self.addresses, address, f"client {name!r}")

    def free(self, subnet: Subnet | None) -> Iterator[str]:
        """The pool: hosts of the subnet nobody holds, in order (lazily: a /64 is large)."""
        if subnet is None:
            return iter(())
        return (str(h) for h in subnet.hosts() if str(h) not in self.addresses)


@dataclass(frozen=True, slots=True)
class _InnerNet:
    """The inner subnets and the gateway's addresses in them (what clients are checked
    against and take their pool addresses from)."""

    subnet: ipaddress.IPv4Network
    gateway_address: str
    subnet6: ipaddress.IPv6Network | None
    gateway_address6: str


@dataclass(frozen=True, slots=True)
class ClientSpec:
    """One client as written (an inline [[clients]] table or a ``clients_dir`` file),
    before pool addresses are assigned."""

    name: str
    public_key: bytes
    address: str | None
    """Explicit inner address; None: from the pool."""
    address6: str | None
    """Explicit inner IPv6 address; None: from the pool (with ``tun.subnet6``)."""
    source: str
    """Where it is configured: ``clients[3] in gateway.toml`` or the file's path."""
    in_dir: bool = False
    """From a ``clients_dir`` file (skipped when bad) rather than inline (refused)."""


@dataclass(frozen=True, slots=True)
class ClientsLoad:
    """The allowed clients (pool addresses assigned) and the files that were skipped."""

    clients: tuple[ClientEntry, ...]
    errors: tuple[ConfigError, ...]
    """One per skipped ``clients_dir`` file (its name is the error's ``file``)."""


def _parse_inline_clients(
    file: Path, raw: object, net: _InnerNet, claims: _Claims, has_dir: bool
) -> list[ClientSpec]:
    if raw is None:
        if has_dir:
            return []
        raise ConfigError(
            file, "clients", _NO_VALUE,
            "missing: list allowed clients in [[clients]] tables or a clients_dir",
        )  # fmt: skip
    if not isinstance(raw, list) or not (raw or has_dir):
        raise ConfigError(file, "clients", raw, "must be a non-empty array of tables")
    specs: list[ClientSpec] = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise ConfigError(file, f"clients[{i}]", entry, "must be a table")
        r = _Reader(file, entry, f"clients[{i}].")
        specs.append(_parse_client(r, net, claims, f"clients[{i}] in {file.name}", None))
    return specs


def _parse_client(
    r: _Reader, net: _InnerNet, claims: _Claims, source: str, default_name: str | None
) -> ClientSpec:
    """One client's table (inline or a file): checked, and its name, key and explicit
    addresses claimed."""
    r.unknown(CLIENT_KEYS)
    name = r.string("name", default_name, required=default_name is None)
    if not CLIENT_NAME_RE.fullmatch(name):
        raise r.error("name", name, "1-64 characters from A-Z a-z 0-9 . _ @ -")
    claims.name(r, name, source)
    key_text = r.string("public_key", required=True)
    public = _client_key(r, key_text, name)
    claims.key(r, key_text, public, name)
    address = _client_address(r, "address", net.subnet, claims, name)
    if "address6" in r.table and net.subnet6 is None:
        raise r.error("address6", r.table["address6"], "needs tun.subnet6")
    address6 = _client_address(r, "address6", net.subnet6, claims, name)
    return ClientSpec(name, public, address, address6, source)


def _client_address(
    r: _Reader, key: str, subnet: Subnet | None, claims: _Claims, name: str
) -> str | None:
    """The explicit ``key`` of a client's table (checked and claimed), or None."""
    if key not in r.table or subnet is None:
        return None
    text = r.string(key)
    _check_host(r, key, text, subnet)
    address = str(ipaddress.ip_address(text))
    claims.address(r, address, name, key)
    return address


def _client_key(r: _Reader, key_text: str, name: str) -> bytes:
    """A client's public key: inline base64, or a file (relative to the file's directory)."""
    key_source = key_text
    candidate = Path(os.path.expanduser(key_text))
    if not candidate.is_absolute() and (r.file.parent / candidate).exists():
        key_source = str(r.file.parent / candidate)
    try:
        return load_public_key(key_source, f"public key of client {name!r}")
    except KeyFormatError as exc:
        raise r.error("public_key", key_text, str(exc)) from None


def client_files(directory: Path) -> list[Path]:
    """The client files of ``clients_dir``: ``*.toml`` not starting with a dot, in name
    order (anything else, such as editor backups, is ignored). OSError if unreadable."""
    return sorted(
        p for p in directory.iterdir() if p.suffix == ".toml" and not p.name.startswith(".")
    )


ClientFileCache = dict[Path, tuple[bytes, "ClientSpec"]]
"""Good ``clients_dir`` files by path: their bytes and what they said. A reload parses
again only the files whose bytes changed (parsing and checking 10,000 files takes about
2 s, reading them a fifth of that; a reload runs on the gateway's loop)."""


def _claim_again(path: Path, spec: ClientSpec, claims: _Claims) -> None:
    """Claim what an unchanged file's client holds (the checks of a first read)."""
    r = _Reader(path, {}, "")
    claims.name(r, spec.name, spec.source)
    claims.key(r, encode_key(spec.public_key), spec.public_key, spec.name)
    for key, address in (("address", spec.address), ("address6", spec.address6)):
        if address:
            claims.address(r, address, spec.name, key)


def _cached_client_file(
    path: Path, net: _InnerNet, claims: _Claims, cache: ClientFileCache, fresh: ClientFileCache
) -> ClientSpec:
    """``path``'s client: from ``cache`` if the file's bytes are unchanged, else parsed."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_CLIENT_FILE_SIZE + 1)
    except OSError as exc:
        raise ConfigError(path, "(file)", _NO_VALUE, f"cannot read: {exc.strerror}") from None
    if len(raw) > MAX_CLIENT_FILE_SIZE:
        raise ConfigError(path, "(file)", _NO_VALUE, "too large for a client file")
    known = cache.get(path)
    if known is not None and known[0] == raw:
        _claim_again(path, known[1], claims)
        spec = known[1]
    else:
        spec, cacheable = _parse_client_file(path, raw, net, claims)
        if not cacheable:
            return spec
    fresh[path] = (raw, spec)
    return spec


def _parse_client_file(
    path: Path, raw: bytes, net: _InnerNet, claims: _Claims
) -> tuple[ClientSpec, bool]:
    """One ``clients_dir`` file: its name is the client's unless it has a ``name`` key.
    The flag: it may be cached (its key is inline, not in a key file of its own)."""
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(path, "(file)", _NO_VALUE, "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "(syntax)", _NO_VALUE, f"invalid TOML: {exc}") from None
    spec = _parse_client(_Reader(path, data, ""), net, claims, str(path), path.stem)
    key_text = str(data["public_key"]).strip()
    cacheable = not (path.parent / Path(key_text).expanduser()).exists()
    return dataclasses.replace(spec, in_dir=True), cacheable


def _read_clients_dir(
    directory: Path,
    net: _InnerNet,
    claims: _Claims,
    errors: list[ConfigError],
    cache: ClientFileCache,
) -> list[ClientSpec]:
    """Every good file of ``directory`` (claimed); each bad one appended to ``errors``
    with nothing claimed; ``cache`` updated to the good files. OSError if the directory
    cannot be listed."""
    specs: list[ClientSpec] = []
    fresh: ClientFileCache = {}
    for path in client_files(directory):
        mark = len(claims.journal)
        try:
            specs.append(_cached_client_file(path, net, claims, cache, fresh))
        except ConfigError as exc:
            claims.rollback(mark)
            errors.append(exc)
    cache.clear()
    cache.update(fresh)
    return specs


def _previous_address(
    spec: ClientSpec, old: str, subnet: Subnet | None, claims: _Claims
) -> str | None:
    """The pool address ``spec``'s client held before the reload, if it is still free."""
    if not old or subnet is None or old in claims.addresses:
        return None
    if ipaddress.ip_address(old) not in subnet:
        return None
    claims.addresses[old] = f"client {spec.name!r}"
    return old


def _assign(
    specs: Sequence[ClientSpec],
    net: _InnerNet,
    claims: _Claims,
    previous: Mapping[str, ClientEntry],
    errors: list[ConfigError],
) -> tuple[ClientEntry, ...]:
    """Pool addresses for the clients without explicit ones: first the address each
    client held before (``previous``, by name: a reload never moves a client), then the
    next free host. A file client the pool cannot serve is skipped into ``errors``; an
    inline one is a ConfigError."""
    chosen: dict[str, tuple[str | None, str | None]] = {}
    for spec in specs:
        old = previous.get(spec.name)
        v4 = spec.address or _previous_address(spec, old.inner_address if old else "",
                                               net.subnet, claims)  # fmt: skip
        v6 = spec.address6 or _previous_address(spec, old.inner_address6 if old else "",
                                                net.subnet6, claims)  # fmt: skip
        chosen[spec.name] = (v4, v6)
    pool, pool6 = claims.free(net.subnet), claims.free(net.subnet6)
    out: list[ClientEntry] = []
    for spec in specs:
        v4, v6 = chosen[spec.name]
        try:
            v4 = v4 or _next_free(spec, pool, "tun.subnet", net.subnet)
            if net.subnet6 is not None:
                v6 = v6 or _next_free(spec, pool6, "tun.subnet6", net.subnet6)
        except ConfigError as exc:
            if not spec.in_dir:
                raise
            errors.append(exc)
            continue
        out.append(ClientEntry(spec.name, spec.public_key, v4, v6 or ""))
    return tuple(out)


def _next_free(spec: ClientSpec, pool: Iterator[str], key: str, subnet: Subnet) -> str:
    address = next(pool, None)
    if address is None:
        raise ConfigError(
            spec.source, key, str(subnet),
            f"no free address left in the pool for client {spec.name!r}",
        )  # fmt: skip
    return address


def _net(config: GatewayConfig) -> _InnerNet:
    return _InnerNet(config.subnet, config.gateway_address, config.subnet6, config.gateway_address6)


def load_clients(
    config: GatewayConfig,
    previous: Sequence[ClientEntry] = (),
    cache: ClientFileCache | None = None,
) -> ClientsLoad:
    """The allowed clients now: ``config``'s inline [[clients]] and the files of its
    ``clients_dir`` read again (the SIGHUP reload). A bad file is skipped with its error;
    a client in ``previous`` (the clients before the reload) keeps its pool addresses;
    ``cache``: the files already read (updated; unchanged files are not read again).
    ConfigError if the directory cannot be listed."""
    net = _net(config)
    claims = _Claims(net.gateway_address, net.gateway_address6)
    for spec in config.client_specs:  # checked at start: these claims cannot fail
        claims.names[spec.name] = spec.source
        claims.keys[spec.public_key] = spec.name
        for address in (spec.address, spec.address6):
            if address:
                claims.addresses[address] = f"client {spec.name!r}"
    errors: list[ConfigError] = []
    found = _dir_specs(config.clients_dir, net, claims, errors, {} if cache is None else cache)
    specs = list(config.client_specs) + found
    old = {c.name: c for c in previous}
    clients = _assign(specs, net, claims, old, errors)
    return ClientsLoad(clients, tuple(errors))


def _jsonl_sink(r: _Reader, earlier: list[SinkConfig]) -> SinkConfig:
    path = r.path("path", required=True)
    max_bytes = r.integer("max_bytes", DEFAULT_JSONL_MAX_BYTES, 1024, 1 << 40)
    backups = r.integer("backups", DEFAULT_JSONL_BACKUPS, 0, 1000)
    return SinkConfig(
        "jsonl", path=path, max_bytes=max_bytes, backups=backups,
        required=r.boolean("required", False),
    )  # fmt: skip


def _syslog_sink(r: _Reader, earlier: list[SinkConfig]) -> SinkConfig:
    address = r.string("address", required=True)
    host, sep, port_text = address.rpartition(":")
    if address.startswith("["):
        host = host.strip("[]")
    if not sep:
        host, port_text = address, str(DEFAULT_SYSLOG_PORT)
    if not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise r.error("address", address, "must be HOST:PORT (port 1-65535)")
    transport = r.string("transport", "udp")
    if transport not in ("udp", "tcp"):
        raise r.error("transport", transport, "must be udp or tcp")
    return SinkConfig(
        "syslog", host=host, port=int(port_text),
        transport="udp" if transport == "udp" else "tcp", required=r.boolean("required", False),
    )  # fmt: skip


def _stdout_sink(r: _Reader, earlier: list[SinkConfig]) -> SinkConfig:
    if any(s.kind == "stdout" for s in earlier):
        raise r.error("type", "stdout", "only one stdout sink")
    return SinkConfig("stdout")


@dataclass(frozen=True, slots=True)
class _SinkKind:
    """One ``type`` of [[sinks]]: its keys and how its table is read."""

    keys: frozenset[str]
    parse: Callable[[_Reader, list[SinkConfig]], SinkConfig]


SINK_KINDS: Final = {
    "jsonl": _SinkKind(
        frozenset({"type", "path", "max_bytes", "backups", "required"}), _jsonl_sink
    ),
    "syslog": _SinkKind(frozenset({"type", "address", "transport", "required"}), _syslog_sink),
    "stdout": _SinkKind(frozenset({"type"}), _stdout_sink),
}


def _parse_sinks(file: Path, raw: object) -> tuple[SinkConfig, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(file, "sinks", raw, "must be an array of tables ([[sinks]])")
    out: list[SinkConfig] = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise ConfigError(file, f"sinks[{i}]", entry, "must be a table")
        r = _Reader(file, entry, f"sinks[{i}].")
        kind = r.string("type", required=True)
        if kind not in SINK_KINDS:
            raise r.error("type", kind, "must be one of: jsonl, syslog, stdout")
        r.unknown(SINK_KINDS[kind].keys)
        out.append(SINK_KINDS[kind].parse(r, out))
    return tuple(out)


CONTROL_OFF: Final = ("", "off")
"""``[control] socket`` values that mean no control socket (``"off"`` as in client.toml)."""


def _parse_control(file: Path, raw: object) -> tuple[Path | None, bool]:
    """``[control] socket``: a path (relative to the file; required), "" or "off" for none;
    the default path (best effort) when the table or the key is absent."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(file, "control", raw, "must be a table ([control])")
    r = _Reader(file, raw, "control.")
    r.unknown(CONTROL_KEYS)
    value = raw.get("socket")
    if value is None:
        return default_socket("gateway"), False
    if not isinstance(value, str):
        raise r.error("socket", value, 'must be a path, or "off" for no control socket')
    if value.strip() in CONTROL_OFF:
        return None, False
    return r.path("socket"), True


def _parse_state(
    file: Path, raw: object, key_path: Path, cluster_given: bool = False
) -> StateConfig:
    """``[state]``: ``store`` (sqlite | memory), ``state_dir`` and ``state_key_file`` (paths
    relative to the file; the key file defaults to ``state_dir/state.key``)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(file, "state", raw, "must be a table ([state])")
    r = _Reader(file, raw, "state.")
    r.unknown(STATE_KEYS)
    store = r.string("store", "sqlite")
    if store not in STATE_STORES:
        raise r.error("store", store, f"must be one of: {', '.join(STATE_STORES)}")
    if store == "etcd" and not cluster_given:
        raise r.error("store", store, "the etcd store needs a [cluster] section")
    state_dir = r.path("state_dir") or default_state_dir()
    if state_dir.exists() and not state_dir.is_dir():
        raise r.error("state_dir", str(state_dir), "exists and is not a directory")
    key_file = r.path("state_key_file") or state_dir / STATE_KEY_NAME
    if key_file.resolve() == key_path.resolve():
        raise r.error(
            "state_key_file", str(key_file),
            "is the gateway's private key; the state key must be a file of its own",
        )  # fmt: skip
    if key_file.exists() and not key_file.is_file():
        raise r.error("state_key_file", str(key_file), "exists and is not a regular file")
    return StateConfig(store, state_dir, key_file)  # type: ignore[arg-type]


def _parse_cluster(
    file: Path, raw: object, node_id: str, node_id_given: bool
) -> ClusterConfig | None:
    """``[cluster]``: ``endpoints`` (1-9 ``host:port``), ``node_id`` (defaults to the
    file's), ``state_key_file`` (required), ``lease_ttl`` (2-60 s), ``prefix``."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(file, "cluster", raw, "must be a table ([cluster])")
    r = _Reader(file, raw, "cluster.")
    r.unknown(CLUSTER_KEYS | ROUTE_KEYS)
    endpoints = _parse_endpoints(r)
    node = r.string("node_id", node_id)
    if not NODE_ID_RE.fullmatch(node):
        raise r.error("node_id", node, "1-64 characters from A-Z a-z 0-9 . _ -")
    if node_id_given and "node_id" in raw and node != node_id:
        raise r.error("node_id", node, f"contradicts the file's node_id {node_id!r}")
    key_file = r.path("state_key_file", required=True)
    assert key_file is not None
    ttl = r.integer("lease_ttl", DEFAULT_LEASE_TTL, 2, 60)
    prefix = r.string("prefix", DEFAULT_CLUSTER_PREFIX)
    if not prefix.startswith("/") or not prefix.endswith("/") or len(prefix) < 3:
        raise r.error("prefix", prefix, "must look like /jvpn/<cluster>/")
    return ClusterConfig(endpoints, node, key_file, ttl, prefix)


def _parse_endpoints(r: _Reader) -> tuple[str, ...]:
    """``[cluster] endpoints``: 1-9 etcd client endpoints, ``"host:port"``."""
    endpoints = r.table.get("endpoints", _NO_VALUE)
    if endpoints is _NO_VALUE:
        raise ConfigError(r.file, r.key("endpoints"), _NO_VALUE, "missing (required)")
    if (
        not isinstance(endpoints, list) or not 1 <= len(endpoints) <= 9
        or not all(isinstance(e, str) for e in endpoints)
    ):  # fmt: skip
        raise r.error("endpoints", endpoints, 'must be a list of 1-9 "host:port" strings')
    for ep in endpoints:
        host, sep, port = ep.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise r.error("endpoints", ep, 'each endpoint must be "host:port"')
    return tuple(endpoints)


def _cluster_state(file: Path, raw: object, cluster: ClusterConfig, key_path: Path) -> StateConfig:
    """With ``[cluster]`` the store is etcd: an explicit other ``[state] store`` is an error;
    the state key is the cluster's."""
    if isinstance(raw, dict) and raw.get("store", "etcd") != "etcd":
        raise ConfigError(
            file, "state.store", raw["store"], "contradicts [cluster] (its store is etcd)"
        )
    key_file = cluster.state_key_file
    if key_file.resolve() == key_path.resolve():
        raise ConfigError(
            file, "cluster.state_key_file", str(key_file),
            "is the gateway's private key; the state key must be a file of its own",
        )  # fmt: skip
    if key_file.exists() and not key_file.is_file():
        raise ConfigError(
            file, "cluster.state_key_file", str(key_file), "exists and is not a regular file"
        )
    return StateConfig("etcd", key_file.parent, key_file)


def _parse_route(file: Path, raw: object) -> RouteConfig:
    """``[cluster]``'s route keys (tunnel/gateway/routehook.py, docs/cluster.md)."""
    if raw is None:
        return RouteConfig()
    if not isinstance(raw, dict):
        raise ConfigError(file, "cluster", raw, "must be a table ([cluster])")
    r = _Reader(file, raw, "cluster.")
    r.unknown(ROUTE_KEYS | CLUSTER_KEYS)
    return parse_route_config(file, raw, r.error)


def _parse_ciphers(r: _Reader) -> tuple[DataCipher, ...]:
    value = r.table.get("ciphers", list(c.label for c in ALL_CIPHERS))
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise r.error("ciphers", value, 'must be a list of cipher names, e.g. ["aes-256-gcm"]')
    try:
        return parse_cipher_names(value)
    except CipherNameError as exc:
        raise r.error("ciphers", value, str(exc)) from None


def parse_gateway_config(data: Mapping[str, Any], file: Path) -> GatewayConfig:
    """Validate decoded TOML ``data`` (``file`` names it in errors and anchors paths)."""
    r = _Reader(file, data, "")
    r.unknown(TOP_KEYS | TABLES)
    node_id = r.string("node_id", "gateway")
    if not NODE_ID_RE.fullmatch(node_id):
        raise r.error("node_id", node_id, "1-64 characters from A-Z a-z 0-9 . _ -")
    listen = _parse_listen(r)
    mtu = r.integer("mtu", DEFAULT_MTU, MIN_MTU, MAX_INNER_PACKET)
    metrics: tuple[str, int] | None = None
    if "metrics" in data:
        text = r.string("metrics")
        try:
            metrics = parse_host_port(text)
        except ValueError as exc:
            raise r.error("metrics", text, str(exc)) from None
    inner_echo = r.boolean("inner_echo", False)
    ciphers = _parse_ciphers(r)
    policy_path = r.path("policy")
    tun_name, subnet, gateway_address = _parse_tun(file, data.get("tun"))
    subnet6, gateway_address6 = _parse_tun6(file, data.get("tun"), mtu)
    net = _InnerNet(subnet, gateway_address, subnet6, gateway_address6)
    clients_dir = _parse_clients_dir(r)
    claims = _Claims(gateway_address, gateway_address6)
    inline = _parse_inline_clients(file, data.get("clients"), net, claims, clients_dir is not None)
    errors: list[ConfigError] = []
    cache: ClientFileCache = {}
    found = _dir_specs(clients_dir, net, claims, errors, cache)
    clients = _assign(inline + found, net, claims, {}, errors)
    sinks = _parse_sinks(file, data.get("sinks"))
    control_socket, control_required = _parse_control(file, data.get("control"))
    workers = _parse_workers(r)
    handshake_rate = _parse_handshake_rate(r)
    key_path = r.path("private_key", required=True)
    assert key_path is not None
    state = _parse_state(file, data.get("state"), key_path, "cluster" in data)
    cluster = _parse_cluster(file, data.get("cluster"), node_id, "node_id" in data)
    if cluster is not None:
        state = _cluster_state(file, data.get("state"), cluster, key_path)
        node_id = cluster.node_id
        if r.table.get("workers", "auto") == "auto":
            workers = 1  # a cluster node is one process (below)
        elif workers > 1:  # each worker would be a node of its own under one node id
            raise r.error("workers", data.get("workers"), "must be 1 with [cluster] (for now)")
    route = _parse_route(file, data.get("cluster"))
    key_path, private_key = _load_key(r)  # last: every plain value error comes first
    return GatewayConfig(
        source=file, node_id=node_id, listen=listen, private_key_path=key_path,
        private_key=private_key, clients=clients, policy_path=policy_path, sinks=sinks,
        tun_name=tun_name, subnet=subnet, gateway_address=gateway_address, mtu=mtu,
        metrics=metrics, inner_echo=inner_echo, subnet6=subnet6,
        gateway_address6=gateway_address6, control_socket=control_socket,
        control_required=control_required, clients_dir=clients_dir,
        client_specs=tuple(inline),
        client_file_errors=tuple(errors), client_file_cache=cache, ciphers=ciphers,
        workers=workers, handshake_rate=handshake_rate, state=state, cluster=cluster,
        route=route,
    )  # fmt: skip


def cores() -> int:
    """The cores this process may run on (its CPU affinity, as a container or taskset
    limits it), 1..256: what ``workers = "auto"`` means."""
    return max(1, min(len(os.sched_getaffinity(0)), 256))


def _parse_workers(r: _Reader) -> int:
    """``workers``: 1..256, or "auto" (the default) for one per core (docs/gateway.md
    "Workers")."""
    if r.table.get("workers", "auto") == "auto":
        return cores()
    return r.integer("workers", 1, 1, 256)


def _parse_handshake_rate(r: _Reader) -> int | None:
    """``handshake_rate``: "auto" (the default: measured at start) or handshakes a second
    in [HANDSHAKE_RATE, HANDSHAKE_RATE_MAX] (docs/gateway.md "Arrivals in bursts")."""
    if r.table.get("handshake_rate", "auto") == "auto":
        return None
    low, high = int(HANDSHAKE_RATE), int(HANDSHAKE_RATE_MAX)
    value = r.table["handshake_rate"]
    if isinstance(value, str):
        raise r.error("handshake_rate", value, f'must be "auto" or an integer in [{low}, {high}]')
    return r.integer("handshake_rate", low, low, high)


def _dir_specs(
    directory: Path | None, net: _InnerNet, claims: _Claims, errors: list[ConfigError],
    cache: ClientFileCache,
) -> list[ClientSpec]:  # fmt: skip
    if directory is None:
        return []
    try:
        return _read_clients_dir(directory, net, claims, errors, cache)
    except OSError as exc:
        raise ConfigError(
            directory, "(clients_dir)", _NO_VALUE, f"cannot read: {exc.strerror}"
        ) from None


def _parse_clients_dir(r: _Reader) -> Path | None:
    """``clients_dir``: a directory (relative to the file) that must exist at start."""
    path = r.path("clients_dir")
    if path is not None and not path.is_dir():
        raise ConfigError(r.file, "clients_dir", _NO_VALUE, f"{path} is not a directory")
    return path


def load_gateway_config(path: str | os.PathLike[str]) -> GatewayConfig:
    """Read and validate a gateway configuration file; ConfigError on any problem."""
    file = Path(path)
    try:
        with file.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_SIZE + 1)
    except FileNotFoundError:
        raise ConfigError(file, "(file)", _NO_VALUE, "no such file") from None
    except OSError as exc:
        raise ConfigError(file, "(file)", _NO_VALUE, f"cannot read: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG_SIZE:
        raise ConfigError(file, "(file)", _NO_VALUE, "too large for a configuration file")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(file, "(file)", _NO_VALUE, "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "(syntax)", _NO_VALUE, f"invalid TOML: {exc}") from None
    return parse_gateway_config(data, file)
