"""`mlxfleet`: the one command. Each subcommand builds its config here and hands it down."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Coroutine
from pathlib import Path
from typing import Any

from coordinator import cli_bench, cli_service
from coordinator.cli_admin import cmd_models, cmd_nodes, cmd_tiers
from coordinator.cli_keys import cmd_keys_create, cmd_keys_list
from coordinator.config import Config, ModelSpec, default_home, load_config
from coordinator.errors import Error
from node_agent.agent import DEFAULT_METRICS_PORT
from node_agent.errors import AgentError

logger = logging.getLogger("mlxfleet")

DEMO_MODEL_NAME = "mlxfleet-demo"
UP_KEY_NAME = "up"  # the key `mlxfleet up` creates; replaced on every start
UP_READY_TIMEOUT_S = 300.0
UP_TOKEN_TTL_S = 60.0  # the token `up` makes for its own agent


class CliError(Error):
    """A bad argument or a failed start; printed as one line."""


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run a daemon's main coroutine on uvloop (MLXFLEET_LOOP=asyncio picks the stdlib loop)."""
    if os.environ.get("MLXFLEET_LOOP", "uvloop") == "uvloop":
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "httpx", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _model_spec_for(model: str | None, home: Path) -> tuple[ModelSpec, bool]:
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


async def _up(args: argparse.Namespace) -> None:
    from coordinator.server import Server, create_join_token
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
        enroll_port=args.enroll_port,
        host="0.0.0.0" if args.lan else args.host,
        mdns=True if args.lan else None,
        models=(spec,),
    )
    token = create_join_token(config, UP_TOKEN_TTL_S, uses=1)  # for the local agent only
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
            home=home / "agent",
            coordinator=f"127.0.0.1:{server.bound.grpc_port}",
            token=token,
            enroll_port=server.bound.enroll_port,
            advertise=args.lan,
            metrics_host="127.0.0.1",  # default port; when busy the agent runs without metrics
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
            root = f"http://{config.host}:{server.bound.gateway_port}"
            base = f"{root}/v1"
            print(
                f"\nmlxfleet is up ({time.monotonic() - started:.1f} s)\n"
                f"  endpoint  {base}\n"
                f"  api key   {api_key}\n"
                f"  model     {spec.name}\n"
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
    run_loop(_up(args))


def _cmd_coordinator(args: argparse.Namespace) -> None:
    from coordinator.server import Server

    config = load_config(
        Path(args.config) if args.config else None,
        host=args.host,
        gateway_port=args.port,
        grpc_port=args.grpc_port,
        enroll_port=args.enroll_port,
        home=Path(args.home).expanduser() if args.home else None,
    )
    run_loop(Server(config).serve())


def _cmd_agent(args: argparse.Namespace) -> None:
    from coordinator.config import LABEL_RE
    from node_agent.agent import DEFAULT_GRPC_PORT, Agent, AgentConfig, split_host_port
    from node_agent.coordinator_client import NodeProfile

    if args.coordinator:
        split_host_port(args.coordinator, DEFAULT_GRPC_PORT)  # a bad address fails here, early
    home = Path(args.home or default_home()).expanduser() / "agent"
    labels = {}
    for item in args.label:
        label, sep, value = item.partition("=")
        if not sep or not LABEL_RE.match(label) or not LABEL_RE.match(value):
            raise CliError(f"--label {item!r}: expected KEY=VALUE (letters, digits, . _ -)")
        labels[label] = value
    if args.os_reserve_gib is not None and not 0 <= args.os_reserve_gib <= 1024:
        raise CliError(f"--os-reserve-gib {args.os_reserve_gib}: must be 0-1024")
    limit_mib = args.engine_memory_limit_mib
    if limit_mib is not None and not 1 <= limit_mib <= 2**24:
        raise CliError(f"--engine-memory-limit-mib {limit_mib}: must be 1-16777216")
    if not 0 <= args.metrics_port <= 65535:
        raise CliError(f"--metrics-port {args.metrics_port}: must be 0-65535")
    profile = NodeProfile(
        labels=labels,
        serve_interactive=args.serve_interactive,
        os_reserve_bytes=int((args.os_reserve_gib or 0) * 2**30),
    )
    config = AgentConfig(
        home=home,
        coordinator=args.coordinator,
        token=args.token,
        enroll_port=args.enroll_port,
        advertise=not args.no_mdns,
        role=args.role,
        profile=profile,
        engine_memory_limit_bytes=limit_mib * 2**20 if limit_mib is not None else None,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
    )
    run_loop(Agent(config).serve())


def parse_duration(text: str) -> float:
    """`90s`, `15m`, `1h`, `7d` (or plain seconds) -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise CliError(f"--ttl {text!r}: expected a duration like 90s, 15m, 1h or 7d") from None
    if not 0 < seconds <= 366 * 86400:
        raise CliError(f"--ttl {text!r}: must be more than 0 and at most a year")
    return seconds


def _cmd_token(args: argparse.Namespace) -> None:
    from coordinator.server import create_join_token

    if args.uses < 1:
        raise CliError(f"--uses {args.uses}: must be at least 1")
    home = Path(args.home or default_home()).expanduser()
    token = create_join_token(Config(home=home), parse_duration(args.ttl), args.uses)
    print(token)


def _cmd_events(args: argparse.Namespace) -> None:
    import datetime
    import json

    from coordinator.store import Store

    home = Path(args.home or default_home()).expanduser()
    if not Config(home=home).db_path.exists():
        raise CliError(f"no state store in {home}")
    store = Store(Config(home=home).db_path)
    events = [e for e in store.events(args.limit) if args.node is None or e.node_id == args.node]
    store.close()
    if args.json:
        print(
            json.dumps(
                [
                    {"ts": e.ts, "node": e.node_id, "kind": e.kind, "detail": e.detail}
                    for e in events
                ],
                indent=2,
            )
        )
        return
    for e in reversed(events):
        when = datetime.datetime.fromtimestamp(e.ts).strftime("%Y-%m-%d %H:%M:%S")
        print(f"{when}  {e.node_id or '-':<20}  {e.kind:<18}  {e.detail}")


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
    up.add_argument("--enroll-port", type=int, default=None, help="enrollment (default 8403)")
    up.add_argument("--host", default=None, help="listen address (default 127.0.0.1)")
    up.add_argument("--home", help="state folder (default $MLXFLEET_HOME or ~/.mlxfleet)")
    up.add_argument(
        "--lan",
        action="store_true",
        help="listen on all interfaces and announce on mDNS, so LAN agents can join",
    )
    up.set_defaults(func=_cmd_up)

    coord = sub.add_parser("coordinator", help="run the coordinator")
    coord.add_argument("--config", help="fleet.toml")
    coord.add_argument("--host", default=None)
    coord.add_argument("--port", type=int, default=None, help="gateway port (default 8400)")
    coord.add_argument("--grpc-port", type=int, default=None, help="agent port (default 8401)")
    coord.add_argument("--enroll-port", type=int, default=None, help="enrollment (default 8403)")
    coord.add_argument("--home", help="state folder (default $MLXFLEET_HOME or ~/.mlxfleet)")
    coord.set_defaults(func=_cmd_coordinator)

    agent = sub.add_parser("agent", help="run a node agent")
    agent.add_argument(
        "--coordinator", help="HOST[:PORT] of the coordinator (default: the saved one, else mDNS)"
    )
    agent.add_argument("--token", help="join token from `mlxfleet token create` (first start)")
    agent.add_argument("--enroll-port", type=int, default=8403, help="default 8403")
    agent.add_argument("--role", choices=("laptop", "server"), help="override the probe")
    agent.add_argument("--no-mdns", action="store_true", help="do not announce this node")
    agent.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a placement label (repeatable): site=east, gpu=m4max",
    )
    agent.add_argument(
        "--serve-interactive",
        action="store_true",
        help="a laptop also hosts interactive replicas (servers always do)",
    )
    agent.add_argument(
        "--os-reserve-gib",
        type=float,
        default=None,
        help="memory kept for macOS and apps (default: the fleet's, 8)",
    )
    agent.add_argument(
        "--engine-memory-limit-mib",
        type=int,
        default=None,
        help="kill an engine (kernel OOM) above this memory; Linux cgroup v1, as root",
    )
    agent.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULT_METRICS_PORT,
        help=f"Prometheus /metrics port (default {DEFAULT_METRICS_PORT}; 0 = any free port)",
    )
    agent.add_argument(
        "--metrics-host", default="0.0.0.0", help="/metrics listen address (default 0.0.0.0)"
    )
    agent.add_argument("--home", help="state folder (default $MLXFLEET_HOME or ~/.mlxfleet)")
    agent.set_defaults(func=_cmd_agent)

    keys = sub.add_parser("keys", help="team API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key and print it (stored hashed)")
    create.add_argument("--name", default="team")
    create.add_argument(
        "--tiers",
        default="interactive,batch",
        help="tiers the key may use (default interactive,batch)",
    )
    create.add_argument(
        "--default-tier",
        default=None,
        help="tier when a request sends no X-Mlxfleet-Tier (default: the first)",
    )
    create.add_argument("--rpm", help="requests per minute (default: unlimited)")
    create.add_argument("--tpm", help="prompt + completion tokens per minute (default: unlimited)")
    create.add_argument("--models", help="models the key may use, a,b (default: all)")
    create.add_argument("--home", help="state folder (default $MLXFLEET_HOME or ~/.mlxfleet)")
    create.set_defaults(func=cmd_keys_create)
    keys_list = keys_sub.add_parser("list", help="names, tiers and limits (never the keys)")
    keys_list.add_argument("--json", action="store_true")
    keys_list.add_argument("--home", help="state folder (default $MLXFLEET_HOME or ~/.mlxfleet)")
    keys_list.set_defaults(func=cmd_keys_list)

    token = sub.add_parser("token", help="join tokens for new nodes")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    token_create = token_sub.add_parser("create", help="print a join token (stored hashed)")
    token_create.add_argument("--ttl", default="1h", help="how long it is valid (default 1h)")
    token_create.add_argument("--uses", type=int, default=1, help="nodes it may enroll (1)")
    token_create.add_argument("--home", help="state folder (default $MLXFLEET_HOME)")
    token_create.set_defaults(func=_cmd_token)

    nodes = sub.add_parser("nodes", help="list nodes; `nodes remove ID` revokes one")
    nodes.add_argument("--home", help="state folder (default $MLXFLEET_HOME)")
    nodes.add_argument("--json", action="store_true")
    nodes_sub = nodes.add_subparsers(dest="nodes_command")
    remove = nodes_sub.add_parser("remove", help="revoke a node's certificate and move its models")
    remove.add_argument("node_id")
    remove.add_argument("--home", default=argparse.SUPPRESS, help="state folder")
    for verb, text in (
        ("drain", "move its models off and place nothing new there"),
        ("uncordon", "let it take models again"),
    ):
        cordon = nodes_sub.add_parser(verb, help=text)
        cordon.add_argument("node_id")
        cordon.add_argument("--home", default=argparse.SUPPRESS, help="state folder")
    nodes.set_defaults(func=cmd_nodes)

    models = sub.add_parser("models", help="models per tier: state, replicas, where, why not")
    models.add_argument("--home", help="state folder (default $MLXFLEET_HOME)")
    models.add_argument("--json", action="store_true")
    models.set_defaults(func=cmd_models)

    tiers = sub.add_parser("tiers", help="tier knobs; `tiers set batch --window-ms 200`")
    tiers.add_argument("--home", help="state folder (default $MLXFLEET_HOME)")
    tiers_sub = tiers.add_subparsers(dest="tiers_command")
    tiers_set = tiers_sub.add_parser("set", help="change a tier's knobs without reloading")
    tiers_set.add_argument("tier", choices=("interactive", "batch"))
    tiers_set.add_argument("--window-ms", type=int, default=None, help="batch window")
    tiers_set.add_argument("--max-batch-size", type=int, default=None)
    tiers_set.add_argument("--max-concurrency", type=int, default=None)
    tiers_set.add_argument("--queue-limit", type=int, default=None)
    tiers_set.add_argument("--home", default=argparse.SUPPRESS, help="state folder")
    tiers.set_defaults(func=cmd_tiers)

    events = sub.add_parser("events", help="recent events: triggers, engine exits, enrollments")
    events.add_argument("--limit", type=int, default=50)
    events.add_argument("--node", help="only this node's events")
    events.add_argument("--json", action="store_true")
    events.add_argument("--home", help="state folder (default $MLXFLEET_HOME)")
    events.set_defaults(func=_cmd_events)

    cli_service.add_parser(sub)
    cli_bench.add_parser(sub)

    demo = sub.add_parser("demo-model", help="write the offline demo model to PATH")
    demo.add_argument("path")
    demo.set_defaults(func=_cmd_demo_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        status = args.func(args)
    except KeyboardInterrupt:
        return 130
    except (Error, AgentError) as exc:
        print(f"mlxfleet: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"mlxfleet: error: {exc}", file=sys.stderr)
        return 1
    return status or 0  # a command may return its own status (bench: 1 when a gate tripped)


if __name__ == "__main__":
    sys.exit(main())
