"""A process following streams for benchmarks/streaming.py, driven over stdin.

    python benchmarks/_stream_worker.py REDIS_URL BASE_URL NAMESPACE

Prints "ready", then for each JSON line {"prompt", "at", "count"} waits until
``time.monotonic()`` reaches ``at`` (one clock for every process of the
machine), runs ``count`` concurrent ``cache.stream()`` calls and prints one
JSON line: per call, when its first and last chunks arrived, its text, and
whether it followed another process's stream.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import orjson
from openai import AsyncOpenAI

from aiollmcache import LLMCache


async def main(redis_url: str, base_url: str, namespace: str) -> None:
    client = AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0)
    loop = asyncio.get_running_loop()
    async with LLMCache(
        redis_url=redis_url, openai=client, model="bench-model", namespace=namespace
    ) as cache:
        await cache.open()

        async def one(prompt: str) -> dict[str, Any]:
            stream = cache.stream([{"role": "user", "content": prompt}])
            first = last = 0.0
            text = ""
            async for chunk in stream:
                last = time.monotonic()
                first = first or last
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
            return {"first": first, "last": last, "text": text, "followed": stream.coalesced}

        print("ready", flush=True)
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            command = orjson.loads(line)
            await asyncio.sleep(max(0.0, command["at"] - time.monotonic()))
            results = await asyncio.gather(*(one(command["prompt"]) for _ in range(command["count"])))
            sys.stdout.buffer.write(orjson.dumps(results) + b"\n")
            sys.stdout.flush()
    await client.close()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
