"""The servers the benchmarks start: the real fleet (coordinator CLI and agents), a standalone
engine and mlx_lm.server, each a process in a session of its own.

One `Fleet` serves every benchmark that starts a fleet; what differs between them (the
fleet.toml, agent flags, network namespaces, one join token for several agents) is a parameter.
"""

from __future__ import annotations

import json
import re
import secrets
import socket
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    HTTP_TIMEOUT_S,
    START_TIMEOUT_S,
    Proc,
    cli,
    cli_out,
    descendants,
    http,
    read_json,
    show_logs,
    wait_for,
)

MODEL = "demo"  # the name every benchmark gives the offline demo model
MLX_LM_MODEL = "default_model"  # mlx_lm.server: any other name makes it try to load that model
LISTENING = re.compile(r"MLXFLEET_ENGINE_LISTENING port=(\d+)")  # an engine's first stdout line
MLX_LM_READY_TIMEOUT_S = 30.0  # one completion of one token


def demo_model(workdir: Path) -> Path:
    """The offline demo model (tiny, random weights), written under `workdir`."""
    from node_agent.engine.demo_model import write_demo_model  # MLX: only where it is needed

    return write_demo_model(workdir / "models" / MODEL)


def model_toml(source: Path, **fields: object) -> str:
    """A fleet.toml with one model, MODEL from `source`, and `fields` written as JSON values,
    which TOML reads alike for the strings, numbers, booleans and lists used here."""
    table = {"name": MODEL, "source": str(source), **fields}
    return "[[models]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items())


def is_engine(pid: int) -> bool:
    try:
        return b"node_agent.engine" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@dataclass
class Agent:
    home: Path  # kept across restarts, and with it the node's identity
    flags: tuple[str, ...]
    netns: str | None
    proc: Proc

    def engine_pids(self) -> list[int]:
        return [p for p in descendants(self.proc.popen.pid) if is_engine(p)]


class Fleet:
    """The real coordinator and its agents, files under `workdir`; a context manager.

    Entering starts the coordinator on free ports (home workdir/coord; its fleet.toml `config`,
    none: no models), then makes an API key (`api_key`) and, with `join_uses`, one join token
    for that many agents (otherwise each agent gets a fresh one). `host` and `netns` put the
    coordinator on that address inside that network namespace (tests.netns);
    `coordinator_flags` go to its command line (`--tls`: the gateway serves HTTPS, `tls` then
    trusts the fleet CA). Leaving stops the agents, the last started first, then the
    coordinator; when the block raised, every log's tail is shown first.
    """

    def __init__(
        self,
        workdir: Path,
        config: str | None = None,
        *,
        host: str | None = None,
        netns: str | None = None,
        api_key: bool = True,
        join_uses: int | None = None,
        coordinator_flags: tuple[str, ...] = (),
    ) -> None:
        self.workdir = workdir
        self.home = workdir / "coord"
        self.config = config
        self.host = host or "127.0.0.1"
        self._bind = ["--host", host] if host else []
        self.netns = netns
        self._api_key = api_key
        self._join_uses = join_uses
        self._coordinator_flags = coordinator_flags
        self.tls: ssl.SSLContext | None = None  # for an https gateway: trusts the fleet CA
        self.procs: list[Proc] = []  # every process started, restarted agents' included
        self.agents: list[Agent] = []  # the agents running now
        self.runtime: dict[str, Any] = {}  # coordinator.json: its real ports
        self.key = self.admin_token = self.token = ""

    def __enter__(self) -> Fleet:
        self.home.mkdir(parents=True)
        config = []
        if self.config is not None:
            (self.home / "fleet.toml").write_text(self.config)
            config = ["--config", str(self.home / "fleet.toml")]
        ports = ["--port", "0", "--grpc-port", "0", "--enroll-port", "0"]
        argv = cli("coordinator", *config, "--home", str(self.home), *self._bind, *ports)
        argv += self._coordinator_flags
        try:
            self.coordinator = self._start(argv, "coordinator", self.netns)
            runtime = self.home / "coordinator.json"
            self.runtime = wait_for(lambda: read_json(runtime), START_TIMEOUT_S, "the coordinator")
            if self.runtime.get("gateway_scheme") == "https":
                self.tls = ssl.create_default_context(cafile=self.home / "pki" / "ca.crt")
            if self._api_key:
                self.key = cli_out("keys", "create", "--name", "bench", "--home", str(self.home))
            if self._join_uses is not None:
                self.token = self.new_token("--uses", str(self._join_uses))
            self.admin_token = (self.home / "admin_token").read_text().strip()
        except BaseException:
            self.stop(failed=True)
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self.stop(failed=exc_type is not None)

    def stop(self, failed: bool = False) -> None:
        """Stop every process, the last started first; after a failure show their logs first."""
        if failed:
            show_logs(self.procs)
        for p in reversed(self.procs):
            p.stop()

    def new_token(self, *flags: str) -> str:
        """A new join token: `mlxfleet token create FLAGS`."""
        return cli_out("token", "create", "--home", str(self.home), *flags)

    def start_agent(self, name: str, *flags: str, netns: str | None = None) -> Agent:
        """`mlxfleet agent FLAGS` with home workdir/NAME, in `netns` if given, enrolling with
        this coordinator: no mDNS; outside a namespace (agents then share one network) its
        metrics on a free port."""
        own_net = [] if netns else ["--metrics-port", "0"]
        argv = cli(
            "agent", "--coordinator", f"{self.host}:{self.runtime['grpc_port']}",
            "--enroll-port", str(self.runtime["enroll_port"]),
            "--token", self.token or self.new_token(), "--no-mdns",
            "--home", str(self.workdir / name), *own_net, *flags,
        )  # fmt: skip
        agent = Agent(self.workdir / name, flags, netns, self._start(argv, name, netns))
        self.agents.append(agent)
        return agent

    def restart_agent(self, agent: Agent) -> Agent:
        """Stop `agent` (if it still runs) and start it again with its home and flags."""
        agent.proc.stop()
        self.agents.remove(agent)
        return self.start_agent(agent.home.name, *agent.flags, netns=agent.netns)

    def _start(self, argv: list[str], name: str, netns: str | None) -> Proc:
        in_netns = ["ip", "netns", "exec", netns] if netns else []
        self.procs.append(Proc([*in_netns, *argv], self.workdir / f"{name}-{len(self.procs)}.log"))
        return self.procs[-1]

    # The gateway and the admin API

    @property
    def base(self) -> str:
        """The gateway: http://HOST:PORT (https:// with --tls)."""
        scheme = self.runtime.get("gateway_scheme", "http")
        return f"{scheme}://{self.host}:{self.runtime['gateway_port']}"

    def call(
        self,
        path: str,
        body: dict | None = None,
        admin: bool = False,
        timeout_s: float = HTTP_TIMEOUT_S,
    ) -> tuple[int, bytes]:
        """GET (POST with `body`) on the gateway with the API key, or the admin token."""
        token = self.admin_token if admin else self.key
        return http(self.base + path, token, body, timeout_s, self.tls)

    def models(self) -> list[dict[str, Any]] | None:
        """/v1/models' rows (models with a ready engine); None when it did not answer 200."""
        status, body = self.call("/v1/models")
        return json.loads(body)["data"] if status == 200 else None

    def routable(self, *tiers: str) -> bool:
        """MODEL is on /v1/models, and each of `tiers` is ready there."""
        for row in self.models() or []:
            if row["id"] == MODEL:
                return all(row["mlxfleet"]["tiers"].get(t) == "ready" for t in tiers)
        return False

    def ready_engines(self) -> int:
        """MODEL's ready engines, from the admin API (what `mlxfleet models --json` prints)."""
        status, body = self.call("/admin/v1/models", admin=True)
        try:
            rows = json.loads(body)["models"] if status == 200 else []
        except (ValueError, KeyError):
            return 0
        engines = [e for row in rows if row["model"] == MODEL for e in row["engines"]]
        return sum(1 for e in engines if e.endswith(": ready"))


