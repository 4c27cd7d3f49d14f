"""`mlxfleet keys create | list`: team keys in the state store (no coordinator needed)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from coordinator.cli.common import HOME_HELP, home_of, print_table
from coordinator.config import MODEL_NAME_RE, Config
from coordinator.errors import ConfigError
from coordinator.store import Store
from coordinator.tiers import key_tiers
from mlxfleet.errors import TierError


def add_parser(subparsers: Any) -> None:
    """`keys create [--tiers T,T] [--rpm N] ...` and `keys list [--json]`."""
    keys = subparsers.add_parser("keys", help="team API keys")
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
    create.add_argument("--home", help=HOME_HELP)
    create.set_defaults(func=cmd_keys_create)
    keys_list = keys_sub.add_parser("list", help="names, tiers and limits (never the keys)")
    keys_list.add_argument("--json", action="store_true")
    keys_list.add_argument("--home", help=HOME_HELP)
    keys_list.set_defaults(func=cmd_keys_list)


def _store(args: argparse.Namespace) -> Store:
    return Store(Config(home=home_of(args)).db_path)


def positive_int(flag: str, text: str | None) -> int | None:
    """A per-minute limit from the command line; None when the flag is absent."""
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"{flag} {text!r}: must be a positive integer")
    return value


def model_names(text: str | None) -> frozenset[str]:
    """`a,b` -> {a, b}; None (all models) when the flag is absent."""
    if text is None:
        return frozenset()
    names = frozenset(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise ConfigError(f"--models {text!r}: name at least one model (a,b)")
    for name in sorted(names):
        if not MODEL_NAME_RE.match(name):
            raise ConfigError(f"--models: {name!r} is not a model name")
    return names


def cmd_keys_create(args: argparse.Namespace) -> None:
    try:
        tiers = key_tiers(args.tiers, args.default_tier or args.tiers.split(",")[0].strip())
    except TierError as exc:
        raise ConfigError(f"--tiers/--default-tier: {exc}") from None
    rpm = positive_int("--rpm", args.rpm)
    tpm = positive_int("--tpm", args.tpm)
    models = model_names(args.models)
    store = _store(args)
    key = store.create_api_key(
        args.name, None, ",".join(sorted(tiers.allowed)), tiers.default, rpm, tpm, models
    )
    store.close()
    print(key)


def cmd_keys_list(args: argparse.Namespace) -> None:
    """Names, tiers and limits of every key; never key material (only hashes are stored)."""
    store = _store(args)
    rows = [
        {
            "name": k.name,
            "tiers": k.tiers.split(","),
            "default_tier": k.default_tier,
            "rpm": k.rpm,
            "tpm": k.tpm,
            "models": sorted(k.models),
        }
        for k in store.api_keys()
    ]
    store.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:  # spelled out for people: None and [] mean no limit
        row["rpm"] = row["rpm"] or "unlimited"
        row["tpm"] = row["tpm"] or "unlimited"
        row["models"] = row["models"] or ["all"]
    if rows:
        print_table(rows, ("name", "tiers", "default_tier", "rpm", "tpm", "models"))
