"""What the Anthropic Messages and Responses adapters add to the time to first token, over the
plain chat route, in the same run: 1 and 16 concurrent streams through the real gateway.

Starts a coordinator and an agent with its demo engine (16 slots), then interleaves the three
routes (chat, messages, responses) request by request at 1 stream (the order rotating each
turn), and mixes them within each wave of 16 concurrent streams (positions rotating), so the
routes' streams share the engine's batch steps; same prompts, greedy. TTFT is the time to
the first event carrying answer text in the route's own shape (delta.content, text_delta,
response.output_text.delta), read from raw SSE lines the same way for all three. Also times
the adapters' own work per request in-process (mapping the body, checking it, translating a
32-chunk stream), which is what the end-to-end difference is made of.

    python -m benchmarks.dialects [--rounds 8] [--write-docs]
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from benchmarks import harness
from benchmarks.fleet import MODEL, Fleet, demo_model, model_toml
from benchmarks.gateway_overhead import PROMPTS, diff_ci, pct
from mlxfleet.dialects.anthropic_answer import MessagesStream
from mlxfleet.dialects.anthropic_request import parse_messages_request
from mlxfleet.dialects.responses_answer import ResponsesStream
from mlxfleet.dialects.responses_request import parse_responses_request
from mlxfleet.openai.protocol import parse_chat_request
from mlxfleet.openai.responses import SSE_DONE, ResponseHeader, Usage, chunk, sse

SECTION = "## API dialects (issue 14)"
SLOTS = 16
MAX_TOKENS = 32
REQUEST_TIMEOUT_S = 120.0
TARGET_MS = 1.0  # issue 14: each adapter adds <= 1 ms to p50 TTFT
ROUTES = ("chat", "messages", "responses")


def body(route: str, prompt: str) -> tuple[str, dict]:
    """The route's path and its body for one greedy streamed request."""
    if route in ("chat", "messages"):  # the same body: both take messages and max_tokens
        path = "/v1/chat/completions" if route == "chat" else "/v1/messages"
        return path, {
            "model": MODEL,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "stream": True,
        }
    return "/v1/responses", {
        "model": MODEL,
        "input": prompt,
        "max_output_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
    }


def has_text(route: str, data: dict) -> bool:
    if route == "chat":
        return any(c.get("delta", {}).get("content") for c in data.get("choices") or ())
    if route == "messages":
        return data.get("type") == "content_block_delta" and bool(data["delta"].get("text"))
    return data.get("type") == "response.output_text.delta" and bool(data.get("delta"))


async def one_stream(
    session: aiohttp.ClientSession, base: str, key: str, route: str, prompt: str
) -> float:
    """Milliseconds to the first answer text of one streamed request on `route`."""
    path, payload = body(route, prompt)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    start = time.perf_counter()
    ttft = None
    async with session.post(base + path, data=json.dumps(payload), headers=headers) as r:
        if r.status != 200:
            raise RuntimeError(f"{route}: HTTP {r.status}: {(await r.read())[:300]!r}")
        async for raw in r.content:
            if ttft is None and raw.startswith(b"data: {") and has_text(route, json.loads(raw[6:])):
                ttft = (time.perf_counter() - start) * 1e3
    if ttft is None:
        raise RuntimeError(f"{route}: the stream had no answer text")
    return ttft


async def measure(
    f: Fleet, rounds: int
) -> tuple[dict[tuple[str, int], list[float]], list[dict[str, list[float]]]]:
    results: dict[tuple[str, int], list[float]] = {(r, c): [] for r in ROUTES for c in (1, 16)}
    waves: list[dict[str, list[float]]] = []  # each 16-stream wave's TTFTs by route
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def batch(route: str, concurrency: int, offset: int) -> list[float]:
            prompts = [PROMPTS[(offset + i) % len(PROMPTS)] for i in range(concurrency)]
            jobs = (one_stream(session, f.base, f.key, route, p) for p in prompts)
            return list(await asyncio.gather(*jobs))

        async def mixed_wave(turn: int) -> None:
            """16 streams in one engine batch, the routes taking turns by position: each
            route's streams meet the same engine steps, so their TTFTs differ only by what
            happens outside the engine."""
            routes = [ROUTES[(i + turn) % 3] for i in range(16)]
            prompts = [PROMPTS[(turn + i) % len(PROMPTS)] for i in range(16)]
            pairs = zip(routes, prompts, strict=True)
            jobs = (one_stream(session, f.base, f.key, r, p) for r, p in pairs)
            wave: dict[str, list[float]] = {r: [] for r in ROUTES}
            for route, ttft in zip(routes, await asyncio.gather(*jobs), strict=True):
                results[(route, 16)].append(ttft)
                wave[route].append(ttft)
            waves.append(wave)

        print("warming up ...", file=sys.stderr)
        for route in ROUTES:
            await batch(route, 1, 0)
            await batch(route, 16, 0)
        # Interleaved request by request at 1 stream (the order rotating each turn), mixed
        # within each wave at 16: drift in the machine's speed falls on the routes alike.
        for turn in range(rounds * 24):
            for route in ROUTES[turn % 3 :] + ROUTES[: turn % 3]:
                results[(route, 1)] += await batch(route, 1, turn)
        print("  1 stream: done", file=sys.stderr)
        for turn in range(rounds * 4):
            await mixed_wave(turn)
        print("  16 streams: done", file=sys.stderr)
    return results, waves


