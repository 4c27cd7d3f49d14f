"""OpenAI Responses on the wire, without I/O: input items mapped onto chat messages, and a chat
stream turned into the typed events whose last one carries the same response a whole answer
gives."""

from __future__ import annotations

from typing import Any

import pytest

from mlxfleet.dialects.chat_answer import read_answer
from mlxfleet.dialects.responses_answer import ResponsesStream, whole_response
from mlxfleet.dialects.responses_request import in_responses_terms
from mlxfleet.dialects.responses_request import parse_responses_request as parse
from mlxfleet.errors import ApiError
from mlxfleet.openai.protocol import parse_chat_request
from mlxfleet.openai.responses import SSE_DONE, Usage, chunk, sse
from tests.mlxfleet.chat_streams import HEADER, named_events, tool_call_stream, whole_answer


def events(raw: bytes) -> list[dict[str, Any]]:
    """The payloads; each event's name is its payload's type."""
    out = named_events(raw)
    assert all(name == payload["type"] for name, payload in out)
    return [payload for _, payload in out]


TOOL = {"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": True}


def call(call_id: str) -> dict[str, Any]:
    return {"type": "function_call", "call_id": call_id, "name": "f", "arguments": "{}"}


def test_input_items_map_onto_chat_turns() -> None:
    request = parse(
        {
            "model": "m",
            "instructions": "Be brief.",
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
                {"type": "reasoning", "id": "rs_1", "summary": []},
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "Checking."}],
                },
                call("c1"),
                call("c2"),
                {"type": "function_call_output", "call_id": "c1", "output": "one"},
                {"type": "function_call_output", "call_id": "c2", "output": "two"},
                {"role": "developer", "content": "Now answer."},
            ],
            "tools": [TOOL],
            "tool_choice": {"type": "function", "name": "f"},
            "max_output_tokens": 50,
            "store": False,
            "include": ["reasoning.encrypted_content"],
            "prompt_cache_key": "k",
        }
    )
    calls = [
        {"id": c, "type": "function", "function": {"name": "f", "arguments": "{}"}}
        for c in ("c1", "c2")
    ]
    assert request.chat["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        # The model's text and both its calls are one assistant turn; reasoning is dropped.
        {"role": "assistant", "content": "Checking.", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
        {"role": "developer", "content": "Now answer."},
    ]
    assert request.chat["tools"] == [
        {
            "type": "function",
            "function": {"name": "f", "parameters": {"type": "object"}, "strict": True},
        }
    ]
    assert request.chat["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert (request.chat["max_tokens"], request.max_tokens) == (50, 50)
    parse_chat_request(request.chat)  # the engines accept what the adapter makes


def test_text_format_and_reasoning_map_onto_the_grammar_and_the_template() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    request = parse(
        {
            "model": "m",
            "input": "x",
            "text": {"format": {"type": "json_schema", "name": "s", "schema": schema}},
            "reasoning": {"effort": "none", "summary": "auto"},
        }
    )
    assert request.chat["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "s", "schema": schema},
    }
    kwargs = request.chat["chat_template_kwargs"]
    assert kwargs == {"enable_thinking": False, "reasoning_effort": "none"}
    assert request.summary
    assert request.echo["text"]["format"]["name"] == "s"
    json_object = parse({"model": "m", "input": "x", "text": {"format": {"type": "json_object"}}})
    assert json_object.chat["response_format"] == {"type": "json_object"}


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id", "unsupported_parameter"),
        ({"conversation": "conv_1"}, "conversation", "unsupported_parameter"),
        ({"store": True}, "store", "unsupported_parameter"),
        ({"background": True}, "background", "unsupported_parameter"),
        ({"truncation": "auto"}, "truncation", "unsupported_parameter"),
        ({"include": ["file_search_call.results"]}, "include", "unsupported_parameter"),
        ({"seed": 1}, "seed", "unknown_parameter"),
        ({"input": []}, "input", "invalid_value"),
        (
            {"input": [{"type": "function_call_output", "call_id": "c", "output": ""}]},
            "input[0].call_id",
            "invalid_value",
        ),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]", "invalid_value"),
        ({"input": [{"type": "computer_call"}]}, "input[0].type", "invalid_value"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file"}]}]},
            "input[0].content[0]",
            "invalid_value",
        ),
        ({"tools": [{"type": "file_search"}]}, "tools[0].type", "unsupported_parameter"),
        ({"temperature": 3}, "temperature", "invalid_value"),
        ({"max_output_tokens": 0}, "max_output_tokens", "invalid_value"),
        ({"reasoning": {"effort": "huge"}}, "reasoning.effort", "invalid_value"),
    ],
)
def test_bad_bodies_are_refused_naming_the_field(
    fields: dict[str, Any], param: str, code: str
) -> None:
    with pytest.raises(ApiError) as info:
        parse({"model": "m", "input": "hi"} | fields)
    assert (info.value.status, info.value.param, info.value.code) == (400, param, code)


def test_chat_validation_errors_name_the_responses_fields() -> None:
    request = parse(
        {"model": "m", "input": "x", "tools": [TOOL | {"parameters": {"type": "array"}}]}
    )
    with pytest.raises(ApiError) as info:
        parse_chat_request(request.chat)
    renamed = in_responses_terms(info.value)
    assert renamed.param == "tools[0].parameters" and "function" not in renamed.message


ECHO = parse({"model": "m", "input": "x"}).echo


@pytest.mark.parametrize("summary", [False, True])
def test_a_chat_stream_becomes_typed_events_ending_in_the_whole_response(summary: bool) -> None:
    translator = ResponsesStream("m", ECHO, summary)
    out = events(b"".join(translator.feed(e) for e in tool_call_stream()))
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    reasoning_delta = (
        "response.reasoning_summary_text.delta" if summary else "response.reasoning_text.delta"
    )
    kinds = [e["type"] for e in out]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds.count(reasoning_delta) == 2
    assert kinds.count("response.output_text.delta") == 1
    assert kinds.count("response.function_call_arguments.delta") == 2
    assert kinds.count("response.output_item.done") == 3
    assert kinds[-1] == "response.completed"
    final = out[-1]["response"]
    assert final == whole_response(read_answer(whole_answer()), "m", ECHO, summary)
    assert [i["id"] for i in final["output"]] == ["rs_abc_0", "msg_abc_1", "fc_abc_2"]
    assert final["usage"]["total_tokens"] == 16 and final["status"] == "completed"


def test_a_cut_answer_is_incomplete_and_a_failed_stream_says_so() -> None:
    translator = ResponsesStream("m", ECHO, False)
    out = translator.feed(sse(chunk(HEADER, "", first=True)) + sse(chunk(HEADER, "Hi")))
    out += translator.feed(sse(chunk(HEADER, "", "length", usage=Usage(3, 1))) + SSE_DONE)
    last = events(out)[-1]
    assert last["type"] == "response.incomplete"
    assert last["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    failing = ResponsesStream("m", ECHO, False)
    failing.feed(sse(chunk(HEADER, "", first=True)))
    [failed] = events(failing.failed(ApiError(502, "engines stopped")))
    assert failed["type"] == "response.failed"
    assert failed["response"]["error"] == {"code": "server_error", "message": "engines stopped"}
