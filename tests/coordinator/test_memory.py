"""The memory math against real models' config.json values and the seeds' numbers. Pure:
no file is read here (reading them: tests/coordinator/test_model_files.py).

Configs are the published config.json fields of each model on Hugging Face
(Qwen/Qwen2.5-7B-Instruct, meta-llama/Meta-Llama-3-8B, meta-llama/Meta-Llama-3-70B,
mistralai/Mixtral-8x7B-v0.1); the quantization block is what mlx-community's 4-bit
conversions add (bits 4, group_size 64).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.models.cache import QuantizedKVCache

from benchmarks.simulator import LLAMA3_8B  # the catalogue of real config.json values
from coordinator.config import ModelSpec
from coordinator.errors import SizingError
from coordinator.memory import (
    ENGINE_RUNTIME_BYTES,
    GIB,
    Attention,
    attention_shape,
    engine_overhead,
    estimated_weight_bytes,
    footprint,
    kv_cache_bytes,
    node_budget,
    parameter_count,
    pipeline_shape,
    shared_weight_bytes,
    size_engine,
)
from coordinator.sizing import Sizing
from mlxfleet.kv import DEFAULT_PREFIX_CACHE_BYTES
from mlxfleet.tiers import DEFAULT_KNOBS, Knobs

QWEN25_7B = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
    "sliding_window": 131072,
    "use_sliding_window": False,
}
LLAMA3_70B = {
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": False,
}
MIXTRAL_8X7B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 32768,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "sliding_window": None,
    "tie_word_embeddings": False,
}
MISTRAL_7B_V01 = {
    **LLAMA3_8B,
    "vocab_size": 32000,
    "max_position_embeddings": 32768,
    "sliding_window": 4096,
}
FOUR_BIT = {"quantization": {"bits": 4, "group_size": 64}}


def test_llama3_70b_at_4_bit_is_about_40_gb_and_its_32k_kv_about_10_gb() -> None:
    """The seeds' planning numbers (DESIGN.md)."""
    weights = estimated_weight_bytes({**LLAMA3_70B, **FOUR_BIT})
    assert 39e9 <= weights <= 41e9
    kv = kv_cache_bytes(attention_shape(LLAMA3_70B), context=32768, sequences=1)
    assert kv == 2 * 80 * 8 * 128 * 2 * 32768 == 10 * GIB


@pytest.mark.parametrize(
    ("config", "billions"),
    [(QWEN25_7B, 7.6), (LLAMA3_8B, 8.0), (LLAMA3_70B, 70.6), (MIXTRAL_8X7B, 46.7)],
    ids=["qwen2.5-7b", "llama-3-8b", "llama-3-70b", "mixtral-8x7b"],
)
def test_parameter_counts_match_the_published_sizes(config: dict, billions: float) -> None:
    assert parameter_count(config) / 1e9 == pytest.approx(billions, abs=0.1)


def test_gqa_uses_key_value_heads_not_attention_heads() -> None:
    shape = attention_shape(QWEN25_7B)
    assert (shape.layers, shape.kv_heads, shape.head_dim) == (28, 4, 128)
    # 2 × 28 × 4 × 128 × 2 bytes = 57,344 bytes a token: 7 × less than with 28 KV heads.
    assert kv_cache_bytes(shape, context=8192, sequences=1) == 57344 * 8192
    assert shape.window is None  # use_sliding_window: false


def test_sliding_window_bounds_the_cache() -> None:
    shape = attention_shape(MISTRAL_7B_V01)
    assert shape.window == 4096
    assert kv_cache_bytes(shape, 32768, 1) == kv_cache_bytes(shape, 4096, 1)
    assert attention_shape(MIXTRAL_8X7B).window is None


