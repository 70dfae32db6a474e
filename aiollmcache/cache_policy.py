"""What may be cached: which answers are stored, and which are served.

A :class:`CachePolicy` decides from the request and the response. Its
decisions, with the reasons counted in ``stats()["not_stored"]``:

- ``error``: the model's call failed or returned something that is not a chat
  completion. Never stored (not a setting).
- ``empty``: no choices, or no choice with content, tool calls, a refusal or
  audio. Never stored: an empty answer is a failure that looks like success.
- ``content_filter``: a choice was cut by the provider's content filter. Never
  stored: the filter's verdict can change, and the answer is partial.
- ``truncated``: a choice stopped at ``max_tokens`` (finish reason
  ``length``). Not stored unless ``store_truncated=True``: a later call with
  the same limit would be cut the same way, but a cut answer served as a
  whole one is a bug in the caller's hands.
- ``tool_calls``: the answer asks for tool calls. Stored by default (the key
  covers the tools offered and every earlier tool result, so a stored call is
  what the model asked for in exactly that conversation); ``tool_calls=False``
  when the call depends on the state of the world.
- ``uncacheable``: the ``cacheable(request)`` predicate said no: the request
  is neither looked up nor stored (its answer depends on external state).
- ``no_store``: the request said ``CacheControl(no_store=True)``.
- ``provider_state``: a Responses API request whose answer depends on state
  the provider holds (``previous_response_id``, ``conversation``,
  ``background``, a stored ``prompt``, tools the provider runs such as web or
  file search): neither looked up nor stored unless ``provider_state=True``.
- ``should_store``: the ``should_store(request, response)`` predicate said no
  (or raised: logged, and not stored).

A cached answer is served only if the policy in force for the request would
store it (an answer stored under another policy, or by an older version, that
this one refuses is treated as a miss). The ``should_store`` predicate is
asked at store time only.

Sampling: a request that samples (``temperature`` above 0, or not given,
which the API takes as 1, and no ``seed``) is answered from the cache like any
other by default. With ``samples=K`` (2 to :data:`MAX_SAMPLES`), its key holds
a bucket of up to K answers: calls fill the bucket, each with a new answer from
the model, and once it is full each call is served one of the K at random.
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from hashlib import blake2b
from typing import Any, Final

import orjson
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

from .errors import ConfigurationError

__all__ = [
    "DEFAULT_POLICY",
    "MAX_SAMPLES",
    "NOT_STORED_REASONS",
    "AnswerKind",
    "CachePolicy",
    "classify",
    "classify_raw",
    "is_sampled",
    "sample_key",
]

MAX_SAMPLES: Final = 16
"""The largest sample bucket: invalidating a key also drops its samples, so
their number is bounded."""

NOT_STORED_REASONS: Final = (
    "error",
    "empty",
    "content_filter",
    "truncated",
    "tool_calls",
    "uncacheable",
    "no_store",
    "should_store",
    "provider_state",
)

RequestPredicate = Callable[[Mapping[str, Any]], bool]
StorePredicate = Callable[[Mapping[str, Any], Any], bool]


class AnswerKind(enum.StrEnum):
    """What a chat completion is, as far as caching goes."""

    ANSWER = "answer"
    EMPTY = "empty"
    CONTENT_FILTER = "content_filter"
    TRUNCATED = "truncated"
    TOOL_CALLS = "tool_calls"


def _kind(choices: Sequence[tuple[object, bool, bool]]) -> AnswerKind:
    """From each choice's (finish reason, asks for tools, says something)."""
    if not choices:
        return AnswerKind.EMPTY
    reasons = {reason for reason, _, _ in choices}
    if "content_filter" in reasons:
        return AnswerKind.CONTENT_FILTER
    if "length" in reasons:
        return AnswerKind.TRUNCATED
    if any(tools for _, tools, _ in choices):
        return AnswerKind.TOOL_CALLS
    if not any(said for _, _, said in choices):
        return AnswerKind.EMPTY
    return AnswerKind.ANSWER


def classify(response: ChatCompletion | Response) -> AnswerKind:
    """The kind of a validated response (a chat completion or a Responses API response)."""
    if isinstance(response, Response):
        return _classify_response(response)
    choices = []
    for choice in response.choices:
        message = choice.message
        tools = bool(message.tool_calls) or message.function_call is not None
        said = bool(message.content) or bool(message.refusal) or message.audio is not None
        choices.append((choice.finish_reason, tools, said))
    return _kind(choices)


_TOOL_ITEMS: Final = frozenset({"function_call", "custom_tool_call"})


def _classify_response(response: Response) -> AnswerKind:
    status = response.status
    if status == "incomplete":
        details = response.incomplete_details
        reason = details.reason if details is not None else None
        return AnswerKind.CONTENT_FILTER if reason == "content_filter" else AnswerKind.TRUNCATED
    if response.error is not None or status not in (None, "completed"):
        return AnswerKind.EMPTY  # failed, cancelled, or not finished (background)
    said = False
    for item in response.output:
        if item.type in _TOOL_ITEMS:
            return AnswerKind.TOOL_CALLS
        if item.type == "message":
            said = said or any(
                getattr(part, "text", None) or getattr(part, "refusal", None) for part in item.content
            )
    return AnswerKind.ANSWER if said else AnswerKind.EMPTY


