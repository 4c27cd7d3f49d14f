"""Structured output on the wire: `response_format` (text, json_object, json_schema). Pure
validation of its shape; whether a schema compiles is the engine's to say (it has the
grammar library and the tokenizer)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from mlxfleet.openai.sampling import invalid, type_error
from mlxfleet.openai.tools import FUNCTION_NAME

FormatType = Literal["text", "json_object", "json_schema"]


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """`schema` is set for json_schema; json_object means any JSON object."""

    type: FormatType = "text"
    schema: dict[str, Any] | None = None
    name: str | None = None
    strict: bool = False

    @property
    def constrained(self) -> bool:
        return self.type != "text"


def parse_response_format(value: Any) -> ResponseFormat:
    param = "response_format"
    if value is None:
        return ResponseFormat()
    if not isinstance(value, dict):
        raise type_error(param, "an object", value)
    kind = value.get("type")
    if kind == "text":
        return ResponseFormat()
    if kind == "json_object":
        return ResponseFormat("json_object")
    if kind != "json_schema":
        expected = "expected 'text', 'json_object' or 'json_schema'"
        raise invalid(f"Invalid '{param}.type': {kind!r}; {expected}.", f"{param}.type")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise type_error(f"{param}.json_schema", "an object", spec)
    name = spec.get("name")
    if not isinstance(name, str) or not FUNCTION_NAME.match(name):
        rule = "1 to 64 letters, digits, '_' or '-'"
        raise invalid(
            f"Invalid '{param}.json_schema.name': {name!r}; {rule}.", f"{param}.json_schema.name"
        )
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise type_error(f"{param}.json_schema.schema", "a JSON schema object", schema)
    strict = spec.get("strict", False)
    if strict is None:
        strict = False
    if not isinstance(strict, bool):
        raise type_error(f"{param}.json_schema.strict", "a boolean", strict)
    return ResponseFormat("json_schema", schema, name, strict)
