"""One pub/sub connection per process, shared by every wait in it.

Redis pub/sub is at-most-once: a message published while the connection is
down is lost. Every :class:`Subscription` therefore also receives
:data:`RESYNC` whenever the connection was re-established (or failed), and
callers re-check Redis when they see it. Callers must also bound every wait,
since a half-open connection loses messages silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import secrets
from collections.abc import Callable
from typing import Any, Final

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .._log import RateLimitedLogger, logger

__all__ = ["RESYNC", "Subscriber", "Subscription"]


class _Resync(enum.Enum):
    RESYNC = "RESYNC"


RESYNC: Final = _Resync.RESYNC
"""Delivered to every subscription when messages may have been lost."""

_BACKOFF_MIN = 0.05
_BACKOFF_MAX = 2.0


Handler = Callable[[bytes | _Resync], None]


class Subscription:
    """Messages of one channel, in order: queued for :meth:`wait`, or handed to
    a handler as they arrive. Close it when done."""

    __slots__ = ("_handler", "_queue", "_subscriber", "channel")

    def __init__(self, subscriber: Subscriber, channel: str, handler: Handler | None = None) -> None:
        self._subscriber = subscriber
        self.channel = channel
        self._handler = handler
        self._queue: asyncio.Queue[bytes | _Resync] = asyncio.Queue()

    def _put(self, message: bytes | _Resync) -> None:
        if self._handler is not None:
            try:
                self._handler(message)
            except Exception:  # a handler's bug must not stop the reader
                logger.exception("pub/sub handler for %s failed", self.channel)
        else:
            self._queue.put_nowait(message)

    async def wait(self, seconds: float) -> bytes | _Resync | None:
        """The next message, :data:`RESYNC`, or None when ``seconds`` pass first."""
        if not self._queue.empty():
            return self._queue.get_nowait()
        try:
            async with asyncio.timeout(seconds):
                return await self._queue.get()
        except TimeoutError:
            return None

    async def close(self) -> None:
        await self._subscriber._unsubscribe(self)


class Subscriber:
    """Subscribes channels on one dedicated connection and dispatches messages.

    A reader task, started with the first subscription, owns the reads;
    subscribing waits for Redis to confirm, so a message published after
    :meth:`subscribe` returns is delivered (unless the connection drops, in
    which case the subscription receives :data:`RESYNC`).
    """

    def __init__(self, client: aioredis.Redis, *, timeout: float) -> None:
        self._client = client
        self._timeout = timeout
        self._pubsub: Any = None  # redis.asyncio.client.PubSub, created on first use
        self._subscriptions: dict[bytes, Subscription] = {}
        self._confirmations: dict[bytes, asyncio.Future[None]] = {}
        self._pongs: dict[bytes, asyncio.Future[None]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        self._log = RateLimitedLogger()

    async def subscribe(self, channel: str, handler: Handler | None = None) -> Subscription:
        """Subscribe ``channel``; returns once Redis has confirmed.

        With a ``handler``, each message (and :data:`RESYNC`) is passed to it
        from the reader task, in order, as it arrives; the handler must not
        block. Raises :class:`TimeoutError` or a Redis error if Redis cannot
        confirm in time.
        """
        name = channel.encode()
        if name in self._subscriptions:
            raise RuntimeError(f"{channel} is already subscribed in this process")
        subscription = Subscription(self, channel, handler)
        confirmed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._subscriptions[name] = subscription
        self._confirmations[name] = confirmed
        try:
            async with asyncio.timeout(self._timeout):
                async with self._lock:
                    if self._pubsub is None:
                        self._pubsub = self._client.pubsub()
                    await self._pubsub.subscribe(name)
                    self._start_reader()
                await confirmed
        except BaseException:
            self._confirmations.pop(name, None)
            await self._unsubscribe(subscription)
            raise
        return subscription

    async def _unsubscribe(self, subscription: Subscription) -> None:
        name = subscription.channel.encode()
        if self._subscriptions.get(name) is not subscription:
            return
        del self._subscriptions[name]
        if self._pubsub is None or self._closed:
            return
        try:
            async with asyncio.timeout(self._timeout):
                async with self._lock:
                    await self._pubsub.unsubscribe(name)
        except (RedisError, OSError) as exc:
            # Harmless: a stray message for this channel is dropped on arrival,
            # and a reconnection subscribes only what is still wanted.
            self._log.warning("unsubscribe", "pub/sub unsubscribe failed: %s", exc)

    async def barrier(self) -> bool:
        """Wait until every message Redis sent this process before the call has
        been dispatched (a PING on the subscriber connection, whose reply comes
        after them). False if that cannot be known within the timeout, e.g.
        the connection is down; the connection is then reset."""
        if self._pubsub is None or self._reader is None or self._reader.done() or self._closed:
            return False
        token = secrets.token_hex(8).encode()
        answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pongs[token] = answered
        try:
            async with asyncio.timeout(self._timeout):
                async with self._lock:
                    await self._pubsub.ping(token)
                await answered
            return True
        except (TimeoutError, RedisError, OSError) as exc:
            self._log.warning("barrier", "pub/sub connection unresponsive, resetting it: %s", exc)
            with contextlib.suppress(RedisError, OSError):
                await self._pubsub.connection.disconnect()
            return False
        finally:
            self._pongs.pop(token, None)

    def _start_reader(self) -> None:
        if self._reader is None or self._reader.done():
            self._pubsub.connection.register_connect_callback(self._on_connect)
            self._reader = asyncio.get_running_loop().create_task(self._read(), name="aiollmcache-pubsub")

    async def _on_connect(self, connection: Any) -> None:
        # Called by redis-py after every (re)connection, once it has
        # resubscribed: anything published meanwhile is lost.
        self._resync()

    def _resync(self) -> None:
        for subscription in self._subscriptions.values():
            subscription._put(RESYNC)

    async def _read(self) -> None:
        backoff = _BACKOFF_MIN
        while not self._closed:
            try:
                message = await self._pubsub.get_message(timeout=None)
            except (RedisError, OSError) as exc:
                self._log.warning("pubsub", "pub/sub connection lost, reconnecting: %s", exc)
                self._resync()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            backoff = _BACKOFF_MIN
            if message is not None:
                self._dispatch(message)

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind, channel = message.get("type"), message.get("channel")
        if kind == "message":
            subscription = self._subscriptions.get(channel)  # type: ignore[arg-type]
            if subscription is not None:
                subscription._put(message["data"])
        elif kind == "subscribe":
            confirmed = self._confirmations.pop(channel, None)  # type: ignore[arg-type]
            if confirmed is not None and not confirmed.done():
                confirmed.set_result(None)
        elif kind == "pong":
            answered = self._pongs.pop(message.get("data"), None)  # type: ignore[arg-type]
            if answered is not None and not answered.done():
                answered.set_result(None)

    async def aclose(self) -> None:
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._pubsub.aclose()
        self._resync()
