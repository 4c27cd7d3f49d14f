"""The KV cache facts both sides must agree on: its choices, the context cap, and the one rule
for quantizing it. The coordinator sizes and places with them; the engine starts with them.

A quantized KV cache is mlx-lm's QuantizedKVCache, which cannot merge into a batch in mlx-lm
0.32.2 (it has no `merge`), so an engine that quantizes decodes one sequence at a time, and
only the batch tier (whose requests may wait) may do that. mx.quantize groups values along
head_dim, so a group size must be one it accepts and must divide the model's head_dim.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlxfleet.errors import KvCacheError

UNQUANTIZED_KV_BITS = 16  # the cache in the model's dtype
QUANTIZED_KV_BITS = (8, 4)  # mlx-lm's QuantizedKVCache
KV_BITS = (UNQUANTIZED_KV_BITS, *QUANTIZED_KV_BITS)
KV_GROUP_SIZES = (32, 64, 128)  # what mx.quantize accepts
DEFAULT_KV_GROUP_SIZE = 64  # mlx-lm's generate_step default: one scale and one bias per 64
MODEL_DTYPE_BYTES = 2  # fp16/bf16: the KV cache's dtype, and its quantization scales' and biases'
QUANTIZED_KV_MAX_SEQUENCES = 1  # see the module docstring
QUANTIZED_KV_TIER = "batch"
DEFAULT_CONTEXT_LENGTH = 8192  # tokens (seed 002): the cap unless a model is told otherwise
# What an engine's prefix cache may hold (the KV of finished requests, reused by the next one
# that starts the same way), unless fleet.toml sets a tier's or a model's prefix_cache_mib;
# placement counts the budget in force in every engine's footprint. The same for both tiers.
DEFAULT_PREFIX_CACHE_MIB = 512
DEFAULT_PREFIX_CACHE_BYTES = DEFAULT_PREFIX_CACHE_MIB * 2**20


def check_kv(
    kv_bits: int,
    group_size: int = DEFAULT_KV_GROUP_SIZE,
    *,
    tier: str | None = None,
    sequences: int | None = None,
    head_dim: int | None = None,
    names: tuple[str, str, str] = ("kv_bits", "kv_group_size", "max_concurrency"),
) -> None:
    """KvCacheError naming the first rule `kv_bits` breaks: a known width; when quantized, a
    group size mx.quantize accepts (dividing `head_dim` when given), the batch tier (when
    `tier` is given) and one sequence (when `sequences` is given). `names` are the caller's
    names for bits, group size and sequences (a TOML key, a flag), used in the message."""
    bits_name, group_name, sequences_name = names
    if kv_bits not in KV_BITS:
        raise KvCacheError(f"{bits_name} must be one of {sorted(KV_BITS)}, got {kv_bits}")
    if kv_bits == UNQUANTIZED_KV_BITS:
        return
    allowed = ", ".join(map(str, KV_GROUP_SIZES))
    if head_dim is not None and (group_size not in KV_GROUP_SIZES or head_dim % group_size):
        raise KvCacheError(
            f"{group_name} {group_size} cannot quantize head_dim {head_dim} "
            f"(it must be one of {allowed} and divide it)"
        )
    if group_size not in KV_GROUP_SIZES:
        raise KvCacheError(f"{group_name} must be one of {allowed}, got {group_size}")
    if tier is not None and tier != QUANTIZED_KV_TIER:
        raise KvCacheError(
            f"{bits_name} {kv_bits} is for the {QUANTIZED_KV_TIER} tier only: a quantized KV "
            f"cache cannot join a running batch in mlx-lm 0.32.2, and the {tier} tier must batch"
        )
    if sequences is not None and sequences > QUANTIZED_KV_MAX_SEQUENCES:
        raise KvCacheError(
            f"{bits_name} {kv_bits} decodes one request at a time, so {sequences_name} must be "
            f"{QUANTIZED_KV_MAX_SEQUENCES}, got {sequences} (a quantized KV cache cannot join a "
            "batch in mlx-lm 0.32.2)"
        )


def attention_dims(config: Mapping[str, Any]) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) from a Hugging Face config.json (multimodal configs nest
    the language model's in text_config); KvCacheError when it lacks them."""
    text = config.get("text_config", config)
    try:
        layers = int(text["num_hidden_layers"])
        heads = int(text["num_attention_heads"])
        kv_heads = int(text.get("num_key_value_heads") or heads)
        head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError) as exc:
        raise KvCacheError(f"config.json lacks attention shape ({exc})") from None
    if min(layers, kv_heads, head_dim) <= 0:
        raise KvCacheError("config.json has a non-positive attention dimension")
    return layers, kv_heads, head_dim


def kv_bytes_per_token(config: Mapping[str, Any]) -> int:
    """What one token's unquantized K and V cost over all the model's layers (2 × layers ×
    KV heads × head dim × MODEL_DTYPE_BYTES): the placement's measure, and the unit every rank
    of a group counts its prefix cache in, so that all keep and evict alike."""
    layers, kv_heads, head_dim = attention_dims(config)
    return 2 * layers * kv_heads * head_dim * MODEL_DTYPE_BYTES
