"""The session ownership store: one authoritative record per session, changed only by CAS.

DESIGN D15. The gateway that owns a session mirrors every committed state change of it
into a :class:`SessionStore`. A write names the record version it expects
(compare-and-swap on ``state_version``); a write against any other version fails and
changes nothing, so two writers can never both commit the same version and a node that
lost a race learns it is no longer authoritative (it then terminates its copy with
``ownership_conflict``: consistency over availability).

A record holds no key material in the clear. What a restarted gateway needs to resume the
session (its keys among it) travels in ``resume``: bytes sealed by the gateway (AEAD under
its state key, tunnel/ownership/statekey.py) that a store keeps without reading them.
Stores that outlive the process (:class:`ResumableStore`, ``persistent``) also take
:meth:`ResumableStore.refresh`: a new ``resume`` for the same version (counter blocks).

Misuse by local code (a record for another session id, a CAS that does not move the
version forward) raises ``ValueError``. A store that cannot answer raises
:class:`StoreUnavailable`; callers fail closed.
"""

from __future__ import annotations

import re
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Final, Protocol, runtime_checkable

SESSION_ID_HEX: Final = re.compile(r"[0-9a-f]{32}")
"""A session id as records carry it: 16 bytes (DESIGN D17) as lowercase hex."""

STATES: Final = ("BIRTH", "ATTACHED", "VOLATILE", "RECOVERING", "DEGRADED", "TERMINATED")
"""The session states a record may hold (tunnel.core.session.State values)."""


class StoreUnavailable(Exception):
    """The store could not be reached or did not answer in time (fail closed)."""


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """The authoritative, key-free record of one session."""

    session_id: str
    """Hex of the 16-byte session id."""
    state: str
    """Session state after the last committed transition (``ATTACHED`` ...)."""
    state_version: int
    """Version of that state; the CAS compares against it. Never goes backwards."""
    binding_epoch: int
    """Gateway binding epoch (DESIGN D3) at that version."""
    owner_node: str
    """Node id of the gateway that owns the session."""
    policy_version: str
    """Version of the policy the session runs under."""
    updated_ms: int
    """Wall-clock milliseconds of the write."""
    resume: bytes = field(default=b"", repr=False)
    """The sealed resume state (opaque to the store; empty: the session cannot resume)."""

    def __post_init__(self) -> None:
        if not isinstance(self.session_id, str) or not SESSION_ID_HEX.fullmatch(self.session_id):
            raise ValueError(f"session_id must be 32 lowercase hex digits, not {self.session_id!r}")
        if self.state not in STATES:
            raise ValueError(f"unknown session state {self.state!r}")
        for name in ("state_version", "binding_epoch", "updated_ms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, not {value!r}")
        if not self.owner_node:
            raise ValueError("owner_node must not be empty")
        if not isinstance(self.resume, bytes):
            raise ValueError("resume must be bytes")

    def evolve(self, **changes: object) -> SessionRecord:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)  # type: ignore[arg-type]


@runtime_checkable
class SessionStore(Protocol):
    """Where session records live. Every method is atomic with respect to the others."""

    def get(self, session_id: str) -> SessionRecord | None:
        """The current record, or None if there is none."""

    def create(self, record: SessionRecord) -> bool:
        """Store a new record; False (nothing written) if one exists for that session."""

    def cas(self, session_id: str, expected_version: int, new_record: SessionRecord) -> bool:
        """Replace the record iff its ``state_version`` is ``expected_version``.

        False (nothing written) when there is no record or its version differs.
        Raises ValueError when ``new_record`` names another session or does not move
        the version forward (``new_record.state_version <= expected_version``).
        """

    def delete(self, session_id: str, expected_version: int | None = None) -> bool:
        """Remove the record (iff at ``expected_version`` when given); False if not."""

    def __len__(self) -> int:
        """Records held."""


@runtime_checkable
class ResumableStore(SessionStore, Protocol):
    """A store that can carry a session's resume state across a restart of its gateway."""

    @property
    def persistent(self) -> bool:
        """True when the records outlive the process (a restarted gateway resumes them)."""

    def refresh(self, record: SessionRecord) -> bool:
        """Replace the record's ``resume`` (and ``updated_ms``) iff the stored record is at
        ``record.state_version`` and has the same owner: the same version, new resume state
        (a counter block reserved between two transitions). False (nothing written) if not."""

    def records(self) -> list[SessionRecord]:
        """Every record, in session-id order."""

    def batch(self) -> AbstractContextManager[None]:
        """A block whose writes are committed together at its end (or none of them:
        StoreUnavailable from the exit)."""


def check_cas_arguments(session_id: str, expected_version: int, new_record: SessionRecord) -> None:
    """The local-misuse checks every store applies before a CAS (raises ValueError)."""
    if new_record.session_id != session_id:
        raise ValueError(
            f"CAS on session {session_id} with a record of session {new_record.session_id}"
        )
    if new_record.state_version <= expected_version:
        raise ValueError(
            f"CAS on session {session_id} must move the version forward: "
            f"{expected_version} -> {new_record.state_version}"
        )
