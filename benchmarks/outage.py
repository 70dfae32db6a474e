"""Redis down: what memory hits and misses cost while the circuit breaker is open.

Three caches in one run, the same in-process model (an async function that
sleeps ``--latency`` and returns a ~2 KB completion):

- ``memory only``: no Redis configured: the baseline.
- ``redis up``: a private redis-server.
- ``redis down``: the same, killed (SIGKILL) after warm-up; the breaker has
  opened before measuring (its first failures are reported apart).

Measured per cache, call by call, interleaved round-robin: memory hits (a hot
prompt) and misses (a new prompt each time, ``no_store`` not used: each is
stored where the cache can). Reported: p50/p99 and the difference from the
baseline.

    python benchmarks/outage.py [--iterations 2000] [--latency 0.02]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
from typing import Any

from _common import percentile, print_table, write_json

from aiollmcache import LLMCache
from aiollmcache.testing import RedisServer, chat_completion

MODEL = "gpt-4o-mini"
ANSWER = "An answer of realistic length. " * 60
USAGE = {"prompt_tokens": 20, "completion_tokens": 300, "total_tokens": 320}


def make_model(latency: float) -> Any:
    async def model(params: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(latency)
        return chat_completion(ANSWER, model=MODEL, usage=USAGE)

    return model


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def run(args: argparse.Namespace, server: RedisServer) -> dict[str, Any]:
    model = make_model(args.latency)
    caches = {
        "memory only": LLMCache(upstream=model, model=MODEL),
        "redis up": LLMCache(redis_url=server.url, upstream=model, model=MODEL, namespace="up"),
    }
    with RedisServer() as doomed:
        down = LLMCache(redis_url=doomed.url, upstream=model, model=MODEL, namespace="down")
        caches["redis down"] = down
        for cache in caches.values():
            await cache.open()
            await cache.complete(user("hot"))
        doomed.kill()
        # Until the breaker opens, calls meet the dead Redis: measured apart.
        opening = []
        while not down.stats()["redis_breaker_open"]:
            started = time.perf_counter()
            await down.complete(user(f"opening {len(opening)}"))
            opening.append(time.perf_counter() - started)
    samples: dict[tuple[str, str], list[float]] = {(n, k): [] for n in caches for k in ("hit", "miss")}
    gc.collect()
    gc.freeze()
    for i in range(args.iterations):
        order = list(caches.items())
        order = order[i % len(order) :] + order[: i % len(order)]
        for name, cache in order:
            started = time.perf_counter()
            result = await cache.complete(user("hot"))
            samples[(name, "hit")].append(time.perf_counter() - started)
            assert result.source == "memory"
            started = time.perf_counter()
            result = await cache.complete(user(f"miss {i}"))
            samples[(name, "miss")].append(time.perf_counter() - started)
            assert result.source == "upstream"
    stats = down.stats()
    for cache in caches.values():
        await cache.aclose()
    report: dict[str, Any] = {
        "breaker": {
            "calls_before_it_opened": len(opening),
            "their_max_ms": max(opening) * 1000 if opening else 0.0,
            "redis_skipped": stats["redis_skipped"],
        }
    }
    for (name, kind), values in samples.items():
        ordered = sorted(v * 1000 for v in values)
        report[f"{name}, {kind}"] = {"p50_ms": percentile(ordered, 50), "p99_ms": percentile(ordered, 99)}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--latency", type=float, default=0.02, help="model latency (s)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    with RedisServer() as server:
        report = asyncio.run(run(args, server))
    rows = []
    for kind in ("hit", "miss"):
        base = report[f"memory only, {kind}"]
        for name in ("memory only", "redis up", "redis down"):
            r = report[f"{name}, {kind}"]
            unit = 1000 if kind == "hit" else 1  # hits in us, misses in ms
            rows.append(
                (
                    f"{name}, {'memory hit' if kind == 'hit' else 'miss'}",
                    f"{r['p50_ms'] * unit:.{1 if kind == 'hit' else 2}f}",
                    f"{r['p99_ms'] * unit:.{1 if kind == 'hit' else 2}f}",
                    f"{(r['p99_ms'] - base['p99_ms']) * unit:+.{1 if kind == 'hit' else 2}f}",
                )
            )
    print(f"{args.iterations} rounds, model latency {args.latency * 1000:.0f} ms; hits in us, misses in ms\n")
    print_table(("path", "p50", "p99", "p99 vs memory only"), rows)
    breaker = report["breaker"]
    print(
        f"\nbefore the breaker opened: {breaker['calls_before_it_opened']} calls, the slowest "
        f"{breaker['their_max_ms']:.1f} ms; then {breaker['redis_skipped']} Redis operations skipped"
    )
    print(f"wrote {write_json('outage', {'settings': vars(args), **report}, args.json)}")


if __name__ == "__main__":
    main()
