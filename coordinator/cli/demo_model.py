"""`mlxfleet demo-model PATH`: write the offline demo model (random weights, tiny)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> None:
    """`demo-model PATH`; `mlxfleet up` runs it in a child process when it has no model."""
    demo = subparsers.add_parser("demo-model", help="write the offline demo model to PATH")
    demo.add_argument("path")
    demo.set_defaults(func=cmd_demo_model)


def cmd_demo_model(args: argparse.Namespace) -> None:
    from node_agent.engine.demo_model import write_demo_model  # lazily: it imports MLX

    path = write_demo_model(Path(args.path))
    print(f"wrote the demo model (random weights: gibberish output) to {path}")
