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
    ({"messages": USER, "logprobs": True}, 400, "unsupported_parameter", "logprobs"),
    ({"messages": USER, "ignore_eos": "yes"}, 400, "invalid_type", "ignore_eos"),
]


@pytest.mark.parametrize(("body", "status", "code", "param"), BAD_CHAT)
def test_bad_chat_requests_are_refused(body: dict, status: int, code: str, param: str) -> None:
    with pytest.raises(ApiError) as info:
        parse_chat_request(body)
    assert (info.value.status, info.value.code, info.value.param) == (status, code, param)
    assert info.value.type == "invalid_request_error"


BAD_COMPLETION = [
    ({}, "invalid_type", "prompt"),
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
