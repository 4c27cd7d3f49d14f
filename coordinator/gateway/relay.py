"""One client's SSE stream, relayed from engines, and continued on another engine if one dies.

Only whole server-sent events go to the client, so a stream cut mid-event never leaves half an
event behind. The events sent are kept: when the engine dies (or ends the stream with an error
event) the gateway asks the next engine to continue from the token ids the client already has
(`mlxfleet_continuation`, see mlxfleet/openai/protocol.py) and the new events are spliced
into the same response. With temperature 0 the client cannot tell.

A client of another dialect (Anthropic Messages, Responses) gets the same events through its
`Translator`, one per stream, kept across continuations: the relay keeps and continues the
engines' chat events, the client reads its own dialect's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from mlxfleet.dialects.chat_answer import Translator
from mlxfleet.errors import ApiError
from mlxfleet.openai.protocol import CONTINUATION_FIELD
from mlxfleet.openai.responses import sse

SSE_DONE = b"data: [DONE]\n\n"
EVENT_END = b"\n\n"
# An event carrying generated output: text, thinking, or a tool call's name (its first token
# counts for the time to first token as much as a word would).
CONTENT_MARKERS = (b'"content":"', b'"text":"', b'"reasoning_content":"', b'"name":"')


def is_content(event: bytes) -> bool:
    """Does this event carry generated output (a non-empty content, text, reasoning_content or
    tool-call name field)?"""
    for marker in CONTENT_MARKERS:
        i = event.find(marker)
        if i != -1 and event[i + len(marker) : i + len(marker) + 1] not in (b'"', b""):
            return True
    return False


def cached_tokens(usage: dict[str, Any]) -> int:
    """`usage.prompt_tokens_details.cached_tokens` (OpenAI's field), 0 when absent."""
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return cached if isinstance(cached, int) else 0


class StreamRelay:
    """Writes whole SSE events to one client response; knows how to continue the stream."""

    def __init__(
        self,
        response: web.StreamResponse,
        on_first_content: Callable[[float], None] | None,
        started: float,  # time.monotonic() when the request arrived: TTFT counts from there
        translator: Translator | None = None,  # None: the client reads the chat events as sent
    ) -> None:
        self.response = response
        self._translator = translator
        self.done = False  # [DONE] was sent
        self.continuations = 0
        self.engine_error = False  # the last engine ended with an error event (it is alive)
        self.stalled = False  # the last engine sent nothing for the stall limit mid-answer
        self._events: list[bytes] = []  # every event sent, for a continuation and the usage
        self._usage: dict[str, Any] | None = None  # the finishing event's, once found
        self._partial = b""
        self._on_first_content = on_first_content
        self._started = started
        self.first_content_at: float | None = None  # time.monotonic() of the first text sent
        self.last_content_at = 0.0

    async def pump(
        self, upstream: aiohttp.ClientResponse, first: bytes = b"", stall_s: float | None = None
    ) -> bool:
        """Relay one engine's events until [DONE] (True) or until the engine fails: its
        connection breaks, it sends an error event, or, once it has sent text, it sends
        nothing for `stall_s` (False; `stalled` says which). Before its first text there is no
        limit: a queue or a long prefill may take a while, and a hung engine that sent nothing
        is the agent's to find (it health-checks its engines). Raises ConnectionResetError
        when the client goes away."""
        self._partial = b""  # half an event from an engine that died is dropped
        self.engine_error = self.stalled = False
        began = time.monotonic()
        try:
            if first and not await self._feed(first):
                return self.done
            while True:
                flowing = stall_s is not None and self.last_content_at >= began
                read = upstream.content.readany()
                chunk = await (asyncio.wait_for(read, stall_s) if flowing else read)
                if not chunk:  # the engine closed the stream
                    return self.done
                if not await self._feed(chunk):
                    return self.done
        except aiohttp.ClientError:
            return False
        except TimeoutError:
            self.stalled = True
            return False

    async def _feed(self, chunk: bytes) -> bool:
        data = self._partial + chunk
        end = data.rfind(EVENT_END)
        if end == -1:
            self._partial = data
            return True
        self._partial = data[end + len(EVENT_END) :]
        events = data[: end + len(EVENT_END)]
        if b'data: {"error"' in events:  # the engine gave up on the request: continue elsewhere
            self.engine_error = True
            keep = events[: events.index(b'data: {"error"')]
            if keep:
                await self._send(keep)
            return False
        await self._send(events)
        return not self.done

    async def write(self, events: bytes) -> None:
        """Whole chat events to the client, in its dialect."""
        translator = self._translator
        await self.response.write(translator.feed(events) if translator else events)

    async def _send(self, events: bytes) -> None:
        try:
            await self.write(events)
        except ConnectionResetError as exc:
            # aiohttp raises ClientConnectionResetError, an aiohttp.ClientError: re-raised plain,
            # so pump cannot mistake the client leaving for the engine failing.
            raise ConnectionResetError("the client went away") from exc
        self._events.append(events)
        if is_content(events):
            self.last_content_at = now = time.monotonic()
            if self.first_content_at is None:
                self.first_content_at = now
                if self._on_first_content is not None:
                    self._on_first_content(now - self._started)
        if events.endswith(SSE_DONE):
            self.done = True

    def sent(self) -> list[dict[str, Any]]:
        """The JSON payloads of the events sent so far (parsed on demand, not per chunk)."""
        payloads = []
        for event in b"".join(self._events).split(EVENT_END):
            if event.startswith(b"data: {"):
                payloads.append(json.loads(event[len(b"data: ") :]))
        return payloads

    def continuation(self, raw: bytes) -> bytes | None:
        """The request body that continues this stream elsewhere; None when the client has
        every token and the finish already, so only [DONE] is missing."""
        payloads = self.sent()
        if any(c.get("finish_reason") for p in payloads for c in p.get("choices") or ()):
            return None
        self.continuations += 1
        head = next((p for p in payloads if "id" in p), None)
        if head is None:  # the engine died inside its first event: the client has nothing yet
            return raw
        ids = [t for p in payloads for t in (p.get("mlxfleet") or {}).get("token_ids") or ()]
        body = json.loads(raw)
        body[CONTINUATION_FIELD] = {"token_ids": ids, "id": head["id"], "created": head["created"]}
        return json.dumps(body).encode()

    def _final_usage(self) -> dict[str, Any] | None:
        """The usage the engine puts on its finishing event (`mlxfleet.usage`, or the standard
        usage chunk the client asked for); None when the stream did not finish. Parses only
        the events that carry it, once: nothing follows the finishing event."""
        if self._usage is not None:
            return self._usage
        for sent in reversed(self._events):
            if b'"usage":' not in sent:
                continue
            for event in reversed(sent.split(EVENT_END)):
                if b'"usage":' in event and event.startswith(b"data: {"):
                    payload = json.loads(event[len(b"data: ") :])
                    usage = payload.get("usage") or (payload.get("mlxfleet") or {}).get("usage")
                    if usage:
                        self._usage = usage
                        return usage
        return None

    def usage(self) -> tuple[int, int] | None:
        """(prompt, completion) tokens of the whole answer; None when it did not finish."""
        usage = self._final_usage()
        return None if usage is None else (usage["prompt_tokens"], usage["completion_tokens"])

    def prefilled_tokens(self) -> int | None:
        """Prompt tokens the engine prefilled (the prompt less its prefix-cache hit); None
        when the stream did not finish."""
        usage = self._final_usage()
        if usage is None:
            return None
        return max(1, int(usage["prompt_tokens"]) - cached_tokens(usage))

    def cached_tokens(self) -> int:
        """Prompt tokens the prefix cache served (0 when the stream did not finish)."""
        usage = self._final_usage()
        return 0 if usage is None else cached_tokens(usage)

    def completion_tokens(self) -> int:
        """Tokens the client received, counted from the ids on the events."""
        return sum(len((p.get("mlxfleet") or {}).get("token_ids") or ()) for p in self.sent())

    async def finish(self) -> None:
        await self.response.write_eof()

    async def fail(self) -> None:
        """No engine could finish the stream: end it with an error event, never silently."""
        err = ApiError(
            502,
            "the engines serving this stream stopped before finishing",
            type="server_error",
            code="engine_failed",
        )
        with contextlib.suppress(ConnectionResetError):  # a client that left needs no error
            if self._translator is not None:
                await self.response.write(self._translator.failed(err))
            else:
                await self.response.write(sse(err.body()) + SSE_DONE)
            await self.response.write_eof()
