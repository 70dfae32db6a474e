"""Invalidation: how fast it reaches every process, and what a big one costs others.

Part 1, propagation. N worker processes each hold an answer in their memory
tier; the driver invalidates its key and each worker notes (CLOCK_MONOTONIC,
shared by every process on the machine) when its memory tier dropped it.
Reported: from ``invalidate()`` returning to the last of the N processes
evicting, p50/p99 over the rounds. Baseline in the same run: a raw redis-py
PUBLISH to N plain redis-py subscribers, one in each of the same processes,
from PUBLISH returning to the last subscriber reading it.

Part 2, impact. 100k entries in Redis, tagged and with one system prompt; a
separate process reads another entry in a loop (Redis hits, memory tier off)
while the driver retires the 100k: by tag, by pattern on the system prompt,
and, for comparison, with the common recipe (KEYS, then DEL of every key in
one command). Reported: the hits' p50/p99/max before (idle) and during each.

    python benchmarks/invalidation.py [--processes 8] [--rounds 200]
        [--entries 100000] [--redis-url URL] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
from _common import percentile, print_table, write_json

from aiollmcache import CacheControl, Invalidation, LLMCache, Pattern
from aiollmcache.entry import Entry, encode_entry
from aiollmcache.testing import RedisServer, chat_completion

MODEL = "gpt-4o-mini"
RAW_CHANNEL = "bench:raw"
USAGE = {"prompt_tokens": 20, "completion_tokens": 300, "total_tokens": 320}
SYSTEM = "You are the support assistant for the 2026 catalogue."


def completion(text: str) -> dict[str, Any]:
    return chat_completion(text, model=MODEL, usage=USAGE)


ANSWER = "An answer of realistic length. " * 60  # ~2 KB


async def model(params: dict[str, Any]) -> dict[str, Any]:
    return completion(ANSWER)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# -- worker process -----------------------------------------------------------------


def emit(**fields: Any) -> None:
    sys.stdout.buffer.write(orjson.dumps(fields) + b"\n")
    sys.stdout.flush()


async def worker(args: argparse.Namespace) -> None:
    """Commands on stdin, one JSON line each; replies and events on stdout."""
    memory = 0 if args.role == "hitter" else 10_000
    cache = LLMCache(
        redis_url=args.redis_url,
        upstream=model,
        model=MODEL,
        namespace=args.namespace,
        memory_max_entries=memory,
    )
    raw = aioredis.Redis.from_url(args.redis_url)
    pubsub = raw.pubsub()

    def applied(invalidation: Invalidation) -> None:
        emit(event="applied", kind=str(invalidation.kind), key=invalidation.key, at=time.monotonic())

    async def read_raw() -> None:
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
            if message is not None:
                emit(event="raw", data=message["data"].decode(), at=time.monotonic())

    async with cache:
        cache.add_invalidation_listener(applied)
        await pubsub.subscribe(RAW_CHANNEL)
        reader = asyncio.create_task(read_raw())
        emit(event="ready")
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            command = orjson.loads(line)
            if command["op"] == "fill":
                result = await cache.complete(user(command["prompt"]))
                again = await cache.complete(user(command["prompt"]))
                emit(event="filled", sources=[str(result.source), str(again.source)])
            elif command["op"] == "hit":
                # No collector pauses in the measurement: this part measures Redis.
                gc.collect()
                gc.freeze()
                gc.disable()
                samples = []
                stop_at = time.monotonic() + command["seconds"]
                while (started := time.monotonic()) < stop_at:
                    result = await cache.complete(user("the hot question"))
                    samples.append((started, time.monotonic() - started, str(result.source)))
                gc.enable()
                emit(event="hits", samples=samples)
        reader.cancel()
    await pubsub.aclose()
    await raw.aclose()


# -- driver -----------------------------------------------------------------------------


class Workers:
    def __init__(self, procs: list[asyncio.subprocess.Process]) -> None:
        self.procs = procs

    @classmethod
    async def start(cls, n: int, role: str, redis_url: str, namespace: str) -> Workers:
        argv = [
            sys.executable,
            __file__,
            "--worker",
            role,
            "--redis-url",
            redis_url,
            "--namespace",
            namespace,
        ]
        pipe = asyncio.subprocess.PIPE
        procs = [
            await asyncio.create_subprocess_exec(
                *argv, stdin=pipe, stdout=pipe, cwd=Path(__file__).parent, limit=1 << 26
            )
            for _ in range(n)
        ]
        workers = cls(procs)
        for proc in procs:
            assert (await workers.read(proc))["event"] == "ready"
        return workers

    @staticmethod
    async def read(proc: asyncio.subprocess.Process) -> Any:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 120)
        if not line:
            raise RuntimeError("a worker exited")
        return orjson.loads(line)

    def send(self, **command: Any) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(orjson.dumps(command) + b"\n")

    async def events(self, kind: str) -> list[Any]:
        """The next event of ``kind`` from every worker (others are dropped)."""

        async def one(proc: asyncio.subprocess.Process) -> Any:
            while (event := await self.read(proc))["event"] != kind:
                pass
            return event

        return list(await asyncio.gather(*(one(p) for p in self.procs)))

    async def stop(self) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.close()
        await asyncio.gather(*(p.wait() for p in self.procs))


async def propagation(args: argparse.Namespace, redis_url: str) -> dict[str, Any]:
    namespace = f"inv-prop-{int(time.time() * 1000)}"
    workers = await Workers.start(args.processes, "holder", redis_url, namespace)
    admin = aioredis.Redis.from_url(redis_url)
    ours: list[float] = []
    ours_from_call: list[float] = []
    raw: list[float] = []
    try:
        async with LLMCache(redis_url=redis_url, upstream=model, model=MODEL, namespace=namespace) as cache:
            for r in range(args.rounds):
                prompt = f"question {r}"
                workers.send(op="fill", prompt=prompt)
                filled = await workers.events("filled")
                assert all(f["sources"][1] == "memory" for f in filled), filled
                # Raw PUBLISH and invalidate() take turns, so noise falls on both alike.
                for contender in ("raw", "ours") if r % 2 else ("ours", "raw"):
                    if contender == "raw":
                        await admin.publish(RAW_CHANNEL, prompt)
                        returned = time.monotonic()
                        events = await workers.events("raw")
                        raw.append(max(e["at"] for e in events) - returned)
                    else:
                        called = time.monotonic()
                        assert await cache.invalidate(key=cache.key_for(user(prompt))) == 1
                        returned = time.monotonic()
                        events = await workers.events("applied")
                        assert all(e["key"] == cache.key_for(user(prompt)) for e in events)
                        ours.append(max(e["at"] for e in events) - returned)
                        ours_from_call.append(max(e["at"] for e in events) - called)
    finally:
        await workers.stop()
        await admin.aclose()

    def summary(values: list[float]) -> dict[str, float]:
        ordered = sorted(v * 1000 for v in values)
        return {"p50_ms": percentile(ordered, 50), "p99_ms": percentile(ordered, 99), "max_ms": ordered[-1]}

    return {
        "raw PUBLISH -> N redis-py subscribers": summary(raw),
        "invalidate(key) -> N memory tiers": summary(ours),
        "invalidate(key) -> N memory tiers, from the call": summary(ours_from_call),
    }


async def fill(admin: aioredis.Redis, namespace: str, entries: int) -> None:
    """``entries`` real entries, tagged "catalogue", written in bulk (as the
    cache would write them, but pipelined: this part measures retiring them)."""
    now = time.time()
    raw = orjson.dumps(completion(ANSWER))
    tag_key = f"alc:{namespace}:0:t:{{catalogue}}"
    for start in range(0, entries, 2000):
        pipe = admin.pipeline(transaction=False)
        members: dict[str, float] = {}
        for n in range(start, min(entries, start + 2000)):
            key = f"{n:032x}"
            entry = Entry(
                key=key,
                raw=raw,
                created_at=now,
                fresh_until=now + 3600,
                expires_at=now + 3600,
                compute_ms=800.0,
                model=MODEL,
                prompt_tokens=20,
                completion_tokens=300,
                tags=("catalogue",),
                system=SYSTEM,
            )
            pipe.set(f"alc:{namespace}:0:e:{{{key}}}", encode_entry(entry, compress_above=8192), px=3_600_000)
            members[key] = (now + 3600) * 1000
        pipe.zadd(tag_key, members)
        await pipe.execute()
    await admin.pexpire(tag_key, 3_600_000)


async def naive_retire(admin: aioredis.Redis, namespace: str, keep: str) -> int:
    keys = [k for k in await admin.keys(f"alc:{namespace}:0:e:*") if k.decode() != keep]
    return int(await admin.delete(*keys)) if keys else 0


async def impact(args: argparse.Namespace, redis_url: str) -> dict[str, Any]:
    admin = aioredis.Redis.from_url(redis_url)
    report: dict[str, Any] = {}
    contenders: dict[str, Any] = {
        "invalidate(tag=...)": {"tag": "catalogue"},
        "invalidate(pattern=Pattern(system_contains=...))": {
            "pattern": Pattern(system_contains="2026 catalogue")
        },
        "KEYS + DEL (common recipe)": "naive",
        "control: 3 s of Python busy work, no Redis": "busy",
    }
    try:
        for name, kwargs in contenders.items():
            namespace = f"inv-impact-{int(time.time() * 1000)}"
            await fill(admin, namespace, args.entries)
            hitter = await Workers.start(1, "hitter", redis_url, namespace)
            async with LLMCache(
                redis_url=redis_url, upstream=model, model=MODEL, namespace=namespace
            ) as cache:
                hot = await cache.complete(user("the hot question"), cache=CacheControl(tags=["hot"]))
                hitter.send(op="hit", seconds=args.idle + args.window)
                await asyncio.sleep(args.idle)  # the hitter's idle phase, measured for comparison
                started = time.monotonic()
                if kwargs == "naive":
                    retired = await naive_retire(admin, namespace, f"alc:{namespace}:0:e:{{{hot.key}}}")
                elif kwargs == "busy":
                    # What the machine alone does to the hitter's latency when
                    # this process keeps a core busy, as an invalidation does.
                    while time.monotonic() - started < 3.0:
                        sum(range(1000))
                    retired = 0
                else:
                    retired = await cache.invalidate(**kwargs)
                finished = time.monotonic()
                (hits,) = await hitter.events("hits")
            await hitter.stop()
            samples = hits["samples"]
            assert all(source == "redis" for _, _, source in samples), "the hot entry was retired"
            idle = sorted(latency * 1e3 for at, latency, _ in samples if at < started)
            during = sorted(latency * 1e3 for at, latency, _ in samples if started <= at < finished)
            # A hit that started before and was still waiting when it began counts as "during" too.
            blocked = [lat * 1e3 for at, lat, _ in samples if at < started < at + lat]
            during = sorted(during + blocked)
            report[name] = {
                "retired": retired,
                "seconds": finished - started,
                "idle": {"n": len(idle), "p50_ms": percentile(idle, 50), "p99_ms": percentile(idle, 99)},
                "during": {
                    "n": len(during),
                    "p50_ms": percentile(during, 50),
                    "p99_ms": percentile(during, 99),
                    "max_ms": during[-1] if during else float("nan"),
                },
            }
            await admin.flushdb()  # nothing of this contender stays for the next
    finally:
        await admin.aclose()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument(
        "--idle", type=float, default=2.0, help="seconds of idle hits before each invalidation"
    )
    parser.add_argument("--window", type=float, default=3.0, help="seconds of hits from the invalidation on")
    parser.add_argument(
        "--redis-url", default=None, help="a Redis to FLUSHDB freely (default: a private one)"
    )
    parser.add_argument("--json", default=None)
    # worker mode (internal)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--namespace", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.role = args.worker
        asyncio.run(worker(args))
        return
    with contextlib.ExitStack() as stack:
        url = args.redis_url or stack.enter_context(RedisServer()).url
        spread = asyncio.run(propagation(args, url))
        cost = asyncio.run(impact(args, url))

    print(f"Propagation to {args.processes} processes, {args.rounds} rounds (ms after the call returned)\n")
    base = spread["raw PUBLISH -> N redis-py subscribers"]["p99_ms"]
    print_table(
        ("path", "p50 ms", "p99 ms", "max ms", "p99 vs raw"),
        [
            (
                name,
                f"{r['p50_ms']:.2f}",
                f"{r['p99_ms']:.2f}",
                f"{r['max_ms']:.2f}",
                f"{r['p99_ms'] / base:.2f}x",
            )
            for name, r in spread.items()
        ],
    )
    print(f"\nRedis hits in another process while {args.entries:,} entries are retired\n")
    print_table(
        ("how", "retired", "seconds", "idle p50", "idle p99", "during p50", "during p99", "max", "p99 ratio"),
        [
            (
                name,
                str(r["retired"]),
                f"{r['seconds']:.2f}",
                f"{r['idle']['p50_ms']:.2f}",
                f"{r['idle']['p99_ms']:.2f}",
                f"{r['during']['p50_ms']:.2f}",
                f"{r['during']['p99_ms']:.2f}",
                f"{r['during']['max_ms']:.1f}",
                f"{r['during']['p99_ms'] / r['idle']['p99_ms']:.2f}x",
            )
            for name, r in cost.items()
        ],
    )
    settings = {k: getattr(args, k) for k in ("processes", "rounds", "entries", "idle", "window")}
    payload = {"settings": settings, "propagation": spread, "impact": cost}
    print(f"\nwrote {write_json('invalidation', payload, args.json)}")


if __name__ == "__main__":
    main()
