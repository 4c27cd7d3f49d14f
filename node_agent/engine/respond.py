"""From the model thread's events to an HTTP answer: one JSON body, or a stream of SSE chunks.

A request's `Handle` receives its events on the event loop; `collect` and `stream` turn them
into OpenAI's shapes (mlxfleet/openai/responses.py), with the token ids the gateway needs to
continue a stream elsewhere and, when asked, each token's log probabilities.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from mlxfleet.openai.responses import (
    SSE_DONE,
    Logprob,
    ResponseHeader,
    Usage,
    chunk,
    error_body,
    full_response,
    logprobs_field,
    sse,
    usage_chunk,
)
from node_agent.engine.channels import Channels, Delta
from node_agent.engine.generator import Event, TokenLogprob

logger = logging.getLogger(__name__)

TokenText = Callable[[int], str]  # a token id as text (the tokenizer's decode of one id)


def json_error(status: int, message: str, type: str, code: str | None, **headers: str):
    return web.json_response(
        error_body(message, type, None, code), status=status, headers=headers or None
    )


def merge_events(events: list[Event]) -> Event:
    """Consecutive events of one request as one: texts, ids and logprobs joined, the last one's
    end."""
    last = events[-1]
    logprobs = None
    if any(e.logprobs is not None for e in events):
        logprobs = [lp for e in events for lp in e.logprobs or ()]
    return Event(
        "".join(e.text for e in events),
        [t for e in events for t in e.token_ids],
        last.finish_reason,
        last.completion_tokens,
        last.error,
        logprobs,
        last.stop_sequence,
        last.cached_tokens,
    )


class Handle:
    """One request's view of the model thread.

    `push` runs on the model thread; everything else on the event loop. Events that pile up
    while the loop is busy are taken together (and sent as one chunk), and the loop is woken
    once per pile rather than once per token: per-token wake-ups cost the decode loop CPU.
    """

    def __init__(self, request_id: int, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.done = False
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[Event] = []  # guarded by _lock
        self._wake_scheduled = False  # guarded by _lock: a _ready.set is on its way
        self._ready = asyncio.Event()

    def push(self, event: Event) -> None:
        with self._lock:
            self._pending.append(event)
            if self._wake_scheduled:
                return
            self._wake_scheduled = True
        self._loop.call_soon_threadsafe(self._ready.set)

    async def next(self) -> Event:
        """The events that arrived since the last call, merged into one."""
        await self._ready.wait()
        with self._lock:
            events, self._pending = self._pending, []
            self._wake_scheduled = False
            self._ready.clear()
        event = events[0] if len(events) == 1 else merge_events(events)
        self.done = event.finish_reason is not None
        return event


@dataclass
class Answer:
    """One request's answer as it is built: the events come in, OpenAI's shapes go out.

    Text goes through `channels` (content, reasoning, tool calls). Token ids (and logprobs) of
    text the channels hold back wait for the next chunk sent: the ids a chunk carries are
    those whose text the client has, which is what a continuation elsewhere resumes from.
    """

    handle: Handle
    header: ResponseHeader
    usage: Usage  # the prompt, and the tokens another engine generated before a continuation
    text_of: TokenText
    channels: Channels
    one_call: bool = False  # parallel_tool_calls false: the answer ends after its first call
    stop: Callable[[], None] = lambda: None  # ends the generation early (the model thread)
    calls_taken: int = 0  # calls in the answer so far (a continued one counts the replayed)
    calls_sent: int = 0  # the streamed `index` of the next call
    generated: int = 0  # tokens this engine generated for the answer so far
    _ids: list[int] = field(default_factory=list)
    _logprobs: list[TokenLogprob] | None = None

    def take(self, event: Event, final: bool) -> Delta:
        """An event's text as a delta (with what the channels flush at the end)."""
        self._ids += event.token_ids
        self.generated += len(event.token_ids)
        if event.logprobs is not None:
            self._logprobs = (self._logprobs or []) + event.logprobs
        delta = self.channels.add(event.text) if event.text else Delta()
        if final:
            end = self.channels.finish()
            delta.content += end.content
            delta.reasoning += end.reasoning
            delta.calls += end.calls
        if self.one_call:
            del delta.calls[max(0, 1 - self.calls_taken) :]
        self.calls_taken += len(delta.calls)
        return delta

    def pending(self) -> tuple[list[int], list[Logprob] | None]:
        """The ids and logprobs not yet sent, handed over to the chunk about to go."""
        ids, self._ids = self._ids, []
        entries, self._logprobs = self._logprobs, ([] if self._logprobs is not None else None)
        return ids, self.logprobs(entries)

    async def next(self) -> tuple[Event, Delta]:
        """The next pile of events and what its text adds. A failed event's text is taken too
        (it may come merged with the end). Once the one call parallel_tool_calls false allows
        is made, the generation is stopped and this event becomes the last."""
        event = await self.handle.next()
        failed = event.finish_reason in ("error", "cancelled")
        delta = self.take(event, final=event.finish_reason is not None and not failed)
        if self.one_call and self.calls_taken > 0 and event.finish_reason is None:
            self.stop()
            event = dataclasses.replace(
                event, finish_reason="stop", completion_tokens=self.generated
            )
        return event, delta

    def finish_reason(self, reason: str | None) -> str | None:
        # The model ended its turn after calling tools (OpenAI's finish reason for that).
        return "tool_calls" if self.channels.calls_made and reason in ("stop", None) else reason

    def logprobs(self, entries: list[TokenLogprob] | None) -> list[Logprob] | None:
        if entries is None:
            return None
        text = self.text_of
        return [
            Logprob(text(e.token_id), e.logprob, tuple((text(t), lp) for t, lp in e.top))
            for e in entries
        ]

    def final_usage(self, event: Event) -> Usage:
        return Usage(
            self.usage.prompt_tokens,
            self.usage.completion_tokens + event.completion_tokens,
            min(event.cached_tokens, self.usage.prompt_tokens),
        )


