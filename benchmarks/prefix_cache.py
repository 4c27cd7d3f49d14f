"""Prefix reuse: TTFT of a long repeated prefix (an agent's system prompt, tools and history,
~7,200 tokens) with a new question each turn, our engine against mlx_lm.server, same run.

Starts our engine (prefix cache on, its default budget), the same engine with the cache off,
and mlx_lm.server (its LRU prompt cache, defaults) on the demo model, then for each server:
one cold turn (a prefix it has never seen), then TURNS repeated turns, each a new question
after the same prefix. TTFT is the time to the first content chunk of a streamed chat, greedy,
8 tokens. The servers take turns request by request, so drift falls on all alike.

Then memory pressure: a coordinator and an agent whose OS readings file the script writes; each
round fills the engine's cache with two turns sharing a prefix, writes pressure `warning`, and
times until the agent's /metrics shows the cache empty (polled every 10 ms), then back to
`normal`.

    python -m benchmarks.prefix_cache [--turns 6] [--pressure-rounds 8] [--write-docs]
"""

from __future__ import annotations

import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks import harness
from benchmarks.fleet import (
    MLX_LM_MODEL,
    MODEL,
    Fleet,
    demo_model,
    model_toml,
    start_engine,
    start_mlx_lm,
)

SECTION = "## Prefix cache (issue 15)"
PREFIX_PHRASES = 660  # about 7,200 tokens of the demo model's tokenizer
MAX_TOKENS = 8
REQUEST_TIMEOUT_S = 600.0
CONTEXT = 8192
READINGS_ENV = "MLXFLEET_READINGS_FILE"  # the agent's OS readings, overridden (docs/operations.md)
METRICS_LINE = re.compile(r"metrics on http://[\d.]+:(\d+)/metrics")
CACHE_BYTES = "mlxfleet_engine_prefix_cache_bytes{"


def prefix(seed: int) -> str:
    """A long system prompt; each seed gives another (a cold turn must be a real miss)."""
    return " ".join(f"rule{seed}-{i % 97} keep it short" for i in range(PREFIX_PHRASES))


