"""Freshness under a Zipf workload with short TTLs: fixed TTL vs SWR vs SWR + XFetch.

Requests arrive at a fixed rate for D seconds (an open loop: the same prompts
at the same moments for every contender), drawn from a Zipf distribution over
N prompts, against a fake model with latency L, through one LLMCache per
contender (same Redis, same fake model, one after the other in the same run):

- ``fixed ttl``: an entry is fresh for ``ttl``, then a miss.
- ``swr``: then served stale for ``stale_ttl`` while one refresh replaces it.
- ``swr + xfetch``: and refreshed early, before it goes stale.

Reported per contender: caller-visible misses (callers that waited for the
model), those on hot keys (the top 10 prompts) once they had been served from
the cache for a while, p50/p99
caller latency, upstream calls, and the p50 of stale hits against fresh hits
from the memory tier.

    python benchmarks/freshness.py [--seconds 12] [--rate 2000] [--prompts 200]
        [--ttl 2] [--stale-ttl 10] [--latency 0.2] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import time
from typing import Any

from _common import percentile, print_table, write_json

from aiollmcache import LLMCache
from aiollmcache.testing import FakeOpenAI, RedisServer

HOT = 10


async def run_contender(
    name: str, settings: dict[str, Any], args: argparse.Namespace, url: str, fake: FakeOpenAI
) -> dict[str, Any]:
    fake.reset()
    client = fake.client()
    namespace = f"fresh-{name.replace(' ', '').replace('+', '-')}-{int(time.time() * 1000)}"
    prompts = [f"zipf prompt {i}" for i in range(args.prompts)]
    weights = [1 / (rank + 1) ** 1.1 for rank in range(args.prompts)]
    rng = random.Random(args.seed)
    # rank, latency, waited, stale, source, finished at
    records: list[tuple[int, float, bool, bool, str, float]] = []
    async with LLMCache(
        redis_url=url, openai=client, model="gpt-4o-mini", namespace=namespace, ttl=args.ttl, **settings
    ) as cache:
        ranks = rng.choices(range(args.prompts), weights=weights, k=int(args.rate * args.seconds))

        async def one(rank: int) -> None:
            started = time.perf_counter()
            result = await cache.complete([{"role": "user", "content": prompts[rank]}])
            done = time.perf_counter()
            waited = result.source == "upstream"  # the caller (or its flight) waited for the model
            records.append((rank, done - started, waited, result.stale, str(result.source), done))

        # Open loop: the same requests at the same moments for every contender,
        # whatever each one's latency (a closed loop would send more requests
        # to the faster one).
        tasks = []
        start = time.perf_counter()
        for i, rank in enumerate(ranks):
            delay = start + i / args.rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(rank)))
        await asyncio.gather(*tasks)
        stats = cache.stats()
    await client.close()
    latencies = sorted(r[1] for r in records)
    # A hot key's miss once its first answer had been around for a while (not
    # the callers of the first fill, who finish in a burst): a caller who waited
    # for the model although the key was popular before its entry expired.
    first_done: dict[int, float] = {}
    hot_misses = 0
    for rank, _, waited, _, _, done in records:
        first = first_done.setdefault(rank, done)
        if waited and rank < HOT and done > first + args.ttl / 2:
            hot_misses += 1
    fresh_hits = sorted(r[1] for r in records if r[4] == "memory" and not r[3])
    stale_hits = sorted(r[1] for r in records if r[4] == "memory" and r[3])
    return {
        "requests": len(records),
        "misses": sum(r[2] for r in records),
        "hot_misses_after_first": hot_misses,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "upstream_calls": fake.calls(),
        "stale_served": stats["stale_served"],
        "refreshes": stats["refreshes"],
        "fresh_hit_p50_us": percentile(fresh_hits, 50) * 1e6,
        "stale_hit_p50_us": percentile(stale_hits, 50) * 1e6 if stale_hits else None,
    }


async def drive(args: argparse.Namespace, url: str) -> dict[str, Any]:
    contenders = {
        "fixed ttl": {"stale_ttl": 0, "xfetch_beta": 0},
        "swr": {"stale_ttl": args.stale_ttl, "xfetch_beta": 0},
        "swr + xfetch": {"stale_ttl": args.stale_ttl, "xfetch_beta": 1.0},
    }
    report = {}
    async with FakeOpenAI(latency=args.latency) as fake:
        for name, settings in contenders.items():
            report[name] = await run_contender(name, settings, args, url, fake)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--rate", type=float, default=2000.0, help="requests per second")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--ttl", type=float, default=2.0)
    parser.add_argument("--stale-ttl", type=float, default=10.0)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--redis-url", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        url = args.redis_url or stack.enter_context(RedisServer()).url
        report = asyncio.run(drive(args, url))
    fixed_calls = report["fixed ttl"]["upstream_calls"]
    rows = []
    for name, r in report.items():
        stale = r["stale_hit_p50_us"]
        rows.append(
            (
                name,
                str(r["requests"]),
                str(r["misses"]),
                str(r["hot_misses_after_first"]),
                f"{r['p50_ms']:.2f}",
                f"{r['p99_ms']:.1f}",
                f"{r['upstream_calls']} ({r['upstream_calls'] / fixed_calls:.2f}x)",
                f"{r['fresh_hit_p50_us']:.1f}",
                "-" if stale is None else f"{stale:.1f} ({stale / r['fresh_hit_p50_us']:.2f}x)",
            )
        )
    print(
        f"{args.rate:.0f} requests/s for {args.seconds:.0f} s, Zipf over {args.prompts} prompts, "
        f"ttl {args.ttl} s, stale_ttl {args.stale_ttl} s, model latency {args.latency} s\n"
    )
    header = ("contender", "requests", "misses", "hot misses", "p50 ms", "p99 ms", "upstream")
    header += ("fresh hit p50 us", "stale hit p50 us")
    print_table(header, rows)
    settings = {k: getattr(args, k) for k in ("seconds", "rate", "prompts", "ttl", "stale_ttl", "latency")}
    print(f"\nwrote {write_json('freshness', {'settings': settings, 'results': report}, args.json)}")


if __name__ == "__main__":
    main()
