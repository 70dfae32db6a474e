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
from collections.abc import Iterator, Mapping
from typing import Any, Final

import orjson
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter, ValidationError

from .errors import InvalidResponseError, StreamInterruptedError

__all__ = ["assemble_response", "parse_event", "parse_event_json", "parse_response", "replay_response"]

_EVENT: Final[TypeAdapter[ResponseStreamEvent]] = TypeAdapter(ResponseStreamEvent)
_FINAL_EVENTS: Final = frozenset({"response.completed", "response.incomplete", "response.failed"})
_WORDS: Final = re.compile(r"\S+\s*|\s+")


def parse_response(body: bytes | Mapping[str, Any]) -> tuple[bytes, Response]:
    """The JSON bytes and the validated ``Response``, or InvalidResponseError."""
    try:
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        response = Response.model_validate_json(raw)
    except (TypeError, ValidationError) as exc:
        raise InvalidResponseError(f"upstream returned something that is not a Response: {exc}") from exc
    return raw, response


def parse_event(data: Mapping[str, Any]) -> Any:
    """A streamed event as the SDK types it; InvalidResponseError if it is not one."""
    try:
        return _EVENT.validate_python(data)
    except ValidationError as exc:
        raise InvalidResponseError(
            f"upstream streamed something that is not a Responses event: {exc}"
        ) from exc


def parse_event_json(data: bytes) -> Any:
    return _EVENT.validate_json(data)


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
