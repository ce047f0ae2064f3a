"""N UDP sockets on one port, each session's datagrams steered to one of them by the kernel.

A gateway with N worker processes (:mod:`tunnel.gateway.workers`) binds N sockets to one
listen address with ``SO_REUSEPORT`` (a *reuseport group*) and attaches one classic BPF
program to the group with ``SO_ATTACH_REUSEPORT_CBPF`` (Linux 4.5+), as QUIC servers
steer by connection id. The program returns the index of the socket in the group (the
order of the binds) that gets the datagram; the kernel runs it on the UDP payload:

- DATA, CONTROL (and anything else with a full header): ``byte 4 % N``. Byte 4 is the
  least significant byte of the little-endian receiver index (tunnel/core/wire.py), and
  worker ``w`` allocates only receiver indexes whose low byte is ``w`` modulo N
  (``GatewaySessions(index_stripe=(w, N))``): a session's datagrams reach the worker
  that owns it, always the same one.
- HANDSHAKE_INIT has no receiver index yet: ``byte 8 % N``, the low byte of the
  client's sender index. A client keeps its sender index for its whole life, so its
  INITs (and the retry with a cookie after a COOKIE_REPLY) reach one worker, the one that
  then allocates the session's receiver index in its own stripe.
- Shorter than 12 bytes (no DATA, CONTROL or INIT is): socket 0. The worker there
  counts it as a drop (``truncated``) like any gateway.

The kernel keeps a group's socket order only while every socket stays open: closing one
moves the last socket into its slot. The process that binds the group
(:class:`ReuseportGroup`) therefore keeps every socket open for its whole life, also when
the worker reading one of them dies; that worker's datagrams then wait unread (and
overflow) until a worker reads the socket again, and no other worker's sessions move.
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct
from collections.abc import Sequence
from typing import Final

from tunnel.core.constants import MSG_HANDSHAKE_INIT
from tunnel.io.udp import GatewaySocket

SO_ATTACH_REUSEPORT_CBPF: Final = 51
"""linux/asm-generic/socket.h (not in Python's socket module)."""

MAX_WORKERS: Final = 256
"""Steering uses one byte of the index: at most 256 sockets per group."""

STEER_MIN_LEN: Final = 12
"""Below this (a header and a sender index) a datagram goes to socket 0."""

RECEIVER_INDEX_OFFSET: Final = 4
"""Offset of the receiver index (u32, little-endian: this byte is its low byte)."""

SENDER_INDEX_OFFSET: Final = 8
"""Offset of a handshake's sender index (u32, little-endian)."""

# classic BPF opcodes (linux/filter.h, linux/bpf_common.h)
_LD_LEN: Final = 0x00 | 0x00 | 0x80  # BPF_LD | BPF_W | BPF_LEN
_LDB_ABS: Final = 0x00 | 0x10 | 0x20  # BPF_LD | BPF_B | BPF_ABS
_JGE_K: Final = 0x05 | 0x30  # BPF_JMP | BPF_JGE | BPF_K
_JEQ_K: Final = 0x05 | 0x10  # BPF_JMP | BPF_JEQ | BPF_K
_JA: Final = 0x05 | 0x00  # BPF_JMP | BPF_JA
_MOD_K: Final = 0x04 | 0x90  # BPF_ALU | BPF_MOD | BPF_K
_RET_K: Final = 0x06 | 0x00  # BPF_RET | BPF_K
_RET_A: Final = 0x06 | 0x10  # BPF_RET | BPF_A

_INSN = struct.Struct("=HBBI")


class ReuseportError(OSError):
    """The kernel cannot do what this module needs (the message names the feature)."""


def steering_program(workers: int) -> list[tuple[int, int, int, int]]:
    """The classic BPF program (code, jt, jf, k) steering to ``workers`` sockets."""
    if not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"workers must be 1..{MAX_WORKERS}, not {workers}")
    return [
        (_LD_LEN, 0, 0, 0),  # 0: A = length
        (_JGE_K, 1, 0, STEER_MIN_LEN),  # 1: A >= 12 -> 3
        (_RET_K, 0, 0, 0),  # 2: short: socket 0
        (_LDB_ABS, 0, 0, 0),  # 3: A = message type
        (_JEQ_K, 0, 2, MSG_HANDSHAKE_INIT),  # 4: INIT -> 5, else -> 7
        (_LDB_ABS, 0, 0, SENDER_INDEX_OFFSET),  # 5: A = low byte of the sender index
        (_JA, 0, 0, 1),  # 6: -> 8
        (_LDB_ABS, 0, 0, RECEIVER_INDEX_OFFSET),  # 7: A = low byte of the receiver index
        (_MOD_K, 0, 0, workers),  # 8: A %= workers
        (_RET_A, 0, 0, 0),  # 9: socket A
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def attach_steering(sock: GatewaySocket, workers: int) -> None:
    """Attach the steering program to ``sock``'s reuseport group (ReuseportError if the
    kernel does not support SO_ATTACH_REUSEPORT_CBPF)."""
    program = steering_program(workers)
    code = b"".join(_INSN.pack(*insn) for insn in program)
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = _SockFprog(len(program), ctypes.addressof(buf))
    handle = socket.socket(fileno=sock.fileno())
    try:
        handle.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, bytes(fprog))
    except OSError as exc:
        if exc.errno in (errno.ENOPROTOOPT, errno.EINVAL, errno.EOPNOTSUPP):
            raise ReuseportError(
                exc.errno,
                "this kernel cannot steer datagrams between workers (SO_ATTACH_REUSEPORT_CBPF "
                f"needs Linux 4.5+: {exc.strerror}); set workers = 1",
            ) from exc
        raise
    finally:
        handle.detach()  # the fd stays the GatewaySocket's


class ReuseportGroup:
    """``workers`` GatewaySockets bound to ``listen`` in order, steered by the program.

    Socket ``i`` of :attr:`sockets` is the group's slot ``i``: datagrams the program
    steers to ``i`` arrive there. Keep the group open as long as any worker reads one
    of its sockets (the module docstring says why).
    """

    def __init__(self, listen: tuple[str, int], workers: int) -> None:
        steering_program(workers)  # checks the count before anything is bound
        self.sockets: list[GatewaySocket] = []
        try:
            first = GatewaySocket(listen, reuseport=True)
            self.sockets.append(first)
            port = first.local_address[1]  # port 0: the others join the kernel's choice
            for _ in range(workers - 1):
                self.sockets.append(GatewaySocket((listen[0], port), reuseport=True))
            attach_steering(first, workers)
        except BaseException:
            self.close()
            raise

    @property
    def local_address(self) -> tuple[str, int]:
        host, port = self.sockets[0].local_address[:2]
        return host, port

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def open_groups(listen: Sequence[tuple[str, int]], workers: int) -> list[ReuseportGroup]:
    """One group per listen address (all closed again if one cannot be opened)."""
    groups: list[ReuseportGroup] = []
    try:
        for address in listen:
            groups.append(ReuseportGroup(address, workers))
    except BaseException:
        for group in groups:
            group.close()
        raise
    return groups
