"""The cache policy's decisions as tables: what an answer is, what each
policy refuses, which requests sample, and the errors for bad settings."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
import pytest
from openai.types.chat import ChatCompletion

from aiollmcache import CacheControl, CachePolicy, ConfigurationError, InvalidRequestError, LLMCache
from aiollmcache.cache_policy import AnswerKind, classify, classify_raw, is_sampled, sample_key
from aiollmcache.testing import chat_completion

from .conftest import MODEL


def completion(**choice: Any) -> dict[str, Any]:
    message = {"role": "assistant", "content": "hello", **choice.pop("message", {})}
    body = chat_completion("x", model=MODEL)
    body["choices"] = [{"index": 0, "logprobs": None, "finish_reason": "stop", **choice, "message": message}]
    return body


TOOL_CALL = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        (completion(), AnswerKind.ANSWER),
        ({**completion(), "choices": []}, AnswerKind.EMPTY),
        (completion(message={"content": ""}), AnswerKind.EMPTY),
        (completion(message={"content": None, "refusal": "I can't help with that"}), AnswerKind.ANSWER),
        (completion(finish_reason="length"), AnswerKind.TRUNCATED),
        (completion(finish_reason="content_filter", message={"content": ""}), AnswerKind.CONTENT_FILTER),
        (completion(finish_reason="tool_calls", message={"content": None, "tool_calls": TOOL_CALL}), "tool"),
        (completion(finish_reason="length", message={"tool_calls": TOOL_CALL}), AnswerKind.TRUNCATED),
        # "length" in the text is not a finish reason (found by the quick scan, then parsed)
        (completion(message={"content": "the length of a tool_calls list"}), AnswerKind.ANSWER),
    ],
)
def test_what_an_answer_is(body: dict[str, Any], kind: AnswerKind | str) -> None:
    expected = AnswerKind.TOOL_CALLS if kind == "tool" else kind
    response = ChatCompletion.model_validate(body)
    assert classify(response) is expected
    # Read back from the cache, where an empty answer is never stored, the
    # quick scan takes one without a marker as an answer, unparsed.
    stored = AnswerKind.ANSWER if expected is AnswerKind.EMPTY else expected
    assert classify_raw(orjson.dumps(body)) is stored


@pytest.mark.parametrize(
    ("policy", "refused"),
    [
        (
            CachePolicy(),
            {
                "empty": "empty",
                "content_filter": "content_filter",
                "truncated": "truncated",
                "tool_calls": None,
            },
        ),
        (CachePolicy(store_truncated=True), {"truncated": None, "content_filter": "content_filter"}),
        (CachePolicy(tool_calls=False), {"tool_calls": "tool_calls", "answer": None}),
    ],
)
def test_what_each_policy_refuses(policy: CachePolicy, refused: Mapping[str, str | None]) -> None:
    assert policy.refusal(AnswerKind.ANSWER) is None
    for kind, reason in refused.items():
        assert policy.refusal(AnswerKind(kind)) == reason


@pytest.mark.parametrize(
    ("params", "sampled"),
    [
        ({}, True),  # the API's default temperature is 1
        ({"temperature": 0.7}, True),
        ({"temperature": 0}, False),
        ({"temperature": 0.0}, False),
        ({"temperature": 0.7, "seed": 42}, False),
        ({"seed": 0}, False),
        ({"temperature": None}, True),
    ],
)
def test_which_requests_sample(params: dict[str, Any], sampled: bool) -> None:
    assert is_sampled(params) is sampled
    assert CachePolicy(samples=4).bucket(params) == (4 if sampled else 1)
    assert CachePolicy().bucket(params) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"samples": 0}, "samples"),
        ({"samples": 17}, "samples"),
        ({"samples": True}, "samples"),
        ({"samples": 2.0}, "samples"),
        ({"store_truncated": 1}, "store_truncated"),
        ({"tool_calls": "no"}, "tool_calls"),
        ({"should_store": "yes"}, "should_store"),
        ({"cacheable": 3}, "cacheable"),
    ],
)
def test_bad_policies_are_refused_by_name(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        CachePolicy(**kwargs)


def test_bad_policy_arguments() -> None:
    with pytest.raises(ConfigurationError, match="policy"):
        LLMCache(policy={"samples": 3})  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="random_seed"):
        LLMCache(random_seed="7")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match=r"CacheControl\.policy"):
        CacheControl(policy=True)  # type: ignore[arg-type]


def test_sample_keys_are_cache_keys_of_their_own() -> None:
    key = "0123456789abcdef0123456789abcdef"
    keys = [sample_key(key, i) for i in range(16)]
    assert keys[0] == key and len(set(keys)) == 16
    assert all(len(k) == 32 and int(k, 16) >= 0 for k in keys)


def test_async_predicates_are_refused() -> None:
    async def cacheable(request: Mapping[str, Any]) -> bool:
        return False

    class Checker:
        async def __call__(self, request: Mapping[str, Any], response: ChatCompletion) -> bool:
            return False

    with pytest.raises(ConfigurationError, match="not an async one"):
        CachePolicy(cacheable=cacheable)
    with pytest.raises(ConfigurationError, match="not an async one"):
        CachePolicy(should_store=Checker())
    assert CachePolicy.verdict(0, "cacheable") is False
    coroutine = cacheable({})
    with pytest.raises(ConfigurationError, match="returned an awaitable"):
        CachePolicy.verdict(coroutine, "cacheable")
    assert coroutine.cr_frame is None  # closed: no "never awaited" warning
