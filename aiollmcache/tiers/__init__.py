"""Storage tiers. Tiers only store: the order of lookups, promotion,
single-flight and freshness belong to :class:`aiollmcache.LLMCache`."""
