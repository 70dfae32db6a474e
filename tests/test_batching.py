"""Concurrent Redis reads share round trips, each keeping its own outcome."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis

from aiollmcache import LLMCache
from aiollmcache.testing import RedisServer, chat_completion

from .conftest import MODEL, user

pytestmark = pytest.mark.asyncio


async def model(params: dict[str, Any]) -> dict[str, Any]:
    return chat_completion(f"Answer to: {params['messages'][-1]['content']}", model=MODEL)


async def connections(server: RedisServer) -> int:
    admin = aioredis.Redis.from_url(server.url)
    try:
        return len(await admin.client_list(_type="normal")) - 1  # not this one
    finally:
        await admin.aclose()


@pytest.mark.parametrize("batching", [True, False])
async def test_concurrent_reads_share_round_trips(own_redis: RedisServer, batching: bool) -> None:
    prompts = [f"q{n}" for n in range(300)]
    async with LLMCache(
        redis_url=own_redis.url, upstream=model, model=MODEL, memory_max_entries=0, redis_batching=batching
    ) as cache:
        for start in range(0, 300, 10):
            await asyncio.gather(*(cache.complete(user(p)) for p in prompts[start : start + 10]))
        results = await asyncio.gather(*(cache.complete(user(p)) for p in prompts))
        assert [r.text for r in results] == [f"Answer to: {p}" for p in prompts]
        assert {r.source for r in results} == {"redis"}
        opened = await connections(own_redis)
    if batching:
        assert opened <= 12  # one pipeline per tick, not a connection per reader
    else:
        assert opened > 30  # a command, and a pooled connection, per reader


async def test_a_foreign_value_in_a_batch_fails_only_its_own_read(own_redis: RedisServer) -> None:
    async with LLMCache(
        redis_url=own_redis.url, upstream=model, model=MODEL, namespace="n", memory_max_entries=0
    ) as cache:
        prompts = [f"q{n}" for n in range(20)]
        for p in prompts:
            await cache.complete(user(p))
        admin = aioredis.Redis.from_url(own_redis.url)
        try:
            bad = cache.key_for(user("q7"))
            await admin.delete(f"alc:n:0:e:{{{bad}}}")
            await admin.rpush(f"alc:n:0:e:{{{bad}}}", "a list, not an entry")
        finally:
            await admin.aclose()
        results = await asyncio.gather(*(cache.complete(user(p)) for p in prompts))
        assert [r.source for r in results] == ["upstream" if p == "q7" else "redis" for p in prompts]
        assert all(r.text == f"Answer to: {p}" for p, r in zip(prompts, results, strict=True))
        assert cache.stats()["corrupt_entries"] == 1


async def test_a_cancelled_leader_leaves_the_others_their_answers(own_redis: RedisServer) -> None:
    async with LLMCache(redis_url=own_redis.url, upstream=model, model=MODEL, memory_max_entries=0) as cache:
        prompts = [f"q{n}" for n in range(10)]
        for p in prompts:
            await cache.complete(user(p))
        calls = [asyncio.create_task(cache.complete(user(p))) for p in prompts]
        # The first read goes out alone (none was in flight); the second leads
        # a batch that the others join.
        await asyncio.sleep(0)
        calls[1].cancel()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert isinstance(results[1], asyncio.CancelledError)
        others = results[:1] + results[2:]
        assert all(not isinstance(r, BaseException) and r.source == "redis" for r in others)
        assert cache.stats()["redis_errors"] == 0  # nobody waited out its budget for a lost reply
