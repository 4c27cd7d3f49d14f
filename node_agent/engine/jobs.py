"""What the model thread takes and reports: jobs, their events, the engine's counters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mlxfleet.openai.protocol import SamplingParams
from mlxfleet.tiers import Knobs

if TYPE_CHECKING:
    from node_agent.engine.prefix_cache import CacheStats


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One generated token's log probability, and the most likely alternatives at its place
    (most likely first) when the request asked for top_logprobs."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Event:
    """What the model thread reports for a request; finish_reason set means the last one."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    completion_tokens: int = 0
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token id, when the request asked
    stop_sequence: str | None = None  # the request's stop string that ended the answer
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (on the last)


Sink = Callable[[Event], None]


@dataclass(frozen=True, slots=True)
class Job:
    """One generation request; `sink` is called on the model thread and must be thread-safe."""

    request_id: int
    prompt_ids: list[int]  # ends with `sent_ids` when continuing a stream
    max_tokens: int
    params: SamplingParams
    sink: Sink
    sent_ids: tuple[int, ...] = ()  # generated elsewhere, text already sent (a continuation)
    grammar: Any = None  # grammar.RequestGrammar: constrained decoding, wraps the sampler


@dataclass(frozen=True, slots=True)
class EngineStats:
    """Counters for GET /v1/engine/stats."""

    active: int
    queued: int  # submitted, not yet admitted: the queue depth
    max_batch_seen: int  # most sequences decoded in one step
    requests_total: int
    generated_tokens_total: int
    admission_groups: int  # times a group of waiting requests was admitted together
    largest_admission: int  # the biggest such group
    knobs: Knobs
    kv_bits: int = 16  # the KV cache in force: 16, the model's dtype; 8 or 4, quantized
    kv_group_size: int | None = None  # values per quantized scale and bias; None: unquantized
    prefix_cache: CacheStats | None = None  # None: the decoder keeps no prefix cache
    group: dict[str, Any] | None = None  # this rank's place in its group (group.Rank.stats)


def token_logprob(token: int, logprobs: Any, top: int) -> TokenLogprob:
    """The chosen token's log probability and the `top` most likely ids (mlx arrays in, floats
    out); run on the model thread for requests that asked for logprobs only."""
    import mlx.core as mx

    chosen = float(logprobs[token].item())
    if top == 0:
        return TokenLogprob(token, chosen)
    ids = mx.argpartition(-logprobs, kth=top - 1)[:top]
    top_ids: list[int] = ids.tolist()  # type: ignore[assignment]
    values: list[float] = logprobs[ids].tolist()  # type: ignore[assignment]
    pairs = sorted(zip(top_ids, values, strict=True), key=lambda p: (-p[1], p[0]))
    return TokenLogprob(token, chosen, tuple(pairs))
