"""The client's session keys and their rotation clock (DESIGN D10).

``KeySchedule`` owns the ``SessionCipher`` the handshake produced and says when it rotates:
``rekey_after_s`` after the current generation became current (or sooner, at the next
timer pass, once it is worn out: ``SessionCipher.worn_out``, AES-256-GCM's usage bound in
either direction), unless our last rotation is still unconfirmed
(``SessionCipher.rekey`` refuses then, so no deadline is reported: the
peer's first datagram in the new phase confirms it and brings the deadline back). Its
``next_deadline()`` also covers the end of the previous generation's grace period.
"""

from __future__ import annotations

from tunnel.core.aead import SessionCipher, TrafficKeys
from tunnel.core.ciphers import DataCipher

__all__ = ["KeySchedule"]


class KeySchedule:
    """The session cipher (None before the handshake) and when it rotates."""

    def __init__(self) -> None:
        self.cipher: SessionCipher | None = None

    def install(
        self,
        keys: TrafficKeys,
        replay_window: int,
        now: float,
        suite: DataCipher = DataCipher.CHACHA20_POLY1305,
    ) -> SessionCipher:
        """The session cipher for the handshake's ``keys`` and negotiated ``suite`` (its
        rekeys keep the suite)."""
        self.cipher = SessionCipher(keys, replay_window=replay_window, now=now, suite=suite)
        return self.cipher

    def rotate_at(self, rekey_after_s: float) -> float | None:
        """When the current generation is due for rotation; None while none is possible."""
        cipher = self.cipher
        if cipher is None or cipher.rekey_pending:
            return None
        # key_age(now) = now - generation start, so the start is -key_age(0).
        return -cipher.key_age(0.0) + rekey_after_s

    def on_timer(self, now: float, rekey_after_s: float) -> int | None:
        """Rotate if due (the new phase, for the REKEY message), and drop the previous
        generation once its grace period is over."""
        cipher = self.cipher
        if cipher is None:
            return None
        at = self.rotate_at(rekey_after_s)
        due = at is not None and (now >= at or cipher.worn_out())
        rotated = due and cipher.rekey(now)
        cipher.discard_expired(now)
        return cipher.phase if rotated else None

    def next_deadline(self, rekey_after_s: float) -> float | None:
        cipher = self.cipher
        if cipher is None:
            return None
        times = [
            t for t in (self.rotate_at(rekey_after_s), cipher.next_deadline()) if t is not None
        ]
        return min(times) if times else None
