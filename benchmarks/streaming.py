"""Streams: time to first chunk and total time for the caller that streams
from the model, for callers that join it in the same process and in other
processes, and for replays of the stored answer, against calling the model
directly, in one run.

A FakeOpenAI server answers after ``--latency`` seconds, then streams one
word per ``--chunk-latency`` seconds. Each round uses a new prompt: the
leader starts a ``cache.stream()``; ``--followers`` more start at the same
moment in this process, and ``--processes`` other processes start
``--followers`` each at that moment too (they share the Redis and follow the
leader's stream through it). Lags are measured against the leader's own
first and last chunk, on the machine's monotonic clock (one for every
process). Then the stored answer is streamed again, from this process's
memory tier and (from a fresh cache) from Redis.

    python benchmarks/streaming.py [--rounds 10] [--followers 10] [--processes 2]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import orjson
from _common import percentile, print_table, write_json

from aiollmcache import LLMCache
from aiollmcache.testing import FakeOpenAI, RedisServer

HERE = Path(__file__).resolve().parent
WORDS = 60


async def consume(stream: Any) -> dict[str, Any]:
    first = last = 0.0
    text = ""
    async for chunk in stream:
        last = time.monotonic()
        first = first or last
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    return {"first": first, "last": last, "text": text}


async def run(args: argparse.Namespace, redis_url: str, fake: FakeOpenAI) -> dict[str, list[float]]:
    series: dict[str, list[float]] = {}

    def record(name: str, value: float) -> None:
        series.setdefault(name, []).append(value * 1000)

    workers = []
    for _ in range(args.processes):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(HERE / "_stream_worker.py"),
            redis_url,
            fake.base_url,
            "bench",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        assert await proc.stdout.readline() == b"ready\n"
        workers.append(proc)
    client = fake.client()
    cache = LLMCache(redis_url=redis_url, openai=client, model="bench-model", namespace="bench")
    await cache.open()
    try:
        for round_ in range(args.rounds):
            prompt = f"Round {round_}: " + " ".join(f"word{n}" for n in range(WORDS))
            messages = [{"role": "user", "content": prompt}]

            # The model directly, for the baseline.
            started = time.monotonic()
            direct = await client.chat.completions.create(model="bench-model", messages=messages, stream=True)
            got = await consume(direct)
            record("model directly: first chunk", got["first"] - started)
            record("model directly: last chunk", got["last"] - started)
            fake.reset()

            # The leader first (it takes the lease), everyone else 20 ms later,
            # long before the model's first chunk.
            started = time.monotonic()
            leader = asyncio.create_task(consume(cache.stream(messages)))
            at = started + 0.02
            for proc in workers:
                assert proc.stdin is not None
                command = {"prompt": prompt, "at": at, "count": args.followers}
                proc.stdin.write(orjson.dumps(command) + b"\n")
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            here = [cache.stream(messages) for _ in range(args.followers)]
            results = await asyncio.gather(leader, *(consume(s) for s in here))
            elsewhere = []
            for proc in workers:
                assert proc.stdout is not None
                elsewhere += orjson.loads(await proc.stdout.readline())
            lead = results[0]
            assert fake.calls() == 1, f"round {round_}: {fake.calls()} upstream calls"
            assert all(r["text"] == lead["text"] for r in results + elsewhere)
            assert all(r["followed"] for r in elsewhere), "a process did not follow the live stream"
            record("cache, leader: first chunk", lead["first"] - started)
            record("cache, leader: last chunk", lead["last"] - started)
            for r in results[1:]:
                record("followers here: first chunk lag", r["first"] - lead["first"])
                record("followers here: last chunk lag", r["last"] - lead["last"])
            for r in elsewhere:
                record("followers elsewhere: first chunk lag", r["first"] - lead["first"])
                record("followers elsewhere: last chunk lag", r["last"] - lead["last"])

            started = time.monotonic()
            got = await consume(cache.stream(messages))
            record("replay from memory: first chunk", got["first"] - started)
            record("replay from memory: last chunk", got["last"] - started)
            async with LLMCache(
                redis_url=redis_url, openai=client, model="bench-model", namespace="bench"
            ) as fresh:
                await fresh.open()
                started = time.monotonic()
                got = await consume(fresh.stream(messages))
                record("replay from Redis: first chunk", got["first"] - started)
                record("replay from Redis: last chunk", got["last"] - started)
            fake.reset()
    finally:
        await cache.aclose()
        await client.close()
        for proc in workers:
            assert proc.stdin is not None
            proc.stdin.close()
            await proc.wait()
    return series


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--followers", type=int, default=10, help="per process")
    parser.add_argument("--processes", type=int, default=2, help="other processes following")
    parser.add_argument("--latency", type=float, default=0.3)
    parser.add_argument("--chunk-latency", type=float, default=0.01)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    with (
        RedisServer() as server,
        FakeOpenAI(latency=args.latency, chunk_latency=args.chunk_latency) as fake,
    ):
        series = asyncio.run(run(args, server.url, fake))
    rows = []
    summary = {}
    for name, values in series.items():
        ordered = sorted(values)
        summary[name] = {
            "n": len(ordered),
            "p50_ms": percentile(ordered, 50),
            "p99_ms": percentile(ordered, 99),
        }
        rows.append(
            (
                name,
                str(len(ordered)),
                f"{percentile(ordered, 50):.2f}",
                f"{percentile(ordered, 99):.2f}",
                f"{ordered[-1]:.2f}",
            )
        )
    print(
        f"{args.rounds} rounds; model: {args.latency * 1000:.0f} ms to the first chunk, "
        f"then {WORDS + 3} chunks {args.chunk_latency * 1000:.0f} ms apart; {args.followers} followers "
        f"here and {args.followers} in each of {args.processes} other processes\n"
    )
    print_table(("what", "n", "p50 ms", "p99 ms", "max ms"), rows)
    settings = {k: v for k, v in vars(args).items() if k != "json"}
    print(f"\nwrote {write_json('streaming', {'settings': settings, 'results': summary}, args.json)}")


if __name__ == "__main__":
    main()
