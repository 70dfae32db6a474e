"""LLMCache: the coordinator. The only place that knows the order of tiers.

Path of one ``complete()`` call: validate and key the request (no I/O), then
the memory tier, then a flight already running for the key in this process,
then the Redis tier (read inline by the first caller), then the model, in a
task owned by the cache that every caller for the key awaits.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import os
import random
import secrets
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar, cast

import orjson
import redis.asyncio as aioredis
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response
from pydantic import ValidationError
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException

from ._log import RateLimitedLogger, logger
from .cache_policy import DEFAULT_POLICY, AnswerKind, CachePolicy, sample_key
from .crypto import AESGCMSealer
from .embeddings import Embeddings, OpenAIEmbedder, Vectors
from .entry import MISSING, RESPONSES, Entry, _Missing
from .errors import (
    CacheClosedError,
    ConfigurationError,
    CorruptEntryError,
    EmbeddingError,
    InvalidRequestError,
    InvalidResponseError,
    StreamInterruptedError,
    TierError,
    TierUnavailableError,
    WaitTimeoutError,
)
from .flight import RETRY, Coordinator, Flight, Flights, LeaseSettings, failure_message, remote_error
from .invalidation import (
    Invalidation,
    InvalidationBus,
    InvalidationKind,
    Pattern,
    retire,
    validate_key,
    validate_tag,
)
from .policy import Decision, State, decide, early_refresh_at
from .pricing import PriceTable
from .request import (
    ChatRequest,
    SemanticQuery,
    build_chat_request,
    build_response_request,
    request_system,
    semantic_query,
)
from .responses import assemble_response, parse_event, parse_event_json, replay_response, strip_event
from .responses import parse_response as parse_responses_body
from .stats import Stats
from .streaming import CachedStream, ChunkLog, ChunkWriter, assemble, replay
from .tiers.memory import MemoryTier
from .tiers.pubsub import PubSubHub, ShardedSubscriber, Subscriber
from .tiers.redis import HotKeys, RedisTier, connect, validate_namespace
from .tiers.semantic import SemanticConfig, SemanticTier
from .upstream import OpenAIUpstream, Upstream, parse_response, upstream_scope

if TYPE_CHECKING:
    from openai import AsyncOpenAI

    from .wrap import CachedOpenAI

__all__ = ["CacheControl", "CacheResult", "LLMCache", "ResponseResult", "Source"]

Seconds = float | timedelta

# Accounted size of a memory-tier entry: the parsed response takes several
# times the bytes of its JSON; this factor keeps memory_max_bytes honest.
_MEMORY_SIZE_FACTOR: Final = 4
_MEMORY_ENTRY_OVERHEAD: Final = 512
_VERSION_RETRY_INTERVAL: Final = 1.0
_DRAW_MASK: Final = 2**52 - 1


def _seconds(
    value: Seconds | None,
    name: str,
    *,
    positive: bool = False,
    error: type[ValueError] = ConfigurationError,
) -> float | None:
    if value is None:
        return None
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"{name}: expected seconds (float or timedelta), got {value!r}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0 or (positive and seconds == 0):
        bound = "> 0" if positive else ">= 0"
        raise error(f"{name}: must be finite and {bound} seconds, got {value!r}")
    return seconds


def _count(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(f"{name}: expected an integer >= 0, got {value!r}")
    return value


class Source(enum.StrEnum):
    """Where an answer came from."""

    MEMORY = "memory"
    REDIS = "redis"
    SEMANTIC = "semantic"
    UPSTREAM = "upstream"


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheControl:
    """Per-request cache settings. Invalid values raise :class:`InvalidRequestError`.

    - ``ttl``: fresh window for an answer written by this request (default: the cache's).
    - ``stale_ttl``: how long after ``ttl`` that answer may still be served stale
      while it is refreshed (default: the cache's).
    - ``max_age``: serve a cached answer only if it is at most this old (seconds);
      an older one is replaced before this caller gets an answer.
    - ``tags``: labels stored with the answer, for invalidation by tag.
    - ``no_cache``: do not look up; always ask the model (the answer is still stored).
    - ``no_store``: do not store this request's answer.
    - ``semantic``: False keeps this request out of the semantic tier: it is
      answered only by an exact match, and its answer is not indexed.
    - ``policy``: the :class:`~aiollmcache.cache_policy.CachePolicy` for this
      request, instead of the cache's.
    """

    ttl: Seconds | None = None
    stale_ttl: Seconds | None = None
    max_age: Seconds | None = None
    tags: Sequence[str] | None = ()
    no_cache: bool = False
    no_store: bool = False
    semantic: bool = True
    policy: CachePolicy | None = None

    def __post_init__(self) -> None:
        bad = InvalidRequestError
        if self.policy is not None and not isinstance(self.policy, CachePolicy):
            raise InvalidRequestError(
                f"CacheControl.policy: expected a CachePolicy, got {type(self.policy).__name__}"
            )
        object.__setattr__(self, "ttl", _seconds(self.ttl, "CacheControl.ttl", positive=True, error=bad))
        object.__setattr__(self, "max_age", _seconds(self.max_age, "CacheControl.max_age", error=bad))
        object.__setattr__(self, "stale_ttl", _seconds(self.stale_ttl, "CacheControl.stale_ttl", error=bad))
        if self.tags is None:
            object.__setattr__(self, "tags", ())
        if not isinstance(self.tags, (list, tuple, frozenset, set)):
            raise InvalidRequestError(f"CacheControl.tags: expected a list of strings, got {self.tags!r}")
        try:
            tags = tuple(dict.fromkeys(validate_tag(tag) for tag in self.tags))
        except InvalidRequestError as exc:
            raise InvalidRequestError(f"CacheControl.tags: {exc}") from None
        object.__setattr__(self, "tags", tags)


_DEFAULT_CONTROL: Final = CacheControl()
# The policy of a request its policy's ``cacheable`` predicate kept out of the
# cache, and of a Responses request that depends on state the provider holds.
_UNCACHEABLE: Final = CachePolicy()
_PROVIDER_STATE: Final = CachePolicy()
# A cached answer the request's policy would not have stored: not served.
_REFUSED: Final = Decision(State.EXPIRED, refresh=False)
# A stream copied to Redis is kept this long after its end, for followers
# in other processes still reading it.
_STREAM_KEPT_MS: Final = 30_000
_REFUSED_REFRESHES_KEPT: Final = 4096
_STOPPED_ELSEWHERE: Final = "the process streaming this answer stopped before its end"
_T = TypeVar("_T")


def _control_seconds(value: Seconds | None, default: _T) -> float | _T:
    # CacheControl.__post_init__ has already turned timedeltas into float seconds.
    return default if value is None else cast(float, value)


# -- the two APIs: chat completions and responses ------------------------------


def _parse(api: str, body: bytes | Mapping[str, Any]) -> tuple[bytes, Any, bool]:
    """The answer's JSON, the answer, and whether it passed validation (only a
    Responses answer may not: the caller gets it, the cache does not keep it)."""
    if api == RESPONSES:
        return parse_responses_body(body)
    return (*parse_response(body), True)


def _replay_data(api: str, response: Any, include_usage: bool = True) -> Iterator[dict[str, Any]]:
    """A whole answer as the records a stream of it carries."""
    return replay_response(response) if api == RESPONSES else replay(response, include_usage=include_usage)


def _chunk(api: str, data: Mapping[str, Any]) -> Any:
    """A streamed record typed: a ``ChatCompletionChunk``, or a Responses event."""
    if api == RESPONSES:
        return parse_event(data)
    try:
        return ChatCompletionChunk.model_validate(data)
    except ValidationError as exc:
        raise InvalidResponseError(f"upstream streamed something that is not a chunk: {exc}") from exc


def _chunk_json(api: str, data: bytes) -> Any:
    """A record read back from Redis; raises ValidationError if it is not one."""
    return parse_event_json(data) if api == RESPONSES else ChatCompletionChunk.model_validate_json(data)


def _events(entry: Entry, include_usage: bool = True) -> Iterator[Any]:
    for data in _replay_data(entry.api, entry.response, include_usage):
        yield _chunk(entry.api, data)


class CacheResult:
    """An answer and where it came from (one object per call).

    ``response`` (the ``ChatCompletion``) is built on first access and shared
    with other callers served from the same entry: treat it as read-only
    (``model_copy(deep=True)`` to modify). ``text`` does not need it built.
    """

    __slots__ = ("_entry", "age", "coalesced", "key", "similarity", "source", "stale")

    def __init__(
        self,
        entry: Entry,
        source: Source,
        age: float,
        coalesced: bool = False,
        stale: bool = False,
        similarity: float | None = None,
    ) -> None:
        self._entry = entry
        self.source = source
        self.key = entry.key
        self.age = age
        self.coalesced = coalesced
        self.stale = stale
        self.similarity = similarity

    @property
    def response(self) -> ChatCompletion:
        """The provider's full response."""
        return cast(ChatCompletion, self._entry.response)

    @property
    def text(self) -> str:
        """The first choice's message content ('' when it has none, e.g. tool calls only)."""
        return self._entry.text

    @property
    def json(self) -> bytes:
        """The response as the provider sent it, JSON bytes."""
        return self._entry.raw

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(source={self.source.value!r}, key={self.key!r}, age={self.age:.3f}, "
            f"coalesced={self.coalesced}, stale={self.stale}, text={self.text[:40]!r})"
        )


class ResponseResult(CacheResult):
    """An answer of the Responses API and where it came from: ``response`` is
    the ``Response`` (shared, read-only as for :class:`CacheResult`),
    ``output_text`` (also ``text``) its text."""

    __slots__ = ()

    @property
    def response(self) -> Response:  # type: ignore[override]
        """The provider's full ``Response``."""
        return cast(Response, self._entry.response)

    @property
    def output_text(self) -> str:
        """The text of every output message, as ``Response.output_text``."""
        return self._entry.text


def _result_type(entry: Entry) -> type[CacheResult]:
    return ResponseResult if entry.api == RESPONSES else CacheResult


_NEW, _OPEN, _CLOSED = "new", "open", "closed"

# What a flight hands its callers: the entry, where it came from, whether
# it was computed by another process this one waited on, and, for a semantic
# match, its similarity.
_Outcome = tuple[Entry, "Source", bool, float | None]


class LLMCache:
    """A tiered cache in front of an OpenAI-compatible API: chat completions
    (:meth:`complete`, :meth:`stream`) and the Responses API (:meth:`respond`,
    :meth:`respond_stream`).

    Lookups go memory tier, then Redis (when configured), then the model. Without
    ``redis_url``/``redis`` the cache is memory-only and private to this process.

    Guarantees:

    - Concurrent identical requests cost one upstream call, in a process and
      across processes sharing the Redis (a lease per key, waiters woken by
      pub/sub); a cancelled caller never cancels the call others wait on.
    - An answer is stored only when the upstream call succeeded and returned a
      valid chat completion; the SDK's errors reach every waiting caller in
      this process unchanged (``RemoteUpstreamError`` in other processes).
    - Bytes in Redis that are not a valid entry for the key are a miss (removed,
      counted), never an exception.
    - Past ``ttl`` and within ``stale_ttl`` an answer is served at once
      (``stale=True``) while one background refresh per key replaces it.
    - When Redis fails, calls are answered from memory and the model; failures
      are counted in ``stats()`` and logged at most every few seconds.
    - :meth:`invalidate` reaches the memory tier of every process sharing the
      Redis: by message at once, or, when a message is lost, within
      ``sync_interval + 2 * redis_timeout`` for a process that can reach Redis.

    Not guaranteed: entries written in Redis by other processes are not pushed
    into this process's memory tier, so one process may serve its memory copy
    until that copy is stale or expired (or invalidated).

    Settings (keyword-only; times in seconds or ``timedelta``): ``ttl``,
    ``stale_ttl``; ``memory_max_entries`` (0 disables the memory tier),
    ``memory_max_bytes``; ``max_entry_bytes`` (larger answers are not stored),
    ``compress_above``; ``redis_timeout`` (budget of every Redis operation),
    ``redis_max_connections``; ``close_timeout``; single-flight: ``lease_ttl``,
    ``lease_max_lifetime``, ``max_wait``, ``on_wait_timeout``; freshness:
    ``xfetch_beta`` (0: no early refresh), ``max_refreshes``, ``hot_hits``
    (0: off), ``hot_window``, ``hot_max_age``; invalidation: ``sync_interval``
    (how often each process checks for invalidations it missed); Redis
    outages: ``breaker_failures`` (failures in a row that make the cache skip
    Redis, 0: never), ``breaker_probe_interval``; ``encryption_key`` (16, 24
    or 32 bytes: answers sealed with AES-GCM in Redis); ``redis_batching``
    (concurrent Redis reads share a round trip); ``semantic`` (a
    ``SemanticConfig``: paraphrases answered from the cache); ``prices``
    (``{model prefix: (input, output) USD per million tokens}``, for
    ``stats()["cost_saved_usd"]``); ``policy`` (a ``CachePolicy``: which
    answers are stored and served, sample buckets); ``random_seed`` (seeds the
    cache's random draws: which answer of a sample bucket is served, early
    refresh). See the README and ``docs/``.
    """

    def __init__(
        self,
        *,
        redis_url: str | None = None,
        redis: aioredis.Redis | RedisCluster | None = None,
        openai: AsyncOpenAI | None = None,
        upstream: Upstream | None = None,
        model: str | None = None,
        namespace: str = "default",
        ttl: Seconds = 3600.0,
        stale_ttl: Seconds = 0.0,
        memory_max_entries: int = 10_000,
        memory_max_bytes: int = 64 * 2**20,
        max_entry_bytes: int = 4 * 2**20,
        compress_above: int = 8 * 2**10,
        redis_timeout: Seconds = 0.5,
        redis_max_connections: int = 64,
        close_timeout: Seconds = 10.0,
        lease_ttl: Seconds = 10.0,
        lease_max_lifetime: Seconds = 600.0,
        max_wait: Seconds = 300.0,
        on_wait_timeout: Literal["raise", "upstream"] = "raise",
        xfetch_beta: float = 1.0,
        max_refreshes: int = 64,
        hot_hits: int = 0,
        hot_window: Seconds = 60.0,
        hot_max_age: Seconds = 86_400.0,
        sync_interval: Seconds = 1.0,
        breaker_failures: int = 5,
        breaker_probe_interval: Seconds = 1.0,
        encryption_key: bytes | None = None,
        redis_batching: bool = True,
        semantic: SemanticConfig | None = None,
        prices: Mapping[str, tuple[float, float]] | None = None,
        policy: CachePolicy | None = None,
        random_seed: int | None = None,
    ) -> None:
        if redis_url is not None and redis is not None:
            raise ConfigurationError("pass redis_url= or redis=, not both")
        if openai is not None and upstream is not None:
            raise ConfigurationError("pass openai= or upstream=, not both")
        if openai is not None and not hasattr(openai, "chat"):
            raise ConfigurationError(f"openai: expected an AsyncOpenAI client, got {type(openai).__name__}")
        if upstream is not None and not callable(upstream):
            raise ConfigurationError(f"upstream: expected an async callable, got {type(upstream).__name__}")
        if redis is not None and not isinstance(redis, (aioredis.Redis, RedisCluster)):
            raise ConfigurationError(
                f"redis: expected a redis.asyncio.Redis or RedisCluster, got {type(redis).__name__}"
            )
        if semantic is not None and not isinstance(semantic, SemanticConfig):
            raise ConfigurationError(f"semantic: expected a SemanticConfig, got {type(semantic).__name__}")
        if semantic is not None and semantic.embedder is None and openai is None:
            raise ConfigurationError(
                "semantic: no embedder; pass openai= (its embeddings endpoint is used) "
                "or SemanticConfig(embedder=...)"
            )
        if policy is not None and not isinstance(policy, CachePolicy):
            raise ConfigurationError(f"policy: expected a CachePolicy, got {type(policy).__name__}")
        if random_seed is not None and (isinstance(random_seed, bool) or not isinstance(random_seed, int)):
            raise ConfigurationError(f"random_seed: expected an integer, got {random_seed!r}")
        self._policy = policy or DEFAULT_POLICY
        self._rng = random.Random(random_seed)
        if model is not None and (not isinstance(model, str) or not model):
            raise ConfigurationError(f"model: expected a non-empty string, got {model!r}")
        self._namespace = validate_namespace(namespace)
        self._ttl = _seconds(ttl, "ttl", positive=True) or 0.0
        self._stale_ttl = _seconds(stale_ttl, "stale_ttl") or 0.0
        self._close_timeout = _seconds(close_timeout, "close_timeout") or 0.0
        timeout = _seconds(redis_timeout, "redis_timeout", positive=True) or 0.0
        max_connections = _count(redis_max_connections, "redis_max_connections")
        if max_connections == 0:
            raise ConfigurationError("redis_max_connections: must be at least 1")
        self._max_entry_bytes = _count(max_entry_bytes, "max_entry_bytes")
        self._model = model
        self._memory: MemoryTier[Entry] = MemoryTier(
            max_entries=_count(memory_max_entries, "memory_max_entries"),
            max_bytes=_count(memory_max_bytes, "memory_max_bytes"),
        )
        if redis_url is not None:
            if not isinstance(redis_url, str):
                raise ConfigurationError(f"redis_url: expected a string, got {redis_url!r}")
            try:
                redis = connect(redis_url, max_connections=max_connections, timeout=timeout)
            except (ValueError, RedisClusterException) as exc:  # e.g. a cluster has no database 3
                raise ConfigurationError(f"redis_url: {exc}") from exc
        self._redis: RedisTier | None = None
        sealer = AESGCMSealer(encryption_key) if encryption_key is not None else None
        hot_keys = self._hot_keys(hot_hits, hot_window, hot_max_age)
        self._hot_sliding = redis is not None and hot_keys is not None
        if redis is not None:
            self._redis = RedisTier(
                redis,
                namespace=namespace,
                owns_client=redis_url is not None,
                max_connections=max_connections,
                timeout=timeout,
                compress_above=_count(compress_above, "compress_above"),
                max_entry_bytes=self._max_entry_bytes,
                hot=hot_keys,
                breaker_failures=_count(breaker_failures, "breaker_failures"),
                breaker_probe_interval=_seconds(
                    breaker_probe_interval, "breaker_probe_interval", positive=True
                )
                or 1.0,
                sealer=sealer,
                batching=bool(redis_batching),
            )
        if on_wait_timeout not in ("raise", "upstream"):
            raise ConfigurationError(
                f"on_wait_timeout: expected 'raise' or 'upstream', got {on_wait_timeout!r}"
            )
        self._lease_settings = LeaseSettings(
            ttl=_seconds(lease_ttl, "lease_ttl", positive=True) or 0.0,
            max_lifetime=_seconds(lease_max_lifetime, "lease_max_lifetime", positive=True) or 0.0,
            max_wait=_seconds(max_wait, "max_wait") or 0.0,
            on_wait_timeout=on_wait_timeout,
        )
        if (
            isinstance(xfetch_beta, bool)
            or not isinstance(xfetch_beta, (int, float))
            or not (0 <= xfetch_beta < math.inf)
        ):
            raise ConfigurationError(f"xfetch_beta: expected a finite number >= 0, got {xfetch_beta!r}")
        self._xfetch_beta = float(xfetch_beta)
        self._seed = self._rng.getrandbits(64)
        self._max_refreshes = _count(max_refreshes, "max_refreshes")
        self._refreshing: dict[str, asyncio.Task[None]] = {}
        # Entries whose refresh the policy refused (key -> created_at, and
        # when to try again). Bounded: the oldest are forgotten first.
        self._refresh_refused: dict[str, tuple[float, float]] = {}
        self._version_retry_at = 0.0
        self._sync_interval = _seconds(sync_interval, "sync_interval", positive=True) or 0.0
        self._epoch = 0  # bumped by every invalidation applied here
        self._origin = secrets.token_hex(8)
        self._bus: InvalidationBus | None = None
        self._listeners: list[Callable[[Invalidation], object]] = []
        self._subscriber: PubSubHub | None = None
        self._coordinator: Coordinator | None = None
        self._redis_timeout = timeout
        self._upstream: Upstream | None = OpenAIUpstream(openai) if openai is not None else upstream
        self._upstream_scope = upstream_scope(self._upstream)
        self._owned_openai: AsyncOpenAI | None = None
        self._flights: Flights[_Outcome] = Flights()
        self._streams: dict[str, ChunkLog] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stats = Stats()
        self._prices = PriceTable(prices)
        self._semantic_config = semantic
        self._embeddings: Embeddings | None = None
        self._semantic: SemanticTier | None = None
        self._semantic_down_until = 0.0
        if semantic is not None:
            if semantic.embedder is not None:
                embedder = semantic.embedder
            else:
                assert openai is not None
                embedder = OpenAIEmbedder(openai, semantic.model, dimensions=semantic.dimensions)
            self._embeddings = Embeddings(
                embedder,
                cache_size=semantic.cache_size,
                timeout=semantic.timeout,
                window=semantic.batch_window,
            )
            self._semantic = SemanticTier(
                redis=self._redis,
                dtype=semantic.dtype,
                max_entries=semantic.max_entries,
                thread_above=semantic.thread_above,
            )
        self._log = RateLimitedLogger()
        self._state = _NEW
        self._open_lock: asyncio.Lock | None = None
        self._closed_event: asyncio.Event | None = None

    def _hot_keys(self, hits: int, window: Seconds, max_age: Seconds) -> HotKeys | None:
        if _count(hits, "hot_hits") == 0:
            return None
        return HotKeys(
            hits=hits,
            window_ms=round((_seconds(window, "hot_window", positive=True) or 0.0) * 1000),
            extend_ms=round((self._ttl + self._stale_ttl) * 1000),
            max_age_ms=round((_seconds(max_age, "hot_max_age", positive=True) or 0.0) * 1000),
        )

    # -- construction from the environment ---------------------------------

    @classmethod
    def from_env(cls, **overrides: Any) -> LLMCache:
        """Build a cache from ``AIOLLMCACHE_REDIS_URL``, ``AIOLLMCACHE_NAMESPACE``,
        ``OPENAI_API_KEY`` and ``OPENAI_BASE_URL``; keyword arguments win.

        When neither ``openai=`` nor ``upstream=`` is given and ``OPENAI_API_KEY``
        or ``OPENAI_BASE_URL`` is set (a local OpenAI-compatible server may need
        no key), an ``AsyncOpenAI`` client is built; the cache owns it and
        closes it in ``aclose()``.
        """
        env = os.environ
        kwargs: dict[str, Any] = {}
        if url := env.get("AIOLLMCACHE_REDIS_URL"):
            kwargs["redis_url"] = url
        if ns := env.get("AIOLLMCACHE_NAMESPACE"):
            kwargs["namespace"] = ns
        kwargs.update(overrides)
        owned = None
        api_key, base_url = env.get("OPENAI_API_KEY"), env.get("OPENAI_BASE_URL")
        if "openai" not in kwargs and "upstream" not in kwargs and (api_key or base_url):
            from openai import AsyncOpenAI

            owned = AsyncOpenAI(api_key=api_key or "unused", base_url=base_url or None)
            kwargs["openai"] = owned
        cache = cls(**kwargs)
        cache._owned_openai = owned
        return cache

    # -- lifecycle ------------------------------------------------------------

    async def __aenter__(self) -> LLMCache:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Connect the Redis tier. Idempotent; ``complete()`` calls it when needed.

        Redis being unreachable here is not an error: the tier is retried on use.
        """
        if self._state == _OPEN:
            return
        if self._state == _CLOSED:
            raise CacheClosedError("this LLMCache is closed")
        if self._open_lock is None:
            self._open_lock = asyncio.Lock()
        async with self._open_lock:
            if self._state != _NEW:
                return
            if self._redis is not None:
                client = self._redis.client
                self._subscriber = (
                    ShardedSubscriber(client, timeout=self._redis_timeout)
                    if isinstance(client, RedisCluster)
                    else Subscriber(client, timeout=self._redis_timeout)
                )
                self._coordinator = Coordinator(
                    self._redis, self._subscriber, self._lease_settings, self._spawn_cleanup
                )
                self._bus = InvalidationBus(
                    self._redis,
                    self._subscriber,
                    interval=self._sync_interval,
                    origin=self._origin,
                    apply=self._apply,
                )
                await self._bus.start()
            if self._semantic is not None:
                await self._semantic.start()
            if self._state == _NEW:  # not closed meanwhile
                self._state = _OPEN

    async def aclose(self) -> None:
        """Close the cache: wait up to ``close_timeout`` for upstream calls in
        progress (their callers still get answers), cancel what remains, close
        the connections this cache opened. Idempotent: a second call returns
        when the first has finished."""
        if self._state == _CLOSED:
            if self._closed_event is not None:
                await self._closed_event.wait()
            return
        self._state = _CLOSED
        self._closed_event = asyncio.Event()
        try:
            await self._shut_down()
        finally:
            self._closed_event.set()

    async def _shut_down(self) -> None:
        if self._open_lock is not None:
            async with self._open_lock:  # an open() in progress finishes first
                pass
        if self._bus is not None:
            await self._bus.aclose()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=self._close_timeout)
            for task in pending:
                task.cancel()
            # Cancelled holders give their leases back in tasks of their own.
            while self._tasks:
                await asyncio.wait(set(self._tasks), timeout=self._redis_timeout * 2 + 1)
                for task in self._tasks:
                    task.cancel()
        for log in list(self._streams.values()):
            log.fail(CacheClosedError("this LLMCache was closed while the stream was in flight"))
        self._streams.clear()
        if self._embeddings is not None:
            await self._embeddings.aclose()
        if self._semantic is not None:
            self._semantic.clear()
        self._memory.clear()
        if self._subscriber is not None:
            await self._subscriber.aclose()
        if self._redis is not None:
            try:
                await self._redis.aclose()
            except TierUnavailableError as exc:
                logger.warning("closing the Redis connection failed: %s", exc)
        if self._owned_openai is not None:
            await self._owned_openai.close()

    @property
    def closed(self) -> bool:
        return self._state == _CLOSED

    @property
    def namespace(self) -> str:
        return self._namespace

    @property
    def model(self) -> str | None:
        """The default model, used when a request names none."""
        return self._model

    # -- public API -------------------------------------------------------------

    async def complete(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        cache: CacheControl | None = None,
        **params: Any,
    ) -> CacheResult:
        """Answer a chat request from the cache, or from the model and cache it.

        ``params`` are ``chat.completions.create`` parameters (``model``,
        ``temperature``, ``tools``...). Raises :class:`InvalidRequestError`
        before any I/O when the request is malformed; the model API's own
        exceptions reach the caller unchanged.
        """
        if params and params.get("stream"):
            raise InvalidRequestError("stream: complete() returns whole answers; pass stream=False")
        if cache is not None and not isinstance(cache, CacheControl):
            raise InvalidRequestError(f"cache: expected a CacheControl, got {type(cache).__name__}")
        request = build_chat_request(
            messages, params, default_model=self._model, upstream_scope=self._upstream_scope
        )
        return await self._complete_timed(request, cache, self._upstream)

    async def _complete_timed(
        self, request: ChatRequest, control: CacheControl | None, upstream: Upstream | None
    ) -> CacheResult:
        started = time.perf_counter()
        result = await self._complete(request, control, upstream)
        self._stats.observe(result.source.value, time.perf_counter() - started)
        return result

    async def respond(self, *, cache: CacheControl | None = None, **params: Any) -> ResponseResult:
        """Answer a Responses API request (``client.responses.create``
        parameters: ``input``, ``instructions``, ``model``, ``tools``,
        ``text``, ``reasoning``...) from the cache, or from the model and cache
        it. The result has the ``Response`` and its ``output_text``.

        Requests whose answer depends on state the provider holds
        (``previous_response_id``, ``conversation``, ``background``, a stored
        ``prompt``, tools the provider runs such as web or file search) go to
        the model every time, unless the policy says ``provider_state=True``.
        Raises :class:`InvalidRequestError` before any I/O when the request is
        malformed; the model API's own exceptions reach the caller unchanged.
        """
        if params.get("stream"):
            raise InvalidRequestError("stream: respond() returns whole answers; call respond_stream()")
        params.pop("stream", None)
        request = self._response_request(params, cache, self._upstream)
        return cast(ResponseResult, await self._complete_timed(request, cache, self._upstream))

    def respond_stream(self, *, cache: CacheControl | None = None, **params: Any) -> CachedStream:
        """Answer a Responses API request as a stream of the SDK's typed events
        (``ResponseStreamEvent``): a cached answer is replayed as the events
        the API sends for it; a stream in flight for the same request, here or
        in another process, is joined; else the model's events are passed on
        as they come and the answer stored when the stream ends well."""
        if params.get("stream") is False:
            raise InvalidRequestError("stream: respond_stream() streams; call respond() for a whole answer")
        params.pop("stream", None)
        request = self._response_request(params, cache, self._upstream)
        return self._stream(request, cache, self._upstream)

    def _response_request(
        self, params: Mapping[str, Any], control: object, upstream: Upstream | None
    ) -> ChatRequest:
        if control is not None and not isinstance(control, CacheControl):
            raise InvalidRequestError(f"cache: expected a CacheControl, got {type(control).__name__}")
        if upstream is not None and not callable(getattr(upstream, "responses", None)):
            raise ConfigurationError(
                "this upstream cannot answer Responses API requests (no responses() method); pass openai="
            )
        return build_response_request(
            params, default_model=self._model, upstream_scope=upstream_scope(upstream)
        )

    def _request(self, messages: object, params: Mapping[str, Any], upstream: Upstream) -> ChatRequest:
        """A validated request keyed for ``upstream`` (the proxy's)."""
        return build_chat_request(
            messages, params, default_model=self._model, upstream_scope=upstream_scope(upstream)
        )

    def key_for(
        self, messages: Sequence[Mapping[str, Any]], *, model: str | None = None, **params: Any
    ) -> str:
        """The cache key of a request, as ``complete()`` would compute it (no I/O):
        what ``invalidate(key=...)`` takes.

        Pass the same messages and parameters as to ``complete()`` (without
        ``cache=``). The key also depends on the upstream (its base URL): ask
        a cache built with the same ``openai=`` client as the one that stored
        the answer.
        """
        if "cache" in params:
            raise InvalidRequestError("key_for: cache= does not change the key; leave it out")
        if model is not None:
            params["model"] = model
        return build_chat_request(
            messages, params, default_model=self._model, upstream_scope=self._upstream_scope
        ).key

    def key_for_response(self, **params: Any) -> str:
        """The cache key of a Responses API request, as :meth:`respond` would
        compute it (no I/O): what ``invalidate(key=...)`` takes."""
        if "cache" in params:
            raise InvalidRequestError("key_for_response: cache= does not change the key; leave it out")
        params.pop("stream", None)
        return build_response_request(
            params, default_model=self._model, upstream_scope=self._upstream_scope
        ).key

    async def invalidate(
        self,
        *,
        key: str | None = None,
        tag: str | None = None,
        pattern: Pattern | None = None,
        everything: bool = False,
    ) -> int | None:
        """Retire cached answers in Redis and in every process's memory tier.

        Give exactly one of: ``key`` (a cache key, as ``CacheResult.key`` or
        :meth:`key_for`), ``tag`` (answers stored with ``CacheControl(tags=...)``),
        ``pattern`` (a :class:`Pattern` on the request's model, system prompt
        or key) or ``everything=True`` (the whole namespace, by a version bump).

        Returns how many entries were deleted from Redis, or None for
        ``everything`` (retired entries are left to expire); without Redis,
        how many were dropped from the memory tier.
        When it returns, this process serves none of them and every other
        process is being told; see ``docs/invalidation.md`` for how soon they
        stop. Raises :class:`InvalidRequestError` before any I/O for bad
        arguments, and :class:`TierError` when Redis fails: the invalidation
        may then be partly done (this process's memory tier is cleared of what
        it names regardless); call it again.
        """
        invalidation = self._invalidation(key, tag, pattern, everything)
        if self._state != _OPEN:
            await self.open()
        self._stats.invalidations += 1
        tier, bus = self._redis, self._bus
        if tier is None or bus is None:
            return self._apply(invalidation)
        count: int | None = None
        try:
            if tier.version is None:
                await tier.load_version()
            if invalidation.kind is InvalidationKind.EVERYTHING:
                version = await tier.bump_version()
                invalidation = Invalidation(InvalidationKind.EVERYTHING, version=version)
            else:
                count = await retire(tier, invalidation)
        finally:
            self._apply(invalidation)  # after Redis: a refill from there finds nothing
        await bus.publish(invalidation)
        return count

    @staticmethod
    def _invalidation(key: object, tag: object, pattern: object, everything: object) -> Invalidation:
        if not isinstance(everything, bool):
            raise InvalidRequestError(f"everything: expected True or False, got {everything!r}")
        named = (("key", key), ("tag", tag), ("pattern", pattern))
        given = [name for name, value in named if value is not None]
        if everything:
            given.append("everything")
        if len(given) != 1:
            raise InvalidRequestError(
                "invalidate: give exactly one of key=, tag=, pattern=, everything=True; "
                f"got {', '.join(given) or 'none'}"
            )
        if key is not None:
            return Invalidation(InvalidationKind.KEY, key=validate_key(key))
        if tag is not None:
            return Invalidation(InvalidationKind.TAG, tag=validate_tag(tag))
        if pattern is not None:
            if not isinstance(pattern, Pattern):
                raise InvalidRequestError(
                    f"pattern: expected a Pattern(model=..., system=..., key=...), got {pattern!r}"
                )
            return Invalidation(InvalidationKind.PATTERN, pattern=pattern)
        return Invalidation(InvalidationKind.EVERYTHING)

    async def sync(self) -> bool:
        """Catch up with invalidations made by other processes now, instead of
        at the next periodic check. True when every invalidation published
        before the call has been applied here; False when Redis cannot be
        asked (nothing to do without Redis: True)."""
        if self._state != _OPEN:
            await self.open()
        if self._bus is None:
            return True
        return await self._bus.check()

    def add_invalidation_listener(self, listener: Callable[[Invalidation], object]) -> None:
        """Call ``listener(invalidation)`` each time this process applies one
        (made here or elsewhere), after its memory tier has dropped what it
        names: to drop what you derived from cached answers too. It runs on the
        event loop and must not block; its exceptions are logged."""
        self._listeners.append(listener)

    def remove_invalidation_listener(self, listener: Callable[[Invalidation], object]) -> None:
        self._listeners.remove(listener)

    def _apply(self, invalidation: Invalidation) -> int:
        """Drop what ``invalidation`` names from the memory tier; return how many."""
        self._epoch += 1
        kind = invalidation.kind
        if kind is InvalidationKind.KEY:
            count = sum(self._memory.delete(key) for key in invalidation.keys)
        elif kind is InvalidationKind.EVERYTHING or kind is InvalidationKind.RESYNC:
            count = self._memory.clear()
            if kind is InvalidationKind.EVERYTHING and self._semantic is not None:
                self._semantic.clear()
        else:
            count = self._memory.evict(invalidation.matches)
        self._stats.memory_invalidated += count
        for listener in list(self._listeners):
            try:
                listener(invalidation)
            except Exception:
                logger.exception("invalidation listener %r failed", listener)
        return count

    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters (plain data, safe to serialise)."""
        snapshot = self._stats.snapshot()
        if self._coordinator is not None:
            lease = self._coordinator.stats
            snapshot["stores"] += lease.committed
            snapshot.update({f"lease_{name}": value for name, value in asdict(lease).items()})
        if self._redis is not None:
            breaker = self._redis.breaker
            snapshot["redis_breaker_open"] = int(breaker.open)
            snapshot["redis_breaker_opened"] = breaker.opened
            snapshot["redis_skipped"] = breaker.skipped
            if self._redis.cluster:
                snapshot["redis_nodes_skipped"] = self._redis.nodes_skipped
                snapshot["redis_node_breaker_opened"] = self._redis.node_breakers_opened
        if self._bus is not None:
            sync = self._bus.stats
            snapshot.update({f"invalidations_{name}": value for name, value in asdict(sync).items()})
        if self._embeddings is not None and self._semantic is not None:
            embeddings = self._embeddings
            snapshot["semantic_entries"] = self._semantic.entries
            snapshot["embedding_calls"] = embeddings.calls
            snapshot["embedding_texts"] = embeddings.texts
            snapshot["embedding_cache_hits"] = embeddings.cache_hits
            snapshot["embedding_failures"] = embeddings.failures
            snapshot["embedding_seconds"] = round(embeddings.seconds, 6)
        snapshot["memory_entries"] = len(self._memory)
        snapshot["memory_bytes"] = self._memory.nbytes
        snapshot["memory_evictions"] = self._memory.evictions
        snapshot["inflight"] = len(self._flights)
        return snapshot

    def wrap(self, client: AsyncOpenAI) -> CachedOpenAI:
        """Return a drop-in for ``client`` whose ``chat.completions.create`` is cached."""
        from .wrap import CachedOpenAI

        return CachedOpenAI(self, client)

    # -- the path of one call -----------------------------------------------

    async def _complete(
        self, request: ChatRequest, control: CacheControl | None, upstream: Upstream | None
    ) -> CacheResult:
        control = control or _DEFAULT_CONTROL
        policy = control.policy or self._policy
        if policy.cacheable is not None or request.state is not None:
            control = self._control(request, control)
        if self._state != _OPEN:
            await self.open()
        if upstream is None:
            raise ConfigurationError("no upstream: pass openai= or upstream= to LLMCache")
        self._stats.requests += 1
        if control.no_cache:
            entry = await self._compute(request, control, upstream)
            return self._computed(entry)
        if policy.samples > 1 and (bucket := policy.bucket(request.params)) > 1:
            picked = await self._pick_sample(request, control, bucket)
            if isinstance(picked, ChatRequest):
                request = picked
            else:
                entry, source, now, decision, member = picked
                return self._serve(
                    entry,
                    source,
                    now,
                    decision,
                    None if control.no_store else (member, upstream, control.policy),
                )
        key = request.key
        # Refreshing a stale answer stores it: not on behalf of a no_store request.
        refresh = None if control.no_store else (request, upstream, control.policy)
        while True:
            now = time.time()
            cached = self._memory.get(key)
            if cached is not MISSING:
                decision = self._decide(cached, now, control)
                if decision.servable:
                    self._stats.hits_memory += 1
                    return self._serve(cached, Source.MEMORY, now, decision, refresh)

            streaming = self._streams.get(key)
            if streaming is not None and streaming.error is None:
                # The same request is being streamed here: its answer will do.
                streaming.readers += 1
                try:
                    async for _ in streaming.follow():
                        pass
                except StreamInterruptedError:
                    continue
                finally:
                    streaming.leave()
                if streaming.entry is not None:
                    now = time.time()
                    decision = self._decide(streaming.entry, now, control, cached=False)
                    if decision.servable:
                        self._stats.coalesced += 1
                        return self._serve(streaming.entry, streaming.source, now, decision, refresh, True)
                continue

            flight = self._flights.get(key)
            if flight is not None:
                outcome = await self._wait_flight(flight)
                if outcome is None:
                    continue
                entry, source, _, similarity = outcome
                now = time.time()
                decision = self._decide(entry, now, control, cached=False)
                if decision.servable and (control.semantic or source is not Source.SEMANTIC):
                    self._stats.coalesced += 1
                    if source is Source.SEMANTIC:  # an answer to another question: not refreshed as ours
                        return self._serve(entry, source, now, decision, None, True, similarity)
                    return self._serve(entry, source, now, decision, refresh, coalesced=True)
                entry = await self._compute(request, control, upstream)
                return self._computed(entry)

            if control.no_store:
                # Never lead a flight others would take as a stored answer.
                found = await self._redis_get(key, control, now)
                if found is not None:
                    return self._serve(found[0], Source.REDIS, now, found[1], None)
                match = await self._semantic_lookup(request, control)
                if match is not None:
                    now = time.time()
                    decision = self._decide(match[0], now, control)
                    return self._serve(match[0], Source.SEMANTIC, now, decision, None, False, match[1])
                entry = await self._compute(request, control, upstream)
                return self._computed(entry)

            return await self._lead(request, control, upstream, now)

    def _control(self, request: ChatRequest, control: CacheControl | None) -> CacheControl:
        """The request's settings, with its policy's ``cacheable`` predicate
        applied (and, for the Responses API, its ``provider_state`` switch)."""
        control = control or _DEFAULT_CONTROL
        policy = control.policy or self._policy
        if request.state is not None and not policy.provider_state:
            return replace(control, no_cache=True, no_store=True, policy=_PROVIDER_STATE)
        cacheable = policy.cacheable
        if cacheable is not None and not CachePolicy.verdict(
            cacheable(MappingProxyType(request.params)), "cacheable"
        ):
            return replace(control, no_cache=True, no_store=True, policy=_UNCACHEABLE)
        return control

    async def _pick_sample(
        self, request: ChatRequest, control: CacheControl, size: int
    ) -> tuple[Entry, Source, float, Decision, ChatRequest] | ChatRequest:
        """For a request with a sample bucket of ``size``: one of its answers
        at random once there are ``size`` (with where it was found, the time,
        what to do about it and the request of that sample), else the request
        of a sample to fill: a missing one no call here is filling yet (at
        random, so that processes filling at once take different ones), or,
        when all are being filled, one of those (its call is joined)."""
        keys = [sample_key(request.key, i) for i in range(size)]
        now = time.time()
        found: dict[int, tuple[Entry, Source, Decision]] = {}
        for i, key in enumerate(keys):
            cached = self._memory.get(key)
            if cached is not MISSING:
                decision = self._decide(cached, now, control)
                if decision.servable:
                    found[i] = (cached, Source.MEMORY, decision)
        missing = [i for i in range(size) if i not in found]
        if missing and self._redis is not None:
            reads = await self._redis_get_many([keys[i] for i in missing], control, now)
            for i, read in zip(missing, reads, strict=True):
                if read is not None:
                    found[i] = (read[0], Source.REDIS, read[1])
            missing = [i for i in missing if i not in found]
        if not missing:
            index = self._rng.randrange(size)
            entry, source, decision = found[index]
            if source is Source.MEMORY:
                self._stats.hits_memory += 1
            else:
                self._stats.hits_redis += 1
            self._stats.samples_served += 1
            return entry, source, now, decision, replace(request, key=keys[index], sampled=True)
        idle = [i for i in missing if self._flights.get(keys[i]) is None and keys[i] not in self._streams]
        index = self._rng.choice(idle or missing)
        return replace(request, key=keys[index], sampled=True)

    async def _lead(
        self, request: ChatRequest, control: CacheControl, upstream: Upstream, now: float
    ) -> CacheResult:
        key = request.key
        flight = self._flights.lead(key)
        try:
            found = await self._redis_get(key, control, now)
            if found is not None:
                entry, decision = found
                self._flights.settle(key, flight, (entry, Source.REDIS, False, None))
                return self._serve(entry, Source.REDIS, now, decision, (request, upstream, control.policy))
            task = self._spawn(self._fill(request, control, upstream))
            self._flights.follow_task(key, flight, task)
        except BaseException:
            # Cancelled (or failed) before the flight had a task: followers retry.
            self._flights.settle(key, flight, RETRY)
            raise
        outcome = await flight.wait()
        if outcome is RETRY:
            # The shared task was cancelled (the cache is closing).
            raise CacheClosedError("this LLMCache was closed while the request was in flight")
        entry, source, remote, similarity = outcome
        now = time.time()
        if source is Source.UPSTREAM:  # computed here, for this caller
            return self._computed(entry)
        if source is Source.SEMANTIC:
            decision = self._decide(entry, now, control, cached=False)
            return self._serve(entry, source, now, decision, None, False, similarity)
        if remote:
            self._stats.coalesced_remote += 1
        # Found in Redis, or computed by another process: served as any hit.
        decision = self._decide(entry, now, control, cached=False)
        return self._serve(
            entry, source, now, decision, (request, upstream, control.policy), coalesced=remote
        )

    async def _redis_get(self, key: str, control: CacheControl, now: float) -> tuple[Entry, Decision] | None:
        """The entry in Redis if it may be served, with what to do about it."""
        tier = self._redis
        if tier is None:
            return None
        epoch = self._epoch
        if tier.version is None and not await self._version_loaded():
            return None
        found = self._servable(await self._read_tier(tier, key), now, control, epoch)
        if found is not None:
            self._stats.hits_redis += 1
        return found

    async def _redis_get_many(
        self, keys: list[str], control: CacheControl, now: float
    ) -> list[tuple[Entry, Decision] | None]:
        """:meth:`_redis_get` of several keys in one round trip (not counted as hits)."""
        tier = self._redis
        assert tier is not None
        epoch = self._epoch
        if tier.version is None and not await self._version_loaded():
            return [None] * len(keys)
        try:
            entries = await tier.get_many(keys)
        except TierUnavailableError as exc:
            self._redis_unavailable(exc)
            return [None] * len(keys)
        return [
            self._servable(
                self._dropped(entry) if isinstance(entry, CorruptEntryError) else entry, now, control, epoch
            )
            for entry in entries
        ]

    async def _version_loaded(self) -> bool:
        """Load the namespace version; whether it is known now (until it is,
        the Redis tier is skipped)."""
        assert self._redis is not None
        await self._load_version()
        return self._redis.version is not None

    def _servable(
        self, entry: Entry | _Missing | None, now: float, control: CacheControl, epoch: int
    ) -> tuple[Entry, Decision] | None:
        """An entry read from Redis, kept in memory and with what to do about
        it, if it may be served."""
        if entry is None or entry is MISSING:
            return None
        decision = self._decide(entry, now, control)
        if not decision.servable:
            return None
        self._remember(entry, now, epoch)
        return entry, decision

    async def _read_tier(self, tier: RedisTier, key: str) -> Entry | _Missing | None:
        """The entry at ``key`` in Redis; MISSING if there is none or it was
        corrupt (dropped, counted); None if Redis could not be read (counted)."""
        try:
            return await tier.get(key)
        except CorruptEntryError as exc:
            return self._dropped(exc)
        except TierUnavailableError as exc:
            self._redis_unavailable(exc)
            return None

    def _dropped(self, exc: CorruptEntryError) -> _Missing:
        self._stats.corrupt_entries += 1
        self._log.warning("corrupt", "dropped a corrupt entry in Redis: %s", exc)
        return MISSING

    def _redis_unavailable(self, exc: TierUnavailableError) -> None:
        self._stats.redis_errors += 1
        self._log.warning("redis", "Redis unavailable, skipping the tier: %s", exc)

    async def _wait_flight(self, flight: Flight[_Outcome]) -> _Outcome | None:
        """The outcome of an identical call in flight here; None when it gave
        up (its task was cancelled): look again."""
        outcome = await flight.wait()
        if outcome is RETRY:
            if self._state == _CLOSED:
                raise CacheClosedError("this LLMCache was closed while the request was in flight")
            return None
        return outcome

    async def _load_version(self) -> None:
        # Until the version is known the Redis tier is skipped (an entry of a
        # retired version must never be served); retry at most once a second
        # so a Redis that is down costs one timeout per second, not per call.
        assert self._redis is not None
        now = time.monotonic()
        if now < self._version_retry_at:
            return
        try:
            await self._redis.load_version()
        except (TierUnavailableError, CorruptEntryError) as exc:
            self._version_retry_at = time.monotonic() + _VERSION_RETRY_INTERVAL
            self._stats.redis_errors += 1
            self._log.warning("redis", "cannot read the namespace version, skipping Redis: %s", exc)

    async def _fill(self, request: ChatRequest, control: CacheControl, upstream: Upstream) -> _Outcome:
        """The shared task of a miss: one upstream call per key across processes
        when Redis is there, else in this process."""
        epoch = self._epoch
        match = await self._semantic_lookup(request, control)
        if match is not None:
            return match[0], Source.SEMANTIC, False, match[1]
        coordinator = self._coordinator
        if coordinator is None or self._redis is None or self._redis.version is None:
            refreshing = self._refreshing.get(request.key)
            if refreshing is not None:
                # Without Redis nothing else stops a second call: a refresh of
                # this key is already asking the model, and its answer will do.
                await asyncio.shield(refreshing)
                found = self._memory.get(request.key)
                if found is not MISSING and self._decide(found, time.time(), control, count=False).servable:
                    return found, Source.UPSTREAM, False, None
            return await self._compute(request, control, upstream), Source.UPSTREAM, False, None

        async def compute() -> Entry:
            return await self._call_upstream(request, control, upstream)

        try:
            entry, origin = await coordinator.run(
                request.key,
                compute,
                self._encode_for_redis,
                lambda found: self._decide(found, time.time(), control, count=False).servable,
            )
        except TierUnavailableError as exc:
            # Raised only before this process called upstream: go on without Redis.
            self._stats.redis_errors += 1
            self._log.warning("redis", "Redis unavailable, calling upstream without a lease: %s", exc)
            return await self._compute(request, control, upstream), Source.UPSTREAM, False, None
        except WaitTimeoutError:
            if self._lease_settings.on_wait_timeout == "raise":
                raise
            return await self._compute(request, control, upstream), Source.UPSTREAM, False, None
        self._remember(entry, time.time(), epoch)
        if origin == "computed":
            await self._index_answer(request, control, entry)
            return entry, Source.UPSTREAM, False, None
        return entry, Source.REDIS, origin != "found", None

    async def _compute(self, request: ChatRequest, control: CacheControl, upstream: Upstream) -> Entry:
        """Call upstream and store the answer (unless the policy refuses it), without a lease."""
        epoch = self._epoch
        entry = await self._call_upstream(request, control, upstream)
        if entry.refused is None:
            await self._store(entry, entry.created_at, epoch)
            await self._index_answer(request, control, entry)
        return entry

    async def _call_upstream(self, request: ChatRequest, control: CacheControl, upstream: Upstream) -> Entry:
        self._stats.misses += 1
        self._stats.upstream_calls += 1
        self._stats.samples_filled += request.sampled
        started = time.monotonic()
        try:
            if request.api == RESPONSES:
                body = await cast(Any, upstream).responses(request.params)
            else:
                body = await upstream(request.params)
            raw, response, valid = _parse(request.api, body)
        except BaseException as exc:
            self._stats.upstream_errors += 1
            if isinstance(exc, Exception):
                self._stats.not_stored["error"] += 1
            raise
        return self._new_entry(request, control, raw, response, started, valid)

    def _new_entry(
        self,
        request: ChatRequest,
        control: CacheControl,
        raw: bytes,
        response: ChatCompletion | Response,
        started: float,
        valid: bool = True,
    ) -> Entry:
        created = time.time()
        fresh_until = created + _control_seconds(control.ttl, self._ttl)
        if isinstance(response, Response):
            tokens = (response.usage.input_tokens, response.usage.output_tokens) if response.usage else (0, 0)
        else:
            tokens = (
                (response.usage.prompt_tokens, response.usage.completion_tokens) if response.usage else (0, 0)
            )
        entry = Entry(
            key=request.key,
            response=response,
            raw=raw,
            created_at=created,
            fresh_until=fresh_until,
            expires_at=fresh_until + _control_seconds(control.stale_ttl, self._stale_ttl),
            compute_ms=(time.monotonic() - started) * 1000,
            model=request.model,
            prompt_tokens=tokens[0],
            completion_tokens=tokens[1],
            tags=tuple(control.tags or ()),
            system=request_system(request),
            api=request.api,
        )
        refused = entry.refused = self._refusal(request, control, entry) if valid else "error"
        if refused is not None:
            self._stats.not_stored[refused] += 1
        return entry

    def _refusal(self, request: ChatRequest, control: CacheControl, entry: Entry) -> str | None:
        """Why the policy keeps a new answer out of the cache, or None to store it."""
        policy = control.policy or self._policy
        if policy is _UNCACHEABLE:
            return "uncacheable"
        if policy is _PROVIDER_STATE:
            return "provider_state"
        if control.no_store:
            return "no_store"
        refused = policy.refusal(entry.kind)
        if refused is None and policy.should_store is not None:
            try:
                keep = CachePolicy.verdict(
                    policy.should_store(MappingProxyType(request.params), entry.response), "should_store"
                )
            except Exception as exc:
                self._log.warning(
                    "should_store", "should_store raised, answer not stored: %s: %s", type(exc).__name__, exc
                )
                keep = False
            if not keep:
                refused = "should_store"
        return refused

    def _encode_for_redis(self, entry: Entry) -> bytes | None:
        assert self._redis is not None
        if entry.refused is not None:
            return None
        if not self._redis.storable(entry):
            self._stats.store_skipped += 1
            return None
        return self._redis.encode(entry)

    async def _store(self, entry: Entry, now: float, epoch: int) -> None:
        if entry.refused is not None:
            return
        if len(entry.raw) > self._max_entry_bytes:
            self._stats.store_skipped += 1
            return
        self._remember(entry, now, epoch)
        tier = self._redis
        if tier is None or tier.version is None:
            self._stats.stores += 1
            return
        try:
            stored = await tier.set(entry, tier.encode(entry))
        except TierUnavailableError as exc:
            self._stats.redis_errors += 1
            self._log.warning("redis", "Redis unavailable, answer kept in memory only: %s", exc)
            return
        if stored:
            self._stats.stores += 1
        else:
            self._stats.store_skipped += 1

    # -- streams ------------------------------------------------------------------

    def stream(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        cache: CacheControl | None = None,
        **params: Any,
    ) -> CachedStream:
        """Answer a chat request as a stream of ``ChatCompletionChunk``.

        Returns at once (no I/O) a :class:`~aiollmcache.streaming.CachedStream`
        to iterate with ``async for``. A cached answer is replayed as chunks; a
        stream already in flight for the same request, in this process or
        another, is joined from its first chunk; otherwise the model's chunks
        reach the caller as they arrive and the answer is stored once the
        stream ends well. The request's key is the one ``complete()`` uses.
        Raises :class:`InvalidRequestError` at once for a malformed request.
        """
        if cache is not None and not isinstance(cache, CacheControl):
            raise InvalidRequestError(f"cache: expected a CacheControl, got {type(cache).__name__}")
        if params.get("stream") is False:
            raise InvalidRequestError("stream: stream() streams; call complete() for a whole answer")
        params.pop("stream", None)
        request = build_chat_request(
            messages, params, default_model=self._model, upstream_scope=self._upstream_scope
        )
        return self._stream(request, cache, self._upstream)

    def _stream(
        self, request: ChatRequest, control: CacheControl | None, upstream: Upstream | None
    ) -> CachedStream:
        options = request.params.get("stream_options")
        include_usage = isinstance(options, Mapping) and bool(options.get("include_usage"))

        # The cacheable predicate now: its error (or verdict) before any I/O.
        settings = self._control(request, control)

        async def opener() -> tuple[Any, Source, bool, ChunkLog | None]:
            return await self._open_stream(request, settings, upstream, include_usage)

        return CachedStream(request.key, opener)

    async def _open_stream(
        self, request: ChatRequest, control: CacheControl, upstream: Upstream | None, include_usage: bool
    ) -> tuple[Any, Source, bool, ChunkLog | None]:
        if self._state != _OPEN:
            await self.open()
        if upstream is None:
            raise ConfigurationError("no upstream: pass openai= or upstream= to LLMCache")
        self._stats.requests += 1
        self._stats.streams += 1
        read_redis = True
        bucket = 1 if control.no_cache else (control.policy or self._policy).bucket(request.params)
        if bucket > 1:
            picked = await self._pick_sample(request, control, bucket)
            if isinstance(picked, ChatRequest):
                # Just seen missing from Redis: not read again, so the stream
                # is registered before another call picks the same answer.
                request, read_redis = picked, False
            else:
                entry, source, now, decision, member = picked
                self._serve(
                    entry,
                    source,
                    now,
                    decision,
                    None if control.no_store else (member, upstream, control.policy),
                )
                return self._replayed(entry, include_usage), source, False, None
        key = request.key
        refresh = None if control.no_store else (request, upstream, control.policy)
        shared = not (control.no_cache or control.no_store)
        while not control.no_cache:
            now = time.time()
            cached = self._memory.get(key)
            if cached is not MISSING:
                decision = self._decide(cached, now, control)
                if decision.servable:
                    self._stats.hits_memory += 1
                    self._serve(cached, Source.MEMORY, now, decision, refresh)
                    return self._replayed(cached, include_usage), Source.MEMORY, False, None
            log = self._streams.get(key)
            if log is not None and log.error is None:
                log.readers += 1
                self._stats.coalesced += 1
                return self._read_log(log, include_usage), log.source, True, log
            if log is not None and log.producer is not None and not log.producer.done():
                # A stream here is stopping (its readers left): let it give its
                # lease back, or this one would follow its end.
                await asyncio.wait([log.producer])
                continue
            flight = self._flights.get(key)
            if flight is not None:
                outcome = await self._wait_flight(flight)
                if outcome is None:
                    continue
                entry, source, _, _ = outcome
                now = time.time()
                decision = self._decide(entry, now, control, cached=False)
                if decision.servable and source is not Source.SEMANTIC:
                    self._stats.coalesced += 1
                    self._serve(entry, source, now, decision, refresh, coalesced=True)
                    return self._replayed(entry, include_usage), source, True, None
                break
            found = await self._redis_get(key, control, now) if read_redis else None
            read_redis = True
            if found is not None:
                self._serve(found[0], Source.REDIS, now, found[1], refresh)
                return self._replayed(found[0], include_usage), Source.REDIS, False, None
            existing = self._streams.get(key)
            if existing is None or existing.error is not None:
                break  # (else another caller started one meanwhile: join it)
        log = ChunkLog(Source.UPSTREAM)
        log.readers = 1
        # The task first: a cache that is closing refuses it, and then no
        # half-made stream is left for others to join.
        log.producer = self._spawn(self._produce_stream(request, control, upstream, log, shared))
        if shared:
            self._streams[key] = log
        return self._read_log(log, include_usage), Source.UPSTREAM, False, log

    @staticmethod
    async def _read_log(log: ChunkLog, include_usage: bool) -> Any:
        async for chunk in log.follow():
            if (
                not include_usage
                and isinstance(chunk, ChatCompletionChunk)
                and not chunk.choices
                and chunk.usage is not None
            ):
                continue  # the usage chunk another caller asked for
            yield chunk

    @staticmethod
    async def _replayed(entry: Entry, include_usage: bool) -> Any:
        for chunk in _events(entry, include_usage):
            yield chunk

    async def _produce_stream(
        self, request: ChatRequest, control: CacheControl, upstream: Upstream, log: ChunkLog, shared: bool
    ) -> None:
        """The owned task behind a stream in flight: it fills ``log``."""
        epoch = self._epoch
        try:
            coordinator = self._coordinator
            redis = self._redis
            if shared and coordinator is not None and redis is not None and redis.version is not None:
                await self._stream_fleet(request, control, upstream, log, coordinator, redis)
            else:
                entry = await self._stream_upstream(request, control, upstream, log, None)
                if not control.no_store:
                    await self._store(entry, entry.created_at, epoch)
                log.entry = entry
            log.finish()
        except BaseException as exc:
            if isinstance(exc, Exception):
                log.fail(exc)
                self._log.warning("stream", "a stream failed: %s: %s", type(exc).__name__, exc)
                return
            log.fail(
                StreamInterruptedError("the stream was stopped (nobody was reading it, or the cache closed)")
            )
            raise
        finally:
            if self._streams.get(request.key) is log:
                del self._streams[request.key]

    async def _stream_upstream(
        self,
        request: ChatRequest,
        control: CacheControl,
        upstream: Upstream,
        log: ChunkLog,
        writer: ChunkWriter | None,
    ) -> Entry:
        """Stream from the model into ``log`` (and ``writer``); the entry of
        the whole answer, once the stream ended with every finish reason."""
        self._stats.misses += 1
        self._stats.upstream_calls += 1
        self._stats.samples_filled += request.sampled
        started = time.monotonic()
        api = request.api
        produce = getattr(upstream, "stream_responses" if api == RESPONSES else "stream", None)
        try:
            if produce is None:
                # An upstream that cannot stream: the whole answer, replayed.
                whole = getattr(upstream, "responses") if api == RESPONSES else upstream  # noqa: B009
                raw, response, valid = _parse(api, await whole(request.params))
                for data in _replay_data(api, response):
                    log.append(_chunk(api, data))
                    if writer is not None:
                        writer.add(data)
                return self._new_entry(request, control, raw, response, started, valid)
            records: list[Mapping[str, Any]] = []
            async for streamed in produce(request.params):
                if not isinstance(streamed, Mapping):
                    raise InvalidResponseError(f"upstream streamed a {type(streamed).__name__}, not a chunk")
                record = strip_event(streamed) if api == RESPONSES else streamed
                chunk = _chunk(api, record)
                records.append(record)
                log.append(chunk)
                if writer is not None:
                    writer.add(record)
            if not records:
                raise StreamInterruptedError("the model's stream ended without a chunk")
            whole_answer = assemble_response(records) if api == RESPONSES else assemble(records)
            raw, response, valid = _parse(api, orjson.dumps(whole_answer))
        except BaseException as exc:
            self._stats.upstream_errors += 1
            if isinstance(exc, Exception):
                self._stats.not_stored["error"] += 1
            raise
        return self._new_entry(request, control, raw, response, started, valid)

    async def _stream_fleet(
        self,
        request: ChatRequest,
        control: CacheControl,
        upstream: Upstream,
        log: ChunkLog,
        coordinator: Coordinator,
        tier: RedisTier,
    ) -> None:
        """One stream from the model per key across the processes sharing the
        Redis: the lease's holder streams from the model and copies the chunks
        to a Redis Stream; the others read that stream as it grows."""
        key = request.key
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._lease_settings.max_wait
        lease_ms = max(1, round(self._lease_settings.ttl * 1000))
        skip_entry = False
        epoch = self._epoch
        while True:
            if loop.time() > deadline:
                raise WaitTimeoutError(f"another process held the lease of {key} for longer than max_wait")
            token = secrets.token_hex(16)
            try:
                state = await tier.acquire(key, token, lease_ms, skip_entry=skip_entry)
            except CorruptEntryError:
                skip_entry = True
                continue
            except TierUnavailableError as exc:
                if log.chunks:
                    raise StreamInterruptedError(f"lost Redis while following a stream: {exc}") from exc
                self._stats.redis_errors += 1
                self._log.warning("redis", "Redis unavailable, streaming without a lease: %s", exc)
                entry = await self._stream_upstream(request, control, upstream, log, None)
                self._remember(entry, time.time(), epoch)
                log.entry = entry
                return
            if isinstance(state, Entry):
                if not log.chunks and self._decide(state, time.time(), control, count=False).servable:
                    self._stats.hits_redis += 1
                    log.source = Source.REDIS
                    for chunk in _events(state):
                        log.append(chunk)
                    self._remember(state, time.time(), epoch)
                    log.entry = state
                    return
                skip_entry = True
                continue
            if state is True:
                writer = ChunkWriter(tier, key, token, lease_ms * 3, self._spawn_cleanup, self._log)

                async def compute(writer: ChunkWriter = writer) -> Entry:
                    # The last record goes before the lease is released: a
                    # follower never sees the lease gone with the end unwritten.
                    try:
                        entry = await self._stream_upstream(request, control, upstream, log, writer)
                    except BaseException as exc:
                        message = failure_message(exc) if isinstance(exc, Exception) else b"retry"
                        kind = b"fail" if isinstance(exc, Exception) else b"retry"
                        ending = self._spawn_cleanup(writer.end(kind, message, lease_ms * 3))
                        with contextlib.suppress(asyncio.CancelledError):
                            await asyncio.shield(ending)
                        raise
                    await writer.end(b"end", b"", _STREAM_KEPT_MS)
                    return entry

                entry = await coordinator.hold(key, token, compute, self._encode_for_redis)
                self._remember(entry, time.time(), epoch)
                log.entry = entry
                return
            log.source, log.coalesced = Source.REDIS, True
            if await self._stream_follow(key, log, deadline, tier, request.api) == "done":
                self._stats.coalesced_remote += 1
                return
            skip_entry = False

    async def _stream_follow(
        self, key: str, log: ChunkLog, deadline: float, tier: RedisTier, api: str
    ) -> str:
        """Read the stream another process is copying to Redis into ``log``:
        "done" at its end, "retry" when there is nothing to follow (the answer
        is stored, or the lease is free: look again). Raises the other
        process's upstream error, or StreamInterruptedError when it stopped
        halfway.

        Records are read with XREAD BLOCK; only after a read that waited in
        vain is the lease looked at: a holder gone (died, or gave up) with the
        stream unfinished ends it, after one last look for its end.
        """
        loop = asyncio.get_running_loop()
        block_ms = max(1, int(self._redis_timeout * 400))
        last = "0-0"
        received = 0
        try:
            _, owner, _ = await tier.lease_holder(key)
        except TierError:
            return "retry"
        if owner is None:
            return "retry"  # free: take it (or find the answer stored)

        def take(records: list[tuple[str, bytes, bytes, bytes]]) -> str | None:
            nonlocal last, received
            for record_id, record_owner, kind, data in records:
                last = record_id
                if record_owner != owner:
                    continue  # an earlier stream of the same key
                if kind == b"c":
                    try:
                        chunk = _chunk_json(api, data)
                    except ValidationError:
                        continue
                    log.append(chunk)
                    received += 1
                elif kind == b"end":
                    return "done"
                elif kind == b"fail":
                    raise remote_error(data)
                elif kind == b"retry":
                    if received:
                        raise StreamInterruptedError(_STOPPED_ELSEWHERE)
                    return "retry"
            return None

        while True:
            if loop.time() > deadline:
                if received:
                    raise StreamInterruptedError("the stream followed in Redis took longer than max_wait")
                raise WaitTimeoutError(f"another process held the lease of {key} for longer than max_wait")
            try:
                records = await tier.read_chunks(key, last, block_ms)
                if (ended := take(records)) is not None:
                    return ended
                if records:
                    continue
                _, holder, _ = await tier.lease_holder(key)
                if holder == owner:
                    continue
                if (ended := take(await tier.read_chunks(key, last, None))) is not None:
                    return ended
                # A holder that did not stream (a complete() call) and whose
                # answer the policy refused left it for its waiters.
                passed = None if received else await tier.read_passed(key, owner)
            except TierError as exc:
                if received:
                    raise StreamInterruptedError(f"lost Redis while following a stream: {exc}") from exc
                return "retry"
            if received:
                raise StreamInterruptedError(_STOPPED_ELSEWHERE)
            if passed is not None:
                for chunk in _events(passed):
                    log.append(chunk)
                log.entry = passed
                return "done"
            return "retry"

    # -- the semantic tier ---------------------------------------------------------

    def _semantic_query(self, request: ChatRequest, control: CacheControl) -> SemanticQuery | None:
        config, embeddings = self._semantic_config, self._embeddings
        if config is None or embeddings is None or not control.semantic or request.sampled:
            return None
        query = semantic_query(
            request,
            embedder=embeddings.embedder.name,
            upstream_scope=self._upstream_scope,
            min_chars=config.min_chars,
            max_chars=config.max_chars,
        )
        return query if isinstance(query, SemanticQuery) else None

    async def _semantic_lookup(
        self, request: ChatRequest, control: CacheControl
    ) -> tuple[Entry, float] | None:
        """A fresh answer to a question of the same meaning, in the same
        context, with its similarity; None if there is none (or the tier is
        off, the request not eligible, or the embedder failing)."""
        semantic, embeddings, config = self._semantic, self._embeddings, self._semantic_config
        if semantic is None or embeddings is None or config is None:
            return None
        query = self._semantic_query(request, control)
        if query is None:
            self._stats.semantic_skipped += 1
            return None
        if time.monotonic() < self._semantic_down_until:
            self._stats.semantic_skipped += 1
            return None
        self._stats.semantic_lookups += 1
        try:
            vector = await embeddings.embed(query.text)
        except EmbeddingError as exc:
            self._stats.semantic_errors += 1
            self._semantic_down_until = time.monotonic() + config.failure_backoff
            self._log.warning("embedding", "semantic tier skipped, the embedder failed: %s", exc)
            return None
        epoch = self._epoch
        now = time.time()
        try:
            candidates = await semantic.search(query.partition, vector, now)
        except Exception as exc:  # the tier is an optimisation: never the caller's failure
            self._stats.semantic_errors += 1
            self._log.warning("semantic", "semantic search failed, skipping the tier: %s", exc)
            return None
        self._stats.record_similarity(candidates[0].similarity if candidates else None)
        for candidate in candidates:
            if candidate.similarity < config.threshold:
                break
            if candidate.numbers != query.numbers:  # "top 3" is not "top 10", however alike
                self._stats.semantic_rejected += 1
                continue
            entry = await self._semantic_entry(candidate.key, query.partition, control, now, epoch)
            if entry is not None:
                self._stats.hits_semantic += 1
                return entry, candidate.similarity
        self._stats.semantic_misses += 1
        return None

    async def _semantic_entry(
        self, key: str, partition: str, control: CacheControl, now: float, epoch: int
    ) -> Entry | None:
        """The entry a semantic candidate points at, if it may be served fresh.

        An entry that is gone (invalidated, expired) is forgotten by the index;
        a stale one is not served: its refresh would need its own question.
        """
        assert self._semantic is not None
        entry = self._memory.get(key)
        if entry is MISSING and self._redis is not None and self._redis.version is not None:
            read = await self._read_tier(self._redis, key)
            if read is None:
                return None  # Redis unreachable: not known to be gone
            entry = read
            if entry is not MISSING:
                self._remember(entry, now, epoch)
        if entry is MISSING:
            self._stats.semantic_rejected += 1
            self._semantic.forget(partition, key)
            return None
        decision = self._decide(entry, now, control)
        if not decision.servable or decision.state is State.STALE:
            self._stats.semantic_rejected += 1
            return None
        return entry

    async def _index_answer(self, request: ChatRequest, control: CacheControl, entry: Entry) -> None:
        """Index a stored answer for semantic lookups: before the caller gets
        it when its question's vector is at hand (the lookup embedded it), so
        a paraphrase asked next is found; else in the background, after
        embedding the question."""
        query = self._semantic_query(request, control)
        if query is None or self._embeddings is None or self._state != _OPEN or entry.refused is not None:
            return
        vector = self._embeddings.cached(query.text)
        if vector is None:
            self._spawn(self._index(query, entry, None))
        else:
            await self._index(query, entry, vector)

    async def _index(self, query: SemanticQuery, entry: Entry, vector: Vectors | None) -> None:
        assert self._semantic is not None and self._embeddings is not None
        try:
            if vector is None:
                vector = await self._embeddings.embed(query.text)
            await self._semantic.add(query.partition, entry.key, vector, entry.expires_at, query.numbers)
        except (EmbeddingError, TierError) as exc:
            self._stats.semantic_errors += 1
            self._log.warning("semantic-index", "answer not indexed for semantic lookups: %s", exc)
        else:
            self._stats.semantic_indexed += 1

    # -- helpers --------------------------------------------------------------

    def _remember(self, entry: Entry, now: float, epoch: int) -> None:
        """Keep ``entry`` in the memory tier, unless an invalidation was applied
        since ``epoch`` was read: what was read or computed before it may be
        what it retired."""
        if (
            not self._memory.enabled
            or len(entry.raw) > self._max_entry_bytes
            or epoch != self._epoch
            or entry.refused is not None
        ):
            return
        size = _MEMORY_SIZE_FACTOR * len(entry.raw) + _MEMORY_ENTRY_OVERHEAD
        # Kept until hard expiry: a stale answer is served from memory too. With
        # hot keys on, only while fresh: stale reads go to Redis, to be counted.
        until = entry.fresh_until if self._hot_sliding else entry.expires_at
        self._memory.set(entry.key, entry, ttl=until - now, size=size)

    def _decide(
        self, entry: Entry, now: float, control: CacheControl, *, cached: bool = True, count: bool = True
    ) -> Decision:
        """What to do with ``entry`` for this request at ``now``. A ``cached``
        entry (read from a tier, not an answer shared by a call in flight) is
        served only if the request's policy would have stored it (a refusal
        counted unless ``count`` is False: the same call saw it already)."""
        # (_kind is set on every entry read or computed here; None only on
        # one built by hand, which the property then classifies.)
        if (
            cached
            and entry._kind is not AnswerKind.ANSWER
            and (control.policy or self._policy).refusal(entry.kind)
        ):
            if count:
                self._stats.cached_refused += 1
            return _REFUSED
        early_at = entry.early_at
        if early_at is None:
            early_at = entry.early_at = early_refresh_at(
                fresh_until=entry.fresh_until,
                compute_s=entry.compute_ms / 1000,
                beta=self._xfetch_beta,
                # One draw per entry and process, whichever object this read
                # decoded: the same (key, created_at) always draws the same u.
                u=(hash((self._seed, entry.key, entry.created_at)) & _DRAW_MASK) / (_DRAW_MASK + 1),
            )
        return decide(
            created_at=entry.created_at,
            fresh_until=entry.fresh_until,
            expires_at=max(entry.expires_at, entry.slid_until),
            now=now,
            early_at=early_at,
            max_age=_control_seconds(control.max_age, None),
        )

    def _serve(
        self,
        entry: Entry,
        source: Source,
        now: float,
        decision: Decision,
        refresh: tuple[ChatRequest, Upstream, CachePolicy | None] | None,
        coalesced: bool = False,
        similarity: float | None = None,
    ) -> CacheResult:
        """A cached answer for a caller, scheduling the refresh it calls for."""
        stale = decision.state is State.STALE
        if stale:
            self._stats.stale_served += 1
        if decision.refresh and refresh is not None:
            self._schedule_refresh(entry, *refresh)
        self._stats.tokens_saved_prompt += entry.prompt_tokens
        self._stats.tokens_saved_completion += entry.completion_tokens
        cost = self._prices.cost(entry.model, entry.prompt_tokens, entry.completion_tokens)
        if cost is None:
            self._stats.unpriced_hits += 1
        else:
            self._stats.cost_saved_usd += cost
        return _result_type(entry)(entry, source, entry.age(now), coalesced, stale, similarity)

    def _schedule_refresh(
        self, entry: Entry, request: ChatRequest, upstream: Upstream, policy: CachePolicy | None
    ) -> None:
        """Start a background refresh of ``entry``: one per key in this process,
        at most ``max_refreshes`` at once (beyond that, skipped and counted)."""
        key = entry.key
        if key in self._refreshing or self._state != _OPEN:
            return
        if self._refresh_refused:
            refused = self._refresh_refused.get(key)
            if refused is not None and refused[0] == entry.created_at and time.monotonic() < refused[1]:
                return
        if len(self._refreshing) >= self._max_refreshes:
            self._stats.refreshes_skipped += 1
            return
        self._refreshing[key] = self._spawn(self._refresh(entry, request, upstream, policy))
        self._stats.refreshes += 1

    async def _refresh(
        self, current: Entry, request: ChatRequest, upstream: Upstream, policy: CachePolicy | None
    ) -> None:
        # Across processes this is one more flight: the first process takes the
        # lease (the entry in Redis, no newer than ``current``, does not count as
        # an answer) and the others wait for its answer, so the fleet makes one
        # upstream call per refresh.
        try:
            # The new answer gets the windows and tags the entry had, whatever
            # the caller whose read started the refresh asked for its own, and
            # that caller's policy.
            control = CacheControl(
                ttl=current.fresh_until - current.created_at,
                stale_ttl=max(0.0, current.expires_at - current.fresh_until),
                tags=current.tags,
                policy=policy,
            )
            entry = await self._refreshed(current, request, control, upstream)
            if entry.refused is not None:
                # The policy refused the new answer: the stale one is served
                # until it expires, and refreshed again by this process only
                # after another fresh window (not at every stale read).
                refused = self._refresh_refused
                window = current.fresh_until - current.created_at
                refused[current.key] = (current.created_at, time.monotonic() + window)
                if len(refused) > _REFUSED_REFRESHES_KEPT:
                    del refused[next(iter(refused))]
        except Exception as exc:
            # The stale answer goes on being served until it expires.
            self._stats.refresh_errors += 1
            self._log.warning("refresh", "background refresh failed: %s: %s", type(exc).__name__, exc)
        finally:
            self._refreshing.pop(current.key, None)

    async def _refreshed(
        self, current: Entry, request: ChatRequest, control: CacheControl, upstream: Upstream
    ) -> Entry:
        coordinator = self._coordinator
        if coordinator is None or self._redis is None or self._redis.version is None:
            return await self._compute(request, control, upstream)

        async def compute() -> Entry:
            return await self._call_upstream(request, control, upstream)

        def newer(found: Entry) -> bool:
            return found.created_at > current.created_at

        epoch = self._epoch
        try:
            entry, origin = await coordinator.run(request.key, compute, self._encode_for_redis, newer)
        except TierUnavailableError:
            # Raised only before the model was asked: refresh without Redis.
            self._stats.redis_errors += 1
            return await self._compute(request, control, upstream)
        self._remember(entry, time.time(), epoch)
        if origin == "computed":
            await self._index_answer(request, control, entry)
        return entry

    @staticmethod
    def _computed(entry: Entry) -> CacheResult:
        """The result for the caller whose request this process just computed."""
        return _result_type(entry)(entry, Source.UPSTREAM, entry.age(time.time()))

    def _spawn(self, coro: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
        """Start new work owned by the cache; refused once the cache is closing."""
        if self._state == _CLOSED:
            coro.close()
            raise CacheClosedError("this LLMCache is closed")
        return self._spawn_cleanup(coro)

    def _spawn_cleanup(self, coro: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
        """Start a task owned by the cache, even while closing (lease renewals
        and releases); ``aclose()`` waits for these too."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
