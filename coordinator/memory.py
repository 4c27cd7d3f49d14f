"""Unified-memory math for placement. Pure functions over numbers and a model's config.json
(reading files is coordinator/model_files.py's job).

What a model needs = weights + KV cache + prefix cache budget + engine overhead. What a node
offers =
min(RAM − OS reserve, GPU wired limit) − what is already placed there (DESIGN.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from coordinator.errors import SizingError
from mlxfleet.errors import KvCacheError
from mlxfleet.kv import (
    DEFAULT_CONTEXT_LENGTH,
    DEFAULT_KV_GROUP_SIZE,
    DEFAULT_PREFIX_CACHE_BYTES,
    MODEL_DTYPE_BYTES,
    UNQUANTIZED_KV_BITS,
    attention_dims,
    check_kv,
)

GIB = 2**30
OS_RESERVE_BYTES = 8 * GIB  # seed 000 §4: macOS and the user's apps before weights + KV
# Engine overhead beyond weights and KV, in two parts:
# - the runtime (Python, MLX, mlx-lm, tokenizer, HTTP server): RSS of an engine serving the
#   1.8 MiB demo model after load, warm-up and 8 requests was 106 MiB in each of 3 runs
#   (benchmarks/engine_overhead.py, Linux x86_64, CPU MLX 0.32.4); rounded up to 128 MiB;
# - prefill activations, which a tiny model cannot show: mlx-lm prefills 2048 tokens per step,
#   and the widest live tensor is tokens × intermediate_size × 2 bytes; we allow 4 of them.
ENGINE_RUNTIME_BYTES = 128 * 2**20
PREFILL_STEP_TOKENS = 2048
PREFILL_LIVE_BUFFERS = 4


@dataclass(frozen=True, slots=True)
class Attention:
    """What the KV cache size depends on, read from config.json."""

    layers: int
    kv_heads: int
    head_dim: int
    window: int | None  # sliding-window (rotating) cache length, when every layer has one
    max_context: int


def attention_shape(config: Mapping[str, Any]) -> Attention:
    """Layers, KV heads (GQA), head dim and window from a Hugging Face config.json."""
    try:
        layers, kv_heads, head_dim = attention_dims(config)
    except KvCacheError as exc:
        raise SizingError(str(exc)) from None
    text = config.get("text_config", config)
    window = text.get("sliding_window")
    # Gemma-2 style interleaving (some layers global) is bounded by the global layers: no window.
    if text.get("use_sliding_window") is False or text.get("layer_types") or not window:
        window = None
    max_context = int(text.get("max_position_embeddings") or 0)
    return Attention(layers, kv_heads, head_dim, int(window) if window else None, max_context)


def kv_bytes_per_element(
    kv_bits: int, group_size: int = DEFAULT_KV_GROUP_SIZE, dtype_bytes: int = MODEL_DTYPE_BYTES
) -> float:
    """Bytes one cached K or V value costs.

    Unquantized: the model's dtype. Quantized, mlx-lm's QuantizedKVCache keeps mx.quantize's
    output: the values packed into uint32 words (bits/8 bytes each) plus, per group of
    `group_size` values along head_dim, one scale and one bias in the model's dtype. So 8-bit
    in groups of 64 with fp16 scales costs 1 + 2 × 2/64 = 1.0625 bytes; 4-bit 0.5625.
    """
    if kv_bits == UNQUANTIZED_KV_BITS:
        return dtype_bytes
    return kv_bits / 8 + 2 * dtype_bytes / group_size


def kv_cache_bytes(
    shape: Attention,
    context: int,
    sequences: int,
    kv_bits: int = UNQUANTIZED_KV_BITS,
    group_size: int = DEFAULT_KV_GROUP_SIZE,
    dtype_bytes: int = MODEL_DTYPE_BYTES,
) -> int:
    """2 (K and V) × layers × kv_heads × head_dim × bytes/element × tokens × sequences.
    SizingError when the KV settings break mlxfleet.kv's rule for this model."""
    try:
        check_kv(kv_bits, group_size, sequences=sequences, head_dim=shape.head_dim)
    except KvCacheError as exc:
        raise SizingError(str(exc)) from None
    tokens = min(context, shape.window) if shape.window else context
    elements = 2 * shape.layers * shape.kv_heads * shape.head_dim * tokens * sequences
    return math.ceil(elements * kv_bytes_per_element(kv_bits, group_size, dtype_bytes))


