"""FakeOpenAI and RedisServer, driven by the real SDK and redis-py."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import numpy as np
import openai
import pytest
import redis.asyncio as aioredis

from aiollmcache.testing import FakeOpenAI, RedisServer

pytestmark = pytest.mark.asyncio


async def test_chat_completion_shape(fake: FakeOpenAI) -> None:
    client = fake.client()
    try:
        r = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], n=2)
        assert [c.message.content for c in r.choices] == ["Answer to: Hi"] * 2
        assert (
            r.usage is not None and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        )
        assert fake.calls("Hi") == 1 and fake.calls() == 1
        assert fake.requests[0]["n"] == 2
    finally:
        await client.close()


async def test_custom_reply_and_padding() -> None:
    async with FakeOpenAI(reply=lambda req: req["model"], answer_chars=10) as fake:
        client = fake.client()
        try:
            r = await client.chat.completions.create(model="abc", messages=[{"role": "user", "content": "x"}])
            assert r.choices[0].message.content == "abc       "
        finally:
            await client.close()


async def test_streaming_with_usage_ends_with_done(fake: FakeOpenAI) -> None:
    client = fake.client()
    try:
        stream = await client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "stream this"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "Answer to: stream this"
        assert chunks[0].choices[0].delta.role == "assistant"
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes == ["stop"]
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
    finally:
        await client.close()


async def test_raw_sse_framing(fake: FakeOpenAI) -> None:
    client = fake.client()
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "a"}], stream=True
        )
        body = b"".join([b async for b in raw.http_response.aiter_bytes()])
        events = body.split(b"\n\n")
        assert events[-1] == b"" and events[-2] == b"data: [DONE]"
        # role, one chunk per word of "Answer to: a", finish reason, [DONE]
        assert len(events[:-1]) == 6 and all(e.startswith(b"data: ") for e in events[:-1])
    finally:
        await client.close()


@pytest.mark.parametrize("encoding", ["float", "base64"])
async def test_embeddings_both_encodings(fake: FakeOpenAI, encoding: str) -> None:
    client = fake.client()
    try:
        r = await client.embeddings.create(
            model="e",
            input=["What is the capital of France?", "capital of France?", "banana bread"],
            encoding_format=encoding,  # type: ignore[arg-type]
        )
        if encoding == "base64":  # asked for explicitly, the SDK hands it over undecoded
            vectors = np.array([np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in r.data])  # type: ignore[arg-type]
        else:
            vectors = np.array([d.embedding for d in r.data])
        assert vectors.shape == (3, fake.dimensions)
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]
        assert fake.embedding_calls == 1
    finally:
        await client.close()


async def test_sdk_default_base64_embeddings_match_float(fake: FakeOpenAI) -> None:
    client = fake.client()
    try:
        default = await client.embeddings.create(model="e", input="hello world")
        floats = await client.embeddings.create(model="e", input="hello world", encoding_format="float")
        assert np.allclose(default.data[0].embedding, floats.data[0].embedding, atol=1e-6)
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("status", "error"),
    [(400, openai.BadRequestError), (429, openai.RateLimitError), (500, openai.InternalServerError)],
)
async def test_failure_injection(fake: FakeOpenAI, status: int, error: type[Exception]) -> None:
    client = fake.client()
    try:
        fake.fail(status, prompt="x", times=2)
        for _ in range(2):
            with pytest.raises(error):
                await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        ok = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        assert ok.choices[0].message.content == "Answer to: x"
        other = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "y"}])
        assert other.choices
    finally:
        await client.close()


async def test_hang_makes_the_client_time_out(fake: FakeOpenAI) -> None:
    client = fake.client(timeout=0.2)
    try:
        fake.hang(prompt="slow")
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "slow"}])
    finally:
        await client.close()


async def test_latency_is_applied(fake: FakeOpenAI) -> None:
    client = fake.client()
    try:
        fake.latency = 0.2
        loop = asyncio.get_running_loop()
        started = loop.time()
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "lat"}])
        assert loop.time() - started >= 0.2
    finally:
        await client.close()


async def test_bad_requests_get_400(fake: FakeOpenAI) -> None:
    client = fake.client()
    try:
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="m", messages=[])
    finally:
        await client.close()


async def test_redis_server_starts_on_a_free_port_and_stops() -> None:
    with RedisServer() as a, RedisServer() as b:
        assert a.port != b.port
        r = aioredis.Redis.from_url(a.url)
        try:
            assert await r.ping()
        finally:
            await r.aclose()
    r = aioredis.Redis.from_url(a.url, socket_connect_timeout=0.5)
    try:
        with pytest.raises(Exception, match=r"(?i)connect"):
            await r.ping()
    finally:
        await r.aclose()


async def test_malformed_requests_get_400_not_500(fake: FakeOpenAI) -> None:
    import httpx2

    async with httpx2.AsyncClient(base_url=fake.url) as http:
        for body in (
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "n": "2"},
            {
                "model": "m",
                "messages": [{"role": "user", "content": "x"}],
                "stream": True,
                "stream_options": True,
            },
            {"model": "m", "messages": ["not an object"]},
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
        ):
            response = await http.post("/v1/chat/completions", json=body)
            assert response.status_code in (200, 400), (body, response.text)
            if response.status_code == 200:
                assert body["messages"][0]["content"][0]["text"] == 5  # type: ignore[index]


async def test_failure_injection_arguments_are_checked(fake: FakeOpenAI) -> None:
    with pytest.raises(ValueError, match="times"):
        fake.fail(500, times=0)
    with pytest.raises(ValueError, match="status"):
        fake.fail(200)
    with pytest.raises(ValueError, match="times"):
        fake.hang(times=0)


async def test_redis_server_that_never_gets_ready_is_killed(tmp_path: Path) -> None:
    server = RedisServer(args=("--logfile", str(tmp_path / "redis.log")))
    with pytest.raises(RuntimeError, match="did not start"):
        server.start(timeout=1.0)
    assert server._proc is None
