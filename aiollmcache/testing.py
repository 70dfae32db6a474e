"""Real servers for tests: an OpenAI-compatible fake model and a private Redis.

:class:`FakeOpenAI` is an HTTP server on loopback that speaks enough of the
OpenAI API for the real ``openai`` SDK (any transport) to talk to it: chat
completions (plain and SSE streaming, ending with ``data: [DONE]``, with a
usage chunk when ``stream_options.include_usage`` is set) and embeddings
(float and base64). It counts calls per prompt, can be slowed down, and can
be told to fail or hang. It runs on its own thread and event loop, so it
works from sync and async tests alike::

    with FakeOpenAI(latency=0.2) as fake:
        client = fake.client()                # an AsyncOpenAI pointed at it
        ...
        assert fake.calls("What is Python?") == 1

:class:`RedisServer` starts a throwaway ``redis-server`` on a free loopback
port (nothing saved to disk) and stops it on exit; :class:`RedisClusterServer`
starts a Redis Cluster of such servers (primaries, and replicas if asked) with
``redis-cli --cluster create``. Both have ``url`` (the cluster's carries the
``cluster=yes`` option :class:`~aiollmcache.LLMCache` understands) and
``client()``, an admin client of the right kind.

Requires the ``server`` extra (starlette, uvicorn).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

try:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "aiollmcache.testing needs the 'server' extra: pip install 'aiollmcache[server]'"
    ) from exc

if TYPE_CHECKING:
    import redis.asyncio as aioredis
    from openai import AsyncOpenAI
    from redis.asyncio.cluster import RedisCluster

__all__ = ["FakeOpenAI", "RedisClusterServer", "RedisServer", "chat_completion", "last_user_text"]

Reply = Callable[[Mapping[str, Any]], str]


def last_user_text(request: Mapping[str, Any]) -> str:
    """The text of the last user message of a chat request, or of a Responses
    API request's ``input`` ('' if none)."""
    items = request.get("messages")
    if items is None:
        items = request.get("input")
        if isinstance(items, str):
            return items
    for message in reversed(items or []):
        if isinstance(message, Mapping) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(
                    str(p.get("text", ""))
                    for p in content
                    if isinstance(p, Mapping) and p.get("type") in ("text", "input_text")
                )
    return ""


def _default_reply(request: Mapping[str, Any]) -> str:
    return f"Answer to: {last_user_text(request)}"