def parameter_count(config: Mapping[str, Any]) -> int:
    """Parameters of a Llama/Qwen/Mistral/Mixtral-shaped decoder, from config.json alone."""
    text = config.get("text_config", config)
    try:
        hidden = int(text["hidden_size"])
        layers = int(text["num_hidden_layers"])
        vocab = int(text["vocab_size"])
        intermediate = int(text["intermediate_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SizingError(f"config.json lacks a decoder shape ({exc})") from None
    shape = attention_shape(config)
    heads = int(text["num_attention_heads"])
    attention = hidden * heads * shape.head_dim * 2 + hidden * shape.kv_heads * shape.head_dim * 2
    experts = int(text.get("num_local_experts") or text.get("num_experts") or 1)
    mlp = 3 * hidden * intermediate * experts + (hidden * experts if experts > 1 else 0)
    embeddings = vocab * hidden * (1 if text.get("tie_word_embeddings") else 2)
    return layers * (attention + mlp + 2 * hidden) + embeddings + hidden


def estimated_weight_bytes(config: Mapping[str, Any]) -> int:
    """Weights when the files are not here (a hub id): parameters × bits per weight.

    MLX affine quantization stores one fp16 scale and one fp16 bias per group, so 4-bit
    weights in groups of 64 cost 4 + 32/64 = 4.5 bits each; unquantized weights are bf16.
    """
    return math.ceil(parameter_count(config) * bits_per_weight(config) / 8)


def bits_per_weight(config: Mapping[str, Any]) -> float:
    """The model's bits per weight: its quantization's, scales and biases included, else bf16."""
    quant = config.get("quantization") or config.get("quantization_config") or {}
    bits = quant.get("bits")
    return 16.0 if not bits else bits + 32 / int(quant.get("group_size", 64))


def shared_weight_bytes(config: Mapping[str, Any]) -> int:
    """Weights every rank of a pipeline group holds whatever its layers: the token embeddings,
    the LM head (the same matrix when tied) and the final norm, counted as parameter_count
    and estimated_weight_bytes count them."""
    text = config.get("text_config", config)
    try:
        hidden, vocab = int(text["hidden_size"]), int(text["vocab_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SizingError(f"config.json lacks a decoder shape ({exc})") from None
    params = vocab * hidden * (1 if text.get("tie_word_embeddings") else 2) + hidden
    return math.ceil(params * bits_per_weight(config) / 8)


def pipeline_shape(total: int, config: Mapping[str, Any]) -> tuple[int, int]:
    """(layers, shared bytes) of an engine of `total` bytes run as a pipeline group: every rank
    holds the shared bytes (shared_weight_bytes and engine_overhead); the rest, each layer's
    weights, KV cache and prefix cache share, divides by layer. Shared bytes are capped so that
    a layer costs at least a byte."""
    layers = attention_shape(config).layers
    shared = shared_weight_bytes(config) + engine_overhead(config)
    return layers, max(0, min(shared, total - layers))


@dataclass(frozen=True, slots=True)
class Footprint:
    """What one engine of a model needs, and why."""

    weights: int
    kv_cache: int
    overhead: int
    prefix_cache: int = DEFAULT_PREFIX_CACHE_BYTES  # the engine's budget for reused prefixes

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.overhead + self.prefix_cache


def engine_overhead(config: Mapping[str, Any]) -> int:
    """Runtime plus prefill activation buffers (see ENGINE_RUNTIME_BYTES)."""
    text = config.get("text_config", config)
    width = max(int(text.get("intermediate_size") or 0), int(text.get("hidden_size") or 0))
    return ENGINE_RUNTIME_BYTES + PREFILL_LIVE_BUFFERS * PREFILL_STEP_TOKENS * width * 2


def footprint(
    weights: int,
    config: Mapping[str, Any],
    context: int,
    sequences: int,
    kv_bits: int = UNQUANTIZED_KV_BITS,
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE,
    prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
) -> Footprint:
    """The memory one engine needs for `sequences` concurrent sequences of `context` tokens
    (a quantized KV cache: one sequence, see mlxfleet.kv) and a prefix cache of
    `prefix_cache_bytes` (both decoders keep one)."""
    shape = attention_shape(config)
    if shape.max_context and context > shape.max_context:
        raise SizingError(
            f"context_length {context} is larger than the model supports ({shape.max_context})"
        )
    kv = kv_cache_bytes(shape, context, sequences, kv_bits, kv_group_size)
    return Footprint(weights, kv, engine_overhead(config), prefix_cache_bytes)


def node_budget(
    ram_bytes: int, wired_limit_bytes: int, placed_bytes: int, reserve: int = OS_RESERVE_BYTES
) -> int:
    """Bytes still placeable on a node: min(RAM − reserve, GPU wired limit) − placed.

    The wired limit is what the node's probe reports: iogpu.wired_limit_mb when set, else the
    macOS default fraction of RAM (node_agent/probes/macos.py); 0 means none (Linux).
    """
    ceiling = ram_bytes - reserve
    if wired_limit_bytes > 0:
        ceiling = min(ceiling, wired_limit_bytes)
    return ceiling - placed_bytes


def size_engine(
    weights: int,
    config: Mapping[str, Any] | None,
    context: int | None,
    sequences: int,
    kv_bits: int = UNQUANTIZED_KV_BITS,
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE,
    default_context: int = DEFAULT_CONTEXT_LENGTH,
    prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
) -> tuple[int, int]:
    """(bytes one engine of this model needs, the context in force). `config` None: a hub
    model not in the local cache yet, which sizes as 0 (the agent downloads it). With no
    `context` configured, the default capped at what the model supports."""
    if config is None:
        return 0, context or default_context
    if context is None:
        context = min(default_context, attention_shape(config).max_context or default_context)
    fp = footprint(weights, config, context, sequences, kv_bits, kv_group_size, prefix_cache_bytes)
    return fp.total, context
