"""The coordinator's one config object, built once from TOML, MLXFLEET_* env and CLI flags."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from coordinator.errors import ConfigError
from coordinator.memory import OS_RESERVE_BYTES
from coordinator.policy import SHARDING, Sharding
from coordinator.tls import TlsConfig, parse_tls
from coordinator.triggers import TriggerConfig
from mlxfleet.errors import KvCacheError, TierError
from mlxfleet.kv import (
    DEFAULT_KV_GROUP_SIZE,
    DEFAULT_PREFIX_CACHE_MIB,
    KV_BITS,
    KV_GROUP_SIZES,
    check_kv,
)
from mlxfleet.tiers import DEFAULT_KNOBS, TIERS, Knobs, Tier, apply_knobs

DEFAULT_GATEWAY_PORT = 8400
DEFAULT_GRPC_PORT = 8401  # mutual TLS: the agents' control streams
DEFAULT_ENROLL_PORT = 8403  # server-authenticated TLS: Enroll only (a new node has no certificate)
SUSPECT_AFTER_S = 3.0  # no heartbeat this long: the node's engines leave the router
DEAD_AFTER_S = 10.0  # no heartbeat this long: the node is dropped and its models placed again
MAX_CONCURRENCY_LIMIT = 256
IDLE_UNLOAD_S = 180.0  # seed 002 §8: unpinned models unload after 3 idle minutes
# A request for a unit with no ready engine, while one is on its way (a reload after idleness,
# a restart after a crash or an OOM kill, a re-placement after a node died), waits this long.
ENGINE_WAIT_S = 60.0
# A running stream whose engine sends nothing this long after tokens began is given up on that
# engine and continued elsewhere (a hung engine: SIGSTOPped, or a Mac deep in swap).
STREAM_STALL_S = 5.0
LABEL_RE = re.compile(r"^[A-Za-z0-9._-]{1,63}$")
MAX_BODY_BYTES = 4 * 1024 * 1024  # a chat request larger than this is refused with 413
RETRY_AFTER_S = 2  # what a 503 tells clients while no engine serves a model
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
MAX_PREFIX_CACHE_MIB = 2**20  # 1 TiB: more than any node has
USAGE_RETENTION_DAYS = 90.0  # request records (usage and audit) older than this are deleted
USAGE_MAX_ROWS = 1_000_000  # and at most this many are kept (~150 MB of SQLite)


def default_home() -> Path:
    """Where all state lives: MLXFLEET_HOME, else ~/.mlxfleet."""
    return Path(os.environ.get("MLXFLEET_HOME") or Path.home() / ".mlxfleet")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One model in one tier: the unit that gets engines (a model in two tiers is two units).

    kv_bits 8 or 4 quantizes the KV cache, in the batch tier only: mlx-lm 0.32.2 cannot batch a
    quantized cache, so such a unit's engines decode one request at a time (max_concurrency 1,
    the others queue), while the interactive tier must let a new request join the running batch.

    sharding "auto" runs a replica that no single node can hold as one pipeline group over the
    fewest nodes that can (coordinator/groups.py); "never" keeps it pending instead.
    """

    name: str  # what clients put in "model"
    source: str  # a local MLX model folder or a Hugging Face id
    tier: Tier = "interactive"
    # None: mlxfleet.kv.DEFAULT_CONTEXT_LENGTH, capped at what the model supports; a value
    # larger than the model supports is refused.
    context_length: int | None = None
    max_concurrency: int | None = None  # None: the tier's knob
    replicas: int = 1
    kv_bits: int = 16  # 16: the model's dtype; 8 or 4: quantized (batch tier, max_concurrency 1)
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE  # values per quantization scale and bias
    pinned: bool = False  # never unloaded for idleness or evicted for room
    # Each engine's prefix cache budget (0: off), counted in its size: the model's own
    # prefix_cache_mib, else its tier's.
    prefix_cache_mib: int = DEFAULT_PREFIX_CACHE_MIB
    required_labels: Mapping[str, str] = field(default_factory=dict)
    preferred_labels: Mapping[str, str] = field(default_factory=dict)
    sharding: Sharding = "auto"  # "never": a replica runs on one node or not at all

    @property
    def key(self) -> tuple[str, Tier]:
        return (self.name, self.tier)

    def engine_args(self) -> tuple[object, ...]:
        """What an engine is started with from this spec: changing any of it needs a new
        engine (the rest, replicas, pinning, labels, applies to running ones)."""
        return (
            self.source, self.context_length, self.kv_bits, self.kv_group_size,
            self.prefix_cache_mib, self.max_concurrency,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class CloudFallback:
    """[cloud]: the Router's last order before a pause (off unless fleet.toml names a model).

    model is any LiteLLM provider model string ("openai/gpt-4o-mini", "anthropic/...");
    the key is read from the environment variable api_key_env, never from the file.
    """

    model: str
    api_key_env: str
    api_base: str | None = None

    @property
    def api_key(self) -> str:
        return os.environ.get(self.api_key_env, "")


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the coordinator process needs; passed down, never re-read."""

    home: Path = field(default_factory=default_home)
    host: str = "127.0.0.1"
    gateway_port: int = DEFAULT_GATEWAY_PORT
    grpc_port: int = DEFAULT_GRPC_PORT
    enroll_port: int = DEFAULT_ENROLL_PORT
    models: tuple[ModelSpec, ...] = ()
    suspect_after_s: float = SUSPECT_AFTER_S
    dead_after_s: float = DEAD_AFTER_S
    # Advertise on mDNS and list LAN nodes; None = only when listening beyond loopback.
    mdns: bool | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    tiers: Mapping[Tier, Knobs] = field(default_factory=lambda: dict(DEFAULT_KNOBS))
    idle_unload_s: float = IDLE_UNLOAD_S
    engine_wait_s: float = ENGINE_WAIT_S
    stream_stall_s: float = STREAM_STALL_S
    os_reserve_bytes: int = OS_RESERVE_BYTES  # a node's own setting overrides it
    triggers: TriggerConfig = field(default_factory=TriggerConfig)
    # Router order: engines on the coordinator's own host first (order 1), then the other
    # nodes (order 2). False: all engines share order 1 and the Router spreads over them.
    prefer_local: bool = True
    # A follow-up turn goes to the replica whose prefix cache holds it (coordinator/affinity.py).
    cache_affinity: bool = True
    cloud: CloudFallback | None = None  # order 3, after local and remote engines
    tls: TlsConfig = field(default_factory=TlsConfig)  # the gateway's HTTPS (off: plain HTTP)
    usage_retention_days: float = USAGE_RETENTION_DAYS
    usage_max_rows: int = USAGE_MAX_ROWS
    path: Path | None = None  # the fleet.toml it was read from (`mlxfleet reload` re-reads it)
    model_tables: tuple[Mapping[str, Any], ...] = ()  # its [[models]] tables, as written
    prefix_cache_mib: Mapping[Tier, int] = field(  # each tier's, for a model that sets none
        default_factory=lambda: dict.fromkeys(TIERS, DEFAULT_PREFIX_CACHE_MIB)
    )

    @property
    def db_path(self) -> Path:
        return self.home / "coordinator.sqlite3"

    @property
    def mdns_enabled(self) -> bool:
        return self.mdns if self.mdns is not None else not self.host.startswith("127.")


MODEL_KEYS = {
    "name",
    "source",
    "tier",
    "tiers",
    "context_length",
    "max_concurrency",
    "replicas",
    "kv_bits",
    "kv_group_size",
    "pinned",
    "labels",
    "prefix_cache_mib",
    "sharding",
}


def _int(raw: Mapping[str, Any], key: str, default: int, low: int, high: int, where: str) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{where}: '{key}' must be an integer {low}-{high}, got {value!r}")
    return value


def _labels(raw: Any, where: str) -> dict[str, str]:
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and LABEL_RE.match(k) and LABEL_RE.match(v)
        for k, v in raw.items()
    ):
        raise ConfigError(f'{where}: labels must be a table of short strings (site = "east")')
    return dict(raw)


def model_units(
    tables: Sequence[Any], where: str, prefix_cache_mib: Mapping[Tier, int]
) -> tuple[ModelSpec, ...]:
    """The units of [[models]] tables (a model in two tiers is two units); ConfigError for a
    bad table or a model listed twice."""
    models = tuple(
        spec
        for i, m in enumerate(tables)
        for spec in _model_specs(m, f"{where}: models[{i}]", prefix_cache_mib)
    )
    keys = [m.key for m in models]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ConfigError(f"{where}: model {dup[0]!r} is listed twice in the {dup[1]} tier")
    return models


def _model_specs(raw: Any, where: str, prefix_cache_mib: Mapping[Tier, int]) -> list[ModelSpec]:
    """One [[models]] entry; `tiers = [...]` makes one unit per tier. `prefix_cache_mib`: each
    tier's budget, for a model that sets none."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table, got {type(raw).__name__}")
    unknown = set(raw) - MODEL_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    name, source = raw.get("name"), raw.get("source")
    if not isinstance(name, str) or not MODEL_NAME_RE.match(name):
        raise ConfigError(f"{where}: 'name' must match {MODEL_NAME_RE.pattern}, got {name!r}")
    if not isinstance(source, str) or not source:
        raise ConfigError(f"{where}: 'source' must be a model folder or a Hugging Face id")
    tiers = raw.get("tiers", [raw.get("tier", "interactive")])
    if not isinstance(tiers, list) or not tiers or len(set(map(str, tiers))) != len(tiers):
        raise ConfigError(f"{where}: 'tiers' must be a list of distinct tiers")
    for tier in tiers:
        if tier not in TIERS:
            raise ConfigError(
                f"{where}: unknown tier {tier!r} (expected one of {', '.join(TIERS)})"
            )
    context = raw.get("context_length")
    if context is not None:
        context = _int(raw, "context_length", 0, 1, 2**22, where)
    slots = raw.get("max_concurrency")
    if slots is not None:
        slots = _int(raw, "max_concurrency", 0, 1, MAX_CONCURRENCY_LIMIT, where)
    kv_bits = raw.get("kv_bits", 16)
    if kv_bits not in KV_BITS or isinstance(kv_bits, bool):
        raise ConfigError(f"{where}: 'kv_bits' must be 16, 8 or 4, got {kv_bits!r}")
    group_size = raw.get("kv_group_size", DEFAULT_KV_GROUP_SIZE)
    if group_size not in KV_GROUP_SIZES or isinstance(group_size, bool):
        allowed = ", ".join(map(str, KV_GROUP_SIZES))
        raise ConfigError(f"{where}: 'kv_group_size' must be {allowed}, got {group_size!r}")
    if "kv_group_size" in raw and kv_bits == 16:
        raise ConfigError(f"{where}: 'kv_group_size' needs kv_bits 8 or 4")
    if kv_bits != 16:
        for tier in tiers:
            try:
                check_kv(kv_bits, group_size, tier=tier, sequences=slots)
            except KvCacheError as exc:
                raise ConfigError(f"{where}: model {name!r}: {exc}") from None
        slots = 1  # the engine runs requests one at a time; sizing counts one sequence
    pinned = raw.get("pinned", False)
    if not isinstance(pinned, bool):
        raise ConfigError(f"{where}: 'pinned' must be true or false, got {pinned!r}")
    labels = raw.get("labels", {})
    if not isinstance(labels, dict) or set(labels) - {"required", "preferred"}:
        raise ConfigError(f"{where}: 'labels' takes 'required' and 'preferred' tables")
    replicas = _int(raw, "replicas", 1, 1, 64, where)
    sharding = next((m for m in SHARDING if m == raw.get("sharding", "auto")), None)
    if sharding is None:
        raise ConfigError(
            f'{where}: \'sharding\' must be "auto" or "never", got {raw["sharding"]!r}'
        )
    own_cache = raw.get("prefix_cache_mib")
    if own_cache is not None:
        own_cache = _int(raw, "prefix_cache_mib", 0, 0, MAX_PREFIX_CACHE_MIB, where)
    required = _labels(labels.get("required", {}), f"{where}: labels.required")
    preferred = _labels(labels.get("preferred", {}), f"{where}: labels.preferred")
    return [
        ModelSpec(
            name,
            source,
            tier,
            context_length=context,
            max_concurrency=slots,
            replicas=replicas,
            kv_bits=kv_bits,
            kv_group_size=group_size,
            pinned=pinned,
            prefix_cache_mib=prefix_cache_mib[tier] if own_cache is None else own_cache,
            required_labels=required,
            preferred_labels=preferred,
            sharding=sharding,
        )
        for tier in tiers
    ]


def _trigger_config(raw: Any, where: str) -> TriggerConfig:
    """[triggers] swap_for_s = 90 ... over the seeds' defaults; every value a positive number."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: 'triggers' must be a table")
    defaults = TriggerConfig()
    known = {f.name: type(getattr(defaults, f.name)) for f in fields(TriggerConfig)}
    changes: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown trigger setting {key!r}")
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"{where}: [triggers] {key} must be a positive number, got {value!r}")
        changes[key] = known[key](value)
    return replace(defaults, **changes)


def _tier_knobs(raw: Any, where: str) -> dict[Tier, Knobs]:
    """[tiers.batch] batch_window_ms = 200 ... over the defaults."""
    knobs = dict(DEFAULT_KNOBS)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: 'tiers' must be a table of tier tables")
    for tier, changes in raw.items():
        if tier not in TIERS or not isinstance(changes, dict):
            raise ConfigError(f"{where}: unknown tier table [tiers.{tier}]")
        try:
            # prefix_cache_mib sits in the same table but is no knob (_tier_prefix_caches).
            knobs[tier] = apply_knobs(
                knobs[tier], {k: v for k, v in changes.items() if k != "prefix_cache_mib"}
            )
        except TierError as exc:
            raise ConfigError(f"{where}: [tiers.{tier}] {exc}") from None
    return knobs


def _tier_prefix_caches(raw: Mapping[str, Any], where: str) -> dict[Tier, int]:
    """[tiers.batch] prefix_cache_mib = 256: the tier's engines' prefix cache budget (0: off;
    `raw` already checked by _tier_knobs). Not a knob: an engine takes it when it starts."""
    budgets = dict.fromkeys(TIERS, DEFAULT_PREFIX_CACHE_MIB)
    for tier in TIERS:
        table = raw.get(tier, {})
        if "prefix_cache_mib" in table:
            budgets[tier] = _int(
                table, "prefix_cache_mib", 0, 0, MAX_PREFIX_CACHE_MIB, f"{where}: [tiers.{tier}]"
            )
    return budgets


def _port(value: Any, key: str) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
        raise ConfigError(f"{key} must be a port number 0-65535, got {value!r}")
    return value


def _seconds(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 3600:
        raise ConfigError(f"{key} must be a number of seconds in (0, 3600], got {value!r}")
    return float(value)


def _positive_number(value: Any, key: str, most: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= most:
        raise ConfigError(f"{key} must be a number in (0, {most:g}], got {value!r}")
    return float(value)


def _engine_wait(raw: Mapping[str, Any]) -> float:
    """engine_wait_s; `reload_wait_s`, its name before it covered crashes too, still works."""
    if "engine_wait_s" in raw and "reload_wait_s" in raw:
        raise ConfigError("give engine_wait_s or its old name reload_wait_s, not both")
    key = "reload_wait_s" if "reload_wait_s" in raw else "engine_wait_s"
    return _seconds(raw.get(key, ENGINE_WAIT_S), key)


def _cloud(raw: Any, where: str) -> CloudFallback | None:
    """[cloud] model = "openai/gpt-4o-mini", api_key_env = "OPENAI_API_KEY", api_base = ..."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: [cloud] must be a table")
    unknown = set(raw) - {"model", "api_key_env", "api_base"}
    if unknown:
        raise ConfigError(f"{where}: [cloud] unknown key {sorted(unknown)[0]!r}")
    model, env_name, base = raw.get("model"), raw.get("api_key_env"), raw.get("api_base")
    if not isinstance(model, str) or "/" not in model:
        raise ConfigError(
            f"{where}: [cloud] model must be a LiteLLM provider model string such as "
            f"'openai/gpt-4o-mini', got {model!r}"
        )
    if not isinstance(env_name, str) or not env_name:
        raise ConfigError(f"{where}: [cloud] api_key_env must name an environment variable")
    if not os.environ.get(env_name):
        raise ConfigError(f"{where}: [cloud] api_key_env {env_name} is not set")
    if base is not None and not (
        isinstance(base, str) and base.startswith(("http://", "https://"))
    ):
        raise ConfigError(f"{where}: [cloud] api_base must be an http(s) URL, got {base!r}")
    return CloudFallback(model, env_name, base)


