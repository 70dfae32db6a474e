"""No pickle; keys that reveal no prompt; encrypted answers; Redis ACL users and TLS."""

from __future__ import annotations

import ast
import datetime
import os
from collections.abc import Callable
from pathlib import Path

import openai
import orjson
import pytest

from aiollmcache import ConfigurationError, CorruptEntryError, LLMCache, Pattern
from aiollmcache.crypto import AESGCMSealer
from aiollmcache.entry import decode_entry, encode_entry
from aiollmcache.testing import FakeOpenAI, RedisServer

from .conftest import MODEL, AnyRedis, all_keys, user

PACKAGE = Path(__file__).resolve().parent.parent / "aiollmcache"
SECRET = "my card number is 4111-1111-1111-1111"
SYSTEM = "You are the assistant of patient 7734."


def test_nothing_in_the_package_can_unpickle() -> None:
    unsafe = {"pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle"}
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            assert not unsafe.intersection(names), f"{path.name} imports {names}"


@pytest.mark.asyncio
async def test_keys_and_channels_reveal_no_prompt_text(
    make_cache: Callable[..., LLMCache], redis_server: AnyRedis, namespace: str
) -> None:
    cache = make_cache()
    await cache.complete([{"role": "system", "content": SYSTEM}, *user(SECRET)])
    admin = redis_server.client()
    try:
        names = [k.decode() for k in await all_keys(admin, f"alc:{namespace}:*")]
        names += [c.decode() for c in await admin.pubsub_channels(f"alc:{namespace}:*")]
    finally:
        await admin.aclose()
    assert names
    for name in names:
        assert "4111" not in name and "patient" not in name and "card" not in name


# -- encryption -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_encrypted_answers_are_shared_and_unreadable_in_redis(
    make_cache: Callable[..., LLMCache], redis_server: AnyRedis, namespace: str, fake: FakeOpenAI
) -> None:
    key = os.urandom(32)
    writer, reader = make_cache(encryption_key=key), make_cache(encryption_key=key, memory_max_entries=0)
    messages = [{"role": "system", "content": SYSTEM}, *user(SECRET)]
    first = await writer.complete(messages)
    hit = await reader.complete(messages)
    assert (hit.source, hit.text) == ("redis", first.text)
    assert SECRET in first.text  # the fake model repeats the question
    admin = redis_server.client()
    try:
        stored = await admin.get(f"alc:{namespace}:0:e:{{{first.key}}}")
    finally:
        await admin.aclose()
    assert stored is not None
    # (Whole phrases: the header's times are plain digits, which may hold "4111".)
    assert b"4111-1111" not in stored and b"patient" not in stored and b"card number" not in stored
    assert fake.calls() == 1


@pytest.mark.asyncio
async def test_entries_under_another_key_or_none_are_misses(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI
) -> None:
    encrypted = make_cache(encryption_key=b"k" * 32)
    other_key = make_cache(encryption_key=b"o" * 32, memory_max_entries=0)
    plain = make_cache(memory_max_entries=0)
    await encrypted.complete(user("sealed"))
    assert (await other_key.complete(user("sealed"))).source == "upstream"
    assert other_key.stats()["corrupt_entries"] == 1
    await plain.complete(user("open"))
    assert (await encrypted.complete(user("open"))).source == "upstream"  # plaintext: refused
    assert encrypted.stats()["corrupt_entries"] + encrypted.stats()["lease_corrupt"] >= 1
    assert fake.calls() == 4


def test_a_header_moved_onto_another_body_does_not_decrypt() -> None:
    from .test_entry import entry

    sealer = AESGCMSealer(b"k" * 16)
    blob = encode_entry(entry(), compress_above=1 << 20, sealer=sealer)
    assert decode_entry(blob, entry().key, max_bytes=1 << 20, sealer=sealer).system == "You are terse."
    # Change the model in the header and fix the CRC: only the AEAD notices.
    import struct
    import zlib

    header_len = struct.unpack_from(">I", blob, 5)[0]
    header = orjson.loads(blob[13 : 13 + header_len])
    header[6] = "another-model"
    new_header = orjson.dumps(header)
    body = blob[13 + header_len :]
    forged = blob[:5] + struct.pack(">II", len(new_header), zlib.crc32(new_header + body)) + new_header + body
    with pytest.raises(CorruptEntryError, match="cannot decrypt"):
        decode_entry(forged, entry().key, max_bytes=1 << 20, sealer=sealer)


@pytest.mark.asyncio
async def test_encryption_settings_are_checked() -> None:
    with pytest.raises(ConfigurationError, match="16, 24 or 32 bytes"):
        LLMCache(encryption_key=b"short")


