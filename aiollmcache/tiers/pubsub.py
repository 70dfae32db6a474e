"""One pub/sub connection per process, shared by every wait in it.

Redis pub/sub is at-most-once: a message published while the connection is
down is lost. Every :class:`Subscription` therefore also receives
:data:`RESYNC` whenever the connection was re-established (or failed), and
callers re-check Redis when they see it. Callers must also bound every wait,
since a half-open connection loses messages silently.

On Redis Cluster, :class:`ShardedSubscriber` keeps one such connection per
primary, subscribing each channel (SSUBSCRIBE) on the primary that owns its
slot, and moves subscriptions to their new owner after a failover or a slot
migration.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import secrets
from collections.abc import Callable
from typing import Any, Final

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisError, SlotNotCoveredError

from .._log import RateLimitedLogger, logger
from .redis import REDIS_ERRORS, one_connection_client

__all__ = ["RESYNC", "PubSubHub", "ShardedSubscriber", "Subscriber", "Subscription"]


class _Resync(enum.Enum):
    RESYNC = "RESYNC"


RESYNC: Final = _Resync.RESYNC
"""Delivered to every subscription when messages may have been lost."""

_BACKOFF_MIN = 0.05
_BACKOFF_MAX = 2.0


Handler = Callable[[bytes | _Resync], None]


class _ShardPubSub(PubSub):
    """redis-py's PubSub, resubscribing shard channels one slot at a time
    after a reconnection (SSUBSCRIBE takes channels of one slot only)."""

    async def _resubscribe_shard_channels(self) -> None:
        by_slot: dict[int, list[Any]] = {}
        for channel in self.shard_channels:
            name = channel if isinstance(channel, bytes) else channel.encode()
            by_slot.setdefault(key_slot(name), []).append(channel)
        for channels in by_slot.values():
            await self.ssubscribe(*channels)


class Subscription:
    """Messages of one channel, in order: queued for :meth:`wait`, or handed to
    a handler as they arrive. Close it when done."""

    __slots__ = ("_handler", "_queue", "_subscriber", "channel", "closed")

    def __init__(self, subscriber: Subscriber, channel: str, handler: Handler | None = None) -> None:
        self._subscriber = subscriber
        self.channel = channel
        self._handler = handler
        self._queue: asyncio.Queue[bytes | _Resync] = asyncio.Queue()
        self.closed = False

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
        self.closed = True
        await self._subscriber._unsubscribe(self)


class Subscriber:
    """Subscribes channels on one dedicated connection and dispatches messages.

    A reader task, started with the first subscription, owns the reads;
    subscribing waits for Redis to confirm, so a message published after
    :meth:`subscribe` returns is delivered (unless the connection drops, in
    which case the subscription receives :data:`RESYNC`).
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        timeout: float,
        sharded: bool = False,
        on_lost: Callable[[Subscription | None], None] | None = None,
    ) -> None:
        self._client = client
        self._timeout = timeout
        self._sharded = sharded
        self._unsubscribing: dict[bytes, int] = {}  # SUNSUBSCRIBEs sent, answers not yet seen
        self._on_lost = on_lost  # called when the connection fails or Redis drops a channel
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
        if channel.encode() in self._subscriptions:
            raise RuntimeError(f"{channel} is already subscribed in this process")
        subscription = Subscription(self, channel, handler)
        await self._attach(subscription)
        return subscription

    async def _attach(self, subscription: Subscription) -> None:
        name = subscription.channel.encode()
        subscription._subscriber = self
        confirmed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._subscriptions[name] = subscription
        self._confirmations[name] = confirmed
        try:
            async with asyncio.timeout(self._timeout):
                async with self._lock:
                    if self._pubsub is None:
                        self._pubsub = (
                            _ShardPubSub(self._client.connection_pool)
                            if self._sharded
                            else self._client.pubsub()
                        )
                    if self._sharded:
                        await self._pubsub.ssubscribe(name)
                    else:
                        await self._pubsub.subscribe(name)
                    self._start_reader()
                await confirmed
        except BaseException:
            self._confirmations.pop(name, None)
            await self._unsubscribe(subscription)
            raise

    def _release(self, subscription: Subscription) -> bool:
        """Forget ``subscription`` here without telling Redis (its connection
        or slot is gone); False if it is not one of ours."""
        name = subscription.channel.encode()
        if self._subscriptions.get(name) is not subscription:
            return False
        del self._subscriptions[name]
        if self._pubsub is not None:
            # Not to be subscribed again on a reconnection.
            (self._pubsub.shard_channels if self._sharded else self._pubsub.channels).pop(name, None)
        return True

    @property
    def subscriptions(self) -> list[Subscription]:
        return list(self._subscriptions.values())

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
                    if self._sharded:
                        self._unsubscribing[name] = self._unsubscribing.get(name, 0) + 1
                        await self._pubsub.sunsubscribe(name)
                    else:
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
                if self._on_lost is not None:
                    self._on_lost(None)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            backoff = _BACKOFF_MIN
            if message is not None:
                self._dispatch(message)

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind, channel = message.get("type"), message.get("channel")
        if kind in ("message", "smessage"):
            subscription = self._subscriptions.get(channel)  # type: ignore[arg-type]
            if subscription is not None:
                subscription._put(message["data"])
        elif kind == "sunsubscribe":
            if self._unsubscribing.get(channel):  # type: ignore[arg-type]
                self._unsubscribing[channel] -= 1  # type: ignore[index]  # the answer to ours
            elif (dropped := self._subscriptions.get(channel)) is not None:  # type: ignore[arg-type]
                # Not asked for: Redis dropped it (its slot moved, or was set again).
                dropped._put(RESYNC)
                if self._on_lost is not None:
                    self._on_lost(dropped)
        elif kind in ("subscribe", "ssubscribe"):
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


