"""The SLA gates: pure functions, checked with exact numbers, tripping and not."""

from __future__ import annotations

from coordinator.bench.gates import (
    MIB,
    MIN_TAIL_SAMPLES,
    GateLimits,
    evaluate,
    longest_stretch_s,
)
from coordinator.bench.results import Cell, Quantiles, Resources

GIB = 2**30


def cell(ttfts: list[float], concurrency: int = 4, prompt_tokens: int = 128) -> Cell:
    q = Quantiles.of(ttfts)
    return Cell(
        concurrency=concurrency,
        prompt_tokens=prompt_tokens,
        max_tokens=64,
        duration_s=10.0,
        requests=len(ttfts),
        failed=0,
        ttft_s=q,
        first_byte_s=q,
        tail_ratio=q.p95 / q.p50 if q else None,
        prefill_tokens_per_s=None,
        decode_tokens_per_s=None,
        aggregate_tokens_per_s=100.0,
        completion_tokens=64 * len(ttfts),
        ran_to_max_tokens=len(ttfts),
    )


def resources(series: list[tuple[float, int, int]], percent: float = 50.0) -> Resources:
    return Resources(
        source="fleet",
        samples=len(series),
        rss_peak_bytes=max(r for _, r, _ in series),
        rss_peak_percent=percent,
        swap_peak_bytes=max(s for _, _, s in series),
        swap_over_limit_s=0.0,
        series=series,
    )


# 20 TTFTs: p50 is the 10th value (0.10 s), p95 the 19th (0.50 s): ratio 5.0.
TAILED = [0.10] * 10 + [0.20] * 8 + [0.50, 0.90]
EVEN = [0.10] * 20  # ratio 1.0


def test_tail_gate_takes_the_worst_cell_with_enough_samples() -> None:
    assert len(TAILED) == MIN_TAIL_SAMPLES
    cells = [cell(EVEN, 1), cell(TAILED, 16, 2048), cell([0.1, 5.0, 9.0], 64)]  # last: too few
    tail, _, _ = evaluate(cells, None, GateLimits())
    assert tail.name == "tail_ratio"
    assert tail.value == 5.0
    assert tail.limit == 2.8
    assert tail.tripped
    assert "concurrency 16, 2048 prompt tokens" in tail.detail
    assert "2 of 3 cells" in tail.detail


def test_tail_gate_passes_at_or_under_the_limit() -> None:
    tail, _, _ = evaluate([cell(EVEN), cell(TAILED)], None, GateLimits(tail_ratio=5.0))
    assert (tail.value, tail.tripped) == (5.0, False)  # tripped only when value > limit
    tail, _, _ = evaluate([cell(EVEN)], None, GateLimits())
    assert (tail.value, tail.tripped) == (1.0, False)


def test_a_tiny_tail_limit_trips_on_an_even_cell() -> None:
    tail, _, _ = evaluate([cell(EVEN)], None, GateLimits(tail_ratio=0.5))
    assert (tail.value, tail.tripped) == (1.0, True)


def test_tail_gate_with_too_few_samples_is_unmeasured_not_passed() -> None:
    few = cell([0.1] * (MIN_TAIL_SAMPLES - 1))
    tail, _, _ = evaluate([few, cell([])], None, GateLimits(tail_ratio=0.0))
    assert tail.value is None
    assert not tail.tripped
    assert tail.detail == (
        f"too few samples: no cell has {MIN_TAIL_SAMPLES} TTFT samples "
        f"(most: {MIN_TAIL_SAMPLES - 1})"
    )
    assert evaluate([], None, GateLimits())[0].value is None


def test_longest_stretch_is_first_to_last_sample_above_the_limit() -> None:
    limit = 768 * MIB
    above, below = limit + 1, limit  # "above" is strictly greater
    series = [
        (0.0, 0, below),
        (1.0, 0, above),
        (2.0, 0, above),  # 1 s stretch
        (3.0, 0, below),
        (4.0, 0, above),
        (5.5, 0, above),
        (7.0, 0, above),  # 3 s stretch
        (8.0, 0, below),
        (9.0, 0, above),  # a single sample: 0 s
    ]
    assert longest_stretch_s(series, limit) == 3.0
    assert longest_stretch_s(series[:3], limit) == 1.0
    assert longest_stretch_s([(0.0, 0, above)], limit) == 0.0
    assert longest_stretch_s([(0.0, 0, below), (1.0, 0, below)], limit) is None
    assert longest_stretch_s([], limit) is None
    # Still above at the last sample: the stretch runs to it.
    assert longest_stretch_s([(0.0, 0, above), (100.0, 0, above)], limit) == 100.0


def test_swap_gate_trips_after_swap_for_s_above_the_limit() -> None:
    # 1 GiB of swap from t=10 to t=100: 90 s above 768 MiB.
    series = [(float(t), 8 * GIB, GIB if t >= 10 else 0) for t in range(0, 101, 5)]
    _, swap, _ = evaluate([], resources(series), GateLimits())
    assert (swap.name, swap.limit, swap.value, swap.tripped) == ("swap", 90.0, 90.0, True)
    assert swap.detail == "swap above 768 MiB for 90 s at most (>= 90 s; peak 1024 MiB)"
    _, swap, _ = evaluate([], resources(series[:-1]), GateLimits())  # until t=95: 85 s
    assert (swap.value, swap.tripped) == (85.0, False)


def test_swap_gate_passes_under_the_byte_limit_and_tiny_limits_trip_it() -> None:
    series = [(0.0, 0, 10 * MIB), (1.0, 0, 12 * MIB), (2.0, 0, 0)]
    _, swap, _ = evaluate([], resources(series), GateLimits())
    assert (swap.value, swap.tripped) == (0.0, False)
    assert swap.detail == "swap never above 768 MiB (peak 12 MiB)"
    _, swap, _ = evaluate([], resources(series), GateLimits(swap_bytes=0, swap_for_s=0.0))
    assert (swap.value, swap.tripped) == (1.0, True)
    # No swap at all never trips, whatever the limits.
    idle = [(0.0, 0, 0), (1.0, 0, 0)]
    _, swap, _ = evaluate([], resources(idle), GateLimits(swap_bytes=0, swap_for_s=0.0))
    assert (swap.value, swap.tripped) == (0.0, False)


def test_rss_gate_trips_over_the_percent() -> None:
    series = [(0.0, 20 * GIB, 0)]
    _, _, rss = evaluate([], resources(series, percent=62.5), GateLimits())
    assert (rss.name, rss.limit, rss.value, rss.tripped) == ("rss", 82.0, 62.5, False)
    assert rss.detail == "RSS peak 62.5 % of RAM (20480 MiB, fleet) <= 82 %"
    _, _, rss = evaluate([], resources(series, percent=62.5), GateLimits(rss_percent=62.5))
    assert rss.tripped is False  # equal is not over
    _, _, rss = evaluate([], resources(series, percent=62.5), GateLimits(rss_percent=1.0))
    assert (rss.value, rss.tripped) == (62.5, True)


def test_unmeasured_resources_never_trip() -> None:
    gates = evaluate([], None, GateLimits(tail_ratio=0, swap_bytes=0, swap_for_s=0, rss_percent=0))
    assert [(g.name, g.value, g.tripped) for g in gates] == [
        ("tail_ratio", None, False),
        ("swap", None, False),
        ("rss", None, False),
    ]
    assert gates[1].detail == "not measured: no resource sample"
    assert gates[2].detail == "not measured: no resource sample"
