"""mlxfleet's own layer split (node_agent/engine/layer_split.py) against one process, per
architecture: every rank of a 2- or 3-rank group draws the same tokens with the same
log-probabilities as the whole model in one process, through batched prefill in slices, a
sequence joining a running batch and one started from a trimmed KV cache; and the rules that
refuse an architecture it cannot split.

Each model is a real mlx-lm architecture at a tiny random shape, built offline; the ranks are
real processes (tests/node_agent/engine/split_probe.py) joined over MLX's ring backend on
127.0.0.1, as the engine's are.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from mlxfleet.engines import EXIT_CANNOT_SPLIT
from node_agent.engine.layer_split import split_layers
from node_agent.errors import SplitError
from tests.conftest import REPO, Proc
from tests.node_agent.engine.conftest import ENGINE_START_TIMEOUT_S
from tests.node_agent.engine.test_group import exit_code, free_ports, start_ranks, started

__all__ = ["started"]  # a fixture this module uses

PROBE_TIMEOUT_S = 240.0
BASE = {
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "intermediate_size": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}
SLIDING = {"sliding_window": 8}  # shorter than the probe's prompts: the window is crossed
# Architectures mlx-lm 0.32.2 runs without pipeline(), each with what makes it differ: sliding
# window layers mixed with full ones (masks built from the cache of a layer by its index), MoE,
# attention sinks. Not Gemma 2: mlx-lm 0.32.2's gemma2 cannot decode a batch of 3 in one process
# (its mask does not broadcast against its grouped-query scores), split or not.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": {},
    "llama-sliding": {
        "model_type": "llama",
        "layer_types": ["sliding_attention", "full_attention"] * 2,
        **SLIDING,
    },
    "qwen3": {},
    "gemma": {},
    "gemma3_text": {**SLIDING, "sliding_window_pattern": 2, "query_pre_attn_scalar": 16},
    "phi3": {},
    "starcoder2": {"norm_epsilon": 1e-5},
    "olmo2": {},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "gpt_oss": {
        **SLIDING,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "layer_types": ["sliding_attention", "full_attention"] * 2,
        "swiglu_limit": 7.0,
    },
    "cohere2": {**SLIDING, "sliding_window_pattern": 2, "layer_norm_eps": 1e-5},
}
# (split, which rank runs which layers): uneven both ways, and three ranks.
SPLITS = {"3,1": 2, "1,3": 2, "1,2,1": 3}


def model_config(name: str, vocab: int) -> dict[str, Any]:
    extra = dict(ARCHITECTURES.get(name, {}))
    model_type = extra.pop("model_type", name)
    return {**BASE, "model_type": model_type, "vocab_size": vocab, **extra}


def build_model(config: dict[str, Any]) -> nn.Module:
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    model: nn.Module = model_class(args_class.from_dict(config))
    return model


def write_model(folder: Path, config: dict[str, Any], tokenizer_from: Path) -> Path:
    """A random-weight model of this config (seeded) with the demo model's tokenizer."""
    folder.mkdir(parents=True)
    mx.random.seed(7)
    model = build_model(config)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer_from / name, folder / name)
    return folder


def probe(model: Path, folder: Path, split: str | None = None) -> list[dict[str, Any]]:
    """What split_probe prints: once for the whole model, or once per rank of `split`."""
    command = [sys.executable, "-m", "tests.node_agent.engine.split_probe", str(model)]
    if split is None:
        envs = [{}]
    else:
        size = len(split.split(","))
        hostfile = folder / f"hosts-{split}.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(size)]))
        command.append(split)
        envs = [{"MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile)} for r in range(size)]
    procs = [
        subprocess.Popen(
            command,
            cwd=REPO,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for env in envs
    ]
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=PROBE_TIMEOUT_S))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"split_probe {split} did not finish in {PROBE_TIMEOUT_S:.0f} s")
    failed = [
        f"rank {r}: {err[-2000:]}"
        for r, (p, (_, err)) in enumerate(zip(procs, outputs, strict=True))
        if p.returncode
    ]
    assert not failed, "\n".join(failed)
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]


