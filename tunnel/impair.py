"""Userspace UDP impairment relay: a lossy, slow, flapping or NAT-rebinding path.

The kernel here has no netem, so integration tests, benchmarks and ``jvpn-tui --demo``
put this relay between a client and the gateway::

    client --> listen socket --[up]--> mapping socket (one per client) --> upstream
    client <-- listen socket <-[down]-- mapping socket <------------------ upstream

Each downstream source address gets its own upstream socket, like a NAT mapping, so the
upstream sees one source port per client; ``rebind()`` swaps every mapping socket for a
new one, which the upstream sees as a NAT rebinding. Each direction has its own
:class:`Impairment` (loss, delay, jitter, duplicate, reorder, blackhole, rate), changed
at run time through the Python API, a JSON-over-UDP control socket, or a thread handle.

Randomness comes from one injected ``random.Random``: with a fixed seed and the same
input sequence, the same datagrams are dropped, duplicated and held back.

The relay only ever sends to the configured upstream (mapping sockets are connected to
it) and to downstream addresses that sent to the listen socket; control replies go to
the control requester. Everything a peer can grow is bounded: mappings
(``max_mappings``, least recently used evicted), delayed datagrams (``max_delayed``),
the rate-limiter backlog. The hot path logs nothing and reads the clock once per batch.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import dataclasses
import ipaddress
import json
import math
import random
import signal
import socket
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Literal, TypeVar

__all__ = [
    "DIRECTIONS",
    "ImpairRelay",
    "Impairment",
    "RelayStartError",
    "RelayThread",
    "control",
    "format_address",
    "main",
    "parse_address",
    "run_relay_in_thread",
]

Address = tuple[str, int]
Direction = Literal["up", "down", "both"]
_T = TypeVar("_T")

DIRECTIONS: Final = ("up", "down")
"""'up' = downstream client -> upstream (gateway); 'down' = upstream -> client."""

MAX_DATAGRAM: Final = 65535
"""Largest UDP payload; read buffers this size so nothing is silently truncated."""

RECV_BATCH: Final = 64
"""Datagrams read per readiness callback: amortises loop overhead, stays fair."""

SOCKET_BUFFER: Final = 1 << 20
"""Requested SO_RCVBUF/SO_SNDBUF (the kernel caps it): absorbs loopback bursts."""

REORDER_EXTRA_MS: Final = 20.0
"""Minimum extra hold of a reordered datagram; long enough for later ones to overtake."""

MAX_DELAY_MS: Final = 60_000.0
"""Upper bound for delay_ms and jitter_ms: a longer 'delay' is a blackhole."""

RATE_BACKLOG_MAX_S: Final = 0.5
"""Rate limiter queue: a datagram that would wait longer than this is dropped (overflow)."""

CONTROL_MAX_COMMAND: Final = 4096
"""Largest control command accepted; anything bigger gets an error reply."""

CONTROL_BATCH: Final = 16
"""Control datagrams handled per readiness callback."""

DEFAULT_MAX_MAPPINGS: Final = 64
DEFAULT_MAPPING_IDLE_S: Final = 60.0
"""Typical NAT UDP mapping timeout order of magnitude; tests and the demo lower it."""
DEFAULT_MAX_DELAYED: Final = 4096
"""Delayed datagrams in flight (~6 MB at 1500 bytes): overflow is a counted drop."""

_RATIOS: Final = ("loss", "duplicate", "reorder")
_TIMES: Final = ("delay_ms", "jitter_ms")
_COUNTERS: Final = (
    "received",
    "forwarded",
    "dropped_loss",
    "dropped_blackhole",
    "dropped_overflow",
    "dropped_error",
    "duplicated",
    "reordered",
)


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return number


@dataclasses.dataclass(frozen=True, slots=True)
class Impairment:
    """What one direction of the relay does to each datagram. All zero = pass-through.

    Applied in this order: blackhole, loss, duplicate, then per copy: rate limit, delay
    with jitter, reorder hold.
    """

    loss: float = 0.0
    """Probability in [0, 1] that a datagram is dropped."""
    delay_ms: float = 0.0
    """Fixed one-way delay added to every datagram, in milliseconds."""
    jitter_ms: float = 0.0
    """Uniform random +/- variation of the delay (clamped at 0); may reorder by itself."""
    duplicate: float = 0.0
    """Probability in [0, 1] that a datagram is sent twice."""
    reorder: float = 0.0
    """Probability in [0, 1] that a datagram is held back an extra max(20 ms, delay_ms)."""
    blackhole: bool = False
    """Drop everything (the path is dead) while True."""
    rate_kbit: float | None = None
    """Bottleneck rate in kbit/s (serialisation delay, 0.5 s queue); None = unlimited."""

    def __post_init__(self) -> None:
        for name in _RATIOS:
            value = _number(name, getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value!r}")
            object.__setattr__(self, name, value)
        for name in _TIMES:
            value = _number(name, getattr(self, name))
            if not 0.0 <= value <= MAX_DELAY_MS:
                raise ValueError(f"{name} must be within [0, {MAX_DELAY_MS:g}] ms, got {value!r}")
            object.__setattr__(self, name, value)
        if not isinstance(self.blackhole, bool):
            raise ValueError(f"blackhole must be true or false, got {self.blackhole!r}")
        if self.rate_kbit is not None:
            rate = _number("rate_kbit", self.rate_kbit)
            if rate <= 0.0:
                raise ValueError(f"rate_kbit must be > 0 (null/None = unlimited), got {rate!r}")
            object.__setattr__(self, "rate_kbit", rate)

    @property
    def clean(self) -> bool:
        """True when this impairment changes nothing (the fast path)."""
        return self == _CLEAN

    def replace(self, **fields: object) -> Impairment:
        """A copy with ``fields`` changed; ValueError names an unknown or invalid field."""
        for name in fields:
            if name not in _FIELDS:
                raise ValueError(f"unknown impairment field {name!r} (known: {', '.join(_FIELDS)})")
        return dataclasses.replace(self, **fields)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of the fields."""
        return dataclasses.asdict(self)


