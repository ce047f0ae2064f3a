"""Session ownership (DESIGN D15): the SessionStore protocol and its embedded memory store."""

from tunnel.ownership.memory import MemorySessionStore
from tunnel.ownership.store import (
    SessionRecord,
    SessionStore,
    StoreUnavailable,
    check_cas_arguments,
)

__all__ = [
    "MemorySessionStore",
    "SessionRecord",
    "SessionStore",
    "StoreUnavailable",
    "check_cas_arguments",
]
