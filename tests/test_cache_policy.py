"""What may be cached: the policy's defaults and switches, against a real Redis
and the real SDK talking to FakeOpenAI (which cuts answers at ``max_tokens``,
answers with tool calls when a tool is required, and filters on demand)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

import pytest
import pytest_asyncio
from openai import AsyncOpenAI, BadRequestError
from openai.types.chat import ChatCompletion

from aiollmcache import (
    CacheControl,
    CachePolicy,
    ConfigurationError,
    InvalidRequestError,
    LLMCache,
)
from aiollmcache.testing import FakeOpenAI, chat_completion, last_user_text

from .conftest import MODEL, AnyRedis, all_keys, signalling, user

pytestmark = [pytest.mark.asyncio, pytest.mark.both_redis]

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
    },
}
LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookup",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
    },
}


async def entries(redis_server: AnyRedis, namespace: str) -> list[bytes]:
    r = redis_server.client()
    try:
        return await all_keys(r, f"alc:{namespace}:*:e:*")
    finally:
        await r.aclose()


# -- each default and switch, end to end ---------------------------------------------


async def test_a_truncated_answer_is_returned_and_not_stored(
    cache: LLMCache, fake: FakeOpenAI, redis_server: AnyRedis, namespace: str
) -> None:
    first = await cache.complete(user("cut me short please"), max_tokens=2)
    assert first.response.choices[0].finish_reason == "length"
    assert first.text == "Answer to:"
    second = await cache.complete(user("cut me short please"), max_tokens=2)
    assert second.source == "upstream" and fake.calls("cut me short please") == 2
    assert await entries(redis_server, namespace) == []
    stats = cache.stats()
    assert stats["not_stored"]["truncated"] == 2 and stats["stores"] == 0
    # A limit the answer fits in is an ordinary answer.
    whole = await cache.complete(user("cut me short please"), max_tokens=50)
    assert whole.response.choices[0].finish_reason == "stop"
    assert (await cache.complete(user("cut me short please"), max_tokens=50)).source == "memory"


async def test_truncated_answers_are_stored_when_allowed(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI, redis_server: AnyRedis, namespace: str
) -> None:
    allowing = make_cache(policy=CachePolicy(store_truncated=True))
    first = await allowing.complete(user("truncation allowed"), max_tokens=1)
    again = await allowing.complete(user("truncation allowed"), max_tokens=1)
    assert again.source == "memory" and again.response.id == first.response.id
    assert len(await entries(redis_server, namespace)) == 1
    # A cache (another process) with the default policy does not serve it...
    strict = make_cache()
    mine = await strict.complete(user("truncation allowed"), max_tokens=1)
    assert mine.source == "upstream" and mine.response.id != first.response.id
    assert strict.stats()["cached_refused"] >= 1
    assert fake.calls("truncation allowed") == 2
    # ...unless the request's own policy allows it.
    allowed = CacheControl(policy=CachePolicy(store_truncated=True))
    served = await strict.complete(user("truncation allowed"), max_tokens=1, cache=allowed)
    assert served.source == "redis" and served.response.id == first.response.id


async def test_a_filtered_answer_is_never_stored(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI, redis_server: AnyRedis, namespace: str
) -> None:
    cache = make_cache(policy=CachePolicy(store_truncated=True))
    fake.filter(prompt="filtered")
    first = await cache.complete(user("filtered"))
    assert first.response.choices[0].finish_reason == "content_filter" and first.text == "Answer"
    second = await cache.complete(user("filtered"))
    assert second.source == "upstream" and second.response.choices[0].finish_reason == "stop"
    assert cache.stats()["not_stored"]["content_filter"] == 1
    # The next, unfiltered answer is stored as usual.
    assert (await cache.complete(user("filtered"))).source == "memory"
    assert len(await entries(redis_server, namespace)) == 1


async def test_errors_and_empty_answers_are_never_stored(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI, redis_server: AnyRedis, namespace: str
) -> None:
    cache = make_cache()
    fake.fail(400, prompt="rejected")
    with pytest.raises(BadRequestError):
        await cache.complete(user("rejected"))
    assert (await cache.complete(user("rejected"))).source == "upstream"
    assert fake.calls("rejected") == 2

    empties = iter(
        [[], [{"index": 0, "message": {"role": "assistant", "content": ""}, "finish_reason": "stop"}]]
    )

    async def empty(params: dict[str, Any]) -> dict[str, Any]:
        return {**chat_completion("", model=MODEL), "choices": next(empties)}

    blank = make_cache(openai=None, upstream=empty)
    assert (await blank.complete(user("nothing to say"))).response.choices == []
    assert (await blank.complete(user("nothing to say"))).text == ""
    assert cache.stats()["not_stored"]["error"] == 1
    assert blank.stats()["not_stored"]["empty"] == 2
    assert len(await entries(redis_server, namespace)) == 1  # the second "rejected" answer only


async def test_tool_calls_are_stored_by_default_and_keyed_on_every_tool_result(
    cache: LLMCache, fake: FakeOpenAI
) -> None:
    ask = user("weather in Paris")
    first = await cache.complete(ask, tools=[WEATHER], tool_choice="required")
    (call,) = first.response.choices[0].message.tool_calls or []
    assert first.response.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    again = await cache.complete(ask, tools=[WEATHER], tool_choice="required")
    assert again.source == "memory" and again.response.id == first.response.id
    # Other tools offered: another key.
    other = await cache.complete(ask, tools=[LOOKUP], tool_choice="required")
    assert other.source == "upstream"
    # The conversation after the call, with the tool's result: keyed on that result.
    turn = first.response.choices[0].message.model_dump(exclude_none=True)

    def after(result: str) -> list[dict[str, Any]]:
        return [*ask, turn, {"role": "tool", "tool_call_id": call.id, "content": result}]

    sunny = await cache.complete(after("sunny"), tools=[WEATHER])
    rainy = await cache.complete(after("rain"), tools=[WEATHER])
    assert sunny.source == rainy.source == "upstream" and sunny.key != rainy.key
    assert (await cache.complete(after("sunny"), tools=[WEATHER])).source == "memory"
    assert fake.calls("weather in Paris") == 4


async def test_tool_calls_switched_off_are_neither_stored_nor_served(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI
) -> None:
    ask = user("which tool")
    default = make_cache()
    stored = await default.complete(ask, tools=[WEATHER], tool_choice="required")
    never = make_cache(policy=CachePolicy(tool_calls=False))
    for _ in range(2):
        fresh = await never.complete(ask, tools=[WEATHER], tool_choice="required")
        assert fresh.source == "upstream" and fresh.response.id != stored.response.id
    assert never.stats()["not_stored"]["tool_calls"] == 2
    # Plain answers are still cached under that policy.
    await never.complete(user("no tools here"))
    assert (await never.complete(user("no tools here"))).source == "memory"
    assert fake.calls("which tool") == 3


async def test_no_store_and_the_cacheable_predicate(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI, redis_server: AnyRedis, namespace: str
) -> None:
    seen: list[Mapping[str, Any]] = []

    def cacheable(request: Mapping[str, Any]) -> bool:
        seen.append(request)
        return not any(t["function"]["name"] == "get_weather" for t in request.get("tools") or ())

    stored = make_cache()
    await stored.complete(user("live data"), tools=[WEATHER])  # stored by a cache without the predicate
    cache = make_cache(policy=CachePolicy(cacheable=cacheable))
    for _ in range(2):
        result = await cache.complete(user("live data"), tools=[WEATHER])
        assert result.source == "upstream"  # neither served nor stored
    assert seen[0]["model"] == MODEL and seen[0]["tools"] == [WEATHER]
    with pytest.raises(TypeError):
        seen[0]["model"] = "changed"  # type: ignore[index]  # read-only
    assert (await cache.complete(user("other data"), tools=[LOOKUP])).source == "upstream"
    assert (await cache.complete(user("other data"), tools=[LOOKUP])).source == "memory"
    await cache.complete(user("private"), cache=CacheControl(no_store=True))
    assert (await cache.complete(user("private"), cache=CacheControl(no_store=True))).source == "upstream"
    not_stored = cache.stats()["not_stored"]
    assert not_stored["uncacheable"] == 2 and not_stored["no_store"] == 2
    assert fake.calls("live data") == 3 and fake.calls("private") == 2
    assert len(await entries(redis_server, namespace)) == 2  # "live data" once, "other data"


async def test_should_store_sees_the_request_and_the_response(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI
) -> None:
    asked: list[tuple[str, str]] = []

    def should_store(request: Mapping[str, Any], response: ChatCompletion) -> bool:
        asked.append((last_user_text(request), response.choices[0].message.content or ""))
        if "boom" in last_user_text(request):
            raise RuntimeError("predicate bug")
        return "today" not in (response.choices[0].message.content or "")

    cache = make_cache(policy=CachePolicy(should_store=should_store))
    for prompt in ("news today", "boom", "timeless"):
        await cache.complete(user(prompt))
        second = await cache.complete(user(prompt))
        assert second.source == ("memory" if prompt == "timeless" else "upstream")
    assert asked[0] == ("news today", "Answer to: news today")
    assert cache.stats()["not_stored"]["should_store"] == 4
    # Not asked for what the defaults refuse.
    await cache.complete(user("short news today"), max_tokens=1)
    assert ("short news today", "Answer") not in asked


# -- sample buckets -------------------------------------------------------------------


@pytest.fixture(scope="module")
def sampler() -> Iterator[FakeOpenAI]:
    """A model whose every answer differs: "<prompt> #<n>"."""
    counter = itertools.count(1)
    with FakeOpenAI(reply=lambda request: f"{last_user_text(request)} #{next(counter)}") as server:
        yield server


@pytest_asyncio.fixture
async def sampler_client(sampler: FakeOpenAI) -> AsyncIterator[AsyncOpenAI]:
    sampler.reset()
    sampler.latency = 0.0
    client = sampler.client()
    yield client
    await client.close()


async def test_a_bucket_fills_then_serves_its_answers_at_random(
    make_cache: Callable[..., LLMCache], sampler: FakeOpenAI, sampler_client: AsyncOpenAI
) -> None:
    cache = make_cache(openai=sampler_client, policy=CachePolicy(samples=3), random_seed=11)
    filled = [(await cache.complete(user("a poem"), temperature=0.9)) for _ in range(3)]
    assert [r.source for r in filled] == ["upstream"] * 3
    answers = {r.text for r in filled}
    assert len(answers) == 3 and sampler.calls("a poem") == 3
    served = [await cache.complete(user("a poem"), temperature=0.9) for _ in range(60)]
    assert sampler.calls("a poem") == 3
    assert {r.text for r in served} == answers  # each of the three, at random
    assert all(r.source == "memory" for r in served)
    stats = cache.stats()
    assert stats["samples_filled"] == 3 and stats["samples_served"] == 60
    # Seeded: another cache with the same seed, reading the same bucket from
    # Redis, serves the same sequence.
    twin = [make_cache(openai=sampler_client, policy=CachePolicy(samples=3), random_seed=5) for _ in range(2)]
    sequences = [[(await c.complete(user("a poem"), temperature=0.9)).text for _ in range(20)] for c in twin]
    assert sequences[0] == sequences[1] and len(set(sequences[0])) > 1


async def test_requests_that_do_not_sample_get_one_answer(
    make_cache: Callable[..., LLMCache], sampler: FakeOpenAI, sampler_client: AsyncOpenAI
) -> None:
    cache = make_cache(openai=sampler_client, policy=CachePolicy(samples=4))
    for params in ({"temperature": 0}, {"temperature": 0.8, "seed": 7}):
        texts = {(await cache.complete(user("fixed"), **params)).text for _ in range(5)}
        assert len(texts) == 1
    assert sampler.calls("fixed") == 2
    # Without a bucket (the default) a sampled request is cached like any other.
    default = make_cache(openai=sampler_client, namespace="plain-" + cache.namespace)
    texts = {(await default.complete(user("fixed"), temperature=1.2)).text for _ in range(5)}
    assert len(texts) == 1 and sampler.calls("fixed") == 3


async def test_concurrent_calls_fill_a_bucket_with_at_most_k_upstream_calls(
    make_cache: Callable[..., LLMCache], sampler: FakeOpenAI, sampler_client: AsyncOpenAI
) -> None:
    sampler.latency = 0.2
    cache = make_cache(openai=sampler_client, policy=CachePolicy(samples=3))
    results = await asyncio.gather(*(cache.complete(user("burst"), temperature=1.0) for _ in range(50)))
    assert sampler.calls("burst") == 3
    assert len({r.text for r in results}) == 3
    assert sum(r.coalesced for r in results) == 47
    assert cache.stats()["samples_filled"] == 3
    # Another cache on the same Redis finds the bucket full.
    other = make_cache(openai=sampler_client, policy=CachePolicy(samples=3))
    again = {(await other.complete(user("burst"), temperature=1.0)).text for _ in range(30)}
    assert again <= {r.text for r in results} and sampler.calls("burst") == 3


async def test_a_bucket_never_mixes_answers_of_different_n(
    make_cache: Callable[..., LLMCache], sampler: FakeOpenAI, sampler_client: AsyncOpenAI
) -> None:
    cache = make_cache(openai=sampler_client, policy=CachePolicy(samples=2))
    for _ in range(6):
        assert len((await cache.complete(user("pick"), n=2)).response.choices) == 2
        assert len((await cache.complete(user("pick"))).response.choices) == 1
    assert sampler.calls("pick") == 4  # two buckets of two


async def test_invalidating_a_key_empties_its_bucket(
    make_cache: Callable[..., LLMCache],
    sampler: FakeOpenAI,
    sampler_client: AsyncOpenAI,
    redis_server: AnyRedis,
    namespace: str,
) -> None:
    cache = make_cache(openai=sampler_client, policy=CachePolicy(samples=3))
    for _ in range(3):
        await cache.complete(user("forget us"), temperature=0.5)
    assert len(await entries(redis_server, namespace)) == 3
    assert await cache.invalidate(key=cache.key_for(user("forget us"), temperature=0.5)) == 3
    assert await entries(redis_server, namespace) == []
    assert (await cache.complete(user("forget us"), temperature=0.5)).source == "upstream"
    assert sampler.calls("forget us") == 4


async def test_a_stream_fills_and_replays_a_bucket(
    make_cache: Callable[..., LLMCache], sampler: FakeOpenAI, sampler_client: AsyncOpenAI
) -> None:
    cache = make_cache(openai=sampler_client, policy=CachePolicy(samples=2), random_seed=3)

    async def streamed() -> tuple[str, str]:
        stream = cache.stream(user("stream a poem"), temperature=0.7)
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
        return text, str(stream.source)

    filled = [await streamed() for _ in range(2)]
    assert [source for _, source in filled] == ["upstream", "upstream"]
    replayed = [await streamed() for _ in range(20)]
    assert {text for text, _ in replayed} == {text for text, _ in filled}
    assert sampler.calls("stream a poem") == 2


# -- streams, and the fleet --------------------------------------------------------


async def test_streamed_answers_follow_the_policy(cache: LLMCache, fake: FakeOpenAI) -> None:
    async def stream(prompt: str, **params: Any) -> tuple[str, str]:
        s = cache.stream(user(prompt), **params)
        chunks = [chunk async for chunk in s]
        reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        return reasons[-1], str(s.source)

    assert await stream("streamed and cut", max_tokens=1) == ("length", "upstream")
    assert await stream("streamed and cut", max_tokens=1) == ("length", "upstream")
    tools = {"tools": [WEATHER], "tool_choice": "required"}
    assert await stream("streamed tool", **tools) == ("tool_calls", "upstream")
    assert await stream("streamed tool", **tools) == ("tool_calls", "memory")
    replayed = await cache.complete(user("streamed tool"), **tools)
    (call,) = replayed.response.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather" and '"streamed tool"' in call.function.arguments
    assert fake.calls("streamed and cut") == 2 and fake.calls("streamed tool") == 1


async def test_an_answer_not_stored_still_reaches_the_callers_waiting_in_other_caches(
    make_cache: Callable[..., LLMCache],
    fake: FakeOpenAI,
    redis_server: AnyRedis,
    namespace: str,
) -> None:
    fake.latency = 0.3
    caches = [make_cache() for _ in range(3)]
    results = await asyncio.gather(
        *(c.complete(user("shared but cut"), max_tokens=2) for c in caches for _ in range(20))
    )
    assert fake.calls("shared but cut") == 1
    assert len({r.response.id for r in results}) == 1
    assert all(r.response.choices[0].finish_reason == "length" for r in results)
    assert await entries(redis_server, namespace) == []
    assert sum(c.stats()["lease_passed"] for c in caches) == 2
    # Not stored anywhere: the next call asks the model again.
    assert (await caches[1].complete(user("shared but cut"), max_tokens=2)).source == "upstream"


async def test_a_corrupt_answer_in_a_bucket_is_dropped_and_filled_again(
    make_cache: Callable[..., LLMCache],
    sampler: FakeOpenAI,
    sampler_client: AsyncOpenAI,
    redis_server: AnyRedis,
    namespace: str,
) -> None:
    cache = make_cache(openai=sampler_client, policy=CachePolicy(samples=3), memory_max_entries=0)
    for _ in range(3):
        await cache.complete(user("spoiled"), temperature=0.9)
    stored = await entries(redis_server, namespace)
    assert len(stored) == 3
    r = redis_server.client()
    try:
        await r.set(stored[0], b"not an entry")
    finally:
        await r.aclose()
    results = [await cache.complete(user("spoiled"), temperature=0.9) for _ in range(10)]
    assert cache.stats()["corrupt_entries"] == 1
    assert sampler.calls("spoiled") == 4  # the spoiled answer, asked again once
    assert "not an entry" not in {r.text for r in results}
    assert len(await entries(redis_server, namespace)) == 3


async def test_predicate_errors_reach_the_caller_before_any_io(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI
) -> None:
    def cacheable(request: Mapping[str, Any]) -> bool:
        raise KeyError("tools")

    async def later(request: Mapping[str, Any]) -> bool:
        return False

    cache = make_cache(policy=CachePolicy(cacheable=cacheable))
    with pytest.raises(KeyError):
        await cache.complete(user("predicate bug"))
    with pytest.raises(KeyError):
        cache.stream(user("predicate bug"))  # at the call, not at the first chunk
    with pytest.raises(KeyError):
        await cache.wrap(fake.client()).chat.completions.create(messages=user("predicate bug"))
    # A plain function that hands back a coroutine: an error, not a yes.
    sneaky = make_cache(policy=CachePolicy(cacheable=lambda request: later(request)))
    with pytest.raises(ConfigurationError, match="awaitable"):
        await sneaky.complete(user("predicate bug"))
    assert fake.calls("predicate bug") == 0
    with pytest.raises(InvalidRequestError, match="expected a CacheControl"):
        await cache.wrap(fake.client()).chat.completions.create(
            messages=user("predicate bug"),
            cache={"no_store": True},  # type: ignore[arg-type]
        )


async def test_a_refused_answer_in_the_cache_is_counted_once_per_call(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI
) -> None:
    await make_cache(policy=CachePolicy(store_truncated=True)).complete(user("count me"), max_tokens=1)
    strict = make_cache()
    await strict.complete(user("count me"), max_tokens=1)
    assert strict.stats()["cached_refused"] == 1
    s = strict.stream(user("count me"), max_tokens=1)
    async for _ in s:
        pass
    assert strict.stats()["cached_refused"] == 2


async def test_a_refresh_the_policy_refuses_is_not_tried_again(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI
) -> None:
    verdicts = iter([True])

    def should_store(request: Mapping[str, Any], response: ChatCompletion) -> bool:
        return next(verdicts, False)  # the first answer only

    cache = make_cache(ttl=0.3, stale_ttl=30, xfetch_beta=0, policy=CachePolicy(should_store=should_store))
    first = await cache.complete(user("refresh refused"))
    await asyncio.sleep(0.35)  # past the fresh window: the passing of time is under test
    for _ in range(5):
        stale = await cache.complete(user("refresh refused"))
        assert stale.stale and stale.response.id == first.response.id
        await asyncio.gather(*cache._tasks)  # the background refresh, if one started
    assert fake.calls("refresh refused") == 2  # the answer, and one refresh
    assert cache.stats()["not_stored"]["should_store"] == 1


async def test_concurrent_streams_fill_different_answers_of_a_bucket(
    make_cache: Callable[..., LLMCache], sampler: FakeOpenAI, sampler_client: AsyncOpenAI
) -> None:
    sampler.latency = 0.1
    cache = make_cache(openai=sampler_client, policy=CachePolicy(samples=3))

    async def streamed(prompt: str) -> str:
        stream = cache.stream(user(prompt), temperature=0.7)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    for round_ in range(5):
        prompt = f"three streams {round_}"
        texts = await asyncio.gather(*(streamed(prompt) for _ in range(3)))
        assert sampler.calls(prompt) == 3 and len(set(texts)) == 3


async def test_a_large_refused_answer_reaches_the_other_caches_too(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI, redis_server: AnyRedis, namespace: str
) -> None:
    fake.latency, fake.answer_chars = 0.3, 100_000  # past what a notification carries
    try:
        caches = [
            make_cache(policy=CachePolicy(should_store=lambda request, response: False)) for _ in range(3)
        ]
        results = await asyncio.gather(
            *(c.complete(user("large and refused")) for c in caches for _ in range(5))
        )
    finally:
        fake.answer_chars = 0
    assert fake.calls("large and refused") == 1
    assert len({r.response.id for r in results}) == 1 and len(results[0].text) == 100_000
    assert sum(c.stats()["lease_passed"] for c in caches) == 2
    assert await entries(redis_server, namespace) == []


async def test_a_stream_elsewhere_replays_an_answer_passed_on_by_a_complete_call(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI, openai_client: AsyncOpenAI
) -> None:
    started, upstream = signalling(openai_client)
    holder = make_cache(openai=None, upstream=upstream)
    follower = make_cache()
    fake.latency = 0.4
    first = asyncio.create_task(holder.complete(user("passed to a stream"), max_tokens=2))
    await started.wait()  # the holder has the lease and is asking the model
    stream = follower.stream(user("passed to a stream"), max_tokens=2)
    chunks = [chunk async for chunk in stream]
    mine = await first
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == mine.text and chunks[0].id == mine.response.id
    assert stream.source == "redis" and stream.coalesced
    assert fake.calls("passed to a stream") == 1
