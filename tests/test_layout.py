"""The package boundaries and size limits of docs/architecture.md ("Where things live").

node_agent and coordinator each import only the shared contract (`mlxfleet`, in protos/) and
themselves; only the CLI (coordinator/cli/), which starts both sides in `mlxfleet up`, imports
both. The shared contract imports neither side.
"""

from __future__ import annotations

import ast
import statistics
from pathlib import Path

from tests.conftest import REPO

PACKAGES = {"coordinator": REPO / "coordinator", "node_agent": REPO / "node_agent"}
SHARED = REPO / "protos" / "mlxfleet"
CLI = REPO / "coordinator" / "cli"
MAX_MODULE_LINES = 500
MAX_MEDIAN_LINES = 250


def shipped_modules() -> list[Path]:
    files = [*SHARED.rglob("*.py"), *(f for p in PACKAGES.values() for f in p.rglob("*.py"))]
    return sorted(f for f in files if "_pb2" not in f.name)


def imported_packages(path: Path) -> set[str]:
    """Top-level package names a module imports (absolute imports only; we use no relative)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def crossings(root: Path, forbidden: set[str], exempt: Path | None = None) -> list[str]:
    return sorted(
        f"{path.relative_to(REPO)} imports {name}"
        for path in root.rglob("*.py")
        if exempt is None or exempt not in path.parents
        for name in imported_packages(path) & forbidden
    )


def test_node_agent_imports_nothing_from_coordinator() -> None:
    assert crossings(PACKAGES["node_agent"], {"coordinator"}) == []


def test_coordinator_imports_nothing_from_node_agent_except_the_cli() -> None:
    assert crossings(PACKAGES["coordinator"], {"node_agent"}, exempt=CLI) == []


def test_the_shared_contract_imports_neither_side_nor_mlx() -> None:
    assert crossings(SHARED, {"coordinator", "node_agent", "mlx", "mlx_lm"}) == []


def test_module_sizes() -> None:
    sizes = {path: len(path.read_text().splitlines()) for path in shipped_modules()}
    too_long = {str(p.relative_to(REPO)): n for p, n in sizes.items() if n > MAX_MODULE_LINES}
    assert too_long == {}
    assert statistics.median(sizes.values()) <= MAX_MEDIAN_LINES
