"""The benchmarks' shared helpers that need no process: fleet.toml text, the docs' command."""

import sys
import tomllib
from pathlib import Path

from benchmarks import harness
from benchmarks.fleet import MODEL, model_toml


def test_model_toml_is_one_model_table() -> None:
    text = model_toml(Path("/m/demo"), tiers=["interactive", "batch"], pinned=True, replicas=2)
    assert tomllib.loads(text) == {
        "models": [
            {
                "name": MODEL,
                "source": "/m/demo",
                "tiers": ["interactive", "batch"],
                "pinned": True,
                "replicas": 2,
            }
        ]
    }


def test_command_line_names_the_module(monkeypatch) -> None:
    script = str(harness.REPO / "benchmarks" / "failover.py")
    monkeypatch.setattr(sys, "argv", [script, "--runs", "1", "--note", "a b"])
    assert harness.command_line() == "python -m benchmarks.failover --runs 1 --note 'a b'"
