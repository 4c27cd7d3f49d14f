"""A chat stream as our engines write it, for the dialect adapters' tests: the think section,
the answer and a tool call, each in pieces (a call's arguments split as a cloud provider's
stream may split them), then the finish, the usage chunk and [DONE]."""

from __future__ import annotations

import json
from typing import Any

from mlxfleet.openai.responses import SSE_DONE, ResponseHeader, Usage, chunk, sse, usage_chunk

HEADER = ResponseHeader("chat", "chatcmpl-abc", 5, "m")
REASONING = ("Let me ", "see.")
CONTENT = "Sure."
ARGUMENTS = ('{"a":', " 1}")
USAGE = Usage(7, 9)


def tool_call_stream() -> list[bytes]:
    head = {"index": 0, "id": "call_1", "type": "function"}
    head["function"] = {"name": "f", "arguments": ""}
    pieces = [{"index": 0, "function": {"arguments": a}} for a in ARGUMENTS]
    return [
        sse(chunk(HEADER, "", first=True, prompt_tokens=USAGE.prompt_tokens)),
        *(sse(chunk(HEADER, "", reasoning=r)) for r in REASONING),
        sse(chunk(HEADER, CONTENT)),
        sse(chunk(HEADER, "", tool_calls=[head])),
        *(sse(chunk(HEADER, "", tool_calls=[p])) for p in pieces),
        sse(chunk(HEADER, "", "tool_calls", usage=USAGE)),
        sse(usage_chunk(HEADER, USAGE)),
        SSE_DONE,
    ]


def whole_answer() -> dict[str, Any]:
    """The same answer, not streamed."""
    call = {"id": "call_1", "type": "function"}
    call["function"] = {"name": "f", "arguments": "".join(ARGUMENTS)}
    message = {"role": "assistant", "content": CONTENT, "reasoning_content": "".join(REASONING)}
    choice = {"index": 0, "message": message | {"tool_calls": [call]}}
    return {
        "id": HEADER.id,
        "created": HEADER.created,
        "choices": [choice | {"finish_reason": "tool_calls"}],
        "usage": USAGE.as_dict(),
    }


def named_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """`event: <name>` / `data: <json>` server-sent events as (name, payload)."""
    out = []
    for event in raw.decode().split("\n\n"):
        if event:
            name, data = event.split("\n")
            out.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out
