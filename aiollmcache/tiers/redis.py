"""The Redis tier: key layout, one round trip per hit, errors mapped at the boundary.

Key layout (the ``{hash}`` hash tag is the only pair of braces in a key, so an
entry and everything else about it share one Redis Cluster slot)::

    alc:<ns>:version              namespace version (INCR retires every entry)
    alc:<ns>:<ver>:e:{<hash>}     entry (see :mod:`aiollmcache.entry`)

Every Redis exception is translated here into :class:`TierUnavailableError`
or :class:`TierTimeoutError`; bytes that are not a valid entry are removed
(only if they are still the same bytes) and reported as
:class:`CorruptEntryError`.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..entry import MISSING, Entry, _Missing, decode_entry, encode_entry
from ..errors import (
    ConfigurationError,
    CorruptEntryError,
    TierError,
    TierTimeoutError,
    TierUnavailableError,
)

__all__ = ["KEY_PREFIX", "RedisTier", "connect", "validate_namespace"]

KEY_PREFIX = "alc"
_NAMESPACE_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")

# Delete the key only if it still holds the bytes we found corrupt: a valid
# entry written meanwhile by another process must survive.
_DELETE_IF_EQUAL = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def validate_namespace(namespace: str) -> str:
    if not isinstance(namespace, str) or not _NAMESPACE_RE.fullmatch(namespace):
        raise ConfigurationError(
            f"namespace: {namespace!r} must be 1-64 characters of letters, digits, '_', '.', '-'"
        )
    return namespace


def connect(url: str, *, max_connections: int, timeout: float) -> aioredis.Redis:
    """A client for ``url`` with a bounded pool that waits for a free connection.

    Connecting and waiting for a pooled connection are bounded by ``timeout``;
    a failed command is retried once at once (a pooled connection may be stale
    after a Redis restart), never with a backoff that would stall callers.
    There is no per-socket read/write timeout: :class:`RedisTier` bounds each
    whole operation with one ``asyncio.timeout`` instead, which costs a timer
    where redis-py's socket timeout costs a task per command.
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), retries=1),
    )
    return aioredis.Redis(connection_pool=pool)


def _translate(op: str, timeout: float, exc: BaseException) -> TierError:
    if isinstance(exc, (TimeoutError, RedisTimeoutError)):
        return TierTimeoutError(f"redis {op}: no answer within {timeout}s")
    return TierUnavailableError(f"redis {op}: {exc}")


_ERRORS = (RedisError, OSError)  # TimeoutError is an OSError
T = TypeVar("T")


class RedisTier:
    """Entries in Redis, shared by every process using the same namespace.

    The tier does not own freshness decisions: it stores an entry until its
    hard expiry (``expires_at``) and returns whatever is there. Every
    operation is bounded by ``timeout`` seconds, whatever the client's own
    settings; a timed-out connection is discarded by redis-py.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        namespace: str,
        owns_client: bool,
        timeout: float,
        compress_above: int,
        max_entry_bytes: int,
        clock: Any = time.time,
    ) -> None:
        connection_kwargs = client.get_connection_kwargs()  # type: ignore[no-untyped-call]
        if connection_kwargs.get("decode_responses"):
            raise ConfigurationError("redis: the client must be built with decode_responses=False")
        self._client = client
        self._namespace = validate_namespace(namespace)
        self._owns_client = owns_client
        self._timeout = timeout
        self._compress_above = compress_above
        self._max_entry_bytes = max_entry_bytes
        self._clock = clock
        self._version_key = f"{KEY_PREFIX}:{namespace}:version"
        self._delete_if_equal = client.register_script(_DELETE_IF_EQUAL)
        self.version: int | None = None

    @property
    def client(self) -> aioredis.Redis:
        return self._client

    def entry_key(self, key: str) -> str:
        if self.version is None:
            raise TierUnavailableError("redis: namespace version not loaded")
        return f"{KEY_PREFIX}:{self._namespace}:{self.version}:e:{{{key}}}"

    async def load_version(self) -> int:
        raw = await self._call("GET version", self._client.get(self._version_key))
        try:
            version = 0 if raw is None else int(raw)
        except ValueError:
            raise CorruptEntryError(f"{self._version_key} holds {raw!r}, not an integer") from None
        self.version = version
        return version

    async def get(self, key: str) -> Entry | _Missing:
        rkey = self.entry_key(key)
        blob = await self._call("GET", self._client.get(rkey))
        if blob is None:
            return MISSING
        if not isinstance(blob, bytes):  # a client built with decode_responses=True
            raise TierUnavailableError("redis: the client must not decode responses")
        try:
            return decode_entry(blob, key, max_bytes=self._max_entry_bytes)
        except CorruptEntryError:
            await self._call("DEL corrupt", self._delete_if_equal(keys=[rkey], args=[blob]))
            raise

    async def _call(self, op: str, command: Awaitable[T]) -> T:
        """Await one command within the time budget, translating Redis errors.

        (A coroutine, not a context manager: this is on the hit path, and a
        generator-based context manager costs more than the tier's own code.)
        """
        try:
            async with asyncio.timeout(self._timeout):
                return await command
        except _ERRORS as exc:
            raise _translate(op, self._timeout, exc) from exc

    def encode(self, entry: Entry) -> bytes:
        return encode_entry(entry, compress_above=self._compress_above)

    async def set(self, entry: Entry, blob: bytes) -> bool:
        """Store ``blob`` (the encoded ``entry``) until the entry's hard expiry.

        Returns False (nothing written) when the entry has already expired or
        is larger than the size limit.
        """
        ttl_ms = math.ceil((entry.expires_at - self._clock()) * 1000)
        if ttl_ms <= 0 or len(blob) > self._max_entry_bytes:
            return False
        rkey = self.entry_key(entry.key)
        await self._call("SET", self._client.set(rkey, blob, px=ttl_ms))
        return True

    async def delete(self, key: str) -> bool:
        rkey = self.entry_key(key)
        return bool(await self._call("UNLINK", self._client.unlink(rkey)))

    async def aclose(self) -> None:
        if self._owns_client:
            await self._call("close", self._client.aclose(close_connection_pool=True))