def chat_completion(
    content: str,
    *,
    model: str,
    n: int = 1,
    completion_id: str = "chatcmpl-local",
    created: int = 0,
    usage: Mapping[str, int] | None = None,
    system_fingerprint: str | None = None,
    finish_reason: str = "stop",
    tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A chat completion as the API returns it (``n`` identical choices of
    ``content``, or of ``tool_calls`` when given, with ``finish_reason``): what
    :class:`FakeOpenAI` answers, and what an ``upstream=`` callable in a test
    can return."""
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if tool_calls:
        message = {"role": "assistant", "content": None, "refusal": None, "tool_calls": tool_calls}
    completion: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": i, "message": message, "finish_reason": finish_reason, "logprobs": None}
            for i in range(n)
        ],
    }
    if usage is not None:
        completion["usage"] = dict(usage)
    if system_fingerprint is not None:
        completion["system_fingerprint"] = system_fingerprint
    return completion


def _tokens(text: str) -> int:
    return max(1, len(text.split()))


_FUNCTION_WORDS = frozenset(
    """a an the is are was were be of to in on at for and or what what's whats which who how
    me tell please can could would you i my do does""".split()  # noqa: SIM905
)


@dataclass
class _Failure:
    status: int | None  # None: hang
    remaining: int
    prompt: str | None
    message: str
    cut_after: int | None = None


class FakeOpenAI:
    """An OpenAI-compatible server on 127.0.0.1 for tests, demos and benchmarks.

    - ``latency``: seconds before each answer (settable at any time).
    - ``reply``: ``request -> str`` giving the answer's content (default:
      ``"Answer to: <last user message>"``), padded with spaces up to
      ``answer_chars`` when that is set.
    - ``chunk_latency``: seconds between streamed chunks.
    - ``dimensions``: size of the embedding vectors. They are deterministic:
      a bag of the text's content words (lowercased, punctuation and common
      function words such as "what", "is", "the", "of", "me" dropped), so
      "What is the capital of France?" and "Tell me the capital of France"
      embed identically, and texts sharing more content words are more
      similar.
    - ``embeddings_status``: set to an HTTP error status (e.g. 503) to make
      every embeddings request fail with it; ``None`` (the default) answers.

    Answers that are not plain, as the API gives them:

    - ``max_tokens`` (or ``max_completion_tokens``) below the answer's length
      in words: the answer is cut to that many words, finish reason ``length``.
    - ``tools`` with ``tool_choice`` ``"required"`` or naming a function, the
      last message not being a tool's result: one call of the named (or first)
      tool with arguments ``{"query": <last user message>}``, finish reason
      ``tool_calls``.
    - :meth:`filter`: the next matching answers are cut by the "content
      filter": the first word only, finish reason ``content_filter``.
    """

    def __init__(
        self,
        *,
        latency: float = 0.0,
        reply: Reply | None = None,
        answer_chars: int = 0,
        chunk_latency: float = 0.0,
        dimensions: int = 64,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.latency = latency
        self.chunk_latency = chunk_latency
        self.answer_chars = answer_chars
        self.dimensions = dimensions
        self.embeddings_status: int | None = None
        self._reply = reply or _default_reply
        self._host = host
        self._port = port
        self._lock = threading.Lock()
        self._called = threading.Condition(self._lock)
        self._chat_calls: Counter[str] = Counter()
        self._embedding_calls = 0
        self._requests: list[dict[str, Any]] = []
        self._failures: list[_Failure] = []
        self._cuts: list[_Failure] = []
        self._filters: list[_Failure] = []
        self._ids = itertools.count(1)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self.url = ""

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> FakeOpenAI:
        if self._thread is not None:
            return self
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self._host, self._port))
        host, port = sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/responses", self._responses, methods=["POST"]),
                Route("/v1/embeddings", self._embeddings, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
            ]
        )
        config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
        ready = threading.Event()
        failed: list[BaseException] = []

        class _Server(uvicorn.Server):
            async def startup(self, sockets: list[socket.socket] | None = None) -> None:
                await super().startup(sockets)
                ready.set()

        self._server = server = _Server(config)

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._stopping = asyncio.Event()
            try:
                loop.run_until_complete(server.serve(sockets=[sock]))
            except BaseException as exc:  # reported to start()
                failed.append(exc)
            finally:
                ready.set()
                loop.close()
                sock.close()

        self._thread = threading.Thread(target=run, name="FakeOpenAI", daemon=True)
        self._thread.start()
        ready.wait()
        if failed or not server.started:
            self.stop()
            raise RuntimeError(f"FakeOpenAI failed to start: {failed[:1]}")
        return self

    def stop(self) -> None:
        thread, server, loop, stopping = self._thread, self._server, self._loop, self._stopping
        if thread is None or server is None:
            return
        server.should_exit = True
        if loop is not None and stopping is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(stopping.set)
        thread.join()
        self._thread = self._server = self._loop = self._stopping = None

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> FakeOpenAI:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.stop)

    # -- for tests -------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """The ``base_url`` to give an OpenAI client (ends in ``/v1``)."""
        return f"{self.url}/v1"

    def client(self, **kwargs: Any) -> AsyncOpenAI:
        """An ``AsyncOpenAI`` pointed at this server (``max_retries=0`` unless given)."""
        from openai import AsyncOpenAI

        kwargs.setdefault("api_key", "test-key")
        kwargs.setdefault("max_retries", 0)
        return AsyncOpenAI(base_url=self.base_url, **kwargs)

    def calls(self, prompt: str | None = None) -> int:
        """Chat completion calls received in all, or whose last user message is ``prompt``."""
        with self._lock:
            if prompt is None:
                return sum(self._chat_calls.values())
            return self._chat_calls[prompt]

    def wait_for_calls(self, n: int, *, prompt: str | None = None, timeout: float = 10.0) -> None:
        """Block until at least ``n`` chat calls (for ``prompt``, if given) have
        arrived; raise TimeoutError after ``timeout`` seconds. From async code:
        ``await asyncio.to_thread(fake.wait_for_calls, 1)``."""

        def arrived() -> bool:
            return (sum(self._chat_calls.values()) if prompt is None else self._chat_calls[prompt]) >= n

        with self._called:
            if not self._called.wait_for(arrived, timeout):
                raise TimeoutError(f"{n} call(s) did not arrive within {timeout}s")

    @property
    def embedding_calls(self) -> int:
        with self._lock:
            return self._embedding_calls

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Bodies of the chat requests received, oldest first."""
        with self._lock:
            return list(self._requests)

    def fail(
        self,
        status: int = 500,
        *,
        times: int = 1,
        prompt: str | None = None,
        message: str = "injected failure",
    ) -> None:
        """Answer the next ``times`` matching chat requests with HTTP ``status``."""
        if times < 1 or not 400 <= status <= 599:
            raise ValueError("fail: times must be >= 1 and status an HTTP error status (400-599)")
        with self._lock:
            self._failures.append(_Failure(status, times, prompt, message))

    def cut(self, *, after: int = 2, times: int = 1, prompt: str | None = None) -> None:
        """Break the next ``times`` matching streamed answers after ``after``
        content chunks: the connection is dropped, no finish reason is sent.
        (Whole answers are not affected.)"""
        if times < 1 or after < 0:
            raise ValueError("cut: times must be >= 1 and after >= 0")
        with self._lock:
            self._cuts.append(_Failure(None, times, prompt, f"cut after {after}", cut_after=after))

    def filter(self, *, times: int = 1, prompt: str | None = None) -> None:
        """Answer the next ``times`` matching chat requests as cut by a content
        filter (finish reason ``content_filter``)."""
        if times < 1:
            raise ValueError("filter: times must be >= 1")
        with self._lock:
            self._filters.append(_Failure(None, times, prompt, "content filter"))

    def hang(self, *, times: int = 1, prompt: str | None = None) -> None:
        """Never answer the next ``times`` matching chat requests (until the server stops)."""
        if times < 1:
            raise ValueError("hang: times must be >= 1")
        with self._lock:
            self._failures.append(_Failure(None, times, prompt, "hang"))

    def reset(self) -> None:
        """Forget calls, recorded requests and pending failures."""
        with self._lock:
            self._chat_calls.clear()
            self._embedding_calls = 0
            self._requests.clear()
            self._failures.clear()
            self._cuts.clear()
            self._filters.clear()

    # -- handlers ----------------------------------------------------------------------

    def _take(self, rules: list[_Failure], prompt: str) -> _Failure | None:
        """The first of ``rules`` (failures, cuts, filters) matching ``prompt``,
        used once."""
        with self._lock:
            for rule in rules:
                if rule.prompt is None or rule.prompt == prompt:
                    rule.remaining -= 1
                    if rule.remaining <= 0:
                        rules.remove(rule)
                    return rule
        return None

    async def _arrived(self, body: dict[str, Any], prompt: str) -> Response | None:
        """Count a model call, wait ``latency``, and answer the failure
        injected for it if any (None: answer it)."""
        with self._called:
            self._chat_calls[prompt] += 1
            self._requests.append(body)
            self._called.notify_all()
        failure = self._take(self._failures, prompt)
        if self.latency > 0:  # failures take their time too
            await asyncio.sleep(self.latency)
        if failure is None:
            return None
        if failure.status is None:
            assert self._stopping is not None
            await self._stopping.wait()
            return self._error(503, "server stopping", "server_error")
        kind = "server_error" if failure.status >= 500 else "invalid_request_error"
        return self._error(failure.status, failure.message, kind)

    def _content(self, body: Mapping[str, Any]) -> str:
        content = self._reply(body)
        return content.ljust(self.answer_chars) if len(content) < self.answer_chars else content

    @staticmethod
    def _error(status: int, message: str, kind: str = "invalid_request_error") -> Response:
        body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
        return Response(orjson.dumps(body), status_code=status, media_type="application/json")

    async def _body(self, request: Request) -> dict[str, Any] | Response:
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return self._error(400, "request body is not JSON")
        if not isinstance(body, dict):
            return self._error(400, "request body is not an object")
        return body

    async def _chat(self, request: Request) -> Response:
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not isinstance(body.get("model"), str):
            return self._error(400, "'messages' and 'model' are required")
        if not all(isinstance(m, dict) for m in messages):
            return self._error(400, "'messages' must be a list of objects")
        n = body.get("n") or 1
        if type(n) is not int or n < 1:
            return self._error(400, "'n' must be a positive integer")
        stream_options = body.get("stream_options") or {}
        if not isinstance(stream_options, dict):
            return self._error(400, "'stream_options' must be an object")
        prompt = last_user_text(body)
        if (failed := await self._arrived(body, prompt)) is not None:
            return failed
        content = self._content(body)
        completion_id = f"chatcmpl-fake-{next(self._ids)}"
        finish_reason = "stop"
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if type(limit) is int and limit > 0 and _tokens(content) > limit:
            content, finish_reason = " ".join(content.split()[:limit]), "length"
        if self._take(self._filters, prompt) is not None:
            content, finish_reason = content.split(" ")[0], "content_filter"
        tool_calls = self._tool_calls(body, prompt, f"call_{completion_id}")
        if tool_calls is not None:
            finish_reason = "tool_calls"
        created = int(time.time())
        usage = {
            "prompt_tokens": sum(
                _tokens(str(m.get("content") or "")) for m in messages if isinstance(m, dict)
            ),
            "completion_tokens": _tokens(content) * n,
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if body.get("stream"):
            include_usage = bool(stream_options.get("include_usage"))
            rule = self._take(self._cuts, prompt)
            cut = rule.cut_after if rule is not None else None
            return StreamingResponse(
                self._sse(
                    completion_id,
                    created,
                    body["model"],
                    content,
                    n,
                    usage if include_usage else None,
                    cut,
                    finish_reason,
                    tool_calls,
                ),
                media_type="text/event-stream",
            )
        completion = chat_completion(
            content,
            model=body["model"],
            n=n,
            completion_id=completion_id,
            created=created,
            usage=usage,
            system_fingerprint="fp_fake",
            finish_reason=finish_reason,
            tool_calls=tool_calls,
        )
        return Response(orjson.dumps(completion), media_type="application/json")

    @staticmethod
    def _tool_calls(body: Mapping[str, Any], prompt: str, call_id: str) -> list[dict[str, Any]] | None:
        """The tool calls the request forces, if any."""
        tools, choice = body.get("tools"), body.get("tool_choice")
        messages = body.get("messages") or [{}]
        if not isinstance(tools, list) or not tools or messages[-1].get("role") == "tool":
            return None
        # Chat names a function under "function"; the Responses API at the top.
        if isinstance(choice, dict):
            name = choice.get("name") or (choice.get("function") or {}).get("name")
        elif choice == "required" and isinstance(tools[0], dict):
            name = tools[0].get("name") or (tools[0].get("function") or {}).get("name")
        else:
            return None
        arguments = orjson.dumps({"query": prompt}).decode()
        return [{"id": call_id, "type": "function", "function": {"name": str(name), "arguments": arguments}}]

    async def _responses(self, request: Request) -> Response:
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        given = body.get("input")
        if not isinstance(body.get("model"), str) or not isinstance(given, (str, list)) or not given:
            return self._error(400, "'input' and 'model' are required")
        prompt = last_user_text(body)
        if (failed := await self._arrived(body, prompt)) is not None:
            return failed
        content = self._content(body)
        number = next(self._ids)
        status, incomplete = "completed", None
        limit = body.get("max_output_tokens")
        if type(limit) is int and limit > 0 and _tokens(content) > limit:
            content, status, incomplete = " ".join(content.split()[:limit]), "incomplete", "max_output_tokens"
        if self._take(self._filters, prompt) is not None:
            content, status, incomplete = content.split(" ")[0], "incomplete", "content_filter"
        output: list[dict[str, Any]] = [
            {
                "type": "message",
                "id": f"msg_fake-{number}",
                "role": "assistant",
                "status": "completed" if status == "completed" else "incomplete",
                "content": [{"type": "output_text", "text": content, "annotations": []}],
            }
        ]
        last = given[-1] if isinstance(given, list) and isinstance(given[-1], dict) else {}
        after_tool = last.get("type") == "function_call_output"
        calls = self._tool_calls(
            {**body, "messages": [{"role": "tool" if after_tool else "user"}]}, prompt, f"call_fake-{number}"
        )
        if calls is not None:
            function = calls[0]["function"]
            output = [
                {
                    "type": "function_call",
                    "id": f"fc_fake-{number}",
                    "call_id": calls[0]["id"],
                    "name": function["name"],
                    "arguments": function["arguments"],
                    "status": "completed",
                }
            ]
        input_tokens = _tokens(str(body.get("instructions") or "")) + _tokens(prompt)
        output_tokens = _tokens(content)
        response = {
            "id": f"resp_fake-{number}",
            "object": "response",
            "created_at": int(time.time()),
            "model": body["model"],
            "status": status,
            "incomplete_details": {"reason": incomplete} if incomplete else None,
            "instructions": body.get("instructions"),
            # The request's bookkeeping, echoed as the API does.
            "metadata": body.get("metadata") or {},
            "user": body.get("user"),
            "safety_identifier": body.get("safety_identifier"),
            "prompt_cache_key": body.get("prompt_cache_key"),
            "service_tier": body.get("service_tier") or "default",
            "output": output,
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": {
                "input_tokens": input_tokens,
                "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                "output_tokens": output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": input_tokens + output_tokens,
            },
        }
        if body.get("stream"):
            return StreamingResponse(self._response_events(response), media_type="text/event-stream")
        return Response(orjson.dumps(response), media_type="application/json")

    async def _response_events(self, response: dict[str, Any]) -> AsyncIterator[bytes]:
        from openai.types.responses import Response as ResponseObject

        from .responses import replay_response

        for event in replay_response(ResponseObject.model_validate(response)):
            if self.chunk_latency > 0 and event["type"].endswith(".delta"):
                await asyncio.sleep(self.chunk_latency)
            yield b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"

    async def _sse(
        self,
        completion_id: str,
        created: int,
        model: str,
        content: str,
        n: int,
        usage: dict[str, int] | None,
        cut_after: int | None = None,
        finish_reason: str = "stop",
        tool_calls: list[dict[str, Any]] | None = None,
    ) -> AsyncIterator[bytes]:
        def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
            data: dict[str, Any] = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": choices,
            }
            if usage is not None:
                data["usage"] = usage
            return b"data: " + orjson.dumps(data) + b"\n\n"

        pieces = [p + " " for p in content.split(" ")]
        pieces[-1] = pieces[-1][:-1]
        if tool_calls:
            pieces = []
        for i in range(n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        for i in range(n):
            for position, call in enumerate(tool_calls or ()):
                delta = {"tool_calls": [{"index": position, **call}]}
                yield chunk([{"index": i, "delta": delta, "finish_reason": None}])
        for sent, piece in enumerate(pieces):
            if sent == cut_after:
                raise ConnectionAbortedError("FakeOpenAI: stream cut (injected)")
            if self.chunk_latency > 0:
                await asyncio.sleep(self.chunk_latency)
            for i in range(n):
                yield chunk([{"index": i, "delta": {"content": piece}, "finish_reason": None}])
        for i in range(n):
            yield chunk([{"index": i, "delta": {}, "finish_reason": finish_reason}])
        if usage is not None:
            yield chunk([], usage)
        yield b"data: [DONE]\n\n"

    def _embed(self, text: str) -> np.ndarray[Any, np.dtype[np.float32]]:
        vector = np.zeros(self.dimensions, dtype=np.float32)
        for word in text.lower().split():
            word = word.strip(".,;:!?'\"()")
            if not word or word in _FUNCTION_WORDS:
                continue
            digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
            index = int.from_bytes(digest[:4], "little") % self.dimensions
            vector[index] += 1.0 if digest[4] & 1 else -1.0
        norm = float(np.linalg.norm(vector))
        if norm == 0.0:
            vector[0] = 1.0
            norm = 1.0
        normalised: np.ndarray[Any, np.dtype[np.float32]] = vector / norm
        return normalised

    async def _embeddings(self, request: Request) -> Response:
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs or not all(isinstance(t, str) for t in inputs):
            return self._error(400, "'input' must be a string or a list of strings")
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            return self._error(400, f"unknown encoding_format {encoding!r}")
        with self._lock:
            self._embedding_calls += 1
        status = self.embeddings_status
        if status is not None:
            return self._error(status, "embeddings unavailable (injected)", "server_error")
        if self.latency > 0:
            await asyncio.sleep(self.latency)
        data = []
        for i, text in enumerate(inputs):
            vector = self._embed(text)
            value: Any = (
                base64.b64encode(vector.astype("<f4").tobytes()).decode()
                if encoding == "base64"
                else vector.tolist()
            )
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = sum(_tokens(t) for t in inputs)
        result = {
            "object": "list",
            "data": data,
            "model": body.get("model", "fake-embedding"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return Response(orjson.dumps(result), media_type="application/json")

    async def _models(self, request: Request) -> Response:
        models = {
            "object": "list",
            "data": [{"id": "fake-model", "object": "model", "created": 0, "owned_by": "aiollmcache"}],
        }
        return Response(orjson.dumps(models), media_type="application/json")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """A private ``redis-server`` on a free loopback port, nothing saved to disk.

    Starts on ``start()``/``with``; ``url`` is then its ``redis://`` URL.
    ``pause()``/``resume()`` freeze it (SIGSTOP/SIGCONT) to simulate a hung
    server; ``kill()`` crashes it (SIGKILL) and ``restart()`` starts it again,
    empty, on the same port.
    """

    cluster = False

    def __init__(self, *, executable: str | None = None, args: tuple[str, ...] = (), port: int = 0) -> None:
        found = executable or shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.path.exists(found):
            raise FileNotFoundError(
                "redis-server not found: install it (Debian: apt-get install redis-server)"
            )
        self._executable = found
        self._args = args
        self._proc: subprocess.Popen[bytes] | None = None
        self._drain: threading.Thread | None = None
        self._want_port = port
        self.port = port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def client(self, **kwargs: Any) -> aioredis.Redis:
        """An asyncio client of this server (close it when done)."""
        import redis.asyncio as aioredis

        return aioredis.Redis(host="127.0.0.1", port=self.port, **kwargs)

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server; return once it accepts connections (its own log
        line says so), or raise RuntimeError after ``timeout`` seconds."""
        last_output = b""
        for _ in range(5):  # the free port may be taken between probe and bind
            port = self._want_port or _free_port()
            argv = [self._executable, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
            argv += ["--appendonly", "no", "--daemonize", "no", "--logfile", "", *self._args]
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            ready = threading.Event()
            output: list[bytes] = []

            def read(
                stream: Any = proc.stdout, ready: threading.Event = ready, output: list[bytes] = output
            ) -> None:
                # Reads to the end, so a full pipe never blocks the server.
                for line in stream:
                    if not ready.is_set():
                        output.append(line)
                        if b"Ready to accept connections" in line:
                            ready.set()

            drain = threading.Thread(target=read, name="redis-server-log", daemon=True)
            drain.start()
            deadline = time.monotonic() + timeout
            while not (started := ready.wait(0.05)):
                if proc.poll() is not None or time.monotonic() > deadline:
                    break  # exited (a bad option, a port clash) or too slow
            if started and proc.poll() is None:
                self._proc, self.port, self._drain = proc, port, drain
                return self
            proc.kill()
            proc.wait()
            drain.join(timeout=5)
            if proc.stdout is not None:
                proc.stdout.close()
            last_output = b"".join(output[-5:])
            if not started and not output:
                break  # silent: not a port clash (e.g. its log goes to a file)
        raise RuntimeError(f"redis-server did not start: {last_output.decode(errors='replace')}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._drain is not None:
            self._drain.join(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()

    def kill(self) -> None:
        """Crash the server (SIGKILL): connections drop, nothing is saved."""
        assert self._proc is not None
        self._proc.kill()
        self._proc.wait()
        self.stop()

    def restart(self, timeout: float = 10.0) -> RedisServer:
        """Start the server again, empty, on the port it had."""
        self.stop()
        self._want_port = self.port
        return self.start(timeout)

    def pause(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisClusterServer:
    """A private Redis Cluster on loopback: ``primaries`` ``redis-server``
    processes started with ``--cluster-enabled yes``, each with ``replicas``
    replicas, joined with ``redis-cli --cluster create``; nothing saved.

    ``start()``/``with`` returns once every node agrees the cluster is up.
    ``url`` points at the first node and carries ``cluster=yes``.
    ``primaries()`` lists the servers that are primaries now; ``kill()`` one
    and ``wait_healthy()`` returns once a replica has taken its place (node
    timeout ``node_timeout_ms``). ``args`` go to every ``redis-server``.
    """

    cluster = True

    def __init__(
        self,
        *,
        primaries: int = 3,
        replicas: int = 0,
        node_timeout_ms: int = 1000,
        executable: str | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        if primaries < 3:
            raise ValueError(f"primaries: Redis Cluster needs at least 3, got {primaries}")
        self._primaries = primaries
        self._replicas = replicas
        self._node_timeout_ms = node_timeout_ms
        self._executable = executable
        self._args = args
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self.servers: list[RedisServer] = []

    @property
    def url(self) -> str:
        alive = [s for s in self.servers if s.running] or self.servers
        return f"redis://127.0.0.1:{alive[0].port}/0?cluster=yes"

    def client(self, **kwargs: Any) -> RedisCluster:
        """An asyncio cluster client (close it when done)."""
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        nodes = [ClusterNode("127.0.0.1", s.port) for s in self.servers if s.running]
        return RedisCluster(startup_nodes=nodes, **kwargs)

    def start(self, timeout: float = 30.0) -> RedisClusterServer:
        cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
        if not os.path.exists(cli):
            raise FileNotFoundError("redis-cli not found: install it (Debian: apt-get install redis-tools)")
        self._dir = tempfile.TemporaryDirectory(prefix="aiollmcache-cluster-")
        try:
            for i in range(self._primaries * (1 + self._replicas)):
                args = (
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", os.path.join(self._dir.name, f"nodes-{i}.conf"),
                    "--cluster-node-timeout", str(self._node_timeout_ms),
                    "--dir", self._dir.name,
                    *self._args,
                )  # fmt: skip
                self.servers.append(RedisServer(executable=self._executable, args=args).start())
            argv = [cli, "--cluster", "create", *(f"127.0.0.1:{s.port}" for s in self.servers)]
            argv += ["--cluster-replicas", str(self._replicas), "--cluster-yes"]
            done = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout.decode()[-500:]}")
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _info(self, server: RedisServer) -> dict[str, str] | None:
        import redis

        try:
            with redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=1.0) as client:
                text = client.execute_command("CLUSTER", "INFO")
                replication = client.info("replication")
        except (redis.RedisError, OSError):
            return None
        info = dict(line.split(":", 1) for line in _text(text).splitlines() if ":" in line)
        info["role"] = str(replication.get("role"))
        info["link"] = str(replication.get("master_link_status", "up"))
        return info

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Wait until every running node sees the cluster up, all slots served,
        as many primaries as asked, and each replica in sync with its primary."""
        deadline = time.monotonic() + timeout
        while True:
            infos = [self._info(s) for s in self.servers if s.running]
            if (
                all(
                    info is not None
                    and info.get("cluster_state") == "ok"
                    and info.get("cluster_slots_ok") == "16384"
                    and info.get("cluster_size") == str(self._primaries)
                    and info["link"] == "up"
                    for info in infos
                )
                and sum(1 for info in infos if info and info["role"] == "master") == self._primaries
            ):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster is not healthy after {timeout}s: {infos}")
            time.sleep(0.05)

    def primaries(self) -> list[RedisServer]:
        """The running servers that are primaries now."""
        infos = [(s, self._info(s)) for s in self.servers if s.running]
        return [s for s, info in infos if info is not None and info["role"] == "master"]

    def kill(self, server: RedisServer) -> None:
        """Crash one node (SIGKILL)."""
        server.kill()

    def pause(self) -> None:
        """Freeze every node (SIGSTOP), as a hung cluster."""
        for server in self.servers:
            if server.running:
                server.pause()

    def resume(self) -> None:
        for server in self.servers:
            if server.running:
                server.resume()

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
        self.servers = []
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> RedisClusterServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
