"""`mlxfleet coordinator`: run the coordinator (gateway, control stream, enrollment)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from coordinator.cli.common import HOME_HELP, run_loop
from coordinator.config import load_config


def add_parser(subparsers: Any) -> None:
    """`coordinator [--config fleet.toml] [--port P] ...`."""
    coord = subparsers.add_parser("coordinator", help="run the coordinator")
    coord.add_argument("--config", help="fleet.toml")
    coord.add_argument("--host", default=None)
    coord.add_argument("--port", type=int, default=None, help="gateway port (default 8400)")
    coord.add_argument("--grpc-port", type=int, default=None, help="agent port (default 8401)")
    coord.add_argument("--enroll-port", type=int, default=None, help="enrollment (default 8403)")
    coord.add_argument("--home", help=HOME_HELP)
    coord.set_defaults(func=cmd_coordinator)


def cmd_coordinator(args: argparse.Namespace) -> None:
    from coordinator.server import Server  # lazily: it imports litellm

    config = load_config(
        Path(args.config) if args.config else None,
        host=args.host,
        gateway_port=args.port,
        grpc_port=args.grpc_port,
        enroll_port=args.enroll_port,
        home=Path(args.home).expanduser() if args.home else None,
    )
    run_loop(Server(config).serve())
