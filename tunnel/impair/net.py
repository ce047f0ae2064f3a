"""Addresses and UDP sockets of the jvpn-impair relay.

``host:port`` parsing and formatting, name resolution, non-blocking UDP sockets with
large buffers, and the bind check that refuses to listen on the upstream address (a
relay loop). :class:`RelayStartError` is what every start-time failure raises.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from typing import Any, Final

Address = tuple[str, int]

MAX_DATAGRAM: Final = 65535
"""Largest UDP payload; read buffers this size so nothing is silently truncated."""

SOCKET_BUFFER: Final = 1 << 20
"""Requested SO_RCVBUF/SO_SNDBUF (the kernel caps it): absorbs loopback bursts."""


class RelayStartError(OSError):
    """The relay could not start: an address did not resolve or could not be bound.

    ``str()`` is the message alone; ``errno`` is the bind failure's errno (None when no
    system call failed, e.g. a relay loop refused before binding).
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


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
        message = f"cannot {what} on {format_address(addr)}: {reason}"
        raise RelayStartError(message, exc.errno) from exc
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
