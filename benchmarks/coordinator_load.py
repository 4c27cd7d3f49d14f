"""Coordinator under load: CPU and memory with many simulated agents on their control streams.

Starts the real coordinator on 127.0.0.1 (no models), makes one join token for all agents, then
starts worker processes (this script with --worker) that each run a share of the agents with
the production client code: `enroll()` (pinned TLS, CSR, certificate) and then `Session`, the
agent's mutual-TLS control stream (Hello, then a NodeStatus every second). Once every agent is
live, the coordinator's CPU is measured over a steady window. Every process it starts is
stopped at the end, also on error or Ctrl-C.

    python -m benchmarks.coordinator_load [--agents 500 --procs 4 --window 30] [--write-docs]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import harness
from benchmarks.fleet import Fleet

SECTION = "## Coordinator under 500 agents (issue 3)"
TARGET_CORES = 0.5  # issue 3: the coordinator holds 500 agents on at most half a core
GIB = 2**30
RECONNECT_S = 1.0  # a worker's agent whose stream broke dials again after this (counted)


# Processes


def rss_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def threads(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


def established(port: int) -> int:
    """TCP connections in ESTABLISHED state whose local port is `port` (the server side)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


def node_states(home: Path) -> dict[str, int]:
    """State -> count, from the admin API via `mlxfleet nodes --json` (what an operator sees)."""
    counts: dict[str, int] = {}
    for node in json.loads(harness.cli_out("nodes", "--home", str(home), "--json")):
        counts[node["state"]] = counts.get(node["state"], 0) + 1
    return counts


# Worker: a share of the simulated agents in one process


def worker_main(args: argparse.Namespace) -> None:
    """Speaks JSON lines on stdout; reads commands (go, report) on stdin; exits on EOF."""
    from coordinator.cli import run_loop

    run_loop(_worker(args))


def _emit(**message: Any) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def _worker(args: argparse.Namespace) -> None:
    import grpc

    from mlxfleet.facts import NodeFacts
    from mlxfleet.join import JoinToken
    from node_agent.coordinator_client import Session, enroll
    from node_agent.probes.base import NodeReading

    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[str] = asyncio.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(commands.put_nowait, line.strip())
        loop.call_soon_threadsafe(commands.put_nowait, "eof")

    threading.Thread(target=read_stdin, daemon=True).start()
    token = JoinToken.parse(args.token)
    # 24 GiB available, 2 GiB wired, no swap or compression, normal, nominal, on AC, no OOM.
    reading = NodeReading(24 * GIB, 0, 2 * GIB, 0, "normal", "nominal", "ac", False, 0)
    heartbeats = 0
    breaks = 0

    def read() -> NodeReading:  # the probe: a fixed reading; counts heartbeats sent
        nonlocal heartbeats
        heartbeats += 1
        return reading

    def facts(i: int) -> NodeFacts:  # 32 GiB, 8 P-cores, 19 GPU cores, 200 GB/s, 24 GiB wired
        chip = ("Apple M2 Pro", "macOS 15.1", 32 * GIB, 8, 19, 200.0, 24 * GIB, "server")
        return NodeFacts(f"sim-{args.index}-{i}", *chip)

    async def hold(session: Session) -> None:
        nonlocal breaks
        while True:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await session.run(lambda _command: None)
            breaks += 1  # the stream ended: a real agent reconnects after a backoff
            await asyncio.sleep(RECONNECT_S)

    _emit(ready=True)
    while (command := await commands.get()) != "go":
        if command == "eof":
            return
    gate = asyncio.Semaphore(args.enroll_concurrency)
    latencies: list[float] = []
    failures: list[str] = []
    sessions: list[Session] = []
    tasks: list[asyncio.Task[None]] = []
    first_start = time.time()

    async def one(i: int) -> None:
        async with gate:
            start = time.perf_counter()
            try:
                identity = await enroll(args.host, args.enroll_port, token, "", facts(i))
            except Exception as exc:  # reported, not fatal: the parent checks the count
                failures.append(f"{type(exc).__name__}: {exc}")
                return
            latencies.append(time.perf_counter() - start)
        session = Session(f"{args.host}:{args.grpc_port}", identity, facts(i), read, list, dict)
        sessions.append(session)
        tasks.append(asyncio.create_task(hold(session)))

    await asyncio.gather(*(one(i) for i in range(args.count)))
    _emit(
        enrolled=latencies,
        failures=failures[:5],
        failed=len(failures),
        start=first_start,
        end=time.time(),
    )
    while True:
        command = await commands.get()
        if command == "eof":
            break
        if command == "report":
            _emit(
                connected=sum(s.connected.is_set() for s in sessions),
                heartbeats=heartbeats,
                breaks=breaks,
                at=time.monotonic(),
            )
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# Parent


