"""`mlxfleet bench` on this machine: the demo fleet against mlx_lm.server, same workload.

Starts on 127.0.0.1, with the offline demo model, first our fleet (the real coordinator, one
agent; fleet.toml: the demo model in both tiers) and runs the real CLI against it as a
subprocess: a batch-tier `--sweep batch-window=20,80`, then the interactive workload. Stops the
fleet, starts `mlx_lm.server` on the same model, runs the same interactive workload against it
and stops it: the two are never busy at once. Then `bench compare fleet mlx_lm`. The reports
stay in a temporary folder; the section summarises them.

Every process it starts is stopped at the end, also on error or Ctrl-C.

    python -m benchmarks.bench_command [--duration 20] [--write-docs]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from benchmarks import harness
from benchmarks.fleet import MLX_LM_MODEL, MODEL, Fleet, MlxLm, demo_model, model_toml, start_mlx_lm
from coordinator.bench.results import Cell, Quantiles, Report, Run, from_json

SECTION = "## mlxfleet bench: the demo fleet against mlx_lm.server (issue 7)"
CONTEXT_LENGTH = 2048  # the longest prompt (1024) + max_tokens, with room to spare
CONCURRENCY = "1,4"
PROMPT_TOKENS = "128,1024"
MAX_TOKENS = 64
SWEEP = "batch-window=20,80"
SWEEP_CONCURRENCY = "4,12"  # 12 = the batch tier's slots; at 4 a new arrival waits the window
SWEEP_PROMPT_TOKENS = "64"
SWEEP_MAX_TOKENS = 32
BENCH_TIMEOUT_S = 400.0
NONE = "—"
DOCS_WIDTH = 100


# Processes


@contextlib.contextmanager
def running_fleet(workdir: Path, model: Path) -> Iterator[Fleet]:
    """Coordinator + one agent, the demo model pinned in both tiers."""
    tiers = ["interactive", "batch"]
    config = model_toml(model, tiers=tiers, pinned=True, context_length=CONTEXT_LENGTH)
    with Fleet(workdir, config) as fleet:
        fleet.start_agent("agent")
        ready = harness.READY_TIMEOUT_S
        harness.wait_for(lambda: fleet.routable(*tiers), ready, "demo in both tiers", 0.5)
        yield fleet


@contextlib.contextmanager
def running_mlx_lm(workdir: Path, model: Path) -> Iterator[MlxLm]:
    """mlx_lm.server on the demo model, once it answers a real completion."""
    server = start_mlx_lm(model, workdir / "mlx_lm_server.log")
    with harness.stopping([server.proc]):
        harness.wait_for(server.answers, harness.READY_TIMEOUT_S, "mlx_lm.server to answer", 0.5)
        yield server


# The CLI


@dataclass
class Invocation:
    """One `mlxfleet bench` subprocess: how it was called (for the docs) and how it ended."""

    shown: str  # the command with placeholders for ports, key and folders
    rc: int
    stdout: str
    seconds: float


def bench(args: list[str], shown: list[str], log: Path) -> Invocation:
    """Run `python -m coordinator.cli bench ARGS`; exit 0 or 1 (a gate tripped) is a result."""
    started = time.monotonic()
    done = harness.cli_run("bench", *args, timeout_s=BENCH_TIMEOUT_S)
    log.write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    if done.returncode not in (0, 1):
        raise RuntimeError(
            f"bench {' '.join(shown)}: exit {done.returncode}\n{done.stderr[-3000:]}"
        )
    seconds = time.monotonic() - started
    command = "python -m coordinator.cli bench " + " ".join(shown)
    return Invocation(command, done.returncode, done.stdout, seconds)


def workload(duration: float) -> list[str]:
    return [
        "--workload", "interactive", "--concurrency", CONCURRENCY,
        "--prompt-tokens", PROMPT_TOKENS, "--max-tokens", str(MAX_TOKENS),
        "--duration", f"{duration:g}",
    ]  # fmt: skip


def sweep_workload(duration: float) -> list[str]:
    return [
        "--workload", "batch", "--concurrency", SWEEP_CONCURRENCY,
        "--prompt-tokens", SWEEP_PROMPT_TOKENS, "--max-tokens", str(SWEEP_MAX_TOKENS),
        "--duration", f"{duration:g}", "--sweep", SWEEP,
    ]  # fmt: skip


@dataclass
class Results:
    fleet: Report
    theirs: Report
    sweep: Report
    runs: dict[str, Invocation]  # fleet, mlx_lm, sweep, compare
    compare: Invocation
    events: list[dict]  # the coordinator's events during the fleet part
    seconds: dict[str, float]  # phase -> wall time


def measure(workdir: Path, args: argparse.Namespace) -> Results:
    model = demo_model(workdir)
    out = workdir / "out"
    runs: dict[str, Invocation] = {}
    seconds: dict[str, float] = {}
    started = time.monotonic()
    with running_fleet(workdir / "fleet", model) as fleet:
        seconds["fleet start"] = time.monotonic() - started
        ours = ["--endpoint", f"{fleet.base}/v1", "--model", MODEL, "--key", fleet.key]
        ours_shown = ["--endpoint", "http://127.0.0.1:<gateway>/v1", "--model", MODEL]
        ours_shown += ["--key", "<key>"]
        # The sweep first: the coordinator's tail trigger (interactive p95/p50 > 2.8) moves the
        # batch tier, which the interactive run could fire.
        print("fleet: batch sweep ...", file=sys.stderr)
        sweep = sweep_workload(args.sweep_duration)
        runs["sweep"] = bench(
            [*ours, *sweep, "--home", str(fleet.home), "--out", str(out / "sweep")],
            [*ours_shown, *sweep, "--home", "<coordinator home>", "--out", "<tmp>/sweep"],
            workdir / "bench-sweep.log",
        )
        print("fleet: interactive ...", file=sys.stderr)
        runs["fleet"] = bench(
            [*ours, *workload(args.duration), "--out", str(out / "fleet")],
            [*ours_shown, *workload(args.duration), "--out", "<tmp>/fleet"],
            workdir / "bench-fleet.log",
        )
        events = json.loads(
            harness.cli_out("events", "--json", "--limit", "200", "--home", str(fleet.home))
        )
    seconds["fleet"] = time.monotonic() - started
    print("mlx_lm.server: interactive ...", file=sys.stderr)
    started = time.monotonic()
    with running_mlx_lm(workdir, model) as server:
        seconds["mlx_lm.server start"] = time.monotonic() - started
        theirs = ["--endpoint", f"{server.url}/v1", "--model", MLX_LM_MODEL]
        theirs += workload(args.duration)
        shown = ["--endpoint", "http://127.0.0.1:<port>/v1", "--model", MLX_LM_MODEL]
        shown += [*workload(args.duration), "--server-pid", "<its pid>", "--out", "<tmp>/mlx_lm"]
        pid = ["--server-pid", str(server.proc.popen.pid)]
        runs["mlx_lm"] = bench(
            [*theirs, *pid, "--out", str(out / "mlx_lm")], shown, workdir / "bench-mlx_lm.log"
        )
    seconds["mlx_lm.server"] = time.monotonic() - started
    compared = harness.cli_run(
        "bench", "compare", str(out / "fleet/report.json"), str(out / "mlx_lm/report.json")
    )
    if compared.returncode not in (0, 1):
        raise RuntimeError(f"bench compare: exit {compared.returncode}: {compared.stderr}")
    compare = Invocation(
        "python -m coordinator.cli bench compare <tmp>/fleet/report.json <tmp>/mlx_lm/report.json",
        compared.returncode,
        compared.stdout,
        0.0,
    )

    def report(name: str) -> Report:
        return from_json((out / name / "report.json").read_text())

    return Results(
        report("fleet"), report("mlx_lm"), report("sweep"), runs, compare, events, seconds
    )


# Report


def _ms(q: Quantiles | None, which: str) -> str:
    return NONE if q is None else f"{getattr(q, which) * 1000:.1f}"


def _rate(q: Quantiles | None, which: str) -> str:
    return NONE if q is None else f"{getattr(q, which):.0f}"


def cells_table(run: Run) -> list[str]:
    rows = [
        "| concurrency | prompt tokens | requests (failed) | TTFT p50 / p95 / p99 (ms) "
        "| TTFT p95/p50 | first byte p50 (ms) | prefill tok/s p50 | decode tok/s per slot "
        "p50 / p95 | aggregate tok/s | ran to max_tokens |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in sorted(run.cells, key=lambda c: (c.prompt_tokens, c.concurrency)):
        ratio = NONE if c.tail_ratio is None else f"{c.tail_ratio:.2f}"
        rows.append(
            f"| {c.concurrency} | {c.prompt_tokens} | {c.requests} ({c.failed}) "
            f"| {_ms(c.ttft_s, 'p50')} / {_ms(c.ttft_s, 'p95')} / {_ms(c.ttft_s, 'p99')} "
            f"| {ratio} | {_ms(c.first_byte_s, 'p50')} | {_rate(c.prefill_tokens_per_s, 'p50')} "
            f"| {_rate(c.decode_tokens_per_s, 'p50')} / {_rate(c.decode_tokens_per_s, 'p95')} "
            f"| {c.aggregate_tokens_per_s:.0f} | {c.ran_to_max_tokens} of {c.requests - c.failed} |"
        )
    return rows


def _pct(before: float | None, after: float | None) -> str:
    if before is None or after is None or before == 0:
        return NONE
    return f"{(after - before) / before * 100:+.1f} %"


def sweep_table(report: Report) -> list[str]:
    base, *others = report.runs
    rows = [
        "| batch window | concurrency | requests | TTFT p50 / p95 (ms) | TTFT p95/p50 "
        "| decode tok/s per slot p50 | aggregate tok/s | ran to max_tokens |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in report.runs:
        for c in sorted(run.cells, key=lambda c: c.concurrency):
            ratio = NONE if c.tail_ratio is None else f"{c.tail_ratio:.2f}"
            rows.append(
                f"| {run.snapshot.batch_window_ms} ms | {c.concurrency} | {c.requests} "
                f"| {_ms(c.ttft_s, 'p50')} / {_ms(c.ttft_s, 'p95')} | {ratio} "
                f"| {_rate(c.decode_tokens_per_s, 'p50')} | {c.aggregate_tokens_per_s:.0f} "
                f"| {c.ran_to_max_tokens} of {c.requests - c.failed} |"
            )
    first = {c.concurrency: c for c in base.cells}
    for run in others:
        for c in sorted(run.cells, key=lambda c: c.concurrency):
            b = first.get(c.concurrency)
            if b is None:
                continue
            rows.append(
                f"| **Δ {_label(run)} vs {_label(base)}** | {c.concurrency} | "
                f"| {_delta_ms(b.ttft_s, c.ttft_s, 'p50')} "
                f"/ {_delta_ms(b.ttft_s, c.ttft_s, 'p95')} "
                f"| {_pct(b.tail_ratio, c.tail_ratio)} "
                f"| {_pct(_p50(b.decode_tokens_per_s), _p50(c.decode_tokens_per_s))} "
                f"| {_pct(b.aggregate_tokens_per_s, c.aggregate_tokens_per_s)} | |"
            )
    return rows


def _q(q: Quantiles | None, which: str) -> float:
    return float("nan") if q is None else float(getattr(q, which))


def _times(n: int) -> str:
    return {1: "once", 2: "twice"}.get(n, f"{n} times")


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _label(run: Run) -> str:
    return ", ".join(f"{v} ms" for v in run.sweep.values())


def _p50(q: Quantiles | None) -> float | None:
    return None if q is None else q.p50


def _delta_ms(a: Quantiles | None, b: Quantiles | None, which: str) -> str:
    if a is None or b is None:
        return NONE
    before, after = getattr(a, which), getattr(b, which)
    return f"{(after - before) * 1000:+.1f} ({_pct(before, after)})"


def trio(run: Run) -> str:
    s, r = run.snapshot, run.resources
    rss = NONE if r is None else f"{r.rss_peak_bytes / 2**20:.0f} MiB = {r.rss_peak_percent:.1f} %"
    window = NONE if s.batch_window_ms is None else f"{s.batch_window_ms} ms"
    source = "" if r is None else f" ({r.source}, {r.samples} samples)"
    return (
        f"batch window {window}, {s.max_concurrency or NONE} slots per engine (max batch size "
        f"{s.max_batch_size or NONE}), RSS peak {rss} of RAM{source}"
    )


def gates(run: Run) -> str:
    return "; ".join(
        f"{g.name} {'**TRIPPED**' if g.tripped else 'pass'}"
        + (f" ({g.value:.2f} vs limit {g.limit:g})" if g.value is not None else " (not measured)")
        for g in run.gates
    )


def ran_to_max(report: Report) -> tuple[int, int]:
    cells = [c for run in report.runs for c in run.cells]
    return sum(c.ran_to_max_tokens for c in cells), sum(c.requests - c.failed for c in cells)


def _cell(report: Report, concurrency: int, prompt: int) -> Cell | None:
    for c in report.runs[0].cells:
        if (c.concurrency, c.prompt_tokens) == (concurrency, prompt):
            return c
    return None


def reading(res: Results) -> str:
    """Two or three sentences, each worded by what the numbers show."""
    pairs = []
    for c in sorted(res.fleet.runs[0].cells, key=lambda c: (c.prompt_tokens, c.concurrency)):
        t = _cell(res.theirs, c.concurrency, c.prompt_tokens)
        if t is not None and c.ttft_s is not None and t.ttft_s is not None:
            pairs.append((c, t))
    if not pairs:
        return "No cell was measured on both sides."

    def span(values: list[float]) -> str:
        lo, hi = min(values), max(values)
        return f"{lo:.2f}×" if hi - lo < 0.005 else f"{lo:.2f}–{hi:.2f}×"

    def p50_ratio(c: Cell, t: Cell) -> float:
        assert c.ttft_s is not None and t.ttft_s is not None
        return c.ttft_s.p50 / t.ttft_s.p50

    text = []
    single = [(c, t) for c, t in pairs if c.concurrency == 1]
    if single:
        text.append(
            f"With one request in flight our TTFT p50 is {span([p50_ratio(*p) for p in single])} "
            "mlx_lm.server's: nothing else decodes, so what differs is the path (client → "
            "gateway → engine for us, client → server for them) and the prefill, which the "
            "two do with the same mlx-lm code."
        )
    multi = [(c, t) for c, t in pairs if c.concurrency > 1]
    if multi:
        per_prompt = "; ".join(
            f"at {c.prompt_tokens} prompt tokens p50 {p50_ratio(c, t):.2f}×, p95 "
            f"{_q(c.ttft_s, 'p95') / _q(t.ttft_s, 'p95'):.2f}× (p95/p50 ours "
            f"{c.tail_ratio or 0:.2f}, theirs {t.tail_ratio or 0:.2f})"
            for c, t in multi
        )
        sentence = f"With {multi[0][0].concurrency} in flight, our TTFT over theirs: {per_prompt}"
        longer = [c for c, t in multi if _q(t.ttft_s, "p95") > 1.2 * _q(c.ttft_s, "p95")]
        if longer:
            sentence += (
                ": mlx_lm.server takes new requests only between its 0.5 s decode slices "
                "(DESIGN.md; `TimeBudget` in mlx_lm/server.py), so a closed loop's next "
                "request, sent while the others decode, waits for the slice to end, up to "
                "0.5 s, where our interactive engine admits it at its next step (window 0)"
            )
            faster = [c for c, t in multi if p50_ratio(c, t) > 1.05]
            if faster:
                sentence += (
                    f"; theirs wins the p50 at {_and([str(c.prompt_tokens) for c in faster])} "
                    "prompt tokens: an arrival that lands between two slices waits for "
                    "nothing, and ours also crosses the gateway on the same cores"
                )
        else:
            sentence += (
                ": mlx_lm.server's 0.5 s decode slices (DESIGN.md), between which alone it "
                "takes new requests, did not lengthen its p95 beyond ours here"
            )
        text.append(sentence + ".")
    early = all(
        c.first_byte_s is not None
        and t.first_byte_s is not None
        and c.ttft_s is not None
        and t.ttft_s is not None
        and c.first_byte_s.p50 < 0.5 * c.ttft_s.p50
        and t.first_byte_s.p50 > 0.8 * t.ttft_s.p50
        for c, t in pairs
    )
    aggregate = span([c.aggregate_tokens_per_s / t.aggregate_tokens_per_s for c, t in pairs])
    text.append(
        (
            "Our first byte comes well before the first token (the engine sends the empty role "
            "chunk at once, the gateway relays it), theirs with it, so first byte is no TTFT "
            "proxy across servers; "
            if early
            else ""
        )
        + f"aggregate tokens/s, ours / theirs, is {aggregate} across the cells, with the "
        "client and, for us, the coordinator and agent on the same 2 cores."
    )
    text[-1] = text[-1][0].upper() + text[-1][1:]
    return " ".join(text)


def report(res: Results, args: argparse.Namespace, command: str, when: str, total_s: float) -> str:
    fleet_run, their_run = res.fleet.runs[0], res.theirs.runs[0]
    ours_max, ours_n = ran_to_max(res.fleet)
    their_max, their_n = ran_to_max(res.theirs)
    sweep_max, sweep_n = ran_to_max(res.sweep)
    counted = [s for s in fleet_run.samples if s.ok and s.tokens_counted is not None]
    miscounted = sum(s.tokens_counted != s.completion_tokens for s in counted)
    verdicts: dict[str, int] = {}
    for line in res.compare.stdout.splitlines():
        if line.startswith("| ") and not line.startswith("| Cell"):
            v = line.rstrip(" |").rsplit("|", 1)[-1].strip().strip("*")
            verdicts[v] = verdicts.get(v, 0) + 1
    verdict_counts = ", ".join(f"{n} {v}" for v, n in sorted(verdicts.items()))
    compare_text = "\n".join(
        line
        for line in res.compare.stdout.strip().splitlines()
        if not line.startswith(("A:", "B:"))
    ).strip()
    triggers = [e for e in reversed(res.events) if e["kind"].startswith("trigger")]
    events = "\n".join(f"- {e['kind']}: {e['detail']}" for e in triggers) or "- none"
    tail_fired = sum(e["kind"] == "trigger_fired" and "tail" in e["detail"] for e in triggers)
    tail_note = (
        f". The tail trigger fired {_times(tail_fired)} during the fleet's interactive run: it "
        "takes p95/p50 over every interactive request the node answered in its 300 s window, "
        "so the bench's calibration probes and its cells of 128 and 1024 prompt tokens, one "
        "and four in flight, all land in one distribution; its action, move_batch, is why the "
        "sweep runs first."
        if tail_fired
        else ":"
    )
    if their_max == their_n:
        eos = (
            "None of mlx_lm.server's requests stopped early all the same (the random-weight "
            "model rarely draws EOS), so both sides generated the same tokens per request."
        )
    else:
        eos = (
            f"{their_n - their_max} of mlx_lm.server's requests stopped at EOS before "
            "`max_tokens`: less work per request there, so compare tokens/s, not request "
            "counts."
        )
    commands = "\n".join(
        f"    {inv.shown}" for inv in (res.runs["sweep"], res.runs["fleet"], res.runs["mlx_lm"])
    )
    exits = ", ".join(
        f"{name} exit {res.runs[name].rc} ({res.runs[name].seconds:.0f} s)"
        for name in ("sweep", "fleet", "mlx_lm")
    )
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in res.seconds.items())
    sweep_runs = "; ".join(f"{_label(r)}: {trio(r)}; gates: {gates(r)}" for r in res.sweep.runs)
    reduced = (
        f" (`--duration {args.duration:g}` instead of 20 to fit the time)"
        if args.duration != 20
        else ""
    )
    return f"""{SECTION}

