"""Per-request samplers: each owns its random key, so one request's seed never moves another's."""

from __future__ import annotations

import secrets
from collections.abc import Callable

import mlx.core as mx
from mlx_lm.sample_utils import apply_top_p, greedy_sampler

Sampler = Callable[[mx.array], mx.array]

_SEED_MODULUS = 2**64


def make_request_sampler(temperature: float, top_p: float, seed: int | None) -> Sampler:
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
        return mx.random.categorical(logprobs * inverse_temperature, key=subkey)

    return sample
