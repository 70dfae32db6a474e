"""Invalidation by key, tag, pattern and namespace version: in Redis, and in the
memory tier of every process, including processes that missed the broadcast."""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from aiollmcache import (
    CacheControl,
    Entry,
    Invalidation,
    InvalidationKind,
    InvalidRequestError,
    LLMCache,
    Pattern,
)
from aiollmcache.testing import FakeOpenAI, chat_completion
from aiollmcache.tiers.redis import RedisTier

from .conftest import MODEL, AnyRedis, all_keys, signalling, until, user

pytestmark = [pytest.mark.asyncio, pytest.mark.both_redis]

ROOT = Path(__file__).resolve().parent.parent


def completion(text: str) -> dict[str, Any]:
    return chat_completion(
        text, model=MODEL, usage={"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    )


async def local_upstream(params: dict[str, Any]) -> dict[str, Any]:
    """An in-process model, for filling Redis quickly."""
    return completion(f"answer to {params['messages'][-1]['content']}")


class CacheWorker:
    """A ``tests.cache_worker`` process: a cache in another OS process."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(
        cls, redis_server: AnyRedis, fake: FakeOpenAI, namespace: str, *options: str
    ) -> CacheWorker:
        argv = ["-m", "tests.cache_worker", redis_server.url, fake.base_url, namespace, *options]
        pipe = asyncio.subprocess.PIPE
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *argv, cwd=ROOT, stdin=pipe, stdout=pipe, stderr=pipe
        )
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line == b"ready\n", line + (await proc.stderr.read() if proc.stderr else b"")
        return cls(proc)

    async def ask(self, **command: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(orjson.dumps(command) + b"\n")
        line = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        assert line, await self.proc.stderr.read() if self.proc.stderr else b""
        return orjson.loads(line)

    async def call(self, prompt: str, **fields: Any) -> Any:
        return await self.ask(op="call", prompt=prompt, **fields)

    async def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        _, err = await asyncio.wait_for(self.proc.communicate(), 30)
        assert self.proc.returncode == 0, err


@pytest_asyncio.fixture
async def start_worker(
    redis_server: AnyRedis, fake: FakeOpenAI, namespace: str
) -> AsyncIterator[Callable[..., Any]]:
    started: list[CacheWorker] = []

    async def start(*options: str) -> CacheWorker:
        worker = await CacheWorker.start(redis_server, fake, namespace, *options)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        await worker.stop()


@pytest_asyncio.fixture
async def admin(redis_server: AnyRedis) -> AsyncIterator[aioredis.Redis]:
    client = redis_server.client()
    yield client
    await client.aclose()


# -- arguments ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one"),
        ({"key": "0" * 32, "tag": "a"}, "exactly one"),
        ({"tag": "a", "everything": True}, "exactly one"),
        ({"key": "not-a-key"}, "32 lowercase hex"),
        ({"key": "A" * 32}, "32 lowercase hex"),
        ({"tag": ""}, "tag"),
        ({"tag": "a{b}"}, "braces"),
        ({"tag": 7}, "tag"),
        ({"pattern": "gpt-*"}, "expected a Pattern"),
        ({"everything": 1}, "True or False"),
    ],
)
async def test_bad_arguments_fail_before_any_io(kwargs: dict[str, Any], message: str) -> None:
    # No Redis at this address: a check that came after I/O would fail otherwise.
    cache = LLMCache(redis_url="redis://127.0.0.1:1/0", upstream=local_upstream, model=MODEL)
    with pytest.raises(InvalidRequestError, match=message):
        await cache.invalidate(**kwargs)
    assert cache.stats()["redis_errors"] == 0
    await cache.aclose()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "at least one"),
        ({"model": ""}, "Pattern.model"),
        ({"system": 3}, "Pattern.system"),
        ({"key": "AB*"}, "lowercase"),
    ],
)
async def test_patterns_are_checked(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        Pattern(**kwargs)


async def test_pattern_matching() -> None:
    system = "You answer from v1 of the manual.\nBe brief."
    assert Pattern(model="gpt-4o*").matches("ab" * 16, "gpt-4o-mini", system)
    assert not Pattern(model="gpt-4o*").matches("ab" * 16, "gpt-4.1", system)
    assert Pattern(system_contains="v1 of the manual").matches("ab" * 16, "m", system)
    assert Pattern(system="You answer*").matches("ab" * 16, "m", system)
    assert not Pattern(system="v1*").matches("ab" * 16, "m", system)  # a glob matches the whole prompt
    assert Pattern(key="ab*", model="m").matches("ab" * 16, "m", "")
    assert not Pattern(key="ab*", model="m").matches("ba" * 16, "m", "")


# -- without Redis ----------------------------------------------------------------


async def test_a_memory_only_cache_invalidates_its_memory_tier() -> None:
    async with LLMCache(upstream=local_upstream, model=MODEL) as cache:
        red = await cache.complete(user("red"), cache=CacheControl(tags=["colour"]))
        await cache.complete(user("blue"), cache=CacheControl(tags=["colour"]))
        await cache.complete([{"role": "system", "content": "Be terse."}, *user("green")])
        await cache.complete(user("grey"))
        assert await cache.invalidate(key=red.key) == 1
        assert await cache.invalidate(tag="colour") == 1  # blue; red is gone already
        assert await cache.invalidate(pattern=Pattern(system="Be terse.")) == 1
        assert (await cache.complete(user("grey"))).source == "memory"
        assert await cache.invalidate(everything=True) == 1  # grey: known without Redis
        assert (await cache.complete(user("grey"))).source == "upstream"
        assert cache.stats()["memory_invalidated"] == 4


# -- across processes -------------------------------------------------------------

TARGET = {"system": "You answer from v1 of the manual.", "tags": ["manual-v1"], "model": "model-a1"}
BYSTANDER = {"system": "You answer from v2 of the manual.", "tags": ["manual-v2"], "model": "model-b"}


@pytest.mark.parametrize(
    "kind", ["key", "tag", "pattern-model", "pattern-system", "pattern-key", "everything"]
)
async def test_another_process_stops_serving_what_was_invalidated(
    kind: str, start_worker: Callable[..., Any], make_cache: Callable[..., LLMCache]
) -> None:
    worker = await start_worker()
    first = await worker.call("question", **TARGET)
    assert first["source"] == "upstream"
    assert (await worker.call("question", **TARGET))["source"] == "memory"
    await worker.call("question", **BYSTANDER)
    assert (await worker.call("question", **BYSTANDER))["source"] == "memory"

    arguments: dict[str, Any] = {
        "key": {"key": first["key"]},
        "tag": {"tag": "manual-v1"},
        "pattern-model": {"pattern": Pattern(model="model-a*")},
        "pattern-system": {"pattern": Pattern(system_contains="v1 of the manual")},
        "pattern-key": {"pattern": Pattern(key=first["key"][:6] + "*")},
        "everything": {"everything": True},
    }[kind]
    other = make_cache()  # another process's cache: this test's own
    retired = await other.invalidate(**arguments)
    assert retired == (None if kind == "everything" else 1)

    applied = await worker.ask(op="wait", count=1, timeout=10)
    expected = "everything" if kind == "everything" else kind.split("-")[0]
    assert applied["invalidations"] == [expected]
    assert (await worker.call("question", **TARGET))["source"] == "upstream"
    bystander = await worker.call("question", **BYSTANDER)
    assert bystander["source"] == ("upstream" if kind == "everything" else "memory")
    stats = await worker.ask(op="stats")
    assert stats["invalidations_received"] == 1
    assert stats["invalidations_resyncs"] == 0  # it came by message, not by a check


async def test_a_lost_message_is_caught_up_by_the_periodic_check(
    start_worker: Callable[..., Any], admin: aioredis.Redis, namespace: str
) -> None:
    interval, redis_timeout = 0.3, 0.5
    worker = await start_worker("--sync-interval", str(interval))
    first = await worker.call("question")
    assert (await worker.call("question"))["source"] == "memory"
    # An invalidation whose message never arrives: the entry deleted and the
    # invalidation counted, nothing published.
    await admin.unlink(f"alc:{namespace}:0:e:{{{first['key']}}}")
    await admin.hincrby(f"alc:{namespace}:sync", "seq", 1)
    applied = await worker.ask(op="wait", count=1, timeout=10)
    assert applied["invalidations"] == ["resync"]
    assert (
        applied["waited"] < interval + 2 * redis_timeout + 1.0
    )  # the stated bound, with slack for a busy machine
    assert (await worker.call("question"))["source"] == "upstream"


@pytest.mark.single_redis  # kills pub/sub connections in a transaction
async def test_a_dropped_subscriber_connection_still_converges(
    start_worker: Callable[..., Any], admin: aioredis.Redis, namespace: str
) -> None:
    # No periodic check within the test: the reconnection itself must catch up.
    worker = await start_worker("--sync-interval", "60")
    first = await worker.call("question")
    assert (await worker.call("question"))["source"] == "memory"
    await admin.unlink(f"alc:{namespace}:0:e:{{{first['key']}}}")
    # The subscriber connection is cut in the same transaction that counts the
    # invalidation, so its message could not have been received.
    pipe = admin.pipeline(transaction=True)
    pipe.client_kill_filter(_type="pubsub")
    pipe.hincrby(f"alc:{namespace}:sync", "seq", 1)
    killed, _ = await pipe.execute()
    assert killed >= 1
    applied = await worker.ask(op="wait", count=1, timeout=10)
    assert applied["invalidations"] == ["resync"]
    assert (await worker.call("question"))["source"] == "upstream"
    stats = await worker.ask(op="stats")
    assert stats["invalidations_resyncs"] == 1


async def test_sync_catches_up_at_once_and_a_reset_redis_counts_as_missed(
    make_cache: Callable[..., LLMCache], admin: aioredis.Redis, namespace: str
) -> None:
    cache = make_cache(sync_interval=60)
    seen: list[InvalidationKind] = []
    cache.add_invalidation_listener(lambda invalidation: seen.append(invalidation.kind))
    await cache.complete(user("question"))
    assert await cache.sync() and seen == []  # nothing missed: the memory tier stays
    assert (await cache.complete(user("question"))).source == "memory"
    await admin.hincrby(f"alc:{namespace}:sync", "seq", 1)  # an invalidation whose message was lost
    assert await cache.sync()
    assert seen == [InvalidationKind.RESYNC]
    assert (await cache.complete(user("question"))).source == "redis"
    # Redis restarted empty: the count went back. Whatever was missed is unknown.
    await admin.delete(f"alc:{namespace}:sync")
    assert await cache.sync()
    assert seen == [InvalidationKind.RESYNC, InvalidationKind.RESYNC]


async def test_a_version_bump_retires_every_entry_without_scanning(
    make_cache: Callable[..., LLMCache], admin: aioredis.Redis, namespace: str
) -> None:
    cache, other = make_cache(), make_cache()
    await cache.complete(user("question"))
    assert (await other.complete(user("question"))).source == "redis"
    before = await all_keys(admin, f"alc:{namespace}:0:e:*")  # the test may use KEYS; the cache never does
    assert len(before) == 1
    assert await other.invalidate(everything=True) is None
    assert await admin.get(f"alc:{namespace}:version") == b"1"
    assert await all_keys(admin, f"alc:{namespace}:0:e:*") == before  # left to expire
    assert await cache.sync()
    assert (await cache.complete(user("question"))).source == "upstream"
    assert await all_keys(admin, f"alc:{namespace}:1:e:*")


async def test_an_answer_read_before_an_invalidation_is_not_kept_in_memory(
    make_cache: Callable[..., LLMCache], openai_client: Any, fake: FakeOpenAI
) -> None:
    started, upstream = signalling(openai_client)
    cache = make_cache(openai=None, upstream=upstream)
    fake.latency = 0.3
    call = asyncio.create_task(cache.complete(user("racing")))
    await started.wait()
    assert await cache.invalidate(key=cache.key_for(user("racing"))) == 0  # not written yet
    assert (await call).source == "upstream"
    # The answer in flight was stored in Redis, but this process does not keep
    # in memory what it fetched before an invalidation it has applied since.
    assert (await cache.complete(user("racing"))).source == "redis"


async def test_listener_errors_are_logged_not_raised(
    make_cache: Callable[..., LLMCache], caplog: pytest.LogCaptureFixture
) -> None:
    cache = make_cache()
    calls: list[Invalidation] = []

    def broken(invalidation: Invalidation) -> None:
        raise RuntimeError("listener bug")

    cache.add_invalidation_listener(broken)
    cache.add_invalidation_listener(calls.append)
    assert await cache.invalidate(tag="nothing-tagged") == 0
    assert [c.kind for c in calls] == [InvalidationKind.TAG] and not calls[0].remote
    assert "listener bug" in caplog.text
    cache.remove_invalidation_listener(broken)


# -- tags and patterns at scale, and foreign data ---------------------------------------


async def test_tag_sets_shrink_as_their_entries_expire(redis_server: AnyRedis, namespace: str) -> None:
    client = redis_server.client()
    tier = RedisTier(
        client,
        namespace=namespace,
        owns_client=True,
        timeout=1.0,
        compress_above=8192,
        max_entry_bytes=1 << 20,
    )
    try:
        await tier.load_version()

        def entry(n: int, life: float) -> Entry:
            now = time.time()
            return Entry(
                key=f"{n:032x}",
                raw=orjson.dumps(completion(f"answer {n}")),
                created_at=now,
                fresh_until=now + life,
                expires_at=now + life,
                compute_ms=1.0,
                model=MODEL,
                prompt_tokens=1,
                completion_tokens=1,
                tags=("t",),
            )

        short = [entry(n, 0.3) for n in range(100)]
        for e in short:
            assert await tier.set(e, tier.encode(e))
        tag_key = tier.tag_key("t")
        assert await client.zcard(tag_key) == 100
        assert 0 < await client.pttl(tag_key) <= 300  # the set lives as long as its longest entry
        keeper = entry(100, 3600.0)
        await tier.set(keeper, tier.encode(keeper))
        assert await client.pttl(tag_key) > 3_000_000

        async def expired() -> bool:
            return not await client.exists(*(tier.entry_key(e.key) for e in short))

        await until(expired)
        assert await client.zcard(tag_key) == 101  # entries gone, members not yet
        for n in range(101, 103):
            long = entry(n, 3600.0)
            await tier.set(long, tier.encode(long))
        assert await client.zcard(tag_key) == 3  # two writes pruned the 100 expired members
    finally:
        await tier.aclose()


async def test_ten_thousand_tagged_entries_go_without_blocking_other_callers(
    make_cache: Callable[..., LLMCache], admin: aioredis.Redis, namespace: str
) -> None:
    writer = make_cache(openai=None, upstream=local_upstream, memory_max_entries=0)
    tagged = CacheControl(tags=["bulk"])
    prompts = [f"bulk {n}" for n in range(10_000)]
    for start in range(0, len(prompts), 500):
        await asyncio.gather(*(writer.complete(user(p), cache=tagged) for p in prompts[start : start + 500]))
    reader = make_cache(openai=None, upstream=local_upstream, memory_max_entries=0)
    await reader.complete(user("untagged"))

    async def hits(latencies: list[float], stop: asyncio.Event, count: int = 0) -> None:
        while not stop.is_set() and (not count or len(latencies) < count):
            started = time.perf_counter()
            result = await reader.complete(user("untagged"))
            latencies.append(time.perf_counter() - started)
            assert result.source == "redis"

    idle: list[float] = []
    during: list[float] = []
    stop = asyncio.Event()
    await hits(idle, stop, count=300)
    hitter = asyncio.create_task(hits(during, stop))
    started = time.perf_counter()
    retired = await writer.invalidate(tag="bulk")
    took = time.perf_counter() - started
    stop.set()
    await hitter
    assert retired == 10_000
    assert not await admin.exists(f"alc:{namespace}:0:t:{{bulk}}", f"alc:{namespace}:0:t:{{bulk}}:retiring")
    left = [k async for k in admin.scan_iter(match=f"alc:{namespace}:0:e:*", count=1000)]
    assert len(left) == 1  # the untagged entry
    # Other callers kept being served while it ran: not blocked behind it.
    assert len(during) >= 10

    def p99(values: list[float]) -> float:
        return statistics.quantiles(values, n=100)[98] * 1e3

    print(
        f"\n10,000 tagged entries retired in {took * 1e3:.0f} ms; concurrent Redis hits: "
        f"{len(during)}, p99 {p99(during):.2f} ms during vs {p99(idle):.2f} ms idle"
    )


async def test_a_pattern_scan_skips_foreign_and_corrupt_values(
    make_cache: Callable[..., LLMCache], admin: aioredis.Redis, namespace: str
) -> None:
    cache = make_cache(openai=None, upstream=local_upstream)
    system = [{"role": "system", "content": "Persona: pirate. " + "x" * 5000}]  # a header past the first read
    for n in range(20):
        await cache.complete([*system, *user(f"q{n}")])
    for n in range(5):
        await cache.complete(user(f"plain {n}"))
    await admin.set(f"alc:{namespace}:0:e:{{{'0' * 32}}}", b"not an entry")
    await admin.set(f"alc:{namespace}:0:e:{{{'1' * 32}}}", b"\xa1LC\x03")
    await admin.rpush(f"alc:{namespace}:0:e:{{{'2' * 32}}}", b"a list")
    assert await cache.invalidate(pattern=Pattern(system_contains="Persona: pirate.")) == 20
    assert await cache.invalidate(pattern=Pattern(system="")) == 5  # no system prompt at all
    assert await cache.invalidate(pattern=Pattern(key="*")) == 0  # only the foreign values are left
    assert len(await all_keys(admin, f"alc:{namespace}:0:e:*")) == 3  # the foreign values, untouched
    assert (await cache.complete([*system, *user("q0")])).source == "upstream"


async def test_tagged_writes_survive_a_script_flush(
    make_cache: Callable[..., LLMCache], admin: aioredis.Redis, namespace: str
) -> None:
    writer = make_cache(openai=None, upstream=local_upstream)
    reader = make_cache(openai=None, upstream=local_upstream)
    await admin.script_flush()  # as after a Redis restart or failover
    await writer.complete(user("untagged"))  # loads the commit script again, not the tag script
    await writer.complete(user("tagged"), cache=CacheControl(tags=["t"]))
    assert writer.stats()["lease_lost"] == 0
    assert (await reader.complete(user("tagged"))).source == "redis"
    assert await admin.zcard(f"alc:{namespace}:0:t:{{t}}") == 1


async def test_a_late_reply_never_moves_the_version_back(
    make_cache: Callable[..., LLMCache], admin: aioredis.Redis, namespace: str
) -> None:
    cache = make_cache(sync_interval=60)
    await cache.complete(user("question"))
    await cache.invalidate(everything=True)
    await cache.complete(user("question"))  # stored under version 1
    # What a check would read if its reply had been sent before the bump.
    await admin.set(f"alc:{namespace}:version", 0)
    assert await cache.sync()
    assert (await cache.complete(user("question"))).source == "memory"
    cache._memory.clear()
    assert (await cache.complete(user("question"))).source == "redis"  # version 1's entry


async def test_reads_made_before_the_first_sync_are_dropped_by_it(
    make_cache: Callable[..., LLMCache], redis_server: AnyRedis
) -> None:
    reader = make_cache(openai=None, upstream=local_upstream, sync_interval=60, redis_timeout=0.2)
    writer = make_cache(openai=None, upstream=local_upstream)
    first = await writer.complete(user("question"))
    redis_server.pause()
    try:
        await reader.open()  # cannot subscribe nor check: Redis does not answer
    finally:
        redis_server.resume()
    assert (await reader.complete(user("question"))).source == "redis"  # read before any sync
    assert await writer.invalidate(key=first.key) == 1
    # The reader was not listening when that was published; its first check
    # cannot know what it missed and drops what it read before.
    assert await reader.sync()
    assert reader.stats()["invalidations_resyncs"] == 1
    assert (await reader.complete(user("question"))).source == "upstream"


async def test_a_count_that_starts_again_is_not_mistaken_for_one_already_seen(
    make_cache: Callable[..., LLMCache], admin: aioredis.Redis, namespace: str
) -> None:
    holder, other = make_cache(sync_interval=60), make_cache(sync_interval=60)
    await holder.complete(user("question"), cache=CacheControl(tags=["manual"]))
    await other.invalidate(tag="unrelated")
    assert await holder.sync()
    await admin.delete(f"alc:{namespace}:sync")  # Redis lost the count: it starts at 1 again
    assert await other.invalidate(tag="manual") == 1
    assert await holder.sync()
    assert (await holder.complete(user("question"))).source == "upstream"


async def test_a_tag_invalidation_left_unfinished_is_finished_by_the_next(
    make_cache: Callable[..., LLMCache], admin: aioredis.Redis, namespace: str
) -> None:
    cache = make_cache(openai=None, upstream=local_upstream)
    tagged = CacheControl(tags=["t"])
    for n in range(3):
        await cache.complete(user(f"before {n}"), cache=tagged)
    # An invalidating process died after taking the set over.
    tag_key = f"alc:{namespace}:0:t:{{t}}"
    await admin.rename(tag_key, f"{tag_key}:retiring")
    for n in range(2):
        await cache.complete(user(f"after {n}"), cache=tagged)
    assert await cache.invalidate(tag="t") == 5
    assert not await admin.exists(tag_key, f"{tag_key}:retiring")
