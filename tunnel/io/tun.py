"""TUN device driver (DESIGN D11): python-pytun, ``IFF_TUN | IFF_NO_PI``, non-blocking.

A :class:`TunDevice` is the inner side of the tunnel: every read is one IP packet (IPv4 or
IPv6, no packet-information prefix), every write injects one. Creating the device is a
host change, so it happens in :meth:`TunDevice.open` (or ``with TunDevice(...) as tun``),
never in ``__init__``; the device is not persistent, so the kernel removes it when the fd
is closed, also when the process dies. Addresses, link state and routes are set with
:class:`tunnel.io.netconf.HostConfig`, which undoes them.

Errors say whose fault they are (STYLE): opening without privilege or without
``/dev/net/tun`` raises :class:`TunError` with the cure in the message; a packet the
kernel refuses on write (device down, not an IP packet) is counted by errno name in
:attr:`TunDevice.write_errors`, never raised; using a closed device raises ValueError.

Offloads: with ``offload=True`` (the default) the device is opened with ``IFF_VNET_HDR``
and :meth:`TunDevice.write_batch` merges consecutive TCP segments of one flow into one
GSO write (:mod:`tunnel.io.vnet`), so the kernel's TCP receive path handles one large
packet instead of dozens. TUNSETOFFLOAD (TSO on reads) is not enabled: reads stay single
MTU-sized packets unless ``tso=True`` (a measured prototype, off by default).
docs/performance.md has the measurements.

The packet accessors at the bottom are for inner packets read from the TUN (and
decrypted ones about to be written): cheap, no slicing, no validation beyond
:func:`ip_version`, which checks the version nibble and the fixed header length.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections import Counter
from typing import Final

import pytun

from tunnel.io.vnet import (
    NO_OFFLOAD_HDR,
    READ_OFFLOADS,
    TUNSETOFFLOAD,
    VNET_HDR_LEN,
    coalesce,
    from_kernel,
)

TUN_CLONE_DEVICE: Final = "/dev/net/tun"
"""The clone device every TUN is created through."""

DEFAULT_NAME: Final = "jvpn%d"
"""The kernel replaces %d with the first free number: jvpn0, jvpn1, ..."""

DEFAULT_MTU: Final = 1420
"""1500-byte outer links minus IPv6 (40) + UDP (8) + our framing (16) + AEAD tag (16)."""

READ_BUFFER_SIZE: Final = 65535
"""Largest IP packet: a read is never truncated, whatever MTU is set later."""

IFNAMSIZ: Final = 16
"""Linux interface names are at most 15 bytes plus the terminating NUL."""

_PROGRAMMING_ERRNOS: Final = frozenset({errno.EBADF, errno.EFAULT})
"""Errors that mean our code is wrong (closed fd): raised. Others are counted."""

_U32 = struct.Struct("!I")
_IPV4_MIN_HEADER: Final = 20
_IPV6_HEADER: Final = 40


class TunError(Exception):
    """A TUN device could not be created or configured (environment, not code)."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno
        """The OS error number behind it, when there is one."""


def _open_error(name: str, exc: OSError) -> TunError:
    """Turn pytun's OSError into a message that says what to do."""
    code = exc.errno
    privilege = "run as root or grant CAP_NET_ADMIN"
    if code in (errno.EACCES, errno.EPERM):
        if code == errno.EACCES:
            what = f"cannot open {TUN_CLONE_DEVICE}: permission denied"
        else:
            what = f"cannot create TUN device {name!r}: operation not permitted"
        return TunError(f"{what} — {privilege}", code)
    if code in (errno.ENOENT, errno.ENXIO, errno.ENODEV):
        return TunError(
            f"cannot open {TUN_CLONE_DEVICE}: {os.strerror(code).lower()} — "
            "load the tun module (modprobe tun) or, in a container, pass the device in "
            "(--device /dev/net/tun)",
            code,
        )
    if code == errno.EBUSY:
        return TunError(
            f"cannot create TUN device {name!r}: the name is in use by another device", code
        )
    cause = os.strerror(code).lower() if code is not None else str(exc)
    return TunError(f"cannot create TUN device {name!r}: {cause}", code)


