"""The quantized-KV path: one request at a time through generate_step, on the demo model.

In-process (a model thread and its sinks, no HTTP): what matters is the decoder and the queue.
The demo model's head_dim is 32, so these use kv_group_size 32 (mlx-lm's 64 does not divide it).
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm.models.cache import QuantizedKVCache

from mlxfleet.errors import ApiError
from mlxfleet.openai.protocol import SamplingParams
from mlxfleet.tiers import Knobs
from node_agent.engine.batched import BatchDecoder
from node_agent.engine.generator import Event, Job, ModelThread
from node_agent.engine.sampling import LogitsProcessor, make_request_sampler, processors_for
from node_agent.engine.sequential import SequentialDecoder
from node_agent.errors import QueueFull
from tests.node_agent.engine.test_engine_prefix_cache import turn

KV_BITS = 8
GROUP_SIZE = 32
KNOBS = Knobs(max_concurrency=1, batch_window_ms=80, max_batch_size=1, queue_limit=64)
PROMPT = "The quick brown"
CACHE_BYTES = 64 * 2**20
EVENT_TIMEOUT_S = 60.0
_ids = itertools.count(1)


class Sink:
    """A request's events as the model thread delivers them; `log` is shared across requests
    to see their order (sinks run on the one model thread, so appends are ordered)."""

    def __init__(self, log: list[tuple[int, str | None]] | None = None) -> None:
        self.request_id = next(_ids)
        self.events: list[Event] = []
        self.started, self.done = threading.Event(), threading.Event()
        self._log = log

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if self._log is not None:
            self._log.append((self.request_id, event.finish_reason))
        self.started.set()
        if event.finish_reason is not None:
            self.done.set()

    def final(self) -> Event:
        assert self.done.wait(EVENT_TIMEOUT_S), f"request {self.request_id} never finished"
        return self.events[-1]

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)

    @property
    def token_ids(self) -> list[int]:
        return [t for e in self.events for t in e.token_ids]


@pytest.fixture(scope="module")
def thread(demo_model: Path) -> Iterator[ModelThread]:
    running = ModelThread(demo_model, knobs=KNOBS, kv_bits=KV_BITS, kv_group_size=GROUP_SIZE)
    running.start()
    running.loaded.result(EVENT_TIMEOUT_S)
    yield running
    running.stop(10.0)


def submit(
    thread: ModelThread,
    max_tokens: int = 16,
    log: list[tuple[int, str | None]] | None = None,
    **params: object,
) -> Sink:
    sink = Sink(log)
    sampling = SamplingParams(
        max_tokens=max_tokens,
        temperature=float(params.get("temperature", 0.0)),  # type: ignore[arg-type]
        top_p=1.0,
        seed=params.get("seed"),  # type: ignore[arg-type]
        stop=tuple(params.get("stop", ())),  # type: ignore[call-overload]
    )
    prompt = list(thread.tokenizer.encode(PROMPT))
    thread.submit(Job(sink.request_id, prompt, max_tokens, sampling, sink))
    return sink


def test_the_decoder_keeps_a_quantized_kv_cache(demo_model: Path) -> None:
    model, tokenizer = mlx_lm.load(str(demo_model))[:2]
    decoder = SequentialDecoder(model, frozenset(), KV_BITS, GROUP_SIZE)
    prompt = list(tokenizer.encode(PROMPT))
    (uid,) = decoder.insert([prompt], [8], [make_request_sampler(0.0, 1.0, None)])
    assert decoder.slots(12) == 1
    with pytest.raises(ValueError, match="one sequence at a time"):
        decoder.insert([prompt], [8], [make_request_sampler(0.0, 1.0, None)])
    first = decoder.step()
    cache = decoder.cache
    assert cache is not None and len(cache) == 2  # the demo model's layers
    assert all(isinstance(c, QuantizedKVCache) for c in cache)
    assert {(c.bits, c.group_size) for c in cache} == {(KV_BITS, GROUP_SIZE)}
    # Packed uint32 codes, plus a float32 scale and bias per 32 values (the demo is float32).
    packed, scales, biases = cache[0].keys
    assert (packed.dtype, scales.dtype, biases.dtype) == (mx.uint32, mx.float32, mx.float32)
    assert packed.shape[-1] == 32 * KV_BITS // 32 and scales.shape[-1] == 32 // GROUP_SIZE
    fp32_bytes = 2 * 2 * packed.shape[-2] * 32 * 4  # K and V, 2 KV heads, head_dim 32
    assert cache[0].nbytes == fp32_bytes * (KV_BITS / 8 + 2 * 4 / GROUP_SIZE) / 4
    rest = [decoder.step() for _ in range(7)]
    assert [t.uid for t in first] == [uid]
    assert [t.finish_reason for (t,) in rest] == [None] * 6 + ["length"]
    assert decoder.cache is None and decoder.step() == []


def test_an_eos_token_ends_the_sequence_with_stop(demo_model: Path) -> None:
    model, tokenizer = mlx_lm.load(str(demo_model))[:2]
    prompt = list(tokenizer.encode(PROMPT))
    greedy = make_request_sampler(0.0, 1.0, None)
    probe = SequentialDecoder(model, frozenset(), KV_BITS, GROUP_SIZE)
    probe.insert([prompt], [3], [greedy])
    first, second = probe.step()[0].token, probe.step()[0].token
    decoder = SequentialDecoder(model, frozenset({second}), KV_BITS, GROUP_SIZE)
    decoder.insert([prompt], [8], [greedy])
    assert [(t.token, t.finish_reason) for t in decoder.step()] == [(first, None)]
    assert [(t.token, t.finish_reason) for t in decoder.step()] == [(second, "stop")]


@pytest.mark.parametrize("kind", ["sequential", "batched"])
def test_ignore_eos_runs_to_max_tokens_through_an_eos_token(demo_model: Path, kind: str) -> None:
    """vLLM's ignore_eos, for benchmarks that must generate exactly max_tokens: the token
    that ends the plain request is generated through by the one that ignores it."""
    model, tokenizer = mlx_lm.load(str(demo_model))[:2]
    prompt = list(tokenizer.encode(PROMPT))
    greedy = make_request_sampler(0.0, 1.0, None)
    probe = SequentialDecoder(model, frozenset(), KV_BITS, GROUP_SIZE)
    probe.insert([prompt], [3], [greedy])
    second = [probe.step()[0].token for _ in range(2)][1]
    eos = frozenset({second})
    decoder: SequentialDecoder | BatchDecoder = (
        SequentialDecoder(model, eos, KV_BITS, GROUP_SIZE)
        if kind == "sequential"
        else BatchDecoder(model, eos, 2)
    )
    n = 1 if kind == "sequential" else 2  # the sequential decoder takes one at a time
    uids = decoder.insert([prompt] * n, [6] * n, [greedy] * n, [True, False][:n])
    finished: dict[int, list[str | None]] = {uid: [] for uid in uids}
    while any(not f or f[-1] is None for f in finished.values()):
        for t in decoder.step():
            finished[t.uid].append(t.finish_reason)
    assert finished[uids[0]] == [None] * 5 + ["length"]  # 6 tokens, the EOS among them
    if kind == "batched":
        assert finished[uids[1]] == [None, "stop"]  # the plain request stops at the EOS


def test_a_group_size_that_does_not_divide_head_dim_fails_the_warm_up(demo_model: Path) -> None:
    model, tokenizer = mlx_lm.load(str(demo_model))[:2]
    decoder = SequentialDecoder(model, frozenset(), KV_BITS, 64)
    with pytest.raises(ValueError, match="divisible by the quantization group size 64"):
        decoder.warm_up(list(tokenizer.encode(PROMPT)), 4)


@pytest.fixture(scope="module")
def loaded(demo_model: Path) -> tuple[Any, Any]:
    """The demo model and its tokenizer, for decoders driven directly."""
    model, tokenizer = mlx_lm.load(str(demo_model))[:2]
    return model, tokenizer


def chat_prompt(tokenizer: Any, question: str) -> list[int]:
    """A chat turn's prompt ids: the ~600-token system prompt, then `question`."""
    return list(tokenizer.apply_chat_template(turn(question), add_generation_prompt=True))


