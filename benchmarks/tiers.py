"""Tiers: interactive vs batch engines on one node, against mlx_lm.server with the same model.

Starts, on 127.0.0.1 and with the offline demo model: our interactive-tier engine, our batch-tier
engine (16 slots) and one `mlx_lm.server`, plus (for part 3) an in-process `mlx_lm.stream_generate`
worker. Measures, in alternating rounds so drift hits both sides:

1. interactive TTFT (p50, p95, p95/p50) while 16 batch streams run;
2. aggregate batch tokens/s at 16 concurrent streams;
3. batch-1 decode tokens/s, our engine vs plain mlx_lm in-process;
4. our batch engine's window at 50 vs 200 ms (set at runtime), with bursts of new arrivals.

Every process it starts is stopped at the end, also on error or Ctrl-C.

    python -m benchmarks.tiers [--quick] [--write-docs]
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks import harness
from benchmarks.fleet import MLX_LM_MODEL, MODEL, demo_model, start_engine, start_mlx_lm

SECTION = "## Tiers: interactive vs batch, against mlx_lm.server (issue 4)"

BATCH_SLOTS = 16
BATCH_STREAMS = 16
BATCH_MAX_TOKENS = 256
BATCH_TEMPERATURE = 1.0  # sampled, so a random model rarely stops early on EOS
PROBE_MAX_TOKENS = 16
PROBE_GAP_S = (0.05, 0.25)
DECODE_MAX_TOKENS = 512
BURST_SIZE = 8
BURST_SPREAD_S = 0.1  # arrivals of one burst spread uniformly over this
BURST_MAX_TOKENS = 32
BURST_SLOTS = 32  # part 4: room for 16 streams + a burst, so the window decides admission
WINDOWS_MS = (50, 200)
READY_TIMEOUT_S = 240.0  # three cold starts at once on 2 cores
REQUEST_TIMEOUT_S = 180.0
HTTP_TIMEOUT_S = 30.0  # readiness polls and knob changes
SETTLE_TIMEOUT_S = 15.0
TTFT_RATIO_TARGET = 0.25  # ours p50 <= 1/4 of mlx_lm.server's
TAIL_TARGET = 2.8  # seed 001: interactive TTFT p95/p50
THROUGHPUT_TARGET = 1.0
DECODE_TARGET = 0.95
DECODE_MESSAGES = [{"role": "user", "content": "Write a long story about a robot who paints."}]
PROMPTS = (
    "Tell me about Macs.",
    "Write a haiku about the sea.",
    "What is continuous batching?",
    "List three prime numbers.",
)


# Processes (the pattern of gateway_overhead.py)


def _http(url: str, token: str | None, body: dict | None = None) -> tuple[int, bytes]:
    return harness.http(url, token, body, HTTP_TIMEOUT_S)


def cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds used by processes (and their live descendants), from /proc."""
    total = 0.0
    for pid in {p for root in pids for p in (root, *harness.descendants(root))}:
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += harness.cpu_s(pid)
    return total


@dataclass
class Server:
    name: str
    url: str
    token: str | None
    model: str
    proc: harness.Proc


@dataclass
class Systems:
    interactive: Server
    batch: Server
    theirs: Server
    model_path: Path
    logs: Path


@contextlib.contextmanager
def running_systems(workdir: Path) -> Iterator[Systems]:
    """Our two engines (interactive, batch) and mlx_lm.server, all on the same demo model."""
    model = demo_model(workdir)
    logs = workdir / "logs"
    logs.mkdir(parents=True)
    batch_flags = ["--max-concurrency", str(BATCH_SLOTS), "--max-batch-size", str(BATCH_SLOTS)]
    with harness.stopping([]) as procs:
        engines = {}
        for tier, flags in (("interactive", []), ("batch", batch_flags)):
            engines[tier] = start_engine(model, logs / f"{tier}.log", "--tier", tier, *flags)
            procs.append(engines[tier].proc)
        theirs = start_mlx_lm(model, logs / "mlx_lm_server.log")
        procs.append(theirs.proc)
        for engine in engines.values():
            engine.listening()
        for tier, engine in engines.items():
            harness.wait_for(engine.healthy, READY_TIMEOUT_S, f"ours-{tier} to be healthy")
        harness.wait_for(theirs.answers, READY_TIMEOUT_S, "mlx_lm.server to answer")
        ours = {t: Server(f"ours-{t}", e.url, e.secret, MODEL, e.proc) for t, e in engines.items()}
        their = Server("mlx_lm.server", theirs.url, None, MLX_LM_MODEL, theirs.proc)
        yield Systems(ours["interactive"], ours["batch"], their, model, logs)


