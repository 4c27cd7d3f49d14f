"""The model thread: the one thread that owns the model and its decoder (see decoder.py)."""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlxfleet.errors import ApiError, KvCacheError
from mlxfleet.kv import DEFAULT_CONTEXT_LENGTH, DEFAULT_KV_GROUP_SIZE, check_kv
from mlxfleet.tiers import DEFAULT_KNOBS, Knobs
from node_agent.engine.decoder import Decoder, Token
from node_agent.engine.jobs import EngineStats, Event, Job, TokenLogprob, token_logprob
from node_agent.engine.knobs import admit_now, window_remaining_ms
from node_agent.engine.textstream import TextStream
from node_agent.errors import CannotSplit, ModelLoadFailed, QueueFull, SplitError

if TYPE_CHECKING:
    from node_agent.engine.config import GroupSpec
    from node_agent.engine.group import Rank, Recipe

logger = logging.getLogger(__name__)

WARMUP_PROMPT = "Hello, world."
WARMUP_MAX_TOKENS = 4


@dataclass(frozen=True, slots=True)
class _Cancel:
    request_id: int


@dataclass(frozen=True, slots=True)
class _DropCache:
    done: concurrent.futures.Future[int]  # the bytes freed, once the model thread dropped them


@dataclass(frozen=True, slots=True)
class _Waiting:
    job: Job
    since_s: float  # time.monotonic() at submit


@dataclass(slots=True)
class _Running:
    job: Job
    text: TextStream
    uid: int
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    completion_tokens: int = 0
    cached_tokens: int = 0  # of its prompt, from the prefix cache

    def logprobs(self) -> list[TokenLogprob] | None:
        """The pending tokens' logprobs, handed over with their ids (None: not asked for)."""
        if not self.job.params.logprobs:
            return None
        taken, self.pending_logprobs = self.pending_logprobs, []
        return taken


_STOP = object()
_WAKE = object()  # new knobs: decide admissions again


