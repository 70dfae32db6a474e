"""Properties of request validation and keys, over generated requests.

- A malformed request raises InvalidRequestError (and nothing else).
- A valid request has a stable key: the same for equal requests however they
  are written (dict order, 1 vs 1.0, None fields), different when a field
  that changes the answer differs.
"""

from __future__ import annotations

import asyncio
import math
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from aiollmcache import InvalidRequestError, LLMCache
from aiollmcache.request import EXCLUDED_PARAMS, VALID_ROLES, build_chat_request

MODEL = "m"
text = st.text(max_size=40)
roles = st.sampled_from(sorted(VALID_ROLES - {"assistant"}))
messages = st.lists(st.fixed_dictionaries({"role": roles, "content": text}), min_size=1, max_size=4)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63),
    st.floats(allow_nan=False, allow_infinity=False),
    text,
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(text, inner, max_size=3)),
    max_leaves=8,
)
param_names = st.sampled_from(
    ["temperature", "top_p", "seed", "max_tokens", "stop", "n", "response_format", "x_custom"]
)
params = st.dictionaries(param_names, json_values, max_size=4)


def key(msgs: Any, prms: dict[str, Any]) -> str:
    return build_chat_request(msgs, prms, default_model=MODEL).key


def shuffled(value: Any, rng: random.Random) -> Any:
    """The same JSON value written differently: dict order shuffled, integral
    floats as ints."""
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {k: shuffled(v, rng) for k, v in items}
    if isinstance(value, list):
        return [shuffled(v, rng) for v in value]
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


@given(messages, params, st.randoms(use_true_random=False))
def test_equal_requests_have_equal_keys(msgs: Any, prms: dict[str, Any], rng: random.Random) -> None:
    first = key(msgs, prms)
    assert len(first) == 32 and all(c in "0123456789abcdef" for c in first)
    assert key(shuffled(msgs, rng), shuffled(prms, rng)) == first
    # Parameters that do not change the answer stay out of the key.
    assert key(msgs, {**prms, "user": "someone", "metadata": {"a": "b"}, "timeout": 3}) == first
    # A None parameter or message field counts as absent.
    assert key([{**m, "name": None} for m in msgs], {**prms, "logprobs": None}) == first


@given(
    messages, params, st.sampled_from(["temperature", "seed", "model", "content", "role", "extra message"])
)
def test_a_field_that_changes_the_answer_changes_the_key(msgs: Any, prms: dict[str, Any], field: str) -> None:
    first = key(msgs, prms)
    changed_msgs, changed_params = [dict(m) for m in msgs], dict(prms)
    if field == "temperature":
        changed_params["temperature"] = (
            (prms.get("temperature") or 0) + 0.5
            if isinstance(prms.get("temperature"), (int, float))
            and not isinstance(prms.get("temperature"), bool)
            else 0.123
        )
    elif field == "seed":
        changed_params["seed"] = 7 if prms.get("seed") != 7 else 8
    elif field == "model":
        changed_params["model"] = "another-model"
    elif field == "content":
        changed_msgs[-1]["content"] += " (changed)"
    elif field == "role":
        changed_msgs[-1]["role"] = "user" if msgs[-1]["role"] != "user" else "system"
    else:
        changed_msgs.append({"role": "user", "content": "one more"})
    assume(changed_params != prms or changed_msgs != msgs)
    assert key(changed_msgs, changed_params) != first


class Unserialisable:
    pass


bad_messages = st.one_of(
    st.just([]),
    st.none(),
    text,
    st.integers(),
    st.lists(st.one_of(st.none(), st.integers(), text), min_size=1, max_size=3),
    st.lists(st.fixed_dictionaries({"content": text}), min_size=1, max_size=2),  # no role
    st.lists(
        st.fixed_dictionaries({"role": text.filter(lambda r: r not in VALID_ROLES), "content": text}),
        min_size=1,
    ),
    st.lists(
        st.fixed_dictionaries({"role": roles, "content": st.one_of(st.integers(), st.booleans())}), min_size=1
    ),
    st.lists(st.fixed_dictionaries({"role": roles}), min_size=1),  # no content
)
bad_values = st.one_of(
    st.just(math.nan),
    st.just(math.inf),
    st.just(-math.inf),
    st.integers(min_value=2**64),
    st.integers(max_value=-(2**63) - 1),
    st.builds(Unserialisable),
    st.builds(set),
    st.binary(min_size=1),
    st.dictionaries(st.integers(), text, min_size=1),
)


@given(bad_messages, params)
def test_malformed_messages_raise_invalid_request_error(msgs: Any, prms: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequestError):
        build_chat_request(msgs, prms, default_model=MODEL)


@given(messages, params, param_names.filter(lambda n: n not in EXCLUDED_PARAMS), bad_values)
def test_unserialisable_parameters_raise_invalid_request_error(
    msgs: Any, prms: dict[str, Any], name: str, bad: Any
) -> None:
    with pytest.raises(InvalidRequestError):
        build_chat_request(msgs, {**prms, name: [bad]}, default_model=MODEL)


@settings(max_examples=30, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(bad_messages.map(lambda m: (m, {})), st.tuples(messages, bad_values.map(lambda v: {"seed": v})))
)
def test_complete_rejects_them_before_any_io(case: tuple[Any, dict[str, Any]]) -> None:
    msgs, prms = case

    async def attempt() -> None:
        # Nothing listens there: any I/O would show as a Redis error.
        cache = LLMCache(redis_url="redis://127.0.0.1:1/0", upstream=_never_called, model=MODEL)
        try:
            with pytest.raises(InvalidRequestError):
                await cache.complete(msgs, **prms)
            assert cache.stats()["redis_errors"] == 0 and cache.stats()["requests"] == 0
        finally:
            await cache.aclose()

    asyncio.run(attempt())


async def _never_called(params: dict[str, Any]) -> dict[str, Any]:
    raise AssertionError("upstream called for a malformed request")
