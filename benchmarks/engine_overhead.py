"""Measure an engine's memory beyond weights and KV: RSS after load and warm-up, demo model.

Usage: python -m benchmarks.engine_overhead [--runs 3]
The demo model's weights are ~1 MB and its warm-up KV a few KB, so the RSS is the engine's own
overhead (Python, MLX, mlx-lm, tokenizer, HTTP server, activation buffers). It feeds
ENGINE_OVERHEAD_BYTES in coordinator/memory.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from benchmarks import harness
from benchmarks.fleet import MODEL, demo_model, start_engine

RUNS = 3
READY_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 30.0


def rss_bytes(pid: int) -> int:
    pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def one_run(model: Path, log: Path) -> tuple[int, int]:
    """(RSS after ready, RSS after 8 concurrent-ish requests of 64 tokens)."""
    engine = start_engine(model, log)
    with harness.stopping([engine.proc]):
        engine.listening()
        harness.wait_for(engine.healthy, READY_TIMEOUT_S, "the engine to be healthy")
        ready = rss_bytes(engine.proc.popen.pid)
        body = {"model": MODEL, "prompt": "hello world", "max_tokens": 64}
        for _ in range(8):
            status, _ = harness.http(
                f"{engine.url}/v1/completions", engine.secret, body, REQUEST_TIMEOUT_S
            )
            if status != 200:
                raise RuntimeError(f"completion: HTTP {status}")
        return ready, rss_bytes(engine.proc.popen.pid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=RUNS, choices=range(1, 11), metavar="1..10")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = demo_model(Path(tmp))
        weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        runs = [one_run(model, Path(tmp) / f"engine-{i}.log") for i in range(args.runs)]
    mib = 2**20
    print(f"demo weights on disk: {weights / mib:.1f} MiB")
    for i, (ready, served) in enumerate(runs, 1):
        print(f"run {i}: RSS ready {ready / mib:.0f} MiB, after 8 requests {served / mib:.0f} MiB")
    print(f"median RSS after requests: {statistics.median(r[1] for r in runs) / mib:.0f} MiB")


if __name__ == "__main__":
    main()
