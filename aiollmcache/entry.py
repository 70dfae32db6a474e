"""Cache entries and their byte encoding.

An entry is an envelope: the provider's response plus the metadata needed to
decide freshness and to account for savings. Shared across processes, its
times are wall-clock (``time.time()``) seconds.

Encoding (never pickle)::

    b"\\xa1LC" | format version (1 byte) | flags (1 byte)
    | u32 header length | u32 CRC-32 of header and body
    | header (orjson array) | body (the response's JSON, maybe compressed)

The header carries the versions of openai and pydantic that validated the
response before it was written, the request's model and system prompt (what
invalidation by pattern matches on) and the answer's times and tags. An answer
that is not an ordinary one (truncated, tool calls: see
:class:`~aiollmcache.cache_policy.AnswerKind`) says so after the versions
(``"openai X; pydantic Y; kind=truncated"``), so a reader learns it without
scanning the body; a reader that does not know the suffix takes it for other
versions and validates the response, nothing worse. So does an answer of the
Responses API (``"; api=responses"``: a ``Response``, not a ``ChatCompletion``). It is
never compressed, so it can be read from the first bytes of a value without
the rest (:func:`read_header`, and the hot-key script in Redis).

The body is zlib-compressed (flag bit 0) when the entry is larger than the
compression threshold. Anything that does not decode to a valid entry for the
expected key raises :class:`CorruptEntryError`: the caller treats it as a miss.
"""

from __future__ import annotations

import enum
import struct
import zlib
from typing import TYPE_CHECKING, Any, Final

import openai
import orjson
import pydantic
from openai.types.chat import ChatCompletion
from openai.types.responses import Response
from pydantic import ValidationError

from .cache_policy import AnswerKind, classify, classify_raw
from .errors import CorruptEntryError

if TYPE_CHECKING:
    from .crypto import Sealer

__all__ = [
    "FORMAT_VERSION",
    "HEADER_PREFIX_BYTES",
    "MISSING",
    "Entry",
    "Header",
    "NotForThisCache",
    "decode_entry",
    "encode_entry",
    "read_header",
]

