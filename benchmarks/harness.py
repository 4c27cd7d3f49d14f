"""What every benchmark script shares: real processes, polling, machine facts, the docs file.

Scripts run from the repository root as `python -m benchmarks.<name>`; the fleet they start
is in `benchmarks.fleet`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import signal
import ssl
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tests.polling import wait_for

__all__ = ["wait_for"]  # benchmarks call harness.wait_for

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "benchmarks.md"
DOCS_INTRO = (
    "# Benchmarks\n\nNumbers measured with the scripts in benchmarks/; machine and versions "
    "beside each table.\n"
)
STOP_TIMEOUT_S = 15.0
START_TIMEOUT_S = 60.0  # a coordinator or an agent process to come up
READY_TIMEOUT_S = 180.0  # cold engine starts on 2 cores: imports, model load, kernels
HTTP_TIMEOUT_S = 5.0


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
        if self._fh.closed:
            return  # stopped before (an agent restarted, then the whole fleet)
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


def show_logs(procs: list[Proc]) -> None:
    """Each process's log tail on stderr, after a failure."""
    for p in procs:
        print(f"--- {p.log.name} ---\n{p.tail()}", file=sys.stderr)


@contextlib.contextmanager
def stopping(procs: list[Proc]) -> Iterator[list[Proc]]:
    """Stop every process put into `procs`, the last started first, when the block ends; when
    it raised, show each one's log tail first."""
    try:
        yield procs
    except BaseException:
        show_logs(procs)
        raise
    finally:
        for p in reversed(procs):
            p.stop()


def percentile(values: list[float], percent: float) -> float:
    """The nearest-rank percentile of `values` (any order, not empty), rounded to the rank."""
    ordered = sorted(values)
    return ordered[max(0, round(percent / 100 * len(ordered)) - 1)]


def stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: [0] state, [1] parent, [11] utime, [12] stime."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used, from /proc."""
    fields = stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """All live descendants of a process, from /proc."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent[int(stat.parent.name)] = int(stat_fields(int(stat.parent.name))[1])
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


def cli_run(*args: str, timeout_s: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """`mlxfleet ARGS` run to its end, its output captured."""
    return subprocess.run(cli(*args), capture_output=True, text=True, cwd=REPO, timeout=timeout_s)


def cli_out(*args: str) -> str:
    """What `mlxfleet ARGS` prints (a key, a token); CalledProcessError when it fails."""
    done = cli_run(*args)
    done.check_returncode()
    return done.stdout.strip()


def http(
    url: str,
    token: str | None = None,
    body: dict | None = None,
    timeout_s: float = HTTP_TIMEOUT_S,
    tls: ssl.SSLContext | None = None,
) -> tuple[int, bytes]:
    """A tiny blocking GET (POST with a JSON `body`) for polls: (status, body); status 0 when
    nothing answered in time. `tls`: what an https URL is verified with."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, data=data, headers=headers), timeout=timeout_s, context=tls
        ) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


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


def now_utc() -> str:
    """When a measurement started, as the docs show it."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def command_line() -> str:
    """How this script was started, as the docs show it: `python -m benchmarks.NAME ARGS`."""
    module = ".".join(Path(sys.argv[0]).resolve().relative_to(REPO).with_suffix("").parts)
    return shlex.join(["python", "-m", module, *sys.argv[1:]])


def parser(doc: str) -> argparse.ArgumentParser:
    """A script's argument parser: its docstring's first line and `--write-docs`."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--write-docs", action="store_true", help=f"update {DOCS}")
    return p


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
