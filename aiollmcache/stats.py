"""Counters kept by the cache; :meth:`Stats.snapshot` is what ``stats()`` returns.

Counters are plain integer attributes bumped on the event loop thread: no
locks, no allocation on the hot path.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Final

__all__ = ["SIMILARITY_BUCKETS", "Stats"]

# Lower bounds of the buckets of the best similarity found by each semantic
# lookup (hit or miss): where the threshold should go shows here.
SIMILARITY_BUCKETS: Final = (0.0, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.925, 0.95, 0.975, 0.99)


@dataclass(slots=True)
class Stats:
    requests: int = 0
    streams: int = 0
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
    hits_semantic: int = 0
    semantic_lookups: int = 0
    semantic_misses: int = 0
    semantic_skipped: int = 0
    semantic_rejected: int = 0
    semantic_errors: int = 0
    semantic_indexed: int = 0
    # per SIMILARITY_BUCKETS, then lookups that found no candidate at all
    similarity_counts: list[int] = field(default_factory=lambda: [0] * (len(SIMILARITY_BUCKETS) + 1))

    def record_similarity(self, similarity: float | None) -> None:
        if similarity is None:
            self.similarity_counts[-1] += 1
            return
        bucket = 0
        for i, low in enumerate(SIMILARITY_BUCKETS):
            if similarity >= low:
                bucket = i
        self.similarity_counts[bucket] += 1

    def snapshot(self) -> dict[str, Any]:
        data = asdict(self)
        counts = data.pop("similarity_counts")
        data["semantic_similarity"] = {
            **{f">={low:g}": n for low, n in zip(SIMILARITY_BUCKETS, counts, strict=False)},
            "none": counts[-1],
        }
        served_without_upstream = (
            self.hits_memory + self.hits_redis + self.hits_semantic + self.coalesced + self.coalesced_remote
        )
        data["hit_rate"] = served_without_upstream / self.requests if self.requests else 0.0
        return data
