"""One sequence at a time through mlx-lm's generate_step, with a quantized KV cache.

Why not BatchGenerator: in mlx-lm 0.32.2 it takes no kv_bits, and it merges every sequence's
cache into a batch (`_merge_caches`), which QuantizedKVCache cannot do (it has no `merge`).
mlx-lm's own server likewise stops batching when --kv-bits is set. So an engine that quantizes
its KV decodes one sequence at a time; the model thread keeps the others waiting, oldest first.
Only the batch tier may run this way: an interactive request must be able to join the running
batch at the next step, not wait for the one before it to finish.
"""

from __future__ import annotations

import itertools
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import maybe_set_recommended_wired_limit

from node_agent.engine.decoder import Decoder, NewSequences, Token
from node_agent.engine.sampling import make_request_sampler

# Quantize from the first token on: the point is the memory of long contexts (mlx-lm's default,
# 5000, keeps the first 5000 tokens of every request in fp16).
QUANTIZED_KV_START_TOKENS = 0


@dataclass(slots=True)
class _Sequence:
    uid: int
    # generate_step yields (token id, logprobs); its annotation says mx.array for the id.
    steps: Generator[tuple[Any, Any], None, None]
    cache: list[Any]  # the per-layer caches generate_step fills (and quantizes) in place
    max_tokens: int
    ignore_eos: bool = False
    generated: int = 0


class SequentialDecoder(Decoder):
    """Decodes at most one sequence; its prefill runs inside the first step() (mlx-lm's
    prefill_step_size slices, default 2048 tokens), so a cancel lands after the prefill."""

    def __init__(self, model: Any, eos_ids: frozenset[int], kv_bits: int, group_size: int) -> None:
        self._model = model
        self._eos_ids = eos_ids
        self._kv_bits = kv_bits
        self._group_size = group_size
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

    def _start(self, new: NewSequences) -> list[int]:
        if self._current is not None or len(new.prompts) != 1:
            raise ValueError(f"decodes one sequence at a time, asked to start {len(new.prompts)}")
        cache = make_prompt_cache(self._model)
        steps = generate_step(
            mx.array(new.prompts[0]),
            self._model,
            max_tokens=new.max_tokens[0],
            sampler=new.samplers[0],
            logits_processors=new.processors[0] or None,
            prompt_cache=cache,
            kv_bits=self._kv_bits,
            kv_group_size=self._group_size,
            quantized_kv_start=QUANTIZED_KV_START_TOKENS,
        )
        ignore = bool(new.ignore_eos[0])
        self._current = _Sequence(next(self._uids), steps, cache, new.max_tokens[0], ignore)
        return [self._current.uid]

    def remove(self, uid: int) -> None:
        if self._current is not None and self._current.uid == uid:
            self.reset()

    def step(self) -> list[Token]:
        seq = self._current
        if seq is None:
            return []
        token_id, logprobs = next(seq.steps)
        token = int(token_id)
        seq.generated += 1
        finish = None
        if token in self._eos_ids and not seq.ignore_eos:
            finish = "stop"
        elif seq.generated >= seq.max_tokens:
            finish = "length"
        if finish is not None:
            self.reset()
        return [Token(seq.uid, token, finish, logprobs)]

    def reset(self) -> None:
        if self._current is not None:
            self._current.steps.close()
            self._current = None

    def warm_up(self, prompt_ids: list[int], max_tokens: int) -> None:
        # Greedy and sampled decoding over the quantized cache. This also fails the load, with
        # mlx's message, when the model cannot quantize its cache (a head_dim the group size
        # does not divide, or a cache type with no to_quantized).
        for sampler in (make_request_sampler(0.0, 1.0, None), make_request_sampler(1.0, 0.9, 0)):
            self.insert([prompt_ids], [max_tokens], [sampler])
            while self._current is not None:
                self.step()
