from __future__ import annotations

import struct
import zlib

import orjson
import pytest
from openai.types.chat import ChatCompletion

from aiollmcache import CorruptEntryError, Entry
from aiollmcache.cache_policy import AnswerKind
from aiollmcache.entry import (
    _ENVIRONMENT,
    FORMAT_VERSION,
    HEADER_PREFIX_BYTES,
    Header,
    decode_entry,
    encode_entry,
    read_header,
)

KEY = "0" * 32


def completion(content: str = "Hello", finish_reason: str = "stop") -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": finish_reason,
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
        }
    )


def entry(content: str = "Hello", finish_reason: str = "stop") -> Entry:
    raw = completion(content, finish_reason)
    return Entry(
        key=KEY,
        response=ChatCompletion.model_validate_json(raw),
        raw=raw,
        created_at=1000.0,
        fresh_until=2000.0,
        expires_at=3000.0,
        compute_ms=12.5,
        model="m",
        prompt_tokens=3,
        completion_tokens=5,
        tags=("a", "b"),
        system="You are terse.",
    )


@pytest.mark.parametrize("content", ["Hello", "x" * 50_000])
def test_round_trip(content: str) -> None:
    original = entry(content)
    blob = encode_entry(original, compress_above=8192)
    assert (len(blob) < len(original.raw)) == (len(content) > 8192)
    decoded = decode_entry(blob, KEY, max_bytes=1 << 20)
    fields = ("key", "raw", "created_at", "fresh_until", "expires_at", "compute_ms", "model", "tags")
    assert [getattr(decoded, f) for f in fields] == [getattr(original, f) for f in fields]
    assert (decoded.prompt_tokens, decoded.completion_tokens) == (3, 5)
    assert decoded.text == content
    assert decoded.response == original.response


def _header_blob(
    header: object, body: bytes = completion(), checksum: int | None = None, flags: int = 0
) -> bytes:
    h = orjson.dumps(header)
    crc = zlib.crc32(h + body) if checksum is None else checksum
    return b"\xa1LC" + bytes([FORMAT_VERSION, flags]) + struct.pack(">II", len(h), crc) + h + body


ENV = _ENVIRONMENT
GOOD_HEADER = [ENV, KEY, 1.0, 2.0, 3.0, 1.0, "m", 1, 1, [], "Be brief."]


def header_with(index: int, value: object) -> list[object]:
    header = list(GOOD_HEADER)
    header[index] = value
    return header


VALID = encode_entry(entry(), compress_above=1 << 20)


@pytest.mark.parametrize(
    ("blob", "reason"),
    [
        (b"", "not an aiollmcache entry"),
        (b"hello world", "not an aiollmcache entry"),
        (b"\x80\x04\x95pickle", "not an aiollmcache entry"),
        (orjson.dumps({"some": "json"}), "not an aiollmcache entry"),
        (b"\xa1LC" + bytes([FORMAT_VERSION + 1, 0]) + VALID[5:], "unsupported entry format version"),
        (VALID[:4], "truncated"),
        (VALID[:7], "truncated"),
        (VALID[:20], "truncated header"),
        (VALID[:-10], "checksum"),
        (VALID[:4] + b"\x80" + VALID[5:], "unknown flags"),
        (_header_blob(GOOD_HEADER, b"not zlib", flags=1), "bad compressed body"),
        (_header_blob(GOOD_HEADER, zlib.compress(completion())[:-4], flags=1), "truncated"),
        (_header_blob(GOOD_HEADER, zlib.compress(completion()), flags=1), None),
        (_header_blob(header_with(10, None)), "wrong type"),
        (_header_blob(GOOD_HEADER), None),
        (_header_blob(header_with(1, "f" * 32)), "another key"),
        (_header_blob(header_with(2, "yesterday")), "wrong type"),
        (_header_blob(header_with(7, True)), "wrong type"),
        (_header_blob(header_with(7, 1.5)), "wrong type"),
        (_header_blob(header_with(9, [1])), "wrong type"),
        (_header_blob(header_with(9, "tag")), "wrong type"),
        (_header_blob(header_with(0, None)), "wrong type"),
        (_header_blob(GOOD_HEADER, checksum=12345), "checksum"),
        (_header_blob([KEY, 1.0]), "expected fields"),
        (_header_blob({"k": KEY}), "expected fields"),
        # a response swapped, or a time changed, without the checksum's knowing
        (
            _header_blob(
                GOOD_HEADER, b'{"id": 1}', checksum=zlib.crc32(orjson.dumps(GOOD_HEADER) + completion())
            ),
            "checksum",
        ),
        (
            _header_blob(header_with(3, 9e9), checksum=zlib.crc32(orjson.dumps(GOOD_HEADER) + completion())),
            "checksum",
        ),
        # written under other versions of openai/pydantic: validated at once
        (_header_blob(["openai 0.0", *GOOD_HEADER[1:]]), None),
        (_header_blob(["openai 0.0", *GOOD_HEADER[1:]], b'{"id": 1}'), "not a valid chat response"),
    ],
)
def test_invalid_bytes_are_corrupt(blob: bytes, reason: str | None) -> None:
    if reason is None:  # the well-formed control cases decode
        decoded = decode_entry(blob, KEY, max_bytes=1 << 20)
        assert decoded.model == "m"
        assert decoded.response.choices[0].message.content == "Hello"
        return
    with pytest.raises(CorruptEntryError, match=reason):
        decode_entry(blob, KEY, max_bytes=1 << 20)