Measured {when} with `{command}` ({total_s / 60:.1f} min).

- Machine: {harness.machine()}
- Versions: {harness.versions("mlx", "mlx-lm", "aiohttp")}
- Model: the offline demo model (a tiny random-weight Qwen2, 2 layers, hidden 128, vocab 1536),
  so these are engine and scheduling numbers on **CPU MLX on a 2-core Linux box, not a Mac**.
- Ours: the real coordinator and one agent on 127.0.0.1, fleet.toml `tiers = ["interactive",
  "batch"]`, `pinned = true`, `context_length = {CONTEXT_LENGTH}`: two engines on the node
  (interactive tier: 4 slots, window 0; batch tier: 12 slots, window 80 ms). The batch engine
  is idle during the interactive run. Requests go client → gateway → engine.
- Theirs: `python -m mlx_lm.server --model <demo> --port <p>` with its defaults, started after
  the fleet was stopped: the two are never up, let alone busy, at once. Requests name
  `model: "{MLX_LM_MODEL}"`.
- Client: the real CLI as a subprocess, on the same cores as the servers; the same workload
  against both{reduced}. Every request is a greedy streaming chat whose prompt has exactly the
  wanted length through the endpoint's own tokenizer and chat template; c closed loops keep c
  requests in flight for the cell's duration.
