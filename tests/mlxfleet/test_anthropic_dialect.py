"""Anthropic Messages on the wire, without I/O: a body mapped onto the chat body the engines
run, and a chat stream (as our engines and LiteLLM write it) turned into Anthropic's events."""

from __future__ import annotations

import re
from typing import Any

import pytest

from mlxfleet.dialects import chat_answer
from mlxfleet.dialects.anthropic_answer import MessagesStream, whole_message
from mlxfleet.dialects.anthropic_request import error_body, in_anthropic_terms
from mlxfleet.dialects.anthropic_request import parse_messages_request as parse
from mlxfleet.dialects.chat_answer import read_answer
from mlxfleet.dialects.responses_answer import ResponsesStream, whole_response
from mlxfleet.errors import ApiError
from mlxfleet.openai.protocol import parse_chat_request
from mlxfleet.openai.responses import SSE_DONE, Usage, chunk, sse
from tests.mlxfleet.chat_streams import HEADER, named_events, tool_call_stream, whole_answer

TOOL = {"name": "get_weather", "input_schema": {"type": "object"}}
USER = {"role": "user", "content": "hi"}


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 16, "messages": [USER]} | fields


def test_a_conversation_with_tools_maps_onto_chat_messages() -> None:
    request = parse(
        body(
            system=[{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}],
            messages=[
                USER,
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "hmm", "signature": "s"},
                        {"type": "text", "text": "Checking."},
                        {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"c": 1}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "t1", "content": "sunny"},
                        {"type": "text", "text": "And tomorrow?"},
                    ],
                },
            ],
            tools=[TOOL | {"description": "Weather.", "cache_control": {"type": "ephemeral"}}],
            tool_choice={"type": "any", "disable_parallel_tool_use": True},
            stop_sequences=["END"],
            top_k=5,
            stream=True,
        )
    )
    call = {
        "id": "t1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"c": 1}'},
    }
    assert request.chat["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [call]},  # thinking dropped
        {"role": "tool", "tool_call_id": "t1", "content": "sunny"},
        {"role": "user", "content": "And tomorrow?"},
    ]
    assert request.chat["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object"},
                "description": "Weather.",
            },
        }
    ]
    chat = request.chat
    assert (chat["tool_choice"], chat["parallel_tool_calls"]) == ("required", False)
    assert (chat["stop"], chat["top_k"], chat["temperature"]) == (["END"], 5, 1.0)
    assert chat["stream_options"] == {"include_usage": True}  # the usage message_delta tells
    assert (request.stream, request.max_tokens) == (True, 16)
    parse_chat_request(chat)  # the engines accept what the adapter makes


