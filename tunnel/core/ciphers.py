"""The data cipher of a session, and how the two sides agree on it in the handshake.

DATA and CONTROL datagrams are sealed with one of two AEADs (``DataCipher``), both with a
32-byte key, a 12-byte nonce (4 zero bytes + the 64-bit counter) and a 16-byte tag, so
the datagram layout is the same for both:

- ``aes-256-gcm``: the fastest on CPUs with AES instructions (AES-NI, ARMv8 AES);
- ``chacha20-poly1305``: constant-time in software everywhere; the fallback, and what a
  peer that predates the negotiation speaks.

Negotiation (docs/wire-format.md, "Data cipher"): the client lists the ciphers it accepts,
in its order of preference, in the payload of Noise message 1 (``InitPayload.ciphers``);
the gateway picks the first one of that list its own configuration allows
(:func:`choose`) and names it in the payload of message 2 (``RespPayload.ciphers``), or
refuses the handshake with ``cipher_mismatch`` when there is none. Both payloads are
encrypted and authenticated by Noise, and the handshake hash covers them, so an attacker
on the path can neither remove a cipher from the offer nor change the choice: a downgrade
needs the static key of one side. The client also checks that the choice was in its
offer (:func:`accepted_choice`).

An INIT without the extension comes from a client that predates it: it offers
ChaCha20-Poly1305 only (``LEGACY``); a response without it chose ChaCha20-Poly1305.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from enum import IntEnum
from typing import Final

__all__ = [
    "ALL_CIPHERS",
    "LEGACY",
    "CipherNameError",
    "DataCipher",
    "accepted_choice",
    "choose",
    "cipher_names",
    "default_offer",
    "parse_cipher_names",
]


class DataCipher(IntEnum):
    """An AEAD for DATA and CONTROL datagrams; the value is its wire code (u8)."""

    CHACHA20_POLY1305 = 1
    AES_256_GCM = 2

    @property
    def label(self) -> str:
        """The name in configuration files, events, status and the UI."""
        return _LABELS[self]

    @classmethod
    def from_label(cls, name: str) -> DataCipher:
        """The cipher named ``name`` (``"aes-256-gcm"``...); ``CipherNameError`` if none."""
        for cipher, label in _LABELS.items():
            if label == name:
                return cipher
        raise CipherNameError(f"unknown cipher {name!r} (known: {', '.join(_LABELS.values())})")


_LABELS: Final = {
    DataCipher.CHACHA20_POLY1305: "chacha20-poly1305",
    DataCipher.AES_256_GCM: "aes-256-gcm",
}

ALL_CIPHERS: Final[tuple[DataCipher, ...]] = (DataCipher.AES_256_GCM, DataCipher.CHACHA20_POLY1305)
"""Every cipher this build speaks, fastest first (on a CPU with AES instructions)."""

LEGACY: Final[tuple[DataCipher, ...]] = (DataCipher.CHACHA20_POLY1305,)
"""What a peer without the cipher extension speaks."""


class CipherNameError(ValueError):
    """A configured cipher name that is not one of ``DataCipher``'s labels."""


def default_offer(cpu_has_aes: bool) -> tuple[DataCipher, ...]:
    """The client's order when its configuration names none: AES-256-GCM first where the
    CPU has AES instructions, ChaCha20-Poly1305 first where it has not (AES in software
    is slower, and not constant-time)."""
    return ALL_CIPHERS if cpu_has_aes else tuple(reversed(ALL_CIPHERS))


def parse_cipher_names(names: Iterable[str]) -> tuple[DataCipher, ...]:
    """Configured names -> ciphers, in order; an unknown name, a repeated one or an empty
    list is ``CipherNameError``."""
    out = tuple(DataCipher.from_label(name) for name in names)
    if not out:
        raise CipherNameError("at least one cipher is needed")
    if len(set(out)) != len(out):
        raise CipherNameError("a cipher is named twice")
    return out


def cipher_names(ciphers: Iterable[int]) -> str:
    """``"aes-256-gcm, chacha20-poly1305"`` for messages; unknown codes as ``#n``."""
    return ", ".join(
        DataCipher(c).label if c in DataCipher._value2member_map_ else f"#{c}" for c in ciphers
    )


def choose(offer: Sequence[int], allowed: Iterable[DataCipher]) -> DataCipher | None:
    """The gateway's choice: the first cipher of the client's ``offer`` (wire codes, in its
    order of preference; empty: a client without the extension, ``LEGACY``) that
    ``allowed`` holds; None when they have none in common. Codes this build does not
    know are skipped."""
    permitted = set(allowed)
    for code in offer or LEGACY:
        if code in DataCipher._value2member_map_ and DataCipher(code) in permitted:
            return DataCipher(code)
    return None


def accepted_choice(chosen: Sequence[int], offer: Sequence[DataCipher]) -> DataCipher | None:
    """The client's check of the gateway's answer: ``chosen`` (the codes in an accepting
    response; empty: a gateway without the extension, which speaks ``LEGACY``) must be
    exactly one cipher of our ``offer``; None otherwise (the session must not start)."""
    codes = tuple(chosen) or LEGACY
    if len(codes) != 1:
        return None
    code = codes[0]
    return DataCipher(code) if code in {c.value for c in offer} else None