# Streaming client


@dataclass(slots=True)
class Sample:
    ttft_ms: float
    total_ms: float
    tokens: int
    first_tokens: int = 0  # tokens in the first chunk with content
    last_token_s: float = 0.0  # perf_counter of the last chunk that carried tokens
    first_token_s: float = 0.0


@dataclass
class Meter:
    """Generated tokens as the client receives them: (perf_counter, n) events."""

    events: list[tuple[float, int]] = field(default_factory=list)

    def add(self, t: float, n: int) -> None:
        if n:
            self.events.append((t, n))

    def between(self, a: float, b: float) -> int:
        return sum(n for t, n in self.events if a <= t < b)


async def stream_chat(
    session: aiohttp.ClientSession,
    server: Server,
    prompt: str | list[dict[str, str]],
    max_tokens: int,
    temperature: float,
    meter: Meter | None = None,
) -> Sample:
    """One streaming chat completion, raw SSE parsing identical for every server.

    Tokens per chunk: our engines' `mlxfleet.token_ids` (exact); mlx_lm.server sends one chunk
    per token with text, and the `usage` chunk settles any tokens whose text was held back.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    body = json.dumps(
        {
            "model": server.model,
            "messages": messages,
            "temperature": temperature,
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    headers = {"Content-Type": "application/json"}
    if server.token:
        headers["Authorization"] = f"Bearer {server.token}"
    start = time.perf_counter()
    sample = Sample(0.0, 0.0, 0)
    ttft = None
    async with session.post(f"{server.url}/v1/chat/completions", data=body, headers=headers) as r:
        if r.status != 200:
            raise RuntimeError(f"{server.name}: HTTP {r.status}: {(await r.read())[:300]!r}")
        async for raw in r.content:
            if not raw.startswith(b"data: "):
                continue
            data = raw[6:].strip()
            now = time.perf_counter()
            if data == b"[DONE]":
                if ttft is None:
                    raise RuntimeError(f"{server.name}: stream ended without content")
                sample.ttft_ms, sample.total_ms = ttft * 1e3, (now - start) * 1e3
                return sample
            obj = json.loads(data)
            if "error" in obj:
                raise RuntimeError(f"{server.name}: error event {obj['error']}")
            choices = obj.get("choices") or []
            content = choices[0].get("delta", {}).get("content") if choices else None
            ids = (obj.get("mlxfleet") or {}).get("token_ids")
            n = len(ids) if ids is not None else (1 if content else 0)
            usage = obj.get("usage")
            if usage and not choices:
                n = max(0, int(usage.get("completion_tokens", 0)) - sample.tokens)
            if n:
                sample.tokens += n
                sample.last_token_s = now
                if meter is not None:
                    meter.add(now, n)
            if ttft is None and content:
                ttft = now - start
                sample.first_token_s, sample.first_tokens = now, n
    raise RuntimeError(f"{server.name}: stream closed without [DONE]")


class Load:
    """`streams` workers that each run long streams back to back until stopped."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        server: Server,
        streams: int,
        rng: random.Random,
        meter: Meter,
    ) -> None:
        self.errors: list[str] = []
        self.completed = 0
        # The first stream of each worker gets a random length so the 16 do not end in lockstep.
        firsts = [rng.randint(16, BATCH_MAX_TOKENS) for _ in range(streams)]
        self._tasks = [
            asyncio.create_task(self._worker(session, server, i, firsts[i], meter))
            for i in range(streams)
        ]

    async def _worker(
        self, session: aiohttp.ClientSession, server: Server, i: int, first: int, meter: Meter
    ) -> None:
        n, max_tokens = 0, first
        while True:
            prompt = f"[batch {i}.{n}] {PROMPTS[(i + n) % len(PROMPTS)]}"
            try:
                await stream_chat(session, server, prompt, max_tokens, BATCH_TEMPERATURE, meter)
                self.completed += 1
            except (RuntimeError, aiohttp.ClientError, TimeoutError) as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}"[:200])
                print(f"batch stream failed: {self.errors[-1]}", file=sys.stderr)
                if len(self.errors) > 20:
                    raise
                await asyncio.sleep(0.5)
            n, max_tokens = n + 1, BATCH_MAX_TOKENS

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def settle(server: Server) -> None:
    """Wait (bounded) until a server has nothing running after the client went away."""
    if server.token is None:  # mlx_lm.server has no stats: notices a gone client at its next write
        await asyncio.sleep(1.0)
        return
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while time.monotonic() < deadline:
        _, raw = await asyncio.to_thread(_http, f"{server.url}/v1/engine/stats", server.token)
        with contextlib.suppress(ValueError):
            stats = json.loads(raw)
            if stats["active"] == 0 and stats["queued"] == 0:
                return
        await asyncio.sleep(0.2)
    print(f"warning: {server.name} still busy after {SETTLE_TIMEOUT_S:.0f} s", file=sys.stderr)


