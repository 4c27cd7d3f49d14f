"""`mlxfleet operator`, `login`/`logout` and `--version` as a user runs them; bad input is one
line. Subprocesses: what is tested is the real command line, exit status and output."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from coordinator import __version__
from coordinator.store import OPERATOR_PREFIX, Store
from tests.conftest import mlxfleet


def run(*args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    env = {
        "MLXFLEET_HOME": str(tmp / "home"),
        "MLXFLEET_LOGIN_FILE": str(tmp / "login.json"),
        "PATH": "/usr/bin:/bin",
    }
    return subprocess.run(mlxfleet(*args), capture_output=True, text=True, timeout=60, env=env)


def test_version_prints_the_package_version(tmp_path: Path) -> None:
    done = run("--version", tmp=tmp_path)
    assert (done.returncode, done.stdout) == (0, f"mlxfleet {__version__}\n")
    assert __version__ == "0.1.0"


def test_operator_tokens_are_stored_hashed_listed_and_revoked(tmp_path: Path) -> None:
    alice = run("operator", "create", "alice", tmp=tmp_path)
    ci = run("operator", "create", "ci@build", tmp=tmp_path)
    assert alice.returncode == ci.returncode == 0, alice.stderr + ci.stderr
    token = alice.stdout.strip()
    assert token.startswith(OPERATOR_PREFIX) and len(token) > 40
    db = tmp_path / "home" / "coordinator.sqlite3"
    assert token.encode() not in db.read_bytes()
    revoked = run("operator", "revoke", "alice", tmp=tmp_path)
    assert revoked.stdout == "revoked alice's token: refused from the next request on\n"
    store = Store(db)
    assert (store.operator(token), store.operator(ci.stdout.strip())) == (None, "ci@build")
    store.close()
    table = run("operator", "list", tmp=tmp_path).stdout.splitlines()
    assert table[0].split() == ["name", "state", "created", "revoked"]
    # created and revoked are a date and a time each (two words); not revoked: "-"
    assert [len(line.split()) for line in table[1:]] == [6, 5]
    assert [line.split()[:2] for line in table[1:]] == [
        ["alice", "revoked"],
        ["ci@build", "active"],
    ]
    assert table[2].endswith(" -")
    rows = json.loads(run("operator", "list", "--json", tmp=tmp_path).stdout)
    assert [(r["name"], r["state"], r["revoked"] is None) for r in rows] == [
        ("alice", "revoked", False),
        ("ci@build", "active", True),
    ]
    assert token not in json.dumps(rows) + "\n".join(table)


def test_logout_removes_the_saved_login(tmp_path: Path) -> None:
    (tmp_path / "login.json").write_text('{"url": "http://h:1", "token": "t"}')
    assert run("logout", tmp=tmp_path).stdout == f"logged out: removed {tmp_path}/login.json\n"
    assert not (tmp_path / "login.json").exists()
    assert run("logout", tmp=tmp_path).stdout == f"not logged in (no {tmp_path}/login.json)\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("operator", "revoke", "ghost"), "no active operator token named 'ghost'"),
        (("operator", "create", "a b"), "operator name 'a b': letters, digits and . _ @ - only"),
        (("nodes", "--coordinator", "10.0.0.1:8400"), "'10.0.0.1:8400': not a coordinator URL"),
        (
            ("nodes", "drain", "n1", "--coordinator", "https://h:8400", "--ca", "{tmp}/no.pem"),
            "No such file or directory",
        ),
        (("models", "--token", "mlxfop-x"), "--token and --ca go with --coordinator URL"),
        (("login", "ftp://h", "--token", "t"), "'ftp://h': not a coordinator URL"),
        (
            ("login", "http://127.0.0.1:1", "--token", "t"),
            "http://127.0.0.1:1: connection refused",
        ),
        (("tiers",), "no coordinator is running with MLXFLEET_HOME="),
    ],
)
def test_bad_input_gives_one_line(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    done = run(*(a.format(tmp=tmp_path) for a in args), tmp=tmp_path)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("mlxfleet: error: ")
    assert message in done.stderr
    assert not (tmp_path / "login.json").exists()