def test_thinking_and_output_config_map_onto_the_template_and_the_grammar() -> None:
    assert "chat_template_kwargs" not in parse(body()).chat  # the model's own default
    enabled = parse(body(max_tokens=2048, thinking={"type": "enabled", "budget_tokens": 1024}))
    assert enabled.chat["chat_template_kwargs"] == {"enable_thinking": True}
    off = parse(body(thinking={"type": "disabled"}))
    assert off.chat["chat_template_kwargs"] == {"enable_thinking": False}
    omitted = parse(body(thinking={"type": "adaptive", "display": "omitted"}))
    assert not omitted.show_thinking
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    shaped = parse(
        body(output_config={"effort": "low", "format": {"type": "json_schema", "schema": schema}})
    )
    assert shaped.chat["response_format"]["json_schema"]["schema"] == schema
    assert shaped.chat["chat_template_kwargs"] == {"reasoning_effort": "low"}


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"max_tokens": None}, "max_tokens: Field required"),
        ({"max_tokens": 0}, "max_tokens: expected an integer >= 1"),
        ({"temperature": 1.5}, "temperature: expected a number between 0.0 and 1.0"),
        ({"stop_sequences": ["a"] * 5}, "stop_sequences: at most 4"),
        (
            {"thinking": {"type": "enabled", "budget_tokens": 100}},
            "budget_tokens: must be an integer >= 1024",
        ),
        ({"thinking": {"type": "enabled", "budget_tokens": 2000}}, "must be less than max_tokens"),
        ({"container": "c"}, "container: code execution containers are not served"),
        ({"frequency_penalty": 1}, "frequency_penalty: Extra inputs are not permitted"),
        ({"tools": [{"type": "web_search_20250305", "name": "web"}]}, "server tool"),
        ({"tools": [TOOL | {"input_examples": []}]}, "tools.0.input_examples: Extra inputs"),
        (
            {"tools": [TOOL], "tool_choice": {"type": "tool", "name": "x"}},
            "not one of the request's tools",
        ),
        ({"messages": []}, "at least one message"),
        ({"messages": [USER, {"role": "assistant", "content": "The answer is"}]}, "prefill"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t9"}]}
                ]
            },
            "t9",
        ),
        ({"messages": [{"role": "user", "content": [{"type": "document"}]}]}, "text-only"),
        (
            {"messages": [{"role": "assistant", "content": [{"type": "server_tool_use"}]}, USER]},
            "unknown content block type 'server_tool_use'",
        ),
    ],
)
def test_bad_bodies_are_refused_naming_the_field(fields: dict[str, Any], words: str) -> None:
    raw = {k: v for k, v in body(**fields).items() if v is not None}
    with pytest.raises(ApiError) as info:
        parse(raw)
    assert info.value.status == 400 and words in info.value.message


def test_count_tokens_bodies_need_no_max_tokens() -> None:
    request = parse({"model": "m", "messages": [USER]}, count_only=True)
    assert request.max_tokens is None and "max_tokens" not in request.chat


def test_errors_in_anthropic_shape_and_words() -> None:
    assert error_body(ApiError(503, "busy")) == (
        529,
        {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}},
    )
    assert error_body(ApiError(401, "no"))[1]["error"]["type"] == "authentication_error"
    assert error_body(ApiError(429, "slow"))[1]["error"]["type"] == "rate_limit_error"
    bad = {**body(), "tools": [{"name": "f", "input_schema": {"type": "array"}}]}
    with pytest.raises(ApiError) as info:
        parse_chat_request(parse(bad).chat)
    renamed = in_anthropic_terms(info.value).message
    assert "'tools.0.input_schema'" in renamed and "function" not in renamed


def test_a_chat_stream_becomes_anthropics_event_sequence() -> None:
    translator = MessagesStream("m")
    out = named_events(b"".join(translator.feed(e) for e in tool_call_stream()))
    assert [name for name, _ in out] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = out[0][1]["message"]
    assert (start["id"], start["usage"]) == ("msg_abc", {"input_tokens": 7, "output_tokens": 0})
    blocks = [e["content_block"] for n, e in out if n == "content_block_start"]
    assert [b["type"] for b in blocks] == ["thinking", "text", "tool_use"]
    assert blocks[2] == {"type": "tool_use", "id": "call_1", "name": "f", "input": {}}
    deltas = [(e["index"], e["delta"]) for n, e in out if n == "content_block_delta"]
    assert deltas == [
        (0, {"type": "thinking_delta", "thinking": "Let me "}),
        (0, {"type": "thinking_delta", "thinking": "see."}),
        (1, {"type": "text_delta", "text": "Sure."}),
        (2, {"type": "input_json_delta", "partial_json": '{"a":'}),
        (2, {"type": "input_json_delta", "partial_json": " 1}"}),
    ]
    assert out[-2][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"input_tokens": 7, "output_tokens": 9},
    }


def test_one_translator_across_a_continuation_writes_one_message() -> None:
    """The relay feeds the events of two engines (the second continuing the first) to the
    same translator: the client sees what one engine's stream would have given."""
    stream = tool_call_stream()
    one = MessagesStream("m")
    whole = b"".join(one.feed(e) for e in stream)
    translator = MessagesStream("m")
    cut = translator.feed(b"".join(stream[:4])) + translator.feed(b"".join(stream[4:]))
    assert cut == whole


