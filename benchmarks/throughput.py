"""Throughput: cached reads per second at concurrency 1, 10, 100, 1000.

Every contender reads the same ~2 KB completion from the same private
redis-server, over 1000 distinct keys (so no contender can answer from a
process-local copy), C coroutines each reading in a loop for ``--seconds``:

- ``raw GET + orjson.loads``: redis-py GET through a BlockingConnectionPool of
  64 connections: the floor for any Redis-backed cache.
- ``aiollmcache complete()``: Redis-tier hits (memory tier off), reading
  ``result.text``; with concurrent reads batched (the default) and without.
- ``aiocache RedisCache`` and ``cashews redis``, when installed (the ``bench``
  extra): their ``get`` of the same answer, with their default serializers
  (aiocache: JSON here; cashews: its own), pools of 64.

Reported per contender and concurrency: reads per second (of those that
succeeded), p50 and p99 latency, reads per second relative to the raw GET at
the same concurrency, reads that failed, and (for aiollmcache) calls that
were answered by the model because their Redis read ran out of time.

    python benchmarks/throughput.py [--seconds 2] [--rounds 4] [--lone-calls 20000]
                                   [--concurrency 1,10,100,1000] [--plot PNG]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import redis.asyncio as aioredis
from _common import percentile, print_table, write_json

from aiollmcache import LLMCache
from aiollmcache.testing import RedisServer, chat_completion

MODEL = "gpt-4o-mini"
KEYS = 1000
ANSWER = "An answer of realistic length. " * 60


def completion() -> dict[str, Any]:
    return chat_completion(
        ANSWER, model=MODEL, usage={"prompt_tokens": 20, "completion_tokens": 300, "total_tokens": 320}
    )


async def model(params: dict[str, Any]) -> dict[str, Any]:
    return completion()


def user(n: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"question {n}"}]


Reader = Callable[[int], Awaitable[object]]


class NotFromRedis(Exception):
    """An answer the cache got from the model: its Redis read ran out of time."""


class Sample:
    """One contender at one concurrency, over all its rounds."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.elapsed = 0.0
        self.errors = 0
        self.fallbacks = 0

    def summary(self) -> dict[str, float]:
        ordered = sorted(v * 1000 for v in self.latencies)
        return {
            "reads_per_s": len(self.latencies) / self.elapsed,
            "p50_ms": percentile(ordered, 50),
            "p99_ms": percentile(ordered, 99),
            "errors": self.errors,
            "from_model": self.fallbacks,
        }


async def measure(read: Reader, concurrency: int, seconds: float, sample: Sample) -> None:
    stop_at = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        n = w
        while (started := time.perf_counter()) < stop_at:
            try:
                await read(n % KEYS)
            except NotFromRedis:
                sample.fallbacks += 1
            except Exception:  # counted: a read that failed is not a read
                sample.errors += 1
            else:
                sample.latencies.append(time.perf_counter() - started)
            n += concurrency

    gc.collect()
    began = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    sample.elapsed += time.perf_counter() - began


def _cached_reader(cache: LLMCache) -> Reader:
    async def read(n: int) -> object:
        result = await cache.complete(user(n))
        if result.source != "redis":
            raise NotFromRedis
        return result.text

    return read


async def contenders(url: str, stack: contextlib.AsyncExitStack) -> dict[str, Reader]:
    raw_json = orjson.dumps(completion())
    readers: dict[str, Reader] = {}

    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=64, timeout=10)
    raw = aioredis.Redis(connection_pool=pool)
    stack.push_async_callback(raw.aclose)
    await raw.mset({f"raw:{n}": raw_json for n in range(KEYS)})

    async def raw_get(n: int) -> object:
        return orjson.loads(await raw.get(f"raw:{n}"))["choices"][0]["message"]["content"]

    readers["raw GET + orjson.loads"] = raw_get

    for name, batching in (("aiollmcache complete()", True), ("aiollmcache complete(), no batching", False)):
        cache = LLMCache(
            redis_url=url,
            upstream=model,
            model=MODEL,
            namespace="tp",
            memory_max_entries=0,
            redis_batching=batching,
        )
        stack.push_async_callback(cache.aclose)
        if batching:  # the first fills Redis for both
            for start in range(0, KEYS, 100):
                await asyncio.gather(*(cache.complete(user(n)) for n in range(start, start + 100)))
        readers[name] = _cached_reader(cache)

    try:
        from aiocache import RedisCache
        from aiocache.serializers import JsonSerializer
    except ImportError:
        pass
    else:
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        peer = RedisCache(endpoint="127.0.0.1", port=port, serializer=JsonSerializer(), pool_max_size=64)
        stack.push_async_callback(peer.close)
        for n in range(KEYS):
            await peer.set(f"aiocache:{n}", completion())

        async def aiocache_get(n: int) -> object:
            return (await peer.get(f"aiocache:{n}"))["choices"][0]["message"]["content"]

        readers["aiocache RedisCache"] = aiocache_get

    try:
        from cashews import Cache
    except ImportError:
        pass
    else:
        other = Cache()
        other.setup(url, max_connections=64, client_side=False)
        await other.init()
        stack.push_async_callback(other.close)
        for n in range(KEYS):
            await other.set(f"cashews:{n}", completion())

        async def cashews_get(n: int) -> object:
            return (await other.get(f"cashews:{n}"))["choices"][0]["message"]["content"]

        readers["cashews redis"] = cashews_get
    return readers


