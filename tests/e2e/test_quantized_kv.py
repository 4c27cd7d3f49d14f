"""A batch unit with an 8-bit KV cache, end to end: real coordinator, agent and engine.

These need the processes: the kv_bits setting must travel config → LoadModel → the agent's
argv → the engine's model thread. The demo model's head_dim is 32, so the group size is 32.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Proc, engines_of
from tests.e2e.fleet import Fleet, model_toml, running_fleet


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Fleet]:
    config = model_toml(demo_model, "long", tier="batch", kv_bits=8, kv_group_size=32, pinned=True)
    with running_fleet(
        tmp_path_factory, config, key_args=("--tiers", "batch"), ready=[("long", "batch")]
    ) as f:
        yield f


def engine_argv(agent: Proc) -> list[str]:
    """The command line of the agent's one engine process."""
    argvs = []
    for pid in engines_of(agent.popen.pid):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        if "node_agent.engine" in argv:
            argvs.append(argv)
    assert len(argvs) == 1, argvs
    return argvs[0]


def test_the_engine_runs_8_bit_kv_one_request_at_a_time(fleet: Fleet) -> None:
    argv = engine_argv(fleet.agent)
    flags = dict(zip(argv[3::2], argv[4::2], strict=False))
    assert (flags["--tier"], flags["--kv-bits"], flags["--kv-group-size"]) == ("batch", "8", "32")
    assert flags["--max-concurrency"] == "1"
    agent_home = fleet.agent_home(fleet.agent)
    logs = list(agent_home.glob("**/logs/long-*.log"))
    assert len(logs) == 1, list(agent_home.rglob("*"))
    assert "kv 8-bit, one sequence at a time" in logs[0].read_text()

    async def two() -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {fleet.key}"}
        body = {"model": "long", "prompt": "The quick brown", "max_tokens": 8, "temperature": 0}
        async with httpx.AsyncClient(base_url=fleet.base, headers=headers, timeout=90) as c:
            return list(await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in "ab")))

    first, second = asyncio.run(two())
    assert first.status_code == second.status_code == 200, first.text
    assert first.headers["X-Mlxfleet-Tier"] == "batch"
    assert first.json()["choices"][0]["text"] == second.json()["choices"][0]["text"]
    assert 0 < first.json()["usage"]["completion_tokens"] <= 8
