"""UDP path sockets: one non-blocking socket per candidate path (DESIGN §1, D7).

A :class:`PathSocket` is the outer transport of one candidate path: bound to a local
address (and optionally pinned to a network device with ``SO_BINDTODEVICE`` so paths
really leave through different links), it sends and receives whole datagrams and never
blocks. The engine loop owns it; the core never sees it (the core only sees bytes and a
path id).

Errors say whose fault they are (STYLE):

* opening (bad address, port in use, no such device, no privilege) raises
  :class:`PathError` naming the address or device and the cause;
* the network failing under us (full buffers, unreachable networks, ICMP errors) is
  counted by errno name and never raised: ``send`` returns ``False``;
* local misuse (a closed socket, an address of the wrong family) raises.

The interface is batch-shaped. ``send_many(datagrams, addr)`` sends a run of datagrams
to one destination with UDP GSO (``UDP_SEGMENT``: one ``sendmsg`` for up to
:data:`GSO_MAX_SEGMENTS` equal-sized datagrams, the last may be shorter) when the kernel
supports it, else one ``sendto`` each; ``recv_batch`` enables UDP GRO (``UDP_GRO``) and
splits a coalesced read back into its datagrams, so callers always see single datagrams.
:attr:`features` reports what the kernel supports; ``offload=False`` turns both off.
docs/performance.md has the measurements.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

Address: TypeAlias = tuple[Any, ...]
"""A socket address as the socket module uses it: ``(host, port)`` for IPv4,
``(host, port, flowinfo, scope_id)`` for IPv6. Hosts are numeric (no DNS on the data path)."""

DEFAULT_BUFFER: Final = 4 * 1024 * 1024
"""Socket buffer asked for: absorbs a few ms of line-rate bursts at ~1 Gbit/s without drops."""

RECV_BUFFER_SIZE: Final = 65535
"""Largest UDP payload (and the largest GRO-coalesced read): a datagram is never truncated."""

GSO_MAX_SEGMENTS: Final = 64
"""Datagrams per GSO send: the kernel's UDP_MAX_SEGMENTS on every kernel since 4.18."""

GSO_MAX_BYTES: Final = 65000
"""Payload bytes per GSO send: below the 64 KiB IP datagram limit with headers."""

_GSO_FALLBACK_ERRNOS: Final = frozenset(
    {errno.EINVAL, errno.EIO, errno.EMSGSIZE, errno.ENOPROTOOPT}
)
"""A GSO send refused for its shape (segment above the path MTU, no checksum offload on
the device): the run is sent again datagram by datagram, which counts real errors."""

_U16 = struct.Struct("=H")
_I32 = struct.Struct("=i")
_GRO_CMSG_SPACE: Final = socket.CMSG_SPACE(4)

ERRQUEUE_DRAIN_MAX: Final = 64
"""Error-queue entries read per call: bounded work per loop turn, like ``recv_batch``."""

# Linux socket options not (all) exported by the socket module of Python 3.11.
SOL_UDP: Final = 17
UDP_SEGMENT: Final = 103  # Linux >= 4.18: UDP GSO, one send of many equal-sized datagrams
UDP_GRO: Final = 104  # Linux >= 5.0: receive coalesced datagrams plus their segment size
IP_RECVERR: Final = 11
IPV6_RECVERR: Final = 25
SO_SNDBUFFORCE: Final = 32
SO_RCVBUFFORCE: Final = 33
_SOCK_EXTENDED_ERR = struct.Struct("=IBBBBII")
"""struct sock_extended_err: ee_errno, ee_origin, ee_type, ee_code, pad, ee_info, ee_data."""

SO_EE_ORIGIN_LOCAL: Final = 1
SO_EE_ORIGIN_ICMP: Final = 2
SO_EE_ORIGIN_ICMP6: Final = 3

_PROGRAMMING_ERRNOS: Final = frozenset(
    {
        errno.EBADF,
        errno.ENOTSOCK,
        errno.EFAULT,
        errno.EDESTADDRREQ,
        errno.EAFNOSUPPORT,
        errno.EOPNOTSUPP,
        errno.EISCONN,
    }
)
"""Errors that mean our code is wrong (closed socket, wrong family): these are raised.
Every other errno on send/recv is the network's doing and is counted."""

_BATCH_FATAL_ERRNOS: Final = frozenset({errno.EAGAIN, errno.ENOBUFS})
"""Send errors that hold for the whole socket (buffer or queue full), not one destination:
``send_batch`` stops trying and counts the rest of the batch under the same name."""


