"""HTTPS vs HTTP on the gateway: the time to first token TLS adds, at 1 and 16 streams.

Starts two fleets side by side on 127.0.0.1, each a coordinator, an agent and its demo engine
(16 slots): one gateway on plain HTTP, one on HTTPS with a fleet-CA certificate (`--tls`),
which the client verifies. Rounds alternate between them (the idle fleet gets no load) on
kept-alive connections, as the SDKs use them; at 1 stream also with a new connection per
request (a TLS handshake each time).

    python -m benchmarks.https [--rounds 10] [--requests 20] [--write-docs]
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import aiohttp

from benchmarks import harness
from benchmarks.fleet import Fleet, demo_model, model_toml
from benchmarks.gateway_overhead import PROMPTS, diff_ci, one_stream, pct

SECTION = "## HTTPS on the gateway (issue 17)"
SLOTS = 16
MAX_TOKENS = 32
REQUEST_TIMEOUT_S = 120.0
SCHEMES = ("http", "https")
# (label, concurrent streams, new connection per request)
CASES = (("1 stream", 1, False), ("16 streams", 16, False), ("1 stream, new connection", 1, True))


@contextlib.contextmanager
def two_fleets(workdir: Path) -> Iterator[dict[str, Fleet]]:
    """The same model and flags behind an HTTP and an HTTPS gateway, both routable."""
    config = model_toml(demo_model(workdir), max_concurrency=SLOTS, context_length=2048)
    with (
        Fleet(workdir / "http", config) as plain,
        Fleet(workdir / "https", config, coordinator_flags=("--tls",)) as tls,
    ):
        fleets = {"http": plain, "https": tls}
        for f in fleets.values():
            f.start_agent("agent")
        for scheme, f in fleets.items():
            harness.wait_for(f.routable, harness.READY_TIMEOUT_S, f"the {scheme} fleet's model")
        yield fleets


async def measure(
    fleets: dict[str, Fleet], rounds: int, per_round: int
) -> dict[tuple[str, str], list[float]]:
    """TTFT (ms) per (case, scheme); the order of the two schemes flips every round."""
    ttft: dict[tuple[str, str], list[float]] = {(c[0], s): [] for c in CASES for s in SCHEMES}
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    turn = 0

    async def wave(session: aiohttp.ClientSession, f: Fleet, streams: int) -> list[float]:
        nonlocal turn
        turn += 1
        prompts = [PROMPTS[(turn + i) % len(PROMPTS)] for i in range(streams)]
        jobs = (one_stream(session, f.base, f.key, p, MAX_TOKENS) for p in prompts)
        return [s.ttft_ms for s in await asyncio.gather(*jobs)]

    for label, streams, fresh in CASES:
        sessions = {
            scheme: aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=0, ssl=fleets[scheme].tls or True, force_close=fresh
                ),
                timeout=timeout,
            )
            for scheme in SCHEMES
        }
        try:
            for scheme in SCHEMES:  # warm-up: connections, engine kernels
                await wave(sessions[scheme], fleets[scheme], streams)
            waves = per_round if streams == 1 else waves_of_16(per_round)
            for r in range(rounds):
                for scheme in SCHEMES if r % 2 == 0 else SCHEMES[::-1]:
                    for _ in range(waves):
                        ttft[(label, scheme)] += await wave(
                            sessions[scheme], fleets[scheme], streams
                        )
            print(f"  {label}: done", file=sys.stderr)
        finally:
            for session in sessions.values():
                await session.close()
    return ttft


def waves_of_16(per_round: int) -> int:
    """Waves of 16 streams per round and gateway: about as long as the 1-stream requests."""
    return max(1, per_round // 5)


def report(ttft: dict[tuple[str, str], list[float]], rounds: int, per_round: int) -> str:
    rows = [
        "| case | n per scheme | HTTP p50 / p95 (ms) | HTTPS p50 / p95 (ms) "
        "| added p50 (ms) | added p95 (ms) | 95 % interval of added p50 |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for label, _, _ in CASES:
        plain, tls = ttft[(label, "http")], ttft[(label, "https")]
        lo, hi = diff_ci(tls, plain)
        rows.append(
            f"| {label} | {len(tls)} | {pct(plain, 50):.2f} / {pct(plain, 95):.2f} "
            f"| {pct(tls, 50):.2f} / {pct(tls, 95):.2f} "
            f"| **{pct(tls, 50) - pct(plain, 50):+.2f}** | {pct(tls, 95) - pct(plain, 95):+.2f} "
            f"| {lo:+.2f} … {hi:+.2f} |"
        )
    table = "\n".join(rows)
    return f"""{SECTION}

Measured {harness.now_utc()} with `{harness.command_line()}`.

- Machine: {harness.machine()}
- Versions: {harness.versions("aiohttp", "mlx", "mlx-lm")}, {ssl.OPENSSL_VERSION}

Method: benchmarks/https.py's docstring. Two fleets on 127.0.0.1, each a coordinator, an agent
and a demo engine with {SLOTS} slots; one gateway plain, one with `--tls` (a P-256 certificate
from the fleet CA, verified by the client). Streamed chat completions, greedy,
{MAX_TOKENS} tokens, {len(PROMPTS)} prompts in rotation; TTFT = send → first SSE chunk with
content. {rounds} rounds alternating the order of the two gateways; per round and gateway
{per_round} requests one after another at 1 stream, {waves_of_16(per_round)} waves of 16
concurrent streams at 16 (a wave waits for all 16).
A warm-up wave per case and gateway first. The two engines are twin processes with the same
flags, so part of a difference is theirs, not TLS's; the interval is a bootstrap over requests.

{table}
"""


def main() -> int:
    parser = harness.parser(__doc__)
    parser.add_argument("--rounds", type=int, default=10, help="alternating rounds per case")
    parser.add_argument("--requests", type=int, default=20, help="per round at 1 stream")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="mlxfleet-https-") as tmp,
        two_fleets(Path(tmp)) as fleets,
    ):
        ttft = asyncio.run(measure(fleets, args.rounds, args.requests))
    harness.publish(SECTION, report(ttft, args.rounds, args.requests), args.write_docs)
    return 0


if __name__ == "__main__":
    harness.run_script(main)
