"""Why a session never started, in one line a person can act on (docs/client.md).

:func:`handshake_explanation` turns what the engine knows when the handshake deadline
passed without a session into the line ``jvpn-tui --headless`` prints on stderr and the
UI's banner shows: the :class:`~tunnel.core.events.HandshakeFailure` of the
SESSION_TERMINATED event (what came back, as far as the client can tell), the
fingerprints of the client's public key and of the configured gateway key, and the errors
the kernel reported on the path sockets (an ICMP "port unreachable" is something the
client does know). Only public keys are fingerprinted; nothing secret is in the line.

:func:`cipher_explanation` is the line for a handshake that ended with
``cipher_mismatch``: the data ciphers this client offered and the ones the gateway allows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

from tunnel.core.ciphers import cipher_names
from tunnel.core.events import HandshakeFailure

NETWORK_ERRORS: Final[Mapping[str, str]] = {
    "ECONNREFUSED": "port unreachable (nothing listens there)",
    "EHOSTUNREACH": "host unreachable",
    "ENETUNREACH": "network unreachable",
    "EHOSTDOWN": "host down",
    "EACCES": "prohibited by a firewall",
    "EPERM": "prohibited by a local firewall",
}
"""What the errno names the kernel reports for a path mean to a person; any other errno
is shown by its name."""


def network_note(errors: Mapping[int, Sequence[str]]) -> str:
    """``; the network reported: path 1 port unreachable ...`` for the paths that had
    errors (path id -> errno names, most frequent first), or an empty string."""
    parts = [
        f"path {path_id} {', '.join(NETWORK_ERRORS.get(name, name) for name in names)}"
        for path_id, names in sorted(errors.items())
        if names
    ]
    return f"; the network reported: {'; '.join(parts)}" if parts else ""


def handshake_explanation(
    failure: HandshakeFailure,
    *,
    client_key: str,
    gateway_key: str,
    errors: Mapping[int, Sequence[str]] | None = None,
) -> str:
    """The line for a session that ended with ``handshake_failed``.

    ``client_key``: fingerprint of this client's public key (what the gateway's allow-list
    must hold); ``gateway_key``: fingerprint of the configured gateway public key;
    ``errors``: path id -> errno names the kernel reported on that path's socket.
    """
    if failure is HandshakeFailure.GATEWAY_UNDER_LOAD:
        line = (
            "the gateway answered with a cookie (it is under load) but no session followed: "
            "it is rate-limiting handshakes, or does not know this client's key "
            f"(fingerprint {client_key}); try again later"
        )
    elif failure is HandshakeFailure.UNVERIFIED_ANSWER:
        line = (
            "answers came back, but none verified with the configured gateway key "
            f"(fingerprint {gateway_key}): something else answers at the gateway's address, "
            "or the answers were forged or damaged"
        )
    else:
        line = (
            "no answer from the gateway on any path: it is down, blocked, or does not know "
            f"this client's key (fingerprint {client_key}); or its key is not the configured "
            f"gateway key (fingerprint {gateway_key})"
        )
    return line + network_note(errors or {})


def cipher_explanation(offer: Sequence[int], gateway: Sequence[int]) -> str:
    """The line for a session that ended with ``cipher_mismatch``: ``offer`` is what this
    client accepts (``ciphers`` in its configuration), ``gateway`` what the gateway allows
    or, when the gateway chose a cipher the client did not offer, what it chose."""
    allows = cipher_names(gateway) if gateway else "?"
    return (
        f"no data cipher in common with the gateway: this client accepts {cipher_names(offer)} "
        f"(ciphers in its configuration), the gateway allows {allows} (ciphers in its "
        "configuration); allow one of them on either side"
    )
