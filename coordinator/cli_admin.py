"""`mlxfleet nodes | models | tiers`: the commands that talk to a running coordinator.

They use its admin API on this host: the port from MLXFLEET_HOME/coordinator.json, the token
from MLXFLEET_HOME/admin_token (mode 600).
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from coordinator.config import default_home
from coordinator.errors import Error


class CliError(Error):
    """A failed admin call; printed as one line."""


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


def _print_table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> None:
    def cell(value: Any) -> str:
        if isinstance(value, list):
            return ", ".join(map(str, value)) or "-"
        return "-" if value is None or value == "" else str(value)

    table = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in table)) for i, c in enumerate(columns)]
    for line in [list(columns), *table]:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())


def cmd_nodes(args: argparse.Namespace) -> None:
    home = Path(args.home or default_home()).expanduser()
    if args.nodes_command == "remove":
        _admin(home, "DELETE", f"/admin/v1/nodes/{args.node_id}")
        print(f"removed {args.node_id}: its certificate is refused from now on")
        return
    if args.nodes_command in ("drain", "uncordon"):
        _admin(home, "POST", f"/admin/v1/nodes/{args.node_id}/{args.nodes_command}")
        print(
            f"{args.node_id}: "
            + (
                "draining: its models move elsewhere, nothing new lands"
                if args.nodes_command == "drain"
                else "accepting models"
            )
        )
        return
    nodes = _admin(home, "GET", "/admin/v1/nodes")["nodes"]
    if args.json:
        print(json.dumps(nodes, indent=2))
        return
    _print_table(
        nodes,
        (
            "id",
            "state",
            "cordoned",
            "role",
            "chip",
            "ram_gib",
            "available_gib",
            "thermal",
            "models",
        ),
    )


def cmd_models(args: argparse.Namespace) -> None:
    home = Path(args.home or default_home()).expanduser()
    rows = _admin(home, "GET", "/admin/v1/models")["models"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    _print_table(rows, ("model", "tier", "state", "replicas", "size_gib", "engines", "pending"))


def cmd_tiers(args: argparse.Namespace) -> None:
    home = Path(args.home or default_home()).expanduser()
    if args.tiers_command == "set":
        changes = {
            name: value
            for name, value in (
                ("batch_window_ms", args.window_ms),
                ("max_batch_size", args.max_batch_size),
                ("max_concurrency", args.max_concurrency),
                ("queue_limit", args.queue_limit),
            )
            if value is not None
        }
        if not changes:
            raise CliError(
                "tiers set: give at least one of --window-ms, --max-batch-size, "
                "--max-concurrency, --queue-limit"
            )
        reply = _admin(home, "POST", f"/admin/v1/tiers/{args.tier}", changes)
        print(f"{args.tier}: {reply[args.tier]} (running engines apply it without reloading)")
        return
    knobs = _admin(home, "GET", "/admin/v1/tiers")
    _print_table(
        [{"tier": tier, **values} for tier, values in knobs.items()],
        ("tier", "max_concurrency", "batch_window_ms", "max_batch_size", "queue_limit"),
    )
