"""Parsing and validation of OpenAI chat and completion requests; pure, no engine state.

The gateway imports this module too, so it must stay free of mlx and of any engine object.
Every refusal raises `ApiError` carrying the OpenAI error fields (status, type, param, code).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from mlxfleet.errors import ApiError

ALLOWED_ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})
MAX_STOP_SEQUENCES = 4
CONTINUATION_FIELD = "mlxfleet_continuation"  # see Continuation
MIN_TEMPERATURE = 0.0
MAX_TEMPERATURE = 2.0
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0

__all__ = [
    "Message",
    "SamplingParams",
    "ChatRequest",
    "CompletionRequest",
    "parse_json_body",
    "parse_chat_request",
    "parse_completion_request",
    "resolve_max_tokens",
]


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message with its content flattened to text."""

    role: str
    content: str


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to sample and when to stop; max_tokens None means "the rest of the context"."""

    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    # vLLM's extension, for benchmarks: generate to max_tokens through end-of-sequence tokens.
    ignore_eos: bool = False


@dataclass(frozen=True, slots=True)
class Continuation:
    """A stream to pick up where another engine stopped (body field `mlxfleet_continuation`).

    The gateway sends the original request plus the ids of the tokens whose text the client
    already has; the engine generates what follows them, under the original response id.
    """

    token_ids: tuple[int, ...]
    id: str
    created: int


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A validated POST /v1/chat/completions body."""

    model: str | None
    messages: tuple[Message, ...]
    params: SamplingParams
    stream: bool
    include_usage: bool
    continuation: Continuation | None = None


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """A validated POST /v1/completions body; prompt is text or token ids."""

    model: str | None
    prompt: str | tuple[int, ...]
    params: SamplingParams
    stream: bool
    include_usage: bool
    continuation: Continuation | None = None


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """Decode a request body that must be one JSON object."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError.invalid(
            f"We could not parse the JSON body of your request: {exc}", None, "invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise ApiError.invalid("The request body must be a JSON object.", None, "invalid_json")
    return body


def _is_int(value: Any) -> bool:
    # bool is a subclass of int, but `"max_tokens": true` is a client bug, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return _is_int(value) or isinstance(value, float)


def _type_error(param: str, expected: str, value: Any) -> ApiError:
    return ApiError.invalid(
        f"Invalid type for '{param}': expected {expected}, got {type(value).__name__} ({value!r}).",
        param,
        "invalid_type",
    )


def _parse_max_tokens(body: dict[str, Any]) -> int | None:
    # max_completion_tokens is OpenAI's newer name; when both are sent it wins.
    chosen: int | None = None
    for param in ("max_tokens", "max_completion_tokens"):
        value = body.get(param)
        if value is None:
            continue
        if not _is_int(value):
            raise _type_error(param, "an integer", value)
        # 0 is refused like OpenAI does: a request that may generate nothing is a client bug.
        if value < 1:
            raise ApiError.invalid(
                f"Invalid '{param}': integer below minimum value. "
                f"Expected a value >= 1, but got {value} instead.",
                param,
                "integer_below_min_value",
            )
        chosen = value
    return chosen


def _parse_stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        stops = [value]
    elif isinstance(value, list) and all(isinstance(s, str) for s in value):
        stops = value
    else:
        raise _type_error("stop", "a string or a list of strings", value)
    if len(stops) > MAX_STOP_SEQUENCES:
        raise ApiError.invalid(
            f"Invalid 'stop': at most {MAX_STOP_SEQUENCES} sequences, got {len(stops)}.",
            "stop",
            "array_above_max_length",
        )
    # An empty stop string would match before the first token; ignore it, as OpenAI does.
    return tuple(s for s in stops if s)


def _parse_sampling(body: dict[str, Any]) -> SamplingParams:
    temperature = body.get("temperature")
    if temperature is None:
        temperature = DEFAULT_TEMPERATURE
    elif not _is_number(temperature):
        raise _type_error("temperature", "a number", temperature)
    elif not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
        raise ApiError.invalid(
            f"Invalid 'temperature': {temperature} is not in "
            f"[{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}].",
            "temperature",
            "invalid_value",
        )
    top_p = body.get("top_p")
    if top_p is None:
        top_p = DEFAULT_TOP_P
    elif not _is_number(top_p):
        raise _type_error("top_p", "a number", top_p)
    elif not 0.0 < top_p <= 1.0:
        raise ApiError.invalid(
            f"Invalid 'top_p': {top_p} is not in (0, 1].", "top_p", "invalid_value"
        )
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise _type_error("seed", "an integer", seed)
    n = body.get("n")
    if n is not None:
        if not _is_int(n):
            raise _type_error("n", "an integer", n)
        if n < 1:
            raise ApiError.invalid(f"Invalid 'n': {n} is below 1.", "n", "integer_below_min_value")
        if n > 1:
            raise ApiError.invalid(
                f"Unsupported value for 'n': {n}; this server returns one choice.",
                "n",
                "unsupported_parameter",
            )
    for param in ("logprobs", "echo"):
        if body.get(param) not in (None, False):
            raise ApiError.invalid(
                f"Unsupported parameter '{param}'.", param, "unsupported_parameter"
            )
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _type_error("ignore_eos", "a boolean", ignore_eos)
    return SamplingParams(
        max_tokens=_parse_max_tokens(body),
        temperature=float(temperature),
        top_p=float(top_p),
        seed=seed,
        stop=_parse_stop(body.get("stop")),
        ignore_eos=ignore_eos,
    )


def _parse_common(body: dict[str, Any]) -> tuple[str | None, bool, bool]:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _type_error("model", "a string", model)
    stream = body.get("stream")
    if stream is None:
        stream = False
    elif not isinstance(stream, bool):
        raise _type_error("stream", "a boolean", stream)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise _type_error("stream_options", "an object", options)
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise _type_error("stream_options.include_usage", "a boolean", include_usage)
    return model, stream, include_usage


def _parse_continuation(value: Any) -> Continuation | None:
    if value is None:
        return None
    name = CONTINUATION_FIELD
    if not isinstance(value, dict):
        raise _type_error(name, "an object", value)
    ids, id_, created = value.get("token_ids"), value.get("id"), value.get("created")
    if not isinstance(ids, list) or not all(_is_int(t) and t >= 0 for t in ids):
        raise _type_error(f"{name}.token_ids", "an array of token ids", ids)
    if not isinstance(id_, str) or not id_:
        raise _type_error(f"{name}.id", "a non-empty string", id_)
    if not isinstance(created, int) or isinstance(created, bool):
        raise _type_error(f"{name}.created", "an integer", created)
    return Continuation(tuple(ids), id_, created)


def _parse_content(index: int, role: str, content: Any) -> str:
    param = f"messages[{index}].content"
    if isinstance(content, str):
        return content
    # Assistant turns that only carried tool calls have null content in OpenAI's format.
    if content is None and role == "assistant":
        return ""
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text"):
                raise ApiError.invalid(
                    f"Invalid '{param}[{j}]': only text parts are supported.",
                    f"{param}[{j}]",
                    "invalid_value",
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise _type_error(f"{param}[{j}].text", "a string", text)
            texts.append(text)
        return "".join(texts)
    raise _type_error(param, "a string or a list of text parts", content)


def _parse_messages(value: Any) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise ApiError.invalid(
            "Invalid 'messages': expected a non-empty array of message objects.",
            "messages",
            "invalid_value" if isinstance(value, list) else "invalid_type",
        )
    messages = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise _type_error(f"messages[{i}]", "an object", item)
        role = item.get("role")
        if role not in ALLOWED_ROLES:
            raise ApiError.invalid(
                f"Invalid 'messages[{i}].role': {role!r}; expected one of "
                f"{', '.join(sorted(ALLOWED_ROLES))}.",
                f"messages[{i}].role",
                "invalid_value",
            )
        messages.append(Message(role, _parse_content(i, role, item.get("content"))))
    return tuple(messages)


def parse_chat_request(body: dict[str, Any]) -> ChatRequest:
    """Validate a chat completions body."""
    model, stream, include_usage = _parse_common(body)
    messages = _parse_messages(body.get("messages"))
    continuation = _parse_continuation(body.get(CONTINUATION_FIELD))
    return ChatRequest(model, messages, _parse_sampling(body), stream, include_usage, continuation)


def _parse_prompt(value: Any) -> str | tuple[int, ...]:
    if isinstance(value, str):
        prompt: str | tuple[int, ...] = value
    elif isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        prompt = value[0]
    elif isinstance(value, list) and value and all(_is_int(t) and t >= 0 for t in value):
        prompt = tuple(value)
    else:
        raise _type_error("prompt", "a string, a list of one string or a list of token ids", value)
    if not prompt:
        raise ApiError.invalid("Invalid 'prompt': it must not be empty.", "prompt", "invalid_value")
    return prompt


def parse_completion_request(body: dict[str, Any]) -> CompletionRequest:
    """Validate a (legacy) completions body."""
    model, stream, include_usage = _parse_common(body)
    prompt = _parse_prompt(body.get("prompt"))
    continuation = _parse_continuation(body.get(CONTINUATION_FIELD))
    return CompletionRequest(
        model, prompt, _parse_sampling(body), stream, include_usage, continuation
    )


def resolve_max_tokens(
    prompt_tokens: int,
    max_tokens: int | None,
    context_length: int,
    param: Literal["messages", "prompt"],
) -> int:
    """The generation budget for a tokenized prompt; refuses what cannot fit the context."""
    remaining = context_length - prompt_tokens
    wanted = max_tokens if max_tokens is not None else remaining
    if remaining < 1 or wanted > remaining:
        raise ApiError.invalid(
            f"This model's maximum context length is {context_length} tokens. However, you "
            f"requested {prompt_tokens + max(wanted, 1)} tokens ({prompt_tokens} in the "
            f"{param}, {max(wanted, 1)} in the completion). Please reduce the length of the "
            f"{param} or completion.",
            param,
            "context_length_exceeded",
        )
    return wanted
