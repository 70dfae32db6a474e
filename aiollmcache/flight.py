"""Single-flight: one upstream call per key, in a process and across processes.

In a process (:class:`Flights`): a flight is registered under a key by the
first caller (the leader). Every caller, the leader included, waits on a
future of its own that the flight resolves: a cancelled caller cancels only
its own wait, never the flight, and a leader cancelled before the flight had
a task hands over (its followers receive :data:`RETRY` and go round again,
one of them becoming the new leader).

Across processes (:class:`Coordinator`): a Redis lease per key, see there.
"""

from __future__ import annotations

import asyncio
import enum
import secrets
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final, Generic, Literal, TypeVar

import orjson

from ._log import RateLimitedLogger, logger
from .entry import Entry
from .errors import CorruptEntryError, RemoteUpstreamError, TierError, WaitTimeoutError
from .tiers.pubsub import RESYNC, PubSubHub, Subscription
from .tiers.redis import REDIS_ERRORS, RedisTier

__all__ = [
    "RETRY",
    "Coordinator",
    "Flight",
    "Flights",
    "LeaseSettings",
    "LeaseStats",
    "failure_message",
    "remote_error",
]

T = TypeVar("T")


class _Retry(enum.Enum):
    RETRY = "RETRY"


RETRY: Final = _Retry.RETRY


class Flight(Generic[T]):
    """One computation in progress, and the callers waiting for it.

    Cheaper than ``asyncio.shield`` per caller (one future each, resolved in
    one pass), with the same guarantee: cancelling a wait never touches the
    flight or the other waits.
    """

    __slots__ = ("_exc", "_outcome", "_waiters")

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[T | _Retry]] | None = None  # made on first wait
        self._outcome: T | _Retry | None = None
        self._exc: BaseException | None = None

    @property
    def done(self) -> bool:
        return self._outcome is not None or self._exc is not None

    def wait(self) -> asyncio.Future[T | _Retry]:
        """A future of the caller's own, resolved with the flight's outcome."""
        fut: asyncio.Future[T | _Retry] = asyncio.get_running_loop().create_future()
        if self._exc is not None:
            fut.set_exception(self._exc)
            fut.exception()
        elif self._outcome is not None:
            fut.set_result(self._outcome)
        elif self._waiters is None:
            self._waiters = [fut]
        else:
            self._waiters.append(fut)
        return fut

    def resolve(self, outcome: T | _Retry, exc: BaseException | None) -> None:
        if self.done:
            return
        self._outcome, self._exc = (None, exc) if exc is not None else (outcome, None)
        waiters, self._waiters = self._waiters or (), None
        for fut in waiters:
            if fut.done():  # its caller was cancelled
                continue
            if exc is not None:
                fut.set_exception(exc)
                fut.exception()  # its caller raises it; never "never retrieved" if it left meanwhile
            else:
                fut.set_result(outcome)


class Flights(Generic[T]):
    """The flights in progress in this process, by key."""

    __slots__ = ("_flights",)

    def __init__(self) -> None:
        self._flights: dict[str, Flight[T]] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def get(self, key: str) -> Flight[T] | None:
        return self._flights.get(key)

    def lead(self, key: str) -> Flight[T]:
        """Register and return a new flight for ``key``; the caller must settle it."""
        flight: Flight[T] = Flight()
        self._flights[key] = flight
        return flight

    def settle(
        self,
        key: str,
        flight: Flight[T],
        result: T | _Retry = RETRY,
        exc: BaseException | None = None,
    ) -> None:
        """Resolve ``flight`` (if still pending) and unregister it."""
        if self._flights.get(key) is flight:
            del self._flights[key]
        flight.resolve(result, exc)

    def follow_task(self, key: str, flight: Flight[T], task: asyncio.Task[T]) -> None:
        """Settle ``flight`` with the outcome of ``task`` when it ends."""

        def done(t: asyncio.Task[T]) -> None:
            if t.cancelled():
                self.settle(key, flight, RETRY)
            elif (exc := t.exception()) is not None:
                self.settle(key, flight, exc=exc)
            else:
                self.settle(key, flight, t.result())

        task.add_done_callback(done)


# -- across processes -----------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseSettings:
    """How processes share one upstream call per key.

    - ``ttl``: lease lifetime without renewal: the bound on how long a dead
      holder blocks the others. Renewed every ``ttl / 3`` while the call runs.
    - ``max_lifetime``: a holder stops renewing after this long, so a stuck
      call cannot block a key forever.
    - ``max_wait``: how long a process waits on another's call.
    - ``on_wait_timeout``: ``"raise"`` (:class:`WaitTimeoutError`) or
      ``"upstream"`` (call the model itself).
    """

    ttl: float = 10.0
    max_lifetime: float = 600.0
    max_wait: float = 300.0
    on_wait_timeout: Literal["raise", "upstream"] = "raise"


