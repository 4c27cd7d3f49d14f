"""The offline demo model: fast to write, loadable by mlx_lm, byte-for-byte reproducible."""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlx_lm

from node_agent.engine.demo_model import is_demo_model, write_demo_model

WRITE_BUDGET_S = 3.0


def test_demo_model_writes_fast_and_reproducibly(tmp_path: Path) -> None:
    started = time.monotonic()
    first = write_demo_model(tmp_path / "a")
    elapsed = time.monotonic() - started
    second = write_demo_model(tmp_path / "b")
    assert elapsed < WRITE_BUDGET_S
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    config = json.loads((first / "config.json").read_text())
    assert (config["model_type"], config["hidden_size"], config["num_hidden_layers"]) == (
        "qwen2",
        128,
        2,
    )
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert 1000 <= config["vocab_size"] <= 2000
    assert is_demo_model(first)
    assert not is_demo_model(tmp_path)


def test_demo_model_loads_chats_and_generates(demo_model: Path) -> None:
    model, tokenizer = mlx_lm.load(str(demo_model))
    assert len(tokenizer._tokenizer) == model.args.vocab_size
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello there"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.eos_token_ids == {tokenizer.convert_tokens_to_ids("<|im_end|>")}
    assert tokenizer.decode(tokenizer.encode("The quick brown fox")) == "The quick brown fox"
    once = mlx_lm.generate(model, tokenizer, prompt, max_tokens=16)
    again = mlx_lm.generate(model, tokenizer, prompt, max_tokens=16)
    assert once == again
    assert len(once) > 0