async def run(
    args: argparse.Namespace, url: str
) -> tuple[dict[str, dict[int, dict[str, float]]], dict[str, float]]:
    report: dict[str, dict[int, dict[str, float]]] = {}
    async with contextlib.AsyncExitStack() as stack:
        readers = await contenders(url, stack)
        lone = await lone_calls(readers, args.lone_calls)
        for concurrency in args.concurrency:
            # Contenders take turns, round after round, so that the machine's
            # noise falls on all of them alike.
            samples = {name: Sample() for name in readers}
            for _ in range(args.rounds):
                for name, read in readers.items():
                    await measure(read, concurrency, args.seconds / args.rounds, samples[name])
            for name, sample in samples.items():
                report.setdefault(name, {})[concurrency] = sample.summary()
    return report, lone


async def lone_calls(readers: dict[str, Reader], calls: int) -> dict[str, float]:
    """One call at a time, batching on and off alternating call by call, so
    that the machine's noise falls on both alike: what batching costs a call
    that has nobody to share a round trip with."""
    on, off = readers["aiollmcache complete()"], readers["aiollmcache complete(), no batching"]
    timings: dict[Reader, list[float]] = {on: [], off: []}
    gc.collect()
    for n in range(calls):
        for read in (on, off) if n % 2 else (off, on):
            started = time.perf_counter()
            await read(n % KEYS)
            timings[read].append(time.perf_counter() - started)
    p50_on = percentile(sorted(timings[on]), 50) * 1000
    p50_off = percentile(sorted(timings[off]), 50) * 1000
    return {
        "calls": calls,
        "p50_ms_batching": p50_on,
        "p50_ms_no_batching": p50_off,
        "added": p50_on / p50_off - 1,
    }


def plot(report: dict[str, dict[int, dict[str, float]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, by_c in report.items():
        xs = sorted(by_c)
        ax.plot(xs, [by_c[c]["reads_per_s"] for c in xs], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("concurrent callers")
    ax.set_ylabel("cached reads per second")
    ax.set_title("Cached reads of a 2 KB answer from one Redis")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per contender and concurrency")
    parser.add_argument("--rounds", type=int, default=4, help="turns the seconds are split into")
    parser.add_argument("--concurrency", default="1,10,100,1000")
    parser.add_argument("--lone-calls", type=int, default=20000, help="alternating lone calls, on vs off")
    parser.add_argument("--plot", default=None, metavar="PNG")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    with RedisServer() as server:
        report, lone = asyncio.run(run(args, server.url))
    base = report["raw GET + orjson.loads"]
    rows = [
        (
            name,
            str(c),
            f"{r['reads_per_s']:,.0f}",
            f"{r['p50_ms']:.2f}",
            f"{r['p99_ms']:.2f}",
            f"{r['reads_per_s'] / base[c]['reads_per_s']:.2f}x",
            str(r["errors"]),
            str(r["from_model"]),
        )
        for c in args.concurrency
        for name, by_c in report.items()
        for r in [by_c[c]]
    ]
    print(
        f"{args.seconds} s per contender and concurrency in {args.rounds} interleaved rounds, "
        f"{KEYS} distinct keys, a ~2 KB answer\n"
    )
    header = ("contender", "concurrency", "reads/s", "p50 ms", "p99 ms", "vs raw GET", "failed", "from model")
    print_table(header, rows)
    batched, unbatched = report["aiollmcache complete()"], report["aiollmcache complete(), no batching"]
    for c in args.concurrency:
        print(
            f"concurrency {c}: batching changes p50 latency by "
            f"{batched[c]['p50_ms'] / unbatched[c]['p50_ms'] - 1:+.1%}, reads/s by "
            f"{batched[c]['reads_per_s'] / unbatched[c]['reads_per_s'] - 1:+.1%}"
        )
    print(
        f"lone calls, batching on and off alternating ({lone['calls']:,} each): p50 "
        f"{lone['p50_ms_batching'] * 1000:.1f} us vs {lone['p50_ms_no_batching'] * 1000:.1f} us, "
        f"batching adds {lone['added']:+.1%}"
    )
    settings = {
        "seconds": args.seconds,
        "rounds": args.rounds,
        "concurrency": args.concurrency,
        "lone_calls": args.lone_calls,
    }
    document = {"settings": settings, "results": report, "lone_calls": lone}
    print(f"\nwrote {write_json('throughput', document, args.json)}")
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
