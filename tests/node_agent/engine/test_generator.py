"""Model-thread admission and per-request sampling, without loading a model."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest

from mlxfleet.openai.protocol import SamplingParams
from mlxfleet.tiers import Knobs
from node_agent.engine.generator import Job, ModelThread
from node_agent.engine.sampling import make_request_sampler
from node_agent.errors import QueueFull

PARAMS = SamplingParams(max_tokens=4, temperature=0.0, top_p=1.0, seed=None, stop=())


def test_submit_refuses_when_queue_limit_requests_wait() -> None:
    knobs = Knobs(max_concurrency=2, batch_window_ms=0, max_batch_size=12, queue_limit=3)
    thread = ModelThread(Path("/nonexistent"), knobs=knobs)
    for i in range(3):
        thread.submit(Job(i, [1, 2], 4, PARAMS, lambda event: None))
    with pytest.raises(QueueFull):
        thread.submit(Job(99, [1, 2], 4, PARAMS, lambda event: None))
    stats = thread.stats()
    assert (stats.active, stats.queued, stats.requests_total) == (0, 3, 3)
    # A higher limit applies to the next submission, without a new thread.
    thread.set_knobs(Knobs(2, 0, 12, queue_limit=4))
    thread.submit(Job(100, [1, 2], 4, PARAMS, lambda event: None))
    assert (thread.stats().queued, thread.stats().knobs.queue_limit) == (4, 4)


def _draws(sampler, logprobs: mx.array, n: int) -> list[int]:
    return [int(sampler(logprobs).item()) for _ in range(n)]


def test_seeded_sampler_ignores_other_requests_draws() -> None:
    logprobs = mx.log(mx.softmax(mx.arange(50, dtype=mx.float32)[None] / 10.0, axis=-1))
    alone = _draws(make_request_sampler(1.0, 1.0, 42), logprobs, 20)
    mine, other = make_request_sampler(1.0, 1.0, 42), make_request_sampler(1.0, 0.9, 7)
    interleaved = []
    for _ in range(20):
        other(logprobs)
        mx.random.uniform()  # the global RNG moving must not matter either
        interleaved.append(int(mine(logprobs).item()))
    assert interleaved == alone
    assert len(set(alone)) > 1
    assert _draws(make_request_sampler(1.0, 1.0, 43), logprobs, 20) != alone


def test_temperature_zero_is_the_shared_greedy_sampler() -> None:
    greedy = make_request_sampler(0.0, 0.5, 3)
    assert greedy is make_request_sampler(0.0, 1.0, None)
    assert int(greedy(mx.array([[0.1, 0.7, 0.2]])).item()) == 1
