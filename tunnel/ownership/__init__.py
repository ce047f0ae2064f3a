"""Session ownership (DESIGN D15): the SessionStore protocol and its embedded stores (memory;
sqlite in tunnel/ownership/sqlite.py, imported where it is used)."""

from tunnel.ownership.memory import MemorySessionStore
from tunnel.ownership.store import (
    ResumableStore,
    SessionRecord,
    SessionStore,
    StoreUnavailable,
    check_cas_arguments,
)

__all__ = [
    "MemorySessionStore",
    "ResumableStore",
    "SessionRecord",
    "SessionStore",
    "StoreUnavailable",
    "check_cas_arguments",
]
