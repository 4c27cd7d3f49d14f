"""No request lost with a single replica: the only engine of the model is killed (kill -9),
OOM-killed by the kernel, or hung (SIGSTOP for 15 s) under streaming load.

Starts on 127.0.0.1, with the offline demo model: the real coordinator (fleet.toml: the demo
model, interactive tier, one replica, pinned) and one agent (`--role server`, its engines in a
memory cgroup of --engine-memory-limit-mib when the machine has a writable cgroup v1 memory
controller). Six client loops stream /v1/completions (temperature 0, each prompt's text known
from an uninterrupted run). Once every loop is mid-stream, the fault:

- kill: SIGKILL to the engine;
- oom: the engine's cgroup limit is lowered to just above what it uses, so the next
  allocations of its decoding streams make the kernel's OOM killer take it (the agent then
  reports an OOM exit and the replacement gets the configured limit again);
- hang: SIGSTOP to the engine, SIGCONT after 15 s if it is still there (the agent's health
  check should have killed it well before).

Then the loops go on until six streams started after the fault have completed. Every stream
must complete with its reference text; the table counts failures and mismatches and gives the
longest stall of a stream that was streaming at the fault.

    python -m benchmarks.single_replica [--runs 5] [--faults kill,oom,hang] [--write-docs]
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks import harness
from benchmarks.fleet import MODEL, Fleet, demo_model, model_toml
from node_agent.cgroup import MemoryLimiter, memory_cgroup_dir
from tests.stream_load import StreamLoad, reference_texts

SECTION = "## Single replica: kill, OOM kill and hang under load (issue 16)"
PROMPTS = [f"single replica {i}" for i in range(6)]
MAX_TOKENS = 300
AFTER_FAULT = 6  # streams started after the fault that must complete
HANG_S = 15.0
FAULT_TIMEOUT_S = 120.0
READY_TIMEOUT_S = harness.READY_TIMEOUT_S
ENGINE_LIMIT_MIB = 1024
SLOTS = "[tiers.interactive]\nmax_concurrency = 8\nmax_batch_size = 8\n"
OOM_HEADROOM_BYTES = 1 << 20  # the lowered limit: this much above what the engine uses


@dataclass(frozen=True)
class Result:
    fault: str
    streams: int
    failed: int
    mismatched: int
    longest_stall_s: float
    recovery_s: float  # fault to the first text of a stream started after it
    gone_s: float  # fault to the engine process gone (a hung one: killed by its agent)


def engine_pid(f: Fleet) -> int:
    return harness.wait_for(lambda: (f.agents[0].engine_pids() or [0])[0], 30, "the engine")


def inject(fault: str, pid: int) -> threading.Timer | None:
    if fault == "kill":
        os.kill(pid, signal.SIGKILL)
    elif fault == "hang":
        os.kill(pid, signal.SIGSTOP)
        thaw = threading.Timer(HANG_S, lambda: _signal(pid, signal.SIGCONT))
        thaw.start()
        return thaw
    else:
        cgroup = memory_cgroup_dir(
            Path(f"/proc/{pid}/cgroup").read_text(), Path("/proc/self/mountinfo").read_text()
        )
        if cgroup is None:
            raise RuntimeError("the engine runs in no memory cgroup")
        usage = int((cgroup / "memory.usage_in_bytes").read_text())
        (cgroup / "memory.limit_in_bytes").write_text(str(usage + OOM_HEADROOM_BYTES))
    return None


def long_prompt(f: Fleet) -> threading.Thread:
    """One more request whose prefill allocates far more than the lowered limit leaves (the
    attention scores of ~3,000 tokens): the kernel kills the engine. It must be answered too,
    by the engine that replaces it; `.ok` says whether it was."""

    def ask() -> None:
        status, _ = f.call(
            "/v1/completions",
            {"model": MODEL, "prompt": "apple river robot " * 600, "max_tokens": 1},
            timeout_s=FAULT_TIMEOUT_S,
        )
        worker.ok = status == 200  # type: ignore[attr-defined]

    worker = threading.Thread(target=ask)
    worker.ok = False  # type: ignore[attr-defined]
    worker.start()
    return worker


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # the agent killed it, as it should
        os.kill(pid, sig)


def run_fault(f: Fleet, fault: str, reference: dict[str, str]) -> Result:
    harness.wait_for(lambda: f.ready_engines() == 1, READY_TIMEOUT_S, "a ready engine")
    with StreamLoad(f.base, f.key, PROMPTS, MAX_TOKENS) as load:
        harness.wait_for(lambda: len(load.done()) >= len(PROMPTS), FAULT_TIMEOUT_S, "the load")
        harness.wait_for(load.all_decoding, FAULT_TIMEOUT_S, "every stream mid-decode")
        pid = engine_pid(f)
        t_fault = time.monotonic()
        thaw = inject(fault, pid)
        extra = long_prompt(f) if fault == "oom" else None
        # The fault took effect: the engine is gone (a hung one killed by its agent).
        harness.wait_for(lambda: gone(pid), HANG_S + 10, f"engine {pid} to be gone")
        gone_s = time.monotonic() - t_fault
        harness.wait_for(
            lambda: len(load.ok_started_after(t_fault)) >= AFTER_FAULT or load.failures(),
            FAULT_TIMEOUT_S + (HANG_S if fault == "hang" else 0),
            "streams started after the fault to complete",
        )
    if thaw is not None:
        thaw.join()
    extra_failed = 0
    if extra is not None:
        extra.join(FAULT_TIMEOUT_S)
        extra_failed = 0 if extra.ok else 1  # type: ignore[attr-defined]
    streams = load.done()
    stalls = [g for s in streams if (g := s.stall_after(t_fault)) is not None]
    after = [s.arrivals[0] for s in streams if s.started > t_fault and s.arrivals]
    return Result(
        fault,
        len(streams),
        sum(not s.ok for s in streams) + extra_failed,
        sum(s.ok and s.text != reference[s.prompt] for s in streams),
        max(stalls, default=0.0),
        min(after, default=float("nan")) - t_fault,
        gone_s,
    )


def report(results: list[Result], runs: int, oom: bool) -> str:
    rows = []
    for fault in dict.fromkeys(r.fault for r in results):
        rs = [r for r in results if r.fault == fault]
        rows.append(
            f"| {fault} | {len(rs)} | {sum(r.streams for r in rs)} | "
            f"**{sum(r.failed for r in rs)}** | {sum(r.mismatched for r in rs)} | "
            f"{max(r.longest_stall_s for r in rs):.2f} | "
            f"{statistics.median(r.recovery_s for r in rs):.2f} | "
            f"{max(r.gone_s for r in rs):.2f} |"
        )
    table = "\n".join(rows)
    no_oom = (
        "" if oom else "\n\nNo writable cgroup v1 memory controller here: the OOM case did not run."
    )
    return f"""{SECTION}

