"""`mlxfleet`: the one command. Each subcommand builds its config here and hands it down."""

from __future__ import annotations

import argparse
import logging
import sys

from coordinator import __version__
from coordinator.cli import (
    admin,
    agent,
    bench,
    ca,
    demo_model,
    keys,
    models,
    operators,
    remote,
    service,
    up,
    usage,
)
from coordinator.cli import coordinator as coordinator_command
from coordinator.cli.common import run_loop
from coordinator.cli.errors import CliError
from coordinator.errors import Error
from node_agent.errors import AgentError

__all__ = ["CliError", "build_parser", "main", "run_loop"]

# In `mlxfleet --help` order; each module adds its own commands.
COMMANDS = (
    up, coordinator_command, agent, keys, admin, models, usage, operators, remote, ca, service,
    bench, demo_model,
)  # fmt: skip
QUIET_LOGGERS = ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "httpx", "aiohttp.access")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlxfleet", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--version", action="version", version=f"mlxfleet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
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