- `ignore_eos`: `bench` sends it by default only to an mlxfleet gateway (our engines take it),
  not to mlx_lm.server, so every request to the fleet generates exactly `max_tokens` and one to
  mlx_lm.server stops at EOS when the model draws it. Ran to `max_tokens`: fleet **{ours_max} of
  {ours_n}** requests, mlx_lm.server **{their_max} of {their_n}**, the sweep {sweep_max} of
  {sweep_n}. {eos} Fleet requests whose usage differs from the token ids counted on the
  stream: {miscounted} of {len(counted)}.
- Phases: {phases}. Exit codes, where 1 means a gate tripped (compare: a change for the
  worse): {exits}; compare exit {res.compare.rc}.

Commands (`<tmp>` a temporary folder, removed afterwards):

{commands}
    {res.compare.shown}

**Our fleet** (interactive tier; {trio(fleet_run)}; gates: {gates(fleet_run)})

{chr(10).join(cells_table(fleet_run))}

**mlx_lm.server** ({trio(their_run)}; gates: {gates(their_run)})

{chr(10).join(cells_table(their_run))}

**`bench compare fleet mlx_lm`** (A = our fleet, B = mlx_lm.server: "worse" means mlx_lm.server
is worse than the fleet; {verdict_counts})

{compare_text}

