from __future__ import annotations

import openai
import pytest
from openai.types.chat import ChatCompletion

from aiollmcache import CacheControl, LLMCache
from aiollmcache.testing import FakeOpenAI

from .conftest import MODEL, user

pytestmark = pytest.mark.asyncio


async def test_wrapped_create_is_cached(cache: LLMCache, fake: FakeOpenAI) -> None:
    client = fake.client()
    try:
        wrapped = cache.wrap(client)
        a = await wrapped.chat.completions.create(model=MODEL, messages=user("wrapped"), temperature=0)
        b = await wrapped.chat.completions.create(messages=user("wrapped"), temperature=0.0, model=MODEL)
        assert isinstance(a, ChatCompletion) and a == b
        assert fake.calls("wrapped") == 1
        # the same request through complete() shares the entry
        assert (await cache.complete(user("wrapped"), temperature=0)).source == "memory"
    finally:
        await client.close()


async def test_wrapped_create_uses_the_caches_default_model(cache: LLMCache, fake: FakeOpenAI) -> None:
    client = fake.client()
    try:
        result = await cache.wrap(client).chat.completions.create(messages=user("default model"))
        assert result.model == MODEL
    finally:
        await client.close()


async def test_wrapped_create_takes_cache_control(cache: LLMCache, fake: FakeOpenAI) -> None:
    client = fake.client()
    try:
        wrapped = cache.wrap(client)
        await wrapped.chat.completions.create(model=MODEL, messages=user("cc"))
        await wrapped.chat.completions.create(
            model=MODEL, messages=user("cc"), cache=CacheControl(no_cache=True)
        )
        assert fake.calls("cc") == 2
    finally:
        await client.close()


async def test_wrapped_client_misses_go_through_the_wrapped_client(fake: FakeOpenAI) -> None:
    client = fake.client()
    try:
        async with LLMCache() as c:  # no upstream of its own
            result = await c.wrap(client).chat.completions.create(model=MODEL, messages=user("via wrap"))
            assert result.choices[0].message.content == "Answer to: via wrap"
    finally:
        await client.close()


async def test_wrapped_errors_are_the_sdks(cache: LLMCache, fake: FakeOpenAI) -> None:
    client = fake.client()
    try:
        fake.fail(400, prompt="bad")
        with pytest.raises(openai.BadRequestError):
            await cache.wrap(client).chat.completions.create(model=MODEL, messages=user("bad"))
    finally:
        await client.close()


async def test_everything_else_is_the_wrapped_clients(cache: LLMCache, fake: FakeOpenAI) -> None:
    client = fake.client()
    try:
        wrapped = cache.wrap(client)
        models = await wrapped.models.list()
        assert [m.id for m in models.data] == ["fake-model"]
        assert wrapped.base_url == client.base_url
        assert wrapped.chat.completions.with_raw_response is not None
        stream = await wrapped.chat.completions.create(model=MODEL, messages=user("s"), stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == "Answer to: s"
    finally:
        await client.close()