FORMAT_VERSION: Final = 3
_MAGIC: Final = b"\xa1LC"
_PREFIX: Final = _MAGIC + bytes([FORMAT_VERSION])
_FLAG_ZLIB: Final = 0x01
_FLAG_SEALED: Final = 0x02
_KNOWN_FLAGS: Final = _FLAG_ZLIB | _FLAG_SEALED
_SYSTEM_LEN = struct.Struct(">I")
_HEADER_LEN = struct.Struct(">II")  # header length, CRC-32 of header and body
_HEADER_START: Final = len(_PREFIX) + 1 + _HEADER_LEN.size
_ZLIB_LEVEL: Final = 1
# environment, key, created_at, fresh_until, expires_at, compute_ms, model,
# prompt and completion tokens, tags, system prompt: a JSON array, cheaper to
# check than an object.
_HEADER_FIELDS: Final = 11
# The versions that validated a response when it was written; an entry written
# under the same ones needs no validation to be read back.
_ENVIRONMENT: Final = f"openai {openai.__version__}; pydantic {pydantic.VERSION}"
_KINDS: Final = {kind.value: kind for kind in AnswerKind}
CHAT: Final = "chat"
RESPONSES: Final = "responses"
_APIS: Final = frozenset({CHAT, RESPONSES})
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
        "_kind",
        "_response",
        "_text",
        "api",
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
        "refused",
        "slid_until",
        "system",
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
        system: str = "",
        response: ChatCompletion | Response | None = None,
        kind: AnswerKind | None = None,
        api: str = CHAT,
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
        # The request's system (and developer) instructions, for invalidation by pattern.
        self.system = system
        self._response = response
        self._text: str | None = None
        # When this process refreshes it early: drawn on first use (policy.early_refresh_at).
        self.early_at: float | None = None
        # How long Redis keeps it, when that was extended past expires_at (hot keys).
        self.slid_until = 0.0
        self._kind = kind
        # Which API answered: "chat" (a ChatCompletion) or "responses" (a Response).
        self.api = api
        # Why the cache policy keeps this answer out of the cache (None: it may
        # be stored). Set on answers from the model; an entry read back was stored.
        self.refused: str | None = None

    @property
    def response(self) -> Any:
        """The ``ChatCompletion`` (or, for the Responses API, the ``Response``)."""
        response = self._response
        if response is None:
            model = Response if self.api == RESPONSES else ChatCompletion
            response = self._response = model.model_validate_json(self.raw)
        return response

    @property
    def kind(self) -> AnswerKind:
        """What the answer is for the cache policy (truncated, tool calls...)."""
        kind = self._kind
        if kind is None:
            response = self._response
            kind = self._kind = classify(response) if response is not None else classify_raw(self.raw)
        return kind

    @property
    def text(self) -> str:
        """The first choice's message content ('' when it has none)."""
        text = self._text
        if text is None:
            if self._response is not None:
                text = self._text_of(self._response)
            else:
                try:
                    body = orjson.loads(self.raw)
                    text = _output_text(body) if self.api == RESPONSES else _first_content(body)
                except orjson.JSONDecodeError:  # JSON pydantic reads but orjson does not (NaN)
                    text = self._text_of(self.response)
            self._text = text
        return text

    @staticmethod
    def _text_of(response: ChatCompletion | Response) -> str:
        if isinstance(response, Response):
            return response.output_text
        first = response.choices[0] if response.choices else None
        return (first.message.content or "") if first is not None else ""

    def age(self, now: float) -> float:
        return max(0.0, now - self.created_at)

    def __repr__(self) -> str:
        return f"Entry(key={self.key!r}, model={self.model!r}, size={len(self.raw)})"


def _output_text(body: dict[str, Any]) -> str:
    """What ``Response.output_text`` gives: the text of every output message."""
    texts = []
    for item in body.get("output") or ():
        if isinstance(item, dict) and item.get("type") == "message":
            for part in item.get("content") or ():
                if (
                    isinstance(part, dict)
                    and part.get("type") == "output_text"
                    and isinstance(part.get("text"), str)
                ):
                    texts.append(part["text"])
    return "".join(texts)


def _first_content(body: dict[str, Any]) -> str:
    choices = body.get("choices") or [{}]
    content = (choices[0].get("message") or {}).get("content")
    return content if isinstance(content, str) else ""


class NotForThisCache(CorruptEntryError):
    """A valid entry this cache must not read (sealed with another key, sealed
    without this cache having one, or not sealed when this cache requires
    it): a miss, but not to be deleted, as its writer can read it."""


def encode_entry(
    entry: Entry, *, compress_above: int, sealer: Sealer | None = None, context: bytes = b""
) -> bytes:
    """Encode ``entry``; the body is compressed when the entry is larger than
    ``compress_above`` bytes. With a ``sealer`` the body and the system prompt
    are encrypted (see :mod:`aiollmcache.crypto`), bound to the format, the
    flags, the header and ``context`` (where the entry is stored)."""
    environment = _ENVIRONMENT
    if entry.api != CHAT:
        environment += f"; api={entry.api}"
    if (kind := entry.kind) is not AnswerKind.ANSWER:
        environment += f"; kind={kind.value}"
    header = orjson.dumps(
        [
            environment,
            entry.key,
            entry.created_at,
            entry.fresh_until,
            entry.expires_at,
            entry.compute_ms,
            entry.model,
            entry.prompt_tokens,
            entry.completion_tokens,
            entry.tags,
            entry.system if sealer is None else "",
        ]
    )
    body, flags = entry.raw, 0
    if len(header) + len(body) > compress_above:
        body, flags = zlib.compress(body, _ZLIB_LEVEL), _FLAG_ZLIB
    if sealer is not None:
        system = entry.system.encode()
        flags |= _FLAG_SEALED
        associated = b"".join((_PREFIX, bytes([flags]), header, context))
        body = sealer.seal(_SYSTEM_LEN.pack(len(system)) + system + body, associated)
    checksum = zlib.crc32(body, zlib.crc32(header))
    return b"".join((_PREFIX, bytes([flags]), _HEADER_LEN.pack(len(header), checksum), header, body))


