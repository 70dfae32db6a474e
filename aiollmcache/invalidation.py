"""Invalidation: retiring answers in Redis and in every process's memory tier.

Four kinds, one per :meth:`LLMCache.invalidate` call:

- **key**: one entry, by its cache key.
- **tag**: every entry written with the tag (``CacheControl(tags=...)``). Each
  tag has a sorted set in Redis naming its entries; the invalidation takes the
  set over and deletes the entries in batches.
- **pattern**: every entry whose request matches a :class:`Pattern` (model,
  system prompt, key), found with SCAN in batches and matched on the entry's
  header, read without its body.
- **everything**: the namespace version is incremented; entries of the old
  version are never read again and expire on their own. Nothing is scanned.

Reaching every process: after Redis is done, the invalidation is numbered
(``alc:<ns>:sync``) and published in one step. Every process applies the
messages it receives to its memory tier, in order. Pub/sub loses messages
across a reconnect, so each process also compares, every ``sync_interval``
seconds and after every reconnect, the count in Redis with the last number it
applied; when it is behind even after every message already on its way has
arrived, it has missed one and drops its whole memory tier (it cannot know
which entries the missed invalidation named). The version is checked the same
way.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Final

import orjson

from ._log import RateLimitedLogger
from .cache_policy import MAX_SAMPLES, sample_key
from .entry import Entry
from .errors import CorruptEntryError, InvalidRequestError, TierError
from .tiers.pubsub import RESYNC, PubSubHub, Subscription
from .tiers.redis import REDIS_ERRORS, RedisTier

__all__ = ["Invalidation", "InvalidationBus", "InvalidationKind", "Pattern", "retire", "validate_key"]

_KEY_LENGTH: Final = 32
_HEX: Final = frozenset("0123456789abcdef")
_MAX_TEXT: Final = 4096


def validate_key(key: object) -> str:
    if not isinstance(key, str) or len(key) != _KEY_LENGTH or not _HEX.issuperset(key):
        raise InvalidRequestError(
            f"key: expected a cache key (32 lowercase hex digits, as CacheResult.key), got {key!r}"
        )
    return key


def validate_tag(tag: object) -> str:
    if not isinstance(tag, str) or not tag or len(tag) > 256 or "{" in tag or "}" in tag:
        raise InvalidRequestError(
            f"tag: expected a non-empty string of at most 256 characters without braces, got {tag!r}"
        )
    return tag


@dataclass(frozen=True, slots=True, kw_only=True)
class Pattern:
    """Which entries an invalidation by pattern retires: those whose request
    matches every field given. Globs are shell-style (``*``, ``?``, ``[abc]``)
    and case-sensitive, matched against the whole value.

    - ``model``: glob on the request's model, e.g. ``"gpt-4o*"``.
    - ``system``: glob on the system prompt (the request's system and developer
      messages, one per line; ``system=""`` matches requests without one).
    - ``system_contains``: a substring of the system prompt.
    - ``key``: glob on the cache key (32 hex digits, as ``CacheResult.key``).
    """

    model: str | None = None
    system: str | None = None
    system_contains: str | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        given = {
            "model": self.model,
            "system": self.system,
            "system_contains": self.system_contains,
            "key": self.key,
        }
        for name, value in given.items():
            empty_ok = name == "system"  # "": requests without a system prompt
            if value is not None and (
                not isinstance(value, str) or (not value and not empty_ok) or len(value) > _MAX_TEXT
            ):
                raise InvalidRequestError(
                    f"Pattern.{name}: expected a non-empty string of at most {_MAX_TEXT} characters, "
                    f"got {value!r}"
                )
        if self.key is not None and self.key != self.key.lower():
            raise InvalidRequestError(f"Pattern.key: cache keys are lowercase hex, got {self.key!r}")
        if all(value is None for value in given.values()):
            raise InvalidRequestError("Pattern: give at least one of model, system, system_contains, key")

    @property
    def on_system(self) -> bool:
        return self.system is not None or self.system_contains is not None

    def matches_except_system(self, key: str, model: str) -> bool:
        return (self.key is None or fnmatchcase(key, self.key)) and (
            self.model is None or fnmatchcase(model, self.model)
        )

    def matches(self, key: str, model: str, system: str) -> bool:
        return (
            self.matches_except_system(key, model)
            and (self.system_contains is None or self.system_contains in system)
            and (self.system is None or fnmatchcase(system, self.system))
        )

    def _to_json(self) -> dict[str, str]:
        fields = {"model": self.model, "system": self.system, "system_contains": self.system_contains}
        fields["key"] = self.key
        return {name: value for name, value in fields.items() if value is not None}


class InvalidationKind(enum.StrEnum):
    KEY = "key"
    TAG = "tag"
    PATTERN = "pattern"
    EVERYTHING = "everything"
    RESYNC = "resync"
    """Not asked for by anyone: this process may have missed invalidations and
    dropped its memory tier."""


@dataclass(frozen=True, slots=True)
class Invalidation:
    """An invalidation applied to this process's memory tier.

    ``remote`` is True when it was made by another process (or another cache
    object); ``version`` is the namespace's new version for ``EVERYTHING``.
    """

    kind: InvalidationKind
    key: str | None = None
    tag: str | None = None
    pattern: Pattern | None = None
    version: int | None = None
    remote: bool = False

    @property
    def keys(self) -> tuple[str, ...]:
        """For ``KEY``: the key and the keys of its sample bucket's other
        answers (see :class:`~aiollmcache.cache_policy.CachePolicy`)."""
        if self.key is None:
            return ()
        return tuple(sample_key(self.key, i) for i in range(MAX_SAMPLES))

    def matches(self, key: str, entry: Entry) -> bool:
        """Whether the entry at ``key`` is retired by this invalidation."""
        kind = self.kind
        if kind is InvalidationKind.KEY:
            return key in self.keys
        if kind is InvalidationKind.TAG:
            return self.tag in entry.tags
        if kind is InvalidationKind.PATTERN:
            assert self.pattern is not None
            return self.pattern.matches(key, entry.model, entry.system)
        return True

    def encode(self, origin: str) -> bytes:
        body: dict[str, Any] = {"kind": self.kind.value, "origin": origin}
        if self.key is not None:
            body["key"] = self.key
        if self.tag is not None:
            body["tag"] = self.tag
        if self.pattern is not None:
            body["pattern"] = self.pattern._to_json()
        if self.version is not None:
            body["version"] = self.version
        return orjson.dumps(body)

    @classmethod
    def decode(cls, data: bytes, origin: str) -> Invalidation:
        """Raises :class:`ValueError` (or a subclass) when ``data`` is not one."""
        body = orjson.loads(data)
        if not isinstance(body, dict):
            raise ValueError("not an object")
        kind = InvalidationKind(str(body.get("kind")))
        pattern = body.get("pattern")
        version = body.get("version")
        if kind is InvalidationKind.KEY:
            validate_key(body.get("key"))
        elif kind is InvalidationKind.TAG:
            validate_tag(body.get("tag"))
        elif kind is InvalidationKind.PATTERN:
            if not isinstance(pattern, dict):
                raise ValueError("pattern missing")
            pattern = Pattern(**pattern)
        elif kind is InvalidationKind.EVERYTHING:
            if type(version) is not int:
                raise ValueError("version missing")
        else:
            raise ValueError(f"{kind} is not broadcast")
        return cls(
            kind,
            key=body.get("key"),
            tag=body.get("tag"),
            pattern=pattern if isinstance(pattern, Pattern) else None,
            version=version if type(version) is int else None,
            remote=body.get("origin") != origin,
        )


async def retire(tier: RedisTier, invalidation: Invalidation) -> int | None:
    """Delete what ``invalidation`` names from Redis; return how many entries
    were deleted (None for a version bump, which deletes nothing)."""
    kind = invalidation.kind
    if kind is InvalidationKind.KEY:
        return await tier.unlink(list(invalidation.keys))
    if kind is InvalidationKind.TAG:
        assert invalidation.tag is not None
        return await tier.retire_tag(invalidation.tag)
    if kind is InvalidationKind.PATTERN:
        pattern = invalidation.pattern
        assert pattern is not None
        removed = 0
        async for hashes in tier.scan_entries():
            if pattern.key is not None:
                hashes = [h for h in hashes if fnmatchcase(h, pattern.key)]
            if hashes:  # headers even for a key glob: what is not an entry stays
                headers = await tier.read_headers(hashes)
                hashes = [
                    h
                    for h, header in zip(hashes, headers, strict=True)
                    if header is not None
                    # An encrypted entry's system prompt is not in its header:
                    # retired when the rest matches (too many rather than too few).
                    and (
                        pattern.matches(h, header.model, header.system)
                        or (
                            header.encrypted
                            and pattern.on_system
                            and pattern.matches_except_system(h, header.model)
                        )
                    )
                ]
            removed += await tier.unlink(hashes)
        return removed
    raise ValueError(f"retire() does not do {kind}")


@dataclass(slots=True)
class SyncStats:
    received: int = 0  # invalidations from other processes applied here
    resyncs: int = 0  # memory tier dropped: invalidations may have been missed
    checks: int = 0
    check_errors: int = 0


class InvalidationBus:
    """Keeps this process's memory tier in step with invalidations made anywhere.

    ``apply`` is called, in order, with every invalidation to apply here:
    those received, and ``RESYNC`` (drop the memory tier) or ``EVERYTHING``
    when a check finds this process behind. The bus itself moves the tier's
    namespace version forward, before ``apply`` is called. Until the bus
    has read the state of Redis once, nothing is known to be missed.
    """

    def __init__(
        self,
        tier: RedisTier,
        subscriber: PubSubHub,
        *,
        interval: float,
        origin: str,
        apply: Callable[[Invalidation], object],
    ) -> None:
        self._tier = tier
        self._subscriber = subscriber
        self._interval = interval
        self._origin = origin
        self._apply = apply
        self._subscription: Subscription | None = None
        self._seen: int | None = None  # number of the last invalidation applied
        self._count_id: bytes | None = None  # id of the count that number is in
        self._wake = asyncio.Event()
        self._check_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._log = RateLimitedLogger()
        self.stats = SyncStats()
        self.synced_at: float | None = None  # time.time() of the last check that succeeded

    async def start(self) -> None:
        """Subscribe and read the state of Redis, as far as Redis allows now;
        then keep checking in a background task."""
        await self._subscribe()
        await self.check()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="aiollmcache-sync")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._subscription is not None:
            await self._subscription.close()
            self._subscription = None

    async def publish(self, invalidation: Invalidation) -> int:
        return await self._tier.publish_invalidation(invalidation.encode(self._origin))

    async def _subscribe(self) -> None:
        try:
            self._subscription = await self._subscriber.subscribe(
                self._tier.invalidation_channel, self._on_message
            )
        except REDIS_ERRORS as exc:
            self.stats.check_errors += 1
            self._log.warning("sync", "cannot subscribe to invalidations, will retry: %s", exc)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time() + self._interval
        while True:
            # Counted from the start of the last check, so a slow check does
            # not push the next one back.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_at - loop.time())):
                    await self._wake.wait()
            self._wake.clear()
            next_at = loop.time() + self._interval
            try:
                if self._subscription is None:
                    await self._subscribe()
                await self.check()
            except Exception as exc:  # a bug here must not end the checks
                self.stats.check_errors += 1
                self._log.warning("sync", "invalidation check failed: %s: %s", type(exc).__name__, exc)

    def _on_message(self, message: bytes | object) -> None:
        if message is RESYNC:
            # Reconnected (or lost the connection): messages may have been lost.
            self._wake.set()
            return
        assert isinstance(message, bytes)
        try:
            count_id, number, body = message.split(b" ", 2)
            seq = int(number)
            invalidation = Invalidation.decode(body, self._origin)
        except (ValueError, TypeError) as exc:
            self._log.warning("sync", "ignored a malformed invalidation message: %s", exc)
            return
        if count_id != self._count_id or self._seen is None:
            # Not synced yet, or Redis lost its count: apply it, and let a
            # check settle where the count stands.
            if invalidation.remote:
                self._receive(invalidation)
            self._wake.set()
            return
        if seq <= self._seen:
            return  # already applied, or covered by dropping the memory tier
        if seq > self._seen + 1:
            self._resync()  # a message before this one was lost
        self._seen = seq
        if invalidation.remote:  # this process applied its own before publishing
            self._receive(invalidation)

    def _receive(self, invalidation: Invalidation) -> None:
        self.stats.received += 1
        if invalidation.version is not None:
            self._adopt(invalidation.version)
        self._apply(invalidation)

    def _adopt(self, version: int) -> bool:
        """Move the namespace version forward to ``version``; False if it is not
        ahead of the one this process reads."""
        current = self._tier.version
        if current is not None and version <= current:
            return False
        self._tier.version = version
        return True

    def _resync(self) -> None:
        self.stats.resyncs += 1
        self._apply(Invalidation(InvalidationKind.RESYNC, remote=True))

    async def check(self) -> bool:
        """Compare this process with Redis and catch up; False if Redis could
        not be asked. After it returns True, every invalidation published
        before the call has been applied here."""
        async with self._check_lock:
            self.stats.checks += 1
            # Every message applied so far is counted in Redis by now, and any
            # version this process knows of is there too.
            seen = self._seen
            known_version = self._tier.version
            try:
                version, count_id, seq = await self._tier.sync_state()
            except (TierError, CorruptEntryError) as exc:
                self.stats.check_errors += 1
                self._log.warning("sync", "cannot check for missed invalidations: %s", exc)
                return False
            if self._count_id is None or count_id != self._count_id or seen is None:
                # First sync, or Redis lost its count (restarted empty, flushed).
                if known_version is not None:
                    # Entries were read (the version was known) while this process
                    # could not know what was invalidated meanwhile.
                    self._resync()
                self._tier.version = version  # whatever it is: Redis starts again
                self._count_id, self._seen = count_id, seq
            else:
                if self._adopt(version):  # never back: a late reply
                    self._apply(Invalidation(InvalidationKind.EVERYTHING, version=version, remote=True))
                if seq > seen:
                    # Ahead of us: wait for the messages already on their way.
                    if self._subscription is not None:
                        await self._subscriber.barrier()
                    if self._seen is None or self._seen < seq:
                        self._resync()  # missed at least one
                        self._seen = seq
            self.synced_at = time.time()
            return True
