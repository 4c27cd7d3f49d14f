"""`mlxfleet coordinator`: run the coordinator (gateway, control stream, enrollment)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from coordinator.cli.common import HOME_HELP, run_loop
from coordinator.cli.errors import CliError
from coordinator.config import load_config
from coordinator.tls import TlsConfig, checked_names


def add_parser(subparsers: Any) -> None:
    """`coordinator [--config fleet.toml] [--port P] ...`."""
    coord = subparsers.add_parser("coordinator", help="run the coordinator")
    coord.add_argument("--config", help="fleet.toml")
    coord.add_argument("--host", default=None)
    coord.add_argument("--port", type=int, default=None, help="gateway port (default 8400)")
    coord.add_argument("--grpc-port", type=int, default=None, help="agent port (default 8401)")
    coord.add_argument("--enroll-port", type=int, default=None, help="enrollment (default 8403)")
    coord.add_argument("--home", help=HOME_HELP)
    coord.add_argument(
        "--tls", action="store_true", help="HTTPS with a certificate from the fleet CA"
    )
    coord.add_argument(
        "--tls-name",
        action="append",
        default=[],
        metavar="NAME",
        help="with --tls: one more host name or address for its certificate (repeatable)",
    )
    coord.add_argument("--tls-cert", metavar="FILE", help="HTTPS with this PEM certificate")
    coord.add_argument("--tls-key", metavar="FILE", help="the --tls-cert's PEM private key")
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
        tls=tls_of(args),
    )
    run_loop(Server(config).serve())


def tls_of(args: argparse.Namespace) -> TlsConfig | None:
    """The TLS flags as settings; None without any, so fleet.toml's [tls] stands."""
    files = args.tls_cert is not None or args.tls_key is not None
    if args.tls and files:
        raise CliError("give --tls (a fleet-CA certificate) or --tls-cert and --tls-key, not both")
    if args.tls_name and not args.tls:
        raise CliError("--tls-name names the fleet-CA certificate: it goes with --tls")
    if files and (args.tls_cert is None or args.tls_key is None):
        raise CliError("--tls-cert and --tls-key go together")
    if args.tls:
        return TlsConfig("fleet-ca", names=checked_names(args.tls_name, "--tls-name"))
    if files:
        return TlsConfig("files", Path(args.tls_cert).expanduser(), Path(args.tls_key).expanduser())
    return None
