"""House style is enforced by the tools in pyproject: ruff (lint + format) and mypy."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO, timeout=300
    )


def test_ruff_lint_and_format_are_clean() -> None:
    lint = tool("ruff", "check", ".")
    assert lint.returncode == 0, lint.stdout
    fmt = tool("ruff", "format", "--check", ".")
    assert fmt.returncode == 0, fmt.stdout


def test_mypy_is_clean() -> None:
    done = tool("mypy")
    assert done.returncode == 0, done.stdout