@dataclass
class Worker:
    proc: harness.Proc
    count: int
    lines: queue.Queue[dict[str, Any]] = field(default_factory=queue.Queue)

    def start_reader(self) -> None:
        def pump() -> None:
            assert self.proc.popen.stdout is not None
            for raw in self.proc.popen.stdout:
                with contextlib.suppress(ValueError):
                    self.lines.put(json.loads(raw))
            self.lines.put({"exited": self.proc.popen.poll()})

        threading.Thread(target=pump, daemon=True).start()

    def send(self, line: str) -> None:
        assert self.proc.popen.stdin is not None
        self.proc.popen.stdin.write(line.encode() + b"\n")
        self.proc.popen.stdin.flush()

    def expect(self, key: str, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"worker: no {key!r} in {timeout_s:.0f} s\n{self.proc.tail()}")
            try:
                message = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if "exited" in message:
                raise RuntimeError(f"worker exited ({message['exited']})\n{self.proc.tail()}")
            if key in message:
                return message

    def report(self) -> dict[str, Any]:
        self.send("report")
        return self.expect("connected", 30)


@dataclass
class Results:
    agents: int
    procs: int
    enroll_concurrency: int
    enroll_total_s: float = 0.0
    enroll_latencies: list[float] = field(default_factory=list)
    enroll_failed: int = 0
    enroll_cpu_s: float = 0.0
    connect_all_s: float = 0.0
    states_before: dict[str, int] = field(default_factory=dict)
    states_after: dict[str, int] = field(default_factory=dict)
    streams_before: int = 0
    streams_after: int = 0
    window_s: float = 0.0
    coord_cpu_s: float = 0.0
    workers_cpu_s: float = 0.0
    heartbeats: int = 0
    breaks: int = 0
    rss: tuple[float, float] = (0.0, 0.0)
    rss_idle: float = 0.0
    coord_threads: int = 0
    idle_cores: float = 0.0


