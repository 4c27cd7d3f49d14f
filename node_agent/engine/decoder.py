"""What the model thread asks of a decoder: start sequences, step them, drop them.

Two implementations: batched.py (continuous batching, fp16 KV) and sequential.py (one sequence
at a time, quantized KV). The model thread picks one at load time (generator.ModelThread).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import mlx.core as mx

    from node_agent.engine.group import Recipe
    from node_agent.engine.prefix_cache import CacheStats
    from node_agent.engine.sampling import LogitsProcessor, Sampler


@dataclass(frozen=True, slots=True)
class Token:
    """One token a decoder generated for one sequence."""

    uid: int
    token: int
    finish_reason: str | None = None  # "stop": an EOS token; "length": max_tokens reached
    # The log probabilities this token was drawn from (over the vocabulary, after the logits
    # processors); read only for requests that asked for logprobs.
    logprobs: mx.array | None = None


@dataclass(frozen=True, slots=True)
class NewSequences:
    """Sequences to start together, as parallel lists: one entry per sequence."""

    prompts: list[list[int]]
    max_tokens: list[int]
    samplers: list[Sampler]
    ignore_eos: list[bool]  # run to max_tokens through end-of-sequence tokens
    processors: list[list[LogitsProcessor]]  # logit_bias and penalties; mostly empty
    recipes: list[Recipe] | None = None  # how other ranks build the samplers (group.py)


class Decoder(ABC):
    """Runs admitted sequences on the model; used on the model thread only.

    A sequence is forgotten once a step reports its finish_reason or once it is removed.
    """

    @abstractmethod
    def slots(self, max_concurrency: int) -> int:
        """How many sequences it decodes together under the knob (it may allow fewer)."""

    def insert(
        self,
        prompts: list[list[int]],
        max_tokens: list[int],
        samplers: list[Sampler],
        ignore_eos: list[bool] | None = None,
        processors: list[list[LogitsProcessor]] | None = None,
        recipes: list[Recipe] | None = None,
    ) -> list[int]:
        """Start sequences (no more than the free slots); returns their uids in order. A
        sequence with ignore_eos runs to its max_tokens through end-of-sequence tokens; its
        processors change its logits before its sampler draws. `recipes`: how a group's other
        ranks build the same samplers (group.py; a single engine needs none)."""
        ignore = ignore_eos or [False] * len(prompts)
        procs = processors or [[] for _ in prompts]
        return self._start(NewSequences(prompts, max_tokens, samplers, ignore, procs, recipes))

    @abstractmethod
    def _start(self, new: NewSequences) -> list[int]:
        """insert's work, with ignore_eos and processors given for every sequence."""

    @abstractmethod
    def remove(self, uid: int) -> None:
        """Drop a sequence (a no-op for one already finished)."""

    @abstractmethod
    def step(self) -> list[Token]:
        """Advance every running sequence by one token (a new one's first step prefills it)."""

    def cached(self, uid: int) -> int:
        """Prompt tokens of a just-started sequence that came from the prefix cache (asked
        once, right after insert)."""
        return 0

    def cache_stats(self) -> CacheStats | None:
        """The prefix cache's counters (None: this decoder keeps none)."""
        return None

    def drop_cache(self) -> int:
        """Empty the prefix cache (memory pressure); returns the bytes freed."""
        return 0

    def idle_interval_s(self) -> float | None:
        """How long the model thread may wait for work before calling `idle` (None: forever)."""
        return None

    def idle(self) -> None:
        """Nothing runs: a group's rank 0 tells the others it lives (group.py)."""
        return None

    def close(self) -> None:
        """The engine stops: a group's rank 0 tells the others to stop too."""
        return None

    @abstractmethod
    def reset(self) -> None:
        """Forget every sequence: after a failure, start afresh."""

    @abstractmethod
    def warm_up(self, prompt_ids: list[int], max_tokens: int) -> None:
        """Compile the kernels real requests will use, so the first one does not pay for it."""
