"""Run one complete() in a separate OS process and print the result as JSON.

Usage: python -m tests.worker REDIS_URL BASE_URL NAMESPACE PROMPT
"""

from __future__ import annotations

import asyncio
import sys

import orjson
from openai import AsyncOpenAI

from aiollmcache import LLMCache


async def main(redis_url: str, base_url: str, namespace: str, prompt: str) -> None:
    client = AsyncOpenAI(base_url=base_url, api_key="test-key", max_retries=0)
    try:
        async with LLMCache(
            redis_url=redis_url, openai=client, model="test-model", namespace=namespace
        ) as cache:
            result = await cache.complete([{"role": "user", "content": prompt}])
            sys.stdout.buffer.write(
                orjson.dumps(
                    {
                        "source": result.source,
                        "text": result.text,
                        "key": result.key,
                        "id": result.response.id,
                    }
                )
            )
    finally:
        await client.close()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