def run(args: argparse.Namespace, workdir: Path) -> Results:
    logs = workdir / "logs"
    logs.mkdir()
    res = Results(args.agents, args.procs, args.enroll_concurrency)
    workers: list[Worker] = []
    with Fleet(workdir, api_key=False) as f, harness.stopping([]) as worker_procs:
        home, runtime, pid = f.home, f.runtime, f.coordinator.popen.pid
        token = f.new_token("--uses", str(args.agents), "--ttl", "1h")
        # Idle baseline: the coordinator with no agents (its reconcile loop ticks regardless).
        before, t0 = harness.cpu_s(pid), time.monotonic()
        time.sleep(args.idle)
        res.idle_cores = (harness.cpu_s(pid) - before) / (time.monotonic() - t0)
        res.rss_idle = rss_mib(pid)[0]
        shares = [
            args.agents // args.procs + (i < args.agents % args.procs) for i in range(args.procs)
        ]
        for i, count in enumerate(shares):
            argv = [sys.executable, "-m", "benchmarks.coordinator_load", "--worker"]
            argv += ["--index", str(i), "--count", str(count), "--host", f.host]
            argv += ["--grpc-port", str(runtime["grpc_port"])]
            argv += ["--enroll-port", str(runtime["enroll_port"]), "--token", token]
            argv += ["--enroll-concurrency", str(args.enroll_concurrency)]
            proc = harness.Proc(argv, logs / f"worker-{i}.log", stdout_pipe=True, stdin_pipe=True)
            worker_procs.append(proc)
            w = Worker(proc, count)
            w.start_reader()
            workers.append(w)
        for w in workers:
            w.expect("ready", harness.START_TIMEOUT_S)  # imports done: only enrollment is timed
        print(f"enrolling {args.agents} agents from {args.procs} processes ...", file=sys.stderr)
        cpu0, go = harness.cpu_s(pid), time.monotonic()
        for w in workers:
            w.send("go")
        done = [w.expect("enrolled", args.timeout) for w in workers]
        res.enroll_cpu_s = harness.cpu_s(pid) - cpu0
        res.enroll_total_s = max(d["end"] for d in done) - min(d["start"] for d in done)
        res.enroll_latencies = [x for d in done for x in d["enrolled"]]
        res.enroll_failed = sum(d["failed"] for d in done)
        for d in done:
            for reason in d["failures"]:
                print(f"  enrollment failed: {reason}", file=sys.stderr)
        enrolled = len(res.enroll_latencies)
        print(
            f"enrolled {enrolled} in {res.enroll_total_s:.2f} s "
            f"({res.enroll_failed} failed); waiting for their streams ...",
            file=sys.stderr,
        )
        harness.wait_for(
            lambda: sum(w.report()["connected"] for w in workers) >= enrolled or None,
            args.timeout,
            f"{enrolled} control streams",
        )
        res.connect_all_s = time.monotonic() - go
        time.sleep(args.settle)  # past the connection burst: heartbeats only from here
        res.states_before = node_states(home)
        res.streams_before = established(runtime["grpc_port"])
        print(
            f"nodes before the window: {res.states_before}; "
            f"{res.streams_before} established TCP connections on the gRPC port; "
            f"measuring {args.window:.0f} s ...",
            file=sys.stderr,
        )
        reports0 = [w.report() for w in workers]
        w_cpu0 = sum(harness.cpu_s(w.proc.popen.pid) for w in workers)
        c_cpu0, t0 = harness.cpu_s(pid), time.monotonic()
        time.sleep(args.window)
        c_cpu1, t1 = harness.cpu_s(pid), time.monotonic()
        w_cpu1 = sum(harness.cpu_s(w.proc.popen.pid) for w in workers)
        reports1 = [w.report() for w in workers]
        res.rss = rss_mib(pid)
        res.coord_threads = threads(pid)
        res.window_s = t1 - t0
        res.coord_cpu_s = c_cpu1 - c_cpu0
        res.workers_cpu_s = w_cpu1 - w_cpu0
        res.heartbeats = sum(
            b["heartbeats"] - a["heartbeats"] for a, b in zip(reports0, reports1, strict=True)
        )
        res.breaks = sum(b["breaks"] for b in reports1)
        res.streams_after = established(runtime["grpc_port"])
        res.states_after = node_states(home)
    return res


