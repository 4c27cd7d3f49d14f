"""`mlxfleet usage` and `mlxfleet audit`: who used how many tokens of which model, and each
request's record (never its text), from the running coordinator's request log."""

from __future__ import annotations

import argparse
import datetime
import json
import time
import urllib.parse
from typing import Any

from coordinator.cli.admin import _admin, _command
from coordinator.cli.common import home_of, parse_duration, print_table

USAGE_COLUMNS = ("requests", "ok", "prompt_tokens", "completion_tokens", "cached_tokens")
AUDIT_COLUMNS = (
    "time", "key_name", "api", "model", "tier", "route", "node_id", "status", "prompt_tokens",
    "completion_tokens", "cached_tokens", "ttft_s", "duration_s",
)  # fmt: skip


def add_parser(subparsers: Any) -> None:
    """`usage [--since 7d] [--by key|model|tier|day] [--json]` and `audit [--key K] [--model
    M] [--since 1d] [--limit N] [--json]`."""
    usage = _command(
        subparsers, "usage", "requests and tokens per key, model, tier or day", cmd_usage
    )
    usage.add_argument("--since", default="7d", help="this far back: 1h, 7d, 30d (default 7d)")
    usage.add_argument("--by", choices=("key", "model", "tier", "day"), default="key")
    usage.add_argument("--json", action="store_true")
    audit = _command(
        subparsers, "audit", "recent requests: who, what, where, how (no text)", cmd_audit
    )
    audit.add_argument("--key", help="one key's requests: its name or id")
    audit.add_argument("--model", help="one model's requests")
    audit.add_argument("--since", default="1d", help="this far back (default 1d)")
    audit.add_argument("--limit", type=int, default=100, help="newest first, at most (100)")
    audit.add_argument("--json", action="store_true")


def _since(text: str) -> float:
    return time.time() - parse_duration(text, "--since")


def cmd_usage(args: argparse.Namespace) -> None:
    query = urllib.parse.urlencode({"since": _since(args.since), "by": args.by})
    rows = _admin(home_of(args), "GET", f"/admin/v1/usage?{query}", args=args)["rows"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        print(f"no requests in the last {args.since}")
        return
    total = {c: sum(r[c] for r in rows) for c in USAGE_COLUMNS}
    print_table([*rows, {args.by: "total", **total}], (args.by, *USAGE_COLUMNS))


def cmd_audit(args: argparse.Namespace) -> None:
    params: dict[str, Any] = {"since": _since(args.since), "limit": args.limit}
    params |= {k: v for k in ("key", "model") if (v := getattr(args, k)) is not None}
    query = urllib.parse.urlencode(params)
    rows = _admin(home_of(args), "GET", f"/admin/v1/audit?{query}", args=args)["rows"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        row["time"] = datetime.datetime.fromtimestamp(row["ts"]).strftime("%Y-%m-%d %H:%M:%S")
        for seconds in ("ttft_s", "duration_s"):
            row[seconds] = None if row[seconds] is None else f"{row[seconds]:.3f}"
    if rows:
        print_table(rows, AUDIT_COLUMNS)
