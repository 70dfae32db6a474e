"""Single-flight within a process and across caches sharing Redis.

Each LLMCache here has its own connection pool and pub/sub connection, so two
instances coordinate exactly as two processes do; real processes are in
test_multiprocess.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import openai
import pytest

from aiollmcache import (
    CacheControl,
    LLMCache,
    RemoteUpstreamError,
    WaitTimeoutError,
)
from aiollmcache.testing import FakeOpenAI

from .conftest import AnyRedis, all_keys, signalling, until, user

pytestmark = [pytest.mark.asyncio, pytest.mark.both_redis]


async def redis_keys(redis_server: AnyRedis, pattern: str) -> list[bytes]:
    r = redis_server.client()
    try:
        return sorted(await all_keys(r, pattern))
    finally:
        await r.aclose()


async def test_a_thousand_callers_one_upstream_call(cache: LLMCache, fake: FakeOpenAI) -> None:
    fake.latency = 0.3
    results = await asyncio.gather(*(cache.complete(user("thousand")) for _ in range(1000)))
    assert fake.calls("thousand") == 1
    assert len({r.response.id for r in results}) == 1
    assert sum(r.coalesced for r in results) == 999


async def test_two_caches_share_one_call_and_are_woken_by_the_holder(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI, openai_client: openai.AsyncOpenAI
) -> None:
    started, upstream = signalling(openai_client)
    holder, waiter = make_cache(openai=None, upstream=upstream), make_cache()
    fake.latency = 0.5
    first = asyncio.create_task(holder.complete(user("shared call")))
    await started.wait()
    others = await asyncio.gather(*(waiter.complete(user("shared call")) for _ in range(50)))
    mine = await first
    assert fake.calls("shared call") == 1
    assert {r.response.id for r in others} == {mine.response.id}
    assert all(r.source == "redis" and r.coalesced for r in others)
    stats = waiter.stats()
    assert stats["lease_waited"] == 1 and stats["coalesced_remote"] == 1 and stats["coalesced"] == 49
    assert holder.stats()["lease_committed"] == 1


@pytest.mark.single_redis  # cuts one server's pub/sub connections
async def test_a_lost_notification_costs_one_bounded_wait(
    make_cache: Callable[..., LLMCache],
    fake: FakeOpenAI,
    openai_client: openai.AsyncOpenAI,
    redis_server: AnyRedis,
    namespace: str,
) -> None:
    started, upstream = signalling(openai_client)
    # The holder's lease outlives its call, so it needs no renewal (and no new
    # connection) while new connections are refused below.
    holder = make_cache(openai=None, upstream=upstream, lease_ttl=3.0)
    waiter = make_cache()
    fake.latency = 0.6
    first = asyncio.create_task(holder.complete(user("lost message")))
    await started.wait()
    waiting = asyncio.create_task(waiter.complete(user("lost message")))
    admin = redis_server.client()
    try:

        async def subscribed() -> bool:
            return bool(await admin.pubsub_channels(f"alc:{namespace}:*:n:*"))

        await until(subscribed)
        # The waiter's pool keeps spare connections open: a lease check and an
        # invalidation check may run at once while no new connection is allowed.
        assert waiter._redis is not None
        await asyncio.gather(*(waiter._redis.client.ping() for _ in range(4)))
        # Cut the pub/sub connections (the waiter's among them) and refuse new
        # connections, so the holder's "done" is published to nobody.
        # (maxclients below the count now: the killed connections' slots stay shut)
        subscribers = len(await admin.client_list(_type="pubsub"))
        await admin.config_set("maxclients", len(await admin.client_list()) - subscribers)
        assert await admin.client_kill_filter(_type="pubsub") == subscribers
        mine = await first
        assert not await subscribed()
        await admin.config_set("maxclients", 10000)
        theirs = await asyncio.wait_for(waiting, 10)
    finally:
        await admin.config_set("maxclients", 10000)
        await admin.aclose()
    assert theirs.response.id == mine.response.id
    assert fake.calls("lost message") == 1
    assert waiter.stats()["lease_resyncs"] >= 1


async def test_remote_waiters_get_the_failure_at_once(
    make_cache: Callable[..., LLMCache],
    fake: FakeOpenAI,
    openai_client: openai.AsyncOpenAI,
    redis_server: AnyRedis,
) -> None:
    started, upstream = signalling(openai_client)
    holder, waiter = make_cache(openai=None, upstream=upstream, lease_ttl=30), make_cache(lease_ttl=30)
    fake.latency = 0.3
    fake.fail(429, prompt="rate limited")
    first = asyncio.create_task(holder.complete(user("rate limited")))
    await started.wait()
    results = await asyncio.gather(
        *(waiter.complete(user("rate limited")) for _ in range(10)), return_exceptions=True
    )
    with pytest.raises(openai.RateLimitError):
        await first
    assert all(isinstance(r, RemoteUpstreamError) for r in results)
    error = results[0]
    assert isinstance(error, RemoteUpstreamError)
    assert (error.error_type, error.status_code) == ("RateLimitError", 429)
    assert fake.calls("rate limited") == 1
    assert await redis_keys(redis_server, "alc:*rate*") == []
    assert await redis_keys(redis_server, f"alc:{holder._namespace}:0:*") == []  # no entry, no lease


async def test_upstream_timeout_is_shared_the_same_way(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI, redis_server: AnyRedis, namespace: str
) -> None:
    slow_client = fake.client(timeout=0.3)
    try:
        holder = make_cache(openai=slow_client, lease_ttl=30)
        waiter = make_cache(openai=slow_client, lease_ttl=30)
        fake.hang(prompt="hangs")
        first = asyncio.create_task(holder.complete(user("hangs")))
        await asyncio.to_thread(fake.wait_for_calls, 1, prompt="hangs")
        second = await asyncio.gather(waiter.complete(user("hangs")), return_exceptions=True)
        with pytest.raises(openai.APITimeoutError):
            await first
        assert isinstance(second[0], RemoteUpstreamError)
        assert second[0].error_type == "APITimeoutError"
        assert fake.calls("hangs") == 1
        assert await redis_keys(redis_server, f"alc:{namespace}:0:*") == []
    finally:
        await slow_client.close()


async def test_waiting_longer_than_max_wait(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI, openai_client: openai.AsyncOpenAI
) -> None:
    started, upstream = signalling(openai_client)
    holder = make_cache(openai=None, upstream=upstream)
    raising = make_cache(max_wait=0.2)
    calling = make_cache(max_wait=0.2, on_wait_timeout="upstream")
    fake.latency = 1.0
    first = asyncio.create_task(holder.complete(user("slow holder")))
    await started.wait()
    with pytest.raises(WaitTimeoutError):
        await raising.complete(user("slow holder"))
    own = await calling.complete(user("slow holder"))
    assert own.source == "upstream"
    await first
    assert fake.calls("slow holder") == 2
    assert raising.stats()["lease_wait_timeouts"] == 1


async def test_too_old_for_max_age_is_replaced_before_answering(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI
) -> None:
    writer = make_cache(ttl=60, stale_ttl=3600)
    first = await writer.complete(user("aging"))
    await asyncio.sleep(0.15)  # the entry's age itself is under test
    reader = make_cache()
    again = await reader.complete(user("aging"), cache=CacheControl(max_age=0.1))
    assert again.source == "upstream"
    assert again.response.id != first.response.id
    young = await make_cache().complete(user("aging"), cache=CacheControl(max_age=60))
    assert young.response.id == again.response.id  # the replacement was stored
    assert fake.calls("aging") == 2


async def test_unstorable_answer_releases_the_lease_at_once(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI, redis_server: AnyRedis, namespace: str
) -> None:
    fake.answer_chars = 20_000
    try:
        c = make_cache(max_entry_bytes=10_000, lease_ttl=30)
        assert (await c.complete(user("too big"))).source == "upstream"
        assert await redis_keys(redis_server, f"alc:{namespace}:0:*") == []
        assert c.stats()["store_skipped"] == 1
    finally:
        fake.answer_chars = 0


async def test_cancelling_every_caller_keeps_the_shared_call(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI, openai_client: openai.AsyncOpenAI
) -> None:
    started, upstream = signalling(openai_client)
    c = make_cache(openai=None, upstream=upstream)
    fake.latency = 0.3
    callers = [asyncio.create_task(c.complete(user("all cancelled"))) for _ in range(20)]
    await started.wait()
    for task in callers:
        task.cancel()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    later = make_cache()  # another process's view: the answer was stored anyway
    assert (await later.complete(user("all cancelled"))).source in ("redis", "upstream")
    assert fake.calls("all cancelled") == 1


async def test_cancelled_callers_never_reach_upstream(cache: LLMCache, fake: FakeOpenAI) -> None:
    # A cancellation landing while the Redis read is in progress must not be lost.
    for i in range(20):
        task = asyncio.create_task(cache.complete(user(f"cancel early {i}")))
        await asyncio.sleep(0)  # let it start its Redis read
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert fake.calls() == 0
