"""The caching proxy, driven by the real openai SDK over HTTP."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx2 as httpx
import openai
import pytest
import pytest_asyncio
import uvicorn
from openai import AsyncOpenAI
from prometheus_client.parser import text_string_to_metric_families

from aiollmcache import LLMCache
from aiollmcache.server import create_app
from aiollmcache.testing import FakeOpenAI

from .conftest import MODEL, user

pytestmark = pytest.mark.asyncio

ADMIN = "s3cret-admin"


class Proxy:
    def __init__(self, url: str, cache: LLMCache) -> None:
        self.url = url
        self.cache = cache

    def client(self, **kwargs: Any) -> AsyncOpenAI:
        return AsyncOpenAI(base_url=f"{self.url}/v1", api_key="client-key", max_retries=0, **kwargs)


@pytest_asyncio.fixture
async def start_proxy(
    make_cache: Callable[..., LLMCache], openai_client: AsyncOpenAI
) -> AsyncIterator[Callable[..., Any]]:
    servers: list[tuple[uvicorn.Server, asyncio.Task[None]]] = []

    async def start(**options: Any) -> Proxy:
        cache = make_cache()
        app = create_app(cache, openai_client, admin_token=ADMIN, **options)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        started = asyncio.Event()

        class Server(uvicorn.Server):
            async def startup(self, sockets: list[socket.socket] | None = None) -> None:
                await super().startup(sockets)
                started.set()

        server = Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        task = asyncio.create_task(server.serve(sockets=[sock]))
        await started.wait()
        servers.append((server, task))
        return Proxy(f"http://127.0.0.1:{port}", cache)

    yield start
    for server, task in servers:
        server.should_exit = True
        await task


async def test_answers_match_direct_calls_and_repeat_from_the_cache(
    start_proxy: Callable[..., Any], fake: FakeOpenAI, openai_client: AsyncOpenAI
) -> None:
    proxy = await start_proxy()
    client = proxy.client()
    try:
        direct = await openai_client.chat.completions.create(model=MODEL, messages=user("q1"))  # type: ignore[arg-type]
        raw = await client.chat.completions.with_raw_response.create(model=MODEL, messages=user("q1"))  # type: ignore[arg-type]
        first = raw.parse()
        assert raw.headers["x-aiollmcache"] == "miss"
        assert first.choices[0].message.content == direct.choices[0].message.content
        assert first.model == direct.model and first.usage == direct.usage
        again = await client.chat.completions.with_raw_response.create(model=MODEL, messages=user("q1"))  # type: ignore[arg-type]
        assert again.headers["x-aiollmcache"] == "hit-memory"
        assert again.headers["x-aiollmcache-key"] == raw.headers["x-aiollmcache-key"]
        assert again.parse().model_dump() == first.model_dump()
        assert fake.calls("q1") == 2  # once direct, once through the proxy
        models = await client.models.list()
        assert [m.id for m in models.data] == ["fake-model"]
    finally:
        await client.close()


async def test_streams_through_the_proxy(start_proxy: Callable[..., Any], fake: FakeOpenAI) -> None:
    proxy = await start_proxy()
    client = proxy.client()
    try:
        for expected in ("miss", "hit-memory"):
            async with client.chat.completions.with_streaming_response.create(
                model=MODEL,
                messages=user("stream me"),
                stream=True,  # type: ignore[arg-type]
            ) as response:
                assert response.headers["x-aiollmcache"] == expected
                lines = [line async for line in response.iter_lines() if line]
                assert lines[-1] == "data: [DONE]"
            stream = await client.chat.completions.create(
                model=MODEL, messages=user("stream me"), stream=True
            )  # type: ignore[arg-type]
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            assert text == "Answer to: stream me"
        assert fake.calls("stream me") == 1  # the second and later streams are replays
    finally:
        await client.close()


async def test_the_responses_api_through_the_proxy(start_proxy: Callable[..., Any], fake: FakeOpenAI) -> None:
    proxy = await start_proxy()
    client = proxy.client()
    try:
        for expected in ("miss", "hit-memory"):
            raw = await client.responses.with_raw_response.create(model=MODEL, input="proxied response")
            assert raw.headers["x-aiollmcache"] == expected
            assert raw.parse().output_text == "Answer to: proxied response"
        for expected in ("miss", "hit-memory"):
            async with client.responses.with_streaming_response.create(
                model=MODEL, input="proxied stream", stream=True
            ) as response:
                assert response.headers["x-aiollmcache"] == expected
                lines = [line async for line in response.iter_lines() if line]
                assert lines[0] == "event: response.created" and lines[-2] == "event: response.completed"
            stream = await client.responses.create(model=MODEL, input="proxied stream", stream=True)
            events = [event async for event in stream]
            assert events[-1].type == "response.completed"
            assert events[-1].response.output_text == "Answer to: proxied stream"  # type: ignore[union-attr]
        assert fake.calls("proxied response") == 1 and fake.calls("proxied stream") == 1
        stateful = await client.responses.with_raw_response.create(
            model=MODEL, input="proxied response", previous_response_id="resp_x"
        )
        assert stateful.headers["x-aiollmcache"] == "miss"
    finally:
        await client.close()


async def test_request_headers_control_the_cache(start_proxy: Callable[..., Any], fake: FakeOpenAI) -> None:
    proxy = await start_proxy()
    async with httpx.AsyncClient(base_url=proxy.url) as http:
        body = {"model": MODEL, "messages": user("h")}
        assert (await http.post("/v1/chat/completions", json=body)).headers["x-aiollmcache"] == "miss"
        forced = await http.post("/v1/chat/completions", json=body, headers={"cache-control": "no-cache"})
        assert forced.headers["x-aiollmcache"] == "miss"
        private = {"model": MODEL, "messages": user("private")}
        await http.post("/v1/chat/completions", json=private, headers={"cache-control": "no-store"})
        again = await http.post("/v1/chat/completions", json=private)
        assert again.headers["x-aiollmcache"] == "miss"  # the no-store answer was not kept
        tagged = {"model": MODEL, "messages": user("tagged")}
        await http.post("/v1/chat/completions", json=tagged, headers={"x-aiollmcache-tags": "faq, docs"})
        refused = await http.post("/cache/invalidate", json={"tag": "faq"})
        assert refused.status_code == 401
        assert refused.json()["error"]["type"] == "authentication_error"
        done = await http.post(
            "/cache/invalidate", json={"tag": "faq"}, headers={"authorization": f"Bearer {ADMIN}"}
        )
        assert done.status_code == 200 and done.json()["deleted"] == 1
        after = await http.post("/v1/chat/completions", json=tagged)
        assert after.headers["x-aiollmcache"] == "miss"
        bad = await http.post("/v1/chat/completions", json=body, headers={"cache-control": "max-age=soon"})
        assert bad.status_code == 400 and "max-age" in bad.json()["error"]["message"]
    assert fake.calls("h") == 2


@pytest.mark.parametrize(
    ("content", "status", "needle"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b'{"model": "m"}', 400, "messages"),
        (b'{"model": "m", "messages": []}', 400, "messages"),
        (b'{"model": "m", "messages": [{"role": "wizard", "content": "x"}]}', 400, "role"),
        (b'{"messages": [{"role": "user", "content": "' + b"x" * 5000 + b'"}]}', 413, "larger than"),
    ],
)
async def test_bad_requests_get_openai_shaped_errors(
    start_proxy: Callable[..., Any], fake: FakeOpenAI, content: bytes, status: int, needle: str
) -> None:
    proxy = await start_proxy(max_body_bytes=4096)
    async with httpx.AsyncClient(base_url=proxy.url) as http:
        response = await http.post(
            "/v1/chat/completions", content=content, headers={"content-type": "application/json"}
        )
    assert response.status_code == status
    error = response.json()["error"]
    assert needle in error["message"] and {"message", "type", "param", "code"} <= set(error)
    assert fake.calls() == 0


async def test_upstream_errors_keep_their_status(start_proxy: Callable[..., Any], fake: FakeOpenAI) -> None:
    proxy = await start_proxy()
    fake.fail(429, prompt="limited", message="slow down")
    client = proxy.client()
    try:
        with pytest.raises(openai.RateLimitError, match="slow down"):
            await client.chat.completions.create(model=MODEL, messages=user("limited"))  # type: ignore[arg-type]
    finally:
        await client.close()


async def test_admin_stats_metrics_and_health(start_proxy: Callable[..., Any], fake: FakeOpenAI) -> None:
    proxy = await start_proxy()
    async with httpx.AsyncClient(base_url=proxy.url) as http:
        for _ in range(3):
            await http.post("/v1/chat/completions", json={"model": MODEL, "messages": user("m")})
        assert (await http.get("/cache/stats")).status_code == 401
        stats = (await http.get("/cache/stats", headers={"authorization": f"Bearer {ADMIN}"})).json()
        assert stats["hits_memory"] == 2 and stats["upstream_calls"] == 1
        assert stats["latency"]["memory"]["count"] == 2
        metrics = await http.get("/metrics")
        assert metrics.status_code == 200
        families = {f.name: f for f in text_string_to_metric_families(metrics.text)}
        hits = {
            s.labels["source"]: s.value
            for s in families["aiollmcache_hits"].samples
            if s.name.endswith("_total")
        }
        assert hits["memory"] == 2
        durations = [
            s for s in families["aiollmcache_request_duration_seconds"].samples if s.name.endswith("_count")
        ]
        assert {s.labels["source"]: s.value for s in durations}["memory"] == 2
        health = await http.get("/healthz")
        assert health.json()["status"] == "ok"


async def test_a_request_can_name_another_namespace(
    start_proxy: Callable[..., Any], fake: FakeOpenAI, make_cache: Callable[..., LLMCache]
) -> None:
    others: dict[str, LLMCache] = {}

    async def namespaces(name: str) -> LLMCache:
        if name not in others:
            others[name] = make_cache(namespace=name)
        return others[name]

    proxy = await start_proxy(namespaces=namespaces)
    body = {"model": MODEL, "messages": user("ns")}
    async with httpx.AsyncClient(base_url=proxy.url) as http:
        assert (await http.post("/v1/chat/completions", json=body)).headers["x-aiollmcache"] == "miss"
        tenant = {"x-aiollmcache-namespace": "tenant-b"}
        first = await http.post("/v1/chat/completions", json=body, headers=tenant)
        assert first.headers["x-aiollmcache"] == "miss"  # namespaces never share answers
        again = await http.post("/v1/chat/completions", json=body, headers=tenant)
        assert again.headers["x-aiollmcache"] == "hit-memory"
        admin = {"authorization": f"Bearer {ADMIN}"}
        stats = (await http.get("/cache/stats?namespace=tenant-b", headers=admin)).json()
        assert stats["hits_memory"] == 1 and stats["upstream_calls"] == 1
        bad = await http.post("/v1/chat/completions", json=body, headers={"x-aiollmcache-namespace": "a b"})
        assert bad.status_code == 400
    assert fake.calls("ns") == 2


async def test_without_other_namespaces_naming_one_is_refused(
    start_proxy: Callable[..., Any], fake: FakeOpenAI
) -> None:
    proxy = await start_proxy()
    async with httpx.AsyncClient(base_url=proxy.url) as http:
        response = await http.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": user("x")},
            headers={"x-aiollmcache-namespace": "elsewhere"},
        )
    assert response.status_code == 400 and "serves only" in response.json()["error"]["message"]
    assert fake.calls() == 0


async def test_an_empty_admin_token_is_refused(
    openai_client: AsyncOpenAI, make_cache: Callable[..., LLMCache]
) -> None:
    from aiollmcache import ConfigurationError

    with pytest.raises(ConfigurationError, match="admin_token"):
        create_app(make_cache(), openai_client, admin_token=" ")


async def test_an_upstream_error_met_by_another_process_keeps_its_status(
    start_proxy: Callable[..., Any], fake: FakeOpenAI, make_cache: Callable[..., LLMCache]
) -> None:
    proxy = await start_proxy()
    fake.latency = 0.3
    fake.fail(429, prompt="busy", message="slow down")
    elsewhere = make_cache()  # another cache on the same Redis: it takes the lease first
    leading = asyncio.create_task(elsewhere.complete(user("busy")))
    await asyncio.to_thread(fake.wait_for_calls, 1, prompt="busy")
    async with httpx.AsyncClient(base_url=proxy.url) as http:
        response = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": user("busy")})
    assert response.status_code == 429
    assert "slow down" in response.json()["error"]["message"]
    with pytest.raises(openai.RateLimitError):
        await leading
    assert fake.calls("busy") == 1
