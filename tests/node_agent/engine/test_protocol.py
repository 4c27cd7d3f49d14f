"""Request validation and response shapes: pure functions, no model."""

from __future__ import annotations

import json

import pytest

from mlxfleet.errors import ApiError
from mlxfleet.openai.protocol import (
    Message,
    parse_chat_request,
    parse_completion_request,
    parse_json_body,
    resolve_max_tokens,
)
from mlxfleet.openai.responses import ResponseHeader, Usage, chunk, full_response, usage_chunk

USER = [{"role": "user", "content": "hi"}]

# (body, status, code, param)
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
BAD_CHAT = [
    ({}, 400, "invalid_type", "messages"),
    ({"messages": []}, 400, "invalid_value", "messages"),
    ({"messages": "hi"}, 400, "invalid_type", "messages"),
    ({"messages": ["hi"]}, 400, "invalid_type", "messages[0]"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "invalid_value", "messages[0].role"),
    ({"messages": [{"content": "x"}]}, 400, "invalid_value", "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "invalid_type", "messages[0].content"),
    ({"messages": [{"role": "user"}]}, 400, "invalid_type", "messages[0].content"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        400,
        "invalid_value",
        "messages[0].content[0]",
    ),
    ({"messages": USER, "max_tokens": -1}, 400, "integer_below_min_value", "max_tokens"),
    ({"messages": USER, "max_tokens": 0}, 400, "integer_below_min_value", "max_tokens"),
    ({"messages": USER, "max_tokens": 1.5}, 400, "invalid_type", "max_tokens"),
    ({"messages": USER, "max_tokens": True}, 400, "invalid_type", "max_tokens"),
    ({"messages": USER, "max_tokens": "10"}, 400, "invalid_type", "max_tokens"),
    (
        {"messages": USER, "max_completion_tokens": -5},
        400,
        "integer_below_min_value",
        "max_completion_tokens",
    ),
    ({"messages": USER, "temperature": 2.5}, 400, "invalid_value", "temperature"),
    ({"messages": USER, "temperature": -0.1}, 400, "invalid_value", "temperature"),
    ({"messages": USER, "temperature": "hot"}, 400, "invalid_type", "temperature"),
    ({"messages": USER, "top_p": 0}, 400, "invalid_value", "top_p"),
    ({"messages": USER, "top_p": 1.01}, 400, "invalid_value", "top_p"),
    ({"messages": USER, "n": 2}, 400, "unsupported_parameter", "n"),
    ({"messages": USER, "n": 0}, 400, "integer_below_min_value", "n"),
    ({"messages": USER, "stop": 7}, 400, "invalid_type", "stop"),
    ({"messages": USER, "stop": ["a", 1]}, 400, "invalid_type", "stop"),
    ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, 400, "array_above_max_length", "stop"),
    ({"messages": USER, "seed": 1.0}, 400, "invalid_type", "seed"),
    ({"messages": USER, "seed": "1"}, 400, "invalid_type", "seed"),
    ({"messages": USER, "stream": "yes"}, 400, "invalid_type", "stream"),
    ({"messages": USER, "stream": 1}, 400, "invalid_type", "stream"),
    ({"messages": USER, "stream_options": []}, 400, "invalid_type", "stream_options"),
    ({"messages": USER, "model": 3}, 400, "invalid_type", "model"),
    ({"messages": USER, "logprobs": 1}, 400, "invalid_type", "logprobs"),
    (
        {"messages": USER, "logprobs": True, "top_logprobs": 21},
        400,
        "invalid_value",
        "top_logprobs",
    ),
    (
        {"messages": USER, "logprobs": True, "top_logprobs": -1},
        400,
        "invalid_value",
        "top_logprobs",
    ),
    ({"messages": USER, "top_logprobs": 3}, 400, "invalid_value", "top_logprobs"),
    (
        {"messages": USER, "logprobs": True, "top_logprobs": 2.0},
        400,
        "invalid_type",
        "top_logprobs",
    ),
    ({"messages": USER, "logit_bias": {"5": 101}}, 400, "invalid_value", "logit_bias"),
    ({"messages": USER, "logit_bias": {"5": -100.5}}, 400, "invalid_value", "logit_bias"),
    ({"messages": USER, "logit_bias": {"five": 1}}, 400, "invalid_value", "logit_bias"),
    ({"messages": USER, "logit_bias": {"-5": 1}}, 400, "invalid_value", "logit_bias"),
    ({"messages": USER, "logit_bias": [5, 1]}, 400, "invalid_type", "logit_bias"),
    ({"messages": USER, "logit_bias": {"5": "1"}}, 400, "invalid_value", "logit_bias"),
    ({"messages": USER, "top_k": -2}, 400, "invalid_value", "top_k"),
    ({"messages": USER, "response_format": "json"}, 400, "invalid_type", "response_format"),
    (
        {"messages": USER, "response_format": {"type": "json_schema"}},
        400,
        "invalid_type",
        "response_format.json_schema",
    ),
    (
        {
            "messages": USER,
            "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": [1]}},
        },
        400,
        "invalid_type",
        "response_format.json_schema.schema",
    ),
    (
        {"messages": USER, "response_format": {"type": "json_object"}, "tools": [TOOL]},
        400,
        "unsupported_parameter",
        "response_format",
    ),
    ({"messages": USER, "tools": {"a": 1}}, 400, "invalid_type", "tools"),
    ({"messages": USER, "tools": [{"type": "retrieval"}]}, 400, "invalid_value", "tools[0]"),
    (
        {"messages": USER, "tools": [TOOL | {"function": {"name": "a b"}}]},
        400,
        "invalid_value",
        "tools[0].function.name",
    ),
    (
        {"messages": USER, "tools": [TOOL], "tool_choice": "always"},
        400,
        "invalid_value",
        "tool_choice",
    ),
    ({"messages": USER, "tool_choice": "required"}, 400, "invalid_value", "tool_choice"),
    (
        {"messages": USER, "tools": [TOOL], "parallel_tool_calls": "no"},
        400,
        "invalid_type",
        "parallel_tool_calls",
    ),
    (
        {"messages": USER, "chat_template_kwargs": {"tools": []}},
        400,
        "invalid_value",
        "chat_template_kwargs",
    ),
    ({"messages": USER, "chat_template_kwargs": "x"}, 400, "invalid_type", "chat_template_kwargs"),
    (
        {
            "messages": [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "f", "arguments": "[1]"},
                        }
                    ],
                }
            ]
        },
        400,
        "invalid_value",
        "messages[0].tool_calls[0].function.arguments",
    ),
    (
        {
            "messages": [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"type": "function", "function": {"name": "f", "arguments": "{}"}}
                    ],
                }
            ]
        },
        400,
        "invalid_type",
        "messages[0].tool_calls[0].id",
    ),
    (
        {"messages": [{"role": "tool", "content": "x"}]},
        400,
        "invalid_value",
        "messages[0].tool_call_id",
    ),
    ({"messages": USER, "audio": {"voice": "alloy"}}, 400, "unsupported_parameter", "audio"),
    (
        {"messages": USER, "modalities": ["text", "audio"]},
        400,
        "unsupported_parameter",
        "modalities",
    ),
    ({"messages": USER, "functions": [{"name": "f"}]}, 400, "unsupported_parameter", "functions"),
    (
        {"messages": USER, "web_search_options": {}},
        400,
        "unsupported_parameter",
        "web_search_options",
    ),
    ({"messages": USER, "top_k": 1.5}, 400, "invalid_type", "top_k"),
    ({"messages": USER, "min_p": 1.5}, 400, "invalid_value", "min_p"),
    ({"messages": USER, "repetition_penalty": 0}, 400, "invalid_value", "repetition_penalty"),
    ({"messages": USER, "presence_penalty": 2.5}, 400, "invalid_value", "presence_penalty"),
    ({"messages": USER, "frequency_penalty": -3}, 400, "invalid_value", "frequency_penalty"),
    ({"messages": USER, "frequency_penalty": "x"}, 400, "invalid_type", "frequency_penalty"),
    ({"messages": USER, "ignore_eos": "yes"}, 400, "invalid_type", "ignore_eos"),
]


