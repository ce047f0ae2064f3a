"""Loading and reloading the gateway's policy file (DESIGN D14).

:func:`load_initial_policy` reads the file once at start-up. ``_PolicyMixin`` gives
:class:`~tunnel.gateway.runtime.GatewayRuntime` ``reload_policy()`` (SIGHUP in the
program, a file-change poll every ``POLICY_POLL_S``, the thread wrapper): a valid policy is
installed for new and running sessions; an invalid one keeps running sessions on the last
valid policy, denies new sessions (``GatewaySessions.set_policy(None)``), emits
POLICY_EVENT and clears the health flag.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from tunnel.core.gateway import GatewaySessions
from tunnel.core.policy import POLICY_DEFAULT, Policy, PolicyError, load_policy
from tunnel.gateway.metrics import RuntimeCounters

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


class _PolicyMixin:
    """Policy reload and the policy-file poll of a GatewayRuntime (see the module docstring)."""

    # Set in GatewayRuntime.__init__; declared here for the methods below.
    clock: Callable[[], float]
    gateway: GatewaySessions
    counters: RuntimeCounters
    policy_path: Path | None
    policy_poll_s: float | None
    policy_ok: bool
    policy_error: str | None
    _last_valid_version: str
    _policy_sig: tuple[int, int, int] | None
    _loop: asyncio.AbstractEventLoop | None
    _poll_handle: asyncio.TimerHandle | None

    if TYPE_CHECKING:  # provided by GatewayRuntime

        def pump(self, now: float | None = None) -> None: ...

        def _guard(self, fn: Callable[..., None], *args: Any) -> None: ...

    # -- policy --------------------------------------------------------------------------

    def reload_policy(self) -> bool:
        """Reload the policy file now (loop thread); True if it was valid and applied.

        Without a policy file the built-in defaults stay; this returns True.
        """
        if self.policy_path is None:
            return True
        now = self.clock()
        self._policy_sig = _policy_signature(self.policy_path)
        try:
            policy = load_policy(self.policy_path)
        except PolicyError as exc:
            self.policy_ok = False
            self.policy_error = str(exc)
            self.counters.policy_reloads_invalid += 1
            self.gateway.set_policy(None, now, error=str(exc))
            self.pump(now)
            return False
        self.policy_ok = True
        self.policy_error = None
        self._last_valid_version = policy.policy_version
        self.counters.policy_reloads_ok += 1
        self.gateway.set_policy(policy, now)
        self.pump(now)
        return True

    def _reload_from_signal(self) -> None:
        self.reload_policy()

    def _announce_invalid_start(self) -> None:
        self.gateway.set_policy(None, self.clock(), error=self.policy_error)

    def _poll(self) -> None:
        self._poll_handle = None
        assert self.policy_path is not None and self.policy_poll_s
        if _policy_signature(self.policy_path) != self._policy_sig:
            self.reload_policy()
        if self._loop is not None:
            self._poll_handle = self._loop.call_later(self.policy_poll_s, self._guard, self._poll)
