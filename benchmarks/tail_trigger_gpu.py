"""The tail trigger's measure on a GPU shared by interactive and batch engines, as a Mac's GPU is:
quiet under mixed prompt lengths; does batch work on the same GPU fire it?

benchmarks/tail_trigger.py runs the whole fleet on the CPU box. This starts three engines of one
random-weight 4-bit shape (benchmarks/accelerator.py) on one GPU, `python -m node_agent.engine`
with `--tier interactive` (one) and `--tier batch` (two), and runs three phases of `--phase-s`:

- quiet: two loops stream interactive chats, alternating a ~300- and a ~3,000-token prompt, each
  unique from its first token (no prefix-cache hit), a person's pause between requests;
- 1 batch engine: the same, while `--batch-loops` loops send ~8,000-token chats to one batch
  engine;
- 2 batch engines: the same loops, spread over both batch engines.

Every interactive TTFT is recorded with the tokens its engine prefilled (prompt less cached).
The verdicts: the samples replayed, in order and at their own times, into the coordinator's
real `Triggers` (coordinator/triggers.py, default thresholds) as the gateway feeds it (the
engine's first WARM_UP_STREAMS streams left out, as coordinator/gateway/forward.py does):
the quiet phase alone, then the quiet phase followed directly by each busy phase.

    PYTHONUNBUFFERED=1 python3 -m benchmarks.tail_trigger_gpu --shape 1.5b --work /tmp/tail \
        --out $OUT

Writes OUT/tail_trigger_gpu.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks import accelerator as acc
from benchmarks import harness
from benchmarks.fleet import MODEL, start_engine

SHORT_TOKENS, LONG_TOKENS, BATCH_TOKENS = 300, 3000, 8000
QUESTION = "Summarize the rules above in one sentence."
BATCH_MAX_TOKENS = 128
INTERACTIVE_PAUSE_S = 0.2
NODE = "gpu"
WARM_UP_STREAMS = 8  # coordinator/gateway/forward.py's (that module needs grpc, absent there)
PHASES = ("quiet", "1 batch engine", "2 batch engines")


@dataclass
class Run:
    """Samples and counts, shared by the loops."""

    sizes: dict[str, int]  # prompt tokens: short, long, batch
    phase: str = PHASES[0]
    t0: float = field(default_factory=time.monotonic)
    samples: list[dict[str, Any]] = field(default_factory=list)
    batch_done: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    def observe(self, kind: str, s: acc.Stream) -> None:
        with self.lock:
            self.samples.append(
                {"phase": self.phase, "kind": kind, "at_s": time.monotonic() - self.t0,
                 "ttft_s": s.ttft_s, "prefilled": s.prompt_tokens - s.cached_tokens}
            )  # fmt: skip


def interactive_loop(run: Run, server: acc.Server, prompts: acc.Prompts, loop: int) -> None:
    n = 0
    with httpx.Client(timeout=acc.REQUEST_TIMEOUT_S) as client:
        while not run.stop.is_set():
            n += 1
            kind = "long" if n % 2 else "short"
            system = prompts.system(100_000 * loop + n, run.sizes[kind])
            try:
                s = acc.stream_chat(client, server, system, QUESTION, acc.TTFT_MAX_TOKENS)
            except (httpx.HTTPError, RuntimeError) as exc:
                run.errors.append(f"interactive: {exc}")
                continue
            run.observe(kind, s)
            time.sleep(INTERACTIVE_PAUSE_S)


def batch_loop(
    run: Run, servers: list[acc.Server], prompts: acc.Prompts, loop: int, until: threading.Event
) -> None:
    n = 0
    with httpx.Client(timeout=acc.REQUEST_TIMEOUT_S) as client:
        while not until.is_set():
            n += 1
            server = servers[(loop + n) % len(servers)]
            system = prompts.system(900_000 + 10_000 * loop + n, run.sizes["batch"])
            try:
                acc.stream_chat(client, server, system, QUESTION, BATCH_MAX_TOKENS)
            except (httpx.HTTPError, RuntimeError) as exc:
                run.errors.append(f"batch: {exc}")
                continue
            with run.lock:
                run.batch_done[run.phase] = run.batch_done.get(run.phase, 0) + 1


def summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"requests": len(samples)}
    for kind in ("short", "long"):
        rows = [s for s in samples if s["kind"] == kind]
        if rows:
            ttft = [s["ttft_s"] for s in rows]
            out[kind] = {
                "n": len(rows),
                "prefilled_median": harness.percentile([s["prefilled"] for s in rows], 50),
                "p50_s": harness.percentile(ttft, 50),
                "p95_s": harness.percentile(ttft, 95),
            }
    return out


def replay(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trigger's changes over these samples, fed in order at their own times."""
    from coordinator.triggers import Triggers

    triggers = Triggers()
    changes = []
    for s in samples:
        for change in triggers.observe_ttft(NODE, s["at_s"], s["ttft_s"], s["prefilled"]):
            changes.append({"at_s": s["at_s"], "fired": change.fired, "reading": change.reading})
    return changes


