"""The client's exit codes as documented (docs/events.md, "Exit codes"), pinned as literals.

Tests compare a process's exit status with these, never with
``tunnel.client.engine.exit_code_for`` (the code under test). 0: operator stop;
3: ``engine_error: ...``; 10 + n: the session ended with the reason code of wire index n.
"""

from __future__ import annotations

from typing import Final

EXIT_CODES: Final[dict[str, int]] = {
    "operator_terminated": 0,
    "engine_error": 3,
    "handshake_failed": 11,
    "policy_denied": 33,
    "recovery_window_exceeded": 34,
    "transport_ttl_exceeded": 37,
    "degraded_timeout": 41,
    "ownership_conflict": 45,
    "gateway_lost_state": 75,  # D15c
    "gateway_shutdown": 76,
    "cipher_mismatch": 77,
}
"""final reason -> exit status, for the reasons the process tests end with."""


def documented_exit_code(final_reason: str) -> int:
    """The documented exit status for a final reason (``engine_error: <detail>`` -> 3)."""
    if final_reason.startswith("engine_error:"):
        return EXIT_CODES["engine_error"]
    return EXIT_CODES[final_reason]
