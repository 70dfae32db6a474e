"""Command line: ``aiollmcache demo``, ``serve``, ``stats`` and ``invalidate``.

``demo`` fires a burst of concurrent chat requests over a set of prompts at a
local FakeOpenAI server with realistic latency, once straight to the model and
then through the cache (cold, then warm), and prints what each cost.

``serve`` runs the OpenAI-compatible caching proxy (the ``server`` extra);
``stats`` prints a running proxy's counters.

``invalidate`` retires cached answers by key, tag, pattern or all at once, in
Redis and in the memory tier of every process using it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ._table import format_table
from .cache_policy import CachePolicy
from .client import CacheResult, LLMCache, Source
from .errors import AiollmcacheError, ConfigurationError, InvalidRequestError
from .invalidation import Pattern

__all__ = ["main"]

TOPICS = [
    "Python",
    "Redis",
    "asyncio",
    "HTTP/2",
    "TLS",
    "a B-tree",
    "Raft consensus",
    "a bloom filter",
    "garbage collection",
    "a hash ring",
    "TCP slow start",
    "a mutex",
    "backpressure",
    "a vector clock",
    "copy-on-write",
    "an LRU cache",
    "idempotency",
    "a write-ahead log",
    "CRDTs",
    "a circuit breaker",
]


@dataclass
class Row:
    scenario: str
    requests: int
    upstream_calls: int
    memory: int
    redis: int
    coalesced: int
    seconds: float


def _prompts(count: int, distinct: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    topics = [f"Explain {TOPICS[i % len(TOPICS)]} in two sentences (#{i})." for i in range(distinct)]
    # Popularity follows a Zipf-like curve, as real traffic does.
    weights = [1 / (rank + 1) for rank in range(distinct)]
    return rng.choices(topics, weights=weights, k=count)


def _row(scenario: str, results: Sequence[CacheResult], calls: int, seconds: float) -> Row:
    return Row(
        scenario=scenario,
        requests=len(results),
        upstream_calls=calls,
        memory=sum(r.source == Source.MEMORY for r in results),
        redis=sum(r.source == Source.REDIS and not r.coalesced for r in results),
        coalesced=sum(r.coalesced for r in results),
        seconds=seconds,
    )


async def _demo(args: argparse.Namespace) -> list[Row]:
    from .testing import FakeOpenAI

    prompts = _prompts(args.requests, args.prompts, args.seed)
    rows: list[Row] = []
    async with FakeOpenAI(latency=args.latency, answer_chars=args.answer_chars) as fake:
        client = fake.client(max_retries=0)
        try:
            started = time.perf_counter()
            await asyncio.gather(
                *(
                    client.chat.completions.create(
                        model=args.model, messages=[{"role": "user", "content": p}]
                    )
                    for p in prompts
                )
            )
            seconds = time.perf_counter() - started
            rows.append(Row("no cache", len(prompts), fake.calls(), 0, 0, 0, seconds))

            async def burst(cache: LLMCache, scenario: str) -> None:
                before = fake.calls()
                started = time.perf_counter()
                results = await asyncio.gather(
                    *(cache.complete([{"role": "user", "content": p}]) for p in prompts)
                )
                rows.append(_row(scenario, results, fake.calls() - before, time.perf_counter() - started))

            namespace = f"demo-{int(time.time())}"
            async with LLMCache(
                redis_url=args.redis_url, openai=client, model=args.model, namespace=namespace
            ) as cache:
                await burst(cache, "cache, cold")
                await burst(cache, "cache, warm")
            if args.redis_url:
                async with LLMCache(
                    redis_url=args.redis_url, openai=client, model=args.model, namespace=namespace
                ) as other:
                    await burst(other, "another process")
        finally:
            await client.close()
    return rows


def _print_table(rows: Sequence[Row], latency: float) -> None:
    baseline = rows[0].seconds
    header = ("scenario", "requests", "upstream", "memory", "redis", "coalesced", "seconds", "speed-up")
    cells = [
        (
            r.scenario,
            str(r.requests),
            str(r.upstream_calls),
            str(r.memory),
            str(r.redis),
            str(r.coalesced),
            f"{r.seconds:.3f}",
            f"{baseline / r.seconds:.1f}x" if r.seconds > 0 else "-",
        )
        for r in rows
    ]
    print(f"Model latency {latency:.2f}s per call; the same burst of requests in every row.\n")
    print(format_table(header, cells))


async def _invalidate(args: argparse.Namespace) -> str:
    pattern_fields = {
        "model": args.model,
        "system": args.system,
        "system_contains": args.system_contains,
        "key": args.key_glob,
    }
    kwargs: dict[str, object] = {}
    if args.key is not None:
        kwargs["key"] = args.key
    if args.tag is not None:
        kwargs["tag"] = args.tag
    if args.everything:
        kwargs["everything"] = True
    if any(value is not None for value in pattern_fields.values()):
        kwargs["pattern"] = Pattern(**pattern_fields)
    async with LLMCache(redis_url=args.redis_url, namespace=args.namespace) as cache:
        retired = await cache.invalidate(**kwargs)  # type: ignore[arg-type]
    if retired is None:
        return f"namespace {args.namespace!r}: every entry retired (a new namespace version)"
    return f"namespace {args.namespace!r}: {retired} {'entry' if retired == 1 else 'entries'} retired"


def _serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
        from openai import AsyncOpenAI

        from .server import create_app
    except ImportError as exc:
        print(
            f"aiollmcache serve needs the server extra: pip install 'aiollmcache[server]' ({exc})",
            file=sys.stderr,
        )
        return 1
    args.admin_token = args.admin_token or None  # an empty token is no token
    if args.admin_token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"aiollmcache serve: warning: /cache/stats and /cache/invalidate are open to anyone reaching "
            f"{args.host}:{args.port}; set --admin-token",
            file=sys.stderr,
        )
    if not os.environ.get("OPENAI_API_KEY") and not args.pass_api_key:
        print("aiollmcache serve: set OPENAI_API_KEY (or pass --pass-api-key)", file=sys.stderr)
        return 1
    try:
        policy = CachePolicy(
            store_truncated=args.store_truncated,
            tool_calls=not args.no_tool_calls,
            samples=args.samples,
            provider_state=args.provider_state,
        )
    except ConfigurationError as exc:
        print(f"aiollmcache serve: {exc}", file=sys.stderr)
        return 2

    async def run() -> None:
        api_key = os.environ.get("OPENAI_API_KEY") or "unset"
        client = AsyncOpenAI(base_url=args.upstream_base_url, api_key=api_key)

        def build(namespace: str) -> LLMCache:
            return LLMCache(
                redis_url=args.redis_url,
                openai=client,
                model=args.model,
                namespace=namespace,
                ttl=args.ttl,
                policy=policy,
            )

        others: dict[str, LLMCache] = {}

        async def namespaces(name: str) -> LLMCache:
            found = others.get(name)
            if found is None:
                if len(others) >= args.max_namespaces:
                    raise InvalidRequestError(
                        f"namespace {name!r}: this proxy serves {args.max_namespaces} others at most"
                    )
                found = others[name] = build(name)
                await found.open()
            return found

        async with build(args.namespace) as cache:
            await cache.open()
            app = create_app(
                cache,
                client,
                admin_token=args.admin_token,
                pass_api_key=args.pass_api_key,
                namespaces=namespaces,
            )
            config = uvicorn.Config(app, host=args.host, port=args.port, lifespan="off", access_log=False)
            try:
                await uvicorn.Server(config).serve()
            finally:
                for other in others.values():
                    await other.aclose()
        await client.close()

    asyncio.run(run())
    return 0


_STATS_ROWS = (
    ("requests", "requests"),
    ("hits, memory", "hits_memory"),
    ("hits, redis", "hits_redis"),
    ("hits, semantic", "hits_semantic"),
    ("coalesced (this process)", "coalesced"),
    ("coalesced (other processes)", "coalesced_remote"),
    ("model calls", "upstream_calls"),
    ("model errors", "upstream_errors"),
    ("stored", "stores"),
    ("stale served", "stale_served"),
    ("refreshes", "refreshes"),
    ("redis errors", "redis_errors"),
    ("corrupt entries", "corrupt_entries"),
    ("hit rate", "hit_rate"),
    ("tokens saved, prompt", "tokens_saved_prompt"),
    ("tokens saved, completion", "tokens_saved_completion"),
    ("cost saved, USD (estimate)", "cost_saved_usd"),
    ("memory entries", "memory_entries"),
    ("redis circuit open", "redis_breaker_open"),
)


def _stats(args: argparse.Namespace) -> int:
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(args.url.rstrip("/") + "/cache/stats")
    if args.admin_token:
        request.add_header("Authorization", f"Bearer {args.admin_token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            snapshot = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"aiollmcache stats: cannot read {args.url}/cache/stats: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(snapshot, indent=2))
        return 0
    rows = []
    for label, name in _STATS_ROWS:
        value = snapshot.get(name)
        if value is None:
            continue
        text = (
            f"{value:.1%}"
            if name == "hit_rate"
            else f"{value:,.6f}"
            if isinstance(value, float)
            else f"{value:,}"
        )
        rows.append((label, text))
    not_stored = snapshot.get("not_stored") or {}
    rows += [(f"not stored: {reason}", f"{n:,}") for reason, n in not_stored.items() if n]
    print(format_table(("counter", "value"), rows))
    latency = snapshot.get("latency") or {}
    lines = [
        (source, f"{s['count']:,}", _ms(s.get("mean_ms")), _ms(s.get("p50_ms")), _ms(s.get("p99_ms")))
        for source, s in latency.items()
        if s.get("count")
    ]
    if lines:
        print()
        print(format_table(("answered from", "calls", "mean ms", "p50 ms (<=)", "p99 ms (<=)"), lines))
    return 0


_BENCHMARKS = {
    "stampede": "stampede.py",
    "hits": "hit_latency.py",
    "freshness": "freshness.py",
    "throughput": "throughput.py",
    "invalidation": "invalidation.py",
    "outage": "outage.py",
    "semantic": "semantic.py",
    "streaming": "streaming.py",
    "proxy": "proxy.py",
}


def _bench(args: argparse.Namespace) -> int:
    import subprocess
    import threading
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "benchmarks"
    script = folder / _BENCHMARKS[args.name]
    if not script.is_file():
        print(
            f"aiollmcache bench: no {script}: the benchmarks come with a source checkout "
            "(pip install -e . from a clone of the repository)",
            file=sys.stderr,
        )
        return 1
    options = args.options[1:] if args.options[:1] == ["--"] else args.options
    proc = subprocess.Popen([sys.executable, str(script), *options], cwd=folder)
    done = threading.Event()

    def progress() -> None:  # a live line on a terminal: what runs, for how long
        started = time.monotonic()
        while not done.wait(0.5):
            sys.stderr.write(f"\r[aiollmcache bench {args.name}] {time.monotonic() - started:5.0f} s ")
            sys.stderr.flush()
        sys.stderr.write("\r" + " " * 40 + "\r")

    ticker = threading.Thread(target=progress, daemon=True) if sys.stderr.isatty() else None
    if ticker is not None:
        ticker.start()
    try:
        return proc.wait()
    finally:
        done.set()
        if ticker is not None:
            ticker.join()


def _ms(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "-"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="aiollmcache", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="a burst of requests with and without the cache, against a local fake model"
    )
    demo.add_argument("--requests", type=int, default=1000, help="requests in the burst (default 1000)")
    demo.add_argument("--prompts", type=int, default=50, help="distinct prompts among them (default 50)")
    demo.add_argument("--latency", type=float, default=0.8, help="model latency in seconds (default 0.8)")
    demo.add_argument("--answer-chars", type=int, default=1500, help="size of each answer (default 1500)")
    demo.add_argument("--model", default="gpt-4o-mini")
    demo.add_argument("--redis-url", default=None, help="also use this Redis (default: memory only)")
    demo.add_argument("--seed", type=int, default=1)
    inv = sub.add_parser(
        "invalidate",
        help="retire cached answers in Redis and in every process's memory tier",
        description="Give --key, --tag, --everything, or any of the pattern options "
        "(--model, --system, --system-contains, --key-glob; all given must match).",
    )
    inv.add_argument("--redis-url", default=os.environ.get("AIOLLMCACHE_REDIS_URL"))
    inv.add_argument("--namespace", default=os.environ.get("AIOLLMCACHE_NAMESPACE", "default"))
    inv.add_argument("--key", help="a cache key (CacheResult.key)")
    inv.add_argument("--tag", help="answers stored with this tag")
    inv.add_argument("--everything", action="store_true", help="the whole namespace")
    inv.add_argument("--model", help="pattern: glob on the request's model")
    inv.add_argument("--system", help="pattern: glob on the system prompt")
    inv.add_argument("--system-contains", help="pattern: text in the system prompt")
    inv.add_argument("--key-glob", help="pattern: glob on the cache key")
    serve = sub.add_parser("serve", help="run the OpenAI-compatible caching proxy")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument(
        "--redis-url", default=os.environ.get("AIOLLMCACHE_REDIS_URL"), help="default: memory only"
    )
    serve.add_argument("--namespace", default=os.environ.get("AIOLLMCACHE_NAMESPACE", "default"))
    serve.add_argument(
        "--upstream-base-url", default=os.environ.get("OPENAI_BASE_URL"), help="default: OpenAI"
    )
    serve.add_argument("--model", default=None, help="model for requests that name none")
    serve.add_argument("--ttl", type=float, default=3600.0)
    serve.add_argument(
        "--store-truncated", action="store_true", help="store answers cut at max_tokens (default: not)"
    )
    serve.add_argument(
        "--no-tool-calls", action="store_true", help="never store answers that ask for tool calls"
    )
    serve.add_argument(
        "--provider-state",
        action="store_true",
        help="cache Responses requests on provider-held state (previous_response_id, web search...)",
    )
    serve.add_argument(
        "--samples",
        type=int,
        default=1,
        help="answers kept per key for requests that sample (temperature > 0, no seed), served at random",
    )
    serve.add_argument(
        "--admin-token",
        default=os.environ.get("AIOLLMCACHE_ADMIN_TOKEN"),
        help="required (as a bearer token) by /cache/stats and /cache/invalidate",
    )
    serve.add_argument(
        "--pass-api-key", action="store_true", help="send each caller's own bearer key upstream"
    )
    serve.add_argument(
        "--max-namespaces",
        type=int,
        default=64,
        help="other namespaces a request may name with x-aiollmcache-namespace (default 64)",
    )
    bench = sub.add_parser(
        "bench",
        help="run a benchmark of a source checkout and print its table",
        description="Runs benchmarks/<name>.py of the source checkout this package was installed "
        "from; arguments after the name go to the benchmark (e.g. aiollmcache bench hits -- --help).",
    )
    bench.add_argument("name", choices=sorted(_BENCHMARKS))
    bench.add_argument("options", nargs=argparse.REMAINDER)
    stats = sub.add_parser("stats", help="print a running proxy's counters")
    stats.add_argument("--url", default="http://127.0.0.1:8080", help="the proxy (default %(default)s)")
    stats.add_argument("--admin-token", default=os.environ.get("AIOLLMCACHE_ADMIN_TOKEN"))
    stats.add_argument("--json", action="store_true", help="the raw JSON")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "stats":
        return _stats(args)
    if args.command == "bench":
        return _bench(args)
    if args.command == "invalidate":
        if not args.redis_url:
            parser.error("invalidate: give --redis-url or set AIOLLMCACHE_REDIS_URL")
        kinds = [args.key is not None, args.tag is not None, args.everything]
        kinds.append(
            any(v is not None for v in (args.model, args.system, args.system_contains, args.key_glob))
        )
        if sum(kinds) != 1:
            parser.error(
                "invalidate: give one of --key, --tag, --everything, or pattern options "
                "(--model, --system, --system-contains, --key-glob)"
            )
        # The outcome is printed below; the library's own warnings would repeat it.
        logging.getLogger("aiollmcache").setLevel(logging.ERROR)
        try:
            print(asyncio.run(_invalidate(args)))
        except InvalidRequestError as exc:
            parser.error(str(exc))
        except AiollmcacheError as exc:
            print(f"aiollmcache invalidate: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.requests < 1 or args.prompts < 1 or args.latency < 0:
        parser.error("--requests and --prompts must be >= 1, --latency >= 0")
    rows = asyncio.run(_demo(args))
    _print_table(rows, args.latency)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
