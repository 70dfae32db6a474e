"""Exceptions raised by aiollmcache.

Everything the cache raises on its own account derives from
:class:`AiollmcacheError`. Errors of the model's API (``openai.APIError`` and
its subclasses, timeouts, connection errors) are never wrapped: callers get
the SDK's own exception, whether they led the call or waited on it.

::

    AiollmcacheError
    ├── InvalidRequestError (ValueError)      bad messages or params, raised before any I/O
    ├── InvalidResponseError (ValueError)     an upstream callable returned something unusable
    ├── ConfigurationError (ValueError)       bad settings
    ├── CacheClosedError (RuntimeError)       the cache was used after aclose()
    └── TierError                             a storage tier failed (handled inside the cache)
        ├── TierUnavailableError              the tier cannot be reached
        │   └── TierTimeoutError (TimeoutError)
        └── CorruptEntryError                 bytes at a key are not a valid entry

``TierError`` and its subclasses are translated at the tier boundary and
handled by the cache (the tier is skipped, the event counted); they reach
callers only through the tiers' own API.
"""

from __future__ import annotations

__all__ = [
    "AiollmcacheError",
    "CacheClosedError",
    "ConfigurationError",
    "CorruptEntryError",
    "InvalidRequestError",
    "InvalidResponseError",
    "TierError",
    "TierTimeoutError",
    "TierUnavailableError",
]


class AiollmcacheError(Exception):
    """Root of every exception raised by aiollmcache itself."""


class InvalidRequestError(AiollmcacheError, ValueError):
    """The request cannot be sent or keyed: raised before any I/O."""


class InvalidResponseError(AiollmcacheError, ValueError):
    """An upstream returned a value that is not a chat completion."""


class ConfigurationError(AiollmcacheError, ValueError):
    """A setting is out of range or settings contradict each other."""


class CacheClosedError(AiollmcacheError, RuntimeError):
    """The cache was used after :meth:`LLMCache.aclose`."""


class TierError(AiollmcacheError):
    """A storage tier failed."""


class TierUnavailableError(TierError):
    """The tier could not be reached or refused the command."""


class TierTimeoutError(TierUnavailableError, TimeoutError):
    """The tier did not answer within its time budget."""


class CorruptEntryError(TierError):
    """The bytes stored at a key are not a valid entry of this format."""
