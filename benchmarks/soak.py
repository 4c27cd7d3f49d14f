"""Soak: a mixed load for 30 minutes on a coordinator and two agents, an engine killed every few
minutes, and every long-lived process sampled each minute for leaks.

Starts on 127.0.0.1, with the offline demo model in both tiers (one replica each, pinned) and
two agents (`--role server`). Load, all through the gateway with one team key, each loop
bounded by the run's length:

- two loops of streamed interactive chats, one of non-streamed interactive chats;
- one loop of non-streamed batch completions (`X-Mlxfleet-Tier: batch`) and one of streamed
  batch chats;
- one loop of bad requests every 2 s (malformed JSON, an unknown model, a wrong key, a negative
  max_tokens, an unknown field), each of which must get its 4xx;
- every `--kill-every-s`, SIGKILL of one engine, the two tiers in turn.

A good request fails when it gets anything but 200, or a stream ends without [DONE] or with an
error event. Each minute: RSS, open file descriptors and threads of the coordinator and both
agents (/proc), their event loops' task counts (`mlxfleet_*_asyncio_tasks` on their /metrics),
and the SQLite store's size.

    python -m benchmarks.soak [--minutes 30] [--kill-every-s 180] [--write-docs]
"""

from __future__ import annotations

import json
import os
import re
import signal
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks import harness
from benchmarks.fleet import MODEL, Fleet, demo_model, model_toml

SECTION = "## Soak: 30 minutes of mixed load with engine kills (issue 16)"
READY_TIMEOUT_S = harness.READY_TIMEOUT_S
REQUEST_TIMEOUT_S = 180.0
BAD_EVERY_S = 2.0
METRICS_LINE = re.compile(r"metrics on http://[\d.]+:(\d+)/metrics")
TASKS = re.compile(r"^mlxfleet_(?:coordinator|agent)_asyncio_tasks (\S+)$", re.M)


@dataclass
class Tally:
    """Outcomes, by loop; shared by the load threads."""

    ok: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, loop: str, error: str | None) -> None:
        with self.lock:
            if error is None:
                self.ok[loop] += 1
            else:
                self.failed[loop] += 1
                self.errors.append(f"{loop}: {error}"[:300])


def chat_body(tier_tokens: int, stream: bool, n: int) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Soak question {n % 17}?"}],
        "max_tokens": tier_tokens,
        "temperature": 0,
        "stream": stream,
    }


def good_request(client: httpx.Client, base: str, key: str, loop: str, n: int) -> str | None:
    """One request of a load loop; None when it was answered as it should be."""
    tier = "batch" if loop.startswith("batch") else "interactive"
    headers = {"Authorization": f"Bearer {key}", "X-Mlxfleet-Tier": tier}
    stream = loop.endswith("stream")
    if loop == "batch-completions":
        path, body = "/v1/completions", {"model": MODEL, "prompt": f"soak {n}", "max_tokens": 96}
    else:
        path, body = "/v1/chat/completions", chat_body(48, stream, n)
    if not stream:
        r = client.post(base + path, json=body, headers=headers)
        return None if r.status_code == 200 else f"HTTP {r.status_code}: {r.text[:120]}"
    with client.stream("POST", base + path, json=body, headers=headers) as r:
        if r.status_code != 200:
            return f"HTTP {r.status_code}: {r.read()[:120]!r}"
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    if not lines or lines[-1] != "data: [DONE]":
        return "stream ended without [DONE]"
    if any(line.startswith('data: {"error"') for line in lines):
        return "error event"
    return None


BAD_REQUESTS = [  # (what, body bytes, key ok, expected status)
    ("malformed JSON", b"{not json", True, 400),
    ("unknown model", json.dumps(chat_body(8, False, 0) | {"model": "nope"}).encode(), True, 404),
    ("wrong key", json.dumps(chat_body(8, False, 0)).encode(), False, 401),
    ("negative max_tokens", json.dumps(chat_body(-1, False, 0)).encode(), True, 400),
    ("unknown field", json.dumps(chat_body(8, False, 0) | {"frobnicate": 1}).encode(), True, 400),
]


def bad_request(client: httpx.Client, base: str, key: str, n: int) -> str | None:
    what, body, key_ok, status = BAD_REQUESTS[n % len(BAD_REQUESTS)]
    headers = {"Authorization": f"Bearer {key if key_ok else 'mlxf-wrong'}"}
    headers["Content-Type"] = "application/json"
    r = client.post(f"{base}/v1/chat/completions", content=body, headers=headers)
    return None if r.status_code == status else f"{what}: HTTP {r.status_code}, not {status}"


def load_loop(f: Fleet, loop: str, until: float, tally: Tally) -> None:
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:
        n = 0
        while time.monotonic() < until:
            n += 1
            try:
                if loop == "bad":
                    error = bad_request(client, f.base, f.key, n)
                    time.sleep(BAD_EVERY_S)
                else:
                    error = good_request(client, f.base, f.key, loop, n)
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
            tally.add(loop, error)


@dataclass(frozen=True)
class Sample:
    minute: float
    process: str
    rss_bytes: int
    fds: int
    threads: int
    tasks: int


