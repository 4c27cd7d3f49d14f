"""`mlxfleet up`: the coordinator, a local agent and one model, in this one process.

The agent still talks to the coordinator over real gRPC on 127.0.0.1; the engine is a child.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from coordinator.cli.common import HOME_HELP, home_of, run_loop
from coordinator.cli.errors import CliError
from coordinator.config import Config, ModelSpec, load_config

DEMO_MODEL_NAME = "mlxfleet-demo"
UP_KEY_NAME = "up"  # the key `mlxfleet up` creates; replaced on every start
UP_READY_TIMEOUT_S = 300.0
UP_TOKEN_TTL_S = 60.0  # the token `up` makes for its own agent


def add_parser(subparsers: Any) -> None:
    """`up [--model M] [--lan] ...`."""
    up = subparsers.add_parser(
        "up", help="coordinator + a local agent + one model, on this machine"
    )
    up.add_argument("--model", help="an MLX model folder or a Hugging Face id (default: demo)")
    up.add_argument("--port", type=int, default=None, help="gateway port (default 8400)")
    up.add_argument("--grpc-port", type=int, default=None, help="agent port (default 8401)")
    up.add_argument("--enroll-port", type=int, default=None, help="enrollment (default 8403)")
    up.add_argument("--host", default=None, help="listen address (default 127.0.0.1)")
    up.add_argument("--home", help=HOME_HELP)
    up.add_argument(
        "--lan",
        action="store_true",
        help="listen on all interfaces and announce on mDNS, so LAN agents can join",
    )
    up.set_defaults(func=cmd_up)


def cmd_up(args: argparse.Namespace) -> None:
    started = time.monotonic()
    home = home_of(args)
    spec, is_demo = model_spec_for(args.model, home)
    config = load_config(
        None,
        home=home,
        gateway_port=args.port,
        grpc_port=args.grpc_port,
        enroll_port=args.enroll_port,
        host="0.0.0.0" if args.lan else args.host,
        mdns=True if args.lan else None,
        models=(spec,),
    )
    run_loop(_up(config, spec, is_demo, args.lan, started))


def model_spec_for(model: str | None, home: Path) -> tuple[ModelSpec, bool]:
    """The model `up` serves: --model (a folder or a hub id), else the built-in demo model."""
    if model is None:
        path = home / "models" / DEMO_MODEL_NAME
        if not (path / "config.json").exists():
            # In a child process: MLX started in `up` itself would leave native threads that
            # abort the process at exit ("terminate called without an active exception").
            cmd = [sys.executable, "-m", "coordinator.cli", "demo-model", str(path)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise CliError(f"cannot write the demo model: {done.stderr.strip()[-500:]}")
        return ModelSpec(name=DEMO_MODEL_NAME, source=str(path)), True
    folder = Path(model).expanduser()
    if folder.exists():
        if not (folder / "config.json").exists():
            raise CliError(f"--model {model}: no config.json there (not an MLX model folder)")
        return ModelSpec(name=folder.resolve().name, source=str(folder.resolve())), False
    if model.count("/") != 1 or model.startswith((".", "/")):
        raise CliError(f"--model {model}: not a folder and not a Hugging Face id (owner/name)")
    return ModelSpec(name=model, source=model), False


async def _up(config: Config, spec: ModelSpec, is_demo: bool, lan: bool, started: float) -> None:
    """Serve the coordinator and the agent until Ctrl-C/SIGTERM or until one of them ends."""
    from coordinator.server import Server, create_join_token
    from coordinator.store import Store
    from node_agent.agent import Agent, AgentConfig

    token = create_join_token(config, UP_TOKEN_TTL_S, uses=1)  # for the local agent only
    store = Store(config.db_path)
    store.delete_api_keys(UP_KEY_NAME)
    api_key = store.create_api_key(UP_KEY_NAME, os.environ.get("MLXFLEET_API_KEY") or None)
    store.close()

    server = Server(config)
    serve = asyncio.create_task(server.serve(install_signals=False))
    await _first(server.started.wait(), serve)
    assert server.bound is not None
    agent = Agent(
        AgentConfig(
            home=config.home / "agent",
            coordinator=f"127.0.0.1:{server.bound.grpc_port}",
            token=token,
            enroll_port=server.bound.enroll_port,
            advertise=lan,
            metrics_host="127.0.0.1",  # default port; when busy the agent runs without metrics
        )
    )
    agent_task = asyncio.create_task(agent.serve(install_signals=False))

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stopper = asyncio.create_task(stop.wait())
    try:
        ready = asyncio.create_task(server.wait_model(spec.name, UP_READY_TIMEOUT_S))
        await _first(ready, serve, agent_task, stopper)
        failure = ready.result() if ready.done() else None
        if failure is not None:
            raise CliError(
                f"model {spec.name} could not be loaded: {failure} "
                f"(engine logs in {config.home / 'agent' / 'logs'})"
            )
        if ready.done():
            root = f"http://{config.host}:{server.bound.gateway_port}"
            _print_banner(root, api_key, spec.name, is_demo, time.monotonic() - started)
        await _first(serve, agent_task, stopper)
    finally:
        agent.request_stop()
        await asyncio.gather(agent_task, return_exceptions=True)
        server.request_stop()
        await asyncio.gather(serve, return_exceptions=True)
        for task in (serve, agent_task):
            if task.done() and not task.cancelled() and task.exception():
                raise task.exception()  # type: ignore[misc]


def _print_banner(root: str, api_key: str, model: str, is_demo: bool, took_s: float) -> None:
    """Where the fleet answers, with the key and a curl line to try it."""
    base = f"{root}/v1"
    print(
        f"\nmlxfleet is up ({took_s:.1f} s)\n"
        f"  endpoint  {base}\n"
        f"  api key   {api_key}\n"
        f"  model     {model}\n"
        f"  status    {root}/ui\n"
        f"  metrics   {root}/metrics (Prometheus: deploy/prometheus/prometheus.yml)\n",
        flush=True,
    )
    if is_demo:
        print(
            "  The demo model has random weights: its output is gibberish. "
            "Use --model for a real one.\n",
            flush=True,
        )
    print(
        f"  curl {base}/chat/completions -H 'Authorization: Bearer {api_key}' "
        f"-H 'Content-Type: application/json' \\\n"
        f'    -d \'{{"model": "{model}", "messages": '
        f'[{{"role": "user", "content": "Hello"}}]}}\'\n',
        flush=True,
    )


async def _first(*aws: Awaitable[Any]) -> None:
    """Wait until the first of these finishes; re-raise its error if it failed."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in done:
        if not task.cancelled() and task.exception():
            raise task.exception()  # type: ignore[misc]