def test_a_stop_sequence_and_a_failure() -> None:
    translator = MessagesStream("m")
    out = translator.feed(sse(chunk(HEADER, "", first=True)) + sse(chunk(HEADER, "Hi")))
    out += translator.feed(sse(chunk(HEADER, "", "stop", usage=Usage(3, 2), stop_reason="END")))
    out += translator.feed(SSE_DONE)
    delta = named_events(out)[-2][1]["delta"]
    assert delta == {"stop_reason": "stop_sequence", "stop_sequence": "END"}
    failing = MessagesStream("m")
    failing.feed(sse(chunk(HEADER, "", first=True)))
    error = named_events(failing.failed(ApiError(502, "engines stopped", type="server_error")))
    assert error == [
        ("error", {"type": "error", "error": {"type": "api_error", "message": "engines stopped"}})
    ]
    assert failing.feed(SSE_DONE) == b""  # nothing after the error


def test_a_whole_answer_becomes_a_message() -> None:
    message = whole_message(read_answer(whole_answer()), "m", show_thinking=False)
    assert message["content"] == [
        {"type": "thinking", "thinking": "", "signature": ""},  # display: omitted
        {"type": "text", "text": "Sure."},
        {"type": "tool_use", "id": "call_1", "name": "f", "input": {"a": 1}},
    ]
    assert (message["id"], message["stop_reason"]) == ("msg_abc", "tool_use")
    assert message["usage"] == {"input_tokens": 7, "output_tokens": 9}
    shown = whole_message(read_answer(whole_answer()), "m")
    assert shown["content"][0]["thinking"] == "Let me see."


@pytest.mark.parametrize(
    "make", [lambda: MessagesStream("m"), lambda: ResponsesStream("m", {}, False)]
)
def test_text_spliced_as_its_json_literal_equals_the_parsed_path(
    make: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast path (our engine's plain text chunks, spliced without decoding: all but the
    first, which opens the block) writes what parsing each chunk would, escapes included."""
    texts = ['say "hi"', "\n", " ü \\ ", "\u2028 end"]
    stream = [sse(chunk(HEADER, "", first=True)), sse(chunk(HEADER, "a"))]
    stream += [sse(chunk(HEADER, t, token_ids=[i])) for i, t in enumerate(texts)]
    stream += [sse(chunk(HEADER, "", "stop", usage=Usage(1, 5))), SSE_DONE]
    assert sum(bool(chat_answer.PLAIN_TEXT.search(e[:-2])) for e in stream) == 1 + len(texts)
    fast = make()
    spliced = b"".join(fast.feed(e) for e in stream)
    monkeypatch.setattr(chat_answer, "PLAIN_TEXT", re.compile(b"(?!)"))  # never matches
    slow = make()
    parsed = b"".join(slow.feed(e) for e in stream)
    assert spliced == parsed  # byte for byte
    assert [n for n, _ in named_events(spliced)].count("error") == 0


def test_prefix_cache_reads_are_reported_in_each_dialects_usage() -> None:
    body = whole_answer()
    body["usage"] = Usage(700, 9, cached_tokens=640).as_dict()
    answer = read_answer(body)
    assert whole_message(answer, "m")["usage"] == {
        "input_tokens": 60,  # Anthropic counts the uncached part here
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 640,
        "output_tokens": 9,
    }
    details = whole_response(answer, "m", {}, False)["usage"]["input_tokens_details"]
    assert details == {"cached_tokens": 640}
    translator = MessagesStream("m")
    out = translator.feed(sse(chunk(HEADER, "", first=True, prompt_tokens=700)))
    final = Usage(700, 9, cached_tokens=640)
    out += translator.feed(sse(chunk(HEADER, "", "stop", usage=final)) + SSE_DONE)
    assert named_events(out)[-2][1]["usage"]["cache_read_input_tokens"] == 640
