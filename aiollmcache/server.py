"""An OpenAI-compatible caching proxy: point any OpenAI client's ``base_url``
at it (``aiollmcache serve``; needs the ``server`` extra).

Routes:

- ``POST /v1/chat/completions``: through the cache, whole or ``stream: true``
  (server-sent events, as OpenAI sends them). Response headers
  ``x-aiollmcache`` (``hit-memory``, ``hit-redis``, ``hit-semantic``,
  ``coalesced``, ``stale``, ``miss``) and ``x-aiollmcache-key``. Request
  headers: ``Cache-Control: no-cache | no-store | max-age=N``,
  ``x-aiollmcache-ttl: N``, ``x-aiollmcache-tags: a,b``,
  ``x-aiollmcache-namespace: ns`` (when the app was given ``namespaces``).
- ``POST /v1/responses``: the Responses API through the cache, whole or
  ``stream: true`` (named server-sent events, as OpenAI sends them); the same
  headers.
- ``GET /v1/models``: passed through to the upstream.
- ``GET /metrics``: Prometheus text (``prometheus_client``, the ``metrics``
  extra).
- ``GET /cache/stats``, ``POST /cache/invalidate``: admin, behind
  ``Authorization: Bearer <admin token>`` when one is set.
- ``GET /healthz``.

Errors have OpenAI's shape, ``{"error": {"message", "type", "param",
"code"}}``, with the upstream's status for the upstream's errors.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import openai
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from .client import CacheControl, CacheResult, LLMCache, Source
from .errors import AiollmcacheError, ConfigurationError, InvalidRequestError, RemoteUpstreamError
from .invalidation import Pattern
from .upstream import OpenAIUpstream

if TYPE_CHECKING:
    from openai import AsyncOpenAI

__all__ = ["create_app"]

_JSON = "application/json"


def _error(
    status: int, message: str, kind: str = "invalid_request_error", code: str | None = None
) -> Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return Response(orjson.dumps(body), status_code=status, media_type=_JSON)


def _outcome(result: CacheResult) -> str:
    if result.stale:
        return "stale"
    if result.coalesced:
        return "coalesced"
    if result.source is Source.UPSTREAM:
        return "miss"
    return f"hit-{result.source.value}"


def _control(request: Request) -> CacheControl | None:
    """The cache settings a request's headers ask for; InvalidRequestError if bad."""
    fields: dict[str, Any] = {}
    for directive in request.headers.get("cache-control", "").split(","):
        name, _, value = directive.strip().partition("=")
        name = name.lower()
        if name == "no-cache":
            fields["no_cache"] = True
        elif name == "no-store":
            fields["no_store"] = True
        elif name == "max-age":
            try:
                fields["max_age"] = float(value)
            except ValueError:
                raise InvalidRequestError(f"Cache-Control: max-age={value!r} is not a number") from None
    ttl = request.headers.get("x-aiollmcache-ttl")
    if ttl is not None:
        try:
            fields["ttl"] = float(ttl)
        except ValueError:
            raise InvalidRequestError(f"x-aiollmcache-ttl: {ttl!r} is not a number") from None
    tags = request.headers.get("x-aiollmcache-tags")
    if tags:
        fields["tags"] = [t.strip() for t in tags.split(",") if t.strip()]
    return CacheControl(**fields) if fields else None


