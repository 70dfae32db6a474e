"""A logger that says the same thing at most once per interval."""

from __future__ import annotations

import logging
import time

__all__ = ["RateLimitedLogger", "logger"]

logger = logging.getLogger("aiollmcache")


class RateLimitedLogger:
    """Log each ``kind`` of event at most once per ``interval`` seconds, with a count."""

    __slots__ = ("_interval", "_last", "_suppressed")

    def __init__(self, interval: float = 10.0) -> None:
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, kind: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self._interval:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._last[kind] = now
        skipped = self._suppressed.pop(kind, 0)
        if skipped:
            msg += " (%d similar events not logged)"
            args = (*args, skipped)
        logger.warning(msg, *args)
