"""A worker process for cross-process tests: C concurrent complete() calls.

    python -m tests.worker REDIS_URL BASE_URL NAMESPACE PROMPT [--callers N]
        [--lease-ttl S] [--client-timeout S] [--ttl S] [--stale-ttl S] [--wait-go]
        [--max-tokens N] [--temperature T] [--samples K] [--responses]

With --responses the calls are respond(input=PROMPT) (the Responses API).

With --wait-go it prints "ready" once the cache is open and waits for a line
on stdin before firing, so several workers can start together. It prints one
JSON object: the results (source, coalesced, text, response id, or the
error's type and message) and the cache's stats.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import orjson
from openai import AsyncOpenAI

from aiollmcache import CachePolicy, LLMCache


async def call(cache: LLMCache, prompt: str, params: dict[str, Any], responses: bool) -> dict[str, Any]:
    try:
        if responses:
            answer = await cache.respond(input=prompt, **params)
            return {
                "source": str(answer.source),
                "coalesced": answer.coalesced,
                "text": answer.output_text,
                "id": answer.response.id,
            }
        result = await cache.complete([{"role": "user", "content": prompt}], **params)
    except Exception as exc:
        return {"error": type(exc).__name__, "message": str(exc)}
    return {
        "source": str(result.source),
        "coalesced": result.coalesced,
        "stale": result.stale,
        "text": result.text,
        "key": result.key,
        "id": result.response.id,
        "finish_reason": result.response.choices[0].finish_reason,
    }


async def main(args: argparse.Namespace) -> None:
    client = AsyncOpenAI(
        base_url=args.base_url, api_key="test-key", max_retries=0, timeout=args.client_timeout
    )
    try:
        async with LLMCache(
            redis_url=args.redis_url,
            openai=client,
            model="test-model",
            namespace=args.namespace,
            lease_ttl=args.lease_ttl,
            ttl=args.ttl,
            stale_ttl=args.stale_ttl,
            policy=CachePolicy(samples=args.samples),
        ) as cache:
            if args.wait_go:
                print("ready", flush=True)
                await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            params: dict[str, Any] = {}
            if args.max_tokens is not None:
                params["max_tokens"] = args.max_tokens
            if args.temperature is not None:
                params["temperature"] = args.temperature
            results = await asyncio.gather(
                *(call(cache, args.prompt, params, args.responses) for _ in range(args.callers))
            )
        stats = cache.stats()  # after closing, which drains background refreshes
        sys.stdout.buffer.write(orjson.dumps({"results": results, "stats": stats}) + b"\n")
        sys.stdout.flush()
    finally:
        await client.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("redis_url")
    parser.add_argument("base_url")
    parser.add_argument("namespace")
    parser.add_argument("prompt")
    parser.add_argument("--callers", type=int, default=1)
    parser.add_argument("--lease-ttl", type=float, default=10.0)
    parser.add_argument("--client-timeout", type=float, default=30.0)
    parser.add_argument("--ttl", type=float, default=3600.0)
    parser.add_argument("--stale-ttl", type=float, default=0.0)
    parser.add_argument("--wait-go", action="store_true")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--responses", action="store_true")
    asyncio.run(main(parser.parse_args()))
