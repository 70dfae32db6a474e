"""Across real OS processes sharing one Redis: entries, and one upstream call per stampede."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from aiollmcache import LLMCache
from aiollmcache.request import build_chat_request
from aiollmcache.testing import FakeOpenAI

from .conftest import AnyRedis, all_keys, subscribers, until, user

pytestmark = [pytest.mark.asyncio, pytest.mark.both_redis]

ROOT = Path(__file__).resolve().parent.parent


class Worker:
    """One ``tests.worker`` process."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(
        cls,
        redis_server: AnyRedis,
        fake: FakeOpenAI,
        namespace: str,
        prompt: str,
        *options: str,
    ) -> Worker:
        argv = ["-m", "tests.worker", redis_server.url, fake.base_url, namespace, prompt, *options]
        pipe = asyncio.subprocess.PIPE
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *argv, cwd=ROOT, stdin=pipe, stdout=pipe, stderr=pipe
        )
        worker = cls(proc)
        if "--wait-go" in options:
            assert proc.stdout is not None
            line = await proc.stdout.readline()
            assert line == b"ready\n", line + (await proc.stderr.read() if proc.stderr else b"")
        return worker

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")

    async def result(self) -> Any:
        out, err = await self.proc.communicate()
        assert self.proc.returncode == 0, err.decode()
        return orjson.loads(out)


async def run_worker(redis_server: AnyRedis, fake: FakeOpenAI, namespace: str, prompt: str) -> Any:
    worker = await Worker.start(redis_server, fake, namespace, prompt)
    (result,) = (await worker.result())["results"]
    return result


async def test_another_process_hits_what_this_one_stored(
    cache: LLMCache, fake: FakeOpenAI, redis_server: AnyRedis, namespace: str
) -> None:
    mine = await cache.complete(user("across processes"))
    theirs = await run_worker(redis_server, fake, namespace, "across processes")
    assert theirs == {
        "source": "redis",
        "coalesced": False,
        "stale": False,
        "text": mine.text,
        "key": mine.key,
        "id": mine.response.id,
        "finish_reason": "stop",
    }
    assert fake.calls("across processes") == 1


async def test_this_process_hits_what_another_stored(
    cache: LLMCache, fake: FakeOpenAI, redis_server: AnyRedis, namespace: str
) -> None:
    theirs = await run_worker(redis_server, fake, namespace, "from a worker")
    assert theirs["source"] == "upstream"
    mine = await cache.complete(user("from a worker"))
    assert mine.source == "redis"
    assert mine.response.id == theirs["id"]
    assert fake.calls("from a worker") == 1


async def test_four_processes_stampede_one_cold_key(
    fake: FakeOpenAI, redis_server: AnyRedis, namespace: str
) -> None:
    fake.latency = 0.5
    workers = [
        await Worker.start(redis_server, fake, namespace, "cold key", "--callers", "250", "--wait-go")
        for _ in range(4)
    ]
    for worker in workers:
        worker.go()
    reports = [await w.result() for w in workers]
    results = [r for report in reports for r in report["results"]]
    assert len(results) == 1000
    assert not [r for r in results if "error" in r]
    assert fake.calls("cold key") == 1
    assert len({r["id"] for r in results}) == 1
    holders = [rep for rep in reports if rep["stats"]["upstream_calls"] == 1]
    assert len(holders) == 1
    # every other process waited on the holder's call and was woken by it
    waiters = [rep for rep in reports if rep is not holders[0]]
    for report in waiters:
        sources = Counter((r["source"], r["coalesced"]) for r in report["results"])
        assert sum(sources.values()) == 250
        assert all(source == "redis" and coalesced for source, coalesced in sources)


async def test_killed_holder_is_replaced_by_exactly_one_waiter(
    fake: FakeOpenAI, redis_server: AnyRedis, namespace: str
) -> None:
    fake.latency = 2.0
    prompt = "holder dies"
    holder = await Worker.start(redis_server, fake, namespace, prompt, "--callers", "10", "--lease-ttl", "1")
    await asyncio.to_thread(fake.wait_for_calls, 1, prompt=prompt, timeout=10)
    waiters = [
        await Worker.start(
            redis_server, fake, namespace, prompt, "--callers", "50", "--lease-ttl", "1", "--wait-go"
        )
        for _ in range(2)
    ]
    for worker in waiters:
        worker.go()
    r = redis_server.client()
    try:
        channel = f"alc:{namespace}:0:n:{{{request_key(fake, prompt)}}}"

        async def both_waiting() -> bool:
            return await subscribers(r, channel) == 2

        await until(both_waiting)
        holder.proc.send_signal(signal.SIGKILL)
        await holder.proc.wait()
        reports = [await w.result() for w in waiters]
    finally:
        await r.aclose()
    results = [res for report in reports for res in report["results"]]
    assert not [res for res in results if "error" in res]
    assert len({res["id"] for res in results}) == 1
    assert fake.calls(prompt) == 2  # the killed call, and one takeover
    assert sorted(rep["stats"]["lease_takeovers"] for rep in reports) == [0, 1]


def request_key(fake: FakeOpenAI, prompt: str) -> str:
    scope = fake.base_url  # what the worker's client names its upstream
    return build_chat_request(user(prompt), {}, default_model="test-model", upstream_scope=scope).key


