"""What a token costs: for the estimate of money a cache hit saved.

Prices are US dollars per million tokens, ``(input, output)``, looked up by
the longest prefix of the model name (``gpt-4o-mini-2024-07-18`` finds
``gpt-4o-mini``). The defaults are public list prices of some OpenAI models
when this table was written; they change, and discounts (cached input,
batch) are not modelled: pass ``LLMCache(prices=...)`` with your own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from .errors import ConfigurationError

__all__ = ["DEFAULT_PRICES", "PriceTable"]

DEFAULT_PRICES: Final[Mapping[str, tuple[float, float]]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1": (2.00, 8.00),
    "o3-mini": (1.10, 4.40),
    "o4-mini": (1.10, 4.40),
    "gpt-3.5-turbo": (0.50, 1.50),
}


class PriceTable:
    """Prices by model-name prefix; unknown models cost nothing (and are
    counted in ``unpriced``)."""

    def __init__(self, prices: Mapping[str, tuple[float, float]] | None = None) -> None:
        table = dict(DEFAULT_PRICES if prices is None else prices)
        for model, price in table.items():
            if (
                not isinstance(model, str)
                or not isinstance(price, tuple)
                or len(price) != 2
                or not all(isinstance(p, (int, float)) and not isinstance(p, bool) and p >= 0 for p in price)
            ):
                raise ConfigurationError(
                    "prices: expected {model: (input, output) USD per million tokens}, "
                    f"got {model!r}: {price!r}"
                )
        # Longest prefixes first: "gpt-4o-mini" before "gpt-4o".
        self._prefixes = sorted(table.items(), key=lambda item: -len(item[0]))
        self._found: dict[str, tuple[float, float] | None] = {}

    def price(self, model: str) -> tuple[float, float] | None:
        found = self._found.get(model, ...)
        if found is ...:
            found = next((p for prefix, p in self._prefixes if model.startswith(prefix)), None)
            if len(self._found) < 4096:
                self._found[model] = found
        return found if isinstance(found, tuple) else None

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int) -> float | None:
        price = self.price(model)
        if price is None:
            return None
        return (prompt_tokens * price[0] + completion_tokens * price[1]) / 1_000_000