def test_quantized_kv_pays_a_scale_and_a_bias_per_group_and_cannot_batch() -> None:
    shape = attention_shape(LLAMA3_70B)
    values = 2 * 80 * 8 * 128 * 32768  # K and V of a 32K context: 5,368,709,120 values
    # 8-bit: 1 byte a value + an fp16 scale and bias per 64 values = 17/16 bytes: 5.31 GiB.
    assert kv_cache_bytes(shape, 32768, 1, kv_bits=8) == values * 17 // 16 == 5_704_253_440
    # 4-bit: 1/2 byte + 4/64 = 9/16 bytes: 2.81 GiB; groups of 32 cost twice the scales.
    assert kv_cache_bytes(shape, 32768, 1, kv_bits=4) == values * 9 // 16 == 3_019_898_880
    assert kv_cache_bytes(shape, 32768, 1, kv_bits=8, group_size=32) == values * 9 // 8
    with pytest.raises(SizingError, match="cannot join a batch"):
        kv_cache_bytes(shape, 8192, 4, kv_bits=8)
    with pytest.raises(SizingError, match="kv_bits must be one of"):
        kv_cache_bytes(shape, 8192, 1, kv_bits=3)
    with pytest.raises(SizingError, match="kv_group_size 16 cannot quantize head_dim 128"):
        kv_cache_bytes(shape, 8192, 1, kv_bits=8, group_size=16)
    demo_like = Attention(layers=2, kv_heads=2, head_dim=32, window=None, max_context=4096)
    with pytest.raises(SizingError, match="kv_group_size 64 cannot quantize head_dim 32"):
        kv_cache_bytes(demo_like, 4096, 1, kv_bits=4)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bits", [8, 4])
def test_the_formula_is_what_mlx_lm_quantized_kv_cache_holds(bits: int, group_size: int) -> None:
    """One Llama-3 layer (8 KV heads × head_dim 128, fp16) after 256 tokens, the cache's
    allocation step, against the nbytes of mlx-lm's own QuantizedKVCache."""
    cache = QuantizedKVCache(group_size=group_size, bits=bits)
    keys = mx.random.normal((1, 8, 256, 128)).astype(mx.float16)
    cache.update_and_fetch(keys, keys)
    one_layer = Attention(layers=1, kv_heads=8, head_dim=128, window=None, max_context=0)
    assert cache.nbytes == kv_cache_bytes(one_layer, 256, 1, bits, group_size)
    assert cache.nbytes < kv_cache_bytes(one_layer, 256, 1)  # less than fp16


def test_footprint_adds_weights_kv_the_prefix_cache_and_overhead() -> None:
    fp = footprint(4 * GIB, LLAMA3_8B, context=8192, sequences=4)
    assert fp.kv_cache == 4 * kv_cache_bytes(attention_shape(LLAMA3_8B), 8192, 1)
    assert fp.overhead > ENGINE_RUNTIME_BYTES  # plus prefill activations for a 14336-wide MLP
    assert fp.prefix_cache == DEFAULT_PREFIX_CACHE_BYTES == 512 * 2**20  # the engine's default
    assert fp.total == 4 * GIB + fp.kv_cache + fp.overhead + fp.prefix_cache
    with pytest.raises(SizingError, match="larger than the model supports"):
        footprint(4 * GIB, LLAMA3_8B, context=16384, sequences=1)
    quantized = footprint(4 * GIB, LLAMA3_8B, context=8192, sequences=1, kv_bits=8)
    assert quantized.kv_cache == kv_cache_bytes(attention_shape(LLAMA3_8B), 8192, 1) * 17 // 32
    assert quantized.prefix_cache == DEFAULT_PREFIX_CACHE_BYTES  # sequential.py keeps one too


@pytest.mark.parametrize("kv_bits", [16, 8])
def test_the_prefix_cache_budget_in_force_is_what_both_engines_add(kv_bits: int) -> None:
    """The batched (fp16) and the sequential (quantized) engine both keep a prefix cache; a
    unit's own budget (fleet.toml) replaces the default, and 0 adds nothing."""
    base = footprint(4 * GIB, LLAMA3_8B, 8192, 1, kv_bits, prefix_cache_bytes=0)
    assert base.prefix_cache == 0
    assert base.total == 4 * GIB + base.kv_cache + base.overhead
    budget = 96 * 2**20
    fp = footprint(4 * GIB, LLAMA3_8B, 8192, 1, kv_bits, prefix_cache_bytes=budget)
    assert (fp.prefix_cache, fp.total) == (budget, base.total + budget)
    size, _ = size_engine(4 * GIB, LLAMA3_8B, None, 1, kv_bits, prefix_cache_bytes=budget)
    assert size == base.total + budget
    assert size_engine(4 * GIB, LLAMA3_8B, None, 1, kv_bits)[0] == (
        base.total + DEFAULT_PREFIX_CACHE_BYTES
    )