def _decompress(data: bytes | memoryview, limit: int) -> bytes:
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, limit)
    except zlib.error as exc:
        raise CorruptEntryError(f"bad compressed body: {exc}") from exc
    if inflater.unconsumed_tail or not inflater.eof:
        raise CorruptEntryError(f"compressed body truncated or larger than {limit} bytes")
    return out


def _split(blob: bytes) -> tuple[int, int, int]:
    """Check the fixed prefix; return (flags, header length, checksum)."""
    if not blob.startswith(_PREFIX):
        if blob.startswith(_MAGIC):
            raise CorruptEntryError(f"unsupported entry format version {blob[3:4]!r}")
        raise CorruptEntryError("not an aiollmcache entry")
    if len(blob) < _HEADER_START:
        raise CorruptEntryError("truncated entry")
    flags = blob[len(_PREFIX)]
    if flags & ~_KNOWN_FLAGS:
        raise CorruptEntryError(f"unknown flags {flags:#x}")
    header_len, checksum = _HEADER_LEN.unpack_from(blob, len(_PREFIX) + 1)
    return flags, header_len, checksum


def _fields(header: object, key: str | None) -> tuple[Any, ...]:
    if type(header) is not list or len(header) != _HEADER_FIELDS:
        raise CorruptEntryError("header is not a list of the expected fields")
    (env, stored_key, created, fresh_until, expires_at, compute_ms, model, pt, ct, tags, system) = header
    if key is not None and stored_key != key:
        raise CorruptEntryError("entry belongs to another key")
    if not (
        type(env) is str
        and type(stored_key) is str
        and type(created) in _NUMBER
        and type(fresh_until) in _NUMBER
        and type(expires_at) in _NUMBER
        and type(compute_ms) in _NUMBER
        and type(model) is str
        and type(pt) is int
        and type(ct) is int
        and type(tags) is list
        and (not tags or all(type(t) is str for t in tags))
        and type(system) is str
    ):
        raise CorruptEntryError("header fields of the wrong type")
    return tuple(header)


