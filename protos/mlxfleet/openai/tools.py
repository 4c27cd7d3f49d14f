"""Tool calling on the wire: `tools`, `tool_choice`, `parallel_tool_calls`, and the
assistant `tool_calls` and `tool` messages of a conversation's history. Pure validation."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from mlxfleet.errors import ApiError
from mlxfleet.openai.sampling import type_error

FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
MAX_TOOLS = 128  # OpenAI's limit
NONE, AUTO, REQUIRED = "none", "auto", "required"


@dataclass(frozen=True, slots=True)
class Tool:
    """One function the model may call; `parameters` is its JSON schema (an object)."""

    name: str
    description: str | None
    parameters: dict[str, Any]
    strict: bool = False

    def as_template(self) -> dict[str, Any]:
        """The shape chat templates (and OpenAI) use."""
        function: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description is not None:
            function["description"] = self.description
        return {"type": "function", "function": function}


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call to one function: one the model just made, or one in the history's assistant
    turns. `arguments` is JSON text, as OpenAI's clients send and expect it."""

    id: str
    name: str
    arguments: str

    def as_template(self) -> dict[str, Any]:
        # Templates (Qwen2.5's, Hermes') render the arguments as an object, as mlx_lm.server
        # hands them over.
        function = {"name": self.name, "arguments": json.loads(self.arguments)}
        return {"id": self.id, "type": "function", "function": function}

    def whole(self) -> dict[str, Any]:
        """The call in a non-streamed `message.tool_calls`."""
        function = {"name": self.name, "arguments": self.arguments}
        return {"id": self.id, "type": "function", "function": function}

    def stream_head(self, index: int) -> dict[str, Any]:
        """The first streamed piece of a call: index, id, type and name (OpenAI's order)."""
        function = {"name": self.name, "arguments": ""}
        return {"index": index, "id": self.id, "type": "function", "function": function}

    def stream_arguments(self, index: int) -> dict[str, Any]:
        return {"index": index, "function": {"arguments": self.arguments}}


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """`mode` none, auto or required; `name` set when one function is named (mode required)."""

    mode: str
    name: str | None = None


def _invalid(message: str, param: str) -> ApiError:
    return ApiError.invalid(message, param, "invalid_value")


def _function_name(value: Any, param: str) -> str:
    if not isinstance(value, str) or not FUNCTION_NAME.match(value):
        raise _invalid(
            f"Invalid '{param}': {value!r}; a function name is 1 to 64 letters, digits, '_' "
            "or '-'.",
            param,
        )
    return value


def _parse_tool(i: int, item: Any) -> Tool:
    param = f"tools[{i}]"
    if not isinstance(item, dict):
        raise type_error(param, "an object", item)
    if item.get("type") != "function":
        raise _invalid(f"Invalid '{param}.type': {item.get('type')!r}; expected 'function'.", param)
    function = item.get("function")
    if not isinstance(function, dict):
        raise type_error(f"{param}.function", "an object", function)
    name = _function_name(function.get("name"), f"{param}.function.name")
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise type_error(f"{param}.function.description", "a string", description)
    parameters = function.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict):
        raise type_error(f"{param}.function.parameters", "a JSON schema object", parameters)
    if parameters.get("type", "object") != "object":
        raise _invalid(
            f"Invalid '{param}.function.parameters': the schema's type must be 'object' (the "
            f"arguments are an object), not {parameters.get('type')!r}.",
            f"{param}.function.parameters",
        )
    strict = function.get("strict", False)
    if not isinstance(strict, bool):
        raise type_error(f"{param}.function.strict", "a boolean", strict)
    return Tool(name, description, parameters, strict)


def parse_tools(value: Any) -> tuple[Tool, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise type_error("tools", "an array of tools", value)
    if len(value) > MAX_TOOLS:
        raise _invalid(f"Invalid 'tools': at most {MAX_TOOLS} tools, got {len(value)}.", "tools")
    tools = tuple(_parse_tool(i, item) for i, item in enumerate(value))
    names = [t.name for t in tools]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise _invalid(f"Invalid 'tools': the function name {duplicate!r} is used twice.", "tools")
    return tools


def parse_tool_choice(value: Any, tools: tuple[Tool, ...]) -> ToolChoice:
    """OpenAI's default: auto with tools, none without."""
    if value is None:
        return ToolChoice(AUTO if tools else NONE)
    if isinstance(value, str):
        if value not in (NONE, AUTO, REQUIRED):
            raise _invalid(
                f"Invalid 'tool_choice': {value!r}; expected 'none', 'auto', 'required' or "
                "a function.",
                "tool_choice",
            )
        choice = ToolChoice(value)
    elif isinstance(value, dict) and value.get("type") == "function":
        function = value.get("function")
        if not isinstance(function, dict):
            raise type_error("tool_choice.function", "an object", function)
        name = _function_name(function.get("name"), "tool_choice.function.name")
        if name not in {t.name for t in tools}:
            raise _invalid(
                f"Invalid 'tool_choice': the function {name!r} is not in 'tools'.", "tool_choice"
            )
        choice = ToolChoice(REQUIRED, name)
    else:
        raise type_error("tool_choice", "a string or a function object", value)
    if choice.mode == REQUIRED and not tools:
        raise _invalid("Invalid 'tool_choice': it requires 'tools'.", "tool_choice")
    return choice


def parse_parallel_tool_calls(value: Any) -> bool:
    if value is None:
        return True
    if not isinstance(value, bool):
        raise type_error("parallel_tool_calls", "a boolean", value)
    return value


def parse_tool_calls(index: int, value: Any) -> tuple[ToolCall, ...]:
    """An assistant message's `tool_calls` (the history of a tool-using conversation)."""
    param = f"messages[{index}].tool_calls"
    if value is None:
        return ()
    if not isinstance(value, list):
        raise type_error(param, "an array of tool calls", value)
    calls = []
    for j, item in enumerate(value):
        p = f"{param}[{j}]"
        if not isinstance(item, dict):
            raise type_error(p, "an object", item)
        call_id = item.get("id")
        if not isinstance(call_id, str) or not call_id:
            raise type_error(f"{p}.id", "a non-empty string", call_id)
        function = item.get("function")
        if not isinstance(function, dict):
            raise type_error(f"{p}.function", "an object", function)
        name = _function_name(function.get("name"), f"{p}.function.name")
        arguments = function.get("arguments")
        if not isinstance(arguments, str):
            raise type_error(f"{p}.function.arguments", "a JSON string", arguments)
        try:
            decoded = json.loads(arguments)
        except ValueError:
            decoded = None
        if not isinstance(decoded, dict):
            raise _invalid(
                f"Invalid '{p}.function.arguments': it must be a JSON object, as text.",
                f"{p}.function.arguments",
            )
        calls.append(ToolCall(call_id, name, arguments))
    return tuple(calls)


def parse_template_kwargs(value: Any) -> dict[str, Any]:
    """`chat_template_kwargs` (vLLM's field): extra variables for the model's chat template,
    e.g. {"enable_thinking": false}."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise type_error("chat_template_kwargs", "an object", value)
    reserved = {"messages", "tools", "add_generation_prompt", "tokenize"} & set(value)
    if reserved:
        raise _invalid(
            f"Invalid 'chat_template_kwargs': {sorted(reserved)[0]!r} is set by the server.",
            "chat_template_kwargs",
        )
    return dict(value)
