"""Shared test helpers: real processes, readiness polling, never sleeps as synchronisation."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.polling import wait_for

__all__ = ["wait_for"]  # tests import it from here

REPO = Path(__file__).resolve().parent.parent
# The coordinator's three listeners on ports the kernel picks (`coordinator.json` says which).
FREE_PORTS = ("--port", "0", "--grpc-port", "0", "--enroll-port", "0")


class Proc:
    """A real subprocess whose output goes to a log file the test can show on failure."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self._fh = log.open("wb")
        self.popen = subprocess.Popen(
            args,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM the process group (the agent's engines too), SIGKILL if it lingers."""
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        # Engines run in their own sessions: make sure none outlives the test.
        for pid in children_of(self.popen.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._fh.close()
        return self.popen.returncode


def run_ok(args: list[str], timeout_s: float = 60) -> str:
    """Run a command to completion; fail the test with its output if it fails."""
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, cwd=REPO)
    assert done.returncode == 0, f"{args} exited {done.returncode}: {done.stderr[-2000:]}"
    return done.stdout.strip()


def children_of(pid: int) -> list[int]:
    """Direct children of a process, from /proc."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def file_hashes(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file below `folder` but hidden ones (a model's files,
    compared byte for byte without trusting the code under test)."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(s.startswith(".") for s in p.relative_to(folder).parts)
    }


def engines_of(agent_pid: int) -> list[int]:
    """An agent's engine processes: those of its children that run node_agent.engine (its
    file server, node_agent/file_server.py, is a child too)."""
    engines = []
    for pid in children_of(agent_pid):
        try:
            if b"node_agent.engine" in Path(f"/proc/{pid}/cmdline").read_bytes():
                engines.append(pid)
        except OSError:
            continue
    return engines


def mlxfleet(*args: str) -> list[str]:
    return [sys.executable, "-m", "coordinator.cli", *args]


def read_runtime(home: Path) -> dict | None:
    try:
        return json.loads((home / "coordinator.json").read_text())
    except (OSError, ValueError):
        return None


def start_coordinator(
    home: Path, config: Path, log: Path, env: dict[str, str] | None = None
) -> tuple[Proc, dict]:
    """The real coordinator on 127.0.0.1 with free ports; returns it and its real ports."""
    proc = Proc(
        mlxfleet(
            "coordinator",
            "--config",
            str(config),
            "--home",
            str(home),
            *FREE_PORTS,
        ),
        log,
        env=env,
    )
    try:
        return proc, wait_for(lambda: read_runtime(home), 30, "the coordinator to listen")
    except BaseException:
        print(proc.output()[-4000:])
        proc.stop()
        raise


def start_agent(
    coordinator_home: Path,
    runtime: dict,
    agent_home: Path,
    log: Path,
    *extra: str,
    env: dict[str, str] | None = None,
) -> Proc:
    """A real agent enrolled with a fresh join token (no mDNS: it is told the address)."""
    token = run_ok(mlxfleet("token", "create", "--home", str(coordinator_home)))
    return Proc(
        mlxfleet(
            "agent",
            "--coordinator",
            f"127.0.0.1:{runtime['grpc_port']}",
            "--enroll-port",
            str(runtime["enroll_port"]),
            "--token",
            token,
            "--no-mdns",
            "--home",
            str(agent_home),
            "--metrics-port",
            "0",  # several agents share this machine
            *extra,
        ),
        log,
        env=env,
    )


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The offline demo model, written once per test session."""
    from node_agent.engine.demo_model import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("models") / "demo")


@pytest.fixture(scope="session")
def agent_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo shape trained to call a tool, think and answer JSON (tests/agent_model.py)."""
    from tests.agent_model import write_agent_model

    return write_agent_model(tmp_path_factory.mktemp("models") / "agent")


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Processes a test starts; all stopped at the end, their logs printed on failure."""
    started: list[Proc] = []
    yield started
    for p in reversed(started):
        p.stop()


@pytest.fixture(autouse=True)
def fleet_logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a failed test that used a fleet (tests/e2e, tests/multihost), print the tail of
    every process log: teardown output is otherwise hidden."""
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed > failed_before and "fleet" in request.fixturenames:
        fleet = request.getfixturevalue("fleet")
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None and hasattr(fleet, "log_tails"):
            reporter.write_line(fleet.log_tails())


@pytest.fixture(scope="session")
def demo_model_6(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model with 6 layers, enough to split over a group's 2 or 3 ranks."""
    from node_agent.engine.demo_model import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("models") / "demo6", layers=6)


@pytest.fixture(scope="session")
def demo_llama_6(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model's weights with 6 layers as a Llama, which mlx-lm runs without pipeline():
    groups of it run under mlxfleet's own layer split (node_agent/engine/layer_split.py)."""
    from node_agent.engine.demo_model import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("models") / "llama6", 6, "llama")
