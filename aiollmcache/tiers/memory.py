"""The in-process tier: an LRU bounded by entry count and by bytes.

Expiry is checked on access against ``time.monotonic()`` deadlines (no timers
per key, no background sweeper): an expired entry is dropped when it is read
or when it reaches the cold end of the LRU. All operations are synchronous and
O(1); the event loop is never yielded inside the tier, so no lock is needed.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

from ..entry import MISSING, _Missing

__all__ = ["MemoryTier"]

V = TypeVar("V")


class MemoryTier(Generic[V]):
    """LRU of at most ``max_entries`` values and ``max_bytes`` accounted bytes.

    ``max_entries == 0`` disables the tier: every ``get`` misses and ``set``
    stores nothing. A value larger than ``max_bytes`` is not stored.
    """

    __slots__ = ("_clock", "_data", "_max_bytes", "_max_entries", "_nbytes", "evictions")

    def __init__(
        self,
        *,
        max_entries: int,
        max_bytes: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._clock = clock
        # key -> (value, monotonic deadline, accounted size)
        self._data: OrderedDict[str, tuple[V, float, int]] = OrderedDict()
        self._nbytes = 0
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self._max_entries > 0

    def __len__(self) -> int:
        return len(self._data)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def get(self, key: str) -> V | _Missing:
        item = self._data.get(key)
        if item is None:
            return MISSING
        if item[1] <= self._clock():
            self._drop(key)
            return MISSING
        self._data.move_to_end(key)
        return item[0]

    def set(self, key: str, value: V, *, ttl: float, size: int) -> bool:
        """Store ``value`` for ``ttl`` seconds; return whether it was stored."""
        if not self.enabled or ttl <= 0 or size > self._max_bytes:
            self.delete(key)
            return False
        self.delete(key)
        self._data[key] = (value, self._clock() + ttl, size)
        self._nbytes += size
        while len(self._data) > self._max_entries or self._nbytes > self._max_bytes:
            oldest = next(iter(self._data))
            self._drop(oldest)
            self.evictions += 1
        return True

    def delete(self, key: str) -> bool:
        if key in self._data:
            self._drop(key)
            return True
        return False

    def evict(self, predicate: Callable[[str, V], bool]) -> int:
        """Drop every value for which ``predicate(key, value)`` is true; return
        how many. O(n): for invalidation, not for the request path."""
        doomed = [key for key, (value, _, _) in self._data.items() if predicate(key, value)]
        for key in doomed:
            self._drop(key)
        return len(doomed)

    def clear(self) -> int:
        """Drop everything; return how many values were held."""
        count = len(self._data)
        self._data.clear()
        self._nbytes = 0
        return count

    def _drop(self, key: str) -> None:
        _, _, size = self._data.pop(key)
        self._nbytes -= size