def test_decompression_is_bounded() -> None:
    bomb = _header_blob(GOOD_HEADER, zlib.compress(b"\0" * (4 << 20)), flags=1)
    with pytest.raises(CorruptEntryError, match="larger than"):
        decode_entry(bomb, KEY, max_bytes=1 << 20)


def test_same_versions_defer_building_the_response() -> None:
    decoded = decode_entry(VALID, KEY, max_bytes=1 << 20)
    assert decoded._response is None  # checksum and versions vouch for the bytes
    assert decoded.text == "Hello"
    assert decoded._response is None  # text needs no ChatCompletion
    assert decoded.response.usage is not None
    assert decoded.response is decoded.response  # built once, then shared


def test_text_survives_json_that_only_pydantic_reads() -> None:
    # pydantic accepts NaN/Infinity in a response; orjson does not.
    raw = completion().replace(b'"model":"m"', b'"model":"m","x_score":-Infinity')
    header = orjson.dumps(GOOD_HEADER)
    blob = b"\xa1LC" + bytes([FORMAT_VERSION, 0]) + struct.pack(">II", len(header), zlib.crc32(header + raw))
    decoded = decode_entry(blob + header + raw, KEY, max_bytes=1 << 20)
    assert decoded.text == "Hello"
    assert "Entry(" in repr(decoded)


@pytest.mark.parametrize("content", ["Hello", "x" * 50_000])
def test_header_reads_from_the_first_bytes(content: str) -> None:
    blob = encode_entry(entry(content), compress_above=8192)
    needed = read_header(blob[:HEADER_PREFIX_BYTES])
    assert isinstance(needed, int) and HEADER_PREFIX_BYTES < needed < 400  # the body is not needed
    header = read_header(blob[:needed])
    assert isinstance(header, Header)
    assert (header.key, header.model, header.system, header.tags) == (KEY, "m", "You are terse.", ("a", "b"))
    assert (header.created_at, header.expires_at) == (1000.0, 3000.0)


@pytest.mark.parametrize(
    "prefix", [b"", b"GET /", VALID[:4] + b"\x80" + VALID[5:], _header_blob(header_with(6, 7))]
)
def test_header_of_foreign_bytes_is_corrupt(prefix: bytes) -> None:
    with pytest.raises(CorruptEntryError):
        read_header(prefix)


def test_the_kind_of_answer_travels_in_the_header() -> None:
    cut = entry("Hel", finish_reason="length")
    decoded = decode_entry(encode_entry(cut, compress_above=8192), KEY, max_bytes=1 << 20)
    assert decoded.kind is AnswerKind.TRUNCATED
    assert decoded._response is None  # the suffix is not taken for other versions
    # An ordinary answer's header is what it always was: no suffix.
    plain = decode_entry(VALID, KEY, max_bytes=1 << 20)
    assert plain.kind is AnswerKind.ANSWER
    header_end = HEADER_PREFIX_BYTES + struct.unpack_from(">I", VALID, 5)[0]
    assert orjson.loads(VALID[HEADER_PREFIX_BYTES:header_end])[0] == _ENVIRONMENT
