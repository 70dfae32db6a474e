"""Real parts for every test: a private redis-server on a free loopback port and
a FakeOpenAI server, both started once per session; each test gets its own
namespace so tests never see each other's entries.

Modules marked ``both_redis`` run every test twice: against the single Redis
and against a private 3-primary Redis Cluster (``redis_server`` is then a
:class:`RedisClusterServer`, whose ``url`` carries ``cluster=yes``); a test
marked ``single_redis`` runs on the single Redis only."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, cast

import pytest
import pytest_asyncio
from openai import AsyncOpenAI
from redis.asyncio.cluster import RedisCluster

from aiollmcache import LLMCache, OpenAIUpstream, Upstream
from aiollmcache.testing import FakeOpenAI, RedisClusterServer, RedisServer

MODEL = "test-model"

AnyRedis = RedisServer | RedisClusterServer


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "redis_server" not in metafunc.fixturenames:
        return
    both = metafunc.definition.get_closest_marker("both_redis") is not None
    single = metafunc.definition.get_closest_marker("single_redis") is not None
    kinds = ["redis", "cluster"] if both and not single else ["redis"]
    metafunc.parametrize("redis_server", kinds, indirect=True, scope="session")


@pytest.fixture(scope="session")
def redis_server(request: pytest.FixtureRequest) -> Iterator[AnyRedis]:
    server: AnyRedis = RedisClusterServer(primaries=3) if request.param == "cluster" else RedisServer()
    with server:
        yield server


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own, which it may kill, freeze, restart or exhaust."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def fake_server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
def fake(fake_server: FakeOpenAI) -> Iterator[FakeOpenAI]:
    fake_server.reset()
    fake_server.latency = 0.0
    yield fake_server
    fake_server.reset()
    fake_server.latency = 0.0


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest_asyncio.fixture
async def openai_client(fake: FakeOpenAI) -> AsyncIterator[AsyncOpenAI]:
    client = fake.client()
    yield client
    await client.close()


@pytest_asyncio.fixture
async def cache(
    redis_server: AnyRedis, openai_client: AsyncOpenAI, namespace: str
) -> AsyncIterator[LLMCache]:
    async with LLMCache(
        redis_url=redis_server.url, openai=openai_client, model=MODEL, namespace=namespace
    ) as c:
        yield c


@pytest_asyncio.fixture
async def make_cache(
    redis_server: AnyRedis, openai_client: AsyncOpenAI, namespace: str
) -> AsyncIterator[Callable[..., LLMCache]]:
    """Build more caches on the same Redis and namespace; closed after the test."""
    made: list[LLMCache] = []

    def make(**kwargs: object) -> LLMCache:
        kwargs.setdefault("redis_url", redis_server.url)
        kwargs.setdefault("openai", openai_client)
        kwargs.setdefault("model", MODEL)
        kwargs.setdefault("namespace", namespace)
        c = LLMCache(**kwargs)  # type: ignore[arg-type]
        made.append(c)
        return c

    yield make
    for c in made:
        await c.aclose()


async def all_keys(client: Any, pattern: str) -> list[bytes]:
    """KEYS on a single Redis or on every primary of a cluster (tests only:
    the cache itself never uses KEYS)."""
    if isinstance(client, RedisCluster):
        found = await client.keys(pattern, target_nodes=RedisCluster.PRIMARIES)
        return sorted(found)
    return cast(list[bytes], await client.keys(pattern))


async def subscribers(client: Any, channel: str) -> int:
    """How many connections subscribe ``channel`` (on a cluster: the sharded
    channel, on the primary that owns its slot)."""
    if isinstance(client, RedisCluster):
        await client.initialize()
        node = client.get_node_from_key(channel)
        ((_, count),) = await client.execute_command("PUBSUB SHARDNUMSUB", channel, target_nodes=node)
        return int(count)
    ((_, count),) = await client.pubsub_numsub(channel)
    return int(count)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def until(condition: Callable[[], Awaitable[bool]], seconds: float = 10.0) -> None:
    """Wait for state held by another connection or process, which sends no
    event this test could await."""
    async with asyncio.timeout(seconds):
        while not await condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def signalling(client: AsyncOpenAI) -> tuple[asyncio.Event, Upstream]:
    """An upstream through ``client`` that sets an event when a call reaches it."""
    started = asyncio.Event()
    inner = OpenAIUpstream(client)

    async def upstream(params: dict[str, Any]) -> bytes:
        started.set()
        return await inner(params)

    upstream.scope = inner.scope  # type: ignore[attr-defined]  # same key as the client itself
    return started, upstream
