"""What every benchmark script shares: real processes, polling, machine facts, the docs file.

Scripts run as `python benchmarks/<name>.py`, so this module is imported as `harness`.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "benchmarks.md"
DOCS_INTRO = (
    "# Benchmarks\n\nNumbers measured with the scripts in benchmarks/; machine and versions "
    "beside each table.\n"
)
STOP_TIMEOUT_S = 15.0


class Proc:
    """A subprocess in its own session, output to a log file.

    `stop` ends it and every descendant (an agent's engines run in sessions of their own).
    """

    def __init__(
        self,
        args: list[str],
        log: Path,
        env: dict[str, str] | None = None,
        stdout_pipe: bool = False,
        stdin_pipe: bool = False,
    ) -> None:
        self.log = log
        self._fh = log.open("wb")
        self.popen = subprocess.Popen(
            args,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else self._fh,
            stderr=self._fh,
        )

    def stop(self) -> None:
        if self.popen.stdin is not None:
            with contextlib.suppress(OSError):
                self.popen.stdin.close()  # workers that read stdin exit on EOF
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in [self.popen.pid, *descendants(self.popen.pid)]:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(STOP_TIMEOUT_S)
                break
        self.popen.wait()
        if self.popen.stdout is not None:
            with contextlib.suppress(OSError):
                self.popen.stdout.close()
        self._fh.close()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def descendants(pid: int) -> list[int]:
    """All live descendants of a process, from /proc."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


def cli(*args: str) -> list[str]:
    """argv for `mlxfleet ARGS` run from this checkout."""
    return [sys.executable, "-m", "coordinator.cli", *args]


CLI_TIMEOUT_S = 60.0


def cli_out(*args: str) -> str:
    """What `mlxfleet ARGS` prints (a key, a token); CalledProcessError when it fails."""
    return subprocess.run(
        cli(*args), capture_output=True, text=True, check=True, cwd=REPO, timeout=CLI_TIMEOUT_S
    ).stdout.strip()


def agent_cli(
    coordinator_home: Path, runtime: dict[str, Any], home: Path, *extra: str
) -> list[str]:
    """argv for `mlxfleet agent` enrolling with a fresh join token with the coordinator whose
    real ports are `runtime` (its coordinator.json): no mDNS, metrics on a free port (several
    agents may share this machine)."""
    token = cli_out("token", "create", "--home", str(coordinator_home))
    return cli(
        "agent", "--coordinator", f"127.0.0.1:{runtime['grpc_port']}",
        "--enroll-port", str(runtime["enroll_port"]), "--token", token, "--no-mdns",
        "--home", str(home), "--metrics-port", "0", *extra,
    )  # fmt: skip


def coordinator_cli(home: Path, config: Path | None = None) -> list[str]:
    """argv for `mlxfleet coordinator` on free ports; it writes the real ones to
    HOME/coordinator.json."""
    with_config = ["--config", str(config)] if config is not None else []
    ports = ["--port", "0", "--grpc-port", "0", "--enroll-port", "0"]
    return cli("coordinator", *with_config, "--home", str(home), *ports)


def wait_for(check: Callable[[], T | None], timeout_s: float, what: str, poll_s: float = 0.1) -> T:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(poll_s)
    raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def mlx_cache_state(tmpdir: str | None = None) -> str:
    """Whether MLX's compiled CPU kernels are cached (a cold cache adds seconds to a start)."""
    cache = Path(tmpdir or os.environ.get("TMPDIR") or tempfile.gettempdir()) / "mlx"
    files = [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []
    return f"warm ({len(files)} files in {cache})" if files else f"cold ({cache} empty/absent)"


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {ram_gib:.1f} GiB RAM, {platform.platform()}"


def versions(*packages: str) -> str:
    parts = [f"Python {platform.python_version()}"]
    for pkg in packages:
        try:
            parts.append(f"{pkg} {importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{pkg} (not installed)")
    return ", ".join(parts)


def write_docs(title: str, section: str) -> None:
    """Put `section` (which starts with `title`) into docs/benchmarks.md, replacing its
    previous version and keeping every other section."""
    text = DOCS.read_text() if DOCS.exists() else DOCS_INTRO
    start = text.find(title)
    if start == -1:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        nxt = text.find("\n## ", start + len(title))
        text = text[:start] + section + ("" if nxt == -1 else "\n" + text[nxt + 1 :])
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(text.rstrip("\n") + "\n")


def publish(title: str, section: str, write: bool) -> None:
    """Print a results section and, with --write-docs, put it into docs/benchmarks.md."""
    print(section)
    if write:
        write_docs(title, section)
        print(f"updated {DOCS}", file=sys.stderr)


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def run_script(main: Callable[[], int]) -> None:
    """Run a benchmark's main: SIGTERM unwinds like Ctrl-C, so every `with` block stops its
    processes, and either exits 130."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; all processes stopped", file=sys.stderr)
        sys.exit(130)
