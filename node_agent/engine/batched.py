"""Continuous batching over mlx-lm's BatchGenerator: a new sequence joins the running batch at
the next decode step. The KV cache stays in the model's dtype: in mlx-lm 0.32.2 BatchGenerator
takes no kv_bits, and a QuantizedKVCache has no `merge`, so it could not join a batch anyway.

A new sequence starts from the longest prefix the prefix cache holds (prefix_cache.py): its KV
goes in as the sequence's cache, and only the rest of the prompt is prefilled. A finished
sequence's KV (prompt and answer), which BatchGenerator hands back, goes into the cache."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, StopSequences

from node_agent.engine.decoder import Decoder, NewSequences, Token
from node_agent.engine.prefix_cache import CacheStats, PrefixCache
from node_agent.engine.sampling import make_request_sampler

# Tokens of a prompt prefilled per step, between two decode steps of the running batch. On a GPU
# mlx-lm's own 2048: a 7.2K-token prompt prefilled 1.3x faster than in 512-token slices (H200,
# docs/benchmarks.md), and a 2048-token slice of a 7B model takes ~0.3 s. On a CPU a 2048-token
# slice would stall running decodes for seconds, so slices stay small there.
PREFILL_STEP_SIZE_TOKENS = {"gpu": 2048, "cpu": 512}


def prefill_step_size() -> int:
    """The prefill slice for the device MLX computes on."""
    return PREFILL_STEP_SIZE_TOKENS["gpu" if mx.default_device() == mx.gpu else "cpu"]


class BatchDecoder(Decoder):
    """The interactive tier's decoder (and the batch tier's unless it quantizes its KV)."""

    def __init__(
        self,
        model: Any,
        eos_ids: frozenset[int],
        slots: int,
        cache_budget_bytes: int = 0,
        token_bytes: int = 0,  # a group's rank: what it counts a cached token at (PrefixCache)
    ) -> None:
        self._model = model
        self._cache_budget = cache_budget_bytes
        self._token_bytes = token_bytes
        self.prefix = PrefixCache(cache_budget_bytes, token_bytes=token_bytes)
        self._cached: dict[int, int] = {}  # uid -> prompt tokens taken from the cache
        # The only stop sequences BatchGenerator sees are EOS tokens; stop strings are ours.
        self._eos_stops = StopSequences([(t,) for t in sorted(eos_ids)])
        self._no_stops = StopSequences([])
        self._bg = self._new_generator(slots)

    def _new_generator(self, slots: int) -> Any:
        return BatchGenerator(
            self._model,
            completion_batch_size=slots,
            prefill_batch_size=slots,
            prefill_step_size=prefill_step_size(),
        )

    def slots(self, max_concurrency: int) -> int:
        # BatchGenerator reads its sizes at every step: follow max_concurrency without a reload.
        self._bg.completion_batch_size = self._bg.prefill_batch_size = max_concurrency
        return max_concurrency

    def _start(self, new: NewSequences) -> list[int]:
        found = [self.prefix.lookup(prompt) for prompt in new.prompts]
        # Inserted together, they prefill together (each from where its cached prefix ends).
        uids = list(
            self._bg.insert(
                [prompt[n:] for prompt, (_, n) in zip(new.prompts, found, strict=True)],
                max_tokens=new.max_tokens,
                caches=[cache for cache, _ in found],
                all_tokens=[prompt[:n] for prompt, (_, n) in zip(new.prompts, found, strict=True)],
                samplers=new.samplers,
                logits_processors=new.processors,
                stop_sequences=[self._no_stops if i else self._eos_stops for i in new.ignore_eos],
            )
        )
        for uid, (_, n) in zip(uids, found, strict=True):
            self._cached[uid] = n
        return uids

    def cached(self, uid: int) -> int:
        return self._cached.pop(uid, 0)

    def cache_stats(self) -> CacheStats:
        return self.prefix.stats()

    def drop_cache(self) -> int:
        return self.prefix.clear()

    def remove(self, uid: int) -> None:
        self._bg.remove([uid])

    def step(self) -> list[Token]:
        _, responses = self._bg.next()
        for r in responses:
            if r.finish_reason is not None and r.prompt_cache:
                # The KV of every token the model has run: the last one drawn is not among them.
                held = r.prompt_cache[0].offset
                self.prefix.insert(list(r.all_tokens[:held]), r.prompt_cache)
        return [Token(r.uid, r.token, r.finish_reason, r.logprobs) for r in responses]

    def reset(self) -> None:
        self._bg = self._new_generator(self._bg.completion_batch_size)

    def warm_up(self, prompt_ids: list[int], max_tokens: int) -> None:
        # Greedy and sampled decoding, alone and in a batch of two: each takes other kernels
        # (compiled by g++ on Linux on first use).
        greedy, sampled = make_request_sampler(0.0, 1.0, None), make_request_sampler(1.0, 0.9, 0)
        for samplers in ([greedy], [greedy, sampled]):
            n = len(samplers)
            uids = set(self.insert([prompt_ids] * n, [max_tokens] * n, samplers))
            while uids:
                for response in self._bg.next_generated():
                    if response.finish_reason is not None:
                        uids.discard(response.uid)
        # The warm-up's sequences are no prefix.
        self.prefix = PrefixCache(self._cache_budget, token_bytes=self._token_bytes)
        self._cached.clear()