# Servers without a coordinator


@dataclass
class Engine:
    """A standalone `python -m node_agent.engine` serving MODEL; `url` once `listening`."""

    proc: Proc
    secret: str
    url: str = ""

    def listening(self) -> str:
        """Block until the engine prints its port (or exits); its URL."""
        assert self.proc.popen.stdout is not None
        line = self.proc.popen.stdout.readline().decode()
        match = LISTENING.search(line)
        if match is None:
            raise RuntimeError(f"engine did not start: {line!r}\n{self.proc.tail()}")
        self.url = f"http://127.0.0.1:{match.group(1)}"
        return self.url

    def healthy(self) -> bool:
        return http(f"{self.url}/health", self.secret)[0] == 200


def start_engine(model: Path, log: Path, *flags: str) -> Engine:
    """The engine on a free port with `flags`, its secret passed as the agent's supervisor
    passes it (node_agent/supervisor.py)."""
    secret = secrets.token_urlsafe(32)
    argv = [sys.executable, "-m", "node_agent.engine", "--model-path", str(model)]
    argv += ["--model-name", MODEL, "--port", "0", *flags]
    proc = Proc(argv, log, env={"MLXFLEET_ENGINE_SECRET": secret}, stdout_pipe=True)
    return Engine(proc, secret)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class MlxLm:
    """`mlx_lm.server` with its defaults on one model; `url` is http://127.0.0.1:PORT."""

    proc: Proc
    url: str

    def answers(self) -> bool:
        """Ready: it answers a real completion (its /health answers before the model is
        loaded)."""
        if self.proc.popen.poll() is not None:
            raise RuntimeError(f"mlx_lm.server exited:\n{self.proc.tail()}")
        body = {"model": MLX_LM_MODEL, "messages": [{"role": "user", "content": "hi"}]}
        url = f"{self.url}/v1/chat/completions"
        return http(url, None, {**body, "max_tokens": 1}, MLX_LM_READY_TIMEOUT_S)[0] == 200


def start_mlx_lm(model: Path, log: Path) -> MlxLm:
    port = free_port()
    argv = [sys.executable, "-m", "mlx_lm.server", "--model", str(model), "--port", str(port)]
    return MlxLm(Proc(argv, log), f"http://127.0.0.1:{port}")