def set_knobs(server: Server, **knobs: int) -> dict[str, Any]:
    status, raw = _http(f"{server.url}/v1/engine/knobs", server.token, knobs)
    if status != 200:
        raise RuntimeError(f"POST /v1/engine/knobs {knobs}: HTTP {status} {raw[:200]!r}")
    return json.loads(raw)


# Part 3 baseline: plain mlx_lm in its own process


def baseline_worker(model_path: str) -> int:
    """Loads the model with mlx_lm.load, then for each stdin line "MAX_TOKENS" runs
    stream_generate on the chat-templated DECODE_MESSAGES and prints one JSON line."""
    import mlx_lm

    model, tokenizer = mlx_lm.load(model_path)[:2]
    ids = list(tokenizer.apply_chat_template(DECODE_MESSAGES, add_generation_prompt=True))
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        mode, max_tokens = line.split()[0], int(line.split()[1])
        start = time.perf_counter()
        times = []
        if mode == "stream_generate":
            for _ in mlx_lm.stream_generate(model, tokenizer, ids, max_tokens=int(max_tokens)):
                times.append(time.perf_counter())
        else:  # the engine's core without HTTP: mlx-lm's BatchGenerator, a batch of one, greedy
            from mlx_lm.generate import BatchGenerator

            bg = BatchGenerator(model, completion_batch_size=4, prefill_batch_size=4)
            (uid,) = bg.insert([ids], max_tokens=[max_tokens])
            done = False
            while not done:
                for r in bg.next()[1]:
                    times.append(time.perf_counter())
                    done = done or r.finish_reason is not None
            bg.close()
        n = len(times)
        decode = (n - 1) / (times[-1] - times[0]) if n > 1 else 0.0
        row = {"tokens": n, "ttft_ms": (times[0] - start) * 1e3, "decode_tps": decode}
        print(json.dumps(row), flush=True)
    return 0


class Baseline:
    def __init__(self, model: Path, log: Path) -> None:
        argv = [sys.executable, "-m", "benchmarks.tiers", "--baseline-worker", str(model)]
        self.proc = harness.Proc(argv, log, stdout_pipe=True, stdin_pipe=True)
        if not json.loads(self._line()).get("ready"):
            raise RuntimeError("baseline worker did not start")

    def _line(self) -> str:
        assert self.proc.popen.stdout is not None
        line = self.proc.popen.stdout.readline().decode()
        if not line:
            raise RuntimeError(f"baseline worker exited:\n{self.proc.tail()}")
        return line

    def run(self, mode: str, max_tokens: int) -> dict[str, float]:
        assert self.proc.popen.stdin is not None
        self.proc.popen.stdin.write(f"{mode} {max_tokens}\n".encode())
        self.proc.popen.stdin.flush()
        return json.loads(self._line())


# Measurement


@dataclass
class Results:
    probes: dict[str, list[float]] = field(default_factory=lambda: {"ours": [], "theirs": []})
    # per round: (system, batch-only tokens/s, tokens/s during probes, probe p50, server CPU cores)
    rounds: list[tuple[str, float, float, float, float]] = field(default_factory=list)
    load_errors: dict[str, int] = field(default_factory=lambda: {"ours": 0, "theirs": 0})
    error_samples: list[str] = field(default_factory=list)
    engine_check: list[tuple[int, int]] = field(default_factory=list)  # (client, engine) tokens
    decode: dict[str, list[dict[str, float]]] = field(
        default_factory=lambda: {"ours": [], "stream_generate": [], "batch_generator": []}
    )
    window_ttft: dict[int, list[float]] = field(default_factory=lambda: {w: [] for w in WINDOWS_MS})
    window_tps: dict[int, list[float]] = field(default_factory=lambda: {w: [] for w in WINDOWS_MS})
    window_groups: dict[int, list[float]] = field(
        default_factory=lambda: {w: [] for w in WINDOWS_MS}
    )


