"""Engine starts while the agent's control stream is busy: the start-up stress load (issue 16).

One process on uvloop, as the agent runs: a gRPC server with the coordinator's mutual TLS that
answers every agent message with a command, the agent's real `Session` holding the stream
(heartbeats every HEARTBEAT_S; a broken stream is counted and dialled again, as the agent does)
and the agent's real `Supervisor` starting `--spawns` engines, `--concurrency` at a time,
through its real start path. Each "engine" is a cheap child (`python -S -c`: prints the
LISTENING line, exits 0), since what can go wrong in a start happens between the spawn and the
child's exec, whatever the child is; the supervisor reports each exit as it does an engine's.

`--spawner uvloop-fork` swaps the supervisor's spawn for the one it had before issue 16
(`asyncio.create_subprocess_exec`, on uvloop a fork()), to compare. `--grpc-fork-support`:
`agent`, what the agent runs with (our packages imported first, their default: off);
`grpc-default`, grpc imported before them with no GRPC_ENABLE_FORK_SUPPORT, so grpcio's own
build default (on) applies, as it did in the agent before issue 16. The mode decides the import
order, so this module imports grpc and the packages that import it only in `main`.

    python -m tests.spawn_load --spawns 200 [--spawner posix-spawn|uvloop-fork]
        [--grpc-fork-support agent|grpc-default] [--concurrency 4]

Prints one JSON object: exit codes counted, spawn-call latencies, stream traffic and breaks.
gRPC's own log lines (its fork handlers', a child's "Check failed") go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

HEARTBEAT_S = 0.02  # 50 heartbeats a second (the coordinator's cap per stream), events on top
CHILD = "import sys; sys.stdout.write('MLXFLEET_ENGINE_LISTENING port=9\\n')"  # 9: refused
LISTEN_TIMEOUT_S = 10.0  # a child stuck before its exec is killed (and counted) after this
RUN_TIMEOUT_S = 300.0
NODE_ID = "spawn-load"
SPAWNERS = ("posix-spawn", "uvloop-fork")
FORK_SUPPORT = ("agent", "grpc-default")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


async def fork_spawn(argv: Sequence[str], env: Mapping[str, str], stderr: int) -> Any:
    """The supervisor's spawn before issue 16, for comparison."""
    return await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=stderr, env=dict(env), start_new_session=True
    )


