"""Stampede: P processes x C concurrent callers on K cold keys, model latency L.

Three contenders, one after the other in the same run, on the same Redis and
the same fake model:

- ``no protection``: cache-aside (GET; on a miss call the model, then SET).
- ``polling lock``: the common recipe: GET; on a miss SET lock NX PX; the
  holder calls the model and SETs the answer; the others sleep 100 ms and GET
  again until the answer is there.
- ``aiollmcache``: ``LLMCache.complete()`` (in-process flight + Redis lease +
  pub/sub notification).

Per contender: upstream calls, caller latency (p50/p99/max, from a common
start), followers' extra wait after the first caller of their key had its
answer (p50/p99), and Redis commands per caller (from INFO commandstats).

    python benchmarks/stampede.py [--processes 4] [--callers 250] [--keys 5]
        [--latency 0.5] [--redis-url URL] [--json PATH] [--plot PATH.png]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
from _common import percentile, print_table, write_json

from aiollmcache import LLMCache
from aiollmcache.testing import FakeOpenAI, RedisServer
from aiollmcache.tiers.redis import connect

CONTENDERS = ("no protection", "polling lock", "aiollmcache")
MODEL = "gpt-4o-mini"


# -- worker process ---------------------------------------------------------------


async def _ask(client: Any, prompt: str) -> bytes:
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}]
    )
    body: bytes = raw.content
    return body


async def _no_protection(redis: aioredis.Redis, client: Any, ns: str, prompt: str) -> bytes:
    key = f"{ns}:{prompt}"
    value = await redis.get(key)
    if value is None:
        value = await _ask(client, prompt)
        await redis.set(key, value, ex=3600)
    return value  # type: ignore[no-any-return]


async def _polling_lock(redis: aioredis.Redis, client: Any, ns: str, prompt: str) -> bytes:
    key, lock = f"{ns}:{prompt}", f"{ns}:lock:{prompt}"
    while True:
        value = await redis.get(key)
        if value is not None:
            return value  # type: ignore[no-any-return]
        if await redis.set(lock, "1", nx=True, px=10_000):
            try:
                value = await _ask(client, prompt)
                await redis.set(key, value, ex=3600)
                return value
            finally:
                await redis.delete(lock)
        await asyncio.sleep(0.1)


async def worker(args: argparse.Namespace) -> None:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=args.base_url, api_key="bench", max_retries=0, timeout=120)
    redis = connect(args.redis_url, max_connections=64, timeout=5.0)
    cache = LLMCache(redis=redis, openai=client, model=MODEL, namespace=args.namespace)
    prompts = [f"stampede prompt {k}" for k in range(args.keys)]
    try:
        await cache.open()
        print("ready", flush=True)
        line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        start = float(line)
        await asyncio.sleep(max(0.0, start - time.time()))  # every process starts together

        async def one(i: int) -> dict[str, Any]:
            prompt = prompts[i % len(prompts)]
            try:
                if args.mode == "aiollmcache":
                    await cache.complete([{"role": "user", "content": prompt}])
                elif args.mode == "polling lock":
                    await _polling_lock(redis, client, args.namespace, prompt)
                else:
                    await _no_protection(redis, client, args.namespace, prompt)
                error = None
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            return {"key": prompt, "done": time.time(), "error": error}

        results = await asyncio.gather(*(one(i) for i in range(args.callers)))
        sys.stdout.buffer.write(orjson.dumps(results) + b"\n")
        sys.stdout.flush()
    finally:
        await cache.aclose()
        await redis.aclose(close_connection_pool=True)
        await client.close()


# -- driver -----------------------------------------------------------------------------


async def command_count(redis: aioredis.Redis) -> int:
    stats = await redis.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")


async def run_contender(
    mode: str, args: argparse.Namespace, redis_url: str, fake: FakeOpenAI, admin: aioredis.Redis
) -> dict[str, Any]:
    namespace = f"stampede-{mode.replace(' ', '-')}-{int(time.time() * 1000)}"
    fake.reset()
    argv = [sys.executable, __file__, "--worker", mode, "--redis-url", redis_url, "--base-url", fake.base_url]
    argv += ["--namespace", namespace, "--callers", str(args.callers), "--keys", str(args.keys)]
    pipe = asyncio.subprocess.PIPE
    procs = [
        await asyncio.create_subprocess_exec(*argv, stdin=pipe, stdout=pipe, cwd=Path(__file__).parent)
        for _ in range(args.processes)
    ]
    for proc in procs:
        assert proc.stdout is not None
        assert await proc.stdout.readline() == b"ready\n"
    before = await command_count(admin)
    start = time.time() + 0.3
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(f"{start}\n".encode())
        await proc.stdin.drain()
    outputs = await asyncio.gather(*(proc.communicate() for proc in procs))
    after = await command_count(admin)
    per_process = [orjson.loads(out) for out, _ in outputs]
    results = [r for rows in per_process for r in rows]
    errors = [r["error"] for r in results if r["error"]]
    latencies = sorted(r["done"] - start for r in results)
    first_done: dict[str, float] = {}
    for r in results:
        first_done[r["key"]] = min(first_done.get(r["key"], r["done"]), r["done"])
    extra = sorted(r["done"] - first_done[r["key"]] for r in results)[len(first_done) :]
    # When each process's callers finished, after the first caller of their key.
    process_extra_ms = [
        [
            round((min(r["done"] for r in rows) - min(first_done.values())) * 1000, 1),
            round((max(r["done"] for r in rows) - min(first_done.values())) * 1000, 1),
        ]
        for rows in per_process
    ]
    callers = len(results)
    return {
        "callers": callers,
        "errors": len(errors),
        "first_errors": errors[:3],
        "upstream_calls": fake.calls(),
        "latency_s": {
            "p50": percentile(latencies, 50),
            "p99": percentile(latencies, 99),
            "max": latencies[-1],
        },
        "follower_extra_wait_ms": {
            "p50": percentile(extra, 50) * 1000,
            "p99": percentile(extra, 99) * 1000,
        },
        "redis_commands_per_caller": (after - before) / callers,
        "process_first_last_ms": process_extra_ms,
        "latencies": latencies,
    }


async def drive(args: argparse.Namespace, redis_url: str) -> dict[str, Any]:
    admin = aioredis.Redis.from_url(redis_url)
    report: dict[str, Any] = {}
    try:
        async with FakeOpenAI(latency=args.latency) as fake:
            for mode in CONTENDERS:
                report[mode] = await run_contender(mode, args, redis_url, fake, admin)
    finally:
        await admin.aclose()
    return report


def plot(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for mode, result in report.items():
        values = result["latencies"]
        ax.plot(values, [i / len(values) for i in range(len(values))], label=mode)
    ax.set_xlabel("caller latency from the common start (s)")
    ax.set_ylabel("fraction of callers")
    ax.set_title("Stampede on cold keys: caller latency CDF")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--callers", type=int, default=250, help="concurrent callers per process")
    parser.add_argument("--keys", type=int, default=5, help="distinct cold keys")
    parser.add_argument("--latency", type=float, default=0.5, help="model latency (s)")
    parser.add_argument("--redis-url", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None, metavar="PNG")
    # worker mode (internal)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--base-url", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--namespace", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.mode = args.worker
        asyncio.run(worker(args))
        return
    with contextlib.ExitStack() as stack:
        url = args.redis_url or stack.enter_context(RedisServer()).url
        report = asyncio.run(drive(args, url))
    rows = [
        (
            mode,
            str(r["upstream_calls"]),
            str(r["errors"]),
            f"{r['latency_s']['p50']:.3f}",
            f"{r['latency_s']['p99']:.3f}",
            f"{r['latency_s']['max']:.3f}",
            f"{r['follower_extra_wait_ms']['p50']:.1f}",
            f"{r['follower_extra_wait_ms']['p99']:.1f}",
            f"{r['redis_commands_per_caller']:.2f}",
        )
        for mode, r in report.items()
    ]
    print(
        f"{args.processes} processes x {args.callers} callers on {args.keys} cold keys, "
        f"model latency {args.latency}s\n"
    )
    header = ("contender", "upstream", "errors", "p50 s", "p99 s", "max s")
    header += ("extra wait p50 ms", "extra wait p99 ms", "redis cmds/caller")
    print_table(header, rows)
    summary = {
        "settings": {k: getattr(args, k) for k in ("processes", "callers", "keys", "latency")},
        "results": {mode: {k: v for k, v in r.items() if k != "latencies"} for mode, r in report.items()},
    }
    print(f"\nwrote {write_json('stampede', summary, args.json)}")
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
