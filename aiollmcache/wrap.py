"""A drop-in for ``AsyncOpenAI`` whose chat completions and responses go through the cache."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .client import CacheControl
from .errors import InvalidRequestError
from .request import ChatRequest, build_chat_request
from .upstream import OpenAIUpstream

if TYPE_CHECKING:
    from openai import AsyncOpenAI

    from .client import LLMCache

__all__ = ["CachedOpenAI"]


class _Create:
    """``create`` through the cache, for one endpoint of the client; every
    other attribute is the client's own."""

    __slots__ = ("_cache", "_client", "_upstream")

    def __init__(self, cache: LLMCache, client: AsyncOpenAI) -> None:
        self._cache = cache
        self._client = client
        self._upstream = OpenAIUpstream(client)

    def _request(self, params: dict[str, Any]) -> ChatRequest:
        raise NotImplementedError

    def _endpoint(self) -> Any:
        raise NotImplementedError

    async def create(self, *, cache: CacheControl | None = None, **kwargs: Any) -> Any:
        if cache is not None and not isinstance(cache, CacheControl):
            raise InvalidRequestError(f"cache: expected a CacheControl, got {type(cache).__name__}")
        streaming = bool(kwargs.pop("stream", False))
        request = self._request(kwargs)
        if streaming:
            return self._cache._stream(request, cache, self._upstream)
        result = await self._cache._complete_timed(request, cache, self._upstream)
        return result.response

    def __getattr__(self, name: str) -> Any:
        return getattr(self._endpoint(), name)


class _Completions(_Create):
    """``chat.completions.create`` through the cache.

    Takes the SDK's parameters, plus ``cache=CacheControl(...)``. Returns the
    ``ChatCompletion``; with ``stream=True``, a
    :class:`~aiollmcache.streaming.CachedStream` of ``ChatCompletionChunk``
    that iterates and closes as the SDK's ``AsyncStream`` does.
    """

    __slots__ = ()

    def _request(self, params: dict[str, Any]) -> ChatRequest:
        messages = params.pop("messages", None)
        return build_chat_request(
            messages, params, default_model=self._cache.model, upstream_scope=self._upstream.scope
        )

    def _endpoint(self) -> Any:
        return self._client.chat.completions


class _Chat:
    __slots__ = ("_client", "completions")

    def __init__(self, cache: LLMCache, client: AsyncOpenAI) -> None:
        self._client = client
        self.completions = _Completions(cache, client)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client.chat, name)


class _Responses(_Create):
    """``responses.create`` through the cache.

    Takes the SDK's parameters, plus ``cache=CacheControl(...)``. Returns the
    ``Response``; with ``stream=True``, a
    :class:`~aiollmcache.streaming.CachedStream` of the SDK's typed
    ``ResponseStreamEvent`` objects.
    """

    __slots__ = ()

    def _request(self, params: dict[str, Any]) -> ChatRequest:
        return self._cache._response_request(params, None, self._upstream)

    def _endpoint(self) -> Any:
        return self._client.responses


class CachedOpenAI:
    """Behaves as the wrapped ``AsyncOpenAI`` client; only
    ``chat.completions.create`` and ``responses.create`` (streaming or not)
    are answered through the cache. Everything else is the wrapped client's
    own attribute.

    Cache misses are sent through the wrapped client, with its own base URL,
    timeout and retry settings. The wrapped client is not closed by the cache.
    """

    __slots__ = ("_client", "chat", "responses")

    def __init__(self, cache: LLMCache, client: AsyncOpenAI) -> None:
        self._client = client
        self.chat = _Chat(cache, client)
        self.responses = _Responses(cache, client)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)
