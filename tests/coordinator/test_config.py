"""Config: TOML + env + CLI overrides, and one clear message per bad value."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from coordinator.config import load_config
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
    assert model.context_length is None  # the default, capped by what the model supports
    assert model.max_concurrency is None  # the tier's knob
    assert (model.replicas, model.kv_bits, model.pinned) == (1, 16, False)


def test_a_model_in_two_tiers_is_two_units_with_tier_knobs(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
idle_unload_s = 60
[tiers.batch]
batch_window_ms = 200
[[models]]
name = "q"
source = "/m/q"
tiers = ["interactive", "batch"]
replicas = 2
pinned = true
labels.required = {site = "east"}
labels.preferred = {chip = "m4"}
""",
    )
    config = load_config(path, home=tmp_path)
    assert [m.key for m in config.models] == [("q", "interactive"), ("q", "batch")]
    units = {m.key: m for m in config.models}
    batch = units["q", "batch"]
    assert batch.replicas == 2 and batch.pinned
    assert batch.required_labels == {"site": "east"} and batch.preferred_labels == {"chip": "m4"}
    assert config.tiers["batch"].batch_window_ms == 200
    assert config.tiers["batch"].max_batch_size == 12  # untouched knobs keep the defaults
    assert config.tiers["interactive"].batch_window_ms == 0
    assert config.idle_unload_s == 60
    assert ("q", "nope") not in units


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
        (
            '[[models]]\nname = "a"\nsource = "x"\ntiers = ["batch", "gold"]\n',
            "unknown tier 'gold'",
        ),
        ('[[models]]\nname = "a"\nsource = "x"\nreplicas = 0\n', "'replicas' must be an integer"),
        ('[[models]]\nname = "a"\nsource = "x"\nkv_bits = 3\n', "'kv_bits' must be 16, 8 or 4"),
        (
            '[[models]]\nname = "a"\nsource = "x"\nkv_bits = 8\n',
            "model 'a': kv_bits 8 is for the batch tier only",
        ),
        (
            '[[models]]\nname = "a"\nsource = "x"\nkv_bits = 4\ntiers = ["batch", "interactive"]\n',
            "model 'a': kv_bits 4 is for the batch tier only",
        ),
        (
            '[[models]]\nname = "a"\nsource = "x"\ntier = "batch"\nkv_bits = 8\n'
            "max_concurrency = 4\n",
            "model 'a': kv_bits 8 decodes one request at a time, so max_concurrency must be 1",
        ),
        (
            '[[models]]\nname = "a"\nsource = "x"\ntier = "batch"\nkv_bits = 8\n'
            "kv_group_size = 16\n",
            "'kv_group_size' must be 32, 64, 128, got 16",
        ),
        (
            '[[models]]\nname = "a"\nsource = "x"\nkv_group_size = 32\n',
            "'kv_group_size' needs kv_bits 8 or 4",
        ),
        (
            '[[models]]\nname = "a"\nsource = "x"\nlabels.needed = {a = "b"}\n',
            "'labels' takes 'required' and 'preferred'",
        ),
        (
            '[[models]]\nname = "a"\nsource = "x"\nlabels.required = {a = 1}\n',
            "labels must be a table of short strings",
        ),
        ("[tiers.batch]\nbatch_window_ms = -5\n", "batch_window_ms must be an integer 0-"),
        (
            "[tiers.batch]\nprefix_cache_mib = -1\n",
            r"\[tiers.batch\]: 'prefix_cache_mib' must be an integer 0-1048576, got -1$",
        ),
        (
            '[tiers.interactive]\nprefix_cache_mib = "512"\n',
            r"'prefix_cache_mib' must be an integer 0-1048576, got '512'$",
        ),
        (
            "[tiers.batch]\nprefix_cache_mib = 1.5\n",
            r"'prefix_cache_mib' must be an integer 0-1048576, got 1.5$",
        ),
        (
            '[[models]]\nname = "a"\nsource = "x"\nprefix_cache_mib = true\n',
            r"models\[0\]: 'prefix_cache_mib' must be an integer 0-1048576, got True$",
        ),
        (
            '[[models]]\nname = "a"\nsource = "x"\nprefix_cache_mib = 2_000_000\n',
            r"'prefix_cache_mib' must be an integer 0-1048576, got 2000000$",
        ),
        ("[tiers.gold]\nbatch_window_ms = 5\n", "unknown tier table"),
        (
            '[[models]]\nname = "a"\nsource = "x"\nsharding = "always"\n',
            r"models\[0\]: 'sharding' must be \"auto\" or \"never\", got 'always'$",
        ),
        (
            '[[models]]\nname = "a"\nsource = "x"\nsharding = false\n',
            r"'sharding' must be \"auto\" or \"never\", got False$",
        ),
    ],
)
def test_bad_config_names_the_problem(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_quantized_kv_is_a_batch_unit_of_one_slot(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[[models]]\nname = "long"\nsource = "/m/l"\ntier = "batch"\nkv_bits = 8\n'
        '[[models]]\nname = "q4"\nsource = "/m/q"\ntier = "batch"\nkv_bits = 4\n'
        "kv_group_size = 32\nmax_concurrency = 1\n",
    )
    long, q4 = load_config(path).models
    assert (long.kv_bits, long.kv_group_size, long.max_concurrency) == (8, 64, 1)
    assert (q4.kv_bits, q4.kv_group_size, q4.max_concurrency) == (4, 32, 1)


def test_sharding_is_auto_unless_a_model_says_never(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[[models]]\nname = "big"\nsource = "/m/b"\ntiers = ["interactive", "batch"]\n'
        'sharding = "never"\n[[models]]\nname = "q"\nsource = "/m/q"\n',
    )
    big_chat, big_jobs, q = load_config(path).models
    assert (big_chat.sharding, big_jobs.sharding, q.sharding) == ("never", "never", "auto")
    assert big_chat.engine_args() == replace(big_chat, sharding="auto").engine_args()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def test_trigger_thresholds_are_configurable(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, "[triggers]\nswap_for_s = 5\nmemory_fire_fraction = 0.9\n")
    )
    assert config.triggers.swap_for_s == 5.0
    assert config.triggers.memory_fire_fraction == 0.9
    assert config.triggers.swap_fire_bytes == 768 * 2**20  # the rest keep the seeds' defaults
    with pytest.raises(ConfigError, match="unknown trigger setting 'swap'"):
        load_config(write(tmp_path, "[triggers]\nswap = 1\n"))
    with pytest.raises(ConfigError, match="swap_for_s must be a positive number"):
        load_config(write(tmp_path, "[triggers]\nswap_for_s = -1\n"))


