"""TTFT against prompt length on our engine (issue 16, item 4): how far apart can two prompts of
one tail-trigger band be, from their lengths alone?

The tail trigger (coordinator/triggers.py) compares TTFTs only within half-octave bands of the
tokens a prompt needs prefilled, and fires above p95/p50 2.8, clears at 2.0. This measures, on
one idle engine (`python -m node_agent.engine`, nothing else running), the median TTFT of cold
prompts (a new system prompt each time: no prefix-cache hit) on a ladder of lengths √2 apart,
and reports the ratio of each step to the one before: a band is less than √2 wide, so, as TTFT
grows smoothly with length, that ratio is what length alone spreads a band by.

Models: the random-weight 4-bit shapes of benchmarks/accelerator.py (`tiny` for a CPU, `1.5b`
and `7b` on a GPU), built into WORK/models/SHAPE (reused when there).

    python -m benchmarks.ttft_by_length --shapes tiny --work /tmp/ttft --out /tmp/ttft
    PYTHONUNBUFFERED=1 python3 -m benchmarks.ttft_by_length --shapes 1.5b 7b --work /tmp/acc \
        --out $OUT

Writes OUT/ttft_by_length.json and prints a table per shape.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks import accelerator as acc
from benchmarks import harness
from benchmarks.fleet import MODEL, start_engine

FIRST_TOKENS = 128  # the ladder's first length
REPS = 5  # cold prompts per length; the median is kept
QUESTION = "Summarize the rules above in one sentence."


def ladder(longest: int) -> list[int]:
    """128, 181, 256, 362, 512, ... up to `longest`: each √2 times the one before."""
    steps = int(2 * math.log2(longest / FIRST_TOKENS)) + 1
    return [round(FIRST_TOKENS * math.sqrt(2) ** k) for k in range(steps)]


def measure(shape: str, work: Path, longest: int, reps: int) -> dict[str, Any]:
    path = acc.build_model(shape, work / "models" / shape)
    prompts = acc.Prompts(path)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    engine = start_engine(
        path, work / "logs" / f"ttft-{shape}.log", "--context-length", str(acc.CONTEXT)
    )
    rows = []
    with harness.stopping([engine.proc]), httpx.Client(timeout=acc.REQUEST_TIMEOUT_S) as client:
        engine.listening()
        harness.wait_for(engine.healthy, acc.MODEL_LOAD_TIMEOUT_S, "the engine to be healthy", 0.5)
        server = acc.Server("ours", engine.url, engine.secret, MODEL, {"ignore_eos": True})
        acc.stream_chat(client, server, None, QUESTION, acc.TTFT_MAX_TOKENS)  # warm-up
        for i, tokens in enumerate(ladder(longest)):
            ttfts, prompt_tokens = [], []
            for rep in range(reps):
                system = prompts.system(1000 * i + rep, tokens)
                s = acc.stream_chat(client, server, system, QUESTION, acc.TTFT_MAX_TOKENS)
                if s.cached_tokens > 32:
                    raise RuntimeError(f"{tokens} tokens: a prefix-cache hit of {s.cached_tokens}")
                ttfts.append(s.ttft_s)
                prompt_tokens.append(s.prompt_tokens)
            rows.append(
                {
                    "prompt_tokens": statistics.median(prompt_tokens),
                    "ttft_s": statistics.median(ttfts),
                }
            )
            acc.log(f"{shape}: {rows[-1]['prompt_tokens']} tokens, TTFT {rows[-1]['ttft_s']:.4f} s")
    for before, row in zip(rows, rows[1:], strict=False):
        row["ratio_to_previous"] = row["ttft_s"] / before["ttft_s"]
    return {"rows": rows, "largest_step_ratio": max(r.get("ratio_to_previous", 0) for r in rows)}


def table(shape: str, res: dict[str, Any]) -> str:
    lines = [
        f"{shape}: largest ratio between lengths √2 apart {res['largest_step_ratio']:.2f}",
        "| prompt tokens | TTFT p50 (ms) | × the length before |",
        "|---|---|---|",
    ]
    for row in res["rows"]:
        step = row.get("ratio_to_previous")
        lines.append(
            f"| {row['prompt_tokens']:.0f} | {row['ttft_s'] * 1000:.1f} | "
            f"{f'{step:.2f}' if step else '–'} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["tiny"], choices=sorted(acc.SHAPES))
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--longest", type=int, default=16384, help="the ladder's last length")
    p.add_argument("--reps", type=int, default=REPS)
    args = p.parse_args()
    acc.import_paths()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": acc.machine(), "started": time.time()}
    for shape in args.shapes:
        results[shape] = measure(shape, args.work, args.longest, args.reps)
        (args.out / "ttft_by_length.json").write_text(json.dumps(results, indent=2) + "\n")
        print(table(shape, results[shape]), flush=True)
    return 0


if __name__ == "__main__":
    harness.run_script(main)
