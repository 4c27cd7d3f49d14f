"""`mlxfleet bench compare A.json B.json`: which numbers moved beyond run-to-run noise.

Cells are matched by (workload, sweep value, concurrency, prompt length). For each matched cell
four metrics are compared: TTFT p50 and p95 (lower is better), per-slot decode tokens/s p50 and
aggregate tokens/s (higher is better).

The noise test. Per metric, a seeded bootstrap (`BOOTSTRAP_RESAMPLES` resamples with
replacement of each side's successful requests) gives the standard error of the change
B - A in the statistic: the nearest-rank quantile of the requests' TTFTs or decode rates, and
for aggregate tokens/s (one value per cell) the ratio sum(completion tokens) / sum(request
time), which moves in proportion to it while the same number of slots stays busy. The
interval is the change +- z standard errors, z Bonferroni-corrected over every metric tested
in the comparison: if nothing changed, the chance that any of them is flagged is at most
`ALPHA` (5 %), not 5 % per metric. A change is flagged only when the interval excludes 0, the
change in the reported numbers is at least `MIN_CHANGE` (5 %; smaller moves are not worth
acting on, and run-to-run drift the requests of one run cannot show) and both point the same
way. Cells with too few requests (`MIN_SAMPLES`, more for p95) are reported, never flagged.

Exit status: 0 when nothing got worse beyond noise (improvements, unmatched cells and
different models or endpoints are reported but do not fail), 1 when any flagged change is a
regression, 2 when a report cannot be read (`BenchError`, one line).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Literal

import numpy as np
import numpy.typing as npt

from coordinator.bench.errors import BenchError
from coordinator.bench.plots import sweep_label
from coordinator.bench.results import Cell, Report, Run, Sample, Workload, from_json

Metric = Literal["ttft_p50", "ttft_p95", "decode_p50", "aggregate"]
Verdict = Literal["worse", "better", "within noise", "too few samples", "not measured"]

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 7  # fixed: the same two reports always give the same verdicts
ALPHA = 0.05  # the chance that two runs of the same setup flag anything at all
MIN_CHANGE = 0.05  # a fraction of A: smaller moves are never flagged
# Requests per side below which the bootstrap's standard error is too small to trust (seeded
# same-server pairs flagged up to 9 % of comparisons with 10 requests; <= 4 % from these on).
MIN_SAMPLES = 20  # for a median or a rate
MIN_SAMPLES_P95 = 40  # for p95, which is then at least the third-largest value
BOOTSTRAP_CHUNK = 2_000_000  # resampled values held at once (memory bound)
NONE = "—"

LOWER_IS_BETTER: dict[Metric, bool] = {
    "ttft_p50": True,
    "ttft_p95": True,
    "decode_p50": False,
    "aggregate": False,
}
METRIC_NAMES: dict[Metric, str] = {
    "ttft_p50": "TTFT p50 (ms)",
    "ttft_p95": "TTFT p95 (ms)",
    "decode_p50": "decode tok/s per slot p50",
    "aggregate": "aggregate tok/s",
}
Values = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True, order=True)
class CellKey:
    """What makes a cell of A the same cell of B."""

    workload: Workload
    sweep: tuple[tuple[str, int], ...]
    concurrency: int
    prompt_tokens: int

    def label(self) -> str:
        sweep = sweep_label(dict(self.sweep))
        where = f"{self.workload}, {sweep}" if sweep else self.workload
        return f"{where}, c={self.concurrency}, prompt {self.prompt_tokens}"


@dataclass(frozen=True, slots=True)
class Change:
    """One metric of one matched cell, A against B."""

    cell: CellKey
    metric: Metric
    a: float | None  # as the reports show it
    b: float | None
    relative: float | None  # (b - a) / a
    interval: tuple[float, float] | None  # of the relative change: +-z bootstrap std errors
    verdict: Verdict

    @property
    def flagged(self) -> bool:
        return self.verdict in ("worse", "better")


@dataclass(frozen=True, slots=True)
class Comparison:
    """What `compare` found; `render` prints it, `exit_status` is the CLI's."""

    a: str  # one line describing each report
    b: str
    changes: list[Change]
    only_in_a: list[CellKey]
    only_in_b: list[CellKey]
    notes: list[str]  # differences that are allowed but worth knowing
    z: float  # the intervals' half-width in standard errors

    @property
    def regressions(self) -> list[Change]:
        return [c for c in self.changes if c.verdict == "worse"]

    @property
    def exit_status(self) -> int:
        return 1 if self.regressions else 0


