"""Bad CLI input: one clear line naming the problem, a non-zero exit, no traceback."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import FREE_PORTS, mlxfleet


def run(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        mlxfleet(*args),
        capture_output=True,
        text=True,
        timeout=60,
        env={"MLXFLEET_HOME": str(home), "PATH": "/usr/bin:/bin"},
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("coordinator", "--config", "{tmp}/missing.toml"), "config file not found"),
        (("coordinator", "--config", "{tmp}/bad.toml"), "invalid TOML"),
        (("agent", "--coordinator", "host:notaport"), "expected HOST or HOST:PORT"),
        (("agent", "--coordinator", "127.0.0.1:1", "--token", "garbage"), "not a join token"),
        (("token", "create", "--ttl", "soon"), "expected a duration like 90s"),
        (("service", "uninstall", "agent", "--dir", "{tmp}"), "nothing to uninstall"),
        (
            ("service", "install", "agent", "--token", "x", "--dry-run"),
            "never written into a service file",
        ),
        (("token", "create", "--uses", "0"), "--uses 0: must be at least 1"),
        (("nodes",), "no coordinator is running"),
        (("nodes", "remove", "ghost"), "no coordinator is running"),
        (("agent", "--coordinator", "127.0.0.1:1"), "has not enrolled yet: pass --token"),
        (("agent", "--engine-stall-s", "0.5"), "--engine-stall-s 0.5: must be 1-3600"),
        (("up", "--model", "{tmp}/no/such/model/here"), "not a folder and not a Hugging Face id"),
        (("up", "--model", "{tmp}"), "no config.json there"),
        (("keys", "create", "--rpm", "0"), "--rpm '0': must be a positive integer"),
        (("keys", "create", "--tpm", "lots"), "--tpm 'lots': must be a positive integer"),
        (("keys", "create", "--models", " , "), "--models ' , ': name at least one model"),
        (("keys", "create", "--models", "a,b c"), "--models: 'b c' is not a model name"),
    ],
)
def test_bad_input_gives_one_line(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    (tmp_path / "bad.toml").write_text("gateway_port = \n")
    done = run(*(a.format(tmp=tmp_path) for a in args), home=tmp_path / "home")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("mlxfleet: error: ")
    assert message in lines[-1]
    assert "Traceback" not in done.stderr


def test_keys_create_prints_a_key_and_stores_its_hash(tmp_path: Path) -> None:
    done = run("keys", "create", "--name", "ci", home=tmp_path)
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip()
    assert key.startswith("mlxf-")
    assert key.encode() not in (tmp_path / "coordinator.sqlite3").read_bytes()


def test_keys_list_shows_limits_never_keys(tmp_path: Path) -> None:
    etl = run(
        "keys", "create", "--name", "etl", "--tiers", "batch", "--rpm", "2", "--tpm", "9000",
        "--models", "demo,big", home=tmp_path,
    )  # fmt: skip
    team = run("keys", "create", "--name", "team", home=tmp_path)
    assert etl.returncode == team.returncode == 0, etl.stderr + team.stderr
    table = run("keys", "list", home=tmp_path)
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines() == [
        "name  tiers               default_tier  rpm        tpm        models",
        "etl   batch               batch         2          9000       big, demo",
        "team  batch, interactive  interactive   unlimited  unlimited  all",
    ]
    listed = run("keys", "list", "--json", home=tmp_path)
    for key in (etl.stdout.strip(), team.stdout.strip()):
        assert key not in table.stdout + listed.stdout
    assert '"rpm": 2' in listed.stdout and '"rpm": null' in listed.stdout


def test_demo_model_command_writes_a_loadable_model(tmp_path: Path) -> None:
    done = run("demo-model", str(tmp_path / "m"), home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "gibberish" in done.stdout
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in (tmp_path / "m").iterdir()
    }


def test_up_with_an_unreachable_hub_model_stops_with_the_reason(tmp_path: Path) -> None:
    """No hub here: `up` must say why the model cannot load and exit, not wait forever."""
    done = run(
        "up",
        "--model",
        "mlxfleet-test/no-such-model",
        *FREE_PORTS,
        home=tmp_path,
    )
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("mlxfleet: error: model mlxfleet-test/no-such-model could not be")
    assert "cannot get model 'mlxfleet-test/no-such-model'" in last
