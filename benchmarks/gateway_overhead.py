"""Gateway overhead: streaming TTFT and total latency through the gateway vs. straight to an engine.

Starts the real system on 127.0.0.1 (coordinator, agent with its engine, and a second standalone
engine with the same model and flags), then measures both paths in alternating rounds at 1 and at
16 concurrent streams. Also times `mlxfleet up` to its endpoint line. Every process it starts is
stopped at the end, also on error or Ctrl-C.

    python -m benchmarks.gateway_overhead [--write-docs]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from benchmarks import harness
from benchmarks.fleet import MODEL, Engine, Fleet, demo_model, model_toml, start_engine

SECTION = "## Gateway overhead (issue 2)"

MAX_CONCURRENCY = 16  # engine slots: every stream of a 16-wave decodes at once
CONTEXT_LENGTH = 2048
UP_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 120.0
TARGET_OVERHEAD_MS = 2.0  # issue 2: gateway adds <= 2 ms to p50 TTFT at 16 streams
UP_TARGET_S = 15.0
PROMPTS = (
    "Tell me about Macs.",
    "Write a haiku about the sea.",
    "What is continuous batching?",
    "List three prime numbers.",
)


# Processes


@contextlib.contextmanager
def running_system(workdir: Path) -> Iterator[tuple[Fleet, Engine]]:
    """Coordinator + agent (+ its engine) + a standalone engine with the same model and flags."""
    model = demo_model(workdir)
    knobs = {"context_length": CONTEXT_LENGTH, "max_concurrency": MAX_CONCURRENCY}
    with Fleet(workdir, model_toml(model, **knobs)) as f, harness.stopping([]) as procs:
        f.start_agent("agent")
        # The same argv the agent's supervisor uses for its engine (node_agent/supervisor.py).
        flags = ["--host", "127.0.0.1", "--context-length", str(CONTEXT_LENGTH)]
        flags += ["--max-concurrency", str(MAX_CONCURRENCY)]
        engine = start_engine(model, workdir / "engine.log", *flags)
        procs.append(engine.proc)
        engine.listening()
        ready = harness.READY_TIMEOUT_S
        harness.wait_for(engine.healthy, ready, "the standalone engine to be healthy")
        harness.wait_for(f.routable, ready, "the demo model to be routable through the gateway")
        yield f, engine


# Measurement


@dataclass(frozen=True, slots=True)
class Sample:
    ttft_ms: float
    total_ms: float
    chunks: int  # SSE data lines, [DONE] included


async def one_stream(
    session: aiohttp.ClientSession, url: str, token: str, prompt: str, max_tokens: int
) -> Sample:
    """One streaming chat completion; raw SSE parsing, identical for both paths."""
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": max_tokens,
            "stream": True,
        }
    ).encode()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    start = time.perf_counter()
    ttft = None
    chunks = 0
    async with session.post(f"{url}/v1/chat/completions", data=body, headers=headers) as r:
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}: {(await r.read())[:300]!r}")
        async for raw in r.content:  # one line at a time
            if not raw.startswith(b"data: "):
                continue
            data = raw[6:].strip()
            chunks += 1
            if data == b"[DONE]":
                total = time.perf_counter() - start
                if ttft is None:
                    raise RuntimeError(f"{url}: stream ended without content")
                return Sample(ttft * 1e3, total * 1e3, chunks)
            if ttft is None:
                choices = json.loads(data).get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    ttft = time.perf_counter() - start
    raise RuntimeError(f"{url}: stream closed without [DONE]")


async def measure(
    f: Fleet, engine: Engine, args: argparse.Namespace
) -> tuple[dict[tuple[str, int], list[Sample]], dict[int, float]]:
    """Alternate gateway and direct rounds at each concurrency; the idle path gets no load."""
    paths = {"gateway": (f.base, f.key), "direct": (engine.url, engine.secret)}
    coordinator_pid = f.coordinator.popen.pid
    results: dict[tuple[str, int], list[Sample]] = {(p, c): [] for p in paths for c in (1, 16)}
    gateway_cpu_s = {1: 0.0, 16: 0.0}  # coordinator CPU during the gateway rounds
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        counter = 0

        async def batch(path: str, concurrency: int) -> list[Sample]:
            nonlocal counter
            url, token = paths[path]
            jobs = []
            for _ in range(concurrency):
                jobs.append(
                    one_stream(
                        session, url, token, PROMPTS[counter % len(PROMPTS)], args.max_tokens
                    )
                )
                counter += 1
            return list(await asyncio.gather(*jobs))

        print("warming up both paths ...", file=sys.stderr)
        for _ in range(args.warmup):
            for path in paths:
                await batch(path, 1)
                await batch(path, 16)

        plan = [(1, args.rounds_1, args.requests_1), (16, args.rounds_16, args.waves_16)]
        for concurrency, rounds, per_round in plan:
            for r in range(rounds):
                order = ["gateway", "direct"] if r % 2 == 0 else ["direct", "gateway"]
                for path in order:
                    before = harness.cpu_s(coordinator_pid)
                    for _ in range(per_round):
                        results[(path, concurrency)] += await batch(path, concurrency)
                    if path == "gateway":
                        gateway_cpu_s[concurrency] += harness.cpu_s(coordinator_pid) - before
                print(f"  concurrency {concurrency}: round {r + 1}/{rounds} done", file=sys.stderr)
    return results, gateway_cpu_s


def pct(values: list[float], q: float) -> float:
    """Percentile with linear interpolation (q in 0..100)."""
    return (
        statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]
        if q < 100
        else max(values)
    )


def diff_ci(a: list[float], b: list[float], rounds: int = 2000) -> tuple[float, float]:
    """95 % bootstrap interval of p50(a) - p50(b): how much of a difference is noise."""
    rng = random.Random(0)
    diffs = sorted(
        statistics.median(rng.choices(a, k=len(a))) - statistics.median(rng.choices(b, k=len(b)))
        for _ in range(rounds)
    )
    return diffs[int(0.025 * rounds)], diffs[int(0.975 * rounds) - 1]


def table(
    results: dict[tuple[str, int], list[Sample]],
) -> tuple[str, dict[int, tuple[float, float, float]], str]:
    rows = [
        "| streams | path | n | TTFT p50 (ms) | TTFT p95 (ms) | total p50 (ms) | total p95 (ms) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    overhead: dict[int, tuple[float, float, float]] = {}
    notes: list[str] = []
    for c in (1, 16):
        p50 = {}
        for path in ("gateway", "direct"):
            s = results[(path, c)]
            ttft, total = [x.ttft_ms for x in s], [x.total_ms for x in s]
            p50[path] = (pct(ttft, 50), pct(total, 50))
            rows.append(
                f"| {c} | {path} | {len(s)} | {pct(ttft, 50):.2f} | {pct(ttft, 95):.2f} "
                f"| {pct(total, 50):.2f} | {pct(total, 95):.2f} |"
            )
        d_ttft = p50["gateway"][0] - p50["direct"][0]
        d_total = p50["gateway"][1] - p50["direct"][1]
        g, d = results[("gateway", c)], results[("direct", c)]
        lo_t, hi_t = diff_ci([x.ttft_ms for x in g], [x.ttft_ms for x in d])
        lo_s, hi_s = diff_ci([x.total_ms for x in g], [x.total_ms for x in d])
        overhead[c] = (d_ttft, lo_t, hi_t)
        rows.append(
            f"| {c} | **gateway − direct (p50)** | | **{d_ttft:+.2f}** | | **{d_total:+.2f}** | |"
        )
        notes.append(
            f"{c} stream{'s' if c > 1 else ''}: TTFT {lo_t:+.1f} … {hi_t:+.1f} ms, "
            f"total {lo_s:+.1f} … {hi_s:+.1f} ms"
        )
    ci = (
        "95 % bootstrap intervals of the gateway − direct p50 differences: "
        + "; ".join(notes)
        + "."
    )
    return "\n".join(rows), overhead, ci


# `mlxfleet up` time to ready


def time_up(workdir: Path, tmpdir: str | None = None) -> float:
    """Seconds from process start to the stdout line with 'endpoint'; then stop it."""
    home = Path(tempfile.mkdtemp(prefix="up-home-", dir=workdir))
    env = {"MLXFLEET_HOME": str(home)}
    if tmpdir is not None:
        env["TMPDIR"] = tmpdir
    proc = harness.Proc(
        harness.cli("up", "--port", "0", "--grpc-port", "0", "--enroll-port", "0"),
        home.parent / f"{home.name}.log",
        env=env,
        stdout_pipe=True,
    )
    try:
        start = time.monotonic()
        assert proc.popen.stdout is not None
        deadline = start + UP_TIMEOUT_S
        os.set_blocking(proc.popen.stdout.fileno(), True)
        while time.monotonic() < deadline:
            line = proc.popen.stdout.readline()
            if not line:
                raise RuntimeError(f"`mlxfleet up` exited early:\n{proc.tail()}")
            if b"endpoint" in line:
                return time.monotonic() - start
        raise RuntimeError(f"`mlxfleet up` not ready in {UP_TIMEOUT_S:.0f} s")
    finally:
        proc.stop()


# Report


def main() -> int:
    parser = harness.parser(__doc__)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2, help="warm-up rounds per path")
    parser.add_argument("--rounds-1", type=int, default=10, help="alternating rounds, 1 stream")
    parser.add_argument("--requests-1", type=int, default=20, help="requests per path per round")
    parser.add_argument("--rounds-16", type=int, default=24, help="alternating rounds, 16 streams")
    parser.add_argument("--waves-16", type=int, default=1, help="waves of 16 per path per round")
    parser.add_argument("--up-runs", type=int, default=3, choices=range(1, 11), metavar="1..10")
    args = parser.parse_args()
    command = harness.command_line()

    # Ctrl-C and SIGTERM unwind through the context managers, which stop every process.
    when = harness.now_utc()
    with tempfile.TemporaryDirectory(prefix="mlxfleet-bench-") as tmp:
        workdir = Path(tmp)
        with running_system(workdir / "fleet") as (fleet, engine):
            results, gateway_cpu = asyncio.run(measure(fleet, engine, args))
        md, overhead, ci = table(results)
        print(md)
        print(ci)
        cpu_lines = []
        for c in (1, 16):
            s = results[("gateway", c)]
            per_req_ms = gateway_cpu[c] / len(s) * 1e3
            per_chunk_us = gateway_cpu[c] / sum(x.chunks for x in s) * 1e6
            cpu_lines.append(
                f"{c} stream{'s' if c > 1 else ''}: {per_req_ms:.2f} ms per request "
                f"({per_chunk_us:.0f} µs per SSE chunk relayed)"
            )
        gateway_cpu_line = "; ".join(cpu_lines)
        print("gateway CPU: " + gateway_cpu_line)

        tmpdir = os.environ.get("TMPDIR") or tempfile.gettempdir()
        cache_before = harness.mlx_cache_state(tmpdir)
        up_times = []
        for i in range(args.up_runs):
            up_times.append(time_up(workdir))
            print(f"mlxfleet up #{i + 1}: {up_times[-1]:.2f} s", file=sys.stderr)
        cold_dir = workdir / "cold-tmp"
        cold_dir.mkdir()
        cold = time_up(workdir, str(cold_dir))
        print(f"mlxfleet up, empty MLX kernel cache: {cold:.2f} s", file=sys.stderr)

    d16, lo16, hi16 = overhead[16]
    word = "met" if d16 <= TARGET_OVERHEAD_MS else "missed"
    verdict = (
        f"**Target {word}:** the gateway adds {d16:+.2f} ms to p50 TTFT at 16 streams "
        f"(target ≤ {TARGET_OVERHEAD_MS:.0f} ms; 95 % interval {lo16:+.1f} … {hi16:+.1f} ms"
        + (", which also holds 0: within run-to-run noise)." if lo16 <= 0 <= hi16 else ").")
    )
    up_median = statistics.median(up_times)
    up_line = ", ".join(f"{t:.2f} s" for t in up_times)
    section = f"""{SECTION}

