"""aiollmcache: an asyncio caching client for LLM calls.

Memory tier, then Redis, then the model; concurrent identical requests share
one upstream call. See the README for guarantees and their limits.
"""

from .cache_policy import MAX_SAMPLES, CachePolicy
from .client import CacheControl, CacheResult, LLMCache, ResponseResult, Source
from .embeddings import Embedder, OpenAIEmbedder
from .entry import MISSING, Entry
from .errors import (
    AiollmcacheError,
    CacheClosedError,
    ConfigurationError,
    CoordinationError,
    CorruptEntryError,
    EmbeddingError,
    InvalidRequestError,
    InvalidResponseError,
    RemoteUpstreamError,
    StreamInterruptedError,
    TierError,
    TierTimeoutError,
    TierUnavailableError,
    WaitTimeoutError,
)
from .invalidation import Invalidation, InvalidationKind, Pattern
from .request import EXCLUDED_PARAMS
from .streaming import CachedStream
from .tiers.semantic import DEFAULT_THRESHOLD, SemanticConfig
from .upstream import OpenAIUpstream, Upstream
from .wrap import CachedOpenAI

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_THRESHOLD",
    "EXCLUDED_PARAMS",
    "MAX_SAMPLES",
    "MISSING",
    "AiollmcacheError",
    "CacheClosedError",
    "CacheControl",
    "CachePolicy",
    "CacheResult",
    "CachedOpenAI",
    "CachedStream",
    "ConfigurationError",
    "CoordinationError",
    "CorruptEntryError",
    "Embedder",
    "EmbeddingError",
    "Entry",
    "InvalidRequestError",
    "InvalidResponseError",
    "Invalidation",
    "InvalidationKind",
    "LLMCache",
    "OpenAIEmbedder",
    "OpenAIUpstream",
    "Pattern",
    "RemoteUpstreamError",
    "ResponseResult",
    "SemanticConfig",
    "Source",
    "StreamInterruptedError",
    "TierError",
    "TierTimeoutError",
    "TierUnavailableError",
    "Upstream",
    "WaitTimeoutError",
    "__version__",
]
