"""The SLA gates `mlxfleet bench` exits 1 on: TTFT tail ratio, sustained swap, RSS peak.

Pure functions over what a run measured. A gate that could not be measured has value None
and never trips; its detail says why, so a report never passes a gate silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from coordinator.bench.results import Cell, Gate, Resources

MIB = 2**20
# Fewer TTFT samples than this make p95 the 1st or 2nd largest value: too noisy to gate on.
MIN_TAIL_SAMPLES = 20


@dataclass(frozen=True, slots=True)
class GateLimits:
    """The thresholds; the defaults are the issue's SLA."""

    tail_ratio: float = 2.8  # TTFT p95 / p50 of the worst cell
    swap_bytes: int = 768 * MIB
    swap_for_s: float = 90.0  # swap above swap_bytes at least this long trips
    rss_percent: float = 82.0  # RSS peak, % of physical RAM


def longest_stretch_s(series: Sequence[tuple[float, int, int]], swap_bytes: int) -> float | None:
    """The longest run of consecutive samples with swap above `swap_bytes`, first to last
    sample's time (one sample alone: 0 s); None when no sample is above."""
    longest: float | None = None
    start: float | None = None
    for t, _rss, swap in series:
        if swap > swap_bytes:
            start = t if start is None else start
            longest = max(longest or 0.0, t - start)
        else:
            start = None
    return longest


def tail_gate(cells: Sequence[Cell], limit: float) -> Gate:
    """The worst TTFT p95/p50 over the cells with at least MIN_TAIL_SAMPLES TTFTs."""
    counted = [c for c in cells if c.ttft_s is not None and c.tail_ratio is not None]
    enough = [c for c in counted if c.ttft_s is not None and c.ttft_s.n >= MIN_TAIL_SAMPLES]
    if not enough:
        most = max((c.ttft_s.n for c in counted if c.ttft_s is not None), default=0)
        detail = f"too few samples: no cell has {MIN_TAIL_SAMPLES} TTFT samples (most: {most})"
        return Gate("tail_ratio", limit, None, False, detail)
    worst = max(enough, key=lambda c: c.tail_ratio or 0.0)
    ratio = worst.tail_ratio or 0.0
    tripped = ratio > limit
    return Gate(
        "tail_ratio",
        limit,
        ratio,
        tripped,
        f"worst TTFT p95/p50 {ratio:.2f} {'>' if tripped else '<='} {limit:g} at concurrency "
        f"{worst.concurrency}, {worst.prompt_tokens} prompt tokens "
        f"({len(enough)} of {len(cells)} cells with >= {MIN_TAIL_SAMPLES} samples)",
    )


def swap_gate(resources: Resources | None, swap_bytes: int, for_s: float) -> Gate:
    """Trips when swap stayed above `swap_bytes` for at least `for_s` seconds; value: that
    longest stretch in seconds (0 when swap never went above)."""
    if resources is None:
        return Gate("swap", for_s, None, False, "not measured: no resource sample")
    above = f"{swap_bytes / MIB:g} MiB"
    stretch = longest_stretch_s(resources.series, swap_bytes)
    peak = f"peak {resources.swap_peak_bytes / MIB:.0f} MiB"
    if stretch is None:
        return Gate("swap", for_s, 0.0, False, f"swap never above {above} ({peak})")
    tripped = stretch >= for_s
    return Gate(
        "swap",
        for_s,
        stretch,
        tripped,
        f"swap above {above} for {stretch:.0f} s at most "
        f"({'>=' if tripped else '<'} {for_s:g} s; {peak})",
    )


def rss_gate(resources: Resources | None, limit_percent: float) -> Gate:
    """Trips when the RSS peak passed `limit_percent` of physical RAM."""
    if resources is None:
        return Gate("rss", limit_percent, None, False, "not measured: no resource sample")
    value = resources.rss_peak_percent
    tripped = value > limit_percent
    return Gate(
        "rss",
        limit_percent,
        value,
        tripped,
        f"RSS peak {value:.1f} % of RAM ({resources.rss_peak_bytes / MIB:.0f} MiB, "
        f"{resources.source}) {'>' if tripped else '<='} {limit_percent:g} %",
    )


def evaluate(cells: list[Cell], resources: Resources | None, limits: GateLimits) -> list[Gate]:
    """The three gates of one run, in the order tail_ratio, swap, rss."""
    return [
        tail_gate(cells, limits.tail_ratio),
        swap_gate(resources, limits.swap_bytes, limits.swap_for_s),
        rss_gate(resources, limits.rss_percent),
    ]