def test_prefer_local_defaults_on_and_can_be_turned_off(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")).prefer_local is True
    assert load_config(write(tmp_path, "prefer_local = false\n")).prefer_local is False
    with pytest.raises(ConfigError, match="prefer_local"):
        load_config(write(tmp_path, 'prefer_local = "no"\n'))


def test_cloud_fallback_is_off_by_default_and_checked_when_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert load_config(write(tmp_path, "")).cloud is None
    table = '[cloud]\nmodel = "openai/gpt-4o-mini"\napi_key_env = "MLXFLEET_T_KEY"\n'
    monkeypatch.delenv("MLXFLEET_T_KEY", raising=False)
    with pytest.raises(ConfigError, match="MLXFLEET_T_KEY is not set"):
        load_config(write(tmp_path, table))
    monkeypatch.setenv("MLXFLEET_T_KEY", "sk-x")
    cloud = load_config(write(tmp_path, table)).cloud
    assert cloud is not None and (cloud.model, cloud.api_key) == ("openai/gpt-4o-mini", "sk-x")
    with pytest.raises(ConfigError, match="provider model string"):
        load_config(write(tmp_path, '[cloud]\nmodel = "gpt"\napi_key_env = "MLXFLEET_T_KEY"\n'))
    with pytest.raises(ConfigError, match="unknown key 'api_key'"):
        load_config(write(tmp_path, table + 'api_key = "sk-in-the-file"\n'))


def test_prefix_cache_budget_per_tier_and_per_model(tmp_path: Path) -> None:
    """[tiers.X] prefix_cache_mib sets a tier's engines' budget, a model's own replaces it
    (0: off), and neither touches the tier's knobs; unset, both tiers keep 512 MiB."""
    path = write(
        tmp_path,
        """
[tiers.batch]
prefix_cache_mib = 128
batch_window_ms = 200
[tiers.interactive]
prefix_cache_mib = 0
[[models]]
name = "q"
source = "/m/q"
tiers = ["interactive", "batch"]
[[models]]
name = "own"
source = "/m/o"
tiers = ["interactive", "batch"]
prefix_cache_mib = 1024
[[models]]
name = "long"
source = "/m/l"
tier = "batch"
kv_bits = 8
""",
    )
    config = load_config(path, home=tmp_path)
    budgets = {(m.name, m.tier): m.prefix_cache_mib for m in config.models}
    assert budgets == {
        ("q", "interactive"): 0,
        ("q", "batch"): 128,
        ("own", "interactive"): 1024,
        ("own", "batch"): 1024,
        ("long", "batch"): 128,  # the quantized-KV engine keeps a prefix cache too
    }
    assert config.tiers["batch"].batch_window_ms == 200  # still a knob table
    assert config.tiers["interactive"] == load_config(None).tiers["interactive"]
    defaults = load_config(write(tmp_path, '[[models]]\nname = "d"\nsource = "/m/d"\n')).models
    assert [m.prefix_cache_mib for m in defaults] == [512]


def test_engine_wait_and_stream_stall(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    assert (load_config(None).engine_wait_s, load_config(None).stream_stall_s) == (60.0, 5.0)
    path.write_text("engine_wait_s = 30\nstream_stall_s = 2.5\n")
    config = load_config(path)
    assert (config.engine_wait_s, config.stream_stall_s) == (30.0, 2.5)
    path.write_text("reload_wait_s = 45\n")  # its old name
    assert load_config(path).engine_wait_s == 45.0
    path.write_text("reload_wait_s = 45\nengine_wait_s = 30\n")
    with pytest.raises(ConfigError, match="not both"):
        load_config(path)
    path.write_text("stream_stall_s = 0\n")
    with pytest.raises(ConfigError, match=r"stream_stall_s must be a number of seconds"):
        load_config(path)


def test_models_configured_in_code_have_tables_that_give_them_back(tmp_path: Path) -> None:
    """`mlxfleet up` builds its models in code: the runtime catalog starts from their tables."""
    from coordinator.catalog import spec_tables
    from coordinator.config import model_units

    path = tmp_path / "fleet.toml"
    path.write_text(
        '[[models]]\nname = "q"\nsource = "/m/q"\ntiers = ["interactive", "batch"]\n'
        "context_length = 2048\nreplicas = 2\npinned = true\n"
        '[models.labels.required]\nsite = "east"\n'
        '[[models]]\nname = "k"\nsource = "/m/k"\ntier = "batch"\nkv_bits = 8\n'
        '[[models]]\nname = "w"\nsource = "/m/w"\nsharding = "never"\n'
    )
    config = load_config(path)
    again = model_units(spec_tables(config.models), "t", config.prefix_cache_mib)
    assert again == config.models
    assert [s.sharding for s in again if s.name == "w"] == ["never"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("usage_retention_days = -1", "usage_retention_days must be a number in (0, 36600]"),
        ("usage_retention_days = 0", "usage_retention_days must be a number in (0, 36600]"),
        ('usage_max_rows = "lots"', "usage_max_rows must be a number in (0, 1e+09]"),
    ],
)
def test_usage_retention_must_be_positive(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(line + "\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(path)
    path.write_text("usage_retention_days = 7\nusage_max_rows = 5000\n")
    config = load_config(path)
    assert (config.usage_retention_days, config.usage_max_rows) == (7.0, 5000)
