"""Anthropic Messages requests (POST /v1/messages and /v1/messages/count_tokens) as chat bodies.

The gateway validates the body here, in Anthropic's terms, and hands the engines the OpenAI chat
body it maps to. Every top-level field is honoured, refused, or listed in IGNORED with the
reason (docs/operations.md has the table); an unknown one is refused, as Anthropic does.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from mlxfleet.errors import ApiError
from mlxfleet.openai.sampling import MAX_STOP_SEQUENCES, is_int, is_number

# Anthropic's error types by status; a 503 (no engine ready) is Anthropic's 529 "overloaded".
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
}
OVERLOADED = 529
MIN_THINKING_BUDGET = 1024  # Anthropic's lower bound for thinking.budget_tokens

HONOURED = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "system",
        "stop_sequences",
        "temperature",
        "top_p",
        "top_k",
        "stream",
        "tools",
        "tool_choice",
        "thinking",
        "output_config",
    }
)
# Accepted and without effect here, and why (the field table in docs/operations.md says so too).
IGNORED = {
    "metadata": "user_id is for a provider's abuse checks; the team key identifies the caller",
    "cache_control": "the engines cache prompt prefixes without being asked",
    "service_tier": "the fleet's tier comes from the key and the X-Mlxfleet-Tier header",
    "speed": "one decoding speed is served",
    "inference_geo": "the answer is computed on the team's own Macs",
    "diagnostics": "no diagnostics are collected",
    "user_profile_id": "Anthropic account field",
    "workspace_id": "Anthropic account field",
}
REFUSED = {
    "container": "code execution containers are not served",
    "mcp_servers": "remote MCP servers are not called by the fleet; run them in the client",
    "context_management": "context editing is not supported",
}
TEXT_ONLY = "the fleet's engines are text-only"


def error_body(err: ApiError) -> tuple[int, dict[str, Any]]:
    """An ApiError as Anthropic's status and error envelope."""
    status = OVERLOADED if err.status == 503 else err.status
    kind = ERROR_TYPES.get(
        err.status, "api_error" if err.status >= 500 else "invalid_request_error"
    )
    return status, {"type": "error", "error": {"type": kind, "message": err.message}}


def invalid(message: str) -> ApiError:
    return ApiError(400, message)


def _type_error(field: str, expected: str, value: Any) -> ApiError:
    return invalid(f"{field}: expected {expected}, got {type(value).__name__} ({value!r})")


@dataclass(frozen=True, slots=True)
class MessagesRequest:
    """A validated Messages body: what admission needs, and the chat body for the engines."""

    model: str
    stream: bool
    max_tokens: int | None  # None for count_tokens
    show_thinking: bool  # thinking.display is not "omitted"
    chat: dict[str, Any]


def _text_blocks(value: Any, field: str) -> str:
    """A string, or text blocks joined (system, tool_result content)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _type_error(field, "a string or an array of text blocks", value)
    texts = []
    for j, block in enumerate(value):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind in ("image", "document"):
            raise invalid(f"{field}.{j}: {kind} blocks are not supported: {TEXT_ONLY}")
        if kind != "text" or not isinstance(block.get("text"), str):
            raise invalid(f"{field}.{j}: expected a text block, got {block!r}")
        texts.append(block["text"])
    return "".join(texts)


def _blocks(i: int, blocks: list[Any]) -> Iterator[tuple[str, Any, dict[str, Any]]]:
    """Message i's content blocks, each with its field name and type."""
    for j, block in enumerate(blocks):
        kind = block.get("type") if isinstance(block, dict) else None
        yield f"messages.{i}.content.{j}", kind, block if isinstance(block, dict) else {}


def _user_turn(i: int, blocks: list[Any], calls: set[str]) -> list[dict[str, Any]]:
    """A user turn's blocks: its tool results (one tool message each), then its text."""
    out: list[dict[str, Any]] = []
    texts = []
    for field, kind, block in _blocks(i, blocks):
        if kind == "text":
            texts.append(_text_blocks([block], field))
        elif kind == "tool_result":
            use_id = block.get("tool_use_id")
            if use_id not in calls:
                raise invalid(
                    f"{field}: unexpected `tool_use_id` found in `tool_result` blocks: {use_id!r}. "
                    "Each `tool_result` block must have a corresponding `tool_use` block in an "
                    "earlier assistant message."
                )
            content = _text_blocks(block.get("content", ""), f"{field}.content")
            out.append({"role": "tool", "tool_call_id": use_id, "content": content})
        elif kind in ("image", "document"):
            raise invalid(f"{field}: {kind} blocks are not supported: {TEXT_ONLY}")
        else:
            raise invalid(f"{field}: unknown content block type {kind!r} in a user message")
    if texts:
        out.append({"role": "user", "content": "".join(texts)})
    return out


