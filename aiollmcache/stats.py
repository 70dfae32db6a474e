"""Counters kept by the cache; :meth:`Stats.snapshot` is what ``stats()`` returns.

Counters are plain integer attributes bumped on the event loop thread: no
locks, no allocation on the hot path.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from .cache_policy import NOT_STORED_REASONS

__all__ = ["LATENCY_BUCKETS", "SIMILARITY_BUCKETS", "Stats"]

# Upper bounds (seconds) of the latency histogram's buckets, the last one
# unbounded: from a memory hit (tens of microseconds) to a model call.
LATENCY_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
_SOURCES: Final = ("memory", "redis", "semantic", "upstream")

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
    # answers from the model not stored, by reason (cache_policy.NOT_STORED_REASONS)
    not_stored: dict[str, int] = field(default_factory=lambda: dict.fromkeys(NOT_STORED_REASONS, 0))
    cached_refused: int = 0
    samples_served: int = 0
    samples_filled: int = 0
    # per SIMILARITY_BUCKETS, then lookups that found no candidate at all
    similarity_counts: list[int] = field(default_factory=lambda: [0] * (len(SIMILARITY_BUCKETS) + 1))
    cost_saved_usd: float = 0.0
    unpriced_hits: int = 0
    # per source: counts per LATENCY_BUCKETS (and one past the last), and the sum
    latency_counts: dict[str, list[int]] = field(
        default_factory=lambda: {s: [0] * (len(LATENCY_BUCKETS) + 1) for s in _SOURCES}
    )
    latency_sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(_SOURCES, 0.0))

    def observe(self, source: str, seconds: float) -> None:
        """One call's latency, by where its answer came from."""
        counts = self.latency_counts.get(source)
        if counts is None:
            return
        counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sums[source] += seconds

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
        data.pop("latency_counts")
        data.pop("latency_sums")
        data["cost_saved_usd"] = round(self.cost_saved_usd, 6)
        data["latency"] = {source: self.latency_summary(source) for source in _SOURCES}
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

    def latency_summary(self, source: str) -> dict[str, Any]:
        """Count, mean and percentile estimates (the upper bound of the bucket
        the percentile falls in, in milliseconds) of one source's latencies."""
        counts = self.latency_counts[source]
        total = sum(counts)
        summary: dict[str, Any] = {"count": total, "mean_ms": None, "p50_ms": None, "p99_ms": None}
        if total:
            summary["mean_ms"] = round(self.latency_sums[source] / total * 1000, 4)
            for name, q in (("p50_ms", 0.5), ("p99_ms", 0.99)):
                rank, seen = q * total, 0
                for i, n in enumerate(counts):
                    seen += n
                    if seen >= rank:
                        bound = LATENCY_BUCKETS[i] if i < len(LATENCY_BUCKETS) else float("inf")
                        summary[name] = bound * 1000
                        break
        summary["buckets"] = {
            **{f"le_{bound:g}": n for bound, n in zip(LATENCY_BUCKETS, counts, strict=False)},
            "le_inf": counts[-1],
        }
        return summary
