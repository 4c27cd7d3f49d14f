"""How the agent starts engine processes (node_agent/spawn.py): real children, real pipes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop

from node_agent import spawn

# What a child sees of its start: the parts of the contract the supervisor relies on.
REPORT = (
    "import json, os, signal, sys\n"
    "print(json.dumps({'sid': os.getsid(0), 'pid': os.getpid(), 'secret':"
    " os.environ.get('SECRET'), 'stdin': sys.stdin.read(), 'fds': sorted(os.listdir("
    "'/proc/self/fd' if os.path.isdir('/proc/self/fd') else '/dev/fd'))}), flush=True)\n"
    "print('to the log', file=sys.stderr)\n"
)


async def test_a_child_gets_its_own_session_env_stdout_and_stderr(tmp_path: Path) -> None:
    """Needs a child process: what it sees of its own start is the contract."""
    log = tmp_path / "child.log"
    with log.open("ab") as f:
        process = await spawn.start(
            [sys.executable, "-c", REPORT], {**os.environ, "SECRET": "s3"}, f.fileno()
        )
    seen = json.loads(await process.stdout.readline())
    assert await process.wait() == 0 and process.returncode == 0
    assert seen["pid"] == process.pid and seen["sid"] == process.pid  # a session of its own
    assert seen["secret"] == "s3" and seen["stdin"] == ""  # stdin is /dev/null
    # Only 0, 1, 2 (and the descriptor listing them) crossed the exec: nothing of the agent's.
    assert len(seen["fds"]) <= 4, seen["fds"]
    assert log.read_text() == "to the log\n"
    assert await process.stdout.read() == b""  # EOF once it exited


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
async def test_the_signals_python_ignores_are_not_ignored_in_the_child() -> None:
    """Python ignores SIGPIPE and SIGXFSZ, and an ignored signal stays ignored across exec;
    the engine (or the cgroup wrapper's shell) starts with them back at their defaults."""
    process = await spawn.start(["/bin/sh", "-c", "grep SigIgn /proc/self/status"], {}, 2)
    ignored = int((await process.stdout.read()).split()[1], 16)
    assert await process.wait() == 0
    assert not ignored & (1 << (signal.SIGPIPE - 1) | 1 << (signal.SIGXFSZ - 1))


async def test_signals_and_exit_codes_read_as_asyncio_reports_them() -> None:
    """Needs child processes: their real exit statuses, as the supervisor classifies them."""
    code = "import sys, time; print('up', flush=True); time.sleep(60)"
    process = await spawn.start([sys.executable, "-c", code], dict(os.environ), 2)
    assert await process.stdout.readline() == b"up\n"
    process.send_signal(signal.SIGSTOP)  # a stopped child: SIGKILL still ends it
    process.kill()
    assert await process.wait() == -signal.SIGKILL
    with pytest.raises(ProcessLookupError):
        process.terminate()  # never a signal to a pid that may be someone else's by now
    exiting = await spawn.start([sys.executable, "-c", "raise SystemExit(3)"], {}, 2)
    assert await asyncio.wait_for(exiting.wait(), 30) == 3


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_no_descriptor_outlives_its_child(run: Callable[[Any], Any]) -> None:
    """Needs child processes, on both loops the agent may run (uvloop by default): once a
    child has exited and its stdout has reached EOF, the agent holds nothing of it."""
    fd_dir = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"

    async def one() -> None:
        process = await spawn.start(["/bin/sh", "-c", "echo hi"], {}, 2)
        assert await process.stdout.read() == b"hi\n"
        assert await process.wait() == 0
        for _ in range(3):
            await asyncio.sleep(0)  # the transport's close callbacks

    async def starts() -> tuple[int, int]:
        await one()  # the loop's own descriptors (made on first use) are open before counting
        before = len(os.listdir(fd_dir))
        for _ in range(50):
            await one()
        return before, len(os.listdir(fd_dir))

    before, after = run(starts())
    assert after == before


async def test_a_missing_program_raises_at_once() -> None:
    with pytest.raises(FileNotFoundError):
        await spawn.start(["/no/such/engine"], {}, 2)


@pytest.mark.parametrize("entry", ["coordinator.cli", "node_agent.agent"])
def test_grpc_is_imported_with_its_fork_support_off(entry: str) -> None:
    """Needs a fresh interpreter: gRPC reads GRPC_ENABLE_FORK_SUPPORT once, when imported, so
    the agent's (and the coordinator's) packages must set it before anything imports grpc."""
    code = (
        "import os, sys\n"
        "seen = []\n"
        "class Spy:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'grpc' and not seen:\n"
        "            seen.append(os.environ.get('GRPC_ENABLE_FORK_SUPPORT'))\n"
        "sys.meta_path.insert(0, Spy())\n"
        f"import {entry}\n"
        "print(seen)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "GRPC_ENABLE_FORK_SUPPORT"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['0']"