class ShardedSubscriber:
    """Pub/sub on Redis Cluster: each channel is subscribed (SSUBSCRIBE) on
    the primary that owns its slot, one :class:`Subscriber` connection per
    primary, outside the cluster client's pools.

    When a connection fails or Redis drops a channel (its slot moved), its
    subscriptions get :data:`RESYNC` at once; then the slot table is read
    again and every subscription whose channel now belongs to another node
    is subscribed there, keeping its :class:`Subscription` (a long-lived
    subscription survives a failover). Same interface as :class:`Subscriber`.
    """

    def __init__(self, cluster: RedisCluster, *, timeout: float) -> None:
        self._cluster = cluster
        self._timeout = timeout
        self._nodes: dict[str, Subscriber] = {}
        self._reroute: asyncio.Task[None] | None = None
        self._homeless: list[Subscription] = []  # to subscribe again, on whichever node
        self._dirty = False
        self._closed = False
        self._log = RateLimitedLogger()

    def _for(self, node: ClusterNode) -> Subscriber:
        subscriber = self._nodes.get(node.name)
        if subscriber is None:
            client = one_connection_client(node.connection_class, node.connection_kwargs)
            subscriber = Subscriber(client, timeout=self._timeout, sharded=True, on_lost=self._lost)
            self._nodes[node.name] = subscriber
        return subscriber

    async def _owner(self, channel: str) -> ClusterNode:
        await self._cluster.initialize()
        return self._owner_now(channel)

    def _owner_now(self, channel: str) -> ClusterNode:
        try:
            node = self._cluster.get_node_from_key(channel)
        except KeyError:  # no slot table: redis-py raises KeyError then
            node = None
        if node is None:
            raise SlotNotCoveredError(f"no node serves the slot of {channel}")
        return node

    async def subscribe(self, channel: str, handler: Handler | None = None) -> Subscription:
        async with asyncio.timeout(self._timeout):
            node = await self._owner(channel)
        return await self._for(node).subscribe(channel, handler)

    async def barrier(self) -> bool:
        subscribers = [s for s in self._nodes.values() if s.subscriptions]
        if not subscribers:
            return False
        results = await asyncio.gather(*(s.barrier() for s in subscribers))
        return all(results)

    def _lost(self, dropped: Subscription | None = None) -> None:
        """A connection failed (``dropped`` None) or Redis dropped a channel
        we did not unsubscribe (its slot moved, or was set again): that one
        is subscribed afresh, wherever its owner is now."""
        if dropped is not None and dropped._subscriber._release(dropped):
            self._homeless.append(dropped)
        self._dirty = True
        if self._closed or (self._reroute is not None and not self._reroute.done()):
            return
        loop = asyncio.get_running_loop()
        self._reroute = loop.create_task(self._move(), name="aiollmcache-pubsub-reroute")

    async def _move(self) -> None:
        """Read the slot table again and put every subscription on its
        channel's owner, until a pass finds nothing more to do."""
        backoff = _BACKOFF_MIN
        homeless = self._homeless
        while not self._closed and (self._dirty or homeless):
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)
            self._dirty = False
            try:
                async with asyncio.timeout(self._timeout * 4):
                    await self._cluster.nodes_manager.initialize()
                    for name, subscriber in list(self._nodes.items()):
                        for subscription in subscriber.subscriptions:
                            owner = self._owner_now(subscription.channel)
                            if owner.name != name and subscriber._release(subscription):
                                homeless.append(subscription)
                    while homeless:
                        subscription = homeless[0]
                        if not subscription.closed:
                            await self._for(self._owner_now(subscription.channel))._attach(subscription)
                            subscription._put(RESYNC)
                        homeless.pop(0)
                    for name, subscriber in list(self._nodes.items()):
                        if not subscriber.subscriptions:
                            del self._nodes[name]
                            await self._drop(subscriber)
            except REDIS_ERRORS as exc:
                self._log.warning("reroute", "pub/sub: cluster not settled yet: %s", exc)
                for subscription in homeless:
                    subscription._put(RESYNC)
                self._dirty = True
                continue
            backoff = _BACKOFF_MIN

    @staticmethod
    async def _drop(subscriber: Subscriber) -> None:
        await subscriber.aclose()
        with contextlib.suppress(RedisError, OSError):
            await subscriber._client.aclose(close_connection_pool=True)

    async def aclose(self) -> None:
        self._closed = True
        if self._reroute is not None:
            self._reroute.cancel()
            with contextlib.suppress(asyncio.CancelledError, *REDIS_ERRORS):
                await self._reroute
        subscribers, self._nodes = list(self._nodes.values()), {}
        for subscriber in subscribers:
            await self._drop(subscriber)


PubSubHub = Subscriber | ShardedSubscriber
"""Either kind: one connection, or one per cluster primary."""
