"""The coordinator's one config object, built once from TOML, MLXFLEET_* env and CLI flags."""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from coordinator.errors import ConfigError

Tier = Literal["interactive", "batch"]
TIERS: tuple[Tier, ...] = ("interactive", "batch")

DEFAULT_GATEWAY_PORT = 8400
DEFAULT_GRPC_PORT = 8401  # mutual TLS: the agents' control streams
DEFAULT_ENROLL_PORT = 8403  # server-authenticated TLS: Enroll only (a new node has no certificate)
SUSPECT_AFTER_S = 3.0  # no heartbeat this long: the node's engines leave the router
DEAD_AFTER_S = 10.0  # no heartbeat this long: the node is dropped and its models placed again
DEFAULT_CONTEXT_LENGTH = 8192  # tokens; the seeds' cap unless a model asks more
DEFAULT_MAX_CONCURRENCY = 4  # sequences one engine decodes together (the interactive default)
MAX_CONCURRENCY_LIMIT = 256
MAX_BODY_BYTES = 4 * 1024 * 1024  # a chat request larger than this is refused with 413
RETRY_AFTER_S = 2  # what a 503 tells clients while no engine serves a model
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


def default_home() -> Path:
    """Where all state lives: MLXFLEET_HOME, else ~/.mlxfleet."""
    return Path(os.environ.get("MLXFLEET_HOME") or Path.home() / ".mlxfleet")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One model the fleet should serve."""

    name: str  # what clients put in "model"
    source: str  # a local MLX model folder or a Hugging Face id
    tier: Tier = "interactive"
    context_length: int = DEFAULT_CONTEXT_LENGTH
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY


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

    @property
    def db_path(self) -> Path:
        return self.home / "coordinator.sqlite3"

    @property
    def mdns_enabled(self) -> bool:
        return self.mdns if self.mdns is not None else not self.host.startswith("127.")


def _model_spec(raw: Any, where: str) -> ModelSpec:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table, got {type(raw).__name__}")
    unknown = set(raw) - {"name", "source", "tier", "context_length", "max_concurrency"}
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    name, source = raw.get("name"), raw.get("source")
    if not isinstance(name, str) or not MODEL_NAME_RE.match(name):
        raise ConfigError(f"{where}: 'name' must match {MODEL_NAME_RE.pattern}, got {name!r}")
    if not isinstance(source, str) or not source:
        raise ConfigError(f"{where}: 'source' must be a model folder or a Hugging Face id")
    tier = raw.get("tier", "interactive")
    if tier not in TIERS:
        raise ConfigError(f"{where}: unknown tier {tier!r} (expected one of {', '.join(TIERS)})")
    context = raw.get("context_length", DEFAULT_CONTEXT_LENGTH)
    if not isinstance(context, int) or isinstance(context, bool) or context <= 0:
        raise ConfigError(f"{where}: 'context_length' must be a positive integer, got {context!r}")
    slots = raw.get("max_concurrency", DEFAULT_MAX_CONCURRENCY)
    if (
        not isinstance(slots, int)
        or isinstance(slots, bool)
        or not 1 <= slots <= MAX_CONCURRENCY_LIMIT
    ):
        raise ConfigError(
            f"{where}: 'max_concurrency' must be 1-{MAX_CONCURRENCY_LIMIT}, got {slots!r}"
        )
    return ModelSpec(name, source, tier, context, slots)


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
    }
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{path}: unknown key {sorted(unknown)[0]!r}")
    models_raw = raw.get("models", [])
    if not isinstance(models_raw, list):
        raise ConfigError(f"{path}: 'models' must be an array of tables ([[models]])")
    models = tuple(_model_spec(m, f"{path}: models[{i}]") for i, m in enumerate(models_raw))
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"{path}: model {dup!r} is listed twice")

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
