"""LLMCache end to end: real redis-server, real openai SDK, FakeOpenAI."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import openai
import orjson
import pytest
from openai.types.chat import ChatCompletion

from aiollmcache import (
    CacheClosedError,
    CacheControl,
    ConfigurationError,
    InvalidRequestError,
    InvalidResponseError,
    LLMCache,
    Source,
)
from aiollmcache.testing import FakeOpenAI, RedisServer, chat_completion

from .conftest import MODEL, AnyRedis, all_keys, signalling, user

pytestmark = [pytest.mark.asyncio, pytest.mark.both_redis]


async def test_miss_then_memory_hit(cache: LLMCache, fake: FakeOpenAI) -> None:
    first = await cache.complete(user("What is Python?"))
    assert first.source == Source.UPSTREAM == "upstream"
    assert first.text == "Answer to: What is Python?"
    assert isinstance(first.response, ChatCompletion)
    assert not first.coalesced and not first.stale and first.similarity is None
    second = await cache.complete(user("What is Python?"))
    assert second.source == "memory"
    assert second.text == first.text and second.key == first.key
    assert second.response.id == first.response.id
    assert second.age >= 0
    assert fake.calls("What is Python?") == 1
    stats = cache.stats()
    assert stats["hits_memory"] == 1 and stats["upstream_calls"] == 1
    assert stats["tokens_saved_completion"] == first.response.usage.completion_tokens  # type: ignore[union-attr]


async def test_second_instance_hits_redis(make_cache: Callable[..., LLMCache], fake: FakeOpenAI) -> None:
    a, b = make_cache(), make_cache()
    first = await a.complete(user("shared"))
    hit = await b.complete(user("shared"))
    assert hit.source == "redis"
    assert hit.response == first.response
    assert fake.calls("shared") == 1
    again = await b.complete(user("shared"))
    assert again.source == "memory"  # promoted


async def test_redis_only_hit_with_memory_tier_disabled(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI
) -> None:
    c = make_cache(memory_max_entries=0)
    await c.complete(user("q"))
    for _ in range(3):
        assert (await c.complete(user("q"))).source == "redis"
    assert fake.calls() == 1
    assert c.stats()["memory_entries"] == 0


async def test_redis_key_layout_and_ttl(cache: LLMCache, redis_server: AnyRedis, namespace: str) -> None:
    result = await cache.complete(user("layout"), cache=CacheControl(ttl=120))
    r = redis_server.client()
    try:
        keys = await all_keys(r, f"alc:{namespace}:*")
        entry_key = f"alc:{namespace}:0:e:{{{result.key}}}".encode()
        assert sorted(keys) == [entry_key, f"alc:{namespace}:sync".encode()]  # + the invalidation count
        pttl = await r.pttl(entry_key)
        assert 110_000 < pttl <= 120_000
    finally:
        await r.aclose()


async def test_namespace_version_is_part_of_the_key(
    make_cache: Callable[..., LLMCache], redis_server: AnyRedis, namespace: str, fake: FakeOpenAI
) -> None:
    a = make_cache()
    await a.complete(user("versioned"))
    r = redis_server.client()
    try:
        await r.set(f"alc:{namespace}:version", 7)
    finally:
        await r.aclose()
    b = make_cache()
    assert (await b.complete(user("versioned"))).source == "upstream"
    assert fake.calls("versioned") == 2


async def test_namespaces_are_isolated(make_cache: Callable[..., LLMCache], fake: FakeOpenAI) -> None:
    await make_cache(namespace="tenant-a").complete(user("iso"))
    assert (await make_cache(namespace="tenant-b").complete(user("iso"))).source == "upstream"


async def test_different_requests_never_share_an_answer(cache: LLMCache, fake: FakeOpenAI) -> None:
    base = await cache.complete(user("same"))
    variants = [
        await cache.complete([{"role": "system", "content": "pirate"}, *user("same")]),
        await cache.complete(user("same"), model="other-model"),
        await cache.complete(user("same"), temperature=0.9),
        await cache.complete(user("same"), response_format={"type": "json_object"}),
    ]
    assert all(v.source == "upstream" and v.key != base.key for v in variants)
    assert len({v.key for v in variants}) == len(variants)


async def test_excluded_params_share_the_answer(cache: LLMCache, fake: FakeOpenAI) -> None:
    await cache.complete(user("who"), user="alice")
    hit = await cache.complete(user("who"), user="bob", metadata={"x": "y"}, timeout=30)
    assert hit.source == "memory"


async def test_ttl_expiry(make_cache: Callable[..., LLMCache], fake: FakeOpenAI) -> None:
    c = make_cache(ttl=0.3)
    await c.complete(user("short"))
    assert (await c.complete(user("short"))).source == "memory"
    await asyncio.sleep(0.35)  # let the fresh window pass: time itself is under test
    assert (await c.complete(user("short"))).source == "upstream"
    assert fake.calls("short") == 2


async def test_per_request_ttl_and_max_age(cache: LLMCache, fake: FakeOpenAI) -> None:
    await cache.complete(user("aged"))
    await asyncio.sleep(0.05)
    fresh = await cache.complete(user("aged"), cache=CacheControl(max_age=0.01))
    assert fresh.source == "upstream"
    assert (await cache.complete(user("aged"), cache=CacheControl(max_age=60))).source == "memory"


async def test_no_cache_and_no_store(cache: LLMCache, fake: FakeOpenAI) -> None:
    await cache.complete(user("nc"))
    forced = await cache.complete(user("nc"), cache=CacheControl(no_cache=True))
    assert forced.source == "upstream" and fake.calls("nc") == 2
    # the forced answer replaced the stored one
    assert (await cache.complete(user("nc"))).response.id == forced.response.id

    await cache.complete(user("ns"), cache=CacheControl(no_store=True))
    assert (await cache.complete(user("ns"))).source == "upstream"
    assert fake.calls("ns") == 2


async def test_memory_bounds_hold(make_cache: Callable[..., LLMCache], fake: FakeOpenAI) -> None:
    c = make_cache(memory_max_entries=3)
    for i in range(10):
        await c.complete(user(f"q{i}"))
    stats = c.stats()
    assert stats["memory_entries"] == 3 and stats["memory_evictions"] == 7
    assert (await c.complete(user("q0"))).source == "redis"
    fake.answer_chars = 5000
    small = make_cache(memory_max_bytes=50_000)
    for i in range(10):
        await small.complete(user(f"big{i}"))
        assert small.stats()["memory_bytes"] <= 50_000
    fake.answer_chars = 0


async def test_large_answers_are_compressed_in_redis(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI, redis_server: AnyRedis
) -> None:
    fake.answer_chars = 100_000
    try:
        c = make_cache(memory_max_entries=0)
        first = await c.complete(user("big"))
        r = redis_server.client()
        try:
            (key,) = await all_keys(r, "alc:*{" + first.key + "}")
            assert await r.strlen(key) < 20_000
        finally:
            await r.aclose()
        hit = await c.complete(user("big"))
        assert hit.source == "redis" and hit.text == first.text
    finally:
        fake.answer_chars = 0


async def test_entries_above_the_size_limit_are_not_stored(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI
) -> None:
    fake.answer_chars = 20_000
    try:
        c = make_cache(max_entry_bytes=10_000)
        await c.complete(user("huge"))
        assert (await c.complete(user("huge"))).source == "upstream"
        assert c.stats()["store_skipped"] == 2
    finally:
        fake.answer_chars = 0


@pytest.mark.parametrize(
    "garbage",
    [b"not an entry", b"\x80\x04\x95\x00pickle", orjson.dumps({"text": "foreign"}), b"\xa1LC\x09\x00future"],
)
async def test_corrupt_bytes_in_redis_are_a_miss(
    make_cache: Callable[..., LLMCache],
    fake: FakeOpenAI,
    redis_server: AnyRedis,
    namespace: str,
    garbage: bytes,
) -> None:
    writer = make_cache()
    first = await writer.complete(user("corrupt me"))
    rkey = f"alc:{namespace}:0:e:{{{first.key}}}"
    r = redis_server.client()
    try:
        await r.set(rkey, garbage)
        reader = make_cache()
        result = await reader.complete(user("corrupt me"))
        assert result.source == "upstream" and result.text == first.text
        assert reader.stats()["corrupt_entries"] == 1
        stored = await r.get(rkey)
        assert stored is not None and stored != garbage  # replaced by a valid entry
        assert (await make_cache(memory_max_entries=0).complete(user("corrupt me"))).source == "redis"
    finally:
        await r.aclose()


async def test_a_foreign_type_at_the_key_is_a_corrupt_miss(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI, redis_server: AnyRedis, namespace: str
) -> None:
    first = await make_cache().complete(user("wrong type"))
    rkey = f"alc:{namespace}:0:e:{{{first.key}}}"
    r = redis_server.client()
    try:
        await r.delete(rkey)
        await r.rpush(rkey, "not", "a", "string")
        reader = make_cache()
        assert (await reader.complete(user("wrong type"))).source == "upstream"
        assert reader.stats()["corrupt_entries"] == 1
        assert reader.stats()["redis_errors"] == 0
        assert await r.type(rkey) == b"string"
    finally:
        await r.aclose()


async def test_two_providers_never_share_answers(cache: LLMCache) -> None:
    async with (
        FakeOpenAI(reply=lambda req: "from provider A") as a,
        FakeOpenAI(reply=lambda req: "from provider B") as b,
    ):
        client_a, client_b = a.client(), b.client()
        try:
            wrapped_a, wrapped_b = cache.wrap(client_a), cache.wrap(client_b)
            got = await asyncio.gather(
                wrapped_a.chat.completions.create(model=MODEL, messages=user("who are you")),
                wrapped_b.chat.completions.create(model=MODEL, messages=user("who are you")),
            )
            assert [g.choices[0].message.content for g in got] == ["from provider A", "from provider B"]
            assert a.calls() == b.calls() == 1
        finally:
            await client_a.close()
            await client_b.close()


async def test_close_during_open_wins(redis_server: AnyRedis, openai_client: openai.AsyncOpenAI) -> None:
    c = LLMCache(redis_url=redis_server.url, openai=openai_client, model=MODEL)
    opening = asyncio.create_task(c.open())
    await asyncio.sleep(0)  # open() is now waiting on Redis
    await asyncio.gather(c.aclose(), c.aclose())
    await opening
    assert c.closed
    with pytest.raises(CacheClosedError):
        await c.complete(user("after close"))


async def test_bad_input_fails_before_any_io(fake: FakeOpenAI) -> None:
    # A Redis URL nobody listens on: any I/O would be counted as a Redis error.
    dead = LLMCache(redis_url="redis://127.0.0.1:1/0", openai=fake.client(), model=MODEL)
    try:
        for messages in ([], [{"role": "robot", "content": "x"}], [{"role": "user", "content": object()}]):
            with pytest.raises(InvalidRequestError):
                await dead.complete(messages)  # type: ignore[arg-type]
        with pytest.raises(InvalidRequestError, match="temperature"):
            await dead.complete(user("x"), temperature=float("nan"))
        with pytest.raises(InvalidRequestError, match="stream"):
            await dead.complete(user("x"), stream=True)
        assert fake.calls() == 0
        assert dead.stats()["redis_errors"] == 0 and dead.stats()["requests"] == 0
    finally:
        await dead.aclose()


async def test_upstream_errors_reach_the_caller_and_are_not_cached(cache: LLMCache, fake: FakeOpenAI) -> None:
    fake.fail(500, prompt="boom")
    with pytest.raises(openai.InternalServerError):
        await cache.complete(user("boom"))
    fake.fail(429, prompt="boom")
    with pytest.raises(openai.RateLimitError):
        await cache.complete(user("boom"))
    ok = await cache.complete(user("boom"))
    assert ok.source == "upstream" and fake.calls("boom") == 3
    assert cache.stats()["upstream_errors"] == 2


async def test_sdk_retries_are_respected_not_doubled(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI
) -> None:
    client = fake.client(max_retries=1)
    try:
        c = make_cache(openai=client)
        fake.fail(503, prompt="flaky", times=1)
        result = await c.complete(user("flaky"))
        assert result.source == "upstream"
        assert fake.calls("flaky") == 2  # one failure, one SDK retry, no retry of ours
    finally:
        await client.close()


async def test_concurrent_identical_requests_cost_one_call(cache: LLMCache, fake: FakeOpenAI) -> None:
    fake.latency = 0.2
    results = await asyncio.gather(*(cache.complete(user("stampede")) for _ in range(200)))
    assert fake.calls("stampede") == 1
    assert {r.text for r in results} == {"Answer to: stampede"}
    assert sum(r.coalesced for r in results) == 199
    assert cache.stats()["coalesced"] == 199


async def test_concurrent_failure_reaches_every_waiter_once(cache: LLMCache, fake: FakeOpenAI) -> None:
    fake.latency = 0.1
    fake.fail(500, prompt="fails")
    results = await asyncio.gather(
        *(cache.complete(user("fails")) for _ in range(20)), return_exceptions=True
    )
    assert all(isinstance(r, openai.InternalServerError) for r in results)
    assert fake.calls("fails") == 1


async def test_cancelled_caller_does_not_cancel_the_shared_call(
    make_cache: Callable[..., LLMCache], openai_client: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    started, upstream = signalling(openai_client)
    cache = make_cache(openai=None, upstream=upstream)
    fake.latency = 0.3
    leader = asyncio.create_task(cache.complete(user("cancel")))
    followers = [asyncio.create_task(cache.complete(user("cancel"))) for _ in range(5)]
    await started.wait()  # the followers joined before the leader's Redis read returned
    assert cache.stats()["inflight"] == 1
    leader.cancel()
    followers[0].cancel()
    results = await asyncio.gather(*followers[1:])
    assert all(r.text == "Answer to: cancel" for r in results)
    with pytest.raises(asyncio.CancelledError):
        await leader
    assert fake.calls("cancel") == 1
    assert (await cache.complete(user("cancel"))).source == "memory"  # stored although its caller left


async def test_caller_timeout_ends_only_its_own_wait(cache: LLMCache, fake: FakeOpenAI) -> None:
    fake.latency = 0.3
    patient = asyncio.create_task(cache.complete(user("timeout")))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(cache.complete(user("timeout")), 0.05)
    assert (await patient).source == "upstream"
    assert fake.calls("timeout") == 1


async def test_embedded_default_needs_no_redis(openai_client: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    async with LLMCache(openai=openai_client, model=MODEL) as c:
        assert (await c.complete(user("local"))).source == "upstream"
        assert (await c.complete(user("local"))).source == "memory"
    assert fake.calls("local") == 1


async def test_redis_down_falls_back_to_memory_and_upstream(
    openai_client: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    async with LLMCache(redis_url="redis://127.0.0.1:1/0", openai=openai_client, model=MODEL) as c:
        assert (await c.complete(user("down"))).source == "upstream"
        assert (await c.complete(user("down"))).source == "memory"
        assert c.stats()["redis_errors"] >= 1


async def test_custom_upstream_callable() -> None:
    seen = []

    async def upstream(params: dict[str, object]) -> dict[str, object]:
        seen.append(params)
        return chat_completion("custom", model=str(params["model"]))

    async with LLMCache(upstream=upstream, model="m") as c:
        assert (await c.complete(user("hi"), temperature=0)).text == "custom"
        assert (await c.complete(user("hi"), temperature=0.0)).source == "memory"
    assert len(seen) == 1 and seen[0]["temperature"] == 0


async def test_invalid_upstream_response_is_an_error_and_not_cached() -> None:
    calls = 0

    async def upstream(params: dict[str, object]) -> dict[str, object]:
        nonlocal calls
        calls += 1
        return {"not": "a completion"}

    async with LLMCache(upstream=upstream, model="m") as c:
        for _ in range(2):
            with pytest.raises(InvalidResponseError):
                await c.complete(user("hi"))
    assert calls == 2


async def test_closed_cache_refuses_work(openai_client: openai.AsyncOpenAI) -> None:
    c = LLMCache(openai=openai_client, model=MODEL)
    await c.complete(user("a"))
    await c.aclose()
    await c.aclose()  # idempotent
    with pytest.raises(CacheClosedError):
        await c.complete(user("a"))


async def test_aclose_lets_calls_in_flight_finish(
    openai_client: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    started, upstream = signalling(openai_client)
    fake.latency = 0.2
    c = LLMCache(upstream=upstream, model=MODEL)
    pending = asyncio.create_task(c.complete(user("late")))
    await started.wait()
    await c.aclose()
    assert (await pending).text == "Answer to: late"


async def test_callers_waiting_when_the_cache_closes_get_closed_errors(
    openai_client: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    started, upstream = signalling(openai_client)
    fake.latency = 1.0
    c = LLMCache(upstream=upstream, model=MODEL, close_timeout=0.05)
    callers = [asyncio.create_task(c.complete(user("closing"))) for _ in range(3)]
    await started.wait()
    await c.aclose()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(r, CacheClosedError) for r in results)
    assert fake.calls("closing") == 1
    assert c.stats()["stores"] == 0


async def test_wrong_types_fail_with_clear_errors(cache: LLMCache) -> None:
    with pytest.raises(InvalidRequestError, match="cache: expected a CacheControl"):
        await cache.complete(user("x"), cache={"ttl": 5})  # type: ignore[arg-type]
    for kwargs, fragment in (
        ({"redis": object()}, "redis: expected"),
        ({"openai": "sk-key"}, "openai: expected"),
        ({"upstream": "not callable"}, "upstream: expected"),
        ({"on_wait_timeout": "ignore"}, "on_wait_timeout"),
    ):
        with pytest.raises(ConfigurationError, match=fragment):
            LLMCache(**kwargs)  # type: ignore[arg-type]


async def test_no_upstream_configured(fake: FakeOpenAI) -> None:
    async with LLMCache(model=MODEL) as c:
        with pytest.raises(ConfigurationError, match="upstream"):
            await c.complete(user("x"))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ttl": 0},
        {"ttl": -1},
        {"ttl": float("inf")},
        {"stale_ttl": "1h"},
        {"memory_max_entries": -1},
        {"namespace": "a:b"},
        {"namespace": "{x}"},
        {"namespace": ""},
        {"redis_url": "redis://x", "redis": object()},
        {"model": ""},
        {"redis_url": "nope://host"},
        {"semantic": object()},
        {"sync_interval": 0},
        {"sync_interval": "1s"},
    ],
)
async def test_bad_configuration_is_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        LLMCache(**kwargs)  # type: ignore[arg-type]


async def test_cache_control_validation() -> None:
    from datetime import timedelta

    assert CacheControl(ttl=timedelta(minutes=1)).ttl == 60.0
    for bad in (
        {"ttl": 0},
        {"ttl": float("inf")},
        {"max_age": -1},
        {"max_age": "1h"},
        {"tags": "single"},
        {"tags": [""]},
        {"tags": ["{x}"]},
        {"tags": ["x" * 257]},
        {"tags": [3]},
    ):
        with pytest.raises(InvalidRequestError, match="CacheControl"):
            CacheControl(**bad)  # type: ignore[arg-type]
    assert CacheControl(tags=["a", "b", "a"]).tags == ("a", "b")
    assert CacheControl(tags=None).tags == ()


async def test_from_env_with_only_a_base_url(monkeypatch: pytest.MonkeyPatch, fake: FakeOpenAI) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("AIOLLMCACHE_REDIS_URL", raising=False)
    monkeypatch.setenv("OPENAI_BASE_URL", fake.base_url)
    async with LLMCache.from_env(model=MODEL) as c:
        assert (await c.complete(user("keyless"))).text == "Answer to: keyless"


async def test_from_env(monkeypatch: pytest.MonkeyPatch, redis_server: AnyRedis, fake: FakeOpenAI) -> None:
    monkeypatch.setenv("AIOLLMCACHE_REDIS_URL", redis_server.url)
    monkeypatch.setenv("AIOLLMCACHE_NAMESPACE", "fromenv")
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    monkeypatch.setenv("OPENAI_BASE_URL", fake.base_url)
    async with LLMCache.from_env(model=MODEL) as c:
        result = await c.complete(user("env"), cache=CacheControl(no_cache=True))
        assert result.source == "upstream"
    r = redis_server.client()
    try:
        assert await r.exists(f"alc:fromenv:0:e:{{{result.key}}}")
    finally:
        await r.aclose()


async def test_hung_redis_costs_a_bounded_wait(openai_client: openai.AsyncOpenAI, fake: FakeOpenAI) -> None:
    with RedisServer() as server:
        async with LLMCache(redis_url=server.url, openai=openai_client, model=MODEL, redis_timeout=0.2) as c:
            server.pause()  # SIGSTOP: connections stay open, nothing answers
            try:
                async with asyncio.timeout(5):  # a hang would fail here, not in the suite's timeout
                    result = await c.complete(user("hung redis"))
            finally:
                server.resume()
        assert result.source == "upstream"
        assert c.stats()["redis_errors"] >= 2
        assert fake.calls("hung redis") == 1


async def test_a_callers_cancellation_is_not_taken_for_a_redis_timeout(
    openai_client: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    with RedisServer() as server:
        async with LLMCache(redis_url=server.url, openai=openai_client, model=MODEL, redis_timeout=5) as c:
            server.pause()
            try:
                task = asyncio.create_task(c.complete(user("cancel while hung")))
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(task), 0.2)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            finally:
                server.resume()
        assert c.stats()["redis_errors"] == 0
        assert fake.calls("cancel while hung") == 0
