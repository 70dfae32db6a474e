from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from aiollmcache import CacheControl, LLMCache
from aiollmcache.cli import _prompts, main
from aiollmcache.testing import chat_completion

from .conftest import AnyRedis


def test_demo_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["demo", "--requests", "40", "--prompts", "5", "--latency", "0.01", "--answer-chars", "50"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    body = lines[lines.index(next(x for x in lines if x.startswith("---"))) + 1 :]
    # scenario -> requests, upstream, memory, redis, coalesced, seconds, speed-up
    rows = {cells[0]: cells[1:] for cells in (re.split(r"\s{2,}", x.strip()) for x in body)}
    distinct = len(set(_prompts(40, 5, 1)))
    assert rows["no cache"][:2] == ["40", "40"]
    assert rows["cache, cold"][:5] == ["40", str(distinct), "0", "0", str(40 - distinct)]
    assert rows["cache, warm"][:5] == ["40", "0", "40", "0", "0"]


def test_demo_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--requests", "0"])
    assert "--requests" in capsys.readouterr().err


@pytest.mark.both_redis
def test_invalidate_retires_by_tag_and_everything(
    redis_server: AnyRedis, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async def fill() -> None:
        async def upstream(params: dict[str, Any]) -> dict[str, Any]:
            return chat_completion("a", model="m")

        async with LLMCache(
            redis_url=redis_server.url, upstream=upstream, model="m", namespace=namespace
        ) as cache:
            for n in range(3):
                await cache.complete([{"role": "user", "content": str(n)}], cache=CacheControl(tags=["docs"]))

    asyncio.run(fill())
    base = ["invalidate", "--redis-url", redis_server.url, "--namespace", namespace]
    assert main([*base, "--tag", "docs"]) == 0
    assert capsys.readouterr().out.strip() == f"namespace {namespace!r}: 3 entries retired"
    assert main([*base, "--model", "m", "--system", ""]) == 0
    assert "0 entries retired" in capsys.readouterr().out
    assert main([*base, "--everything"]) == 0
    assert "every entry retired" in capsys.readouterr().out


def test_invalidate_reports_bad_arguments_and_an_unreachable_redis(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["invalidate", "--redis-url", "redis://127.0.0.1:1/0", "--tag", "a", "--everything"])
    assert "give one of --key, --tag, --everything" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["invalidate", "--redis-url", "redis://127.0.0.1:1/0", "--key", "nope"])
    assert "32 lowercase hex" in capsys.readouterr().err
    assert main(["invalidate", "--redis-url", "redis://127.0.0.1:1/0", "--everything"]) == 1
    assert "redis" in capsys.readouterr().err.lower()


def test_serve_and_stats_in_real_processes(redis_server: AnyRedis, namespace: str) -> None:
    import json
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from openai import OpenAI

    from aiollmcache.testing import FakeOpenAI

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with FakeOpenAI() as fake:
        env = {**os.environ, "OPENAI_API_KEY": "test-key"}
        argv = [
            sys.executable, "-m", "aiollmcache", "serve", "--port", str(port),
            "--redis-url", redis_server.url, "--namespace", namespace,
            "--upstream-base-url", fake.base_url, "--admin-token", "tok", "--store-truncated",
        ]  # fmt: skip
        proxy = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE)
        try:
            client = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
            deadline = time.monotonic() + 30
            while True:  # the proxy's own readiness: its health endpoint answers
                try:
                    with urllib.request.urlopen(f"{url}/healthz", timeout=1) as health:
                        assert json.loads(health.read())["status"] == "ok"
                    break
                except OSError:
                    assert proxy.poll() is None and time.monotonic() < deadline, "the proxy did not start"
                    time.sleep(0.05)
            for _ in range(3):
                answer = client.chat.completions.create(
                    model="test-model", messages=[{"role": "user", "content": "q"}]
                )
                assert answer.choices[0].message.content == "Answer to: q"
            assert fake.calls("q") == 1
            for _ in range(2):  # --store-truncated: a cut answer is stored too
                cut = client.chat.completions.create(
                    model="test-model", messages=[{"role": "user", "content": "cut"}], max_tokens=1
                )
                assert cut.choices[0].finish_reason == "length"
            assert fake.calls("cut") == 1
            stats = [sys.executable, "-m", "aiollmcache", "stats", "--url", url, "--admin-token", "tok"]
            table = subprocess.run(stats, capture_output=True, text=True, check=True).stdout
            assert re.search(r"hits, memory\s+3\b", table) and re.search(r"model calls\s+2\b", table)
            assert re.search(r"stored\s+2\b", table)
            raw = subprocess.run([*stats, "--json"], capture_output=True, text=True, check=True).stdout
            assert json.loads(raw)["hits_memory"] == 3
            refused = subprocess.run(stats[:-2], capture_output=True, text=True)
            assert refused.returncode == 1 and "401" in refused.stderr
            client.close()
        finally:
            proxy.terminate()
            proxy.wait(10)
            assert proxy.stderr is not None
            proxy.stderr.close()


def test_bench_runs_a_benchmark_and_passes_its_options(
    tmp_path: Any, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "hits.json"
    assert main(["bench", "hits", "--", "--iterations", "100", "--json", str(out)]) == 0
    assert "memory hit" in capfd.readouterr().out
    assert out.exists()
    assert main(["bench", "hits", "--", "--no-such-option"]) != 0


def test_serve_refuses_a_bad_policy(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    assert main(["serve", "--samples", "99"]) == 2
    assert "CachePolicy.samples" in capsys.readouterr().err
