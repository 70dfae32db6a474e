"""In-process single-flight: one shared computation per key.

A flight is a future registered under a key by the first caller (the leader).
Callers arriving while it is registered await it through ``asyncio.shield``:
a cancelled follower never cancels the flight, and a cancelled leader hands
over instead of failing its followers (they receive :data:`RETRY` and go
round again, one of them becoming the new leader).
"""

from __future__ import annotations

import asyncio
import enum
from typing import Final, Generic, TypeVar

__all__ = ["RETRY", "Flights"]

T = TypeVar("T")


class _Retry(enum.Enum):
    RETRY = "RETRY"


RETRY: Final = _Retry.RETRY


class Flights(Generic[T]):
    """The flights in progress in this process, by key."""

    __slots__ = ("_flights",)

    def __init__(self) -> None:
        self._flights: dict[str, asyncio.Future[T | _Retry]] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def get(self, key: str) -> asyncio.Future[T | _Retry] | None:
        return self._flights.get(key)

    def lead(self, key: str) -> asyncio.Future[T | _Retry]:
        """Register and return a new flight for ``key``; the caller must settle it."""
        fut: asyncio.Future[T | _Retry] = asyncio.get_running_loop().create_future()
        self._flights[key] = fut
        return fut

    def settle(
        self,
        key: str,
        fut: asyncio.Future[T | _Retry],
        result: T | _Retry = RETRY,
        exc: BaseException | None = None,
    ) -> None:
        """Resolve ``fut`` (if still pending) and unregister it."""
        if self._flights.get(key) is fut:
            del self._flights[key]
        if fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
            # Every waiter gets the exception; if there is none left (the
            # leader was cancelled), it must not be logged as never retrieved.
            fut.exception()
        else:
            fut.set_result(result)

    def follow_task(self, key: str, fut: asyncio.Future[T | _Retry], task: asyncio.Task[T]) -> None:
        """Settle ``fut`` with the outcome of ``task`` when it ends."""

        def done(t: asyncio.Task[T]) -> None:
            if t.cancelled():
                self.settle(key, fut, RETRY)
            elif (exc := t.exception()) is not None:
                self.settle(key, fut, exc=exc)
            else:
                self.settle(key, fut, t.result())

        task.add_done_callback(done)
