"""Encryption of stored answers (the ``encryption`` extra: ``cryptography``).

With ``LLMCache(encryption_key=...)`` every entry's answer and system prompt
are sealed with AES-GCM before they reach Redis, under a fresh 96-bit nonce
per entry. The associated data is the entry's format, flags and header and
the Redis key it is stored at (namespace, version, hash): none of them can be
changed, nor the sealed body moved to another key, without the read failing.
A sealed body starts with a 4-byte id of the key (a keyed hash, not the key),
so an entry sealed under another key is told apart from a damaged one.
"""

from __future__ import annotations

import os
from hashlib import blake2b
from typing import Final, Protocol

from .entry import NotForThisCache
from .errors import ConfigurationError, CorruptEntryError

__all__ = ["AESGCMSealer", "Sealer"]

_NONCE_BYTES: Final = 12
_KEY_ID_BYTES: Final = 4


class Sealer(Protocol):
    def seal(self, plaintext: bytes, associated: bytes) -> bytes: ...

    def open(self, sealed: bytes, associated: bytes) -> bytes:
        """The plaintext; :class:`CorruptEntryError` if it was not sealed
        with this key and these associated bytes."""
        ...


class AESGCMSealer:
    """AES-GCM with a 128, 192 or 256-bit key."""

    __slots__ = ("_aead", "_invalid", "key_id")

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
        self.key_id = blake2b(b"aiollmcache key id", key=bytes(key), digest_size=_KEY_ID_BYTES).digest()

    def seal(self, plaintext: bytes, associated: bytes) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return self.key_id + nonce + self._aead.encrypt(nonce, plaintext, associated)

    def open(self, sealed: bytes, associated: bytes) -> bytes:
        if len(sealed) < _KEY_ID_BYTES + _NONCE_BYTES + 16:
            raise CorruptEntryError("encrypted body truncated")
        if sealed[:_KEY_ID_BYTES] != self.key_id:
            raise NotForThisCache("entry is encrypted with another key")
        nonce_end = _KEY_ID_BYTES + _NONCE_BYTES
        try:
            return self._aead.decrypt(sealed[_KEY_ID_BYTES:nonce_end], sealed[nonce_end:], associated)
        except self._invalid:
            raise CorruptEntryError("cannot decrypt the entry (another key, or altered)") from None
