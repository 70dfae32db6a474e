"""Entries written by one OS process are served to another through Redis."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from aiollmcache import LLMCache
from aiollmcache.testing import FakeOpenAI, RedisServer

from .conftest import user

pytestmark = pytest.mark.asyncio

ROOT = Path(__file__).resolve().parent.parent


async def run_worker(redis_server: RedisServer, fake: FakeOpenAI, namespace: str, prompt: str) -> Any:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.worker",
        redis_server.url,
        fake.base_url,
        namespace,
        prompt,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return orjson.loads(out)


async def test_another_process_hits_what_this_one_stored(
    cache: LLMCache, fake: FakeOpenAI, redis_server: RedisServer, namespace: str
) -> None:
    mine = await cache.complete(user("across processes"))
    theirs = await run_worker(redis_server, fake, namespace, "across processes")
    assert theirs == {"source": "redis", "text": mine.text, "key": mine.key, "id": mine.response.id}
    assert fake.calls("across processes") == 1


async def test_this_process_hits_what_another_stored(
    cache: LLMCache, fake: FakeOpenAI, redis_server: RedisServer, namespace: str
) -> None:
    theirs = await run_worker(redis_server, fake, namespace, "from a worker")
    assert theirs["source"] == "upstream"
    mine = await cache.complete(user("from a worker"))
    assert mine.source == "redis" and mine.response.id == theirs["id"]
    assert fake.calls("from a worker") == 1