def errno_name(code: int | None) -> str:
    """``ECONNREFUSED`` for 111; a stable key for the error counters."""
    if code is None:
        return "UNKNOWN"
    return errno.errorcode.get(code, f"E{code}")


class PathError(Exception):
    """A UDP path socket could not be opened or configured (environment, not code).

    The message names the address or device and the cause, e.g.
    ``cannot bind UDP 127.0.0.1:51820: address already in use``.
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno
        """The OS error number behind it, when there is one."""


@dataclass(frozen=True, slots=True)
class UdpFeatures:
    """Kernel support for UDP offloads, probed on the socket (used unless ``offload=False``)."""

    gso: bool
    """``UDP_SEGMENT``: one sendmsg of up to 64 equal-sized datagrams to one destination."""
    gro: bool
    """``UDP_GRO``: one recvmsg returns several coalesced datagrams and their size."""


@dataclass(frozen=True, slots=True)
class IcmpReport:
    """The last error the kernel queued for this socket (an ICMP error, usually)."""

    error: str
    """errno name, e.g. ``ECONNREFUSED`` (port unreachable), ``EHOSTUNREACH``."""
    address: Address | None
    """Destination of the datagram that provoked it."""
    origin: int
    """``SO_EE_ORIGIN_ICMP``/``_ICMP6`` (from the network) or ``_LOCAL`` (from this host)."""


def format_address(host: str, port: int) -> str:
    """``127.0.0.1:51820`` or ``[::1]:51820``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _cause(exc: OSError) -> str:
    """Lower-case strerror: ``address already in use``."""
    if exc.errno is None:
        return str(exc)
    return os.strerror(exc.errno).lower()


def _family_of(host: str) -> socket.AddressFamily:
    """AF_INET or AF_INET6 for a numeric host; ValueError for anything else (no DNS)."""
    if host == "":
        return socket.AF_INET
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


def _bind_target(
    local: tuple[str, int], family: socket.AddressFamily | None
) -> tuple[str, int, socket.AddressFamily]:
    """(host, port, family) to bind: the family of ``local`` unless one is asked; the
    default wildcard becomes ``::`` for AF_INET6. PathError/ValueError when they disagree."""
    host, port = local
    try:
        local_family = _family_of(host)
    except ValueError:
        where = format_address(host, port)
        raise PathError(f"cannot bind UDP {where}: not a numeric IP address") from None
    if family is None:
        return host, port, local_family
    if family not in (socket.AF_INET, socket.AF_INET6):
        raise ValueError(f"family must be AF_INET or AF_INET6, not {family!r}")
    if family == local_family:
        return host, port, family
    if local == ("0.0.0.0", 0) and family == socket.AF_INET6:
        return "::", port, family
    where = format_address(host, port)
    raise ValueError(f"local address {where} is not an {family.name} address")