def _engine_tokens(server: Server) -> int:
    _, raw = _http(f"{server.url}/v1/engine/stats", server.token)
    return int(json.loads(raw)["generated_tokens_total"])


def _engine_stats(server: Server) -> dict[str, Any]:
    return json.loads(_http(f"{server.url}/v1/engine/stats", server.token)[1])


async def decode_round(
    session: aiohttp.ClientSession, sys_: Systems, baseline: Baseline, res: Results, order: list
) -> None:
    for who in order:
        if who == "ours":
            s = await stream_chat(session, sys_.interactive, DECODE_MESSAGES, DECODE_MAX_TOKENS, 0)
            decode = (s.tokens - s.first_tokens) / (s.last_token_s - s.first_token_s)
            res.decode["ours"].append(
                {"tokens": s.tokens, "ttft_ms": s.ttft_ms, "decode_tps": decode}
            )
        else:
            res.decode[who].append(await asyncio.to_thread(baseline.run, who, DECODE_MAX_TOKENS))


async def mixed_round(
    session: aiohttp.ClientSession,
    sys_: Systems,
    who: str,
    args: argparse.Namespace,
    res: Results,
    seed: int,
) -> None:
    """16 batch streams; a batch-only throughput window; then sequential interactive probes."""
    batch_server = sys_.batch if who == "ours" else sys_.theirs
    probe_server = sys_.interactive if who == "ours" else sys_.theirs
    pids = (
        [sys_.batch.proc.popen.pid, sys_.interactive.proc.popen.pid]
        if who == "ours"
        else [sys_.theirs.proc.popen.pid]
    )
    rng = random.Random(seed)  # the same seed for both systems in a round: same lengths, gaps
    meter = Meter()
    load = Load(session, batch_server, BATCH_STREAMS, rng, meter)
    try:
        await asyncio.sleep(args.ramp_s)
        engine_before = _engine_tokens(sys_.batch) if who == "ours" else 0
        cpu0, t0 = cpu_s(pids), time.perf_counter()
        await asyncio.sleep(args.window_s)
        t1, cpu1 = time.perf_counter(), cpu_s(pids)
        if who == "ours":
            res.engine_check.append(
                (meter.between(t0, t1), _engine_tokens(sys_.batch) - engine_before)
            )
        batch_tps = meter.between(t0, t1) / (t1 - t0)
        ttfts = []
        for i in range(args.probes):
            await asyncio.sleep(rng.uniform(*PROBE_GAP_S))
            prompt = f"[probe {seed}.{i}] {PROMPTS[i % len(PROMPTS)]}"
            s = await stream_chat(session, probe_server, prompt, PROBE_MAX_TOKENS, 0.0)
            ttfts.append(s.ttft_ms)
        t2 = time.perf_counter()
        probe_tps = meter.between(t1, t2) / (t2 - t1)
    finally:
        await load.stop()
    res.load_errors[who] += len(load.errors)
    res.error_samples += [f"{who} (parts 1+2): {e}" for e in load.errors[:3]]
    res.probes[who] += ttfts
    cores = (cpu1 - cpu0) / (t1 - t0)
    res.rounds.append((who, batch_tps, probe_tps, statistics.median(ttfts), cores))
    for server in {batch_server.name: batch_server, probe_server.name: probe_server}.values():
        await settle(server)


async def window_round(
    session: aiohttp.ClientSession,
    sys_: Systems,
    window_ms: int,
    args: argparse.Namespace,
    res: Results,
    seed: int,
) -> None:
    """Our batch engine: 16 streams + bursts of arrivals, with the window set at runtime."""
    knobs = await asyncio.to_thread(
        set_knobs, sys_.batch, batch_window_ms=window_ms, max_concurrency=BURST_SLOTS
    )
    assert knobs["batch_window_ms"] == window_ms, knobs
    rng = random.Random(seed)
    meter = Meter()
    load = Load(session, sys_.batch, BATCH_STREAMS, rng, meter)
    ttfts: list[float] = []

    async def arrival(delay: float, i: int) -> None:
        await asyncio.sleep(delay)
        prompt = f"[burst {seed}.{i}] {PROMPTS[i % len(PROMPTS)]}"
        s = await stream_chat(session, sys_.batch, prompt, BURST_MAX_TOKENS, BATCH_TEMPERATURE)
        ttfts.append(s.ttft_ms)

    try:
        await asyncio.sleep(args.ramp_s)
        before = await asyncio.to_thread(_engine_stats, sys_.batch)
        t0 = time.perf_counter()
        bursts = []
        for b in range(args.bursts):
            delays = sorted(rng.uniform(0, BURST_SPREAD_S) for _ in range(BURST_SIZE))
            bursts.append(
                asyncio.gather(*(arrival(d, b * BURST_SIZE + k) for k, d in enumerate(delays)))
            )
            await asyncio.sleep(args.burst_every_s)
        await asyncio.gather(*bursts)
        t1 = time.perf_counter()
        after = await asyncio.to_thread(_engine_stats, sys_.batch)
    finally:
        await load.stop()
    res.load_errors["ours"] += len(load.errors)
    res.error_samples += [f"ours (part 4, {window_ms} ms): {e}" for e in load.errors[:3]]
    res.window_ttft[window_ms] += ttfts
    res.window_tps[window_ms].append(meter.between(t0, t1) / (t1 - t0))
    groups = after["admission_groups"] - before["admission_groups"]
    admitted = after["requests_total"] - before["requests_total"]
    res.window_groups[window_ms].append(admitted / groups if groups else 0.0)
    await settle(sys_.batch)


