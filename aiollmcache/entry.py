"""Cache entries and their byte encoding.

An entry is an envelope: the provider's response plus the metadata needed to
decide freshness and to account for savings. Shared across processes, its
times are wall-clock (``time.time()``) seconds.

Encoding (never pickle)::

    b"\\xa1LC" | format version (1 byte) | flags (1 byte) | payload
    payload = u32 header length | u32 CRC-32 of header and response
              | header (orjson array) | response (JSON bytes)

The header carries the versions of openai and pydantic that validated the
response before it was written.

The payload is zlib-compressed (flag bit 0) when it is larger than the
compression threshold. Anything that does not decode to a valid entry for the
expected key raises :class:`CorruptEntryError`: the caller treats it as a miss.
"""

from __future__ import annotations

import enum
import struct
import zlib
from typing import Any, Final

import openai
import orjson
import pydantic
from openai.types.chat import ChatCompletion
from pydantic import ValidationError

from .errors import CorruptEntryError

__all__ = ["FORMAT_VERSION", "MISSING", "Entry", "decode_entry", "encode_entry"]

FORMAT_VERSION: Final = 2
_MAGIC: Final = b"\xa1LC"
_PREFIX: Final = _MAGIC + bytes([FORMAT_VERSION])
_FLAG_ZLIB: Final = 0x01
_KNOWN_FLAGS: Final = _FLAG_ZLIB
_HEADER_LEN = struct.Struct(">II")  # header length, CRC-32 of header and response
_ZLIB_LEVEL: Final = 1
# environment, key, created_at, fresh_until, expires_at, compute_ms, model,
# prompt and completion tokens, tags: a JSON array, cheaper to check than an
# object.
_HEADER_FIELDS: Final = 10
# The versions that validated a response when it was written; an entry written
# under the same ones needs no validation to be read back.
_ENVIRONMENT: Final = f"openai {openai.__version__}; pydantic {pydantic.VERSION}"
_NUMBER: Final = (int, float)


class _Missing(enum.Enum):
    MISSING = "MISSING"

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


MISSING: Final = _Missing.MISSING
"""Returned by tiers for a miss; never ``None``, which could be a value."""


class Entry:
    """One cached answer with its metadata. Treat it as immutable.

    ``raw`` is the response's JSON as stored. ``response``, the parsed
    ``ChatCompletion``, is built on first use and then shared by every caller
    served from this entry (treat it as read-only); ``text`` is read straight
    from the JSON when the response has not been built. An entry read from
    Redis may defer building it only because its bytes are known good: they
    passed the entry's checksum and were validated, when written, by the same versions
    of openai and pydantic that would validate them now (see
    :func:`decode_entry`).
    """

    __slots__ = (
        "_response",
        "_text",
        "completion_tokens",
        "compute_ms",
        "created_at",
        "early_at",
        "expires_at",
        "fresh_until",
        "key",
        "model",
        "prompt_tokens",
        "raw",
        "slid_until",
        "tags",
    )

    def __init__(
        self,
        *,
        key: str,
        raw: bytes,
        created_at: float,
        fresh_until: float,
        expires_at: float,
        compute_ms: float,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        tags: tuple[str, ...] = (),
        response: ChatCompletion | None = None,
    ) -> None:
        self.key = key
        self.raw = raw
        self.created_at = created_at
        self.fresh_until = fresh_until
        self.expires_at = expires_at
        self.compute_ms = compute_ms
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.tags = tags
        self._response = response
        self._text: str | None = None
        # When this process refreshes it early: drawn on first use (policy.early_refresh_at).
        self.early_at: float | None = None
        # How long Redis keeps it, when that was extended past expires_at (hot keys).
        self.slid_until = 0.0

    @property
    def response(self) -> ChatCompletion:
        response = self._response
        if response is None:
            response = self._response = ChatCompletion.model_validate_json(self.raw)
        return response

    @property
    def text(self) -> str:
        """The first choice's message content ('' when it has none)."""
        text = self._text
        if text is None:
            if self._response is not None:
                text = self._text_of(self._response)
            else:
                try:
                    text = _first_content(orjson.loads(self.raw))
                except orjson.JSONDecodeError:  # JSON pydantic reads but orjson does not (NaN)
                    text = self._text_of(self.response)
            self._text = text
        return text

    @staticmethod
    def _text_of(response: ChatCompletion) -> str:
        first = response.choices[0] if response.choices else None
        return (first.message.content or "") if first is not None else ""

    def age(self, now: float) -> float:
        return max(0.0, now - self.created_at)

    def __repr__(self) -> str:
        return f"Entry(key={self.key!r}, model={self.model!r}, size={len(self.raw)})"