_CLEAN: Final = Impairment()
_FIELDS: Final = tuple(f.name for f in dataclasses.fields(Impairment))


class _Link:
    """One direction: its impairment, its counters, its rate-limiter clock."""

    __slots__ = ("busy_until", "clean", "imp", *_COUNTERS)

    def __init__(self, imp: Impairment) -> None:
        self.imp = imp
        self.clean = imp.clean
        self.busy_until = 0.0
        self.reset_counters()

    def set(self, imp: Impairment) -> None:
        self.imp = imp
        self.clean = imp.clean
        if imp.rate_kbit is None:
            self.busy_until = 0.0

    def reset_counters(self) -> None:
        self.received = 0
        self.forwarded = 0
        self.dropped_loss = 0
        self.dropped_blackhole = 0
        self.dropped_overflow = 0
        self.dropped_error = 0
        self.duplicated = 0
        self.reordered = 0

    def counters(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in _COUNTERS}

    def plan(self, size: int, now: float, rng: random.Random) -> list[float]:
        """Departure times (loop clock) of the copies of one datagram; [] = dropped."""
        imp = self.imp
        if imp.blackhole:
            self.dropped_blackhole += 1
            return []
        if imp.loss and rng.random() < imp.loss:
            self.dropped_loss += 1
            return []
        copies = 1
        if imp.duplicate and rng.random() < imp.duplicate:
            copies = 2
            self.duplicated += 1
        out: list[float] = []
        for _ in range(copies):
            depart = now
            if imp.rate_kbit is not None:
                start = max(now, self.busy_until)
                if start - now > RATE_BACKLOG_MAX_S:
                    self.dropped_overflow += 1
                    continue
                self.busy_until = depart = start + size * 8 / (imp.rate_kbit * 1000.0)
            delay_ms = imp.delay_ms
            if imp.jitter_ms:
                delay_ms = max(0.0, delay_ms + rng.uniform(-imp.jitter_ms, imp.jitter_ms))
            if imp.reorder and rng.random() < imp.reorder:
                delay_ms += max(REORDER_EXTRA_MS, imp.delay_ms)
                self.reordered += 1
            out.append(depart + delay_ms / 1000.0)
        return out


