"""The jvpn-impair relay itself: sockets, NAT-like mappings and the impaired data path.

:class:`ImpairRelay` runs on the caller's asyncio loop: one listen socket for the
downstream clients, one connected upstream socket per client (a NAT mapping, LRU-bounded
and expired when idle), delayed datagrams scheduled on the loop. The control protocol is
in :mod:`tunnel.impair.control`, the thread wrapper in :mod:`tunnel.impair.thread`.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final

from tunnel.impair.control import _ControlServer
from tunnel.impair.model import _CLEAN, Impairment, _Link
from tunnel.impair.net import (
    MAX_DATAGRAM,
    Address,
    RelayStartError,
    _bind,
    _resolve,
    _udp_socket,
    format_address,
)

RECV_BATCH: Final = 64
"""Datagrams read per readiness callback: amortises loop overhead, stays fair."""

DEFAULT_MAX_MAPPINGS: Final = 64
DEFAULT_MAPPING_IDLE_S: Final = 60.0
"""Typical NAT UDP mapping timeout order of magnitude; tests and the demo lower it."""
DEFAULT_MAX_DELAYED: Final = 4096
"""Delayed datagrams in flight (~6 MB at 1500 bytes): overflow is a counted drop."""


class _Mapping:
    """One downstream source and the upstream socket that stands for it."""

    __slots__ = ("closed", "last_used", "sock", "src")

    def __init__(self, src: Any, sock: socket.socket, now: float) -> None:
        self.src = src
        self.sock = sock
        self.last_used = now
        self.closed = False


class ImpairRelay(_ControlServer):
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
            up.count_received()
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
            down.count_received()
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
                link.count_overflow()
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
            self._up.count_error()
            return
        try:
            mapping.sock.send(data)
        except OSError:  # buffer full, ICMP unreachable reported late, ...
            self._up.count_error()
            return
        self._up.count_forwarded()

    def _send_down(self, dst: Any, data: bytes, now: float) -> None:
        assert self._listen is not None
        try:
            self._listen.sendto(data, dst)
        except OSError:
            self._down.count_error()
            return
        self._down.count_forwarded()
