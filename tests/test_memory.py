from __future__ import annotations

from aiollmcache import MISSING
from aiollmcache.tiers.memory import MemoryTier


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def tier(max_entries: int = 10, max_bytes: int = 1000) -> tuple[MemoryTier[str], Clock]:
    clock = Clock()
    return MemoryTier(max_entries=max_entries, max_bytes=max_bytes, clock=clock), clock


def test_get_set_and_miss_sentinel() -> None:
    t, _ = tier()
    assert t.get("a") is MISSING
    assert t.set("a", "A", ttl=10, size=1)
    assert t.get("a") == "A"


def test_expiry_is_checked_on_access() -> None:
    t, clock = tier()
    t.set("a", "A", ttl=10, size=5)
    clock.now += 9.9
    assert t.get("a") == "A"
    clock.now += 0.1
    assert t.get("a") is MISSING
    assert len(t) == 0 and t.nbytes == 0


def test_lru_bound_by_entries_evicts_least_recently_used() -> None:
    t, _ = tier(max_entries=2)
    t.set("a", "A", ttl=10, size=1)
    t.set("b", "B", ttl=10, size=1)
    assert t.get("a") == "A"  # b is now the coldest
    t.set("c", "C", ttl=10, size=1)
    assert t.get("b") is MISSING
    assert t.get("a") == "A" and t.get("c") == "C"
    assert t.evictions == 1


def test_bound_by_bytes_never_exceeded() -> None:
    t, _ = tier(max_bytes=100)
    for i in range(50):
        t.set(str(i), "x", ttl=10, size=30)
        assert t.nbytes <= 100
    assert len(t) == 3


def test_value_larger_than_the_bound_is_not_stored() -> None:
    t, _ = tier(max_bytes=100)
    t.set("a", "old", ttl=10, size=10)
    assert not t.set("a", "huge", ttl=10, size=101)
    assert t.get("a") is MISSING
    assert t.nbytes == 0


def test_replacing_a_key_reaccounts_bytes() -> None:
    t, _ = tier()
    t.set("a", "A", ttl=10, size=100)
    t.set("a", "A2", ttl=10, size=40)
    assert t.nbytes == 40 and t.get("a") == "A2"


def test_zero_entries_disables_the_tier() -> None:
    t, _ = tier(max_entries=0)
    assert not t.enabled
    assert not t.set("a", "A", ttl=10, size=1)
    assert t.get("a") is MISSING


def test_non_positive_ttl_is_not_stored() -> None:
    t, _ = tier()
    assert not t.set("a", "A", ttl=0, size=1)
    assert t.get("a") is MISSING


def test_evict_drops_matching_values_and_their_bytes() -> None:
    tier: MemoryTier[str] = MemoryTier(max_entries=10, max_bytes=1000)
    for key, value in [("a", "red"), ("b", "blue"), ("c", "red")]:
        tier.set(key, value, ttl=60, size=10)
    assert tier.evict(lambda key, value: value == "red") == 2
    assert (tier.get("a"), tier.get("b"), tier.get("c")) == (MISSING, "blue", MISSING)
    assert tier.nbytes == 10
    assert tier.clear() == 1 and len(tier) == 0 and tier.nbytes == 0
