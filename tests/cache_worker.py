"""A long-lived worker process for cross-process tests, driven over stdin.

    python -m tests.cache_worker REDIS_URL BASE_URL NAMESPACE [--sync-interval S] [--semantic THRESHOLD]
        [--lease-ttl S]

It prints "ready" once its cache is open, then answers each JSON line on stdin
with one JSON line on stdout:

    {"op": "call", "prompt": P, "system": S, "tags": [...], "model": M}
        -> {"source", "key", "text", "similarity"}
    {"op": "stream", "prompt": P, "count": N}
        -> [{"text", "source", "coalesced", "chunks", "error"}, ...]: N
           concurrent cache.stream() calls
    {"op": "wait", "count": N, "timeout": S}
        -> {"invalidations": [kind, ...]} once N invalidations were applied
           here (made anywhere), or {"error": "timeout", ...}
    {"op": "stats"} -> the cache's stats
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import orjson
from openai import AsyncOpenAI

from aiollmcache import CacheControl, Invalidation, LLMCache, SemanticConfig


async def main(args: argparse.Namespace) -> None:
    client = AsyncOpenAI(base_url=args.base_url, api_key="test-key", max_retries=0)
    applied: list[tuple[str, float]] = []
    changed = asyncio.Event()

    def listener(invalidation: Invalidation) -> None:
        applied.append((str(invalidation.kind), time.monotonic()))
        changed.set()

    loop = asyncio.get_running_loop()
    async with LLMCache(
        redis_url=args.redis_url,
        openai=client,
        model="test-model",
        namespace=args.namespace,
        sync_interval=args.sync_interval,
        semantic=SemanticConfig(threshold=args.semantic) if args.semantic is not None else None,
        lease_ttl=args.lease_ttl,
    ) as cache:

        async def stream(prompt: str) -> dict[str, Any]:
            text, chunks, error = "", 0, None
            flowing = cache.stream([{"role": "user", "content": prompt}], model="test-model")
            try:
                async for chunk in flowing:
                    chunks += 1
                    if chunk.choices:
                        text += chunk.choices[0].delta.content or ""
            except Exception as exc:
                error = type(exc).__name__
            return {
                "text": text,
                "source": str(flowing.source),
                "coalesced": flowing.coalesced,
                "chunks": chunks,
                "error": error,
            }

        cache.add_invalidation_listener(listener)
        print("ready", flush=True)
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            command = orjson.loads(line)
            reply: Any
            if command["op"] == "call":
                messages = [{"role": "user", "content": command["prompt"]}]
                if command.get("system"):
                    messages.insert(0, {"role": "system", "content": command["system"]})
                result = await cache.complete(
                    messages,
                    model=command.get("model", "test-model"),
                    cache=CacheControl(tags=command.get("tags", [])),
                )
                reply = {
                    "source": str(result.source),
                    "key": result.key,
                    "text": result.text,
                    "similarity": result.similarity,
                }
            elif command["op"] == "wait":
                started = time.monotonic()
                try:
                    async with asyncio.timeout(command["timeout"]):
                        while len(applied) < command["count"]:
                            changed.clear()
                            await changed.wait()
                    reply = {
                        "invalidations": [kind for kind, _ in applied],
                        "waited": time.monotonic() - started,
                    }
                except TimeoutError:
                    reply = {"error": "timeout", "invalidations": [kind for kind, _ in applied]}
            elif command["op"] == "stream":
                reply = await asyncio.gather(*(stream(command["prompt"]) for _ in range(command["count"])))
            elif command["op"] == "stats":
                reply = cache.stats()
            else:
                reply = {"error": f"unknown op {command['op']!r}"}
            sys.stdout.buffer.write(orjson.dumps(reply) + b"\n")
            sys.stdout.flush()
    await client.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("redis_url")
    parser.add_argument("base_url")
    parser.add_argument("namespace")
    parser.add_argument("--sync-interval", type=float, default=1.0)
    parser.add_argument("--semantic", type=float, default=None, metavar="THRESHOLD")
    parser.add_argument("--lease-ttl", type=float, default=10.0)
    asyncio.run(main(parser.parse_args()))
