"""Soak: a mixed workload for a set time, with faults injected on a schedule.

C concurrent callers ask over a Zipf-popular set of prompts (some tagged, a
tag invalidated every cycle; 1% of requests new prompts) through one LLMCache on a private redis-server,
against a FakeOpenAI model with latency. Phases of equal length cycle through:

    steady, redis killed (restarted empty on the same port at the phase's
    end), steady, redis frozen (SIGSTOP, SIGCONT at the end), pub/sub
    connections killed + script cache flushed, garbage written over cached
    entries, upstream failing (HTTP 500 for a share of calls)

Per phase: requests, errors by kind (those the phase injects are "explained";
any other is not), wrong answers (an answer that is not the model's answer to
that prompt: must be 0), p50/p99 latency, upstream calls, and the process's
resident memory at the phase's end.

    python benchmarks/soak.py [--seconds 600] [--phase 20] [--concurrency 50]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import math
import random
import time
import tracemalloc

import redis.asyncio as aioredis
from _common import print_table, write_json

from aiollmcache import CacheControl, LLMCache, TierError
from aiollmcache.testing import FakeOpenAI, RedisServer

MODEL = "gpt-4o-mini"
PHASES = (
    "steady",
    "redis killed",
    "recovery",
    "redis frozen",
    "pubsub + scripts",
    "garbage",
    "upstream 500s",
)
EXPLAINED = {"upstream 500s": {"InternalServerError"}}


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Latencies:
    """A histogram (2% wide buckets): the soak's own memory stays flat."""

    def __init__(self) -> None:
        self.buckets: collections.Counter[int] = collections.Counter()
        self.count = 0

    def add(self, seconds: float) -> None:
        self.buckets[int(math.log(max(seconds, 1e-7)) * 50)] += 1
        self.count += 1

    def merge(self, other: Latencies) -> None:
        self.buckets.update(other.buckets)
        self.count += other.count

    def percentile_ms(self, q: float) -> float:
        if not self.count:
            return float("nan")
        rank, seen = q / 100 * (self.count - 1), 0
        for bucket in sorted(self.buckets):
            seen += self.buckets[bucket]
            if seen > rank:
                return math.exp((bucket + 0.5) / 50) * 1000
        return float("nan")


class Phase:
    def __init__(self, name: str) -> None:
        self.name = name
        self.latencies = Latencies()
        self.errors: collections.Counter[str] = collections.Counter()
        self.wrong = 0
        self.sources: collections.Counter[str] = collections.Counter()
        self.upstream_calls = 0
        self.rss_mb = 0.0


