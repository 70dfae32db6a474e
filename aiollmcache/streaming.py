"""Streamed answers: recorded as they arrive, shared while in flight, replayed
from the cache.

- :class:`ChunkLog` is one stream in flight in this process: the chunks so
  far and how it ended. Any number of readers follow it, each from the first
  chunk, woken as each new chunk arrives.
- :func:`assemble` turns the recorded chunks into the chat completion that is
  stored, so that ``complete()`` and ``stream()`` of one request share one
  entry; :func:`replay` turns a stored completion back into chunks.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any, Final

import orjson
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from .errors import StreamInterruptedError, TierError

__all__ = ["CachedStream", "ChunkLog", "ChunkWriter", "assemble", "complete_chunks", "replay"]

# Replayed content goes out in pieces of about this many characters, cut
# after whitespace: what a client renders as it would a live stream.
_REPLAY_PIECE: Final = 24
_PIECES = re.compile(r"\S*\s*")


class ChunkLog:
    """The chunks of one stream in flight, for every reader in this process.

    The producer calls :meth:`append` for each chunk, then :meth:`finish` or
    :meth:`fail`. A reader iterates :meth:`follow`: the backlog first, then
    each chunk as it is appended, then the end (or the producer's error).
    ``readers`` counts the readers still reading: when it falls to zero the
    owner may stop producing.
    """

    __slots__ = (
        "_changed",
        "chunks",
        "coalesced",
        "entry",
        "error",
        "finished",
        "producer",
        "readers",
        "source",
    )

    def __init__(self, source: Any) -> None:
        self.chunks: list[ChatCompletionChunk] = []
        self.finished = False
        self.error: BaseException | None = None
        self.readers = 0
        self.producer: asyncio.Task[None] | None = None
        self.entry: Any = None  # the stored answer, once the stream ended well
        self.source = source  # where the chunks come from, as the producer finds out
        self.coalesced = False
        self._changed = asyncio.Event()

    def leave(self) -> None:
        """A reader stopped reading; the last one to go stops the producer."""
        self.readers -= 1
        if self.readers <= 0 and not self.finished and self.producer is not None:
            # Failed at once, so that no new reader joins what is stopping.
            self.fail(StreamInterruptedError("the stream was stopped: nobody read it"))
            self.producer.cancel()

    def append(self, chunk: ChatCompletionChunk) -> None:
        self.chunks.append(chunk)
        self._wake()

    def finish(self) -> None:
        self.finished = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        if not self.finished:
            self.error = error
            self.finished = True
            self._wake()

    def _wake(self) -> None:
        # Readers wait on the current event; the next change gets a new one.
        self._changed.set()
        self._changed = asyncio.Event()

    async def follow(self) -> AsyncIterator[ChatCompletionChunk]:
        position = 0
        while True:
            while position < len(self.chunks):
                yield self.chunks[position]
                position += 1
            if self.finished:
                if self.error is not None:
                    raise self.error
                return
            await self._changed.wait()


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def complete_chunks(chunks: list[Mapping[str, Any]]) -> bool:
    """Whether every choice seen in ``chunks`` got its ``finish_reason``."""
    reasons: dict[int, object] = {}
    for chunk in chunks:
        for choice in chunk.get("choices") or ():
            index = choice.get("index", 0)
            reasons.setdefault(index, None)
            if choice.get("finish_reason"):
                reasons[index] = choice["finish_reason"]
    return bool(reasons) and all(reasons.values())


def assemble(chunks: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The chat completion the chunks of one finished stream add up to.

    Content, refusals, tool-call arguments and logprobs are concatenated per
    choice; the last chunk's usage (``stream_options.include_usage``) is the
    answer's usage. Raises :class:`StreamInterruptedError` when a choice has
    no ``finish_reason``: such a stream was cut off and is never stored.
    """
    if not complete_chunks(chunks):
        raise StreamInterruptedError("the stream ended before every choice had a finish_reason")
    first = chunks[0]
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    fingerprint = None
    service_tier = None
    for chunk in chunks:
        usage = chunk.get("usage") or usage
        fingerprint = chunk.get("system_fingerprint") or fingerprint
        service_tier = chunk.get("service_tier") or service_tier
        for choice in chunk.get("choices") or ():
            index = choice.get("index", 0)
            state = choices.setdefault(
                index,
                {"role": None, "content": [], "refusal": [], "tools": {}, "finish": None, "logprobs": []},
            )
            delta = choice.get("delta") or {}
            state["role"] = delta.get("role") or state["role"]
            state["content"].append(_text(delta.get("content")))
            state["refusal"].append(_text(delta.get("refusal")))
            for call in delta.get("tool_calls") or ():
                slot = state["tools"].setdefault(
                    call.get("index", 0), {"id": None, "type": "function", "name": [], "arguments": []}
                )
                slot["id"] = call.get("id") or slot["id"]
                slot["type"] = call.get("type") or slot["type"]
                function = call.get("function") or {}
                slot["name"].append(_text(function.get("name")))
                slot["arguments"].append(_text(function.get("arguments")))
            logprobs = choice.get("logprobs")
            if logprobs and logprobs.get("content"):
                state["logprobs"].extend(logprobs["content"])
            state["finish"] = choice.get("finish_reason") or state["finish"]
    built = []
    for index in sorted(choices):
        state = choices[index]
        content = "".join(state["content"])
        refusal = "".join(state["refusal"])
        message: dict[str, Any] = {
            "role": state["role"] or "assistant",
            "content": content if content or not state["tools"] else None,
            "refusal": refusal or None,
        }
        if state["tools"]:
            message["tool_calls"] = [
                {
                    "id": slot["id"] or f"call_{index}_{position}",
                    "type": slot["type"],
                    "function": {"name": "".join(slot["name"]), "arguments": "".join(slot["arguments"])},
                }
                for position, slot in sorted(state["tools"].items())
            ]
        built.append(
            {
                "index": index,
                "message": message,
                "finish_reason": state["finish"],
                "logprobs": {"content": state["logprobs"]} if state["logprobs"] else None,
            }
        )
    completion: dict[str, Any] = {
        "id": first.get("id") or "chatcmpl-stream",
        "object": "chat.completion",
        "created": first.get("created") or 0,
        "model": first.get("model") or "",
        "choices": built,
    }
    if usage is not None:
        completion["usage"] = usage
    if fingerprint is not None:
        completion["system_fingerprint"] = fingerprint
    if service_tier is not None:
        completion["service_tier"] = service_tier
    return completion


def replay(response: ChatCompletion, *, include_usage: bool) -> Iterator[dict[str, Any]]:
    """A stored completion as the chunks a live stream of it would carry: per
    choice, the role, the content in pieces, the tool calls, then the finish
    reason; last, when asked and known, the usage."""
    head = {
        "id": response.id,
        "object": "chat.completion.chunk",
        "created": response.created,
        "model": response.model,
    }
    if response.system_fingerprint is not None:
        head["system_fingerprint"] = response.system_fingerprint

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}

    for choice in response.choices:
        message = choice.message
        yield chunk(choice.index, {"role": message.role, "content": ""})
        content = message.content or ""
        piece = ""
        for word in _PIECES.findall(content):
            piece += word
            if len(piece) >= _REPLAY_PIECE:
                yield chunk(choice.index, {"content": piece})
                piece = ""
        if piece:
            yield chunk(choice.index, {"content": piece})
        if message.refusal:
            yield chunk(choice.index, {"refusal": message.refusal})
        for position, call in enumerate(message.tool_calls or ()):
            function = getattr(call, "function", None)
            yield chunk(
                choice.index,
                {
                    "tool_calls": [
                        {
                            "index": position,
                            "id": call.id,
                            "type": call.type,
                            "function": {
                                "name": function.name if function else "",
                                "arguments": function.arguments if function else "",
                            },
                        }
                    ]
                },
            )
        yield chunk(choice.index, {}, choice.finish_reason)
    if include_usage and response.usage is not None:
        yield {**head, "choices": [], "usage": response.usage.model_dump(mode="json", exclude_unset=True)}


