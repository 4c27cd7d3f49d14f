"""What constrained decoding costs: a 16-stream batch with 0, 4 and 16 grammar-constrained
requests, and the first token of a json_schema request against an unconstrained one.

Usage: python -m benchmarks.structured [--rounds 5] [--ttft-pairs 20] [--write-docs]
One engine (python -m node_agent.engine) on the demo model, 16 slots. Batch: 16 streamed chats
of TOKENS tokens each, started together; the unconstrained ones run with ignore_eos, the
constrained ones under a schema whose one string field must be long (so neither kind ends early
and every stream generates exactly TOKENS tokens). Aggregate tokens/s = all streams' tokens /
wall time; the configurations alternate round by round, medians reported. First token: single
requests alternating plain / json_schema (its grammar compiled by a warm-up request first), time
to the first content chunk.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks import harness
from benchmarks.fleet import MODEL, demo_model, start_engine
from tests.agent_model import CARD_SCHEMA

SLOTS = 16
TOKENS = 96
CONSTRAINED_COUNTS = (0, 4, 16)
READY_TIMEOUT_S = 180.0
LONG = {
    "type": "object",
    "properties": {"text": {"type": "string", "minLength": 2000}},
    "required": ["text"],
    "additionalProperties": False,
}
CARD = CARD_SCHEMA  # the tests' schema of every kind of field (tests/agent_model.py)


def fmt(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "b", "schema": schema, "strict": True}}


async def stream(http: httpx.AsyncClient, url: str, secret: str, body: dict) -> tuple[float, int]:
    """(seconds to the first content chunk, completion tokens) of one streamed chat."""
    started = time.perf_counter()
    first, tokens = 0.0, 0
    body = {"model": MODEL, "stream": True, "stream_options": {"include_usage": True}, **body}
    async with http.stream(
        "POST",
        f"{url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {secret}"},
    ) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if not first and any(c["delta"].get("content") for c in event.get("choices", [])):
                first = time.perf_counter() - started
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return first, tokens


def request(i: int, constrained: bool, schema: dict = LONG) -> dict:
    body: dict = {
        "messages": [{"role": "user", "content": f"Write item {i}."}],
        "temperature": 1.0,
        "seed": i,
        "max_tokens": TOKENS,
    }
    if constrained:
        return body | {"response_format": fmt(schema)}
    return body | {"ignore_eos": True}


async def batch(http: httpx.AsyncClient, url: str, secret: str, constrained: int) -> float:
    """Aggregate tokens/s of SLOTS streams started together, `constrained` of them under LONG."""
    started = time.perf_counter()
    results = await asyncio.gather(
        *(stream(http, url, secret, request(i, i < constrained)) for i in range(SLOTS))
    )
    wall = time.perf_counter() - started
    tokens = [t for _, t in results]
    if tokens != [TOKENS] * SLOTS:
        raise RuntimeError(f"a stream ended early: {tokens}")
    return sum(tokens) / wall


async def measure(url: str, secret: str, rounds: int, pairs: int) -> tuple[dict, list, list]:
    timeout = httpx.Timeout(300.0, connect=10.0)
    async with httpx.AsyncClient(timeout=timeout) as http:
        for n in CONSTRAINED_COUNTS:  # warm-up: kernels, and each grammar compiled once
            await batch(http, url, secret, n)
        rates: dict[int, list[float]] = {n: [] for n in CONSTRAINED_COUNTS}
        for _ in range(rounds):
            for n in CONSTRAINED_COUNTS:
                rates[n].append(await batch(http, url, secret, n))
        card = {"max_tokens": 48}
        await stream(http, url, secret, request(0, True, CARD) | card)  # compiles CARD
        plain, schema = [], []
        for i in range(pairs):
            plain.append(
                (await stream(http, url, secret, request(i, False) | {"max_tokens": 8}))[0]
            )
            schema.append((await stream(http, url, secret, request(i, True, CARD) | card))[0])
    return rates, plain, schema


def report(rates: dict, plain: list, schema: list, rounds: int) -> str:
    base = statistics.median(rates[0])
    rows = "\n".join(
        f"| {n} of {SLOTS} | {statistics.median(r):.0f} | {min(r):.0f}–{max(r):.0f} | "
        f"{statistics.median(r) / base:.2f} |"
        for n, r in rates.items()
    )
    p, s = statistics.median(plain) * 1000, statistics.median(schema) * 1000
    return f"""## Constrained decoding (issue 13)

Measured {harness.now_utc()} with `{harness.command_line()}`.

- Machine: {harness.machine()}
- Versions: {harness.versions("mlx", "mlx-lm", "llguidance")}

Method: benchmarks/structured.py's docstring. {SLOTS} streams of {TOKENS} tokens started
together, {rounds} rounds per configuration, alternating; grammar = a json_schema whose string
field must run past {TOKENS} tokens.

| constrained streams | aggregate tokens/s (median) | range | vs none |
|---|---:|---:|---:|
{rows}

First token, single requests alternating, {len(plain)} pairs, grammar compiled beforehand:
unconstrained median **{p:.1f} ms**, json_schema median **{s:.1f} ms** (ratio **{s / p:.2f}**).
"""


def main() -> int:
    parser = harness.parser(__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ttft-pairs", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = demo_model(Path(tmp))
        flags = ("--max-concurrency", str(SLOTS), "--max-batch-size", str(SLOTS))
        engine = start_engine(model, Path(tmp) / "engine.log", *flags)
        with harness.stopping([engine.proc]):
            url = engine.listening()
            harness.wait_for(engine.healthy, READY_TIMEOUT_S, "the engine to be healthy", 0.5)
            rates, plain, schema = asyncio.run(
                measure(url, engine.secret, args.rounds, args.ttft_pairs)
            )
    harness.publish(
        "## Constrained decoding (issue 13)",
        report(rates, plain, schema, args.rounds),
        args.write_docs,
    )
    return 0


if __name__ == "__main__":
    harness.run_script(main)