def _optional_bool(value: Any, key: str) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def load_config(path: Path | None = None, **overrides: Any) -> Config:
    """Build the Config: TOML file, then MLXFLEET_* environment, then CLI overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    known = {
        "home",
        "host",
        "gateway_port",
        "grpc_port",
        "enroll_port",
        "models",
        "suspect_after_s",
        "dead_after_s",
        "mdns",
        "tiers",
        "idle_unload_s",
        "reload_wait_s",
        "engine_wait_s",
        "stream_stall_s",
        "os_reserve_gib",
        "triggers",
        "prefer_local",
        "cache_affinity",
        "cloud",
        "tls",
        "usage_retention_days",
        "usage_max_rows",
    }
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{path}: unknown key {sorted(unknown)[0]!r}")
    models_raw = raw.get("models", [])
    if not isinstance(models_raw, list):
        raise ConfigError(f"{path}: 'models' must be an array of tables ([[models]])")
    tiers = _tier_knobs(raw.get("tiers", {}), str(path))
    prefix_caches = _tier_prefix_caches(raw.get("tiers", {}), str(path))
    models = model_units(models_raw, str(path), prefix_caches)

    env = os.environ
    config = Config(
        home=Path(raw.get("home") or default_home()).expanduser(),
        host=str(raw.get("host", "127.0.0.1")),
        gateway_port=_port(env.get("MLXFLEET_PORT", raw.get("gateway_port", 8400)), "gateway_port"),
        grpc_port=_port(env.get("MLXFLEET_GRPC_PORT", raw.get("grpc_port", 8401)), "grpc_port"),
        enroll_port=_port(
            env.get("MLXFLEET_ENROLL_PORT", raw.get("enroll_port", DEFAULT_ENROLL_PORT)),
            "enroll_port",
        ),
        models=models,
        suspect_after_s=_seconds(raw.get("suspect_after_s", SUSPECT_AFTER_S), "suspect_after_s"),
        dead_after_s=_seconds(raw.get("dead_after_s", DEAD_AFTER_S), "dead_after_s"),
        mdns=_optional_bool(raw.get("mdns"), "mdns"),
        tiers=tiers,
        triggers=_trigger_config(raw.get("triggers", {}), str(path)),
        idle_unload_s=_seconds(raw.get("idle_unload_s", IDLE_UNLOAD_S), "idle_unload_s"),
        engine_wait_s=_engine_wait(raw),
        stream_stall_s=_seconds(raw.get("stream_stall_s", STREAM_STALL_S), "stream_stall_s"),
        prefer_local=_optional_bool(raw.get("prefer_local"), "prefer_local") is not False,
        cache_affinity=_optional_bool(raw.get("cache_affinity"), "cache_affinity") is not False,
        cloud=_cloud(raw.get("cloud"), str(path)),
        path=path,
        model_tables=tuple(models_raw),
        prefix_cache_mib=prefix_caches,
        tls=parse_tls(raw.get("tls", {}), str(path)),
        usage_retention_days=_positive_number(
            raw.get("usage_retention_days", USAGE_RETENTION_DAYS), "usage_retention_days", 36600
        ),
        usage_max_rows=int(
            _positive_number(raw.get("usage_max_rows", USAGE_MAX_ROWS), "usage_max_rows", 10**9)
        ),
        os_reserve_bytes=int(
            _seconds(raw.get("os_reserve_gib", OS_RESERVE_BYTES / 2**30), "os_reserve_gib") * 2**30
        ),
    )
    if config.dead_after_s <= config.suspect_after_s:
        raise ConfigError(
            f"dead_after_s ({config.dead_after_s}) must be longer than "
            f"suspect_after_s ({config.suspect_after_s})"
        )
    clean = {k: v for k, v in overrides.items() if v is not None}
    for key in ("gateway_port", "grpc_port", "enroll_port"):
        if key in clean:
            clean[key] = _port(clean[key], key)
    return replace(config, **clean)
