"""Fixtures that start a real engine process on the demo model."""

from __future__ import annotations

import re
import secrets
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import Proc, wait_for

ENGINE_START_TIMEOUT_S = 60.0
_LISTENING = re.compile(r"^MLXFLEET_ENGINE_LISTENING port=(\d+)$", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class Engine:
    """A running engine: where it listens, its secret, and how long it took to be ready."""

    proc: Proc
    port: int
    secret: str
    startup_s: float

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, secret: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {secret or self.secret}"}
        return httpx.get(self.base_url + path, headers=headers, timeout=10)

    def stats(self) -> dict:
        return self.get("/v1/engine/stats").json()


def start_engine(model: Path, log: Path, *extra: str) -> Engine:
    """Start `python -m node_agent.engine`, read its port from stdout, wait for /health ready."""
    secret = secrets.token_urlsafe(16)
    started = time.monotonic()
    args = [sys.executable, "-m", "node_agent.engine", "--model-path", str(model)]
    args += ["--model-name", "demo", "--port", "0", *extra]
    proc = Proc(args, log, env={"MLXFLEET_ENGINE_SECRET": secret})

    def port() -> int | None:
        assert proc.alive(), proc.output()
        match = _LISTENING.search(proc.output())
        return int(match.group(1)) if match else None

    engine = Engine(proc, wait_for(port, ENGINE_START_TIMEOUT_S, "the LISTENING line"), secret, 0)

    def ready() -> bool:
        assert proc.alive(), proc.output()
        return engine.get("/health").status_code == 200

    wait_for(ready, ENGINE_START_TIMEOUT_S, "/health ready")
    return Engine(proc, engine.port, secret, time.monotonic() - started)


@pytest.fixture(scope="module")
def engine(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """One engine for the module: start-up and the first g++ kernel compile take seconds."""
    log = tmp_path_factory.mktemp("engine") / "engine.log"
    running = start_engine(demo_model, log)
    print(f"engine ready in {running.startup_s:.2f} s")
    yield running
    code = running.proc.stop()
    assert code == 0, running.proc.output()[-3000:]
