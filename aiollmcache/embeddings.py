"""Embeddings for the semantic tier: the :class:`Embedder` protocol, the
OpenAI-compatible implementation, and :class:`Embeddings`, which puts an
in-process cache and batching in front of any embedder.

An embedder turns texts into vectors; it is called with a list of texts and
returns one row per text. Its ``name`` says which vector space the rows live
in (the provider, the model, the dimensions): vectors of different names are
never compared, so the name is part of every semantic partition.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from .errors import ConfigurationError, EmbeddingError

if TYPE_CHECKING:
    from openai import AsyncOpenAI

__all__ = ["Embedder", "Embeddings", "OpenAIEmbedder", "Vectors"]

Vectors = npt.NDArray[np.float32]

# One embeddings request carries at most this many texts (OpenAI allows 2048).
_MAX_BATCH: Final = 256


@runtime_checkable
class Embedder(Protocol):
    """Anything that embeds texts: a local model, another provider.

    ``embed`` returns a float array of shape ``(len(texts), dimensions)``, row
    ``i`` for ``texts[i]``; it need not normalise. ``name`` identifies the
    vector space (e.g. ``"openai:text-embedding-3-small"``): change it when
    the model or its dimensions change, or old vectors would be compared with
    new ones.
    """

    name: str

    async def embed(self, texts: Sequence[str]) -> npt.NDArray[Any]: ...


class OpenAIEmbedder:
    """The embeddings endpoint of an OpenAI-compatible ``AsyncOpenAI`` client.

    Vectors are asked for in base64 (a quarter of the bytes of JSON floats)
    and decoded with numpy; a server that answers with floats is read too.
    The client's own retries and timeout apply; the semantic tier adds its
    own bound (``SemanticConfig.timeout``).
    """

    def __init__(self, client: AsyncOpenAI, model: str, *, dimensions: int | None = None) -> None:
        if not hasattr(client, "embeddings"):
            raise ConfigurationError(f"embedder: expected an AsyncOpenAI client, got {type(client).__name__}")
        if not isinstance(model, str) or not model:
            raise ConfigurationError(f"SemanticConfig.model: expected a non-empty string, got {model!r}")
        if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int)):
            raise ConfigurationError(f"SemanticConfig.dimensions: expected an int, got {dimensions!r}")
        if dimensions is not None and dimensions < 1:
            raise ConfigurationError(f"SemanticConfig.dimensions: expected at least 1, got {dimensions}")
        self._client = client
        self.model = model
        self.dimensions = dimensions
        suffix = f":{dimensions}" if dimensions is not None else ""
        self.name = f"openai:{model}{suffix}"

    async def embed(self, texts: Sequence[str]) -> Vectors:
        extra: dict[str, Any] = {} if self.dimensions is None else {"dimensions": self.dimensions}
        response = await self._client.embeddings.create(
            model=self.model, input=list(texts), encoding_format="base64", **extra
        )
        data = sorted(response.data, key=lambda item: item.index)
        if len(data) != len(texts):
            raise EmbeddingError(f"asked for {len(texts)} embeddings, got {len(data)}")
        rows = [_decode_vector(item.embedding) for item in data]
        if len({row.shape[0] for row in rows}) != 1:
            raise EmbeddingError("embeddings of different lengths in one answer")
        return np.stack(rows)


def _decode_vector(value: object) -> Vectors:
    if isinstance(value, str):
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise EmbeddingError("embedding is not valid base64") from None
        if not raw or len(raw) % 4:
            raise EmbeddingError(f"base64 embedding of {len(raw)} bytes is not a float32 vector")
        return np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if isinstance(value, list) and value:
        try:
            return np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError):
            raise EmbeddingError("embedding is not a list of numbers") from None
    raise EmbeddingError(f"embedding of unexpected type {type(value).__name__}")


def normalise(rows: npt.NDArray[Any], *, expected: int | None) -> Vectors:
    """Rows as float32 unit vectors; :class:`EmbeddingError` for a wrong shape,
    a non-finite value or a zero vector."""
    try:
        matrix = np.asarray(rows, dtype=np.float32)
    except (TypeError, ValueError):
        raise EmbeddingError("the embedder returned something that is not an array of numbers") from None
    if matrix.ndim != 2 or (expected is not None and matrix.shape[0] != expected) or matrix.shape[1] == 0:
        raise EmbeddingError(
            f"the embedder returned an array of shape {matrix.shape}, expected ({expected}, d)"
        )
    if not np.isfinite(matrix).all():
        raise EmbeddingError("the embedder returned a non-finite value")
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    if (norms == 0).any():
        raise EmbeddingError("the embedder returned a zero vector")
    unit: Vectors = matrix / norms
    return unit


class Embeddings:
    """An embedder with an in-process cache by text and request batching.

    - A text embedded before (and still among the last ``cache_size``) costs
      nothing; a text being embedded is awaited, not asked for again.
    - Texts asked for less than ``window`` seconds apart go out as one
      request (at most 256 texts each; a batch waits ten windows at most):
      next to a request's own time (tens of milliseconds and more), the
      window costs little, and the misses of a burst of calls, which reach
      the embedder a Redis round trip or two apart, share one request.
    - Each request is bounded by ``timeout`` seconds; a failure, a timeout or
      a malformed answer raises :class:`EmbeddingError` in every caller that
      waited on it, and nothing is cached.
    """

    def __init__(self, embedder: Embedder, *, cache_size: int, timeout: float, window: float = 0.0) -> None:
        self.embedder = embedder
        self._cache: OrderedDict[str, Vectors] = OrderedDict()
        self._cache_size = cache_size
        self._timeout = timeout
        self._window = window
        self._pending: dict[str, asyncio.Future[Vectors]] = {}
        self._batch: list[str] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.dimensions: int | None = None
        self.calls = 0
        self.texts = 0
        self.cache_hits = 0
        self.failures = 0
        self.seconds = 0.0

    def cached(self, text: str) -> Vectors | None:
        vector = self._cache.get(text)
        if vector is not None:
            self._cache.move_to_end(text)
        return vector

    async def embed(self, text: str) -> Vectors:
        """The unit vector of ``text``."""
        vector = self.cached(text)
        if vector is not None:
            self.cache_hits += 1
            return vector
        waiting = self._pending.get(text)
        if waiting is None:
            waiting = self._pending[text] = asyncio.get_running_loop().create_future()
            if self._batch is None:
                self._batch = []
                task = asyncio.get_running_loop().create_task(self._send())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            self._batch.append(text)
        # Shielded: a caller that gives up does not fail the others' request.
        return await asyncio.shield(waiting)

    async def _send(self) -> None:
        batch: list[str] = []
        try:
            started = time.monotonic()
            while True:  # until no text joined for a window, or ten windows passed
                joined = len(self._batch or ())
                await asyncio.sleep(self._window)
                if len(self._batch or ()) == joined or time.monotonic() - started >= 10 * self._window:
                    break
            batch, self._batch = self._batch or [], None
            # Requests of one batch go out together: each is bounded by the timeout.
            await asyncio.gather(
                *(
                    self._send_batch(batch[start : start + _MAX_BATCH])
                    for start in range(0, len(batch), _MAX_BATCH)
                )
            )
        finally:
            # Cancelled (closing) before or while sending: nobody waits forever.
            if self._batch is not None and not batch:
                batch, self._batch = self._batch, None
            self._fail(batch, EmbeddingError("the embeddings request was cancelled (the cache is closing)"))

    def _fail(self, texts: list[str], error: EmbeddingError) -> None:
        for text in texts:
            waiting = self._pending.get(text)
            if waiting is not None and not waiting.done():
                del self._pending[text]
                waiting.set_exception(error)
                waiting.exception()  # retrieved: a caller may have gone

    async def _send_batch(self, texts: list[str]) -> None:
        started = time.monotonic()
        self.calls += 1
        self.texts += len(texts)
        try:
            async with asyncio.timeout(self._timeout):
                rows = await self.embedder.embed(texts)
            vectors = normalise(rows, expected=len(texts))
            if self.dimensions is not None and vectors.shape[1] != self.dimensions:
                raise EmbeddingError(
                    f"the embedder returned {vectors.shape[1]} dimensions, earlier {self.dimensions}"
                )
        except BaseException as exc:
            self.failures += 1
            self._fail(
                texts, exc if isinstance(exc, EmbeddingError) else _embedding_error(exc, self._timeout)
            )
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            self.seconds += time.monotonic() - started
        self.dimensions = vectors.shape[1]
        for text, vector in zip(texts, vectors, strict=True):
            vector.flags.writeable = False
            self._cache[text] = vector
            waiting = self._pending.pop(text, None)
            if waiting is not None and not waiting.done():
                waiting.set_result(vector)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _embedding_error(exc: BaseException, timeout: float) -> EmbeddingError:
    if isinstance(exc, TimeoutError):
        error = EmbeddingError(f"no embedding within {timeout}s")
    elif isinstance(exc, asyncio.CancelledError):
        error = EmbeddingError("the embedding request was cancelled")
    else:
        error = EmbeddingError(f"embedding failed: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error