Measured {harness.now_utc()} with `{harness.command_line()}`.

- Machine: {harness.machine()}
- Versions: {harness.versions("mlx", "mlx-lm", "litellm")}

Method: benchmarks/single_replica.py's docstring; {runs} runs of each fault, six streaming
clients, one replica.

| fault | runs | streams | failed | text differs | max stall (s) | recovery p50 (s) | gone max (s) |
|---|---:|---:|---:|---:|---:|---:|---:|
{table}

Target: 0 failed, every text equal to an uninterrupted run's. Recovery: the fault to the first
text of a stream started after it. Gone: the fault to the engine's process being gone (read
from /proc every 50 ms); for a hang that is the agent's health check finding it and killing it,
the target being the stall limit (`--engine-stall-s`, 5 s) plus one check (1 s).{no_oom}
"""


def main() -> int:
    p = harness.parser(__doc__ or "")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--faults", default="kill,oom,hang")
    args = p.parse_args()
    oom = MemoryLimiter.for_this_process(ENGINE_LIMIT_MIB << 20) is not None
    faults = [x for x in args.faults.split(",") if x != "oom" or oom]
    limit = ["--engine-memory-limit-mib", str(ENGINE_LIMIT_MIB)] if oom else []
    results = []
    with tempfile.TemporaryDirectory(prefix="single-replica-") as tmp:
        work = Path(tmp)
        model = demo_model(work)
        # Six streams decoding together (the tier's default max_concurrency is 4).
        config = model_toml(model, tiers=["interactive"], pinned=True) + SLOTS
        with Fleet(work, config) as f:
            f.start_agent("agent", "--role", "server", *limit)
            harness.wait_for(lambda: f.ready_engines() == 1, READY_TIMEOUT_S, "the engine")
            reference = reference_texts(f.base, f.key, PROMPTS, MAX_TOKENS)
            for run in range(args.runs):
                for fault in faults:
                    result = run_fault(f, fault, reference)
                    print(f"run {run + 1} {fault}: {result}", flush=True)
                    results.append(result)
    harness.publish(SECTION, report(results, args.runs, oom), args.write_docs)
    return 0


if __name__ == "__main__":
    harness.run_script(main)