async def measure(sys_: Systems, args: argparse.Namespace) -> Results:
    res = Results()
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        print("warming up ...", file=sys.stderr)
        for server in (sys_.interactive, sys_.batch, sys_.theirs):
            for temperature in (0.0, BATCH_TEMPERATURE):
                await stream_chat(session, server, "Warm up.", 8, temperature)
            await asyncio.gather(
                *(stream_chat(session, server, f"Warm {i}.", 8, 1.0) for i in range(BATCH_STREAMS))
            )

        print("part 3: batch-1 decode ...", file=sys.stderr)
        baseline = await asyncio.to_thread(Baseline, sys_.model_path, sys_.logs / "baseline.log")
        try:
            paths = ["ours", "stream_generate", "batch_generator"]
            await decode_round(session, sys_, baseline, res, paths)  # warm-up
            res.decode = {p: [] for p in paths}
            for r in range(args.decode_rounds):
                order = paths if r % 2 == 0 else paths[::-1]
                await decode_round(session, sys_, baseline, res, order)
        finally:
            await asyncio.to_thread(baseline.proc.stop)

        print("parts 1+2: interactive probes under 16 batch streams ...", file=sys.stderr)
        for r in range(args.rounds):
            order = ["ours", "theirs"] if r % 2 == 0 else ["theirs", "ours"]
            for who in order:
                await mixed_round(session, sys_, who, args, res, seed=1000 + r)
            print(f"  round {r + 1}/{args.rounds} done", file=sys.stderr)

        print("part 4: batch window 50 vs 200 ms ...", file=sys.stderr)
        initial = await asyncio.to_thread(
            lambda: json.loads(_http(f"{sys_.batch.url}/v1/engine/knobs", sys_.batch.token)[1])
        )
        try:
            for r in range(args.window_rounds):
                order = list(WINDOWS_MS) if r % 2 == 0 else list(reversed(WINDOWS_MS))
                for w in order:
                    await window_round(session, sys_, w, args, res, seed=2000 + r)
                print(f"  round {r + 1}/{args.window_rounds} done", file=sys.stderr)
        finally:
            restore = {k: initial[k] for k in ("batch_window_ms", "max_concurrency")}
            await asyncio.to_thread(set_knobs, sys_.batch, **restore)
    return res


# Report


def pct(values: list[float], q: float) -> float:
    """Percentile with linear interpolation (q in 0..100)."""
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def met(ok: bool) -> str:
    return "met" if ok else "missed"