Measured {when} with `{command}`.

- Machine: {harness.machine()}
- Versions: {harness.versions("mlx", "mlx-lm", "litellm", "aiohttp")}
- Engine flags (both engines): `--model-name {MODEL} --context-length {CONTEXT_LENGTH}
  --max-concurrency {MAX_CONCURRENCY}`, the offline demo model (`write_demo_model`).
- Event loop: `{os.environ.get("MLXFLEET_LOOP", "uvloop")}` in the coordinator and both engines
  (`MLXFLEET_LOOP`).

Method: one run starts the real coordinator, an agent (which starts its engine) and a second,
standalone engine with the same model, argv and flags as the agent's. Path **gateway** is client →
gateway → the agent's engine; path **direct** is client → the standalone engine (the agent's
engine URL and secret are not exposed by design). Both paths use one shared aiohttp client pool
and the same raw SSE parser; `temperature: 0`, `max_tokens: {args.max_tokens}`, `stream: true`,
{len(PROMPTS)} fixed prompts in rotation. Both paths are warmed up first ({args.warmup} rounds of 1
and 16 streams each). Rounds alternate (gateway, direct, then direct, gateway, ...) so drift hits
both; while one path is measured the other engine is idle. 1 stream: {args.rounds_1} rounds ×
{args.requests_1} sequential requests per path; 16 streams: {args.rounds_16} rounds ×
{args.waves_16} wave(s) of 16 concurrent requests per path (a wave waits for all 16). TTFT = send
→ first SSE chunk with non-empty `delta.content`; total = send → `data: [DONE]`. Everything runs
on 127.0.0.1 on the same cores, so client, gateway and engine compete for CPU.
Both engines run with {MAX_CONCURRENCY} slots, so all 16 streams of a wave decode together and
TTFT at 16 streams is prefill plus batching, not a place in a queue.

