"""Validating a chat request and deriving its cache key.

The key is the blake2b-128 digest of the canonical request: the upstream's
base URL (when it has one), the model, the whole message array and every
parameter that can change the answer, encoded
by orjson with sorted keys after normalising numbers (``1.0`` and ``1`` are the
same temperature). Parameters that only affect transport, billing or
bookkeeping (:data:`EXCLUDED_PARAMS`) stay out of the key but are still sent
to the model. Parameters the cache does not know are kept in the key: an
unknown parameter is assumed to change the answer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from hashlib import blake2b
from typing import Any

import orjson

from .errors import InvalidRequestError

__all__ = [
    "EXCLUDED_PARAMS",
    "VALID_ROLES",
    "ChatRequest",
    "SemanticQuery",
    "build_chat_request",
    "build_response_request",
    "provider_state",
    "request_system",
    "semantic_query",
    "system_text",
]

VALID_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})

EXCLUDED_PARAMS = frozenset(
    {
        # who asks and how the call travels
        "user",
        "safety_identifier",
        "timeout",
        "extra_headers",
        "extra_query",
        # how the answer is delivered, not what it is
        "stream",
        "stream_options",
        "service_tier",
        # provider-side bookkeeping and prompt caching
        "metadata",
        "store",
        "prompt_cache_key",
        "prompt_cache_retention",
        "prompt_cache_options",
    }
)

_KEY_DIGEST_BYTES = 16
_RESPONSES_DOMAIN = b"responses\0"
_JSON_INT_MIN = -(2**63)  # what orjson (and the API) can carry
_JSON_INT_MAX = 2**64 - 1
_EXACT_FLOAT_INT = 2**53


@dataclass(slots=True)
class ChatRequest:
    """A validated chat request.

    ``params`` is what is sent upstream (model and messages included); ``key``
    is the hex digest of the canonical form, or of one sample of it when
    ``sampled`` (an answer of a sample bucket: kept out of the semantic tier).
    """

    model: str
    params: dict[str, Any]
    key: str
    sampled: bool = False
    api: str = "chat"  # or "responses": client.responses.create
    # Responses only: why the answer depends on state the provider holds (see provider_state).
    state: str | None = None


def _is_model(value: object) -> bool:
    return hasattr(value, "model_dump") and callable(value.model_dump)


def _dump_model(value: Any) -> Any:
    return value.model_dump(mode="json", exclude_unset=True, by_alias=True)


def _canon(value: Any, path: str) -> Any:
    """Return ``value`` in canonical JSON form, or raise naming ``path``."""
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return value
    if isinstance(value, str):  # a str subclass (e.g. a StrEnum member)
        return str(value)
    if isinstance(value, int):
        if not _JSON_INT_MIN <= value <= _JSON_INT_MAX:
            raise InvalidRequestError(f"{path}: {value} is out of the 64-bit integer range")
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidRequestError(f"{path}: {value!r} is not a finite number")
        # 1.0 and 1 are the same value; only where the float is exact as an int.
        return int(value) if value.is_integer() and abs(value) <= _EXACT_FLOAT_INT else value
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise InvalidRequestError(f"{path}: key {k!r} is not a string")
            out[k] = _canon(v, f"{path}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_canon(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if _is_model(value):
        return _canon(_dump_model(value), path)
    raise InvalidRequestError(f"{path}: {type(value).__name__} is not JSON-serialisable")


def _canon_message(message: Any, index: int) -> dict[str, Any]:
    path = f"messages[{index}]"
    if _is_model(message):
        message = _dump_model(message)
    if not isinstance(message, Mapping):
        raise InvalidRequestError(f"{path}: expected a dict, got {type(message).__name__}")
    role = message.get("role")
    if not isinstance(role, str) or role not in VALID_ROLES:
        raise InvalidRequestError(f"{path}.role: {role!r} is not one of {', '.join(sorted(VALID_ROLES))}")
    content = message.get("content")
    if content is None:
        has_other = any(message.get(k) for k in ("tool_calls", "function_call", "refusal", "audio"))
        if role != "assistant" or not has_other:
            raise InvalidRequestError(f"{path}.content: missing for a {role!r} message")
    elif isinstance(content, (list, tuple)):
        if not content:
            raise InvalidRequestError(f"{path}.content: empty list of content parts")
        for j, part in enumerate(content):
            if not isinstance(part, Mapping) or not isinstance(part.get("type"), str):
                raise InvalidRequestError(f"{path}.content[{j}]: a content part must be a dict with a 'type'")
    elif not isinstance(content, str):
        raise InvalidRequestError(
            f"{path}.content: expected a string or a list of parts, got {type(content).__name__}"
        )
    # A field set to None is the same message as one without it (the SDK's
    # message objects carry e.g. refusal=None).
    canon: dict[str, Any] = _canon({k: v for k, v in message.items() if v is not None}, path)
    return canon


def _is_omitted(value: object) -> bool:
    # openai's NOT_GIVEN / omit sentinels: the SDK leaves the parameter out.
    return type(value).__name__ in ("NotGiven", "Omit")


def build_chat_request(
    messages: object,
    params: Mapping[str, Any],
    *,
    default_model: str | None,
    upstream_scope: str | None = None,
) -> ChatRequest:
    """Validate ``messages`` and ``params`` and compute the cache key.

    Raises :class:`InvalidRequestError` naming the first problem found. No I/O.
    """
    try:
        return _build(messages, params, default_model, upstream_scope)
    except RecursionError:
        raise InvalidRequestError("request is nested too deeply") from None


def _build(
    messages: object, params: Mapping[str, Any], default_model: str | None, upstream_scope: str | None
) -> ChatRequest:
    if type(messages) is not list and (
        isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence)
    ):
        raise InvalidRequestError(
            f"messages: expected a non-empty list of dicts, got {type(messages).__name__}"
        )
    if not messages:
        raise InvalidRequestError("messages: expected a non-empty list of dicts, got []")
    canon_messages = []
    for index, message in enumerate(messages):
        # The common case, a plain dict of strings ({"role": ..., "content": ...}),
        # is already canonical: validate it and use it as it is.
        if type(message) is dict and type(role := message.get("role")) is str and role in VALID_ROLES:
            for name, value in message.items():
                if type(value) is not str or type(name) is not str:
                    break
            else:
                if "content" in message:
                    canon_messages.append(message)
                    continue
        canon_messages.append(_canon_message(message, index))

    model = params.get("model")
    if model is None or (type(model) is not str and _is_omitted(model)):
        model = default_model
        if model is None:
            raise InvalidRequestError("model: missing; pass model= or set LLMCache(model=...)")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError(f"model: expected a non-empty string, got {model!r}")

    send: dict[str, Any] = {"model": model, "messages": canon_messages}
    keyed: dict[str, Any] = {"model": model, "messages": canon_messages}
    if upstream_scope:
        # Two providers may serve different models under one name.
        keyed["@upstream"] = upstream_scope
    for name, value in params.items():
        if name in ("model", "messages") or _is_omitted(value):
            continue
        if name in EXCLUDED_PARAMS:
            send[name] = value
            continue
        canon = _canon(value, name)
        send[name] = value
        if canon is not None:
            keyed[name] = canon
    try:
        canonical = orjson.dumps(keyed, option=orjson.OPT_SORT_KEYS)
    except TypeError as exc:  # e.g. nested deeper than orjson allows
        raise InvalidRequestError(f"request is not JSON-serialisable: {exc}") from None
    digest = blake2b(canonical, digest_size=_KEY_DIGEST_BYTES)
    return ChatRequest(model=model, params=send, key=digest.hexdigest())


def build_response_request(
    params: Mapping[str, Any], *, default_model: str | None, upstream_scope: str | None = None
) -> ChatRequest:
    """Validate a Responses API request (``client.responses.create``
    parameters) and compute its cache key: the canonical form of ``input``
    (a string or a list of items), ``instructions``, the model and every other
    parameter that can change the answer (``tools``, ``text``, ``reasoning``,
    ``include``...), marked as a Responses request so it never shares a key
    with a chat request. :data:`EXCLUDED_PARAMS` (``store``, ``metadata``,
    ``user``, ``safety_identifier``, ``prompt_cache_key``...) stay out.

    Raises :class:`InvalidRequestError` naming the first problem found. No I/O.
    """
    try:
        return _build_response(params, default_model, upstream_scope)
    except RecursionError:
        raise InvalidRequestError("request is nested too deeply") from None


def _build_response(
    params: Mapping[str, Any], default_model: str | None, upstream_scope: str | None
) -> ChatRequest:
    given = {name: value for name, value in params.items() if value is not None and not _is_omitted(value)}
    value = given.get("input")
    if value is None and given.get("prompt") is None:
        raise InvalidRequestError("input: missing; pass input= (a string or a list of items)")
    if value == "":
        raise InvalidRequestError("input: empty string")
    tools = given.get("tools")
    if tools is not None and not isinstance(tools, (list, tuple)):
        raise InvalidRequestError(f"tools: expected a list of tools, got {type(tools).__name__}")
    if value is not None:
        if isinstance(value, (list, tuple)):
            if not value:
                raise InvalidRequestError("input: expected a string or a non-empty list of items, got []")
            for index, item in enumerate(value):
                if not (isinstance(item, Mapping) or _is_model(item)):
                    raise InvalidRequestError(
                        f"input[{index}]: expected an item (a dict), got {type(item).__name__}"
                    )
        elif not isinstance(value, str):
            raise InvalidRequestError(
                f"input: expected a string or a list of items, got {type(value).__name__}"
            )
    instructions = given.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise InvalidRequestError(f"instructions: expected a string, got {type(instructions).__name__}")
    model = given.get("model", default_model)
    if model is None and given.get("prompt") is not None:
        model = ""  # a stored prompt may name its own model
    elif model is None:
        raise InvalidRequestError("model: missing; pass model= or set LLMCache(model=...)")
    elif not isinstance(model, str) or not model:
        raise InvalidRequestError(f"model: expected a non-empty string, got {model!r}")

    send: dict[str, Any] = {"model": model} if model else {}
    keyed: dict[str, Any] = {"model": model}
    if upstream_scope:
        keyed["@upstream"] = upstream_scope
    for name, item in given.items():
        if name == "model":
            continue
        send[name] = item
        if name in EXCLUDED_PARAMS:
            continue
        canon = _canon(item, name)
        if name == "input" and isinstance(canon, list):
            # A field set to None is the same item as one without it: an item
            # taken from a response keys like its model_dump().
            canon = _without_none(canon)
        if canon is not None:
            keyed[name] = canon
    try:
        canonical = orjson.dumps(keyed, option=orjson.OPT_SORT_KEYS)
    except TypeError as exc:
        raise InvalidRequestError(f"request is not JSON-serialisable: {exc}") from None
    # A domain of its own: no parameters of a chat request hash to a Responses key.
    digest = blake2b(_RESPONSES_DOMAIN + canonical, digest_size=_KEY_DIGEST_BYTES)
    return ChatRequest(
        model=model, params=send, key=digest.hexdigest(), api="responses", state=provider_state(given)
    )


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value


# Tools the model only asks for (the caller runs them): their results come
# back in the input, so the key covers them. Every other tool type is run by
# the provider (web search, file search, code interpreter, MCP...), whose
# results change with the world.
_CALLER_TOOLS = frozenset({"function", "custom"})


def provider_state(params: Mapping[str, Any]) -> str | None:
    """Why a Responses request's answer depends on state the provider holds
    (earlier responses, a conversation, a stored prompt, tools it runs, a
    background job), or None. Parameters sent in ``extra_body`` count too."""
    extra = params.get("extra_body")
    if isinstance(extra, Mapping):
        params = {**params, **extra}
    for name in ("previous_response_id", "conversation", "prompt"):
        if params.get(name) is not None:
            return name
    if params.get("background"):
        return "background"
    for tool in params.get("tools") or ():
        kind = tool.get("type") if isinstance(tool, Mapping) else getattr(tool, "type", None)
        if kind not in _CALLER_TOOLS:
            return f"tools: {kind}"
    items = params.get("input")
    if isinstance(items, (list, tuple)):
        for item in items:
            kind = item.get("type") if isinstance(item, Mapping) else getattr(item, "type", None)
            if kind == "item_reference":  # an item the provider holds
                return "input: item_reference"
    return None


def _response_system(params: Mapping[str, Any]) -> str:
    parts = [params["instructions"]] if isinstance(params.get("instructions"), str) else []
    items = params.get("input")
    if isinstance(items, list):
        messages = [
            _dump_model(item) if _is_model(item) else item
            for item in items
            if isinstance(item, Mapping) or _is_model(item)
        ]
        if text := system_text(messages):
            parts.append(text)
    return "\n".join(parts)


def request_system(request: ChatRequest) -> str:
    """The system prompt of a validated request (chat or Responses: its
    ``instructions`` and system and developer items)."""
    if request.api == "responses":
        return _response_system(request.params)
    return system_text(request.params["messages"])


def system_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """The text of a validated request's system and developer messages, one per
    line: what invalidation by pattern matches a system prompt against."""
    parts: list[str] = []
    for message in messages:
        if message.get("role") not in ("system", "developer"):
            continue
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):  # content parts: keep the text ones
            parts.extend(
                part["text"]
                for part in content
                if isinstance(part, Mapping) and isinstance(part.get("text"), str)
            )
    return "\n".join(parts)


@dataclass(frozen=True, slots=True)
class SemanticQuery:
    """What the semantic tier matches: ``text``, the last user message, only
    within ``partition``, the digest of everything else in the request."""

    partition: str
    text: str
    numbers: str


def semantic_query(
    request: ChatRequest, *, embedder: str, upstream_scope: str | None, min_chars: int, max_chars: int
) -> SemanticQuery | str:
    """The request's :class:`SemanticQuery`, or why it must only match exactly.

    The partition is the digest of the canonical request (as for the key)
    with the last message's content left out and the embedder's name in:
    the model, every earlier turn (the system prompt included), the last
    message's other fields and every parameter that changes the answer must
    all be equal for two requests to be compared by meaning.
    """
    params = request.params
    if request.api == "responses":
        return _response_query(request, embedder, upstream_scope, min_chars, max_chars)
    messages = params["messages"]
    last = messages[-1]
    if last.get("role") != "user":
        return "the last message is not the user's"
    for message in messages:
        if (
            message.get("role") in ("tool", "function")
            or message.get("tool_calls")
            or message.get("function_call")
        ):
            return "tool calls in the conversation"
    n = params.get("n")
    if n is not None and n != 1:
        return "n > 1"
    content = last.get("content")
    if isinstance(content, str):
        text = content
    else:
        parts = content if isinstance(content, list) else []
        if not parts or any(
            part.get("type") != "text" or not isinstance(part.get("text"), str) for part in parts
        ):
            return "content other than text"
        text = "\n".join(part["text"] for part in parts)
    length = len(text.strip())
    if length < min_chars:
        return "prompt shorter than min_chars"
    if length > max_chars:
        return "prompt longer than max_chars"
    keyed: dict[str, Any] = {
        "model": request.model,
        "messages": messages[:-1],
        "@last": {k: v for k, v in last.items() if k != "content"},
        "@embedder": embedder,
    }
    if upstream_scope:
        keyed["@upstream"] = upstream_scope
    for name, value in params.items():
        if name in ("model", "messages") or name in EXCLUDED_PARAMS or _is_omitted(value):
            continue
        canon = _canon(value, name)
        if canon is not None:
            keyed[name] = canon
    canonical = orjson.dumps(keyed, option=orjson.OPT_SORT_KEYS)
    digest = blake2b(canonical, digest_size=_KEY_DIGEST_BYTES).hexdigest()
    return SemanticQuery(digest, text, number_signature(text))


def _response_query(
    request: ChatRequest, embedder: str, upstream_scope: str | None, min_chars: int, max_chars: int
) -> SemanticQuery | str:
    """A Responses request's query: only a plain-text ``input`` (a string, or
    one user message of text) is compared by meaning."""
    params = request.params
    value = params.get("input")
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], Mapping):
        item = value[0]
        if (
            item.get("role") == "user"
            and isinstance(item.get("content"), str)
            and item.get("type", "message") == "message"
        ):
            value = item["content"]
    if not isinstance(value, str):
        return "input other than plain text"
    length = len(value.strip())
    if length < min_chars:
        return "prompt shorter than min_chars"
    if length > max_chars:
        return "prompt longer than max_chars"
    keyed: dict[str, Any] = {"model": request.model, "@embedder": embedder}
    if upstream_scope:
        keyed["@upstream"] = upstream_scope
    for name, item in params.items():
        if name in ("model", "input") or name in EXCLUDED_PARAMS:
            continue
        canon = _canon(item, name)
        if canon is not None:
            keyed[name] = canon
    canonical = orjson.dumps(keyed, option=orjson.OPT_SORT_KEYS)
    digest = blake2b(_RESPONSES_DOMAIN + canonical, digest_size=_KEY_DIGEST_BYTES).hexdigest()
    return SemanticQuery(digest, value, number_signature(value))


_NUMBER_WORDS = {
    word: str(value)
    for value, word in enumerate(
        (
            "zero",
            "_",
            "two",
            "three",
            "four",
            "five",
            "six",
            "seven",
            "eight",
            "nine",
            "ten",
            "eleven",
            "twelve",
            "thirteen",
            "fourteen",
            "fifteen",
            "sixteen",
            "seventeen",
            "eighteen",
            "nineteen",
            "twenty",
        )
    )
} | {
    "thirty": "30",
    "forty": "40",
    "fifty": "50",
    "sixty": "60",
    "seventy": "70",
    "eighty": "80",
    "ninety": "90",
    "hundred": "100",
    "thousand": "1000",
    "million": "1e6",
    "billion": "1e9",
}
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:[.,]\d+)*|[a-z]+")


def number_signature(text: str) -> str:
    """The numbers a question mentions (digits, or number words from two to
    twenty and a few round ones; not "one", mostly a pronoun), sorted: "three tips" and "3 tips" agree, "three
    tips" and "ten tips" do not. Two questions whose signatures differ are
    never matched semantically, however alike their embeddings (embeddings
    see "top 3" and "top 10" as nearly the same question)."""
    found = []
    for token in _NUMBER.findall(text.lower()):
        if token[0].isdigit() or token[0] == "-":
            found.append(token.replace(",", ""))
        elif token in _NUMBER_WORDS:
            found.append(_NUMBER_WORDS[token])
    return ",".join(sorted(found))