@dataclass(frozen=True, slots=True)
class Answer:
    tokens: list[int]
    cached: int  # prompt tokens that came from the prefix cache
    logprobs: mx.array  # one row per token


def generate(
    decoder: SequentialDecoder,
    prompt: list[int],
    max_tokens: int = 16,
    processors: list[LogitsProcessor] | None = None,
) -> Answer:
    """A greedy answer to the end."""
    greedy = make_request_sampler(0.0, 1.0, None)
    (uid,) = decoder.insert([prompt], [max_tokens], [greedy], None, [processors or []])
    cached, tokens = decoder.cached(uid), []
    while True:
        (token,) = decoder.step()
        tokens.append(token)
        if token.finish_reason is not None:
            logprobs = mx.stack([t.logprobs for t in tokens if t.logprobs is not None])
            return Answer([t.token for t in tokens], cached, logprobs)


def decoders(loaded: tuple[Any, Any]) -> tuple[SequentialDecoder, SequentialDecoder]:
    """One decoder with a prefix cache and one without."""
    model = loaded[0]
    return (
        SequentialDecoder(model, frozenset(), KV_BITS, GROUP_SIZE, CACHE_BYTES),
        SequentialDecoder(model, frozenset(), KV_BITS, GROUP_SIZE),
    )


def test_a_follow_up_turn_starts_from_the_cached_prefix_and_answers_the_same(
    loaded: tuple[Any, Any],
) -> None:
    cached, plain = decoders(loaded)
    tokenizer = loaded[1]
    assert generate(cached, chat_prompt(tokenizer, "What is the weather?")).cached == 0
    follow = chat_prompt(tokenizer, "And tomorrow?")
    answer = generate(cached, follow)
    assert len(follow) > 600 and 0.9 * len(follow) <= answer.cached < len(follow)
    reference = generate(plain, follow)
    assert (reference.tokens, reference.cached) == (answer.tokens, 0)
    # Not only the same tokens: the same distributions (0 apart on the CPU; with mlx-lm's own
    # order, where the first prefill slice attends unquantized KV, 3.5e-4 apart).
    gap = mx.abs(answer.logprobs - reference.logprobs).max().item()
    assert isinstance(gap, float) and gap < 1e-5
    stats = cached.cache_stats()
    assert (stats.hits, stats.tokens_saved, stats.entries) == (1, answer.cached, 2)
    assert 0 < stats.bytes <= stats.budget_bytes == CACHE_BYTES
    assert plain.cache_stats().entries == 0


