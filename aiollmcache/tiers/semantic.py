"""The semantic tier: vectors of past questions, searched by similarity.

A request is matched semantically only within its *partition*: the exact
hash of everything but its last user message (see
:func:`aiollmcache.request.semantic_query`). Each partition is a
:class:`VectorIndex` in this process, kept in step with a Redis Stream of the
partition's vectors that every process appends to (``add``) and reads from
where it last stopped (``search`` first catches up), so a vector written by
one process is searchable by the others at their next lookup in that
partition.

The index answers *candidates*; whether a candidate is served is the
client's decision, after reading the candidate's entry (an invalidated or
expired entry is gone, and its row is then forgotten here).

Search cost: up to ``exact_below`` rows, every row is compared. Beyond, each
row also keeps a sign sketch of its vector (one bit per dimension): the
``candidates`` rows nearest to the query by Hamming distance are found with
XOR and popcount over the sketches (48 bytes a row at 384 dimensions), then
ranked by their exact cosine similarity. For the near-duplicates a cache
looks for (similarity 0.8 and more), the sketch distance is a tight proxy of
the angle (the chance that one sign differs is angle / pi), so the true best
match is among the candidates; the benchmark measures how often it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import anyio.to_thread
import numpy as np
import numpy.typing as npt

from .._log import RateLimitedLogger
from ..embeddings import Embedder
from ..errors import ConfigurationError, TierError
from .redis import RedisTier

__all__ = ["DEFAULT_THRESHOLD", "Candidate", "SemanticConfig", "SemanticTier", "VectorIndex"]

DEFAULT_THRESHOLD: Final = 0.95


@dataclass(frozen=True, slots=True)
class SemanticConfig:
    """Settings of the semantic tier; ``LLMCache(semantic=SemanticConfig())``.

    - ``threshold``: the cosine similarity at or above which a past question
      answers a new one (see docs/semantic.md for how the default was chosen).
    - ``model``, ``dimensions``: the embedding model of the default embedder,
      the ``openai=`` client's embeddings endpoint.
    - ``embedder``: any :class:`~aiollmcache.embeddings.Embedder` instead.
    - ``min_chars``, ``max_chars``: prompts shorter or longer (stripped) are
      only matched exactly.
    - ``max_entries``: vectors kept in this process (least recently searched
      partitions are dropped first) and per partition in Redis.
    - ``dtype``: ``"float16"`` (half the memory, the default) or ``"float32"``.
    - ``timeout``: bound of one embeddings request, seconds.
    - ``batch_window``: texts to embed within this many seconds of each other
      share one embeddings request.
    - ``cache_size``: texts whose embeddings are kept in this process.
    - ``thread_above``: partitions of at least this many rows are searched in
      a worker thread, off the event loop.
    - ``failure_backoff``: after the embedder failed, the tier is skipped for
      this many seconds.
    """

    threshold: float = DEFAULT_THRESHOLD
    model: str = "text-embedding-3-small"
    embedder: Embedder | None = None
    dimensions: int | None = None
    min_chars: int = 10
    max_chars: int = 8000
    max_entries: int = 100_000
    dtype: str = "float16"
    timeout: float = 5.0
    batch_window: float = 0.005
    cache_size: int = 10_000
    thread_above: int = 20_000
    failure_backoff: float = 5.0

    def __post_init__(self) -> None:
        def number(name: str, low: float, high: float = float("inf")) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ConfigurationError(
                    f"SemanticConfig.{name}: expected a number in [{low}, {high}], got {value!r}"
                )

        def count(name: str, low: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigurationError(
                    f"SemanticConfig.{name}: expected an integer >= {low}, got {value!r}"
                )

        number("threshold", 0.0, 1.0)
        number("timeout", 0.001)
        number("batch_window", 0.0, 1.0)
        number("failure_backoff", 0.0)
        for name, low in (
            ("min_chars", 0),
            ("max_chars", 1),
            ("max_entries", 1),
            ("cache_size", 0),
            ("thread_above", 0),
        ):
            count(name, low)
        if self.max_chars < self.min_chars:
            raise ConfigurationError("SemanticConfig.max_chars: must be at least min_chars")
        if self.dtype not in ("float16", "float32"):
            raise ConfigurationError(
                f"SemanticConfig.dtype: expected 'float16' or 'float32', got {self.dtype!r}"
            )
        if not isinstance(self.model, str) or not self.model:
            raise ConfigurationError(f"SemanticConfig.model: expected a non-empty string, got {self.model!r}")
        if self.dimensions is not None:
            count("dimensions", 1)
        if self.embedder is not None and not (
            isinstance(getattr(self.embedder, "name", None), str)
            and callable(getattr(self.embedder, "embed", None))
        ):
            raise ConfigurationError(
                f"SemanticConfig.embedder: expected an Embedder (a name and an async embed()), "
                f"got {type(self.embedder).__name__}"
            )


Vectors = npt.NDArray[np.float32]

# Sketch distances are computed this many rows at a time (the temporaries
# stay in cache).
_CHUNK: Final = 16_384
_SYNC_BATCH: Final = 1000


@dataclass(frozen=True, slots=True)
class Candidate:
    key: str
    similarity: float
    numbers: str  # the number signature of the question the row was stored for


def _sketch(vectors: npt.NDArray[Any], words: int) -> npt.NDArray[np.uint64]:
    """One bit per dimension (set when positive), packed into ``words`` uint64."""
    bits = np.packbits(np.asarray(vectors) > 0, axis=-1)
    pad = words * 8 - bits.shape[-1]
    if pad:
        bits = np.concatenate([bits, np.zeros((*bits.shape[:-1], pad), np.uint8)], axis=-1)
    return np.ascontiguousarray(bits).view(np.uint64)


class _Rows:
    """The arrays of an index as one search sees them: replaced whole (one
    assignment) when they are reallocated, so a search in another thread
    never mixes two generations. Rows past ``size`` are not part of it."""

    __slots__ = ("expires", "keys", "numbers", "size", "sketches", "vectors")

    def __init__(
        self,
        vectors: npt.NDArray[Any],
        sketches: npt.NDArray[np.uint64],
        expires: npt.NDArray[np.float64],
        keys: list[str],
        numbers: list[str],
        size: int,
    ) -> None:
        self.vectors = vectors
        self.sketches = sketches
        self.expires = expires
        self.keys = keys
        self.numbers = numbers
        self.size = size


class VectorIndex:
    """Unit vectors of one partition, each with its entry key and expiry.

    Mutated only on the event loop; ``search`` may run in a worker thread at
    the same time. That is safe because a search reads one :class:`_Rows`
    snapshot (taken in one read): rows are only written past the snapshot's
    size before a new snapshot publishes them, reallocation and compaction
    build new arrays and publish them in one assignment, and removal only
    lowers a row's expiry (a search that still sees the old value may return
    the row; the caller verifies every candidate against its entry).
    """

    def __init__(self, dimensions: int, *, dtype: str = "float16") -> None:
        self.dimensions = dimensions
        self.dtype = np.dtype(dtype)
        self._words = (dimensions + 63) // 64
        self._state = _Rows(
            np.zeros((0, dimensions), self.dtype),
            np.zeros((0, self._words), np.uint64),
            np.zeros(0, np.float64),
            [],
            [],
            0,
        )
        self._rows: dict[str, int] = {}
        self.removed = 0  # rows removed or replaced, still in the arrays

    def __len__(self) -> int:
        return self._state.size - self.removed

    @property
    def rows(self) -> int:
        return self._state.size

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays (capacity included), the keys and the map."""
        state = self._state
        keys = sum(len(k) + 49 for k in state.keys)  # a str of ASCII: 49 bytes + its length
        return (
            state.vectors.nbytes
            + state.sketches.nbytes
            + state.expires.nbytes
            + keys
            + 16 * len(state.keys)  # the lists' pointers (keys, number signatures)
            + _dict_bytes(len(self._rows))
        )

    def _reserve(self, extra: int) -> _Rows:
        state = self._state
        needed = state.size + extra
        capacity = state.vectors.shape[0]
        if needed <= capacity:
            return state
        capacity = max(needed, capacity + capacity // 2, 64)
        size = state.size
        vectors = np.zeros((capacity, self.dimensions), self.dtype)
        vectors[:size] = state.vectors[:size]
        sketches = np.zeros((capacity, self._words), np.uint64)
        sketches[:size] = state.sketches[:size]
        expires = np.zeros(capacity, np.float64)
        expires[:size] = state.expires[:size]
        self._state = _Rows(vectors, sketches, expires, state.keys, state.numbers, size)
        return self._state

    def add(self, key: str, vector: Vectors, expires_at: float, numbers: str = "") -> None:
        self.add_many([key], vector.reshape(1, -1), np.array([expires_at], np.float64), [numbers])

    def add_many(
        self,
        keys: Sequence[str],
        vectors: Vectors,
        expires: npt.NDArray[np.float64],
        numbers: Sequence[str] | None = None,
    ) -> None:
        """Add unit vectors; a key already here is updated (its expiry moved,
        its vector replaced by a new row if it changed)."""
        if vectors.shape != (len(keys), self.dimensions):
            raise ValueError(f"vectors of shape {vectors.shape} for {len(keys)} keys of {self.dimensions}")
        stored = vectors.astype(self.dtype)
        state = self._state
        fresh: dict[str, int] = {}  # key -> its position in this call (the last one wins)
        for i, key in enumerate(keys):
            row = self._rows.get(key)
            if row is not None:
                if np.allclose(state.vectors[row], stored[i], atol=2e-3):
                    state.expires[row] = max(state.expires[row], expires[i])
                    continue
                state.expires[row] = 0.0
                self.removed += 1
                del self._rows[key]
            fresh[key] = i
        if not fresh:
            return
        state = self._reserve(len(fresh))
        start, end = state.size, state.size + len(fresh)
        chosen = list(fresh.values())
        state.vectors[start:end] = stored[chosen]
        state.sketches[start:end] = _sketch(stored[chosen], self._words)
        state.expires[start:end] = expires[chosen]
        for offset, (key, i) in enumerate(fresh.items()):
            state.keys.append(key)
            state.numbers.append(sys.intern(numbers[i]) if numbers else "")
            self._rows[key] = start + offset
        # Published last: a search sees the new rows only once they are whole.
        self._state = _Rows(state.vectors, state.sketches, state.expires, state.keys, state.numbers, end)

    def remove(self, key: str) -> bool:
        row = self._rows.pop(key, None)
        if row is None:
            return False
        self._state.expires[row] = 0.0
        self.removed += 1
        return True

    def expired(self, now: float) -> int:
        """Rows past their expiry and not yet removed (one pass over the expiries)."""
        state = self._state
        return int(np.count_nonzero(state.expires[: state.size] <= now)) - self.removed

    def search(
        self, query: Vectors, now: float, *, limit: int, exact_below: int, candidates: int
    ) -> list[Candidate]:
        """The ``limit`` most similar unexpired rows, best first (any similarity)."""
        state = self._state
        size = state.size
        if size == 0:
            return []
        if size <= exact_below:
            rows = np.arange(size)
            similarities = state.vectors[:size].astype(np.float32) @ query
        else:
            rows = _nearest_sketches(state.sketches[:size], _sketch(query, self._words), candidates)
            similarities = state.vectors[rows].astype(np.float32) @ query
        similarities = np.where(state.expires[rows] > now, similarities, -np.inf)
        order = np.argsort(-similarities)[:limit]
        return [
            Candidate(state.keys[int(rows[i])], float(similarities[i]), state.numbers[int(rows[i])])
            for i in order
            if similarities[i] > -np.inf
        ]

    def compact(self, now: float = 0.0, keep: int | None = None) -> None:
        """Drop removed rows and rows expired by ``now``; with ``keep``, also
        the oldest rows beyond it."""
        state = self._state
        live = np.fromiter(sorted(self._rows.values()), np.int64, len(self._rows))
        expired = live[state.expires[live] <= now]
        for row in expired:
            del self._rows[state.keys[int(row)]]
        live = live[state.expires[live] > now]
        if keep is not None and len(live) > keep:
            for row in live[: len(live) - keep]:
                del self._rows[state.keys[int(row)]]
            live = live[len(live) - keep :]
        keys = [state.keys[int(row)] for row in live]
        numbers = [state.numbers[int(row)] for row in live]
        self._state = _Rows(
            state.vectors[live].copy(),
            state.sketches[live].copy(),
            state.expires[live].copy(),
            keys,
            numbers,
            len(live),
        )
        self._rows = {key: row for row, key in enumerate(keys)}
        self.removed = 0


def _nearest_sketches(
    sketches: npt.NDArray[np.uint64], wanted: npt.NDArray[np.uint64], k: int
) -> npt.NDArray[Any]:
    """Rows of about the ``k`` sketches nearest to ``wanted`` (Hamming distance).

    Distances are small integers, so instead of a partial sort (slow on
    millions of rows) the cut-off distance is read off their histogram, and
    the rows within it taken in one pass. Work goes in chunks, so that each
    numpy call is short: another thread (the event loop) never waits long
    for the interpreter lock.
    """
    size = len(sketches)
    if size <= k:
        return np.arange(size)
    bits = sketches.shape[1] * 64
    distances = np.empty(size, np.uint16)
    counts = np.zeros(bits + 1, np.int64)
    for start in range(0, size, _CHUNK):
        end = min(size, start + _CHUNK)
        chunk = distances[start:end]
        np.sum(np.bitwise_count(sketches[start:end] ^ wanted), axis=1, out=chunk)
        counts += np.bincount(chunk, minlength=bits + 1)
    cutoff = int(np.searchsorted(np.cumsum(counts), k))
    parts = []
    for start in range(0, size, _CHUNK):
        chunk = distances[start : start + _CHUNK]
        parts.append(np.flatnonzero(chunk <= cutoff) + start)
    rows = np.concatenate(parts)
    if len(rows) > 2 * k:  # many ties at the cut-off: keep the nearest k
        rows = rows[np.argpartition(distances[rows], k - 1)[:k]]
    return rows


def _dict_bytes(n: int) -> int:
    # A dict's table: 8 bytes of index and 24 of entry per slot, at 2/3 load.
    return int(n * 1.5 * 32) if n else 0


@dataclass
class _Partition:
    name: str
    index: VectorIndex | None = None
    last_id: str = "-"
    syncing: asyncio.Task[None] | None = None
    added: int = 0  # rows added since the last look at removed and expired ones


class SemanticTier:
    """Partitions of vectors in this process, shared through Redis when it is
    there (``redis``); without Redis, this process's own answers only."""

    def __init__(
        self,
        *,
        redis: RedisTier | None,
        dtype: str,
        max_entries: int,
        thread_above: int,
        exact_below: int = 2048,
        candidates: int = 64,
        limit: int = 4,
    ) -> None:
        self._redis = redis
        self._dtype = dtype
        self._max_entries = max_entries
        self._thread_above = thread_above
        self._exact_below = exact_below
        self._candidates = candidates
        self._limit = limit
        self._partitions: OrderedDict[str, _Partition] = OrderedDict()
        self._rows = 0
        self._version: int | None = None
        self._log = RateLimitedLogger()
        self.sync_errors = 0
        self.records_skipped = 0

    async def start(self) -> None:
        """Start the worker thread that large searches run in: the first use
        of one costs the event loop milliseconds, better paid at open()."""
        await anyio.to_thread.run_sync(int)

    @property
    def entries(self) -> int:
        return sum(len(p.index) for p in self._partitions.values() if p.index is not None)

    def clear(self) -> None:
        """Forget every partition (the namespace moved to a new version)."""
        for partition in self._partitions.values():
            if partition.syncing is not None:
                partition.syncing.cancel()
        self._partitions.clear()
        self._rows = 0

    def _partition(self, name: str) -> _Partition:
        version = self._redis.version if self._redis is not None else None
        if version != self._version:
            self.clear()
            self._version = version
        partition = self._partitions.get(name)
        if partition is None:
            partition = self._partitions[name] = _Partition(name)
        else:
            self._partitions.move_to_end(name)
        return partition

    async def search(self, name: str, query: Vectors, now: float) -> list[Candidate]:
        """Candidates for ``query`` in partition ``name``, best first, after
        catching up with what other processes added."""
        partition = self._partition(name)
        if self._redis is not None:
            await self._catch_up(partition)
        index = partition.index
        if index is None or index.dimensions != query.shape[0]:
            return []
        search = index.search
        kwargs = {"limit": self._limit, "exact_below": self._exact_below, "candidates": self._candidates}
        if index.rows >= self._thread_above:
            return await anyio.to_thread.run_sync(lambda: search(query, now, **kwargs))
        return search(query, now, **kwargs)

    def forget(self, name: str, key: str) -> None:
        """The entry of ``key`` is gone (invalidated or expired): stop matching it."""
        partition = self._partitions.get(name)
        if partition is not None and partition.index is not None:
            partition.index.remove(key)

    async def add(self, name: str, key: str, vector: Vectors, expires_at: float, numbers: str) -> None:
        """Index the answer stored at ``key`` (after it was stored) here and,
        for the other processes, in Redis."""
        self._insert(self._partition(name), [key], vector.reshape(1, -1), np.array([expires_at]), [numbers])
        if self._redis is not None and self._redis.version is not None:
            blob = vector.astype(self._stored_dtype()).tobytes()
            await self._redis.add_vector(
                name, key, blob, self._dtype_code(), expires_at, numbers, self._max_entries
            )

    def _stored_dtype(self) -> np.dtype[Any]:
        return np.dtype(self._dtype).newbyteorder("<")

    def _dtype_code(self) -> str:
        return "f2" if np.dtype(self._dtype).itemsize == 2 else "f4"

    def _insert(
        self,
        partition: _Partition,
        keys: list[str],
        vectors: Vectors,
        expires: npt.NDArray[np.float64],
        numbers: list[str],
    ) -> None:
        index = partition.index
        if index is None or index.dimensions != vectors.shape[1]:
            if index is not None:
                self._rows -= index.rows
            index = partition.index = VectorIndex(vectors.shape[1], dtype=self._dtype)
        before = index.rows
        index.add_many(keys, vectors, expires, numbers)
        self._rows += index.rows - before
        partition.added += index.rows - before
        if partition.added >= max(1024, len(index) // 4):
            # Now and then (not at every add: it is a pass over the rows),
            # drop the removed and expired rows once they are many.
            partition.added = 0
            if index.removed + index.expired(time.time()) > max(1024, len(index) // 2):
                self._rows -= index.rows
                index.compact(time.time())
                self._rows += index.rows
        self._bound()

    def _bound(self) -> None:
        """Keep at most ``max_entries`` rows in this process: least recently
        searched partitions go first (they are read again from Redis when
        next searched), then the oldest rows of the last one."""
        while self._rows > self._max_entries and len(self._partitions) > 1:
            _, oldest = self._partitions.popitem(last=False)
            if oldest.syncing is not None:
                oldest.syncing.cancel()
            if oldest.index is not None:
                self._rows -= oldest.index.rows
        if self._rows > self._max_entries and self._partitions:
            index = next(iter(self._partitions.values())).index
            if index is not None:
                # Down to 90%: room for the next adds before compacting again.
                self._rows -= index.rows
                index.compact(time.time(), keep=self._max_entries * 9 // 10)
                self._rows += index.rows

    async def _catch_up(self, partition: _Partition) -> None:
        syncing = partition.syncing
        if syncing is None or syncing.done():
            syncing = partition.syncing = asyncio.get_running_loop().create_task(self._read_new(partition))
        try:
            await asyncio.shield(syncing)
        except TierError as exc:
            self.sync_errors += 1
            self._log.warning(
                "semantic", "cannot read new vectors from Redis, searching what is here: %s", exc
            )
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not syncing.cancelled() or (task is not None and task.cancelling()):
                raise  # this caller was cancelled (not only the partition's sync, dropped meanwhile)

    async def _read_new(self, partition: _Partition) -> None:
        assert self._redis is not None
        started = time.monotonic()
        while True:
            records = await self._redis.read_vectors(partition.name, partition.last_id, _SYNC_BATCH)
            if not records:
                return
            partition.last_id = records[-1][0]
            keys: list[str] = []
            rows: list[Vectors] = []
            expires: list[float] = []
            numbers: list[str] = []
            for _, fields in records:
                parsed = _parse_record(fields)
                if parsed is None:
                    self.records_skipped += 1
                    continue
                keys.append(parsed[0])
                rows.append(parsed[1])
                expires.append(parsed[2])
                numbers.append(parsed[3])
            if rows:
                # Vectors of the partition's dimensions only (of the first
                # record's, for a new partition): any other is not ours.
                dims = partition.index.dimensions if partition.index is not None else rows[0].shape[0]
                kept = [i for i, row in enumerate(rows) if row.shape[0] == dims]
                self.records_skipped += len(rows) - len(kept)
                if kept:
                    self._insert(
                        partition,
                        [keys[i] for i in kept],
                        np.stack([rows[i] for i in kept]),
                        np.array([expires[i] for i in kept], np.float64),
                        [numbers[i] for i in kept],
                    )
            if len(records) < _SYNC_BATCH:
                return
            if time.monotonic() - started > 0.05:
                await asyncio.sleep(0)  # a long first load must not hold the loop


def _parse_record(fields: dict[bytes, bytes]) -> tuple[str, Vectors, float, str] | None:
    """One stream record, or None if it is not one of ours."""
    try:
        key = fields[b"k"].decode("ascii")
        code = fields[b"d"]
        blob = fields[b"v"]
        expires_at = float(fields[b"x"])
        numbers = fields.get(b"n", b"").decode("ascii")
    except (KeyError, UnicodeDecodeError, ValueError, TypeError, AttributeError):
        return None
    dtype = {b"f2": "<f2", b"f4": "<f4"}.get(code)
    if dtype is None or not blob or len(blob) % np.dtype(dtype).itemsize or not key.isalnum():
        return None
    vector = np.frombuffer(blob, dtype=dtype).astype(np.float32)
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or not 0.5 < norm < 1.5:
        return None
    with contextlib.suppress(FloatingPointError):
        vector = vector / norm
    return key, vector, expires_at, numbers