class TunDevice:
    """A non-persistent layer-3 TUN device without packet-information prefix.

    ``name`` may contain ``%d`` (the kernel numbers it); after :meth:`open`, :attr:`name`
    is the actual name. ``mtu`` is set on open. Use as a context manager, or call
    :meth:`open` and :meth:`close`.
    """

    def __init__(
        self,
        name: str = DEFAULT_NAME,
        mtu: int = DEFAULT_MTU,
        *,
        offload: bool = True,
        tso: bool = False,
    ) -> None:
        encoded = name.encode()
        if not encoded or len(encoded) >= IFNAMSIZ or b"/" in encoded or b" " in encoded:
            raise ValueError(f"invalid interface name {name!r}: 1-15 bytes, no '/' or space")
        if not 68 <= mtu <= 65535:
            raise ValueError(f"TUN MTU {mtu} out of range 68..65535")
        self.name = name
        """The requested name until :meth:`open`, then the kernel's name (``jvpn0``)."""
        self.mtu = mtu
        """The MTU asked for and set on open."""
        self.read_packets = 0
        """Packets returned by ``read_batch``."""
        self.written = 0
        """Packets the kernel accepted from ``write``."""
        self.read_errors: Counter[str] = Counter()
        """Failed reads by errno name (other than "nothing to read")."""
        self.write_errors: Counter[str] = Counter()
        """Packets the kernel refused, by errno name (EIO: device down, EINVAL: not IP)."""
        self.offload = offload
        """``IFF_VNET_HDR`` with TCP coalescing on write (falls back off if refused)."""
        self.coalesced_writes = 0
        """GSO writes that carried several TCP segments."""
        self._dev: pytun.TunTapDevice | None = None
        self._fd = -1
        self.tso = tso
        """Ask for TUNSETOFFLOAD (with ``offload``): reads may then be 64 KiB TSO packets,
        split into segments in :meth:`read_batch`. Off by default: splitting in Python
        costs more than the reads it saves (docs/performance.md). False after open if the
        kernel refused it."""
        self._buf = bytearray(READ_BUFFER_SIZE + VNET_HDR_LEN)
        self._iov = [self._buf]
        self._view = memoryview(self._buf)

    # -- lifetime ------------------------------------------------------------------------

    def open(self) -> TunDevice:
        """Create the device (non-blocking fd, MTU set); return self."""
        if self._dev is not None:
            raise ValueError(f"TUN device {self.name!r} is already open")
        flags = pytun.IFF_TUN | pytun.IFF_NO_PI
        dev: pytun.TunTapDevice
        try:
            if self.offload:
                try:
                    dev = pytun.TunTapDevice(name=self.name, flags=flags | pytun.IFF_VNET_HDR)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    self.offload = False  # a kernel without IFF_VNET_HDR: plain packets
            if not self.offload:
                dev = pytun.TunTapDevice(name=self.name, flags=flags)
        except OSError as exc:
            raise _open_error(self.name, exc) from exc
        try:
            fd = dev.fileno()
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
            if dev.mtu != self.mtu:
                dev.mtu = self.mtu
            if self.offload and self.tso:
                try:
                    fcntl.ioctl(fd, TUNSETOFFLOAD, READ_OFFLOADS)
                except OSError:
                    self.tso = False  # reads stay plain MTU-sized packets
            else:
                self.tso = False
        except OSError as exc:
            dev.close()
            code = exc.errno
            cause = os.strerror(code).lower() if code is not None else str(exc)
            raise TunError(
                f"cannot configure TUN device {dev.name!r} (MTU {self.mtu}): {cause}", code
            ) from exc
        self._dev = dev
        self._fd = fd
        self.name = dev.name
        return self

    def close(self) -> None:
        """Close the fd; the kernel removes the device with it. Idempotent."""
        dev, self._dev = self._dev, None
        self._fd = -1
        if dev is not None:
            dev.close()

    @property
    def closed(self) -> bool:
        return self._dev is None

    def __enter__(self) -> TunDevice:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        """The device fd, for the loop's selector."""
        if self._dev is None:
            raise ValueError(f"TUN device {self.name!r} is not open")
        return self._fd

    # -- data ----------------------------------------------------------------------------

    def read_batch(self, max_n: int = 64) -> list[bytes]:
        """Read up to ``max_n`` packets, until the device would block.

        Each packet is read into a preallocated buffer and copied out once.
        """
        fd = self.fileno()
        readv = os.readv
        iov = self._iov
        view = self._view
        skip = VNET_HDR_LEN if self.offload else 0
        tso = self.tso
        out: list[bytes] = []
        for _ in range(max_n):
            try:
                n = readv(fd, iov)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in _PROGRAMMING_ERRNOS:
                    raise
                self.read_errors[_name(exc.errno)] += 1
                break
            if tso:
                dropped = from_kernel(view, n, out)
                if dropped is not None:
                    self.read_errors[dropped] += 1
            else:
                out.append(bytes(view[skip:n]))
        self.read_packets += len(out)
        return out

    def write(self, packet: bytes | bytearray | memoryview) -> bool:
        """Inject one IP packet; ``False`` (errno counted) if the kernel refused it."""
        fd = self.fileno()
        try:
            if self.offload:
                os.writev(fd, (NO_OFFLOAD_HDR, packet))
            else:
                os.write(fd, packet)
        except OSError as exc:
            if exc.errno in _PROGRAMMING_ERRNOS:
                raise
            self.write_errors[_name(exc.errno)] += 1
            return False
        self.written += 1
        return True

    def write_batch(self, packets: list[bytes]) -> int:
        """Write packets in order; return how many the kernel accepted (seam for offloads).

        One write per packet, except that with ``offload`` consecutive TCP segments of one
        flow go out as one GSO write (:func:`tunnel.io.vnet.coalesce`); every packet of a
        refused write is counted.
        """
        fd = self.fileno()
        done = 0
        if not self.offload:
            write = os.write
            for packet in packets:
                try:
                    write(fd, packet)
                except OSError as exc:
                    if exc.errno in _PROGRAMMING_ERRNOS:
                        raise
                    self.write_errors[_name(exc.errno)] += 1
                    continue
                done += 1
            self.written += done
            return done
        writev = os.writev
        for iov in coalesce(packets):
            count = len(iov) - 2 if len(iov) > 2 else 1  # [vnet, header, payloads...]
            try:
                writev(fd, iov)
            except OSError as exc:
                if exc.errno in _PROGRAMMING_ERRNOS:
                    raise
                self.write_errors[_name(exc.errno)] += count
                continue
            done += count
            if count > 1:
                self.coalesced_writes += 1
        self.written += done
        return done

    def __repr__(self) -> str:
        state = "closed" if self._dev is None else f"fd={self._fd}"
        return f"<TunDevice {self.name!r} mtu={self.mtu} {state}>"


