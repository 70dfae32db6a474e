"""Redis Cluster under change: a primary killed and its replica promoted, a
slot migrated under the cache's feet, channels dropped, every node gone. Each
test starts its own cluster of 3 primaries with a replica each."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from openai import AsyncOpenAI
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from aiollmcache import ConfigurationError, LLMCache
from aiollmcache.testing import FakeOpenAI, RedisClusterServer
from aiollmcache.tiers.redis import parse_redis_url

from .conftest import MODEL, subscribers, until, user

pytestmark = pytest.mark.asyncio

PROMPTS = [f"cluster question {i}" for i in range(30)]


@pytest.fixture
def cluster() -> Iterator[RedisClusterServer]:
    with RedisClusterServer(primaries=3, replicas=1, node_timeout_ms=1000) as server:
        yield server


@pytest_asyncio.fixture
async def admin(cluster: RedisClusterServer) -> AsyncIterator[RedisCluster]:
    client = cluster.client()
    await client.initialize()
    yield client
    await client.aclose()


def answers_right(prompt: str, content: str | None) -> bool:
    return content == f"Answer to: {prompt}"


async def test_a_primary_killed_and_its_replica_promoted(
    cluster: RedisClusterServer, admin: RedisCluster, fake: FakeOpenAI, openai_client: AsyncOpenAI
) -> None:
    """While a primary is down every call gets the right answer: from the
    other primaries, which the cache keeps using, or from the model for the
    dead one's keys (its breaker skips it); once its replica has taken over,
    the same cache uses Redis for every key again without a restart, and a
    stampede still costs one call."""
    common = {"openai": openai_client, "model": MODEL, "namespace": "failover", "memory_max_entries": 0}
    async with LLMCache(redis_url=cluster.url, breaker_probe_interval=0.2, **common) as cache:  # type: ignore[arg-type]
        for prompt in PROMPTS:
            await cache.complete(user(prompt))
        assert fake.calls() == len(PROMPTS)
        assert {(await cache.complete(user(p))).source for p in PROMPTS} == {"redis"}

        primaries = cluster.primaries()
        victim = next(s for s in primaries if f":{s.port}" not in cluster.url)
        on_victim = [
            p for p in PROMPTS if _owner_port(admin, (await cache.complete(user(p))).key) == victim.port
        ]
        assert on_victim  # 30 keys over 3 primaries
        cluster.kill(victim)

        # Through the failover: every call answers, and answers right.
        served: list[tuple[str, str]] = []
        failover = asyncio.create_task(asyncio.to_thread(cluster.wait_healthy, 30.0))
        while not failover.done():
            results = await asyncio.gather(*(cache.complete(user(p)) for p in PROMPTS))
            for prompt, result in zip(PROMPTS, results, strict=True):
                assert answers_right(prompt, result.response.choices[0].message.content)
                served.append((prompt, result.source))
        await failover
        # The other primaries kept serving their keys all along.
        assert {p for p, source in served if source == "redis"} >= set(PROMPTS) - set(on_victim)
        stats = cache.stats()
        assert stats["redis_breaker_opened"] == 0  # no cluster-wide skip
        assert stats["redis_node_breaker_opened"] == 1  # the dead primary's, and no other

        # Recovered without a restart: what was on the dead primary is read
        # from its promoted replica (or was written again meanwhile).
        async def redis_again() -> bool:
            results = await asyncio.gather(*(cache.complete(user(p)) for p in PROMPTS))
            return all(r.source == "redis" for r in results)

        await until(redis_again, seconds=20)
        stats = cache.stats()
        assert stats["redis_errors"] > 0  # the failover was seen, and counted

        # A stampede on the healed cluster: 2 caches x 20 callers, one call.
        async with LLMCache(redis_url=cluster.url, **common) as other:  # type: ignore[arg-type]
            before = fake.calls("after the failover")
            fake.latency = 0.3
            results = await asyncio.gather(
                *(c.complete(user("after the failover")) for c in (cache, other) for _ in range(20))
            )
            assert fake.calls("after the failover") - before == 1
            assert len({r.response.id for r in results}) == 1


async def test_a_slot_migrated_under_the_cache(
    cluster: RedisClusterServer, admin: RedisCluster, fake: FakeOpenAI, openai_client: AsyncOpenAI
) -> None:
    """Reads of a slot caught mid-migration (ASK) and after it (MOVED), alone
    and batched per node, get the entry from wherever it is now."""
    common = {"openai": openai_client, "model": MODEL, "namespace": "migration", "memory_max_entries": 0}
    async with LLMCache(redis_url=cluster.url, **common) as cache:  # type: ignore[arg-type]
        keys = {p: (await cache.complete(user(p))).key for p in PROMPTS}
        moving = PROMPTS[0]
        entry = f"alc:migration:0:e:{{{keys[moving]}}}"
        slot = key_slot(entry.encode())
        source = admin.get_node_from_key(entry)
        assert source is not None
        target = next(n for n in admin.get_primaries() if n.name != source.name)
        source_id = (await admin.execute_command("CLUSTER MYID", target_nodes=source)).decode()
        target_id = (await admin.execute_command("CLUSTER MYID", target_nodes=target)).decode()

        async def all_right(*, from_redis: bool) -> None:
            results = await asyncio.gather(*(cache.complete(user(p)) for p in PROMPTS))
            for prompt, result in zip(PROMPTS, results, strict=True):
                assert answers_right(prompt, result.response.choices[0].message.content)
                if from_redis or prompt != moving:
                    assert result.source == "redis", (prompt, result.source)

        await admin.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source_id, target_nodes=target)
        await admin.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target_id, target_nodes=source)
        names = await admin.execute_command("CLUSTER GETKEYSINSLOT", slot, 100, target_nodes=source)
        assert entry in names
        await admin.execute_command(
            "MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *names, target_nodes=source
        )
        # Mid-migration the key is on the target, its slot still on the source:
        # reads follow ASK. (redis-py may send a script's ASKING on another
        # pooled connection than the script: the moving key may then cost a
        # model call, never a wrong answer.)
        await all_right(from_redis=False)
        for node in admin.get_primaries():
            await admin.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id, target_nodes=node)
        await all_right(from_redis=True)  # migrated: the cache's slot table was out of date
        await all_right(from_redis=True)
        assert fake.calls() <= len(PROMPTS) + 1


def _owner_port(admin: RedisCluster, key: str, namespace: str = "failover") -> int:
    node = admin.get_node_from_key(f"alc:{namespace}:0:e:{{{key}}}")
    assert node is not None
    return int(node.port)


async def test_a_dropped_shard_channel_is_subscribed_again(
    cluster: RedisClusterServer, admin: RedisCluster, fake: FakeOpenAI, openai_client: AsyncOpenAI
) -> None:
    """Redis drops the shard channels of a slot when the slot is assigned
    (here: again to its owner). The invalidation subscription is made again,
    and invalidations keep reaching the memory tier by message."""
    common = {"openai": openai_client, "model": MODEL, "namespace": "resub"}
    async with (
        LLMCache(redis_url=cluster.url, sync_interval=60, **common) as cache,  # type: ignore[arg-type]
        LLMCache(redis_url=cluster.url, **common) as other,  # type: ignore[arg-type]
    ):
        await cache.complete(user("kept in memory"))
        assert (await cache.complete(user("kept in memory"))).source == "memory"
        channel = "alc:resub:sync"
        assert await subscribers(admin, channel) == 2
        owner = admin.get_node_from_key(channel)
        assert owner is not None
        owner_id = (await admin.execute_command("CLUSTER MYID", target_nodes=owner)).decode()
        await admin.execute_command(
            "CLUSTER SETSLOT", key_slot(channel.encode()), "NODE", owner_id, target_nodes=owner
        )

        async def both_back() -> bool:
            return await subscribers(admin, channel) == 2

        await until(both_back)
        applied = asyncio.Event()
        cache.add_invalidation_listener(lambda _: applied.set())
        await other.invalidate(everything=True)
        await asyncio.wait_for(applied.wait(), 5)
        assert (await cache.complete(user("kept in memory"))).source == "upstream"


async def test_the_whole_cluster_down(
    cluster: RedisClusterServer, fake: FakeOpenAI, openai_client: AsyncOpenAI
) -> None:
    """Every node gone: calls are answered by the model, the breaker opens,
    and the cache closes cleanly."""
    common = {"openai": openai_client, "model": MODEL, "namespace": "down", "memory_max_entries": 0}
    cache = LLMCache(redis_url=cluster.url, **common)  # type: ignore[arg-type]
    async with cache:
        await cache.complete(user("before"))
        for server in list(cluster.servers):
            cluster.kill(server)
        for i in range(10):
            result = await cache.complete(user(f"while down {i}"))
            assert answers_right(f"while down {i}", result.response.choices[0].message.content)
        stats = cache.stats()
        assert stats["redis_errors"] > 0
        assert stats["redis_skipped"] > 0  # refused at once, without I/O
        assert stats["redis_nodes_skipped"] + stats["redis_breaker_open"] >= 1


async def test_the_cluster_option_of_a_redis_url() -> None:
    assert parse_redis_url("redis://h:7000/0?cluster=yes") == ("redis://h:7000/0", True)
    assert parse_redis_url("redis://h:7000/0?cluster=False&ssl_cert_reqs=none") == (
        "redis://h:7000/0?ssl_cert_reqs=none",
        False,
    )
    assert parse_redis_url("redis://h:6379/2") == ("redis://h:6379/2", False)
    with pytest.raises(ConfigurationError, match="cluster='maybe'"):
        LLMCache(redis_url="redis://127.0.0.1:1/0?cluster=maybe")
    with pytest.raises(ConfigurationError, match="db"):  # a cluster has database 0 only
        LLMCache(redis_url="redis://127.0.0.1:1/3?cluster=yes")
    with pytest.raises(ConfigurationError, match="RedisCluster"):
        LLMCache(redis=object())  # type: ignore[arg-type]


async def test_a_hung_primary_is_skipped_alone(fake: FakeOpenAI, openai_client: AsyncOpenAI) -> None:
    """A primary that stops answering (SIGSTOP; no replica, and the cluster
    keeps serving the slots it still covers): its keys time out until its
    breaker opens, then are skipped at once, while the other primaries serve
    theirs from Redis throughout; when it answers again it is used again."""
    args = ("--cluster-require-full-coverage", "no")
    with RedisClusterServer(primaries=3, args=args) as cluster:
        admin = cluster.client()
        await admin.initialize()
        common = {"openai": openai_client, "model": MODEL, "namespace": "hung", "memory_max_entries": 0}
        try:
            async with LLMCache(redis_url=cluster.url, breaker_probe_interval=0.2, **common) as cache:  # type: ignore[arg-type]
                keys = {p: (await cache.complete(user(p))).key for p in PROMPTS}
                hung = next(s for s in cluster.primaries() if f":{s.port}" not in cluster.url)
                on_hung = {p for p in PROMPTS if _owner_port(admin, keys[p], namespace="hung") == hung.port}
                assert on_hung
                hung.pause()
                try:

                    async def skipped() -> bool:
                        results = await asyncio.gather(*(cache.complete(user(p)) for p in PROMPTS))
                        for prompt, result in zip(PROMPTS, results, strict=True):
                            assert answers_right(prompt, result.response.choices[0].message.content)
                            if prompt not in on_hung:  # the others' keys: from Redis, every round
                                assert result.source == "redis", (prompt, result.source)
                        return bool(cache.stats()["redis_nodes_skipped"] == 1)

                    await until(skipped, seconds=20)
                    stats = cache.stats()
                    assert stats["redis_breaker_opened"] == 0
                    assert stats["redis_node_breaker_opened"] == 1
                finally:
                    hung.resume()

                async def all_from_redis() -> bool:
                    results = await asyncio.gather(*(cache.complete(user(p)) for p in PROMPTS))
                    return all(r.source == "redis" for r in results)

                await until(all_from_redis, seconds=20)
        finally:
            await admin.aclose()