def _gso_run_end(datagrams: list[bytes], i: int) -> int:
    """The end (exclusive) of the GSO run starting at ``i``: equal-sized datagrams, at
    most ``GSO_MAX_SEGMENTS`` and ``GSO_MAX_BYTES``, and one shorter datagram may end it."""
    n = len(datagrams)
    size = len(datagrams[i])
    limit = min(n, i + GSO_MAX_SEGMENTS, i + max(1, GSO_MAX_BYTES // max(size, 1)))
    j = i + 1
    while j < limit and len(datagrams[j]) == size:
        j += 1
    if j < limit and len(datagrams[j]) < size:
        j += 1  # a shorter datagram may end a GSO run
    return j


class PathSocket:
    """One non-blocking UDP socket for one candidate path.

    ``local`` is the bind address (numeric host, port 0 for any); its family picks IPv4 or
    IPv6 unless ``family`` is given (with the default ``local``, ``family=AF_INET6``
    binds ``::``). ``device`` pins the socket to a network device (``SO_BINDTODEVICE``):
    routing for this socket then only uses routes through that device. IPv6 sockets are
    IPv6-only. ``SO_REUSEADDR`` is off: a port in use is an error, not a silent share.

    ``recverr`` asks the kernel to report ICMP errors on this unconnected socket
    (``IP_RECVERR``); they are counted in :attr:`icmp_errors`. The kernel then also fails
    the next send or receive once with that error, which is right for a path that talks to
    one remote, wrong for a socket that serves many: :class:`GatewaySocket` turns it off.

    ``offload`` uses UDP GSO in :meth:`send_many` and UDP GRO in :meth:`recv_batch`
    where the kernel supports them (:attr:`features`); callers see single datagrams
    either way.
    """

    def __init__(
        self,
        path_id: int,
        local: tuple[str, int] = ("0.0.0.0", 0),
        *,
        device: str | None = None,
        family: socket.AddressFamily | None = None,
        rcvbuf: int = DEFAULT_BUFFER,
        sndbuf: int = DEFAULT_BUFFER,
        recverr: bool = True,
        offload: bool = True,
    ) -> None:
        host, port, family = _bind_target(local, family)
        where = format_address(host, port)

        self.path_id = path_id
        """The path this socket carries; the core's name for it."""
        self.device = device
        """The device the socket is pinned to, if any."""
        self.family = family
        self.sent = 0
        """Datagrams the kernel accepted."""
        self.received = 0
        """Datagrams returned by ``recv_batch``."""
        self.send_errors: Counter[str] = Counter()
        """Datagrams not sent, by errno name (``EAGAIN``, ``ENETUNREACH``, ...)."""
        self.icmp_errors: Counter[str] = Counter()
        """Errors the kernel reported for earlier sends (ICMP unreachable...), by errno name."""
        self.last_icmp: IcmpReport | None = None
        """The most recent of those, with the destination it concerned."""
        self._recverr = recverr
        self._err_pending = False
        self._closed = False
        self._buf = bytearray(RECV_BUFFER_SIZE)
        self._view = memoryview(self._buf)

        try:
            sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        except OSError as exc:
            raise PathError(
                f"cannot open UDP socket for {where}: {_cause(exc)}", exc.errno
            ) from exc
        self._sock = sock
        try:
            self._configure(sock, rcvbuf, sndbuf)
            if device is not None:
                self._bind_device(sock, device)
            try:
                sock.bind((host, port))
            except OSError as exc:
                via = f" on device {device!r}" if device else ""
                raise PathError(f"cannot bind UDP {where}{via}: {_cause(exc)}", exc.errno) from exc
        except BaseException:
            sock.close()
            self._closed = True
            raise
        self._local: Address = sock.getsockname()
        self.features = _probe_features(sock)
        """Offloads the kernel supports on this socket (:class:`UdpFeatures`)."""
        self._gso = offload and self.features.gso
        self._gro = offload and self.features.gro and _enable_gro(sock)
        self.gso_sends = 0
        """GSO sends the kernel accepted (each carried 2..GSO_MAX_SEGMENTS datagrams)."""
        self.gro_reads = 0
        """Reads that returned several coalesced datagrams."""

    # -- configuration -------------------------------------------------------------------

    def _configure(self, sock: socket.socket, rcvbuf: int, sndbuf: int) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
        if self.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if self._recverr:
            if self.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        _set_buffer(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, rcvbuf)
        _set_buffer(sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, sndbuf)

    @staticmethod
    def _bind_device(sock: socket.socket, device: str) -> None:
        name = device.encode()
        if not name or len(name) > 15 or b"/" in name or b"\0" in name:
            raise PathError(f"cannot bind UDP socket to device {device!r}: invalid device name")
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, name)
        except OSError as exc:
            cause = _cause(exc)
            if exc.errno in (errno.EPERM, errno.EACCES):
                cause += " (needs CAP_NET_RAW)"
            raise PathError(
                f"cannot bind UDP socket to device {device!r}: {cause}", exc.errno
            ) from exc

    # -- properties ----------------------------------------------------------------------

    def fileno(self) -> int:
        """The socket's fd, for the loop's selector (-1 once closed)."""
        return self._sock.fileno()

    @property
    def local_address(self) -> Address:
        """The bound address (the kernel's choice of port when 0 was asked)."""
        return self._local

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def errors(self) -> Counter[str]:
        """All errors by errno name: failed sends plus kernel-reported (ICMP) errors."""
        return self.send_errors + self.icmp_errors

    @property
    def buffer_sizes(self) -> tuple[int, int]:
        """(receive, send) buffer bytes as the kernel granted them (it doubles requests)."""
        sock = self._sock
        return (
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
        )

    # -- send ----------------------------------------------------------------------------

    def send(self, data: bytes | bytearray | memoryview, addr: Address) -> bool:
        """Send one datagram; ``False`` (and the errno counted) if the kernel refused it."""
        try:
            self._sock.sendto(data, addr)
        except OSError as exc:
            self._send_failed(exc, addr)
            return False
        self.sent += 1
        return True

    def send_batch(self, items: Iterable[tuple[bytes | bytearray | memoryview, Address]]) -> int:
        """Send ``(datagram, address)`` pairs in order; return how many the kernel took.

        Every datagram not taken is counted in :attr:`send_errors`. A socket-wide
        condition (``EAGAIN``, ``ENOBUFS``) ends the batch: the rest is counted under the
        same name without being tried. This is the seam where UDP GSO will go.
        """
        sendto = self._sock.sendto
        done = 0
        it = iter(items)
        for data, addr in it:
            try:
                sendto(data, addr)
            except OSError as exc:
                self._send_failed(exc, addr)
                if exc.errno in _BATCH_FATAL_ERRNOS:
                    rest = sum(1 for _ in it)
                    if rest:
                        self.send_errors[errno_name(exc.errno)] += rest
                    break
                continue
            done += 1
        self.sent += done
        return done

    def send_many(self, datagrams: list[bytes], addr: Address) -> int:
        """Send ``datagrams`` in order to one destination; return how many the kernel took.

        With GSO, each run of equal-sized datagrams (the run's last one may be shorter)
        goes out in one ``sendmsg`` with ``UDP_SEGMENT``; without it, or for a single
        datagram, one ``sendto`` each. Refusals are counted per datagram as in ``send``.
        """
        n = len(datagrams)
        if not self._gso or n < 2:
            return self._send_each(datagrams, addr)
        done = 0
        i = 0
        while i < n:
            if not self._gso:  # switched off by a refusal earlier in this batch
                return done + self._send_each(datagrams[i:], addr)
            j = _gso_run_end(datagrams, i)
            if j - i == 1:
                done += self.send(datagrams[i], addr)
            else:
                done += self._send_gso_run(datagrams[i:j], addr)
            i = j
        return done

    def _send_each(self, datagrams: list[bytes], addr: Address) -> int:
        done = 0
        for data in datagrams:
            done += self.send(data, addr)
        return done

    def _send_gso_run(self, run: list[bytes], addr: Address) -> int:
        """One ``sendmsg`` with ``UDP_SEGMENT`` for a run of equal-sized datagrams (the
        last may be shorter); falls back to one send each where the device cannot."""
        size = len(run[0])
        try:
            self._sock.sendmsg(run, [(SOL_UDP, UDP_SEGMENT, _U16.pack(size))], 0, addr)
        except OSError as exc:
            if exc.errno in _GSO_FALLBACK_ERRNOS and not isinstance(exc, socket.gaierror):
                if exc.errno in (errno.EIO, errno.ENOPROTOOPT):
                    self._gso = False  # the device cannot offload: stop trying
                return self._send_each(run, addr)
            self._send_failed(exc, addr)
            self.send_errors[errno_name(exc.errno)] += len(run) - 1
            return 0
        self.sent += len(run)
        self.gso_sends += 1
        return len(run)

    def _send_failed(self, exc: OSError, addr: Address) -> None:
        if isinstance(exc, socket.gaierror):
            raise ValueError(
                f"path {self.path_id}: cannot send to {addr!r} on an {self.family.name} "
                f"socket (numeric addresses of the socket's family only): {exc}"
            ) from exc
        self._raise_if_misuse(exc)
        if exc.errno not in (errno.EAGAIN, errno.ENOBUFS):
            # a pending socket error (ICMP) surfaces here; its error-queue entry is next
            self._err_pending = True
        self.send_errors[errno_name(exc.errno)] += 1

    def _raise_if_misuse(self, exc: OSError) -> None:
        if exc.errno in _PROGRAMMING_ERRNOS:
            if self._closed:
                raise ValueError(f"path {self.path_id}: socket is closed") from exc
            raise exc

    # -- receive -------------------------------------------------------------------------

    def recv_batch(self, max_n: int = 64) -> list[tuple[bytes, Address]]:
        """Drain up to ``max_n`` datagrams (until the socket would block).

        Each datagram is copied once out of a preallocated buffer. Errors the kernel
        reports here (an ICMP error for an earlier send) are counted, not raised; when
        this call received nothing or saw such an error, the error queue is drained too,
        so a level-triggered selector woken by ``POLLERR`` does not spin.
        """
        if self._closed:
            raise ValueError(f"path {self.path_id}: socket is closed")
        if self._gro:
            return self._recv_batch_gro(max_n)
        out: list[tuple[bytes, Address]] = []
        recv_into = self._sock.recvfrom_into
        buf = self._buf
        view = self._view
        for _ in range(max_n):
            try:
                n, addr = recv_into(buf)
            except BlockingIOError:
                break
            except OSError as exc:
                self._raise_if_misuse(exc)
                # a pending error for an earlier send; counted from the error queue
                self._err_pending = True
                continue
            out.append((bytes(view[:n]), addr))
        self.received += len(out)
        if self._recverr and (self._err_pending or not out):
            self.drain_errors()
        return out

    def _recv_batch_gro(self, max_n: int) -> list[tuple[bytes, Address]]:
        """``recv_batch`` with UDP GRO: up to ``max_n`` reads, coalesced reads split."""
        out: list[tuple[bytes, Address]] = []
        append = out.append
        recvmsg_into = self._sock.recvmsg_into
        iov = [self._buf]
        view = self._view
        for _ in range(max_n):
            try:
                n, ancdata, _flags, addr = recvmsg_into(iov, _GRO_CMSG_SPACE)
            except BlockingIOError:
                break
            except OSError as exc:
                self._raise_if_misuse(exc)
                self._err_pending = True
                continue
            seg = 0
            for level, kind, data in ancdata:
                if level == SOL_UDP and kind == UDP_GRO and len(data) >= _I32.size:
                    seg = _I32.unpack_from(data)[0]
            if 0 < seg < n:
                self.gro_reads += 1
                read = view[:n]  # a slice past its end stops at n: the last may be shorter
                for off in range(0, n, seg):
                    append((bytes(read[off : off + seg]), addr))
            else:
                append((bytes(view[:n]), addr))
        self.received += len(out)
        if self._recverr and (self._err_pending or not out):
            self.drain_errors()
        return out

    def drain_errors(self) -> int:
        """Read queued error reports (bounded), count them; return how many were read.

        Call on ``POLLERR``/``EPOLLERR``; ``recv_batch`` calls it when it may be needed.
        """
        if not self._recverr or self._closed:
            return 0
        self._err_pending = False
        recvmsg = self._sock.recvmsg
        count = 0
        for _ in range(ERRQUEUE_DRAIN_MAX):
            try:
                _, ancdata, _, addr = recvmsg(0, 512, socket.MSG_ERRQUEUE)
            except BlockingIOError:
                break
            except OSError as exc:
                self._raise_if_misuse(exc)
                break
            for level, kind, data in ancdata:
                if (level, kind) not in (
                    (socket.IPPROTO_IP, IP_RECVERR),
                    (socket.IPPROTO_IPV6, IPV6_RECVERR),
                ) or len(data) < _SOCK_EXTENDED_ERR.size:
                    continue
                ee_errno, ee_origin = _SOCK_EXTENDED_ERR.unpack_from(data)[:2]
                name = errno_name(ee_errno)
                self.icmp_errors[name] += 1
                self.last_icmp = IcmpReport(name, addr or None, ee_origin)
                count += 1
        return count

    # -- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        """Close the socket; idempotent. Sends after this raise ValueError."""
        if not self._closed:
            self._closed = True
            self._sock.close()

    def __enter__(self) -> PathSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"local={self._local!r}"
        dev = f" device={self.device!r}" if self.device else ""
        return f"<{type(self).__name__} path={self.path_id} {state}{dev}>"


class GatewaySocket(PathSocket):
    """The gateway's listening socket: a :class:`PathSocket` bound to the listen address.

    One socket serves every client, so ICMP error reporting is off: with ``IP_RECVERR``
    an unreachable client would make the next send to a *different* client fail.
    For both families, open one GatewaySocket per family (IPv6 sockets are IPv6-only).
    """

    def __init__(
        self,
        listen: tuple[str, int],
        *,
        path_id: int = 0,
        device: str | None = None,
        rcvbuf: int = DEFAULT_BUFFER,
        sndbuf: int = DEFAULT_BUFFER,
    ) -> None:
        super().__init__(
            path_id, listen, device=device, rcvbuf=rcvbuf, sndbuf=sndbuf, recverr=False
        )


def _set_buffer(sock: socket.socket, force_opt: int, opt: int, size: int) -> None:
    """Ask for ``size`` bytes; beyond net.core.[rw]mem_max only with CAP_NET_ADMIN (FORCE)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, force_opt, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, opt, size)  # capped by the sysctl; fine


def _probe_features(sock: socket.socket) -> UdpFeatures:
    def supported(opt: int) -> bool:
        try:
            sock.getsockopt(SOL_UDP, opt)
        except OSError:
            return False
        return True

    return UdpFeatures(gso=supported(UDP_SEGMENT), gro=supported(UDP_GRO))


def _enable_gro(sock: socket.socket) -> bool:
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True
