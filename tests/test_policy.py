"""The freshness policy as a table: entry times, clock, settings -> decision."""

from __future__ import annotations

import math
import random

import pytest

from aiollmcache.policy import State, decide, early_refresh_at

# An entry created at t=1000, fresh for 100 s, then stale for 50 s.
ENTRY = {"created_at": 1000.0, "fresh_until": 1100.0, "expires_at": 1150.0}


@pytest.mark.parametrize(
    ("now", "early_at", "max_age", "state", "refresh"),
    [
        (1000.0, None, None, State.FRESH, False),  # just written
        (1099.9, None, None, State.FRESH, False),  # end of the fresh window, no early refresh
        (1100.0, None, None, State.STALE, True),  # stale: serve and refresh
        (1149.9, None, None, State.STALE, True),
        (1150.0, None, None, State.EXPIRED, False),  # hard expiry
        (2000.0, None, None, State.EXPIRED, False),
        (1050.0, None, 60.0, State.FRESH, False),  # young enough for the caller
        (1061.0, None, 60.0, State.EXPIRED, False),  # too old for this caller
        (1120.0, None, 200.0, State.STALE, True),
        (1094.9, 1095.0, None, State.FRESH, False),  # before its early-refresh time
        (1095.0, 1095.0, None, State.FRESH, True),  # from then on: served fresh, refreshed
        (1120.0, 1095.0, None, State.STALE, True),
        (1200.0, 1095.0, None, State.EXPIRED, False),
        (1070.0, 1095.0, 20.0, State.EXPIRED, False),  # max_age wins
    ],
)
def test_decision_table(
    now: float, early_at: float | None, max_age: float | None, state: State, refresh: bool
) -> None:
    d = decide(**ENTRY, now=now, early_at=early_at, max_age=max_age)
    assert (d.state, d.refresh) == (state, refresh)
    assert d.servable == (state is not State.EXPIRED)


@pytest.mark.parametrize(
    ("compute_s", "beta", "u", "expected"),
    [
        (2.0, 1.0, 0.0, 1100.0),  # ln(1) = 0: not early at all
        (2.0, 1.0, 1 - math.exp(-1.0), 1098.0),  # one mean offset (compute * beta) early
        (2.0, 3.0, 1 - math.exp(-1.0), 1094.0),  # beta scales it
        (8.0, 1.0, 1 - math.exp(-0.5), 1096.0),  # slower answers refresh sooner
        (2.0, 0.0, 0.9, 1100.0),  # beta 0: off
        (0.0, 1.0, 0.9, 1100.0),  # no compute time known: off
    ],
)
def test_early_refresh_time(compute_s: float, beta: float, u: float, expected: float) -> None:
    at = early_refresh_at(fresh_until=1100.0, compute_s=compute_s, beta=beta, u=u)
    assert at == pytest.approx(expected)


def test_early_refresh_chance_rises_towards_expiry_and_with_compute_time() -> None:
    def chance(now: float, compute_s: float) -> float:
        rng = random.Random(7)  # seeded: the same draws for every point
        draws = [
            early_refresh_at(fresh_until=1100.0, compute_s=compute_s, beta=1.0, u=rng.random())
            for _ in range(10_000)
        ]
        return sum(decide(**ENTRY, now=now, early_at=at).refresh for at in draws) / len(draws)

    assert chance(1000.0, 2.0) == 0.0  # 100 s out, 2 s to compute: never
    assert chance(1090.0, 2.0) < chance(1095.0, 2.0) < chance(1099.0, 2.0)
    assert chance(1095.0, 2.0) < chance(1095.0, 8.0)
    assert chance(1099.0, 2.0) == pytest.approx(math.exp(-0.5), abs=0.02)
