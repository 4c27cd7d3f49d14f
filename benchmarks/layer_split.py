"""mlxfleet's own layer split (node_agent/engine/layer_split.py) against mlx-lm's pipeline(), in
the same run, on the same weights: the demo model with 6 layers written as a Qwen2 (which mlx-lm's
pipeline() splits) and as a Llama (which it cannot: our split does). Their attention biases are
zero, so the two compute the same function.

Per model, two set-ups taken in turn, the order rotated each round: one engine of the whole
model, and a 2-rank group (split 3,3) whose ranks talk directly on 127.0.0.1; each measured as
benchmarks/groups.py measures (TTFT of a 500-token prompt; decode tok/s at 1 and 4 streams from
the difference of a short and a long request). What the split itself costs is the group's time
over its own one engine, Llama's against Qwen2's.

    python -m benchmarks.layer_split [--rounds 3] [--write-docs]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import harness
from benchmarks.groups import MEASURES, PLANS, STREAMS, TTFT_TOKENS, _med, _spread, measure, running

SECTION = "## Groups: mlxfleet's layer split against mlx-lm's pipeline() (issue 19)"
SETUPS = ("one engine", "group, direct")
MODELS = {"qwen2": "mlx-lm pipeline()", "llama": "mlxfleet layer split"}


def main() -> int:
    parser = harness.parser(__doc__ or "")
    parser.add_argument("--rounds", type=int, default=3, help="starts of each set-up per model")
    args = parser.parse_args()
    from node_agent.engine.demo_model import write_demo_model

    plan = PLANS["demo6"]
    started = harness.now_utc()
    results: dict[str, dict[str, dict[str, list[Any]]]] = {
        kind: {s: {k: [] for k in MEASURES} for s in SETUPS} for kind in MODELS
    }
    with tempfile.TemporaryDirectory(prefix="mlxfleet-split-") as tmp:
        work = Path(tmp)
        (work / "logs").mkdir()
        models = {
            kind: write_demo_model(work / "models" / kind, plan.layers, kind) for kind in MODELS
        }
        runs = [(kind, setup) for kind in MODELS for setup in SETUPS]
        for rnd in range(args.rounds):
            for k in range(len(runs)):
                kind, setup = runs[(rnd + k) % len(runs)]
                began = time.monotonic()
                tag = f"{kind}-{rnd}-{SETUPS.index(setup)}"
                with running(setup, plan, models[kind], work, work, tag) as s:
                    measure(s, plan, 1000 * rnd, results[kind][setup])
                print(f"round {rnd + 1} {kind} {setup}: {time.monotonic() - began:.0f} s")
    harness.publish(SECTION, report(results, args.rounds, started), args.write_docs)
    return 0


def report(results: dict[str, Any], rounds: int, started: str) -> str:
    rows = []
    for kind, split_by in MODELS.items():
        one = 1000 / _med([x["tok_s"] for x in results[kind]["one engine"]["b1"]])
        for setup in SETUPS:
            r = results[kind][setup]
            ms = 1000 / _med([x["tok_s"] for x in r["b1"]])
            added = "" if setup == "one engine" else f"{ms - one:+.2f}"
            rows.append(
                f"| {kind} ({split_by}) | {setup} | {_spread(r['ttft_s'], 1000)} "
                f"| {_spread([x['tok_s'] for x in r['b1']])} | {ms:.2f} | {added} "
                f"| {_spread([x['tok_s'] for x in r['b4']])} |"
            )
    return f"""{SECTION}

Measured {started} with `{harness.command_line()}`.

- Machine: {harness.machine()}
- Versions: {harness.versions("mlx", "mlx-lm")}

The demo model with 6 layers (hidden 128, float32), the same weights as a Qwen2 (split by
mlx-lm's `pipeline()`) and as a Llama (split by `node_agent/engine/layer_split.py`), 2 ranks
(split 3,3) on 127.0.0.1 against one engine of each, {rounds} starts each, medians (min-max).

| model (split by) | set-up | TTFT, {TTFT_TOKENS}-token prompt (ms) | decode, 1 stream (tok/s) \
| ms per token | added per token (ms) | decode, {STREAMS} streams (tok/s, together) |
|---|---|---:|---:|---:|---:|---:|
{chr(10).join(rows)}
"""


if __name__ == "__main__":
    harness.run_script(main)