class CachedStream:
    """What ``cache.stream()`` returns: an async iterator of
    ``ChatCompletionChunk``, usable as the SDK's ``AsyncStream`` is
    (``async for``, ``async with``, ``await stream.close()``).

    Nothing happens until the first chunk is asked for. Then ``source``
    (``Source``), ``coalesced`` and ``key`` say where the chunks come from.
    Leaving early (``close()``, ``break`` inside ``async with``, a cancelled
    task) lets go of the stream: the model's stream stops when nobody in this
    process or elsewhere reads it any more, and is then not cached.
    """

    def __init__(self, key: str, opener: Any) -> None:
        self.key = key
        self._source: Any = None
        self._coalesced = False
        self._log: ChunkLog | None = None
        self._opener = opener
        self._chunks: AsyncIterator[ChatCompletionChunk] | None = None
        self._closed = False

    @property
    def source(self) -> Any:
        """``Source``: ``"memory"``/``"redis"`` for a replay, ``"upstream"`` for
        a stream from the model, ``"redis"`` for one streamed by another
        process. None until the first chunk was asked for."""
        return self._log.source if self._log is not None else self._source

    @property
    def coalesced(self) -> bool:
        """True when another caller (here or in another process) is the one
        streaming from the model."""
        return self._coalesced or (self._log is not None and self._log.coalesced)

    def __aiter__(self) -> CachedStream:
        return self

    async def __anext__(self) -> ChatCompletionChunk:
        if self._closed:
            raise StopAsyncIteration
        if self._chunks is None:
            self._chunks, self._source, self._coalesced, self._log = await self._opener()
        try:
            return await self._chunks.__anext__()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop reading; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._log is not None:
            self._log.leave()
        chunks = self._chunks
        if chunks is not None and hasattr(chunks, "aclose"):
            await chunks.aclose()

    aclose = close

    async def __aenter__(self) -> CachedStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class ChunkWriter:
    """Copies a stream's chunks to Redis for followers in other processes.

    ``add`` never waits: chunks queue while a write is in flight and go in
    one pipeline with the next, so the leader's own readers are never held up
    by Redis. A failed write is logged and ends the copying (followers
    elsewhere then see the stream stall and the lease run out).
    """

    def __init__(self, tier: Any, key: str, owner: str, ttl_ms: int, spawn: Any, log: Any) -> None:
        self._tier = tier
        self._key = key
        self._owner = owner
        self._ttl_ms = ttl_ms
        self._spawn = spawn
        self._log = log
        self._pending: list[tuple[bytes, bytes]] = []
        self._task: asyncio.Task[None] | None = None
        self._broken = False

    def add(self, chunk: Mapping[str, Any]) -> None:
        if self._broken:
            return
        self._pending.append((b"c", orjson.dumps(chunk)))
        if self._task is None or self._task.done():
            self._task = self._spawn(self._flush())

    async def _flush(self) -> None:
        while self._pending and not self._broken:
            batch, self._pending = self._pending, []
            try:
                await self._tier.append_chunks(self._key, self._owner, batch, self._ttl_ms)
            except TierError as exc:
                self._broken = True
                self._log.warning("stream-copy", "cannot copy a stream to Redis for other processes: %s", exc)

    async def end(self, kind: bytes, data: bytes, ttl_ms: int) -> None:
        """Write the last record (after every chunk) and keep the stream
        ``ttl_ms`` more for followers still reading it."""
        if self._task is not None:
            await asyncio.shield(self._task)
        if self._broken:
            return
        try:
            await self._tier.append_chunks(self._key, self._owner, [(kind, data)], ttl_ms)
        except TierError as exc:
            self._log.warning("stream-copy", "cannot end a stream copied to Redis: %s", exc)