@pytest.fixture(scope="module")
def models(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("architectures")
    vocab = json.loads((demo_model / "config.json").read_text())["vocab_size"]
    return {
        name: write_model(folder / name, model_config(name, vocab), demo_model)
        for name in ARCHITECTURES
    }


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_every_rank_draws_what_one_process_draws(
    name: str, models: dict[str, Path], tmp_path: Path
) -> None:
    whole = probe(models[name], tmp_path)[0]
    assert [len(t) for t in whole["tokens"]] == [10, 10, 10, 10]
    # Output that depends on the input (random models of some architectures repeat one token,
    # but not its log-probability): else a wrong split could pass unseen.
    assert len({lp for seq in whole["logprobs"] for lp in seq}) > 30, whole["logprobs"]
    splits = ["3,1", "1,2,1"] if name == "llama-sliding" else ["3,1"]
    if name == "llama":
        splits.append("1,3")
    results = {split: probe(models[name], tmp_path, split) for split in splits}
    for split, ranks in results.items():
        assert len(ranks) == SPLITS[split]
        for rank, result in enumerate(ranks):
            assert result["split_by"] == "mlxfleet", (split, rank)
            assert result["tokens"] == whole["tokens"], (split, rank)
            assert result["offsets"] == whole["offsets"], (split, rank)
            for got, want in zip(result["logprobs"], whole["logprobs"], strict=True):
                assert got == pytest.approx(want, abs=1e-4), (split, rank)
    # Only a rank's own layers hold weights: one layer's = whole - rank 0's (3 of 4 layers).
    r0, r1 = results["3,1"]
    one_layer = whole["parameters"] - r0["parameters"]
    assert one_layer > 0 and r0["parameters"] - r1["parameters"] == 2 * one_layer


def test_a_pipeline_model_still_splits_with_mlx_lm(demo_model_6: Path, tmp_path: Path) -> None:
    whole = probe(demo_model_6, tmp_path)[0]
    ranks = probe(demo_model_6, tmp_path, "4,2")
    assert [r["split_by"] for r in ranks] == ["mlx-lm", "mlx-lm"]
    assert all(r["tokens"] == whole["tokens"] for r in ranks)


# --- what the split refuses, in one line ----------------------------------------------------


def one_rank() -> Any:
    """MLX's group of this process alone (no environment: size 1), which the checks need."""
    group = mx.distributed.init()
    assert group.size() == 1
    return group


MAMBA = {
    **BASE,
    "model_type": "mamba",
    "state_size": 8,
    "conv_kernel": 4,
    "use_bias": False,
    "use_conv_bias": True,
    "time_step_rank": 8,
}
MAMBA_REFUSED = (
    "mamba models keep ArraysCache for 4 layers: our layer split runs models with one "
    "KVCache or RotatingKVCache per layer"
)


def test_a_recurrent_model_is_refused_with_its_cache_type() -> None:
    with pytest.raises(SplitError) as caught:
        split_layers(build_model({**MAMBA, "vocab_size": 64}), one_rank(), [4])
    assert str(caught.value) == MAMBA_REFUSED


def test_ranks_of_a_model_no_split_runs_fail_to_load_saying_why(
    demo_model: Path, tmp_path: Path, started: list[Proc]
) -> None:
    """The engine's load fails with EXIT_CANNOT_SPLIT (the agent reports it and its log's last
    line; the coordinator then places the model on single nodes only)."""
    vocab = json.loads((demo_model / "config.json").read_text())["vocab_size"]
    model = write_model(tmp_path / "mamba", {**MAMBA, "vocab_size": vocab}, demo_model)
    ranks, _ = start_ranks(model, tmp_path, started, ["2,2", "2,2"])
    deadline = time.monotonic() + ENGINE_START_TIMEOUT_S
    for rank, proc in enumerate(ranks):
        assert exit_code(proc, deadline, f"rank {rank}") == EXIT_CANNOT_SPLIT
        assert MAMBA_REFUSED in proc.output(), proc.output()[-2000:]


def test_a_split_of_other_layers_is_refused() -> None:
    model = build_model(model_config("llama", 64))
    with pytest.raises(SplitError, match=r"^the split \[2, 1\] names 3 layers, the model 4$"):
        split_layers(model, one_rank(), [2, 1])


class Block(nn.Module):
    def __init__(self, pair: bool = False) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.pair = pair

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> Any:
        if cache is not None:
            cache.update_and_fetch(x[:, None], x[:, None])
        y = self.proj(x)
        return (y, y) if self.pair else y


class Looped(nn.Module):
    """Calls its layers twice over: a split by layer cannot run it."""

    def __init__(self, pair: bool = False, twice: bool = True) -> None:
        super().__init__()
        self.layers = [Block(pair), Block(pair)]
        self.twice = twice

    def __call__(self, x: mx.array, cache: Any = None) -> mx.array:
        cache = cache or [None] * len(self.layers)
        for _ in range(2 if self.twice else 1):
            for layer, c in zip(self.layers, cache, strict=True):
                x = layer(x, None, c)
                x = x[0] if isinstance(x, tuple) else x
        return x


def test_a_model_that_calls_a_layer_twice_is_refused_on_its_first_pass() -> None:
    model = Looped()
    split_layers(model, one_rank(), [2])
    with pytest.raises(SplitError) as caught:
        model(mx.zeros((1, 3, 8)))
    assert str(caught.value) == (
        "Looped models call layer 0 after layer 1: our layer split runs models that call each "
        "layer once, in order"
    )


def test_layers_that_return_more_than_the_hidden_state_are_refused() -> None:
    model = Looped(pair=True, twice=False)
    split_layers(model, one_rank(), [2])
    with pytest.raises(SplitError, match=r"^Looped layers return tuple, not the hidden state"):
        model(mx.zeros((1, 3, 8)))