class ModelThread:
    """Loads the model, then admits submitted jobs to its decoder as the knobs allow.

    The decoder is mlx-lm's continuous batching (batched.py), or with `kv_bits` one sequence at
    a time over a quantized KV cache (sequential.py), the others waiting in the queue.
    submit, cancel, set_knobs, stats and stop may be called from any thread. Every submitted job
    gets exactly one final Event (finish_reason set), whatever happens to it.
    """

    def __init__(
        self,
        model_path: Path,
        *,
        knobs: Knobs = DEFAULT_KNOBS["interactive"],
        context_length: int | None = None,
        kv_bits: int | None = None,
        kv_group_size: int = DEFAULT_KV_GROUP_SIZE,
        prefix_cache_bytes: int = 0,
        group: GroupSpec | None = None,
    ) -> None:
        self._model_path = Path(model_path)
        self._group = group  # one rank of a model spread over several nodes (group.py)
        self.rank: Rank | None = None  # once joined
        self.on_follow_end: Callable[[], None] = lambda: None  # a rank > 0 was told to stop
        self._prefix_cache_bytes = prefix_cache_bytes  # 0: no prefix cache
        self._kv_bits = kv_bits  # None: the KV cache stays in the model's dtype
        self._kv_group_size = kv_group_size
        self._knobs = knobs  # replaced whole (frozen), read at each admission decision
        self.context_length = context_length or DEFAULT_CONTEXT_LENGTH
        self._requested_context = context_length
        self.loaded: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.tokenizer: Any = None
        self.vocab_size = 0
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued = 0  # submitted and not yet admitted or finished; guarded by _lock
        self._waiting: list[_Waiting] = []  # oldest first
        self._running: dict[int, _Running] = {}  # by request id
        self._by_uid: dict[int, _Running] = {}
        self._max_batch_seen = 0
        self._admission_groups = 0
        self._largest_admission = 0
        self._requests_total = 0
        self._generated_total = 0
        self._grammars: Any = None  # a rank > 0 builds rank 0's grammars from their recipes
        self._thread = threading.Thread(target=self._run, name="mlxfleet-model", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def knobs(self) -> Knobs:
        return self._knobs

    def set_knobs(self, knobs: Knobs) -> None:
        """Use `knobs` from the next admission decision on; running requests are left alone.
        ApiError: max_concurrency above 1 with a quantized KV cache."""
        if self._kv_bits is not None:
            try:
                check_kv(self._kv_bits, self._kv_group_size, sequences=knobs.max_concurrency)
            except KvCacheError as exc:
                raise ApiError.invalid(
                    f"Invalid 'max_concurrency': {exc}.", "max_concurrency", "invalid_value"
                ) from None
        with self._lock:
            self._knobs = knobs
        self._inbox.put(_WAKE)

    def drop_prefix_cache(self) -> concurrent.futures.Future[int]:
        """Empty the prefix cache (memory pressure) on the model thread, between two steps;
        the future gets the bytes freed. Running requests keep their KV (it is not cached).
        A group's rank other than 0 asks rank 0, which drops on every rank (group.Channel)."""
        rank = self.rank
        if rank is not None and rank.rank > 0:
            return rank.channel.ask_drop()
        done: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._inbox.put(_DropCache(done))
        return done

    def submit(self, job: Job) -> None:
        """Queue a job; raises QueueFull when queue_limit requests already wait."""
        with self._lock:
            if self._queued >= self._knobs.queue_limit:
                raise QueueFull(f"{self._queued} requests waiting")
            self._queued += 1
            self._requests_total += 1
        self._inbox.put(_Waiting(job, time.monotonic()))

    def cancel(self, request_id: int) -> None:
        """Drop a job wherever it is; its sink then gets a "cancelled" final event."""
        self._inbox.put(_Cancel(request_id))

    def stop(self, timeout_s: float) -> None:
        """Fail what is left, end the thread and wait for it."""
        self._inbox.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def stats(self) -> EngineStats:
        with self._lock:
            queued, requests_total, knobs = self._queued, self._requests_total, self._knobs
        decoder = getattr(self, "_decoder", None)  # set once the model is loaded
        return EngineStats(
            active=len(self._running),
            queued=queued,
            max_batch_seen=self._max_batch_seen,
            requests_total=requests_total,
            generated_tokens_total=self._generated_total,
            admission_groups=self._admission_groups,
            largest_admission=self._largest_admission,
            knobs=knobs,
            kv_bits=self._kv_bits or 16,
            kv_group_size=self._kv_group_size if self._kv_bits else None,
            prefix_cache=decoder.cache_stats() if decoder is not None else None,
            group=self.rank.stats() if self.rank is not None else None,
        )

    # --- on the model thread -------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._load()
        except Exception as exc:
            logger.error("model load failed for %s: %s", self._model_path, exc)
            failed = CannotSplit if isinstance(exc, SplitError) else ModelLoadFailed
            self.loaded.set_exception(failed(f"{self._model_path}: {exc}"))
            return
        self.loaded.set_result(None)
        if self.rank is not None and self.rank.rank > 0:
            self.rank.follow(self._decoder, self._build)
            self.on_follow_end()
            return
        stopping = False
        while not stopping:
            try:
                stopping = self._take_inbox(self._inbox_timeout_s())
                self._admit()
                if self._running and not stopping:
                    self._step()
                elif not self._running:
                    self._decoder.idle()
            except Exception:
                # Whatever broke, the thread must live on: fail the batch and start afresh.
                logger.exception("generation failed; failing %d requests", len(self._running))
                self._fail_running("internal error during generation")
                self._decoder.reset()
        self._take_inbox(0.0)  # jobs submitted after the stop message still get their end
        for waiting in self._dequeue(len(self._waiting)):
            self._final(waiting.job, "error", "the engine is shutting down")
        self._fail_running("the engine is shutting down")
        self._decoder.close()

    def _load(self) -> None:
        import mlx_lm

        # mlx_lm.load treats a missing directory as a Hugging Face repo id; engines only serve
        # local files the agent placed, so say plainly what is missing instead.
        if not (self._model_path / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in {self._model_path}")
        if self._group is None:
            loaded = mlx_lm.load(str(self._model_path))
            model, tokenizer = loaded[0], loaded[1]
        else:
            from node_agent.engine.group import Rank

            self.rank = Rank(self._group, self._model_path)  # joined, its layers loaded
            model, tokenizer = self.rank.model, self.rank.tokenizer
        self.tokenizer = tokenizer
        args = getattr(model, "args", None)
        self.vocab_size = getattr(args, "vocab_size", None) or len(tokenizer._tokenizer)
        self._eos_ids = frozenset(tokenizer.eos_token_ids)
        model_max = getattr(args, "max_position_embeddings", None)
        if self._requested_context is None and model_max:
            self.context_length = min(int(model_max), DEFAULT_CONTEXT_LENGTH)
        self._decoder = self._new_decoder(model)
        if self.rank is not None:
            self._decoder = self.rank.wrap(self._decoder)
        if self.rank is None or self.rank.rank == 0:  # the others warm up as rank 0 tells them
            self._decoder.warm_up(list(tokenizer.encode(WARMUP_PROMPT)), WARMUP_MAX_TOKENS)
        logger.info(
            "model %s loaded and warmed up (context %d tokens, eos %s, kv %s)",
            self._model_path,
            self.context_length,
            sorted(self._eos_ids),
            "fp16" if self._kv_bits is None else f"{self._kv_bits}-bit, one sequence at a time",
        )

    def _new_decoder(self, model: Any) -> Decoder:
        # Imported here: importing the engine should not pay for mlx-lm until the thread runs.
        if self._kv_bits is None:
            from node_agent.engine.batched import BatchDecoder

            return BatchDecoder(
                model,
                self._eos_ids,
                self._knobs.max_concurrency,
                self._prefix_cache_bytes,
                self.rank.token_bytes if self.rank is not None else 0,
            )
        from node_agent.engine.sequential import SequentialDecoder

        return SequentialDecoder(
            model, self._eos_ids, self._kv_bits, self._kv_group_size, self._prefix_cache_bytes
        )

    def _inbox_timeout_s(self) -> float | None:
        """How long the thread may block on the inbox: not at all while decoding, until the
        batch window ends while requests wait for it, forever when there is nothing to do."""
        if self._running:
            return 0.0
        remaining_ms = window_remaining_ms(self._waiting_ages_ms(), self._knobs)
        idle = self._decoder.idle_interval_s()
        if remaining_ms is None:
            return idle
        return remaining_ms / 1000 if idle is None else min(idle, remaining_ms / 1000)

    def _take_inbox(self, timeout_s: float | None) -> bool:
        """Move messages from the inbox into state (waiting up to `timeout_s` for the first;
        None: until one comes); returns True when told to stop."""
        try:
            item = self._inbox.get(timeout=timeout_s) if timeout_s != 0 else self._next_nowait()
        except queue.Empty:
            item = None
        while item is not None:
            if item is _STOP:
                return True
            if isinstance(item, _Cancel):
                self._cancel(item.request_id)
            elif isinstance(item, _DropCache):
                decoder = getattr(self, "_decoder", None)  # None before the model loaded
                item.done.set_result(decoder.drop_cache() if decoder is not None else 0)
            elif isinstance(item, _Waiting):
                self._waiting.append(item)
            item = self._next_nowait()
        return False

    def _next_nowait(self) -> Any:
        try:
            return self._inbox.get_nowait()
        except queue.Empty:
            return None

    def _waiting_ages_ms(self) -> list[float]:
        now = time.monotonic()
        return [(now - w.since_s) * 1000 for w in self._waiting]

    def _dequeue(self, n: int) -> list[_Waiting]:
        taken, self._waiting = self._waiting[:n], self._waiting[n:]
        with self._lock:
            self._queued -= len(taken)
        return taken

    def _admit(self) -> None:
        """Admit groups of waiting requests as the knobs in force allow (see admit_now)."""
        knobs = self._knobs
        slots = self._decoder.slots(knobs.max_concurrency)
        while True:
            free = slots - len(self._running)
            n = admit_now(self._waiting_ages_ms(), free, knobs)
            if n == 0:
                return
            self._start([w.job for w in self._dequeue(n)])
            self._admission_groups += 1
            self._largest_admission = max(self._largest_admission, n)

    def _start(self, jobs: list[Job]) -> None:
        """Insert jobs into the decoder together (a batch prefills them together)."""
        from node_agent.engine.group import recipe_for
        from node_agent.engine.sampling import sequence_sampling

        ready: list[tuple[Job, Any, list[Any]]] = []
        recipes: list[Recipe] = []  # a group's: how its other ranks build the same samplers
        for job in jobs:
            try:
                # A group's ranks all build the same sampler from one recipe (a fixed seed).
                recipe = recipe_for(job.params, job.grammar) if self.rank else None
                params = job.params if recipe is None else recipe.params
                ready.append((job, *sequence_sampling(params, job.grammar)))
                if recipe is not None:
                    recipes.append(recipe)
            except Exception as exc:
                logger.exception("could not start request %d", job.request_id)
                self._final(job, "error", str(exc))
        if not ready:
            return
        try:
            uids = self._decoder.insert(
                [job.prompt_ids for job, _, _ in ready],
                [job.max_tokens for job, _, _ in ready],
                [sampler for _, sampler, _ in ready],
                [job.params.ignore_eos for job, _, _ in ready],
                [processors for _, _, processors in ready],
                recipes or None,
            )
        except Exception as exc:
            logger.exception("could not start %d requests", len(ready))
            for job, _, _ in ready:
                self._final(job, "error", str(exc))
            return
        for (job, _, _), uid in zip(ready, uids, strict=True):
            text = TextStream(self.tokenizer.detokenizer, job.params.stop)
            text.resume(job.sent_ids)
            running = _Running(job, text, uid, cached_tokens=self._decoder.cached(uid))
            self._running[job.request_id] = running
            self._by_uid[uid] = running

    def _build(self, recipe: Recipe) -> tuple[Any, list[Any]]:
        """A sequence's sampler and processors from rank 0's recipe (a rank > 0)."""
        from node_agent.engine.grammar import Grammars
        from node_agent.engine.sampling import sequence_sampling

        grammar = None
        if recipe.grammar is not None:
            if self._grammars is None:
                self._grammars = Grammars(self.tokenizer, self.vocab_size)
            grammar = self._grammars.from_recipe(*recipe.grammar)
        return sequence_sampling(recipe.params, grammar)

    def _cancel(self, request_id: int) -> None:
        for i, waiting in enumerate(self._waiting):
            if waiting.job.request_id == request_id:
                del self._waiting[i]
                with self._lock:
                    self._queued -= 1
                self._final(waiting.job, "cancelled")
                return
        running = self._running.get(request_id)
        if running is not None:
            self._decoder.remove(running.uid)
            self._finish(running, "", "cancelled")

    def _step(self) -> None:
        tokens = self._decoder.step()
        if tokens:
            self._max_batch_seen = max(self._max_batch_seen, len(tokens))
            self._generated_total += len(tokens)
        for token in tokens:
            running = self._by_uid.get(token.uid)
            if running is not None:
                self._on_token(running, token)

    def _on_token(self, running: _Running, generated: Token) -> None:
        token, finish_reason = generated.token, generated.finish_reason
        text = ""
        # A decoder's "stop" is an EOS token, which is not content.
        if not (finish_reason == "stop" and token in self._eos_ids):
            running.pending_ids.append(token)
            running.completion_tokens += 1
            params = running.job.params
            if params.logprobs and generated.logprobs is not None:
                running.pending_logprobs.append(
                    token_logprob(token, generated.logprobs, params.top_logprobs)
                )
            text = running.text.add(token)
        if running.text.stopped:
            if finish_reason is None:
                self._decoder.remove(running.uid)
            self._finish(running, text, "stop")
        elif finish_reason is not None:
            text += running.text.finish()
            self._finish(running, text, "stop" if running.text.stopped else finish_reason)
        elif text:
            self._emit(running.job, Event(text, running.pending_ids, logprobs=running.logprobs()))
            running.pending_ids = []

    def _finish(self, running: _Running, text: str, reason: str, error: str | None = None) -> None:
        self._running.pop(running.job.request_id, None)
        self._by_uid.pop(running.uid, None)
        event = Event(
            text,
            running.pending_ids,
            reason,
            running.completion_tokens,
            error,
            running.logprobs(),
            running.text.stop_sequence,
            running.cached_tokens,
        )
        self._final(running.job, event)

    def _final(self, job: Job, event: Event | str, error: str | None = None) -> None:
        """Deliver a job's last event (an Event, or a finish reason for a job that never ran)."""
        if isinstance(event, str):
            event = Event("", [], event, 0, error)
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
