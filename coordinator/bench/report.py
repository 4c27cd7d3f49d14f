"""What `mlxfleet bench` writes: report.json, report.md and the two PNG plots.

`markdown` shows every number the run measured: per cell the latency (TTFT and first SSE
byte p50/p95/p99, the p95/p50 ratio) and the throughput (prefill, per-slot decode p50/p95,
aggregate tokens/s), the failures, the numeric trio, the gates, the snapshot, and with
--sweep each run's deltas against the first. Times are shown in ms, rates in tokens/s.
"""

from __future__ import annotations

import os
import shlex
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from coordinator.bench.plots import sweep_label, throughput_png, ttft_png
from coordinator.bench.results import Cell, Quantiles, Report, Run, to_json

MIB = 2**20
GIB = 2**30
NONE = "—"  # a number that was not measured
JSON_NAME, MARKDOWN_NAME, TTFT_NAME, THROUGHPUT_NAME = (
    "report.json",
    "report.md",
    "ttft.png",
    "throughput.png",
)


def write_outputs(report: Report, out_dir: Path) -> list[Path]:
    """Write the four files into `out_dir` (created if needed), JSON first; returns their paths.

    Each file is written to a temporary name in `out_dir` and renamed over the old one, so a
    reader (or a second Ctrl-C) never sees a half-written report.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    contents = [
        (JSON_NAME, to_json(report).encode()),
        (MARKDOWN_NAME, markdown(report).encode()),
        (TTFT_NAME, ttft_png(report)),
        (THROUGHPUT_NAME, throughput_png(report)),
    ]
    return [_write_atomically(out_dir / name, data) for name, data in contents]


def _write_atomically(path: Path, data: bytes) -> Path:
    # A name of our own rather than mkstemp's: the file gets the umask's mode, not 0600.
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temp.write_bytes(data)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path


def markdown(report: Report) -> str:
    """The human-readable report."""
    lines = [f"# mlxfleet bench: {report.workload}", ""]
    lines += [
        f"- Endpoint: {report.endpoint}",
        f"- Model: {report.model}",
        f"- Command: `{shlex.join(report.argv)}`",
        f"- Schema: {report.schema}",
        f"- Gates: {_gates_summary(report)}",
    ]
    if any(run.interrupted for run in report.runs):
        lines += [
            "",
            "**Interrupted (Ctrl-C): the numbers below are what was measured until then.**",
        ]
    if not report.runs:
        lines += ["", "No run was measured."]
    for number, run in enumerate(report.runs, 1):
        lines += ["", *_run(run, number, len(report.runs))]
    if len(report.runs) > 1:
        lines += ["", *_sweep_deltas(report.runs)]
    lines += ["", "## Plots", "", f"![TTFT distribution]({TTFT_NAME})", ""]
    lines += [f"![Tokens/s against concurrency]({THROUGHPUT_NAME})", ""]
    return "\n".join(lines)


def _gates_summary(report: Report) -> str:
    if not any(run.gates for run in report.runs):
        return "none evaluated"
    if not report.tripped:
        return "all passed"
    names = [
        g.name + (f" ({sweep_label(run.sweep)})" if run.sweep else "")
        for run in report.runs
        for g in run.gates
        if g.tripped
    ]
    return "**TRIPPED**: " + ", ".join(names)


def _run(run: Run, number: int, runs: int) -> list[str]:
    title = "## Run" + (f" {number} of {runs}" if runs > 1 else "")
    title += f": {sweep_label(run.sweep)}" if run.sweep else ""
    lines = [title, ""]
    lines.append(
        f"Started {_when(run.started_at)}, ran {run.duration_s:.1f} s"
        + (", interrupted by Ctrl-C." if run.interrupted else ".")
    )
    cells = sorted(run.cells, key=lambda c: (c.prompt_tokens, c.concurrency))
    lines += ["", "### Latency", ""]
    lines += _table(
        ["Concurrency", "Prompt tokens", "Requests", "Failed", "TTFT p50 (ms)", "TTFT p95 (ms)",
         "TTFT p99 (ms)", "First byte p50 (ms)", "First byte p95 (ms)", "First byte p99 (ms)",
         "TTFT p95/p50"],
        [[str(c.concurrency), str(c.prompt_tokens), str(c.requests), str(c.failed),
          *_quantiles(c.ttft_s, _ms, 3), *_quantiles(c.first_byte_s, _ms, 3),
          _ratio(c.tail_ratio)] for c in cells],
    )  # fmt: skip
    lines += ["", "### Throughput", ""]
    lines += _table(
        ["Concurrency", "Prompt tokens", "Max tokens", "Duration (s)", "Prefill tok/s p50",
         "Prefill tok/s p95", "Decode tok/s per slot p50", "Decode tok/s per slot p95",
         "Aggregate tok/s", "Completion tokens", "Ran to max tokens", "Prompt length missed"],
        [[str(c.concurrency), str(c.prompt_tokens), str(c.max_tokens), f"{c.duration_s:.1f}",
          *_quantiles(c.prefill_tokens_per_s, _rate, 2),
          *_quantiles(c.decode_tokens_per_s, _rate, 2), _rate(c.aggregate_tokens_per_s),
          str(c.completion_tokens), str(c.ran_to_max_tokens), str(c.prompt_tokens_missed)]
         for c in cells],
    )  # fmt: skip
    miscounted = sum(
        s.tokens_counted is not None and s.tokens_counted != s.completion_tokens
        for s in run.samples
        if s.ok
    )
    if miscounted:
        lines += ["", f"{miscounted} requests' usage.completion_tokens differ from the tokens"
                  " counted on the stream."]  # fmt: skip
    errors = Counter(s.error for s in run.samples if s.error is not None)
    if errors:
        lines += ["", "### Failed requests", ""]
        lines += _table(["Requests", "Error"], [[str(n), e] for e, n in errors.most_common()])
    lines += ["", "### Numeric trio", "", *_trio(run)]
    lines += ["", "### Gates", ""]
    if run.gates:
        lines += _table(
            ["Gate", "Limit", "Value", "Result", "Detail"],
            [[g.name, _num(g.limit), NONE if g.value is None else _num(g.value),
              "TRIPPED" if g.tripped else ("pass" if g.value is not None else "not measured"),
              g.detail] for g in run.gates],
        )  # fmt: skip
    else:
        lines.append("None evaluated.")
    lines += ["", "### Snapshot", "", *_snapshot(run)]
    return lines


def _trio(run: Run) -> list[str]:
    snap, res = run.snapshot, run.resources
    lines = [
        "- Batch window: "
        + (NONE if snap.batch_window_ms is None else f"{snap.batch_window_ms} ms"),
        f"- Concurrent slots per engine: {_opt(snap.max_concurrency)}"
        f" (max batch size {_opt(snap.max_batch_size)})",
    ]
    if res is None:
        return [*lines, "- RSS peak: not measured", "- Swap: not measured"]
    return [
        *lines,
        f"- RSS peak: {_size(res.rss_peak_bytes)} = {res.rss_peak_percent:.1f} % of"
        f" {_size(snap.ram_bytes)} RAM ({res.source}, {res.samples} samples)",
        f"- Swap peak: {_size(res.swap_peak_bytes)}; longest stretch over the swap gate's"
        f" limit: {res.swap_over_limit_s:.1f} s",
    ]


def _snapshot(run: Run) -> list[str]:
    s = run.snapshot
    knobs = ", ".join(f"{k}={v}" for k, v in sorted(s.knobs.items())) or "none reported"
    lines = [
        f"- Taken: {_when(s.taken_at)}",
        f"- Client: {s.client_host}, {s.client_os}, {s.client_chip}, {_size(s.client_ram_bytes)}"
        " RAM",
        f"- Server ({'the fleet' if s.fleet else 'this machine'}): chips {_list(s.chips)};"
        f" OS {_list(s.oses)}; RAM {_size(s.ram_bytes)}",
        f"- mlx {_list(s.mlx_versions)}, mlx-lm {_list(s.mlx_lm_versions)}",
        f"- Engine knobs: {knobs}",
        "",
        "Top memory consumers at the start:",
        "",
    ]
    if not s.top_processes:
        return [*lines, "None reported."]
    return lines + _table(
        ["PID", "Process", "RSS"],
        [[str(p.pid), p.name, _size(p.rss_bytes)] for p in s.top_processes],
    )


def _sweep_deltas(runs: list[Run]) -> list[str]:
    base = runs[0]
    lines = [f"## Sweep deltas against {sweep_label(base.sweep) or 'the first run'}", ""]
    rows = []
    base_cells = {(c.concurrency, c.prompt_tokens): c for c in base.cells}
    for run in runs[1:]:
        for c in sorted(run.cells, key=lambda c: (c.prompt_tokens, c.concurrency)):
            b = base_cells.get((c.concurrency, c.prompt_tokens))
            rows.append(
                [
                    sweep_label(run.sweep),
                    str(c.concurrency),
                    str(c.prompt_tokens),
                    *_deltas(b, c),
                ]
            )
    lines += _table(
        ["Sweep", "Concurrency", "Prompt tokens", "TTFT p50 (ms)", "TTFT p95 (ms)",
         "TTFT p95/p50", "Decode tok/s per slot p50", "Aggregate tok/s"],
        rows,
    )  # fmt: skip
    lines += ["", "RSS peak and gates per run:", ""]
    lines += _table(
        ["Sweep", "RSS peak (% of RAM)", "Gates tripped"],
        [[sweep_label(r.sweep) or NONE,
          NONE if r.resources is None else f"{r.resources.rss_peak_percent:.1f} %",
          ", ".join(g.name for g in r.gates if g.tripped) or "none"] for r in runs],
    )  # fmt: skip
    return lines


def _deltas(base: Cell | None, cell: Cell) -> list[str]:
    """Each headline value with its change against the same cell of the first run."""
    formats = (_ms, _ms, _ratio, _rate, _rate)
    old = _headline(base) if base is not None else [None] * len(formats)
    out = []
    for fmt, before, after in zip(formats, old, _headline(cell), strict=True):
        change = (
            f" ({(after - before) / before * 100:+.1f} %)" if after is not None and before else ""
        )
        out.append(fmt(after) + change)
    return out


def _headline(c: Cell) -> list[float | None]:
    """TTFT p50 and p95, their ratio, decode tokens/s per slot p50, aggregate tokens/s."""
    return [
        c.ttft_s.p50 if c.ttft_s else None,
        c.ttft_s.p95 if c.ttft_s else None,
        c.tail_ratio,
        c.decode_tokens_per_s.p50 if c.decode_tokens_per_s else None,
        c.aggregate_tokens_per_s,
    ]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *(line(r) for r in rows)]


def _quantiles(q: Quantiles | None, fmt: Callable[[float | None], str], count: int) -> list[str]:
    """p50, p95 (and p99 for count=3), each formatted."""
    if q is None:
        return [NONE] * count
    return [fmt(v) for v in (q.p50, q.p95, q.p99)[:count]]


def _ms(seconds: float | None) -> str:
    return NONE if seconds is None else f"{seconds * 1000:.1f}"


def _rate(per_s: float | None) -> str:
    return NONE if per_s is None else f"{per_s:.1f}"


def _ratio(ratio: float | None) -> str:
    return NONE if ratio is None else f"{ratio:.2f}"


def _num(value: float) -> str:
    """A gate's limit or value: at most two decimals, no trailing zeros."""
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _size(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / MIB:.0f} MiB"


def _opt(value: int | None) -> str:
    return NONE if value is None else str(value)


def _list(values: list[str]) -> str:
    return ", ".join(sorted(set(values))) or NONE


def _when(unix_s: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(unix_s))
