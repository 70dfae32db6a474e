"""Prometheus exposition of :meth:`LLMCache.stats` (the ``metrics`` extra:
``prometheus_client``).

Metrics are read from the stats snapshot when scraped, so collecting them
costs the hot path nothing beyond the counters ``stats()`` keeps anyway.
Names follow Prometheus conventions (``aiollmcache_`` prefix, ``_total``
for counters, seconds for durations); labels: ``namespace``, ``source``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .stats import LATENCY_BUCKETS

if TYPE_CHECKING:
    from .client import LLMCache

__all__ = ["CacheCollector", "exposition"]

_COUNTERS = {
    "requests": "Calls to complete() and stream()",
    "misses": "Calls answered by the model",
    "upstream_calls": "Calls made to the model",
    "upstream_errors": "Model calls that failed",
    "coalesced": "Calls that waited on an identical call in this process",
    "coalesced_remote": "Calls that waited on an identical call in another process",
    "stale_served": "Answers served past their fresh window",
    "refreshes": "Background refreshes started",
    "refresh_errors": "Background refreshes that failed",
    "redis_errors": "Redis operations that failed",
    "corrupt_entries": "Entries in Redis that were not valid and were dropped",
    "stores": "Answers stored",
    "cached_refused": "Cached answers not served: the request's policy would not store them",
    "samples_filled": "Model calls made to fill a sample bucket",
    "lease_passed": "Answers not stored, received from another process's model call",
    "samples_served": "Calls served one answer of a full sample bucket",
    "invalidations": "Invalidations made by this process",
    "tokens_saved_prompt": "Prompt tokens not sent to the model",
    "tokens_saved_completion": "Completion tokens not paid for",
    "cost_saved_usd": "Estimated US dollars saved (from the price table)",
}
_HITS = {"memory": "hits_memory", "redis": "hits_redis", "semantic": "hits_semantic"}


class CacheCollector:
    """A ``prometheus_client`` collector of one cache's stats."""

    def __init__(self, cache: LLMCache) -> None:
        self._cache = cache

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        snapshot = self._cache.stats()
        namespace = self._cache.namespace
        hits = CounterMetricFamily(
            "aiollmcache_hits", "Calls answered from the cache, by tier", labels=["namespace", "source"]
        )
        for source, name in _HITS.items():
            hits.add_metric([namespace, source], snapshot.get(name, 0))
        yield hits
        not_stored = CounterMetricFamily(
            "aiollmcache_not_stored",
            "Answers from the model the cache policy kept out of the cache, by reason",
            labels=["namespace", "reason"],
        )
        for reason, count in snapshot.get("not_stored", {}).items():
            not_stored.add_metric([namespace, reason], count)
        yield not_stored
        for name, help_text in _COUNTERS.items():
            family = CounterMetricFamily(f"aiollmcache_{name}", help_text, labels=["namespace"])
            family.add_metric([namespace], snapshot.get(name, 0))
            yield family
        for name, help_text in (
            ("memory_entries", "Entries in the memory tier"),
            ("memory_bytes", "Accounted bytes of the memory tier"),
            ("inflight", "Requests in flight"),
            ("redis_breaker_open", "1 while the circuit breaker skips Redis"),
        ):
            gauge = GaugeMetricFamily(f"aiollmcache_{name}", help_text, labels=["namespace"])
            gauge.add_metric([namespace], snapshot.get(name, 0))
            yield gauge
        latency = HistogramMetricFamily(
            "aiollmcache_request_duration_seconds",
            "Duration of calls, by where the answer came from",
            labels=["namespace", "source"],
        )
        for source in ("memory", "redis", "semantic", "upstream"):
            counts = self._cache._stats.latency_counts[source]
            cumulative, buckets = 0, []
            for bound, n in zip(LATENCY_BUCKETS, counts, strict=False):
                cumulative += n
                buckets.append((repr(bound), cumulative))
            buckets.append(("+Inf", cumulative + counts[-1]))
            latency.add_metric([namespace, source], buckets, self._cache._stats.latency_sums[source])
        yield latency


def exposition(cache: LLMCache) -> tuple[bytes, str]:
    """The Prometheus text of ``cache``'s metrics, and its content type."""
    try:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        from prometheus_client.registry import CollectorRegistry
    except ImportError as exc:  # pragma: no cover - depends on the extra
        raise RuntimeError("metrics need prometheus_client: pip install 'aiollmcache[metrics]'") from exc
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CacheCollector(cache))
    return generate_latest(registry), CONTENT_TYPE_LATEST
