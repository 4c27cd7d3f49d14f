"""`mlxfleet operator create | list | revoke`: tokens for the admin commands from another host.

Run on the coordinator host: the tokens live in its state store, hashed, and the coordinator
looks each admin request's token up there, so a revocation applies from the next request.
Elsewhere: `mlxfleet login URL --token T`, or `--coordinator URL --token T` on one command.
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

from coordinator.cli.common import HOME_HELP, home_of, print_table, when
from coordinator.cli.errors import CliError
from coordinator.config import Config
from coordinator.store import Store

OPERATOR_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


def add_parser(subparsers: Any) -> None:
    """`operator create NAME`, `operator list [--json]` and `operator revoke NAME`."""
    operator = subparsers.add_parser(
        "operator", help="operator tokens: the admin commands from another host"
    )
    operator_sub = operator.add_subparsers(dest="operator_command", required=True)
    create = operator_sub.add_parser("create", help="print a new operator token (stored hashed)")
    create.add_argument("name", help="who holds it, e.g. alice or ci")
    create.set_defaults(func=cmd_operator_create)
    listing = operator_sub.add_parser("list", help="names, state and dates (never tokens)")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_operator_list)
    revoke = operator_sub.add_parser("revoke", help="refuse a name's tokens from now on")
    revoke.add_argument("name")
    revoke.set_defaults(func=cmd_operator_revoke)
    for verb in (create, listing, revoke):
        verb.add_argument("--home", help=HOME_HELP)


def _store(args: argparse.Namespace) -> Store:
    return Store(Config(home=home_of(args)).db_path)


def cmd_operator_create(args: argparse.Namespace) -> None:
    if not OPERATOR_NAME_RE.match(args.name):
        raise CliError(f"operator name {args.name!r}: letters, digits and . _ @ - only, at most 64")
    store = _store(args)
    token = store.create_operator(args.name)
    store.close()
    print(token)


def cmd_operator_list(args: argparse.Namespace) -> None:
    """Every token ever made, revoked ones too. JSON times: unix seconds."""
    store = _store(args)
    rows: list[dict[str, Any]] = [
        {
            "name": name,
            "state": "active" if revoked is None else "revoked",
            "created": created,
            "revoked": revoked,
        }
        for name, created, revoked in store.operators()
    ]
    store.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        row["created"], row["revoked"] = when(row["created"]), when(row["revoked"])
    if rows:
        print_table(rows, ("name", "state", "created", "revoked"))


def cmd_operator_revoke(args: argparse.Namespace) -> None:
    store = _store(args)
    revoked = store.revoke_operator(args.name)
    store.close()
    if not revoked:
        raise CliError(
            f"no active operator token named {args.name!r} (see `mlxfleet operator list`)"
        )
    print(
        f"revoked {args.name}'s token{'s' if revoked > 1 else ''}: refused from the next request on"
    )
