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
    ├── StreamInterruptedError                a streamed answer was cut off before its end
    ├── TierError                             a storage tier failed (handled inside the cache)
    │   ├── TierUnavailableError              the tier cannot be reached
    │   │   └── TierTimeoutError (TimeoutError)
    │   ├── CorruptEntryError                 bytes at a key are not a valid entry
    │   └── EmbeddingError                    the embedder failed (the semantic tier is skipped)
    └── CoordinationError                     waiting on another process's call went wrong
        ├── WaitTimeoutError (TimeoutError)   the other process's call took longer than max_wait
        └── RemoteUpstreamError               the other process's upstream call failed

``TierError`` and its subclasses are translated at the tier boundary and
handled by the cache (the tier is skipped, the event counted); they reach
callers only through the tiers' own API.
"""

from __future__ import annotations

__all__ = [
    "AiollmcacheError",
    "CacheClosedError",
    "ConfigurationError",
    "CoordinationError",
    "CorruptEntryError",
    "EmbeddingError",
    "InvalidRequestError",
    "InvalidResponseError",
    "RemoteUpstreamError",
    "StreamInterruptedError",
    "TierError",
    "TierTimeoutError",
    "TierUnavailableError",
    "WaitTimeoutError",
]


class AiollmcacheError(Exception):
    """Root of every exception raised by aiollmcache itself."""


class InvalidRequestError(AiollmcacheError, ValueError):
    """The request cannot be sent or keyed: raised before any I/O."""


class InvalidResponseError(AiollmcacheError, ValueError):
    """An upstream returned a value that is not a chat completion (or, for the
    Responses API, a ``Response``)."""


class ConfigurationError(AiollmcacheError, ValueError):
    """A setting is out of range or settings contradict each other."""


class CacheClosedError(AiollmcacheError, RuntimeError):
    """The cache was used after :meth:`LLMCache.aclose`."""


class StreamInterruptedError(AiollmcacheError):
    """A streamed answer ended before it was complete: the model's stream was
    cut off, or the process streaming it to others died or gave up. Nothing
    of it was cached; the chunks already received were the start of an
    answer that never finished."""


class TierError(AiollmcacheError):
    """A storage tier failed."""


class TierUnavailableError(TierError):
    """The tier could not be reached or refused the command."""


class TierTimeoutError(TierUnavailableError, TimeoutError):
    """The tier did not answer within its time budget."""


class CorruptEntryError(TierError):
    """The bytes stored at a key are not a valid entry of this format."""


class EmbeddingError(TierError):
    """The embedder failed, timed out or answered something unusable: the
    semantic tier is skipped for the request."""


class CoordinationError(AiollmcacheError):
    """Waiting on an identical request computed by another process failed."""


class WaitTimeoutError(CoordinationError, TimeoutError):
    """Another process held the request's lease for longer than ``max_wait``."""


class RemoteUpstreamError(CoordinationError):
    """The upstream call made by another process for this request failed.

    Callers in the process that made the call get the SDK's own exception;
    callers elsewhere get this one, with what that exception said.
    ``error_type`` is its class name (e.g. ``"RateLimitError"``),
    ``status_code`` its HTTP status when it had one.
    """

    def __init__(self, error_type: str, message: str, status_code: int | None = None) -> None:
        self.error_type = error_type
        self.status_code = status_code
        self.message = message
        status = f" (HTTP {status_code})" if status_code is not None else ""
        super().__init__(f"the upstream call made by another process failed: {error_type}{status}: {message}")
