"""Streams: shared while in flight (in a process and across processes),
stored only when they end well, replayed from the cache."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from openai.types.chat import ChatCompletionChunk

from aiollmcache import CacheControl, InvalidRequestError, LLMCache, StreamInterruptedError
from aiollmcache.testing import FakeOpenAI

from .conftest import MODEL, AnyRedis, user
from .test_invalidation import CacheWorker

pytestmark = [pytest.mark.asyncio, pytest.mark.both_redis]

PROMPT = "Tell me a long story about a fox who learns to read"
ANSWER = f"Answer to: {PROMPT}"


async def read(stream: Any) -> tuple[str, list[ChatCompletionChunk]]:
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


@pytest.mark.parametrize("with_redis", [True, False], ids=["redis", "memory-only"])
async def test_fifty_identical_streams_cost_one_upstream_call(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI, with_redis: bool
) -> None:
    fake.chunk_latency = 0.005
    cache = make_cache(**({} if with_redis else {"redis_url": None}))
    streams = [cache.stream(user(PROMPT)) for _ in range(50)]
    results = await asyncio.gather(*(read(s) for s in streams))
    assert fake.calls(PROMPT) == 1
    assert {text for text, _ in results} == {ANSWER}
    first = [c.model_dump() for c in results[0][1]]
    assert all([c.model_dump() for c in chunks] == first for _, chunks in results)  # same chunks, same order
    assert results[0][1][-1].choices[0].finish_reason == "stop"
    assert [s.coalesced for s in streams].count(False) == 1
    assert {str(s.source) for s in streams} == {"upstream"}
    # Stored whole: complete() of the same request is a hit.
    again = await cache.complete(user(PROMPT))
    assert again.source == "memory" and again.text == ANSWER
    assert fake.calls(PROMPT) == 1


async def test_a_stored_answer_is_replayed_as_chunks(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI, redis_server: AnyRedis
) -> None:
    cache = make_cache()
    live_text, live = await read(cache.stream(user(PROMPT), stream_options={"include_usage": True}))
    assert live[-1].usage is not None
    replayed = cache.stream(user(PROMPT), stream_options={"include_usage": True})
    text, chunks = await read(replayed)
    assert replayed.source == "memory"
    assert text == live_text == ANSWER
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # not one lump
    assert chunks[-1].usage == live[-1].usage
    assert chunks[0].id == live[0].id
    # Without include_usage, no usage chunk; from Redis in another cache.
    other = make_cache()
    from_redis = other.stream(user(PROMPT))
    text, chunks = await read(from_redis)
    assert from_redis.source == "redis" and text == ANSWER
    assert all(c.choices for c in chunks)
    # And a whole answer is replayed as a stream too.
    whole = await cache.complete(user("a question asked whole"))
    text, _ = await read(cache.stream(user("a question asked whole")))
    assert text == whole.text
    assert fake.calls(PROMPT) == 1


async def test_a_follower_joining_late_gets_the_backlog_first(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI
) -> None:
    fake.chunk_latency = 0.02
    cache = make_cache()
    leader = cache.stream(user(PROMPT))
    first = await leader.__anext__()
    second = await leader.__anext__()
    follower = cache.stream(user(PROMPT))
    text, chunks = await read(follower)
    assert follower.coalesced
    assert chunks[0].model_dump() == first.model_dump()
    assert chunks[1].model_dump() == second.model_dump()
    assert text == ANSWER
    rest, _ = await read(leader)
    assert (second.choices[0].delta.content or "") + rest == ANSWER
    assert fake.calls(PROMPT) == 1


async def test_a_leader_that_leaves_does_not_break_its_followers(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI
) -> None:
    fake.chunk_latency = 0.02
    cache = make_cache()
    leader = cache.stream(user(PROMPT))
    await leader.__anext__()
    followers = [asyncio.create_task(read(cache.stream(user(PROMPT)))) for _ in range(5)]
    await asyncio.sleep(0)
    await leader.close()  # the first caller goes away
    results = await asyncio.gather(*followers)
    assert {text for text, _ in results} == {ANSWER}
    assert fake.calls(PROMPT) == 1
    assert (await cache.complete(user(PROMPT))).source == "memory"


async def test_a_cancelled_leader_task_does_not_break_its_followers(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI
) -> None:
    fake.chunk_latency = 0.02
    cache = make_cache()
    got_one = asyncio.Event()

    async def leader() -> None:
        async for _ in cache.stream(user(PROMPT)):
            got_one.set()

    task = asyncio.create_task(leader())
    await got_one.wait()
    follower = asyncio.create_task(read(cache.stream(user(PROMPT))))
    await asyncio.sleep(0)
    task.cancel()
    text, _ = await follower
    assert text == ANSWER
    assert fake.calls(PROMPT) == 1


async def test_when_every_reader_leaves_the_stream_stops_and_nothing_is_cached(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI
) -> None:
    fake.chunk_latency = 0.05
    cache = make_cache()
    stream = cache.stream(user(PROMPT))
    await stream.__anext__()
    await stream.close()
    result = await cache.complete(user(PROMPT))
    assert result.source == "upstream"
    assert fake.calls(PROMPT) == 2


@pytest.mark.parametrize("with_redis", [True, False], ids=["redis", "memory-only"])
async def test_a_stream_cut_midway_caches_nothing_and_fails_every_reader(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI, with_redis: bool
) -> None:
    fake.chunk_latency = 0.01
    fake.cut(after=3, prompt=PROMPT)
    cache = make_cache(**({} if with_redis else {"redis_url": None}))
    streams = [cache.stream(user(PROMPT)) for _ in range(5)]
    results = await asyncio.gather(*(read(s) for s in streams), return_exceptions=True)
    assert all(isinstance(r, Exception) for r in results), results
    assert fake.calls(PROMPT) == 1
    again = await cache.complete(user(PROMPT))
    assert again.source == "upstream" and again.text == ANSWER  # nothing partial was stored
    assert fake.calls(PROMPT) == 2


async def test_an_upstream_that_cannot_stream_is_answered_whole(
    make_cache: Callable[..., LLMCache],
) -> None:
    calls = 0

    async def model(params: dict[str, Any]) -> bytes:
        nonlocal calls
        calls += 1
        assert "stream" not in params
        completion = {
            "id": "c1",
            "object": "chat.completion",
            "created": 1,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "whole answer"},
                    "finish_reason": "stop",
                }
            ],
        }
        return orjson.dumps(completion)

    cache = make_cache(openai=None, upstream=model)
    text, chunks = await read(cache.stream(user("q")))
    assert text == "whole answer"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert (await cache.complete(user("q"))).source == "memory"
    assert calls == 1


async def test_the_wrapped_client_streams_through_the_cache(cache: LLMCache, fake: FakeOpenAI) -> None:
    client = fake.client()
    try:
        wrapped = cache.wrap(client)
        for expected_calls in (1, 1):
            async with await wrapped.chat.completions.create(
                model=MODEL, messages=user(PROMPT), stream=True
            ) as stream:
                text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            assert text == ANSWER
            assert fake.calls(PROMPT) == expected_calls
    finally:
        await client.close()


async def test_bad_requests_fail_before_any_io(cache: LLMCache, fake: FakeOpenAI) -> None:
    with pytest.raises(InvalidRequestError, match="messages"):
        cache.stream([])
    with pytest.raises(InvalidRequestError, match="stream"):
        cache.stream(user("q"), stream=False)
    with pytest.raises(InvalidRequestError, match="cache"):
        cache.stream(user("q"), cache={"ttl": 1})  # type: ignore[arg-type]
    assert fake.calls() == 0


async def test_no_store_streams_are_not_shared_or_stored(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI
) -> None:
    cache = make_cache()
    text, _ = await read(cache.stream(user(PROMPT), cache=CacheControl(no_store=True)))
    assert text == ANSWER
    assert (await cache.complete(user(PROMPT))).source == "upstream"
    assert fake.calls(PROMPT) == 2


# -- across processes -------------------------------------------------------------


async def test_identical_streams_in_three_processes_cost_one_upstream_call(
    redis_server: AnyRedis, fake: FakeOpenAI, namespace: str, make_cache: Callable[..., LLMCache]
) -> None:
    fake.latency = 0.3  # every process joins before the first chunk
    fake.chunk_latency = 0.01
    workers = [await CacheWorker.start(redis_server, fake, namespace) for _ in range(2)]
    try:
        cache = make_cache()
        await cache.open()
        here = [cache.stream(user(PROMPT)) for _ in range(16)]
        remote, local = await asyncio.gather(
            asyncio.gather(*(w.ask(op="stream", prompt=PROMPT, count=17) for w in workers)),
            asyncio.gather(*(read(s) for s in here)),
        )
        elsewhere = [r for replies in remote for r in replies]
        assert fake.calls(PROMPT) == 1
        assert [r["error"] for r in elsewhere] == [None] * 34
        assert {r["text"] for r in elsewhere} | {text for text, _ in local} == {ANSWER}
        # One process led; the others followed the stream live (not the stored answer).
        followed = [r for r in elsewhere if r["source"] == "redis" and r["coalesced"]]
        led_here = any(not s.coalesced for s in here)
        assert len(followed) == (34 if led_here else 17)
        chunk_counts = {r["chunks"] for r in elsewhere} | {len(chunks) for _, chunks in local}
        assert len(chunk_counts) == 1
    finally:
        for w in workers:
            await w.stop()


async def test_followers_elsewhere_fail_promptly_when_the_leader_dies(
    redis_server: AnyRedis, fake: FakeOpenAI, namespace: str, make_cache: Callable[..., LLMCache]
) -> None:
    fake.chunk_latency = 0.1  # a stream of ~11 chunks: over a second
    worker = await CacheWorker.start(redis_server, fake, namespace, "--lease-ttl", "1")
    try:
        assert worker.proc.stdin is not None
        worker.proc.stdin.write(orjson.dumps({"op": "stream", "prompt": PROMPT, "count": 1}) + b"\n")
        await asyncio.to_thread(fake.wait_for_calls, 1, prompt=PROMPT)
        cache = make_cache()
        follower = cache.stream(user(PROMPT))
        await follower.__anext__()
        assert follower.coalesced and follower.source == "redis"
        worker.proc.kill()
        started = time.monotonic()
        with pytest.raises(StreamInterruptedError):
            await read(follower)
        assert time.monotonic() - started < 5  # lease_ttl 1 s, plus a read's block
        result = await cache.complete(user(PROMPT))
        assert result.source == "upstream"  # nothing partial was stored
    finally:
        await worker.proc.wait()


async def test_closing_the_cache_fails_streams_rather_than_leaving_them_hanging(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI
) -> None:
    fake.chunk_latency = 0.05
    cache = make_cache(close_timeout=0)
    first, second = cache.stream(user(PROMPT)), cache.stream(user(PROMPT))
    reads = [asyncio.create_task(read(first)), asyncio.create_task(read(second))]
    await asyncio.to_thread(fake.wait_for_calls, 1, prompt=PROMPT)  # streaming from the model
    await cache.aclose()
    results = await asyncio.wait_for(asyncio.gather(*reads, return_exceptions=True), 10)
    assert all(isinstance(r, Exception) for r in results), results


async def test_a_stream_asked_for_right_after_everyone_left_starts_afresh(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI
) -> None:
    fake.chunk_latency = 0.02
    cache = make_cache()
    gone = cache.stream(user(PROMPT))
    await gone.__anext__()
    await gone.close()
    text, _ = await read(cache.stream(user(PROMPT)))  # not the stopped one
    assert text == ANSWER
