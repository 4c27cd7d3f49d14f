"""A real kernel OOM kill, end to end: coordinator, two agents and engines on 127.0.0.1.

Agent A runs its engines in a memory cgroup (--engine-memory-limit-mib); agent B has no limit.
Long prompts sent together through the gateway push A's engine over its limit, the kernel
kills it, the agent reports an OOM exit, the coordinator stores the event and places the model
again, and the gateway serves. Real processes, because the kill is the kernel's: it needs root
and a writable cgroup v1 memory controller, and is skipped without them.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path

import httpx
import pytest

from node_agent.cgroup import CGROUP_PREFIX, MIB, MemoryLimiter, memory_cgroup_dir
from tests.conftest import engines_of, wait_for
from tests.e2e.fleet import READY_TIMEOUT_S, Fleet, model_toml, running_fleet

# Measured on the demo engine: ~70 MiB resident when idle; g++ compiling MLX kernels on first
# use (a cold $TMPDIR/mlx) runs inside its cgroup and adds ~60 MiB: a cold start was killed at
# 144 MiB and survived 160 MiB. The load below needs far more (8 of its prompts peaked at
# 423 MiB without a limit); with 16 the kernel kills the engine < 1 s into it.
LIMIT_MIB = 192
# Admitted sequences prefill together, 512 tokens a step, and attention holds sequences x
# 4 heads x 512 x tokens-so-far float32 scores, and as much again for their softmax: 128 MiB
# in the first step of 16, more in each later one. max_concurrency admits all 16 at once.
CONCURRENCY = 16
PROMPT_WORDS = 2100  # 3,670-3,830 tokens of the demo tokenizer: all fit its 4,096 context
WORDS = ("apple", "river", "robot", "cloud", "seven", "garden", "train", "x7q", "zz")
KILL_TIMEOUT_S = 30.0


def _cgroup_dir(pid: int) -> Path | None:
    try:
        return memory_cgroup_dir(
            Path(f"/proc/{pid}/cgroup").read_text(), Path("/proc/self/mountinfo").read_text()
        )
    except OSError:
        return None


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def cli_json(fleet: Fleet, *args: str) -> list[dict]:
    rows: list[dict] = json.loads(fleet.cli(*args, "--json"))
    return rows


def ready_on(fleet: Fleet) -> list[str]:
    """Nodes with a ready demo engine."""
    [row] = [r for r in cli_json(fleet, "models") if r["model"] == "demo"]
    return sorted(e.split(":")[0] for e in row["engines"] if e.endswith(": ready"))


def chat(fleet: Fleet, content: str, max_tokens: int) -> httpx.Response:
    return httpx.post(
        f"{fleet.base}/v1/chat/completions",
        json={
            "model": "demo",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
        },
        headers={"Authorization": f"Bearer {fleet.key}"},
        timeout=90,
    )


async def overload(fleet: Fleet, engine_pid: int) -> tuple[float, list[int | str]]:
    """Send the long prompts together; return once the engine is gone (seconds it took)
    with what each request got. None of them may hang."""
    prompts = [
        " ".join(random.Random(i).choices(WORDS, k=PROMPT_WORDS)) for i in range(CONCURRENCY)
    ]
    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:

        async def one(prompt: str) -> int | str:
            try:
                r = await client.post(
                    f"{fleet.base}/v1/chat/completions",
                    json={
                        "model": "demo",
                        "messages": [{"role": "user", "content": prompt}],
                        "max_tokens": 16,
                        "temperature": 0,
                    },
                    headers={"Authorization": f"Bearer {fleet.key}"},
                )
            except httpx.HTTPError as exc:
                return type(exc).__name__
            return r.status_code

        started = time.monotonic()
        tasks = [asyncio.create_task(one(p)) for p in prompts]
        while _alive(engine_pid) and time.monotonic() - started < KILL_TIMEOUT_S:
            await asyncio.sleep(0.05)
        took = time.monotonic() - started
        statuses = await asyncio.wait_for(asyncio.gather(*tasks), 60)
    return took, statuses


def test_an_engine_over_its_memory_limit_is_oom_killed_and_the_model_served_again(
    tmp_path_factory: pytest.TempPathFactory, demo_model: Path
) -> None:
    if MemoryLimiter.for_this_process(LIMIT_MIB * MIB) is None:
        pytest.skip("needs a writable cgroup v1 memory controller (Linux, root)")
    config = model_toml(demo_model, context_length=4096, max_concurrency=CONCURRENCY, pinned=True)
    with running_fleet(tmp_path_factory, config, agents=0, ready=()) as fleet:
        # A alone first, so the model lands on it; its larger reserve leaves B more headroom.
        limit = ("--engine-memory-limit-mib", str(LIMIT_MIB))
        a = fleet.start_agent("--role", "server", *limit, "--os-reserve-gib", "12")
        a_id = fleet.node_id(a)
        wait_for(lambda: ready_on(fleet) == [a_id], READY_TIMEOUT_S, "demo on A")
        b = fleet.start_agent("--role", "server", "--os-reserve-gib", "8")
        b_id = fleet.node_id(b)
        wait_for(
            lambda: {n["id"]: n["state"] for n in cli_json(fleet, "nodes")}.get(b_id) == "live",
            30,
            "agent B to be live",
        )
        assert chat(fleet, "hi", 2).status_code == 200  # traffic before

        [engine_pid] = engines_of(a.popen.pid)
        cgroup = _cgroup_dir(engine_pid)
        assert cgroup is not None and cgroup.name.startswith(CGROUP_PREFIX)
        engine_id = cgroup.name.removeprefix(CGROUP_PREFIX)
        memsw = cgroup / "memory.memsw.limit_in_bytes"  # only with swap accounting on
        limits = [cgroup / "memory.limit_in_bytes", *([memsw] if memsw.exists() else [])]
        assert {int(f.read_text()) for f in limits} == {LIMIT_MIB * MIB}
        idle_mib = int((cgroup / "memory.usage_in_bytes").read_text()) / MIB

        took, statuses = asyncio.run(overload(fleet, engine_pid))
        print(f"engine {engine_id} at {idle_mib:.0f} MiB idle, gone {took:.1f} s into the load")
        assert not _alive(engine_pid), f"engine survived {KILL_TIMEOUT_S:.0f} s of load"
        print(f"the long requests got {statuses}")
        # Each got an HTTP answer (none hung), and none was refused up front: all were load.
        assert all(isinstance(s, int) and not 400 <= s < 500 for s in statuses), statuses
        # The supervisor's own wait() saw SIGKILL, and the cgroup's counter the kernel's kill.
        wait_for(
            lambda: f"engine {engine_id} (demo) exited: oom (code -9)" in a.output(),
            10,
            "agent A to log the OOM exit",
        )
        detail = f"demo engine {engine_id}: oom: over its {LIMIT_MIB} MiB memory limit"
        wait_for(
            lambda: any(
                e["kind"] == "engine_exited" and e["detail"].startswith(detail)
                for e in cli_json(fleet, "events", "--node", a_id)
            ),
            10,
            "the coordinator to store the OOM exit event",
        )
        assert not cgroup.exists()  # removed once the engine was gone

        placed = wait_for(lambda: ready_on(fleet), READY_TIMEOUT_S, "demo to be placed again")
        print(f"demo placed again on {'A' if placed == [a_id] else 'B'}")
        r = chat(fleet, "back?", 3)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1
        # the kernel killed only the engine
        assert all(p.alive() for p in (fleet.coordinator, a, b))
