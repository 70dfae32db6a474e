"""The Responses API (``client.responses.create``): its answers and its stream events.

A stored ``Response`` is replayed as the events the API streams for it:
``response.created``, ``response.in_progress``, then per output item
``response.output_item.added``, its content (``response.content_part.added``,
``response.output_text.delta`` word by word, ``response.output_text.done``,
``response.content_part.done``; for a function call
``response.function_call_arguments.delta`` and ``.done``) and
``response.output_item.done``, and last ``response.completed`` (or
``response.incomplete``) carrying the whole response, every event numbered by
``sequence_number``. A streamed answer is assembled from its last event,
which carries the whole response.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, Final, Union, cast

import orjson
from openai._models import construct_type
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import Field, TypeAdapter, ValidationError

from .errors import InvalidResponseError, StreamInterruptedError

__all__ = [
    "ECHOED_FIELDS",
    "assemble_response",
    "parse_event",
    "parse_event_json",
    "parse_response",
    "replay_response",
    "strip_event",
]

# The SDK's event union, validated by its "type" (pydantic then checks one
# member, not 59: ~1 us an event instead of ~37).
_MEMBERS: Final = typing.get_args(typing.get_args(ResponseStreamEvent)[0])
_EVENT: Final[TypeAdapter[Any]] = TypeAdapter(
    cast(Any, Annotated[Union[_MEMBERS], Field(discriminator="type")])  # noqa: UP007
)
_FINAL_EVENTS: Final = frozenset({"response.completed", "response.incomplete", "response.failed"})
_WORDS: Final = re.compile(r"\S+\s*|\s+")

ECHOED_FIELDS: Final = (
    "metadata",
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "prompt_cache_options",
    "service_tier",
)
"""Request bookkeeping a ``Response`` echoes: out of the key, so not kept in
the cache either (one caller's metadata is no other caller's business)."""


def _without_echo(body: dict[str, Any]) -> dict[str, Any]:
    for name in ECHOED_FIELDS:
        if body.get(name) is not None:
            body[name] = None
    return body


def parse_response(body: bytes | Mapping[str, Any]) -> tuple[bytes, Response, bool]:
    """The JSON bytes (without the echoed bookkeeping), the ``Response`` and
    whether it passed validation. One the SDK would accept but validation
    does not (a field this SDK requires missing, a type it does not know) is
    built as the SDK builds it, leniently, and comes back with False: the
    caller gets it, the cache does not keep it. InvalidResponseError for
    anything that is not a response at all."""
    try:
        data = orjson.loads(body) if isinstance(body, (bytes, bytearray, memoryview)) else dict(body)
    except (TypeError, ValueError) as exc:
        raise InvalidResponseError(f"upstream returned something that is not a Response: {exc}") from exc
    if not isinstance(data, dict) or data.get("object", "response") != "response" or "output" not in data:
        raise InvalidResponseError("upstream returned something that is not a Response")
    raw = orjson.dumps(_without_echo(data))
    try:
        return raw, Response.model_validate_json(raw), True
    except ValidationError:
        return raw, cast(Response, construct_type(type_=Response, value=data)), False


def strip_event(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """A streamed event without the echoed bookkeeping in the response it carries."""
    response = data.get("response")
    if isinstance(response, Mapping) and any(response.get(name) is not None for name in ECHOED_FIELDS):
        return {**data, "response": _without_echo(dict(response))}
    return data


def parse_event(data: Mapping[str, Any]) -> Any:
    """A streamed event as the SDK types it. One that does not validate (a
    type this SDK does not know yet) is built as the SDK builds it."""
    if not isinstance(data.get("type"), str):
        raise InvalidResponseError(
            f"upstream streamed something that is not a Responses event: {data!r:.200}"
        )
    try:
        return _EVENT.validate_python(data)
    except ValidationError:
        return construct_type(type_=ResponseStreamEvent, value=data)


def parse_event_json(data: bytes) -> Any:
    try:
        return _EVENT.validate_json(data)
    except ValidationError:
        return construct_type(type_=ResponseStreamEvent, value=orjson.loads(data))


def assemble_response(events: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The whole response a stream of events ended with; StreamInterruptedError
    when it ended before its last event."""
    for event in reversed(events):
        if event.get("type") in _FINAL_EVENTS and isinstance(event.get("response"), Mapping):
            return dict(event["response"])
    raise StreamInterruptedError("the model's stream ended before its response.completed event")


def replay_response(response: Response) -> Iterator[dict[str, Any]]:
    """The stream events of ``response``, as the API sends them."""
    whole = response.model_dump(mode="json", exclude_unset=True)
    sequence = 0

    def event(kind: str, **fields: Any) -> dict[str, Any]:
        nonlocal sequence
        sequence += 1
        return {"type": kind, "sequence_number": sequence - 1, **fields}

    started = {**whole, "status": "in_progress", "output": []}
    started.pop("usage", None)
    yield event("response.created", response=started)
    yield event("response.in_progress", response=started)
    for index, item in enumerate(whole.get("output") or ()):
        kind = item.get("type")
        if kind == "message":
            yield event(
                "response.output_item.added",
                output_index=index,
                item={**item, "content": [], "status": "in_progress"},
            )
            for part_index, part in enumerate(item.get("content") or ()):
                position = {"item_id": item.get("id", ""), "output_index": index, "content_index": part_index}
                if part.get("type") == "output_text":
                    empty = {**part, "text": "", "annotations": []}
                    yield event("response.content_part.added", **position, part=empty)
                    for piece in _WORDS.findall(part.get("text") or ""):
                        yield event("response.output_text.delta", **position, delta=piece, logprobs=[])
                    yield event(
                        "response.output_text.done", **position, text=part.get("text") or "", logprobs=[]
                    )
                else:
                    yield event("response.content_part.added", **position, part=part)
                yield event("response.content_part.done", **position, part=part)
        elif kind == "function_call":
            yield event(
                "response.output_item.added",
                output_index=index,
                item={**item, "arguments": "", "status": "in_progress"},
            )
            position = {"item_id": item.get("id", ""), "output_index": index}
            arguments = item.get("arguments") or ""
            yield event("response.function_call_arguments.delta", **position, delta=arguments)
            yield event(
                "response.function_call_arguments.done",
                **position,
                arguments=arguments,
                name=item.get("name"),
            )
        else:
            yield event("response.output_item.added", output_index=index, item=item)
        yield event("response.output_item.done", output_index=index, item=item)
    final = "response.incomplete" if whole.get("status") == "incomplete" else "response.completed"
    yield event(final, response=whole)
