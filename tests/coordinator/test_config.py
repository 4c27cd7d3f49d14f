"""Config: TOML + env + CLI overrides, and one clear message per bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.config import DEFAULT_CONTEXT_LENGTH, load_config
from coordinator.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    return path


def test_models_and_ports_from_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLXFLEET_PORT", raising=False)
    path = write(
        tmp_path, 'gateway_port = 9000\n[[models]]\nname = "q"\nsource = "/m/q"\ntier = "batch"\n'
    )
    config = load_config(path, home=tmp_path)
    assert config.gateway_port == 9000
    assert config.grpc_port == 8401
    [model] = config.models
    assert (model.name, model.source, model.tier) == ("q", "/m/q", "batch")
    assert model.context_length == DEFAULT_CONTEXT_LENGTH
    assert model.max_concurrency == 4


def test_cli_overrides_env_overrides_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "gateway_port = 9000\n")
    monkeypatch.setenv("MLXFLEET_PORT", "9100")
    assert load_config(path).gateway_port == 9100
    assert load_config(path, gateway_port=9200).gateway_port == 9200


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("gateway_port = ", "invalid TOML"),
        ("colour = 1\n", "unknown key 'colour'"),
        ("gateway_port = 70000\n", "gateway_port must be a port number"),
        ('[[models]]\nname = "a"\n', "'source' must be"),
        ('[[models]]\nname = "a b"\nsource = "x"\n', "'name' must match"),
        ('[[models]]\nname = "a"\nsource = "x"\ntier = "turbo"\n', "unknown tier 'turbo'"),
        ('[[models]]\nname = "a"\nsource = "x"\ncontext_length = -1\n', "'context_length'"),
        (
            '[[models]]\nname = "a"\nsource = "x"\n[[models]]\nname = "a"\nsource = "y"\n',
            "model 'a' is listed twice",
        ),
        ("models = 3\n", "'models' must be an array"),
        ('[[models]]\nname = "a"\nsource = "x"\nmax_concurrency = 0\n', "'max_concurrency'"),
    ],
)
def test_bad_config_names_the_problem(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
