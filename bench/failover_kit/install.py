"""Which commands a bench needs, installing the missing ones with apt-get, and the skip note.

Shared by bench/failover.py (``--compare``, nftables) and bench/compare.py (the anchors and
iperf3): a tool still missing after the install is skipped with one line, never an error.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path


def have(command: str) -> bool:
    return shutil.which(command) is not None or any(
        Path(d, command).exists() for d in ("/usr/sbin", "/sbin")
    )


def missing(requires: dict[str, str], exists: Callable[[str], bool] = have) -> list[str]:
    """The commands of ``requires`` (command -> package) that are not installed."""
    return [cmd for cmd in requires if not exists(cmd)]


def skip_note(tool: str, requires: dict[str, str], absent: Sequence[str]) -> str:
    """The one line printed for a tool that cannot run because commands are missing."""
    packages = " ".join(dict.fromkeys(requires[c] for c in absent))
    return f"{tool}: skipped: {', '.join(absent)} not installed (apt-get install {packages})"


def install(packages: Sequence[str]) -> str:
    """apt-get install the packages, only as root with apt-get; says what happened."""
    if not packages:
        return ""
    if os.geteuid() != 0 or not have("apt-get"):
        return f"not installing {' '.join(packages)}: needs root and apt-get"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "-q", "update"], capture_output=True, env=env, check=False)
    proc = subprocess.run(
        ["apt-get", "install", "-q", "-y", "--no-install-recommends", *packages],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        return f"apt-get install {' '.join(packages)} failed: {proc.stderr.strip()[-200:]}"
    return f"installed {' '.join(packages)}"