# Report


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def report(res: Results, args: argparse.Namespace, command: str, when: str) -> str:
    lat_ms = [x * 1e3 for x in res.enroll_latencies]
    cores = res.coord_cpu_s / res.window_s
    worker_cores = res.workers_cpu_s / res.window_s
    live = res.states_after.get("live", 0)
    expected_hb = res.agents * res.window_s
    ok = cores <= TARGET_CORES and live == res.agents and res.enroll_failed == 0
    verdict = (
        f"**Target {'met' if ok else 'missed'}:** {cores:.3f} cores for {live} live agents "
        f"(target ≤ {TARGET_CORES} core with {res.agents} agents, all staying live)."
    )
    if live != res.agents:
        verdict += f" Only {live} of {res.agents} were live at the end of the window."
    enroll_line = (
        f"{len(lat_ms)} enrolled ({res.enroll_failed} failed) in **{res.enroll_total_s:.2f} s** "
        f"({len(lat_ms) / res.enroll_total_s:.0f} per second)"
        if lat_ms
        else "none enrolled"
    )
    rows = [
        "| measure | value |",
        "|---|---:|",
        f"| agents live before / after the window (admin API) | "
        f"{res.states_before.get('live', 0)} / {live} |",
        f"| node states after the window | {res.states_after} |",
        f"| established TCP connections on the gRPC port, before / after | "
        f"{res.streams_before} / {res.streams_after} |",
        f"| window | {res.window_s:.1f} s |",
        f"| heartbeats sent in the window (expected ≈ {expected_hb:.0f}) | {res.heartbeats} |",
        f"| streams that broke during the run | {res.breaks} |",
        f"| **coordinator CPU** (user + system) | **{cores:.3f} cores** "
        f"({res.coord_cpu_s / max(res.heartbeats, 1) * 1e6:.0f} µs per heartbeat) |",
        f"| coordinator CPU with no agents (idle baseline, {args.idle:.0f} s) | "
        f"{res.idle_cores:.3f} cores |",
        f"| coordinator RSS: idle / with agents (peak) | {res.rss_idle:.0f} / "
        f"{res.rss[0]:.0f} ({res.rss[1]:.0f}) MiB |",
        f"| coordinator threads | {res.coord_threads} |",
        f"| simulated agents' CPU ({res.procs} processes together) | {worker_cores:.3f} cores |",
    ]
    if lat_ms:
        rows += [
            f"| enrollment: total | {enroll_line} |",
            f"| enrollment latency p50 / p95 / max | {pct(lat_ms, 50):.1f} / "
            f"{pct(lat_ms, 95):.1f} / {max(lat_ms):.1f} ms |",
            f"| coordinator CPU during enrollment | {res.enroll_cpu_s:.2f} s "
            f"({res.enroll_cpu_s / len(lat_ms) * 1e3:.1f} ms per enrollment) |",
            f"| start → all {len(lat_ms)} streams connected | {res.connect_all_s:.2f} s |",
        ]
    table = "\n".join(rows)
    return f"""{SECTION}

Measured {when} with `{command}`.

- Machine: {harness.machine()}
- Versions: {harness.versions("grpcio", "protobuf", "cryptography", "uvloop")}
- Event loop: `{os.environ.get("MLXFLEET_LOOP", "uvloop")}` in the coordinator and the workers.

Method: the real coordinator (`mlxfleet coordinator --port 0 --grpc-port 0 --enroll-port 0`,
no models, on 127.0.0.1) and one join token (`mlxfleet token create --uses {res.agents}`).
{res.agents} simulated agents run in {res.procs} worker processes (this script with `--worker`),
each agent with the production client code: `enroll()` (fetches and pins the coordinator's
certificate by the token's fingerprint, sends a CSR, gets its node certificate) and then
`Session`, the agent's control stream over mutual TLS on its own gRPC channel and TCP
connection: `Hello`, then a `NodeStatus` every second from a probe that returns a fixed reading
(no engines). Enrollment runs {res.enroll_concurrency} at a time per worker
({res.enroll_concurrency * res.procs} in flight); latency is `enroll()` start → certificate,
total is the first start → the last certificate across workers (imports excluded: workers wait
for a common go). Each agent opens its stream as soon as it has its certificate. After all
streams are connected and {args.settle:.0f} s of settling, the coordinator's CPU (utime + stime
from `/proc/<pid>/stat`) is taken over a {args.window:.0f} s window: cores = CPU seconds / wall
seconds. Node states come from the admin API (`mlxfleet nodes --json`) just before and just after
the window (outside it); a node that missed heartbeats for 3 s would show as suspect.

{table}

{verdict}

On this {os.cpu_count()}-core machine the simulated agents run on the same cores as the
coordinator ({worker_cores:.2f} cores for the {res.procs} workers in the window), so the
coordinator's number is taken under that contention; on a real fleet each agent is on its own
Mac.
"""


def main() -> int:
    parser = harness.parser(__doc__)
    parser.add_argument("--agents", type=int, default=500)
    parser.add_argument("--procs", type=int, default=4, help="worker processes for the agents")
    parser.add_argument("--window", type=float, default=30.0, help="measured steady window, s")
    parser.add_argument("--settle", type=float, default=5.0, help="wait after all connect, s")
    parser.add_argument("--idle", type=float, default=5.0, help="idle baseline window, s")
    parser.add_argument(
        "--enroll-concurrency", type=int, default=4, help="enrollments in flight per worker"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="bound on each phase, s")
    # Worker mode (started by the parent).
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    parser.add_argument("--grpc-port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--enroll-port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--token", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        worker_main(args)
        return 0
    if not 1 <= args.procs <= args.agents:
        parser.error("--procs must be 1..--agents")
    command, when = harness.command_line(), harness.now_utc()
    with tempfile.TemporaryDirectory(prefix="mlxfleet-load-") as tmp:
        res = run(args, Path(tmp))
    section = report(res, args, command, when)
    harness.publish(SECTION, section, args.write_docs)
    return 0


if __name__ == "__main__":
    harness.run_script(main)
