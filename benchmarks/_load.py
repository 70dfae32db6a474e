"""Load generator for benchmarks/proxy.py, a process of its own.

    python benchmarks/_load.py URL CONCURRENCY SECONDS BODY_FILE

POSTs the JSON in BODY_FILE to URL from CONCURRENCY coroutines over one
HTTP connection pool for SECONDS, then prints one JSON line: requests
completed, non-200 answers, elapsed seconds and sorted latencies (ms).
"""

from __future__ import annotations

import asyncio
import sys
import time

import httpx2
import orjson


async def main(url: str, concurrency: int, seconds: float, body: bytes) -> None:
    latencies: list[float] = []
    failed = 0
    limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx2.AsyncClient(limits=limits, timeout=30) as client:
        headers = {"content-type": "application/json"}
        await client.post(url, content=body, headers=headers)  # warm
        stop_at = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal failed
            while (started := time.perf_counter()) < stop_at:
                response = await client.post(url, content=body, headers=headers)
                if response.status_code != 200:
                    failed += 1
                latencies.append((time.perf_counter() - started) * 1000)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    print(
        orjson.dumps(
            {"requests": len(latencies), "failed": failed, "elapsed": elapsed, "ms": sorted(latencies)}
        ).decode()
    )


if __name__ == "__main__":
    with open(sys.argv[4], "rb") as f:
        payload = f.read()
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), payload))