@pytest.mark.parametrize("penalty", [{"repetition_penalty": 1.5}, {"frequency_penalty": 1.5}])
def test_a_penalty_sees_the_cached_prefix_tokens_too(
    loaded: tuple[Any, Any], penalty: dict[str, float]
) -> None:
    """A continuation (the prompt and the first 12 tokens of its answer, as failover sends it):
    all but its last token come from the cache, and the penalty's window (the last 20 tokens)
    must still see them, as it does without the cache."""
    cached, plain = decoders(loaded)
    params = SamplingParams(max_tokens=12, temperature=0.0, top_p=1.0, seed=None, stop=())
    penalized = dataclasses.replace(params, **penalty)  # type: ignore[arg-type]
    prompt = chat_prompt(loaded[1], "What is MLX?")
    free = generate(cached, prompt, 24).tokens
    continued = prompt + free[:12]
    answer = generate(cached, continued, 12, processors_for(penalized))
    assert answer.cached == len(continued) - 1
    assert generate(plain, continued, 12, processors_for(penalized)).tokens == answer.tokens
    assert answer.tokens != free[12:]  # the penalty changed the answer


def test_a_removed_sequence_is_kept_up_to_its_last_token_and_drop_cache_empties_it(
    loaded: tuple[Any, Any],
) -> None:
    """A stop string or a cancel removes a sequence: the KV it has is still a good prefix."""
    cached, _ = decoders(loaded)
    prompt = chat_prompt(loaded[1], "What is MLX?")
    greedy = make_request_sampler(0.0, 1.0, None)
    (uid,) = cached.insert([prompt], [16], [greedy])
    head = [cached.step()[0].token for _ in range(3)]
    cached.remove(uid)
    assert cached.cache is None and cached.cache_stats().entries == 1
    assert generate(cached, [*prompt, *head, 7, 8]).cached == len(prompt) + 3
    before = cached.cache_stats()
    assert cached.drop_cache() == before.bytes > 0
    after = cached.cache_stats()
    assert (after.entries, after.bytes) == (0, 0)
    assert generate(cached, [*prompt, *head, 7, 8]).cached == 0


