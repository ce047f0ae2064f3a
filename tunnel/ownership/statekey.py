"""The state key: what seals the session keys a persistent store keeps (DESIGN D15a).

A file of its own (32 random bytes as 64 hex digits and a newline), mode 0600, never the
gateway's identity key. :func:`load_state_key` creates it on the first start when it is
missing (in a directory that is not readable by everyone) and refuses one that is readable
or writable by anyone but its owner, or that is not a 32-byte key.

:class:`StateSealer` seals a resume state for one session: a fresh 16-byte salt per write,
``HKDF-SHA256(state key, salt)`` a one-time key, ChaCha20-Poly1305 with the session id and
a format label as associated data (a blob cannot be moved to another session). A random
salt per write keeps the key space fresh however many writes there are (no nonce counter
to keep). Opening fails (None) for a blob of another key, session or format.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

STATE_KEY_LEN: Final = 32
SALT_LEN: Final = 16
FORMAT: Final = b"jvpn resume v1"
"""HKDF info and associated-data label: a blob of another format never opens."""
_ZERO_NONCE: Final = bytes(12)
"""Each one-time key seals exactly one message, so a fixed nonce is safe."""


class StateKeyError(Exception):
    """The state key file cannot be used (the message says why and what to do)."""


def load_state_key(path: Path, *, urandom: Callable[[int], bytes] = os.urandom) -> bytes:
    """The key in ``path``; created (0600) when the file does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return _create(path, urandom)
    except OSError as exc:
        raise StateKeyError(f"{path}: cannot read: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise StateKeyError(f"{path}: not a regular file")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise StateKeyError(
            f"{path}: the state key is accessible by other users (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
        )
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise StateKeyError(f"{path}: cannot read: {exc}") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != STATE_KEY_LEN:
        raise StateKeyError(f"{path}: not a state key ({2 * STATE_KEY_LEN} hex digits expected)")
    return key


def _create(path: Path, urandom: Callable[[int], bytes]) -> bytes:
    """Write a new key to a temporary file and link it into place.

    ``link`` is atomic and fails when the name exists, so two processes starting at once
    (gateway workers) never see a half-written key: the one that loses reads the winner's.
    """
    key = urandom(STATE_KEY_LEN)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise StateKeyError(f"{path}: cannot create: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(key.hex() + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.link(tmp, path)
    except FileExistsError:
        return load_state_key(path, urandom=urandom)
    except OSError as exc:
        raise StateKeyError(f"{path}: cannot create: {exc.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return key


class StateSealer:
    """Seals and opens resume states under one state key. Never prints the key."""

    __slots__ = ("_key", "_urandom")

    def __init__(self, key: bytes, *, urandom: Callable[[int], bytes] = os.urandom) -> None:
        if len(key) != STATE_KEY_LEN:
            raise ValueError(f"a state key is {STATE_KEY_LEN} bytes")
        self._key = key
        self._urandom = urandom

    def __repr__(self) -> str:
        return "StateSealer(<redacted>)"

    def _one_time(self, salt: bytes) -> ChaCha20Poly1305:
        hkdf = HKDF(algorithm=hashes.SHA256(), length=STATE_KEY_LEN, salt=salt, info=FORMAT)
        return ChaCha20Poly1305(hkdf.derive(self._key))

    def seal(self, session_id: str, plaintext: bytes) -> bytes:
        salt = self._urandom(SALT_LEN)
        aad = FORMAT + session_id.encode("ascii")
        return salt + self._one_time(salt).encrypt(_ZERO_NONCE, plaintext, aad)

    def open(self, session_id: str, blob: bytes) -> bytes | None:
        """The plaintext, or None when ``blob`` was not sealed for ``session_id`` with
        this key (or was altered)."""
        if len(blob) < SALT_LEN + 16:
            return None
        salt = blob[:SALT_LEN]
        aad = FORMAT + session_id.encode("ascii")
        try:
            return self._one_time(salt).decrypt(_ZERO_NONCE, blob[SALT_LEN:], aad)
        except InvalidTag:
            return None