@pytest.mark.asyncio
async def test_a_system_pattern_retires_encrypted_entries_it_cannot_read(
    make_cache: Callable[..., LLMCache], redis_server: AnyRedis
) -> None:
    sealed = make_cache(encryption_key=b"k" * 32, memory_max_entries=0)
    keyless = make_cache(memory_max_entries=0)  # e.g. the CLI, which has no key
    await sealed.complete([{"role": "system", "content": SYSTEM}, *user("q")])
    await sealed.complete([{"role": "system", "content": "other"}, *user("q")], model="other-model")
    # The system prompt is sealed: every sealed entry whose other fields match
    # goes (too many rather than a stale one kept).
    assert await keyless.invalidate(pattern=Pattern(system_contains="patient", model=MODEL)) == 1
    assert await sealed.invalidate(pattern=Pattern(system_contains="nothing like it")) == 1
    assert (await sealed.complete([{"role": "system", "content": SYSTEM}, *user("q")])).source == "upstream"


# -- Redis ACL users and TLS -----------------------------------------------------------


@pytest.mark.asyncio
async def test_an_acl_user_with_a_password(openai_client: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    acl = ("--user", "app", "on", ">s3cret", "~*", "&*", "+@all", "--user", "default", "off")
    with RedisServer(args=acl) as server:
        url = server.url.replace("redis://", "redis://app:s3cret@")
        async with LLMCache(redis_url=url, openai=openai_client, model=MODEL) as writer:
            await writer.complete(user("acl"))
        async with LLMCache(redis_url=url, openai=openai_client, model=MODEL) as reader:
            assert (await reader.complete(user("acl"))).source == "redis"
        wrong = url.replace("s3cret", "wrong")
        async with LLMCache(redis_url=wrong, openai=openai_client, model=MODEL) as refused:
            assert (await refused.complete(user("acl"))).source == "upstream"  # answered all the same
            assert refused.stats()["redis_errors"] >= 1


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    files = {"cert": tmp_path / "redis.crt", "key": tmp_path / "redis.key"}
    files["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return files


@pytest.mark.asyncio
async def test_rediss_with_a_verified_certificate(
    tls_files: dict[str, Path], openai_client: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    from aiollmcache.testing import _free_port

    tls_port = _free_port()
    args = ("--tls-port", str(tls_port), "--tls-cert-file", str(tls_files["cert"]))
    args += ("--tls-key-file", str(tls_files["key"]), "--tls-ca-cert-file", str(tls_files["cert"]))
    args += ("--tls-auth-clients", "no")
    with RedisServer(args=args):
        url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={tls_files['cert']}"
        async with LLMCache(redis_url=url, openai=openai_client, model=MODEL) as writer:
            await writer.complete(user("tls"))
        async with LLMCache(redis_url=url, openai=openai_client, model=MODEL) as reader:
            assert (await reader.complete(user("tls"))).source == "redis"
            assert reader.stats()["redis_errors"] == 0


def test_flags_header_and_place_are_all_bound_to_the_sealed_body() -> None:
    import struct
    import zlib

    from aiollmcache.entry import NotForThisCache

    from .test_entry import entry

    sealer = AESGCMSealer(b"k" * 16)
    big = entry("x" * 20_000)  # compressed, then sealed
    blob = encode_entry(big, compress_above=8192, sealer=sealer, context=b"alc:n:0:e:{k}")
    assert decode_entry(blob, big.key, max_bytes=1 << 20, sealer=sealer, context=b"alc:n:0:e:{k}").text
    # The compression flag cleared, with a CRC to match: refused, not served raw.
    flipped = blob[:4] + bytes([blob[4] & ~0x01]) + blob[5:]
    rest = flipped[13:]
    flipped = flipped[:9] + struct.pack(">I", zlib.crc32(rest)) + rest
    with pytest.raises(CorruptEntryError):
        decode_entry(flipped, big.key, max_bytes=1 << 20, sealer=sealer, context=b"alc:n:0:e:{k}")
    # Copied to another place (another namespace version): refused.
    with pytest.raises(CorruptEntryError, match="cannot decrypt"):
        decode_entry(blob, big.key, max_bytes=1 << 20, sealer=sealer, context=b"alc:n:1:e:{k}")
    # Another key: not this cache's entry, told apart from a damaged one.
    with pytest.raises(NotForThisCache, match="another key"):
        decode_entry(
            blob, big.key, max_bytes=1 << 20, sealer=AESGCMSealer(b"o" * 16), context=b"alc:n:0:e:{k}"
        )