def _name(code: int | None) -> str:
    return errno.errorcode.get(code, f"E{code}") if code is not None else "UNKNOWN"


# -- IPv6 on the device (sysctl) ----------------------------------------------------------

IPV6_CONF: Final = "/proc/sys/net/ipv6/conf"
"""Per-interface IPv6 settings; they vanish with the device (nothing to undo)."""

IPV6_MIN_MTU: Final = 1280
"""Below this MTU the kernel keeps IPv6 off on a device (RFC 8200)."""

IPV6_QUIET: Final = (("addr_gen_mode", "1"), ("accept_ra", "0"), ("router_solicitations", "0"))
"""IPv6 on a TUN without chatter: no link-local address (so no MLD reports from it), no
router advertisements taken, no router solicitations sent. Only the inner address the
tunnel configures is used."""


def set_ipv6(ifname: str, enabled: bool) -> bool:
    """Switch IPv6 on (quietly, see IPV6_QUIET) or off on ``ifname``; True if it now is.

    Off, the kernel neither sends IPv6 into the device nor accepts it from there. False
    when IPv6 is not built into the kernel, or /proc/sys is read-only (a container) and
    the setting is not already as asked.
    """
    if enabled:
        for key, value in IPV6_QUIET:
            _write_sysctl(ifname, key, value)
    _write_sysctl(ifname, "disable_ipv6", "0" if enabled else "1")
    try:
        with open(f"{IPV6_CONF}/{ifname}/disable_ipv6") as fh:
            return fh.read().strip() == ("0" if enabled else "1")
    except OSError:
        return False  # no IPv6 in this kernel


def _write_sysctl(ifname: str, key: str, value: str) -> None:
    try:
        with open(f"{IPV6_CONF}/{ifname}/{key}", "w") as fh:
            fh.write(value)
    except OSError:
        pass  # no such setting (old kernel, no IPv6) or read-only: set_ipv6 reads the result


# -- inner packet accessors ---------------------------------------------------------------


def ip_version(packet: bytes | bytearray | memoryview) -> int | None:
    """4 or 6 if ``packet`` starts like an IPv4/IPv6 header of at least fixed length, else None.

    After ``ip_version(p) == 4`` the ``ipv4_*`` accessors are safe; after ``== 6`` the
    ``ipv6_*`` ones are.
    """
    if not packet:
        return None
    version = packet[0] >> 4
    if version == 4:
        return 4 if len(packet) >= _IPV4_MIN_HEADER else None
    if version == 6:
        return 6 if len(packet) >= _IPV6_HEADER else None
    return None


def ipv4_src(packet: bytes | bytearray | memoryview) -> int:
    """Source address as an int (``ipaddress.IPv4Address(n)`` renders it)."""
    return int(_U32.unpack_from(packet, 12)[0])


def ipv4_dst(packet: bytes | bytearray | memoryview) -> int:
    """Destination address as an int (``ipaddress.IPv4Address(n)`` renders it)."""
    return int(_U32.unpack_from(packet, 16)[0])


def ipv6_src(packet: bytes | bytearray | memoryview) -> int:
    """Source address as an int (``ipaddress.IPv6Address(n)`` renders it)."""
    return int.from_bytes(memoryview(packet)[8:24], "big")


def ipv6_dst(packet: bytes | bytearray | memoryview) -> int:
    """Destination address as an int (``ipaddress.IPv6Address(n)`` renders it)."""
    return int.from_bytes(memoryview(packet)[24:40], "big")
