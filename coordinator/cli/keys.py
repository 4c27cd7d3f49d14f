"""`mlxfleet keys create | list | revoke | rotate`: team keys in the state store (no coordinator
needed: the gateway reads the store on every request, so a change applies from the next one)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from coordinator.cli.common import HOME_HELP, home_of, parse_duration, print_table, when
from coordinator.cli.errors import CliError
from coordinator.config import MODEL_NAME_RE, Config
from coordinator.errors import ConfigError
from coordinator.store import Store
from coordinator.tiers import key_tiers
from mlxfleet.errors import TierError


def add_parser(subparsers: Any) -> None:
    """`keys create [--tiers T,T] [--rpm N] [--expires 30d] ...`, `keys list [--json]`,
    `keys revoke NAME|ID` and `keys rotate NAME [--grace 24h]`."""
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
    create.add_argument("--expires", help="valid for this long: 90s, 15m, 1h, 30d (default: ever)")
    create.add_argument("--home", help=HOME_HELP)
    create.set_defaults(func=cmd_keys_create)
    keys_list = keys_sub.add_parser(
        "list", help="ids, names, state, use, expiry, tiers and limits (never the keys)"
    )
    keys_list.add_argument("--json", action="store_true")
    keys_list.add_argument("--home", help=HOME_HELP)
    keys_list.set_defaults(func=cmd_keys_list)
    revoke = keys_sub.add_parser(
        "revoke", help="refuse a key from its next request on (running streams finish)"
    )
    revoke.add_argument("key", metavar="NAME|ID", help="every valid key of a name, or one id")
    revoke.add_argument("--home", help=HOME_HELP)
    revoke.set_defaults(func=cmd_keys_revoke)
    rotate = keys_sub.add_parser(
        "rotate", help="print a new secret for a key; the old one works for --grace more"
    )
    rotate.add_argument("name")
    rotate.add_argument("--grace", default="24h", help="how long the old secret works (24h)")
    rotate.add_argument("--home", help=HOME_HELP)
    rotate.set_defaults(func=cmd_keys_rotate)


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
    expires = (
        None if args.expires is None else time.time() + parse_duration(args.expires, "--expires")
    )
    store = _store(args)
    key = store.create_api_key(
        args.name, None, ",".join(sorted(tiers.allowed)), tiers.default, rpm, tpm, models, expires
    )
    store.close()
    print(key)


def cmd_keys_revoke(args: argparse.Namespace) -> None:
    store = _store(args)
    revoked = store.revoke_api_key(args.key)
    store.close()
    if not revoked:
        raise CliError(f"no valid key named or with id {args.key!r} (see `mlxfleet keys list`)")
    print(f"revoked {revoked} key{'s' if revoked > 1 else ''}: refused from the next request on")


def cmd_keys_rotate(args: argparse.Namespace) -> None:
    grace_s = parse_duration(args.grace, "--grace", zero=True)
    store = _store(args)
    key = store.rotate_api_key(args.name, grace_s)
    store.close()
    if key is None:
        raise CliError(f"no valid key named {args.name!r} (see `mlxfleet keys list`)")
    print(key)


LIST_COLUMNS = (
    "id", "name", "state", "created", "last_used", "expires", "tiers", "default_tier", "rpm",
    "tpm", "models",
)  # fmt: skip


def cmd_keys_list(args: argparse.Namespace) -> None:
    """Every key, revoked and expired ones too: id, name, state, created, last used, expiry,
    tiers and limits; never key material (only hashes are stored). JSON times: unix seconds."""
    store = _store(args)
    now = time.time()
    rows: list[dict[str, Any]] = [
        {
            "id": i.key.key_id,
            "name": i.key.name,
            "state": i.state(now),
            "created": i.created_at,
            "last_used": i.last_used,
            "expires": i.expires_at,
            "tiers": i.key.tiers.split(","),
            "default_tier": i.key.default_tier,
            "rpm": i.key.rpm,
            "tpm": i.key.tpm,
            "models": sorted(i.key.models),
        }
        for i in store.key_infos()
    ]
    store.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:  # spelled out for people: None and [] mean no limit
        row["rpm"] = row["rpm"] or "unlimited"
        row["tpm"] = row["tpm"] or "unlimited"
        row["models"] = row["models"] or ["all"]
        row["expires"] = when(row["expires"]) or "never"
        row["created"], row["last_used"] = when(row["created"]), when(row["last_used"])
    if rows:
        print_table(rows, LIST_COLUMNS)
