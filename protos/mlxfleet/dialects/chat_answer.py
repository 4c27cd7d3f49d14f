"""An OpenAI chat answer read as the pieces other dialects are built from; pure, no I/O.

The engines speak one dialect, OpenAI chat completions (and the cloud fallback answers in it
too, through LiteLLM). The Anthropic Messages and OpenAI Responses adapters read the same
answer the same way: a whole body as `ChatAnswer`, a stream as `Piece`s, turned into their own
events by a `Translator`.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from mlxfleet.errors import ApiError
from mlxfleet.openai.responses import encode_json

EVENT_END = b"\n\n"
SSE_DONE = b"data: [DONE]"
# One decoder for every event: json.loads of bytes sniffs their encoding first (a third of the
# cost). The encoder is the engines' own (mlxfleet/openai/responses.py).
decode_json = json.JSONDecoder().decode
# The chunk most of a stream is: our engine's answer text and nothing else (no reasoning, call,
# logprobs, finish or usage). Its text is taken as the JSON string literal it already is and
# spliced into the dialect's event, with no decoding and encoding (most of a translation's cost).
PLAIN_TEXT = re.compile(
    rb',"choices":\[\{"index":0,"delta":\{"content":("(?:[^"\\]|\\.)*")\},"logprobs":null,'
    rb'"finish_reason":null\}\](?:,"mlxfleet":\{"token_ids":\[[0-9,]*\]\})?\}$'
)


@dataclass(frozen=True, slots=True)
class Call:
    """A whole tool call of a non-streamed answer; `arguments` is JSON text."""

    id: str
    name: str
    arguments: str


@dataclass(slots=True)
class ChatAnswer:
    """A non-streamed chat completion, as the adapters need it."""

    id: str
    created: int
    content: str
    reasoning: str
    calls: list[Call]
    finish_reason: str  # "stop" | "length" | "tool_calls" | "content_filter"
    stop_sequence: str | None  # the request's stop string that ended it (choice.stop_reason)
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # of the prompt, from the engine's prefix cache


def cached_tokens(usage: dict[str, Any]) -> int:
    return int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)


def read_answer(body: dict[str, Any]) -> ChatAnswer:
    """A chat completion body (ours or LiteLLM's) as a ChatAnswer."""
    [choice] = body["choices"]
    message = choice.get("message") or {}
    calls = [
        Call(c["id"], c["function"]["name"], c["function"].get("arguments") or "{}")
        for c in message.get("tool_calls") or ()
    ]
    usage = body.get("usage") or {}
    stop = choice.get("stop_reason")
    return ChatAnswer(
        id=str(body.get("id", "")),
        created=int(body.get("created", 0)),
        content=message.get("content") or "",
        reasoning=message.get("reasoning_content") or "",
        calls=calls,
        finish_reason=choice.get("finish_reason") or "stop",
        stop_sequence=stop if isinstance(stop, str) else None,
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        completion_tokens=int(usage.get("completion_tokens", 0)),
        cached_tokens=cached_tokens(usage),
    )


# --- a stream's pieces ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Start:
    """A chunk's header (every chunk has one; the adapters take the first)."""

    id: str
    created: int
    prompt_tokens: int | None  # our engines say it on the first chunk


@dataclass(frozen=True, slots=True)
class Text:
    text: str
    reasoning: bool  # the think section (delta.reasoning_content), not the answer


@dataclass(frozen=True, slots=True)
class CallHead:
    """A tool call begins: its streamed index, id and function name."""

    index: int
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class CallArguments:
    index: int
    text: str  # a piece of the arguments' JSON text


@dataclass(frozen=True, slots=True)
class Finish:
    reason: str
    stop_sequence: str | None


@dataclass(frozen=True, slots=True)
class Tokens:
    """The whole answer's usage (on our finishing chunk, or a usage chunk)."""

    prompt: int
    completion: int
    cached: int = 0


Piece = Start | Text | CallHead | CallArguments | Finish | Tokens


def chunk_pieces(payload: dict[str, Any]) -> list[Piece]:
    """One chat.completion.chunk as pieces, in the order a client reads them."""
    ours = payload.get("mlxfleet") or {}
    pieces: list[Piece] = []
    if "id" in payload:
        pieces.append(
            Start(str(payload["id"]), int(payload.get("created", 0)), ours.get("prompt_tokens"))
        )
    finish: Finish | None = None
    for choice in payload.get("choices") or ():
        delta = choice.get("delta") or {}
        if reasoning := delta.get("reasoning_content"):
            pieces.append(Text(reasoning, True))
        if content := delta.get("content"):
            pieces.append(Text(content, False))
        for call in delta.get("tool_calls") or ():
            index = int(call.get("index", 0))
            function = call.get("function") or {}
            if call.get("id") or function.get("name"):
                pieces.append(CallHead(index, call.get("id") or "", function.get("name") or ""))
            if arguments := function.get("arguments"):
                pieces.append(CallArguments(index, arguments))
        if reason := choice.get("finish_reason"):
            stop = choice.get("stop_reason")
            finish = Finish(reason, stop if isinstance(stop, str) else None)
    if finish is not None:
        pieces.append(finish)
    usage = payload.get("usage") or ours.get("usage")
    if usage:
        prompt, completion = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
        pieces.append(Tokens(prompt, completion, cached_tokens(usage)))
    return pieces


def named_sse(event: str, payload: dict[str, Any]) -> bytes:
    """One server-sent event with an `event:` line, as Anthropic and Responses streams have."""
    return f"event: {event}\ndata: {encode_json(payload)}\n\n".encode()


@dataclass
class StreamState:
    """What a translator has seen of the answer so far."""

    id: str = ""
    created: int = 0
    started: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    finish: Finish | None = None
    ended: bool = False  # the dialect's closing events were written


class Translator(ABC):
    """Turns whole SSE events of a chat stream (engines', or the cloud's) into another
    dialect's events. One per client stream, kept across a continuation on another engine,
    so the client sees one answer. Not thread-safe: it lives on the event loop."""

    def __init__(self) -> None:
        self.state = StreamState()

    def feed(self, events: bytes) -> bytes:
        """The dialect's bytes for some whole chat events (`data: {...}` and `data: [DONE]`)."""
        out: list[bytes] = []
        for event in events.split(EVENT_END):
            if event.startswith(b"data: {"):
                plain = PLAIN_TEXT.search(event) if self.state.started else None
                if plain is not None and (fast := self.text_literal(plain.group(1))) is not None:
                    out.append(fast)
                    continue
                payload = decode_json(event[len(b"data: ") :].decode())
                if "error" in payload:
                    error = payload["error"] or {}
                    out.append(
                        self.failed(
                            ApiError(502, str(error.get("message", "failed")), type="server_error")
                        )
                    )
                    continue
                for piece in chunk_pieces(payload):
                    out.append(self._take(piece))
            elif event == SSE_DONE and not self.state.ended:
                out.append(self.done())
        return b"".join(out)

    def _take(self, piece: Piece) -> bytes:
        state = self.state
        if isinstance(piece, Start):
            if state.started:
                return b""
            state.started, state.id, state.created = True, piece.id, piece.created
            state.prompt_tokens = piece.prompt_tokens or 0
            return self.start()
        if isinstance(piece, Tokens):
            state.prompt_tokens, state.completion_tokens = piece.prompt, piece.completion
            state.cached_tokens = piece.cached
            return b""
        if isinstance(piece, Finish):
            state.finish = piece
            return b""
        return self.piece(piece)

    def done(self) -> bytes:
        """The closing events, once (at the stream's [DONE])."""
        self.state.ended = True
        return self.end()

    def text_literal(self, literal: bytes) -> bytes | None:
        """The events for answer text given as a JSON string literal, when the dialect can
        splice it as it is (None: take the slow path, which parses the chunk)."""
        return None

    @abstractmethod
    def start(self) -> bytes:
        """The events that open the answer."""

    @abstractmethod
    def piece(self, piece: Text | CallHead | CallArguments) -> bytes:
        """The events for a piece of generated output."""

    @abstractmethod
    def end(self) -> bytes:
        """The events that close a finished answer (state.finish and the usage are known)."""

    @abstractmethod
    def failed(self, err: ApiError) -> bytes:
        """The dialect's error event: the stream cannot be finished."""
