"""The KV cache facts both sides share (mlxfleet/kv.py): pinned values and the one rule."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from coordinator.config import load_config as coordinator_config
from coordinator.errors import ConfigError as CoordinatorConfigError
from mlxfleet import kv
from mlxfleet.errors import KvCacheError
from node_agent.engine.config import load_config as engine_config
from node_agent.errors import ConfigError as EngineConfigError


def test_the_values_are_pinned() -> None:
    """Changing one changes sizing and the engine's flags together; change this test with it."""
    assert kv.KV_BITS == (16, 8, 4)
    assert (kv.UNQUANTIZED_KV_BITS, kv.QUANTIZED_KV_BITS) == (16, (8, 4))
    assert kv.KV_GROUP_SIZES == (32, 64, 128)  # what mx.quantize accepts
    assert kv.DEFAULT_KV_GROUP_SIZE == 64  # mlx-lm's generate_step default
    assert kv.MODEL_DTYPE_BYTES == 2
    assert kv.QUANTIZED_KV_MAX_SEQUENCES == 1
    assert kv.QUANTIZED_KV_TIER == "batch"
    assert kv.DEFAULT_CONTEXT_LENGTH == 8192


def test_what_the_rule_allows() -> None:
    kv.check_kv(16, tier="interactive", sequences=64, head_dim=80)  # unquantized: anything
    kv.check_kv(8, 64, tier="batch", sequences=1, head_dim=128)
    kv.check_kv(4, 32)  # only what is given is checked


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((3,), {}, "kv_bits must be one of [4, 8, 16], got 3"),
        ((8, 16), {}, "kv_group_size must be one of 32, 64, 128, got 16"),
        ((8, 128), {"head_dim": 64}, "kv_group_size 128 cannot quantize head_dim 64"),
        ((8,), {"tier": "interactive"}, "kv_bits 8 is for the batch tier only"),
        ((4,), {"sequences": 2}, "so max_concurrency must be 1, got 2"),
    ],
)
def test_what_the_rule_refuses(args: tuple[int, ...], kwargs: dict, message: str) -> None:
    with pytest.raises(KvCacheError, match=re.escape(message)):
        kv.check_kv(*args, **kwargs)


def test_coordinator_and_engine_refuse_the_same_setting_with_the_same_rule(
    tmp_path: Path,
) -> None:
    toml = tmp_path / "fleet.toml"
    toml.write_text('[[models]]\nname = "a"\nsource = "x"\nkv_bits = 8\n')  # interactive
    with pytest.raises(CoordinatorConfigError) as coordinator:
        coordinator_config(toml, home=tmp_path)
    argv = ["--model-path", "/m", "--model-name", "a", "--kv-bits", "8"]
    with pytest.raises(EngineConfigError) as engine:
        engine_config(argv, {"MLXFLEET_ENGINE_SECRET": "s"})
    rule = "8 is for the batch tier only: a quantized KV cache cannot join a running batch"
    assert rule in str(coordinator.value) and rule in str(engine.value)


def test_kv_bytes_per_token_of_a_config_and_its_one_line_error() -> None:
    # 2 (K and V) x 32 layers x 8 KV heads x 128 (4096 / 32 heads) x 2 bytes: a Llama-3-8B.
    llama = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8}
    assert kv.kv_bytes_per_token({**llama, "hidden_size": 4096}) == 131_072
    assert kv.kv_bytes_per_token({"text_config": {**llama, "head_dim": 64}}) == 65_536
    with pytest.raises(
        KvCacheError, match=r"^config.json lacks attention shape \('hidden_size'\)$"
    ):
        kv.kv_bytes_per_token(llama)
