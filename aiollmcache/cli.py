"""Command line: ``aiollmcache demo``.

``demo`` fires a burst of concurrent chat requests over a set of prompts at a
local FakeOpenAI server with realistic latency, once straight to the model and
then through the cache (cold, then warm), and prints what each cost.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ._table import format_table
from .client import CacheResult, LLMCache, Source

__all__ = ["main"]

TOPICS = [
    "Python",
    "Redis",
    "asyncio",
    "HTTP/2",
    "TLS",
    "a B-tree",
    "Raft consensus",
    "a bloom filter",
    "garbage collection",
    "a hash ring",
    "TCP slow start",
    "a mutex",
    "backpressure",
    "a vector clock",
    "copy-on-write",
    "an LRU cache",
    "idempotency",
    "a write-ahead log",
    "CRDTs",
    "a circuit breaker",
]


@dataclass
class Row:
    scenario: str
    requests: int
    upstream_calls: int
    memory: int
    redis: int
    coalesced: int
    seconds: float


def _prompts(count: int, distinct: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    topics = [f"Explain {TOPICS[i % len(TOPICS)]} in two sentences (#{i})." for i in range(distinct)]
    # Popularity follows a Zipf-like curve, as real traffic does.
    weights = [1 / (rank + 1) for rank in range(distinct)]
    return rng.choices(topics, weights=weights, k=count)


def _row(scenario: str, results: Sequence[CacheResult], calls: int, seconds: float) -> Row:
    return Row(
        scenario=scenario,
        requests=len(results),
        upstream_calls=calls,
        memory=sum(r.source == Source.MEMORY for r in results),
        redis=sum(r.source == Source.REDIS and not r.coalesced for r in results),
        coalesced=sum(r.coalesced for r in results),
        seconds=seconds,
    )


async def _demo(args: argparse.Namespace) -> list[Row]:
    from .testing import FakeOpenAI

    prompts = _prompts(args.requests, args.prompts, args.seed)
    rows: list[Row] = []
    async with FakeOpenAI(latency=args.latency, answer_chars=args.answer_chars) as fake:
        client = fake.client(max_retries=0)
        try:
            started = time.perf_counter()
            await asyncio.gather(
                *(
                    client.chat.completions.create(
                        model=args.model, messages=[{"role": "user", "content": p}]
                    )
                    for p in prompts
                )
            )
            seconds = time.perf_counter() - started
            rows.append(Row("no cache", len(prompts), fake.calls(), 0, 0, 0, seconds))

            async def burst(cache: LLMCache, scenario: str) -> None:
                before = fake.calls()
                started = time.perf_counter()
                results = await asyncio.gather(
                    *(cache.complete([{"role": "user", "content": p}]) for p in prompts)
                )
                rows.append(_row(scenario, results, fake.calls() - before, time.perf_counter() - started))

            namespace = f"demo-{int(time.time())}"
            async with LLMCache(
                redis_url=args.redis_url, openai=client, model=args.model, namespace=namespace
            ) as cache:
                await burst(cache, "cache, cold")
                await burst(cache, "cache, warm")
            if args.redis_url:
                async with LLMCache(
                    redis_url=args.redis_url, openai=client, model=args.model, namespace=namespace
                ) as other:
                    await burst(other, "another process")
        finally:
            await client.close()
    return rows


def _print_table(rows: Sequence[Row], latency: float) -> None:
    baseline = rows[0].seconds
    header = ("scenario", "requests", "upstream", "memory", "redis", "coalesced", "seconds", "speed-up")
    cells = [
        (
            r.scenario,
            str(r.requests),
            str(r.upstream_calls),
            str(r.memory),
            str(r.redis),
            str(r.coalesced),
            f"{r.seconds:.3f}",
            f"{baseline / r.seconds:.1f}x" if r.seconds > 0 else "-",
        )
        for r in rows
    ]
    print(f"Model latency {latency:.2f}s per call; the same burst of requests in every row.\n")
    print(format_table(header, cells))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="aiollmcache", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="a burst of requests with and without the cache, against a local fake model"
    )
    demo.add_argument("--requests", type=int, default=1000, help="requests in the burst (default 1000)")
    demo.add_argument("--prompts", type=int, default=50, help="distinct prompts among them (default 50)")
    demo.add_argument("--latency", type=float, default=0.8, help="model latency in seconds (default 0.8)")
    demo.add_argument("--answer-chars", type=int, default=1500, help="size of each answer (default 1500)")
    demo.add_argument("--model", default="gpt-4o-mini")
    demo.add_argument("--redis-url", default=None, help="also use this Redis (default: memory only)")
    demo.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.requests < 1 or args.prompts < 1 or args.latency < 0:
        parser.error("--requests and --prompts must be >= 1, --latency >= 0")
    rows = asyncio.run(_demo(args))
    _print_table(rows, args.latency)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
