"""Where answers come from on a miss.

An upstream is any async callable taking the request parameters (``model``,
``messages`` and the rest, exactly as ``chat.completions.create`` takes them)
and returning the chat completion as JSON bytes or as a mapping. An upstream
that can stream also has a ``stream(params)`` method: an async iterator of
chunk mappings (``chat.completion.chunk`` objects); one without is answered
whole by ``cache.stream()``, and the answer replayed as chunks. Its
exceptions reach callers unchanged and are never cached. An upstream may
have a ``scope`` attribute (a string naming the provider, e.g. its base URL):
it becomes part of every cache key, so two providers never share answers.

For the Responses API an upstream also has ``responses(params)`` (the
``Response`` as JSON bytes or a mapping) and, to stream,
``stream_responses(params)`` (an async iterator of event mappings).
:class:`OpenAIUpstream` has both.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import orjson
from openai.types.chat import ChatCompletion
from pydantic import ValidationError

from .errors import InvalidResponseError

if TYPE_CHECKING:
    from openai import AsyncOpenAI

__all__ = ["OpenAIUpstream", "Upstream", "parse_response", "upstream_scope"]

Upstream = Callable[[dict[str, Any]], Awaitable["bytes | Mapping[str, Any]"]]


class OpenAIUpstream:
    """Calls ``client.chat.completions.create`` and returns the body as received.

    The raw body is kept (rather than the SDK's parsed object) so what is
    stored is exactly what the provider sent. The client's own timeout and
    retry settings apply unchanged.
    """

    __slots__ = ("client", "scope")

    def __init__(self, client: AsyncOpenAI) -> None:
        self.client = client
        # Part of the cache key: the same model name at two providers is two models.
        self.scope = str(client.base_url).rstrip("/")

    async def __call__(self, params: dict[str, Any]) -> bytes:
        raw = await self.client.chat.completions.with_raw_response.create(**params)
        body: bytes = raw.content
        return body

    async def responses(self, params: dict[str, Any]) -> bytes:
        """``client.responses.create``, the body as received."""
        raw = await self.client.responses.with_raw_response.create(**params)
        body: bytes = raw.content
        return body

    async def stream_responses(self, params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The events of ``client.responses.create(..., stream=True)``."""
        response = await self.client.responses.create(**{**params, "stream": True})
        try:
            async for event in response:
                yield event.model_dump(mode="json", exclude_unset=True)
        finally:
            await response.close()

    async def stream(self, params: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The chunks of ``create(..., stream=True)``, as the provider sent them
        (the SDK parses the events and raises the API's errors)."""
        response = await self.client.chat.completions.create(**{**params, "stream": True})
        try:
            async for chunk in response:
                yield chunk.model_dump(mode="json", exclude_unset=True)
        finally:
            await response.close()


def upstream_scope(upstream: object) -> str | None:
    scope = getattr(upstream, "scope", None)
    return scope if isinstance(scope, str) and scope else None


def parse_response(body: bytes | Mapping[str, Any]) -> tuple[bytes, ChatCompletion]:
    """Return the JSON bytes and the validated completion, or raise InvalidResponseError."""
    try:
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        response = ChatCompletion.model_validate_json(raw)
    except (TypeError, ValidationError) as exc:
        raise InvalidResponseError(
            f"upstream returned something that is not a chat completion: {exc}"
        ) from exc
    return raw, response