def load(path: Path) -> Report:
    """A report `mlxfleet bench` wrote; BenchError naming the file otherwise."""
    try:
        return from_json(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BenchError(f"cannot read bench report {path}: {exc}") from None


def compare(a: Report, b: Report) -> Comparison:
    """Every metric of every cell the two reports share, with its verdict."""
    cells_a, cells_b = _cells(a), _cells(b)
    measured = [
        _measure(key, metric, cells_a[key], cells_b[key])
        for key in sorted(cells_a.keys() & cells_b.keys())
        for metric in LOWER_IS_BETTER
    ]
    z = _z(sum(m.spread is not None for m in measured))
    return Comparison(
        a=_describe(a),
        b=_describe(b),
        changes=[m.judge(z) for m in measured],
        only_in_a=sorted(cells_a.keys() - cells_b.keys()),
        only_in_b=sorted(cells_b.keys() - cells_a.keys()),
        notes=_notes(a, b),
        z=z,
    )


def _z(tests: int) -> float:
    """Standard errors either side of a change: Bonferroni over `tests` (two-sided)."""
    return NormalDist().inv_cdf(1 - ALPHA / (2 * max(1, tests)))


def render(comparison: Comparison) -> str:
    """A Markdown table of the changes, then the unmatched cells and the notes."""
    lines = [f"A: {comparison.a}", f"B: {comparison.b}", ""]
    if comparison.changes:
        lines.append("| Cell | Metric | A | B | Change | Interval | Verdict |")
        lines.append("|---|---|---|---|---|---|---|")
    for c in comparison.changes:
        interval = NONE if c.interval is None else f"{_pct(c.interval[0])} … {_pct(c.interval[1])}"
        verdict = f"**{c.verdict}**" if c.flagged else c.verdict
        row = [c.cell.label(), METRIC_NAMES[c.metric], _value(c.metric, c.a)]
        row += [_value(c.metric, c.b), NONE if c.relative is None else _pct(c.relative)]
        lines.append("| " + " | ".join([*row, interval, verdict]) + " |")
    if not comparison.changes:
        lines.append("No cell is in both reports.")
    for name, keys in (("A", comparison.only_in_a), ("B", comparison.only_in_b)):
        if keys:
            lines += ["", f"Only in {name}:", *(f"- {k.label()}" for k in keys)]
    if comparison.notes:
        lines += ["", "Notes:", *(f"- {n}" for n in comparison.notes)]
    worse, better = (
        len(comparison.regressions),
        sum(c.verdict == "better" for c in comparison.changes),
    )
    lines += [
        "",
        f"{worse} worse and {better} better beyond noise: the change is at least"
        f" {MIN_CHANGE * 100:.0f} % and its interval (bootstrap, +-{comparison.z:.2f} standard"
        f" errors: {(1 - ALPHA) * 100:.0f} % that no unchanged metric is flagged) excludes 0.",
    ]
    return "\n".join(lines) + "\n"


def _cells(report: Report) -> dict[CellKey, tuple[Cell, list[Sample]]]:
    """Each cell with its requests; the first run wins if a key repeats."""
    out: dict[CellKey, tuple[Cell, list[Sample]]] = {}
    for run in report.runs:
        for cell in run.cells:
            key = CellKey(
                run.workload, tuple(sorted(run.sweep.items())), cell.concurrency, cell.prompt_tokens
            )
            out.setdefault(key, (cell, _samples(run, cell)))
    return out


def _samples(run: Run, cell: Cell) -> list[Sample]:
    return [
        s
        for s in run.samples
        if s.concurrency == cell.concurrency and s.prompt_tokens_wanted == cell.prompt_tokens
    ]


@dataclass(frozen=True, slots=True)
class _Measured:
    """One metric of one matched cell before the verdict, which needs every test's count."""

    cell: CellKey
    metric: Metric
    a: float | None
    b: float | None
    relative: float | None  # of the reported numbers
    shift: float | None = None  # of the statistic over the requests, a fraction of A's
    spread: float | None = None  # its bootstrap standard error, a fraction of A's
    untested: Verdict = "not measured"

    def judge(self, z: float) -> Change:
        if self.relative is None or self.shift is None or self.spread is None:
            return Change(
                self.cell, self.metric, self.a, self.b, self.relative, None, self.untested
            )
        low, high = self.shift - z * self.spread, self.shift + z * self.spread
        up = low > 0  # the direction the interval says, when it excludes 0
        beyond = (up or high < 0) and abs(self.relative) >= MIN_CHANGE and (self.relative > 0) == up
        verdict: Verdict = "within noise"
        if beyond:
            verdict = "worse" if up == LOWER_IS_BETTER[self.metric] else "better"
        return Change(self.cell, self.metric, self.a, self.b, self.relative, (low, high), verdict)


def _measure(
    key: CellKey,
    metric: Metric,
    side_a: tuple[Cell, list[Sample]],
    side_b: tuple[Cell, list[Sample]],
) -> _Measured:
    (cell_a, samples_a), (cell_b, samples_b) = side_a, side_b
    a, b = _reported(metric, cell_a), _reported(metric, cell_b)
    if a is None or b is None or a == 0:
        return _Measured(key, metric, a, b, None)
    relative = (b - a) / a
    values_a, values_b = _values(metric, samples_a), _values(metric, samples_b)
    needed = MIN_SAMPLES_P95 if metric == "ttft_p95" else MIN_SAMPLES
    if min(len(values_a), len(values_b)) < needed:
        return _Measured(key, metric, a, b, relative, untested="too few samples")
    statistic = _statistic(metric)
    base = float(statistic(values_a[np.newaxis])[0])
    if not base > 0:  # no usage reported, say
        return _Measured(key, metric, a, b, relative)
    shift = float(statistic(values_b[np.newaxis])[0]) / base - 1
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    variance = (
        _resampled(values_a, statistic, rng).var() + _resampled(values_b, statistic, rng).var()
    )
    return _Measured(key, metric, a, b, relative, shift, math.sqrt(variance) / base)


def _reported(metric: Metric, cell: Cell) -> float | None:
    """The number report.md shows for the metric."""
    if metric == "aggregate":
        return cell.aggregate_tokens_per_s
    q = cell.decode_tokens_per_s if metric == "decode_p50" else cell.ttft_s
    if q is None:
        return None
    return q.p95 if metric == "ttft_p95" else q.p50


def _values(metric: Metric, samples: list[Sample]) -> Values:
    """The per-request values the statistic is taken of: shape (n,), or (n, 2) for aggregate.

    As the runner summarises a cell: latencies and rates of the successful requests, the
    aggregate over all of them (a failure's time is time without tokens)."""
    if metric == "aggregate":
        pairs = [(s.completion_tokens, s.total_s) for s in samples if s.total_s > 0]
        return np.array(pairs, dtype=np.float64).reshape(-1, 2)
    ok = [s for s in samples if s.ok]
    if metric == "decode_p50":
        rates = [s.decode_tokens_per_s for s in ok]
        return np.array([r for r in rates if r is not None], dtype=np.float64)
    return np.array([s.ttft_s for s in ok if s.ttft_s is not None], dtype=np.float64)


def _statistic(metric: Metric) -> Callable[[Values], Values]:
    """The statistic of each resample (rows of a (resamples, n[, 2]) array)."""
    if metric == "aggregate":
        return lambda x: x[..., 0].sum(axis=1) / x[..., 1].sum(axis=1)
    q = 0.95 if metric == "ttft_p95" else 0.50

    def nearest_rank(x: Values) -> Values:  # as results.Quantiles.of takes it
        rank = max(0, math.ceil(q * x.shape[1]) - 1)
        return np.partition(x, rank, axis=1)[:, rank]

    return nearest_rank


def _resampled(
    values: Values, statistic: Callable[[Values], Values], rng: np.random.Generator
) -> Values:
    n = len(values)
    rows = max(1, BOOTSTRAP_CHUNK // (n * values[0].size))
    out = []
    for start in range(0, BOOTSTRAP_RESAMPLES, rows):
        count = min(rows, BOOTSTRAP_RESAMPLES - start)
        out.append(statistic(values[rng.integers(0, n, size=(count, n))]))
    return np.concatenate(out)


def _describe(report: Report) -> str:
    when = min((run.started_at for run in report.runs), default=None)
    started = "" if when is None else f", {_when(when)}"
    return f"{report.model} at {report.endpoint}, {report.workload}{started}"


def _notes(a: Report, b: Report) -> list[str]:
    notes = []
    for what, va, vb in (
        ("models", a.model, b.model),
        ("endpoints", a.endpoint, b.endpoint),
        ("workloads", a.workload, b.workload),
    ):
        if va != vb:
            notes.append(f"the {what} differ: A {va}, B {vb}")
    if a.runs and b.runs:
        sa, sb = a.runs[0].snapshot, b.runs[0].snapshot
        for what, la, lb in (
            ("chips", sa.chips, sb.chips),
            ("mlx versions", sa.mlx_versions, sb.mlx_versions),
            ("mlx-lm versions", sa.mlx_lm_versions, sb.mlx_lm_versions),
        ):
            if sorted(set(la)) != sorted(set(lb)):
                notes.append(f"the {what} differ: A {_join(la)}, B {_join(lb)}")
    for name, report in (("A", a), ("B", b)):
        if any(run.interrupted for run in report.runs):
            notes.append(f"{name} was interrupted: its cells hold what was measured until Ctrl-C")
        if report.tripped:
            names = ", ".join(sorted({g.name for g in report.tripped}))
            notes.append(f"{name} tripped gates: {names}")
    return notes


def _join(values: list[str]) -> str:
    return ", ".join(sorted(set(values))) or NONE


def _value(metric: Metric, value: float | None) -> str:
    if value is None:
        return NONE
    return f"{value * 1000:.1f}" if metric.startswith("ttft") else f"{value:.1f}"


def _pct(fraction: float) -> str:
    return f"{fraction * 100:+.1f} %"


def _when(unix_s: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(unix_s))