def verdicts(samples: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Quiet alone, and quiet followed directly by each busy phase (its times shifted back)."""
    counted = samples[WARM_UP_STREAMS:]  # one interactive engine: its first streams left out
    quiet = [s for s in counted if s["phase"] == PHASES[0]]
    out = {PHASES[0]: replay(quiet)}
    end = quiet[-1]["at_s"] if quiet else 0.0
    for phase in PHASES[1:]:
        busy = [s for s in counted if s["phase"] == phase]
        if not busy:
            continue
        shift = busy[0]["at_s"] - end - INTERACTIVE_PAUSE_S
        moved = [{**s, "at_s": s["at_s"] - shift} for s in busy]
        out[phase] = [c for c in replay(quiet + moved) if c["at_s"] > end]
    return out


def start(path: Path, work: Path, tier: str, name: str) -> Any:
    context = ["--context-length", str(acc.CONTEXT)]
    return start_engine(path, work / "logs" / f"{name}.log", "--tier", tier, *context)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    path = acc.build_model(args.shape, args.work / "models" / args.shape)
    prompts = acc.Prompts(path)
    (args.work / "logs").mkdir(parents=True, exist_ok=True)
    engines = [
        start(path, args.work, "interactive", "interactive"),
        start(path, args.work, "batch", "batch-a"),
        start(path, args.work, "batch", "batch-b"),
    ]
    with harness.stopping([e.proc for e in engines]):
        servers = []
        for engine in engines:
            engine.listening()
            harness.wait_for(engine.healthy, acc.MODEL_LOAD_TIMEOUT_S, "an engine", 0.5)
            servers.append(acc.Server("e", engine.url, engine.secret, MODEL, {"ignore_eos": True}))
        run = Run({"short": args.short, "long": args.long, "batch": args.batch})
        loops = [
            threading.Thread(target=interactive_loop, args=(run, servers[0], prompts, i))
            for i in range(2)
        ]
        for t in loops:
            t.start()
        time.sleep(args.phase_s)
        batch: list[threading.Thread] = []
        for phase, batch_servers in zip(PHASES[1:], (servers[1:2], servers[1:3]), strict=True):
            for t in batch:
                t.join(acc.REQUEST_TIMEOUT_S)
            run.phase = phase
            acc.log(f"{phase}: {len(run.samples)} samples so far")
            done = threading.Event()
            batch = [
                threading.Thread(target=batch_loop, args=(run, batch_servers, prompts, i, done))
                for i in range(args.batch_loops)
            ]
            for t in batch:
                t.start()
            time.sleep(args.phase_s)
            done.set()
        run.stop.set()
        for t in loops + batch:
            t.join(acc.REQUEST_TIMEOUT_S)
    return {
        "shape": args.shape,
        "sizes": run.sizes,
        "phases": {p: summary([s for s in run.samples if s["phase"] == p]) for p in PHASES},
        "verdicts": verdicts(run.samples),
        "batch_requests": run.batch_done,
        "errors": run.errors[:5],
        "samples": run.samples,
    }


def table(res: dict[str, Any]) -> str:
    lines = [
        "| phase | short: n, tokens, p50 / p95 (ms) | long: n, tokens, p50 / p95 (ms) "
        "| batch requests | tail trigger (after the quiet phase) |",
        "|---|---|---|---:|---|",
    ]
    for phase in PHASES:
        p = res["phases"][phase]
        cells = [
            f"{p[k]['n']}, {p[k]['prefilled_median']:.0f}, "
            f"{1000 * p[k]['p50_s']:.0f} / {1000 * p[k]['p95_s']:.0f}"
            if k in p
            else "none"
            for k in ("short", "long")
        ]
        fired = [c for c in res["verdicts"].get(phase, []) if c["fired"]]
        verdict = f"**fired**: {fired[0]['reading']}" if fired else "quiet"
        done = res["batch_requests"].get(phase, 0)
        lines.append(f"| {phase} | {cells[0]} | {cells[1]} | {done} | {verdict} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="1.5b", choices=sorted(acc.SHAPES))
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--phase-s", type=float, default=60.0)
    p.add_argument("--batch-loops", type=int, default=4)
    p.add_argument("--short", type=int, default=SHORT_TOKENS, help="short prompt tokens")
    p.add_argument("--long", type=int, default=LONG_TOKENS, help="long prompt tokens")
    p.add_argument("--batch", type=int, default=BATCH_TOKENS, help="batch prompt tokens")
    args = p.parse_args()
    acc.import_paths()
    args.out.mkdir(parents=True, exist_ok=True)
    res = {"machine": acc.machine(), "started": time.time(), **measure(args)}
    (args.out / "tail_trigger_gpu.json").write_text(json.dumps(res, indent=2) + "\n")
    print(table(res), flush=True)
    return 0


if __name__ == "__main__":
    harness.run_script(main)