def ttft(
    client: httpx.Client, url: str, secret: str | None, model: str, system: str, question: str
) -> tuple[float, int, int]:
    """(seconds to the first content chunk, prompt tokens, cached tokens) of one streamed chat."""
    body = {
        "model": model,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    start = time.perf_counter()
    first, prompt, cached = 0.0, 0, 0
    with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if not first and any(
                (c.get("delta") or {}).get("content") for c in event.get("choices") or ()
            ):
                first = time.perf_counter() - start
            if usage := event.get("usage"):
                prompt = usage.get("prompt_tokens", 0)
                cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return first or (time.perf_counter() - start), prompt, cached


def cache_bytes(metrics_url: str) -> float:
    text = httpx.get(metrics_url, timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(CACHE_BYTES)
    )


def pressure_drops(workdir: Path, model: Path, rounds: int) -> list[float]:
    """Seconds from writing pressure `warning` to an empty prefix cache, per round."""
    readings = workdir / "readings.json"
    readings.write_text("{}")
    os.environ[READINGS_ENV] = str(readings)  # the agent's process inherits it
    try:
        with Fleet(workdir / "fleet", model_toml(model, pinned=True)) as f:
            agent = f.start_agent("agent")
            harness.wait_for(f.routable, harness.READY_TIMEOUT_S, "the demo model to be routable")
            port = harness.wait_for(
                lambda: METRICS_LINE.search(agent.proc.log.read_text()), 30, "metrics"
            )
            url = f"http://127.0.0.1:{port.group(1)}/metrics"
            drops = []
            for r in range(rounds):
                for question in ("one", "two"):
                    body = {
                        "model": MODEL,
                        "messages": [
                            {"role": "system", "content": prefix(r)[:4000]},
                            {"role": "user", "content": question},
                        ],
                        "max_tokens": 4,
                    }
                    f.call("/v1/chat/completions", body)
                harness.wait_for(lambda: cache_bytes(url) > 0, 30, "a filled prefix cache")
                started = time.monotonic()
                readings.write_text('{"memory_pressure": "warning"}')
                harness.wait_for(lambda: cache_bytes(url) == 0, 30, "the cache to be dropped", 0.01)
                drops.append(time.monotonic() - started)
                readings.write_text("{}")
                time.sleep(2.0)  # a heartbeat or two at normal before the next round
    finally:
        os.environ.pop(READINGS_ENV, None)
    return drops


def main() -> int:
    parser = harness.parser(__doc__)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--pressure-rounds", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = demo_model(work)
        flags = ("--context-length", str(CONTEXT))
        ours = start_engine(model, work / "ours.log", *flags)
        off = start_engine(model, work / "off.log", *flags, "--prefix-cache-mib", "0")
        mlx_lm = start_mlx_lm(model, work / "mlx_lm.log")
        with harness.stopping([ours.proc, off.proc, mlx_lm.proc]):
            for engine in (ours, off):
                engine.listening()
                harness.wait_for(
                    engine.healthy, harness.READY_TIMEOUT_S, "an engine to be healthy", 0.5
                )
            harness.wait_for(
                mlx_lm.answers, harness.READY_TIMEOUT_S, "mlx_lm.server to answer", 0.5
            )
            servers = {
                "ours": (ours.url, ours.secret, MODEL),
                "ours, cache off": (off.url, off.secret, MODEL),
                "mlx_lm.server": (mlx_lm.url, None, MLX_LM_MODEL),
            }
            cold: dict[str, float] = {}
            repeat: dict[str, list[float]] = {name: [] for name in servers}
            cached: list[tuple[int, int]] = []
            with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:
                for url, secret, model_name in servers.values():  # warm-up: kernels
                    ttft(client, url, secret, model_name, prefix(99)[:2000], "warm up")
                system = prefix(0)
                for name, (url, secret, model_name) in servers.items():
                    cold[name] = ttft(client, url, secret, model_name, system, "question 0")[0]
                for turn in range(1, args.turns + 1):
                    for name, (url, secret, model_name) in servers.items():
                        seconds, prompt, hit = ttft(
                            client, url, secret, model_name, system, f"question {turn}"
                        )
                        repeat[name].append(seconds)
                        if name == "ours":
                            cached.append((prompt, hit))
        drops = pressure_drops(work, model, args.pressure_rounds)
    harness.publish(SECTION, report(cold, repeat, cached, args.turns, drops), args.write_docs)
    return 0


def report(
    cold: dict[str, float],
    repeat: dict[str, list[float]],
    cached: list[tuple[int, int]],
    turns: int,
    drops: list[float],
) -> str:
    rows = "\n".join(
        f"| {name} | {cold[name]:.3f} | {statistics.median(repeat[name]):.3f} | "
        f"{statistics.median(repeat[name]) / cold[name]:.3f} |"
        for name in cold
    )
    ours, theirs = statistics.median(repeat["ours"]), statistics.median(repeat["mlx_lm.server"])
    prompt = cached[0][0] if cached else 0
    hits = ", ".join(f"{hit}" for _, hit in cached)
    return f"""{SECTION}

Measured {harness.now_utc()} with `{harness.command_line()}`.

- Machine: {harness.machine()}
- Versions: {harness.versions("mlx", "mlx-lm")}

Method: benchmarks/prefix_cache.py's docstring. A {prompt}-token prompt (system prefix + a new
question), one cold turn then {turns} repeated turns per server, servers alternating.

| server | cold TTFT (s) | repeat TTFT, median (s) | repeat / cold |
|---|---:|---:|---:|
{rows}

Ours repeated / ours cold: **{ours / cold["ours"]:.3f}** (target ≤ 0.1); ours repeated /
mlx_lm.server repeated: **{ours / theirs:.2f}** (target ≤ 1.0). `cached_tokens` our engine
reported on the repeated turns: {hits}.

Memory pressure `warning` to an empty cache, {len(drops)} rounds: median
**{statistics.median(drops):.2f} s**, max **{max(drops):.2f} s** (target ≤ 1 s; the agent reads
the OS once per 1 s heartbeat, so the wait is mostly until its next reading).
"""


if __name__ == "__main__":
    harness.run_script(main)