async def soak(args: argparse.Namespace, server: RedisServer) -> list[Phase]:
    rng = random.Random(1)
    prompts = [f"soak question {n}" for n in range(args.prompts)]
    weights = [1 / (rank + 1) for rank in range(args.prompts)]
    phases: list[Phase] = []
    current = Phase("warm-up")
    baseline: tracemalloc.Snapshot | None = None
    stop = asyncio.Event()
    async with FakeOpenAI(latency=args.latency) as fake:
        client = fake.client()  # the SDK's default retries (2), as in production
        admin = aioredis.Redis.from_url(server.url)
        async with LLMCache(
            redis_url=server.url,
            openai=client,
            model=MODEL,
            namespace="soak",
            ttl=30,
            stale_ttl=30,
            memory_max_entries=200,
            redis_timeout=0.2,
        ) as cache:

            async def caller(seed: int) -> None:
                local = random.Random(seed)
                asked = 0
                while not stop.is_set():
                    asked += 1
                    n = local.choices(range(args.prompts), weights=weights)[0]
                    # 1% never asked before: misses in every phase, as real traffic has.
                    prompt = prompts[n] if local.random() >= 0.01 else f"one-off {seed} {asked}"
                    tags = [f"group-{n % 5}"] if n % 10 == 0 else []
                    phase = current
                    started = time.perf_counter()
                    try:
                        result = await cache.complete(
                            [{"role": "user", "content": prompt}], cache=CacheControl(tags=tags)
                        )
                    except Exception as exc:
                        # Where it ended: a call retried by the SDK meets the
                        # fault of the phase its retries fell in.
                        current.errors[type(exc).__name__] += 1
                        continue
                    phase.latencies.add(time.perf_counter() - started)
                    phase.sources[str(result.source)] += 1
                    if result.text != f"Answer to: {prompt}":
                        phase.wrong += 1
                    await asyncio.sleep(args.think)

            callers = [asyncio.create_task(caller(rng.randrange(2**32))) for _ in range(args.concurrency)]
            deadline = time.monotonic() + args.seconds
            index = 0
            try:
                await asyncio.sleep(args.phase)  # warm-up
                while time.monotonic() < deadline:
                    name = PHASES[index % len(PHASES)]
                    index += 1
                    fake.reset()  # also forgets the requests it recorded
                    calls_before = fake.calls()
                    current = Phase(name)
                    if name == "redis killed":
                        server.kill()
                    elif name == "redis frozen":
                        server.pause()
                    elif name == "pubsub + scripts":
                        await admin.client_kill_filter(_type="pubsub")
                        await admin.script_flush()
                    elif name == "garbage":
                        keys = [k async for k in admin.scan_iter(match="alc:soak:*:e:*", count=1000)]
                        for k in rng.sample(keys, min(len(keys), 50)):
                            await admin.set(k, rng.randbytes(rng.randrange(1, 300)))
                    elif name == "upstream 500s":
                        fake.fail(500, times=10**9)
                    if index % len(PHASES) == 1:
                        try:
                            await cache.invalidate(tag=f"group-{index % 5}")
                        except TierError as exc:  # a clear error to retry, not a crash
                            current.errors[f"invalidate: {type(exc).__name__}"] += 1
                    await asyncio.sleep(args.phase)
                    if name == "redis killed":
                        await asyncio.to_thread(server.restart)
                        await admin.aclose()
                        admin = aioredis.Redis.from_url(server.url)
                    elif name == "redis frozen":
                        server.resume()
                    elif name == "upstream 500s":
                        fake.reset()
                    current.upstream_calls = fake.calls() - calls_before
                    current.rss_mb = rss_mb()
                    phases.append(current)
                    if args.tracemalloc and index == len(PHASES):
                        tracemalloc.start()
                        baseline = tracemalloc.take_snapshot()
                    print(
                        f"{current.name:<17} requests {current.latencies.count:>6}  "
                        f"errors {dict(current.errors)}  wrong {current.wrong}  rss {current.rss_mb:.1f} MB",
                        flush=True,
                    )
            finally:
                stop.set()
                await asyncio.gather(*callers)
                if args.tracemalloc and tracemalloc.is_tracing():
                    growth = tracemalloc.take_snapshot().compare_to(baseline, "lineno")
                    print("\nlargest allocation growth since the first cycle:")
                    for stat in growth[:12]:
                        print(f"  {stat}")
                await admin.aclose()
                await client.close()
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--phase", type=float, default=20, help="seconds per phase")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--prompts", type=int, default=400)
    parser.add_argument("--latency", type=float, default=0.05, help="model latency (s)")
    parser.add_argument("--think", type=float, default=0.002, help="pause between a caller's requests (s)")
    parser.add_argument("--tracemalloc", action="store_true", help="report allocation growth after a cycle")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    with RedisServer() as server:
        phases = asyncio.run(soak(args, server))

    by_name: dict[str, list[Phase]] = collections.defaultdict(list)
    for phase in phases:
        by_name[phase.name].append(phase)
    rows, results = [], {}
    for name in PHASES:
        group = by_name.get(name, [])
        if not group:
            continue
        latencies = Latencies()
        for p in group:
            latencies.merge(p.latencies)
        errors: collections.Counter[str] = sum((p.errors for p in group), collections.Counter())
        explained = sum(v for k, v in errors.items() if k in EXPLAINED.get(name, set()))
        unexplained = sum(errors.values()) - explained
        wrong = sum(p.wrong for p in group)
        sources: collections.Counter[str] = sum((p.sources for p in group), collections.Counter())
        upstream = sum(p.upstream_calls for p in group)
        results[name] = {
            "phases": len(group),
            "answered": latencies.count,
            "errors": dict(errors),
            "unexplained_errors": unexplained,
            "wrong_answers": wrong,
            "p50_ms": latencies.percentile_ms(50),
            "p99_ms": latencies.percentile_ms(99),
            "sources": dict(sources),
            "upstream_calls": upstream,
        }
        rows.append(
            (
                name,
                str(len(group)),
                str(latencies.count),
                str(explained),
                str(unexplained),
                str(wrong),
                f"{latencies.percentile_ms(50):.3f}",
                f"{latencies.percentile_ms(99):.1f}",
                str(upstream),
            )
        )
    rss = [p.rss_mb for p in phases]
    after_warmup = rss[len(PHASES) - 1] if len(rss) >= len(PHASES) else rss[0]
    print(f"\n{args.seconds:.0f} s, phases of {args.phase:.0f} s, {args.concurrency} callers\n")
    print_table(
        (
            "phase",
            "n",
            "answered",
            "injected errors",
            "other errors",
            "wrong",
            "p50 ms",
            "p99 ms",
            "upstream",
        ),
        rows,
    )
    print(
        f"\nresident memory: {rss[0]:.1f} MB after the first phase, {after_warmup:.1f} MB after the first "
        f"cycle, {rss[-1]:.1f} MB at the end ({rss[-1] - after_warmup:+.1f} MB since the first cycle)"
    )
    payload = {
        "settings": {
            k: getattr(args, k) for k in ("seconds", "phase", "concurrency", "prompts", "latency", "think")
        },
        "results": results,
        "rss_mb": rss,
    }
    print(f"wrote {write_json('soak', payload, args.json)}")


if __name__ == "__main__":
    main()
