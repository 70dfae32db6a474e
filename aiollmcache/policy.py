"""Freshness decisions: pure functions of an entry's times, the clock and the settings.

No I/O and no clock of its own: ``now`` (wall-clock seconds, as stored in
entries) and the random draw are arguments, so every decision can be tested
as a table.

An entry's life::

    created_at ........ fresh_until ........ expires_at
       FRESH (maybe refreshed early)   STALE   |   EXPIRED (gone from Redis)

- FRESH: serve it. Near the end of the fresh window it may also be refreshed
  in the background, early (XFetch: Vattani, Chierichetti, Lowenstein, 2015):
  refresh when ``now - compute_s * beta * ln(rand()) >= fresh_until``, so the
  probability rises as expiry nears, sooner for answers that took longer to
  compute, and a hot key is refreshed before any caller sees it stale.
- STALE: serve it at once and refresh it in the background
  (stale-while-revalidate).
- EXPIRED: do not serve it; compute a new answer before answering.

A caller's ``max_age`` turns an entry older than that into EXPIRED for that
caller (it waits for a fresh answer).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Decision", "State", "decide"]


class State(enum.Enum):
    FRESH = "fresh"
    STALE = "stale"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class Decision:
    state: State
    refresh: bool  # start a background refresh

    @property
    def servable(self) -> bool:
        return self.state is not State.EXPIRED


_FRESH = Decision(State.FRESH, refresh=False)
_FRESH_REFRESH = Decision(State.FRESH, refresh=True)
_STALE = Decision(State.STALE, refresh=True)
_EXPIRED = Decision(State.EXPIRED, refresh=False)


def decide(
    *,
    created_at: float,
    fresh_until: float,
    expires_at: float,
    compute_s: float,
    now: float,
    max_age: float | None = None,
    beta: float = 1.0,
    draw: Callable[[], float],
) -> Decision:
    """What to do with an entry at ``now``.

    ``draw`` returns a uniform random number in [0, 1); it is called only
    when an early refresh is possible (fresh entry, ``beta > 0``).
    """
    if now >= expires_at or (max_age is not None and now - created_at > max_age):
        return _EXPIRED
    if now >= fresh_until:
        return _STALE
    # 1 - draw() is in (0, 1]: the log is defined, and its negation >= 0.
    if beta > 0 and compute_s > 0 and now - compute_s * beta * math.log(1.0 - draw()) >= fresh_until:
        return _FRESH_REFRESH
    return _FRESH
