"""Latency of a cache hit through ``LLMCache.complete()``, against raw redis-py.

Rows, measured interleaved in one run on one Redis and one connection pool:

- ``raw GET + orjson.loads``: redis-py GET of a ~2 KB completion's JSON and
  orjson.loads of it: the floor for any Redis-backed cache.
- ``complete(), Redis hit``: the full call with the memory tier disabled (key
  computation, Redis GET, envelope decoding and checks) and reading
  ``result.text``, as the baseline reads its JSON.
- ``complete(), Redis hit, .response``: the same, reading ``result.response``
  (the whole ``ChatCompletion``, built from the stored JSON on first access).
- ``complete(), memory hit``: the full call answered from the memory tier, and
  ``result.text``.
- ``complete(), memory hit, stale``: the same for an entry past its fresh
  window, whose refresh is in flight (as for every stale hit but the first).
- ``respond(), ...``: the same hits for a Responses API request (a
  ``Response`` of the same ~2 KB of text).
- ``..., bucket of 4``: a sampled request (``temperature=0.9``) under
  ``CachePolicy(samples=4)``, its bucket full: the four answers are read (in
  one round trip from Redis) and one is served at random.

Also, for reference, raw GET through redis-py's default (non-blocking) pool.

    python benchmarks/hit_latency.py [--iterations 20000] [--redis-url URL] [--json PATH]

Without ``--redis-url`` a private redis-server is started on a free port.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from typing import Any

import orjson
import redis.asyncio as aioredis
from _common import print_table, summarize, write_json

from aiollmcache import CachePolicy, LLMCache
from aiollmcache.testing import RedisServer, chat_completion
from aiollmcache.tiers.redis import connect

PROMPT = "Explain the difference between a process and a thread."
INSTRUCTIONS = "You are a helpful assistant."
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Explain the difference between a process and a thread."},
]


def completion(chars: int) -> dict[str, Any]:
    return chat_completion(
        "x" * chars,
        model="gpt-4o-mini",
        completion_id="chatcmpl-bench",
        created=1_700_000_000,
        usage={"prompt_tokens": 25, "completion_tokens": 400, "total_tokens": 425},
        system_fingerprint="fp_bench",
    )


def response(chars: int) -> dict[str, Any]:
    return {
        "id": "resp_bench",
        "object": "response",
        "created_at": 1_700_000_000,
        "model": "gpt-4o-mini",
        "status": "completed",
        "output": [
            {
                "type": "message",
                "id": "msg_bench",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": "x" * chars, "annotations": []}],
            }
        ],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": 25,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": 400,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 425,
        },
    }


async def run(url: str, iterations: int, answer_chars: int) -> dict[str, Any]:
    body = completion(answer_chars)
    raw_json = orjson.dumps(body)
    raw_response = orjson.dumps(response(answer_chars))

    async def answer(params: dict[str, Any]) -> bytes:
        return raw_response

    async def upstream(params: dict[str, Any]) -> bytes:
        return raw_json

    upstream.responses = answer  # type: ignore[attr-defined]  # the Responses API

    client = connect(url, max_connections=64, timeout=1.0)
    default_pool = aioredis.Redis.from_url(url)
    raw_key = "bench:raw:{hit_latency}"
    await client.set(raw_key, raw_json)
    memory_cache = LLMCache(upstream=upstream, model="gpt-4o-mini", namespace="bench-mem", xfetch_beta=0)
    # A stale entry whose refresh never ends: every read is a stale hit that
    # finds its refresh already in flight (what stale hits are, but the first).
    stuck = asyncio.Event()
    first_call = True

    async def stuck_upstream(params: dict[str, Any]) -> bytes:
        nonlocal first_call
        if not first_call:
            await stuck.wait()
        first_call = False
        return raw_json

    stale_cache = LLMCache(
        upstream=stuck_upstream, model="gpt-4o-mini", ttl=0.05, stale_ttl=3600, close_timeout=0, xfetch_beta=0
    )
    redis_cache = LLMCache(
        redis=client, upstream=upstream, model="gpt-4o-mini", namespace="bench", memory_max_entries=0
    )
    bucket = CachePolicy(samples=4)
    redis_bucket = LLMCache(
        redis=client,
        upstream=upstream,
        model="gpt-4o-mini",
        namespace="bench-bucket",
        memory_max_entries=0,
        policy=bucket,
    )
    memory_bucket = LLMCache(upstream=upstream, model="gpt-4o-mini", xfetch_beta=0, policy=bucket)
    samples: dict[str, list[int]] = {
        "raw GET + orjson.loads": [],
        "complete(), Redis hit": [],
        "complete(), Redis hit, .response": [],
        "complete(), Redis hit, bucket of 4": [],
        "respond(), Redis hit": [],
        "complete(), memory hit": [],
        "complete(), memory hit, stale": [],
        "complete(), memory hit, bucket of 4": [],
        "respond(), memory hit": [],
        "raw GET + orjson.loads (default pool)": [],
    }
    clock = time.perf_counter_ns
    try:
        await redis_cache.complete(MESSAGES)  # store
        await memory_cache.complete(MESSAGES)
        first = await redis_cache.complete(MESSAGES)
        assert first.source == "redis", first.source
        assert (await memory_cache.complete(MESSAGES)).source == "memory"
        await redis_cache.respond(input=PROMPT, instructions=INSTRUCTIONS)  # store
        await memory_cache.respond(input=PROMPT, instructions=INSTRUCTIONS)
        for sampled in (redis_bucket, memory_bucket):
            for _ in range(4):  # fill the bucket
                await sampled.complete(MESSAGES, temperature=0.9)
        warmup = max(200, iterations // 10)

        async def raw_get() -> None:
            orjson.loads(await client.get(raw_key))

        async def redis_hit() -> None:
            result = await redis_cache.complete(MESSAGES)
            assert result.text  # what a caller reads, decoded like the baseline's loads

        async def redis_hit_response() -> None:
            result = await redis_cache.complete(MESSAGES)
            assert result.response.choices  # the whole ChatCompletion, built on first access

        async def redis_bucket_hit() -> None:
            result = await redis_bucket.complete(MESSAGES, temperature=0.9)
            assert result.text

        async def redis_respond_hit() -> None:
            result = await redis_cache.respond(input=PROMPT, instructions=INSTRUCTIONS)
            assert result.output_text

        async def raw_get_default_pool() -> None:
            orjson.loads(await default_pool.get(raw_key))

        paths = [
            ("raw GET + orjson.loads", raw_get),
            ("complete(), Redis hit", redis_hit),
            ("complete(), Redis hit, .response", redis_hit_response),
            ("complete(), Redis hit, bucket of 4", redis_bucket_hit),
            ("respond(), Redis hit", redis_respond_hit),
            ("raw GET + orjson.loads (default pool)", raw_get_default_pool),
        ]
        # Redis paths interleaved call by call, so machine noise hits them
        # alike, and their order rotated every round: no path always follows
        # the same one.
        for i in range(warmup + iterations):
            for j in range(len(paths)):
                name, path = paths[(i + j) % len(paths)]
                t0 = clock()
                await path()
                t1 = clock()
                if i >= warmup:
                    samples[name].append(t1 - t0)
        # Memory hits in a block of their own: a few microseconds each, they
        # would otherwise measure the caches the Redis round trips just evicted.
        await stale_cache.complete(MESSAGES)
        await asyncio.sleep(0.06)  # past its fresh window
        assert (await stale_cache.complete(MESSAGES)).stale
        # Fresh and stale memory hits alternate, in a block of their own.
        memory_samples = samples["complete(), memory hit"]
        stale_samples = samples["complete(), memory hit, stale"]
        bucket_samples = samples["complete(), memory hit, bucket of 4"]
        respond_samples = samples["respond(), memory hit"]
        for i in range(warmup + iterations * 5):
            t0 = clock()
            m = await memory_cache.complete(MESSAGES)
            assert m.text
            t1 = clock()
            s = await stale_cache.complete(MESSAGES)
            assert s.text
            t2 = clock()
            b = await memory_bucket.complete(MESSAGES, temperature=0.9)
            assert b.text
            t3 = clock()
            r = await memory_cache.respond(input=PROMPT, instructions=INSTRUCTIONS)
            assert r.output_text
            t4 = clock()
            if i >= warmup:
                memory_samples.append(t1 - t0)
                stale_samples.append(t2 - t1)
                bucket_samples.append(t3 - t2)
                respond_samples.append(t4 - t3)
        assert m.source == "memory" and not m.stale
        assert s.source == "memory" and s.stale
        stats = redis_cache.stats()
        assert stats["upstream_calls"] == 2 and stats["hits_redis"] >= 2 * iterations  # chat and respond
        for sampled in (redis_bucket, memory_bucket):
            assert sampled.stats()["upstream_calls"] == 4 and b.source == "memory"
    finally:
        await redis_bucket.aclose()
        await memory_bucket.aclose()
        await memory_cache.aclose()
        await redis_cache.aclose()
        await stale_cache.aclose()
        await client.delete(raw_key)
        await client.aclose(close_connection_pool=True)
        await default_pool.aclose()
    results = {name: summarize(values) for name, values in samples.items()}
    floor = results["raw GET + orjson.loads"]["p50_us"]
    for result in results.values():
        result["p50_vs_raw_get"] = result["p50_us"] / floor
    stale, fresh = results["complete(), memory hit, stale"], results["complete(), memory hit"]
    stale["p50_vs_fresh_hit"] = stale["p50_us"] / fresh["p50_us"]
    return {"iterations": iterations, "response_bytes": len(raw_json), "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=20_000)
    parser.add_argument(
        "--answer-chars", type=int, default=1700, help="answer size; ~2 KB response by default"
    )
    parser.add_argument("--redis-url", default=None)
    parser.add_argument("--json", default=None, help="where to write the JSON (default benchmarks/results/)")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        url = args.redis_url or stack.enter_context(RedisServer()).url
        report = asyncio.run(run(url, args.iterations, args.answer_chars))
    rows = [
        (
            name,
            f"{r['p50_us']:.1f}",
            f"{r['p90_us']:.1f}",
            f"{r['p99_us']:.1f}",
            f"{r['p50_vs_raw_get']:.2f}x",
        )
        for name, r in report["results"].items()
    ]
    print(f"{args.iterations} interleaved iterations, response {report['response_bytes']} bytes\n")
    print_table(("path", "p50 us", "p90 us", "p99 us", "p50 vs raw GET"), rows)
    ratio = report["results"]["complete(), memory hit, stale"]["p50_vs_fresh_hit"]
    print(f"\nstale memory hit p50 / fresh memory hit p50: {ratio:.2f}x")
    print(f"\nwrote {write_json('hit_latency', report, args.json)}")


if __name__ == "__main__":
    main()