async def collect(answer: Answer) -> web.Response:
    """Wait for the whole generation and answer it as one body."""
    content, reasoning, calls = "", "", []
    while True:
        event, delta = await answer.next()
        content, reasoning = content + delta.content, reasoning + delta.reasoning
        calls += delta.calls
        if event.finish_reason is not None:
            break
    if event.finish_reason in ("error", "cancelled"):
        message = f"Generation failed: {event.error or event.finish_reason}."
        return json_error(500, message, "server_error", None)
    ids, logprobs = answer.pending()
    body = full_response(
        answer.header,
        content,
        answer.finish_reason(event.finish_reason),
        answer.final_usage(event),
        ids,
        logprobs,
        reasoning,
        calls,
        event.stop_sequence,
    )
    return web.json_response(body)


async def stream(
    request: web.Request,
    answer: Answer,
    include_usage: bool,
    *,
    first: bool = True,  # False when continuing a stream: the role chunk was sent already
) -> web.StreamResponse:
    """Answer as server-sent events, a chunk per pile of events, ending with [DONE]."""
    header, handle = answer.header, answer.handle
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    offset = 0  # characters of the completion so far (the completions API's text_offset)
    try:
        if header.kind == "chat" and first:
            opening = chunk(header, "", first=True, prompt_tokens=answer.usage.prompt_tokens)
            await response.write(sse(opening))
        while True:
            event, delta = await answer.next()
            failed = event.finish_reason in ("error", "cancelled")
            if delta.content or delta.reasoning:
                ids, logprobs = answer.pending()
                lp = logprobs_field(header.kind, logprobs, offset)
                offset += len(delta.content)
                piece = chunk(
                    header, delta.content, None, ids, logprobs=lp, reasoning=delta.reasoning
                )
                await response.write(sse(piece))
            for call in delta.calls:
                ids, _ = answer.pending()
                index = answer.calls_sent
                answer.calls_sent += 1
                head = chunk(header, "", None, ids or None, tool_calls=[call.stream_head(index)])
                rest = chunk(header, "", None, tool_calls=[call.stream_arguments(index)])
                await response.write(sse(head) + sse(rest))
            if failed:  # its text is sent first, then the error
                message = f"Generation failed: {event.error or event.finish_reason}."
                await response.write(sse(error_body(message, "server_error")))
                break
            if event.finish_reason is not None:
                # Ids not yet sent (their text was held back, then cut) ride on the last chunk.
                ids, logprobs = answer.pending()
                lp = logprobs_field(header.kind, logprobs, offset) if ids else None
                final = answer.final_usage(event)
                reason = answer.finish_reason(event.finish_reason)
                end = chunk(
                    header,
                    "",
                    reason,
                    ids or None,
                    usage=final,
                    logprobs=lp,
                    stop_reason=event.stop_sequence,
                )
                await response.write(sse(end))
                if include_usage:
                    await response.write(sse(usage_chunk(header, final)))
                break
        await response.write(SSE_DONE)
        await response.write_eof()
    except ConnectionResetError:
        logger.info("client went away during request %d", handle.request_id)
    except Exception:
        # Headers are sent: the only honest ending left is an error event, never a silent close.
        logger.exception("stream of request %d failed", handle.request_id)
        error = error_body("Internal error while streaming.", "server_error")
        with contextlib.suppress(ConnectionResetError):
            await response.write(sse(error) + SSE_DONE)
    return response
