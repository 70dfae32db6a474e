"""The freshness policy as a table: entry times, clock, settings -> decision."""

from __future__ import annotations

import math
import random

import pytest

from aiollmcache.policy import State, decide

# An entry created at t=1000, fresh for 100 s, then stale for 50 s; computing it took 2 s.
ENTRY = {"created_at": 1000.0, "fresh_until": 1100.0, "expires_at": 1150.0, "compute_s": 2.0}


def never() -> float:
    return 0.0  # 1 - 0 = 1: ln(1) = 0, no early refresh


@pytest.mark.parametrize(
    ("now", "max_age", "beta", "state", "refresh"),
    [
        (1000.0, None, 1.0, State.FRESH, False),  # just written
        (1099.9, None, 1.0, State.FRESH, False),  # end of the fresh window, draw never fires
        (1100.0, None, 1.0, State.STALE, True),  # stale: serve and refresh
        (1149.9, None, 1.0, State.STALE, True),
        (1150.0, None, 1.0, State.EXPIRED, False),  # hard expiry
        (2000.0, None, 1.0, State.EXPIRED, False),
        (1050.0, 60.0, 1.0, State.FRESH, False),  # young enough for the caller
        (1061.0, 60.0, 1.0, State.EXPIRED, False),  # too old for this caller
        (1120.0, 200.0, 1.0, State.STALE, True),
        (1099.9, None, 0.0, State.FRESH, False),  # beta 0: no early refresh
    ],
)
def test_decision_table(now: float, max_age: float | None, beta: float, state: State, refresh: bool) -> None:
    d = decide(**ENTRY, now=now, max_age=max_age, beta=beta, draw=never)
    assert (d.state, d.refresh) == (state, refresh)
    assert d.servable == (state is not State.EXPIRED)


@pytest.mark.parametrize(
    ("now", "draw", "refresh"),
    [
        # refresh when now - compute * beta * ln(1 - draw) >= fresh_until
        (1099.0, 1 - math.exp(-0.5), True),  # needs 1.0 s of head start, gets 2 * 0.5 = 1.0
        (1099.0, 1 - math.exp(-0.49), False),  # gets 0.98 s
        (1090.0, 1 - math.exp(-5.0), True),  # an unlucky-early draw, 10 s ahead
        (1090.0, 1 - math.exp(-4.9), False),
        (1000.0, 0.999999, False),  # far from expiry: needs ln(1e-6) * 2 = 27.6 s of 100
    ],
)
def test_xfetch_early_refresh(now: float, draw: float, refresh: bool) -> None:
    d = decide(**ENTRY, now=now, draw=lambda: draw)
    assert d.state is State.FRESH
    assert d.refresh is refresh


def test_xfetch_probability_rises_towards_expiry_and_with_compute_time() -> None:
    def rate(now: float, compute_s: float, seed: int = 7) -> float:
        rng = random.Random(seed)
        entry = {**ENTRY, "compute_s": compute_s}
        return sum(decide(**entry, now=now, draw=rng.random).refresh for _ in range(10_000)) / 10_000

    assert rate(1000.0, 2.0) == 0.0  # 100 s out, 2 s to compute: never
    assert rate(1090.0, 2.0) < rate(1095.0, 2.0) < rate(1099.0, 2.0)
    assert rate(1095.0, 2.0) < rate(1095.0, 8.0)
    assert rate(1099.0, 2.0) == pytest.approx(math.exp(-0.5), abs=0.02)


def test_draw_is_not_consulted_when_no_early_refresh_is_possible() -> None:
    def boom() -> float:
        raise AssertionError("drawn")

    decide(**ENTRY, now=1120.0, draw=boom)  # stale
    decide(**ENTRY, now=1200.0, draw=boom)  # expired
    decide(**ENTRY, now=1050.0, beta=0.0, draw=boom)
    decide(**{**ENTRY, "compute_s": 0.0}, now=1050.0, draw=boom)
