"""The Responses API's cache key, and which requests depend on state the
provider holds: tables, no I/O."""

from __future__ import annotations

from typing import Any

import pytest

from aiollmcache.request import build_chat_request, build_response_request, provider_state

from .conftest import MODEL, user

TOOL = {"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {}}}


def key(**params: Any) -> str:
    return build_response_request({"model": MODEL, **params}, default_model=None).key


BASE: dict[str, Any] = {"input": "What is Python?", "instructions": "Be brief."}


@pytest.mark.parametrize(
    "change",
    [
        {"input": "What is Rust?"},
        {"input": [{"role": "user", "content": "What is Python?"}]},
        {"instructions": "Be thorough."},
        {"instructions": None},
        {"model": "other-model"},
        {"tools": [TOOL]},
        {"text": {"format": {"type": "json_object"}}},
        {"reasoning": {"effort": "high"}},
        {"include": ["message.output_text.logprobs"]},
        {"temperature": 0.2},
        {"max_output_tokens": 50},
        {"tool_choice": "required"},
        {"truncation": "auto"},
    ],
)
def test_the_key_covers_what_changes_the_answer(change: dict[str, Any]) -> None:
    assert key(**{**BASE, **change}) != key(**BASE)


@pytest.mark.parametrize(
    "change",
    [
        {"store": False},
        {"metadata": {"team": "a"}},
        {"user": "u-1"},
        {"safety_identifier": "s-1"},
        {"prompt_cache_key": "pk"},
        {"service_tier": "flex"},
        {"stream_options": {"include_obfuscation": False}},
    ],
)
def test_the_key_leaves_out_what_does_not(change: dict[str, Any]) -> None:
    assert key(**{**BASE, **change}) == key(**BASE)


def test_a_responses_key_never_equals_a_chat_key() -> None:
    chat = build_chat_request(user("same"), {"model": MODEL}, default_model=None)
    assert key(input=user("same")) != chat.key
    # Not even a chat request that carries the Responses parameters.
    mimic = build_chat_request(user("same"), {"model": MODEL, "input": user("same")}, default_model=None)
    assert (
        build_response_request(
            {"model": MODEL, "input": user("same"), "messages": user("same")}, default_model=None
        ).key
        != mimic.key
    )
    assert key(input="x", temperature=1) == key(input="x", temperature=1.0)


@pytest.mark.parametrize(
    ("params", "state"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"background": True}, "background"),
        ({"tools": [{"type": "web_search"}]}, "tools: web_search"),
        ({"tools": [TOOL, {"type": "file_search", "vector_store_ids": ["vs"]}]}, "tools: file_search"),
        ({"tools": [TOOL]}, None),
        ({"extra_body": {"conversation": "conv_1"}}, "conversation"),
        ({"extra_body": {"tools": [{"type": "web_search"}]}}, "tools: web_search"),
        ({"tools": [{"type": "custom", "name": "grammar"}]}, None),
        ({}, None),
    ],
)
def test_what_depends_on_provider_state(params: dict[str, Any], state: str | None) -> None:
    assert provider_state({"input": "x", **params}) == state


def test_items_key_alike_as_sdk_objects_and_as_their_dumps() -> None:
    from openai.types.responses import ResponseFunctionToolCall

    call = ResponseFunctionToolCall(type="function_call", call_id="c1", name="f", arguments="{}", id="fc1")
    result = {"type": "function_call_output", "call_id": "c1", "output": "sunny"}
    ask = {"role": "user", "content": "weather?"}
    as_object = key(input=[ask, call, result])
    assert key(input=[ask, call.model_dump(), result]) == as_object
    assert key(input=[ask, {**call.model_dump(), "status": None}, result]) == as_object
    assert key(input=[ask, {**call.model_dump(), "arguments": '{"a": 1}'}, result]) != as_object


def test_defaults_and_shapes() -> None:
    assert build_response_request({"input": "x", "model": None}, default_model=MODEL).model == MODEL
    prompt_only = build_response_request({"prompt": {"id": "pmpt_1"}}, default_model=None)
    assert "model" not in prompt_only.params
    assert provider_state({"input": [{"type": "item_reference", "id": "msg_1"}]}) == "input: item_reference"
