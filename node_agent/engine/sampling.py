"""Per-request samplers and logits processors, for one sequence inside a running batch.

Each sampler owns its random key, so one request's seed never moves another's. Filters (top_p,
min_p, top_k) and processors (logit_bias, the penalties) are mlx-lm's own, as mlx_lm.server
applies them; BatchGenerator runs each sequence's list on that sequence's row only.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import mlx.core as mx
from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    greedy_sampler,
    make_logits_processors,
)

from mlxfleet.openai.sampling import PENALTY_CONTEXT_TOKENS, SamplingParams

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]

_SEED_MODULUS = 2**64


def make_request_sampler(
    temperature: float, top_p: float, seed: int | None, top_k: int = 0, min_p: float = 0.0
) -> Sampler:
    """A sampler for one request; temperature 0 gives the shared greedy sampler."""
    if temperature == 0.0:
        # The same object for every greedy request: BatchGenerator then samples the whole batch
        # with one argmax instead of one call per row.
        return greedy_sampler
    seed = secrets.randbits(63) if seed is None else seed % _SEED_MODULUS
    key = mx.random.key(seed)
    inverse_temperature = 1.0 / temperature

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        # Split per step so the sequence of draws depends only on this request's seed.
        key, subkey = mx.random.split(key)
        if top_p < 1.0:
            logprobs = apply_top_p(logprobs, top_p)
        if min_p > 0.0:
            logprobs = apply_min_p(logprobs, min_p)
        if top_k > 0:
            logprobs = apply_top_k(logprobs, top_k)
        return mx.random.categorical(logprobs * inverse_temperature, key=subkey)

    return sample


def sampler_for(params: SamplingParams) -> Sampler:
    return make_request_sampler(
        params.temperature, params.top_p, params.seed, params.top_k, params.min_p
    )


def sequence_sampling(
    params: SamplingParams, grammar: Any = None
) -> tuple[Sampler, list[LogitsProcessor]]:
    """One sequence's sampler (inside its grammar's constraint, grammar.py) and processors."""
    sampler = sampler_for(params)
    if grammar is not None:
        sampler = grammar.constrain(sampler)
    return sampler, processors_for(params)


def processors_for(params: SamplingParams) -> list[LogitsProcessor]:
    """The request's logits processors (none for most requests: they then cost nothing)."""
    if not params.needs_processors:
        return []
    return make_logits_processors(
        logit_bias=dict(params.logit_bias) or None,
        repetition_penalty=params.repetition_penalty if params.repetition_penalty != 1.0 else None,
        repetition_context_size=PENALTY_CONTEXT_TOKENS,
        presence_penalty=params.presence_penalty or None,
        presence_context_size=PENALTY_CONTEXT_TOKENS,
        frequency_penalty=params.frequency_penalty or None,
        frequency_context_size=PENALTY_CONTEXT_TOKENS,
    )
