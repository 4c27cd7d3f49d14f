"""Chat answers as OpenAI Responses: a `response` object, or its typed stream events.

Output items in the order the model produced them: `reasoning` (the think section: its text
in `content` as reasoning_text, or in `summary` when the request asked for one; no separate
summarizer runs), `message` (output_text), `function_call`. The stream is response.created,
response.in_progress, per item output_item.added ... output_item.done with the item's own
delta events, then response.completed (or response.incomplete at max_output_tokens), every
event numbered by `sequence_number`.
"""

from __future__ import annotations

from typing import Any

from mlxfleet.dialects.chat_answer import (
    CallArguments,
    CallHead,
    ChatAnswer,
    Text,
    Translator,
    decode_json,
    named_sse,
)
from mlxfleet.errors import ApiError


def response_id(chat_id: str) -> str:
    return "resp_" + chat_id.split("-", 1)[-1]


def usage(prompt_tokens: int, completion_tokens: int, cached: int = 0) -> dict[str, Any]:
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": completion_tokens,
        # The engines do not count the think section's tokens apart from the answer's.
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt_tokens + completion_tokens,
    }


def response_object(
    id: str,
    created: int,
    model: str,
    echo: dict[str, Any],
    status: str,
    output: list[dict[str, Any]],
    tokens: tuple[int, int, int] | None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The response object; `echo` holds the request fields it repeats."""
    return {
        "id": id,
        "object": "response",
        "created_at": created,
        "status": status,
        "error": error,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "model": model,
        "output": output,
        "previous_response_id": None,
        "store": False,
        "truncation": "disabled",
        "usage": usage(*tokens) if tokens is not None else None,
        **echo,
    }


def reasoning_item(item_id: str, text: str, summary: bool) -> dict[str, Any]:
    item: dict[str, Any] = {"type": "reasoning", "id": item_id, "summary": [], "content": []}
    if summary:
        item["summary"] = [{"type": "summary_text", "text": text}]
    else:
        item["content"] = [{"type": "reasoning_text", "text": text}]
    return item


def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": [part] if status == "completed" else [],
    }


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def whole_response(
    answer: ChatAnswer, model: str, echo: dict[str, Any], summary: bool
) -> dict[str, Any]:
    """A non-streamed chat answer as the Responses API's response object."""
    base = answer.id.split("-", 1)[-1]
    output: list[dict[str, Any]] = []  # item ids: their kind, the answer, their place
    if answer.reasoning:
        output.append(reasoning_item(f"rs_{base}_0", answer.reasoning, summary))
    if answer.content:
        output.append(message_item(f"msg_{base}_{len(output)}", answer.content))
    for call in answer.calls:
        item_id = f"fc_{base}_{len(output)}"
        output.append(call_item(item_id, call.id, call.name, call.arguments, "completed"))
    status = "incomplete" if answer.finish_reason == "length" else "completed"
    tokens = (answer.prompt_tokens, answer.completion_tokens, answer.cached_tokens)
    return response_object(
        response_id(answer.id), answer.created, model, echo, status, output, tokens
    )


class ResponsesStream(Translator):
    """A chat stream as the Responses API's typed events (see the module docstring)."""

    def __init__(self, model: str, echo: dict[str, Any], summary: bool) -> None:
        super().__init__()
        self._model = model
        self._echo = echo
        self._summary = summary
        self._seq = 0
        self._items: list[dict[str, Any]] = []  # finished output items
        self._open: dict[str, Any] | None = None  # the item being streamed
        self._text = ""  # its text (or arguments) so far
        self._call_index: int | None = None  # the streamed index of the open function_call

    def _event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return named_sse(kind, payload)

    def _response(self, status: str, tokens: tuple[int, int, int] | None, **extra: Any) -> dict:
        s = self.state
        output = list(self._items)
        return response_object(
            response_id(s.id), s.created, self._model, self._echo, status, output, tokens, **extra
        )

    def start(self) -> bytes:
        response = self._response("in_progress", None)
        return self._event("response.created", response=response) + self._event(
            "response.in_progress", response=response
        )

    def _where(self) -> dict[str, Any]:
        assert self._open is not None
        return {"item_id": self._open["id"], "output_index": len(self._items)}

    def _begin(self, item: dict[str, Any]) -> bytes:
        """Open an item (the previous one is closed: its id is counted from the output)."""
        self._open, self._text = item, ""
        out = self._event("response.output_item.added", output_index=len(self._items), item=item)
        where = self._where()
        if item["type"] == "message":
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            out += self._event("response.content_part.added", **where, content_index=0, part=part)
        elif item["type"] == "reasoning" and self._summary:
            part = {"type": "summary_text", "text": ""}
            out += self._event(
                "response.reasoning_summary_part.added", **where, summary_index=0, part=part
            )
        elif item["type"] == "reasoning":
            part = {"type": "reasoning_text", "text": ""}
            out += self._event("response.content_part.added", **where, content_index=0, part=part)
        return out

    def _close(self) -> bytes:
        item = self._open
        if item is None:
            return b""
        where, text, out = self._where(), self._text, b""
        if item["type"] == "message":
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            out += self._event(
                "response.output_text.done", **where, content_index=0, text=text, logprobs=[]
            )
            out += self._event("response.content_part.done", **where, content_index=0, part=part)
            done = message_item(item["id"], text)
        elif item["type"] == "reasoning" and self._summary:
            part = {"type": "summary_text", "text": text}
            out += self._event(
                "response.reasoning_summary_text.done", **where, summary_index=0, text=text
            )
            out += self._event(
                "response.reasoning_summary_part.done", **where, summary_index=0, part=part
            )
            done = reasoning_item(item["id"], text, True)
        elif item["type"] == "reasoning":
            part = {"type": "reasoning_text", "text": text}
            out += self._event("response.reasoning_text.done", **where, content_index=0, text=text)
            out += self._event("response.content_part.done", **where, content_index=0, part=part)
            done = reasoning_item(item["id"], text, False)
        else:
            out += self._event(
                "response.function_call_arguments.done", **where, name=item["name"], arguments=text
            )
            done = call_item(item["id"], item["call_id"], item["name"], text, "completed")
        out += self._event("response.output_item.done", output_index=len(self._items), item=done)
        self._items.append(done)
        self._open, self._call_index = None, None
        return out

    def _item_id(self, prefix: str) -> str:
        return f"{prefix}_{self.state.id.split('-', 1)[-1]}_{len(self._items)}"

    def text_literal(self, literal: bytes) -> bytes | None:
        if self._open is None or self._open["type"] != "message":
            return None  # a message item opens first: the slow path does that
        self._text += decode_json(literal.decode())
        item_id = self._open["id"].encode()  # ids are [a-z0-9_]: no escaping needed
        seq, self._seq = self._seq, self._seq + 1
        return (
            b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
            b'"sequence_number":%d,"item_id":"%s","output_index":%d,"content_index":0,'
            b'"delta":%s,"logprobs":[]}\n\n' % (seq, item_id, len(self._items), literal)
        )

    def piece(self, piece: Text | CallHead | CallArguments) -> bytes:
        out = b""
        kind = self._open["type"] if self._open is not None else None
        if isinstance(piece, Text) and piece.reasoning:
            if kind != "reasoning":
                item = {
                    "type": "reasoning",
                    "id": self._item_id("rs"),
                    "summary": [],
                    "content": [],
                }
                out = self._begin(item)
            self._text += piece.text
            if self._summary:
                return out + self._event(
                    "response.reasoning_summary_text.delta",
                    **self._where(),
                    summary_index=0,
                    delta=piece.text,
                )
            return out + self._event(
                "response.reasoning_text.delta", **self._where(), content_index=0, delta=piece.text
            )
        if isinstance(piece, Text):
            if kind != "message":
                out = self._close()
                out += self._begin(message_item(self._item_id("msg"), "", "in_progress"))
            self._text += piece.text
            return out + self._event(
                "response.output_text.delta",
                **self._where(),
                content_index=0,
                delta=piece.text,
                logprobs=[],
            )
        if isinstance(piece, CallHead):
            out = self._close()
            out += self._begin(
                call_item(self._item_id("fc"), piece.id, piece.name, "", "in_progress")
            )
            self._call_index = piece.index
            return out
        if self._open is not None and self._call_index == piece.index:
            self._text += piece.text
            return self._event(
                "response.function_call_arguments.delta", **self._where(), delta=piece.text
            )
        return b""

    def end(self) -> bytes:
        s = self.state
        out = self._close()
        incomplete = s.finish is not None and s.finish.reason == "length"
        status = "incomplete" if incomplete else "completed"
        response = self._response(status, (s.prompt_tokens, s.completion_tokens, s.cached_tokens))
        return out + self._event(f"response.{status}", response=response)

    def failed(self, err: ApiError) -> bytes:
        self.state.ended = True
        error = {"code": "server_error", "message": err.message}
        return self._event("response.failed", response=self._response("failed", None, error=error))
