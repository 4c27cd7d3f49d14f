"""What the model thread asks of a decoder: start sequences, step them, drop them.

Two implementations: batched.py (continuous batching, fp16 KV) and sequential.py (one sequence
at a time, quantized KV). The model thread picks one at load time (generator.ModelThread).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from node_agent.engine.sampling import Sampler

# mlx-lm's default (generate_step's kv_group_size): one scale and one bias per 64 values.
DEFAULT_KV_GROUP_SIZE = 64
KV_BITS_CHOICES = (8, 4)
KV_GROUP_SIZES = (32, 64, 128)  # the group sizes mx.quantize accepts


@dataclass(frozen=True, slots=True)
class Token:
    """One token a decoder generated for one sequence."""

    uid: int
    token: int
    finish_reason: str | None = None  # "stop": an EOS token; "length": max_tokens reached


class Decoder(Protocol):
    """Runs admitted sequences on the model; used on the model thread only.

    A sequence is forgotten once a step reports its finish_reason or once it is removed.
    """

    def slots(self, max_concurrency: int) -> int:
        """How many sequences it decodes together under the knob (it may allow fewer)."""
        ...

    def insert(
        self,
        prompts: list[list[int]],
        max_tokens: list[int],
        samplers: list[Sampler],
        ignore_eos: list[bool] | None = None,
    ) -> list[int]:
        """Start sequences (no more than the free slots); returns their uids in order. A
        sequence with ignore_eos runs to its max_tokens through end-of-sequence tokens."""
        ...

    def remove(self, uid: int) -> None:
        """Drop a sequence (a no-op for one already finished)."""
        ...

    def step(self) -> list[Token]:
        """Advance every running sequence by one token (a new one's first step prefills it)."""
        ...

    def reset(self) -> None:
        """Forget every sequence: after a failure, start afresh."""
        ...

    def warm_up(self, prompt_ids: list[int], max_tokens: int) -> None:
        """Compile the kernels real requests will use, so the first one does not pay for it."""
        ...