def decode_entry(
    blob: bytes, key: str, *, max_bytes: int, sealer: Sealer | None = None, context: bytes = b""
) -> Entry:
    """Decode bytes read at ``key``; raise :class:`CorruptEntryError` if invalid
    (and, with a ``sealer``, if not encrypted with its key; without one, if
    encrypted)."""
    flags, header_len, checksum = _split(blob)
    header_end = _HEADER_START + header_len
    if header_end > len(blob):
        raise CorruptEntryError("truncated header")
    view = memoryview(blob)
    if zlib.crc32(view[_HEADER_START:]) != checksum:
        raise CorruptEntryError("entry does not match its checksum")
    try:
        header = orjson.loads(view[_HEADER_START:header_end])
    except orjson.JSONDecodeError as exc:
        raise CorruptEntryError(f"bad header: {exc}") from exc
    (env, _, created, fresh_until, expires_at, compute_ms, model, pt, ct, tags, system) = _fields(header, key)
    body: bytes | memoryview = view[header_end:]
    if (sealer is not None) != bool(flags & _FLAG_SEALED):
        raise NotForThisCache(
            "entry is not encrypted, and this cache requires it"
            if sealer is not None
            else "entry is encrypted, and this cache has no encryption key"
        )
    if sealer is not None:
        associated = b"".join((blob[: len(_PREFIX) + 1], view[_HEADER_START:header_end], context))
        plain = sealer.open(bytes(body), associated)
        if len(plain) < _SYSTEM_LEN.size:
            raise CorruptEntryError("encrypted body truncated")
        (system_len,) = _SYSTEM_LEN.unpack_from(plain)
        body_start = _SYSTEM_LEN.size + system_len
        if body_start > len(plain):
            raise CorruptEntryError("encrypted body truncated")
        try:
            system = plain[_SYSTEM_LEN.size : body_start].decode()
        except UnicodeDecodeError:
            raise CorruptEntryError("encrypted system prompt is not UTF-8") from None
        body = memoryview(plain)[body_start:]
        raw = _decompress(body, max_bytes) if flags & _FLAG_ZLIB else bytes(body)
    else:
        # No copy of an uncompressed response but the one slice that keeps it.
        raw = _decompress(body, max_bytes) if flags & _FLAG_ZLIB else blob[header_end:]
    if len(raw) > max_bytes:
        raise CorruptEntryError(f"response larger than {max_bytes} bytes")
    response: ChatCompletion | Response | None = None
    kind, api = AnswerKind.ANSWER, CHAT
    while env != _ENVIRONMENT:
        base, _, suffix = env.rpartition("; ")
        name, _, value = suffix.partition("=")
        if name == "kind" and value in _KINDS:
            kind = _KINDS[value]
        elif name == "api" and value in _APIS:
            api = value
        else:
            break
        env = base
    if env != _ENVIRONMENT:
        # Written by other versions of openai or pydantic: validate now, not on
        # first use, so an entry this process cannot read is a miss.
        try:
            response = (Response if api == RESPONSES else ChatCompletion).model_validate_json(raw)
        except ValidationError as exc:
            raise CorruptEntryError(f"stored response is not a valid {api} response: {exc}") from exc
    return Entry(
        key=key,
        raw=raw,
        created_at=float(created),
        fresh_until=float(fresh_until),
        expires_at=float(expires_at),
        compute_ms=float(compute_ms),
        model=model,
        prompt_tokens=pt,
        completion_tokens=ct,
        tags=tuple(tags),
        system=system,
        response=response,
        kind=kind,
        api=api,
    )


class Header:
    """What an entry says about itself, read without its body (see :func:`read_header`)."""

    __slots__ = ("created_at", "encrypted", "expires_at", "key", "model", "system", "tags")

    def __init__(
        self,
        key: str,
        model: str,
        system: str,
        tags: tuple[str, ...],
        created_at: float,
        expires_at: float,
        encrypted: bool = False,
    ) -> None:
        self.key = key
        self.model = model
        self.system = system
        self.tags = tags
        self.created_at = created_at
        self.expires_at = expires_at
        # An encrypted entry's system prompt is not in its header.
        self.encrypted = encrypted


HEADER_PREFIX_BYTES: Final = _HEADER_START
"""How many bytes :func:`read_header` needs to learn the header's length."""


def read_header(prefix: bytes) -> Header | int:
    """The header of the entry whose value begins with ``prefix``, or the number
    of leading bytes needed to read it when ``prefix`` is shorter.

    The header is not checked against the checksum (that needs the whole
    value): good enough to decide what to invalidate, not to serve.
    Raises :class:`CorruptEntryError` for anything that is not an entry.
    """
    flags, header_len, _ = _split(prefix)
    header_end = _HEADER_START + header_len
    if header_end > len(prefix):
        return header_end
    try:
        header = orjson.loads(memoryview(prefix)[_HEADER_START:header_end])
    except orjson.JSONDecodeError as exc:
        raise CorruptEntryError(f"bad header: {exc}") from exc
    fields = _fields(header, None)
    return Header(
        key=fields[1],
        model=fields[6],
        system=fields[10],
        tags=tuple(fields[9]),
        created_at=float(fields[2]),
        expires_at=float(fields[4]),
        encrypted=bool(flags & _FLAG_SEALED),
    )