async def test_upstream_failure_reaches_every_process_without_a_retry_storm(
    fake: FakeOpenAI, redis_server: AnyRedis, namespace: str
) -> None:
    fake.latency = 0.3
    fake.fail(500, prompt="fails everywhere")
    workers = [
        await Worker.start(redis_server, fake, namespace, "fails everywhere", "--callers", "50", "--wait-go")
        for _ in range(3)
    ]
    for worker in workers:
        worker.go()
    reports = [await w.result() for w in workers]
    errors = Counter(r.get("error") for report in reports for r in report["results"])
    assert fake.calls("fails everywhere") == 1
    assert errors == {"InternalServerError": 50, "RemoteUpstreamError": 100}
    r = redis_server.client()
    try:
        assert await all_keys(r, f"alc:{namespace}:0:*") == []  # no entry, no lease left behind
    finally:
        await r.aclose()


async def test_three_processes_on_a_stale_key_refresh_it_once(
    make_cache: Callable[..., LLMCache], fake: FakeOpenAI, redis_server: AnyRedis, namespace: str
) -> None:
    writer = make_cache(ttl=0.5, stale_ttl=60)
    first = await writer.complete(user("stale everywhere"))
    await asyncio.sleep(0.55)  # the fresh window itself is under test
    fake.latency = 0.5
    options = (
        "--callers",
        "100",
        "--ttl",
        "60",
        "--stale-ttl",
        "60",
        "--wait-go",
    )  # their refresh stays fresh
    workers = [
        await Worker.start(redis_server, fake, namespace, "stale everywhere", *options) for _ in range(3)
    ]
    for worker in workers:
        worker.go()
    reports = [await w.result() for w in workers]  # each drains its refresh before exiting
    results = [r for report in reports for r in report["results"]]
    assert not [r for r in results if "error" in r]
    # every caller got the stale answer at once; nobody waited for the model
    assert {(r["id"], r["stale"]) for r in results} == {(first.response.id, True)}
    assert fake.calls("stale everywhere") == 2  # the first answer and one refresh for the fleet
    assert sum(rep["stats"]["lease_held"] for rep in reports) == 1
    refreshed = await make_cache(memory_max_entries=0).complete(user("stale everywhere"))
    assert refreshed.response.id != first.response.id  # the fleet's one refresh, stored


async def test_an_answer_the_policy_refuses_reaches_every_process_from_one_call(
    fake: FakeOpenAI, redis_server: AnyRedis, namespace: str
) -> None:
    fake.latency = 0.5
    options = ("--callers", "50", "--max-tokens", "2", "--wait-go")
    workers = [
        await Worker.start(redis_server, fake, namespace, "cut everywhere", *options) for _ in range(3)
    ]
    for worker in workers:
        worker.go()
    reports = [await w.result() for w in workers]
    results = [r for report in reports for r in report["results"]]
    assert not [r for r in results if "error" in r]
    assert fake.calls("cut everywhere") == 1
    assert len({r["id"] for r in results}) == 1
    assert {r["finish_reason"] for r in results} == {"length"}
    # Not stored: handed to the two waiting processes in the lease's release.
    assert sum(report["stats"]["lease_passed"] for report in reports) == 2
    assert sum(report["stats"]["not_stored"]["truncated"] for report in reports) == 1
    r = redis_server.client()
    try:
        assert await all_keys(r, f"alc:{namespace}:*:e:*") == []
    finally:
        await r.aclose()


async def test_processes_fill_a_sample_bucket_with_at_most_k_calls(
    fake: FakeOpenAI, redis_server: AnyRedis, namespace: str
) -> None:
    fake.latency = 0.3
    options = ("--callers", "40", "--samples", "3", "--temperature", "0.9", "--wait-go")
    ids: set[str] = set()
    for _ in range(2):  # two waves of three processes
        workers = [await Worker.start(redis_server, fake, namespace, "sample me", *options) for _ in range(3)]
        for worker in workers:
            worker.go()
        reports = [await w.result() for w in workers]
        results = [r for report in reports for r in report["results"]]
        assert len(results) == 120 and not [r for r in results if "error" in r]
        ids |= {r["id"] for r in results}
    assert 1 <= fake.calls("sample me") <= 3
    assert len(ids) == fake.calls("sample me")  # every answer served is one of the bucket's


async def test_four_processes_stampede_one_responses_request(
    fake: FakeOpenAI, redis_server: AnyRedis, namespace: str
) -> None:
    fake.latency = 0.5
    options = ("--callers", "100", "--responses", "--wait-go")
    workers = [
        await Worker.start(redis_server, fake, namespace, "responses stampede", *options) for _ in range(4)
    ]
    for worker in workers:
        worker.go()
    reports = [await w.result() for w in workers]
    results = [r for report in reports for r in report["results"]]
    assert len(results) == 400 and not [r for r in results if "error" in r]
    assert fake.calls("responses stampede") == 1
    assert {r["id"] for r in results} == {results[0]["id"]} and results[0]["id"].startswith("resp_")
    assert {r["text"] for r in results} == {"Answer to: responses stampede"}
    assert sorted(report["stats"]["upstream_calls"] for report in reports) == [0, 0, 0, 1]
