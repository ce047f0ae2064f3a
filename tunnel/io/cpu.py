"""What the CPU offers the data ciphers: does it have AES instructions?

``cpu_has_aes()`` reads the feature flags the kernel lists in ``/proc/cpuinfo`` (x86:
``flags ... aes``, Arm: ``Features ... aes``). A client without ``ciphers`` in its
configuration offers AES-256-GCM first when it is true, ChaCha20-Poly1305 first when it
is not (tunnel/core/ciphers.py, ``default_offer``); the gateway's status names it.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Final

CPUINFO: Final = Path("/proc/cpuinfo")
_FLAG_KEYS: Final = ("flags", "features")


def has_aes_flag(cpuinfo: str) -> bool:
    """True when a ``flags``/``Features`` line of ``cpuinfo`` text names ``aes``."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in _FLAG_KEYS and "aes" in value.split():
            return True
    return False


@functools.cache
def cpu_has_aes() -> bool:
    """This machine's CPU has AES instructions (False when /proc/cpuinfo is unreadable)."""
    try:
        return has_aes_flag(CPUINFO.read_text(encoding="ascii", errors="replace"))
    except OSError:
        return False
