"""`mlxfleet models [add | set | remove]` and `mlxfleet reload`: the models the fleet serves,
changed at runtime through the running coordinator's admin API (no restart; other models'
streams go on). fleet.toml stays the starting configuration; a change made here is stored and
wins over its table of that name (coordinator/catalog.py)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from coordinator.cli.admin import _admin, _command
from coordinator.cli.common import add_sub_home, home_of, print_table

FIELDS = {  # flag -> (fleet.toml field, type, help)
    "--tiers": ("tiers", str, "tiers to serve it in, a,b (default interactive)"),
    "--replicas": ("replicas", int, "engines per tier (default 1)"),
    "--context-length": ("context_length", int, "tokens of context (default: the model's)"),
    "--max-concurrency": ("max_concurrency", int, "requests at once per engine (the tier's)"),
    "--sharding": ("sharding", str, "auto: split over several nodes when none holds it; never"),
}


def add_parser(subparsers: Any) -> None:
    """`models [--json]`, `models add NAME SOURCE ...`, `models set NAME ...`, `models remove
    NAME`, `models reset NAME` and `reload`."""
    models = _command(
        subparsers, "models", "models per tier; `models add|set|remove` change them", cmd_models
    )
    models.add_argument("--json", action="store_true")
    verbs = models.add_subparsers(dest="models_command")
    add = verbs.add_parser("add", help="serve a new model, without a restart")
    add.add_argument("name")
    add.add_argument("source", help="an MLX model folder or a Hugging Face id")
    set_ = verbs.add_parser("set", help="change a model: engines started otherwise are replaced")
    set_.add_argument("name")
    set_.add_argument("--source", help="an MLX model folder or a Hugging Face id")
    for verb, pinned in ((add, "store_true"), (set_, argparse.BooleanOptionalAction)):
        for flag, (_, kind, text) in FIELDS.items():
            verb.add_argument(flag, type=kind, default=None, help=text)
        verb.add_argument("--pinned", action=pinned, default=None, help="never unload it")
        add_sub_home(verb)
    remove = verbs.add_parser("remove", help="stop serving a model (its streams finish first)")
    remove.add_argument("name")
    add_sub_home(remove)
    reset = verbs.add_parser("reset", help="forget a model's runtime change: fleet.toml's again")
    reset.add_argument("name")
    add_sub_home(reset)
    _command(subparsers, "reload", "re-read fleet.toml: its models apply now", cmd_reload)


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    """The fleet.toml fields the flags give (the absent ones left out)."""
    table: dict[str, Any] = {}
    for flag, (field, _, _) in FIELDS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            table[field] = [t.strip() for t in value.split(",")] if field == "tiers" else value
    if args.pinned is not None:
        table["pinned"] = args.pinned
    if getattr(args, "source", None) is not None:
        table["source"] = args.source
    return table


def cmd_models(args: argparse.Namespace) -> None:
    home = home_of(args)
    verb = args.models_command
    if verb == "add":
        reply = _admin(home, "POST", "/admin/v1/models", {"name": args.name, **_fields(args)}, args)
        print(f"{reply['model']}: added ({', '.join(reply['tiers'])}); placing it now")
        return
    if verb == "set":
        reply = _admin(home, "PATCH", f"/admin/v1/models/{args.name}", _fields(args), args)
        print(f"{reply['model']}: changed ({', '.join(reply['tiers'])})")
        return
    if verb == "remove":
        _admin(home, "DELETE", f"/admin/v1/models/{args.name}", args=args)
        print(f"{args.name}: removed; its requests in flight finish, then its engines stop")
        return
    if verb == "reset":
        reply = _admin(home, "DELETE", f"/admin/v1/model_changes/{args.name}", args=args)
        served = "fleet.toml's tables apply" if reply["served"] else "not in fleet.toml: not served"
        print(f"{args.name}: runtime change forgotten; {served}")
        return
    rows = _admin(home, "GET", "/admin/v1/models", args=args)["models"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    columns: tuple[str, ...] = (
        *("model", "tier", "state", "replicas", "size_gib", "engines", "pending", "files_on"),
    )
    if any(r.get("copies") for r in rows):
        columns = (*columns, "copies")
    if any(r.get("groups") for r in rows):
        columns = (*columns, "groups")
        rows = [r | {"groups": [group_text(g) for g in r.get("groups") or []]} for r in rows]
    print_table(rows, columns)


def group_text(group: dict[str, Any]) -> str:
    """vm-1 layers 2-5 0.6 GiB + vm-2 layers 0-1 0.3 GiB (rank 0, which serves, first)."""
    members = group["members"]
    return " + ".join(f"{m['node']} layers {m['layers']} {_size(m['bytes'])}" for m in members)


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 // 10 else f"{n / 2**20:.0f} MiB"


def cmd_reload(args: argparse.Namespace) -> None:
    reply = _admin(home_of(args), "POST", "/admin/v1/reload", args=args)
    print(f"reloaded: serving {', '.join(reply['models']) or 'no models'}")
    if reply["needs_restart"]:
        print(f"changed, applied at the next restart: {', '.join(reply['needs_restart'])}")
    for name in reply["overridden"]:
        print(f"{name}: changed at runtime, which wins over fleet.toml (`models reset {name}`)")
