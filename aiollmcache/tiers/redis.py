"""The Redis tier: key layout, one round trip per hit, errors mapped at the boundary.

Key layout (the ``{hash}`` hash tag is the only pair of braces in a key, so an
entry and everything else about it share one Redis Cluster slot; a tag's sets
share their ``{tag}`` slot, and are written in the entry's script, which on
Redis Cluster would need them in the entry's slot)::

    alc:<ns>:version              namespace version (INCR retires every entry)
    alc:<ns>:sync                 hash: invalidations published ("seq") and a random
                                  "id", new whenever Redis lost the hash
    alc:<ns>:inv                  pub/sub channel: "<id> <seq> <invalidation JSON>"
    alc:<ns>:<ver>:e:{<hash>}     entry (see :mod:`aiollmcache.entry`)
    alc:<ns>:<ver>:l:{<hash>}     lease: token of the process computing the entry
    alc:<ns>:<ver>:n:{<hash>}     pub/sub channel: "done[:<entry>]", "retry" or "fail:<json>"
    alc:<ns>:<ver>:h:{<hash>}     hits in the current window (hot keys live longer)
    alc:<ns>:<ver>:t:{<tag>}      sorted set of the hashes of the entries tagged <tag>,
                                  scored by when each may expire at the latest
    alc:<ns>:<ver>:t:{<tag>}:retiring   the same, taken over by an invalidation in progress

Every Redis exception is translated here into :class:`TierUnavailableError`
or :class:`TierTimeoutError`; bytes that are not a valid entry are removed
(only if they are still the same bytes) and reported as
:class:`CorruptEntryError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import math
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, TypeVar, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import (
    MaxConnectionsError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    ResponseError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from .._log import RateLimitedLogger, logger
from ..crypto import Sealer
from ..entry import (
    HEADER_PREFIX_BYTES,
    MISSING,
    Entry,
    Header,
    NotForThisCache,
    _Missing,
    decode_entry,
    encode_entry,
    read_header,
)
from ..errors import (
    ConfigurationError,
    CorruptEntryError,
    TierError,
    TierTimeoutError,
    TierUnavailableError,
)

__all__ = [
    "KEY_PREFIX",
    "REDIS_ERRORS",
    "SCAN_BATCH",
    "UNLINK_BATCH",
    "Client",
    "HotKeys",
    "RedisTier",
    "connect",
    "one_connection_client",
    "parse_redis_url",
    "validate_namespace",
]

KEY_PREFIX = "alc"

REDIS_ERRORS: Final = (RedisError, RedisClusterException, OSError)
"""What a Redis operation may raise for Redis's sake (TimeoutError is an
OSError; a cluster client raises RedisClusterException, not a RedisError,
when no node can be reached)."""

Client = aioredis.Redis | RedisCluster
"""A single Redis or a Redis Cluster."""
_NAMESPACE_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")

# Delete the key only if it still holds the bytes we found corrupt: a valid
# entry written meanwhile by another process must survive.
_DELETE_IF_EQUAL = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


# A read that also counts hits per window (KEYS[2], ARGV[1] ms) and, for a key
# read ARGV[2] times or more in the window, extends its life to its own
# ttl + stale_ttl from now, but never past its creation + ARGV[4] ms. Those
# times come from the entry's header (see aiollmcache.entry: the header's
# length at byte 6, the header, a JSON array, from byte 14). An entry
# without a stale window is not extended: it must not be served stale.
# ARGV[3] is the longest life an entry may have; the header is decoded only
# when less than half of it is left, not on every read of a hot key.
# Returns {entry, PTTL in ms} or nil.
_READ_HOT = """
local function read_hot(ekey, hkey)
  local value = redis.call('GET', ekey)
  if not value then
    return false
  end
  local hits = redis.call('INCR', hkey)
  if hits == 1 then
    redis.call('PEXPIRE', hkey, ARGV[1])
  end
  local pttl = redis.call('PTTL', ekey)
  if hits >= tonumber(ARGV[2]) and pttl * 2 < tonumber(ARGV[3]) and #value >= 13 then
    local length = struct.unpack('>I4', value, 6)
    local ok, header = pcall(cjson.decode, string.sub(value, 14, 13 + length))
    if ok and type(header) == 'table' and type(header[3]) == 'number'
        and type(header[4]) == 'number' and type(header[5]) == 'number' and header[5] > header[4] then
      local time = redis.call('TIME')
      local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
      local life = math.floor((header[5] - header[3]) * 1000)
      local target = math.min(life, math.floor(header[3] * 1000 + tonumber(ARGV[4])) - now_ms)
      if target > pttl then
        redis.call('PEXPIRE', ekey, target)
        pttl = target
      end
    end
  end
  return {value, pttl}
end
"""

_GET_HOT = _READ_HOT + "return read_hot(KEYS[1], KEYS[2])\n"


def _read_hot_many(source: str, first: int) -> str:
    """The same for many entries at once, ``source`` (KEYS or ARGV) holding
    (entry, hits) pairs from index ``first``: a list with, for each pair,
    {entry, PTTL in ms} or nil, nil also for a key that holds another type
    (its reader asks again on its own, and so learns it)."""
    return (
        _READ_HOT
        + f"""
local found = {{}}
for i = {first}, #{source}, 2 do
  local ok, value = pcall(read_hot, {source}[i], {source}[i + 1])
  found[#found + 1] = ok and value
end
return found
"""
    )


_GET_HOT_MANY = _read_hot_many("KEYS", 1)

# On Redis Cluster, the hot reads of one batch that live on one node, in one
# call to that node: ARGV[1..4] as for _READ_HOT, then (entry, hits) pairs,
# whose slots differ. They must all be served there, or the call fails as a
# whole and its reads go one by one.
_GET_HOT_ON_NODE = "#!lua flags=allow-cross-slot-keys\n" + _read_hot_many("ARGV", 5)

# Append a vector record (ARGV[1..4]: entry key, vector bytes, dtype, expiry
# as unix seconds; ARGV[7]: the question's number signature) to a partition's
# stream KEYS[1], trimmed to about ARGV[5] records; the stream lives as long
# as its longest-lived record (ARGV[6] ms).
_ADD_VECTOR = """
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], '*',
  'k', ARGV[1], 'v', ARGV[2], 'd', ARGV[3], 'x', ARGV[4], 'n', ARGV[7])
local ttl = tonumber(ARGV[6])
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return 1
"""

# Read the entry (unless ARGV[3] is "1": the caller rejected the one there);
# if absent, try to take the lease; if taken, say for how long.
# Returns {1, entry} | {2, ""} (lease acquired) | {0, lease PTTL in ms}.
_ACQUIRE = """
if ARGV[3] ~= '1' then
  local value = redis.call('GET', KEYS[1])
  if value then
    return {1, value}
  end
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {2, ''}
end
return {0, redis.call('PTTL', KEYS[2])}
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# Add the entry ARGV[m] to the tag sets KEYS[first..]: scored by when it
# expires at the latest (ARGV[m+1] ms from now, by Redis's clock, the clock
# that expires keys), with up to 64 expired members pruned per set and write
# (so a write never blocks Redis for long and a set shrinks faster than it
# grows), each set expiring with its longest-lived member. Written in the same
# script as the entry: a tag invalidation never runs between the two, so an
# entry is never in Redis without being in its tags' sets.
_TAG = """
local function tag(first, m)
  local time = redis.call('TIME')
  local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
  local life = tonumber(ARGV[m + 1])
  for i = first, #KEYS do
    redis.call('ZADD', KEYS[i], 'GT', now + life, ARGV[m])
    local expired = redis.call('ZRANGE', KEYS[i], '-inf', now, 'BYSCORE', 'LIMIT', 0, 64)
    if #expired > 0 then
      redis.call('ZREM', KEYS[i], unpack(expired))
    end
    if life > 0 and redis.call('PTTL', KEYS[i]) < life then
      redis.call('PEXPIRE', KEYS[i], life)
    end
  end
end
"""

# On Redis Cluster a tag's set is in another slot than the entry: it is
# written on its own (KEYS[1]; ARGV[1], ARGV[2]: see _TAG), before and after
# the entry (see RedisTier._tag_apart).
_TAG_ADD = (
    _TAG
    + """
tag(1, 1)
return 1
"""
)

# Write the entry only while holding the lease, then release it and wake the
# waiters, all in one step: a holder that lost its lease writes nothing. The
# message carries the entry itself (ARGV[5] = "1") when it is small, so
# waiters need no read. KEYS[3..] are its tags' sets (ARGV[6], ARGV[7]: see _TAG).
_COMMIT = (
    _TAG
    + """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return 0
end
if #KEYS > 2 then
  tag(3, 6)
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('DEL', KEYS[2])
if ARGV[5] == '1' then
  redis.call('PUBLISH', ARGV[4], 'done:' .. ARGV[2])
else
  redis.call('PUBLISH', ARGV[4], 'done')
end
return 1
"""
)

