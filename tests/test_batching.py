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


async def reads_sent(server: RedisServer, *, reset: bool = False) -> dict[str, int]:
    """GET, MGET and EVALSHA commands the server has run (since the last reset)."""
    admin = aioredis.Redis.from_url(server.url)
    try:
        if reset:
            await admin.config_resetstat()
        stats = await admin.info("commandstats")
        return {
            name: int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("get", "mget", "evalsha")
        }
    finally:
        await admin.aclose()


async def connections(server: RedisServer) -> int:
    admin = aioredis.Redis.from_url(server.url)
    try:
        return len(await admin.client_list(_type="normal")) - 1  # not this one
    finally:
        await admin.aclose()


@pytest.mark.parametrize("hot", [False, True], ids=["get", "hot-key script"])
@pytest.mark.parametrize("batching", [True, False], ids=["batched", "unbatched"])
async def test_concurrent_reads_share_round_trips(own_redis: RedisServer, batching: bool, hot: bool) -> None:
    prompts = [f"q{n}" for n in range(300)]
    async with LLMCache(
        redis_url=own_redis.url,
        upstream=model,
        model=MODEL,
        namespace="n",
        memory_max_entries=0,
        redis_batching=batching,
        hot_hits=1000 if hot else 0,
        sync_interval=600,  # no periodic script call among the reads counted
    ) as cache:
        for start in range(0, 300, 10):
            await asyncio.gather(*(cache.complete(user(p)) for p in prompts[start : start + 10]))
        await reads_sent(own_redis, reset=True)
        results = await asyncio.gather(*(cache.complete(user(p)) for p in prompts))
        sent = await reads_sent(own_redis)
        assert [r.text for r in results] == [f"Answer to: {p}" for p in prompts]
        assert {r.source for r in results} == {"redis"}
        opened = await connections(own_redis)
        if hot:  # every read was counted, batched or not
            admin = aioredis.Redis.from_url(own_redis.url)
            try:
                hits = await admin.mget([f"alc:n:0:h:{{{cache.key_for(user(p))}}}" for p in prompts])
            finally:
                await admin.aclose()
            assert hits == [b"1"] * len(prompts)
    # The first read goes alone (none other was in flight); the other 299
    # ride in batches of at most 256 reads.
    if hot:  # (the server counts the GETs run inside the scripts too)
        assert sent == {"get": 300, "mget": 0, "evalsha": 3 if batching else 300}
    elif batching:
        assert sent == {"get": 1, "mget": 2, "evalsha": 0}
    else:
        assert sent == {"get": 300, "mget": 0, "evalsha": 0}
    if batching:
        assert opened <= 12  # not a connection per reader
    else:
        assert opened > 30  # a command, and a pooled connection, per reader


@pytest.mark.parametrize("hot", [False, True], ids=["get", "hot-key script"])
async def test_a_foreign_value_in_a_batch_fails_only_its_own_read(own_redis: RedisServer, hot: bool) -> None:
    async with LLMCache(
        redis_url=own_redis.url,
        upstream=model,
        model=MODEL,
        namespace="n",
        memory_max_entries=0,
        hot_hits=1000 if hot else 0,
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
