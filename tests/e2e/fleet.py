"""One real fleet for an end-to-end module: coordinator, agents and engines on 127.0.0.1.

Every e2e module needs the same steps: write fleet.toml, start the coordinator, create team
keys, start agents, wait until the models are routable, and show the logs when anything fails.
"""

from __future__ import annotations

import contextlib
import json
import ssl
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from node_agent.identity import NodeIdentity
from tests.conftest import (
    Proc,
    engines_of,
    mlxfleet,
    run_ok,
    start_agent,
    start_coordinator,
    wait_for,
)

READY_TIMEOUT_S = 120.0  # cold start on 2 cores: imports, model load, g++ kernel compile
ENROLL_TIMEOUT_S = 30.0


@dataclass
class Fleet:
    """A running fleet as its tests see it: the gateway, the keys and the processes."""

    base: str  # http://127.0.0.1:PORT (https:// when fleet.toml has [tls])
    key: str  # the default key: every model, every tier
    home: Path  # the coordinator's MLXFLEET_HOME
    runtime: dict  # the coordinator's real ports
    coordinator: Proc
    logs: Path  # the folder of every process's log
    tmp_path_factory: pytest.TempPathFactory = field(repr=False)
    agents: list[Proc] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)  # name -> key, the extra keys
    agents_started: int = 0  # numbers each agent's home and log, restarts included
    verify: ssl.SSLContext | bool = True  # what clients trust: the fleet CA for an https base

    @property
    def agent(self) -> Proc:
        return self.agents[0]

    def client(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key=key or self.key, max_retries=0)

    def models(self, key: str | None = None) -> dict[str, dict[str, str]]:
        """Model -> {tier: state} for the models this key sees."""
        r = httpx.get(
            f"{self.base}/v1/models",
            headers={"Authorization": f"Bearer {key or self.key}"},
            verify=self.verify,
        )
        return {m["id"]: m["mlxfleet"]["tiers"] for m in r.json()["data"]}

    def wait_ready(
        self, ready: Sequence[tuple[str, str]], timeout_s: float = READY_TIMEOUT_S
    ) -> None:
        """Wait until every (model, tier) is routable with the default key."""
        for model, tier in ready:
            wait_for(
                lambda m=model, t=tier: self.models().get(m, {}).get(t) == "ready",
                timeout_s,
                f"{model}/{tier} to be routable",
            )

    def cli(self, *args: str) -> str:
        """What `mlxfleet ARGS` prints, run against this coordinator's home."""
        return run_ok(mlxfleet(*args, "--home", str(self.home)))

    def start_agent(
        self, *extra: str, home: Path | None = None, env: dict[str, str] | None = None
    ) -> Proc:
        """Start an agent and return once its node has an identity; `home` is a fresh folder
        unless given (an agent's old home restarts it as the same node)."""
        n = self.agents_started
        self.agents_started += 1
        home = home or self.tmp_path_factory.mktemp("agent")
        agent = start_agent(
            self.home, self.runtime, home, self.logs / f"agent{n}.log", *extra, env=env
        )
        self.agents.append(agent)
        self.node_id(agent)
        return agent

    def agent_home(self, agent: Proc) -> Path:
        """The MLXFLEET_HOME `agent` was started with."""
        args = list(agent.popen.args)
        return Path(args[args.index("--home") + 1])

    def node_id(self, agent: Proc) -> str:
        """The id `agent`'s node enrolled as, once it has one."""
        folder = self.agent_home(agent) / "agent"
        identity = wait_for(
            lambda: NodeIdentity.load(folder), ENROLL_TIMEOUT_S, f"{agent.log.stem} to enroll"
        )
        return identity.node_id

    def engine_pids(self) -> list[int]:
        return [pid for agent in self.agents for pid in engines_of(agent.popen.pid)]

    def log_tails(self, chars: int = 4000) -> str:
        """The end of every process log (tests/conftest.py prints it after a failed test)."""
        return "\n".join(
            f"--- {proc.log.name} ---\n" + proc.output()[-chars:]
            for proc in (self.coordinator, *self.agents)
        )


def model_toml(source: Path, name: str = "demo", **fields: object) -> str:
    """One `[[models]]` table of fleet.toml: model_toml(demo, tiers=["batch"], pinned=True)."""
    lines = ["[[models]]", f"name = {json.dumps(name)}", f"source = {json.dumps(str(source))}"]
    for key, value in fields.items():
        text = str(value).lower() if isinstance(value, bool) else json.dumps(value)
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def running_fleet(
    tmp_path_factory: pytest.TempPathFactory,
    config_toml: str,
    *,
    agents: int = 1,
    agent_args: Sequence[str] = (),
    ready: Sequence[tuple[str, str]] = (("demo", "interactive"),),
    key_args: Sequence[str] = (),
    keys: Mapping[str, Sequence[str]] | None = None,
    coordinator_env: dict[str, str] | None = None,
) -> Iterator[Fleet]:
    """Start a fleet, wait until every (model, tier) in `ready` is routable, stop it after.

    The default key is made with `key_args`; `keys` makes more (name -> args), in `Fleet.keys`.
    Agents start one at a time, each enrolled before the next, so nodes join in order.
    """
    home = tmp_path_factory.mktemp("coord")
    config = home / "fleet.toml"
    config.write_text(config_toml)
    logs = tmp_path_factory.mktemp("logs")
    coordinator, runtime = start_coordinator(
        home, config, logs / "coordinator.log", env=coordinator_env
    )
    scheme = runtime.get("gateway_scheme", "http")  # [tls] in config_toml: https
    base = f"{scheme}://127.0.0.1:{runtime['gateway_port']}"
    fleet = Fleet(base, "", home, runtime, coordinator, logs, tmp_path_factory)
    if scheme == "https":
        fleet.verify = ssl.create_default_context(cafile=home / "pki" / "ca.crt")
    try:
        fleet.key = fleet.cli("keys", "create", "--name", "e2e", *key_args)
        for name, args in (keys or {}).items():
            fleet.keys[name] = fleet.cli("keys", "create", "--name", name, *args)
        for _ in range(agents):
            fleet.start_agent(*agent_args)
        fleet.wait_ready(ready)
        yield fleet
    except BaseException:
        print(fleet.log_tails())
        raise
    finally:
        for agent in fleet.agents:
            agent.stop()
        coordinator.stop()