@dataclass(slots=True)
class LeaseStats:
    held: int = 0
    committed: int = 0
    waited: int = 0
    takeovers: int = 0
    lost: int = 0
    remote_failures: int = 0
    wait_timeouts: int = 0
    resyncs: int = 0
    corrupt: int = 0
    passed: int = 0


Origin = Literal["computed", "waited", "found", "passed"]

# A waiter wakes this long after the lease should have expired, so a holder
# that died is replaced at most ttl + this after its last renewal.
_EXPIRY_MARGIN = 0.05


def failure_message(exc: BaseException) -> bytes:
    status = getattr(exc, "status_code", None)
    body = {
        "type": type(exc).__name__,
        "message": str(exc)[:2000],
        "status": status if isinstance(status, int) else None,
    }
    return b"fail:" + orjson.dumps(body)


def remote_error(message: bytes) -> RemoteUpstreamError:
    try:
        body = orjson.loads(message[5:])
        status = body.get("status")
        return RemoteUpstreamError(
            str(body.get("type")), str(body.get("message")), status if isinstance(status, int) else None
        )
    except (orjson.JSONDecodeError, AttributeError):
        return RemoteUpstreamError("unknown", message[5:].decode(errors="replace"))


class Coordinator:
    """One upstream call per key across every process sharing the Redis.

    For a key missing from Redis, :meth:`run` either takes the key's lease and
    calls ``compute`` (renewing the lease meanwhile, then writing the entry,
    releasing the lease and publishing "done" in one script), or waits for the
    holder's notification. Every wait is bounded by the lease's remaining
    time, after which the waiter re-checks: a lost message costs one bounded
    wait, and a dead holder's lease expires so that exactly one waiter (SET NX)
    takes over.

    Not guaranteed: a holder paused for longer than the lease (a long GC or
    SIGSTOP) may find its lease taken; it then returns its answer to its own
    callers without writing it, and the new holder's answer is stored.
    """

    def __init__(
        self,
        tier: RedisTier,
        subscriber: PubSubHub,
        settings: LeaseSettings,
        spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]],
    ) -> None:
        self._tier = tier
        self._subscriber = subscriber
        self._settings = settings
        self._lease_ms = max(1, round(settings.ttl * 1000))
        self._spawn = spawn
        self.stats = LeaseStats()
        self._log = RateLimitedLogger()

    async def run(
        self,
        key: str,
        compute: Callable[[], Awaitable[Entry]],
        encode: Callable[[Entry], bytes | None],
        accept: Callable[[Entry], bool],
    ) -> tuple[Entry, Origin]:
        """Return the entry for ``key`` and where it came from: ``"computed"``
        here, ``"waited"`` for (computed by another process meanwhile),
        ``"passed"`` (computed by another process and handed to its waiters,
        not stored: its ``refused`` says why), or ``"found"`` in Redis at once.

        ``compute`` calls the model; ``encode`` gives the bytes to store (None:
        do not store); ``accept`` says whether an entry found in Redis may be
        served (fresh enough) or must be replaced. Redis errors propagate as
        :class:`TierError` raised before ``compute`` was called; the caller
        decides how to go on without Redis.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.max_wait
        subscription: Subscription | None = None
        waited = False
        skip_entry = False  # the entry in Redis was seen and rejected
        try:
            while True:
                token = secrets.token_hex(16)
                try:
                    state = await self._tier.acquire(key, token, self._lease_ms, skip_entry=skip_entry)
                except CorruptEntryError as exc:
                    # Deleted, or (not for this cache) left in place: either
                    # way, not an answer; take the lease past it.
                    skip_entry = True
                    self.stats.corrupt += 1
                    self._log.warning("corrupt", "dropped a corrupt entry in Redis: %s", exc)
                    continue
                if state is True:
                    if waited:
                        self.stats.takeovers += 1
                    return await self.hold(key, token, compute, encode), "computed"
                if isinstance(state, Entry):
                    if not accept(state):
                        skip_entry = True
                        continue
                    if waited:
                        self.stats.waited += 1
                    return state, "waited" if waited else "found"
                assert isinstance(state, int)
                if subscription is None:
                    # Subscribe, then check again: "done" may have been
                    # published before the subscription existed.
                    subscription = await self._subscribe(key)
                    waited = True
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    self.stats.wait_timeouts += 1
                    raise WaitTimeoutError(
                        f"another process held this request's lease for over {self._settings.max_wait}s"
                    )
                message = await self._wait(subscription, min(state / 1000 + _EXPIRY_MARGIN, remaining))
                if message is RESYNC:
                    self.stats.resyncs += 1
                elif isinstance(message, bytes):
                    if message.startswith(b"fail:"):
                        self.stats.remote_failures += 1
                        raise remote_error(message)
                    carried = await self._carried(key, message)
                    if carried is not None and carried.refused is not None:
                        # The holder's answer, not stored (the policy refused it): for the
                        # callers who waited on it, as the holder's own callers get it.
                        self.stats.passed += 1
                        return carried, "passed"
                    if carried is not None and accept(carried):
                        self.stats.waited += 1
                        return carried, "waited"
                # "done", "retry", a timeout or a resync: look at the entry again.
                skip_entry = False
        finally:
            if subscription is not None:
                await subscription.close()

    async def _carried(self, key: str, message: bytes) -> Entry | None:
        """The entry a notification carries, or leaves to be read ("passed")."""
        if message != b"passed":
            return self._tier.decode_notification(key, message)
        try:
            return await self._tier.read_passed(key)
        except TierError:
            return None  # look at the entry and the lease again

    async def _subscribe(self, key: str) -> Subscription | None:
        try:
            return await self._subscriber.subscribe(self._tier.channel(key))
        except REDIS_ERRORS as exc:
            # Without notifications, fall back to bounded waits and re-checks.
            logger.debug("pub/sub subscribe failed, waiting without notifications: %s", exc)
            return None

    async def _wait(self, subscription: Subscription | None, seconds: float) -> bytes | object | None:
        if subscription is None:
            await asyncio.sleep(seconds)
            return None
        return await subscription.wait(seconds)

    async def hold(
        self,
        key: str,
        token: str,
        compute: Callable[[], Awaitable[Entry]],
        encode: Callable[[Entry], bytes | None],
    ) -> Entry:
        """Call ``compute`` under the lease ``token`` holds (just acquired with
        :meth:`RedisTier.acquire`): renewed meanwhile, then the entry written
        and the waiters woken; on failure, the lease given back with the error."""
        self.stats.held += 1
        renewer = self._spawn(self._renew(key, token))
        try:
            entry = await compute()
        except BaseException as exc:
            message = failure_message(exc) if isinstance(exc, Exception) else b"retry"
            # Shielded: a cancelled holder still frees the key at once.
            await self._release_quietly(self._tier.abandon(key, token, message))
            raise
        finally:
            renewer.cancel()
        try:
            blob = encode(entry)
            if blob is None:
                # Not stored. An answer the policy refused still goes to the
                # waiters; one too large to store, a waiter computes its own.
                await self._release_quietly(self._tier.abandon(key, token, await self._passing(entry, token)))
            elif await self._tier.commit(entry, blob, token):
                self.stats.committed += 1
            else:
                self.stats.lost += 1
                self._log.warning("lost", "lost the lease for %s before writing: answer not stored", key)
        except TierError as exc:
            # The answer is good; only sharing it failed. Waiters re-check
            # when the lease expires and one of them takes over.
            self._log.warning("store", "could not store an answer in Redis: %s", exc)
        return entry

    async def _passing(self, entry: Entry, token: str) -> bytes:
        if entry.refused is None or entry.refused == "error":
            return b"retry"  # (an answer that failed validation is not shared)
        try:
            return await self._tier.pass_on(entry, token, self._lease_ms)
        except TierError as exc:
            self._log.warning("pass", "could not pass an answer on to the waiting processes: %s", exc)
            return b"retry"

    async def _release_quietly(self, release: Coroutine[Any, Any, bool]) -> None:
        task = self._spawn(release)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            raise
        except (TierError, *REDIS_ERRORS) as exc:
            self._log.warning("release", "could not release a lease: %s", exc)

    async def _renew(self, key: str, token: str) -> None:
        loop = asyncio.get_running_loop()
        stop_at = loop.time() + self._settings.max_lifetime
        interval = self._settings.ttl / 3
        while loop.time() + interval < stop_at:
            await asyncio.sleep(interval)
            try:
                if not await self._tier.renew(key, token, self._lease_ms):
                    return  # lost: commit will find out and not write
            except TierError as exc:
                self._log.warning("renew", "could not renew a lease: %s", exc)
