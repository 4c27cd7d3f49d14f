"""Continuous batching over mlx-lm's BatchGenerator: a new sequence joins the running batch at
the next decode step. The KV cache stays in the model's dtype: in mlx-lm 0.32.2 BatchGenerator
takes no kv_bits, and a QuantizedKVCache has no `merge`, so it could not join a batch anyway."""

from __future__ import annotations

from typing import Any

from mlx_lm.generate import BatchGenerator, StopSequences

from node_agent.engine.decoder import Decoder, NewSequences, Token
from node_agent.engine.sampling import make_request_sampler

# Small prefill slices let a long prompt share the thread with running decodes.
PREFILL_STEP_SIZE_TOKENS = 512


class BatchDecoder(Decoder):
    """The interactive tier's decoder (and the batch tier's unless it quantizes its KV)."""

    def __init__(self, model: Any, eos_ids: frozenset[int], slots: int) -> None:
        self._model = model
        # The only stop sequences BatchGenerator sees are EOS tokens; stop strings are ours.
        self._eos_stops = StopSequences([(t,) for t in sorted(eos_ids)])
        self._no_stops = StopSequences([])
        self._bg = self._new_generator(slots)

    def _new_generator(self, slots: int) -> Any:
        return BatchGenerator(
            self._model,
            completion_batch_size=slots,
            prefill_batch_size=slots,
            prefill_step_size=PREFILL_STEP_SIZE_TOKENS,
        )

    def slots(self, max_concurrency: int) -> int:
        # BatchGenerator reads its sizes at every step: follow max_concurrency without a reload.
        self._bg.completion_batch_size = self._bg.prefill_batch_size = max_concurrency
        return max_concurrency

    def _start(self, new: NewSequences) -> list[int]:
        # Inserted together, they prefill together.
        return list(
            self._bg.insert(
                new.prompts,
                max_tokens=new.max_tokens,
                samplers=new.samplers,
                logits_processors=new.processors,
                stop_sequences=[self._no_stops if i else self._eos_stops for i in new.ignore_eos],
            )
        )

    def remove(self, uid: int) -> None:
        self._bg.remove([uid])

    def step(self) -> list[Token]:
        _, responses = self._bg.next()
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