def test_node_budget_is_the_smaller_of_ram_less_reserve_and_the_wired_limit() -> None:
    # 64 GiB Mac, default wired limit 3/4 = 48 GiB; RAM − 8 GiB reserve = 56 GiB.
    assert node_budget(64 * GIB, 48 * GIB, placed_bytes=0) == 48 * GIB
    # 16 GiB Air: RAM − 8 = 8 GiB is smaller than 2/3 of 16 = 10.7 GiB.
    assert node_budget(16 * GIB, int(16 * GIB * 2 / 3), placed_bytes=2 * GIB) == 6 * GIB
    # A raised iogpu.wired_limit_mb on a 128 GiB Studio; a per-node reserve override.
    assert node_budget(128 * GIB, 120 * GIB, 0, reserve=16 * GIB) == 112 * GIB
    assert node_budget(32 * GIB, 0, 0) == 24 * GIB  # Linux: no GPU wired limit


def test_a_config_without_shape_is_refused() -> None:
    with pytest.raises(SizingError, match="lacks attention shape"):
        attention_shape({"hidden_size": 8})


def test_size_engine_caps_the_default_context_and_sizes_an_uncached_hub_model_as_zero() -> None:
    size, context = size_engine(4 * GIB, MIXTRAL_8X7B, None, sequences=4)
    assert context == 8192  # the default: Mixtral supports 32K
    assert size == footprint(4 * GIB, MIXTRAL_8X7B, 8192, 4).total
    small = {**LLAMA3_8B, "max_position_embeddings": 2048}
    assert size_engine(GIB, small, None, 1)[1] == 2048  # capped by what the model supports
    assert size_engine(GIB, LLAMA3_8B, 4096, 1)[1] == 4096  # the configured one
    assert size_engine(0, None, None, 4) == (0, 8192)  # the agent downloads it first
    with pytest.raises(SizingError, match="decodes one request at a time"):
        size_engine(GIB, LLAMA3_8B, None, sequences=2, kv_bits=8)


def test_pipeline_shape_is_the_layers_and_what_every_rank_holds() -> None:
    """A group's member holds the embeddings, LM head and final norm (at the model's bits) and
    an engine's overhead whatever its layers; the rest divides by layer."""
    config = {**LLAMA3_70B, **FOUR_BIT}
    size = footprint(estimated_weight_bytes(config), config, 8192, 4).total
    layers, shared = pipeline_shape(size, config)
    assert layers == 80
    params = 128256 * 8192 * 2 + 8192  # untied: embeddings and LM head; the final norm
    assert shared == math.ceil(params * 4.5 / 8) + engine_overhead(config)
    assert round(shared / GIB, 2) == 1.66  # of 48.0 GiB: each of the 80 layers costs 0.58 GiB
    assert round((size - shared) / layers / GIB, 2) == 0.58
    tied = {**config, "tie_word_embeddings": True}
    assert shared_weight_bytes(tied) == math.ceil((128256 * 8192 + 8192) * 4.5 / 8)
    assert shared_weight_bytes(LLAMA3_8B) == (128256 * 4096 * 2 + 4096) * 2  # bf16
    assert pipeline_shape(100, config) == (80, 20)  # capped: a layer costs a byte at least


def test_sizing_gives_a_units_shape_beside_its_size(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "U8", "shape": [7], "data_offsets": [0, 7]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA3_8B, **FOUR_BIT}))
    spec = ModelSpec("m", str(tmp_path), context_length=4096)
    sizing = Sizing(OneSlot(), lambda: None)  # type: ignore[arg-type]
    size = sizing.size(spec)
    assert isinstance(size, int)
    assert sizing.shape(spec) == pipeline_shape(size, {**LLAMA3_8B, **FOUR_BIT})
    assert sizing.shape(spec) == (32, shared_weight_bytes({**LLAMA3_8B, **FOUR_BIT})
                                  + engine_overhead(LLAMA3_8B))  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA3_8B, "vocab_size": None}))
    other = ModelSpec("n", str(tmp_path), context_length=4096)
    sizing = Sizing(OneSlot(), lambda: None)  # type: ignore[arg-type]
    assert isinstance(sizing.size(other), int)  # sized, but no embedding shape: never split
    assert sizing.shape(other) is None


class OneSlot:
    """TierKnobs as Sizing asks it: one sequence per engine."""

    def engine(self, spec: ModelSpec) -> Knobs:
        return replace(DEFAULT_KNOBS[spec.tier], max_concurrency=1)
