"""What the command modules share: the state folder flag, the daemons' loop, a text table."""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from coordinator.config import default_home

HOME_HELP = "state folder (default $MLXFLEET_HOME or ~/.mlxfleet)"
HOME_HELP_SHORT = "state folder (default $MLXFLEET_HOME)"


def home_of(args: argparse.Namespace) -> Path:
    """The state folder a command works in: --home, else $MLXFLEET_HOME or ~/.mlxfleet."""
    return Path(args.home or default_home()).expanduser()


def add_sub_home(parser: argparse.ArgumentParser) -> None:
    """--home after a verb too (`nodes remove ID --home H`); absent, the command's stays."""
    parser.add_argument("--home", default=argparse.SUPPRESS, help="state folder")


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run a daemon's main coroutine on uvloop (MLXFLEET_LOOP=asyncio picks the stdlib loop)."""
    if os.environ.get("MLXFLEET_LOOP", "uvloop") == "uvloop":
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


def print_table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> None:
    """Rows as aligned columns under a header line; lists joined with ", ", blanks as -."""

    def cell(value: Any) -> str:
        if isinstance(value, list):
            return ", ".join(map(str, value)) or "-"
        return "-" if value is None or value == "" else str(value)

    table = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in table)) for i, c in enumerate(columns)]
    for line in [list(columns), *table]:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())
