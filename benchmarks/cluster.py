"""One Redis against a 3-primary Redis Cluster, same run, same client processes.

For each target (a single ``redis-server``, then a cluster of three started
with ``redis-cli --cluster create``), on the same fake model:

- **hits**: P client processes, each with C concurrent callers, call
  ``complete()`` on random keys among K stored ones for S seconds, with the
  memory tier off so every call reads Redis. Hits/s, p50/p99 latency.
- **spread** (cluster): keys per primary (DBSIZE) and commands per primary
  during the hit phase (INFO commandstats), as the largest deviation from
  the mean.
- **stampede**: P processes x C callers on N cold keys, model latency L:
  upstream calls per key (the target is exactly 1).

The ratio to read is cluster hits/s over single-node hits/s: on this machine
servers and clients share the same cores, so a cluster cannot be faster than
one node here; what the ratio shows is what the cluster costs the client.

    python benchmarks/cluster.py [--processes 3] [--callers 64] [--keys 3000]
        [--seconds 5] [--stampede-keys 5] [--latency 0.5] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import orjson
from _common import percentile, print_table, write_json

from aiollmcache import LLMCache
from aiollmcache.testing import FakeOpenAI, RedisClusterServer, RedisServer

MODEL = "gpt-4o-mini"
NAMESPACE = "bench-cluster"


def prompt(n: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"question number {n}"}]


# -- worker process ---------------------------------------------------------------


async def worker(options: dict[str, Any]) -> None:
    """Reads a "go" line, runs its phase, prints one JSON line."""
    fake_url, redis_url, phase = options["fake_url"], options["redis_url"], options["phase"]
    from openai import AsyncOpenAI

    client = AsyncOpenAI(api_key="unused", base_url=fake_url, max_retries=0)
    async with LLMCache(
        redis_url=redis_url,
        openai=client,
        model=MODEL,
        namespace=NAMESPACE,
        memory_max_entries=0,
        redis_max_connections=options["callers"],
    ) as cache:
        await cache.complete(prompt(0))  # connected, scripts loaded
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        latencies: list[float] = []
        sources: dict[str, int] = {}
        errors = 0
        cpu = time.process_time()
        if phase == "hits":
            keys, deadline = options["keys"], time.perf_counter() + options["seconds"]
            rng = random.Random(options["seed"])

            async def caller() -> None:
                nonlocal errors
                while (start := time.perf_counter()) < deadline:
                    try:
                        result = await cache.complete(prompt(rng.randrange(keys)))
                    except Exception:
                        errors += 1
                        continue
                    latencies.append(time.perf_counter() - start)
                    sources[str(result.source)] = sources.get(str(result.source), 0) + 1

            await asyncio.gather(*(caller() for _ in range(options["callers"])))
        else:
            cold = options["cold"]

            async def once(i: int) -> None:
                nonlocal errors
                start = time.perf_counter()
                try:
                    result = await cache.complete(prompt(cold + i % options["stampede_keys"]))
                except Exception:
                    errors += 1
                    return
                latencies.append(time.perf_counter() - start)
                sources[str(result.source)] = sources.get(str(result.source), 0) + 1

            await asyncio.gather(*(once(i) for i in range(options["callers"])))
        cpu = time.process_time() - cpu
    await client.close()
    sys.stdout.write(
        orjson.dumps({"latencies": latencies, "sources": sources, "errors": errors, "cpu": cpu}).decode()
        + "\n"
    )


# -- driver -------------------------------------------------------------------------


async def run_workers(options: dict[str, Any], processes: int) -> list[dict[str, Any]]:
    pipe = asyncio.subprocess.PIPE
    procs = []
    for i in range(processes):
        argv = [sys.executable, __file__, "--worker", orjson.dumps({**options, "seed": i}).decode()]
        procs.append(
            await asyncio.create_subprocess_exec(*argv, stdin=pipe, stdout=pipe, cwd=Path(__file__).parent)
        )
    for proc in procs:
        assert proc.stdout is not None
        line = await proc.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError(f"worker failed to start: {line!r}")
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
    reports = []
    for proc in procs:
        out, _ = await proc.communicate()
        reports.append(orjson.loads(out.splitlines()[-1]))
    return reports


async def fill(fake: FakeOpenAI, redis_url: str, keys: int) -> None:
    client = fake.client()
    async with LLMCache(redis_url=redis_url, openai=client, model=MODEL, namespace=NAMESPACE) as cache:
        for start in range(0, keys, 50):
            await asyncio.gather(*(cache.complete(prompt(n)) for n in range(start, min(keys, start + 50))))
    await client.close()


async def per_primary(server: RedisServer | RedisClusterServer) -> dict[str, tuple[int, int, float]]:
    """(keys, commands processed so far, CPU seconds used so far) of each primary."""
    found = {}
    nodes = server.primaries() if isinstance(server, RedisClusterServer) else [server]
    for node in nodes:
        client = node.client()
        try:
            keys = int(await client.dbsize())
            stats = await client.info("commandstats")
            calls = sum(int(v["calls"]) for v in stats.values() if isinstance(v, dict))
            cpu = await client.info("cpu")
        finally:
            await client.aclose()
        found[str(node.port)] = (keys, calls, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]))
    return found


def spread(values: list[int]) -> float:
    mean = sum(values) / len(values)
    return max(abs(v - mean) for v in values) / mean if mean else 0.0


async def measure(
    name: str, server: RedisServer | RedisClusterServer, fake: FakeOpenAI, args: argparse.Namespace
) -> dict[str, Any]:
    url = server.url
    fake.latency = 0.0
    await fill(fake, url, args.keys)
    before = await per_primary(server)
    common = {"fake_url": fake.base_url, "redis_url": url, "callers": args.callers}
    hit_reports = await run_workers(
        {**common, "phase": "hits", "keys": args.keys, "seconds": args.seconds}, args.processes
    )
    after = await per_primary(server)
    latencies = sorted(x for r in hit_reports for x in r["latencies"])
    sources: dict[str, int] = {}
    for report in hit_reports:
        for source, count in report["sources"].items():
            sources[source] = sources.get(source, 0) + count
    keys = [after[p][0] for p in after]
    commands = [after[p][1] - before[p][1] for p in after]
    server_cpu = sum(after[p][2] - before[p][2] for p in after)
    client_cpu = sum(r["cpu"] for r in hit_reports)

    fake.latency = args.latency
    cold = 10_000_000 + random.randrange(1_000_000)
    calls_before = {n: fake.calls(prompt(cold + n)[0]["content"]) for n in range(args.stampede_keys)}
    stampede_reports = await run_workers(
        {**common, "phase": "stampede", "cold": cold, "stampede_keys": args.stampede_keys}, args.processes
    )
    per_key = [
        fake.calls(prompt(cold + n)[0]["content"]) - calls_before[n] for n in range(args.stampede_keys)
    ]
    return {
        "target": name,
        "hits_per_s": len(latencies) / args.seconds,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "sources": sources,
        "errors": sum(r["errors"] for r in hit_reports),
        "client_cpu_us_per_hit": client_cpu / max(1, len(latencies)) * 1e6,
        "server_cpu_us_per_hit": server_cpu / max(1, len(latencies)) * 1e6,
        "keys_per_primary": keys,
        "commands_per_primary": commands,
        "keys_spread": spread(keys),
        "commands_spread": spread(commands),
        "stampede_callers": args.processes * args.callers,
        "stampede_upstream_per_key": per_key,
        "stampede_errors": sum(r["errors"] for r in stampede_reports),
    }


async def drive(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    with FakeOpenAI(answer_chars=args.answer_chars) as fake:
        for round_ in range(args.rounds):
            with RedisServer() as single:
                results.append({"round": round_, **await measure("1 node", single, fake, args)})
            with RedisClusterServer(primaries=3) as cluster:
                results.append({"round": round_, **await measure("3-primary cluster", cluster, fake, args)})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--callers", type=int, default=64)
    parser.add_argument("--keys", type=int, default=3000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2, help="single/cluster alternations")
    parser.add_argument("--stampede-keys", type=int, default=5)
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--answer-chars", type=int, default=2000)
    parser.add_argument("--json", help="write results here (default: benchmarks/results/cluster.json)")
    args = parser.parse_args()
    if args.worker:
        asyncio.run(worker(orjson.loads(args.worker)))
        return
    results = asyncio.run(drive(args))
    single = sum(r["hits_per_s"] for r in results if r["target"] == "1 node")
    clustered = sum(r["hits_per_s"] for r in results if r["target"] != "1 node")
    rows = [
        [
            f"{r['target']} (round {r['round'] + 1})",
            f"{r['hits_per_s']:,.0f}",
            f"{r['p50_ms']:.2f}",
            f"{r['p99_ms']:.2f}",
            str(r["errors"]),
            f"{r['client_cpu_us_per_hit']:.1f}",
            f"{r['server_cpu_us_per_hit']:.1f}",
            " ".join(str(k) for k in r["keys_per_primary"]),
            f"{r['keys_spread']:.1%}",
            " ".join(f"{c:,}" for c in r["commands_per_primary"]),
            f"{r['commands_spread']:.1%}",
            f"{r['stampede_callers']} -> {'/'.join(str(n) for n in r['stampede_upstream_per_key'])}",
        ]
        for r in results
    ]
    print(
        f"{args.processes} client processes x {args.callers} callers, {args.keys} keys of "
        f"~{args.answer_chars} chars, memory tier off, {args.seconds:.0f} s per cell; "
        f"stampede: {args.stampede_keys} cold keys, model latency {args.latency} s"
    )
    print_table(
        [
            "target",
            "hits/s",
            "p50 ms",
            "p99 ms",
            "errors",
            "client CPU us/hit",
            "server CPU us/hit",
            "keys per primary",
            "max dev",
            "commands per primary",
            "max dev",
            "stampede: callers -> calls per key",
        ],
        rows,
    )
    pairs = [
        c["hits_per_s"] / o["hits_per_s"]
        for o, c in zip(results[::2], results[1::2], strict=True)
        if o["hits_per_s"]
    ]
    print(
        f"\ncluster / 1 node hit throughput: {clustered / single:.2f}x over all rounds; "
        f"per round {' '.join(f'{p:.2f}x' for p in pairs)}, median {statistics.median(pairs):.2f}x"
    )
    path = write_json(
        "cluster",
        {"args": vars(args), "results": results, "ratio": clustered / single, "round_ratios": pairs},
        args.json,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
