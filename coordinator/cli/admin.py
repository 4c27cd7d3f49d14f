"""`mlxfleet token | nodes | tiers | events`: the fleet's state, for its operator.

nodes and tiers (and models, usage, audit, in their own modules) use a running coordinator's
admin API: this host's (the port from MLXFLEET_HOME/coordinator.json, the token from
MLXFLEET_HOME/admin_token, mode 600), or another's with an operator token (--coordinator or
`mlxfleet login`: remote.py). token and events read the state store directly (no coordinator
needed).
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path
from typing import Any

from coordinator.cli import remote
from coordinator.cli.common import (
    HOME_HELP_SHORT,
    add_sub_home,
    home_of,
    parse_duration,
    print_table,
)
from coordinator.cli.errors import CliError
from coordinator.config import Config

NODE_VERBS = {
    "remove": "revoke a node's certificate and move its models",
    "drain": "move its models off and place nothing new there",
    "uncordon": "let it take models again",
}
TIER_FLAGS = {  # `tiers set` flag -> (the admin API's knob, help)
    "--window-ms": ("batch_window_ms", "batch window"),
    "--max-batch-size": ("max_batch_size", None),
    "--max-concurrency": ("max_concurrency", None),
    "--queue-limit": ("queue_limit", None),
}
NODE_COLUMNS = (
    "id", "state", "cordoned", "role", "chip", "ram_gib", "available_gib", "thermal", "models",
)  # fmt: skip


def add_parser(subparsers: Any) -> None:
    """`token create`, `nodes [VERB ID]`, `tiers [set TIER ...]` and `events`."""
    token = subparsers.add_parser("token", help="join tokens for new nodes")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    token_create = token_sub.add_parser("create", help="print a join token (stored hashed)")
    token_create.add_argument("--ttl", default="1h", help="how long it is valid (default 1h)")
    token_create.add_argument("--uses", type=int, default=1, help="nodes it may enroll (1)")
    token_create.add_argument("--home", help=HOME_HELP_SHORT)
    token_create.set_defaults(func=cmd_token)

    nodes = _command(subparsers, "nodes", "list nodes; `nodes remove ID` revokes one", cmd_nodes)
    nodes.add_argument("--json", action="store_true")
    nodes_sub = nodes.add_subparsers(dest="nodes_command")
    for verb, text in NODE_VERBS.items():
        node_verb = nodes_sub.add_parser(verb, help=text)
        node_verb.add_argument("node_id")
        add_sub_home(node_verb)

    tiers = _command(
        subparsers, "tiers", "tier knobs; `tiers set batch --window-ms 200`", cmd_tiers
    )
    tiers_sub = tiers.add_subparsers(dest="tiers_command")
    tiers_set = tiers_sub.add_parser("set", help="change a tier's knobs without reloading")
    tiers_set.add_argument("tier", choices=("interactive", "batch"))
    for flag, (_, flag_help) in TIER_FLAGS.items():
        tiers_set.add_argument(flag, type=int, default=None, help=flag_help)
    add_sub_home(tiers_set)

    events = subparsers.add_parser(
        "events", help="recent events: triggers, engine exits, enrollments"
    )
    events.add_argument("--limit", type=int, default=50)
    events.add_argument("--node", help="only this node's events")
    events.add_argument("--json", action="store_true")
    events.add_argument("--home", help=HOME_HELP_SHORT)
    events.set_defaults(func=cmd_events)


def _command(subparsers: Any, name: str, text: str, func: Any) -> argparse.ArgumentParser:
    """A top-level admin API command with its --home, --coordinator, --token and --ca flags."""
    parser: argparse.ArgumentParser = subparsers.add_parser(name, help=text)
    parser.add_argument("--home", help=HOME_HELP_SHORT)
    remote.add_flags(parser)
    parser.set_defaults(func=func)
    return parser


def cmd_token(args: argparse.Namespace) -> None:
    from coordinator.server import create_join_token  # lazily: it imports litellm

    if args.uses < 1:
        raise CliError(f"--uses {args.uses}: must be at least 1")
    token = create_join_token(
        Config(home=home_of(args)), parse_duration(args.ttl, "--ttl"), args.uses
    )
    print(token)


def cmd_events(args: argparse.Namespace) -> None:
    from coordinator.store import Store

    home = home_of(args)
    if not Config(home=home).db_path.exists():
        raise CliError(f"no state store in {home}")
    store = Store(Config(home=home).db_path)
    events = [e for e in store.events(args.limit) if args.node is None or e.node_id == args.node]
    store.close()
    if args.json:
        rows = [{"ts": e.ts, "node": e.node_id, "kind": e.kind, "detail": e.detail} for e in events]
        print(json.dumps(rows, indent=2))
        return
    for e in reversed(events):
        when = datetime.datetime.fromtimestamp(e.ts).strftime("%Y-%m-%d %H:%M:%S")
        print(f"{when}  {e.node_id or '-':<20}  {e.kind:<18}  {e.detail}")


def _admin(
    home: Path,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    args: argparse.Namespace | None = None,
) -> Any:
    """Call a running coordinator's admin API: the one `args` name (--coordinator, --home), else
    the saved login, else this host's (remote.target_of)."""
    return remote.call(remote.target_of(args, home), method, path, body)


def cmd_nodes(args: argparse.Namespace) -> None:
    home = home_of(args)
    verb = args.nodes_command
    if verb == "remove":
        _admin(home, "DELETE", f"/admin/v1/nodes/{args.node_id}", args=args)
        print(f"removed {args.node_id}: its certificate is refused from now on")
        return
    if verb in ("drain", "uncordon"):
        _admin(home, "POST", f"/admin/v1/nodes/{args.node_id}/{verb}", args=args)
        done = "draining: its models move elsewhere, nothing new lands"
        print(f"{args.node_id}: " + (done if verb == "drain" else "accepting models"))
        return
    nodes = _admin(home, "GET", "/admin/v1/nodes", args=args)["nodes"]
    if args.json:
        print(json.dumps(nodes, indent=2))
        return
    print_table(nodes, NODE_COLUMNS)


def cmd_tiers(args: argparse.Namespace) -> None:
    home = home_of(args)
    if args.tiers_command == "set":
        changes = {
            knob: value
            for flag, (knob, _) in TIER_FLAGS.items()
            if (value := getattr(args, flag[2:].replace("-", "_"))) is not None
        }
        if not changes:
            raise CliError(f"tiers set: give at least one of {', '.join(TIER_FLAGS)}")
        reply = _admin(home, "POST", f"/admin/v1/tiers/{args.tier}", changes, args)
        print(f"{args.tier}: {reply[args.tier]} (running engines apply it without reloading)")
        return
    knobs = _admin(home, "GET", "/admin/v1/tiers", args=args)
    print_table(
        [{"tier": tier, **values} for tier, values in knobs.items()],
        ("tier", "max_concurrency", "batch_window_ms", "max_batch_size", "queue_limit"),
    )
