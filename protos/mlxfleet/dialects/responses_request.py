"""OpenAI Responses requests (POST /v1/responses, stateless) as chat bodies.

Nothing is stored: `store: true`, `previous_response_id` and `conversation` are refused with a
400 that says so, and the client sends the whole conversation as `input` each turn (as Codex
CLI does with `store: false`). Errors are OpenAI-shaped, naming the field in `param`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlxfleet.errors import ApiError
from mlxfleet.openai.sampling import invalid, is_int, is_number, type_error

HONOURED = frozenset(
    {
        "model",
        "input",
        "instructions",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "max_output_tokens",
        "temperature",
        "top_p",
        "text",
        "reasoning",
        "stream",
        "store",
        "metadata",
        "include",
        "stream_options",
        "truncation",
        "background",
        "top_logprobs",
    }
)
# Accepted and without effect here, and why (docs/operations.md has the table).
IGNORED = {
    "user": "the team key identifies the caller",
    "safety_identifier": "the team key identifies the caller",
    "prompt_cache_key": "the engines cache prompt prefixes without being asked",
    "prompt_cache_retention": "the engines cache prompt prefixes without being asked",
    "service_tier": "the fleet's tier comes from the key and the X-Mlxfleet-Tier header",
}
STORAGE = "responses are not stored by this server; send the whole conversation as 'input'"
REFUSED = {
    "previous_response_id": STORAGE,
    "conversation": STORAGE,
    "prompt": "stored prompt templates are not supported",
    "max_tool_calls": "a cap on built-in tool calls has nothing to cap: no built-in tools run",
}
# include values: encrypted reasoning has nothing to hide (the think text comes in the clear,
# in the reasoning item's content); others name outputs of tools this server does not run.
INCLUDE_ACCEPTED = frozenset({"reasoning.encrypted_content"})
TEXT_ONLY = "the fleet's engines are text-only"
EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")


@dataclass(frozen=True, slots=True)
class ResponsesRequest:
    """A validated Responses body: the chat body for the engines, and what the response echoes."""

    model: str
    stream: bool
    max_tokens: int | None
    summary: bool  # reasoning.summary asked: the think section comes as the reasoning summary
    echo: dict[str, Any]  # request fields the response object repeats
    chat: dict[str, Any]


def _content_text(value: Any, param: str) -> str:
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise type_error(param, "a string or an array of content parts", value)
    texts = []
    for j, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text"):
            if not isinstance(part.get("text"), str):
                raise type_error(f"{param}[{j}].text", "a string", part.get("text"))
            texts.append(part["text"])
        elif kind == "refusal":
            texts.append(str(part.get("refusal", "")))
        elif kind in ("input_image", "input_file", "input_audio"):
            raise invalid(
                f"Invalid '{param}[{j}]': {kind} is not supported: {TEXT_ONLY}.", f"{param}[{j}]"
            )
        else:
            raise invalid(
                f"Invalid '{param}[{j}].type': unknown content type {kind!r}.", f"{param}[{j}].type"
            )
    return "".join(texts)


def _input(value: Any, instructions: Any) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if instructions is not None:
        if not isinstance(instructions, str):
            raise type_error("instructions", "a string", instructions)
        messages.append({"role": "system", "content": instructions})
    if isinstance(value, str):
        return [*messages, {"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise invalid("Invalid 'input': expected a string or a non-empty array of items.", "input")
    calls: set[str] = set()
    turn: dict[str, Any] | None = None  # the assistant turn a function_call item joins
    for i, item in enumerate(value):
        param = f"input[{i}]"
        if not isinstance(item, dict):
            raise type_error(param, "an object", item)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "function_call":
            call_id, name, arguments = item.get("call_id"), item.get("name"), item.get("arguments")
            if not (_text(call_id) and _text(name) and isinstance(arguments, str)):
                raise invalid(
                    f"Invalid '{param}': a function_call needs string 'call_id', 'name' and "
                    "'arguments'.",
                    param,
                )
            calls.add(str(call_id))
            function = {"name": name, "arguments": arguments}
            call = {"id": call_id, "type": "function", "function": function}
            if turn is None:  # calls after the model's text join its turn, as parallel calls do
                turn = {"role": "assistant", "content": None, "tool_calls": []}
                messages.append(turn)
            turn.setdefault("tool_calls", []).append(call)
            continue
        turn = None
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise invalid(f"Invalid '{param}.role': {role!r}.", f"{param}.role")
            text = _content_text(item.get("content"), f"{param}.content")
            messages.append({"role": role, "content": text})
            if role == "assistant":
                turn = messages[-1]
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if call_id not in calls:
                raise invalid(
                    f"Invalid '{param}.call_id': no function_call with call_id {call_id!r} comes "
                    "before this output.",
                    f"{param}.call_id",
                )
            output = _content_text(item.get("output"), f"{param}.output")
            messages.append({"role": "tool", "tool_call_id": call_id, "content": output})
        elif kind == "reasoning":
            # Past think sections are not shown to the model (open models' templates drop them).
            continue
        elif kind == "item_reference":
            raise invalid(
                f"Invalid '{param}': item references need stored items; {STORAGE}.", param
            )
        else:
            raise invalid(
                f"Invalid '{param}.type': unsupported input item type {kind!r}.", f"{param}.type"
            )
    return messages


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _tools(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise type_error("tools", "an array", value)
    tools = []
    for i, tool in enumerate(value):
        if not isinstance(tool, dict):
            raise type_error(f"tools[{i}]", "an object", tool)
        if tool.get("type") != "function":
            raise invalid(
                f"Invalid 'tools[{i}].type': {tool.get('type')!r} tools are not served here; only "
                "function tools (run by the client).",
                f"tools[{i}].type",
                "unsupported_parameter",
            )
        function = {"name": tool.get("name"), "parameters": tool.get("parameters")}
        if tool.get("description") is not None:
            function["description"] = tool["description"]
        if tool.get("strict") is not None:
            function["strict"] = tool["strict"]
        if function["parameters"] is None:
            function["parameters"] = {"type": "object", "properties": {}}
        tools.append({"type": "function", "function": function})
    return tools


def _tool_choice(value: Any) -> Any:
    if value in ("auto", "none", "required"):
        return value
    if isinstance(value, dict) and value.get("type") == "function":
        return {"type": "function", "function": {"name": value.get("name")}}
    raise invalid(
        f"Invalid 'tool_choice': {value!r}; expected 'auto', 'none', 'required' or a function.",
        "tool_choice",
    )


def _text_format(value: Any, chat: dict[str, Any]) -> None:
    """text.format (text, json_object, json_schema); text.verbosity has no effect."""
    if not isinstance(value, dict):
        raise type_error("text", "an object", value)
    fmt = value.get("format")
    if fmt is None:
        return
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return
    if kind == "json_object":
        chat["response_format"] = {"type": "json_object"}
    elif kind == "json_schema":
        schema = {"name": fmt.get("name"), "schema": fmt.get("schema")}
        for optional in ("description", "strict"):
            if fmt.get(optional) is not None:
                schema[optional] = fmt[optional]
        chat["response_format"] = {"type": "json_schema", "json_schema": schema}
    else:
        raise invalid(f"Invalid 'text.format.type': {kind!r}.", "text.format.type")


def _reasoning(value: Any, kwargs: dict[str, Any]) -> bool:
    """reasoning.effort switches a think section on or off (and is the reasoning_effort of
    templates that take one); reasoning.summary asks for the think text as the summary."""
    if not isinstance(value, dict):
        raise type_error("reasoning", "an object", value)
    effort = value.get("effort")
    if effort is not None:
        if effort not in EFFORTS:
            raise invalid(f"Invalid 'reasoning.effort': {effort!r}.", "reasoning.effort")
        kwargs["enable_thinking"] = effort not in ("none", "minimal")
        kwargs["reasoning_effort"] = effort
    summary = value.get("summary", value.get("generate_summary"))
    if summary not in (None, "auto", "concise", "detailed"):
        raise invalid(f"Invalid 'reasoning.summary': {summary!r}.", "reasoning.summary")
    return summary is not None


def _refuse(body: dict[str, Any]) -> None:
    for name, value in body.items():
        if name in REFUSED and value is not None:
            raise invalid(
                f"Unsupported parameter '{name}': {REFUSED[name]}.", name, "unsupported_parameter"
            )
        if name not in HONOURED and name not in IGNORED and name not in REFUSED:
            raise invalid(f"Unknown parameter: '{name}'.", name, "unknown_parameter")
    if body.get("store"):
        raise invalid(
            f"Unsupported value: 'store' true: {STORAGE} (send store: false).",
            "store",
            "unsupported_parameter",
        )
    if body.get("background"):
        raise invalid(
            "Unsupported value: 'background' true: answers are served in the request.",
            "background",
            "unsupported_parameter",
        )
    if body.get("truncation") not in (None, "disabled"):
        raise invalid(
            "Unsupported value: 'truncation' must be 'disabled': an over-long input is "
            "refused, not cut.",
            "truncation",
            "unsupported_parameter",
        )
    if body.get("top_logprobs") not in (None, 0):
        raise invalid(
            "Unsupported parameter 'top_logprobs' on /v1/responses; chat completions serves "
            "logprobs.",
            "top_logprobs",
            "unsupported_parameter",
        )
    include = body.get("include")
    if include is not None:
        if not isinstance(include, list):
            raise type_error("include", "an array", include)
        for value in include:
            if value not in INCLUDE_ACCEPTED:
                raise invalid(
                    f"Unsupported value in 'include': {value!r}.",
                    "include",
                    "unsupported_parameter",
                )


def parse_responses_request(body: dict[str, Any]) -> ResponsesRequest:
    """Validate a Responses body and map it onto a chat body."""
    _refuse(body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("Missing required parameter: 'model'.", "model", "missing_required_parameter")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise type_error("stream", "a boolean", stream)
    chat: dict[str, Any] = {
        "model": model,
        "messages": _input(body.get("input"), body.get("instructions")),
    }
    max_tokens = body.get("max_output_tokens")
    if max_tokens is not None:
        if not is_int(max_tokens) or max_tokens < 1:
            raise invalid(
                f"Invalid 'max_output_tokens': {max_tokens!r}; expected an integer >= 1.",
                "max_output_tokens",
            )
        chat["max_tokens"] = max_tokens
    if stream:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    for name, high in (("temperature", 2.0), ("top_p", 1.0)):
        value = body.get(name)
        if value is not None:
            if not is_number(value) or not 0 <= value <= high:
                raise invalid(
                    f"Invalid '{name}': {value!r}; expected a number from 0 to {high}.", name
                )
            chat[name] = value
    if body.get("tools") is not None:
        chat["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    if body.get("parallel_tool_calls") is not None:
        chat["parallel_tool_calls"] = body["parallel_tool_calls"]
    if body.get("text") is not None:
        _text_format(body["text"], chat)
    kwargs: dict[str, Any] = {}
    summary = _reasoning(body["reasoning"], kwargs) if body.get("reasoning") is not None else False
    if kwargs:
        chat["chat_template_kwargs"] = kwargs
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise type_error("metadata", "an object", metadata)
    echo = {
        "instructions": body.get("instructions"),
        "max_output_tokens": max_tokens,
        "metadata": metadata or {},
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "reasoning": {
            "effort": (body.get("reasoning") or {}).get("effort"),
            "summary": (body.get("reasoning") or {}).get("summary"),
        },
        "temperature": body.get("temperature", 1.0),
        "text": {"format": ((body.get("text") or {}).get("format") or {"type": "text"})},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
        "top_p": body.get("top_p", 1.0),
    }
    return ResponsesRequest(model, stream, max_tokens, summary, echo, chat)


CHAT_FIELD_NAMES = (
    ("].function.parameters", "].parameters"),
    ("].function.name", "].name"),
    ("response_format", "text.format"),
    ("'max_tokens'", "'max_output_tokens'"),
)


def in_responses_terms(err: ApiError) -> ApiError:
    """An error of the shared chat validation, naming the Responses field the client sent."""
    message, param = err.message, err.param
    for ours, theirs in CHAT_FIELD_NAMES:
        message = message.replace(ours, theirs)
        param = param.replace(ours, theirs) if param else param
    if param and param.startswith("messages"):
        param = "input"  # message indexes differ once instructions and items are mapped
    return ApiError(
        err.status, message, type=err.type, param=param, code=err.code, headers=err.headers
    )
