"""Streaming client load for failover tests and benchmarks: threads of raw-SSE completions.

Every stream is read event by event, as a client would see it, and judged strictly: it failed
unless it answered 200, ended with `data: [DONE]`, carried no error event and a finish reason.
No client retries: a request the gateway could not place counts as failed too.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx

MODEL = "demo"
READ_TIMEOUT_S = 30.0  # a failover stalls a stream for a moment, never this long
STOP_S = 2 * READ_TIMEOUT_S  # for a loop to finish the request it is on
SECRET_ENV = b"MLXFLEET_ENGINE_SECRET="  # node_agent/supervisor.py


@dataclass
class Stream:
    """One streamed completion as the client saw it (times are time.monotonic())."""

    prompt: str
    started: float
    ended: float = 0.0
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int | None = None  # from the usage event
    arrivals: list[float] = field(default_factory=list)  # each event carrying text
    error: str = ""  # why it failed; "" for a stream that ended as it should

    @property
    def ok(self) -> bool:
        return not self.error

    def spans(self, t: float) -> bool:
        """Did text arrive both before and after `t` (it was streaming at that moment)?"""
        return bool(self.arrivals) and self.arrivals[0] < t < self.arrivals[-1]

    def stall_after(self, t: float) -> float | None:
        """The longest wait for text that ended after `t`, if the stream was streaming at `t`.

        Not just the gap around `t`: text the gateway had buffered before a fault (or sent
        before the fault took effect) may still arrive after `t`, and the stall comes later.
        """
        if not self.spans(t):
            return None
        gaps = zip(self.arrivals, self.arrivals[1:], strict=False)
        return max(b - a for a, b in gaps if b > t)


def stream_completion(
    http: httpx.Client,
    base: str,
    key: str,
    prompt: str,
    max_tokens: int,
    s: Stream | None = None,
) -> Stream:
    """POST one streamed /v1/completions (temperature 0, usage requested) and read it all,
    into `s` when given (so another thread can watch it fill)."""
    s = s or Stream(prompt, time.monotonic())
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,  # greedy: the text depends only on the prompt, so it can be compared
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    texts: list[str] = []
    done = False
    try:
        with http.stream(
            "POST",
            f"{base}/v1/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
        ) as r:
            if r.status_code != 200:
                s.error = f"HTTP {r.status_code}: {r.read()[:300]!r}"
            else:
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line.removeprefix("data: ")
                    if done:
                        s.error = f"event after [DONE]: {data[:200]}"
                        break
                    if data == "[DONE]":
                        done = True
                        continue
                    event = json.loads(data)
                    if "error" in event:
                        s.error = f"error event: {event['error']}"
                        break
                    for choice in event.get("choices") or ():
                        if choice.get("text"):
                            texts.append(choice["text"])
                            s.arrivals.append(time.monotonic())
                        if choice.get("finish_reason"):
                            if s.finish_reason is not None:
                                s.error = "two finish reasons"
                            s.finish_reason = choice["finish_reason"]
                    if event.get("usage"):
                        s.completion_tokens = event["usage"]["completion_tokens"]
                if not s.error and not done:
                    s.error = "the stream ended without [DONE]"
                elif not s.error and s.finish_reason not in ("length", "stop"):
                    s.error = f"finish reason {s.finish_reason!r}"
    except httpx.HTTPError as exc:
        s.error = f"{type(exc).__name__}: {exc}"
    s.text = "".join(texts)
    s.ended = time.monotonic()
    return s


def reference_texts(base: str, key: str, prompts: list[str], max_tokens: int) -> dict[str, str]:
    """Each prompt's text from an uninterrupted stream, run one at a time with no fault."""
    texts = {}
    with httpx.Client(timeout=60) as http:
        for prompt in prompts:
            s = stream_completion(http, base, key, prompt, max_tokens)
            assert s.ok and s.completion_tokens == max_tokens, s.error
            texts[prompt] = s.text
    return texts


def assert_all_completed(streams: list[Stream], reference: dict[str, str], max_tokens: int) -> None:
    """No stream failed, each got all its tokens, and each text is its prompt's reference."""
    failures = [(s.prompt, s.error) for s in streams if not s.ok]
    assert not failures, f"{len(failures)} of {len(streams)} streams failed: {failures}"
    for s in streams:
        assert (s.finish_reason, s.completion_tokens) == ("length", max_tokens)
        assert s.text == reference[s.prompt], f"stream of {s.prompt!r} differs from its reference"


