from __future__ import annotations

from typing import Any

import pytest
from openai.types.chat import ChatCompletionMessage

from aiollmcache import EXCLUDED_PARAMS, InvalidRequestError
from aiollmcache.request import build_chat_request, system_text

BASE = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is Python?"}]


def key(messages: Any = BASE, **params: Any) -> str:
    return build_chat_request(messages, params, default_model="m").key


def test_key_is_128_bit_hex() -> None:
    k = key()
    assert len(k) == 32
    int(k, 16)


def test_argument_and_dict_order_do_not_change_the_key() -> None:
    a = build_chat_request(BASE, {"temperature": 0, "top_p": 1, "model": "m"}, default_model=None).key
    b = build_chat_request(BASE, {"model": "m", "top_p": 1, "temperature": 0}, default_model=None).key
    reordered = [{"content": m["content"], "role": m["role"]} for m in BASE]
    c = build_chat_request(reordered, {"top_p": 1, "model": "m", "temperature": 0}, default_model=None).key
    assert a == b == c


def test_numbers_are_normalised() -> None:
    assert key(temperature=1) == key(temperature=1.0)
    assert key(max_tokens=100) == key(max_tokens=100.0)
    assert key(temperature=0.5) != key(temperature=0.6)


def test_default_model_and_explicit_model_agree() -> None:
    assert key() == build_chat_request(BASE, {"model": "m"}, default_model="other").key


@pytest.mark.parametrize(
    "change",
    [
        {"model": "other"},
        {"temperature": 0.7},
        {"top_p": 0.5},
        {"seed": 1},
        {"max_tokens": 10},
        {"n": 2},
        {"stop": ["\n"]},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
        {"tool_choice": "none"},
        {"response_format": {"type": "json_object"}},
        {"unknown_param": 1},
        {"extra_body": {"x": 1}},
    ],
)
def test_answer_changing_params_change_the_key(change: dict[str, Any]) -> None:
    assert key(**change) != key()


def test_messages_change_the_key() -> None:
    other_system = [{"role": "system", "content": "You are verbose."}, BASE[1]]
    assert key(other_system) != key()
    assert key(BASE[1:]) != key()
    assert key([*BASE, {"role": "assistant", "content": "x"}, BASE[1]]) != key()


@pytest.mark.parametrize("name", sorted(EXCLUDED_PARAMS))
def test_excluded_params_stay_out_of_the_key_but_are_sent(name: str) -> None:
    req = build_chat_request(BASE, {name: {"a": "b"} if name != "timeout" else 5.0}, default_model="m")
    assert req.key == key()
    assert name in req.params


def test_none_param_is_the_same_as_absent() -> None:
    assert key(temperature=None) == key()


def test_sdk_omit_sentinel_is_left_out() -> None:
    from openai import NOT_GIVEN, omit

    req = build_chat_request(BASE, {"temperature": NOT_GIVEN, "seed": omit}, default_model="m")
    assert req.key == key()
    assert "temperature" not in req.params and "seed" not in req.params


def test_sdk_message_objects_are_accepted() -> None:
    reply = ChatCompletionMessage(role="assistant", content="Hi")
    as_dict = [*BASE, {"role": "assistant", "content": "Hi"}]
    assert key([*BASE, reply]) == key(as_dict)


def test_message_from_a_parsed_response_keys_like_its_dict() -> None:
    # A response's message carries refusal=None (and more) when the server sent them.
    reply = ChatCompletionMessage.model_validate(
        {"role": "assistant", "content": "Hi", "refusal": None, "tool_calls": None}
    )
    assert key([*BASE, reply]) == key([*BASE, {"role": "assistant", "content": "Hi"}])
    assert key([*BASE, {"role": "assistant", "content": "Hi", "name": None}]) == key(
        [*BASE, {"role": "assistant", "content": "Hi"}]
    )


def test_large_numbers_keep_their_exact_value() -> None:
    assert key(seed=2**63) != key(seed=2**63 + 1)
    # beyond 2**53 a float is not turned into an int (it may not be one exactly)
    assert key(max_tokens=1e20) != key(max_tokens=1e19)
    assert key(max_tokens=2.0**53) == key(max_tokens=2**53)


def test_assistant_with_tool_calls_may_have_no_content() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    msgs = [*BASE, {"role": "assistant", "content": None, "tool_calls": [call]}]
    build_chat_request(msgs, {}, default_model="m")


@pytest.mark.parametrize(
    ("messages", "params", "fragment"),
    [
        ([], {}, "messages"),
        ("hello", {}, "messages"),
        (None, {}, "messages"),
        ([["user", "hi"]], {}, "messages[0]"),
        ([{"content": "hi"}], {}, "messages[0].role"),
        ([{"role": "robot", "content": "hi"}], {}, "messages[0].role"),
        ([{"role": "user"}], {}, "messages[0].content"),
        ([{"role": "user", "content": 42}], {}, "messages[0].content"),
        ([{"role": "user", "content": []}], {}, "messages[0].content"),
        ([{"role": "user", "content": [{"text": "no type"}]}], {}, "messages[0].content[0]"),
        ([{"role": "assistant", "content": None}], {}, "messages[0].content"),
        ([{"role": "user", "content": "hi", "name": object()}], {}, "messages[0].name"),
        ([{"role": ["user"], "content": "hi"}], {}, "messages[0].role"),
        ([{"role": "user", "content": "hi", 1: "x"}], {}, "messages[0]: key 1"),
        (BASE, {"temperature": float("nan")}, "temperature"),
        (BASE, {"temperature": float("inf")}, "temperature"),
        (BASE, {"tools": [{"f": {1, 2}}]}, "tools[0].f"),
        (BASE, {"logit_bias": {1: 2}}, "logit_bias"),
        (BASE, {"model": ""}, "model"),
        (BASE, {"model": 3}, "model: expected a non-empty string"),
        (BASE, {"seed": 2**64}, "seed: .* out of the 64-bit integer range"),
        (BASE, {"logit_bias": {"1": -(2**63) - 1}}, "logit_bias.1"),
    ],
)
def test_bad_input_is_rejected_naming_the_problem(
    messages: Any, params: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(InvalidRequestError, match=fragment.replace("[", r"\[").replace("]", r"\]")) as info:
        build_chat_request(messages, params, default_model="m")
    assert isinstance(info.value, ValueError)


def test_missing_model_is_rejected() -> None:
    with pytest.raises(InvalidRequestError, match="model"):
        build_chat_request(BASE, {}, default_model=None)


@pytest.mark.parametrize("depth", [300, 5000])
def test_absurd_nesting_is_an_invalid_request(depth: int) -> None:
    nested: Any = "x"
    for _ in range(depth):
        nested = [nested]
    with pytest.raises(InvalidRequestError, match=r"nested|serialisable"):
        build_chat_request(BASE, {"tools": nested}, default_model="m")


def test_upstream_scope_is_part_of_the_key() -> None:
    a = build_chat_request(BASE, {}, default_model="m", upstream_scope="https://a.example/v1").key
    b = build_chat_request(BASE, {}, default_model="m", upstream_scope="https://b.example/v1").key
    assert a != b != key()


def test_system_text_joins_system_and_developer_messages() -> None:
    messages = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi"},
        {"role": "developer", "content": [{"type": "text", "text": "No emoji."}, {"type": "image_url"}]},
    ]
    assert system_text(messages) == "Be terse.\nNo emoji."
    assert system_text([{"role": "user", "content": "Hi"}]) == ""
