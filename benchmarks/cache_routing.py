"""Cache-aware routing: 8 conversations x 6 turns over 2 replicas, with the gateway's prefix
affinity on and off, same run.

Each fleet is a real coordinator and two agents (`--role server`, one demo engine each, model
`replicas = 2`). The conversations advance turn by turn, two requests in flight at a time, all
sharing a team system prompt (~450 tokens) and each with its own project line; every turn
adds ~300 tokens (a file to look at), as an agent's turns do. A turn on the replica that did not
serve the turn before finds only an older turn (or the system prompt) there. A follow-up turn is a
hit when the engine reports `cached_tokens` of at least 90 % of the previous turn's prompt
(issue 15's measure). With affinity off the Router spreads turns (simple shuffle), so about half
land on the replica that holds their prefix. TTFT is to the first streamed chunk, greedy.

    python -m benchmarks.cache_routing [--conversations 8] [--turns 6] [--write-docs]
"""

from __future__ import annotations

import json
import re
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks import harness
from benchmarks.fleet import MODEL, Fleet, demo_model, model_toml

SECTION = "## Cache-aware routing (issue 15)"
MAX_TOKENS = 16
CONCURRENCY = 2  # requests in flight at once (an engine's interactive tier takes 4)
READY_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 300.0
METRICS_LINE = re.compile(r"metrics on http://[\d.]+:(\d+)/metrics")
SYSTEM = "You are the team's coding agent. " + " ".join(
    f"Rule {i}: keep answers short and cite the file." for i in range(40)
)


@dataclass(frozen=True)
class Turn:
    prompt_tokens: int
    cached_tokens: int
    ttft_s: float


def chat_turn(client: httpx.Client, base: str, key: str, messages: list[dict]) -> tuple[Turn, str]:
    """One streamed turn: its usage and TTFT, and the answer's text."""
    body = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first, text, prompt, cached = 0.0, [], 0, 0
    headers = {"Authorization": f"Bearer {key}"}
    with client.stream("POST", f"{base}/v1/chat/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            for choice in event.get("choices") or ():
                if piece := (choice.get("delta") or {}).get("content"):
                    first = first or time.perf_counter() - start
                    text.append(piece)
            if usage := event.get("usage"):
                prompt = usage["prompt_tokens"]
                cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return Turn(prompt, cached, first), "".join(text)


def question(topic: int, n: int) -> str:
    """A turn that adds as much as an agent's turn does (a file, a tool's output): ~300 tokens."""
    code = " ".join(f"x{topic}_{n}_{i} = f(x{topic}_{n}_{i - 1})" for i in range(12))
    return f"Question {n} on project {topic}: what does this do? {code}"


class Conversation:
    """One conversation's messages so far and the usage of each turn."""

    def __init__(self, topic: int) -> None:
        self.messages = [{"role": "system", "content": f"{SYSTEM} Project {topic}: the parser."}]
        self.topic = topic
        self.turns: list[Turn] = []

    def next_turn(self, client: httpx.Client, base: str, key: str) -> None:
        n = len(self.turns)
        self.messages.append({"role": "user", "content": question(self.topic, n)})
        turn, answer = chat_turn(client, base, key, self.messages)
        self.turns.append(turn)
        self.messages.append({"role": "assistant", "content": answer})


@dataclass(frozen=True)
class Result:
    affinity: bool
    hits: int
    follow_ups: int
    cached_share: float  # mean cached / prompt over follow-up turns
    ttft_first_s: float  # median over first turns
    ttft_follow_s: float  # median over follow-up turns
    served: tuple[int, ...]  # requests each engine served (its cache hits + misses)


def engine_requests(agent_log: Path) -> int:
    """Requests the agent's engine looked up in its prefix cache (hits + misses)."""
    port = METRICS_LINE.search(agent_log.read_text(errors="replace"))
    if port is None:
        raise RuntimeError(f"no metrics line in {agent_log}")
    text = httpx.get(f"http://127.0.0.1:{port.group(1)}/metrics", timeout=10).text
    names = ("mlxfleet_engine_prefix_cache_hits_total", "mlxfleet_engine_prefix_cache_misses_total")
    return sum(
        int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines() if line.startswith(names)
    )


def run_fleet(workdir: Path, model: Path, affinity: bool, conversations: int, turns: int) -> Result:
    config = f"cache_affinity = {str(affinity).lower()}\n" + model_toml(
        model, tiers=["interactive"], replicas=2, pinned=True
    )
    with Fleet(workdir, config) as f:
        for name in ("agent-a", "agent-b"):
            f.start_agent(name, "--role", "server")
        harness.wait_for(lambda: f.ready_engines() == 2, READY_TIMEOUT_S, "two ready engines")
        talks = [Conversation(topic) for topic in range(conversations)]
        # Turn by turn across the conversations, CONCURRENCY at a time: people read and type
        # between turns, so the replicas are rarely full and the Router's choice decides.
        with ThreadPoolExecutor(CONCURRENCY) as pool, httpx.Client(timeout=REQUEST_TIMEOUT_S) as c:
            for _ in range(turns):
                list(pool.map(lambda talk: talk.next_turn(c, f.base, f.key), talks))
        runs = [talk.turns for talk in talks]
        served = tuple(engine_requests(a.proc.log) for a in f.agents)
    follow = [(prev, now) for run in runs for prev, now in zip(run, run[1:], strict=False)]
    hits = sum(now.cached_tokens >= 0.9 * prev.prompt_tokens for prev, now in follow)
    return Result(
        affinity,
        hits,
        len(follow),
        statistics.fmean(now.cached_tokens / now.prompt_tokens for _, now in follow),
        statistics.median(run[0].ttft_s for run in runs),
        statistics.median(now.ttft_s for _, now in follow),
        served,
    )


def report(results: list[Result], conversations: int, turns: int) -> str:
    rows = "\n".join(
        f"| {'on' if r.affinity else 'off'} | {r.hits}/{r.follow_ups} "
        f"({100 * r.hits / r.follow_ups:.0f} %) | {100 * r.cached_share:.0f} % | "
        f"{r.ttft_first_s * 1000:.0f} | {r.ttft_follow_s * 1000:.0f} | "
        f"{' / '.join(map(str, r.served))} |"
        for r in results
    )
    return f"""{SECTION}

Measured {harness.now_utc()} with `{harness.command_line()}`.

- Machine: {harness.machine()}
- Versions: {harness.versions("mlx", "mlx-lm", "litellm")}

Method: benchmarks/cache_routing.py's docstring: {conversations} conversations x
{turns} turns over 2 replicas (one demo engine on each of two agents), affinity on and off.

| affinity | follow-ups with ≥ 90 % of the previous prompt cached | mean cached share \
| TTFT first turn, median (ms) | TTFT follow-up, median (ms) | requests per engine |
|---|---:|---:|---:|---:|---:|
{rows}

Target: ≥ 90 % of follow-up turns with affinity on (random placement gives about half).
"""


def main() -> int:
    p = harness.parser(__doc__ or "")
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=6)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="cache-routing-") as tmp:
        work = Path(tmp)
        model = demo_model(work)
        results = [
            run_fleet(work / f"fleet-{on}", model, on, args.conversations, args.turns)
            for on in (True, False)
        ]
    harness.publish(SECTION, report(results, args.conversations, args.turns), args.write_docs)
    return 0


if __name__ == "__main__":
    harness.run_script(main)
