"""Streaming client load for failover tests and benchmarks: threads of raw-SSE completions.

Every stream is read event by event, as a client would see it, and judged strictly: it failed
unless it answered 200, ended with `data: [DONE]`, carried no error event and a finish reason.
No client retries: a request the gateway could not place counts as failed too.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

MODEL = "demo"
READ_TIMEOUT_S = 30.0  # a failover stalls a stream for a moment, never this long
CPU_WINDOW_S = 0.3


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
    http: httpx.Client, base: str, key: str, prompt: str, max_tokens: int
) -> Stream:
    """POST one streamed /v1/completions (temperature 0, usage requested) and read it all."""
    s = Stream(prompt, time.monotonic())
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


class StreamLoad:
    """One thread per prompt, each streaming completions of its prompt back to back.

    Bounded: each loop stops after `max_s`. `stop` lets every loop finish the stream it is
    reading, so no stream is cut by the test itself.
    """

    def __init__(
        self, base: str, key: str, prompts: list[str], max_tokens: int, max_s: float = 300.0
    ) -> None:
        self.streams: list[Stream] = []
        self._base, self._key, self._max_tokens = base, key, max_tokens
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._deadline = time.monotonic() + max_s
        self._threads = [
            threading.Thread(target=self._loop, args=(p,), name=f"load-{i}", daemon=True)
            for i, p in enumerate(prompts)
        ]

    def __enter__(self) -> StreamLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(READ_TIMEOUT_S * 2)
        assert not any(t.is_alive() for t in self._threads), "a load loop did not stop"

    def done(self) -> list[Stream]:
        with self._lock:
            return list(self.streams)

    def ok_started_after(self, t: float) -> list[Stream]:
        return [s for s in self.done() if s.started > t and s.ok]

    def failures(self) -> list[Stream]:
        return [s for s in self.done() if not s.ok]

    def _loop(self, prompt: str) -> None:
        timeout = httpx.Timeout(READ_TIMEOUT_S, connect=5.0)
        with httpx.Client(timeout=timeout) as http:
            while not self._stop.is_set() and time.monotonic() < self._deadline:
                s = stream_completion(http, self._base, self._key, prompt, self._max_tokens)
                with self._lock:
                    self.streams.append(s)


def _cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime + stime


def busiest(pids: list[int]) -> int:
    """The process that used the most CPU over a short window: the engine decoding most."""
    before = {p: _cpu_ticks(p) for p in pids}
    time.sleep(CPU_WINDOW_S)
    return max(pids, key=lambda p: _cpu_ticks(p) - before[p])
