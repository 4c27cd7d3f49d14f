"""Measure an engine's memory beyond weights and KV: RSS after load and warm-up, demo model.

Usage: python benchmarks/engine_overhead.py
The demo model's weights are ~1 MB and its warm-up KV a few KB, so the RSS is the engine's own
overhead (Python, MLX, mlx-lm, tokenizer, HTTP server, activation buffers). It feeds
ENGINE_OVERHEAD_BYTES in coordinator/memory.py.
"""

from __future__ import annotations

import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

RUNS = 3
READY_TIMEOUT_S = 120.0


def rss_bytes(pid: int) -> int:
    pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def one_run(model: Path) -> tuple[int, int]:
    """(RSS after ready, RSS after 8 concurrent-ish requests of 64 tokens)."""
    secret = secrets.token_urlsafe(16)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "node_agent.engine",
            "--model-path",
            str(model),
            "--model-name",
            "demo",
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "MLXFLEET_ENGINE_SECRET": secret},
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline().decode().strip().rsplit("=", 1)[1])
        headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/health", headers=headers)
                if urllib.request.urlopen(req, timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        ready = rss_bytes(proc.pid)
        body = b'{"model": "demo", "prompt": "hello world", "max_tokens": 64}'
        for _ in range(8):
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/completions", data=body, headers=headers
            )
            urllib.request.urlopen(req, timeout=30).read()
        return ready, rss_bytes(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def main() -> None:
    from node_agent.engine.demo_model import write_demo_model

    with tempfile.TemporaryDirectory() as tmp:
        model = write_demo_model(Path(tmp) / "demo")
        weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        runs = [one_run(model) for _ in range(RUNS)]
    mib = 2**20
    print(f"demo weights on disk: {weights / mib:.1f} MiB")
    for i, (ready, served) in enumerate(runs, 1):
        print(f"run {i}: RSS ready {ready / mib:.0f} MiB, after 8 requests {served / mib:.0f} MiB")
    print(f"median RSS after requests: {statistics.median(r[1] for r in runs) / mib:.0f} MiB")


if __name__ == "__main__":
    main()
