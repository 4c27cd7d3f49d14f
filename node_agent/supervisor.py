"""Engine supervisor: one subprocess per loaded model; start, readiness, stop, exit reason."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp

from mlxfleet.engines import EngineState, EventKind, ExitReason
from mlxfleet.kv import UNQUANTIZED_KV_BITS
from node_agent import spawn
from node_agent.cgroup import MIB, EngineCgroup, MemoryLimiter
from node_agent.engine_info import (
    EngineEvent,
    EngineInfo,
    EngineNetwork,
    LoadRequest,
)
from node_agent.groups import group_fields, rank_environment
from node_agent.liveness import DEFAULT_ENGINE_STALL_S, health_silence
from node_agent.model_store import ModelStore, one_line
from node_agent.probes.base import Probe
from node_agent.rank_link import RankLink

logger = logging.getLogger(__name__)

ENGINE_COMMAND = (sys.executable, "-m", "node_agent.engine")  # then the engine's flags
LISTENING_PREFIX = b"MLXFLEET_ENGINE_LISTENING port="  # the engine's one stdout line
ENGINE_LISTEN_TIMEOUT_S = 60.0  # process start to socket listening (imports mlx, mlx-lm)
ENGINE_READY_TIMEOUT_S = 600.0  # listening to /health ready (a large download or load)
HEALTH_POLL_S = 0.1  # while loading; a ready engine is checked by node_agent/liveness.py
STOP_TIMEOUT_S = 15.0  # SIGTERM lets in-flight requests finish; SIGKILL after this
ENGINE_CALL_TIMEOUT_S = 10.0  # one agent call to an engine's API (knobs, stats)
LOG_TAIL_LINES = 5


def kv_args(request: LoadRequest) -> list[str]:
    """The engine flags for a quantized KV cache; none for the model's own dtype."""
    if request.kv_bits in (0, UNQUANTIZED_KV_BITS):
        return []
    return ["--kv-bits", str(request.kv_bits), "--kv-group-size", str(request.kv_group_size)]


def knob_args(knobs: dict[str, int]) -> list[str]:
    """{"batch_window_ms": 80} -> ["--batch-window-ms", "80"] (the engine's flags)."""
    return [
        a
        for name, value in sorted(knobs.items())
        for a in (f"--{name.replace('_', '-')}", str(value))
    ]


def classify_exit(returncode: int, oom_kills_before: int, oom_kills_after: int) -> ExitReason:
    """Why an engine ended, from its return code and the kernel's OOM-kill counter."""
    if returncode == 0:
        return "clean"
    if returncode == -signal.SIGKILL:
        return "oom" if oom_kills_after > oom_kills_before else "sigkill"
    return "crash"


def _auth(info: EngineInfo) -> dict[str, str]:
    return {"Authorization": f"Bearer {info.secret}"}