class _Mapping:
    """One downstream source and the upstream socket that stands for it."""

    __slots__ = ("closed", "last_used", "sock", "src")

    def __init__(self, src: Any, sock: socket.socket, now: float) -> None:
        self.src = src
        self.sock = sock
        self.last_used = now
        self.closed = False


class RelayStartError(OSError):
    """The relay could not start: an address did not resolve or could not be bound."""


def parse_address(text: str) -> Address:
    """Parse ``host:port`` or ``[v6]:port`` into ``(host, port)``; ValueError if bad."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"bad address {text!r}: expected host:port or [v6]:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not host:
            raise ValueError(f"bad address {text!r}: empty host")
    elif ":" in host or "[" in host or "]" in host:
        raise ValueError(f"bad address {text!r}: write IPv6 addresses as [addr]:port")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"bad address {text!r}: port must be 0..65535")
    return host, int(port_text)


def format_address(addr: Sequence[Any]) -> str:
    """``(host, port[, ...])`` -> ``host:port`` or ``[v6]:port``."""
    host, port = str(addr[0]), int(addr[1])
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _resolve(addr: Address, *, passive: bool) -> tuple[int, Any]:
    host, port = addr
    flags = socket.AI_PASSIVE if passive else 0
    try:
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM, 0, flags)
    except (socket.gaierror, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise RelayStartError(f"cannot resolve {format_address(addr)}: {reason}") from exc
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def _udp_socket(family: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setblocking(False)
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        except OSError:
            pass  # best effort: a smaller buffer only makes bursts lossier
    return sock


def _bind(addr: Address, what: str, avoid: Any = None) -> socket.socket:
    """Bind a UDP socket on ``addr``; never on ``avoid`` (the upstream: a relay loop)."""
    family, sockaddr = _resolve(addr, passive=True)
    if avoid is not None and _same_endpoint(sockaddr, avoid):
        raise RelayStartError(f"cannot {what} on {format_address(addr)}: {_LOOP_REASON}")
    sock = _udp_socket(family)
    try:
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        reason = (exc.strerror or str(exc)).lower()
        err = RelayStartError(f"cannot {what} on {format_address(addr)}: {reason}")
        err.errno = exc.errno
        raise err from exc
    bound = sock.getsockname()
    if avoid is not None and _same_endpoint(bound, avoid):
        sock.close()
        raise RelayStartError(f"cannot {what} on {format_address(bound)}: {_LOOP_REASON}")
    return sock


_LOOP_REASON: Final = "it is the upstream address (the relay would feed itself)"


def _same_endpoint(bound: Any, upstream: Any) -> bool:
    """Would datagrams sent to ``upstream`` arrive at a socket bound on ``bound``?"""
    if int(bound[1]) == 0 or int(bound[1]) != int(upstream[1]):
        return False
    return _is_wildcard(str(bound[0])) or str(bound[0]) == str(upstream[0])


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return host == ""


class ImpairRelay:
    """The relay on the running asyncio loop. Not thread-safe: see run_relay_in_thread.

    Usage::

        relay = ImpairRelay(("127.0.0.1", 0), ("127.0.0.1", 51820), rng=random.Random(1))
        await relay.start()
        relay.set("both", loss=0.1, delay_ms=20)
        ...
        relay.close()
    """

    def __init__(
        self,
        listen: Address,
        upstream: Address,
        *,
        control: Address | None = None,
        up: Impairment | None = None,
        down: Impairment | None = None,
        rng: random.Random | None = None,
        max_mappings: int = DEFAULT_MAX_MAPPINGS,
        mapping_idle_s: float = DEFAULT_MAPPING_IDLE_S,
        max_delayed: int = DEFAULT_MAX_DELAYED,
    ) -> None:
        if max_mappings < 1:
            raise ValueError(f"max_mappings must be >= 1, got {max_mappings!r}")
        if not mapping_idle_s > 0:
            raise ValueError(f"mapping_idle_s must be > 0, got {mapping_idle_s!r}")
        if max_delayed < 0:
            raise ValueError(f"max_delayed must be >= 0, got {max_delayed!r}")
        if not 1 <= upstream[1] <= 65535:
            raise ValueError(f"upstream port must be 1..65535, got {upstream[1]!r}")
        self._listen_addr = listen
        self._upstream_addr = upstream
        self._control_addr = control
        self._up = _Link(up or _CLEAN)
        self._down = _Link(down or _CLEAN)
        self._rng = rng if rng is not None else random.Random()
        self._max_mappings = max_mappings
        self._mapping_idle_s = mapping_idle_s
        self._max_delayed = max_delayed
        self._mappings: OrderedDict[Any, _Mapping] = OrderedDict()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listen: socket.socket | None = None
        self._control: socket.socket | None = None
        self._upstream_family: int = socket.AF_INET
        self._upstream_sockaddr: Any = None
        self._bound: Address | None = None
        self._control_bound: Address | None = None
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._delayed = 0
        self._rebinds = 0
        self._evicted = 0
        self._expired = 0
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the listen (and control) socket on the running loop; RelayStartError."""
        if self._loop is not None:
            raise RuntimeError("relay already started")
        loop = asyncio.get_running_loop()
        family, sockaddr = _resolve(self._upstream_addr, passive=False)
        listen = _bind(self._listen_addr, "listen", avoid=sockaddr)
        bound = listen.getsockname()
        control = None
        if self._control_addr is not None:
            try:
                control = _bind(self._control_addr, "listen for control", avoid=sockaddr)
            except RelayStartError:
                listen.close()
                raise
        self._loop = loop
        self._upstream_family, self._upstream_sockaddr = family, sockaddr
        self._listen = listen
        self._bound = str(bound[0]), int(bound[1])
        loop.add_reader(listen.fileno(), self._on_listen_readable)
        if control is not None:
            self._control = control
            name = control.getsockname()
            self._control_bound = str(name[0]), int(name[1])
            loop.add_reader(control.fileno(), self._on_control_readable)
        self._sweep_handle = loop.call_later(self._sweep_interval(), self._sweep)

    def close(self) -> None:
        """Close every socket; pending delayed datagrams are discarded. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
        for mapping in self._mappings.values():
            self._close_mapping(mapping)
        self._mappings.clear()
        for sock in (self._listen, self._control):
            if sock is not None:
                if self._loop is not None and not self._loop.is_closed():
                    self._loop.remove_reader(sock.fileno())
                sock.close()

    async def __aenter__(self) -> ImpairRelay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def bound_address(self) -> Address:
        """The listen socket's actual ``(host, port)`` (port 0 resolved)."""
        if self._bound is None:
            raise RuntimeError("relay not started")
        return self._bound

    @property
    def control_address(self) -> Address | None:
        """The control socket's actual ``(host, port)``, or None without one."""
        return self._control_bound

    @property
    def upstream_address(self) -> Address:
        """The resolved upstream ``(host, port)``."""
        if self._upstream_sockaddr is None:
            return self._upstream_addr
        return str(self._upstream_sockaddr[0]), int(self._upstream_sockaddr[1])

    # -- runtime control ---------------------------------------------------------------

    def set(self, direction: str, **fields: object) -> None:
        """Change some impairment fields of 'up', 'down' or 'both'; ValueError if invalid.

        Fields not named keep their value. Both directions are validated before either
        changes, so a bad value changes nothing.
        """
        links = self._links(direction)
        new = [(link, link.imp.replace(**fields)) for link in links]
        for link, imp in new:
            link.set(imp)

    def impairments(self) -> dict[str, Impairment]:
        """The current impairment of each direction."""
        return {"up": self._up.imp, "down": self._down.imp}

    def reset(self, *, counters: bool = False) -> None:
        """Back to pass-through in both directions; with ``counters`` also zero them."""
        for link in (self._up, self._down):
            link.set(_CLEAN)
            if counters:
                link.reset_counters()
        if counters:
            self._rebinds = self._evicted = self._expired = 0

    def rebind(self) -> int:
        """Replace every upstream mapping socket: the upstream sees new source ports.

        The new socket is opened while the old one is still bound, so its port is
        guaranteed to differ. Replies still in flight to the old port are lost, as
        after a real NAT rebinding. Returns the total rebind count.
        """
        self._rebinds += 1
        if self._loop is None or self._closed:
            return self._rebinds
        old = self._mappings
        self._mappings = OrderedDict()
        for src, mapping in old.items():
            fresh = self._open_mapping(src, mapping.last_used)
            if fresh is not None:
                self._mappings[src] = fresh
        for mapping in old.values():
            self._close_mapping(mapping)
        return self._rebinds

    def stats(self) -> dict[str, Any]:
        """JSON-safe counters and settings."""
        return {
            "listen": format_address(self._bound) if self._bound else None,
            "upstream": format_address(self.upstream_address),
            "control": format_address(self._control_bound) if self._control_bound else None,
            "up": self._up.counters(),
            "down": self._down.counters(),
            "rebinds": self._rebinds,
            "mappings": len(self._mappings),
            "mappings_evicted": self._evicted,
            "mappings_expired": self._expired,
            "delayed": self._delayed,
            "impairment": self._impairment_dict(),
        }

    def _impairment_dict(self) -> dict[str, dict[str, Any]]:
        return {"up": self._up.imp.to_dict(), "down": self._down.imp.to_dict()}

    def _links(self, direction: str) -> tuple[_Link, ...]:
        if direction == "up":
            return (self._up,)
        if direction == "down":
            return (self._down,)
        if direction == "both":
            return (self._up, self._down)
        raise ValueError(f"direction must be 'up', 'down' or 'both', got {direction!r}")

    # -- mappings ----------------------------------------------------------------------

    def _open_mapping(self, src: Any, now: float) -> _Mapping | None:
        assert self._loop is not None
        try:
            sock = _udp_socket(self._upstream_family)
        except OSError:
            return None  # out of descriptors: the caller counts the datagram as dropped
        try:
            sock.connect(self._upstream_sockaddr)  # only talks to / hears the upstream
        except OSError:
            sock.close()
            return None
        mapping = _Mapping(src, sock, now)
        self._loop.add_reader(sock.fileno(), self._on_mapping_readable, mapping)
        return mapping

    def _close_mapping(self, mapping: _Mapping) -> None:
        if mapping.closed:
            return
        mapping.closed = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(mapping.sock.fileno())
        mapping.sock.close()

    def _mapping_for(self, src: Any, now: float) -> _Mapping | None:
        mappings = self._mappings
        mapping = mappings.get(src)
        if mapping is not None:
            mappings.move_to_end(src)
            mapping.last_used = now
            return mapping
        mapping = self._open_mapping(src, now)
        if mapping is None:
            return None
        while len(mappings) >= self._max_mappings:
            _, oldest = mappings.popitem(last=False)
            self._close_mapping(oldest)
            self._evicted += 1
        mappings[src] = mapping
        return mapping

    def _sweep_interval(self) -> float:
        return max(0.05, min(self._mapping_idle_s / 2.0, 5.0))

    def _sweep(self) -> None:
        assert self._loop is not None
        cutoff = self._loop.time() - self._mapping_idle_s
        mappings = self._mappings
        while mappings:  # least recently used first
            src = next(iter(mappings))
            mapping = mappings[src]
            if mapping.last_used > cutoff:
                break
            del mappings[src]
            self._close_mapping(mapping)
            self._expired += 1
        self._sweep_handle = self._loop.call_later(self._sweep_interval(), self._sweep)

    # -- data path ---------------------------------------------------------------------

    def _on_listen_readable(self) -> None:
        assert self._loop is not None and self._listen is not None
        recvfrom = self._listen.recvfrom
        up = self._up
        now = self._loop.time()
        for _ in range(RECV_BATCH):
            try:
                data, src = recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # a pending socket error is consumed by the failed read
            up.received += 1
            if up.clean:
                self._send_up(src, data, now)
            else:
                self._impaired(up, data, src, now, self._send_up, self._deliver_up)

    def _on_mapping_readable(self, mapping: _Mapping) -> None:
        assert self._loop is not None
        if mapping.closed:
            return
        recv = mapping.sock.recv
        down = self._down
        now = self._loop.time()
        for _ in range(RECV_BATCH):
            try:
                data = recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # ICMP unreachable for an earlier send; already counted
            self._mappings.move_to_end(mapping.src)  # open mappings are always in the table
            mapping.last_used = now
            down.received += 1
            if down.clean:
                self._send_down(mapping.src, data, now)
            else:
                self._impaired(down, data, mapping.src, now, self._send_down, self._deliver_down)

    def _impaired(
        self,
        link: _Link,
        data: bytes,
        addr: Any,
        now: float,
        send: Callable[[Any, bytes, float], None],
        deliver: Callable[[Any, bytes], None],
    ) -> None:
        assert self._loop is not None
        for when in link.plan(len(data), now, self._rng):
            if when <= now:
                send(addr, data, now)
            elif self._delayed >= self._max_delayed:
                link.dropped_overflow += 1
            else:
                self._delayed += 1
                self._loop.call_at(when, deliver, addr, data)

    def _deliver_up(self, src: Any, data: bytes) -> None:
        self._delayed -= 1
        if not self._closed:
            assert self._loop is not None
            self._send_up(src, data, self._loop.time())

    def _deliver_down(self, dst: Any, data: bytes) -> None:
        self._delayed -= 1
        if not self._closed:
            assert self._loop is not None
            self._send_down(dst, data, self._loop.time())

    def _send_up(self, src: Any, data: bytes, now: float) -> None:
        mapping = self._mapping_for(src, now)
        if mapping is None:
            self._up.dropped_error += 1
            return
        try:
            mapping.sock.send(data)
        except OSError:  # buffer full, ICMP unreachable reported late, ...
            self._up.dropped_error += 1
            return
        self._up.forwarded += 1

    def _send_down(self, dst: Any, data: bytes, now: float) -> None:
        assert self._listen is not None
        try:
            self._listen.sendto(data, dst)
        except OSError:
            self._down.dropped_error += 1
            return
        self._down.forwarded += 1

    # -- control socket ----------------------------------------------------------------

    def _on_control_readable(self) -> None:
        assert self._control is not None
        for _ in range(CONTROL_BATCH):
            try:
                data, peer = self._control.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            reply = self.handle_command(data)
            try:
                self._control.sendto(json.dumps(reply).encode(), peer)
            except OSError:
                pass  # the requester went away; it will time out, the relay goes on

    def handle_command(self, data: bytes) -> dict[str, Any]:
        """Execute one control-protocol command (JSON bytes) and return the reply dict.

        Never raises for bad input: every problem becomes ``{"ok": false, "error": ...}``.
        """
        if len(data) > CONTROL_MAX_COMMAND:
            return {"ok": False, "error": f"command larger than {CONTROL_MAX_COMMAND} bytes"}
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError) as exc:
            return {"ok": False, "error": f"invalid JSON: {exc}"}
        if not isinstance(obj, dict):
            return {"ok": False, "error": "command must be a JSON object"}
        reply = self._command(obj)
        if "id" in obj:
            reply["id"] = obj["id"]
        return reply

    def _command(self, obj: dict[str, Any]) -> dict[str, Any]:
        cmd = obj.get("cmd")
        args = {k: v for k, v in obj.items() if k not in ("cmd", "id")}
        try:
            if cmd == "set":
                direction = args.pop("dir", "both")
                if not isinstance(direction, str):
                    raise ValueError(f"dir must be 'up', 'down' or 'both', got {direction!r}")
                if not args:
                    raise ValueError(f"set needs at least one field of: {', '.join(_FIELDS)}")
                self.set(direction, **args)
                return {"ok": True, "impairment": self._impairment_dict()}
            if cmd == "stats":
                _no_extra(cmd, args)
                return {"ok": True, "stats": self.stats()}
            if cmd == "rebind":
                _no_extra(cmd, args)
                return {"ok": True, "rebinds": self.rebind()}
            if cmd == "reset":
                counters = args.pop("counters", False)
                _no_extra(cmd, args)
                if not isinstance(counters, bool):
                    raise ValueError(f"counters must be true or false, got {counters!r}")
                self.reset(counters=counters)
                return {"ok": True, "impairment": self._impairment_dict()}
        except ValueError as exc:
            return {"ok": False, "error": str(exc)}
        return {"ok": False, "error": f"unknown cmd {cmd!r} (known: set, stats, rebind, reset)"}


