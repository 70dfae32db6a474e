"""The semantic tier: a paraphrase is answered from the cache, but only in the
same context; what was invalidated or expired never matches; an embedder
that fails costs the tier, never the call.

The FakeOpenAI embedder embeds a bag of content words: "What is the capital
of France?" and "Tell me the capital of France" embed identically (similarity
1.0), "the capital of Germany" is 0.5 away.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio
from openai import AsyncOpenAI

from aiollmcache import (
    CacheControl,
    ConfigurationError,
    LLMCache,
    Pattern,
    SemanticConfig,
)
from aiollmcache.testing import FakeOpenAI

from .conftest import MODEL, AnyRedis, all_keys, until, user
from .test_invalidation import CacheWorker

pytestmark = [pytest.mark.asyncio, pytest.mark.both_redis]

QUESTION = "What is the capital of France?"
PARAPHRASE = "Tell me the capital of France"
OTHER = "What is the capital of Germany?"


@pytest_asyncio.fixture
async def semantic_cache(
    make_cache: Callable[..., LLMCache],
) -> AsyncIterator[Callable[..., LLMCache]]:
    def make(**kwargs: Any) -> LLMCache:
        kwargs.setdefault("semantic", SemanticConfig(threshold=0.9))
        return make_cache(**kwargs)

    yield make


@pytest.mark.parametrize("with_redis", [True, False], ids=["redis", "memory-only"])
async def test_a_paraphrase_is_answered_from_the_cache(
    semantic_cache: Callable[..., LLMCache], fake: FakeOpenAI, with_redis: bool
) -> None:
    cache = semantic_cache(**({} if with_redis else {"redis_url": None}))
    first = await cache.complete(user(QUESTION))
    assert first.source == "upstream"
    await until(_indexed(cache, 1))
    second = await cache.complete(user(PARAPHRASE))
    assert second.source == "semantic"
    assert second.similarity is not None and second.similarity >= 0.9
    assert second.text == first.text == f"Answer to: {QUESTION}"
    assert second.key == first.key  # the key of the entry served
    assert fake.calls() == 1
    other = await cache.complete(user(OTHER))
    assert other.source == "upstream"
    assert other.similarity is None
    stats = cache.stats()
    assert stats["hits_semantic"] == 1
    assert stats["semantic_lookups"] == 3
    assert stats["semantic_similarity"][">=0.99"] == 1  # the paraphrase
    assert stats["semantic_similarity"][">=0"] == 1  # the other question (0.5 - 1e-8)
    assert stats["semantic_similarity"]["none"] == 1  # the first, in an empty partition


def _indexed(cache: LLMCache, n: int) -> Callable[[], Any]:
    async def done() -> bool:
        return bool(cache.stats()["semantic_indexed"] >= n)

    return done


@pytest.mark.parametrize(
    ("first", "then"),
    [
        pytest.param({}, {"system": "You are a pirate."}, id="system prompt"),
        pytest.param(
            {"system": "You are a pirate."}, {"system": "You are a lawyer."}, id="other system prompt"
        ),
        pytest.param({}, {"model": "other-model"}, id="model"),
        pytest.param({}, {"temperature": 0.9}, id="temperature"),
        pytest.param({}, {"earlier": "Let's talk about Belgium."}, id="earlier turn"),
        pytest.param({}, {"response_format": {"type": "json_object"}}, id="response format"),
    ],
)
async def test_the_same_question_in_another_context_misses(
    semantic_cache: Callable[..., LLMCache], fake: FakeOpenAI, first: dict[str, Any], then: dict[str, Any]
) -> None:
    cache = semantic_cache()

    def request(text: str, system: str | None = None, earlier: str | None = None, **params: Any) -> Any:
        messages: list[dict[str, str]] = []
        if system:
            messages.append({"role": "system", "content": system})
        if earlier:
            messages += [{"role": "user", "content": earlier}, {"role": "assistant", "content": "Sure."}]
        messages.append({"role": "user", "content": text})
        return cache.complete(messages, **params)

    assert (await request(QUESTION, **first)).source == "upstream"
    await until(_indexed(cache, 1))
    assert (await request(PARAPHRASE, **first)).source == "semantic"  # in its own context it would hit
    result = await request(PARAPHRASE, **then)
    assert result.source == "upstream"
    assert fake.calls() == 2


@pytest.mark.parametrize(
    ("messages", "params", "control"),
    [
        pytest.param(user(PARAPHRASE), {"n": 2}, None, id="n > 1"),
        pytest.param(user(PARAPHRASE), {}, CacheControl(semantic=False), id="opted out"),
        pytest.param(user("France?"), {}, None, id="shorter than min_chars"),
        pytest.param(
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}],
            {},
            None,
            id="an image",
        ),
        pytest.param(
            [
                {"role": "user", "content": QUESTION},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "Paris"},
                {"role": "user", "content": PARAPHRASE},
            ],
            {},
            None,
            id="tool calls in flight",
        ),
    ],
)
async def test_requests_that_must_match_exactly_skip_the_tier(
    semantic_cache: Callable[..., LLMCache],
    fake: FakeOpenAI,
    messages: list[dict[str, Any]],
    params: dict[str, Any],
    control: CacheControl | None,
) -> None:
    cache = semantic_cache()
    await cache.complete(user(QUESTION))
    await until(_indexed(cache, 1))
    embedded = fake.embedding_calls
    result = await cache.complete(messages, cache=control, **params)
    assert result.source == "upstream"
    assert cache.stats()["semantic_skipped"] == 1
    assert cache.stats()["semantic_lookups"] == 1  # only the first request's
    await asyncio.sleep(0)  # (an indexing task would have started by now)
    assert fake.embedding_calls == embedded  # neither looked up nor indexed


async def test_questions_about_other_numbers_never_match(
    semantic_cache: Callable[..., LLMCache], fake: FakeOpenAI
) -> None:
    # A low threshold, so that only the number guard stands between them.
    cache = semantic_cache(semantic=SemanticConfig(threshold=0.5))
    first = await cache.complete(user("Give me three tips for better sleep"))
    await until(_indexed(cache, 1))
    same = await cache.complete(user("Share 3 tips for better sleep"))
    assert same.source == "semantic" and same.key == first.key  # "three" is "3"
    other = await cache.complete(user("Give me ten tips for better sleep"))
    assert other.source == "upstream"
    assert cache.stats()["semantic_rejected"] >= 1


async def test_an_answer_written_by_another_process_is_found(
    redis_server: AnyRedis,
    fake: FakeOpenAI,
    namespace: str,
    semantic_cache: Callable[..., LLMCache],
) -> None:
    worker = await CacheWorker.start(redis_server, fake, namespace, "--semantic", "0.9")
    try:
        written = await worker.call(QUESTION)
        assert written["source"] == "upstream"
        admin = redis_server.client()
        try:

            async def stream_written() -> bool:
                return bool(await all_keys(admin, f"alc:{namespace}:0:v:*"))

            await until(stream_written)
        finally:
            await admin.aclose()
        cache = semantic_cache()
        found = await cache.complete(user(PARAPHRASE))
        assert found.source == "semantic"
        assert found.key == written["key"]
        assert found.text == written["text"]
        # ... and the other way round, without restarting the worker.
        mine = await cache.complete(user("Which river flows through Paris?"))
        assert mine.source == "upstream"
        await until(_indexed(cache, 1))
        theirs = await worker.call("river flows through Paris")
        assert theirs["source"] == "semantic"
        assert theirs["key"] == mine.key
        assert fake.calls() == 2
    finally:
        await worker.stop()


@pytest.mark.parametrize("how", ["key", "tag", "pattern", "everything"])
async def test_an_invalidated_answer_no_longer_matches(
    semantic_cache: Callable[..., LLMCache], fake: FakeOpenAI, how: str
) -> None:
    cache = semantic_cache()
    first = await cache.complete(user(QUESTION), cache=CacheControl(tags=["geo"]))
    await until(_indexed(cache, 1))
    assert (await cache.complete(user(PARAPHRASE))).source == "semantic"
    if how == "key":
        await cache.invalidate(key=first.key)
    elif how == "tag":
        await cache.invalidate(tag="geo")
    elif how == "pattern":
        await cache.invalidate(pattern=Pattern(model=MODEL))
    else:
        await cache.invalidate(everything=True)
    again = await cache.complete(user(PARAPHRASE))
    assert again.source == "upstream"
    assert fake.calls() == 2


async def test_an_expired_answer_no_longer_matches(
    semantic_cache: Callable[..., LLMCache], fake: FakeOpenAI
) -> None:
    cache = semantic_cache()
    first = await cache.complete(user(QUESTION), cache=CacheControl(ttl=0.3))
    await until(_indexed(cache, 1))
    assert (await cache.complete(user(PARAPHRASE))).source == "semantic"
    await asyncio.sleep(max(0.0, 0.35 - first.age))  # the answer's time runs out
    again = await cache.complete(user(PARAPHRASE))
    assert again.source == "upstream"


async def test_a_failing_embedder_costs_the_tier_not_the_call(
    semantic_cache: Callable[..., LLMCache], fake: FakeOpenAI
) -> None:
    cache = semantic_cache(semantic=SemanticConfig(threshold=0.9, failure_backoff=0))
    await cache.complete(user(QUESTION))
    await until(_indexed(cache, 1))
    fake.embeddings_status = 503
    try:
        result = await cache.complete(user(PARAPHRASE))
    finally:
        fake.embeddings_status = None
    assert result.source == "upstream"
    assert result.text == f"Answer to: {PARAPHRASE}"
    stats = cache.stats()
    assert stats["semantic_errors"] >= 1
    assert stats["embedding_failures"] >= 1
    # Back up: the tier works again.
    assert (await cache.complete(user("Please tell me: capital of France"))).source == "semantic"


async def test_an_embedder_that_hangs_is_bounded(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI
) -> None:
    class Hanging:
        name = "hanging"

        async def embed(self, texts: Any) -> Any:
            await asyncio.Event().wait()

    cache = make_cache(semantic=SemanticConfig(embedder=Hanging(), timeout=0.05))
    started = time.monotonic()
    result = await cache.complete(user(QUESTION))
    assert result.source == "upstream"
    assert time.monotonic() - started < 5
    assert cache.stats()["semantic_errors"] == 1


async def test_concurrent_texts_share_one_embeddings_request(
    semantic_cache: Callable[..., LLMCache], fake: FakeOpenAI
) -> None:
    cache = semantic_cache()
    prompts = [f"Describe the city number {n} in detail" for n in range(20)]
    before = fake.embedding_calls
    results = await asyncio.gather(*(cache.complete(user(p)) for p in prompts))
    assert {r.source for r in results} == {"upstream"}
    # The lookups reach the embedder a Redis round trip or two apart: they
    # share a request (one, unless the machine stalls past the window).
    requests = fake.embedding_calls - before
    assert requests <= 2
    await until(_indexed(cache, 20))
    assert fake.embedding_calls - before == requests  # indexing reused the vectors
    assert cache.stats()["embedding_texts"] == 20


async def test_a_foreign_record_in_a_partition_is_skipped(
    semantic_cache: Callable[..., LLMCache], redis_server: AnyRedis, namespace: str
) -> None:
    cache = semantic_cache()
    await cache.complete(user(QUESTION))
    await until(_indexed(cache, 1))
    admin = redis_server.client()
    try:
        (stream,) = await all_keys(admin, f"alc:{namespace}:0:v:*")
        await admin.xadd(stream, {"k": "zz", "v": b"\x00\x01", "d": "f9", "x": "soon"})
    finally:
        await admin.aclose()
    other = semantic_cache()  # reads the partition from Redis
    assert (await other.complete(user(PARAPHRASE))).source == "semantic"
    assert other.stats()["semantic_entries"] == 1


async def test_bad_settings_are_refused_before_any_io(openai_client: AsyncOpenAI) -> None:
    for bad, message in [
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": "high"}, "threshold"),
        ({"dtype": "int8"}, "dtype"),
        ({"max_entries": 0}, "max_entries"),
        ({"min_chars": 10, "max_chars": 5}, "max_chars"),
        ({"embedder": object()}, "embedder"),
    ]:
        with pytest.raises(ConfigurationError, match=message):
            SemanticConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="no embedder"):
        LLMCache(upstream=lambda p: p, semantic=SemanticConfig())  # type: ignore[arg-type,return-value]
    with pytest.raises(ConfigurationError, match="SemanticConfig"):
        LLMCache(openai=openai_client, semantic={"threshold": 0.9})  # type: ignore[arg-type]


async def test_an_opted_out_caller_never_gets_a_semantic_answer_from_another_callers_lookup(
    semantic_cache: Callable[..., LLMCache], fake: FakeOpenAI
) -> None:
    cache = semantic_cache()
    await cache.complete(user(QUESTION))
    fake.latency = 0.05  # keeps the paraphrase's lookup in flight while the second caller joins it
    opted_in = asyncio.create_task(cache.complete(user(PARAPHRASE)))
    await asyncio.sleep(0)
    opted_out = await cache.complete(user(PARAPHRASE), cache=CacheControl(semantic=False))
    assert (await opted_in).source == "semantic"
    assert opted_out.source == "upstream" and opted_out.similarity is None
    assert opted_out.text == f"Answer to: {PARAPHRASE}"


async def test_texts_waiting_for_an_embedding_fail_rather_than_hang_when_closing() -> None:
    from aiollmcache.embeddings import Embeddings
    from aiollmcache.errors import EmbeddingError

    class Slow:
        name = "slow"

        async def embed(self, texts: Any) -> Any:
            await asyncio.Event().wait()

    embeddings = Embeddings(Slow(), cache_size=10, timeout=60, window=0.01)
    waiting = [asyncio.create_task(embeddings.embed(f"text {n}")) for n in range(300)]
    await asyncio.sleep(0.05)  # the batch is out: two requests, both hanging
    await embeddings.aclose()
    results = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 5)
    assert all(isinstance(r, EmbeddingError) for r in results)