# An answer whose JSON has none of these words is an ordinary answer: most
# are classified without being parsed.
_MARKERS: Final = (b"length", b"content_filter", b"tool_calls", b"function_call")


def classify_raw(raw: bytes) -> AnswerKind:
    """The kind of a stored response (JSON known to be a valid completion).

    An empty answer is never stored, so one with no marker is taken as an
    ordinary answer without parsing it."""
    if not any(marker in raw for marker in _MARKERS):
        return AnswerKind.ANSWER
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:  # JSON pydantic reads but orjson does not (NaN)
        return classify(ChatCompletion.model_validate_json(raw))
    choices = []
    for choice in body.get("choices") or ():
        message = choice.get("message") or {}
        tools = bool(message.get("tool_calls")) or bool(message.get("function_call"))
        said = bool(message.get("content")) or bool(message.get("refusal")) or bool(message.get("audio"))
        choices.append((choice.get("finish_reason"), tools, said))
    return _kind(choices)


def is_sampled(params: Mapping[str, Any]) -> bool:
    """Whether a request asks for a random sample: ``temperature`` above 0 (or
    not given: the API's default is 1) and no ``seed``."""
    if params.get("seed") is not None:
        return False
    temperature = params.get("temperature")
    if temperature is None:
        return True
    return isinstance(temperature, (int, float)) and temperature > 0


def sample_key(key: str, index: int) -> str:
    """The cache key of sample ``index`` of ``key``'s bucket (sample 0 is ``key`` itself)."""
    if index == 0:
        return key
    return blake2b(f"{key}/sample/{index}".encode(), digest_size=16).hexdigest()


def _flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigurationError(f"CachePolicy.{name}: expected True or False, got {value!r}")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class CachePolicy:
    """What may be stored and served; see the module's documentation for the
    reasons behind each default.

    - ``store_truncated``: store answers cut at ``max_tokens`` (default False).
    - ``tool_calls``: store answers that ask for tool calls (default True).
    - ``samples``: for requests that sample (``temperature > 0`` without a
      ``seed``), keep up to this many answers per key and serve one at random
      once there are that many (default 1: one answer, served to every call).
    - ``cacheable(request) -> bool``: False keeps a request out of the cache
      altogether (not looked up, not stored); ``request`` is the parameters
      sent to the model (``model``, ``messages``, ...).
    - ``should_store(request, response) -> bool``: asked last, for an answer
      every other rule would store; False: not stored. ``response`` is the
      ``ChatCompletion``, or the ``Response`` for the Responses API.
    - ``provider_state``: cache Responses API requests that depend on state
      the provider holds (default False: they go to the model every time).

    Predicates run on the event loop: keep them quick and non-blocking.
    """

    store_truncated: bool = False
    tool_calls: bool = True
    samples: int = 1
    cacheable: RequestPredicate | None = None
    should_store: StorePredicate | None = None
    provider_state: bool = False

    def __post_init__(self) -> None:
        _flag(self.store_truncated, "store_truncated")
        _flag(self.provider_state, "provider_state")
        _flag(self.tool_calls, "tool_calls")
        samples = self.samples
        if isinstance(samples, bool) or not isinstance(samples, int) or not 1 <= samples <= MAX_SAMPLES:
            raise ConfigurationError(
                f"CachePolicy.samples: expected an integer from 1 to {MAX_SAMPLES}, got {samples!r}"
            )
        for name in ("cacheable", "should_store"):
            value = getattr(self, name)
            if value is None:
                continue
            if not callable(value):
                raise ConfigurationError(f"CachePolicy.{name}: expected a callable, got {value!r}")
            if inspect.iscoroutinefunction(value) or inspect.iscoroutinefunction(
                getattr(value, "__call__", None)  # noqa: B004 - an object's async __call__
            ):
                raise ConfigurationError(
                    f"CachePolicy.{name}: must be a plain function returning a bool, not an async one"
                )

    @staticmethod
    def verdict(value: object, name: str) -> bool:
        """A predicate's answer as a bool; an awaitable (an async predicate
        that got past the check) is an error, not a yes."""
        if inspect.isawaitable(value):
            if inspect.iscoroutine(value):
                value.close()
            raise ConfigurationError(
                f"CachePolicy.{name} returned an awaitable: it must be a plain function returning a bool"
            )
        return bool(value)

    def refusal(self, kind: AnswerKind) -> str | None:
        """Why an answer of ``kind`` is not stored (nor served), or None."""
        if kind is AnswerKind.ANSWER:
            return None
        if kind is AnswerKind.TRUNCATED:
            return None if self.store_truncated else "truncated"
        if kind is AnswerKind.TOOL_CALLS:
            return None if self.tool_calls else "tool_calls"
        return kind.value

    def bucket(self, params: Mapping[str, Any]) -> int:
        """How many answers this request's key holds (1: no bucket)."""
        return self.samples if self.samples > 1 and is_sampled(params) else 1


DEFAULT_POLICY: Final = CachePolicy()