@pytest.mark.parametrize(("body", "status", "code", "param"), BAD_CHAT)
def test_bad_chat_requests_are_refused(body: dict, status: int, code: str, param: str) -> None:
    with pytest.raises(ApiError) as info:
        parse_chat_request(body)
    assert (info.value.status, info.value.code, info.value.param) == (status, code, param)
    assert info.value.type == "invalid_request_error"


def test_tools_and_their_history_are_parsed_whole() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    request = parse_chat_request(
        {
            "messages": [
                *USER,
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "name": "f", "content": "2"},
            ],
            "tools": [TOOL],
            "parallel_tool_calls": False,
            "chat_template_kwargs": {"enable_thinking": False},
        }
    )
    assert request.tools_on and request.tool_choice.mode == "auto"
    assert (request.parallel_tool_calls, request.template_kwargs) == (
        False,
        {"enable_thinking": False},
    )
    assistant, tool = (m.as_template() for m in request.messages[1:])
    assert assistant == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}
        ],
    }
    assert tool == {"role": "tool", "content": "2", "tool_call_id": "c1", "name": "f"}
    assert request.tools[0].as_template() == TOOL
    named = {"type": "function", "function": {"name": "f"}}
    forced = parse_chat_request({"messages": USER, "tools": [TOOL], "tool_choice": named})
    assert (forced.tool_choice.mode, forced.tool_choice.name) == ("required", "f")
    required = parse_chat_request({"messages": USER, "tools": [TOOL], "tool_choice": "required"})
    assert (required.tool_choice.mode, required.tool_choice.name) == ("required", None)
    off = parse_chat_request({"messages": USER, "tools": [TOOL], "tool_choice": "none"})
    assert not off.tools_on and not parse_chat_request({"messages": USER}).tools_on


