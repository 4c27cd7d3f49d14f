"""StreamRelay without sockets: engine chunks in, what the client would receive out."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web

from coordinator.gateway.relay import SSE_DONE, StreamRelay
from mlxfleet.openai.protocol import CONTINUATION_FIELD

REQUEST = json.dumps(
    {"model": "demo", "prompt": "hi", "max_tokens": 6, "stream": True, "temperature": 0}
).encode()


def event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def text(content: str, ids: list[int], finish: str | None = None) -> bytes:
    choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": finish}
    return event(
        {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 1700,
            "model": "demo",
            "choices": [choice],
            "mlxfleet": {"token_ids": ids},
        }
    )


USAGE = event(
    {
        "id": "cmpl-1",
        "choices": [],
        "usage": {"prompt_tokens": 2, "completion_tokens": 6, "total_tokens": 8},
    }
)
ERROR = event({"error": {"message": "Generation failed: boom.", "type": "server_error"}})


class Client:
    """Collects what the gateway writes to the client; `gone` makes writes fail as aiohttp's
    do when the client has closed its connection."""

    def __init__(self, gone: bool = False) -> None:
        self.writes: list[bytes] = []
        self.eof = False
        self.gone = gone

    async def write(self, data: bytes) -> None:
        if self.gone:
            raise aiohttp.ClientConnectionResetError("Cannot write to closing transport")
        self.writes.append(data)

    async def write_eof(self) -> None:
        self.eof = True

    @property
    def body(self) -> bytes:
        return b"".join(self.writes)


class Engine:
    """An upstream response whose body arrives in the given chunks, then ends, breaks, or
    (`hangs`) sends nothing more, like a SIGSTOPped engine."""

    def __init__(self, *chunks: bytes, breaks: bool = False, hangs: bool = False) -> None:
        self._chunks, self._breaks, self._hangs = list(chunks), breaks, hangs
        self.content = self

    async def readany(self) -> bytes:
        if self._chunks:
            return self._chunks.pop(0)
        if self._breaks:
            raise aiohttp.ClientPayloadError("Response payload is not completed")
        if self._hangs:
            await asyncio.sleep(3600)
        return b""


def relay(client: Client, ttft: list[float] | None = None) -> StreamRelay:
    on_first = ttft.append if ttft is not None else None
    return StreamRelay(cast(web.StreamResponse, client), on_first, 0.0)


async def pump(
    r: StreamRelay, engine: Engine, first: bytes = b"", stall_s: float | None = None
) -> bool:
    return await r.pump(cast(aiohttp.ClientResponse, engine), first, stall_s)


async def test_an_engine_that_stops_mid_answer_is_given_up_after_the_stall_limit() -> None:
    client = Client()
    r = relay(client)
    started = time.monotonic()
    assert not await pump(r, Engine(text("a", [1]), text("b", [2]), hangs=True), stall_s=0.2)
    assert r.stalled and not r.engine_error
    assert 0.2 <= time.monotonic() - started < 2.0
    assert json.loads(r.continuation(b'{"model": "m"}') or b"")[CONTINUATION_FIELD][
        "token_ids"
    ] == [1, 2]
    # Before its first text an engine may queue or prefill for long: no limit there.
    waiting = relay(Client())
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(pump(waiting, Engine(hangs=True), stall_s=0.05), 0.5)
    assert not waiting.stalled


async def test_events_split_anywhere_reach_the_client_whole() -> None:
    whole = text("a", [1]) + text("b", [2]) + text("", [], "length") + USAGE + SSE_DONE
    pieces = [whole[i : i + 7] for i in range(0, len(whole), 7)]
    client, ttft = Client(), list[float]()
    r = relay(client, ttft)
    assert await pump(r, Engine(*pieces[1:]), pieces[0]) is True
    assert client.body == whole and r.done
    assert all(w.endswith(b"\n\n") and w.startswith(b"data: ") for w in client.writes)
    assert len(ttft) == 1  # the first text, once
    assert (r.usage(), r.completion_tokens()) == ((2, 6), 2)


async def test_an_engine_dying_mid_event_drops_the_half_and_continues_from_the_ids() -> None:
    client = Client()
    r = relay(client)
    cut = text("c", [3])
    assert await pump(r, Engine(text("a", [1]), text("b", [2]) + cut[:9], breaks=True)) is False
    assert not r.engine_error  # a broken connection: the gateway unroutes the engine
    assert client.body == text("a", [1]) + text("b", [2])  # the half event never reaches it
    body = json.loads(r.continuation(REQUEST) or b"")
    assert body.pop(CONTINUATION_FIELD) == {"token_ids": [1, 2], "id": "cmpl-1", "created": 1700}
    assert body == json.loads(REQUEST)  # everything else as the client sent it
    assert r.continuations == 1


async def test_a_continued_stream_is_spliced_into_the_same_response() -> None:
    client = Client()
    r = relay(client)
    assert await pump(r, Engine(text("a", [1]), breaks=True)) is False
    r.continuation(REQUEST)
    # The next engine answers under the same id; a half event left from the first is gone.
    rest = text("b", [2]) + text("", [], "length") + USAGE + SSE_DONE
    assert await pump(r, Engine(rest[:5], rest[5:])) is True
    assert client.body == text("a", [1]) + rest
    assert r.usage() == (2, 6)


async def test_an_error_event_is_withheld_and_the_stream_continues_elsewhere() -> None:
    client = Client()
    r = relay(client)
    assert await pump(r, Engine(text("a", [1]) + ERROR + SSE_DONE)) is False
    assert client.body == text("a", [1]) and not r.done
    assert r.engine_error  # the engine is alive: the gateway keeps it routed
    body = json.loads(r.continuation(REQUEST) or b"")
    assert body[CONTINUATION_FIELD]["token_ids"] == [1]


async def test_an_error_event_as_the_first_chunk_sends_nothing() -> None:
    client = Client()
    r = relay(client)
    assert await pump(r, Engine(), ERROR) is False
    assert client.writes == []
    assert r.continuation(REQUEST) == REQUEST  # nothing to continue from: start over


async def test_an_engine_dying_inside_its_first_event_is_started_over() -> None:
    client = Client()
    r = relay(client)
    assert await pump(r, Engine(breaks=True), text("a", [1])[:12]) is False
    assert client.writes == []
    assert r.continuation(REQUEST) == REQUEST


async def test_with_the_finish_sent_only_done_is_missing() -> None:
    client = Client()
    r = relay(client)
    assert await pump(r, Engine(text("a", [1]) + text("", [], "length"), breaks=True)) is False
    assert r.continuation(REQUEST) is None and r.continuations == 0


async def test_a_client_leaving_is_not_an_engine_failure() -> None:
    r = relay(Client(gone=True))
    with pytest.raises(ConnectionResetError) as caught:
        await pump(r, Engine(text("a", [1])))
    # Not an aiohttp.ClientError, which would unroute a healthy engine.
    assert not isinstance(caught.value, aiohttp.ClientError)


async def test_fail_ends_the_stream_with_an_error_event_and_done() -> None:
    client = Client()
    r = relay(client)
    await pump(r, Engine(text("a", [1]), breaks=True))
    await r.fail()
    *_, error, done = client.body.split(b"\n\n")[:-1]
    assert json.loads(error.removeprefix(b"data: "))["error"]["code"] == "engine_failed"
    assert done + b"\n\n" == SSE_DONE and client.eof
    await relay(Client(gone=True)).fail()  # a client that left is told nothing, no exception


async def test_usage_comes_from_the_finishing_event_and_content_times_are_kept() -> None:
    """Engines put the whole answer's usage on their finishing event (`mlxfleet.usage`), so
    the gateway counts tokens without the client asking for a usage chunk."""
    finish = json.loads(text("", [], "length")[len(b"data: ") :])
    finish["mlxfleet"]["usage"] = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    client = Client()
    r = relay(client)
    assert r.first_content_at is None and r.usage() is None
    assert await pump(r, Engine(text("a", [1]), text("b", [2]), text("c", [3]))) is False
    first, last = r.first_content_at, r.last_content_at
    assert first is not None and last >= first > 0.0
    assert await pump(r, Engine(event(finish) + SSE_DONE)) is True
    assert r.usage() == (5, 3)
    assert r.last_content_at == last  # an event without text is not a token