**`--sweep {SWEEP}`** against the fleet's batch tier (`--concurrency {SWEEP_CONCURRENCY}
--prompt-tokens {SWEEP_PROMPT_TOKENS} --max-tokens {SWEEP_MAX_TOKENS} --duration
{args.sweep_duration:g}`, `ignore_eos` on; the batch tier has 12 slots, so at 4 in flight a
new arrival waits the window, at 12 it fills the free slot and is admitted at once)

{chr(10).join(sweep_table(res.sweep))}

Trio per sweep run (from its snapshot): {sweep_runs}.

Trigger events on the coordinator during the fleet part{tail_note}

{events}

Reading: {reading(res)}
"""


def wrap(markdown: str) -> str:
    """Re-wrap prose paragraphs and bullets to DOCS_WIDTH; tables, code and headings stay."""
    out = []
    for block in markdown.strip("\n").split("\n\n"):
        if block.startswith(("|", "    ", "#")):
            out.append(block)
            continue
        items: list[list[str]] = []
        for line in block.splitlines():
            if line.startswith("- ") or not items:
                items.append([line])
            else:
                items[-1].append(line.strip())
        out.append(
            "\n".join(
                textwrap.fill(
                    " ".join(item),
                    DOCS_WIDTH,
                    subsequent_indent="  " if item[0].startswith("- ") else "",
                    break_long_words=False,
                    break_on_hyphens=False,
                )
                for item in items
            )
        )
    return "\n\n".join(out) + "\n"


def main() -> int:
    parser = harness.parser(__doc__)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per cell")
    parser.add_argument("--sweep-duration", type=float, default=15.0, help="seconds per cell")
    args = parser.parse_args()
    if not 1 <= args.duration <= 120 or not 1 <= args.sweep_duration <= 120:
        parser.error("--duration and --sweep-duration must be in 1..120")
    command, when = harness.command_line(), harness.now_utc()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mlxfleet-bench-") as tmp:
        res = measure(Path(tmp), args)
    section = wrap(report(res, args, command, when, time.monotonic() - started))
    harness.publish(SECTION, section, args.write_docs)
    return 0


if __name__ == "__main__":
    harness.run_script(main)
