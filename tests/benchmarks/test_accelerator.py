"""benchmarks/accelerator.py without a GPU or servers: the random-weight models it builds load in
mlx-lm and decode visible text; prompts come out at the size asked; the report's ratios."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import accelerator as acc

SMALL = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "intermediate_size": 256,
    "vocab_size": 2048,
}


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def model_dir(request, tmp_path: Path, monkeypatch) -> Path:
    shape = {**SMALL, "tie_word_embeddings": request.param}
    monkeypatch.setitem(acc.SHAPES, "small", shape)
    return acc.build_model("small", tmp_path / "small")


def test_built_model_loads_quantized_and_decodes_visible_tokens(model_dir: Path) -> None:
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.generate import generate_step

    model, tokenizer = mlx_lm.load(str(model_dir))
    assert model.model.layers[0].mlp.up_proj.bits == acc.BITS  # quantized as written
    ids = acc.Prompts(model_dir).ids("be brief", "hello")
    logits = model(mx.array(ids)[None])
    assert mx.isfinite(logits).all().item()
    drawn = [int(t) for t, _ in generate_step(mx.array(ids), model, max_tokens=24)]
    keep = acc.visible_tokens(model_dir / "tokenizer.json", SMALL["vocab_size"])
    assert all(keep[t] for t in drawn)  # in the tokenizer, never EOS, never empty text
    assert set(drawn).isdisjoint(tokenizer.eos_token_ids)
    assert acc.build_model("small", model_dir) == model_dir  # the same shape is reused


def test_weight_bytes_leave_out_an_untied_input_table(model_dir: Path) -> None:
    import mlx_lm

    model = mlx_lm.load(str(model_dir))[0]
    tied = model.args.tie_word_embeddings
    sizes = acc.weight_bytes(model, tied)
    assert (sizes["per_decode_step"] == sizes["total"]) == tied
    assert 0 < sizes["per_decode_step"] <= sizes["total"]


def test_prompts_come_out_at_the_size_asked(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(acc.SHAPES, "small", {**SMALL, "tie_word_embeddings": True})
    prompts = acc.Prompts(acc.build_model("small", tmp_path / "small"))
    for seed, tokens in ((0, 500), (123, 3000)):
        n = len(prompts.ids(prompts.system(seed, tokens), "question 0"))
        assert abs(n - tokens) <= tokens * 0.01
    assert prompts.system(1, 500) != prompts.system(2, 500)


def test_summary_ratios_and_markdown() -> None:
    res = {
        "bandwidth_bytes_per_s": 4e12,
        "weight_bytes": {"total": 10**9, "per_decode_step": 10**9},
        "raw": {"generate_step_tok_s": [280.0], "batch_generator_b1_tok_s": [200.0]},
        "model_thread": {"model_thread_b1_tok_s": [190.0]},
        "http": {
            "ours": {
                "b1_tok_s": [185.0],
                "cold": [{"ttft_s": 1.0, "prompt_tokens": 7200, "cached_tokens": 0}],
                "repeat": [{"ttft_s": 0.05, "prompt_tokens": 7200, "cached_tokens": 7168}],
            },
            "mlx_lm.server": {
                "b1_tok_s": [190.0],
                "cold": [{"ttft_s": 1.2, "prompt_tokens": 7200, "cached_tokens": 0}],
                "repeat": [{"ttft_s": 0.2, "prompt_tokens": 7200, "cached_tokens": 7100}],
            },
        },
    }
    s = acc.summarize(res)
    assert s["bandwidth_limit_tok_s"] == pytest.approx(4000)
    r = s["ratios"]
    assert r["ours b1 / BatchGenerator b1"] == {
        "value": pytest.approx(0.925),
        "target": ">= 0.9",
        "passes": True,
    }
    assert r["ours b1 / mlx_lm.server b1"]["passes"] is False
    assert r["ours repeat TTFT / ours cold TTFT"]["passes"] is True
    assert r["ours streams / mlx_lm.server streams"] == {
        "value": None,
        "target": None,
        "passes": None,
    }
    results = {
        "measured": "now",
        "command": "python -m benchmarks.accelerator",
        "machine": {
            "gpus": "GPU 0: NVIDIA H200",
            "host": "h",
            "mlx_device": "gpu",
            "versions": "v",
        },
        "bandwidth": {"bytes_per_s": 4e12},
        "shapes": {"1.5b": {**res, "summary": s}, "7b": {"error": "Traceback\nBoom: no"}},
    }
    text = acc.markdown(results)
    assert "NVIDIA H200" in text and "| ours b1 / BatchGenerator b1 | >= 0.9 | 0.925 ✓ |" in text
    assert "7b: failed: Boom: no" in text
