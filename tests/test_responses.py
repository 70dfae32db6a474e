"""The Responses API through the cache: the real SDK against FakeOpenAI's
``/v1/responses``, on a real Redis (and a 3-primary cluster)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from openai import AsyncOpenAI
from openai.types.responses import Response, ResponseCompletedEvent, ResponseTextDeltaEvent

from aiollmcache import (
    CacheControl,
    CachePolicy,
    ConfigurationError,
    InvalidRequestError,
    LLMCache,
    Pattern,
    ResponseResult,
    SemanticConfig,
)
from aiollmcache.testing import FakeOpenAI, chat_completion

from .conftest import MODEL, AnyRedis, all_keys, signalling

pytestmark = [pytest.mark.asyncio, pytest.mark.both_redis]

TOOL = {"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {}}}


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "input: missing"),
        ({"input": 3}, "input: expected a string or a list"),
        ({"input": []}, "non-empty list"),
        ({"input": ["text"]}, r"input\[0\]"),
        ({"input": "x", "instructions": 5}, "instructions"),
        ({"input": "x", "temperature": float("nan")}, "temperature"),
        ({"input": ""}, "empty string"),
        ({"input": "x", "tools": "web_search"}, "tools: expected a list"),
    ],
)
async def test_bad_requests_fail_before_any_io(
    cache: LLMCache, fake: FakeOpenAI, params: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        await cache.respond(**params)
    with pytest.raises(InvalidRequestError, match="stream"):
        await cache.respond(input="x", stream=True)
    with pytest.raises(InvalidRequestError, match="CacheControl"):
        await cache.respond(input="x", cache={"ttl": 1})  # type: ignore[arg-type]
    assert fake.requests == []


async def test_an_upstream_without_responses_is_a_configuration_error() -> None:
    async def chat_only(params: dict[str, Any]) -> dict[str, Any]:
        return chat_completion("x", model=MODEL)

    async with LLMCache(upstream=chat_only, model=MODEL) as cache:
        with pytest.raises(ConfigurationError, match="Responses API"):
            await cache.respond(input="x")


# -- hits, across tiers and caches ----------------------------------------------------


async def test_hits_from_memory_and_from_redis_in_another_cache(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI
) -> None:
    first, second = make_cache(), make_cache()
    mine = await first.respond(input="What is Python?", instructions="Be brief.")
    assert isinstance(mine, ResponseResult) and isinstance(mine.response, Response)
    assert (mine.source, mine.coalesced, mine.stale) == ("upstream", False, False)
    assert mine.output_text == mine.text == "Answer to: What is Python?"
    again = await first.respond(input="What is Python?", instructions="Be brief.")
    theirs = await second.respond(input="What is Python?", instructions="Be brief.")
    assert again.source == "memory" and theirs.source == "redis"
    assert again.key == theirs.key == mine.key
    assert first.key_for_response(input="What is Python?", instructions="Be brief.") == mine.key
    assert theirs.response.model_dump() == mine.response.model_dump()
    assert theirs.age >= 0 and fake.calls("What is Python?") == 1
    stats = second.stats()
    assert stats["hits_redis"] == 1 and stats["tokens_saved_completion"] == mine.response.usage.output_tokens  # type: ignore[union-attr]


async def test_items_input_and_the_wrapped_client(
    cache: LLMCache, fake: FakeOpenAI, openai_client: AsyncOpenAI
) -> None:
    items = [
        {"role": "developer", "content": "Answer in French."},
        {"role": "user", "content": [{"type": "input_text", "text": "hello items"}]},
    ]
    wrapped = cache.wrap(openai_client)
    first = await wrapped.responses.create(model=MODEL, input=items)
    second = await wrapped.responses.create(model=MODEL, input=items, store=False, metadata={"a": "b"})
    assert isinstance(first, Response) and second.id == first.id
    assert (await cache.respond(input=items)).source == "memory"
    assert fake.calls("hello items") == 1
    # The wrapped client's other methods are the client's own.
    assert wrapped.responses.retrieve == openai_client.responses.retrieve


async def test_a_thousand_callers_one_call(cache: LLMCache, fake: FakeOpenAI) -> None:
    fake.latency = 0.3
    results = await asyncio.gather(*(cache.respond(input="stampede") for _ in range(1000)))
    assert fake.calls("stampede") == 1
    assert len({r.response.id for r in results}) == 1 and sum(r.coalesced for r in results) == 999


async def test_two_caches_share_one_call(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI, openai_client: AsyncOpenAI
) -> None:
    started, upstream = signalling(openai_client)
    upstream.responses = lambda params: _responses(openai_client, params, started)  # type: ignore[attr-defined]
    holder, waiter = make_cache(openai=None, upstream=upstream), make_cache()
    fake.latency = 0.5
    first = asyncio.create_task(holder.respond(input="shared response"))
    await started.wait()
    others = await asyncio.gather(*(waiter.respond(input="shared response") for _ in range(30)))
    mine = await first
    assert fake.calls("shared response") == 1
    assert {r.response.id for r in others} == {mine.response.id}
    assert all(r.source == "redis" and r.coalesced for r in others)


async def _responses(client: AsyncOpenAI, params: dict[str, Any], started: asyncio.Event) -> bytes:
    started.set()
    raw = await client.responses.with_raw_response.create(**params)
    body: bytes = raw.content
    return body


# -- streams ---------------------------------------------------------------------------


async def test_streams_replay_the_typed_events(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI, openai_client: AsyncOpenAI
) -> None:
    direct = [
        event
        async for event in await openai_client.responses.create(model=MODEL, input="stream it", stream=True)
    ]
    first, other = make_cache(), make_cache()
    streams = [first.respond_stream(input="stream it"), first.respond_stream(input="stream it")]
    streams.append(other.respond_stream(input="stream it"))
    seen = []
    for stream in streams:
        events = [event async for event in stream]
        seen.append((stream.source, [type(e) for e in events], [e.type for e in events]))
        completed = events[-1]
        assert isinstance(completed, ResponseCompletedEvent)
        assert completed.response.output_text == "Answer to: stream it"
        text = "".join(e.delta for e in events if isinstance(e, ResponseTextDeltaEvent))
        assert text == "Answer to: stream it"
        assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [source for source, _, _ in seen] == ["upstream", "memory", "redis"]
    assert seen[0][2] == seen[1][2] == seen[2][2] == [e.type for e in direct]
    assert fake.calls("stream it") == 2  # the direct call, and one through the cache
    whole = await first.respond(input="stream it")
    assert whole.source == "memory" and whole.output_text == "Answer to: stream it"


async def test_a_stream_in_flight_is_joined_here_and_in_another_cache(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI
) -> None:
    fake.chunk_latency = 0.05
    try:
        first, other = make_cache(), make_cache()

        async def read(cache: LLMCache) -> tuple[str, bool, str]:
            stream = cache.respond_stream(input="joined stream")
            events = [event async for event in stream]
            text = "".join(e.delta for e in events if isinstance(e, ResponseTextDeltaEvent))
            return str(stream.source), stream.coalesced, text

        leader = asyncio.create_task(read(first))
        await asyncio.to_thread(fake.wait_for_calls, 1, prompt="joined stream")
        results = await asyncio.gather(read(first), read(other), leader)
    finally:
        fake.chunk_latency = 0.0
    assert fake.calls("joined stream") == 1
    assert {text for _, _, text in results} == {"Answer to: joined stream"}
    assert results[0][1] and results[1][1] and not results[2][1]


# -- what is not cached ----------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"previous_response_id": "resp_earlier"},
        {"conversation": "conv_1"},
        {"tools": [{"type": "web_search"}]},
    ],
)
async def test_requests_on_provider_state_go_to_the_model(
    make_cache: Callable[..., LLMCache],
    fake: FakeOpenAI,
    redis_server: AnyRedis,
    namespace: str,
    params: dict[str, Any],
) -> None:
    cache = make_cache()
    for _ in range(2):
        result = await cache.respond(input="stateful", **params)
        assert result.source == "upstream"
    stream = cache.respond_stream(input="stateful", **params)
    assert [e async for e in stream] and stream.source == "upstream"
    assert fake.calls("stateful") == 3 and cache.stats()["not_stored"]["provider_state"] == 3
    r = redis_server.client()
    try:
        assert await all_keys(r, f"alc:{namespace}:*:e:*") == []
    finally:
        await r.aclose()
    # The switch: cached like any other request.
    allowing = make_cache(policy=CachePolicy(provider_state=True))
    await allowing.respond(input="stateful", **params)
    assert (await allowing.respond(input="stateful", **params)).source == "memory"


async def test_the_policy_applies(make_cache: Callable[..., LLMCache], fake: FakeOpenAI) -> None:
    cache = make_cache()
    cut = await cache.respond(input="cut this answer", max_output_tokens=1)
    assert cut.response.status == "incomplete" and cut.output_text == "Answer"
    assert (await cache.respond(input="cut this answer", max_output_tokens=1)).source == "upstream"
    fake.filter(prompt="filtered response")
    assert (await cache.respond(input="filtered response")).response.incomplete_details is not None
    call = await cache.respond(input="call a tool", tools=[TOOL], tool_choice="required")
    assert call.response.output[0].type == "function_call"
    assert (await cache.respond(input="call a tool", tools=[TOOL], tool_choice="required")).source == "memory"
    not_stored = cache.stats()["not_stored"]
    assert not_stored["truncated"] == 2 and not_stored["content_filter"] == 1
    strict = make_cache(policy=CachePolicy(tool_calls=False))
    assert (
        await strict.respond(input="call a tool", tools=[TOOL], tool_choice="required")
    ).source == "upstream"


async def test_no_store_and_no_cache(cache: LLMCache, fake: FakeOpenAI) -> None:
    await cache.respond(input="controlled", cache=CacheControl(no_store=True))
    assert (await cache.respond(input="controlled")).source == "upstream"
    assert (await cache.respond(input="controlled", cache=CacheControl(no_cache=True))).source == "upstream"
    assert fake.calls("controlled") == 3


# -- invalidation, freshness, semantic ---------------------------------------------------


async def test_invalidation_by_key_tag_and_instructions(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI
) -> None:
    cache, other = make_cache(), make_cache()
    a = await cache.respond(input="inv a", instructions="You are a pirate.")
    await cache.respond(input="inv b", cache=CacheControl(tags=["docs"]))
    await cache.respond(input="inv c")
    assert await cache.invalidate(key=a.key) == 1
    assert await cache.invalidate(tag="docs") == 1
    await cache.respond(input="inv a", instructions="You are a pirate.")
    assert await cache.invalidate(pattern=Pattern(system="*pirate*")) == 1
    for prompt, source in (("inv a", "upstream"), ("inv b", "upstream"), ("inv c", "redis")):
        params = {"instructions": "You are a pirate."} if prompt == "inv a" else {}
        assert (await other.respond(input=prompt, **params)).source == source
    assert fake.calls("inv a") == 3


async def test_stale_answers_are_served_and_refreshed(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI
) -> None:
    cache = make_cache(ttl=0.3, stale_ttl=60, xfetch_beta=0)
    first = await cache.respond(input="aging")
    await asyncio.sleep(0.35)  # past the fresh window: the passing of time is under test
    stale = await cache.respond(input="aging")
    assert stale.stale and stale.response.id == first.response.id
    await asyncio.gather(*cache._tasks)  # the background refresh
    fresh = await cache.respond(input="aging")
    assert not fresh.stale and fresh.response.id != first.response.id
    assert fake.calls("aging") == 2


async def test_a_paraphrase_of_plain_text_input_is_a_semantic_hit(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI, openai_client: AsyncOpenAI
) -> None:
    config = SemanticConfig(model="fake-embed", threshold=0.9)
    cache = make_cache(semantic=config)
    first = await cache.respond(input="What is the capital of France?", instructions="Be brief.")
    near = await cache.respond(input="Tell me the capital of France", instructions="Be brief.")
    assert near.source == "semantic" and near.response.id == first.response.id
    other = await cache.respond(input="Tell me the capital of France", instructions="Be long.")
    assert other.source == "upstream"  # other instructions: another context
    items = await cache.respond(
        input=[
            {"role": "user", "content": [{"type": "input_text", "text": "Tell me the capital of France"}]}
        ],
        instructions="Be brief.",
    )
    assert items.source == "upstream"  # not plain text: exact matches only


async def test_one_callers_bookkeeping_is_never_served_to_another(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI
) -> None:
    cache, other = make_cache(), make_cache()
    alice = {
        "metadata": {"tenant": "acme"},
        "user": "alice",
        "safety_identifier": "a-1",
        "prompt_cache_key": "pk-a",
    }
    bob = {
        "metadata": {"tenant": "globex"},
        "user": "bob",
        "safety_identifier": "b-2",
        "prompt_cache_key": "pk-b",
    }
    first = await cache.respond(input="tenants", **alice)
    served = [await cache.respond(input="tenants", **bob), await other.respond(input="tenants", **bob)]
    streamed = [event async for event in other.respond_stream(input="tenants", **bob)]
    for response in [first.response, *(r.response for r in served), streamed[-1].response]:
        assert response.metadata is None and response.user is None
        assert response.safety_identifier is None and response.prompt_cache_key is None
    assert [r.source for r in served] == ["memory", "redis"] and fake.calls("tenants") == 1


async def test_provider_state_in_extra_body_goes_to_the_model(cache: LLMCache, fake: FakeOpenAI) -> None:
    for _ in range(2):
        result = await cache.respond(input="extra state", extra_body={"conversation": "conv_9"})
        assert result.source == "upstream"
    assert fake.calls("extra state") == 2


class Lenient:
    """An upstream (in process) answering as a lenient OpenAI-compatible server
    might: a usage block without fields this SDK requires, and an event type
    this SDK does not know."""

    scope = "lenient"

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, params: dict[str, Any]) -> dict[str, Any]:
        return chat_completion("x", model=MODEL)

    def body(self, *, complete_usage: bool) -> dict[str, Any]:
        self.calls += 1
        text = {"type": "output_text", "text": "lenient answer", "annotations": []}
        message = {
            "type": "message",
            "id": "m1",
            "role": "assistant",
            "status": "completed",
            "content": [text],
        }
        usage: dict[str, Any] = {"input_tokens": 1, "output_tokens": 2, "total_tokens": 3}
        if complete_usage:
            usage["input_tokens_details"] = {"cached_tokens": 0, "cache_write_tokens": 0}
            usage["output_tokens_details"] = {"reasoning_tokens": 0}
        return {
            "id": f"resp_{self.calls}",
            "object": "response",
            "created_at": 1,
            "model": MODEL,
            "status": "completed",
            "output": [message],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": usage,
        }

    async def responses(self, params: dict[str, Any]) -> dict[str, Any]:
        return self.body(complete_usage=params.get("input") == "complete usage")

    async def stream_responses(self, params: dict[str, Any]) -> Any:
        self.calls += 1
        valid = Response.model_validate(await self.responses({"input": "complete usage"})).model_dump(
            mode="json"
        )
        yield {
            "type": "response.created",
            "sequence_number": 0,
            "response": {**valid, "status": "in_progress", "output": []},
        }
        yield {"type": "response.brand_new_event", "sequence_number": 1, "detail": "from a newer API"}
        yield {"type": "response.completed", "sequence_number": 2, "response": valid}


async def test_answers_this_sdk_would_not_validate_are_answered_not_stored() -> None:
    upstream = Lenient()
    async with LLMCache(upstream=upstream, model=MODEL) as cache:
        for _ in range(2):
            result = await cache.respond(input="lenient")
            assert result.output_text == "lenient answer" and result.source == "upstream"
        assert cache.stats()["not_stored"]["error"] == 2
        await cache.respond(input="complete usage")
        assert (await cache.respond(input="complete usage")).source == "memory"
        stream = cache.respond_stream(input="new events")
        events = [event async for event in stream]
        assert [e.type for e in events] == [
            "response.created",
            "response.brand_new_event",
            "response.completed",
        ]
        replayed = [event async for event in cache.respond_stream(input="new events")]
        assert replayed[-1].response.output_text == "lenient answer"  # stored from its last event


async def test_a_sample_bucket_of_responses(make_cache: Callable[..., LLMCache], fake: FakeOpenAI) -> None:
    cache = make_cache(policy=CachePolicy(samples=2), random_seed=4)
    results = [await cache.respond(input="sampled response", temperature=0.8) for _ in range(12)]
    assert all(isinstance(r.response, Response) for r in results)
    assert fake.calls("sampled response") == 2 and len({r.response.id for r in results}) == 2
    stream = cache.respond_stream(input="sampled response", temperature=0.8)
    assert isinstance([e async for e in stream][-1], ResponseCompletedEvent)