def report(res: Results, args: argparse.Namespace) -> tuple[str, str]:
    """(tables, verdicts) in Markdown."""
    ours, theirs = res.probes["ours"], res.probes["theirs"]
    o50, o95, t50, t95 = pct(ours, 50), pct(ours, 95), pct(theirs, 50), pct(theirs, 95)
    t1 = [
        "**1. Interactive TTFT while 16 batch streams run** (streaming chat, "
        f"`max_tokens` {PROBE_MAX_TOKENS}, one probe at a time)",
        "",
        "| system | n | TTFT p50 (ms) | TTFT p95 (ms) | p95/p50 | max (ms) |",
        "|---|---:|---:|---:|---:|---:|",
        f"| ours: interactive engine (+ batch engine loaded) | {len(ours)} | {o50:.1f} | {o95:.1f} "
        f"| {o95 / o50:.2f} | {max(ours):.1f} |",
        f"| mlx_lm.server (one process, both loads) | {len(theirs)} | {t50:.1f} | {t95:.1f} "
        f"| {t95 / t50:.2f} | {max(theirs):.1f} |",
        f"| **ours / mlx_lm.server (p50)** | | **{o50 / t50:.3f}** | {o95 / t95:.3f} | | |",
    ]
    tps = {w: [r[1] for r in res.rounds if r[0] == w] for w in ("ours", "theirs")}
    ptps = {w: [r[2] for r in res.rounds if r[0] == w] for w in ("ours", "theirs")}
    cores = {w: [r[4] for r in res.rounds if r[0] == w] for w in ("ours", "theirs")}
    om, tm = statistics.mean(tps["ours"]), statistics.mean(tps["theirs"])
    t2 = [
        f"**2. Aggregate batch throughput, {BATCH_STREAMS} concurrent streams** "
        f"(`max_tokens` {BATCH_MAX_TOKENS}, temperature {BATCH_TEMPERATURE}, restarted as they "
        f"finish; {args.window_s:.0f} s window per round, no probes)",
        "",
        "| system | rounds | tokens/s mean | per round | server CPU (cores) "
        "| tokens/s while probing |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for who, label in (("ours", "ours: batch engine"), ("theirs", "mlx_lm.server")):
        t2.append(
            f"| {label} | {len(tps[who])} | {statistics.mean(tps[who]):.0f} | "
            + ", ".join(f"{x:.0f}" for x in tps[who])
            + f" | {statistics.mean(cores[who]):.2f} | {statistics.mean(ptps[who]):.0f} |"
        )
    t2.append(
        f"| **ours / mlx_lm.server** | | **{om / tm:.3f}** | | | "
        f"{statistics.mean(ptps['ours']) / statistics.mean(ptps['theirs']):.3f} |"
    )
    dec = {k: [x["decode_tps"] for x in v] for k, v in res.decode.items()}
    toks = {k: sorted({int(x["tokens"]) for x in v}) for k, v in res.decode.items()}
    ttft3 = {k: statistics.median(x["ttft_ms"] for x in v) for k, v in res.decode.items()}
    d_o, d_b = statistics.median(dec["ours"]), statistics.median(dec["stream_generate"])
    t3 = [
        f"**3. Batch-1 decode** (one stream, `max_tokens` {DECODE_MAX_TOKENS}, temperature 0, "
        "tokens/s after the first token)",
        "",
        "| path | runs | tokens generated | decode tokens/s median | per run | TTFT median (ms) |",
        "|---|---:|---|---:|---|---:|",
    ]
    for key, label in (
        ("ours", "ours: interactive engine over HTTP/SSE"),
        ("stream_generate", "mlx_lm.stream_generate in-process"),
        ("batch_generator", "mlx_lm BatchGenerator in-process, batch of 1 (informative)"),
    ):
        t3.append(
            f"| {label} | {len(dec[key])} | {', '.join(map(str, toks[key]))} | "
            f"{statistics.median(dec[key]):.0f} | "
            + ", ".join(f"{x:.0f}" for x in dec[key])
            + f" | {ttft3[key]:.1f} |"
        )
    t3.append(f"| **ours / stream_generate** | | | **{d_o / d_b:.3f}** | | |")
    t4 = [
        f"**4. Batch window 50 vs 200 ms** (our batch engine, set at runtime by POST "
        f"/v1/engine/knobs; {BATCH_STREAMS} background streams + bursts of {BURST_SIZE} arrivals "
        f"spread over {BURST_SPREAD_S * 1e3:.0f} ms every {args.burst_every_s:.1f} s, "
        f"`max_tokens` {BURST_MAX_TOKENS}; `max_concurrency` {BURST_SLOTS} during this part)",
        "",
        "| window | arrivals | arrival TTFT p50 (ms) | p95 (ms) | p95/p50 | aggregate tokens/s "
        "| requests per admission group |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    w = {}
    for ms in WINDOWS_MS:
        v = res.window_ttft[ms]
        w[ms] = (pct(v, 50), pct(v, 95), statistics.mean(res.window_tps[ms]))
        t4.append(
            f"| {ms} ms | {len(v)} | {w[ms][0]:.1f} | {w[ms][1]:.1f} | {w[ms][1] / w[ms][0]:.2f} "
            f"| {w[ms][2]:.0f} | {statistics.mean(res.window_groups[ms]):.2f} |"
        )
    lo, hi = WINDOWS_MS
    t4.append(
        f"| **Δ ({hi} − {lo})** | | **{w[hi][0] - w[lo][0]:+.1f}** | **{w[hi][1] - w[lo][1]:+.1f}**"
        f" | | **{w[hi][2] - w[lo][2]:+.0f}** ({(w[hi][2] / w[lo][2] - 1) * 100:+.1f} %) | |"
    )
    checks = "; ".join(f"{c} vs {e}" for c, e in res.engine_check)
    errors = res.load_errors
    notes = (
        "Client-counted vs batch-engine-counted tokens in each throughput window (ours): "
        f"{checks}. "
        f"Failed batch streams: ours {errors['ours']}, mlx_lm.server {errors['theirs']}"
        + (f" (first: {'; '.join(res.error_samples[:3])})." if res.error_samples else ".")
    )
    tables = "\n".join(t1) + "\n\n" + "\n".join(t2) + "\n\n" + "\n".join(t3) + "\n\n"
    tables += "\n".join(t4) + "\n\n" + notes
    verdicts = [
        f"- Interactive p50 TTFT: ours {o50:.1f} ms vs mlx_lm.server {t50:.1f} ms = "
        f"{o50 / t50:.3f}× (target ≤ {TTFT_RATIO_TARGET:.2f}×): "
        f"**{met(o50 <= TTFT_RATIO_TARGET * t50)}**.",
        f"- Interactive p95/p50: ours {o95 / o50:.2f} (target ≤ {TAIL_TARGET}): "
        f"**{met(o95 / o50 <= TAIL_TARGET)}** (mlx_lm.server: {t95 / t50:.2f}).",
        f"- Batch throughput at {BATCH_STREAMS} streams: {om:.0f} vs {tm:.0f} tokens/s = "
        f"{om / tm:.3f}× (target ≥ {THROUGHPUT_TARGET:.1f}×): "
        f"**{met(om / tm >= THROUGHPUT_TARGET)}**.",
        f"- Batch-1 decode: {d_o:.0f} vs {d_b:.0f} tokens/s = {d_o / d_b:.3f}× "
        f"(target ≥ {DECODE_TARGET}×): **{met(d_o / d_b >= DECODE_TARGET)}**.",
        f"- Window {hi} vs {lo} ms: arrival TTFT p50 {w[hi][0] - w[lo][0]:+.1f} ms, p95 "
        f"{w[hi][1] - w[lo][1]:+.1f} ms, aggregate throughput "
        f"{(w[hi][2] / w[lo][2] - 1) * 100:+.1f} %"
        " (no target; the seeds' step 4 asks for the deltas).",
    ]
    return tables, "\n".join(verdicts)


def main() -> int:
    parser = harness.parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds, parts 1+2")
    parser.add_argument("--probes", type=int, default=14, help="interactive probes per round")
    parser.add_argument("--window-s", type=float, default=8.0, help="throughput window per round")
    parser.add_argument("--ramp-s", type=float, default=2.0, help="load ramp before measuring")
    parser.add_argument("--decode-rounds", type=int, default=6, help="alternating rounds, part 3")
    parser.add_argument("--window-rounds", type=int, default=4, help="alternating rounds, part 4")
    parser.add_argument("--bursts", type=int, default=6, help="bursts per part-4 round")
    parser.add_argument("--burst-every-s", type=float, default=1.5)
    parser.add_argument("--baseline-worker", metavar="MODEL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_worker:
        return baseline_worker(args.baseline_worker)
    if args.quick:
        args.rounds, args.probes, args.window_s, args.ramp_s = 2, 5, 3.0, 1.0
        args.decode_rounds, args.window_rounds, args.bursts = 2, 2, 2
    for name in ("rounds", "probes", "decode_rounds", "window_rounds", "bursts"):
        if not 1 <= getattr(args, name) <= 100:
            parser.error(f"--{name.replace('_', '-')} must be in 1..100")
    if not 0.5 <= args.window_s <= 120 or not 0 <= args.ramp_s <= 30:
        parser.error("--window-s must be in 0.5..120 and --ramp-s in 0..30")
    command = harness.command_line()

    # Ctrl-C and SIGTERM unwind through the context managers, which stop every process.
    when = harness.now_utc()
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="mlxfleet-tiers-") as tmp,
        running_systems(Path(tmp)) as sys_,
    ):
        res = asyncio.run(measure(sys_, args))
    tables, verdicts = report(res, args)
    elapsed = time.monotonic() - started
    section = f"""{SECTION}

Measured {when} with `{command}` ({elapsed / 60:.1f} min).

- Machine: {harness.machine()}
- Versions: {harness.versions("mlx", "mlx-lm", "aiohttp")}
- Model: the offline demo model (`write_demo_model`: a tiny random-weight Qwen2, 2 layers, hidden
  128, vocab 1536; its output is gibberish), so these are engine and scheduling numbers on
  **CPU MLX on a 2-core Linux box, not a Mac**: a real model on Metal spends far more of each
  step in the GPU and far less in Python, which changes every ratio below.
- Ours: two engine processes on one node, `python -m node_agent.engine --tier interactive`
  (default knobs: 4 slots, window 0) and `--tier batch --max-concurrency {BATCH_SLOTS}
  --max-batch-size {BATCH_SLOTS}` (window 80 ms by default), event loop
  `{os.environ.get("MLXFLEET_LOOP", "uvloop")}`.
- Theirs: one `python -m mlx_lm.server --model <demo> --port <p>` with its defaults
  (decode concurrency 32, prompt concurrency 8, prefill step 2048, prompt cache on); requests
  name `model: "{MLX_LM_MODEL}"` and carry no `seed` (a seed makes mlx_lm.server serve a
  request alone, unbatched).

Method: one run starts all three servers at once and warms each up (greedy and sampled, 1 and
{BATCH_STREAMS} streams). Every request is a streaming chat completion with
`stream_options.include_usage`, parsed by the same raw SSE client (aiohttp, one pool) on the same
2 cores as the servers. TTFT = send → first SSE chunk with non-empty `delta.content`. Tokens are
counted as the client receives them: our chunks carry their token ids; mlx_lm.server sends one
chunk per token with text, and its final `usage` settles held-back tokens. Each prompt carries a
unique tag, so neither side reuses a cached prompt wholesale.

- Parts 1+2, {args.rounds} rounds alternating (ours, theirs, then theirs, ours, ...); the idle
  system gets no traffic. A round: {BATCH_STREAMS} workers each run streams back to back
  (`max_tokens` {BATCH_MAX_TOKENS}, the first one of each worker a random 16–{BATCH_MAX_TOKENS}
  so they do not end in lockstep; temperature {BATCH_TEMPERATURE}); after {args.ramp_s:.0f} s of
  ramp, a {args.window_s:.0f} s batch-only throughput window; then {args.probes} interactive probes
  one at a time (`max_tokens` {PROBE_MAX_TOKENS}, temperature 0, random gaps of
  {PROBE_GAP_S[0] * 1e3:.0f}–{PROBE_GAP_S[1] * 1e3:.0f} ms) while the batch streams go on. Ours:
  batch streams → batch engine, probes → interactive engine; theirs: both → the one server. Both
  systems get the same random lengths and gaps in a round (same seed).
- Part 3, {args.decode_rounds} alternating runs each after one warm-up run each: one stream,
  `max_tokens` {DECODE_MAX_TOKENS}, temperature 0, the same chat-templated prompt, through our
  interactive engine over HTTP vs `mlx_lm.stream_generate` (model from `mlx_lm.load`) in a
  separate, otherwise idle process; for attribution, also mlx-lm's `BatchGenerator` (the
  engine's core, no HTTP) with a batch of one in that process; decode tokens/s = tokens after
  the first / time from the first to the last token. All servers idle meanwhile.
- Part 4, {args.window_rounds} rounds alternating 50/200 and 200/50 ms, knobs set at runtime
  (`POST /v1/engine/knobs`, no reload) on the batch engine. With all {BATCH_SLOTS} slots busy a
  new arrival only waits for a free slot (`admit_now` admits at once when the waiting requests
  fill the free slots), so the window would never hold anyone: this part raises
  `max_concurrency` to {BURST_SLOTS} by the same POST, leaving room for a burst, and restores
  it afterwards. {BATCH_STREAMS} background streams as above (their restarts also wait for the
  window now), plus {args.bursts} bursts per round of {BURST_SIZE} arrivals
  (`max_tokens` {BURST_MAX_TOKENS}) spread over {BURST_SPREAD_S * 1e3:.0f} ms, one burst every
  {args.burst_every_s:.1f} s. Reported: TTFT of the burst arrivals, aggregate client-counted
  tokens/s from the first burst to the end of the last, and requests per admission group
  (`/v1/engine/stats`).

{tables}

Verdicts:

{verdicts}
"""
    harness.publish(SECTION, section, args.write_docs)
    return 0


if __name__ == "__main__":
    harness.run_script(main)
