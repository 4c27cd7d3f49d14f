"""benchmarks/groups.py without servers: the bytes a group's step should send, the on-paper
formula, the decode window's arithmetic, the prompts, the wide model it writes, and its report."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import groups
from benchmarks.groups import PLANS, SETUPS, Plan, Sample, decode_window, paper_step_s, step_bytes


def test_step_bytes_counts_three_hidden_states_and_the_control_message() -> None:
    # Send rank 1 -> 0 (512 bytes), all_gather (512 each way), and 16 bytes of control.
    assert step_bytes(128, 4, 1) == 3 * 512 + 16 == 1552
    assert step_bytes(1024, 4, 4) == 3 * 4 * 4096 + 16 == 49168
    assert step_bytes(8192, 2, 1) == 3 * 16384 + 16


def test_paper_step_is_weights_then_four_messages_then_two_hops() -> None:
    t = paper_step_s(40e9, 819e9, 16384, 1.25e9, 50e-6, overhead_s=1e-3)
    assert t == pytest.approx(40e9 / 819e9 + 4 * 50e-6 + 2 * 16384 / 1.25e9 + 1e-3)
    assert 1 / paper_step_s(40e9, 819e9, 16384, 10e9, 0.0) == pytest.approx(20.47, abs=0.01)


def test_decode_window_takes_the_long_request_over_the_short() -> None:
    short = Sample(seconds=0.5, tokens=8, link_bytes=10_000, cpu_engines_s=0.6, cpu_links_s=0.1)
    long = Sample(
        seconds=2.5, tokens=56, link_bytes=10_000 + 48 * 1552, cpu_engines_s=4.6, cpu_links_s=0.3
    )
    assert decode_window(short, long) == pytest.approx(
        {"tok_s": 24.0, "bytes_per_token": 1552.0, "cores_engines": 2.0, "cores_links": 0.1}
    )
    with pytest.raises(ValueError, match="no decode window"):
        decode_window(long, short)


def test_prompt_ids_are_fixed_by_the_seed_and_avoid_special_tokens() -> None:
    ids = groups.prompt_ids(7, 500)
    assert ids == groups.prompt_ids(7, 500)
    assert ids != groups.prompt_ids(8, 500)
    assert len(ids) == 500
    assert all(groups.FIRST_ID <= i < groups.LAST_ID for i in ids)


def test_the_wide_model_loads_in_mlx_lm_with_the_planned_shape(tmp_path: Path) -> None:
    import mlx.core as mx
    import mlx_lm

    from node_agent.engine.demo_model import write_demo_model

    demo = write_demo_model(tmp_path / "demo")
    plan = Plan("small", "a small wide", 64, 2, 4, "1,1", 8, 1, 1)
    path = groups.write_wide_model(tmp_path / "wide", demo, plan)
    model, tokenizer = mlx_lm.load(str(path))[:2]
    assert (model.args.hidden_size, model.args.num_hidden_layers) == (64, 2)
    assert model.args.intermediate_size == groups.WIDE_SHAPE["intermediate_size"]
    assert hasattr(model.model, "pipeline")  # it can run as a group
    logits = model(mx.array([groups.prompt_ids(1, 5)]))
    assert logits.shape == (1, 5, model.args.vocab_size)
    assert logits.dtype == mx.float32
    assert tokenizer.vocab_size == model.args.vocab_size


def fake_results() -> dict:
    """Two rounds' worth of results shaped as run_model and measure_collectives make them."""

    def runs(tok_s: float, bytes_per_token: float) -> list[dict[str, float]]:
        return [
            {
                "tok_s": tok_s * f,
                "bytes_per_token": bytes_per_token,
                "cores_engines": 1.5,
                "cores_links": 0.1,
            }
            for f in (0.9, 1.0, 1.1)
        ]

    results: dict = {
        "collectives": {
            "group, direct": {"all_sum": [60e-6] * 3, "all_gather": [40e-6] * 3},
            "group, rank links": {"all_sum": [260e-6] * 3, "all_gather": [140e-6] * 3},
        }
    }
    for name, plan in PLANS.items():
        b1 = step_bytes(plan.hidden, plan.dtype_bytes, 1)
        b4 = step_bytes(plan.hidden, plan.dtype_bytes, groups.STREAMS) / groups.STREAMS
        results[name] = {
            setup: {
                "ttft_s": [0.3, 0.31, 0.32],
                "b1": runs(tok_s, b1 if setup == "group, rank links" else 0.0),
                "b4": runs(2 * tok_s, b4 if setup == "group, rank links" else 0.0),
                "idle_cores": [0.0 if setup == "one engine" else 1.0],
            }
            for setup, tok_s in zip(SETUPS, (40.0, 32.0, 25.0), strict=True)
        }
    return results


def test_report_shows_the_measured_numbers_and_the_estimate() -> None:
    text = groups.report(fake_results(), 3, "2026-01-01 00:00 UTC")
    assert text.startswith(groups.SECTION + "\n")
    # One engine at 40 tok/s is 25 ms a token; a group at 25 tok/s, 40 ms: 15 ms more.
    assert "| one engine | 310 (300–320) | 40 (36–44) | 25.00 |  |" in text
    assert "| group, rank links | 310 (300–320) | 25 (22–28) | 40.00 | +15.00 |" in text
    assert "| demo6 | 128 × 4 | 1 | 1552.0 | 1552.0 | 1.000 |" in text
    # The links add 200 + 100 µs over three exchanges: r = 100 µs; with c = 15 ms instead
    # (the links group's measured overhead), r = 0: 1 / (48.8 + 0.23..0.43 + 15 ms).
    row = "| 10 GbE, TCP, through our rank links | 50–100 | 100 | 0.63–0.83 | 20.1–20.2 | 15.6 |"
    assert row in text
    assert "| one Mac (the model fits one) | | | 0 | 20.5 | |" in text