def _first_content(body: dict[str, Any]) -> str:
    choices = body.get("choices") or [{}]
    content = (choices[0].get("message") or {}).get("content")
    return content if isinstance(content, str) else ""


def encode_entry(entry: Entry, *, compress_above: int) -> bytes:
    """Encode ``entry``; the payload is compressed when above ``compress_above`` bytes."""
    header = orjson.dumps(
        [
            _ENVIRONMENT,
            entry.key,
            entry.created_at,
            entry.fresh_until,
            entry.expires_at,
            entry.compute_ms,
            entry.model,
            entry.prompt_tokens,
            entry.completion_tokens,
            entry.tags,
        ]
    )
    checksum = zlib.crc32(entry.raw, zlib.crc32(header))
    payload = _HEADER_LEN.pack(len(header), checksum) + header + entry.raw
    if len(payload) > compress_above:
        return _PREFIX + bytes([_FLAG_ZLIB]) + zlib.compress(payload, _ZLIB_LEVEL)
    return _PREFIX + b"\x00" + payload


def _decompress(data: bytes, limit: int) -> bytes:
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, limit)
    except zlib.error as exc:
        raise CorruptEntryError(f"bad compressed payload: {exc}") from exc
    if inflater.unconsumed_tail or not inflater.eof:
        raise CorruptEntryError(f"compressed payload truncated or larger than {limit} bytes")
    return out


def decode_entry(blob: bytes, key: str, *, max_bytes: int) -> Entry:
    """Decode bytes read at ``key``; raise :class:`CorruptEntryError` if invalid."""
    if not blob.startswith(_PREFIX):
        if blob.startswith(_MAGIC):
            raise CorruptEntryError(f"unsupported entry format version {blob[3:4]!r}")
        raise CorruptEntryError("not an aiollmcache entry")
    if len(blob) < 5:
        raise CorruptEntryError("truncated entry")
    flags = blob[4]
    if flags & ~_KNOWN_FLAGS:
        raise CorruptEntryError(f"unknown flags {flags:#x}")
    # Offsets into the payload, which is the blob itself when uncompressed
    # (no copy of the response until the one slice that keeps it).
    payload, start = (_decompress(blob[5:], max_bytes), 0) if flags & _FLAG_ZLIB else (blob, 5)
    if len(payload) < start + _HEADER_LEN.size:
        raise CorruptEntryError("truncated entry")
    header_len, checksum = _HEADER_LEN.unpack_from(payload, start)
    header_start = start + _HEADER_LEN.size
    header_end = header_start + header_len
    if header_end > len(payload):
        raise CorruptEntryError("truncated header")
    view = memoryview(payload)
    if zlib.crc32(view[header_start:]) != checksum:
        raise CorruptEntryError("entry does not match its checksum")
    try:
        header = orjson.loads(view[header_start:header_end])
    except orjson.JSONDecodeError as exc:
        raise CorruptEntryError(f"bad header: {exc}") from exc
    if type(header) is not list or len(header) != _HEADER_FIELDS:
        raise CorruptEntryError("header is not a list of the expected fields")
    (
        environment,
        stored_key,
        created,
        fresh_until,
        expires_at,
        compute_ms,
        model,
        ptokens,
        ctokens,
        tags,
    ) = header
    if stored_key != key:
        raise CorruptEntryError("entry belongs to another key")
    if not (
        type(environment) is str
        and type(created) in _NUMBER
        and type(fresh_until) in _NUMBER
        and type(expires_at) in _NUMBER
        and type(compute_ms) in _NUMBER
        and type(model) is str
        and type(ptokens) is int
        and type(ctokens) is int
        and type(tags) is list
        and (not tags or all(type(t) is str for t in tags))
    ):
        raise CorruptEntryError("header fields of the wrong type")
    raw = payload[header_end:]
    response = None
    if environment != _ENVIRONMENT:
        # Written by other versions of openai or pydantic: validate now, not on
        # first use, so an entry this process cannot read is a miss.
        try:
            response = ChatCompletion.model_validate_json(raw)
        except ValidationError as exc:
            raise CorruptEntryError(f"stored response is not a chat completion: {exc}") from exc
    return Entry(
        key=key,
        raw=raw,
        created_at=float(created),
        fresh_until=float(fresh_until),
        expires_at=float(expires_at),
        compute_ms=float(compute_ms),
        model=model,
        prompt_tokens=ptokens,
        completion_tokens=ctokens,
        tags=tuple(tags),
        response=response,
    )
