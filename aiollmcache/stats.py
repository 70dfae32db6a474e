"""Counters kept by the cache; :meth:`Stats.snapshot` is what ``stats()`` returns.

Counters are plain integer attributes bumped on the event loop thread: no
locks, no allocation on the hot path.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Stats"]


@dataclass(slots=True)
class Stats:
    requests: int = 0
    hits_memory: int = 0
    hits_redis: int = 0
    coalesced: int = 0
    coalesced_remote: int = 0
    misses: int = 0
    upstream_calls: int = 0
    upstream_errors: int = 0
    stores: int = 0
    store_skipped: int = 0
    stale_served: int = 0
    refreshes: int = 0
    refreshes_skipped: int = 0
    refresh_errors: int = 0
    redis_errors: int = 0
    corrupt_entries: int = 0
    tokens_saved_prompt: int = 0
    tokens_saved_completion: int = 0
    invalidations: int = 0
    memory_invalidated: int = 0

    def snapshot(self) -> dict[str, Any]:
        data = asdict(self)
        served_without_upstream = self.hits_memory + self.hits_redis + self.coalesced + self.coalesced_remote
        data["hit_rate"] = served_without_upstream / self.requests if self.requests else 0.0
        return data