def _no_extra(cmd: str, args: Mapping[str, object]) -> None:
    if args:
        raise ValueError(f"{cmd} takes no field {', '.join(sorted(args))}")


def control(addr: Address, obj: Mapping[str, Any], timeout: float = 1.0) -> dict[str, Any]:
    """Send one control command to a relay and return its JSON reply.

    Raises TimeoutError when no reply arrives within ``timeout`` seconds.
    """
    family, sockaddr = _resolve(addr, passive=False)
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.connect(sockaddr)  # replies from anyone else are filtered by the kernel
        sock.send(json.dumps(dict(obj)).encode())
        try:
            data = sock.recv(MAX_DATAGRAM)
        except TimeoutError as exc:
            raise TimeoutError(
                f"no reply from impair relay control {format_address(addr)}"
            ) from exc
    reply = json.loads(data)
    if not isinstance(reply, dict):
        raise ValueError(f"control reply is not a JSON object: {reply!r}")
    return reply


class RelayThread:
    """An ImpairRelay on its own event loop in a daemon thread; every method thread-safe.

    Returned by :func:`run_relay_in_thread`. Use as a context manager or call stop().
    """

    def __init__(self, relay: ImpairRelay, name: str) -> None:
        self._relay = relay
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._stopped = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    def _start(self) -> None:
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            self._thread.join()
            raise self._start_error

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            try:
                loop.run_until_complete(self._relay.start())
            except Exception as exc:  # handed to the starting thread, which raises it
                self._start_error = exc
                return
            finally:
                self._ready.set()
            loop.run_forever()
        finally:
            self._relay.close()
            loop.close()

    def _call(self, fn: Callable[[], _T], timeout: float = 5.0) -> _T:
        if threading.current_thread() is self._thread:
            raise RuntimeError("RelayThread methods must not be called from its own loop")
        with self._lock:
            if self._stopped or self._loop is None:
                raise RuntimeError("impair relay is stopped")

            async def run() -> _T:
                return fn()

            future = asyncio.run_coroutine_threadsafe(run(), self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError as exc:
            future.cancel()
            raise TimeoutError("impair relay did not answer") from exc

    @property
    def bound_address(self) -> Address:
        """The listen socket's actual ``(host, port)``."""
        return self._relay.bound_address

    @property
    def control_address(self) -> Address | None:
        return self._relay.control_address

    @property
    def upstream_address(self) -> Address:
        return self._relay.upstream_address

    def set(self, direction: str, **fields: object) -> None:
        self._call(lambda: self._relay.set(direction, **fields))

    def impairments(self) -> dict[str, Impairment]:
        return self._call(self._relay.impairments)

    def reset(self, *, counters: bool = False) -> None:
        self._call(lambda: self._relay.reset(counters=counters))

    def rebind(self) -> int:
        return self._call(self._relay.rebind)

    def stats(self) -> dict[str, Any]:
        return self._call(self._relay.stats)

    def stop(self, timeout: float = 5.0) -> None:
        """Close the relay and end its thread. Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(loop.stop)
            except RuntimeError:
                pass  # the loop closed between the check and the call: already stopped
        self._thread.join(timeout)

    close = stop

    def __enter__(self) -> RelayThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_relay_in_thread(
    listen: Address = ("127.0.0.1", 0),
    upstream: Address = ("127.0.0.1", 51820),
    *,
    control: Address | None = None,
    up: Impairment | None = None,
    down: Impairment | None = None,
    seed: int | None = None,
    rng: random.Random | None = None,
    max_mappings: int = DEFAULT_MAX_MAPPINGS,
    mapping_idle_s: float = DEFAULT_MAPPING_IDLE_S,
    max_delayed: int = DEFAULT_MAX_DELAYED,
    name: str = "jvpn-impair",
) -> RelayThread:
    """Start an ImpairRelay in a daemon thread; returns once it is bound.

    Raises RelayStartError (an OSError) when an address cannot be resolved or bound.
    """
    relay = ImpairRelay(
        listen,
        upstream,
        control=control,
        up=up,
        down=down,
        rng=rng if rng is not None else random.Random(seed),
        max_mappings=max_mappings,
        mapping_idle_s=mapping_idle_s,
        max_delayed=max_delayed,
    )
    handle = RelayThread(relay, name)
    handle._start()
    return handle


# -- command line ----------------------------------------------------------------------


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, no usage dump
        raise _UsageError(f"{message} (try --help)")


def _address_arg(text: str) -> Address:
    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="jvpn-impair",
        description="Userspace UDP impairment relay: forwards datagrams between "
        "downstream clients and one upstream, with loss, delay, jitter, duplication, "
        "reordering, blackholing, rate limiting and NAT rebinding controllable at run "
        "time through a JSON control socket (see docs/impair.md).",
    )
    parser.add_argument(
        "--listen",
        required=True,
        type=_address_arg,
        metavar="HOST:PORT",
        help="address clients send to (port 0 = any free port)",
    )
    parser.add_argument(
        "--upstream",
        required=True,
        type=_address_arg,
        metavar="HOST:PORT",
        help="address datagrams are relayed to (the gateway)",
    )
    parser.add_argument(
        "--control",
        type=_address_arg,
        metavar="HOST:PORT",
        help="JSON control socket (unauthenticated: keep it on loopback)",
    )
    parser.add_argument(
        "--dir",
        choices=("both", "up", "down"),
        default="both",
        help="direction the impairment options apply to (default: both)",
    )
    parser.add_argument("--loss", type=float, default=0.0, help="drop probability 0..1")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="+/- delay variation")
    parser.add_argument("--duplicate", type=float, default=0.0, help="duplication probability 0..1")
    parser.add_argument(
        "--reorder",
        type=float,
        default=0.0,
        help="probability a datagram is held back so later ones overtake it",
    )
    parser.add_argument("--rate-kbit", type=float, default=None, help="bottleneck kbit/s")
    parser.add_argument("--blackhole", action="store_true", help="start with the path dead")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible runs")
    parser.add_argument(
        "--max-mappings",
        type=int,
        default=DEFAULT_MAX_MAPPINGS,
        help="downstream sources tracked at once (LRU evicted)",
    )
    parser.add_argument(
        "--mapping-idle-s",
        type=float,
        default=DEFAULT_MAPPING_IDLE_S,
        help="idle seconds before a mapping expires",
    )
    return parser


def _emit(obj: dict[str, Any]) -> None:
    try:
        print(json.dumps(obj), flush=True)
    except OSError:
        pass  # stdout closed by the reader: keep relaying, the output was informational


async def _serve(relay: ImpairRelay) -> None:
    await relay.start()
    _emit(
        {
            "event": "listening",
            "listen": format_address(relay.bound_address),
            "upstream": format_address(relay.upstream_address),
            "control": format_address(relay.control_address) if relay.control_address else None,
        }
    )
    control_addr = relay.control_address
    if control_addr is not None and not ipaddress.ip_address(control_addr[0]).is_loopback:
        print(
            "jvpn-impair: warning: control socket is not on loopback and has no authentication",
            file=sys.stderr,
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        relay.close()
    _emit({"event": "stopped", "stats": relay.stats()})


def main(argv: Sequence[str] | None = None) -> int:
    """``jvpn-impair``: 0 on SIGINT/SIGTERM, 2 on usage or bind errors, 1 otherwise."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        print(f"jvpn-impair: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help / --version
        return exc.code if isinstance(exc.code, int) else 0
    try:
        imp = Impairment(
            loss=args.loss,
            delay_ms=args.delay_ms,
            jitter_ms=args.jitter_ms,
            duplicate=args.duplicate,
            reorder=args.reorder,
            blackhole=args.blackhole,
            rate_kbit=args.rate_kbit,
        )
        relay = ImpairRelay(
            args.listen,
            args.upstream,
            control=args.control,
            up=imp if args.dir in ("both", "up") else None,
            down=imp if args.dir in ("both", "down") else None,
            rng=random.Random(args.seed),
            max_mappings=args.max_mappings,
            mapping_idle_s=args.mapping_idle_s,
        )
    except ValueError as exc:
        print(f"jvpn-impair: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(relay))
    except RelayStartError as exc:
        print(f"jvpn-impair: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    except Exception as exc:  # the boundary: one line, never a traceback
        print(f"jvpn-impair: internal error: {exc!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
