"""One sequence at a time through mlx-lm's generate_step, with a quantized KV cache.

Why not BatchGenerator: in mlx-lm 0.32.2 it takes no kv_bits, and it merges every sequence's
cache into a batch (`_merge_caches`), which QuantizedKVCache cannot do (it has no `merge`).
mlx-lm's own server likewise stops batching when --kv-bits is set. So an engine that quantizes
its KV decodes one sequence at a time; the model thread keeps the others waiting, oldest first.
Only the batch tier may run this way: an interactive request must be able to join the running
batch at the next step, not wait for the one before it to finish.

A new sequence starts from the longest prefix the prefix cache holds (prefix_cache.py), as in
batched.py: a trimmed copy of that KV (a QuantizedKVCache can be copied and trimmed, and
generate_step takes it as it is) and only the rest of the prompt to prefill. When a sequence
ends (finished, or removed: a stop string or a cancel), its KV goes into the cache; after a
failure (reset) it does not, since it may be half-written.
"""

from __future__ import annotations

import itertools
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache
from mlx_lm.utils import maybe_set_recommended_wired_limit

from node_agent.engine.decoder import Decoder, NewSequences, Token
from node_agent.engine.prefix_cache import CacheStats, PrefixCache
from node_agent.engine.sampling import LogitsProcessor, make_request_sampler

# Quantize from the first token on: the point is the memory of long contexts (mlx-lm's default,
# 5000, keeps the first 5000 tokens of every request in fp16).
QUANTIZED_KV_START_TOKENS = 0


@dataclass(slots=True)
class _Sequence:
    uid: int
    # generate_step yields (token id, logprobs); its annotation says mx.array for the id.
    steps: Generator[tuple[Any, Any], None, None]
    cache: list[Any]  # the per-layer caches generate_step fills in place
    tokens: list[int]  # the prompt, then each token generated
    max_tokens: int
    ignore_eos: bool = False
    generated: int = 0


def with_prefix(processor: LogitsProcessor, prefix: mx.array) -> LogitsProcessor:
    """`processor` over the whole history: generate_step shows it only the tokens it was given,
    and a cached prefix's tokens count for the penalties too (batched.py's all_tokens)."""
    return lambda tokens, logits: processor(mx.concatenate([prefix, tokens]), logits)


class SequentialDecoder(Decoder):
    """Decodes at most one sequence; its prefill runs inside the first step() (mlx-lm's
    prefill_step_size slices, default 2048 tokens), so a cancel lands after the prefill."""

    def __init__(
        self,
        model: Any,
        eos_ids: frozenset[int],
        kv_bits: int,
        group_size: int,
        cache_budget_bytes: int = 0,
    ) -> None:
        self._model = model
        self._eos_ids = eos_ids
        self._kv_bits = kv_bits
        self._group_size = group_size
        self._cache_budget = cache_budget_bytes
        self.prefix = PrefixCache(cache_budget_bytes)
        self._cached: dict[int, int] = {}  # uid -> prompt tokens taken from the cache
        self._uids = itertools.count()
        self._current: _Sequence | None = None
        # What BatchGenerator does on creation (a no-op without Metal): keep the model wired.
        maybe_set_recommended_wired_limit()

    @property
    def cache(self) -> list[Any] | None:
        """The running sequence's per-layer KV caches (None when idle)."""
        return self._current.cache if self._current is not None else None

    def slots(self, max_concurrency: int) -> int:
        return 1

    def _new_cache(self) -> list[Any]:
        # Quantized before the first token, not after the first prefill slice as generate_step
        # would: the prompt then attends to quantized KV whether or not its prefix came from
        # the cache, so a cached prefix gives exactly the uncached answer.
        return [
            c.to_quantized(group_size=self._group_size, bits=self._kv_bits)
            if hasattr(c, "to_quantized")
            else c
            for c in make_prompt_cache(self._model)
        ]

    def _start(self, new: NewSequences) -> list[int]:
        if self._current is not None or len(new.prompts) != 1:
            raise ValueError(f"decodes one sequence at a time, asked to start {len(new.prompts)}")
        prompt = new.prompts[0]
        found, n = self.prefix.lookup(prompt)
        cache = found if found is not None else self._new_cache()
        processors = new.processors[0]
        if n and processors:
            prefix = mx.array(prompt[:n])
            processors = [with_prefix(p, prefix) for p in processors]
        steps = generate_step(
            mx.array(prompt[n:]),
            self._model,
            max_tokens=new.max_tokens[0],
            sampler=new.samplers[0],
            logits_processors=processors or None,
            prompt_cache=cache,
            kv_bits=self._kv_bits,
            kv_group_size=self._group_size,
            quantized_kv_start=QUANTIZED_KV_START_TOKENS,
        )
        ignore = bool(new.ignore_eos[0])
        uid = next(self._uids)
        self._current = _Sequence(uid, steps, cache, list(prompt), new.max_tokens[0], ignore)
        self._cached[uid] = n
        return [uid]

    def cached(self, uid: int) -> int:
        return self._cached.pop(uid, 0)

    def cache_stats(self) -> CacheStats:
        return self.prefix.stats()

    def drop_cache(self) -> int:
        return self.prefix.clear()

    def remove(self, uid: int) -> None:
        if self._current is not None and self._current.uid == uid:
            self._end(keep=True)

    def step(self) -> list[Token]:
        seq = self._current
        if seq is None:
            return []
        token_id, logprobs = next(seq.steps)
        token = int(token_id)
        seq.tokens.append(token)
        seq.generated += 1
        finish = None
        if token in self._eos_ids and not seq.ignore_eos:
            finish = "stop"
        elif seq.generated >= seq.max_tokens:
            finish = "length"
        if finish is not None:
            self._end(keep=True)
        return [Token(seq.uid, token, finish, logprobs)]

    def reset(self) -> None:
        self._end(keep=False)

    def _end(self, keep: bool) -> None:
        """Forget the running sequence; with `keep`, its KV goes into the prefix cache."""
        seq, self._current = self._current, None
        if seq is None:
            return
        seq.steps.close()
        # Only a sequence that ran has new KV. generate_step runs each token through the model
        # before yielding it, so the cache holds exactly the first `offset` tokens.
        if keep and seq.generated and can_trim_prompt_cache(seq.cache):
            self.prefix.insert(seq.tokens[: seq.cache[0].offset], seq.cache)

    def warm_up(self, prompt_ids: list[int], max_tokens: int) -> None:
        # Greedy and sampled decoding over the quantized cache. This also fails the load, with
        # mlx's message, when the model cannot quantize its cache (a head_dim the group size
        # does not divide, or a cache type with no to_quantized).
        for sampler in (make_request_sampler(0.0, 1.0, None), make_request_sampler(1.0, 0.9, 0)):
            self.insert([prompt_ids], [max_tokens], [sampler])
            while self._current is not None:
                self.step()
        self.prefix = PrefixCache(self._cache_budget)  # the warm-up's sequences are no prefix
        self._cached.clear()
