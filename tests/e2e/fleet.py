"""One real fleet for an end-to-end module: coordinator, agents and engines on 127.0.0.1.

Every e2e module needs the same steps: write fleet.toml, start the coordinator, create a team
key, start agents, wait until the models are routable, and show the logs when anything fails.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import (
    Proc,
    children_of,
    mlxfleet,
    run_ok,
    start_agent,
    start_coordinator,
    wait_for,
)

READY_TIMEOUT_S = 120.0  # cold start on 2 cores: imports, model load, g++ kernel compile


@dataclass
class Fleet:
    base: str  # http://127.0.0.1:PORT
    key: str
    home: Path  # the coordinator's MLXFLEET_HOME
    runtime: dict  # the coordinator's real ports
    coordinator: Proc
    agents: list[Proc] = field(default_factory=list)

    @property
    def agent(self) -> Proc:
        return self.agents[0]

    def client(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key=key or self.key, max_retries=0)

    def models(self, key: str | None = None) -> dict[str, dict[str, str]]:
        """Model -> {tier: state} for the models this key sees."""
        r = httpx.get(
            f"{self.base}/v1/models", headers={"Authorization": f"Bearer {key or self.key}"}
        )
        return {m["id"]: m["mlxfleet"]["tiers"] for m in r.json()["data"]}

    def engine_pids(self) -> list[int]:
        return [pid for agent in self.agents for pid in children_of(agent.popen.pid)]

    def dump_logs(self) -> None:
        print("--- coordinator log ---\n" + self.coordinator.output()[-4000:])
        for i, agent in enumerate(self.agents):
            print(f"--- agent {i} log ---\n" + agent.output()[-4000:])


@contextlib.contextmanager
def running_fleet(
    tmp_path_factory: pytest.TempPathFactory,
    config_toml: str,
    *,
    agents: int = 1,
    agent_args: Sequence[str] = (),
    ready: Sequence[tuple[str, str]] = (("demo", "interactive"),),
    key_args: Sequence[str] = (),
) -> Iterator[Fleet]:
    """Start a fleet, wait until every (model, tier) in `ready` is routable, stop it after."""
    home = tmp_path_factory.mktemp("coord")
    config = home / "fleet.toml"
    config.write_text(config_toml)
    logs = tmp_path_factory.mktemp("logs")
    coordinator, runtime = start_coordinator(home, config, logs / "coordinator.log")
    key = run_ok(mlxfleet("keys", "create", "--name", "e2e", *key_args, "--home", str(home)))
    fleet = Fleet(f"http://127.0.0.1:{runtime['gateway_port']}", key, home, runtime, coordinator)
    try:
        for i in range(agents):
            agent_home = tmp_path_factory.mktemp(f"agent{i}")
            fleet.agents.append(
                start_agent(home, runtime, agent_home, logs / f"agent{i}.log", *agent_args)
            )
        for model, tier in ready:
            wait_for(
                lambda m=model, t=tier: fleet.models().get(m, {}).get(t) == "ready",
                READY_TIMEOUT_S,
                f"{model}/{tier} to be routable",
            )
        yield fleet
    except BaseException:
        fleet.dump_logs()
        raise
    finally:
        for agent in fleet.agents:
            agent.stop()
        coordinator.stop()
