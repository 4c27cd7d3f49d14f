"""`mlxfleet token | nodes | models | tiers | events`: the fleet's state, for its operator.

nodes, models and tiers use the running coordinator's admin API on this host: the port from
MLXFLEET_HOME/coordinator.json, the token from MLXFLEET_HOME/admin_token (mode 600). token and
events read the state store directly (no coordinator needed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from coordinator.cli.common import HOME_HELP_SHORT, add_sub_home, home_of, print_table
from coordinator.cli.errors import CliError
from coordinator.config import Config

DURATION_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
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
    """`token create`, `nodes [VERB ID]`, `models`, `tiers [set TIER ...]` and `events`."""
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

    models = _command(
        subparsers, "models", "models per tier: state, replicas, where, why not", cmd_models
    )
    models.add_argument("--json", action="store_true")

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
    """A top-level command with its --home flag."""
    parser: argparse.ArgumentParser = subparsers.add_parser(name, help=text)
    parser.add_argument("--home", help=HOME_HELP_SHORT)
    parser.set_defaults(func=func)
    return parser


def parse_duration(text: str) -> float:
    """`90s`, `15m`, `1h`, `7d` (or plain seconds) -> seconds."""
    units = DURATION_UNITS_S
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise CliError(f"--ttl {text!r}: expected a duration like 90s, 15m, 1h or 7d") from None
    if not 0 < seconds <= 366 * 86400:
        raise CliError(f"--ttl {text!r}: must be more than 0 and at most a year")
    return seconds


def cmd_token(args: argparse.Namespace) -> None:
    from coordinator.server import create_join_token  # lazily: it imports litellm

    if args.uses < 1:
        raise CliError(f"--uses {args.uses}: must be at least 1")
    token = create_join_token(Config(home=home_of(args)), parse_duration(args.ttl), args.uses)
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


def _admin(home: Path, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """Call the running coordinator's admin API on this host (token from MLXFLEET_HOME)."""
    from coordinator.server import ADMIN_TOKEN_FILE, RUNTIME_FILE  # lazily: it imports litellm

    try:
        runtime = json.loads((home / RUNTIME_FILE).read_text())
        token = (home / ADMIN_TOKEN_FILE).read_text().strip()
    except (OSError, ValueError):
        raise CliError(f"no coordinator is running with MLXFLEET_HOME={home}") from None
    host = runtime["host"] if runtime["host"] not in ("0.0.0.0", "::") else "127.0.0.1"
    request = urllib.request.Request(
        f"http://{host}:{runtime['gateway_port']}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        message = json.loads(exc.read() or b"{}").get("error", {}).get("message", str(exc))
        raise CliError(message) from None
    except OSError as exc:
        raise CliError(f"coordinator not reachable: {exc}") from None


def cmd_nodes(args: argparse.Namespace) -> None:
    home = home_of(args)
    verb = args.nodes_command
    if verb == "remove":
        _admin(home, "DELETE", f"/admin/v1/nodes/{args.node_id}")
        print(f"removed {args.node_id}: its certificate is refused from now on")
        return
    if verb in ("drain", "uncordon"):
        _admin(home, "POST", f"/admin/v1/nodes/{args.node_id}/{verb}")
        done = "draining: its models move elsewhere, nothing new lands"
        print(f"{args.node_id}: " + (done if verb == "drain" else "accepting models"))
        return
    nodes = _admin(home, "GET", "/admin/v1/nodes")["nodes"]
    if args.json:
        print(json.dumps(nodes, indent=2))
        return
    print_table(nodes, NODE_COLUMNS)


def cmd_models(args: argparse.Namespace) -> None:
    rows = _admin(home_of(args), "GET", "/admin/v1/models")["models"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print_table(rows, ("model", "tier", "state", "replicas", "size_gib", "engines", "pending"))


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
        reply = _admin(home, "POST", f"/admin/v1/tiers/{args.tier}", changes)
        print(f"{args.tier}: {reply[args.tier]} (running engines apply it without reloading)")
        return
    knobs = _admin(home, "GET", "/admin/v1/tiers")
    print_table(
        [{"tier": tier, **values} for tier, values in knobs.items()],
        ("tier", "max_concurrency", "batch_window_ms", "max_batch_size", "queue_limit"),
    )