def _assistant_turn(i: int, blocks: list[Any], calls: set[str]) -> dict[str, Any]:
    texts, tool_calls = [], []
    for field, kind, block in _blocks(i, blocks):
        if kind == "text":
            texts.append(_text_blocks([block], field))
        elif kind == "tool_use":
            use_id, name, args = block.get("id"), block.get("name"), block.get("input")
            if not isinstance(use_id, str) or not use_id or not isinstance(name, str) or not name:
                raise invalid(f"{field}: a tool_use block needs a string `id` and `name`")
            if not isinstance(args, dict):
                raise _type_error(f"{field}.input", "an object", args)
            calls.add(use_id)
            function = {"name": name, "arguments": json.dumps(args)}
            tool_calls.append({"id": use_id, "type": "function", "function": function})
        elif kind in ("thinking", "redacted_thinking"):
            # Past think sections are not shown to the model (open models' templates drop them).
            continue
        else:
            raise invalid(f"{field}: unknown content block type {kind!r} in an assistant message")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def _messages(value: Any, system: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise invalid("messages: at least one message is required")
    out: list[dict[str, Any]] = []
    if system is not None:
        out.append({"role": "system", "content": _text_blocks(system, "system")})
    calls: set[str] = set()
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise _type_error(f"messages.{i}", "an object", message)
        role, content = message.get("role"), message.get("content")
        if role not in ("user", "assistant"):
            raise invalid(f"messages.{i}.role: expected 'user' or 'assistant', got {role!r}")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
        elif not isinstance(content, list):
            raise _type_error(f"messages.{i}.content", "a string or an array of blocks", content)
        elif role == "user":
            out += _user_turn(i, content, calls)
        else:
            out.append(_assistant_turn(i, content, calls))
    if value[-1].get("role") == "assistant":
        raise invalid(
            "messages: a final assistant message (prefill) is not supported; end with a user turn"
        )
    return out


TOOL_KEYS = frozenset({"name", "description", "input_schema", "type", "cache_control", "strict"})
TOOL_KEYS_ACCEPTED = TOOL_KEYS | {"eager_input_streaming"}  # calls are streamed whole anyway


def _tools(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise _type_error("tools", "an array of tools", value)
    tools = []
    for i, tool in enumerate(value):
        if not isinstance(tool, dict):
            raise _type_error(f"tools.{i}", "an object", tool)
        kind = tool.get("type")
        if kind not in (None, "custom"):
            raise invalid(
                f"tools.{i}: the server tool {kind!r} is not served here; give the model "
                "client tools (name, description, input_schema) and run them in the client"
            )
        extra = sorted(set(tool) - TOOL_KEYS_ACCEPTED)
        if extra:
            raise invalid(f"tools.{i}.{extra[0]}: Extra inputs are not permitted")
        function: dict[str, Any] = {
            "name": tool.get("name"),
            "parameters": tool.get("input_schema"),
        }
        if not isinstance(function["parameters"], dict):
            raise _type_error(
                f"tools.{i}.input_schema", "a JSON schema object", function["parameters"]
            )
        if tool.get("description") is not None:
            function["description"] = tool["description"]
        if tool.get("strict") is not None:
            function["strict"] = tool["strict"]
        tools.append({"type": "function", "function": function})
    return tools


def _tool_choice(value: Any, chat: dict[str, Any]) -> None:
    if not isinstance(value, dict):
        raise _type_error("tool_choice", "an object", value)
    kind = value.get("type")
    if kind == "auto":
        chat["tool_choice"] = "auto"
    elif kind == "any":
        chat["tool_choice"] = "required"
    elif kind == "none":
        chat["tool_choice"] = "none"
    elif kind == "tool":
        name = value.get("name")
        if not isinstance(name, str) or name not in {
            t["function"]["name"] for t in chat.get("tools", ())
        }:
            raise invalid(f"tool_choice.name: {name!r} is not one of the request's tools")
        chat["tool_choice"] = {"type": "function", "function": {"name": name}}
    else:
        raise invalid(f"tool_choice.type: expected 'auto', 'any', 'tool' or 'none', got {kind!r}")
    parallel = value.get("disable_parallel_tool_use")
    if parallel is not None:
        if not isinstance(parallel, bool):
            raise _type_error("tool_choice.disable_parallel_tool_use", "a boolean", parallel)
        chat["parallel_tool_calls"] = not parallel


def _thinking(value: Any, max_tokens: int | None) -> tuple[bool | None, bool]:
    """(think, show the thinking). On a model with a think switch in its template (Qwen3's
    enable_thinking) this turns it on or off; without `thinking` (None) the model does what it
    was trained to: a reasoning model still thinks, and its thinking comes as thinking blocks."""
    if value is None:
        return None, True
    if not isinstance(value, dict):
        raise _type_error("thinking", "an object", value)
    kind, display = value.get("type"), value.get("display")
    if display not in (None, "summarized", "omitted"):
        raise invalid(f"thinking.display: expected 'summarized' or 'omitted', got {display!r}")
    if kind == "disabled":
        return False, True
    if kind == "enabled":
        budget: Any = value.get("budget_tokens")
        if not is_int(budget) or budget < MIN_THINKING_BUDGET:
            raise invalid(f"thinking.budget_tokens: must be an integer >= {MIN_THINKING_BUDGET}")
        if max_tokens is not None and budget >= max_tokens:
            raise invalid("thinking.budget_tokens: must be less than max_tokens")
    elif kind != "adaptive":
        raise invalid(f"thinking.type: expected 'enabled', 'adaptive' or 'disabled', got {kind!r}")
    return True, display != "omitted"


def _number(body: dict[str, Any], field: str, low: float, high: float) -> float | None:
    value = body.get(field)
    if value is None:
        return None
    if not is_number(value) or not low <= value <= high:
        raise invalid(f"{field}: expected a number between {low} and {high}, got {value!r}")
    return float(value)


def _output_config(value: Any, chat: dict[str, Any], kwargs: dict[str, Any]) -> None:
    if not isinstance(value, dict):
        raise _type_error("output_config", "an object", value)
    if (effort := value.get("effort")) is not None:
        if effort not in ("low", "medium", "high", "xhigh", "max"):
            raise invalid(f"output_config.effort: unknown effort {effort!r}")
        kwargs["reasoning_effort"] = effort  # the variable templates that take one read (gpt-oss)
    if (fmt := value.get("format")) is not None:
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
            raise invalid("output_config.format.type: expected 'json_schema'")
        schema = fmt.get("schema")
        if not isinstance(schema, dict):
            raise _type_error("output_config.format.schema", "a JSON schema object", schema)
        chat["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": schema, "strict": True},
        }


def parse_messages_request(body: dict[str, Any], *, count_only: bool = False) -> MessagesRequest:
    """Validate a Messages body (count_only: a count_tokens body, which has no max_tokens)."""
    for name in body:
        if name in REFUSED:
            raise invalid(f"{name}: {REFUSED[name]}")
        if name not in HONOURED and name not in IGNORED:
            raise invalid(f"{name}: Extra inputs are not permitted")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model: Field required (a non-empty string)")
    max_tokens = body.get("max_tokens")
    if count_only:
        max_tokens = None
    elif max_tokens is None:
        raise invalid("max_tokens: Field required")
    elif not is_int(max_tokens) or max_tokens < 1:
        raise invalid(f"max_tokens: expected an integer >= 1, got {max_tokens!r}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _type_error("stream", "a boolean", stream)
    chat: dict[str, Any] = {
        "model": model,
        "messages": _messages(body.get("messages"), body.get("system")),
    }
    if max_tokens is not None:
        chat["max_tokens"] = max_tokens
    if stream:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    if body.get("tools") is not None:
        chat["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        _tool_choice(body["tool_choice"], chat)
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _type_error("stop_sequences", "an array of strings", stops)
        if len(stops) > MAX_STOP_SEQUENCES:
            raise invalid(
                f"stop_sequences: at most {MAX_STOP_SEQUENCES} are served, got {len(stops)}"
            )
        chat["stop"] = stops
    # Anthropic's default temperature is 1.0, its range 0 to 1.
    chat["temperature"] = _number(body, "temperature", 0.0, 1.0)
    if chat["temperature"] is None:
        chat["temperature"] = 1.0
    if (top_p := _number(body, "top_p", 0.0, 1.0)) is not None:
        chat["top_p"] = top_p
    top_k = body.get("top_k")
    if top_k is not None:
        if not is_int(top_k) or top_k < 0:
            raise invalid(f"top_k: expected an integer >= 0, got {top_k!r}")
        chat["top_k"] = top_k
    think, show = _thinking(body.get("thinking"), max_tokens)
    kwargs: dict[str, Any] = {} if think is None else {"enable_thinking": think}
    if body.get("output_config") is not None:
        _output_config(body["output_config"], chat, kwargs)
    if kwargs:
        chat["chat_template_kwargs"] = kwargs
    return MessagesRequest(model, stream, max_tokens, show, chat)


# What an error from the shared chat validation (run on the mapped body) calls a field, in
# Anthropic's words: the message a client reads names the field it sent.
CHAT_FIELD_NAMES = (
    ("tools[", "tools."),
    ("].function.parameters", ".input_schema"),
    ("].function.name", ".name"),
    ("'stop'", "'stop_sequences'"),
    ("response_format", "output_config.format"),
)


def in_anthropic_terms(err: ApiError) -> ApiError:
    message = err.message
    for ours, theirs in CHAT_FIELD_NAMES:
        message = message.replace(ours, theirs)
    return ApiError(err.status, message, type=err.type, headers=err.headers)