class ClientLoops:
    """Client threads, each running `_loop` until stopped or `max_s` has passed.

    `stop` lets every loop finish the request it is on, so no request is cut by the test itself.
    """

    def __init__(self, loop_args: list[tuple[Any, ...]], max_s: float) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._deadline = time.monotonic() + max_s
        self._threads = [
            threading.Thread(target=self._loop, args=args, name=f"load-{i}", daemon=True)
            for i, args in enumerate(loop_args)
        ]

    def __enter__(self) -> Self:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(STOP_S)
        assert not any(t.is_alive() for t in self._threads), "a load loop did not stop"

    def running(self) -> bool:
        """Whether a loop may start another request."""
        return not self._stop.is_set() and time.monotonic() < self._deadline

    def _loop(self, *args: Any) -> None:
        raise NotImplementedError


class StreamLoad(ClientLoops):
    """One thread per prompt, each streaming completions of its prompt back to back.

    Bounded: each loop stops after `max_s`.
    """

    def __init__(
        self, base: str, key: str, prompts: list[str], max_tokens: int, max_s: float = 300.0
    ) -> None:
        super().__init__([(p,) for p in prompts], max_s)
        self.streams: list[Stream] = []
        self._current: dict[str, Stream] = {}  # each loop's stream in progress, by prompt
        self._base, self._key, self._max_tokens = base, key, max_tokens

    def done(self) -> list[Stream]:
        with self._lock:
            return list(self.streams)

    def ok_started_after(self, t: float) -> list[Stream]:
        return [s for s in self.done() if s.started > t and s.ok]

    def failures(self) -> list[Stream]:
        return [s for s in self.done() if not s.ok]

    def all_decoding(self) -> bool:
        """Every loop is mid-stream: its current request has had text and has not ended.

        Wait for this before a fault, not just for some streams to be done: the loops run in
        step, so right after a wave ends every new stream is still in prefill, and a fault then
        cuts no stream midway.
        """
        with self._lock:
            current = list(self._current.values())
        return len(current) == len(self._threads) and all(
            s.arrivals and not s.ended for s in current
        )

    def _loop(self, prompt: str) -> None:
        timeout = httpx.Timeout(READ_TIMEOUT_S, connect=5.0)
        with httpx.Client(timeout=timeout) as http:
            while self.running():
                s = Stream(prompt, time.monotonic())
                with self._lock:
                    self._current[prompt] = s
                stream_completion(http, self._base, self._key, prompt, self._max_tokens, s)
                with self._lock:
                    self.streams.append(s)


def engine_port(pid: int) -> int | None:
    """The TCP port an engine process listens on, from /proc (its own network namespace)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
            return int(fields[1].split(":")[1], 16)
    return None


def active_requests(pid: int, host: str) -> int:
    """Requests the engine is generating right now (GET /v1/engine/stats, with the secret
    the agent passed it in its environment); 0 when it cannot be asked."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        secret = next(e for e in environ if e.startswith(SECRET_ENV)).split(b"=", 1)[1].decode()
        tls = b"--tls-cert" in Path(f"/proc/{pid}/cmdline").read_bytes()
        port = engine_port(pid)
    except (OSError, StopIteration):
        return 0
    scheme = "https" if tls else "http"
    try:
        r = httpx.get(
            f"{scheme}://{host}:{port}/v1/engine/stats",
            headers={"Authorization": f"Bearer {secret}"},
            verify=False,  # a remote engine presents its node's certificate; only counting here
            timeout=5,
        )
        return int(r.json()["active"]) if r.status_code == 200 else 0
    except (httpx.HTTPError, ValueError, KeyError):
        return 0


def serving(engines: dict[int, str], timeout_s: float = 30.0) -> int:
    """The engine (pid → the host to reach it at) generating the most requests, once one is:
    kill it right away and a stream is surely cut midway."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        active = {pid: active_requests(pid, host) for pid, host in engines.items()}
        pid = max(active, key=lambda p: active[p])
        if active[pid] > 0:
            return pid
        time.sleep(0.02)
    raise AssertionError(f"no engine of {sorted(engines)} generated anything in {timeout_s} s")