def test_the_warm_up_and_a_failure_leave_no_entry(loaded: tuple[Any, Any]) -> None:
    cached, _ = decoders(loaded)
    prompt = chat_prompt(loaded[1], "Warm up.")
    cached.warm_up(prompt, 4)  # two runs of a long prompt: the second would hit the first
    stats = cached.cache_stats()
    assert (stats.entries, stats.bytes, stats.hits, stats.misses) == (0, 0, 0, 0)
    cached.insert([prompt], [8], [make_request_sampler(0.0, 1.0, None)])
    cached.step()
    cached.reset()  # after a failure: the KV may be half-written
    assert cached.cache_stats().entries == 0


def test_greedy_is_deterministic_and_requests_run_one_at_a_time(thread: ModelThread) -> None:
    log: list[tuple[int, str | None]] = []
    first, second = submit(thread, 24, log), submit(thread, 24, log)
    a, b = first.final(), second.final()
    assert a.finish_reason == b.finish_reason and a.finish_reason in ("stop", "length")
    assert first.token_ids == second.token_ids and first.text == second.text and first.text
    assert a.completion_tokens == len(first.token_ids)
    # FIFO, never together: every event of the first comes before any of the second.
    order = [request_id for request_id, _ in log]
    assert order == sorted(order) and set(order) == {first.request_id, second.request_id}
    stats = thread.stats()
    assert (stats.max_batch_seen, stats.active, stats.queued) == (1, 0, 0)
    assert (stats.kv_bits, stats.kv_group_size) == (KV_BITS, GROUP_SIZE)


def test_seed_makes_sampling_reproducible(thread: ModelThread) -> None:
    def sample(seed: int) -> list[int]:
        sink = submit(thread, 20, temperature=1.0, seed=seed)
        sink.final()
        return sink.token_ids

    assert sample(7) == sample(7)
    assert len({tuple(sample(s)) for s in (1, 2, 3)}) > 1


def test_max_tokens_is_honoured(thread: ModelThread) -> None:
    sink = submit(thread, 7)
    final = sink.final()
    assert final.completion_tokens == len(sink.token_ids)
    if final.finish_reason == "length":
        assert final.completion_tokens == 7
    assert final.completion_tokens <= 7


def test_stop_string_cuts_the_text(thread: ModelThread) -> None:
    full = submit(thread, 40)
    full.final()
    stop = full.text[12:16]
    assert stop.strip(), full.text
    cut = submit(thread, 40, stop=[stop])
    assert cut.final().finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]


def test_cancel_a_waiting_and_the_running_request(thread: ModelThread) -> None:
    running = submit(thread, 3000, temperature=1.0, seed=5)
    waiting = submit(thread, 16)
    assert running.started.wait(EVENT_TIMEOUT_S)
    assert (thread.stats().active, thread.stats().queued) == (1, 1)
    thread.cancel(waiting.request_id)
    assert waiting.final() == Event("", [], "cancelled", 0)
    thread.cancel(running.request_id)
    assert running.final().finish_reason == "cancelled"
    assert 0 < running.final().completion_tokens < 3000
    after = submit(thread, 4)  # the thread goes on with the next request
    assert after.final().finish_reason in ("stop", "length")
    assert (thread.stats().active, thread.stats().queued) == (0, 0)


def test_queue_full_counts_only_the_waiting(thread: ModelThread) -> None:
    thread.set_knobs(dataclasses.replace(KNOBS, queue_limit=1))
    try:
        running = submit(thread, 3000, temperature=1.0, seed=5)
        assert running.started.wait(EVENT_TIMEOUT_S)  # admitted: no longer queued
        waiting = submit(thread, 4)
        with pytest.raises(QueueFull):
            submit(thread, 4)
        thread.cancel(running.request_id)
        assert running.final().finish_reason == "cancelled"
        assert waiting.final().finish_reason in ("stop", "length")
    finally:
        thread.set_knobs(KNOBS)


def test_max_concurrency_above_one_is_refused(thread: ModelThread) -> None:
    with pytest.raises(ApiError, match="must be 1, got 2") as info:
        thread.set_knobs(dataclasses.replace(KNOBS, max_concurrency=2))
    assert info.value.param == "max_concurrency"
    assert thread.knobs == KNOBS
