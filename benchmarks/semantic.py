"""Semantic index: lookup latency, agreement with brute force, memory, and the
event-loop stall while searching.

For each size (10k, 100k, 1M vectors) and dimension (384, 1536), one
partition is filled with clustered unit vectors (topics: vectors of one
topic are alike, as questions on one subject are) and searched with
paraphrase-like queries: a stored vector plus noise, at cosine ~0.9-0.97 from
it. Compared in the same run:

- ``index``: :class:`aiollmcache.tiers.semantic.VectorIndex` (float16 rows,
  sign-sketch prefilter, exact re-ranking of 64 candidates);
- ``brute force``: a float32 matrix times the query, then argmax, the plain
  way to do it.

Reported: p50/p99 of one lookup, how often the index's best match is brute
force's best match (recall@1), the index's bytes per entry beyond the vector
itself, and the event-loop stall: the longest gap between two turns of the loop
(p99 and max) while lookups run through ``SemanticTier.search`` (in a worker
thread above ``thread_above`` rows), next to the same measure with nothing
searched (this machine's floor) and the worst gap when the same lookups run
on the event loop itself.

    python benchmarks/semantic.py [--sizes 10000,100000,1000000] [--dims 384,1536] [--queries 200]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
from typing import Any

import numpy as np
from _common import percentile, print_table, write_json

from aiollmcache.tiers.semantic import SemanticTier, VectorIndex

CHUNK = 50_000


def unit(rows: np.ndarray[Any, Any]) -> np.ndarray[Any, np.dtype[np.float32]]:
    rows = rows.astype(np.float32, copy=False)
    normalised: np.ndarray[Any, np.dtype[np.float32]] = rows / np.linalg.norm(rows, axis=-1, keepdims=True)
    return normalised


def build(
    size: int, dims: int, rng: np.random.Generator
) -> tuple[VectorIndex, np.ndarray[Any, np.dtype[np.float32]]]:
    """A filled index and the same vectors as a float32 matrix."""
    topics = unit(rng.standard_normal((max(16, size // 100), dims), dtype=np.float32))
    index = VectorIndex(dims)
    matrix = np.empty((size, dims), np.float32)
    for start in range(0, size, CHUNK):
        n = min(CHUNK, size - start)
        topic = topics[rng.integers(0, len(topics), n)]
        rows = unit(topic + 0.8 * rng.standard_normal((n, dims), dtype=np.float32) / np.sqrt(dims))
        matrix[start : start + n] = rows
        keys = [f"{i:032x}" for i in range(start, start + n)]
        index.add_many(keys, rows, np.full(n, 1e12))
    return index, matrix


def queries(
    matrix: np.ndarray[Any, np.dtype[np.float32]], count: int, rng: np.random.Generator
) -> tuple[np.ndarray[Any, np.dtype[np.float32]], np.ndarray[Any, np.dtype[np.int64]]]:
    sources = rng.integers(0, len(matrix), count)
    dims = matrix.shape[1]
    noise = rng.uniform(0.25, 0.5, (count, 1)).astype(np.float32)
    return unit(
        matrix[sources] + noise * rng.standard_normal((count, dims), dtype=np.float32) / np.sqrt(dims)
    ), sources


def timed(fn: Any, qs: np.ndarray[Any, Any]) -> tuple[list[float], list[Any]]:
    times, results = [], []
    for q in qs:
        started = time.perf_counter()
        results.append(fn(q))
        times.append((time.perf_counter() - started) * 1000)
    return sorted(times), results


async def stall(tier: SemanticTier | None, qs: np.ndarray[Any, Any]) -> list[float]:
    """The gaps (ms, sorted) between consecutive turns of the event loop while
    ``qs`` were searched one after another through the tier: a callback
    that schedules itself again at every turn records when it runs, so a gap
    is how long the loop did something else (or waited for the interpreter
    lock). ``None``: the same time with nothing searched, this machine's floor.
    """
    loop = asyncio.get_running_loop()
    gaps: list[float] = []
    last = time.perf_counter()
    running = True

    def turn() -> None:
        nonlocal last
        now = time.perf_counter()
        gaps.append((now - last) * 1000)
        last = now
        if running:
            loop.call_soon(turn)

    if tier is not None:
        await tier.start()
    loop.call_soon(turn)
    for q in qs:
        if tier is None:
            await asyncio.sleep(0.002)
        else:
            await tier.search("p", q, 0.0)
            await asyncio.sleep(0)  # one lookup per caller, callers one after another
    running = False
    await asyncio.sleep(0)
    return sorted(gaps)


def run_one(size: int, dims: int, count: int, rng: np.random.Generator) -> dict[str, Any]:
    index, matrix = build(size, dims, rng)
    qs, _ = queries(matrix, count, rng)
    gc.collect()

    def brute(q: np.ndarray[Any, Any]) -> int:
        return int(np.argmax(matrix @ q))

    def indexed(q: np.ndarray[Any, Any]) -> str | None:
        found = index.search(q, 0.0, limit=1, exact_below=2048, candidates=64)
        return found[0].key if found else None

    brute_ms, best = timed(brute, qs)
    index_ms, got = timed(indexed, qs)
    agree = sum(key == f"{b:032x}" for key, b in zip(got, best, strict=True))
    similarity = [float(matrix[b] @ q) for b, q in zip(best, qs, strict=True)]
    per_entry = index.nbytes / size
    vector = dims * 2

    stalls = {}
    for thread_above, label in ((10**12, "on the loop"), (20_000, "tier")):
        tier = SemanticTier(redis=None, dtype="float16", max_entries=10**9, thread_above=thread_above)
        tier._partition("p").index = index  # the same rows, searched through the tier
        stalls[label] = asyncio.run(stall(tier, qs[:100]))
    idle = asyncio.run(stall(None, qs[:100]))
    return {
        "size": size,
        "dims": dims,
        "index_p50_ms": percentile(index_ms, 50),
        "index_p99_ms": percentile(index_ms, 99),
        "brute_p50_ms": percentile(brute_ms, 50),
        "brute_p99_ms": percentile(brute_ms, 99),
        "recall_at_1": agree / count,
        "query_similarity_min": min(similarity),
        "bytes_per_entry": per_entry,
        "bytes_beyond_vector": per_entry - vector,
        "stall_ms_tier_p99": percentile(stalls["tier"], 99),
        "stall_ms_tier_max": stalls["tier"][-1],
        "stall_ms_on_loop_max": stalls["on the loop"][-1],
        "stall_ms_idle_p99": percentile(idle, 99),
        "stall_ms_idle_max": idle[-1],
        "searched_in_thread": size >= 20_000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--dims", default="384,1536")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(2026)
    results = []
    for dims in (int(d) for d in args.dims.split(",")):
        for size in (int(s) for s in args.sizes.split(",")):
            results.append(run_one(size, dims, args.queries, rng))
            gc.collect()
    rows = [
        (
            f"{r['size']:,}",
            str(r["dims"]),
            f"{r['index_p50_ms']:.2f}",
            f"{r['index_p99_ms']:.2f}",
            f"{r['brute_p50_ms']:.2f}",
            f"{r['brute_p50_ms'] / r['index_p50_ms']:.1f}x",
            f"{r['recall_at_1']:.3f}",
            f"{r['bytes_beyond_vector']:.0f}",
            f"{r['stall_ms_tier_p99']:.2f} / {r['stall_ms_tier_max']:.2f}",
            f"{r['stall_ms_idle_p99']:.2f} / {r['stall_ms_idle_max']:.2f}",
            f"{r['stall_ms_on_loop_max']:.2f}",
        )
        for r in results
    ]
    closest = min(r["query_similarity_min"] for r in results)
    print(f"{args.queries} paraphrase-like queries per row (cosine >= {closest:.2f} to their source)\n")
    header = (
        "vectors",
        "dims",
        "index p50 ms",
        "p99 ms",
        "brute force p50 ms",
        "speed-up",
        "recall@1",
        "bytes/entry beyond vector",
        "loop stall p99/max ms",
        "idle p99/max",
        "max if on loop",
    )
    print_table(header, rows)
    print(f"\nwrote {write_json('semantic', {'queries': args.queries, 'results': results}, args.json)}")


if __name__ == "__main__":
    main()
