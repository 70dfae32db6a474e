"""Encryption of stored answers (the ``encryption`` extra: ``cryptography``).

With ``LLMCache(encryption_key=...)`` every entry's answer and system prompt
are sealed with AES-GCM before they reach Redis, under a fresh 96-bit nonce
per entry, with the entry's header as associated data (so a header cannot be
swapped onto another entry's body). What stays readable in Redis: the key
(a hash), the model name, token counts, times and tags.
"""

from __future__ import annotations

import os
from typing import Final, Protocol

from .errors import ConfigurationError, CorruptEntryError

__all__ = ["AESGCMSealer", "Sealer"]

_NONCE_BYTES: Final = 12


class Sealer(Protocol):
    def seal(self, plaintext: bytes, associated: bytes) -> bytes: ...

    def open(self, sealed: bytes, associated: bytes) -> bytes:
        """The plaintext; :class:`CorruptEntryError` if it was not sealed
        with this key and these associated bytes."""
        ...


class AESGCMSealer:
    """AES-GCM with a 128, 192 or 256-bit key."""

    __slots__ = ("_aead", "_invalid")

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, (bytes, bytearray)) or len(key) not in (16, 24, 32):
            raise ConfigurationError("encryption_key: expected 16, 24 or 32 bytes (e.g. os.urandom(32))")
        try:
            from cryptography.exceptions import InvalidTag
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        except ImportError:
            raise ConfigurationError(
                "encryption_key needs the cryptography package: pip install 'aiollmcache[encryption]'"
            ) from None
        self._aead = AESGCM(bytes(key))
        self._invalid = InvalidTag

    def seal(self, plaintext: bytes, associated: bytes) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, associated)

    def open(self, sealed: bytes, associated: bytes) -> bytes:
        if len(sealed) < _NONCE_BYTES + 16:
            raise CorruptEntryError("encrypted body truncated")
        try:
            return self._aead.decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], associated)
        except self._invalid:
            raise CorruptEntryError("cannot decrypt the entry (another key, or altered)") from None
