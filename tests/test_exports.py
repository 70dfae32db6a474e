import aiollmcache


def test_public_api_is_pinned() -> None:
    assert sorted(aiollmcache.__all__) == sorted(
        [
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
            "StreamInterruptedError",
            "Source",
            "TierError",
            "TierTimeoutError",
            "TierUnavailableError",
            "Upstream",
            "WaitTimeoutError",
            "__version__",
        ]
    )
    for name in aiollmcache.__all__:
        assert hasattr(aiollmcache, name), name


def test_error_tree() -> None:
    from aiollmcache import errors

    assert issubclass(errors.InvalidRequestError, ValueError)
    assert issubclass(errors.ConfigurationError, ValueError)
    assert issubclass(errors.CacheClosedError, RuntimeError)
    assert issubclass(errors.TierTimeoutError, TimeoutError)
    assert issubclass(errors.TierTimeoutError, errors.TierUnavailableError)
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.AiollmcacheError)
