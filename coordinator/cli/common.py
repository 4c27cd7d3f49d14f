"""What the command modules share: the state folder flag, the daemons' loop, a text table."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from coordinator.cli.errors import CliError
from coordinator.cli.remote import add_flags
from coordinator.config import default_home

DURATION_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
HOME_HELP = "state folder (default $MLXFLEET_HOME or ~/.mlxfleet)"
HOME_HELP_SHORT = "state folder (default $MLXFLEET_HOME)"


def home_of(args: argparse.Namespace) -> Path:
    """The state folder a command works in: --home, else $MLXFLEET_HOME or ~/.mlxfleet."""
    return Path(args.home or default_home()).expanduser()


def add_sub_home(parser: argparse.ArgumentParser) -> None:
    """--home, --coordinator, --token and --ca after an admin command's verb too (`nodes remove
    ID --home H`); absent, the command's stay."""
    parser.add_argument("--home", default=argparse.SUPPRESS, help="state folder")
    add_flags(parser, after_verb=True)


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


def parse_duration(text: str, flag: str, zero: bool = False) -> float:
    """`90s`, `15m`, `1h`, `7d` (or plain seconds) -> seconds, more than 0 (or 0 too, with
    `zero`) and at most a year; CliError naming `flag` otherwise."""
    units = DURATION_UNITS_S
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise CliError(f"{flag} {text!r}: expected a duration like 90s, 15m, 1h or 7d") from None
    if not (seconds >= 0 if zero else seconds > 0) or seconds > 366 * 86400:
        least = "at least 0" if zero else "more than 0"
        raise CliError(f"{flag} {text!r}: must be {least} and at most a year")
    return seconds


def when(ts: float | None) -> str | None:
    """A time for people: local, to the minute; None stays None (printed as -)."""
    if ts is None:
        return None
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")