def rss_bytes(pid: int) -> int:
    """Resident set size of a process; 0 when it cannot be read."""
    try:
        if sys.platform == "linux":
            pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
            return pages * os.sysconf("SC_PAGE_SIZE")
        import subprocess

        out = subprocess.run(
            ["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True, timeout=2
        )
        return int(out.stdout.strip() or 0) * 1024
    except (OSError, ValueError, IndexError):
        return 0


@dataclass(slots=True)
class _Managed:
    info: EngineInfo
    process: spawn.EngineProcess
    model_path: Path  # held in the model store while the engine runs
    log_path: Path
    oom_kills_at_start: int
    cgroup: EngineCgroup | None = None  # its memory limit, when the agent sets one
    stop_requested: bool = False
    watcher: asyncio.Task[None] | None = None
    port: int = 0  # where it listens, once it said so
    hung_s: float | None = None  # killed by us after this long without a health answer


class Supervisor:
    """Runs engine subprocesses. Use from the event loop; it owns one watcher task per engine."""

    def __init__(
        self,
        probe: Probe,
        emit: Callable[[EngineEvent], None],
        log_dir: Path,
        network: EngineNetwork | None = None,
        limiter: MemoryLimiter | None = None,
        stall_s: float = DEFAULT_ENGINE_STALL_S,  # a ready engine silent this long is hung
        store: ModelStore | None = None,  # default: a store beside log_dir, without a budget
        link: RankLink | None = None,  # relays groups' rank traffic (node_agent/groups.py)
    ) -> None:
        self.link = link
        self.store = store or ModelStore(log_dir.parent / "models")
        self._probe = probe
        self._stall_s = stall_s
        self._limiter = limiter
        self._emit = emit
        self._log_dir = log_dir
        self.network = network or EngineNetwork()
        self._engines: dict[str, _Managed] = {}
        # Engines whose model files are being fetched, as "starting": a Hello after a broken
        # stream lists them, so the coordinator keeps them instead of placing them again.
        self._resolving: dict[str, EngineInfo] = {}

    def infos(self) -> list[EngineInfo]:
        return [*self._resolving.values(), *(m.info for m in self._engines.values())]

    def rss(self) -> dict[str, tuple[EngineState, int, int]]:
        """engine_id -> (state, rss bytes, pid) for the heartbeat."""
        return {
            eid: (m.info.state, rss_bytes(m.process.pid), m.process.pid)
            for eid, m in self._engines.items()
        }

    async def load(self, request: LoadRequest) -> None:
        """Start an engine and report STARTED, then READY or LOAD_FAILED. Returns once started
        (after a copy or download of its files: node_agent/model_store.py)."""
        if request.engine_id in self._engines or request.engine_id in self._resolving:
            return  # the coordinator re-sent a command we already run
        group = request.group
        self._resolving[request.engine_id] = EngineInfo(
            request.engine_id,
            request.model,
            request.tier,
            "starting",
            **group_fields(group),
        )
        try:
            model_path = await self.store.ensure(request.source, request.manifest, request.holders)
        except Exception as exc:  # no holder, hub or disk room: one line up the stream
            info = EngineInfo(
                request.engine_id,
                request.model,
                request.tier,
                "exited",
                context_length=request.context_length,
            )
            detail = f"cannot get model {request.source!r}: {one_line(exc)}"
            logger.warning("%s", detail)
            self._emit(EngineEvent("load_failed", info, "crash", detail=detail))
            return
        finally:
            self._resolving.pop(request.engine_id, None)
        secret = secrets.token_urlsafe(32)
        self._log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self._log_dir / f"{request.engine_id}.log"
        args = [
            *ENGINE_COMMAND,
            "--model-path",
            str(model_path),
            "--model-name",
            request.model,
            "--host",
            self.network.bind_host,
            *self._tls_args(),
            "--port",
            "0",
            "--context-length",
            str(request.context_length),
            "--tier",
            request.tier if request.tier in ("interactive", "batch") else "interactive",
            *knob_args(request.knobs),
            *kv_args(request),
            # Always given: the engine must keep to the budget placement counted.
            "--prefix-cache-mib",
            str(request.prefix_cache_mib),
            *(group.engine_args() if group else []),
        ]
        # The secret goes through the environment: argv is visible to every local user.
        env = {
            **os.environ,
            "MLXFLEET_ENGINE_SECRET": secret,
            "MLXFLEET_PARENT_PID": str(os.getpid()),
        }  # the engine exits if we die
        cgroup = self._make_cgroup(request.engine_id)
        try:
            if group is not None:  # MLX's environment for the rank (node_agent/groups.py)
                if self.link is None:
                    raise RuntimeError("this agent relays no group traffic (no rank link)")
                env |= await rank_environment(self.link, group, self._log_dir)
            with log_path.open("ab") as log:
                # posix_spawn, never fork(): gRPC's fork handlers could abort the child.
                process = await spawn.start(
                    cgroup.wrap(args) if cgroup is not None else args, env, log.fileno()
                )
        except BaseException:
            self.store.release(model_path)
            if cgroup is not None:
                cgroup.remove()
            if group is not None and self.link is not None:
                await self.link.close_group(group.group_id)
            raise
        info = EngineInfo(
            request.engine_id,
            request.model,
            request.tier,
            "starting",
            secret=secret,
            context_length=request.context_length,
            pid=process.pid,
            **group_fields(group),
        )
        oom_kills = cgroup.oom_kills() if cgroup is not None else self._probe.oom_kills()
        managed = _Managed(info, process, model_path, log_path, oom_kills, cgroup)
        self._engines[request.engine_id] = managed
        self._emit(EngineEvent("started", info))
        managed.watcher = asyncio.create_task(self._watch(managed), name=request.engine_id)

    async def _watch(self, m: _Managed) -> None:
        """Wait for readiness, then for the exit (killing a hung engine), and report both."""
        failure = await self._await_ready(m)
        liveness = None
        if failure is None:
            m.info = replace(m.info, state="ready")
            logger.info("engine %s (%s) ready at %s", m.info.engine_id, m.info.model, m.info.url)
            self._emit(EngineEvent("ready", m.info))
            liveness = asyncio.create_task(self._kill_if_hung(m))
        try:
            returncode = await m.process.wait()
        finally:
            if liveness is not None:
                liveness.cancel()
        self._engines.pop(m.info.engine_id, None)
        self.store.release(m.model_path)
        if m.info.group_id and self.link is not None:  # the other ranks see the link close
            await self.link.close_group(m.info.group_id)
        if m.cgroup is not None:
            oom_kills = m.cgroup.oom_kills()  # its own counter: no other process's kill counts
            m.cgroup.remove()
        else:
            oom_kills = self._probe.oom_kills()
        reason = classify_exit(returncode, m.oom_kills_at_start, oom_kills)
        jetsam = None
        # macOS: jetsam leaves no counter, only a kernel log line (our own kill of a hung engine
        # is no jetsam kill).
        if reason == "sigkill" and m.hung_s is None:
            jetsam = await asyncio.to_thread(self._probe.memory_kill, m.process.pid)
            reason = "oom" if jetsam else reason
        if m.stop_requested and returncode in (0, -signal.SIGTERM):
            reason = "clean"
        if m.hung_s is not None and returncode == -signal.SIGKILL:
            reason = "hung"
        kind: EventKind = "exited" if failure is None or m.stop_requested else "load_failed"
        detail = failure or self._log_tail(m.log_path)
        if reason == "hung":
            detail = f"no answer to GET /health for {m.hung_s:.1f} s, killed | {detail}"
        elif reason == "oom" and m.cgroup is not None:
            detail = f"over its {m.cgroup.limit_bytes // MIB} MiB memory limit | {detail}"
        elif jetsam:
            detail = f"killed by jetsam ({jetsam}) | {detail}"
        logger.log(
            logging.INFO if reason == "clean" else logging.WARNING,
            "engine %s (%s) %s: %s (code %s)",
            m.info.engine_id,
            m.info.model,
            kind,
            reason,
            returncode,
        )
        self._emit(
            EngineEvent(
                kind,
                replace(m.info, state="exited", secret=""),
                reason,
                exit_code=max(returncode, 0),
                signal=max(-returncode, 0),
                detail=detail if reason != "clean" else "",
            )
        )

    def _make_cgroup(self, engine_id: str) -> EngineCgroup | None:
        """The engine's limited memory cgroup; None without a limit or when it cannot be made."""
        if self._limiter is None:
            return None
        try:
            return self._limiter.create(engine_id)
        except OSError as exc:
            logger.warning("engine %s runs without its memory limit: %s", engine_id, exc)
            return None

    async def _await_ready(self, m: _Managed) -> str | None:
        """None when the engine answered /health ready; else a one-line reason (it is killed)."""
        assert m.process.stdout is not None
        try:
            port = await asyncio.wait_for(
                self._read_port(m.process.stdout), ENGINE_LISTEN_TIMEOUT_S
            )
        except TimeoutError:
            port = None
        if port is None:
            await self._kill(m)
            return "engine never started listening: " + self._log_tail(m.log_path)
        m.port = port
        m.info = replace(m.info, url=self.network.url(port))
        health, tls_options = self._loopback(port, "/health")
        deadline = time.monotonic() + ENGINE_READY_TIMEOUT_S
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            while time.monotonic() < deadline:
                if m.process.returncode is not None:
                    return "engine exited while loading: " + self._log_tail(m.log_path)
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(health, headers=_auth(m.info), **tls_options) as r:
                        if r.status == 200:
                            return None
                await asyncio.sleep(HEALTH_POLL_S)
        await self._kill(m)
        return f"engine not ready after {ENGINE_READY_TIMEOUT_S:.0f} s"

    async def _kill_if_hung(self, m: _Managed) -> None:
        """A ready engine's health check, every second; SIGKILL once it has not answered
        for the stall limit (node_agent/liveness.py). Cancelled when the engine exits."""
        health, tls_options = self._loopback(m.port, "/health")
        silent_s = await health_silence(health, _auth(m.info), tls_options, self._stall_s)
        if m.stop_requested:
            return  # being stopped: unload() has its own SIGKILL deadline
        m.hung_s = silent_s
        logger.warning(
            "engine %s (%s) has not answered its health check for %.1f s: killing it",
            m.info.engine_id,
            m.info.model,
            silent_s,
        )
        with contextlib.suppress(ProcessLookupError):
            m.process.kill()  # SIGKILL: a stopped process would never act on SIGTERM

    @staticmethod
    async def _read_port(stdout: asyncio.StreamReader) -> int | None:
        while line := await stdout.readline():
            if line.startswith(LISTENING_PREFIX):
                return int(line[len(LISTENING_PREFIX) :].strip())
        return None  # EOF: the process ended before listening

    def _tls_args(self) -> list[str]:
        tls = self.network.tls
        return ["--tls-cert", str(tls.cert_path), "--tls-key", str(tls.key_path)] if tls else []

    def _loopback(self, port: int, path: str) -> tuple[str, dict[str, Any]]:
        """The URL of an engine's `path` over loopback, and the aiohttp TLS arguments that
        check its certificate exactly as the gateway does."""
        tls = self.network.tls
        url = f"{'https' if tls else 'http'}://127.0.0.1:{port}{path}"
        if tls is None:
            return url, {}
        context = ssl.create_default_context(cadata=tls.fleet_ca_pem.decode())
        return url, {"ssl": context, "server_hostname": tls.node_id}

    async def engine_request(
        self,
        engine_id: str,
        method: str,
        path: str,
        body: Any = None,
        timeout_s: float = ENGINE_CALL_TIMEOUT_S,
    ) -> tuple[int, str] | None:
        """(status, body text) of one call to an engine's HTTP API, with its secret; None when
        no such engine listens yet. Raises aiohttp.ClientError or TimeoutError."""
        m = self._engines.get(engine_id)
        if m is None or not m.info.url:
            return None
        url, tls_options = self._loopback(int(m.info.url.rsplit(":", 1)[1]), path)
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session,
            session.request(method, url, json=body, headers=_auth(m.info), **tls_options) as r,
        ):
            return r.status, await r.text()

    async def drop_prefix_caches(self) -> None:
        """Memory pressure: every ready engine empties its prefix cache, the memory that can
        go without moving a model (seed 002 §9)."""
        ready = [info.engine_id for info in self.infos() if info.state == "ready"]
        for engine_id in ready:
            try:
                await self.engine_request(engine_id, "POST", "/v1/engine/prefix_cache/drop")
            except (aiohttp.ClientError, TimeoutError) as exc:
                logger.warning("could not drop engine %s's prefix cache: %s", engine_id, exc)

    async def set_knobs(self, engine_id: str, knobs: dict[str, int]) -> None:
        """Change a running engine's knobs (no reload): POST /v1/engine/knobs over loopback."""
        try:
            reply = await self.engine_request(engine_id, "POST", "/v1/engine/knobs", knobs)
        except (aiohttp.ClientError, TimeoutError) as exc:
            logger.warning("could not set knobs on engine %s: %s", engine_id, exc)
            return
        if reply is None:
            return
        status, text = reply
        if status != 200:
            logger.warning("engine %s refused knobs %s: %s", engine_id, knobs, text)
            return
        logger.info("engine %s knobs now %s", engine_id, knobs)

    async def unload(self, engine_id: str) -> None:
        """Stop one engine: SIGTERM (it finishes in-flight requests), SIGKILL after a timeout."""
        m = self._engines.get(engine_id)
        if m is None:
            return
        m.stop_requested = True
        m.info = replace(m.info, state="stopping")
        with contextlib.suppress(ProcessLookupError):
            m.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(m.process.wait()), STOP_TIMEOUT_S)
        except TimeoutError:
            logger.warning(
                "engine %s ignored SIGTERM for %.0f s: killing it", engine_id, STOP_TIMEOUT_S
            )
            await self._kill(m)
        if m.watcher is not None:
            await m.watcher

    async def stop_all(self) -> None:
        await asyncio.gather(*(self.unload(eid) for eid in list(self._engines)))

    @staticmethod
    async def _kill(m: _Managed) -> None:
        with contextlib.suppress(ProcessLookupError):
            m.process.kill()
        await m.process.wait()

    @staticmethod
    def _log_tail(path: Path) -> str:
        """The engine's last log lines, as one line, for an event's detail."""
        try:
            lines = path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(line.strip() for line in lines[-LOG_TAIL_LINES:])[:500]