def test_every_sampling_control_is_parsed_and_the_defaults_are_off() -> None:
    params = parse_chat_request(
        {
            "messages": USER,
            "top_k": 40,
            "min_p": 0.05,
            "repetition_penalty": 1.1,
            "presence_penalty": 0.5,
            "frequency_penalty": -0.5,
            "logit_bias": {"17": -100, "3": 2.5},
            "logprobs": True,
            "top_logprobs": 20,
        }
    ).params
    assert (params.top_k, params.min_p, params.repetition_penalty) == (40, 0.05, 1.1)
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -0.5)
    assert params.logit_bias == ((3, 2.5), (17, -100.0))
    assert (params.logprobs, params.top_logprobs, params.needs_processors) == (True, 20, True)
    plain = parse_chat_request({"messages": USER}).params
    assert (plain.top_k, plain.min_p, plain.repetition_penalty, plain.logit_bias) == (0, 0, 1, ())
    assert (plain.logprobs, plain.top_logprobs, plain.needs_processors) == (False, 0, False)
    assert parse_chat_request({"messages": USER, "top_k": -1}).params.top_k == 0  # vLLM's "off"
    legacy = parse_completion_request({"prompt": "x", "logprobs": 3}).params
    assert (legacy.logprobs, legacy.top_logprobs) == (True, 3)
    assert parse_completion_request({"prompt": "x", "logprobs": 0}).params.logprobs is True


BAD_COMPLETION = [
    ({}, "invalid_type", "prompt"),
    ({"prompt": "x", "logprobs": 6}, "invalid_value", "logprobs"),
    ({"prompt": "x", "logprobs": True}, "invalid_type", "logprobs"),
    ({"prompt": "x", "top_logprobs": 2}, "unsupported_parameter", "top_logprobs"),
    ({"prompt": "x", "suffix": "end"}, "unsupported_parameter", "suffix"),
    (
        {"prompt": "x", "response_format": {"type": "json_object"}},
        "unsupported_parameter",
        "response_format",
    ),
    ({"prompt": "x", "best_of": 3}, "unsupported_parameter", "best_of"),
    ({"prompt": ""}, "invalid_value", "prompt"),
    ({"prompt": ["a", "b"]}, "invalid_type", "prompt"),
    ({"prompt": [1, -2]}, "invalid_type", "prompt"),
    ({"prompt": "x", "echo": True}, "unsupported_parameter", "echo"),
    ({"prompt": "x", "temperature": 3}, "invalid_value", "temperature"),
]