def adapter_cost_us(repeats: int = 2000) -> dict[str, tuple[float, float]]:
    """In-process microseconds per request: (map + check the body, translate 32 chunks)."""
    header = ResponseHeader("chat", "chatcmpl-x", 1, MODEL)
    events = [sse(chunk(header, "", first=True, prompt_tokens=20))]
    events += [sse(chunk(header, f"word{i} ", token_ids=[i])) for i in range(MAX_TOKENS)]
    events += [sse(chunk(header, "", "length", usage=Usage(20, MAX_TOKENS))), SSE_DONE]
    out = {}
    for route in ("messages", "responses"):
        _, payload = body(route, PROMPTS[0])
        start = time.perf_counter()
        for _ in range(repeats):
            if route == "messages":
                parse_chat_request(parse_messages_request(payload).chat)
            else:
                parse_chat_request(parse_responses_request(payload).chat)
        parse_us = (time.perf_counter() - start) / repeats * 1e6
        start = time.perf_counter()
        for _ in range(repeats // 10):
            translator = (
                MessagesStream(MODEL) if route == "messages" else ResponsesStream(MODEL, {}, False)
            )
            for event in events:
                translator.feed(event)
        out[route] = (parse_us, (time.perf_counter() - start) / (repeats // 10) * 1e6)
    return out


def paired(waves: list[dict[str, list[float]]], route: str) -> tuple[float, float, float]:
    """Median over waves of (the wave's median TTFT on `route` − on chat), and its 95 %
    bootstrap interval over waves: the streams of one wave met the same engine steps."""
    diffs = [statistics.median(w[route]) - statistics.median(w["chat"]) for w in waves]
    rng = random.Random(0)
    boot = sorted(statistics.median(rng.choices(diffs, k=len(diffs))) for _ in range(2000))
    return statistics.median(diffs), boot[50], boot[1949]


def report(
    results: dict[tuple[str, int], list[float]],
    waves: list[dict[str, list[float]]],
    cost: dict,
    rounds: int,
) -> str:
    rows = [
        "| streams | route | n | TTFT p50 (ms) | TTFT p95 (ms) | p50 − chat (ms) | 95 % interval |"
    ]
    rows.append("|---:|---|---:|---:|---:|---:|---|")
    verdicts = []
    for c in (1, 16):
        chat = results[("chat", c)]
        for route in ROUTES:
            s = results[(route, c)]
            diff, interval = "", ""
            if route != "chat":
                d = pct(s, 50) - pct(chat, 50)
                lo, hi = diff_ci(s, chat)
                diff, interval = f"**{d:+.2f}**", f"{lo:+.2f} … {hi:+.2f}"
                verdicts.append(f"{route} at {c}: {'met' if d <= TARGET_MS else 'NOT met'}")
            p50, p95 = pct(s, 50), pct(s, 95)
            rows.append(
                f"| {c} | {route} | {len(s)} | {p50:.2f} | {p95:.2f} | {diff} | {interval} |"
            )
    pairs = "; ".join(
        f"{route} **{d:+.2f} ms** ({lo:+.2f} … {hi:+.2f})"
        for route in ROUTES[1:]
        for d, lo, hi in [paired(waves, route)]
    )
    costs = "; ".join(
        f"{route}: body {p:.0f} µs, {MAX_TOKENS}-chunk stream {t:.0f} µs "
        f"({t / (MAX_TOKENS + 3):.1f} µs per event)"
        for route, (p, t) in cost.items()
    )
    return f"""{SECTION}

Measured {harness.now_utc()} with `{harness.command_line()}`.

- Machine: {harness.machine()}
- Versions: {harness.versions("mlx", "mlx-lm", "aiohttp")}

Method: benchmarks/dialects.py's docstring. One coordinator, one agent, one demo engine with
{SLOTS} slots; the three routes interleaved ({rounds * 24} turns of one request each at 1
stream; at 16, {rounds * 4} waves of 16 concurrent streams that mix the three routes, 5 or 6
each, the positions rotating), greedy, {MAX_TOKENS} tokens.

{chr(10).join(rows)}

Paired within each 16-stream wave (the wave's median TTFT on the route − on chat, median over
{len(waves)} waves, 95 % interval): {pairs}.

Target ≤ {TARGET_MS:.0f} ms added to p50 TTFT: {", ".join(verdicts)}. The adapters' own work,
in-process: {costs}.
"""


def main() -> int:
    parser = harness.parser(__doc__)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    cost = adapter_cost_us()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = demo_model(workdir)
        config = model_toml(model, max_concurrency=SLOTS, context_length=2048)
        with Fleet(workdir, config) as f:
            f.start_agent("agent")
            harness.wait_for(f.routable, harness.READY_TIMEOUT_S, "the demo model to be routable")
            results, waves = asyncio.run(measure(f, args.rounds))
    harness.publish(SECTION, report(results, waves, cost, args.rounds), args.write_docs)
    return 0


if __name__ == "__main__":
    harness.run_script(main)
