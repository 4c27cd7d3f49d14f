"""Bad CLI input: one clear line naming the problem, a non-zero exit, no traceback."""

from __future__ import annotations

import json
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
        (("keys", "create", "--expires", "soon"), "--expires 'soon': expected a duration like"),
        (("keys", "create", "--expires=-1d"), "--expires '-1d': must be more than 0"),
        (("keys", "revoke", "nobody"), "no valid key named or with id 'nobody'"),
        (("keys", "rotate", "nobody"), "no valid key named 'nobody'"),
        (("keys", "rotate", "x", "--grace=-5m"), "--grace '-5m': must be at least 0"),
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
    header, *lines = table.stdout.splitlines()
    assert header.split() == [
        "id", "name", "state", "created", "last_used", "expires", "tiers", "default_tier", "rpm",
        "tpm", "models",
    ]  # fmt: skip
    # created is a date and a time (two words); last_used is "-" until a request
    assert [line.split()[1:3] + line.split()[5:] for line in lines] == [
        ["etl", "active", "-", "never", "batch", "batch", "2", "9000", "big,", "demo"],
        ["team", "active", "-", "never", "batch,", "interactive", "interactive", "unlimited",
         "unlimited", "all"],
    ]  # fmt: skip
    listed = run("keys", "list", "--json", home=tmp_path)
    for key in (etl.stdout.strip(), team.stdout.strip()):
        assert key not in table.stdout + listed.stdout
    rows = json.loads(listed.stdout)
    assert [(r["name"], r["rpm"], r["expires"], r["state"]) for r in rows] == [
        ("etl", 2, None, "active"),
        ("team", None, None, "active"),
    ]
    assert all(r["id"].startswith("k-") and len(r["id"]) == 10 for r in rows)


def test_keys_revoke_rotate_and_expiry_from_the_cli(tmp_path: Path) -> None:
    from coordinator.store import Store

    old = run("keys", "create", "--name", "ci", home=tmp_path).stdout.strip()
    soon = run("keys", "create", "--name", "tmp", "--expires", "1h", home=tmp_path).stdout.strip()
    rotated = run("keys", "rotate", "ci", "--grace", "0", home=tmp_path)
    assert rotated.returncode == 0, rotated.stderr
    new = rotated.stdout.strip()
    store = Store(tmp_path / "coordinator.sqlite3")
    assert store.api_key(old) is None and store.api_key(new) is not None
    [tmp] = [i for i in store.key_infos() if i.key.name == "tmp"]
    assert tmp.expires_at is not None and 3500 < tmp.expires_at - tmp.created_at <= 3600
    store.close()
    revoked = run("keys", "revoke", "tmp", home=tmp_path)
    assert revoked.stdout.strip() == "revoked 1 key: refused from the next request on"
    assert Store(tmp_path / "coordinator.sqlite3").api_key(soon) is None
    states = {
        r["name"]: r["state"]
        for r in json.loads(run("keys", "list", "--json", home=tmp_path).stdout)
    }
    assert states == {"ci": "active", "tmp": "revoked"}


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
