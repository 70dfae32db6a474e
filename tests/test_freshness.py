"""Freshness on real Redis: stale-while-revalidate, early refresh, per-request windows.

Entries here get short windows (a fraction of a second) and the tests sleep
past them: the passing of time is what is under test. Background refreshes
are awaited by closing the cache, which drains them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from aiollmcache import CacheControl, LLMCache
from aiollmcache.testing import FakeOpenAI

from .conftest import AnyRedis, all_keys, user

pytestmark = [pytest.mark.asyncio, pytest.mark.both_redis]


async def test_stale_answer_is_served_at_once_and_refreshed_once(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI
) -> None:
    writer = make_cache(ttl=0.3, stale_ttl=60)
    first = await writer.complete(user("swr"))
    await asyncio.sleep(0.35)
    fake.latency = 0.3  # the refresh takes a while; callers must not wait for it
    reader = make_cache(ttl=0.3, stale_ttl=60)
    results = await asyncio.gather(*(reader.complete(user("swr")) for _ in range(20)))
    assert {r.response.id for r in results} == {first.response.id}
    assert all(r.stale for r in results)  # nobody waited for the model (0.3 s)
    await reader.aclose()  # drains the background refresh
    assert fake.calls("swr") == 2
    stats = reader.stats()
    assert stats["refreshes"] == 1 and stats["stale_served"] == 20 and stats["refresh_errors"] == 0
    fresh = await make_cache().complete(user("swr"))
    assert not fresh.stale and fresh.response.id != first.response.id


async def test_memory_tier_serves_stale_too_and_learns_the_refresh(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI
) -> None:
    c = make_cache(ttl=0.3, stale_ttl=60)
    first = await c.complete(user("stale in memory"))
    await asyncio.sleep(0.35)
    stale = await c.complete(user("stale in memory"))
    assert (stale.source, stale.stale, stale.response.id) == ("memory", True, first.response.id)
    await asyncio.gather(*c._tasks)  # the background refresh, owned by the cache
    assert fake.calls("stale in memory") == 2
    after = await c.complete(user("stale in memory"))
    assert (after.source, after.stale) == ("memory", False)
    assert after.response.id != first.response.id


async def test_failed_refresh_keeps_serving_the_stale_answer(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI
) -> None:
    writer = make_cache(ttl=0.3, stale_ttl=60)
    first = await writer.complete(user("refresh fails"))
    await asyncio.sleep(0.35)
    fake.fail(500, prompt="refresh fails")
    reader = make_cache(ttl=0.3, stale_ttl=60)
    served = await reader.complete(user("refresh fails"))
    assert served.stale and served.response.id == first.response.id
    await reader.aclose()
    assert reader.stats()["refresh_errors"] == 1
    again = await make_cache(memory_max_entries=0).complete(user("refresh fails"))
    assert again.stale and again.response.id == first.response.id


async def test_refreshes_are_bounded(make_cache: Callable[..., LLMCache], fake: FakeOpenAI) -> None:
    writer = make_cache(ttl=0.3, stale_ttl=60)
    await asyncio.gather(writer.complete(user("one")), writer.complete(user("two")))
    await asyncio.sleep(0.35)
    fake.latency = 0.2
    reader = make_cache(ttl=0.3, stale_ttl=60, max_refreshes=1)
    await asyncio.gather(reader.complete(user("one")), reader.complete(user("two")))
    await reader.aclose()
    stats = reader.stats()
    assert (stats["refreshes"], stats["refreshes_skipped"]) == (1, 1)


async def test_early_refresh_keeps_a_hot_key_fresh(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI
) -> None:
    fake.latency = 0.05
    # beta this large: an early refresh on every read (the draw can not save it)
    c = make_cache(ttl=60, xfetch_beta=1e9)
    first = await c.complete(user("early"))
    hit = await c.complete(user("early"))
    assert (hit.source, hit.stale, hit.response.id) == ("memory", False, first.response.id)
    await c.aclose()
    assert fake.calls("early") == 2
    assert c.stats()["refreshes"] == 1


async def test_no_early_refresh_far_from_expiry(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI
) -> None:
    c = make_cache(ttl=3600)  # beta 1, a call of milliseconds, an hour to go: never
    for _ in range(200):
        await c.complete(user("far"))
    await c.aclose()
    assert fake.calls("far") == 1
    assert c.stats()["refreshes"] == 0


async def test_closing_with_refreshes_in_flight_leaves_nothing_behind(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI, redis_server: AnyRedis, namespace: str
) -> None:
    writer = make_cache(ttl=0.3, stale_ttl=60)
    await writer.complete(user("closing refresh"))
    await asyncio.sleep(0.35)
    fake.latency = 5.0
    reader = make_cache(ttl=0.3, stale_ttl=60, close_timeout=0.1)
    assert (await reader.complete(user("closing refresh"))).stale
    await asyncio.to_thread(fake.wait_for_calls, 2, prompt="closing refresh")
    await reader.aclose()
    assert not reader._tasks
    assert not [t for t in asyncio.all_tasks() if t.get_coro().__qualname__.startswith("LLMCache.")]
    r = redis_server.client()
    try:
        assert await all_keys(r, f"alc:{namespace}:*:l:*") == []  # the cancelled refresh gave its lease back
    finally:
        await r.aclose()


async def test_per_request_stale_window(cache: LLMCache, redis_server: AnyRedis, namespace: str) -> None:
    result = await cache.complete(user("windows"), cache=CacheControl(ttl=100, stale_ttl=50))
    r = redis_server.client()
    try:
        pttl = await r.pttl(f"alc:{namespace}:0:e:{{{result.key}}}")
    finally:
        await r.aclose()
    assert 140_000 < pttl <= 150_000


async def _pttl(redis_server: AnyRedis, namespace: str, key: str) -> int:
    r = redis_server.client()
    try:
        return int(await r.pttl(f"alc:{namespace}:0:e:{{{key}}}"))
    finally:
        await r.aclose()


async def test_a_hot_key_slides_and_a_cold_one_ages_out(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI, redis_server: AnyRedis, namespace: str
) -> None:
    c = make_cache(ttl=1.0, stale_ttl=1.0, hot_hits=3, memory_max_entries=0, xfetch_beta=0)
    hot = await c.complete(user("hot"))
    cold = await c.complete(user("cold"))
    await asyncio.sleep(1.1)  # lives pass: both keys have ~0.9 s of their 2 s left
    # stale reads that schedule no refresh (a refresh would write new entries)
    peek = CacheControl(no_store=True)
    assert (await c.complete(user("cold"), cache=peek)).stale  # one read: below the threshold
    for _ in range(3):  # the third read in the window makes it hot
        assert (await c.complete(user("hot"), cache=peek)).stale
    assert await _pttl(redis_server, namespace, cold.key) < 1000
    assert await _pttl(redis_server, namespace, hot.key) > 1500  # ttl + stale_ttl (2 s) from now again
    await asyncio.sleep(1.0)  # the cold key has aged out, the hot one still has ~1 s
    assert (await c.complete(user("cold"), cache=peek)).source == "upstream"
    served = await c.complete(user("hot"), cache=peek)
    assert served.source == "redis" and served.response.id == hot.response.id


async def test_a_hot_key_never_outlives_its_cap(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI, redis_server: AnyRedis, namespace: str
) -> None:
    c = make_cache(ttl=0.5, stale_ttl=0.5, hot_hits=1, hot_max_age=1.5, memory_max_entries=0, xfetch_beta=0)
    first = await c.complete(user("capped"))
    await asyncio.sleep(0.7)  # ~0.3 s of its 1 s life left
    # a stale read that schedules no refresh (which would write a new entry)
    assert (await c.complete(user("capped"), cache=CacheControl(no_store=True))).stale
    pttl = await _pttl(redis_server, namespace, first.key)
    # slid (unslid: ~0.3 s left), to 1.5 s after it was written (0.8 s from now),
    # not to a full second from now
    assert 500 < pttl <= 800


async def test_a_refresh_keeps_the_windows_the_entry_had(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI, redis_server: AnyRedis, namespace: str
) -> None:
    writer = make_cache(ttl=0.3, stale_ttl=60)
    first = await writer.complete(user("windows kept"))
    await asyncio.sleep(0.35)
    # a caller asking short windows for its own answers starts the refresh...
    short = CacheControl(ttl=0.2, stale_ttl=0)
    reader = make_cache(ttl=0.3, stale_ttl=60)
    assert (await reader.complete(user("windows kept"), cache=short)).stale
    await reader.aclose()
    # ...but the refreshed entry keeps the entry's own 0.3 s + 60 s
    pttl = await _pttl(redis_server, namespace, first.key)
    assert 59_000 < pttl <= 60_300


async def test_hot_keys_are_counted_with_the_memory_tier_on(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI, redis_server: AnyRedis, namespace: str
) -> None:
    c = make_cache(ttl=0.5, stale_ttl=0.5, hot_hits=2, xfetch_beta=0)
    first = await c.complete(user("hot in memory"))
    await asyncio.sleep(0.6)  # stale: with hot keys on, memory no longer answers for it
    peek = CacheControl(no_store=True)
    for _ in range(2):
        served = await c.complete(user("hot in memory"), cache=peek)
        assert (served.source, served.stale) == ("redis", True)
    assert await _pttl(redis_server, namespace, first.key) > 700  # slid: ~0.4 s left unslid


async def test_sliding_never_makes_an_entry_without_a_stale_window_stale(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI, redis_server: AnyRedis, namespace: str
) -> None:
    c = make_cache(ttl=1.0, stale_ttl=1.0, hot_hits=1, memory_max_entries=0, xfetch_beta=0)
    first = await c.complete(user("never stale"), cache=CacheControl(ttl=0.5, stale_ttl=0))
    await asyncio.sleep(0.3)
    await c.complete(user("never stale"))
    assert await _pttl(redis_server, namespace, first.key) <= 200  # not extended


async def test_without_redis_an_expired_key_waits_for_its_refresh(fake: FakeOpenAI) -> None:
    client = fake.client()
    try:
        async with LLMCache(openai=client, model="test-model", ttl=0.2, stale_ttl=0.2, xfetch_beta=0) as c:
            first = await c.complete(user("refresh in flight"))
            await asyncio.sleep(0.25)  # stale
            fake.latency = 0.5
            assert (await c.complete(user("refresh in flight"))).stale  # starts the refresh
            await asyncio.sleep(0.2)  # expired now, while the refresh still waits on the model
            after = await c.complete(user("refresh in flight"))
            assert not after.stale and after.response.id != first.response.id
        assert fake.calls("refresh in flight") == 2  # the first answer and the refresh, no third
    finally:
        await client.close()
