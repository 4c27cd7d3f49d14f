"""The tail trigger on a real fleet: quiet under a mixed-length interactive load, fired by batch
work slowing interactive requests on the same node.

Starts on 127.0.0.1, with the offline demo model: `demo` in the interactive tier and two more
models from the same files in the batch tier (`demo-batch-a`, `-b`), all pinned on one agent, and
the trigger defaults (p95/p50 > 2.8 within a band of prefilled tokens over 300 s, 20 samples at
least). The agent (and with it every engine) runs on one core of the two: on a Mac the engines
share one GPU; here, on two cores, separate engines would hardly contend (an engine's MLX work
runs on one thread), and the kernel's fair scheduler gives each busy engine its share, so it
takes two busy batch engines to slow interactive requests past 2.8x (one slows them ~2x).

- Phase 1, `--quiet-s`: two interactive loops stream chats, short and long prompts in turn, each
  made unique at its start so no prefix cache hit shortens it (the band is what the engine
  prefilled). No batch work. The trigger must stay quiet.
- Phase 2, up to `--busy-s`: the same interactive loops go on while four loops send long
  batch-tier completions (`X-Mlxfleet-Tier: batch`), two to each batch model. The trigger must
  fire (`trigger_fired` ... `tail` in the coordinator's events).

Each phase reports the client's TTFT per length (p50, p95) and the trigger's event, if any.

    python -m benchmarks.tail_trigger [--quiet-s 150] [--busy-s 120] [--write-docs]
"""

from __future__ import annotations

import json
import os
import secrets
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks import harness
from benchmarks.fleet import MODEL, Fleet, demo_model, model_toml

SECTION = "## The tail trigger on a real fleet: mixed lengths, then batch interference (issue 16)"
READY_TIMEOUT_S = harness.READY_TIMEOUT_S
SHORT = "Name a colour. "
LONG = "Summarise this note for the team: " + "the river robot walks the apple road. " * 24
INTERACTIVE_PAUSE_S = 0.15  # between one loop's requests: a person's pace, not a flood
BATCH_PROMPT = "Classify each line: " + "apple river robot lamp. " * 160
BATCH_MODELS = ("demo-batch-a", "demo-batch-b")  # the demo model again, batch tier only
BATCH_LOOPS = 4
POLL_S = 1.0
ENGINE_CPU = 1  # the clients and the coordinator keep both cores


@dataclass
class Sample:
    at: float  # time.monotonic() when sent
    kind: str  # short | long
    ttft_s: float
    prompt_tokens: int


@dataclass
class Load:
    """Client loops and what they saw; `stop` ends them after their current request."""

    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    batch_done: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self, name: str, loop: Callable[[], None]) -> None:
        def run() -> None:
            while not self.stopping.is_set():
                loop()

        thread = threading.Thread(target=run, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(120)


def interactive(f: Fleet, http: httpx.Client, load: Load, turn: list[int]) -> None:
    """One streamed chat, short and long in turn, unique from its first token."""
    turn[0] += 1
    kind = "long" if turn[0] % 2 else "short"
    text = f"[{secrets.token_hex(4)}] " + (LONG if kind == "long" else SHORT)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.monotonic()
    first: float | None = None
    prompt_tokens = 0
    try:
        with http.stream(
            "POST", f"{f.base}/v1/chat/completions", json=body,
            headers={"Authorization": f"Bearer {f.key}"},
        ) as r:  # fmt: skip
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:200]!r}")
            for line in r.iter_lines():
                data = line.removeprefix("data: ")
                if not line.startswith("data: ") or data == "[DONE]":
                    continue
                event = json.loads(data)
                if first is None and any(
                    (c.get("delta") or {}).get("content") for c in event.get("choices") or ()
                ):
                    first = time.monotonic()
                if event.get("usage"):
                    prompt_tokens = event["usage"]["prompt_tokens"]
    except (httpx.HTTPError, RuntimeError) as exc:
        with load.lock:
            load.errors.append(f"interactive: {exc}")
        return
    if first is not None:
        with load.lock:
            load.samples.append(Sample(sent, kind, first - sent, prompt_tokens))
    time.sleep(INTERACTIVE_PAUSE_S)


def batch_ready(f: Fleet) -> bool:
    """Both batch models have a ready engine (/v1/models lists only routable models)."""
    status, body = f.call("/v1/models")
    ready = {row["id"] for row in json.loads(body)["data"]} if status == 200 else set()
    return ready >= set(BATCH_MODELS)


def batch(f: Fleet, http: httpx.Client, load: Load, model: str) -> None:
    body = {
        "model": model,
        "prompt": f"[{secrets.token_hex(4)}] {BATCH_PROMPT}",
        "max_tokens": 64,
        "temperature": 0,
    }
    headers = {"Authorization": f"Bearer {f.key}", "X-Mlxfleet-Tier": "batch"}
    try:
        r = http.post(f"{f.base}/v1/completions", json=body, headers=headers)
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
    except (httpx.HTTPError, RuntimeError) as exc:
        with load.lock:
            load.errors.append(f"batch: {exc}")
        return
    with load.lock:
        load.batch_done += 1


def tail_events(f: Fleet) -> list[dict[str, object]]:
    """The coordinator's tail trigger events, oldest first."""
    events = json.loads(
        harness.cli_out("events", "--json", "--limit", "1000", "--home", str(f.home))
    )
    return [e for e in reversed(events) if str(e["detail"]).startswith("tail")]