# Give the lease back without an entry, telling the waiters why.
_ABANDON = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"""


# Store a tagged entry (KEYS[1], ARGV[1] for ARGV[2] ms) and add it to its
# tags' sets (KEYS[2..]; ARGV[3], ARGV[4]: see _TAG).
_SET_TAGGED = (
    _TAG
    + """
tag(2, 3)
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
)

# Take a tag's set (KEYS[1]) over for retirement (KEYS[2]): entries tagged
# from now on go into a new set and survive. A retirement left unfinished (its
# process died) is resumed: the sets are merged. Returns the members to retire.
_TAG_RETIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('EXISTS', KEYS[2]) == 1 then
    local ttl = math.max(redis.call('PTTL', KEYS[1]), redis.call('PTTL', KEYS[2]))
    redis.call('ZUNIONSTORE', KEYS[2], 2, KEYS[2], KEYS[1], 'AGGREGATE', 'MAX')
    if ttl > 0 then
      redis.call('PEXPIRE', KEYS[2], ttl)
    end
    redis.call('DEL', KEYS[1])
  else
    redis.call('RENAME', KEYS[1], KEYS[2])
  end
end
return redis.call('ZCARD', KEYS[2])
"""

# Number an invalidation (the hash KEYS[1] counts them) and broadcast it, in
# one step: a process that sees the count ahead of the messages it got knows
# it missed one. The count comes with an id (ARGV[3] if there is none yet): a
# count that started again (Redis lost the hash) has a new id.
_PUBLISH_INVALIDATION = """
local id = redis.call('HGET', KEYS[1], 'id')
if not id then
  id = ARGV[3]
  redis.call('HSET', KEYS[1], 'id', id)
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('PUBLISH', ARGV[1], id .. ' ' .. seq .. ' ' .. ARGV[2])
return seq
"""

# The invalidation count and its id (ARGV[1] if there is none yet).
_SYNC_STATE = """
redis.call('HSETNX', KEYS[1], 'id', ARGV[1])
return redis.call('HMGET', KEYS[1], 'id', 'seq')
"""

# Invalidation works in small steps, one round trip each, so that Redis serves
# other clients between them (strings are freed at once, even by UNLINK: 256
# entries of a few KB took Redis 1-2 ms here). Measured with
# benchmarks/invalidation.py: steps of 32 keep other callers' p99 within
# ~2.5x of idle while 100k entries go, at ~1 s for a tag.
UNLINK_BATCH = 32
SCAN_BATCH = 32
# Bytes read per entry to find its header; longer headers take a second read.
_HEADER_READ_BYTES = 512


def validate_namespace(namespace: str) -> str:
    if not isinstance(namespace, str) or not _NAMESPACE_RE.fullmatch(namespace):
        raise ConfigurationError(
            f"namespace: {namespace!r} must be 1-64 characters of letters, digits, '_', '.', '-'"
        )
    return namespace


_CLUSTER_WORDS: Final = frozenset({"yes", "true", "1", "on"})
_CLUSTER_WORDS_OFF: Final = frozenset({"no", "false", "0", "off"})


def parse_redis_url(url: str) -> tuple[str, bool]:
    """Split the ``cluster=yes`` option off a Redis URL: ``(url, cluster)``.

    ``redis://h:p/0?cluster=yes`` means a Redis Cluster reached through the
    node ``h:p`` (any node will do: the others are discovered). Every other
    query option is left for redis-py.
    """
    parts = urlsplit(url)
    kept: list[tuple[str, str]] = []
    cluster = False
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name != "cluster":
            kept.append((name, value))
            continue
        word = value.lower()
        if word in _CLUSTER_WORDS:
            cluster = True
        elif word not in _CLUSTER_WORDS_OFF:
            raise ConfigurationError(f"redis_url: cluster={value!r}, expected yes or no")
    return urlunsplit(parts._replace(query=urlencode(kept))), cluster


def connect(url: str, *, max_connections: int, timeout: float) -> Client:
    """A client for ``url`` with a bounded pool that waits for a free connection.

    Connecting and waiting for a pooled connection are bounded by ``timeout``;
    a failed command is retried once at once (a pooled connection may be stale
    after a Redis restart), never with a backoff that would stall callers.
    There is no per-socket read/write timeout: :class:`RedisTier` bounds each
    whole operation with one ``asyncio.timeout`` instead, which costs a timer
    where redis-py's socket timeout costs a task per command.

    With ``cluster=yes`` in the URL the client is a :class:`RedisCluster`
    with up to ``max_connections`` connections per node; its pools raise when
    full instead of waiting, so :class:`RedisTier` makes callers wait for one
    of ``max_connections`` slots instead.
    """
    url, cluster = parse_redis_url(url)
    if cluster:
        return RedisCluster.from_url(
            url,
            max_connections=max_connections,
            socket_connect_timeout=timeout,
            socket_timeout=None,
            # One more try after a connection error or a cluster change, with
            # the slot table read again: a failover is seen at once.
            retry=Retry(NoBackoff(), retries=1),
        )
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout,
        socket_connect_timeout=timeout,
        # Not redis-py's default of 5 s: with a socket timeout every send goes
        # through asyncio.wait_for, which costs a task per command and, on
        # Python 3.11, can swallow a caller's cancellation.
        socket_timeout=None,
        retry=Retry(NoBackoff(), retries=1),
    )
    return aioredis.Redis(connection_pool=pool)


def _translate(op: str, timeout: float, exc: BaseException) -> TierError:
    if isinstance(exc, (TimeoutError, RedisTimeoutError)):
        return TierTimeoutError(f"redis {op}: no answer within {timeout}s")
    return TierUnavailableError(f"redis {op}: {exc}")


def _pool_exhausted(exc: BaseException) -> bool:
    # redis-py's BlockingConnectionPool, when no connection came free in time:
    # this process is busy, Redis is not down.
    # A cluster node's pool raises MaxConnectionsError (with no message).
    return isinstance(exc, MaxConnectionsError) or (
        isinstance(exc, RedisConnectionError) and str(exc).startswith("No connection available")
    )


class CircuitBreaker:
    """Stops calls from waiting on a Redis that is down.

    Operations report how they ended. A refused or reset connection is a
    failure. A timeout may only mean this process is busy (its operations
    queue for a pooled connection, or for an event loop that stalled), so it
    is a failure only once Redis has answered nothing for a whole budget and a
    PING on a connection of the breaker's own, outside the pool, does not
    answer either within ``max(1 s, 4 * timeout)``. After ``failures`` failures in a row (an answer, even an
    error reply, resets the count) the breaker opens: operations fail at once
    with :class:`TierUnavailableError`, without I/O, while a task PINGs Redis
    every ``probe_interval`` seconds on that connection and closes the breaker
    at the first answer. ``failures == 0`` disables it.
    """

    __slots__ = (
        "_answered_at",
        "_closed",
        "_consecutive",
        "_failures",
        "_interval",
        "_log",
        "_pinger",
        "_probe",
        "_timeout",
        "_verifying",
        "opened",
        "skipped",
    )

    def __init__(self, client: Client, *, failures: int, probe_interval: float, timeout: float) -> None:
        # Connections of its own: what it measures is Redis, not the pool.
        self._pinger = _ClusterPinger(client) if isinstance(client, RedisCluster) else _Pinger(client)
        self._failures = failures
        self._interval = probe_interval
        self._timeout = timeout
        self._consecutive = 0
        self._answered_at = 0.0  # time.monotonic() of the last answer from Redis
        self._probe: asyncio.Task[None] | None = None
        self._verifying: asyncio.Task[None] | None = None
        self._closed = False
        self._log = RateLimitedLogger()
        self.opened = 0  # times it opened
        self.skipped = 0  # operations refused while open

    @property
    def open(self) -> bool:
        return self._probe is not None

    def success(self) -> None:
        self._consecutive = 0
        self._answered_at = time.monotonic()

    def timeout(self) -> None:
        """An operation ran out of time: find out whether Redis answers."""
        if not self._failures or self._closed or self._probe is not None or self._verifying is not None:
            return
        if time.monotonic() - self._answered_at < self._timeout:
            return  # Redis answered meanwhile: this process is busy
        self._verifying = asyncio.get_running_loop().create_task(self._verify(), name="aiollmcache-verify")

    async def _verify(self) -> None:
        try:
            if await self._answers():
                self.success()
            else:
                self._open("does not answer a PING")
        finally:
            self._verifying = None

    def failure(self) -> None:
        self._consecutive += 1
        if self._failures and self._consecutive >= self._failures:
            self._open(f"failed {self._consecutive} times in a row")

    def _open(self, why: str) -> None:
        if self._closed or self._probe is not None:
            return
        self.opened += 1
        logger.warning("Redis %s: skipping it, probing every %.1f s", why, self._interval)
        self._probe = asyncio.get_running_loop().create_task(
            self._probe_until_back(), name="aiollmcache-probe"
        )

    async def _answers(self) -> bool:
        try:
            # A roomier budget than operations get: a busy event loop delays
            # reading the reply, and that must not pass for Redis being down.
            async with asyncio.timeout(max(1.0, 4 * self._timeout)):
                await self._pinger.ping(refresh=self._probe is not None)
        except ResponseError:
            return True  # an error reply (e.g. no permission for PING) is an answer
        except REDIS_ERRORS as exc:
            self._log.warning("probe", "Redis does not answer: %s", exc or type(exc).__name__)
            return False
        return True

    async def _probe_until_back(self) -> None:
        try:
            while True:
                await asyncio.sleep(self._interval)
                try:
                    if await self._answers():
                        break
                except Exception:  # a bug here must not keep Redis skipped for good
                    logger.exception("Redis probe failed")
                    break
            logger.warning("Redis answers again: using it")
            self.success()
        finally:
            self._probe = None

    async def aclose(self) -> None:
        self._closed = True
        for task in (self._probe, self._verifying):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._probe = self._verifying = None
        await self._pinger.aclose()


def one_connection_client(connection_class: Any, connection_kwargs: dict[str, Any]) -> aioredis.Redis:
    """A client of its own, one connection, to the server those settings
    reach (a pool's or a cluster node's): outside any shared pool."""
    return aioredis.Redis(
        connection_pool=aioredis.ConnectionPool(
            connection_class=connection_class, max_connections=1, **connection_kwargs
        )
    )


class _Pinger:
    """PINGs a single Redis on a connection outside the client's pool."""

    def __init__(self, client: aioredis.Redis) -> None:
        pool = client.connection_pool
        self._client = one_connection_client(pool.connection_class, pool.connection_kwargs)

    async def ping(self, *, refresh: bool) -> None:
        await self._client.ping()

    async def aclose(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose(close_connection_pool=True)


class _ClusterPinger:
    """PINGs the primaries of a cluster, each on a connection of its own:
    the cluster answers when one of them does.

    While the breaker is open no command tells the client that the cluster
    changed (a primary died and a replica took over), so the probe first
    reads the slot table again (``refresh``).
    """

    def __init__(self, client: RedisCluster) -> None:
        self._client = client
        self._connections: dict[str, Any] = {}

    async def ping(self, *, refresh: bool) -> None:
        manager = self._client.nodes_manager
        if refresh or not manager.slots_cache:
            await manager.initialize()
        primaries: list[ClusterNode] = self._client.get_primaries()
        if not primaries:
            raise RedisConnectionError("no primary known")
        # The cluster answers when one primary does (a primary that does not
        # is its own breaker's business); the other pings are then stopped:
        # a ping left running would hold its connection for the next probe.
        pings = [asyncio.ensure_future(self._ping(node)) for node in primaries]
        error: BaseException | None = None
        try:
            for finished in asyncio.as_completed(pings):
                try:
                    await finished
                    return
                except REDIS_ERRORS as exc:
                    error = exc
        finally:
            for ping in pings:
                ping.cancel()
            await asyncio.gather(*pings, return_exceptions=True)
        assert error is not None
        raise error

    async def _ping(self, node: ClusterNode) -> None:
        connection = self._connections.get(node.name)
        if connection is None:
            connection = self._connections[node.name] = node.connection_class(**node.connection_kwargs)
        try:
            await connection.send_command("PING")
            await connection.read_response()
        except BaseException:
            self._connections.pop(node.name, None)
            with contextlib.suppress(RedisError, OSError):
                await connection.disconnect()
            raise

    async def aclose(self) -> None:
        connections, self._connections = list(self._connections.values()), {}
        for connection in connections:
            with contextlib.suppress(RedisError, OSError):
                await connection.disconnect()


class _NodeBreakers:
    """On a cluster, the breaker of each primary: a primary whose operations
    failed ``failures`` times in a row (refused, reset: a node that is gone)
    is skipped, its keys failing at once, while the rest of the cluster is
    used as before. A probe reads the slot table again every
    ``probe_interval`` and closes the node's breaker when the node answers a
    PING or no longer serves any slot (a replica took over: its keys now go
    there)."""

    __slots__ = (
        "_client",
        "_counts",
        "_failures",
        "_interval",
        "_log",
        "_timeout",
        "_verifying",
        "open",
        "opened",
    )

    def __init__(self, client: RedisCluster, *, failures: int, probe_interval: float, timeout: float) -> None:
        self._client = client
        self._failures = failures
        self._interval = probe_interval
        self._timeout = timeout
        self._counts: dict[str, int] = {}
        self._log = RateLimitedLogger()
        self.open: dict[str, asyncio.Task[None]] = {}
        self._verifying: dict[str, asyncio.Task[None]] = {}
        self.opened = 0  # times a node's breaker opened

    def node_of(self, key: str) -> str | None:
        try:
            node = self._client.nodes_manager.get_node_from_slot(key_slot(key.encode()))
        except (KeyError, *REDIS_ERRORS):  # no slot table (yet): KeyError
            return None
        return str(node.name)

    def skips(self, key: str) -> str | None:
        """The node of ``key`` if its breaker is open."""
        name = self.node_of(key)
        return name if name in self.open else None

    def success(self, key: str) -> None:
        name = self.node_of(key)
        if name is not None:
            self._counts.pop(name, None)

    def failure(self, name: str) -> None:
        """An operation on node ``name`` failed. The error may not be the
        node's (redis-py closes every connection when the cluster changes):
        after ``failures`` in a row, the node is checked alone (:meth:`timeout`)."""
        count = self._counts[name] = self._counts.get(name, 0) + 1
        if self._failures and count >= self._failures:
            self.timeout(name)

    def timeout(self, name: str) -> None:
        """An operation on node ``name`` ran out of time, which may only mean
        this process is busy: PING that node alone, on a connection of its
        own, and skip it if it does not answer within ``max(1 s, 4 * timeout)``."""
        if not self._failures or name in self.open or name in self._verifying:
            return
        loop = asyncio.get_running_loop()
        self._verifying[name] = loop.create_task(self._verify(name), name="aiollmcache-node-verify")

    async def _verify(self, name: str) -> None:
        try:
            node = self._client.get_node(node_name=name)
            if node is not None and not await self._answers(node):
                self._open(name, "does not answer a PING")
            else:
                self._counts.pop(name, None)
        finally:
            self._verifying.pop(name, None)

    def _open(self, name: str, why: str) -> None:
        if name in self.open:
            return
        logger.warning("Redis node %s %s: skipping it", name, why)
        self.opened += 1
        loop = asyncio.get_running_loop()
        self.open[name] = loop.create_task(self._probe(name), name="aiollmcache-node-probe")

    async def _answers(self, node: ClusterNode) -> bool:
        connection = node.connection_class(**node.connection_kwargs)
        try:
            async with asyncio.timeout(max(1.0, 4 * self._timeout)):
                await connection.send_command("PING")
                await connection.read_response()
        except ResponseError:
            return True  # an answer
        except REDIS_ERRORS as exc:
            self._log.warning(node.name, "Redis node %s does not answer: %s", node.name, exc)
            return False
        finally:
            with contextlib.suppress(*REDIS_ERRORS):
                await connection.disconnect()
        return True

    async def _probe(self, name: str) -> None:
        try:
            while True:
                await asyncio.sleep(self._interval)
                try:
                    async with asyncio.timeout(max(1.0, 4 * self._timeout)):
                        await self._client.nodes_manager.initialize()
                except REDIS_ERRORS as exc:
                    self._log.warning(name, "Redis cluster: cannot read the slot table: %s", exc)
                    continue
                node = self._client.get_node(node_name=name)
                if node is None or not any(p.name == name for p in self._client.get_primaries()):
                    break  # replaced: its slots are served elsewhere now
                if await self._answers(node):
                    break
            logger.warning("Redis node %s: using it again", name)
        finally:
            self.open.pop(name, None)
            self._counts.pop(name, None)

    async def aclose(self) -> None:
        probes = [*self.open.values(), *self._verifying.values()]
        self.open, self._verifying = {}, {}
        for probe in probes:
            probe.cancel()
        await asyncio.gather(*probes, return_exceptions=True)


_READ_ALONE: Final = object()  # a batch's leader gave up: read on your own
# A stream in flight keeps about this many chunks; a follower reads up to
# _READ_CHUNKS of them a round trip.
_MAX_STREAM_CHUNKS: Final = 100_000
_READ_CHUNKS: Final = 1000
# At most this many reads share one command: its reply, up to this many
# entries, is read as one piece.
_BATCH_MAX: Final = 256
# On a cluster, the share of the budget a batch gives each node to answer:
# the rest is left for reads sent again after a redirection.
_NODE_SHARE: Final = 0.8


def _hand(members: list[tuple[tuple[str, ...], asyncio.Future[Any]]], outcome: object) -> None:
    for _, waiter in members:
        if not waiter.done():
            waiter.set_result(outcome)


class _Batches:
    """The open batch of one kind of read, and how a batch is sent."""

    __slots__ = ("open", "send")

    def __init__(self, send: Callable[[list[tuple[str, ...]]], Awaitable[list[Any]]]) -> None:
        self.open: list[tuple[tuple[str, ...], asyncio.Future[Any]]] | None = None
        self.send = send


# Entries up to this size travel inside the "done" notification.
_INLINE_NOTIFICATION_BYTES = 64 * 1024
# A lease token: 16 random bytes in hex (aiollmcache.flight).
_TOKEN_BYTES = 32
# max_entry_bytes bounds the response JSON; the envelope adds a header.
_HEADER_ALLOWANCE = 64 * 1024


@dataclass(frozen=True, slots=True)
class HotKeys:
    """Sliding life for hot keys: a key read ``hits`` times within ``window_ms``
    lives ``extend_ms`` from each further read, up to ``max_age_ms`` after it was
    written."""

    hits: int
    window_ms: int
    extend_ms: int
    max_age_ms: int


class _Deadline:
    """One operation's deadline: cancels its task when it passes."""

    __slots__ = ("at", "fired", "task")

    def __init__(self, task: asyncio.Task[Any], at: float) -> None:
        self.task = task
        self.at = at
        self.fired = False


class _Budget:
    """Deadlines for every operation in flight, enforced by one timer.

    ``asyncio.timeout`` schedules and cancels a timer per operation; at
    thousands of operations a second the event loop's heap fills with
    cancelled timers it keeps rebuilding (measured here: ~20 us per
    operation). This keeps one timer, set for the earliest deadline, and
    cancels the tasks whose deadline has passed when it fires.
    """

    __slots__ = ("_inflight", "_timeout", "_timer")

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._inflight: set[_Deadline] = set()
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> _Deadline:
        task = asyncio.current_task()
        assert task is not None
        loop = task.get_loop()
        deadline = _Deadline(task, loop.time() + self._timeout)
        self._inflight.add(deadline)
        if self._timer is None:
            self._timer = loop.call_at(deadline.at, self._expire, loop)
        return deadline

    def finish(self, deadline: _Deadline) -> None:
        self._inflight.discard(deadline)

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time()
        expired = [d for d in self._inflight if d.at <= now]
        for deadline in expired:
            self._inflight.discard(deadline)
            deadline.fired = True
            deadline.task.cancel()
        if self._inflight:
            self._timer = loop.call_at(min(d.at for d in self._inflight), self._expire, loop)


def _pack_gets(keys: list[str]) -> bytes:
    """GET commands in RESP, as redis-py would pack them, ~7x faster (the
    batched reads of a cluster send one per key)."""
    encoded = [key.encode() for key in keys]
    return b"".join(b"*2\r\n$3\r\nGET\r\n$%d\r\n%b\r\n" % (len(key), key) for key in encoded)


def _from_node(exc: BaseException, node: ClusterNode) -> BaseException:
    """``exc``, marked as met on ``node`` (for its breaker)."""
    with contextlib.suppress(AttributeError):
        exc.last_failed_node_name = node.name  # type: ignore[attr-defined]
    return exc


def _failed_node(exc: BaseException) -> str | None:
    """The cluster node a connection error was met on, as redis-py records it."""
    node = getattr(exc, "connection", None)
    name = getattr(node, "name", None) if isinstance(node, ClusterNode) else None
    return name or getattr(exc, "last_failed_node_name", None)


def _is_wrongtype(exc: BaseException) -> bool:
    """A WRONGTYPE reply, raw or as the cause of a translated error."""
    return any(
        isinstance(error, ResponseError) and str(error).startswith("WRONGTYPE")
        for error in (exc, exc.__cause__)
    )


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
        client: Client,
        *,
        namespace: str,
        max_connections: int = 64,
        owns_client: bool,
        timeout: float,
        compress_above: int,
        max_entry_bytes: int,
        hot: HotKeys | None = None,
        breaker_failures: int = 0,
        breaker_probe_interval: float = 1.0,
        sealer: Sealer | None = None,
        batching: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        connection_kwargs = client.get_connection_kwargs()
        if connection_kwargs.get("decode_responses"):
            raise ConfigurationError("redis: the client must be built with decode_responses=False")
        self._client = client
        self._cluster = isinstance(client, RedisCluster)
        # A cluster client's pools raise when full: callers wait here instead,
        # at most ``max_connections`` operations at a time (so at most that
        # many connections to any one node).
        self._gate = asyncio.Semaphore(max_connections) if self._cluster else None
        self._namespace = validate_namespace(namespace)
        self._owns_client = owns_client
        self._timeout = timeout
        self._budget = _Budget(timeout)
        self.sealer = sealer
        self._batching = batching
        self._tasks: set[asyncio.Task[None]] = set()
        self._gets = _Batches(self._get_on_nodes if self._cluster else self._mget)
        self._hot_reads = _Batches(self._get_hot_on_nodes if self._cluster else self._get_hot_batch)
        self._reads_in_flight = 0
        self.breaker = CircuitBreaker(
            client, failures=breaker_failures, probe_interval=breaker_probe_interval, timeout=timeout
        )
        self._nodes = (
            _NodeBreakers(
                client, failures=breaker_failures, probe_interval=breaker_probe_interval, timeout=timeout
            )
            if isinstance(client, RedisCluster)
            else None
        )
        self._compress_above = compress_above
        self._log = RateLimitedLogger()
        self._max_entry_bytes = max_entry_bytes
        self._clock = clock
        self._version_key = f"{KEY_PREFIX}:{namespace}:version"
        self._sync_key = f"{KEY_PREFIX}:{namespace}:sync"
        self._sync_state = client.register_script(_SYNC_STATE)
        # On a cluster, invalidations go over the sharded channel of the count
        # that numbers them (a channel may share a key's name, not its data).
        self.invalidation_channel = self._sync_key if self._cluster else f"{KEY_PREFIX}:{namespace}:inv"
        publish = "'SPUBLISH'" if self._cluster else "'PUBLISH'"
        self._set_tagged = client.register_script(_SET_TAGGED)
        self._tag_retire = client.register_script(_TAG_RETIRE)
        self._publish_invalidation = client.register_script(
            _PUBLISH_INVALIDATION.replace("'PUBLISH'", publish)
        )
        self._delete_if_equal = client.register_script(_DELETE_IF_EQUAL)
        self._acquire = client.register_script(_ACQUIRE)
        self._add_vector = client.register_script(_ADD_VECTOR)
        self._get_hot = client.register_script(_GET_HOT)
        self._get_hot_many = client.register_script(_GET_HOT_MANY)
        self._hot = hot
        self._renew = client.register_script(_RENEW)
        self._commit = client.register_script(_COMMIT.replace("'PUBLISH'", publish))
        self._abandon = client.register_script(_ABANDON.replace("'PUBLISH'", publish))
        self._tag_add = client.register_script(_TAG_ADD)
        self._hot_on_node_sha = hashlib.sha1(_GET_HOT_ON_NODE.encode()).hexdigest()
        self.version: int | None = None

    @property
    def client(self) -> Client:
        return self._client

    @property
    def cluster(self) -> bool:
        return self._cluster

    @property
    def nodes_skipped(self) -> int:
        """Cluster nodes skipped now (their breaker is open)."""
        return len(self._nodes.open) if self._nodes is not None else 0

    @property
    def node_breakers_opened(self) -> int:
        return self._nodes.opened if self._nodes is not None else 0

    def _key(self, kind: str, key: str) -> str:
        if self.version is None:
            raise TierUnavailableError("redis: namespace version not loaded")
        return f"{KEY_PREFIX}:{self._namespace}:{self.version}:{kind}:{{{key}}}"

    def entry_key(self, key: str) -> str:
        return self._key("e", key)

    def lease_key(self, key: str) -> str:
        return self._key("l", key)

    def channel(self, key: str) -> str:
        return self._key("n", key)

    def tag_key(self, tag: str) -> str:
        return self._key("t", tag)

    async def load_version(self) -> int:
        raw = await self._call("GET version", self._client.get(self._version_key), self._version_key)
        try:
            version = 0 if raw is None else int(raw)
        except ValueError:
            raise CorruptEntryError(f"{self._version_key} holds {raw!r}, not an integer") from None
        self.version = version
        return version

    async def get(self, key: str) -> Entry | _Missing:
        if self._hot is not None:
            return await self._get_counting(key)
        rkey = self.entry_key(key)
        if not self._batching:
            blob = await self._read(rkey, self._client.get(rkey))
        else:
            alone = partial(self._client.get, rkey)
            command = self._batched(self._gets, (rkey,), alone) if self._reads_in_flight else alone()
            self._reads_in_flight += 1
            try:
                blob = await self._read(rkey, command)
            finally:
                self._reads_in_flight -= 1
        if blob is None:
            return MISSING
        if not isinstance(blob, bytes):  # only a client that decodes responses returns str
            raise CorruptEntryError("redis returned text, not bytes")
        return await self._decode(key, rkey, blob)

    async def get_many(self, keys: list[str]) -> list[Entry | _Missing | CorruptEntryError]:
        """The entries at ``keys``, in one round trip on a single Redis (one
        MGET); a corrupt one (dropped, as by :meth:`get`) as its error. With
        hot keys, which count every read, or on a cluster, whose keys are in
        many slots, the reads are concurrent :meth:`get` calls, batched as
        usual."""
        if self._hot is not None or self._cluster or len(keys) == 1:
            results = await asyncio.gather(*(self.get(key) for key in keys), return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException) and not isinstance(result, CorruptEntryError):
                    raise result
            return cast(list[Entry | _Missing | CorruptEntryError], results)
        rkeys = [self.entry_key(key) for key in keys]
        # MGET answers nil for a key of another type: a miss here, found
        # foreign by the plain read that follows a miss.
        blobs = await self._call("MGET", self._client.mget(rkeys), rkeys[0])
        found: list[Entry | _Missing | CorruptEntryError] = []
        for key, rkey, blob in zip(keys, rkeys, blobs, strict=True):
            if blob is None:
                found.append(MISSING)
                continue
            try:
                if not isinstance(blob, bytes):
                    raise CorruptEntryError("redis returned text, not bytes")
                found.append(await self._decode(key, rkey, blob))
            except CorruptEntryError as exc:
                found.append(exc)
        return found

    async def _batched(
        self, batches: _Batches, keys: tuple[str, ...], alone: Callable[[], Awaitable[Any]]
    ) -> Any:
        """Read ``keys`` with one command of ``batches``, sharing its round trip
        with every read of the same kind issued in the same event-loop tick.

        Only for a read issued while others are in flight (``_reads_in_flight``,
        counted by the callers): a lone read is sent at once with ``alone()``
        and waits for nothing. The first caller of a tick leads: it yields
        once to the loop, so that callers ready in the same tick can join (up
        to ``_BATCH_MAX``), then sends all their keys as one command and hands
        each its own reply, hits at once. The batched commands answer nil both
        for a missing entry and for a key holding another type, so the leader
        reads the nils again, one pipeline for all of them: a miss costs a
        second round trip (next to a model call, nothing), and a foreign value
        fails its own read exactly as without batching. A leader cancelled
        before the replies came tells the others to read alone; a follower
        cancelled (its budget ran out) just stops waiting. An error of the
        batched command (the connection, a timeout) is every member's error.
        """
        reply = await self._join(batches, keys)
        if reply is _READ_ALONE:
            reply = await alone()
        return reply

    async def _join(self, batches: _Batches, keys: tuple[str, ...]) -> Any:
        batch = batches.open
        if batch is not None:
            joined: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            batch.append((keys, joined))
            if len(batch) + 1 >= _BATCH_MAX:  # (the leader is the one more)
                batches.open = None  # full: the next caller leads a new one
            reply = await joined
            if isinstance(reply, Exception):
                raise reply
            return reply
        batch = batches.open = []
        try:
            try:
                await asyncio.sleep(0)
            finally:
                if batches.open is batch:
                    batches.open = None
            if not batch:
                return _READ_ALONE
            replies = await batches.send([keys, *[other for other, _ in batch]])
            if len(replies) != len(batch) + 1:
                raise ResponseError(f"a batch of {len(batch) + 1} reads got {len(replies)} replies")
        except BaseException as exc:
            _hand(batch, _READ_ALONE if not isinstance(exc, Exception) else exc)
            raise
        # Hits first; then the nils, read again in one pipeline, which tells
        # a missing entry (nil) from a key holding another type (its error).
        absent: list[tuple[tuple[str, ...], asyncio.Future[Any]]] = []
        for (other, waiter), reply in zip(batch, replies[1:], strict=True):
            if reply is None:
                absent.append((other, waiter))
            elif not waiter.done():
                waiter.set_result(reply)
        if isinstance(replies[0], Exception):  # (on a cluster, one node's failure is its reads')
            if absent:
                await self._read_again_for(batches, absent)
            raise replies[0]
        if replies[0] is not None:
            if absent:  # the leader's hit does not wait for the others' second look
                task = asyncio.get_running_loop().create_task(self._read_again_for(batches, absent))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            return replies[0]
        absent.insert(0, (keys, asyncio.get_running_loop().create_future()))
        await self._read_again_for(batches, absent)
        mine = absent[0][1].result()
        if mine is _READ_ALONE:
            raise asyncio.CancelledError
        if isinstance(mine, Exception):
            raise mine
        return mine

    async def _read_again_for(
        self, batches: _Batches, absent: list[tuple[tuple[str, ...], asyncio.Future[Any]]]
    ) -> None:
        """Read again the keys that a batched command answered nil for, in
        one pipeline, and hand each its reply (or the pipeline's error)."""
        try:
            async with asyncio.timeout(self._timeout):
                again = await self._read_again(batches, [keys for keys, _ in absent])
        except BaseException as exc:
            _hand(absent, exc if isinstance(exc, Exception) else _READ_ALONE)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, waiter), reply in zip(absent, again, strict=True):
            if not waiter.done():
                waiter.set_result(reply)

    async def _read_again(self, batches: _Batches, reads: list[tuple[str, ...]]) -> list[Any]:
        if self._cluster:  # a WRONGTYPE stays an error here: that is what the second look is for
            return await self._routed("get" if batches is self._gets else "hot", reads)
        async with cast(aioredis.Redis, self._client).pipeline(transaction=False) as pipe:
            for keys in reads:
                if batches is self._gets:
                    pipe.get(keys[0])
                else:
                    await self._get_hot(keys=keys, args=self._hot_args(), client=pipe)  # queued
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        if len(replies) != len(reads):
            raise ResponseError(f"{len(reads)} reads got {len(replies)} replies")
        return replies

    def _mget(self, reads: list[tuple[str, ...]]) -> Awaitable[list[Any]]:
        return self._client.mget([rkey for (rkey,) in reads])

    def _hot_args(self) -> list[int]:
        hot = self._hot
        assert hot is not None
        return [hot.window_ms, hot.hits, hot.extend_ms, hot.max_age_ms]

    def _get_hot_batch(self, reads: list[tuple[str, ...]]) -> Awaitable[list[Any]]:
        keys = [key for pair in reads for key in pair]
        return cast("Awaitable[list[Any]]", self._get_hot_many(keys=keys, args=self._hot_args()))

    # -- reads batched per node, on a cluster ------------------------------------

    def _get_on_nodes(self, reads: list[tuple[str, ...]]) -> Awaitable[list[Any]]:
        return self._on_nodes("get", [], reads)

    def _get_hot_on_nodes(self, reads: list[tuple[str, ...]]) -> Awaitable[list[Any]]:
        return self._on_nodes("hot", self._hot_args(), reads)

    async def _on_nodes(self, script: str, head: list[int], reads: list[tuple[str, ...]]) -> list[Any]:
        """A batch of reads on a cluster, one round trip to each node holding
        some of its keys, all sent before any reply is read. There, plain
        reads go as pipelined GETs (MGET may not span slots; GETs cost Redis
        half what a script reading the same keys does), hot ones as one
        script call (flagged allow-cross-slot-keys: it may read many slots of
        its node). A read that fails for the cluster's sake (its slot moved,
        its node gone) goes again through the cluster client, which follows
        redirections and reads the slot table again: nothing is read from a
        node that does not own the key, and one node's failure is its own
        reads' alone."""
        groups: dict[str, tuple[ClusterNode, list[int]]] = {}
        replies: list[Any] = [None] * len(reads)
        skipped = self._nodes.open if self._nodes is not None else {}
        try:
            manager = self._client.nodes_manager  # type: ignore[union-attr]
            for i, keys in enumerate(reads):
                node = manager.get_node_from_slot(key_slot(keys[0].encode()))
                if node.name in skipped:  # its breaker is open: fail this read alone, at once
                    replies[i] = TierUnavailableError(
                        f"redis GET: skipped, node {node.name} failed repeatedly"
                    )
                else:
                    groups.setdefault(node.name, (node, []))[1].append(i)
        except (KeyError, *REDIS_ERRORS):  # no slot table yet, or a slot not covered
            return await self._read_routed(script, reads)
        calls: list[tuple[ClusterNode, list[tuple[Any, ...]], bytes | None]] = []
        for node, indexes in groups.values():
            if script == "get":
                rkeys = [reads[i][0] for i in indexes]
                calls.append((node, [("GET", rkey) for rkey in rkeys], _pack_gets(rkeys)))
            else:
                pairs = [k for i in indexes for k in reads[i]]
                calls.append((node, [("EVALSHA", self._hot_on_node_sha, 0, *head, *pairs)], None))
        answers = await self._send_on_nodes(calls)
        again: list[int] = []
        for (_, indexes), answer in zip(groups.values(), answers, strict=True):
            if isinstance(answer, BaseException):  # the node failed: its reads alone fail
                for i in indexes:
                    replies[i] = answer
                continue
            if script != "get":
                answer = answer[0]  # the script's own reply: a list, one per read
            if not isinstance(answer, list) or len(answer) != len(indexes):
                again += indexes  # an error reply (e.g. MOVED): each read on its own
                continue
            for i, reply in zip(indexes, answer, strict=True):
                if isinstance(reply, ResponseError) and not _is_wrongtype(reply):
                    again.append(i)  # MOVED, ASK, CLUSTERDOWN...
                else:  # a key of another type reads as nil, as in MGET
                    replies[i] = None if isinstance(reply, ResponseError) else reply
        if again:
            routed = await self._read_routed(script, [reads[i] for i in again])
            for i, reply in zip(again, routed, strict=True):
                replies[i] = reply
        return replies

    async def _send_on_nodes(
        self, calls: list[tuple[ClusterNode, list[tuple[Any, ...]], bytes | None]]
    ) -> list[list[Any] | BaseException]:
        """Each node's commands (packed already, or packed here) pipelined on
        one of its connections, every node's sent before any reply is read
        (no task per node): per node,
        its replies (an error reply as its ResponseError), or the exception
        the node met, marked with the node's name. Each node fails alone: a
        refused connection or one that gives no answer within its share of
        the budget costs only that node's reads. A connection whose replies
        were not all read is closed, never reused."""
        answers: list[list[Any] | BaseException | None] = [None] * len(calls)
        taken: list[tuple[int, ClusterNode, Any]] = []
        unread: set[int] = set()
        try:
            for n, (node, commands, packed) in enumerate(calls):
                try:
                    connection = node.acquire_connection()
                except REDIS_ERRORS as exc:
                    answers[n] = _from_node(exc, node)
                    continue
                taken.append((n, node, connection))
                unread.add(n)
                try:
                    await node.disconnect_if_needed(connection)
                    await connection.send_packed_command(packed or connection.pack_commands(commands))
                except REDIS_ERRORS as exc:
                    answers[n] = _from_node(exc, node)
            deadline = asyncio.get_running_loop().time() + self._timeout * _NODE_SHARE
            for n, node, connection in taken:
                if answers[n] is not None:
                    continue
                replies: list[Any] = []
                try:
                    async with asyncio.timeout_at(deadline):
                        for _ in calls[n][1]:
                            try:
                                replies.append(await connection.read_response())
                            except ResponseError as exc:  # an error reply: the connection is fine
                                replies.append(exc)
                except REDIS_ERRORS as exc:  # (TimeoutError is an OSError)
                    answers[n] = _from_node(exc, node)
                    continue
                answers[n] = replies
                unread.discard(n)
        finally:
            for n, node, connection in taken:
                if n in unread:
                    connection.mark_for_reconnect()  # release() then closes it
                node.release(connection)
        for n, answer in enumerate(answers):
            if isinstance(answer, list) and answer and isinstance(answer[0], NoScriptError):
                node, commands, _ = calls[n]  # a node restarted, or a new one: load the script there
                try:
                    await node.execute_command("SCRIPT", "LOAD", _GET_HOT_ON_NODE)
                    answers[n] = [await node.execute_command(*commands[0])]
                except REDIS_ERRORS as exc:
                    answers[n] = _from_node(exc, node)
        return [a if a is not None else RedisConnectionError("no answer") for a in answers]

    async def _read_routed(self, script: str, reads: list[tuple[str, ...]]) -> list[Any]:
        """:meth:`_routed`, where a key holding another type reads as nil, as
        in a batch."""
        return [
            None if isinstance(r, Exception) and _is_wrongtype(r) else r
            for r in await self._routed(script, reads)
        ]

    async def _routed(self, script: str, reads: list[tuple[str, ...]]) -> list[Any]:
        """Reads one by one through the cluster client: one pipeline for plain
        reads, in turn for hot ones (scripts). Each read's reply, or the
        exception it met (a failed pipeline: all its reads')."""
        replies: list[Any]
        if script == "get":
            try:
                replies = await self._pipelined([("GET", rkey) for (rkey,) in reads], raise_on_error=False)
            except REDIS_ERRORS as exc:
                replies = [exc] * len(reads)
        else:
            replies = []
            for keys in reads:
                try:
                    replies.append(await self._get_hot(keys=keys, args=self._hot_args()))
                except REDIS_ERRORS as exc:
                    replies.append(exc)
        return replies

    async def _read(self, rkey: str, command: Awaitable[T]) -> T:
        """Read an entry key; a value of another type there is foreign data."""
        try:
            return await self._call("GET", command, rkey)
        except TierUnavailableError as exc:
            if not _is_wrongtype(exc):
                raise
            await self._call("UNLINK", self._client.unlink(rkey), rkey)
            raise CorruptEntryError(f"{rkey} holds a value of another type") from exc

    async def _get_counting(self, key: str) -> Entry | _Missing:
        """GET with hit counting and sliding life for hot keys, one round trip."""
        rkey = self.entry_key(key)
        keys = (rkey, self._key("h", key))
        alone = partial(self._get_hot, keys=keys, args=self._hot_args())
        if not self._batching:
            found = await self._read(rkey, alone())
        else:
            command = self._batched(self._hot_reads, keys, alone) if self._reads_in_flight else alone()
            self._reads_in_flight += 1
            try:
                found = await self._read(rkey, command)
            finally:
                self._reads_in_flight -= 1
        if not found:
            return MISSING
        blob, pttl = found
        if not isinstance(blob, bytes):
            raise CorruptEntryError("redis returned text, not bytes")
        entry = await self._decode(key, rkey, blob)
        if pttl > 0:  # the key's life may have slid past the header's expiry
            entry.slid_until = self._clock() + pttl / 1000
        return entry

    def _open(self, key: str, blob: bytes, rkey: str | None = None) -> Entry:
        """Decode ``blob``, an entry of ``key`` as stored at its entry key
        ``rkey``, whatever carried it; raises CorruptEntryError."""
        return decode_entry(
            blob,
            key,
            max_bytes=self._max_entry_bytes + _HEADER_ALLOWANCE,
            sealer=self.sealer,
            context=(rkey or self.entry_key(key)).encode(),
        )

    async def _decode(self, key: str, rkey: str, blob: bytes) -> Entry:
        try:
            return self._open(key, blob, rkey)
        except NotForThisCache:
            raise  # its writer can read it: a miss here, left in place
        except CorruptEntryError:
            await self._call("DEL corrupt", self._delete_if_equal(keys=[rkey], args=[blob]), rkey)
            raise

    # -- the semantic tier's vectors (see aiollmcache.tiers.semantic) -----------

    def vector_key(self, partition: str) -> str:
        return self._key("v", partition)

    async def add_vector(
        self,
        partition: str,
        key: str,
        blob: bytes,
        dtype: str,
        expires_at: float,
        numbers: str,
        max_records: int,
    ) -> None:
        ttl_ms = math.ceil((expires_at - self._clock()) * 1000)
        if ttl_ms <= 0:
            return
        args: list[str | int | bytes] = [key, blob, dtype, repr(expires_at), max_records, ttl_ms, numbers]
        await self._call(
            "ADD VECTOR",
            self._add_vector(keys=[self.vector_key(partition)], args=args),
            self.vector_key(partition),
        )

    async def read_vectors(
        self, partition: str, after: str, count: int
    ) -> list[tuple[str, dict[bytes, bytes]]]:
        """Up to ``count`` records of a partition's stream after id ``after``
        (``"-"``: from the start), oldest first."""
        low = after if after == "-" else f"({after}"
        records: Any = await self._call(
            "XRANGE",
            self._client.xrange(self.vector_key(partition), min=low, max="+", count=count),
            self.vector_key(partition),
        )
        return [
            (rid.decode() if isinstance(rid, bytes) else str(rid), fields if isinstance(fields, dict) else {})
            for rid, fields in records or ()
        ]

    # -- streams in flight (see aiollmcache.streaming) ------------------------------

    def chunk_stream_key(self, key: str) -> str:
        return self._key("s", key)

    async def append_chunks(
        self, key: str, owner: str, records: list[tuple[bytes, bytes]], ttl_ms: int
    ) -> None:
        """Append ``(kind, data)`` records, marked with the lease ``owner``, to
        the stream of ``key``'s answer in flight, and keep it ``ttl_ms`` more."""
        skey = self.chunk_stream_key(key)
        pipe = self._client.pipeline(transaction=False)
        for kind, data in records:
            pipe.xadd(skey, {"o": owner, "t": kind, "d": data}, maxlen=_MAX_STREAM_CHUNKS, approximate=True)
        pipe.pexpire(skey, ttl_ms)
        await self._call("XADD", pipe.execute(), skey)

    async def read_chunks(
        self, key: str, after: str, block_ms: int | None
    ) -> list[tuple[str, bytes, bytes, bytes]]:
        """Records after id ``after`` of ``key``'s stream in flight, waiting up
        to ``block_ms`` for one (None: not at all): ``(id, owner, kind,
        data)``, oldest first."""
        found: Any = await self._call(
            "XREAD",
            self._client.xread({self.chunk_stream_key(key): after}, count=_READ_CHUNKS, block=block_ms),
            self.chunk_stream_key(key),
        )
        records = []
        for _, entries in found or ():
            for rid, fields in entries:
                if not isinstance(fields, dict):
                    continue
                records.append(
                    (
                        rid.decode() if isinstance(rid, bytes) else str(rid),
                        fields.get(b"o", b""),
                        fields.get(b"t", b""),
                        fields.get(b"d", b""),
                    )
                )
        return records

    async def lease_holder(self, key: str) -> tuple[bool, bytes | None, int]:
        """Whether ``key``'s entry exists, the token holding its lease (None:
        free) and the lease's remaining milliseconds, in one round trip."""
        pipe = self._client.pipeline(transaction=False)
        pipe.exists(self.entry_key(key))
        pipe.get(self.lease_key(key))
        pipe.pttl(self.lease_key(key))
        exists, token, pttl = await self._call("LEASE", pipe.execute(), self.lease_key(key))
        return bool(exists), token if isinstance(token, bytes) else None, int(pttl)

    # -- the lease (see aiollmcache.flight) ------------------------------------

    async def acquire(
        self, key: str, token: str, lease_ms: int, *, skip_entry: bool = False
    ) -> Entry | bool | int:
        """One round trip: the entry if there is one (may raise CorruptEntryError;
        not looked at with ``skip_entry``), else True if the lease was taken with
        ``token``, else the lease's remaining time in milliseconds."""
        rkey = self.entry_key(key)
        args: list[str | int] = [token, lease_ms, "1" if skip_entry else "0"]
        status, value = await self._call(
            "ACQUIRE", self._acquire(keys=[rkey, self.lease_key(key)], args=args), rkey
        )
        if status == 1:
            return await self._decode(key, rkey, value)
        if status == 2:
            return True
        return max(0, int(value))

    async def renew(self, key: str, token: str, lease_ms: int) -> bool:
        """Extend the lease if ``token`` still holds it."""
        return bool(
            await self._call(
                "RENEW", self._renew(keys=[self.lease_key(key)], args=[token, lease_ms]), self.lease_key(key)
            )
        )

    def _remaining_ms(self, entry: Entry) -> int:
        return max(1, math.ceil((entry.expires_at - self._clock()) * 1000))

    def storable(self, entry: Entry) -> bool:
        """Whether ``set``/``commit`` would store it (not expired, not too large)."""
        return entry.expires_at > self._clock() and len(entry.raw) <= self._max_entry_bytes

    async def commit(self, entry: Entry, blob: bytes, token: str) -> bool:
        """Store ``blob``, release the lease and notify waiters, only if ``token``
        holds the lease. Returns whether it did. Check :meth:`storable` first."""
        ttl_ms = self._remaining_ms(entry)
        keys = [self.entry_key(entry.key), self.lease_key(entry.key)]
        inline = "1" if len(blob) <= _INLINE_NOTIFICATION_BYTES else "0"
        args: list[str | bytes | int] = [token, blob, ttl_ms, self.channel(entry.key), inline]
        if entry.tags and self._cluster:
            async with self._tag_apart(entry):
                return bool(await self._call("COMMIT", self._commit(keys=keys, args=args), keys[0]))
        if entry.tags:
            keys += [self.tag_key(tag) for tag in entry.tags]
            args += [entry.key, self._tag_life_ms(entry)]
        return bool(await self._call("COMMIT", self._commit(keys=keys, args=args), keys[0]))

    @contextlib.asynccontextmanager
    async def _tag_apart(self, entry: Entry) -> AsyncIterator[None]:
        """On a cluster, where a tag's set is in another slot than its entry:
        add the entry to its tags' sets before it is written and again after.
        Before: an invalidation of the tag that starts while the entry is
        being written takes the entry with it. After: one that took over the
        set in between left a new set, which must have the entry too. Either
        way an entry is never in Redis, unlisted, past an invalidation that
        began after it was written."""
        await self._add_to_tags(entry)
        try:
            yield
        except BaseException:
            # The write failed, timed out or was cancelled: it may have reached
            # Redis all the same. List it again, without holding up the error.
            self._tag_again(entry)
            raise
        # Run to the end even if the caller is cancelled meanwhile (owned by
        # the tier, like a refresh).
        await asyncio.shield(self._tag_again(entry))

    def _tag_again(self, entry: Entry) -> asyncio.Task[None]:
        after = asyncio.get_running_loop().create_task(self._add_to_tags(entry))
        self._tasks.add(after)
        after.add_done_callback(self._tag_added)
        return after

    def _tag_added(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            self._log.warning("tag", "could not list an entry in its tags' sets: %s", error)

    async def _add_to_tags(self, entry: Entry) -> None:
        args: list[str | int] = [entry.key, self._tag_life_ms(entry)]
        for tag in entry.tags:
            await self._call("TAG", self._tag_add(keys=[self.tag_key(tag)], args=args), self.tag_key(tag))

    def _tag_life_ms(self, entry: Entry) -> int:
        """How long from now an entry may live at the latest: its tags' sets
        keep it that long."""
        until = entry.expires_at
        if self._hot is not None:  # a hot entry's life may slide up to max_age
            until = max(until, entry.created_at + self._hot.max_age_ms / 1000)
        return max(1, math.ceil((until - self._clock()) * 1000))

    def pass_key(self, key: str) -> str:
        return self._key("p", key)

    async def pass_on(self, entry: Entry, token: str, keep_ms: int) -> bytes:
        """Leave an answer the policy refused where the lease's waiters find
        it, without storing it as an entry: a key of its own, kept ``keep_ms``
        (the holder's token, then the entry's bytes). Returns the message that
        releases the lease: the entry itself when small ("pass:"), else
        "passed" (read the key); "retry" (a waiter computes its own) for an
        answer larger than ``max_entry_bytes``."""
        if len(entry.raw) > self._max_entry_bytes:
            return b"retry"
        blob = self.encode(entry)
        pkey = self.pass_key(entry.key)
        await self._call("SET pass", self._client.set(pkey, token.encode() + blob, px=keep_ms), pkey)
        return b"pass:" + blob if len(blob) <= _INLINE_NOTIFICATION_BYTES else b"passed"

    async def read_passed(self, key: str, token: str | bytes | None = None) -> Entry | None:
        """The answer last passed on for ``key`` (by the holder of ``token``,
        if given), with ``refused`` set; None if there is none."""
        pkey = self.pass_key(key)
        value = await self._call("GET pass", self._client.get(pkey), pkey)
        if not isinstance(value, bytes) or len(value) <= _TOKEN_BYTES:
            return None
        if token is not None and value[:_TOKEN_BYTES] != (
            token.encode() if isinstance(token, str) else token
        ):
            return None
        try:
            entry = self._open(key, value[_TOKEN_BYTES:])
        except CorruptEntryError:
            return None
        entry.refused = "passed"
        return entry

    def decode_notification(self, key: str, message: bytes) -> Entry | None:
        """The entry carried by a "done:" or "pass:" message (a "pass:" one
        with ``refused`` set: not stored), or None (none carried, or invalid:
        the caller then reads Redis)."""
        passed = message.startswith(b"pass:")
        if not passed and not message.startswith(b"done:"):
            return None
        try:
            entry = self._open(key, message[5:])
        except CorruptEntryError:
            return None
        if passed:
            entry.refused = "passed"
        return entry

    async def abandon(self, key: str, token: str, message: bytes) -> bool:
        """Release the lease without an entry and publish ``message`` to waiters."""
        args: list[str | bytes] = [token, self.channel(key), message]
        lease = self.lease_key(key)
        return bool(await self._call("ABANDON", self._abandon(keys=[lease], args=args), lease))

    async def _call(self, op: str, command: Awaitable[T], key: str | None = None) -> T:
        """Await one command within the time budget, translating Redis errors.

        ``key``: the one Redis key (or slot) the command is about, if any; on a
        cluster its failures then count against its node's breaker only.

        (A coroutine, not a context manager, and no timer of its own: this is
        the hit path, see :class:`_Budget`.)
        """
        breaker = self.breaker
        nodes = self._nodes
        skipped = nodes.skips(key) if nodes is not None and key is not None and nodes.open else None
        if breaker.open or skipped:
            breaker.skipped += 1
            if inspect.iscoroutine(command):
                command.close()
            what = f"its node ({skipped})" if skipped else "Redis"
            raise TierUnavailableError(f"redis {op}: skipped, {what} failed repeatedly (circuit open)")
        deadline = self._budget.start()
        try:
            if self._gate is None:
                result = await command
            else:
                try:
                    await self._gate.acquire()
                except BaseException:
                    if inspect.iscoroutine(command):
                        command.close()  # never sent: no "never awaited" warning
                    raise
                try:
                    result = await command
                finally:
                    self._gate.release()
        except asyncio.CancelledError:
            # Ours only if the budget fired and nobody else cancelled the task.
            if deadline.fired and deadline.task.uncancel() == 0:
                if nodes is not None and key is not None and (name := nodes.node_of(key)):
                    nodes.timeout(name)  # that node may hang: check it alone
                else:
                    breaker.timeout()
                raise TierTimeoutError(f"redis {op}: no answer within {self._timeout}s") from None
            raise
        except REDIS_ERRORS as exc:
            if isinstance(exc, ResponseError):
                breaker.success()  # Redis is there: it answered, with an error
            elif _pool_exhausted(exc):
                breaker.timeout()  # this process is busy
            else:
                timed_out = isinstance(exc, (TimeoutError, RedisTimeoutError))
                name = (_failed_node(exc) or (key and nodes.node_of(key))) if nodes is not None else None
                if nodes is not None and name:  # one node's trouble: the others are still used
                    (nodes.timeout if timed_out else nodes.failure)(name)
                else:
                    (breaker.timeout if timed_out else breaker.failure)()
            raise _translate(op, self._timeout, exc) from exc
        finally:
            self._budget.finish(deadline)
        breaker.success()
        if nodes is not None and key is not None and nodes._counts:
            nodes.success(key)
        return result

    def encode(self, entry: Entry) -> bytes:
        context = self.entry_key(entry.key).encode() if self.sealer is not None else b""
        return encode_entry(entry, compress_above=self._compress_above, sealer=self.sealer, context=context)

    async def set(self, entry: Entry, blob: bytes) -> bool:
        """Store ``blob`` (the encoded ``entry``) until the entry's hard expiry.

        Returns False (nothing written) when the entry has already expired or
        is larger than the size limit.
        """
        if not self.storable(entry):
            return False
        ttl_ms = self._remaining_ms(entry)
        rkey = self.entry_key(entry.key)
        if not entry.tags:
            await self._call("SET", self._client.set(rkey, blob, px=ttl_ms), rkey)
            return True
        if self._cluster:
            async with self._tag_apart(entry):
                await self._call("SET", self._client.set(rkey, blob, px=ttl_ms), rkey)
            return True
        keys = [rkey, *(self.tag_key(tag) for tag in entry.tags)]
        args: list[bytes | str | int] = [blob, ttl_ms, entry.key, self._tag_life_ms(entry)]
        await self._call("SET", self._set_tagged(keys=keys, args=args), rkey)
        return True

    # -- invalidation (see aiollmcache.invalidation) ---------------------------

    async def sync_state(self) -> tuple[int, bytes, int]:
        """The namespace version, and the id and number of the invalidations
        published."""
        if self._cluster:  # two slots: two commands
            raw_version = await self._call(
                "sync state", self._client.get(self._version_key), self._version_key
            )
            raw_id, raw_seq = await self._call(
                "sync state",
                self._sync_state(keys=[self._sync_key], args=[secrets.token_hex(8)]),
                self._sync_key,
            )
        else:
            async with cast(aioredis.Redis, self._client).pipeline(transaction=False) as pipe:
                pipe.get(self._version_key)
                await self._sync_state(keys=[self._sync_key], args=[secrets.token_hex(8)], client=pipe)
                raw_version, (raw_id, raw_seq) = await self._call("sync state", pipe.execute())
        try:
            return int(raw_version or 0), bytes(raw_id), int(raw_seq or 0)
        except (TypeError, ValueError):
            raise CorruptEntryError(f"{self._version_key} or {self._sync_key} is malformed") from None

    async def bump_version(self) -> int:
        """Retire every entry of the namespace: they stay where they are, under a
        version nobody reads, until they expire."""
        version = int(await self._call("INCR version", self._client.incr(self._version_key)))
        if self.version is None or version > self.version:
            self.version = version
        return version

    async def publish_invalidation(self, message: bytes) -> int:
        """Number ``message`` and broadcast it to every process; return its number."""
        keys = [self._sync_key]
        args: list[str | bytes] = [self.invalidation_channel, message, secrets.token_hex(8)]
        return int(
            await self._call("PUBLISH", self._publish_invalidation(keys=keys, args=args), self._sync_key)
        )

    async def unlink(self, hashes: list[str]) -> int:
        """Delete the entries with these hashes, a batch per round trip; return
        how many existed."""
        removed = 0
        for start in range(0, len(hashes), UNLINK_BATCH):
            rkeys = [self.entry_key(h) for h in hashes[start : start + UNLINK_BATCH]]
            removed += await self._unlink_keys(rkeys)
        return removed

    async def _unlink_keys(self, rkeys: list[str]) -> int:
        if not self._cluster:
            return int(await self._call("UNLINK", self._client.unlink(*rkeys)))
        # Keys in many slots: one UNLINK each, one connection per node.
        return sum(
            int(n) for n in await self._call("UNLINK", self._pipelined([("UNLINK", k) for k in rkeys]))
        )

    async def _pipelined(self, commands: list[tuple[Any, ...]], *, raise_on_error: bool = True) -> list[Any]:
        """Commands of any slots in one pipeline (on a cluster: one per node),
        all of it inside the caller's ``_call``, the cluster client's own setup
        included."""
        async with self._client.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            return await pipe.execute(raise_on_error=raise_on_error)

    async def retire_tag(self, tag: str) -> int:
        """Delete every entry tagged ``tag``, in batches; return how many existed.

        Entries tagged while this runs are not touched. If this process dies
        midway, the next retirement of the same tag finishes the job.
        """
        tag_key = self.tag_key(tag)
        retiring = f"{tag_key}:retiring"
        await self._call("RETIRE tag", self._tag_retire(keys=[tag_key, retiring]), tag_key)
        removed = 0
        while True:
            members = await self._call(
                "ZRANGE tag", self._client.zrange(retiring, 0, UNLINK_BATCH - 1), tag_key
            )
            if not members:
                return removed
            hashes = [m.decode() for m in cast(list[bytes], members)]
            if self._cluster:
                removed += await self._unlink_keys([self.entry_key(h) for h in hashes])
                await self._call("ZREM tag", self._client.zrem(retiring, *members), tag_key)
                continue
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.unlink(*[self.entry_key(h) for h in hashes])
                pipe.zrem(retiring, *members)
                unlinked, _ = await self._call("UNLINK tagged", pipe.execute())
            removed += int(unlinked)

    async def scan_entries(self, match: str = "*") -> AsyncIterator[list[str]]:
        """The hashes of this namespace's entries, in batches (SCAN, never
        KEYS); ``match`` is a Redis glob on the hash. An entry written or
        deleted during the scan may or may not be seen."""
        prefix = self.entry_key("")[:-2]  # "alc:<ns>:<ver>:e:"
        pattern = f"{prefix}{{{match}}}"
        if not self._cluster:
            cursor = 0
            while True:
                command = self._client.scan(cursor, match=pattern, count=SCAN_BATCH)
                cursor, rkeys = await self._call("SCAN", command)
                hashes = [k.decode()[len(prefix) + 1 : -1] for k in cast(list[bytes], rkeys)]
                if hashes:
                    yield hashes
                if cursor == 0:
                    return
        # Every primary in turn, each with its own cursor. If a primary fails
        # midway the scan fails: the invalidation reports it, and can be run
        # again once the cluster has settled.
        cluster = cast(RedisCluster, self._client)
        await self._call("SCAN", cluster.initialize())
        for primary in cluster.get_primaries():
            cursor = 0
            while True:
                scan: Any = cluster.scan(cursor, match=pattern, count=SCAN_BATCH, target_nodes=primary)
                cursors, rkeys = await self._call("SCAN", scan)
                cursor = int(next(iter(cursors.values()), 0))
                hashes = [k.decode()[len(prefix) + 1 : -1] for k in cast(list[bytes], rkeys)]
                if hashes:
                    yield hashes
                if cursor == 0:
                    break

    async def read_headers(self, hashes: list[str]) -> list[Header | None]:
        """The headers of these entries (None: gone or not an entry), reading
        only their first bytes."""
        rkeys = [self.entry_key(h) for h in hashes]
        prefixes = await self._getrange(rkeys, [_HEADER_READ_BYTES] * len(rkeys))
        headers: list[Header | int | None] = [self._header(p) for p in prefixes]
        longer = [i for i, h in enumerate(headers) if isinstance(h, int)]
        if longer:
            more = await self._getrange([rkeys[i] for i in longer], [cast(int, headers[i]) for i in longer])
            for i, prefix in zip(longer, more, strict=True):
                header = self._header(prefix)
                headers[i] = header if isinstance(header, Header) else None
        return [h if isinstance(h, Header) else None for h in headers]

    async def _getrange(self, rkeys: list[str], lengths: list[int]) -> list[bytes]:
        commands = [("GETRANGE", rkey, 0, length - 1) for rkey, length in zip(rkeys, lengths, strict=True)]
        return cast(
            list[bytes], await self._call("GETRANGE", self._pipelined(commands, raise_on_error=False))
        )

    @staticmethod
    def _header(prefix: object) -> Header | int | None:
        if not isinstance(prefix, bytes) or len(prefix) < HEADER_PREFIX_BYTES:
            return None  # gone, of another type, or too short to be an entry
        try:
            return read_header(prefix)
        except CorruptEntryError:
            return None

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.breaker.aclose()
        if self._nodes is not None:
            await self._nodes.aclose()
        if self._owns_client:
            if isinstance(self._client, RedisCluster):
                await self._call("close", self._client.aclose())
            else:
                await self._call("close", self._client.aclose(close_connection_pool=True))
