"""`mlxfleet agent`: run a node agent (enrolls with a join token on its first start)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from coordinator.cli.common import HOME_HELP, home_of, run_loop
from coordinator.cli.errors import CliError
from coordinator.config import LABEL_RE
from node_agent.agent import DEFAULT_METRICS_PORT
from node_agent.liveness import DEFAULT_ENGINE_STALL_S


def add_parser(subparsers: Any) -> None:
    """`agent [--coordinator HOST[:PORT]] [--token T] ...`."""
    agent = subparsers.add_parser("agent", help="run a node agent")
    add = agent.add_argument
    add("--coordinator", help="HOST[:PORT] of the coordinator (default: the saved one, else mDNS)")
    add("--token", help="join token from `mlxfleet token create` (first start)")
    add("--enroll-port", type=int, default=8403, help="default 8403")
    add("--role", choices=("laptop", "server"), help="override the probe")
    add("--no-mdns", action="store_true", help="do not announce this node")
    add(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a placement label (repeatable): site=east, gpu=m4max",
    )
    add(
        "--serve-interactive",
        action="store_true",
        help="a laptop also hosts interactive replicas (servers always do)",
    )
    add(
        "--os-reserve-gib",
        type=float,
        default=None,
        help="memory kept for macOS and apps (default: the fleet's, 8)",
    )
    add(
        "--engine-memory-limit-mib",
        type=int,
        default=None,
        help="kill an engine (kernel OOM) above this memory; Linux cgroup v1, as root",
    )
    add(
        "--engine-stall-s",
        type=float,
        default=DEFAULT_ENGINE_STALL_S,
        help="kill a ready engine that has not answered its health check for this long "
        f"(default {DEFAULT_ENGINE_STALL_S:g}); the coordinator restarts it",
    )
    add(
        "--metrics-port",
        type=int,
        default=DEFAULT_METRICS_PORT,
        help=f"Prometheus /metrics port (default {DEFAULT_METRICS_PORT}; 0 = any free port)",
    )
    add("--metrics-host", default="0.0.0.0", help="/metrics listen address (default 0.0.0.0)")
    add(
        "--models-dir",
        help="where copied and downloaded model files are kept (default: HOME/agent/models)",
    )
    add(
        "--disk-budget",
        type=float,
        default=None,
        metavar="GIB",
        help="the most disk the model store may take (folders used in place do not count); "
        "least recently used models no engine uses are evicted first (default: the disk, "
        "less 2 GiB)",
    )
    add(
        "--serve-rate",
        type=float,
        default=0,
        metavar="MIB_S",
        help="cap on serving model files to other nodes, in MiB/s (default 0: no cap)",
    )
    add(
        "--files-port",
        type=int,
        default=0,
        help="port serving model files to other nodes (default 0: any free port)",
    )
    add(
        "--link-port",
        type=int,
        default=0,
        help="port relaying a group's MLX rank traffic to other nodes (default 0: any free port)",
    )
    add("--home", help=HOME_HELP)
    agent.set_defaults(func=cmd_agent)


def _labels(items: list[str]) -> dict[str, str]:
    """--label KEY=VALUE flags as a dict; CliError naming the first bad one."""
    labels = {}
    for item in items:
        label, sep, value = item.partition("=")
        if not sep or not LABEL_RE.match(label) or not LABEL_RE.match(value):
            raise CliError(f"--label {item!r}: expected KEY=VALUE (letters, digits, . _ -)")
        labels[label] = value
    return labels


def cmd_agent(args: argparse.Namespace) -> None:
    from node_agent.agent import DEFAULT_GRPC_PORT, Agent, AgentConfig, split_host_port
    from node_agent.coordinator_client import NodeProfile

    if args.coordinator:
        split_host_port(args.coordinator, DEFAULT_GRPC_PORT)  # a bad address fails here, early
    home = home_of(args) / "agent"
    labels = _labels(args.label)
    if args.os_reserve_gib is not None and not 0 <= args.os_reserve_gib <= 1024:
        raise CliError(f"--os-reserve-gib {args.os_reserve_gib}: must be 0-1024")
    limit_mib = args.engine_memory_limit_mib
    if limit_mib is not None and not 1 <= limit_mib <= 2**24:
        raise CliError(f"--engine-memory-limit-mib {limit_mib}: must be 1-16777216")
    if not 1 <= args.engine_stall_s <= 3600:
        raise CliError(f"--engine-stall-s {args.engine_stall_s:g}: must be 1-3600")
    if not 0 <= args.metrics_port <= 65535:
        raise CliError(f"--metrics-port {args.metrics_port}: must be 0-65535")
    for flag, port in (("--files-port", args.files_port), ("--link-port", args.link_port)):
        if not 0 <= port <= 65535:
            raise CliError(f"{flag} {port}: must be 0-65535")
    if args.disk_budget is not None and not 0 <= args.disk_budget <= 2**20:
        raise CliError(f"--disk-budget {args.disk_budget:g}: must be 0-1048576 (GiB)")
    if not 0 <= args.serve_rate <= 2**20:
        raise CliError(f"--serve-rate {args.serve_rate:g}: must be 0-1048576 (MiB/s)")
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
        engine_stall_s=args.engine_stall_s,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        models_dir=Path(args.models_dir).expanduser() if args.models_dir else None,
        disk_budget_bytes=int(args.disk_budget * 2**30) if args.disk_budget is not None else None,
        serve_rate_mib_s=args.serve_rate,
        files_port=args.files_port,
        link_port=args.link_port,
    )
    run_loop(Agent(config).serve())