def proc_sample(pid: int) -> tuple[int, int, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    rss = int(fields["VmRSS"].split()[0]) * 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd")), int(fields["Threads"])


def tasks(metrics_url: str) -> int:
    found = TASKS.search(httpx.get(metrics_url, timeout=10).text)
    return int(float(found.group(1))) if found else -1


def sample(f: Fleet, minute: float, agent_metrics: list[str]) -> list[Sample]:
    out = []
    watched = [("coordinator", f.coordinator.popen.pid, f"{f.base}/metrics")]
    watched += [
        (a.home.name, a.proc.popen.pid, url) for a, url in zip(f.agents, agent_metrics, strict=True)
    ]
    for name, pid, url in watched:
        out.append(Sample(minute, name, *proc_sample(pid), tasks(url)))
    return out


def metrics_url(agent_log: Path) -> str:
    found = harness.wait_for(lambda: METRICS_LINE.search(agent_log.read_text()), 30, "metrics")
    return f"http://127.0.0.1:{found.group(1)}/metrics"


def engine_pids(f: Fleet) -> dict[str, int]:
    """tier -> engine pid, from the agents' processes (the tier is on the command line)."""
    found = {}
    for agent in f.agents:
        for pid in agent.engine_pids():
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"--tier" in argv:
                found[argv[argv.index(b"--tier") + 1].decode()] = pid
    return found


def report(samples: list[Sample], tally: Tally, kills: int, minutes: float, store: int) -> str:
    first = min(s.minute for s in samples if s.minute >= min(5.0, minutes / 2))
    last = max(s.minute for s in samples)
    rows = []
    for name in dict.fromkeys(s.process for s in samples):
        a = next(s for s in samples if s.process == name and s.minute == first)
        b = next(s for s in samples if s.process == name and s.minute == last)
        growth = 100 * (b.rss_bytes - a.rss_bytes) / a.rss_bytes
        rows.append(
            f"| {name} | {a.rss_bytes / 2**20:.0f} → {b.rss_bytes / 2**20:.0f} | "
            f"**{growth:+.1f} %** | {a.fds} → {b.fds} | {a.threads} → {b.threads} | "
            f"{a.tasks} → {b.tasks} |"
        )
    loops = "\n".join(
        f"| {loop} | {tally.ok[loop]} | **{tally.failed[loop]}** |"
        for loop in sorted(set(tally.ok) | set(tally.failed))
    )
    errors = "".join(f"\n- {e}" for e in tally.errors[:10]) or " none."
    table = "\n".join(rows)
    return f"""{SECTION}

Measured {harness.now_utc()} with `{harness.command_line()}`.

- Machine: {harness.machine()}
- Versions: {harness.versions("mlx", "mlx-lm", "litellm")}

Method: benchmarks/soak.py's docstring. {minutes:.0f} minutes, {kills} engine kills.

| loop | answered as expected | failed |
|---|---:|---:|
{loops}

Failures (first 10):{errors}

| process | RSS MiB, minute {first:.0f} → {last:.0f} | RSS growth | fds | threads | loop tasks |
|---|---:|---:|---:|---:|---:|
{table}

SQLite store at the end: {store / 1024:.0f} KiB. Targets: 0 failed requests (bad requests must
get their 4xx), RSS growth < 5 % from minute 5 to the end, no growth in fds, threads or tasks.
"""


def main() -> int:
    p = harness.parser(__doc__ or "")
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--kill-every-s", type=float, default=180.0)
    args = p.parse_args()
    tally, samples, kills = Tally(), [], 0
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        work = Path(tmp)
        model = demo_model(work)
        config = model_toml(model, tiers=["interactive", "batch"], pinned=True)
        with Fleet(work, config) as f:
            for name in ("agent-a", "agent-b"):
                f.start_agent(name, "--role", "server")
            harness.wait_for(lambda: f.ready_engines() == 2, READY_TIMEOUT_S, "both engines")
            agent_metrics = [metrics_url(a.proc.log) for a in f.agents]
            start = time.monotonic()
            until = start + args.minutes * 60
            loops = ["interactive-stream", "interactive-stream", "interactive", "bad"]
            loops += ["batch-completions", "batch-stream"]
            threads = [
                threading.Thread(target=load_loop, args=(f, loop, until, tally)) for loop in loops
            ]
            for t in threads:
                t.start()
            next_sample, next_kill, tier = start, start + args.kill_every_s, "interactive"
            while time.monotonic() < until:
                now = time.monotonic()
                if now >= next_sample:
                    samples += sample(f, (now - start) / 60, agent_metrics)
                    next_sample += 60
                    print(f"minute {(now - start) / 60:.0f}: ok {sum(tally.ok.values())}, "
                          f"failed {sum(tally.failed.values())}", flush=True)  # fmt: skip
                if now >= next_kill:
                    pid = engine_pids(f).get(tier)
                    if pid is not None:
                        os.kill(pid, signal.SIGKILL)
                        kills += 1
                    tier = "batch" if tier == "interactive" else "interactive"
                    next_kill += args.kill_every_s
                time.sleep(0.5)
            for t in threads:
                t.join(REQUEST_TIMEOUT_S)
            samples += sample(f, (time.monotonic() - start) / 60, agent_metrics)
            store = sum(p.stat().st_size for p in f.home.glob("*.sqlite3*"))
    harness.publish(SECTION, report(samples, tally, kills, args.minutes, store), args.write_docs)
    return 0


if __name__ == "__main__":
    harness.run_script(main)
