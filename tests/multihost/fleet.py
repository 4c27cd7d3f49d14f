"""A real fleet across network namespaces: the coordinator on one host, agents on others.

Helpers for the tests in tests/multihost/: start the real processes with `Network.run`, ask the
coordinator what it knows (admin API and `mlxfleet nodes --json`), and drive bounded client load
through the gateway.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from node_agent.identity import NodeIdentity
from tests.conftest import engines_of, read_runtime, run_ok, wait_for
from tests.netns import Host, Network, unavailable_reason
from tests.stream_load import ClientLoops

MODEL = "demo"
COORDINATOR_START_S = 60.0  # imports (litellm) on 2 cores, busy with engines
STOP_S = 20.0


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "coordinator.cli", *args]


@dataclass
class AgentProc:
    """One agent process on one host, with its own MLXFLEET_HOME."""

    host: Host
    home: Path
    log: Path
    token: str
    proc: subprocess.Popen[bytes]

    @property
    def node_id(self) -> str | None:
        identity = NodeIdentity.load(self.home / "agent")
        return identity.node_id if identity else None

    def engine_pids(self) -> list[int]:
        """Engine processes this agent runs (its direct children)."""
        return sorted(engines_of(self.proc.pid))

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Fleet:
    """The processes of one multi-host fleet and how to reach them from the root namespace."""

    net: Network
    home: Path  # the coordinator's MLXFLEET_HOME
    logs: Path
    config: Path
    coordinator: subprocess.Popen[bytes] | None = None
    runtime: dict[str, Any] = field(default_factory=dict)
    key: str = ""
    agents: dict[str, AgentProc] = field(default_factory=dict)  # by a name the test picks
    coordinator_starts: int = 0

    @property
    def coord_host(self) -> Host:
        return self.net.hosts[0]

    @property
    def base(self) -> str:
        return f"http://{self.coord_host.ip}:{self.runtime['gateway_port']}"

    # Processes
    def start_coordinator(
        self, ports: tuple[int, int, int] = (0, 0, 0), env: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """Start the coordinator on host 0 and wait until this process wrote its ports."""
        self.coordinator_starts += 1
        gateway, grpc_port, enroll = ports
        log = self.logs / f"coordinator-{self.coordinator_starts}.log"
        proc = self.net.run(
            self.coord_host,
            cli(
                "coordinator",
                "--config",
                str(self.config),
                "--home",
                str(self.home),
                "--host",
                self.coord_host.ip,
                "--port",
                str(gateway),
                "--grpc-port",
                str(grpc_port),
                "--enroll-port",
                str(enroll),
            ),
            log,
            env=env,
        )
        self.coordinator = proc
        # After a kill -9 the old coordinator.json is still there: wait for this pid's.
        self.runtime = wait_for(
            lambda: _runtime_of(self.home, proc),
            COORDINATOR_START_S,
            f"the coordinator to listen (log {log})",
        )
        return self.runtime

    def start_agent(
        self,
        name: str,
        host: Host,
        token: str,
        *,
        by_address: bool = True,
        extra: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> AgentProc:
        """An agent on `host`; by_address=False leaves it to find the coordinator by mDNS."""
        home = self.logs / f"home-{name}"
        log = self.logs / f"agent-{name}.log"
        args = ["agent", "--token", token, "--home", str(home), *extra]
        if by_address:
            args += [
                "--coordinator",
                f"{self.coord_host.ip}:{self.runtime['grpc_port']}",
                "--enroll-port",
                str(self.runtime["enroll_port"]),
            ]
        agent = AgentProc(host, home, log, token, self.net.run(host, cli(*args), log, env=env))
        self.agents[name] = agent
        return agent

    def kill_coordinator(self) -> None:
        """SIGKILL the coordinator process (only it: agents and engines live elsewhere)."""
        assert self.coordinator is not None
        os.kill(self.coordinator.pid, signal.SIGKILL)
        self.coordinator.wait(STOP_S)

    def coordinator_output(self) -> str:
        log = self.logs / f"coordinator-{self.coordinator_starts}.log"
        return log.read_text(errors="replace")

    def token(self, *extra: str) -> str:
        return run_ok(cli("token", "create", "--home", str(self.home), *extra))

    # What the coordinator knows
    def _get(self, path: str, token: str) -> Any:
        """The JSON body of a GET on the gateway, or None if it is unreachable or not 200."""
        try:
            r = httpx.get(
                f"{self.base}{path}", headers={"Authorization": f"Bearer {token}"}, timeout=5
            )
        except httpx.TransportError:
            return None
        return r.json() if r.status_code == 200 else None

    def nodes(self) -> list[dict[str, Any]]:
        """`mlxfleet nodes --json`'s data, from the admin API (cheap enough to poll)."""
        body = self._get("/admin/v1/nodes", (self.home / "admin_token").read_text().strip())
        return list(body["nodes"]) if body is not None else []

    def node(self, node_id: str | None) -> dict[str, Any] | None:
        return next((n for n in self.nodes() if n["id"] == node_id), None)

    def models(self) -> list[str]:
        body = self._get("/v1/models", self.key)
        return [m["id"] for m in body["data"]] if body is not None else []

    def demo_engines(self) -> list[tuple[str, str]]:
        """(node id, "demo (state)") for every engine of the demo model the coordinator lists."""
        return [
            (n["id"], m) for n in self.nodes() for m in n["models"] if m.startswith(f"{MODEL} (")
        ]

    def agent_by_node(self, node_id: str) -> AgentProc:
        return next(a for a in self.agents.values() if a.node_id == node_id)

    def client(self, max_retries: int = 0, http: httpx.Client | None = None) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.base}/v1",
            api_key=self.key,
            max_retries=max_retries,
            timeout=httpx.Timeout(10.0, connect=3.0),
            http_client=http,
        )

    def log_tails(self, chars: int = 3000) -> str:
        parts = []
        for log in sorted(self.logs.glob("*.log")):
            parts.append(f"--- {log.name} ---\n{log.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)


@contextmanager
def coordinator_fleet(
    root: Path,
    demo_model: Path | str,
    hosts: int,
    key_name: str,
    models_toml: str = "",
    coordinator_env: Callable[[Network], dict[str, str]] | None = None,
) -> Iterator[Fleet]:
    """A `hosts`-host network with the coordinator on host 0 serving the demo model (plus
    `models_toml` in its entry) and an API key made; the caller starts the agents. Skips where
    namespaces are unavailable; prints every process log if anything inside fails.
    `demo_model`: the model's folder or a hub id; `coordinator_env(net)`: extra environment
    for the coordinator, made once the network exists."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    config = root / "fleet.toml"
    config.write_text(
        f'[[models]]\nname = "{MODEL}"\nsource = "{demo_model}"\ncontext_length = 2048\n'
        + models_toml
    )
    with Network(hosts) as net:
        f = Fleet(net, root / "coordinator", root, config)
        try:
            f.start_coordinator(env=coordinator_env(net) if coordinator_env else None)
            f.key = run_ok(cli("keys", "create", "--name", key_name, "--home", str(f.home)))
            yield f
        except BaseException:
            print(f.log_tails())
            raise


def _runtime_of(home: Path, proc: subprocess.Popen[bytes]) -> dict[str, Any] | None:
    if proc.poll() is not None:
        raise AssertionError(f"the coordinator exited with {proc.returncode}")
    runtime = read_runtime(home)
    return runtime if runtime and runtime["pid"] == proc.pid else None


@dataclass
class Outcome:
    """One logical request: start and end (monotonic), whether it succeeded, and why not."""

    started: float
    ended: float
    ok: bool
    error: str = ""


class Load(ClientLoops):
    """Client loops streaming small chat requests through the gateway until stopped.

    Bounded: each loop stops after `max_requests` or `max_s`, whichever comes first. The
    openai client retries what never started (503 with Retry-After, connection refused, no
    response headers in time); a stream that started and then broke counts as a failure.
    """

    def __init__(
        self, fleet: Fleet, loops: int = 2, max_requests: int = 300, max_s: float = 120.0
    ) -> None:
        super().__init__([()] * loops, max_s)
        self.outcomes: list[Outcome] = []
        self.statuses: dict[int, int] = {}  # HTTP status -> responses seen (retries included)
        self._max = max_requests
        self._fleet = fleet

    def successes_after(self, t: float) -> int:
        with self._lock:
            return sum(1 for o in self.outcomes if o.started >= t and o.ok)

    def failures(self) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if not o.ok]

    def started_after(self, t: float) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if o.started >= t]

    def _count(self, response: httpx.Response) -> None:
        with self._lock:
            self.statuses[response.status_code] = self.statuses.get(response.status_code, 0) + 1

    def _loop(self) -> None:
        http = httpx.Client(
            event_hooks={"response": [self._count]}, timeout=httpx.Timeout(10.0, connect=3.0)
        )
        # Enough retries (Retry-After: 2 s) to ride out a re-placement of about 40 s.
        client = self._fleet.client(max_retries=20, http=http)
        done = 0
        while self.running() and done < self._max:
            done += 1
            started = time.monotonic()
            try:
                stream = client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": f"count {done}"}],
                    max_tokens=8,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                chunks = list(stream)
                usage = chunks[-1].usage if chunks else None
                ok = usage is not None and usage.completion_tokens >= 1
                error = "" if ok else f"no usage in the last chunk: {chunks[-1:]}"
            except (openai.APIError, httpx.HTTPError) as exc:
                ok, error = False, f"{type(exc).__name__}: {exc}"
            with self._lock:
                self.outcomes.append(Outcome(started, time.monotonic(), ok, error))
        http.close()
