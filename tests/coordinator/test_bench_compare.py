"""`mlxfleet bench compare`: flags changes beyond run-to-run noise, and only those."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from coordinator.bench.compare import CellKey, compare, load, render
from coordinator.bench.errors import BenchError
from coordinator.bench.results import (
    SCHEMA,
    Cell,
    Quantiles,
    Report,
    Run,
    Sample,
    Snapshot,
    Workload,
    to_json,
)

MAX_TOKENS = 64
CELLS = [(1, 128), (4, 128), (1, 2048), (4, 2048)]  # (concurrency, prompt tokens)


def snapshot(mlx: str = "0.32.4") -> Snapshot:
    return Snapshot(1.0, "h", "macOS 15", "Apple M3", 2**34, True, ["Apple M2 Ultra"], ["macOS 15"],
                    [mlx], ["0.32.2"], 2**37, 80, 8, 4, {}, [])  # fmt: skip


def cell_of(concurrency: int, prompt: int, samples: list[Sample]) -> Cell:
    """A cell summarised as the runner does: closed loops, so wall time = busy time / slots."""
    ok = [s for s in samples if s.ok]
    ttft = Quantiles.of([s.ttft_s for s in ok if s.ttft_s is not None])
    decode = [r for s in ok if (r := s.decode_tokens_per_s) is not None]
    prefill = [r for s in ok if (r := s.prefill_tokens_per_s) is not None]
    wall = sum(s.total_s for s in samples) / concurrency
    tokens = sum(s.completion_tokens for s in ok)
    return Cell(concurrency, prompt, MAX_TOKENS, wall, len(samples), len(samples) - len(ok), ttft,
                Quantiles.of([s.first_byte_s for s in ok if s.first_byte_s is not None]),
                ttft.p95 / ttft.p50 if ttft else None, Quantiles.of(prefill), Quantiles.of(decode),
                tokens / wall, tokens, len(ok))  # fmt: skip


def measured(seed: int, n: int = 200, ttft_scale: float = 1.0, decode_scale: float = 1.0,
             cells: list[tuple[int, int]] = CELLS, workload: Workload = "interactive",
             model: str = "demo-1b", mlx: str = "0.32.4") -> Report:  # fmt: skip
    """A report whose requests are drawn from fixed distributions (lognormal TTFT, normal
    decode rate) with the given seed; the scales make a slower or faster server."""
    rng = random.Random(seed)
    samples, out = [], []
    for concurrency, prompt in cells:
        cell = []
        for i in range(n):
            ttft = rng.lognormvariate(0, 0.3) * 0.0001 * prompt * concurrency * ttft_scale + 0.05
            rate = rng.gauss(30.0, 2.0) * decode_scale / concurrency**0.25
            total = ttft + (MAX_TOKENS - 1) / rate
            cell.append(Sample(concurrency, prompt, i * 0.1, ttft / 10, ttft, total, prompt,
                               MAX_TOKENS, MAX_TOKENS, "length"))  # fmt: skip
        samples += cell
        out.append(cell_of(concurrency, prompt, cell))
    run = Run(workload, {}, 1_700_000_000.0, 60.0, False, out, samples, snapshot(mlx), None, [])
    return Report(SCHEMA, "http://127.0.0.1:8400/v1", model, workload, ["mlxfleet"], [run])


def verdicts(report_a: Report, report_b: Report) -> dict[tuple[int, int, str], str]:
    comparison = compare(report_a, report_b)
    return {(c.cell.concurrency, c.cell.prompt_tokens, c.metric): c.verdict
            for c in comparison.changes}  # fmt: skip


def test_a_doubled_ttft_is_flagged_as_worse_and_fails() -> None:
    a, b = measured(seed=1), measured(seed=2, ttft_scale=2.0, cells=[(4, 2048)])
    comparison = compare(a, b)
    by_metric = {c.metric: c for c in comparison.changes}
    assert {m: c.verdict for m, c in by_metric.items()} == {
        "ttft_p50": "worse",
        "ttft_p95": "worse",
        "decode_p50": "within noise",  # the same decode rates
        "aggregate": "worse",  # longer requests, fewer tokens per second of wall time
    }
    p50 = by_metric["ttft_p50"]
    assert p50.relative == pytest.approx(0.90, abs=0.001)  # 0.05 s fixed + a part that doubled
    assert p50.interval == pytest.approx((0.766, 1.034), abs=0.001)
    assert comparison.z == pytest.approx(2.498, abs=0.001)  # Bonferroni over the 4 tests
    assert comparison.exit_status == 1 and len(comparison.regressions) == 3
    lines = render(comparison).splitlines()
    assert (
        "| interactive, c=4, prompt 2048 | TTFT p50 (ms) | 890.0 | 1690.9 | +90.0 %"
        " | +76.6 % … +103.4 % | **worse** |"
    ) in lines
    assert (
        "| interactive, c=4, prompt 2048 | decode tok/s per slot p50 | 21.3 | 20.9 | -1.5 %"
        " | -3.7 % … +0.7 % | within noise |"
    ) in lines
    assert "Only in A:" in lines and "- interactive, c=1, prompt 128" in lines
    assert lines[-1].startswith("3 worse and 0 better beyond noise: the change is at least 5 %")


def test_a_faster_server_is_better_and_passes() -> None:
    comparison = compare(measured(seed=1), measured(seed=2, ttft_scale=0.5, decode_scale=1.5))
    assert {c.verdict for c in comparison.changes} == {"better"}
    assert comparison.exit_status == 0 and comparison.regressions == []


def test_two_runs_of_the_same_server_are_within_noise() -> None:
    comparison = compare(measured(seed=1), measured(seed=2))
    assert len(comparison.changes) == 16
    assert {c.verdict for c in comparison.changes} == {"within noise"}
    assert comparison.exit_status == 0
    # Bonferroni over 16 tests: the intervals are wider than a single 95 % interval.
    assert comparison.z == pytest.approx(2.955, abs=0.001)


def test_the_false_alarm_rate_over_many_same_server_pairs_is_small() -> None:
    """At most ALPHA (5 %) of comparisons of the same setup may flag anything; small cells
    (30 requests) are where a per-metric 95 % interval alone would flag most often."""
    flagged = 0
    for seed in range(40):
        a, b = measured(seed=100 + seed, n=30), measured(seed=200 + seed, n=30)
        flagged += any(c.flagged for c in compare(a, b).changes)
    assert flagged <= 2


def test_cells_in_one_report_only_are_listed_and_differences_noted() -> None:
    a = measured(seed=1, n=5, cells=[(1, 128), (4, 128)])
    b = measured(seed=2, n=5, cells=[(4, 128), (16, 128)], model="demo-3b", mlx="0.33.0")
    comparison = compare(a, b)
    assert comparison.only_in_a == [CellKey("interactive", (), 1, 128)]
    assert comparison.only_in_b == [CellKey("interactive", (), 16, 128)]
    assert {c.verdict for c in comparison.changes} == {"too few samples"}  # 5 requests a side
    assert comparison.notes == [
        "the models differ: A demo-1b, B demo-3b",
        "the mlx versions differ: A 0.32.4, B 0.33.0",
    ]
    text = render(comparison)
    for line in [
        "Only in A:",
        "- interactive, c=1, prompt 128",
        "Only in B:",
        "- interactive, c=16, prompt 128",
        "- the models differ: A demo-1b, B demo-3b",
    ]:
        assert line in text.splitlines()
    assert comparison.exit_status == 0


def test_different_workloads_match_nothing() -> None:
    comparison = compare(measured(seed=1, n=5), measured(seed=1, n=5, workload="batch"))
    assert comparison.changes == [] and len(comparison.only_in_a) == len(CELLS)
    assert "No cell is in both reports." in render(comparison)
    assert "the workloads differ: A interactive, B batch" in comparison.notes


def test_load_reads_a_report_and_names_a_bad_file(tmp_path: Path) -> None:
    good = tmp_path / "a.json"
    report = measured(seed=1, n=3)
    good.write_text(to_json(report))
    assert load(good) == report
    with pytest.raises(BenchError, match=r"cannot read bench report .*missing\.json"):
        load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"schema": "other"}')
    with pytest.raises(BenchError, match="not an mlxfleet bench report"):
        load(tmp_path / "bad.json")