def create_app(
    cache: LLMCache,
    client: AsyncOpenAI,
    *,
    admin_token: str | None = None,
    max_body_bytes: int = 4 * 2**20,
    pass_api_key: bool = False,
    namespaces: Callable[[str], Awaitable[LLMCache]] | None = None,
) -> Starlette:
    """The proxy's ASGI app, answering through ``cache`` and asking ``client``
    on a miss. With ``pass_api_key``, a request's own ``Authorization``
    bearer key is used for its upstream call (else the client's key). With
    ``namespaces`` (namespace -> its cache), a request naming a namespace
    (header ``x-aiollmcache-namespace``, or ``?namespace=`` on the admin
    routes) is answered by that namespace's cache."""
    if admin_token is not None and not admin_token.strip():
        raise ConfigurationError("admin_token: empty; pass None to leave the admin routes open")
    upstream = OpenAIUpstream(client)

    async def cache_of(request: Request, *, query: bool = False) -> LLMCache:
        name = request.headers.get("x-aiollmcache-namespace")
        if not name and query:  # the admin routes also take ?namespace=
            name = request.query_params.get("namespace")
        if not name or name == cache.namespace:
            return cache
        if namespaces is None:
            raise InvalidRequestError(f"namespace {name!r}: this proxy serves only {cache.namespace!r}")
        return await namespaces(name)

    def upstream_for(request: Request) -> OpenAIUpstream:
        if pass_api_key:
            auth = request.headers.get("authorization", "")
            if auth.lower().startswith("bearer ") and auth[7:].strip():
                own = OpenAIUpstream(client.with_options(api_key=auth[7:].strip()))
                own.scope = upstream.scope
                return own
        return upstream

    def admin(request: Request) -> Response | None:
        if admin_token is None:
            return None
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), admin_token.encode()):
            return _error(
                401, "admin endpoints need Authorization: Bearer <admin token>", "authentication_error"
            )
        return None

    async def body_of(request: Request) -> dict[str, Any] | Response:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            return _error(413, f"request body larger than {max_body_bytes} bytes")
        raw = bytearray()
        async for part in request.stream():
            raw += part
            if len(raw) > max_body_bytes:
                return _error(413, f"request body larger than {max_body_bytes} bytes")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return _error(400, "request body is not valid JSON")
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object")
        return body

    async def chat(request: Request) -> Response:
        body = await body_of(request)
        if isinstance(body, Response):
            return body
        if "messages" not in body:
            return _error(400, "missing required parameter: 'messages'")
        return await answer(request, body, responses=False)

    async def responses(request: Request) -> Response:
        body = await body_of(request)
        if isinstance(body, Response):
            return body
        return await answer(request, body, responses=True)

    async def answer(request: Request, body: dict[str, Any], *, responses: bool) -> Response:
        messages = None if responses else body.pop("messages")
        streaming = bool(body.pop("stream", False))
        try:
            control = _control(request)
            target = await cache_of(request)
            if responses:
                keyed = target._response_request(body, control, upstream)
            else:
                keyed = target._request(messages, body, upstream)
            if streaming:
                return await _stream(target._stream(keyed, control, upstream_for(request)), responses)
            result = await target._complete_timed(keyed, control, upstream_for(request))
        except (InvalidRequestError, ConfigurationError) as exc:
            return _error(400, str(exc))
        except openai.APIStatusError as exc:
            return _upstream_error(exc)
        except openai.APIError as exc:
            return _error(502, f"upstream: {exc}", "api_error")
        except RemoteUpstreamError as exc:  # the model call another process made failed
            status = exc.status_code if exc.status_code and 400 <= exc.status_code <= 599 else 502
            return _error(status, f"upstream: {exc.message}", "api_error", exc.error_type)
        except AiollmcacheError as exc:
            return _error(503, str(exc), "api_error")
        headers = {"x-aiollmcache": _outcome(result), "x-aiollmcache-key": result.key}
        return Response(result.json, media_type=_JSON, headers=headers)

    async def models(request: Request) -> Response:
        try:
            raw = await client.models.with_raw_response.list()
        except openai.APIStatusError as exc:
            return _upstream_error(exc)
        except openai.APIError as exc:
            return _error(502, f"upstream: {exc}", "api_error")
        return Response(raw.content, media_type=_JSON)

    async def stats(request: Request) -> Response:
        refused = admin(request)
        if refused is not None:
            return refused
        try:
            target = await cache_of(request, query=True)
        except (InvalidRequestError, ConfigurationError) as exc:
            return _error(400, str(exc))
        return Response(orjson.dumps(target.stats()), media_type=_JSON)

    async def invalidate(request: Request) -> Response:
        refused = admin(request)
        if refused is not None:
            return refused
        body = await body_of(request)
        if isinstance(body, Response):
            return body
        try:
            pattern = body.get("pattern")
            if pattern is not None:
                if not isinstance(pattern, Mapping):
                    raise InvalidRequestError("pattern: expected an object")
                pattern = Pattern(**pattern)
            target = await cache_of(request, query=True)
            deleted = await target.invalidate(
                key=body.get("key"),
                tag=body.get("tag"),
                pattern=pattern,
                everything=bool(body.get("everything", False)),
            )
        except (InvalidRequestError, ConfigurationError, TypeError) as exc:
            return _error(400, str(exc))
        return Response(orjson.dumps({"deleted": deleted}), media_type=_JSON)

    async def metrics(request: Request) -> Response:
        from .metrics import exposition

        text, content_type = exposition(cache)
        return Response(text, media_type=content_type)

    async def healthz(request: Request) -> Response:
        snapshot = cache.stats()
        state = {"status": "ok", "redis_breaker_open": bool(snapshot.get("redis_breaker_open", 0))}
        return Response(orjson.dumps(state), media_type=_JSON)

    async def _stream(stream: Any, responses: bool) -> Response:
        # Open it before answering, so that an error before the first chunk
        # (a bad request, the upstream refusing) is a proper error response.
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            first = None
        if stream.coalesced:
            outcome = "coalesced"
        elif stream.source is Source.UPSTREAM:
            outcome = "miss"
        else:
            outcome = f"hit-{stream.source.value}"
        headers = {"x-aiollmcache": outcome, "x-aiollmcache-key": stream.key}

        def sse(chunk: Any) -> bytes:
            body: str = chunk.model_dump_json(exclude_unset=True)
            data = b"data: " + body.encode() + b"\n\n"
            # Responses events are named, as the API names them; chat chunks are not.
            if not responses:
                return data
            name: str = chunk.type
            return b"event: " + name.encode() + b"\n" + data

        async def events() -> AsyncIterator[bytes]:
            try:
                if first is not None:
                    yield sse(first)
                    async for chunk in stream:
                        yield sse(chunk)
                if not responses:
                    yield b"data: [DONE]\n\n"
            except Exception as exc:  # after the headers: tell the client in the stream
                error = {"message": str(exc), "type": "api_error", "param": None, "code": None}
                yield b"data: " + orjson.dumps({"error": error}) + b"\n\n"
            finally:
                await stream.close()

        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/responses", responses, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/cache/stats", stats, methods=["GET"]),
            Route("/cache/invalidate", invalidate, methods=["POST"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
        ]
    )


def _upstream_error(exc: openai.APIStatusError) -> Response:
    body = exc.body if isinstance(exc.body, dict) else None
    if body is not None and "error" not in body and "message" in body:
        body = {"error": body}
    if body is None:
        body = {"error": {"message": str(exc), "type": "api_error", "param": None, "code": None}}
    headers = {}
    retry_after = exc.response.headers.get("retry-after")
    if retry_after is not None:
        headers["retry-after"] = retry_after
    return Response(orjson.dumps(body), status_code=exc.status_code, media_type=_JSON, headers=headers)
