"""The model thread: the one thread that owns the model and mlx-lm's BatchGenerator."""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node_agent.engine.errors import ModelLoadFailed, QueueFull
from node_agent.engine.protocol import SamplingParams
from node_agent.engine.textstream import TextStream

logger = logging.getLogger(__name__)

DEFAULT_MAX_CONCURRENCY = 4
QUEUE_LIMIT = 64
# Seed 002: cap the context at 8192 tokens unless the engine is told otherwise.
DEFAULT_CONTEXT_CAP_TOKENS = 8192
# Small prefill slices let a long prompt share the thread with running decodes.
PREFILL_STEP_SIZE_TOKENS = 512
WARMUP_PROMPT = "Hello, world."
WARMUP_MAX_TOKENS = 4


@dataclass(frozen=True, slots=True)
class Event:
    """What the model thread reports for a request; finish_reason set means the last one."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    completion_tokens: int = 0
    error: str | None = None


Sink = Callable[[Event], None]


@dataclass(frozen=True, slots=True)
class Job:
    """One generation request; `sink` is called on the model thread and must be thread-safe."""

    request_id: int
    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams
    sink: Sink


@dataclass(frozen=True, slots=True)
class EngineStats:
    """Counters for GET /v1/engine/stats."""

    active: int
    queued: int
    max_batch_seen: int
    requests_total: int
    generated_tokens_total: int


@dataclass(frozen=True, slots=True)
class _Cancel:
    request_id: int


@dataclass(slots=True)
class _Running:
    job: Job
    text: TextStream
    uid: int
    pending_ids: list[int] = field(default_factory=list)
    completion_tokens: int = 0


_STOP = object()


class ModelThread:
    """Loads the model, then runs continuous batching over submitted jobs.

    submit, cancel, stats and stop may be called from any thread. Every submitted job gets
    exactly one final Event (finish_reason set), whatever happens to it.
    """

    def __init__(
        self,
        model_path: Path,
        *,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        queue_limit: int = QUEUE_LIMIT,
        context_length: int | None = None,
    ) -> None:
        self._model_path = Path(model_path)
        self._max_concurrency = max_concurrency
        self._queue_limit = queue_limit
        self.context_length = context_length or DEFAULT_CONTEXT_CAP_TOKENS
        self._requested_context = context_length
        self.loaded: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.tokenizer: Any = None
        self.vocab_size = 0
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._in_system = 0  # submitted and not yet finished; guarded by _lock
        self._waiting: list[Job] = []
        self._running: dict[int, _Running] = {}  # by request id
        self._by_uid: dict[int, _Running] = {}
        self._max_batch_seen = 0
        self._requests_total = 0
        self._generated_total = 0
        self._thread = threading.Thread(target=self._run, name="mlxfleet-model", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job; raises QueueFull when max concurrency plus the queue limit are used."""
        with self._lock:
            if self._in_system >= self._max_concurrency + self._queue_limit:
                raise QueueFull(f"{self._in_system} requests in flight")
            self._in_system += 1
            self._requests_total += 1
        self._inbox.put(job)

    def cancel(self, request_id: int) -> None:
        """Drop a job wherever it is; its sink then gets a "cancelled" final event."""
        self._inbox.put(_Cancel(request_id))

    def stop(self, timeout_s: float) -> None:
        """Fail what is left, end the thread and wait for it."""
        self._inbox.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def stats(self) -> EngineStats:
        active = len(self._running)
        with self._lock:
            queued = max(0, self._in_system - active)
            requests_total = self._requests_total
        return EngineStats(
            active, queued, self._max_batch_seen, requests_total, self._generated_total
        )

    # --- on the model thread -------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._load()
        except Exception as exc:
            logger.error("model load failed for %s: %s", self._model_path, exc)
            self.loaded.set_exception(ModelLoadFailed(f"{self._model_path}: {exc}"))
            return
        self.loaded.set_result(None)
        stopping = False
        while not stopping:
            try:
                stopping = self._take_inbox(block=not self._running and not self._waiting)
                self._admit()
                if self._running and not stopping:
                    self._step()
            except Exception:
                # Whatever broke, the thread must live on: fail the batch and start afresh.
                logger.exception("generation failed; failing %d requests", len(self._running))
                self._fail_running("internal error during generation")
                self._bg = self._new_batch_generator()
        for job in self._waiting:
            self._final(job, "error", "the engine is shutting down")
        self._fail_running("the engine is shutting down")

    def _load(self) -> None:
        import mlx_lm
        from mlx_lm.generate import StopSequences

        # mlx_lm.load treats a missing directory as a Hugging Face repo id; engines only serve
        # local files the agent placed, so say plainly what is missing instead.
        if not (self._model_path / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in {self._model_path}")
        loaded = mlx_lm.load(str(self._model_path))
        model, tokenizer = loaded[0], loaded[1]
        self._model = model
        self.tokenizer = tokenizer
        args = getattr(model, "args", None)
        self.vocab_size = getattr(args, "vocab_size", None) or len(tokenizer._tokenizer)
        self._eos_ids = frozenset(tokenizer.eos_token_ids)
        self._eos_stops = StopSequences([(t,) for t in sorted(self._eos_ids)])
        model_max = getattr(args, "max_position_embeddings", None)
        if self._requested_context is None and model_max:
            self.context_length = min(int(model_max), DEFAULT_CONTEXT_CAP_TOKENS)
        self._bg = self._new_batch_generator()
        self._warm_up()
        logger.info(
            "model %s loaded and warmed up (context %d tokens, eos %s)",
            self._model_path,
            self.context_length,
            sorted(self._eos_ids),
        )

    def _new_batch_generator(self) -> Any:
        from mlx_lm.generate import BatchGenerator

        return BatchGenerator(
            self._model,
            completion_batch_size=self._max_concurrency,
            prefill_batch_size=self._max_concurrency,
            prefill_step_size=PREFILL_STEP_SIZE_TOKENS,
        )

    def _warm_up(self) -> None:
        # Compiles the CPU kernels (g++ on Linux) for greedy and sampled decoding in a batch of 2,
        # so /health says ready only when the first real request will not pay for it.
        from node_agent.engine.sampling import make_request_sampler

        ids = self.tokenizer.encode(WARMUP_PROMPT)
        greedy, sampled = make_request_sampler(0.0, 1.0, None), make_request_sampler(1.0, 0.9, 0)
        # A lone sequence and a batch of two take different kernels; warm both.
        for samplers in ([greedy], [greedy, sampled]):
            uids = set(
                self._bg.insert(
                    [ids] * len(samplers),
                    max_tokens=[WARMUP_MAX_TOKENS] * len(samplers),
                    samplers=samplers,
                    stop_sequences=[self._eos_stops] * len(samplers),
                )
            )
            while uids:
                for response in self._bg.next_generated():
                    if response.finish_reason is not None:
                        uids.discard(response.uid)

    def _take_inbox(self, *, block: bool) -> bool:
        """Move messages from the inbox into state; returns True when told to stop."""
        item = self._inbox.get() if block else self._next_nowait()
        while item is not None:
            if item is _STOP:
                return True
            if isinstance(item, _Cancel):
                self._cancel(item.request_id)
            else:
                self._waiting.append(item)
            item = self._next_nowait()
        return False

    def _next_nowait(self) -> Any:
        try:
            return self._inbox.get_nowait()
        except queue.Empty:
            return None

    def _admit(self) -> None:
        from node_agent.engine.sampling import make_request_sampler

        while self._waiting and len(self._running) < self._max_concurrency:
            job = self._waiting.pop(0)
            p = job.params
            try:
                sampler = make_request_sampler(p.temperature, p.top_p, p.seed)
                (uid,) = self._bg.insert(
                    [job.prompt_ids],
                    max_tokens=[job.max_tokens],
                    samplers=[sampler],
                    stop_sequences=[self._eos_stops],
                )
            except Exception as exc:
                logger.exception("could not start request %d", job.request_id)
                self._final(job, "error", str(exc))
                continue
            running = _Running(job, TextStream(self.tokenizer.detokenizer, p.stop), uid)
            self._running[job.request_id] = running
            self._by_uid[uid] = running

    def _cancel(self, request_id: int) -> None:
        for i, job in enumerate(self._waiting):
            if job.request_id == request_id:
                del self._waiting[i]
                self._final(job, "cancelled")
                return
        running = self._running.get(request_id)
        if running is not None:
            self._bg.remove([running.uid])
            self._finish(running, "", "cancelled")

    def _step(self) -> None:
        _, responses = self._bg.next()
        if responses:
            self._max_batch_seen = max(self._max_batch_seen, len(responses))
            self._generated_total += len(responses)
        for response in responses:
            running = self._by_uid.get(response.uid)
            if running is not None:
                self._on_token(running, response.token, response.finish_reason)

    def _on_token(self, running: _Running, token: int, finish_reason: str | None) -> None:
        text = ""
        # The only stop sequences given to BatchGenerator are EOS tokens; EOS is not content.
        if not (finish_reason == "stop" and token in self._eos_ids):
            running.pending_ids.append(token)
            running.completion_tokens += 1
            text = running.text.add(token)
        if running.text.stopped:
            if finish_reason is None:
                self._bg.remove([running.uid])
            self._finish(running, text, "stop")
        elif finish_reason is not None:
            text += running.text.finish()
            self._finish(running, text, "stop" if running.text.stopped else finish_reason)
        elif text:
            self._emit(running.job, Event(text, running.pending_ids))
            running.pending_ids = []

    def _finish(self, running: _Running, text: str, reason: str, error: str | None = None) -> None:
        self._running.pop(running.job.request_id, None)
        self._by_uid.pop(running.uid, None)
        event = Event(text, running.pending_ids, reason, running.completion_tokens, error)
        self._final(running.job, event)

    def _final(self, job: Job, event: Event | str, error: str | None = None) -> None:
        """Deliver a job's last event (an Event, or a finish reason for a job that never ran)."""
        if isinstance(event, str):
            event = Event("", [], event, 0, error)
        with self._lock:
            self._in_system -= 1
        self._emit(job, event)

    def _fail_running(self, message: str) -> None:
        for running in list(self._running.values()):
            self._finish(running, "", "error", message)

    def _emit(self, job: Job, event: Event) -> None:
        try:
            job.sink(event)
        except Exception:
            # A sink that fails (the loop closed) must not take the model thread down.
            logger.exception("delivering an event for request %d failed", job.request_id)
