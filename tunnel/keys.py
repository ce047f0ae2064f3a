"""X25519 keys as WireGuard-style base64 text: parse, load from files, write key files.

A key file holds one line: the standard base64 (with padding) of the raw 32-byte key,
exactly what ``wg genkey`` / ``wg pubkey`` produce, so keys move freely between tools.

Every problem raises ``KeyFormatError`` (a ``ValueError``) with one line that names what
was being loaded (and the file) and what is wrong; no message ever contains key material.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.asymmetric import x25519

KEY_LEN: Final = 32
"""Raw X25519 key length."""

MAX_KEY_FILE: Final = 4096
"""A key file is one 44-character line; anything far larger is not a key file."""

_B64_KEY = re.compile(r"[A-Za-z0-9+/]{42,44}={0,2}")
"""Roughly the shape of a base64 key, to tell an inline key from a file path."""

_PROBE_PRIVATE = x25519.X25519PrivateKey.from_private_bytes(b"\x01" * KEY_LEN)
"""Any fixed scalar: exchanging with a low-order point gives all zeros, which
cryptography refuses; that is how unusable public keys are detected."""


class KeyFormatError(ValueError):
    """A key could not be read or is not a valid base64 X25519 key."""


def encode_key(key: bytes) -> str:
    """Base64 text of a raw 32-byte key (44 characters, as WireGuard writes it)."""
    if len(key) != KEY_LEN:
        raise KeyFormatError(f"key: expected {KEY_LEN} bytes, got {len(key)}")
    return base64.standard_b64encode(key).decode("ascii")


def decode_key(text: str | bytes, what: str) -> bytes:
    """Raw 32-byte key from its base64 text; ``what`` names it in the error message."""
    stripped = text.strip()
    if not stripped:
        raise KeyFormatError(f"{what}: empty")
    try:
        raw = base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError):
        raise KeyFormatError(f"{what}: not valid base64") from None
    if len(raw) != KEY_LEN:
        raise KeyFormatError(f"{what}: expected {KEY_LEN} bytes, got {len(raw)}")
    return raw


def check_public_key(key: bytes, what: str) -> bytes:
    """``key`` if it is a usable X25519 public key (not a low-order point, e.g. all zeros)."""
    try:
        _PROBE_PRIVATE.exchange(x25519.X25519PublicKey.from_public_bytes(key))
    except ValueError:
        raise KeyFormatError(f"{what}: not a usable X25519 public key") from None
    return key


def load_private_key(path: str | os.PathLike[str], what: str = "private key") -> bytes:
    """Raw private key from a key file (one base64 line)."""
    return decode_key(_read_key_file(Path(path), what), f"{what} file {path}")


def load_public_key(path_or_b64: str | os.PathLike[str], what: str = "public key") -> bytes:
    """Raw public key from a key file, or from the base64 key itself given inline.

    A string that names an existing file is read as a file; otherwise a string shaped
    like a base64 key is decoded as one; anything else is reported as a missing file.
    """
    text = os.fspath(path_or_b64)
    path = Path(text)
    if not path.exists() and _B64_KEY.fullmatch(text.strip()):
        return check_public_key(decode_key(text, what), what)
    label = f"{what} file {text}"
    return check_public_key(decode_key(_read_key_file(path, what), label), label)


def insecure_permissions(path: str | os.PathLike[str]) -> str | None:
    """A warning if a private key file is readable or writable by group or others."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return f"{os.fspath(path)} is accessible by other users (mode {mode & 0o777:04o})"
    return None


def write_private_key(path: str | os.PathLike[str], key: bytes, *, force: bool = False) -> None:
    """Write a private key file, mode 0600 from the moment it exists.

    Without ``force`` an existing file is never touched (O_EXCL). With ``force`` the key
    goes to a new 0600 file beside it that then replaces the old one atomically.
    """
    _write_key_file(Path(path), encode_key(key), 0o600, force=force)


def write_public_key(path: str | os.PathLike[str], key: bytes, *, force: bool = False) -> None:
    """Write a public key file (mode 0644); same overwrite rules as ``write_private_key``."""
    _write_key_file(Path(path), encode_key(key), 0o644, force=force)


def _read_key_file(path: Path, what: str) -> str:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_KEY_FILE + 1)
    except FileNotFoundError:
        raise KeyFormatError(f"{what} file {path}: no such file") from None
    except IsADirectoryError:
        raise KeyFormatError(f"{what} file {path}: is a directory") from None
    except OSError as exc:
        raise KeyFormatError(f"{what} file {path}: cannot read ({exc.strerror})") from None
    if len(data) > MAX_KEY_FILE:
        raise KeyFormatError(f"{what} file {path}: too large to be a key file")
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise KeyFormatError(f"{what} file {path}: not valid base64") from None


def _write_key_file(path: Path, text: str, mode: int, *, force: bool) -> None:
    data = (text + "\n").encode("ascii")
    target = path
    if force:
        target = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(target, flags, mode)
    try:
        os.fchmod(fd, mode)  # exact mode whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(target)
        raise
    os.close(fd)
    if force:
        try:
            os.replace(target, path)
        except BaseException:
            os.unlink(target)
            raise
