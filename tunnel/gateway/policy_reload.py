"""Loading and reloading the gateway's policy file (DESIGN D14).

:func:`load_initial_policy` reads the file once at start-up. :class:`PolicyReloader` is
the component the :class:`~tunnel.gateway.runtime.GatewayRuntime` owns for reloads (SIGHUP
in the program, a file-change poll every ``POLICY_POLL_S``, the thread wrapper): a valid
policy is installed for new and running sessions; an invalid one keeps running sessions on
the last valid policy, denies new sessions (``GatewaySessions.set_policy(None)``), emits
POLICY_EVENT and clears the health flag. The reloader owns that flag, the last valid
version and its reload counters; the runtime schedules the poll and pumps the core after.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

from tunnel.core.gateway import GatewaySessions
from tunnel.core.policy import POLICY_DEFAULT, Policy, PolicyError, load_policy

POLICY_POLL_S: Final = 1.0
"""How often the policy file's mtime/size/inode is checked for a change."""


def _policy_signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def load_initial_policy(path: Path | None) -> tuple[Policy | None, str | None]:
    """(policy, None) from ``path`` (defaults when None), or (None, error) when invalid."""
    if path is None:
        return POLICY_DEFAULT, None
    try:
        return load_policy(path), None
    except PolicyError as exc:
        return None, str(exc)


class PolicyReloader:
    """The policy file of one gateway and what its last load said (module docstring)."""

    def __init__(
        self,
        gateway: GatewaySessions,
        path: Path | None,
        policy: Policy | None,
        error: str | None = None,
    ) -> None:
        """``policy``/``error``: the start-up load (:func:`load_initial_policy`)."""
        self._gateway: GatewaySessions = gateway
        self.path = path
        self.ok = policy is not None
        """False after an invalid load (new sessions are denied until a valid one)."""
        self.error: str | None = None if policy is not None else error or "no valid policy loaded"
        self.last_valid_version = policy.policy_version if policy is not None else "invalid"
        """The last valid policy's version (what running sessions use)."""
        self.reloads_ok = 0
        self.reloads_invalid = 0
        self._signature = _policy_signature(path) if path is not None else None

    def reload(self, now: float) -> bool:
        """Load the file now and install the result in the core; True if it was valid.

        Without a policy file the built-in defaults stay; this returns True.
        """
        if self.path is None:
            return True
        self._signature = _policy_signature(self.path)
        try:
            policy = load_policy(self.path)
        except PolicyError as exc:
            self.ok = False
            self.error = str(exc)
            self.reloads_invalid += 1
            self._gateway.set_policy(None, now, error=str(exc))
            return False
        self.ok = True
        self.error = None
        self.last_valid_version = policy.policy_version
        self.reloads_ok += 1
        self._gateway.set_policy(policy, now)
        return True

    def file_changed(self) -> bool:
        """True if the file's mtime/size/inode differ from the last load's."""
        return self.path is not None and _policy_signature(self.path) != self._signature

    def announce_invalid_start(self, now: float) -> None:
        """Started without a valid policy: tell the core (POLICY_EVENT, sessions denied)."""
        if not self.ok:
            self._gateway.set_policy(None, now, error=self.error)
