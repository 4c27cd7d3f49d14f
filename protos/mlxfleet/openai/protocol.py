"""Parsing and validation of OpenAI chat and completion requests; pure, no engine state.

The gateway imports this module too, so it must stay free of mlx and of any engine object.
Every refusal raises `ApiError` carrying the OpenAI error fields (status, type, param, code).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from mlxfleet.errors import ApiError
from mlxfleet.openai.sampling import SamplingParams, is_int, parse_sampling, type_error
from mlxfleet.openai.structured import ResponseFormat, parse_response_format
from mlxfleet.openai.tools import (
    Tool,
    ToolCall,
    ToolChoice,
    parse_parallel_tool_calls,
    parse_template_kwargs,
    parse_tool_calls,
    parse_tool_choice,
    parse_tools,
)

ALLOWED_ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})
CONTINUATION_FIELD = "mlxfleet_continuation"  # see Continuation
# OpenAI's "developer" role is its newer name for "system"; chat templates only know the latter.
TEMPLATE_ROLE = {"developer": "system"}

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
    """One chat message with its content flattened to text, and its tool-calling fields."""

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool turn: the call it answers
    name: str | None = None

    def as_template(self) -> dict[str, Any]:
        """The message as chat templates take it (OpenAI's developer role is their system)."""
        out: dict[str, Any] = {"role": TEMPLATE_ROLE.get(self.role, self.role)}
        out["content"] = self.content
        if self.tool_calls:
            out["tool_calls"] = [c.as_template() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


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
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = ToolChoice("none")
    parallel_tool_calls: bool = True
    template_kwargs: dict[str, Any] = field(default_factory=dict)  # chat_template_kwargs
    response_format: ResponseFormat = ResponseFormat()

    @property
    def tools_on(self) -> bool:
        """Whether the model sees the tools and its calls are parsed (tool_choice not none)."""
        return bool(self.tools) and self.tool_choice.mode != "none"


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


# Fields that would change the answer and that we cannot honour: refused, never ignored
# (docs/operations.md, "Request fields", lists every field and what happens to it).
UNSUPPORTED: dict[str, str] = {
    "audio": "audio output is not supported",
    "web_search_options": "web search is not supported",
    "functions": "the deprecated 'functions' is not supported; send 'tools'",
    "function_call": "the deprecated 'function_call' is not supported; send 'tool_choice'",
    "suffix": "insertion with a 'suffix' is not supported",
}


# Every other field a chat or completions body may carry: honoured (sampling, tools, formats,
# the vLLM extensions, our continuation) or accepted with no effect, each for a reason listed
# in docs/operations.md ("Request fields"). A field in none of these is refused, as OpenAI does.
KNOWN_FIELDS = frozenset(
    {
        # both endpoints
        "model", "stream", "stream_options", "max_tokens", "max_completion_tokens",
        "temperature", "top_p", "seed", "stop", "n", "logprobs", "logit_bias",
        "presence_penalty", "frequency_penalty", "top_k", "min_p", "repetition_penalty",
        "ignore_eos", "best_of", "modalities", CONTINUATION_FIELD,
        # chat
        "messages", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls",
        "chat_template_kwargs", "response_format",
        # completions
        "prompt", "echo",
        # accepted with no effect: a provider's bookkeeping, storage or billing, or a model
        # family we do not serve
        "user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier",
        "prediction", "reasoning_effort", "verbosity",
    }
)  # fmt: skip


def _refuse_unsupported(body: dict[str, Any]) -> None:
    for param in body:
        if param not in KNOWN_FIELDS and param not in UNSUPPORTED:
            raise ApiError.invalid(
                f"Unrecognized request argument supplied: {param}", param, "unknown_parameter"
            )
    for param, why in UNSUPPORTED.items():
        if body.get(param) is not None:
            raise ApiError.invalid(
                f"Unsupported parameter '{param}': {why}.", param, "unsupported_parameter"
            )
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise ApiError.invalid(
            f"Unsupported value for 'modalities': {modalities!r}; only [\"text\"] is served.",
            "modalities",
            "unsupported_parameter",
        )
    best_of = body.get("best_of")
    if best_of is not None and best_of != 1:
        raise ApiError.invalid(
            f"Unsupported value for 'best_of': {best_of!r}; this server returns one choice.",
            "best_of",
            "unsupported_parameter",
        )


def _parse_common(body: dict[str, Any]) -> tuple[str | None, bool, bool]:
    _refuse_unsupported(body)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise type_error("model", "a string", model)
    stream = body.get("stream")
    if stream is None:
        stream = False
    elif not isinstance(stream, bool):
        raise type_error("stream", "a boolean", stream)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise type_error("stream_options", "an object", options)
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise type_error("stream_options.include_usage", "a boolean", include_usage)
    return model, stream, include_usage


def _parse_continuation(value: Any) -> Continuation | None:
    if value is None:
        return None
    name = CONTINUATION_FIELD
    if not isinstance(value, dict):
        raise type_error(name, "an object", value)
    ids, id_, created = value.get("token_ids"), value.get("id"), value.get("created")
    if not isinstance(ids, list) or not all(is_int(t) and t >= 0 for t in ids):
        raise type_error(f"{name}.token_ids", "an array of token ids", ids)
    if not isinstance(id_, str) or not id_:
        raise type_error(f"{name}.id", "a non-empty string", id_)
    if not isinstance(created, int) or isinstance(created, bool):
        raise type_error(f"{name}.created", "an integer", created)
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
                raise type_error(f"{param}[{j}].text", "a string", text)
            texts.append(text)
        return "".join(texts)
    raise type_error(param, "a string or a list of text parts", content)


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
            raise type_error(f"messages[{i}]", "an object", item)
        role = item.get("role")
        if role not in ALLOWED_ROLES:
            raise ApiError.invalid(
                f"Invalid 'messages[{i}].role': {role!r}; expected one of "
                f"{', '.join(sorted(ALLOWED_ROLES))}.",
                f"messages[{i}].role",
                "invalid_value",
            )
        content = _parse_content(i, role, item.get("content"))
        calls = parse_tool_calls(i, item.get("tool_calls")) if role == "assistant" else ()
        call_id = item.get("tool_call_id")
        if role == "tool" and (not isinstance(call_id, str) or not call_id):
            raise ApiError.invalid(
                f"Invalid 'messages[{i}]': a tool message needs 'tool_call_id', the id of the "
                "call it answers.",
                f"messages[{i}].tool_call_id",
                "invalid_value",
            )
        name = item.get("name")
        if name is not None and not isinstance(name, str):
            raise type_error(f"messages[{i}].name", "a string", name)
        tool_call_id = call_id if role == "tool" else None
        messages.append(Message(role, content, calls, tool_call_id, name))
    return tuple(messages)


def _parse_format(value: Any, tools: tuple[Tool, ...]) -> ResponseFormat:
    """response_format, which constrains the whole answer: not with tools the model may call
    (a call is not the JSON asked for)."""
    fmt = parse_response_format(value)
    if fmt.constrained and tools:
        raise ApiError.invalid(
            "Unsupported combination: 'response_format' with 'tools' the model may call; send "
            "one of them, or tool_choice 'none'.",
            "response_format",
            "unsupported_parameter",
        )
    return fmt


def parse_chat_request(body: dict[str, Any]) -> ChatRequest:
    """Validate a chat completions body."""
    model, stream, include_usage = _parse_common(body)
    messages = _parse_messages(body.get("messages"))
    continuation = _parse_continuation(body.get(CONTINUATION_FIELD))
    tools = parse_tools(body.get("tools"))
    choice = parse_tool_choice(body.get("tool_choice"), tools)
    callable_tools = tools if choice.mode != "none" else ()
    return ChatRequest(
        model,
        messages,
        parse_sampling(body, "chat"),
        stream,
        include_usage,
        continuation,
        tools,
        choice,
        parse_parallel_tool_calls(body.get("parallel_tool_calls")),
        parse_template_kwargs(body.get("chat_template_kwargs")),
        _parse_format(body.get("response_format"), callable_tools),
    )


def _parse_prompt(value: Any) -> str | tuple[int, ...]:
    if isinstance(value, str):
        prompt: str | tuple[int, ...] = value
    elif isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        prompt = value[0]
    elif isinstance(value, list) and value and all(is_int(t) and t >= 0 for t in value):
        prompt = tuple(value)
    else:
        raise type_error("prompt", "a string, a list of one string or a list of token ids", value)
    if not prompt:
        raise ApiError.invalid("Invalid 'prompt': it must not be empty.", "prompt", "invalid_value")
    return prompt


def parse_completion_request(body: dict[str, Any]) -> CompletionRequest:
    """Validate a (legacy) completions body."""
    if body.get("response_format") is not None:
        raise ApiError.invalid(
            "Unsupported parameter 'response_format' for completions: it is a chat field.",
            "response_format",
            "unsupported_parameter",
        )
    model, stream, include_usage = _parse_common(body)
    prompt = _parse_prompt(body.get("prompt"))
    continuation = _parse_continuation(body.get(CONTINUATION_FIELD))
    return CompletionRequest(
        model, prompt, parse_sampling(body, "completion"), stream, include_usage, continuation
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
