"""`mlxfleet`: the one command. Each subcommand builds its config here and hands it down."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from coordinator.config import Config, ModelSpec, default_home, load_config
from coordinator.errors import Error
from node_agent.agent import AgentError

logger = logging.getLogger("mlxfleet")

DEMO_MODEL_NAME = "mlxfleet-demo"
UP_KEY_NAME = "up"  # the key `mlxfleet up` creates; replaced on every start
UP_READY_TIMEOUT_S = 300.0


class CliError(Error):
    """A bad argument or a failed start; printed as one line."""


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "httpx", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _model_spec_for(model: str | None, home: Path) -> tuple[ModelSpec, bool]:
    """The model `up` serves: --model (a folder or a hub id), else the built-in demo model."""
    from node_agent.engine.demo_model import write_demo_model

    if model is None:
        path = home / "models" / DEMO_MODEL_NAME
        if not (path / "config.json").exists():
            write_demo_model(path)
        return ModelSpec(name=DEMO_MODEL_NAME, source=str(path)), True
    folder = Path(model).expanduser()
    if folder.exists():
        if not (folder / "config.json").exists():
            raise CliError(f"--model {model}: no config.json there (not an MLX model folder)")
        return ModelSpec(name=folder.resolve().name, source=str(folder.resolve())), False
    if model.count("/") != 1 or model.startswith((".", "/")):
        raise CliError(f"--model {model}: not a folder and not a Hugging Face id (owner/name)")
    return ModelSpec(name=model, source=model), False


async def _up(args: argparse.Namespace) -> None:
    from coordinator.server import Server, load_join_token
    from coordinator.store import Store
    from node_agent.agent import Agent, AgentConfig

    started = time.monotonic()
    home = Path(args.home or default_home()).expanduser()
    spec, is_demo = _model_spec_for(args.model, home)
    config = load_config(
        None,
        home=home,
        gateway_port=args.port,
        grpc_port=args.grpc_port,
        host=args.host,
        models=(spec,),
    )
    store = Store(config.db_path)
    store.revoke_api_keys(UP_KEY_NAME)
    api_key = store.create_api_key(UP_KEY_NAME, os.environ.get("MLXFLEET_API_KEY") or None)
    store.close()

    server = Server(config)
    serve = asyncio.create_task(server.serve(install_signals=False))
    await _first(server.started.wait(), serve)
    assert server.bound is not None
    agent = Agent(
        AgentConfig(
            coordinator=f"127.0.0.1:{server.bound.grpc_port}",
            home=home / "agent",
            token=load_join_token(config),
        )
    )
    agent_task = asyncio.create_task(agent.serve(install_signals=False))

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    import signal

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
                f"(engine logs in {home / 'agent' / 'logs'})"
            )
        if ready.done():
            base = f"http://{config.host}:{server.bound.gateway_port}/v1"
            print(
                f"\nmlxfleet is up ({time.monotonic() - started:.1f} s)\n"
                f"  endpoint  {base}\n"
                f"  api key   {api_key}\n"
                f"  model     {spec.name}\n",
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
                f'    -d \'{{"model": "{spec.name}", "messages": '
                f'[{{"role": "user", "content": "Hello"}}]}}\'\n',
                flush=True,
            )
        await _first(serve, agent_task, stopper)
    finally:
        agent.request_stop()
        await asyncio.gather(agent_task, return_exceptions=True)
        server.request_stop()
        await asyncio.gather(serve, return_exceptions=True)
        for task in (serve, agent_task):
            if task.done() and not task.cancelled() and task.exception():
                raise task.exception()  # type: ignore[misc]


async def _first(*aws: Awaitable[Any]) -> None:
    """Wait until the first of these finishes; re-raise its error if it failed."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in done:
        if not task.cancelled() and task.exception():
            raise task.exception()  # type: ignore[misc]


def _cmd_up(args: argparse.Namespace) -> None:
    asyncio.run(_up(args))


def _cmd_coordinator(args: argparse.Namespace) -> None:
    from coordinator.server import Server

    config = load_config(
        Path(args.config) if args.config else None,
        host=args.host,
        gateway_port=args.port,
        grpc_port=args.grpc_port,
        home=Path(args.home).expanduser() if args.home else None,
    )
    asyncio.run(Server(config).serve())


def _cmd_agent(args: argparse.Namespace) -> None:
    from node_agent.agent import Agent, AgentConfig

    if ":" not in args.coordinator:
        raise CliError(f"--coordinator {args.coordinator!r}: expected HOST:PORT")
    home = Path(args.home or default_home()).expanduser() / "agent"
    config = AgentConfig(
        coordinator=args.coordinator, home=home, token=args.token, engine_host=args.engine_host
    )
    asyncio.run(Agent(config).serve())


def _cmd_keys(args: argparse.Namespace) -> None:
    from coordinator.store import Store

    home = Path(args.home or default_home()).expanduser()
    store = Store(Config(home=home).db_path)
    key = store.create_api_key(args.name)
    store.close()
    print(key)


def _cmd_demo_model(args: argparse.Namespace) -> None:
    from node_agent.engine.demo_model import write_demo_model

    path = write_demo_model(Path(args.path))
    print(f"wrote the demo model (random weights: gibberish output) to {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlxfleet", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="coordinator + a local agent + one model, on this machine")
    up.add_argument("--model", help="an MLX model folder or a Hugging Face id (default: demo)")
    up.add_argument("--port", type=int, default=None, help="gateway port (default 8400)")
    up.add_argument("--grpc-port", type=int, default=None, help="agent port (default 8401)")
    up.add_argument("--host", default=None, help="listen address (default 127.0.0.1)")
    up.add_argument("--home", help="state folder (default $MLXFLEET_HOME or ~/.mlxfleet)")
    up.set_defaults(func=_cmd_up)

    coord = sub.add_parser("coordinator", help="run the coordinator")
    coord.add_argument("--config", help="fleet.toml")
    coord.add_argument("--host", default=None)
    coord.add_argument("--port", type=int, default=None, help="gateway port (default 8400)")
    coord.add_argument("--grpc-port", type=int, default=None, help="agent port (default 8401)")
    coord.add_argument("--home", help="state folder (default $MLXFLEET_HOME or ~/.mlxfleet)")
    coord.set_defaults(func=_cmd_coordinator)

    agent = sub.add_parser("agent", help="run a node agent")
    agent.add_argument("--coordinator", required=True, help="HOST:PORT of the coordinator")
    agent.add_argument("--token", help="join token (first start only)")
    agent.add_argument("--engine-host", default="127.0.0.1", help="address engines listen on")
    agent.add_argument("--home", help="state folder (default $MLXFLEET_HOME or ~/.mlxfleet)")
    agent.set_defaults(func=_cmd_agent)

    keys = sub.add_parser("keys", help="team API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key and print it (stored hashed)")
    create.add_argument("--name", default="team")
    create.add_argument("--home", help="state folder (default $MLXFLEET_HOME or ~/.mlxfleet)")
    create.set_defaults(func=_cmd_keys)

    demo = sub.add_parser("demo-model", help="write the offline demo model to PATH")
    demo.add_argument("path")
    demo.set_defaults(func=_cmd_demo_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        args.func(args)
    except KeyboardInterrupt:
        return 130
    except (Error, AgentError) as exc:
        print(f"mlxfleet: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"mlxfleet: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
