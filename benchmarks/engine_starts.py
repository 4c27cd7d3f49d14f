"""Engine starts while the agent streams heartbeats (issue 16): how many children die before
their exec, how long a start call takes, whether the control stream survives.

Each run is one process of tests/spawn_load.py (the agent's real Session on mutual TLS with a
heartbeat every 20 ms and a command back for each, and the agent's real Supervisor start path,
on uvloop) starting `--spawns` cheap children four at a time; real engines on the demo model
would take minutes for 200 starts on 2 cores, and what can go wrong in a start happens before
the child's exec. Four configurations, `--runs` runs each, interleaved:
the agent as it is (posix_spawn, gRPC's fork support off), posix_spawn with gRPC's fork
support on (grpcio's default: its fork handlers registered), and the start path before issue 16
(asyncio.create_subprocess_exec, a fork() on uvloop) with it on and off.

    python -m benchmarks.engine_starts [--spawns 200] [--runs 5] [--write-docs]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Any

from benchmarks import harness

SECTION = "## Engine starts under a busy control stream (issue 16)"
SPAWNS = 200
RUNS = 5
RUN_TIMEOUT_S = 300.0
# (label, --spawner, --grpc-fork-support)
CONFIGS = (
    ("the agent now: posix_spawn, gRPC fork support off", "posix-spawn", "agent"),
    ("posix_spawn, gRPC fork support on", "posix-spawn", "grpc-default"),
    ("before issue 16: uvloop fork(), gRPC fork support on", "uvloop-fork", "grpc-default"),
    ("uvloop fork(), gRPC fork support off", "uvloop-fork", "agent"),
)
WIDTH = 100  # docs/benchmarks.md's line length
SIGNAL_NAMES = {"-6": "SIGABRT", "-11": "SIGSEGV", "-9": "SIGKILL (stuck before exec)"}


@dataclass
class Totals:
    spawns: int = 0
    exit_codes: dict[str, int] = field(default_factory=dict)
    spawn_ms: list[float] = field(default_factory=list)
    stream_breaks: list[str] = field(default_factory=list)
    fork_handler_lines: int = 0  # gRPC's "skipping fork() handlers", one per fork it saw
    check_failed_lines: int = 0  # a child's "Check failed" abort message
    seconds: float = 0.0
    messages_up: int = 0
    runs_with_harm: int = 0  # runs with a child killed by a signal or a broken stream

    @property
    def signalled(self) -> int:
        return sum(n for code, n in self.exit_codes.items() if int(code) < 0)

    def add(self, result: dict[str, Any], stderr: str) -> None:
        self.spawns += result["spawns"]
        for code, n in result["exit_codes"].items():
            self.exit_codes[code] = self.exit_codes.get(code, 0) + n
        self.spawn_ms += result["spawn_ms"]
        self.stream_breaks += result["stream_breaks"]
        self.fork_handler_lines += stderr.count("skipping fork() handlers")
        self.check_failed_lines += stderr.count("Check failed")
        self.seconds += result["seconds"]
        self.messages_up += result["messages_up"]
        self.runs_with_harm += bool(result["signalled"] or result["stream_breaks"])


def one_run(spawns: int, spawner: str, fork_support: str) -> tuple[dict[str, Any], str]:
    """One process of tests/spawn_load.py; its JSON result and its stderr."""
    env = {k: v for k, v in os.environ.items() if k != "GRPC_ENABLE_FORK_SUPPORT"}
    done = subprocess.run(
        [sys.executable, "-m", "tests.spawn_load", "--spawns", str(spawns)]
        + ["--spawner", spawner, "--grpc-fork-support", fork_support],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        cwd=harness.REPO,
        env=env,
    )
    if done.returncode != 0:
        raise RuntimeError(f"spawn_load {spawner} {fork_support} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def signals_text(t: Totals) -> str:
    parts = [
        f"{n} {SIGNAL_NAMES.get(code, code)}"
        for code, n in sorted(t.exit_codes.items())
        if int(code) < 0
    ]
    return f"**{t.signalled}**" + (f" ({', '.join(parts)})" if parts else "")


def report(totals: dict[str, Totals], spawns: int, runs: int, command: str, when: str) -> str:
    rows = [
        "| start path | starts | died before exec | runs with a dead child or a broken stream "
        "| stream breaks | gRPC fork-handler log lines | start call p50 (ms) | p95 (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, t in totals.items():
        rows.append(
            f"| {label} | {t.spawns:,} | {signals_text(t)} | {t.runs_with_harm} of {runs} "
            f"| {len(t.stream_breaks)} | {t.fork_handler_lines:,} "
            f"| {statistics.median(t.spawn_ms):.1f} | {percentile(t.spawn_ms, 0.95):.1f} |"
        )
    now, before = totals[CONFIGS[0][0]], totals[CONFIGS[2][0]]
    kinds = sorted({b.split(":", 1)[1].strip() for t in totals.values() for b in t.stream_breaks})
    how = f" ({'; '.join(kinds)})" if kinds else ""
    rate = sum(t.messages_up for t in totals.values()) / sum(t.seconds for t in totals.values())
    libc = " ".join(os.confstr("CS_GNU_LIBC_VERSION").split()) if sys.platform == "linux" else ""
    fixed = [label for label, _, _ in CONFIGS if label != CONFIGS[2][0]]
    harmless = all(totals[label].runs_with_harm == 0 for label in fixed)
    method = (
        "Method: each run is one process of `tests/spawn_load.py` on uvloop, as the agent runs: "
        "the agent's real `Session` holds a mutual-TLS control stream to an in-process gRPC "
        "server (a heartbeat every 20 ms plus each start's two engine events, a command back for "
        f"each: {rate:.0f} messages a second each way), and the agent's real `Supervisor` "
        f"starts {spawns} engines, 4 at a time, through its start path; each engine is `python "
        "-S -c` printing the LISTENING line and exiting 0 (real engines would take minutes "
        "here; what goes wrong in a start happens before the child's exec, whatever the child "
        "is). A child's exit is read from the supervisor's own event. "
        f"{runs} runs per start path, interleaved. gRPC fork support on: grpc imported before "
        "our packages with no GRPC_ENABLE_FORK_SUPPORT, so grpcio's build default applies and "
        "its pthread_atfork handlers are registered, as in the agent before issue 16; off: our "
        "packages' default (`node_agent/__init__.py`). Start call: the time `Supervisor.load` "
        "spends in the spawn (until the child's stdout is being read), on the event loop."
    )
    readings = [
        f"The agent now: **{now.signalled} of {now.spawns:,}** starts died before their exec; "
        f"its control stream broke {len(now.stream_breaks)} times. Before issue 16: "
        f"{before.signalled} of {before.spawns:,} died (gRPC logged `ev_epoll1_linux.cc: "
        f"Check failed: next_worker->state == KICKED` {before.check_failed_lines} times) and "
        f"the stream broke {len(before.stream_breaks)} times{how}.",
        (
            "Either change alone removed both here: posix_spawn runs no fork handlers (not one "
            "gRPC fork log line), and with gRPC's fork support off there are none to run."
            if harmless
            else "Not every other start path was clean here: see the table."
        )
        + " The agent has both; the second also covers the fork()s that remain (CPython's "
        "subprocess on macOS, e.g. the probes' commands).",
        f"The start call: p50 {statistics.median(now.spawn_ms):.1f} ms now, "
        f"{statistics.median(before.spawn_ms):.1f} ms before (posix_spawn, a clone with "
        "CLONE_VM | CLONE_VFORK, copies no page tables and runs no fork handlers).",
    ]
    return "\n".join(
        [
            SECTION,
            "",
            f"Measured {when} with `{command}`.",
            "",
            f"- Machine: {harness.machine()}",
            f"- Versions: {harness.versions('grpcio', 'uvloop')}, {libc}",
            f"- 1-minute load average at the end: {os.getloadavg()[0]:.1f}",
            "",
            textwrap.fill(method, WIDTH),
            "",
            *rows,
            "",
            "Reading:",
            *(
                textwrap.fill(r, WIDTH, initial_indent="- ", subsequent_indent="  ")
                for r in readings
            ),
            "",  # a blank line before the next section
        ]
    )


def main() -> int:
    p = harness.parser(__doc__ or "")
    p.add_argument("--spawns", type=int, default=SPAWNS)
    p.add_argument("--runs", type=int, default=RUNS)
    args = p.parse_args()
    command, when = harness.command_line(), harness.now_utc()
    totals = {label: Totals() for label, _, _ in CONFIGS}
    for run in range(args.runs):
        for label, spawner, fork_support in CONFIGS:
            result, stderr = one_run(args.spawns, spawner, fork_support)
            totals[label].add(result, stderr)
            print(
                f"run {run + 1} {label}: exits {result['exit_codes']}, "
                f"{len(result['stream_breaks'])} stream breaks",
                file=sys.stderr,
            )
    harness.publish(SECTION, report(totals, args.spawns, args.runs, command, when), args.write_docs)
    return 0


if __name__ == "__main__":
    harness.run_script(main)
