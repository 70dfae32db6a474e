"""Faults on a real redis-server of each test's own: killed under load and
restarted on the same port, frozen (SIGSTOP), its pool exhausted. Every caller
gets a correct answer or a clear error; no wrong answer is ever served."""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import openai
import pytest

from aiollmcache import LLMCache
from aiollmcache.testing import FakeOpenAI, RedisServer

from .conftest import MODEL, until, user

pytestmark = pytest.mark.asyncio

PROMPTS = [f"fault prompt {n}" for n in range(20)]


def expected(prompt: str) -> str:
    return f"Answer to: {prompt}"  # what FakeOpenAI answers


async def test_redis_killed_under_load_and_restarted_on_the_same_port(
    own_redis: RedisServer, openai_client: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    fake.latency = 0.02
    outcomes: collections.Counter[str] = collections.Counter()
    wrong: list[tuple[str, str]] = []
    done = 0
    milestones = {400: asyncio.Event(), 1600: asyncio.Event(), 3200: asyncio.Event()}
    stop = asyncio.Event()

    async with LLMCache(
        redis_url=own_redis.url, openai=openai_client, model=MODEL, redis_timeout=0.3, memory_max_entries=5
    ) as cache:

        async def caller(n: int) -> None:
            nonlocal done
            while not stop.is_set():
                prompt = PROMPTS[(n + done) % len(PROMPTS)]
                try:
                    result = await cache.complete(user(prompt))
                except Exception as exc:  # counted, and the test fails on any
                    outcomes[f"error {type(exc).__name__}: {exc}"] += 1
                else:
                    outcomes[str(result.source)] += 1
                    if result.text != expected(prompt):
                        wrong.append((prompt, result.text))
                done += 1
                for count, reached in milestones.items():
                    if done >= count:
                        reached.set()

        callers = [asyncio.create_task(caller(n)) for n in range(200)]
        try:
            await milestones[400].wait()
            own_redis.kill()  # under load: connections drop mid-command
            await milestones[1600].wait()
            assert cache.stats()["redis_breaker_open"] == 1
            await asyncio.to_thread(own_redis.restart)  # empty, on the same port

            async def back() -> bool:
                return cache.stats()["redis_breaker_open"] == 0

            await until(back)
            await milestones[3200].wait()
        finally:
            stop.set()
            await asyncio.gather(*callers)
        stats = cache.stats()
        # A Redis hit after the restart: what this process stored there again.
        await cache.complete(user("after the restart"))
        cache._memory.clear()
        assert (await cache.complete(user("after the restart"))).source == "redis"

    errors = {k: v for k, v in outcomes.items() if k.startswith("error")}
    assert errors == {}
    assert wrong == []
    assert stats["redis_breaker_opened"] >= 1
    assert stats["redis_skipped"] > 0  # calls went on without waiting for Redis
    assert outcomes["redis"] > 0 and outcomes["upstream"] > 0


async def test_single_flight_holds_in_a_process_while_redis_is_down(
    own_redis: RedisServer, openai_client: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    fake.latency = 0.1
    async with LLMCache(
        redis_url=own_redis.url, openai=openai_client, model=MODEL, breaker_failures=1
    ) as cache:
        own_redis.kill()
        results = await asyncio.gather(*(cache.complete(user("while down")) for _ in range(200)))
        assert fake.calls("while down") == 1
        assert all(r.text == expected("while down") for r in results)
        assert sum(not r.coalesced for r in results) == 1  # the others shared its call
        assert cache.stats()["redis_breaker_open"] == 1


async def test_a_frozen_redis_costs_one_budget_then_none(
    own_redis: RedisServer, openai_client: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    async with LLMCache(
        redis_url=own_redis.url,
        openai=openai_client,
        model=MODEL,
        redis_timeout=0.2,
        breaker_failures=2,
        breaker_probe_interval=0.1,
    ) as cache:
        await cache.complete(user("warm"))
        own_redis.pause()  # SIGSTOP: connections stay open, nothing answers
        try:
            assert (await cache.complete(user("warm"))).source == "memory"
            async with asyncio.timeout(5):
                first = await cache.complete(user("cold 1"))  # waits out the budget

            async def opened() -> bool:  # once a PING of its own went unanswered too
                return cache.stats()["redis_breaker_open"] == 1

            await until(opened)
            loop = asyncio.get_running_loop()
            started = loop.time()
            second = await cache.complete(user("cold 2"))
            skipped_wait = loop.time() - started
            stats = cache.stats()
        finally:
            own_redis.resume()
        assert (first.source, second.source) == ("upstream", "upstream")
        assert stats["redis_breaker_open"] == 1 and stats["redis_skipped"] >= 1
        assert skipped_wait < 0.2  # less than one Redis budget: Redis was not waited on

        async def back() -> bool:
            return cache.stats()["redis_breaker_open"] == 0

        await until(back)
        await cache.complete(user("cold 3"))
        cache._memory.clear()
        assert (await cache.complete(user("cold 3"))).source == "redis"


async def test_an_exhausted_pool_is_not_taken_for_redis_being_down(
    own_redis: RedisServer, openai_client: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    async with LLMCache(
        redis_url=own_redis.url,
        openai=openai_client,
        model=MODEL,
        memory_max_entries=0,
        redis_max_connections=2,
        redis_timeout=0.05,
        breaker_failures=1,
    ) as cache:
        prompts = [f"busy {n}" for n in range(1000)]
        for start in range(0, 1000, 50):
            await asyncio.gather(*(cache.complete(user(p)) for p in prompts[start : start + 50]))
        fake.reset()
        # 1000 concurrent reads of distinct keys through 2 connections (one of
        # them the subscriber's), each allowed 50 ms: many run out of time
        # waiting for a connection, while the others complete.
        results = await asyncio.gather(*(cache.complete(user(p)) for p in prompts))
        assert all(r.text == expected(p) for p, r in zip(prompts, results, strict=True))
        stats = cache.stats()
        assert stats["redis_errors"] > 0  # the pool did run dry
        assert stats["redis_breaker_opened"] == 0
        assert sum(r.source == "redis" for r in results) > 0


async def test_a_stalled_event_loop_is_not_taken_for_redis_being_down(
    own_redis: RedisServer, openai_client: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    import time

    async with LLMCache(
        redis_url=own_redis.url,
        openai=openai_client,
        model=MODEL,
        memory_max_entries=0,
        redis_timeout=0.2,
        breaker_failures=1,
    ) as cache:
        await cache.complete(user("stall"))
        reads = [asyncio.create_task(cache.complete(user("stall"))) for _ in range(20)]
        await asyncio.sleep(0)  # the reads are sent
        time.sleep(0.4)  # noqa: ASYNC251  # the loop stalls past their budget, as a blocking call would
        results = await asyncio.gather(*reads)
        assert all(r.text == expected("stall") for r in results)
        assert cache.stats()["redis_breaker_opened"] == 0
        assert (await cache.complete(user("stall"))).source == "redis"


async def test_redis_errors_replies_do_not_open_the_breaker(
    own_redis: RedisServer, openai_client: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    import redis.asyncio as aioredis

    async with LLMCache(
        redis_url=own_redis.url, openai=openai_client, model=MODEL, namespace="n", breaker_failures=1
    ) as cache:
        key = cache.key_for(user("wrong type"))
        admin = aioredis.Redis.from_url(own_redis.url)
        try:
            await admin.rpush(f"alc:n:0:e:{{{key}}}", "a list, not an entry")
        finally:
            await admin.aclose()
        result = await cache.complete(user("wrong type"))
        assert result.source == "upstream" and result.text == expected("wrong type")
        stats: dict[str, Any] = cache.stats()
        assert stats["corrupt_entries"] == 1 and stats["redis_breaker_opened"] == 0


async def test_stale_answers_are_refreshed_without_redis(
    own_redis: RedisServer, openai_client: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    from aiollmcache import CacheControl

    async with LLMCache(
        redis_url=own_redis.url, openai=openai_client, model=MODEL, breaker_failures=1
    ) as cache:
        short = CacheControl(ttl=0.05, stale_ttl=60)
        await cache.complete(user("refresh me"), cache=short)
        own_redis.kill()

        async def served_stale() -> bool:
            return (await cache.complete(user("refresh me"), cache=short)).stale

        await until(served_stale)  # past its 50 ms: served stale, a refresh started

        async def refreshed() -> bool:
            return fake.calls("refresh me") >= 2  # each answer is fresh for 50 ms: refreshed again and again

        try:
            await until(refreshed)
        except TimeoutError:
            raise AssertionError(cache.stats()) from None
        stats = cache.stats()
        assert stats["refresh_errors"] == 0 and stats["redis_breaker_open"] == 1


async def test_the_breaker_is_gone_with_the_cache(
    own_redis: RedisServer, openai_client: openai.AsyncOpenAI, fake: FakeOpenAI
) -> None:
    cache = LLMCache(redis_url=own_redis.url, openai=openai_client, model=MODEL, breaker_failures=1)
    await cache.complete(user("x"))
    own_redis.kill()
    await cache.complete(user("y"))
    assert cache.stats()["redis_breaker_open"] == 1
    await cache.aclose()
    names = {t.get_name() for t in asyncio.all_tasks()}
    assert not names & {"aiollmcache-probe", "aiollmcache-verify"}
