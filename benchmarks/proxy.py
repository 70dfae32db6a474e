"""The caching proxy under load: cache hits per second and their latency,
against the framework floor (a Starlette app on uvicorn answering the same
bytes), and what the per-call stats cost.

Each server runs in a process of its own (``aiollmcache serve``, memory
tier, answers from a FakeOpenAI; and ``_floor_app.py``); the load comes from
a third process (``_load.py``: httpx, C concurrent requests over a pool of C
connections, for ``--seconds``), the same for both, taking turns over
``--rounds`` rounds. Every request asks the same question, so every proxy
answer after the first is a memory hit.

Then, in this process: memory hits through ``complete()`` with the stats'
latency histogram and cost estimate (``_complete_timed``) and without
(``_complete``), alternating call by call.

    python benchmarks/proxy.py [--concurrency 32] [--seconds 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson
from _common import percentile, print_table, write_json

from aiollmcache import LLMCache
from aiollmcache.testing import FakeOpenAI, chat_completion

HERE = Path(__file__).resolve().parent
MODEL = "gpt-4o-mini"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up") from None
            time.sleep(0.05)


def _wrk_ms(text: str) -> float:
    value = float(text[:-2] if text.endswith("ms") else text[:-2] if text.endswith("us") else text[:-1])
    return value / 1000 if text.endswith("us") else value if text.endswith("ms") else value * 1000


def load(url: str, concurrency: int, seconds: float, body_file: str) -> dict[str, float]:
    """One load run: wrk (one thread, ``concurrency`` connections) when it is
    installed, else the Python generator ``_load.py``."""
    if shutil.which("wrk"):
        script = Path(body_file).with_suffix(".lua")
        body = Path(body_file).read_text()
        script.write_text(
            f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = [[{body}]]\n'
        )
        out = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{concurrency}",
                f"-d{max(1, round(seconds))}s",
                "--latency",
                "-s",
                str(script),
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        found = {m.group(1): m.group(2) for m in re.finditer(r"^\s+(50|99)%\s+(\S+)", out, re.M)}
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
        bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
        errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
        failed = int(bad.group(1)) if bad else 0
        failed += sum(int(g) for g in errors.groups()) if errors else 0
        return {
            "requests_per_s": rps,
            "p50_ms": _wrk_ms(found["50"]),
            "p99_ms": _wrk_ms(found["99"]),
            "failed": failed,
        }
    out = subprocess.run(
        [sys.executable, str(HERE / "_load.py"), url, str(concurrency), str(seconds), body_file],
        capture_output=True,
        check=True,
    ).stdout
    run: dict[str, Any] = orjson.loads(out)
    return {
        "requests_per_s": run["requests"] / run["elapsed"],
        "p50_ms": percentile(run["ms"], 50),
        "p99_ms": percentile(run["ms"], 99),
        "failed": run["failed"],
    }


async def stats_cost(calls: int) -> dict[str, float]:
    async def model(params: dict[str, Any]) -> dict[str, Any]:
        usage = {"prompt_tokens": 20, "completion_tokens": 300, "total_tokens": 320}
        return chat_completion("An answer. " * 150, model=MODEL, usage=usage)

    async with LLMCache(upstream=model, model=MODEL) as cache:
        request = cache._request([{"role": "user", "content": "q"}], {}, model)
        await cache._complete(request, None, model)
        timed: list[float] = []
        plain: list[float] = []
        for n in range(calls):
            for with_stats in (n % 2 == 0, n % 2 == 1):
                started = time.perf_counter_ns()
                if with_stats:
                    await cache._complete_timed(request, None, model)
                else:
                    await cache._complete(request, None, model)
                (timed if with_stats else plain).append(time.perf_counter_ns() - started)
    timed.sort()
    plain.sort()
    return {
        "with_us": percentile(timed, 50) / 1000,
        "without_us": percentile(plain, 50) / 1000,
        "added_us": (percentile(timed, 50) - percentile(plain, 50)) / 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stats-calls", type=int, default=20000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    body = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "What is Python?"}]})
    results: dict[str, dict[str, Any]] = {}
    with FakeOpenAI(answer_chars=2000) as fake, tempfile.TemporaryDirectory() as tmp:
        body_file = os.path.join(tmp, "body.json")
        Path(body_file).write_bytes(body)
        # The floor answers the bytes the proxy serves for this request.
        client = fake.client()
        answer = asyncio.run(
            client.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": "What is Python?"}]
            )
        ).content  # type: ignore[arg-type]
        answer_file = os.path.join(tmp, "answer.json")
        Path(answer_file).write_bytes(answer)
        proxy_port, floor_port = free_port(), free_port()
        env = {**os.environ, "OPENAI_API_KEY": "bench"}
        servers = {
            "aiollmcache serve (memory hits)": (
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "aiollmcache",
                        "serve",
                        "--port",
                        str(proxy_port),
                        "--upstream-base-url",
                        fake.base_url,
                    ],
                    env=env,
                ),
                f"http://127.0.0.1:{proxy_port}",
            ),
            "framework floor (fixed bytes)": (
                subprocess.Popen([sys.executable, str(HERE / "_floor_app.py"), str(floor_port), answer_file]),
                f"http://127.0.0.1:{floor_port}",
            ),
        }
        try:
            wait_ready(
                f"http://127.0.0.1:{proxy_port}/healthz", servers["aiollmcache serve (memory hits)"][0]
            )
            wait_ready(
                f"http://127.0.0.1:{floor_port}/v1/chat/completions",
                servers["framework floor (fixed bytes)"][0],
            )
            samples: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
            for _, url in servers.values():  # warm-up, not counted: the first request is a miss
                load(f"{url}/v1/chat/completions", args.concurrency, 1.0, body_file)
            for _ in range(args.rounds):
                for name, (_, url) in servers.items():
                    samples[name].append(
                        load(f"{url}/v1/chat/completions", args.concurrency, args.seconds, body_file)
                    )
            assert fake.calls() <= 2, fake.calls()
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(10)
    for name, runs in samples.items():
        results[name] = {
            "requests_per_s": sum(r["requests_per_s"] for r in runs) / len(runs),
            "p50_ms": sorted(r["p50_ms"] for r in runs)[len(runs) // 2],
            "p99_ms": max(r["p99_ms"] for r in runs),
            "failed": sum(r["failed"] for r in runs),
            "rounds": runs,
        }
    generator = "wrk, 1 thread" if shutil.which("wrk") else "httpx in Python"
    floor = results["framework floor (fixed bytes)"]["requests_per_s"]
    rows = [
        (
            name,
            f"{r['requests_per_s']:,.0f}",
            f"{r['p50_ms']:.2f}",
            f"{r['p99_ms']:.2f}",
            f"{r['requests_per_s'] / floor:.0%}",
            str(r["failed"]),
        )
        for name, r in results.items()
    ]
    print(
        f"{args.concurrency} concurrent connections, {args.rounds} rounds of {args.seconds} s each, "
        f"load from another process ({generator}); p99: the worst round's; after 1 s of warm-up each\n"
    )
    print_table(("server", "requests/s", "p50 ms", "p99 ms", "of the floor", "failed"), rows)
    cost = asyncio.run(stats_cost(args.stats_calls))
    print(
        f"\nstats per call (memory hits through complete(), {args.stats_calls:,} alternating): "
        f"p50 {cost['with_us']:.2f} us with the latency histogram and cost estimate, "
        f"{cost['without_us']:.2f} us without: {cost['added_us']:+.2f} us"
    )
    document = {
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "results": results,
        "stats_cost": cost,
    }
    print(f"wrote {write_json('proxy', document, args.json)}")


if __name__ == "__main__":
    main()