async def run(spawns: int, spawner: str, concurrency: int, workdir: Path) -> dict[str, Any]:
    import grpc

    from coordinator.pki import FleetPki
    from mlxfleet.join import new_key_pem
    from mlxfleet.v1 import fleet_pb2 as pb
    from mlxfleet.v1 import fleet_pb2_grpc
    from node_agent import spawn
    from node_agent.coordinator_client import Session
    from node_agent.identity import NodeIdentity, make_csr
    from node_agent.probes import local_probe
    from node_agent.supervisor import EngineEvent, LoadRequest, Supervisor

    class Echo(fleet_pb2_grpc.FleetServicer):
        """The coordinator's side, reduced to traffic: one command down per message up."""

        up = 0

        async def Connect(  # noqa: N802 (the gRPC method's name)
            self, request_iterator: AsyncIterator[pb.AgentMessage], context: Any
        ) -> AsyncIterator[pb.CoordinatorMessage]:
            async for _ in request_iterator:
                self.up += 1
                yield pb.CoordinatorMessage(set_knobs=pb.SetKnobs(engine_id="none"))

    pki = FleetPki.load_or_create(workdir / "pki")
    key_pem = new_key_pem()
    cert_pem = pki.issue_node_certificate(NODE_ID, make_csr(key_pem))
    identity = NodeIdentity(NODE_ID, key_pem, cert_pem, pki.server_cert_pem, pki.ca_cert_pem)
    echo = Echo()
    server = grpc.aio.server()
    fleet_pb2_grpc.add_FleetServicer_to_server(echo, server)
    credentials = grpc.ssl_server_credentials(
        [(pki.server_key_pem, pki.server_cert_pem)], pki.ca_cert_pem, require_client_auth=True
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()

    probe = local_probe()
    done: dict[str, EngineEvent] = {}
    slots = asyncio.Semaphore(concurrency)
    sessions: list[Session] = []

    def emit(event: EngineEvent) -> None:
        if sessions and sessions[0].connected.is_set():
            sessions[0].send_event(event)  # up the stream, as the agent does
        if event.kind in ("exited", "load_failed"):
            done[event.engine.engine_id] = event
            slots.release()

    sup = Supervisor(probe, emit, workdir / "logs")
    session = Session(
        f"127.0.0.1:{port}", identity, probe.facts(), probe.reading, sup.infos, sup.rss
    )
    sessions.append(session)
    commands = 0
    breaks: list[str] = []

    def on_command(_: pb.CoordinatorMessage) -> None:
        nonlocal commands
        commands += 1

    async def hold_stream() -> None:
        while True:
            try:
                await session.run(on_command)
            except grpc.aio.AioRpcError as exc:
                breaks.append(f"{exc.code().name}: {exc.details()}")
            await asyncio.sleep(0.1)

    stream = asyncio.create_task(hold_stream())
    spawn_ms: list[float] = []
    original = spawn.start
    real_start = original if spawner == "posix-spawn" else fork_spawn

    async def timed_start(argv: Sequence[str], env: Mapping[str, str], stderr: int) -> Any:
        started = time.perf_counter()
        process = await real_start(argv, env, stderr)
        spawn_ms.append((time.perf_counter() - started) * 1000)
        return process

    spawn.start = timed_start  # type: ignore[assignment]  # what Supervisor.load calls
    try:
        await asyncio.wait_for(session.connected.wait(), 10)
        while echo.up < 20:  # the stream is flowing both ways before the first start
            await asyncio.sleep(HEARTBEAT_S)
        started = time.monotonic()
        for i in range(spawns):
            await slots.acquire()
            await sup.load(LoadRequest(f"e{i}", "stress", str(workdir), "interactive", 512))
        while len(done) < spawns:
            await asyncio.sleep(0.05)
        elapsed = time.monotonic() - started
    finally:
        spawn.start = original  # type: ignore[method-assign]
        stream.cancel()
        await sup.stop_all()
        await server.stop(0)
    codes = collections.Counter(-e.signal if e.signal else e.exit_code for e in done.values())
    return {
        "spawner": spawner,
        "spawns": spawns,
        "concurrency": concurrency,
        "exit_codes": {str(code): n for code, n in sorted(codes.items())},
        "signalled": sum(n for code, n in codes.items() if code < 0),
        "spawn_ms_p50": round(percentile(spawn_ms, 0.5), 3),
        "spawn_ms_p95": round(percentile(spawn_ms, 0.95), 3),
        "spawn_ms_max": round(max(spawn_ms), 3),
        "spawn_ms": [round(ms, 3) for ms in spawn_ms],
        "seconds": round(elapsed, 2),
        "messages_up": echo.up,
        "commands_down": commands,
        "stream_breaks": breaks,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--spawns", type=int, default=200)
    p.add_argument("--spawner", choices=SPAWNERS, default="posix-spawn")
    p.add_argument("--grpc-fork-support", choices=FORK_SUPPORT, default="agent")
    p.add_argument("--concurrency", type=int, default=4)
    args = p.parse_args()
    if args.grpc_fork_support == "grpc-default":
        os.environ.pop("GRPC_ENABLE_FORK_SUPPORT", None)
        import grpc  # noqa: F401  (first: before coordinator and node_agent set their default)
    import uvloop

    from node_agent import coordinator_client, supervisor

    coordinator_client.HEARTBEAT_INTERVAL_S = HEARTBEAT_S
    supervisor.ENGINE_COMMAND = (sys.executable, "-S", "-c", CHILD)
    supervisor.ENGINE_LISTEN_TIMEOUT_S = LISTEN_TIMEOUT_S
    supervisor.HEALTH_POLL_S = 0.01
    with tempfile.TemporaryDirectory(prefix="mlxfleet-spawn-load-") as tmp:
        result = uvloop.run(
            asyncio.wait_for(
                run(args.spawns, args.spawner, args.concurrency, Path(tmp)), RUN_TIMEOUT_S
            )
        )
    result["grpc_fork_support"] = args.grpc_fork_support
    print(json.dumps(result))


if __name__ == "__main__":
    main()