@dataclass
class Phase:
    name: str
    seconds: float
    samples: list[Sample]
    batch_done: int
    fired: dict[str, object] | None
    fired_after_s: float | None

    def row(self) -> str:
        cells = []
        for kind in ("short", "long"):
            ttft = [s.ttft_s for s in self.samples if s.kind == kind]
            tokens = statistics.median(s.prompt_tokens for s in self.samples if s.kind == kind)
            p50, p95 = 1000 * harness.percentile(ttft, 50), 1000 * harness.percentile(ttft, 95)
            cells.append(f"{len(ttft)} × {tokens:.0f} tok: {p50:.0f} / {p95:.0f}")
        every = [s.ttft_s for s in self.samples]
        mixed = harness.percentile(every, 95) / harness.percentile(every, 50)
        fired = "no" if self.fired is None else f"**yes**, after {self.fired_after_s:.0f} s"
        return (
            f"| {self.name} | {self.seconds:.0f} | {cells[0]} | {cells[1]} | {mixed:.2f} | "
            f"{self.batch_done} | {fired} |"
        )


def run_phase(
    f: Fleet, load: Load, name: str, seconds: float, until_fired: bool, since: float
) -> Phase:
    start = time.monotonic()
    first_sample = len(load.samples)
    fired: dict[str, object] | None = None
    batch_before = load.batch_done
    while time.monotonic() - start < seconds:
        time.sleep(POLL_S)
        fired_now = [e for e in tail_events(f) if float(e["ts"]) > since]  # type: ignore[arg-type]
        fired_now = [e for e in fired_now if "fired" in str(e["kind"])]
        if fired_now and fired is None:
            fired = fired_now[0]
            if until_fired:
                break
    elapsed = time.monotonic() - start
    with load.lock:
        samples = load.samples[first_sample:]
        done = load.batch_done - batch_before
    after = None if fired is None else float(fired["ts"]) - since  # type: ignore[arg-type]
    return Phase(name, elapsed, samples, done, fired, after)


def report(phases: list[Phase], errors: list[str]) -> str:
    rows = "\n".join(p.row() for p in phases)
    readings = "\n".join(
        f"- {p.name}: `{p.fired['detail']}`" for p in phases if p.fired is not None
    )
    return f"""{SECTION}

Measured {harness.now_utc()} with `{harness.command_line()}`.

- Machine: {harness.machine()}
- Versions: {harness.versions("mlx", "mlx-lm", "litellm")}

Method: benchmarks/tail_trigger.py's docstring. One interactive and two batch engines on one
agent held to one core; interactive streamed chats alternate a short and a long prompt (unique
from their first token, so every token is prefilled); TTFT at the client, p50 / p95 in ms. "All
lengths p95/p50" is what the trigger measured before issue 16 (every interactive request
together). The demo model is so small that its 32- and 302-token prompts take the same time
here: the mixed-length case that matters is the GPU's below and tests/e2e/test_triggers.py.

| phase | s | short: n × tokens: p50 / p95 | long | all lengths p95/p50 | batch req. | fired |
|---|---:|---|---|---:|---:|---|
{rows}

The trigger's reading when it fired:
{readings or "- (it did not fire)"}

Client errors: {len(errors)}{"" if not errors else " (" + "; ".join(errors[:3]) + ")"}.
Target: phase 1 quiet, phase 2 fired.
"""


def main() -> int:
    parser = harness.parser(__doc__ or "")
    parser.add_argument("--quiet-s", type=float, default=150.0)
    parser.add_argument("--busy-s", type=float, default=120.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tail-trigger-") as tmp:
        work = Path(tmp)
        model = demo_model(work)
        config = model_toml(model, tiers=["interactive"], pinned=True) + "".join(
            f'[[models]]\nname = "{name}"\nsource = "{model}"\ntiers = ["batch"]\npinned = true\n'
            for name in BATCH_MODELS
        )
        with Fleet(work, config) as f, httpx.Client(timeout=120) as http:
            agent = f.start_agent("agent", "--role", "server")
            # One core for the agent and the engines it starts (they inherit it): both tiers'
            # engines share one compute unit, as both share a Mac's one GPU. Set before the
            # agent has enrolled, so before any engine exists.
            os.sched_setaffinity(agent.proc.popen.pid, {ENGINE_CPU})
            harness.wait_for(
                lambda: f.ready_engines() == 1 and batch_ready(f), READY_TIMEOUT_S, "3 engines"
            )
            load = Load()
            for i in range(2):
                turn = [i]
                load.start(f"interactive-{i}", lambda t=turn: interactive(f, http, load, t))
            since = time.time()
            quiet = run_phase(f, load, "1: mixed lengths, no batch", args.quiet_s, False, since)
            print(quiet.row(), flush=True)
            for i in range(BATCH_LOOPS):
                name = BATCH_MODELS[i % len(BATCH_MODELS)]
                load.start(f"batch-{i}", lambda m=name: batch(f, http, load, m))
            since = time.time()
            busy = run_phase(f, load, "2: the same + batch work", args.busy_s, True, since)
            print(busy.row(), flush=True)
            load.stop()
    harness.publish(SECTION, report([quiet, busy], load.errors), args.write_docs)
    return 0 if quiet.fired is None and busy.fired is not None else 1


if __name__ == "__main__":
    harness.run_script(main)