{md}

{ci}

{verdict}

Gateway process CPU (user + system, from `/proc`, during the gateway rounds):
{gateway_cpu_line}. On this 2-core machine that CPU is taken from the engine and the client,
which share the cores. A py-spy profile under the stdlib loop (2026-11-22) put about a quarter of
the coordinator's samples in `_SelectorSocketTransport.write` (one `send()` per relayed SSE
chunk); picking the engine (`Routing.pick` → `Router.async_get_available_deployment`) was
≈ 2 %. The event-loop A/B below compares the two loops.

`mlxfleet up` time to ready (process start → the `endpoint` line, fresh `MLXFLEET_HOME`, demo
model written on each start, `--port 0 --grpc-port 0`): {up_line}; median **{up_median:.2f} s**
(target ≤ {UP_TARGET_S:.0f} s on 2 cores: {"met" if up_median <= UP_TARGET_S else "missed"}).
MLX's kernel cache ({tmpdir}/mlx) was {cache_before} before these runs (the benchmark's engines
had just run). One more start with `TMPDIR` pointing at an empty folder, so MLX compiles its CPU
kernels from scratch: {cold:.2f} s.
"""
    harness.publish(SECTION, section, args.write_docs)
    return 0


if __name__ == "__main__":
    harness.run_script(main)