@pytest.mark.parametrize(("body", "code", "param"), BAD_COMPLETION)
def test_bad_completion_requests_are_refused(body: dict, code: str, param: str) -> None:
    with pytest.raises(ApiError) as info:
        parse_completion_request(body)
    assert (info.value.status, info.value.code, info.value.param) == (400, code, param)


@pytest.mark.parametrize("raw", [b"{", b"[1, 2]", b"\xff\xfe", b'"text"', b""])
def test_body_must_be_one_json_object(raw: bytes) -> None:
    with pytest.raises(ApiError) as info:
        parse_json_body(raw)
    assert (info.value.status, info.value.code, info.value.param) == (400, "invalid_json", None)


def test_good_chat_request_is_normalized() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "developer", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
            {"role": "assistant", "content": None},
        ],
        "max_tokens": 5,
        "max_completion_tokens": 7,
        "temperature": 0,
        "top_p": 0.5,
        "seed": -3,
        "stop": "x",
        "stream": True,
        "stream_options": {"include_usage": True},
        "n": 1,
        "ignore_eos": True,
    }
    req = parse_chat_request(body)
    assert req.messages == (
        Message("developer", "be brief"),
        Message("user", "ab"),
        Message("assistant", ""),
    )
    assert req.params.max_tokens == 7  # max_completion_tokens wins over max_tokens
    assert (req.params.temperature, req.params.top_p, req.params.seed) == (0.0, 0.5, -3)
    assert req.params.stop == ("x",) and req.params.ignore_eos
    assert (req.stream, req.include_usage, req.model) == (True, True, "m")


def test_defaults_leave_max_tokens_to_the_engine() -> None:
    req = parse_completion_request({"prompt": "hello", "stop": ["", "b"]})
    assert req.params.max_tokens is None
    assert (req.params.temperature, req.params.top_p, req.params.seed) == (1.0, 1.0, None)
    assert req.params.stop == ("b",)
    assert (req.stream, req.include_usage, req.params.ignore_eos) == (False, False, False)
    assert parse_completion_request({"prompt": [5, 6]}).prompt == (5, 6)
    assert parse_completion_request({"prompt": ["one"]}).prompt == "one"


def test_context_length_is_checked_after_tokenizing() -> None:
    assert resolve_max_tokens(10, None, 100, "messages") == 90
    assert resolve_max_tokens(10, 90, 100, "messages") == 90
    with pytest.raises(ApiError) as info:
        resolve_max_tokens(10, 91, 100, "messages")
    assert (info.value.code, info.value.param, info.value.status) == (
        "context_length_exceeded",
        "messages",
        400,
    )
    with pytest.raises(ApiError) as info:
        resolve_max_tokens(100, None, 100, "prompt")
    assert (info.value.code, info.value.param) == ("context_length_exceeded", "prompt")


def test_response_shapes_match_openai() -> None:
    header = ResponseHeader.new("chat", "demo")
    body = full_response(header, "hi", "stop", Usage(3, 2), [7, 8])
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert body["mlxfleet"] == {"token_ids": [7, 8]}
    first = chunk(header, "", first=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunk(header, "x")["choices"][0]["delta"] == {"content": "x"}
    assert chunk(header, "", "length")["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "length",
    }
    assert usage_chunk(header, Usage(1, 1))["choices"] == []
    text = ResponseHeader.new("completion", "demo")
    assert chunk(text, "y")["object"] == "text_completion"
    assert chunk(text, "y")["id"].startswith("cmpl-")
    json.dumps(body)


@pytest.mark.parametrize("parse", [parse_chat_request, parse_completion_request])
def test_a_field_we_do_not_know_is_refused_never_ignored(parse: object) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "prompt": "hi"}
    with pytest.raises(ApiError) as info:
        parse({**body, "frobnicate": 1})  # type: ignore[operator]
    assert (info.value.status, info.value.param, info.value.code) == (
        400,
        "frobnicate",
        "unknown_parameter",
    )
    assert "frobnicate" in info.value.message
    # The bookkeeping fields of OpenAI's API are accepted (docs/operations.md says why).
    parse({**body, "user": "u", "metadata": {"a": "b"}, "store": False})  # type: ignore[operator]
