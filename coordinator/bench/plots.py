"""The bench report's PNG plots: the TTFT distribution and tokens/s against concurrency.

Drawn with matplotlib's object API on a bare `Figure` (the Agg canvas, no pyplot): no display
is needed and no global figure state is left behind. Same report in, same bytes out: a fixed
size and dpi, and the PNG's "Software" metadata stripped. A report with nothing to draw (an
interrupted run, every request failed) still gives a valid PNG that says "no data".
"""

from __future__ import annotations

import io
from collections import defaultdict
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from coordinator.bench.results import Report, Run

DPI = 100
PANEL_SIZE_IN = (5.0, 4.0)  # width, height of one panel, inches
LINE_STYLES = ("-", "--", ":", "-.")  # one per sweep value
MARKERS = ("o", "s", "^", "D")  # one per sweep value
MARKERS_UP_TO = 20  # an ECDF with at most this many points also marks each one


def sweep_label(sweep: dict[str, int]) -> str:
    """`batch_window_ms=50` for a sweep value; "" for a run without --sweep."""
    return ", ".join(f"{k}={v}" for k, v in sorted(sweep.items()))


def ttft_png(report: Report) -> bytes:
    """ECDF of TTFT per cell: a panel per prompt length, a colour per concurrency, a line
    style per sweep value."""
    groups: dict[int, dict[tuple[int, int], list[float]]] = defaultdict(lambda: defaultdict(list))
    for index, run in enumerate(report.runs):
        for s in run.samples:
            if s.ok and s.ttft_s is not None:
                groups[s.prompt_tokens_wanted][(index, s.concurrency)].append(s.ttft_s)
    prompts = sorted(groups)
    concurrencies = sorted({c for by_cell in groups.values() for _, c in by_cell})
    fig, axes = _figure(max(1, len(prompts)))
    for ax, prompt in zip(axes, prompts, strict=False):
        for (index, concurrency), values in sorted(groups[prompt].items()):
            ordered = sorted(values)
            n = len(ordered)
            ax.plot(
                [v * 1000 for v in ordered],
                [(i + 1) / n for i in range(n)],
                drawstyle="steps-post",
                marker="o" if n <= MARKERS_UP_TO else None,
                markersize=3,
                color=f"C{concurrencies.index(concurrency) % 10}",
                linestyle=LINE_STYLES[index % len(LINE_STYLES)],
                label=_label(report.runs[index], f"c={concurrency}"),
            )
        for level in (0.5, 0.95):
            ax.axhline(level, color="0.8", linewidth=0.8, zorder=0)
        if _spread(groups[prompt]) > 20:
            ax.set_xscale("log")
        ax.set_title(f"prompt {prompt} tokens")
        ax.set_xlabel("TTFT (ms)")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize="small")
    axes[0].set_ylabel("fraction of requests")
    if not prompts:
        _no_data(axes[0])
    fig.suptitle(_title(report, "TTFT distribution"))
    return _png(fig)


def throughput_png(report: Report) -> bytes:
    """Aggregate tokens/s and per-slot decode tokens/s (p50) against concurrency: a line per
    prompt length and sweep value."""
    fig, (aggregate, per_slot) = _figure(2)
    series = 0
    concurrencies: set[int] = set()
    for index, run in enumerate(report.runs):
        for prompt in sorted({c.prompt_tokens for c in run.cells}):
            cells = sorted(
                (c for c in run.cells if c.prompt_tokens == prompt), key=lambda c: c.concurrency
            )
            style: dict[str, Any] = {
                "color": f"C{series % 10}",
                "linestyle": LINE_STYLES[index % len(LINE_STYLES)],
                "marker": MARKERS[index % len(MARKERS)],
                "label": _label(run, f"prompt {prompt}"),
            }
            aggregate.plot(
                [c.concurrency for c in cells], [c.aggregate_tokens_per_s for c in cells], **style
            )
            decoded = [
                (c.concurrency, c.decode_tokens_per_s.p50)
                for c in cells
                if c.decode_tokens_per_s is not None
            ]
            per_slot.plot([x for x, _ in decoded], [y for _, y in decoded], **style)
            concurrencies.update(c.concurrency for c in cells)
            series += 1
    for ax, title in (
        (aggregate, "aggregate tokens/s"),
        (per_slot, "decode tokens/s per slot, p50"),
    ):
        ax.set_title(title)
        ax.set_xlabel("concurrency")
        ax.set_ylabel("tokens/s")
        if series:
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(concurrencies), labels=[str(c) for c in sorted(concurrencies)])
            ax.minorticks_off()
            ax.set_ylim(bottom=0)
            ax.legend(fontsize="small")
        else:
            _no_data(ax)
    fig.suptitle(_title(report, "Tokens/s against concurrency"))
    return _png(fig)


def _figure(panels: int) -> tuple[Figure, list[Axes]]:
    width, height = PANEL_SIZE_IN
    fig = Figure(figsize=(width * panels, height), dpi=DPI, layout="constrained")
    return fig, list(fig.subplots(1, panels, squeeze=False)[0])


def _label(run: Run, what: str) -> str:
    sweep = sweep_label(run.sweep)
    return f"{what}, {sweep}" if sweep else what


def _title(report: Report, what: str) -> str:
    interrupted = any(run.interrupted for run in report.runs)
    return f"{what}: {report.model}, {report.workload}" + (", interrupted" if interrupted else "")


def _spread(by_cell: dict[tuple[int, int], list[float]]) -> float:
    """Largest over smallest value: a wide spread needs a log axis."""
    values = [v for vs in by_cell.values() for v in vs]
    low = min(values)
    return max(values) / low if low > 0 else 0.0


def _no_data(ax: Axes) -> None:
    ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center")
    ax.set_xticks([])
    ax.set_yticks([])


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()
